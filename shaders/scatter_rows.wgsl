// scatter_rows: rows not named keep their values.
// params: [0] elements (or words), [1] row width in elements (or words), then
// the destination row of each source row.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> src: array<TW>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> src_w: array<u32>;
@group(0) @binding(4) var<storage, read_write> dst_w: array<u32>;

// Rows that are whole u32 words (f32, or 16-bit with an even width): one
// invocation per source word, written in place (destinations are unique).
@compute @workgroup_size(WG)
fn scatter_rows_words(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let e = wg_index(wid, nwg) * WG + lid;
    if e >= params[0] {
        return;
    }
    let w = params[1];
    dst_w[params[2u + e / w] * w + e % w] = src_w[e];
}

// Rows that share a word with their neighbour (16-bit, odd width): one
// invocation per source element, into the widened copy of the destination
// (packed back afterwards).
@compute @workgroup_size(WG)
fn scatter_rows(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let e = wg_index(wid, nwg) * WG + lid;
    if e >= params[0] {
        return;
    }
    let w = params[1];
    out[params[2u + e / w] * w + e % w] = t_get(src[e / T_EPW], e % T_EPW);
}
