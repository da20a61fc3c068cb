// Test kernels of the simulator itself (compiled only for the simulator, never by NVRTC):
// `sim_ok_*` exercise its semantics with known answers; each `sim_bad_*` kernel has one
// deliberate defect that one detector must report (src/cuda/sim/tests.rs).

// Per block of blockDim.x (a multiple of 32) threads reading in[b·blockDim.x + t]:
// out[4 b + 0] = Σ in (warp shuffles, then shared memory across a barrier);
// out[4 b + 1] = number of odd inputs (ballot + popc, then an atomic on shared memory);
// out[4 b + 2] = in of the block's last thread (__shfl_sync from lane 31 of the last warp);
// out[4 b + 3] = Σ in again, through block_sum_u of common.cuh.
extern "C" __global__ void __launch_bounds__(256) sim_ok_reduce(const u32* in, u32* out) {
    __shared__ u32 warp_sums[32];
    __shared__ u32 odd;
    __shared__ double red[32];
    const u32 t = threadIdx.x, lane = t & 31, warp = t >> 5, nw = blockDim.x >> 5;
    const u32 v = in[blockIdx.x * blockDim.x + t];
    if (t == 0) odd = 0;
    const u32 ws = warp_sum_u(v);
    const u32 ballot = __ballot_sync(0xffffffffu, v & 1u);
    const u32 last = __shfl_sync(0xffffffffu, v, 31);
    if (lane == 0) warp_sums[warp] = ws;
    __syncthreads();
    if (lane == 0) atomicAdd(&odd, (u32)__popc(ballot));
    u32 total = 0;
    for (u32 w = 0; w < nw; ++w) total += warp_sums[w];
    const u32 again = block_sum_u(v, red);
    __syncthreads();
    if (t == blockDim.x - 1) {
        out[4 * blockIdx.x + 0] = total;
        out[4 * blockIdx.x + 1] = odd;
        out[4 * blockIdx.x + 2] = last;
        out[4 * blockIdx.x + 3] = again;
    }
}

// 16-bit data at byte granularity: threads of a block write neighbouring halves of shared
// words, and consecutive blocks of 63 threads share a 4-byte word of `out` (no conflict on a
// byte-addressed device, so none here). out[63 b + t] = x[63 b + 62 - t].
extern "C" __global__ void sim_ok_halves(const u16* x, u16* out) {
    __shared__ u16 s[64];
    const u32 t = threadIdx.x, base = 63 * blockIdx.x;
    s[t] = x[base + t];
    __syncthreads();
    out[base + t] = s[62 - t];
}

// out[i] = f32 -> f16 -> f32 and f32 -> bf16 -> f32 of x[i] (the portable conversions).
extern "C" __global__ void sim_ok_convert(const float* x, float* out, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[2 * i] = to_f32(from_f32<f16s>(x[i]));
    out[2 * i + 1] = to_f32(from_f32<bf16s>(x[i]));
}

// Off by one: thread i reads x[i + 1], so the last thread reads past the end.
extern "C" __global__ void sim_bad_read_past_end(const float* x, float* out, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = x[i + 1];
}

// Off by one in the guard: thread n writes out[n].
extern "C" __global__ void sim_bad_write_past_end(const float* x, float* out, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i <= n) out[i] = i < n ? x[i] : 0.0f;
}

// Writes through an input pointer.
extern "C" __global__ void sim_bad_write_input(const float* x, float* out, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        out[i] = x[i];
        const_cast<float*>(x)[i] = 0.0f;
    }
}

// Early exit before a barrier: only the first warp reaches it.
extern "C" __global__ void sim_bad_partial_barrier(const float* x, float* out, u32 n) {
    __shared__ float s[32];
    if (threadIdx.x >= 32) return;
    s[threadIdx.x] = x[threadIdx.x % n];
    __syncthreads();
    out[threadIdx.x] = s[31 - threadIdx.x];
}

// Odd lanes exit; even lanes then shuffle with a full mask.
extern "C" __global__ void sim_bad_diverged_shuffle(const float* x, float* out, u32 n) {
    if (threadIdx.x & 1) return;
    const float v = warp_sum(x[threadIdx.x % n]);
    out[threadIdx.x] = v;
}

// The two halves of a warp call a full-mask shuffle at different places.
extern "C" __global__ void sim_bad_split_shuffle(const float* x, float* out, u32 n) {
    float v = x[threadIdx.x % n];
    if ((threadIdx.x & 31) < 16) v += __shfl_xor_sync(0xffffffffu, v, 1);
    else v -= __shfl_xor_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

// A block of 48 threads: the second warp has 16 lanes, but warp_sum names 32.
extern "C" __global__ void sim_bad_partial_warp(const float* x, float* out, u32 n) {
    out[threadIdx.x] = warp_sum(x[threadIdx.x % n]);
}

// Every thread writes the same shared word (the last writer wins: a race).
extern "C" __global__ void sim_bad_shared_race(const float* x, float* out, u32 n) {
    __shared__ float s;
    s = x[threadIdx.x % n];
    __syncthreads();
    out[threadIdx.x] = s;
}

// Thread 0 writes a shared word that the others read before the barrier.
extern "C" __global__ void sim_bad_missing_barrier(const float* x, float* out, u32 n) {
    __shared__ float s;
    if (threadIdx.x == 0) s = x[0];
    const float v = s;
    __syncthreads();
    out[threadIdx.x] = v;
}

// Reads a shared array that no thread of the block wrote.
extern "C" __global__ void sim_bad_uninit_shared(const float* x, float* out, u32 n) {
    __shared__ float s[64];
    if (threadIdx.x < 32) s[threadIdx.x] = x[threadIdx.x % n];
    __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];
}

// A 16-byte vector load from an address that is 4 bytes off (load_vec of common.cuh).
extern "C" __global__ void sim_bad_misaligned(const float* x, float* out, u32 n) {
    float o[4];
    load_vec<float, 4>(x + 1 + 4 * threadIdx.x, o);
    out[threadIdx.x] = o[0] + o[1] + o[2] + o[3] + (float)n;
}

// Declared for at most 64 threads per block.
extern "C" __global__ void __launch_bounds__(64) sim_bad_bounded(const float* x, float* out, u32 n) {
    out[threadIdx.x] = x[threadIdx.x % n];
}

// Every block writes out[0..n): the last block wins on this simulator, any block on a device.
extern "C" __global__ void sim_bad_blocks_overlap(const float* x, float* out, u32 n) {
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) out[i] = x[i] + (float)blockIdx.x;
}

// Block b reads what block b - 1 wrote (in order here, in any order on a device).
extern "C" __global__ void sim_bad_reads_other_block(const float* x, float* out, u32 n) {
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = x[i];
    if (blockIdx.x > 0 && threadIdx.x == 0) out[i] += out[i - 1];
}
