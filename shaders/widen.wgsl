// widen: storage words of the dtype -> f32, one invocation per element.
// params: [0] elements.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> src: array<TW>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn widen(@builtin(workgroup_id) wid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let e = wg_index(wid, nwg) * WG + lid;
    if e >= params[0] {
        return;
    }
    out[e] = t_get(src[e / T_EPW], e % T_EPW);
}
