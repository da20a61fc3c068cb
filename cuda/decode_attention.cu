// decode_attention (also the engine of prefill_attention): attention over the work units of
// common.cuh, split-K with a deterministic combine.
//
// - decode_attention_split_<dt>: softmax, one pass over K and V with an online maximum;
//   writes per-split partials (m, l, acc[D]) per query row o.
// - decode_attention_pv_<dt>: entmax pass 2; weights from the logits workspace (written by
//   qk_logits) and the thresholds (entmax_rows); a V row is loaded only when some query head
//   of the CTA gives it a non-zero weight. Writes partials with m = 0.
// - decode_attention_combine_<dt>: out[o] = Σ_s e^{m_s−M} acc_s / Σ_s e^{m_s−M} l_s, splits
//   in a fixed order; zeros when nothing was attended. On request (non-null pointers) it also
//   writes the f32 output before rounding, the row's normaliser statistics (for the evidence
//   passes) and the evidence statistic (softmax ln Σ e^z, entmax τ, -inf when nothing is
//   attended).
// - decode_attention_evidence_f32: the decode evidence token pass (probabilities or logits
//   per token, folded over the GQA group); reads the logits the attention pass left and the
//   row statistics of the combine, never K or V.
//
// Evidence side output: decode_attention_split_ev_<dt> is the softmax split kernel that also
// writes the logit of every item it visits to zout[o_base[o] + i] (-inf for items a mask
// clears), the layout of the entmax logits workspace; the attention arithmetic is the same
// (same bits). A separate instantiation, so that the plain kernels keep their registers.
//
// Paged KV: split and pv take the row map of `kv_row` (common.cuh): `pg` null reads the
// unit's rows kv_off + t (contiguous), else token t through the unit's page map.
//
// Grid of split / pv: x = work unit, y = split, z = chunk of up to H query heads (H = 4 or
// 8: the `_h4` / `_h8` variants; GQA groups of 4 or less take the lighter `_h4`). Block: 128
// threads in row groups of L lanes (one token per group, every head of the CTA per load).

struct MergeSmem {
    float m[32][KV_MAX_HEADS];
    float l[32][KV_MAX_HEADS];
    float acc[KV_MAX_HEADS * 256];
};

// Merges the row groups of the CTA and writes the partials of this split.
template <int V, int CH, int H>
__device__ void merge_and_write(MergeSmem& sm, const float (&m)[H],
                                const float (&l)[H],
                                float (&acc)[H][CH][V], u32 hc, u32 D, u32 L,
                                u32 o0, u32 n_out, float* __restrict__ part) {
    const u32 lane = threadIdx.x & (L - 1), rg = threadIdx.x / L, nrg = blockDim.x / L;
    if (lane == 0) {
#pragma unroll
        for (int h = 0; h < H; ++h) {
            sm.m[rg][h] = m[h];
            sm.l[rg][h] = l[h];
        }
    }
    for (u32 x = threadIdx.x; x < hc * D; x += blockDim.x) sm.acc[x] = 0.0f;
    __syncthreads();
    float scale_mine[H];
#pragma unroll
    for (int h = 0; h < H; ++h) {
        float M = -KV_INF;
        for (u32 r = 0; r < nrg; ++r) M = fmaxf(M, sm.m[r][h]);
        scale_mine[h] = M == -KV_INF ? 0.0f : expf(m[h] - M);
    }
    for (u32 r = 0; r < nrg; ++r) {
        if (rg == r) {
#pragma unroll
            for (int h = 0; h < H; ++h) {
                if (h < hc) {
#pragma unroll
                    for (int c = 0; c < CH; ++c)
#pragma unroll
                        for (int e = 0; e < V; ++e) {
                            u32 d = (c * L + lane) * V + e;
                            if (d < D) sm.acc[h * D + d] += acc[h][c][e] * scale_mine[h];
                        }
                }
            }
        }
        __syncthreads();
    }
    const size_t stride = (size_t)D + 2;
    float* base = part + (size_t)blockIdx.y * n_out * stride;
    for (u32 x = threadIdx.x; x < hc * (D + 2); x += blockDim.x) {
        u32 h = x / (D + 2), c = x % (D + 2);
        float M = -KV_INF;
        for (u32 r = 0; r < nrg; ++r) M = fmaxf(M, sm.m[r][h]);
        float val;
        if (c == 0) {
            val = M;
        } else if (c == 1) {
            float lt = 0.0f;
            if (M != -KV_INF)
                for (u32 r = 0; r < nrg; ++r) lt += sm.l[r][h] * expf(sm.m[r][h] - M);
            val = lt;
        } else {
            val = sm.acc[h * D + (c - 2)];
        }
        base[(size_t)(o0 + h) * stride + c] = val;
    }
}

