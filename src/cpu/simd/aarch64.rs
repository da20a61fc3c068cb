//! aarch64 Advanced SIMD (NEON, 128-bit) instantiation of [`Simd`] and its
//! `#[target_feature]` entry functions.
//!
//! The token [`V128`] is created only by the dispatcher in [`super`] for an
//! [`Isa::Neon`](crate::cpu::isa::Isa::Neon) value, i.e. after
//! `is_aarch64_feature_detected!("neon")`. bf16 is widened in registers
//! (`ushll #16`); f16 goes through `half` lane by lane (the f16 vector
//! intrinsics are not stable yet), and narrowing stores go through `half`.

use super::Simd;
use crate::dtype::{DType, Element};
use core::arch::aarch64::*;

/// Proof token: NEON is available on this CPU.
#[derive(Clone, Copy, Debug)]
pub(crate) struct V128(());

impl V128 {
    /// # Safety
    /// NEON must have been detected on the running CPU.
    #[inline(always)]
    pub(crate) unsafe fn new_unchecked() -> Self {
        V128(())
    }
}

impl Simd for V128 {
    type V = float32x4_t;
    const L: usize = 4;

    #[inline(always)]
    fn splat(self, x: f32) -> float32x4_t {
        // SAFETY: V128 proves NEON.
        unsafe { vdupq_n_f32(x) }
    }
    #[inline(always)]
    fn add(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: V128 proves NEON.
        unsafe { vaddq_f32(a, b) }
    }
    #[inline(always)]
    fn sub(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: V128 proves NEON.
        unsafe { vsubq_f32(a, b) }
    }
    #[inline(always)]
    fn mul(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: V128 proves NEON.
        unsafe { vmulq_f32(a, b) }
    }
    #[inline(always)]
    fn fma(self, a: float32x4_t, b: float32x4_t, c: float32x4_t) -> float32x4_t {
        // SAFETY: V128 proves NEON.
        unsafe { vfmaq_f32(c, a, b) }
    }
    #[inline(always)]
    fn max(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: V128 proves NEON. Same semantics as x86: a > b ? a : b.
        unsafe { vbslq_f32(vcgtq_f32(a, b), a, b) }
    }
    #[inline(always)]
    fn min(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: V128 proves NEON. Same semantics as x86: a < b ? a : b.
        unsafe { vbslq_f32(vcltq_f32(a, b), a, b) }
    }
    #[inline(always)]
    fn round(self, a: float32x4_t) -> float32x4_t {
        // SAFETY: V128 proves NEON.
        unsafe { vrndnq_f32(a) }
    }
    #[inline(always)]
    fn pow2i(self, n: float32x4_t) -> float32x4_t {
        // SAFETY: V128 proves NEON.
        unsafe {
            let e = vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127));
            vreinterpretq_f32_s32(vshlq_n_s32::<23>(e))
        }
    }
    #[inline(always)]
    fn gt_ones(self, a: float32x4_t, b: float32x4_t) -> float32x4_t {
        // SAFETY: V128 proves NEON.
        unsafe {
            let one = vreinterpretq_u32_f32(vdupq_n_f32(1.0));
            vreinterpretq_f32_u32(vandq_u32(vcgtq_f32(a, b), one))
        }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> float32x4_t {
        let s = &s[..4];
        // SAFETY: V128 proves NEON; `s` holds 4 f32.
        unsafe { vld1q_f32(s.as_ptr()) }
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: float32x4_t) {
        let s = &mut s[..4];
        // SAFETY: V128 proves NEON; `s` holds 4 f32.
        unsafe { vst1q_f32(s.as_mut_ptr(), v) }
    }
    #[inline(always)]
    fn load_t<T: Element>(self, s: &[T]) -> float32x4_t {
        match T::DTYPE {
            DType::F32 => self.load(bytemuck::cast_slice(s)),
            DType::BF16 => {
                let h: &[u16] = &bytemuck::cast_slice(s)[..4];
                // SAFETY: V128 proves NEON; `h` holds 4 u16.
                unsafe { vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(h.as_ptr()))) }
            }
            DType::F16 => {
                let s = &s[..4];
                let w = [s[0].to_f32(), s[1].to_f32(), s[2].to_f32(), s[3].to_f32()];
                self.load(&w)
            }
        }
    }
    #[inline(always)]
    fn store_t<T: Element>(self, s: &mut [T], v: float32x4_t) {
        match T::DTYPE {
            DType::F32 => self.store(bytemuck::cast_slice_mut(s), v),
            _ => {
                let mut w = [0.0f32; 4];
                self.store(&mut w, v);
                for (d, x) in s[..4].iter_mut().zip(w) {
                    *d = T::from_f32(x);
                }
            }
        }
    }
    #[inline(always)]
    fn reduce_add(self, v: float32x4_t) -> f32 {
        // SAFETY: V128 proves NEON.
        unsafe { vaddvq_f32(v) }
    }
    #[inline(always)]
    fn reduce_max(self, v: float32x4_t) -> f32 {
        // SAFETY: V128 proves NEON.
        unsafe { vmaxvq_f32(v) }
    }
}

/// NEON entry points (`#[target_feature]` instantiations).
pub(crate) mod neon {
    use super::V128;
    isa_entries!(V128, "neon");
}
