// scatter_rows: buf[dst[i], :] = src[i, :] (destination rows unique, so the order of the
// writes does not matter). Also phase 2 of compact_rows, whose phase 1 gathers the moved rows
// into scratch: no row is read after it is written, whatever the overlap.

template <typename T>
__device__ void scatter_impl(const T* __restrict__ src, T* __restrict__ buf,
                             const u32* __restrict__ dst, u32 n_rows, u32 width) {
    const u64 total = (u64)n_rows * width;
    for (u64 x = (u64)blockIdx.x * blockDim.x + threadIdx.x; x < total;
         x += (u64)gridDim.x * blockDim.x) {
        const u64 i = x / width, c = x % width;
        buf[(u64)dst[i] * width + c] = src[x];
    }
}

#define SCATTER_INST(NAME, T)                                                                   \
    extern "C" __global__ void NAME(const T *src, T *buf, const u32 *dst, u32 n_rows, u32 width) { \
        scatter_impl<T>(src, buf, dst, n_rows, width);                                          \
    }
SCATTER_INST(scatter_rows_f32, float)
SCATTER_INST(scatter_rows_f16, f16s)
SCATTER_INST(scatter_rows_bf16, bf16s)