template <typename T, int V, int CH, int H, bool ENTMAX, bool EV>
__device__ void attn_impl(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const u32* __restrict__ work,
                          const u32* __restrict__ idx, const u32* __restrict__ mask, u32 mode,
                          u32 n_units, u32 heads_per_unit, u32 hq, u32 D, u32 L, float scale,
                          u32 chunk, float* __restrict__ part, u32 n_out,
                          const float* __restrict__ ws, const u32* __restrict__ o_base,
                          const float* __restrict__ tau, const float* __restrict__ alphas,
                          float* __restrict__ zout, const u32* __restrict__ pg, u32 pshift,
                          u32 pstride) {
    __shared__ MergeSmem sm;
    const u32 w = blockIdx.x;
    const Unit unit = load_unit(work, w);
    const u32 h0 = (w % n_units) * heads_per_unit + blockIdx.z * H;
    const u32 hend = min((w % n_units) * heads_per_unit + heads_per_unit, h0 + H);
    const u32 hc = hend - h0;
    const u32 o0 = unit.q_row * hq + h0;
    const u32 start = blockIdx.y * chunk;
    const u32 end = min(unit.n, start + chunk);
    const u32 lane = threadIdx.x & (L - 1), rg = threadIdx.x / L, nrg = blockDim.x / L;
    const u32 gmask = group_mask(L);

    float m[H], l[H];
    float acc[H][CH][V];
    float qr[ENTMAX ? 1 : H][CH][V];
    // entmax: per head (zmax, tau, am1) and the power rule.
    float ez[H], et[H], ea[H];
    EntPow ep[H];
#pragma unroll
    for (int h = 0; h < H; ++h) {
        m[h] = ENTMAX ? 0.0f : -KV_INF;
        l[h] = 0.0f;
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int e = 0; e < V; ++e) acc[h][c][e] = 0.0f;
        if constexpr (ENTMAX) {
            if (h < hc) {
                ez[h] = tau[2 * (o0 + h)];
                et[h] = tau[2 * (o0 + h) + 1];
                ea[h] = alphas[h0 + h] - 1.0f;
                ep[h] = ent_pow(alphas[h0 + h]);
            }
        } else {
            if (h < hc) {
                load_row<T, V, CH>(q + (size_t)(o0 + h) * D, D, L, lane, qr[h]);
#pragma unroll
                for (int c = 0; c < CH; ++c)
#pragma unroll
                    for (int e = 0; e < V; ++e) qr[h][c][e] *= scale;
            }
        }
    }
    if constexpr (ENTMAX) {
        for (u32 i = start + rg; i < end; i += nrg) {
            const long long tok = item_token(mode, idx, mask, unit, i);
            if (tok < 0) continue;
            float p[H];
            bool any = false;
#pragma unroll
            for (int h = 0; h < H; ++h) {
                p[h] = 0.0f;
                if (h < hc) {
                    p[h] = ent_weight(ep[h], ea[h], ws[o_base[o0 + h] + i], ez[h], et[h]);
                    any |= p[h] > 0.0f;
                }
            }
            if (!any) continue;  // zero weight for every head: skip the V row
            float vr[CH][V];
            load_row<T, V, CH>(v + kv_row(pg, pshift, pstride, unit, tok) * D, D, L, lane, vr);
#pragma unroll
            for (int h = 0; h < H; ++h) {
                l[h] += p[h];
#pragma unroll
                for (int c = 0; c < CH; ++c)
#pragma unroll
                    for (int e = 0; e < V; ++e) acc[h][c][e] = fmaf(p[h], vr[c][e], acc[h][c][e]);
            }
        }
    } else {
        // Software pipeline: the K and V rows of the group's next token are in flight while
        // the current token is scored and accumulated.
        float kr[CH][V], vr[CH][V];
        long long tok = start + rg < end ? item_token(mode, idx, mask, unit, start + rg) : -1;
        if (tok >= 0) {
            const size_t row = kv_row(pg, pshift, pstride, unit, tok) * D;
            load_row<T, V, CH>(k + row, D, L, lane, kr);
            load_row<T, V, CH>(v + row, D, L, lane, vr);
        }
        for (u32 i = start + rg; i < end; i += nrg) {
            const long long cur = tok;
            const u32 inext = i + nrg;
            tok = inext < end ? item_token(mode, idx, mask, unit, inext) : -1;
            float kn[CH][V], vn[CH][V];
            if (tok >= 0) {
                const size_t row = kv_row(pg, pshift, pstride, unit, tok) * D;
                load_row<T, V, CH>(k + row, D, L, lane, kn);
                load_row<T, V, CH>(v + row, D, L, lane, vn);
            } else {
#pragma unroll
                for (int c = 0; c < CH; ++c)
#pragma unroll
                    for (int e = 0; e < V; ++e) kn[c][e] = vn[c][e] = 0.0f;
            }
            if (cur >= 0) {
#pragma unroll
                for (int h = 0; h < H; ++h) {
                    if (h < hc) {
                        float s = 0.0f;
#pragma unroll
                        for (int c = 0; c < CH; ++c)
#pragma unroll
                            for (int e = 0; e < V; ++e) s = fmaf(qr[h][c][e], kr[c][e], s);
                        s = group_sum(s, L, gmask);
                        if constexpr (EV) {
                            if (lane == 0) zout[o_base[o0 + h] + i] = s;
                        }
                        if (s > m[h]) {
                            const float corr = expf(m[h] - s);
                            l[h] *= corr;
#pragma unroll
                            for (int c = 0; c < CH; ++c)
#pragma unroll
                                for (int e = 0; e < V; ++e) acc[h][c][e] *= corr;
                            m[h] = s;
                        }
                        const float p = expf(s - m[h]);
                        l[h] += p;
#pragma unroll
                        for (int c = 0; c < CH; ++c)
#pragma unroll
                            for (int e = 0; e < V; ++e) acc[h][c][e] = fmaf(p, vr[c][e], acc[h][c][e]);
                    }
                }
            } else if constexpr (EV) {
                if (lane == 0)
                    for (u32 h = 0; h < hc; ++h) zout[o_base[o0 + h] + i] = -KV_INF;
            }
#pragma unroll
            for (int c = 0; c < CH; ++c)
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    kr[c][e] = kn[c][e];
                    vr[c][e] = vn[c][e];
                }
        }
    }
    merge_and_write<V, CH, H>(sm, m, l, acc, hc, D, L, o0, n_out, part);
}

