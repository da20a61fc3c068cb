//! Scalar (one lane) instantiation of [`Simd`]: the portable fallback.
//!
//! The generic bodies in [`super`] run unchanged with a "vector" of one
//! `f32`. `fma` is *not* fused here (plain `a * b + c`), so results differ
//! from the vector ISAs in the last bits, but are deterministic.

use super::Simd;
use crate::dtype::Element;

/// Token for the scalar fallback (always valid).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Scalar;

impl Simd for Scalar {
    type V = f32;
    const L: usize = 1;

    #[inline(always)]
    fn splat(self, x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn add(self, a: f32, b: f32) -> f32 {
        a + b
    }
    #[inline(always)]
    fn sub(self, a: f32, b: f32) -> f32 {
        a - b
    }
    #[inline(always)]
    fn mul(self, a: f32, b: f32) -> f32 {
        a * b
    }
    #[inline(always)]
    fn fma(self, a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
    #[inline(always)]
    fn max(self, a: f32, b: f32) -> f32 {
        if a > b { a } else { b }
    }
    #[inline(always)]
    fn min(self, a: f32, b: f32) -> f32 {
        if a < b { a } else { b }
    }
    #[inline(always)]
    fn round(self, a: f32) -> f32 {
        // Round-to-nearest-even by the 1.5 * 2^23 trick (default FP
        // environment); exact for |a| < 2^22, the documented domain.
        const MAGIC: f32 = 12_582_912.0;
        (a + MAGIC) - MAGIC
    }
    #[inline(always)]
    fn pow2i(self, n: f32) -> f32 {
        f32::from_bits(((n as i32 + 127) as u32) << 23)
    }
    #[inline(always)]
    fn gt_ones(self, a: f32, b: f32) -> f32 {
        if a > b { 1.0 } else { 0.0 }
    }
    #[inline(always)]
    fn load(self, s: &[f32]) -> f32 {
        s[0]
    }
    #[inline(always)]
    fn store(self, s: &mut [f32], v: f32) {
        s[0] = v;
    }
    #[inline(always)]
    fn load_t<T: Element>(self, s: &[T]) -> f32 {
        s[0].to_f32()
    }
    #[inline(always)]
    fn store_t<T: Element>(self, s: &mut [T], v: f32) {
        s[0] = T::from_f32(v);
    }
    #[inline(always)]
    fn reduce_add(self, v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn reduce_max(self, v: f32) -> f32 {
        v
    }
}
