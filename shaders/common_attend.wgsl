// One attention row per workgroup: logits over a candidate list, a normaliser,
// then the weighted sum of V rows. Shared by decode_attention, prefill_attention
// and entmax_prefill. The including shader declares the bindings `params` (u32),
// `q_buf`, `k_buf`, `v_buf` (TW words), `lg` and `out` (f32).
//
// params header (u32): [0] items, [1] D, [2] scale (f32 bits), [3] block_k,
// [4] live words per item; item `i` at params[8 + 8 i ..]:
//   q_off, kv_row0, n_cand, aux_start, out_off, lg_off, alpha (f32 bits), limit;
// index lists and mask words follow in `params` (aux_start is an absolute offset).

// 0: dense (candidates t < limit), 1: index list (token = params[aux_start + t]),
// 2: bit mask (token t, visible iff t < limit and bit t of params[aux_start ..]).
override RESTRICT: u32 = 0u;
// 0: softmax, 1: α-entmax (α per item).
override NORM: u32 = 0u;

const HEADER: u32 = 8u;

struct AttnItem {
    q_off: u32,
    kv_row0: u32,
    n_cand: u32,
    aux_start: u32,
    out_off: u32,
    lg_off: u32,
    alpha: f32,
    limit: u32,
}

fn attn_item(i: u32) -> AttnItem {
    let b = HEADER + 8u * i;
    return AttnItem(params[b], params[b + 1u], params[b + 2u], params[b + 3u], params[b + 4u],
        params[b + 5u], bitcast<f32>(params[b + 6u]), params[b + 7u]);
}

fn ld_q(i: u32) -> f32 { return t_get(q_buf[i / T_EPW], i % T_EPW); }
fn ld_k(i: u32) -> f32 { return t_get(k_buf[i / T_EPW], i % T_EPW); }
fn ld_v(i: u32) -> f32 { return t_get(v_buf[i / T_EPW], i % T_EPW); }

fn cand_token(e: AttnItem, t: u32) -> u32 {
    if RESTRICT == 1u {
        return params[e.aux_start + t];
    }
    return t;
}

fn cand_visible(e: AttnItem, t: u32) -> bool {
    if RESTRICT == 1u {
        return true;
    }
    if t >= e.limit {
        return false;
    }
    if RESTRICT == 2u {
        return ((params[e.aux_start + t / 32u] >> (t % 32u)) & 1u) == 1u;
    }
    return true;
}

// Runs one row; leaves the weights in lg[lg_off ..] and returns τ (entmax) or 0.
fn attend_item(lid: u32, e: AttnItem) -> f32 {
    let d = params[1];
    let scale = bitcast<f32>(params[2]);
    for (var t = lid; t < e.n_cand; t += WG) {
        var z = f_neg_inf();
        if cand_visible(e, t) {
            let kr = (e.kv_row0 + cand_token(e, t)) * d;
            var acc = 0.0;
            for (var c = 0u; c < d; c++) {
                acc += ld_q(e.q_off + c) * ld_k(kr + c);
            }
            z = scale * acc;
        }
        lg[e.lg_off + t] = z;
    }
    var tau = 0.0;
    if NORM == 0u {
        wg_softmax(lid, e.lg_off, e.n_cand);
    } else {
        tau = wg_entmax(lid, e.lg_off, e.n_cand, e.alpha);
    }
    sync_all();
    for (var c = lid; c < d; c += WG) {
        var acc = 0.0;
        for (var t = 0u; t < e.n_cand; t++) {
            let p = lg[e.lg_off + t];
            if p != 0.0 {
                acc += p * ld_v((e.kv_row0 + cand_token(e, t)) * d + c);
            }
        }
        out[e.out_off + c] = acc;
    }
    return tau;
}

// ---------------------------------------------------------------- split path
// Long rows are spread over many workgroups (flash-decoding style): logits per
// chunk of WG candidates, the normaliser per row, P·V partial sums per chunk,
// then one reduction per output element. Header: [5] offset of the per-item
// chunk indptr (items + 1 words), [6] offset of the chunk table (item, t0, t1,
// 0 per chunk). Chunk `c` writes its partial sums at `c * D`.

fn split_chunk(c: u32) -> vec3<u32> {
    let b = params[6] + 4u * c;
    return vec3<u32>(params[b], params[b + 1u], params[b + 2u]);
}

// One invocation per candidate of the chunk.
fn split_logits(chunk: u32, lid: u32) {
    let ch = split_chunk(chunk);
    let e = attn_item(ch.x);
    let t = ch.y + lid;
    if t >= ch.z {
        return;
    }
    let d = params[1];
    var z = f_neg_inf();
    if cand_visible(e, t) {
        let kr = (e.kv_row0 + cand_token(e, t)) * d;
        var acc = 0.0;
        for (var c = 0u; c < d; c++) {
            acc += ld_q(e.q_off + c) * ld_k(kr + c);
        }
        z = bitcast<f32>(params[2]) * acc;
    }
    lg[e.lg_off + t] = z;
}

fn split_norm(item: u32, lid: u32) {
    let e = attn_item(item);
    if NORM == 0u {
        wg_softmax(lid, e.lg_off, e.n_cand);
    } else {
        _ = wg_entmax(lid, e.lg_off, e.n_cand, e.alpha);
    }
}

// Partial Σ p v over the chunk's candidates, into out[chunk * D ..].
fn split_pv(chunk: u32, lid: u32) {
    let ch = split_chunk(chunk);
    let e = attn_item(ch.x);
    let d = params[1];
    for (var c = lid; c < d; c += WG) {
        var acc = 0.0;
        for (var t = ch.y; t < ch.z; t++) {
            let p = lg[e.lg_off + t];
            if p != 0.0 {
                acc += p * ld_v((e.kv_row0 + cand_token(e, t)) * d + c);
            }
        }
        out[chunk * d + c] = acc;
    }
}

// One invocation per output element: sums the partials (bound as `lg`).
fn split_reduce(idx: u32) {
    let d = params[1];
    let item = idx / d;
    if item >= params[0] {
        return;
    }
    let c = idx % d;
    let e = attn_item(item);
    var acc = 0.0;
    for (var ch = params[params[5] + item]; ch < params[params[5] + item + 1u]; ch++) {
        acc += lg[ch * d + c];
    }
    out[e.out_off + c] = acc;
}
