// qk_logits: z = scale · q · k for every item of every work unit (see common.cuh), written to
// out[o_base[o] + i] for query row o = q_row · Hq + h; items in [n, o_cols[o]) and items a
// mask clears get -inf. Also pass 1 of entmax attention (logits into a workspace). `pg`,
// `pshift`, `pstride`: the paged row map of `kv_row` (common.cuh); null for contiguous K.
//
// Grid: x = work unit, y = chunk of items, z = chunk of up to H query heads of the unit
// (H = 4 or 8: the `_h4` / `_h8` variants; fewer registers for GQA groups of 4 or less).
// Block: 128 threads in row groups of L lanes; one group per token, one K load shared by
// every query head of the unit (GQA).

template <typename T, int V, int CH, int H>
__device__ void qk_logits_impl(const T* __restrict__ q, const T* __restrict__ k,
                               const u32* __restrict__ work, const u32* __restrict__ idx,
                               const u32* __restrict__ mask, u32 mode, u32 n_units,
                               u32 heads_per_unit, u32 hq, u32 D, u32 L, float scale, u32 chunk,
                               float* __restrict__ out, const u32* __restrict__ o_base,
                               const u32* __restrict__ o_cols, const u32* __restrict__ pg,
                               u32 pshift, u32 pstride) {
    const u32 w = blockIdx.x;
    const Unit unit = load_unit(work, w);
    const u32 h0 = (w % n_units) * heads_per_unit + blockIdx.z * H;
    const u32 hend = min((w % n_units) * heads_per_unit + heads_per_unit, h0 + H);
    const u32 hc = hend - h0;
    const u32 o0 = unit.q_row * hq + h0;
    const u32 cols = o_cols[o0];
    const u32 start = blockIdx.y * chunk;
    const u32 end = min(cols, start + chunk);
    if (start >= end) return;
    const u32 lane = threadIdx.x & (L - 1), rg = threadIdx.x / L, nrg = blockDim.x / L;
    const u32 gmask = group_mask(L);

    float qr[H][CH][V];
#pragma unroll
    for (int h = 0; h < H; ++h) {
        if (h < hc) {
            load_row<T, V, CH>(q + (size_t)(o0 + h) * D, D, L, lane, qr[h]);
#pragma unroll
            for (int c = 0; c < CH; ++c)
#pragma unroll
                for (int e = 0; e < V; ++e) qr[h][c][e] *= scale;
        }
    }
    // Software pipeline: the K row of the group's next item is in flight while the current
    // one is scored.
    float kr[CH][V];
    long long tok = start + rg < end && start + rg < unit.n
                        ? item_token(mode, idx, mask, unit, start + rg)
                        : -1;
    if (tok >= 0) load_row<T, V, CH>(k + kv_row(pg, pshift, pstride, unit, tok) * D, D, L, lane, kr);
    for (u32 i = start + rg; i < end; i += nrg) {
        const long long cur = tok;
        const u32 inext = i + nrg;
        tok = inext < end && inext < unit.n ? item_token(mode, idx, mask, unit, inext) : -1;
        float kn[CH][V];
        if (tok >= 0) {
            load_row<T, V, CH>(k + kv_row(pg, pshift, pstride, unit, tok) * D, D, L, lane, kn);
        } else {
#pragma unroll
            for (int c = 0; c < CH; ++c)
#pragma unroll
                for (int e = 0; e < V; ++e) kn[c][e] = 0.0f;
        }
        if (cur < 0) {
            for (u32 h = lane; h < hc; h += L) out[o_base[o0 + h] + i] = -KV_INF;
        } else {
#pragma unroll
            for (int h = 0; h < H; ++h) {
                if (h < hc) {
                    float s = 0.0f;
#pragma unroll
                    for (int c = 0; c < CH; ++c)
#pragma unroll
                        for (int e = 0; e < V; ++e) s = fmaf(qr[h][c][e], kr[c][e], s);
                    s = group_sum(s, L, gmask);
                    if (lane == 0) out[o_base[o0 + h] + i] = s;
                }
            }
        }
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int e = 0; e < V; ++e) kr[c][e] = kn[c][e];
    }
}

#define QK_ARGS(T)                                                                              \
    const T *q, const T *k, const u32 *work, const u32 *idx, const u32 *mask, u32 mode,          \
        u32 n_units, u32 heads_per_unit, u32 hq, u32 D, u32 L, float scale, u32 chunk,         \
        float *out, const u32 *o_base, const u32 *o_cols, const u32 *pg, u32 pshift, u32 pstride
#define QK_PASS                                                                                 \
    q, k, work, idx, mask, mode, n_units, heads_per_unit, hq, D, L, scale, chunk, out, o_base, \
        o_cols, pg, pshift, pstride

#define QK_INST(NAME, T, V, CH, H)                                                              \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_THREADS) NAME(QK_ARGS(T)) {            \
        qk_logits_impl<T, V, CH, H>(QK_PASS);                                                   \
    }

QK_INST(qk_logits_vec_h4_f32, float, 4, 1, 4)
QK_INST(qk_logits_vec_h4_f16, f16s, 8, 1, 4)
QK_INST(qk_logits_vec_h4_bf16, bf16s, 8, 1, 4)
QK_INST(qk_logits_vec_h8_f32, float, 4, 1, 8)
QK_INST(qk_logits_vec_h8_f16, f16s, 8, 1, 8)
QK_INST(qk_logits_vec_h8_bf16, bf16s, 8, 1, 8)
QK_INST(qk_logits_scalar_h4_f32, float, 1, 8, 4)
QK_INST(qk_logits_scalar_h4_f16, f16s, 1, 8, 4)
QK_INST(qk_logits_scalar_h4_bf16, bf16s, 1, 8, 4)
QK_INST(qk_logits_scalar_h8_f32, float, 1, 8, 8)
QK_INST(qk_logits_scalar_h8_f16, f16s, 1, 8, 8)
QK_INST(qk_logits_scalar_h8_bf16, bf16s, 1, 8, 8)
