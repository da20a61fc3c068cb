//! x86-64 instantiations of [`Simd`]: AVX2+FMA+F16C (256-bit) and AVX-512F
//! (512-bit), plus their `#[target_feature]` entry functions.
//!
//! The tokens [`V256`] and [`V512`] can only be created through `unsafe`
//! `new_unchecked`, which the dispatcher in [`super`] calls only for an
//! [`Isa::Avx2`](crate::cpu::isa::Isa::Avx2) /
//! [`Isa::Avx512`](crate::cpu::isa::Isa::Avx512) value, i.e. after run-time
//! detection. Every intrinsic call below relies on that invariant.
//!
//! Storage conversion in registers: f16 through F16C `vcvtph2ps` /
//! `vcvtps2ph` (round to nearest even), bf16 by zero-extending to 32 bits and
//! shifting left by 16 (load) or by round-to-nearest-even on the bit pattern
//! with quiet-NaN preservation (store, bit-identical to `half::bf16::from_f32`).
//!
//! AVX-512-FP16 and AVX-512-BF16 are deliberately not used: their
//! conversions are the ones above (AVX-512F already has `vcvtph2ps` /
//! `vcvtps2ph` on 512 bits, and bf16 has no f32 widening instruction there;
//! the widening is one shift), while their arithmetic (`vfmadd*ph`,
//! `vdpbf16ps`) would accumulate in f16 or round the f32 queries to bf16,
//! breaking the f32-accumulation contract the reference is checked with. The
//! one instruction they would save, `vcvtneps2bf16`, only runs on outputs.

use super::Simd;
use crate::dtype::{DType, Element};
use core::arch::x86_64::*;

/// Prefetches every 64-byte line of `s` into L1 (both tokens).
#[inline(always)]
fn prefetch_lines<T>(s: &[T]) {
    let bytes = std::mem::size_of_val(s);
    let p = s.as_ptr().cast::<i8>();
    let mut at = 0;
    while at < bytes {
        // SAFETY: `_mm_prefetch` is a hint that never faults or reads
        // architecturally; the address lies inside `s` (SSE is part of the
        // x86-64 baseline).
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(at)) };
        at += 64;
    }
}

/// Proof token: AVX2, FMA and F16C are available on this CPU.
#[derive(Clone, Copy, Debug)]
pub(crate) struct V256(());

impl V256 {
    /// # Safety
    /// AVX2, FMA and F16C must have been detected on the running CPU.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        V256(())
    }
}

/// Proof token: AVX-512F, AVX2, FMA and F16C are available on this CPU.
#[derive(Clone, Copy, Debug)]
pub(crate) struct V512(());

impl V512 {
    /// # Safety
    /// AVX-512F, AVX2, FMA and F16C must have been detected on the running CPU.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        V512(())
    }
}

// Every `unsafe` block in the `V256` impl: "SAFETY: `self: V256` proves
// AVX2+FMA+F16C were detected (see `V256::new_unchecked`); pointer accesses
// stay inside the slice, whose length was checked by the `[..8]` reslice".
impl Simd for V256 {
    type V = __m256;
    const L: usize = 8;

