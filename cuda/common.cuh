// kvsieve CUDA kernels: shared helpers, prepended to every cuda/<stem>.cu before NVRTC.
//
// Self-contained on purpose: no CUDA header is included, so NVRTC needs no include
// path (the pip wheel of NVRTC ships none). f16 and bf16 are stored as 16-bit words and
// converted in registers; every sum is accumulated in f32 (f64 for threshold searches).
// Compiled with ftz off, precise division and square root, no fast math.
//
// The same sources also run on the CPU under the SIMT simulator (feature `cuda-sim`,
// cuda/sim/kvsim.h), which defines KVSIEVE_SIM: only the inline PTX below depends on it.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

struct f16s { u16 bits; };
struct bf16s { u16 bits; };

#define KV_INF __int_as_float(0x7f800000)
#define KV_NAN __int_as_float(0x7fc00000)

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16s h) {
#ifdef KVSIEVE_SIM  // the host simulator (cuda/sim/kvsim.h): the same conversion, portably
    return kvsim::f16_to_f32(h.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
    return f;
#endif
}
__device__ __forceinline__ float to_f32(bf16s h) { return __uint_as_float(((u32)h.bits) << 16); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ f16s from_f32<f16s>(float x) {
    f16s r;
#ifdef KVSIEVE_SIM
    r.bits = kvsim::f32_to_f16(x);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#endif
    return r;
}
// Round to nearest even; NaN stays NaN (quiet bit set), like `half::bf16::from_f32`.
template <> __device__ __forceinline__ bf16s from_f32<bf16s>(float x) {
    u32 u = __float_as_uint(x);
    bf16s r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (u16)((u >> 16) | 0x40u);
    } else {
        r.bits = (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return r;
}

struct alignas(16) u32x4 { u32 x, y, z, w; };

__device__ __forceinline__ float half_lo(f16s*, u32 w) { f16s h; h.bits = (u16)(w & 0xffffu); return to_f32(h); }
__device__ __forceinline__ float half_hi(f16s*, u32 w) { f16s h; h.bits = (u16)(w >> 16); return to_f32(h); }
__device__ __forceinline__ float half_lo(bf16s*, u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float half_hi(bf16s*, u32 w) { return __uint_as_float(w & 0xffff0000u); }

// Loads V consecutive elements starting at `p` into f32 registers. V * sizeof(T) == 16
// uses one 16-byte load (the caller guarantees 16-byte alignment); V == 1 is scalar.
template <typename T, int V>
__device__ __forceinline__ void load_vec(const T* p, float (&o)[V]) {
#ifdef KVSIEVE_SIM
    if constexpr (V > 1) kvsim::check_aligned(KVSIM_HERE, p, 16);
#endif
    if constexpr (V == 1) {
        o[0] = to_f32(p[0]);
    } else if constexpr (sizeof(T) == 4) {
        static_assert(V == 4, "f32 vector loads are 4 wide");
        u32x4 w = *reinterpret_cast<const u32x4*>(p);
        o[0] = __uint_as_float(w.x);
        o[1] = __uint_as_float(w.y);
        o[2] = __uint_as_float(w.z);
        o[3] = __uint_as_float(w.w);
    } else {
        static_assert(V == 8, "16-bit vector loads are 8 wide");
        u32x4 w = *reinterpret_cast<const u32x4*>(p);
        T* tag = nullptr;
        o[0] = half_lo(tag, w.x); o[1] = half_hi(tag, w.x);
        o[2] = half_lo(tag, w.y); o[3] = half_hi(tag, w.y);
        o[4] = half_lo(tag, w.z); o[5] = half_hi(tag, w.z);
        o[6] = half_lo(tag, w.w); o[7] = half_hi(tag, w.w);
    }
}

// ------------------------------------------------------------------ reductions

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ u32 warp_sum_u(u32 v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Block reductions (blockDim.x a multiple of 32, at most 1024). `red` is shared scratch of
// at least 32 doubles. Every thread gets the result; the order is fixed, so results are
// deterministic.
__device__ float block_max(float v, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float r = -KV_INF;
    for (int w = 0; w < nw; ++w) r = fmaxf(r, (float)red[w]);
    return r;
}
__device__ double block_sum_d(double v, double* red) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    double r = 0.0;
    for (int w = 0; w < nw; ++w) r += red[w];
    return r;
}
__device__ u32 block_sum_u(u32 v, double* red) {
    return (u32)block_sum_d((double)v, red);
}

// ------------------------------------------------------------- α-entmax threshold

// Result of a row threshold search.
struct TauResult {
    float zmax;   // largest finite entry (the shift)
    double tau;   // threshold in the shifted scaled space s = (α−1)(z − zmax)
    int kind;     // 0: solved; 1: no finite entry (all -inf / empty); 2: NaN or +inf present
};

// u^c0 and the derivative terms for one entry (u > 0).
struct EntPow {
    int mode;     // 0: α = 2 (p = u); 1: α = 1.5 (p = u²); 2: generic
    float c0;     // 1 / (α − 1)
};

__device__ __forceinline__ float ent_p(const EntPow& e, float u) {
    if (e.mode == 0) return u;
    if (e.mode == 1) return u * u;
    return exp2f(e.c0 * log2f(u));
}

// Threshold of one row by the hybrid Halley–bisection rule of `kvsieve::entmax::TauBracket`
// (bracket of `tau_bounds`, Halley candidate accepted inside the ε-widened bracket, and below
// max s, only when the progress guard allows it, bisection otherwise). Sums in f64. Stops when |f| < 1e-6 or
// after 60 updates. All threads of the block call it and get the same result.
__device__ TauResult block_entmax_tau(const float* z, u32 n, float alpha, double* red) {
    TauResult res;
    float m = -KV_INF;
    u32 bad = 0, cnt = 0;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        float x = z[i];
        if (x != x || x == KV_INF) bad = 1;
        else if (x > -KV_INF) { m = fmaxf(m, x); cnt += 1; }
    }
    m = block_max(m, red);
    bad = block_sum_u(bad, red);
    cnt = block_sum_u(cnt, red);
    res.zmax = m;
    res.tau = 0.0;
    if (bad) { res.kind = 2; return res; }
    if (cnt == 0) { res.kind = 1; return res; }
    res.kind = 0;
    const float am1 = alpha - 1.0f;
    EntPow e;
    e.c0 = 1.0f / am1;
    e.mode = alpha == 2.0f ? 0 : (alpha == 1.5f ? 1 : 2);
    const double c0 = (double)e.c0;
    double lo = -1.0;
    double hi = -pow((double)cnt, 1.0 - (double)alpha);
    if (cnt == 1) { res.tau = lo; return res; }
    double tau = 0.5 * (lo + hi);
    double absf0 = 1.0 / 0.0, absf1 = 1.0 / 0.0;
    for (int it = 0; it < 60; ++it) {
        double f = 0.0, df = 0.0, ddf = 0.0;
        for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
            float x = z[i];
            if (!(x > -KV_INF)) continue;
            float s = am1 * (x - m);
            double ud = (double)s - tau;
            if (ud <= 0.0) continue;
            float u = (float)ud;
            if (e.mode == 0) { f += ud; df -= 1.0; }
            else if (e.mode == 1) { f += ud * ud; df -= 2.0 * ud; ddf += 2.0; }
            else {
                float uf = fmaxf(u, 1e-12f);
                float l2 = log2f(uf);
                f += (double)ent_p(e, u);
                df -= c0 * (double)exp2f((e.c0 - 1.0f) * l2);
                ddf += c0 * (c0 - 1.0) * (double)exp2f((e.c0 - 2.0f) * l2);
            }
        }
        f = block_sum_d(f, red) - 1.0;
        df = block_sum_d(df, red);
        ddf = block_sum_d(ddf, red);
        if (fabs(f) < 1e-6) break;
        bool in_bracket = lo <= tau && tau <= hi;
        if (f > 0.0) lo = fmax(lo, tau);
        else if (f < 0.0) hi = fmin(hi, tau);
        bool progress = in_bracket && fabs(f) <= 0.5 * absf1;
        absf1 = absf0;
        absf0 = fabs(f);
        double cand = tau - 2.0 * f * df / (2.0 * df * df - f * ddf);
        // Never at or past max s = 0 (`TauBracket::for_row`): for α > 2 and
        // long rows hi + ε > 0, and such a τ empties the support.
        if (progress && cand > lo - 1e-6 && cand < fmin(hi + 1e-6, 0.0)) tau = cand;
        else {
            tau = 0.5 * (lo + hi);
            if (tau >= 0.0) tau = lo;  // a midpoint rounded up to max s
        }
    }
    res.tau = tau;
    return res;
}

// Unnormalised entmax weight of logit `x` given a solved row (0 at or below the threshold).
__device__ __forceinline__ float ent_weight(const EntPow& e, float am1, float x, float zmax, float tau) {
    if (!(x > -KV_INF)) return 0.0f;
    float u = am1 * (x - zmax) - tau;
    return u > 0.0f ? ent_p(e, u) : 0.0f;
}

__device__ __forceinline__ EntPow ent_pow(float alpha) {
    EntPow e;
    e.c0 = 1.0f / (alpha - 1.0f);
    e.mode = alpha == 2.0f ? 0 : (alpha == 1.5f ? 1 : 2);
    return e;
}

// ------------------------------------------------------------ attention work units
//
// Attention kernels (decode, prefill, Q·K logits, entmax) iterate over *work units*: one
// (virtual row r, head unit u) pair, where a virtual row is a decode sequence or one prefill
// query, and a head unit is a KV head (its G query heads share every K/V load) or, for
// query-head-scoped restrictions, a single query head. The host builds the table:
//
//   work[4 w + 0] = first KV row of the unit's segment
//   work[4 w + 1] = number of items (tokens visible, or the index-list length)
//   work[4 w + 2] = item base (index-list start, or mask word start)
//   work[4 w + 3] = query row (index into q / out, in units of Hq heads)
//
// mode 0: item i is token i; 1: token idx[base + i]; 2: token i if bit i of mask[base..].

#define KV_MAX_HEADS 8   // query heads per CTA (GQA groups above 8 use several CTAs)
#define KV_ATTN_THREADS 128

struct Unit {
    u32 kv_off, n, base, q_row;
};

__device__ __forceinline__ Unit load_unit(const u32* work, u32 w) {
    Unit u;
    u.kv_off = work[4 * w];
    u.n = work[4 * w + 1];
    u.base = work[4 * w + 2];
    u.q_row = work[4 * w + 3];
    return u;
}

// Token of item i, or -1 when a mask clears it.
__device__ __forceinline__ long long item_token(int mode, const u32* idx, const u32* mask, const Unit& u, u32 i) {
    if (mode == 1) return (long long)idx[u.base + i];
    if (mode == 2) return ((mask[u.base + (i >> 5)] >> (i & 31)) & 1u) ? (long long)i : -1;
    return (long long)i;
}

// Physical K/V row of token `tok` (>= 0) of a work unit. Contiguous (`pg` null): row
// `kv_off + tok`. Paged (`pg` the unit's page map, see src/cuda/attn.rs): `pg[kv_off + j]` is
// the row of slot 0 of the unit's j-th page for its KV head, so token t is row
// `pg[kv_off + (t >> pshift)] + (t & (2^pshift − 1)) · pstride` (page size 2^pshift; stride 1
// for HND pools, Hkv for NHD).
__device__ __forceinline__ size_t kv_row(const u32* __restrict__ pg, u32 pshift, u32 pstride,
                                         const Unit& u, long long tok) {
    if (pg == nullptr) return (size_t)u.kv_off + (size_t)tok;
    const u32 t = (u32)tok;
    // 32-bit: every row of a pool is below num_pages · Hkv · P ≤ u32::MAX (PageTable::new).
    return (size_t)(pg[u.kv_off + (t >> pshift)] + (t & ((1u << pshift) - 1u)) * pstride);
}

// Row-group geometry: L lanes (a power of two ≤ 32) share one token row; each lane owns CH
// chunks of V consecutive elements: element (c * L + lane) * V + e.
__device__ __forceinline__ u32 group_mask(u32 L) {
    const u32 lane = threadIdx.x & 31;
    return L == 32 ? 0xffffffffu : (((1u << L) - 1u) << (lane & ~(L - 1u)));
}

__device__ __forceinline__ float group_sum(float v, u32 L, u32 gmask) {
    for (u32 o = L >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(gmask, v, o, L);
    return v;
}

// Loads this lane's chunks of row `row` (D elements) into registers; out-of-range elements are 0.
template <typename T, int V, int CH>
__device__ __forceinline__ void load_row(const T* row, u32 D, u32 L, u32 lane, float (&o)[CH][V]) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
        u32 d0 = (c * L + lane) * V;
        if (V > 1) {
            if (d0 < D) {
                load_vec<T, V>(row + d0, o[c]);
            } else {
#pragma unroll
                for (int e = 0; e < V; ++e) o[c][e] = 0.0f;
            }
        } else {
            o[c][0] = d0 < D ? to_f32(row[d0]) : 0.0f;
        }
    }
}
