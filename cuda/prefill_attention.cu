// prefill_attention: the attention itself runs on the decode engine (decode_attention.cu,
// one virtual row per query); this file holds its evidence pass.
//
// prefill_attention_evidence_{vec,scalar}_<dt>: column sums and the last-W-queries window of
// the chunk's attention weights, from the per-row statistics the attention's combine left
// (`rn`, 3 per output row o = query row · Hq + h: softmax (M, Σ e^{z−M}, 0), entmax (zmax,
// Σ p̃, τ shifted)): a second pass over the keys that recomputes z = scale · q · k with the
// attention's own arithmetic (same lanes, same fused multiply-adds) and the weight with the
// normaliser's. Memory O(rows); no atomics: every output entry belongs to one key, and one
// thread folds it in a fixed order (heads, then queries; Max is the max of per-head sums).
//
// Grid x: one entry of `seg` per (sequence, KV head, chunk of `kchunk` keys), 8 u32 each:
//   first KV row, segment length, first key of the chunk, first query row of the sequence,
//   its query count, first query head of the group, offset of the segment's first block in
//   `col` and in `win` (the blocks of a group's heads follow each other, `len` entries per
//   row).
// `rows`: 2 u32 per output row: keys visible to it (causal prefix), its mask word start.
// Block: 128 threads in row groups of L lanes; a row group holds one key row in registers
// and visits every (head, query) pair of the group for it.
//
// flags: 1 column sums, 2 window, 4 window rows (else summed). fold: 0 per head, 1 sum,
// 2 mean, 3 max. `W` is the window's query count (≥ 1).

__device__ __forceinline__ float pf_fold(u32 fold, float acc, float x, bool first) {
    if (first) return x;
    return fold == 3 ? fmaxf(acc, x) : acc + x;
}

template <typename T, int V, int CH>
__device__ void prefill_evidence_impl(const T* __restrict__ q, const T* __restrict__ k,
                                      const u32* __restrict__ seg, const u32* __restrict__ rows,
                                      const u32* __restrict__ mask, u32 masked,
                                      const float* __restrict__ rn,
                                      const float* __restrict__ alphas, u32 hq, u32 G, u32 D,
                                      u32 L, float scale, u32 kchunk, u32 flags, u32 col_fold,
                                      u32 win_fold, u32 W, float* __restrict__ col,
                                      float* __restrict__ win) {
    const u32* e = seg + 8 * blockIdx.x;
    const u32 kv_off = e[0], len = e[1], j0 = e[2], q0 = e[3], nq = e[4], h0 = e[5];
    const u32 col_off = e[6], win_off = e[7];
    const u32 jend = min(len, j0 + kchunk);
    const u32 lane = threadIdx.x & (L - 1), rg = threadIdx.x / L, nrg = blockDim.x / L;
    const u32 gmask = group_mask(L);
    const bool want_col = flags & 1u, want_win = flags & 2u, win_rows = flags & 4u;
    const u32 wn = min(W, nq);       // window queries of this sequence
    const u32 wlo = nq - wn;         // first window query
    const u32 wr = win_rows ? wn : 1u;  // rows of a window block
    for (u32 j = j0 + rg; j < jend; j += nrg) {
        float kr[CH][V];
        load_row<T, V, CH>(k + ((size_t)kv_off + j) * D, D, L, lane, kr);
        float cacc = 0.0f, wacc = 0.0f;
        for (u32 hh = 0; hh < G; ++hh) {
            const u32 h = h0 + hh;
            float csum = 0.0f, wsum = 0.0f;
            for (u32 i = 0; i < nq; ++i) {
                const u32 o = (q0 + i) * hq + h;
                bool vis = j < rows[2 * o];
                if (vis && masked) {
                    const u32 wd = rows[2 * o + 1] + (j >> 5);
                    vis = (mask[wd] >> (j & 31)) & 1u;
                }
                float p = 0.0f;
                if (vis) {
                    float qr[CH][V];
                    load_row<T, V, CH>(q + (size_t)o * D, D, L, lane, qr);
                    float s = 0.0f;
#pragma unroll
                    for (int c = 0; c < CH; ++c)
#pragma unroll
                        for (int x = 0; x < V; ++x) s = fmaf(qr[c][x] * scale, kr[c][x], s);
                    s = group_sum(s, L, gmask);
                    const float m = rn[3 * o], l = rn[3 * o + 1];
                    if (l > 0.0f) {
                        if (alphas == nullptr) {
                            p = expf(s - m) / l;
                        } else {
                            const float a = alphas[h];
                            p = ent_weight(ent_pow(a), a - 1.0f, s, m, rn[3 * o + 2]) / l;
                        }
                    }
                }
                csum += p;
                if (want_win && i >= wlo) {
                    if (win_rows) {
                        if (lane == 0) {
                            const u32 r = i - wlo;
                            if (win_fold == 0) {
                                win[win_off + (size_t)(hh * wr + r) * len + j] = p;
                            } else {
                                float* dst = win + win_off + (size_t)r * len + j;
                                float a = pf_fold(win_fold, hh == 0 ? 0.0f : *dst, p, hh == 0);
                                if (hh + 1 == G && win_fold == 2) a /= (float)G;
                                *dst = a;
                            }
                        }
                    } else {
                        wsum += p;
                    }
                }
            }
            if (lane == 0) {
                if (want_col) {
                    if (col_fold == 0) col[col_off + (size_t)hh * len + j] = csum;
                    else cacc = pf_fold(col_fold, cacc, csum, hh == 0);
                }
                if (want_win && !win_rows) {
                    if (win_fold == 0) win[win_off + (size_t)hh * len + j] = wsum;
                    else wacc = pf_fold(win_fold, wacc, wsum, hh == 0);
                }
            }
        }
        if (lane == 0) {
            if (want_col && col_fold != 0) col[col_off + j] = col_fold == 2 ? cacc / (float)G : cacc;
            if (want_win && !win_rows && win_fold != 0)
                win[win_off + j] = win_fold == 2 ? wacc / (float)G : wacc;
        }
    }
}

#define PF_ARGS(T)                                                                              \
    const T *q, const T *k, const u32 *seg, const u32 *rows, const u32 *mask, u32 masked,        \
        const float *rn, const float *alphas, u32 hq, u32 G, u32 D, u32 L, float scale,         \
        u32 kchunk, u32 flags, u32 col_fold, u32 win_fold, u32 W, float *col, float *win
#define PF_PASS                                                                                 \
    q, k, seg, rows, mask, masked, rn, alphas, hq, G, D, L, scale, kchunk, flags, col_fold,     \
        win_fold, W, col, win

#define PF_INST(NAME, T, V, CH)                                                                 \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_THREADS) NAME(PF_ARGS(T)) {            \
        prefill_evidence_impl<T, V, CH>(PF_PASS);                                               \
    }

PF_INST(prefill_attention_evidence_vec_f32, float, 4, 1)
PF_INST(prefill_attention_evidence_vec_f16, f16s, 8, 1)
PF_INST(prefill_attention_evidence_vec_bf16, bf16s, 8, 1)
PF_INST(prefill_attention_evidence_scalar_f32, float, 1, 8)
PF_INST(prefill_attention_evidence_scalar_f16, f16s, 1, 8)
PF_INST(prefill_attention_evidence_scalar_bf16, bf16s, 1, 8)