#define ATTN_ARGS(T)                                                                            \
    const T *q, const T *k, const T *v, const u32 *work, const u32 *idx, const u32 *mask,       \
        u32 mode, u32 n_units, u32 heads_per_unit, u32 hq, u32 D, u32 L, float scale,          \
        u32 chunk, float *part, u32 n_out, const float *ws, const u32 *o_base,                 \
        const float *tau, const float *alphas, float *zout, const u32 *pg, u32 pshift,         \
        u32 pstride
#define ATTN_PASS                                                                               \
    q, k, v, work, idx, mask, mode, n_units, heads_per_unit, hq, D, L, scale, chunk, part,     \
        n_out, ws, o_base, tau, alphas, zout, pg, pshift, pstride

#define ATTN_INST(NAME, T, V, CH, H, ENT, EV)                                                  \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_THREADS) NAME(ATTN_ARGS(T)) {          \
        attn_impl<T, V, CH, H, ENT, EV>(ATTN_PASS);                                             \
    }

ATTN_INST(decode_attention_split_vec_h4_f32, float, 4, 1, 4, false, false)
ATTN_INST(decode_attention_split_vec_h4_f16, f16s, 8, 1, 4, false, false)
ATTN_INST(decode_attention_split_vec_h4_bf16, bf16s, 8, 1, 4, false, false)
ATTN_INST(decode_attention_split_vec_h8_f32, float, 4, 1, 8, false, false)
ATTN_INST(decode_attention_split_vec_h8_f16, f16s, 8, 1, 8, false, false)
ATTN_INST(decode_attention_split_vec_h8_bf16, bf16s, 8, 1, 8, false, false)
ATTN_INST(decode_attention_split_scalar_h4_f32, float, 1, 8, 4, false, false)
ATTN_INST(decode_attention_split_scalar_h4_f16, f16s, 1, 8, 4, false, false)
ATTN_INST(decode_attention_split_scalar_h4_bf16, bf16s, 1, 8, 4, false, false)
ATTN_INST(decode_attention_split_scalar_h8_f32, float, 1, 8, 8, false, false)
ATTN_INST(decode_attention_split_scalar_h8_f16, f16s, 1, 8, 8, false, false)
ATTN_INST(decode_attention_split_scalar_h8_bf16, bf16s, 1, 8, 8, false, false)
ATTN_INST(decode_attention_split_ev_vec_h4_f32, float, 4, 1, 4, false, true)
ATTN_INST(decode_attention_split_ev_vec_h4_f16, f16s, 8, 1, 4, false, true)
ATTN_INST(decode_attention_split_ev_vec_h4_bf16, bf16s, 8, 1, 4, false, true)
ATTN_INST(decode_attention_split_ev_vec_h8_f32, float, 4, 1, 8, false, true)
ATTN_INST(decode_attention_split_ev_vec_h8_f16, f16s, 8, 1, 8, false, true)
ATTN_INST(decode_attention_split_ev_vec_h8_bf16, bf16s, 8, 1, 8, false, true)
ATTN_INST(decode_attention_split_ev_scalar_h4_f32, float, 1, 8, 4, false, true)
ATTN_INST(decode_attention_split_ev_scalar_h4_f16, f16s, 1, 8, 4, false, true)
ATTN_INST(decode_attention_split_ev_scalar_h4_bf16, bf16s, 1, 8, 4, false, true)
ATTN_INST(decode_attention_split_ev_scalar_h8_f32, float, 1, 8, 8, false, true)
ATTN_INST(decode_attention_split_ev_scalar_h8_f16, f16s, 1, 8, 8, false, true)
ATTN_INST(decode_attention_split_ev_scalar_h8_bf16, bf16s, 1, 8, 8, false, true)
ATTN_INST(decode_attention_pv_vec_h4_f32, float, 4, 1, 4, true, false)
ATTN_INST(decode_attention_pv_vec_h4_f16, f16s, 8, 1, 4, true, false)
ATTN_INST(decode_attention_pv_vec_h4_bf16, bf16s, 8, 1, 4, true, false)
ATTN_INST(decode_attention_pv_vec_h8_f32, float, 4, 1, 8, true, false)
ATTN_INST(decode_attention_pv_vec_h8_f16, f16s, 8, 1, 8, true, false)
ATTN_INST(decode_attention_pv_vec_h8_bf16, bf16s, 8, 1, 8, true, false)
ATTN_INST(decode_attention_pv_scalar_h4_f32, float, 1, 8, 4, true, false)
ATTN_INST(decode_attention_pv_scalar_h4_f16, f16s, 1, 8, 4, true, false)
ATTN_INST(decode_attention_pv_scalar_h4_bf16, bf16s, 1, 8, 4, true, false)
ATTN_INST(decode_attention_pv_scalar_h8_f32, float, 1, 8, 8, true, false)
ATTN_INST(decode_attention_pv_scalar_h8_f16, f16s, 1, 8, 8, true, false)
ATTN_INST(decode_attention_pv_scalar_h8_bf16, bf16s, 1, 8, 8, true, false)

