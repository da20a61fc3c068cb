// topk_rows: per row, the positions of the min(k, len) largest entries, ascending by position.
// Order: larger first, ties to the lower index, -inf below every finite value and NaN below
// -inf. Radix select (4 passes of 8 bits) finds the k-th largest key; an ordered block scan
// then keeps every key above it and the first (lowest-index) keys equal to it.

__device__ __forceinline__ u32 rank_key(float x) {
    if (x != x) return 0u;                       // NaN: lowest
    if (x == 0.0f) return 0x80000000u;           // -0 and +0 tie
    u32 u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix of `flag` over the block (in thread order) and the block total.
__device__ u32 block_scan(u32 flag, u32* warp_tot, u32& total) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const u32 ballot = __ballot_sync(0xffffffffu, flag != 0);
    const u32 before = __popc(ballot & ((1u << lane) - 1u));
    __syncthreads();
    if (lane == 0) warp_tot[warp] = __popc(ballot);
    __syncthreads();
    u32 off = 0, tot = 0;
    for (u32 w = 0; w < nw; ++w) {
        if (w < warp) off += warp_tot[w];
        tot += warp_tot[w];
    }
    total = tot;
    return off + before;
}

extern "C" __global__ void topk_rows_f32(const float* __restrict__ x, const u32* __restrict__ base,
                                         const u32* __restrict__ len, u32 k,
                                         u32* __restrict__ sel) {
    __shared__ u32 hist[256];
    __shared__ u32 warp_tot[32];
    __shared__ u32 pick[2];
    const u32 r = blockIdx.x;
    const float* row = x + base[r];
    const u32 n = len[r];
    u32* o = sel + (size_t)r * k;
    const u32 kk = min(k, n);
    if (kk == 0) return;
    u32 prefix = 0, pmask = 0, remaining = kk;
    if (kk < n) {
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (u32 b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
            __syncthreads();
            for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
                u32 key = rank_key(row[i]);
                if ((key & pmask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (threadIdx.x == 0) {
                u32 acc = 0, d = 0;
                for (int b = 255; b >= 0; --b) {
                    if (acc + hist[b] >= remaining) { d = (u32)b; break; }
                    acc += hist[b];
                }
                pick[0] = d;
                pick[1] = remaining - acc;
            }
            __syncthreads();
            prefix |= pick[0] << shift;
            pmask |= 255u << shift;
            remaining = pick[1];
            __syncthreads();
        }
    } else {
        prefix = 0;        // every key is >= 0: keep everything
        remaining = n;
    }
    // prefix: the k-th largest key; remaining: how many keys equal to it to keep.
    u32 eq_taken = 0, out_pos = 0;
    for (u32 b0 = 0; b0 < n; b0 += blockDim.x) {
        const u32 i = b0 + threadIdx.x;
        const u32 key = i < n ? rank_key(row[i]) : 0u;
        const bool gt = i < n && key > prefix;
        const bool eq = i < n && key == prefix;
        u32 eq_tot;
        const u32 eq_rank = block_scan(eq ? 1u : 0u, warp_tot, eq_tot);
        const bool take = gt || (eq && eq_taken + eq_rank < remaining);
        u32 take_tot;
        const u32 pos = block_scan(take ? 1u : 0u, warp_tot, take_tot);
        if (take) o[out_pos + pos] = i;
        out_pos += take_tot;
        eq_taken += eq_tot;
    }
}
