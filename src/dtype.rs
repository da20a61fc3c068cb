//! Storage dtypes and the [`Element`] trait.
//!
//! Buffers hold `f32`, `f16` or `bf16` values; every op accumulates in `f32`
//! (optimised backends) or `f64` (the reference). Conversion to and from the
//! accumulation type goes through [`Element`].

use half::{bf16, f16};
use std::fmt;

/// A storage dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE-754 binary32.
    F32,
    /// IEEE-754 binary16.
    F16,
    /// bfloat16 (8-bit exponent, 7-bit mantissa).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name used in kernel symbols (`<stem>_<dtype>`).
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// All storage dtypes, in a fixed order.
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A scalar that can be stored in a kvsieve buffer.
///
/// Implemented for `f32`, [`half::f16`] and [`half::bf16`]. `to_f32` is exact;
/// `from_f32` rounds to nearest even.
pub trait Element:
    bytemuck::Pod + Copy + Default + Send + Sync + fmt::Debug + PartialEq + 'static
{
    /// The dtype tag of this element type.
    const DTYPE: DType;
    /// Widen to `f32` (exact).
    fn to_f32(self) -> f32;
    /// Narrow from `f32` (round to nearest even).
    fn from_f32(x: f32) -> Self;
    /// Widen to `f64` (exact).
    fn to_f64(self) -> f64 {
        f64::from(self.to_f32())
    }
    /// Narrow from `f64` (through `f32` for the half types).
    fn from_f64(x: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        bf16::from_f32(x)
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_for_representable_values() {
        for x in [0.0f32, 1.0, -2.5, 0.125, 65504.0] {
            assert_eq!(f16::from_f32(x).to_f32(), x);
            assert_eq!(<f32 as Element>::from_f32(x), x);
        }
        assert_eq!(<bf16 as Element>::from_f32(1.5).to_f32(), 1.5);
        assert_eq!(DType::BF16.size(), 2);
        assert_eq!(DType::F16.to_string(), "f16");
    }
}
