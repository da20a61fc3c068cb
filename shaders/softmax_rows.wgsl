// softmax_rows: one workgroup per row. params: [0] rows, then indptr (rows + 1).

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> lg: array<f32>;

@compute @workgroup_size(WG)
fn softmax_rows(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) lid: u32) {
    let r = wg_index(wid, nwg);
    if r >= params[0] {
        return;
    }
    let start = params[1u + r];
    let n = params[2u + r] - start;
    for (var i = lid; i < n; i += WG) {
        lg[start + i] = x[start + i];
    }
    _ = wg_softmax(lid, start, n);
}
