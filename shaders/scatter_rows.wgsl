// scatter_rows: one invocation per source element; writes into the widened
// copy of the destination (rows not named keep their values).
// params: [0] elements, [1] width, then the destination row of each source row.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> src: array<TW>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

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
