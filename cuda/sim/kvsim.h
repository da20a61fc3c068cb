// kvsim.h: what cuda/common.cuh and cuda/<stem>.cu need from CUDA, for the host C++ compiler.
//
// The simulator (cuda/sim/kvsim.cpp) runs every thread of a block as a fiber on the calling
// host thread and the blocks of a grid one after another, so `__shared__` (one static per
// host thread) behaves as on a device. Kernel sources are compiled unchanged: this header is
// included first and defines KVSIEVE_SIM, which common.cuh tests only to replace inline PTX.
//
// Memory accesses of kernel code are checked without changing the kernels: the kernel
// translation units are compiled with -fsanitize=thread, and the simulator implements the
// sanitizer's per-access hooks (__tsan_read4 and friends) itself: every load and store is
// checked against the launch's buffers (bounds, read-only inputs, alignment) or, for shared
// memory, against the other threads of the block since the last barrier (races, reads of
// words no thread wrote). No sanitizer runtime is linked.

#pragma once
#define KVSIEVE_SIM 1

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

struct uint3 { unsigned x, y, z; };
typedef uint3 dim3;

namespace kvsim {

// Where a barrier or warp intrinsic is called (reported by the detectors).
struct Site { const char* file; int line; };
#define KVSIM_HERE (::kvsim::Site{__FILE__, __LINE__})

// --- runtime (kvsim.cpp; not instrumented)
uint3 thread_idx();
uint3 block_idx();
uint3 block_dim();
uint3 grid_dim();
void syncthreads(Site s);
enum WarpOp { SHFL_IDX, SHFL_XOR, SHFL_DOWN, SHFL_UP, BALLOT, SYNCWARP };
// One warp intrinsic: every lane of `mask` must reach the same call with the same mask.
// Shuffles return the source lane's `bits`; ballot and syncwarp return the ballot of `bits != 0`.
uint64_t warp_op(Site s, WarpOp op, unsigned mask, uint64_t bits, int arg, int width);
enum AtomicOp { ATOMIC_ADD_U32, ATOMIC_ADD_F32, ATOMIC_MAX_U32, ATOMIC_CAS_U32, ATOMIC_OR_U32 };
unsigned atomic_op(AtomicOp op, void* addr, unsigned v, unsigned cmp);
// Fails the launch unless `p` is a multiple of `align` (a vector load a device would refuse).
void check_aligned(Site s, const void* p, unsigned align);

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp intrinsics move at most 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T> inline T from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// IEEE binary16 <-> binary32, round to nearest even (as PTX cvt.rn.f16.f32 / cvt.f32.f16).
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));    // inf, NaN
    if (exp != 0) return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
    const float mag = (float)man * 5.9604644775390625e-8f;                 // subnormal: man · 2^-24
    return sign ? -mag : mag;
}
inline uint16_t f32_to_f16(float f) {
    const uint32_t u = f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN stays NaN
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to or above 65520: inf
    if (a >= 0x38800000u) {                                     // normal half
        const uint32_t r = a - 0x38000000u;                     // rebias the exponent (127 -> 15)
        return (uint16_t)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    // Subnormal half (or zero): round |f| / 2^-24 to the nearest even integer, exactly in f32.
    const float q = bits_f32(a) * 16777216.0f;
    const float fl = std::floor(q), d = q - fl;
    uint32_t n = (uint32_t)fl;
    if (d > 0.5f || (d == 0.5f && (n & 1u))) n += 1;
    return (uint16_t)(sign | n);
}

}  // namespace kvsim

// ------------------------------------------------------------- CUDA C, as kernels use it

#ifdef KVSIM_SCAN  // build.rs preprocesses each source with this to list its kernels
#define __global__ kvsim_scan_global
#define __launch_bounds__(...) kvsim_scan_bounds(__VA_ARGS__)
#else
#define __global__
#define __launch_bounds__(...)
#endif
// Device functions are defined in every source that includes common.cuh: inline, as one
// program holds all of them (`__forceinline__` is a hint only).
#define __device__ inline
#define __host__
#define __forceinline__
#define __shared__ static thread_local
#define warpSize 32

#define threadIdx (::kvsim::thread_idx())
#define blockIdx (::kvsim::block_idx())
#define blockDim (::kvsim::block_dim())
#define gridDim (::kvsim::grid_dim())