    #[inline(always)]
    fn splat(self, x: f32) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe { _mm256_set1_ps(x) }
    }
    #[inline(always)]
    fn add(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe { _mm256_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe { _mm256_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe { _mm256_mul_ps(a, b) }
    }
    #[inline(always)]
    fn fma(self, a: __m256, b: __m256, c: __m256) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe { _mm256_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn max(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C. (vmaxps: a > b ? a : b)
        unsafe { _mm256_max_ps(a, b) }
    }
    #[inline(always)]
    fn min(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C. (vminps: a < b ? a : b)
        unsafe { _mm256_min_ps(a, b) }
    }
    #[inline(always)]
    fn round(self, a: __m256) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe { _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
    }
    #[inline(always)]
    fn pow2i(self, n: __m256) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe {
            let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
        }
    }
    #[inline(always)]
    fn gt_ones(self, a: __m256, b: __m256) -> __m256 {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe { _mm256_and_ps(_mm256_cmp_ps::<_CMP_GT_OQ>(a, b), _mm256_set1_ps(1.0)) }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> __m256 {
        let s = &s[..8];
        // SAFETY: V256 proves AVX2+FMA+F16C; `s` holds 8 f32, loadu is unaligned.
        unsafe { _mm256_loadu_ps(s.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: __m256) {
        let s = &mut s[..8];
        // SAFETY: V256 proves AVX2+FMA+F16C; `s` holds 8 f32, storeu is unaligned.
        unsafe { _mm256_storeu_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn load_t<T: Element>(self, s: &[T]) -> __m256 {
        match T::DTYPE {
            DType::F32 => self.load(bytemuck::cast_slice(s)),
            DType::F16 => {
                let h: &[u16] = &bytemuck::cast_slice(s)[..8];
                // SAFETY: V256 proves AVX2+FMA+F16C; `h` holds 8 u16 (16 bytes).
                unsafe { _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().cast())) }
            }
            DType::BF16 => {
                let h: &[u16] = &bytemuck::cast_slice(s)[..8];
                // SAFETY: V256 proves AVX2+FMA+F16C; `h` holds 8 u16 (16 bytes).
                unsafe {
                    let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(h.as_ptr().cast()));
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
                }
            }
        }
    }
    #[inline(always)]
    fn store_t<T: Element>(self, s: &mut [T], v: __m256) {
        match T::DTYPE {
            DType::F32 => self.store(bytemuck::cast_slice_mut(s), v),
            DType::F16 => {
                let h: &mut [u16] = &mut bytemuck::cast_slice_mut(s)[..8];
                // SAFETY: V256 proves AVX2+FMA+F16C; `h` holds 8 u16 (16 bytes).
                unsafe {
                    let p = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                    _mm_storeu_si128(h.as_mut_ptr().cast(), p);
                }
            }
            DType::BF16 => {
                let h: &mut [u16] = &mut bytemuck::cast_slice_mut(s)[..8];
                // SAFETY: V256 proves AVX2+FMA+F16C; `h` holds 8 u16 (16 bytes).
                unsafe {
                    let bits = _mm256_castps_si256(v);
                    let top = _mm256_srli_epi32::<16>(bits);
                    let lsb = _mm256_and_si256(top, _mm256_set1_epi32(1));
                    let bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb);
                    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, bias));
                    let qnan = _mm256_or_si256(top, _mm256_set1_epi32(0x40));
                    let isnan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
                    let r = _mm256_blendv_epi8(rounded, qnan, isnan);
                    // Values are < 2^16, so the signed->unsigned saturation is a no-op.
                    let packed = _mm256_packus_epi32(r, r);
                    let packed = _mm256_permute4x64_epi64::<0b00_00_10_00>(packed);
                    _mm_storeu_si128(h.as_mut_ptr().cast(), _mm256_castsi256_si128(packed));
                }
            }
        }
    }
    #[inline(always)]
    fn reduce_add(self, v: __m256) -> f32 {
        // Order ((v0+v1)+(v2+v3)) + ((v4+v5)+(v6+v7)), identical to
        // `reduce_add4`, so a head's dot does not depend on its block size.
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe {
            let t = _mm256_add_ps(v, _mm256_permute_ps::<0b10_11_00_01>(v));
            let u = _mm256_add_ps(t, _mm256_permute_ps::<0b01_00_11_10>(t));
            let r = _mm_add_ss(_mm256_castps256_ps128(u), _mm256_extractf128_ps::<1>(u));
            _mm_cvtss_f32(r)
        }
    }
    #[inline(always)]
    fn reduce_add4(self, v: [__m256; 4]) -> [f32; 4] {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe {
            let ab = _mm256_hadd_ps(v[0], v[1]);
            let cd = _mm256_hadd_ps(v[2], v[3]);
            let abcd = _mm256_hadd_ps(ab, cd);
            let r = _mm_add_ps(
                _mm256_castps256_ps128(abcd),
                _mm256_extractf128_ps::<1>(abcd),
            );
            let mut out = [0.0f32; 4];
            _mm_storeu_ps(out.as_mut_ptr(), r);
            out
        }
    }
    #[inline(always)]
    fn prefetch<T>(self, s: &[T]) {
        prefetch_lines(s)
    }
    #[inline(always)]
    fn reduce_max(self, v: __m256) -> f32 {
        // SAFETY: V256 proves AVX2+FMA+F16C.
        unsafe {
            let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
    }
}

impl Simd for V512 {
    type V = __m512;
    const L: usize = 16;

    #[inline(always)]
    fn splat(self, x: f32) -> __m512 {
        // SAFETY: V512 proves AVX-512F.
        unsafe { _mm512_set1_ps(x) }
    }
    #[inline(always)]
    fn add(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: V512 proves AVX-512F.
        unsafe { _mm512_add_ps(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: V512 proves AVX-512F.
        unsafe { _mm512_sub_ps(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: V512 proves AVX-512F.
        unsafe { _mm512_mul_ps(a, b) }
    }
    #[inline(always)]
    fn fma(self, a: __m512, b: __m512, c: __m512) -> __m512 {
        // SAFETY: V512 proves AVX-512F.
        unsafe { _mm512_fmadd_ps(a, b, c) }
    }
    #[inline(always)]
    fn max(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: V512 proves AVX-512F. (vmaxps: a > b ? a : b)
        unsafe { _mm512_max_ps(a, b) }
    }
    #[inline(always)]
    fn min(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: V512 proves AVX-512F. (vminps: a < b ? a : b)
        unsafe { _mm512_min_ps(a, b) }
    }
    #[inline(always)]
    fn round(self, a: __m512) -> __m512 {
        // SAFETY: V512 proves AVX-512F.
        unsafe { _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(a) }
    }
    #[inline(always)]
    fn pow2i(self, n: __m512) -> __m512 {
        // SAFETY: V512 proves AVX-512F.
        unsafe {
            let e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(e))
        }
    }
    #[inline(always)]
    fn gt_ones(self, a: __m512, b: __m512) -> __m512 {
        // SAFETY: V512 proves AVX-512F.
        unsafe {
            let m = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b);
            _mm512_maskz_mov_ps(m, _mm512_set1_ps(1.0))
        }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> __m512 {
        let s = &s[..16];
        // SAFETY: V512 proves AVX-512F; `s` holds 16 f32, loadu is unaligned.
        unsafe { _mm512_loadu_ps(s.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: __m512) {
        let s = &mut s[..16];
        // SAFETY: V512 proves AVX-512F; `s` holds 16 f32, storeu is unaligned.
        unsafe { _mm512_storeu_ps(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn load_t<T: Element>(self, s: &[T]) -> __m512 {
        match T::DTYPE {
            DType::F32 => self.load(bytemuck::cast_slice(s)),
            DType::F16 => {
                let h: &[u16] = &bytemuck::cast_slice(s)[..16];
                // SAFETY: V512 proves AVX-512F; `h` holds 16 u16 (32 bytes).
                unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr().cast())) }
            }
            DType::BF16 => {
                let h: &[u16] = &bytemuck::cast_slice(s)[..16];
                // SAFETY: V512 proves AVX-512F; `h` holds 16 u16 (32 bytes).
                unsafe {
                    let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(h.as_ptr().cast()));
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(w))
                }
            }
        }
    }
    #[inline(always)]
    fn store_t<T: Element>(self, s: &mut [T], v: __m512) {
        match T::DTYPE {
            DType::F32 => self.store(bytemuck::cast_slice_mut(s), v),
            DType::F16 => {
                let h: &mut [u16] = &mut bytemuck::cast_slice_mut(s)[..16];
                // SAFETY: V512 proves AVX-512F; `h` holds 16 u16 (32 bytes).
                unsafe {
                    let p = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
                    _mm256_storeu_si256(h.as_mut_ptr().cast(), p);
                }
            }
            DType::BF16 => {
                let h: &mut [u16] = &mut bytemuck::cast_slice_mut(s)[..16];
                // SAFETY: V512 proves AVX-512F; `h` holds 16 u16 (32 bytes).
                unsafe {
                    let bits = _mm512_castps_si512(v);
                    let top = _mm512_srli_epi32::<16>(bits);
                    let lsb = _mm512_and_si512(top, _mm512_set1_epi32(1));
                    let bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb);
                    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(bits, bias));
                    let qnan = _mm512_or_si512(top, _mm512_set1_epi32(0x40));
                    let isnan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                    let r = _mm512_mask_blend_epi32(isnan, rounded, qnan);
                    _mm256_storeu_si256(h.as_mut_ptr().cast(), _mm512_cvtepi32_epi16(r));
                }
            }
        }
    }
    #[inline(always)]
    fn reduce_add(self, v: __m512) -> f32 {
        // SAFETY: V512 proves AVX-512F (and AVX2 for the 256-bit half).
        unsafe {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            V256::new_unchecked().reduce_add(_mm256_add_ps(lo, hi))
        }
    }
    #[inline(always)]
    fn reduce_add4(self, v: [__m512; 4]) -> [f32; 4] {
        // Fold 512 -> 256 exactly as `reduce_add` does, then the 256-bit
        // transposed reduction (same per-lane order as `reduce_add`).
        // SAFETY: V512 proves AVX-512F (and AVX2 for the 256-bit half).
        unsafe {
            let fold = |x: __m512| {
                let lo = _mm512_castps512_ps256(x);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)));
                _mm256_add_ps(lo, hi)
            };
            V256::new_unchecked().reduce_add4([fold(v[0]), fold(v[1]), fold(v[2]), fold(v[3])])
        }
    }
    #[inline(always)]
    fn prefetch<T>(self, s: &[T]) {
        prefetch_lines(s)
    }
    #[inline(always)]
    fn reduce_max(self, v: __m512) -> f32 {
        // SAFETY: V512 proves AVX-512F (and AVX2 for the 256-bit half).
        unsafe {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            V256::new_unchecked().reduce_max(_mm256_max_ps(lo, hi))
        }
    }
}

/// AVX2+FMA+F16C entry points (`#[target_feature]` instantiations).
pub(crate) mod avx2 {
    use super::V256;
    isa_entries!(V256, "avx2,fma,f16c");
}

/// AVX-512F entry points (`#[target_feature]` instantiations).
pub(crate) mod avx512 {
    use super::V512;
    isa_entries!(V512, "avx512f,avx2,fma,f16c");
}
