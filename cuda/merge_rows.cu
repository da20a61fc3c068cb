// merge_rows: dst[g, :] = Σ_{i ∈ group g} w_i · src[members_i, :], accumulated in f32 in
// member order, rounded once. Grid: x = group, y = column chunk.

template <typename T>
__device__ void merge_impl(const T* __restrict__ src, T* __restrict__ dst,
                           const u32* __restrict__ indptr, const u32* __restrict__ members,
                           const float* __restrict__ weights, u32 width) {
    const u32 g = blockIdx.x;
    const u32 c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= width) return;
    float acc = 0.0f;
    for (u32 i = indptr[g]; i < indptr[g + 1]; ++i)
        acc = fmaf(weights[i], to_f32(src[(u64)members[i] * width + c]), acc);
    dst[(u64)g * width + c] = from_f32<T>(acc);
}

#define MERGE_INST(NAME, T)                                                                     \
    extern "C" __global__ void NAME(const T *src, T *dst, const u32 *indptr, const u32 *members, \
                                    const float *weights, u32 width) {                          \
        merge_impl<T>(src, dst, indptr, members, weights, width);                               \
    }
MERGE_INST(merge_rows_f32, float)
MERGE_INST(merge_rows_f16, f16s)
MERGE_INST(merge_rows_bf16, bf16s)
