// value_distances_<dt>: CAOTE's eviction errors. One block per (KV segment, chunk of up to
// VD_HEADS of the blocks over it: the group's query heads with Heads::PerHead, else one):
//   1. o_h = Σ_j w_{h,j} v_j (fast: Σ_j v_j / L, one o for every block), accumulated in f32;
//      threads over the hc · D outputs, and threads left over by a small hc · D split the
//      tokens into lanes whose partial sums are added in lane order (deterministic);
//      written to `centers` (when not null) at row blk0 + h;
//   2. d_{h,j} = ‖o_h − v_j‖₂ from the differences (never ‖o‖² − 2 o·v + ‖v‖², which cancels
//      when v_j ≈ o_h): row groups of L lanes, one V row in registers serves every head.
// An empty segment's o is zero.
//
// Grid: x = segment entry of `seg` (4 u32: first V row, length, first block, offset of the
// first block in `w` / `out`; the blocks over a segment follow each other, `len` entries
// each), y = chunk of heads. `nh`: blocks per segment. D ≤ 256.

#define VD_HEADS 8
#define VD_THREADS 256

template <typename T>
__device__ void value_distances_impl(const T* __restrict__ v, const float* __restrict__ w,
                                     const u32* __restrict__ seg, u32 nh, u32 fast, u32 D,
                                     u32 L, float* __restrict__ out,
                                     float* __restrict__ centers) {
    __shared__ float o_sh[VD_HEADS * 256];
    __shared__ float part[VD_THREADS];
    const u32* e = seg + 4 * blockIdx.x;
    const u32 row0 = e[0], len = e[1], blk0 = e[2], w_off = e[3];
    const u32 h0 = blockIdx.y * VD_HEADS;
    const u32 hc = min(nh - h0, (u32)VD_HEADS);
    const u32 no = fast ? 1u : hc;  // distinct o vectors
    const u32 C = no * D;
    const float inv_len = len > 0 ? 1.0f / (float)len : 0.0f;
    const u32 lanes = C >= blockDim.x ? 1u : blockDim.x / C;
    if (lanes == 1) {
        for (u32 x = threadIdx.x; x < C; x += blockDim.x) {
            const u32 hh = x / D, d = x % D;
            const float* wr = w + w_off + (size_t)(h0 + hh) * len;
            float acc = 0.0f;
            for (u32 j = 0; j < len; ++j)
                acc = fmaf(fast ? inv_len : wr[j], to_f32(v[((size_t)row0 + j) * D + d]), acc);
            o_sh[x] = acc;
        }
    } else {
        if (threadIdx.x < lanes * C) {
            const u32 x = threadIdx.x % C, ln = threadIdx.x / C;
            const u32 hh = x / D, d = x % D;
            const float* wr = w + w_off + (size_t)(h0 + hh) * len;
            float acc = 0.0f;
            for (u32 j = ln; j < len; j += lanes)
                acc = fmaf(fast ? inv_len : wr[j], to_f32(v[((size_t)row0 + j) * D + d]), acc);
            part[threadIdx.x] = acc;
        }
        __syncthreads();
        for (u32 x = threadIdx.x; x < C; x += blockDim.x) {
            float acc = 0.0f;
            for (u32 ln = 0; ln < lanes; ++ln) acc += part[ln * C + x];
            o_sh[x] = acc;
        }
    }
    __syncthreads();
    if (centers != nullptr)
        for (u32 x = threadIdx.x; x < hc * D; x += blockDim.x) {
            const u32 hh = x / D, d = x % D;
            centers[(size_t)(blk0 + h0 + hh) * D + d] = o_sh[(fast ? 0u : hh) * D + d];
        }
    const u32 lane = threadIdx.x & (L - 1), rg = threadIdx.x / L, nrg = blockDim.x / L;
    const u32 gmask = group_mask(L);
    for (u32 j = rg; j < len; j += nrg) {
        float vr[8][1];
        load_row<T, 1, 8>(v + ((size_t)row0 + j) * D, D, L, lane, vr);
        for (u32 hh = 0; hh < hc; ++hh) {
            const float* oh = o_sh + (fast ? 0u : hh) * D;
            float s = 0.0f;
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const u32 d = c * L + lane;
                if (d < D) {
                    const float x = oh[d] - vr[c][0];
                    s = fmaf(x, x, s);
                }
            }
            s = group_sum(s, L, gmask);
            if (lane == 0) out[w_off + (size_t)(h0 + hh) * len + j] = sqrtf(s);
        }
    }
}

#define VD_INST(NAME, T)                                                                        \
    extern "C" __global__ void __launch_bounds__(VD_THREADS)                                    \
        NAME(const T *v, const float *w, const u32 *seg, u32 nh, u32 fast, u32 D, u32 L,         \
             float *out, float *centers) {                                                      \
        value_distances_impl<T>(v, w, seg, nh, fast, D, L, out, centers);                       \
    }

VD_INST(value_distances_f32, float)
VD_INST(value_distances_f16, f16s)
VD_INST(value_distances_bf16, bf16s)