#define __syncthreads() ::kvsim::syncthreads(KVSIM_HERE)
#define __syncwarp(...) ::kvsim::syncwarp_(KVSIM_HERE, ##__VA_ARGS__)
#define __shfl_sync(...) ::kvsim::shfl_(KVSIM_HERE, ::kvsim::SHFL_IDX, __VA_ARGS__)
#define __shfl_xor_sync(...) ::kvsim::shfl_(KVSIM_HERE, ::kvsim::SHFL_XOR, __VA_ARGS__)
#define __shfl_down_sync(...) ::kvsim::shfl_(KVSIM_HERE, ::kvsim::SHFL_DOWN, __VA_ARGS__)
#define __shfl_up_sync(...) ::kvsim::shfl_(KVSIM_HERE, ::kvsim::SHFL_UP, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::kvsim::ballot_(KVSIM_HERE, mask, pred)

namespace kvsim {
template <typename T>
inline T shfl_(Site s, WarpOp op, unsigned mask, T v, int arg, int width = 32) {
    return from_bits<T>(warp_op(s, op, mask, to_bits(v), arg, width));
}
inline unsigned ballot_(Site s, unsigned mask, int pred) {
    return (unsigned)warp_op(s, BALLOT, mask, pred != 0, 0, 32);
}
inline void syncwarp_(Site s, unsigned mask = 0xffffffffu) { warp_op(s, SYNCWARP, mask, 1, 0, 32); }
}  // namespace kvsim

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return kvsim::atomic_op(kvsim::ATOMIC_ADD_U32, p, v, 0); }
inline float atomicAdd(float* p, float v) {
    return kvsim::bits_f32(kvsim::atomic_op(kvsim::ATOMIC_ADD_F32, p, kvsim::f32_bits(v), 0));
}
inline unsigned atomicMax(unsigned* p, unsigned v) { return kvsim::atomic_op(kvsim::ATOMIC_MAX_U32, p, v, 0); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return kvsim::atomic_op(kvsim::ATOMIC_OR_U32, p, v, 0); }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) {
    return kvsim::atomic_op(kvsim::ATOMIC_CAS_U32, p, v, cmp);
}

inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline float __uint_as_float(unsigned x) { float f; std::memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned u; std::memcpy(&u, &x, 4); return u; }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }

// CUDA's integer min / max overloads (the float ones, fminf and friends, come from <cmath>).
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// --------------------------------------------------------------- the launch table

namespace kvsim {

// Kinds of kernel parameters the host passes: a device pointer, a 32-bit integer, a float.
enum ParamKind { PARAM_PTR = 0, PARAM_U32 = 1, PARAM_F32 = 2 };
template <typename A> constexpr int param_kind() {
    if constexpr (std::is_pointer<A>::value) return PARAM_PTR;
    else if constexpr (std::is_same<A, float>::value) return PARAM_F32;
    else {
        static_assert(std::is_integral<A>::value && sizeof(A) == 4, "unsupported kernel parameter type");
        return PARAM_U32;
    }
}

// One kernel: its name, the kinds of its parameters and a thunk that calls it with a
// cuLaunchKernel-style array (params[i] points to the value of parameter i).
struct Entry {
    const char* name;
    int n_params;
    const int* kinds;
    unsigned max_threads;  // __launch_bounds__, 0 if none
    void (*invoke)(void** params);
};

template <typename F> struct Sig;
template <typename... A> struct Sig<void (*)(A...)> {
    static constexpr int n = sizeof...(A);
    static constexpr int kinds[sizeof...(A) + 1] = {param_kind<A>()..., 0};
    template <void (*K)(A...), std::size_t... I>
    static void call(void** p, std::index_sequence<I...>) { K(*static_cast<A*>(p[I])...); }
    template <void (*K)(A...)> static void invoke(void** p) { call<K>(p, std::index_sequence_for<A...>{}); }
};

}  // namespace kvsim

// One table row per kernel; build.rs writes these rows for every `__global__`
// function it finds in the preprocessed source (`max_threads` from `__launch_bounds__`).
#define KVSIM_ENTRY(NAME, MAX_THREADS)                                                          \
    {#NAME, ::kvsim::Sig<decltype(&NAME)>::n, ::kvsim::Sig<decltype(&NAME)>::kinds, MAX_THREADS, \
     &::kvsim::Sig<decltype(&NAME)>::invoke<&NAME>}