// One block per query row o; threads over D. Splits combined in order. Optional outputs
// (null when not asked): `out_f32` the output before rounding; `rn` the row statistics of
// the evidence passes, 3 per row: softmax (M, Σ e^{z−M}, 0), entmax (zmax, Σ p̃, τ shifted)
// with p̃ the unnormalised weights; `stats` the evidence statistic. `tau` / `alphas` (the
// entmax thresholds and α per query head, null for softmax) select the entmax statistic.
template <typename T>
__device__ void combine_impl(const float* __restrict__ part, u32 n_splits, u32 n_out, u32 D,
                             T* __restrict__ out, float* __restrict__ out_f32,
                             float* __restrict__ rn, float* __restrict__ stats,
                             const float* __restrict__ tau, const float* __restrict__ alphas,
                             u32 hq) {
    const u32 o = blockIdx.x;
    const size_t stride = (size_t)D + 2;
    float M = -KV_INF;
    for (u32 s = 0; s < n_splits; ++s) M = fmaxf(M, part[((size_t)s * n_out + o) * stride]);
    float lsum = 0.0f;
    if (M != -KV_INF)
        for (u32 s = 0; s < n_splits; ++s) {
            const float* p = part + ((size_t)s * n_out + o) * stride;
            lsum += p[1] * expf(p[0] - M);
        }
    for (u32 d = threadIdx.x; d < D; d += blockDim.x) {
        float a = 0.0f;
        if (M != -KV_INF && lsum > 0.0f) {
            for (u32 s = 0; s < n_splits; ++s) {
                const float* p = part + ((size_t)s * n_out + o) * stride;
                a += p[2 + d] * expf(p[0] - M);
            }
            a /= lsum;
        }
        out[(size_t)o * D + d] = from_f32<T>(a);
        if (out_f32 != nullptr) out_f32[(size_t)o * D + d] = a;
    }
    if (threadIdx.x != 0 || (rn == nullptr && stats == nullptr)) return;
    const bool live = M != -KV_INF && lsum > 0.0f;
    float r0 = M, r2 = 0.0f, st = live ? M + logf(lsum) : -KV_INF;
    if (tau != nullptr) {
        // Entmax: partials carry m = 0; the weights are p̃ / Σ p̃ with p̃ from (zmax, τ).
        r0 = tau[2 * o];
        r2 = tau[2 * o + 1];
        st = -KV_INF;
        if (live && r0 > -KV_INF) {
            // The reference's τ: (α−1)·z_top − p_top^{α−1}, p_top the weight of the top logit.
            const float a = alphas[o % hq];
            const float p_top = ent_p(ent_pow(a), -r2) / lsum;
            st = (float)((double)(a - 1.0f) * (double)r0 - pow((double)p_top, (double)(a - 1.0f)));
        }
    }
    if (rn != nullptr) {
        rn[3 * o] = r0;
        rn[3 * o + 1] = live ? lsum : 0.0f;
        rn[3 * o + 2] = r2;
    }
    if (stats != nullptr) stats[o] = st;
}

