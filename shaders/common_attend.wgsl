// One attention row per workgroup: logits over a candidate list, a normaliser,
// then the weighted sum of V rows. Shared by decode_attention, prefill_attention
// and entmax_prefill. The including shader declares the bindings `params` (u32),
// `q_buf`, `k_buf`, `v_buf` (TW words), `lg` and `out` (f32).
//
// params header (u32, HEADER words): [0] items, [1] D, [2] scale (f32 bits),
// [3] block_k, [4] live words per item (entmax_prefill), [5] [6] split path
// (below), [8] offset in `lg` of the evidence statistics (0: none), [9] offset
// in `lg` of the raw logits (0: none), [10] [11] evidence tables of the
// including op. Item `i` at params[HEADER + 8 i ..]:
//   q_off, kv_row0, n_cand, aux_start, out_off, lg_off, alpha (f32 bits), limit;
// index lists and mask words follow in `params` (aux_start is an absolute offset).
//
// Evidence side outputs (only when the header asks; no extra read of K or V):
// with [8] = S, lg[S + item] is the row's statistic (softmax ln Σ e^z, entmax τ,
// -inf without a visible candidate) and lg[S + items + 3 item ..] its `RowNorm`
// (m, tau, tot), from which `item_weight` recomputes any weight; with [9] = R,
// lg[R + lg_off + t] keeps the logit of candidate t (`-inf` if not visible)
// beside the weight the normaliser leaves at lg[lg_off + t].

// 0: dense (candidates t < limit), 1: index list (token = params[aux_start + t]),
// 2: bit mask (token t, visible iff t < limit and bit t of params[aux_start ..]).
override RESTRICT: u32 = 0u;
// 0: softmax, 1: α-entmax (α per item).
override NORM: u32 = 0u;

const HEADER: u32 = 16u;

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

// scale · q · k of candidate t (visible or not).
fn item_logit(e: AttnItem, t: u32) -> f32 {
    let d = params[1];
    let kr = (e.kv_row0 + cand_token(e, t)) * d;
    var acc = 0.0;
    for (var c = 0u; c < d; c++) {
        acc += ld_q(e.q_off + c) * ld_k(kr + c);
    }
    return bitcast<f32>(params[2]) * acc;
}

// The logit of candidate t as the normaliser sees it (`-inf` if not visible);
// kept at the raw-logits offset when the header asks for it.
fn cand_logit(e: AttnItem, t: u32) -> f32 {
    var z = f_neg_inf();
    if cand_visible(e, t) {
        z = item_logit(e, t);
    }
    let raw = params[9];
    if raw != 0u {
        lg[raw + e.lg_off + t] = z;
    }
    return z;
}

// The normaliser statistic of a row (softmax ln Σ e^z, entmax τ in the
// scaled space; -inf without a finite logit, NaN for a NaN / +inf row).
fn row_stat(r: RowNorm, alpha: f32) -> f32 {
    if r.tot < 0.0 {
        return f_nan();
    }
    if r.tot == 0.0 {
        return f_neg_inf();
    }
    if NORM == 0u {
        return r.m + log(r.tot);
    }
    return entmax_tau(r, alpha);
}

// Evidence statistics of row `item` (call from one invocation).
fn store_row_norm(item: u32, e: AttnItem, r: RowNorm) {
    let s = params[8];
    if s == 0u {
        return;
    }
    lg[s + item] = row_stat(r, e.alpha);
    let at = s + params[0] + 3u * item;
    lg[at] = r.m;
    lg[at + 1u] = r.tau;
    lg[at + 2u] = r.tot;
}

// Weight of candidate t of row `item`, recomputed from its logit and the
// statistics `store_row_norm` left (a second pass over Q·K, O(rows) memory).
fn item_weight(item: u32, e: AttnItem, t: u32) -> f32 {
    if !cand_visible(e, t) {
        return 0.0;
    }
    let at = params[8] + params[0] + 3u * item;
    let r = RowNorm(lg[at], lg[at + 1u], lg[at + 2u]);
    return row_weight(r, item_logit(e, t), NORM != 0u, e.alpha);
}

fn norm_row(lid: u32, e: AttnItem) -> RowNorm {
    if NORM == 0u {
        return wg_softmax(lid, e.lg_off, e.n_cand);
    }
    return wg_entmax(lid, e.lg_off, e.n_cand, e.alpha);
}

// Runs row `item`; leaves the weights in lg[lg_off ..] and returns what the
// normaliser left (see `RowNorm`).
fn attend_item(lid: u32, item: u32, e: AttnItem) -> RowNorm {
    let d = params[1];
    for (var t = lid; t < e.n_cand; t += WG) {
        lg[e.lg_off + t] = cand_logit(e, t);
    }
    let r = norm_row(lid, e);
    if lid == 0u {
        store_row_norm(item, e, r);
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
    return r;
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
    lg[e.lg_off + t] = cand_logit(e, t);
}

fn split_norm(item: u32, lid: u32) {
    let e = attn_item(item);
    let r = norm_row(lid, e);
    if lid == 0u {
        store_row_norm(item, e, r);
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
