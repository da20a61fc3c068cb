// entmax_prefill_backward: the AdaSplash backward in two passes plus a host
// reduction of dα.
//
// `entmax_prefill_backward_rows`, one workgroup per (query row, head) with the
// item table of common_attend.wgsl (item = row * Hq + head, out_off = offset of
// the row in q / d_out / dq): recomputes p and u = p^(2-α) from τ, then
// δ = d_out · (Σ u v / Σ u), dq = scale Σ_j u_j (d_out · v_j − δ) k_j, and the
// row's dα term; stores δ for the key pass.
//
// `entmax_prefill_backward_keys`, one workgroup per cached key j of a segment:
// visits every (query head of the GQA group, query row) that sees j and sums
// dv_j = Σ p d_out and dk_j = scale Σ u (d_out · v_j − δ) q.
//
// params header (16 words): [0] items, [1] D, [2] scale, [3] lg_total,
// [4] delta_off, [5] drow_off, [6] Hq, [7] group, [8] causal, [9] alpha_off,
// [10] dv_off; rows items at 16 + 8 i; key items at 16 + 8 i:
//   kv_row, j, nk, q_start, nq, g (KV head), coef_off, 0.

@group(0) @binding(0) var<storage, read> params: array<u32>;
@group(0) @binding(1) var<storage, read> q_buf: array<TW>;
@group(0) @binding(2) var<storage, read> k_buf: array<TW>;
@group(0) @binding(3) var<storage, read> v_buf: array<TW>;
@group(0) @binding(4) var<storage, read> dout_buf: array<TW>;
@group(0) @binding(5) var<storage, read> tau_in: array<f32>;
@group(0) @binding(6) var<storage, read_write> work: array<f32>;
@group(0) @binding(7) var<storage, read_write> grad: array<f32>;

const BW_HEADER: u32 = 16u;

fn ld_q(i: u32) -> f32 { return t_get(q_buf[i / T_EPW], i % T_EPW); }
fn ld_k(i: u32) -> f32 { return t_get(k_buf[i / T_EPW], i % T_EPW); }
fn ld_v(i: u32) -> f32 { return t_get(v_buf[i / T_EPW], i % T_EPW); }
fn ld_do(i: u32) -> f32 { return t_get(dout_buf[i / T_EPW], i % T_EPW); }

// (p, u) of a scaled score x = (α-1) z against τ.
fn weights(x: f32, tau: f32, alpha: f32) -> vec2<f32> {
    let w = x - tau;
    if w > 0.0 {
        let c0 = 1.0 / (alpha - 1.0);
        return vec2<f32>(pow(w, c0), pow(w, (2.0 - alpha) * c0));
    }
    return vec2<f32>(0.0, 0.0);
}

