// count_above: per row, the number of entries strictly greater than `thr`.

extern "C" __global__ void count_above_f32(const float* __restrict__ x, const u32* __restrict__ base,
                                           const u32* __restrict__ len, float thr,
                                           u32* __restrict__ counts) {
    __shared__ double red[32];
    const u32 r = blockIdx.x;
    const float* row = x + base[r];
    u32 c = 0;
    for (u32 i = threadIdx.x; i < len[r]; i += blockDim.x) c += row[i] > thr ? 1u : 0u;
    c = block_sum_u(c, red);
    if (threadIdx.x == 0) counts[r] = c;
}
