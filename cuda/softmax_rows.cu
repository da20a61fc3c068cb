// softmax_rows: one block per row r = x[base[r] .. base[r] + len[r]]. -inf gets exactly 0; a
// row with no finite entry gives zeros; NaN or +inf anywhere gives NaN everywhere.

extern "C" __global__ void softmax_rows_f32(const float* __restrict__ x, float* __restrict__ out,
                                            const u32* __restrict__ base,
                                            const u32* __restrict__ len) {
    __shared__ double red[32];
    const u32 r = blockIdx.x;
    const float* row = x + base[r];
    float* o = out + base[r];
    const u32 n = len[r];
    float m = -KV_INF;
    u32 bad = 0;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        float v = row[i];
        if (v != v || v == KV_INF) bad = 1;
        else m = fmaxf(m, v);
    }
    m = block_max(m, red);
    bad = block_sum_u(bad, red);
    if (bad || m == -KV_INF) {
        const float fill = bad ? KV_NAN : 0.0f;
        for (u32 i = threadIdx.x; i < n; i += blockDim.x) o[i] = fill;
        return;
    }
    double s = 0.0;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) s += (double)expf(row[i] - m);
    s = block_sum_d(s, red);
    const float inv = (float)(1.0 / s);
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) o[i] = expf(row[i] - m) * inv;
}
