// pack: the f32 outputs of the other shaders -> storage words of the dtype.
// Rounds to nearest even; one invocation per word (two 16-bit elements).
// params: [0] elements.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> wide_in: array<f32>;
@group(0) @binding(2) var<storage, read_write> words: array<u32>;

@compute @workgroup_size(WG)
fn pack(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let w = wg_index(wid, nwg) * WG + lid;
    let n = params[0];
    let i = w * T_EPW;
    if i >= n {
        return;
    }
    let lo = wide_in[i];
    var hi = 0.0;
    if T_EPW == 2u && i + 1u < n {
        hi = wide_in[i + 1u];
    }
    words[w] = t_pack2(lo, hi);
}
