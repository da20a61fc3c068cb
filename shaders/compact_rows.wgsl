// compact_rows: one invocation per element of a moved row; reads the original
// buffer, writes the widened copy (so in-place moves cannot race).
// params: [0] elements, [1] width, then (dst_row, src_row) pairs.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> src: array<TW>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

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
