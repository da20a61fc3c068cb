// entmax_prefill: tile liveness. One block per query row o: for every visible key i with a
// non-zero weight (s > τ, from the logits workspace and the solved thresholds), marks key
// tile i / block_k of this row's query tile: flags[flag_base[o] + i / block_k] |= 1. Every
// query row of a tile (a block each) marks the same flags: atomicOr, as plain stores from
// several threads and blocks to one word are a data race under the CUDA memory model (the
// simulator reports it), even when they store the same value.

extern "C" __global__ void entmax_prefill_tiles_f32(const float* __restrict__ ws,
                                                    const u32* __restrict__ o_base,
                                                    const u32* __restrict__ o_cols,
                                                    const float* __restrict__ tau,
                                                    const float* __restrict__ alpha,
                                                    const u32* __restrict__ flag_base,
                                                    u32 block_k, u32* __restrict__ flags) {
    const u32 o = blockIdx.x;
    const float* row = ws + o_base[o];
    const float a = alpha[o];
    const EntPow e = ent_pow(a);
    const float zmax = tau[2 * o], t = tau[2 * o + 1];
    for (u32 i = threadIdx.x; i < o_cols[o]; i += blockDim.x) {
        if (ent_weight(e, a - 1.0f, row[i], zmax, t) > 0.0f) atomicOr(&flags[flag_base[o] + i / block_k], 1u);
    }
}

// ------------------------------------------------------------------------------- backward
//
// The three-pass AdaSplash backward, rearranged so that no pass needs atomics:
//
// - entmax_prefill_bwd_rows_<v>_<dt>: one block per query row o (= q_row · Hq + h). Sweep 1
//   over the visible keys gives, with u = p^{2−α} on the support and dy_j = d_out · v_j,
//   Σu, Σ u·dy, Σ p·dy, Σ S·dy, Σ S (S = p ln p): so δ = Σ u dy / Σ u (= d_out · Õ) and
//   ∂L/∂α of the row in closed form. Sweep 2: dQ = scale Σ_j u (dy − δ) k_j.
// - entmax_prefill_bwd_keys_<v>_<dt>: one block per key row; over every (query row, head of
//   the group) that sees it: dV = Σ p d_out, dK = scale Σ u (dy − δ) q. Each key row is
//   written by one block (GQA heads summed), so the result is deterministic.

struct BwdSmem {
    float s[32][6];
    float acc[256];
};

// Weights of one scaled logit x against τ: p = u0^{c0}, u = p^{2−α} (0 off the support).
__device__ __forceinline__ void bwd_weights(float x, float tau, float alpha, float& p, float& u) {
    const float u0 = x - tau;
    if (u0 > 0.0f) {
        const float c0 = 1.0f / (alpha - 1.0f);
        const float l2 = log2f(u0);
        p = exp2f(c0 * l2);
        u = exp2f((2.0f - alpha) * c0 * l2);
    } else {
        p = 0.0f;
        u = 0.0f;
    }
}

template <int V, int CH>
__device__ void bwd_merge_vec(BwdSmem& sm, float (&acc)[CH][V], u32 D, u32 L, float* __restrict__ dst) {
    const u32 lane = threadIdx.x & (L - 1), rg = threadIdx.x / L, nrg = blockDim.x / L;
    __syncthreads();
    for (u32 x = threadIdx.x; x < D; x += blockDim.x) sm.acc[x] = 0.0f;
    __syncthreads();
    for (u32 r = 0; r < nrg; ++r) {
        if (rg == r) {
#pragma unroll
            for (int c = 0; c < CH; ++c)
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const u32 d = (c * L + lane) * V + e;
                    if (d < D) sm.acc[d] += acc[c][e];
                }
        }
        __syncthreads();
    }
    for (u32 x = threadIdx.x; x < D; x += blockDim.x) dst[x] = sm.acc[x];
}

