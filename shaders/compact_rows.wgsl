// compact_rows. The moves' sources and destinations are disjoint rows
// (`CompactMeta`), so they can run in any order.
// params: [0] elements (or words), [1] row width in elements (or words), then
// (dst_row, src_row) pairs.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> src: array<TW>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read_write> rows_w: array<u32>;

// Rows that are whole u32 words (f32, or 16-bit with an even width): one
// invocation per moved word, in place.
@compute @workgroup_size(WG)
fn compact_rows_words(@builtin(workgroup_id) wid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let e = wg_index(wid, nwg) * WG + lid;
    if e >= params[0] {
        return;
    }
    let w = params[1];
    let p = e / w;
    let c = e % w;
    rows_w[params[2u + 2u * p] * w + c] = rows_w[params[2u + 2u * p + 1u] * w + c];
}

// Rows that share a word with their neighbour (16-bit, odd width): one
// invocation per element of a moved row; reads the original buffer, writes a
// widened copy (packed back afterwards), so neighbouring halves cannot race.
@compute @workgroup_size(WG)
fn compact_rows(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let e = wg_index(wid, nwg) * WG + lid;
    if e >= params[0] {
        return;
    }
    let w = params[1];
    let p = e / w;
    let c = e % w;
    let s = params[2u + 2u * p + 1u] * w + c;
    out[params[2u + 2u * p] * w + c] = t_get(src[s / T_EPW], s % T_EPW);
}