#define COMBINE_INST(NAME, T)                                                                   \
    extern "C" __global__ void NAME(const float *part, u32 n_splits, u32 n_out, u32 D, T *out,   \
                                    float *out_f32, float *rn, float *stats, const float *tau,  \
                                    const float *alphas, u32 hq) {                              \
        combine_impl<T>(part, n_splits, n_out, D, out, out_f32, rn, stats, tau, alphas, hq);    \
    }
COMBINE_INST(decode_attention_combine_f32, float)
COMBINE_INST(decode_attention_combine_f16, f16s)
COMBINE_INST(decode_attention_combine_bf16, bf16s)

// ------------------------------------------------------------------ evidence token pass
//
// Weight of logit z of output row o from the statistics the combine left (rn, 3 per row):
// softmax e^{z−M} / Σ; entmax p̃(z) / Σ p̃ (the weights P·V used); 0 when nothing is attended.
__device__ __forceinline__ float ev_weight(float z, const float* __restrict__ rn,
                                           const float* __restrict__ alphas, u32 hq, u32 o) {
    const float m = rn[3 * o], l = rn[3 * o + 1];
    if (!(l > 0.0f)) return 0.0f;
    if (alphas == nullptr) return expf(z - m) / l;
    const float a = alphas[o % hq];
    return ent_weight(ent_pow(a), a - 1.0f, z, m, rn[3 * o + 2]) / l;
}