template <typename T, int V, int CH>
__device__ void bwd_rows_impl(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const T* __restrict__ dout,
                              const u32* __restrict__ o_kv, const u32* __restrict__ o_n,
                              const float* __restrict__ tau, const float* __restrict__ alphas,
                              u32 hq, u32 D, u32 L, float scale, float* __restrict__ dq,
                              float* __restrict__ delta, float* __restrict__ dalpha_rows) {
    __shared__ BwdSmem sm;
    const u32 o = blockIdx.x;
    const u32 lane = threadIdx.x & (L - 1), rg = threadIdx.x / L, nrg = blockDim.x / L;
    const u32 gmask = group_mask(L);
    const float alpha = alphas[o % hq], am1 = alpha - 1.0f, t = tau[o];
    const u32 n = o_n[o];
    const size_t kv0 = o_kv[o];
    float qr[CH][V], dr[CH][V];
    load_row<T, V, CH>(q + (size_t)o * D, D, L, lane, qr);
    load_row<T, V, CH>(dout + (size_t)o * D, D, L, lane, dr);
    // Sweep 1: Σu, Σ u dy, Σ p dy, Σ S dy, Σ S.
    float su = 0.0f, sudy = 0.0f, spdy = 0.0f, ssdy = 0.0f, ss = 0.0f;
    for (u32 j = rg; j < n; j += nrg) {
        float kr[CH][V], vr[CH][V];
        load_row<T, V, CH>(k + (kv0 + j) * D, D, L, lane, kr);
        load_row<T, V, CH>(v + (kv0 + j) * D, D, L, lane, vr);
        float z = 0.0f, dy = 0.0f;
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int e = 0; e < V; ++e) {
                z = fmaf(qr[c][e], kr[c][e], z);
                dy = fmaf(dr[c][e], vr[c][e], dy);
            }
        z = group_sum(z, L, gmask) * scale;
        dy = group_sum(dy, L, gmask);
        float p, u;
        bwd_weights(am1 * z, t, alpha, p, u);
        if (p > 0.0f || u > 0.0f) {
            const float S = p > 0.0f ? p * logf(p) : 0.0f;
            su += u;
            sudy += u * dy;
            spdy += p * dy;
            ssdy += S * dy;
            ss += S;
        }
    }
    if (lane == 0) {
        sm.s[rg][0] = su;
        sm.s[rg][1] = sudy;
        sm.s[rg][2] = spdy;
        sm.s[rg][3] = ssdy;
        sm.s[rg][4] = ss;
    }
    __syncthreads();
    double tot[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
    for (u32 r = 0; r < nrg; ++r) {
#pragma unroll
        for (int x = 0; x < 5; ++x) tot[x] += (double)sm.s[r][x];
    }
    const double dlt = tot[0] > 0.0 ? tot[1] / tot[0] : 0.0;
    if (threadIdx.x == 0) {
        delta[o] = (float)dlt;
        double g = 0.0;
        if (tot[0] > 0.0) {
            const double a1 = (double)am1;
            // Σ dy [(p − p̃)/(α−1)² − (S − p̃ H)/(α−1)], p̃ = u / Σu, H = Σ S.
            g = tot[2] / (a1 * a1) - dlt / (a1 * a1) - tot[3] / a1 + tot[4] * dlt / a1;
        }
        dalpha_rows[o] = (float)g;
    }
    // Sweep 2: dQ = scale Σ_j u (dy − δ) k_j.
    const float df = (float)dlt;
    float acc[CH][V];
#pragma unroll
    for (int c = 0; c < CH; ++c)
#pragma unroll
        for (int e = 0; e < V; ++e) acc[c][e] = 0.0f;
    for (u32 j = rg; j < n; j += nrg) {
        float kr[CH][V], vr[CH][V];
        load_row<T, V, CH>(k + (kv0 + j) * D, D, L, lane, kr);
        load_row<T, V, CH>(v + (kv0 + j) * D, D, L, lane, vr);
        float z = 0.0f, dy = 0.0f;
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int e = 0; e < V; ++e) {
                z = fmaf(qr[c][e], kr[c][e], z);
                dy = fmaf(dr[c][e], vr[c][e], dy);
            }
        z = group_sum(z, L, gmask) * scale;
        dy = group_sum(dy, L, gmask);
        float p, u;
        bwd_weights(am1 * z, t, alpha, p, u);
        if (u == 0.0f) continue;
        const float g = scale * u * (dy - df);
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int e = 0; e < V; ++e) acc[c][e] = fmaf(g, kr[c][e], acc[c][e]);
    }
    bwd_merge_vec<V, CH>(sm, acc, D, L, dq + (size_t)o * D);
}

