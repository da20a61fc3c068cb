// qk_logits: one workgroup per logit row (sequence, query head, query).
// params: [0] rows, [1] D, [2] scale (f32 bits); row r at params[8 + 5 r ..]:
//   q_off, kv_row0, kv_len, limit (keys j >= limit get -inf), out_off.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> q_buf: array<TW>;
@group(0) @binding(2) var<storage, read> k_buf: array<TW>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn ld_q(i: u32) -> f32 { return t_get(q_buf[i / T_EPW], i % T_EPW); }
fn ld_k(i: u32) -> f32 { return t_get(k_buf[i / T_EPW], i % T_EPW); }

@compute @workgroup_size(WG)
fn qk_logits(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(local_invocation_index) lid: u32) {
    let r = wg_index(wid, nwg);
    if r >= params[0] {
        return;
    }
    let d = params[1];
    let scale = bitcast<f32>(params[2]);
    let b = 8u + 5u * r;
    let q_off = params[b];
    let kv_row0 = params[b + 1u];
    let kv_len = params[b + 2u];
    let limit = params[b + 3u];
    let out_off = params[b + 4u];
    for (var j = lid; j < kv_len; j += WG) {
        var z = f_neg_inf();
        if j < limit {
            let kr = (kv_row0 + j) * d;
            var acc = 0.0;
            for (var c = 0u; c < d; c++) {
                acc += ld_q(q_off + c) * ld_k(kr + c);
            }
            z = scale * acc;
        }
        out[out_off + j] = z;
    }
}
