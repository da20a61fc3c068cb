// gather_rows: dst[i, :] = src[idx[i], :] for rows of `width` elements (grid-stride).

template <typename T>
__device__ void gather_impl(const T* __restrict__ src, T* __restrict__ dst,
                            const u32* __restrict__ idx, u32 n_rows, u32 width) {
    const u64 total = (u64)n_rows * width;
    for (u64 x = (u64)blockIdx.x * blockDim.x + threadIdx.x; x < total;
         x += (u64)gridDim.x * blockDim.x) {
        const u64 i = x / width, c = x % width;
        dst[x] = src[(u64)idx[i] * width + c];
    }
}

#define GATHER_INST(NAME, T)                                                                    \
    extern "C" __global__ void NAME(const T *src, T *dst, const u32 *idx, u32 n_rows, u32 width) { \
        gather_impl<T>(src, dst, idx, n_rows, width);                                           \
    }
GATHER_INST(gather_rows_f32, float)
GATHER_INST(gather_rows_f16, f16s)
GATHER_INST(gather_rows_bf16, bf16s)
