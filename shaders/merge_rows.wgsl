// merge_rows: one invocation per destination element; f32 accumulation over
// the group's members. params: [0] elements, [1] width, [2] groups, then indptr
// (groups + 1), members, weights (f32 bits).

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> src: array<TW>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn merge_rows(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let e = wg_index(wid, nwg) * WG + lid;
    if e >= params[0] {
        return;
    }
    let w = params[1];
    let groups = params[2];
    let g = e / w;
    let c = e % w;
    let ip = 3u;
    let members = ip + groups + 1u;
    let total = params[ip + groups];
    let weights = members + total;
    var acc = 0.0;
    for (var m = params[ip + g]; m < params[ip + g + 1u]; m++) {
        let s = params[members + m] * w + c;
        acc += bitcast<f32>(params[weights + m]) * t_get(src[s / T_EPW], s % T_EPW);
    }
    out[e] = acc;
}