// Key table: 6 u32 per block: kv row, key index j, segment length nk, first query row,
// query count nq, KV head g.
template <typename T, int V, int CH>
__device__ void bwd_keys_impl(const T* __restrict__ q, const T* __restrict__ k,
                              const T* __restrict__ v, const T* __restrict__ dout,
                              const u32* __restrict__ keys, u32 causal,
                              const float* __restrict__ tau, const float* __restrict__ alphas,
                              const float* __restrict__ delta, u32 hq, u32 group, u32 D, u32 L,
                              float scale, float* __restrict__ dk, float* __restrict__ dv) {
    __shared__ BwdSmem sm;
    const u32* key = keys + 6 * (size_t)blockIdx.x;
    const size_t row = key[0];
    const u32 j = key[1], nk = key[2], q0 = key[3], nq = key[4], g = key[5];
    const u32 lane = threadIdx.x & (L - 1), rg = threadIdx.x / L, nrg = blockDim.x / L;
    const u32 gmask = group_mask(L);
    // First query row that sees key j: pos_i = nk − nq + i ≥ j.
    u32 i0 = 0;
    if (causal && j + nq > nk) i0 = j + nq - nk;
    const u32 pairs = i0 < nq ? (nq - i0) * group : 0;
    float kr[CH][V], vr[CH][V];
    load_row<T, V, CH>(k + row * D, D, L, lane, kr);
    load_row<T, V, CH>(v + row * D, D, L, lane, vr);
    float ak[CH][V], av[CH][V];
#pragma unroll
    for (int c = 0; c < CH; ++c)
#pragma unroll
        for (int e = 0; e < V; ++e) ak[c][e] = av[c][e] = 0.0f;
    for (u32 x = rg; x < pairs; x += nrg) {
        const u32 i = i0 + x / group, h = g * group + x % group;
        const u32 o = (q0 + i) * hq + h;
        float qr[CH][V], dr[CH][V];
        load_row<T, V, CH>(q + (size_t)o * D, D, L, lane, qr);
        load_row<T, V, CH>(dout + (size_t)o * D, D, L, lane, dr);
        float z = 0.0f, dy = 0.0f;
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int e = 0; e < V; ++e) {
                z = fmaf(qr[c][e], kr[c][e], z);
                dy = fmaf(dr[c][e], vr[c][e], dy);
            }
        z = group_sum(z, L, gmask) * scale;
        dy = group_sum(dy, L, gmask);
        const float alpha = alphas[h];
        float p, u;
        bwd_weights((alpha - 1.0f) * z, tau[o], alpha, p, u);
        if (p == 0.0f && u == 0.0f) continue;
        const float gs = scale * u * (dy - delta[o]);
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
            for (int e = 0; e < V; ++e) {
                av[c][e] = fmaf(p, dr[c][e], av[c][e]);
                ak[c][e] = fmaf(gs, qr[c][e], ak[c][e]);
            }
    }
    bwd_merge_vec<V, CH>(sm, ak, D, L, dk + row * D);
    bwd_merge_vec<V, CH>(sm, av, D, L, dv + row * D);
}

#define BWD_ROWS_INST(NAME, T, V, CH)                                                           \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_THREADS)                               \
        NAME(const T *q, const T *k, const T *v, const T *dout, const u32 *o_kv, const u32 *o_n, \
             const float *tau, const float *alphas, u32 hq, u32 D, u32 L, float scale,          \
             float *dq, float *delta, float *dalpha_rows) {                                     \
        bwd_rows_impl<T, V, CH>(q, k, v, dout, o_kv, o_n, tau, alphas, hq, D, L, scale, dq,     \
                                delta, dalpha_rows);                                            \
    }
#define BWD_KEYS_INST(NAME, T, V, CH)                                                           \
    extern "C" __global__ void __launch_bounds__(KV_ATTN_THREADS)                               \
        NAME(const T *q, const T *k, const T *v, const T *dout, const u32 *keys, u32 causal,    \
             const float *tau, const float *alphas, const float *delta, u32 hq, u32 group,      \
             u32 D, u32 L, float scale, float *dk, float *dv) {                                  \
        bwd_keys_impl<T, V, CH>(q, k, v, dout, keys, causal, tau, alphas, delta, hq, group, D,  \
                                L, scale, dk, dv);                                              \
    }

BWD_ROWS_INST(entmax_prefill_bwd_rows_vec_f32, float, 4, 1)
BWD_ROWS_INST(entmax_prefill_bwd_rows_vec_f16, f16s, 8, 1)
BWD_ROWS_INST(entmax_prefill_bwd_rows_vec_bf16, bf16s, 8, 1)
BWD_ROWS_INST(entmax_prefill_bwd_rows_scalar_f32, float, 1, 8)
BWD_ROWS_INST(entmax_prefill_bwd_rows_scalar_f16, f16s, 1, 8)
BWD_ROWS_INST(entmax_prefill_bwd_rows_scalar_bf16, bf16s, 1, 8)
BWD_KEYS_INST(entmax_prefill_bwd_keys_vec_f32, float, 4, 1)
BWD_KEYS_INST(entmax_prefill_bwd_keys_vec_f16, f16s, 8, 1)
BWD_KEYS_INST(entmax_prefill_bwd_keys_vec_bf16, bf16s, 8, 1)
BWD_KEYS_INST(entmax_prefill_bwd_keys_scalar_f32, float, 1, 8)
BWD_KEYS_INST(entmax_prefill_bwd_keys_scalar_f16, f16s, 1, 8)
BWD_KEYS_INST(entmax_prefill_bwd_keys_scalar_bf16, bf16s, 1, 8)
