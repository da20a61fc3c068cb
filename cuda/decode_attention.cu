// decode_attention (also the engine of prefill_attention): attention over the work units of
// common.cuh, split-K with a deterministic combine.
//
// - decode_attention_split_<dt>: softmax, one pass over K and V with an online maximum;
//   writes per-split partials (m, l, acc[D]) per query row o.
// - decode_attention_pv_<dt>: entmax pass 2; weights from the logits workspace (written by
//   qk_logits) and the thresholds (entmax_rows); a V row is loaded only when some query head
//   of the CTA gives it a non-zero weight. Writes partials with m = 0.
// - decode_attention_combine_<dt>: out[o] = Σ_s e^{m_s−M} acc_s / Σ_s e^{m_s−M} l_s, splits
//   in a fixed order; zeros when nothing was attended.
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

template <typename T, int V, int CH, int H, bool ENTMAX>
__device__ void attn_impl(const T* __restrict__ q, const T* __restrict__ k,
                          const T* __restrict__ v, const u32* __restrict__ work,
                          const u32* __restrict__ idx, const u32* __restrict__ mask, u32 mode,
                          u32 n_units, u32 heads_per_unit, u32 hq, u32 D, u32 L, float scale,
                          u32 chunk, float* __restrict__ part, u32 n_out,
                          const float* __restrict__ ws, const u32* __restrict__ o_base,
                          const float* __restrict__ tau, const float* __restrict__ alphas) {
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
            load_row<T, V, CH>(v + ((size_t)unit.kv_off + (size_t)tok) * D, D, L, lane, vr);
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
            const size_t row = ((size_t)unit.kv_off + (size_t)tok) * D;
            load_row<T, V, CH>(k + row, D, L, lane, kr);
            load_row<T, V, CH>(v + row, D, L, lane, vr);
        }
        for (u32 i = start + rg; i < end; i += nrg) {
            const long long cur = tok;
            const u32 inext = i + nrg;
            tok = inext < end ? item_token(mode, idx, mask, unit, inext) : -1;
            float kn[CH][V], vn[CH][V];
            if (tok >= 0) {
                const size_t row = ((size_t)unit.kv_off + (size_t)tok) * D;
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
        const float *tau, const float *alphas
#define ATTN_PASS                                                                               \
    q, k, v, work, idx, mask, mode, n_units, heads_per_unit, hq, D, L, scale, chunk, part,     \
        n_out, ws, o_base, tau, alphas

#define ATTN_INST(NAME, T, V, CH, H, ENT)                                                      \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_THREADS) NAME(ATTN_ARGS(T)) {          \
        attn_impl<T, V, CH, H, ENT>(ATTN_PASS);                                                 \
    }

ATTN_INST(decode_attention_split_vec_h4_f32, float, 4, 1, 4, false)
ATTN_INST(decode_attention_split_vec_h4_f16, f16s, 8, 1, 4, false)
ATTN_INST(decode_attention_split_vec_h4_bf16, bf16s, 8, 1, 4, false)
ATTN_INST(decode_attention_split_vec_h8_f32, float, 4, 1, 8, false)
ATTN_INST(decode_attention_split_vec_h8_f16, f16s, 8, 1, 8, false)
ATTN_INST(decode_attention_split_vec_h8_bf16, bf16s, 8, 1, 8, false)
ATTN_INST(decode_attention_split_scalar_h4_f32, float, 1, 8, 4, false)
ATTN_INST(decode_attention_split_scalar_h4_f16, f16s, 1, 8, 4, false)
ATTN_INST(decode_attention_split_scalar_h4_bf16, bf16s, 1, 8, 4, false)
ATTN_INST(decode_attention_split_scalar_h8_f32, float, 1, 8, 8, false)
ATTN_INST(decode_attention_split_scalar_h8_f16, f16s, 1, 8, 8, false)
ATTN_INST(decode_attention_split_scalar_h8_bf16, bf16s, 1, 8, 8, false)
ATTN_INST(decode_attention_pv_vec_h4_f32, float, 4, 1, 4, true)
ATTN_INST(decode_attention_pv_vec_h4_f16, f16s, 8, 1, 4, true)
ATTN_INST(decode_attention_pv_vec_h4_bf16, bf16s, 8, 1, 4, true)
ATTN_INST(decode_attention_pv_vec_h8_f32, float, 4, 1, 8, true)
ATTN_INST(decode_attention_pv_vec_h8_f16, f16s, 8, 1, 8, true)
ATTN_INST(decode_attention_pv_vec_h8_bf16, bf16s, 8, 1, 8, true)
ATTN_INST(decode_attention_pv_scalar_h4_f32, float, 1, 8, 4, true)
ATTN_INST(decode_attention_pv_scalar_h4_f16, f16s, 1, 8, 4, true)
ATTN_INST(decode_attention_pv_scalar_h4_bf16, bf16s, 1, 8, 4, true)
ATTN_INST(decode_attention_pv_scalar_h8_f32, float, 1, 8, 8, true)
ATTN_INST(decode_attention_pv_scalar_h8_f16, f16s, 1, 8, 8, true)
ATTN_INST(decode_attention_pv_scalar_h8_bf16, bf16s, 1, 8, 8, true)

// One block per query row o; threads over D. Splits combined in order.
template <typename T>
__device__ void combine_impl(const float* __restrict__ part, u32 n_splits, u32 n_out, u32 D,
                             T* __restrict__ out) {
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
    }
}

#define COMBINE_INST(NAME, T)                                                                   \
    extern "C" __global__ void NAME(const float *part, u32 n_splits, u32 n_out, u32 D, T *out) { \
        combine_impl<T>(part, n_splits, n_out, D, out);                                         \
    }
COMBINE_INST(decode_attention_combine_f32, float)
COMBINE_INST(decode_attention_combine_f16, f16s)
COMBINE_INST(decode_attention_combine_bf16, bf16s)