@compute @workgroup_size(WG)
fn entmax_prefill_backward_rows(@builtin(workgroup_id) wid: vec3<u32>,
                                @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32) {
    let item = wg_index(wid, nwg);
    if item >= params[0] {
        return;
    }
    let d = params[1];
    let scale = bitcast<f32>(params[2]);
    let total = params[3];
    let b = BW_HEADER + 8u * item;
    let q_off = params[b];
    let kv_row0 = params[b + 1u];
    let n = params[b + 2u];
    let o_off = params[b + 4u];
    let lg_off = params[b + 5u];
    let alpha = bitcast<f32>(params[b + 6u]);
    let limit = params[b + 7u];
    let am1 = alpha - 1.0;
    let tau = tau_in[item];
    var usum = 0.0;
    var h = 0.0;
    for (var t = lid; t < n; t += WG) {
        var pu = vec2<f32>(0.0, 0.0);
        var dy = 0.0;
        if t < limit {
            let kr = (kv_row0 + t) * d;
            var z = 0.0;
            for (var c = 0u; c < d; c++) {
                z += ld_q(q_off + c) * ld_k(kr + c);
                dy += ld_do(o_off + c) * ld_v(kr + c);
            }
            pu = weights(am1 * scale * z, tau, alpha);
        }
        work[lg_off + t] = pu.x;
        work[total + lg_off + t] = pu.y;
        work[2u * total + lg_off + t] = dy;
        usum += pu.y;
        if pu.x > 0.0 {
            h += pu.x * log(pu.x);
        }
    }
    let sums = wg_sum3(lid, usum, h, 0.0);
    let sg = sums.x;
    let hh = sums.y;
    sync_all();
    // δ = d_out · Σ u v / Σ u.
    var part = 0.0;
    for (var c = lid; c < d; c += WG) {
        var acc = 0.0;
        for (var t = 0u; t < n; t++) {
            let u = work[total + lg_off + t];
            if u != 0.0 {
                acc += u * ld_v((kv_row0 + t) * d + c);
            }
        }
        part += ld_do(o_off + c) * acc;
    }
    var delta = wg_sum(lid, part);
    if sg <= 0.0 {
        delta = 0.0;
    } else {
        delta = delta / sg;
    }
    // dq and the row's dα term.
    for (var c = lid; c < d; c += WG) {
        var acc = 0.0;
        for (var t = 0u; t < n; t++) {
            let u = work[total + lg_off + t];
            if u != 0.0 {
                acc += u * (work[2u * total + lg_off + t] - delta) * ld_k((kv_row0 + t) * d + c);
            }
        }
        grad[o_off + c] = scale * acc;
    }
    var da = 0.0;
    if sg > 0.0 {
        for (var t = lid; t < n; t += WG) {
            let p = work[lg_off + t];
            let pt = work[total + lg_off + t] / sg;
            var s = 0.0;
            if p > 0.0 {
                s = p * log(p);
            }
            da += work[2u * total + lg_off + t] * ((p - pt) / (am1 * am1) - (s - pt * hh) / am1);
        }
    }
    let dalpha_row = wg_sum(lid, da);
    if lid == 0u {
        work[params[4] + item] = delta;
        grad[params[5] + item] = dalpha_row;
    }
}

@compute @workgroup_size(WG)
fn entmax_prefill_backward_keys(@builtin(workgroup_id) wid: vec3<u32>,
                                @builtin(num_workgroups) nwg: vec3<u32>,
                                @builtin(local_invocation_index) lid: u32) {
    let item = wg_index(wid, nwg);
    if item >= params[0] {
        return;
    }
    let d = params[1];
    let scale = bitcast<f32>(params[2]);
    let hq = params[6];
    let group = params[7];
    let causal = params[8] != 0u;
    let alpha_off = params[9];
    let delta_off = params[4];
    let b = BW_HEADER + 8u * item;
    let kv_row = params[b];
    let j = params[b + 1u];
    let nk = params[b + 2u];
    let q_start = params[b + 3u];
    let nq = params[b + 4u];
    let g = params[b + 5u];
    let coef = params[b + 6u];
    let pairs = group * nq;
    for (var pi = lid; pi < pairs; pi += WG) {
        let h = g * group + pi / nq;
        let i = pi % nq;
        var p = 0.0;
        var ds = 0.0;
        if !causal || j + nq <= nk + i {
            let r = (q_start + i) * hq + h;
            let alpha = bitcast<f32>(params[alpha_off + h]);
            var z = 0.0;
            var dy = 0.0;
            for (var c = 0u; c < d; c++) {
                z += ld_q(r * d + c) * ld_k(kv_row * d + c);
                dy += ld_do(r * d + c) * ld_v(kv_row * d + c);
            }
            let pu = weights((alpha - 1.0) * scale * z, tau_in[r], alpha);
            p = pu.x;
            ds = pu.y * (dy - work[delta_off + r]);
        }
        work[coef + 2u * pi] = p;
        work[coef + 2u * pi + 1u] = ds;
    }
    sync_all();
    let dv_off = params[10];
    for (var c = lid; c < d; c += WG) {
        var dv = 0.0;
        var dk = 0.0;
        for (var pi = 0u; pi < pairs; pi++) {
            let p = work[coef + 2u * pi];
            let ds = work[coef + 2u * pi + 1u];
            if p != 0.0 || ds != 0.0 {
                let h = g * group + pi / nq;
                let r = (q_start + pi % nq) * hq + h;
                dv += p * ld_do(r * d + c);
                dk += ds * ld_q(r * d + c);
            }
        }
        grad[kv_row * d + c] = scale * dk;
        grad[dv_off + kv_row * d + c] = dv;
    }
}