// Candidate of token j in output row o (`rows`: 3 per row: logits base, candidates, index
// list start), or -1 when the restriction leaves the token out. Dense rows and masks are
// token-indexed (a cleared bit holds -inf); index lists are sorted and unique.
__device__ __forceinline__ long long ev_cand(u32 mode, const u32* __restrict__ rows,
                                             const u32* __restrict__ idx, u32 o, u32 j) {
    const u32 n = rows[3 * o + 1];
    if (mode != 1) return j < n ? (long long)j : -1;
    const u32 base = rows[3 * o + 2];
    u32 lo = 0, hi = n;
    while (lo < hi) {
        const u32 mid = (lo + hi) >> 1;
        if (idx[base + mid] < j) lo = mid + 1;
        else hi = mid;
    }
    return lo < n && idx[base + lo] == j ? (long long)lo : -1;
}

// One thread per token of an evidence block: `tab` holds 4 u32 per chunk of blockDim tokens
// (first output row, output offset of the block, block length, first token); the block's
// `nh` heads are output rows first .. first + nh − 1, folded as `fold` says (0 one head,
// 1 sum, 2 mean, 3 max). `logits` = 1 writes the logits (-inf where not attended), 0 the
// weights. `ws` holds the logits of every candidate (row o at rows[3 o]).
extern "C" __global__ void decode_attention_evidence_f32(
    const float* __restrict__ ws, const u32* __restrict__ rows, const u32* __restrict__ idx,
    u32 mode, const float* __restrict__ rn, const float* __restrict__ alphas, u32 hq,
    const u32* __restrict__ tab, u32 nh, u32 fold, u32 logits, float* __restrict__ out) {
    const u32* c = tab + 4 * blockIdx.x;
    const u32 first = c[0], out_off = c[1], len = c[2], j = c[3] + threadIdx.x;
    if (j >= len) return;
    float acc = 0.0f;
    for (u32 hh = 0; hh < nh; ++hh) {
        const u32 o = first + hh;
        const long long t = ev_cand(mode, rows, idx, o, j);
        float x;
        if (logits) x = t < 0 ? -KV_INF : ws[rows[3 * o] + t];
        else x = t < 0 ? 0.0f : ev_weight(ws[rows[3 * o] + t], rn, alphas, hq, o);
        if (hh == 0) acc = x;
        else if (fold == 3) acc = fmaxf(acc, x);
        else acc += x;
    }
    if (fold == 2) acc /= (float)nh;
    out[out_off + j] = acc;
}
