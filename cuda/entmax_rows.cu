// entmax_rows: one block per row r = x[base[r] .. base[r] + len[r]] with α = alpha[r]; the
// threshold by block_entmax_tau (common.cuh). Writes probabilities to `out` (when not null)
// and (zmax, τ) per row to `tau` (when not null; τ in the shifted scaled space). Masking and
// NaN rules as softmax_rows. Entries at or below τ get exactly 0; the kept entries are
// renormalised so each row sums to 1.

extern "C" __global__ void entmax_rows_f32(const float* __restrict__ x, float* __restrict__ out,
                                           const u32* __restrict__ base,
                                           const u32* __restrict__ len,
                                           const float* __restrict__ alpha,
                                           float* __restrict__ tau) {
    __shared__ double red[32];
    const u32 r = blockIdx.x;
    const float* row = x + base[r];
    const u32 n = len[r];
    const float a = alpha[r];
    TauResult t = block_entmax_tau(row, n, a, red);
    if (tau != nullptr && threadIdx.x == 0) {
        tau[2 * r] = t.kind == 0 ? t.zmax : -KV_INF;
        tau[2 * r + 1] = t.kind == 0 ? (float)t.tau : KV_INF;
    }
    if (out == nullptr) return;
    float* o = out + base[r];
    if (t.kind != 0) {
        const float fill = t.kind == 2 ? KV_NAN : 0.0f;
        for (u32 i = threadIdx.x; i < n; i += blockDim.x) o[i] = fill;
        return;
    }
    const EntPow e = ent_pow(a);
    const float am1 = a - 1.0f, tf = (float)t.tau;
    double s = 0.0;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) s += (double)ent_weight(e, am1, row[i], t.zmax, tf);
    s = block_sum_d(s, red);
    const float inv = (float)(1.0 / s);
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) o[i] = ent_weight(e, am1, row[i], t.zmax, tf) * inv;
}
