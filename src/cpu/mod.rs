//! CPU backend: instruction-set detection and SIMD primitives.

pub mod isa;
pub mod simd;
