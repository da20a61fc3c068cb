// count_above: one workgroup per row; counts entries strictly greater than the
// threshold (compared through order keys, so NaN is never counted).
// params: [0] rows, [1] threshold (f32 bits), then indptr (rows + 1).

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> counts: array<u32>;

@compute @workgroup_size(WG)
fn count_above(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let r = wg_index(wid, nwg);
    if r >= params[0] {
        return;
    }
    let t = order_key(bitcast<f32>(params[1]));
    let start = params[2u + r];
    let end = params[3u + r];
    var c = 0u;
    for (var i = start + lid; i < end; i += WG) {
        if order_key(x[i]) > t {
            c += 1u;
        }
    }
    let total = wg_sum_u(lid, c);
    if lid == 0u {
        counts[r] = total;
    }
}
