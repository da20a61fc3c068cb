//! Run-time dispatched SIMD primitives for the CPU backend.
//!
//! Every hot loop is written **once**, as an `#[inline(always)]` generic body
//! over the small internal vector trait `Simd` (module `body`). Each ISA
//! provides a zero-sized token implementing `Simd` (scalar: one `f32` lane;
//! AVX2: `__m256`; AVX-512: `__m512`; NEON: `float32x4_t`) and instantiates
//! the bodies inside `#[target_feature]` entry functions (`isa_entries!`), so
//! the intrinsics are inlined with the right features enabled. The public
//! functions here are safe, take an [`Isa`] (a proof that its features were
//! detected) and dispatch on it.
//!
//! Storage is generic over [`Element`] (`f32`, `f16`, `bf16`), converted to
//! `f32` in registers; all accumulation is in `f32`.
//!
//! # Conventions
//!
//! * `d` is a head dimension, `g` a number of query heads sharing one KV row
//!   (GQA group), `n` a number of KV rows. Matrices are row-major.
//! * Any length works (tails are handled by zero/-inf padded partial vectors),
//!   including `d` that is not a multiple of the vector width.
//! * Preconditions on slice lengths are stated per function and checked with
//!   `debug_assert!`; inputs that are *longer* than needed are fine (only the
//!   prefix is used). Violating them never causes UB; it may panic on a slice
//!   index or leave outputs partially written.
//! * Results are bitwise deterministic for a given [`Isa`] (fixed reduction
//!   order, no threading). Different ISAs differ in the last bits (vector
//!   width changes the summation order; the scalar path does not fuse
//!   multiply-adds).
//! * Accuracy: sums/dots carry the usual f32 error, bounded in tests by
//!   `1e-5 * sum |terms|` against an f64 reference (see the tests).

use crate::cpu::isa::Isa;
use crate::dtype::Element;

/// Internal vector abstraction (pulp-style). Implemented by zero-sized tokens
/// whose existence proves the ISA is available. All methods are
/// `#[inline(always)]` so they are inlined into `#[target_feature]` entries.
pub(crate) trait Simd: Copy {
    /// Vector of `L` `f32` lanes.
    type V: Copy;
    /// Lanes per vector (at most 16).
    const L: usize;

    fn splat(self, x: f32) -> Self::V;
    fn add(self, a: Self::V, b: Self::V) -> Self::V;
    fn sub(self, a: Self::V, b: Self::V) -> Self::V;
    fn mul(self, a: Self::V, b: Self::V) -> Self::V;
    /// `a * b + c` (fused on vector ISAs, unfused on scalar).
    fn fma(self, a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    /// Lane-wise `if a > b { a } else { b }` (so a NaN in `b` propagates).
    fn max(self, a: Self::V, b: Self::V) -> Self::V;
    /// Lane-wise `if a < b { a } else { b }` (so a NaN in `b` propagates).
    fn min(self, a: Self::V, b: Self::V) -> Self::V;
    /// Round to nearest, ties to even. Domain: |a| < 2^22.
    fn round(self, a: Self::V) -> Self::V;
    /// `2^n` for integral `n` in `[-126, 127]`.
    fn pow2i(self, n: Self::V) -> Self::V;
    /// Lane-wise `if a > b { 1.0 } else { 0.0 }`.
    fn gt_ones(self, a: Self::V, b: Self::V) -> Self::V;
    /// Load the first `L` values of `s` (panics if `s.len() < L`).
    fn load(self, s: &[f32]) -> Self::V;
    /// Store into the first `L` values of `s` (panics if `s.len() < L`).
    fn store(self, s: &mut [f32], v: Self::V);
    /// Load and widen the first `L` elements of `s` (panics if shorter).
    fn load_t<T: Element>(self, s: &[T]) -> Self::V;
    /// Narrow (round to nearest even) into the first `L` elements of `s`.
    fn store_t<T: Element>(self, s: &mut [T], v: Self::V);
    /// Horizontal sum in a fixed order.
    fn reduce_add(self, v: Self::V) -> f32;
    /// Four horizontal sums; lane order must equal `reduce_add`'s for each.
    #[inline(always)]
    fn reduce_add4(self, v: [Self::V; 4]) -> [f32; 4] {
        [
            self.reduce_add(v[0]),
            self.reduce_add(v[1]),
            self.reduce_add(v[2]),
            self.reduce_add(v[3]),
        ]
    }
    /// Horizontal max in a fixed order.
    fn reduce_max(self, v: Self::V) -> f32;
    /// Hint that every cache line of `s` will be read soon (no-op by default).
    #[inline(always)]
    fn prefetch<T>(self, s: &[T]) {
        let _ = s;
    }

    /// Load `s.len() < L` elements, padding the other lanes with `fill`.
    #[inline(always)]
    fn load_part<T: Element>(self, s: &[T], fill: f32) -> Self::V {
        let mut buf = [T::from_f32(fill); 16];
        buf[..s.len()].copy_from_slice(s);
        self.load_t(&buf[..Self::L])
    }
    /// Store the first `s.len() < L` lanes of `v` into `s`.
    #[inline(always)]
    fn store_part<T: Element>(self, s: &mut [T], v: Self::V) {
        let mut buf = [T::default(); 16];
        self.store_t(&mut buf[..Self::L], v);
        let n = s.len();
        s.copy_from_slice(&buf[..n]);
    }
    /// Zero the lanes `k..L` of `v`.
    #[inline(always)]
    fn keep_first(self, v: Self::V, k: usize) -> Self::V {
        let mut buf = [0.0f32; 16];
        self.store(&mut buf[..Self::L], v);
        buf[k..Self::L].fill(0.0);
        self.load(&buf[..Self::L])
    }
    /// Apply a scalar function lane by lane (slow path).
    #[inline(always)]
    fn map_lanes(self, v: Self::V, f: impl Fn(f32) -> f32) -> Self::V {
        let mut buf = [0.0f32; 16];
        self.store(&mut buf[..Self::L], v);
        for x in &mut buf[..Self::L] {
            *x = f(*x);
        }
        self.load(&buf[..Self::L])
    }
}

/// Instantiate every body for one ISA token inside `#[target_feature]`
/// functions. The generated functions are safe to *define*; calling them
/// requires the features, which the caller guarantees by holding the token.
macro_rules! isa_entries {
    ($tok:ty $(, $feat:literal)?) => {
        #[allow(unused_imports)]
        use $crate::cpu::simd::{PowMode, body};
        #[allow(unused_imports)]
        use $crate::dtype::Element;

        $(#[target_feature(enable = $feat)])?
        pub(crate) fn dot_multi<T: Element>(
            s: $tok,
            qs: &[f32],
            g: usize,
            row: &[T],
            out: &mut [f32],
        ) {
            body::dot_multi(s, qs, g, row, out)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn scores_rows<T: Element>(
            s: $tok,
            qs: &[f32],
            g: usize,
            rows: &[T],
            d: usize,
            scale: f32,
            out: &mut [f32],
        ) {
            body::scores_rows(s, qs, g, rows, d, scale, out)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn axpy_multi<T: Element>(
            s: $tok,
            acc: &mut [f32],
            g: usize,
            ps: &[f32],
            row: &[T],
        ) {
            body::axpy_multi(s, acc, g, ps, row)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn weighted_rows<T: Element>(
            s: $tok,
            acc: &mut [f32],
            g: usize,
            p: &[f32],
            rows: &[T],
            d: usize,
        ) {
            body::weighted_rows(s, acc, g, p, rows, d)
        }
        $(#[target_feature(enable = $feat)])?
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn scores_rows_strided<T: Element>(
            s: $tok,
            qs: &[f32],
            g: usize,
            rows: &[T],
            d: usize,
            scale: f32,
            out: &mut [f32],
            stride: usize,
        ) {
            body::scores_core::<_, T, { body::RUNS_PREFETCH_BYTES }>(s, qs, g, rows.len() / d, d, |j| &rows[j * d..(j + 1) * d], scale, out, stride)
        }
        $(#[target_feature(enable = $feat)])?
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn scores_gather<T: Element>(
            s: $tok,
            qs: &[f32],
            g: usize,
            src: &[T],
            d: usize,
            base: usize,
            idx: &[u32],
            scale: f32,
            out: &mut [f32],
            stride: usize,
        ) {
            body::scores_core::<_, T, { body::PREFETCH_BYTES }>(
                s,
                qs,
                g,
                idx.len(),
                d,
                |j| &src[(base + idx[j] as usize) * d..(base + idx[j] as usize + 1) * d],
                scale,
                out,
                stride,
            )
        }
        $(#[target_feature(enable = $feat)])?
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn scores_gather_runs<T: Element>(
            s: $tok,
            qs: &[f32],
            g: usize,
            src: &[T],
            d: usize,
            idx: &[u32],
            scale: f32,
            out: &mut [f32],
            stride: usize,
        ) {
            body::scores_core::<_, T, { body::RUNS_PREFETCH_BYTES }>(
                s,
                qs,
                g,
                idx.len(),
                d,
                |j| &src[idx[j] as usize * d..(idx[j] as usize + 1) * d],
                scale,
                out,
                stride,
            )
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn weighted_rows_strided<T: Element>(
            s: $tok,
            acc: &mut [f32],
            g: usize,
            p: &[f32],
            p_stride: usize,
            rows: &[T],
            d: usize,
        ) {
            body::weighted_core::<_, T, 0>(s, acc, g, p, p_stride, rows.len() / d, d, |j| &rows[j * d..(j + 1) * d])
        }
        $(#[target_feature(enable = $feat)])?
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn weighted_gather<T: Element>(
            s: $tok,
            acc: &mut [f32],
            g: usize,
            p: &[f32],
            p_stride: usize,
            src: &[T],
            d: usize,
            base: usize,
            idx: &[u32],
        ) {
            body::weighted_core::<_, T, { body::PREFETCH_BYTES }>(s, acc, g, p, p_stride, idx.len(), d, |j| {
                &src[(base + idx[j] as usize) * d..(base + idx[j] as usize + 1) * d]
            })
        }
        $(#[target_feature(enable = $feat)])?
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn weighted_gather_runs<T: Element>(
            s: $tok,
            acc: &mut [f32],
            g: usize,
            p: &[f32],
            p_stride: usize,
            src: &[T],
            d: usize,
            idx: &[u32],
        ) {
            body::weighted_core::<_, T, { body::RUNS_PREFETCH_BYTES }>(s, acc, g, p, p_stride, idx.len(), d, |j| {
                &src[idx[j] as usize * d..(idx[j] as usize + 1) * d]
            })
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn pow_relu_apply(s: $tok, x: &mut [f32], tau: f32, mode: PowMode) -> f32 {
            body::pow_relu_apply(s, x, tau, mode)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn shift_select(
            s: $tok,
            x: &mut [f32],
            m: f32,
            a: f32,
            lo: f32,
            cand: &mut [f32],
        ) -> (usize, usize, bool) {
            body::shift_select(s, x, m, a, lo, cand)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn max_f32(s: $tok, x: &[f32]) -> f32 {
            body::max_f32(s, x)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn exp_sum(s: $tok, x: &mut [f32], shift: f32) -> f32 {
            body::exp_sum(s, x, shift)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn scale_f32(s: $tok, x: &mut [f32], a: f32) {
            body::scale_f32(s, x, a)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn offset_f32(s: $tok, x: &mut [f32], c: f32) {
            body::offset_f32(s, x, c)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn count_above(s: $tok, x: &[f32], tau: f32) -> usize {
            body::count_above(s, x, tau)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn all_finite(s: $tok, x: &[f32]) -> bool {
            body::all_finite(s, x)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn sum_checked_f64(_s: $tok, x: &[f64]) -> (f64, bool) {
            body::sum_checked_f64(x)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn caote_mask(
            _s: $tok,
            arr: &[u32],
            lo_a: u32,
            hi_a: u32,
            lo2: &mut [f64],
            hi2: &mut [f64],
        ) -> usize {
            body::caote_mask(arr, lo_a, hi_a, lo2, hi2)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn add_widened(_s: $tok, acc: &mut [f64], x: &[f32]) {
            body::add_widened(acc, x)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn candidate_scan(
            _s: $tok,
            arr: &[u32],
            lo_a: u32,
            hi_a: u32,
            new_from: u32,
            new_rows: &mut Vec<u32>,
        ) -> usize {
            body::candidate_scan(arr, lo_a, hi_a, new_from, new_rows)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn min_f64(_s: $tok, x: &[f64]) -> f64 {
            body::min_f64(x)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn caote_bounds(
            _s: $tok,
            b: $crate::cpu::simd::CaoteBounds<'_>,
            lo2: &mut [f64],
            hi2: &mut [f64],
        ) {
            body::caote_bounds(b, lo2, hi2)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn pow_relu_sum(s: $tok, x: &[f32], tau: f32, mode: PowMode) -> (f32, f32, f32) {
            body::pow_relu_sum(s, x, tau, mode)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn to_f32_slice<T: Element>(s: $tok, src: &[T], dst: &mut [f32]) {
            body::to_f32_slice(s, src, dst)
        }
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn from_f32_slice<T: Element>(s: $tok, src: &[f32], dst: &mut [T]) {
            body::from_f32_slice(s, src, dst)
        }
        #[cfg(test)]
        $(#[target_feature(enable = $feat)])?
        pub(crate) fn exp_slice(s: $tok, x: &mut [f32]) {
            body::exp_slice(s, x)
        }
    };
}

#[cfg(target_arch = "aarch64")]
mod aarch64;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Scalar entry points (no target features needed).
mod scalar_entries {
    use super::scalar::Scalar;
    isa_entries!(Scalar);
}

/// Call `$f` for the ISA `$isa`: the `#[target_feature]` entry of the vector
/// ISAs, the scalar body otherwise.
macro_rules! dispatch {
    ($isa:expr, $f:ident($($a:expr),* $(,)?)) => {{
        match $isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512(_) => {
                // SAFETY: an `Isa::Avx512` carries a `Detected` witness, which
                // `isa` mints only after `is_x86_feature_detected!` confirmed
                // avx512f, avx2, fma and f16c: exactly the features the entry
                // function enables and the `V512` token asserts.
                unsafe { x86::avx512::$f(x86::V512::new_unchecked(), $($a),*) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2(_) => {
                // SAFETY: an `Isa::Avx2` carries a `Detected` witness, which
                // `isa` mints only after `is_x86_feature_detected!` confirmed
                // avx2, fma and f16c: exactly the features the entry function
                // enables and the `V256` token asserts.
                unsafe { x86::avx2::$f(x86::V256::new_unchecked(), $($a),*) }
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon(_) => {
                // SAFETY: an `Isa::Neon` carries a `Detected` witness, which
                // `isa` mints only after `is_aarch64_feature_detected!("neon")`
                // returned true: the feature the entry function enables.
                unsafe { aarch64::neon::$f(aarch64::V128::new_unchecked(), $($a),*) }
            }
            // `Scalar`, and variants of other architectures (which cannot be
            // constructed here, as their witness is never minted).
            _ => scalar_entries::$f(scalar::Scalar, $($a),*),
        }
    }};
}

/// Exponent selection for [`pow_relu_sum`] (alpha-entmax threshold search).
///
/// With `z_i = max(x_i - tau, 0)` and `e = 1 / (alpha - 1)`, the sums are
/// `(Σ z^e, Σ z^(e-1), #{z > 0})`, every sum taken over `z_i > 0` only.
/// Callers pre-scale `x` by `alpha - 1` (entmax: `p_i = z_i^e`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PowMode {
    /// alpha = 1.5, e = 2: `(Σ z², Σ z, count)`. Fully vectorised.
    Alpha15,
    /// alpha = 2 (sparsemax), e = 1: `(Σ z, count, count)`. Fully vectorised.
    Alpha2,
    /// Any alpha > 1 with `e = 1 / (alpha - 1)` stored here:
    /// `(Σ z^e, Σ z^(e-1), count)`. Powers are computed lane by lane with
    /// `f32::powf` (exp2/log2 in libm), so this path is slower.
    General(f32),
}

impl PowMode {
    /// The mode for `alpha` (> 1): the fast paths for exactly 1.5 and 2.
    pub fn for_alpha(alpha: f32) -> PowMode {
        debug_assert!(alpha > 1.0, "entmax alpha must be > 1");
        if alpha == 1.5 {
            PowMode::Alpha15
        } else if alpha == 2.0 {
            PowMode::Alpha2
        } else {
            PowMode::General(1.0 / (alpha - 1.0))
        }
    }
}

/// Dot products of `g` query heads with one K row (the row is read once).
///
/// `out[i] = Σ_k qs[i*d + k] * row[k]` for `i < g`, with `d = row.len()`.
/// Shapes: `qs: [g, d]` (f32), `row: [d]`, `out: [g]`.
/// Preconditions: `qs.len() >= g * d`, `out.len() >= g`.
pub fn dot_multi<T: Element>(isa: Isa, qs: &[f32], g: usize, row: &[T], out: &mut [f32]) {
    debug_assert!(qs.len() >= g * row.len(), "qs shorter than g*d");
    debug_assert!(out.len() >= g, "out shorter than g");
    dispatch!(isa, dot_multi(qs, g, row, out))
}

/// Scaled scores of `g` query heads against `n = rows.len() / d` K rows.
///
/// `out[i*n + j] = scale * Σ_k qs[i*d + k] * rows[j*d + k]`.
/// Shapes: `qs: [g, d]`, `rows: [n, d]`, `out: [g, n]`. Each K row is read
/// from memory once for all `g` heads.
/// Preconditions: `d > 0` (else nothing is written), `rows.len() % d == 0`
/// (a trailing partial row is ignored), `qs.len() >= g * d`,
/// `out.len() >= g * n`.
pub fn scores_rows<T: Element>(
    isa: Isa,
    qs: &[f32],
    g: usize,
    rows: &[T],
    d: usize,
    scale: f32,
    out: &mut [f32],
) {
    debug_assert!(d > 0, "d must be positive");
    debug_assert!(
        rows.len().is_multiple_of(d),
        "rows.len() not a multiple of d"
    );
    debug_assert!(qs.len() >= g * d, "qs shorter than g*d");
    debug_assert!(
        d == 0 || out.len() >= g * (rows.len() / d),
        "out shorter than g*n"
    );
    dispatch!(isa, scores_rows(qs, g, rows, d, scale, out))
}

/// Maximum of `x` (`-inf` for an empty slice). NaNs are not propagated
/// reliably (the result for inputs containing NaN is unspecified but
/// deterministic).
pub fn max_f32(isa: Isa, x: &[f32]) -> f32 {
    dispatch!(isa, max_f32(x))
}

/// In place `x[i] = exp(x[i] - shift)`; returns `Σ x[i]` (f32 accumulation,
/// lane-parallel partial sums).
///
/// The exponential: Cody–Waite reduction `x = n ln2 + r` (`|r| <= ln2/2`),
/// degree-7 Taylor polynomial for `e^r` by Horner (FMA on vector ISAs), and
/// scaling by `2^n` in two steps so results in the subnormal range are rounded
/// once. Accuracy: the tests require ≤ 2 ulp against the correctly rounded
/// `exp` over the whole range `[-104.5, 89.5]` (subnormal results included,
/// counted in subnormal steps) on every ISA; the measured maximum is 1 ulp. Exact special cases: `exp(0) = 1`,
/// `exp(-inf) = 0` (any argument below ~-103.97 gives `+0`), arguments above
/// `ln(f32::MAX)` give `+inf`, NaN stays NaN.
pub fn exp_sum(isa: Isa, x: &mut [f32], shift: f32) -> f32 {
    dispatch!(isa, exp_sum(x, shift))
}

/// In place `x[i] *= a`.
pub fn scale_f32(isa: Isa, x: &mut [f32], a: f32) {
    dispatch!(isa, scale_f32(x, a))
}

/// Accumulate one V row into `g` head accumulators (the row is read once).
///
/// `acc[i*d + k] += ps[i] * row[k]` for `i < g`, `k < d = row.len()`.
/// Shapes: `acc: [g, d]`, `ps: [g]`, `row: [d]`.
/// Preconditions: `acc.len() >= g * d`, `ps.len() >= g`.
pub fn axpy_multi<T: Element>(isa: Isa, acc: &mut [f32], g: usize, ps: &[f32], row: &[T]) {
    debug_assert!(acc.len() >= g * row.len(), "acc shorter than g*d");
    debug_assert!(ps.len() >= g, "ps shorter than g");
    dispatch!(isa, axpy_multi(acc, g, ps, row))
}

/// Probability-weighted sum of V rows for `g` heads, skipping zero rows.
///
/// With `n = rows.len() / d`: `acc[i*d + k] += Σ_j p[i*n + j] * rows[j*d + k]`.
/// Row `j` is not read at all when `p[i*n + j] == 0` for every head `i`
/// (sparse entmax / sparsemax weights). Rows are accumulated in order `j`.
/// Shapes: `acc: [g, d]`, `p: [g, n]`, `rows: [n, d]`.
/// Preconditions: `d > 0` (else nothing happens), `rows.len() % d == 0`,
/// `p.len() >= g * n`, `acc.len() >= g * d`.
pub fn weighted_rows<T: Element>(
    isa: Isa,
    acc: &mut [f32],
    g: usize,
    p: &[f32],
    rows: &[T],
    d: usize,
) {
    debug_assert!(d > 0, "d must be positive");
    debug_assert!(
        rows.len().is_multiple_of(d),
        "rows.len() not a multiple of d"
    );
    debug_assert!(
        d == 0 || p.len() >= g * (rows.len() / d),
        "p shorter than g*n"
    );
    debug_assert!(acc.len() >= g * d, "acc shorter than g*d");
    dispatch!(isa, weighted_rows(acc, g, p, rows, d))
}

/// [`scores_rows`] writing column `j` of head `i` at `out[i*stride + j]`.
///
/// `out[i*stride + j] = scale * Σ_k qs[i*d + k] * rows[j*d + k]` for
/// `j < n = rows.len() / d`. Each dot equals the one [`scores_rows`] and
/// [`scores_gather`] compute for the same row (same order of operations).
/// Preconditions: `d > 0`, `qs.len() >= g*d`, `stride >= n`,
/// `out.len() >= (g-1)*stride + n`.
#[allow(clippy::too_many_arguments)]
pub fn scores_rows_strided<T: Element>(
    isa: Isa,
    qs: &[f32],
    g: usize,
    rows: &[T],
    d: usize,
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    debug_assert!(d > 0, "d must be positive");
    if d == 0 {
        return;
    }
    dispatch!(isa, scores_rows_strided(qs, g, rows, d, scale, out, stride))
}

/// Scores of `g` heads against the rows `base + idx[j]` of `src: [rows, d]`
/// (gathered, no copy): `out[i*stride + j] = scale * q_i · src[base + idx[j]]`.
/// Preconditions as [`scores_rows_strided`] with `n = idx.len()`, and every
/// `base + idx[j]` a row of `src`.
#[allow(clippy::too_many_arguments)]
pub fn scores_gather<T: Element>(
    isa: Isa,
    qs: &[f32],
    g: usize,
    src: &[T],
    d: usize,
    base: usize,
    idx: &[u32],
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    debug_assert!(d > 0, "d must be positive");
    if d == 0 {
        return;
    }
    dispatch!(
        isa,
        scores_gather(qs, g, src, d, base, idx, scale, out, stride)
    )
}

/// [`weighted_rows`] with weights `p[i*p_stride + j]` (a column block of a
/// wider matrix): `acc[i*d + k] += Σ_j p[i*p_stride + j] * rows[j*d + k]`,
/// skipping rows whose weight is zero for every head. Bitwise equal to
/// [`weighted_rows`] / [`weighted_gather`] on the same rows and weights.
/// Preconditions: `d > 0`, `acc.len() >= g*d`, `p_stride >= n`.
pub fn weighted_rows_strided<T: Element>(
    isa: Isa,
    acc: &mut [f32],
    g: usize,
    p: &[f32],
    p_stride: usize,
    rows: &[T],
    d: usize,
) {
    debug_assert!(d > 0, "d must be positive");
    if d == 0 {
        return;
    }
    dispatch!(isa, weighted_rows_strided(acc, g, p, p_stride, rows, d))
}

/// [`weighted_rows_strided`] over the gathered rows `base + idx[j]` of
/// `src: [rows, d]`: `acc[i*d + k] += Σ_j p[i*p_stride + j] * src[(base + idx[j])*d + k]`.
/// A row whose weight is zero for every head is never read.
#[allow(clippy::too_many_arguments)]
pub fn weighted_gather<T: Element>(
    isa: Isa,
    acc: &mut [f32],
    g: usize,
    p: &[f32],
    p_stride: usize,
    src: &[T],
    d: usize,
    base: usize,
    idx: &[u32],
) {
    debug_assert!(d > 0, "d must be positive");
    if d == 0 {
        return;
    }
    dispatch!(isa, weighted_gather(acc, g, p, p_stride, src, d, base, idx))
}

/// [`scores_gather`] over rows `src[idx[j]]` that come in runs of
/// consecutive rows (the pages of paged KV): the same scores, bitwise, with
/// a prefetch distance for runs (8 KiB ahead in `idx` order instead of
/// 2 KiB). Preconditions as [`scores_gather`] with `base = 0`.
#[allow(clippy::too_many_arguments)]
pub fn scores_gather_runs<T: Element>(
    isa: Isa,
    qs: &[f32],
    g: usize,
    src: &[T],
    d: usize,
    idx: &[u32],
    scale: f32,
    out: &mut [f32],
    stride: usize,
) {
    debug_assert!(d > 0, "d must be positive");
    if d == 0 {
        return;
    }
    dispatch!(
        isa,
        scores_gather_runs(qs, g, src, d, idx, scale, out, stride)
    )
}

/// [`weighted_gather`] over rows `src[idx[j]]` that come in runs (see
/// [`scores_gather_runs`]): bitwise the same sums, prefetched 8 KiB ahead.
#[allow(clippy::too_many_arguments)]
pub fn weighted_gather_runs<T: Element>(
    isa: Isa,
    acc: &mut [f32],
    g: usize,
    p: &[f32],
    p_stride: usize,
    src: &[T],
    d: usize,
    idx: &[u32],
) {
    debug_assert!(d > 0, "d must be positive");
    if d == 0 {
        return;
    }
    dispatch!(isa, weighted_gather_runs(acc, g, p, p_stride, src, d, idx))
}

/// In place `x[i] = [x[i] - tau]_+^e` (entmax weights, `e` from [`PowMode`]:
/// 2 for `Alpha15`, 1 for `Alpha2`); returns `Σ x[i]` (f32 lanes). Entries
/// at or below `tau` (and `-inf`) become exactly `0`.
pub fn pow_relu_apply(isa: Isa, x: &mut [f32], tau: f32, mode: PowMode) -> f32 {
    dispatch!(isa, pow_relu_apply(x, tau, mode))
}

/// Entmax row preparation: in place `x[i] = a * (x[i] - m)`, and the
/// results `> lo` copied in order to the front of `cand` (the threshold
/// candidates). Returns `(candidates, finite entries, any NaN)`.
/// Precondition: `cand.len() >= x.len()`. Counts are exact below 2^24 per
/// lane (rows shorter than 2^24 · lanes).
pub fn shift_select(
    isa: Isa,
    x: &mut [f32],
    m: f32,
    a: f32,
    lo: f32,
    cand: &mut [f32],
) -> (usize, usize, bool) {
    debug_assert!(cand.len() >= x.len());
    dispatch!(isa, shift_select(x, m, a, lo, cand))
}

/// Sums for the alpha-entmax threshold search at threshold `tau`.
///
/// Returns `(Σ z^c0, Σ z^c1, Σ z^c2)` over the lanes with
/// `z_i = x_i - tau > 0`, with `(c0, c1, c2) = (e, e - 1, 0)` as selected by
/// [`PowMode`] (`Alpha15`: `(2, 1, 0)`; `Alpha2`: `(1, 0, 0)`). The third
/// value is the count `#{x_i > tau}` as `f32` (exact below 2^24 per lane).
pub fn pow_relu_sum(isa: Isa, x: &[f32], tau: f32, mode: PowMode) -> (f32, f32, f32) {
    dispatch!(isa, pow_relu_sum(x, tau, mode))
}

/// `x[i] += c` in place.
pub fn offset_f32(isa: Isa, x: &mut [f32], c: f32) {
    dispatch!(isa, offset_f32(x, c))
}

/// Number of `x[i] > tau` (exact for any length).
pub fn count_above(isa: Isa, x: &[f32], tau: f32) -> usize {
    dispatch!(isa, count_above(x, tau))
}

/// True iff every `x[i]` is finite (no NaN, no ±inf); true for an empty slice.
pub fn all_finite(isa: Isa, x: &[f32]) -> bool {
    dispatch!(isa, all_finite(x))
}

/// `(Σ x, ok)` in one pass: the sum of policy scores and the check that
/// they are finite and non-negative. `ok` is false when some `x[i]` is NaN,
/// `±∞` or negative, and when the sum overflows to `∞`. The sum runs over eight interleaved lanes, `acc[l] +=
/// x[8k + l]` with the tail into `acc[0..r]`, joined as
/// `((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7))`: a fixed order, so the
/// result is bitwise the same on every ISA (and equal to [`sum8_f64`]).
pub fn sum_checked_f64(isa: Isa, x: &[f64]) -> (f64, bool) {
    dispatch!(isa, sum_checked_f64(x))
}

/// `Σ x` in the order of [`sum_checked_f64`], without the check (portable
/// code, for callers off the hot path).
pub fn sum8_f64(x: &[f64]) -> f64 {
    body::sum_checked_f64(x).0
}

/// Starts [`caote_bounds`]' sums for one segment: row `j` is a candidate
/// when `lo_a ≤ arr[j] < hi_a`; a candidate's `lo2[j]`, `hi2[j]` are set to
/// 0, another row's to NaN and `+∞` (so no bound added later makes it
/// eligible, and it never lowers a minimum of `hi2`). Returns the number of
/// candidates. Rows: the shortest of the slices.
pub fn caote_mask(
    isa: Isa,
    arr: &[u32],
    lo_a: u32,
    hi_a: u32,
    lo2: &mut [f64],
    hi2: &mut [f64],
) -> usize {
    dispatch!(isa, caote_mask(arr, lo_a, hi_a, lo2, hi2))
}

/// `acc[i] += f64::from(x[i])` (exact widening, one rounding per add; the
/// same on every ISA). Rows: the shorter of the slices.
pub fn add_widened(isa: Isa, acc: &mut [f64], x: &[f32]) {
    dispatch!(isa, add_widened(acc, x))
}

/// One pass over a segment's arrivals: returns the number of candidates
/// (`lo_a ≤ arr[j] < hi_a`) and appends to `new_rows`, in increasing order,
/// the rows `j` of the candidates with `arr[j] ≥ new_from`.
pub fn candidate_scan(
    isa: Isa,
    arr: &[u32],
    lo_a: u32,
    hi_a: u32,
    new_from: u32,
    new_rows: &mut Vec<u32>,
) -> usize {
    dispatch!(isa, candidate_scan(arr, lo_a, hi_a, new_from, new_rows))
}

/// The smallest non-NaN `x[i]` (`+∞` when there is none); exact, so the
/// same on every ISA.
pub fn min_f64(isa: Isa, x: &[f64]) -> f64 {
    dispatch!(isa, min_f64(x))
}

/// One query head's rows for [`caote_bounds`]: per row `j` the last exact
/// distance `dist[j]`, the drift `stamp[j]` at which it was measured and the
/// raw score `h[j]`; the head's current drift and `inv = 1 / Σ h` (0 when
/// the sum is 0) and `uni = 1 / n` (the weight of every row when it is).
#[derive(Clone, Copy)]
pub struct CaoteBounds<'a> {
    /// Last exact distance per row.
    pub dist: &'a [f32],
    /// Drift of the pseudo-output when `dist[j]` was measured (`-inf`: never).
    pub stamp: &'a [f64],
    /// Raw score per row.
    pub h: &'a [f64],
    /// The pseudo-output's drift now.
    pub drift: f64,
    /// `1 / Σ_j h_j`, or 0 when the sum is 0.
    pub inv: f64,
    /// `1 / n`.
    pub uni: f64,
}

/// CAOTE's squared score bounds, added to `lo2` / `hi2` (a group's score is
/// the root sum of squares of its heads' scores). Per row `j`:
/// `slack = drift − stamp_j`, `e = slack + 1e-5·(d_j + 1)`,
/// `d⁻ = max(d_j − e, 0)`, `d⁺ = d_j + e` (`0` and `+∞` when `slack` is not
/// finite), `α = h_j · inv` (`uni` when `inv = 0`), `r = α / (1 − α)`; the
/// score bounds are `r·d⁻` and `r·d⁺`, `+∞` where `1 − α < 1e-6` and `0`
/// where `α ≤ 0`. Plain f64 arithmetic without fused multiply-adds, so the
/// result is bitwise the same on every ISA; the entries only let the
/// compiler vectorise it. Rows: the shortest of the slices.
pub fn caote_bounds(isa: Isa, b: CaoteBounds<'_>, lo2: &mut [f64], hi2: &mut [f64]) {
    dispatch!(isa, caote_bounds(b, lo2, hi2))
}

/// Widen `src` into `dst` (exact). Precondition: `dst.len() == src.len()`
/// (otherwise only the common prefix is converted).
pub fn to_f32_slice<T: Element>(isa: Isa, src: &[T], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), dst.len());
    dispatch!(isa, to_f32_slice(src, dst))
}

/// Narrow `src` into `dst`, rounding to nearest even (bit-identical to
/// [`Element::from_f32`] for non-NaN values). Precondition:
/// `dst.len() == src.len()` (otherwise only the common prefix is converted).
pub fn from_f32_slice<T: Element>(isa: Isa, src: &[f32], dst: &mut [T]) {
    debug_assert_eq!(src.len(), dst.len());
    dispatch!(isa, from_f32_slice(src, dst))
}

/// The generic bodies, written once for every ISA.
mod body {
    use super::{PowMode, Simd};
    use crate::dtype::Element;

    /// Dots of `H` heads (`q: [H, d]`) with each of `R` rows (`[d]` each):
    /// `R · H` accumulators; each row chunk is loaded (and widened) once for
    /// all heads, each query chunk once for all rows. Every dot is the same
    /// chain `acc = fma(q_c, r_c, acc)` over the chunks in order, reduced by
    /// `reduce_add`'s lane order, whatever `H` and `R` are: the `R` rows
    /// only give the out-of-order core `R` times the independent chains
    /// (one row of four heads leaves the fused multiply-add pipes waiting on
    /// the chain's latency).
    #[inline(always)]
    fn dot_block<S: Simd, T: Element, const H: usize, const R: usize>(
        s: S,
        q: &[f32],
        rows: [&[T]; R],
    ) -> [[f32; H]; R] {
        let d = rows[0].len();
        let q = &q[..H * d];
        let rows = rows.map(|r| &r[..d]);
        let full = d - d % S::L;
        let mut acc = [[s.splat(0.0); H]; R];
        let mut off = 0;
        while off < full {
            let mut rv = [s.splat(0.0); R];
            for (v, r) in rv.iter_mut().zip(&rows) {
                debug_assert!(off + S::L <= r.len());
                // SAFETY: bounds only. Every row was resliced to `[..d]`
                // above and `off + L <= full <= d`.
                *v = s.load_t(unsafe { r.get_unchecked(off..off + S::L) });
            }
            for h in 0..H {
                let at = h * d + off;
                debug_assert!(at + S::L <= q.len());
                // SAFETY: bounds only. `q.len() == H * d` (resliced above),
                // `h < H` and `off + L <= full <= d`, so `at + L <= H * d`.
                let qc = s.load(unsafe { q.get_unchecked(at..at + S::L) });
                for (a, v) in acc.iter_mut().zip(&rv) {
                    a[h] = s.fma(qc, *v, a[h]);
                }
            }
            off += S::L;
        }
        if full < d {
            let rv = rows.map(|r| s.load_part(&r[full..], 0.0));
            for h in 0..H {
                let qc = s.load_part(&q[h * d + full..(h + 1) * d], 0.0);
                for (a, v) in acc.iter_mut().zip(&rv) {
                    a[h] = s.fma(qc, *v, a[h]);
                }
            }
        }
        let mut out = [[0.0f32; H]; R];
        for (o, a) in out.iter_mut().zip(&acc) {
            let mut h = 0;
            while h + 4 <= H {
                let r = s.reduce_add4([a[h], a[h + 1], a[h + 2], a[h + 3]]);
                o[h..h + 4].copy_from_slice(&r);
                h += 4;
            }
            while h < H {
                o[h] = s.reduce_add(a[h]);
                h += 1;
            }
        }
        out
    }

    /// All `g` heads against `R` rows, in blocks of 8/4/2/1 heads (at most
    /// 4 when `R > 1` on ISAs of fewer than 16 lanes: AVX2's 16 registers
    /// hold `4 · R` accumulators, 4 query and `R` row vectors); writes
    /// `out[i*stride + col + r] = scale * q_i · rows[r]`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn dot_group<S: Simd, T: Element, const R: usize>(
        s: S,
        qs: &[f32],
        g: usize,
        rows: [&[T]; R],
        out: &mut [f32],
        stride: usize,
        col: usize,
        scale: f32,
    ) {
        let d = rows[0].len();
        let wide = R == 1 || S::L >= 16;
        let mut i = 0;
        macro_rules! block {
            ($h:literal) => {{
                let r = dot_block::<S, T, $h, R>(s, &qs[i * d..], rows);
                for (c, rr) in r.iter().enumerate() {
                    for (h, v) in rr.iter().enumerate() {
                        out[(i + h) * stride + col + c] = scale * v;
                    }
                }
                i += $h;
            }};
        }
        while i < g {
            match g - i {
                8.. if wide => block!(8),
                4.. => block!(4),
                2..=3 => block!(2),
                _ => block!(1),
            }
        }
    }

    #[inline(always)]
    pub(crate) fn dot_multi<S: Simd, T: Element>(
        s: S,
        qs: &[f32],
        g: usize,
        row: &[T],
        out: &mut [f32],
    ) {
        dot_group(s, qs, g, [row], out, 1, 0, 1.0);
    }

    #[inline(always)]
    pub(crate) fn scores_rows<S: Simd, T: Element>(
        s: S,
        qs: &[f32],
        g: usize,
        rows: &[T],
        d: usize,
        scale: f32,
        out: &mut [f32],
    ) {
        if d == 0 {
            return;
        }
        let n = rows.len() / d;
        scores_core::<S, T, 0>(s, qs, g, n, d, |j| &rows[j * d..(j + 1) * d], scale, out, n);
    }

    /// Scores of `g` heads against `n` rows given by `row(j)` (each of
    /// length `d`): `out[i*stride + j] = scale * q_i · row(j)`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scores_core<'a, S: Simd, T: Element, const PF: usize>(
        s: S,
        qs: &[f32],
        g: usize,
        n: usize,
        d: usize,
        row: impl Fn(usize) -> &'a [T],
        scale: f32,
        out: &mut [f32],
        stride: usize,
    ) {
        if d == 0 {
            return;
        }
        // PF > 0: rows prefetched PF bytes ahead (gathered rows, and the
        // contiguous rows of `scores_rows_strided`, see RUNS_PREFETCH_BYTES).
        let gather = PF > 0;
        let ahead = prefetch_rows::<T>(d, PF);
        if gather {
            for j in 0..ahead.min(n) {
                s.prefetch(row(j));
            }
        }
        // Rows in pairs (see `dot_block`), the odd last one alone.
        let mut j = 0;
        while j + 2 <= n {
            if gather {
                for a in j + ahead..(j + ahead + 2).min(n) {
                    s.prefetch(row(a));
                }
            }
            dot_group(s, qs, g, [row(j), row(j + 1)], out, stride, j, scale);
            j += 2;
        }
        if j < n {
            dot_group(s, qs, g, [row(j)], out, stride, j, scale);
        }
    }

    /// How far ahead (in bytes of rows, at least one row) the gathering
    /// score and weighted-row loops prefetch: latency hiding for scattered
    /// rows. 1–4 KiB measured best on the development machine (a 1.5x gain
    /// over no prefetch; 8 KiB and more is slower).
    pub(crate) const PREFETCH_BYTES: usize = 2048;

    /// The prefetch distance of the `*_gather_runs` variants: rows that come
    /// in runs of consecutive rows with jumps between them (the pages of
    /// paged KV). Inside a run the hardware prefetcher streams; the software
    /// prefetch has to reach past the jump early enough to hide a miss. On
    /// the development machine dense paged decode (HND, P = 16 and 64,
    /// shuffled pages, f16) took 0.86–0.92x the contiguous throughput at
    /// 2 KiB, 1.0–1.3x at 4 KiB (load varied) and 1.11–1.14x at 8 KiB.
    /// The contiguous score pass (`scores_rows_strided`, dense decode) uses
    /// it too: with the hardware prefetcher alone half of its samples sat
    /// on the first use of each K row (perf annotate), and 8 KiB ahead cut
    /// dense 32K decode by 11–18 % on one and two threads, every dtype
    /// (`KVSIEVE_BENCH_ONLY=dense cargo bench --bench decode`, before and
    /// after in one session, docs/results.md). The weighted pass keeps its own f32 block
    /// prefetch (8 KiB ahead there measured within noise).
    pub(crate) const RUNS_PREFETCH_BYTES: usize = 8192;

    /// `bytes` in rows of `d` elements of `T` (at least one).
    #[inline(always)]
    fn prefetch_rows<T>(d: usize, bytes: usize) -> usize {
        (bytes / (d * std::mem::size_of::<T>()).max(1)).max(1)
    }

    /// `[v - tau]_+^e` of one vector (a function, not a closure, so that it
    /// is compiled with the entry's target features).
    #[inline(always)]
    fn pow_relu_vec<S: Simd>(s: S, v: S::V, tv: S::V, mode: PowMode) -> S::V {
        let z = s.max(s.sub(v, tv), s.splat(0.0));
        match mode {
            PowMode::Alpha15 => s.mul(z, z),
            PowMode::Alpha2 => z,
            PowMode::General(e) => s.map_lanes(z, |z| if z > 0.0 { z.powf(e) } else { 0.0 }),
        }
    }

    /// `x = [x - tau]_+^e` in place, returning the sum.
    #[inline(always)]
    pub(crate) fn pow_relu_apply<S: Simd>(s: S, x: &mut [f32], tau: f32, mode: PowMode) -> f32 {
        let tv = s.splat(tau);
        let mut sum = s.splat(0.0);
        let mut chunks = x.chunks_exact_mut(S::L);
        for c in &mut chunks {
            let v = pow_relu_vec(s, s.load(c), tv, mode);
            s.store(c, v);
            sum = s.add(sum, v);
        }
        let t = chunks.into_remainder();
        if !t.is_empty() {
            let v = pow_relu_vec(s, s.load_part(t, f32::NEG_INFINITY), tv, mode);
            s.store_part(t, v);
            sum = s.add(sum, v);
        }
        s.reduce_add(sum)
    }

    /// `x = a·(x − m)` in place; copies the results `> lo` to the front of
    /// `cand` (in order); returns `(#candidates, #finite, any NaN)`.
    #[inline(always)]
    pub(crate) fn shift_select<S: Simd>(
        s: S,
        x: &mut [f32],
        m: f32,
        a: f32,
        lo: f32,
        cand: &mut [f32],
    ) -> (usize, usize, bool) {
        let (mv, av, lov) = (s.splat(m), s.splat(a), s.splat(lo));
        let (ninf, pinf) = (s.splat(f32::NEG_INFINITY), s.splat(f32::INFINITY));
        let (mut fin, mut ord) = (s.splat(0.0), s.splat(0.0));
        let mut k = 0;
        let mut buf = [0.0f32; 16];
        let n = x.len();
        let mut i = 0;
        while i < n {
            let l = S::L.min(n - i);
            let c = &mut x[i..i + l];
            let v = if l == S::L {
                s.mul(av, s.sub(s.load(c), mv))
            } else {
                s.mul(av, s.sub(s.load_part(c, f32::NEG_INFINITY), mv))
            };
            if l == S::L {
                s.store(c, v);
            } else {
                s.store_part(c, v);
            }
            // Padding lanes are -inf: neither finite nor candidates, but
            // ordered (not NaN).
            fin = s.add(fin, s.gt_ones(v, ninf));
            ord = s.add(ord, s.gt_ones(pinf, v));
            if s.reduce_max(s.max(v, lov)) > lo {
                s.store(&mut buf[..S::L], v);
                for &y in &buf[..l] {
                    cand[k] = y;
                    k += usize::from(y > lo);
                }
            }
            i += l;
        }
        let pad = (S::L - n % S::L) % S::L;
        let ordered = s.reduce_add(ord) as usize;
        (k, s.reduce_add(fin) as usize, ordered < n + pad)
    }

    /// `acc[i*d + k] += ps[i*ps_stride + ps_col] * row[k]` for `i < g`.
    #[inline(always)]
    fn axpy_group<S: Simd, T: Element>(
        s: S,
        acc: &mut [f32],
        g: usize,
        ps: &[f32],
        ps_stride: usize,
        ps_col: usize,
        row: &[T],
    ) {
        let d = row.len();
        let acc = &mut acc[..g * d];
        let full = d - d % S::L;
        let mut off = 0;
        for rc in row[..full].chunks_exact(S::L) {
            let r = s.load_t(rc);
            for h in 0..g {
                let p = s.splat(ps[h * ps_stride + ps_col]);
                let at = h * d + off;
                debug_assert!(at + S::L <= acc.len());
                // SAFETY: bounds only. `acc.len() == g * d` (resliced above),
                // `h < g` and `off + L <= full <= d`, so `at + L <= g * d`.
                let a = unsafe { acc.get_unchecked_mut(at..at + S::L) };
                let v = s.fma(p, r, s.load(a));
                s.store(a, v);
            }
            off += S::L;
        }
        if full < d {
            let r = s.load_part(&row[full..], 0.0);
            for h in 0..g {
                let p = s.splat(ps[h * ps_stride + ps_col]);
                let a = &mut acc[h * d + full..(h + 1) * d];
                let v = s.fma(p, r, s.load_part(a, 0.0));
                s.store_part(a, v);
            }
        }
    }

    #[inline(always)]
    pub(crate) fn axpy_multi<S: Simd, T: Element>(
        s: S,
        acc: &mut [f32],
        g: usize,
        ps: &[f32],
        row: &[T],
    ) {
        axpy_group(s, acc, g, ps, 1, 0, row);
    }

    /// Rows per block of `weighted_rows`: the selected rows of a block stay
    /// in L1 while every head / column tile sweeps over them.
    const ROW_BLOCK: usize = 32;

    /// Register-tiled `weighted_rows`: for each block of rows, each head and
    /// each tile of `U` vectors of columns, the accumulators stay in
    /// registers over the block's non-zero rows. Every output element is
    /// still the chain `acc = fma(p[i,j], row_j[k], acc)` over `j` in
    /// increasing order, so the result equals repeated `axpy_multi`.
    #[inline(always)]
    pub(crate) fn weighted_rows<S: Simd, T: Element>(
        s: S,
        acc: &mut [f32],
        g: usize,
        p: &[f32],
        rows: &[T],
        d: usize,
    ) {
        if d == 0 {
            return;
        }
        let n = rows.len() / d;
        weighted_core::<S, T, 0>(s, acc, g, p, n, n, d, |j| &rows[j * d..(j + 1) * d])
    }

    /// The body of every weighted-rows variant: rows come from `row(j)`,
    /// weights from `p[i*p_stride + j]`, `j < n`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn weighted_core<'a, S: Simd, T: Element, const PF: usize>(
        s: S,
        acc: &mut [f32],
        g: usize,
        p: &[f32],
        p_stride: usize,
        n: usize,
        d: usize,
        row: impl Fn(usize) -> &'a [T],
    ) {
        if d == 0 || g == 0 {
            return;
        }
        let acc = &mut acc[..g * d];
        let p = &p[..(g - 1) * p_stride + n];
        let full = d - d % S::L;
        let mut sel = [0usize; ROW_BLOCK];
        let mut sel_rows: [&[T]; ROW_BLOCK] = [&[]; ROW_BLOCK];
        let live = |j: usize| (0..g).any(|i| p[i * p_stride + j] != 0.0);
        // Gathered rows are prefetched a fixed distance ahead of the row
        // being selected (live rows only: a zero-weight row is never
        // touched), so misses overlap the previous block's arithmetic.
        let gather = PF > 0;
        let ahead = if gather { prefetch_rows::<T>(d, PF) } else { 0 };
        for j in (0..ahead.min(n)).filter(|&j| live(j)) {
            s.prefetch(row(j));
        }
        // Contiguous rows: each block is swept in column passes, and with
        // the hardware prefetcher alone the pass is memory-stalled, so the
        // live rows of this block and of the next are prefetched as they
        // are selected. Decode bench, f32 dense 32K: 21.8 -> 18.5 ms on one
        // thread (Zen 4, docs/results.md). For 16-bit rows the same prefetch
        // measured slower there while the tile loop still resolved each row
        // through the closure; with the rows resolved once per block it was
        // faster for 16-bit rows too in a scratch A/B on Zen 3 (AVX2); the
        // numbers of the whole change are in docs/results.md.
        let pf_block = !gather;
        for j0 in (0..n).step_by(ROW_BLOCK) {
            let mut m = 0;
            for j in j0..(j0 + ROW_BLOCK).min(n) {
                if gather && j + ahead < n && live(j + ahead) {
                    s.prefetch(row(j + ahead));
                }
                if pf_block && j + ROW_BLOCK < n && live(j + ROW_BLOCK) {
                    s.prefetch(row(j + ROW_BLOCK));
                }
                if live(j) {
                    let r = &row(j)[..d];
                    if pf_block {
                        s.prefetch(r);
                    }
                    sel[m] = j;
                    sel_rows[m] = r;
                    m += 1;
                }
            }
            let sel = &sel[..m];
            // The selected rows, resolved once per block (not once per
            // tile: the closure's index arithmetic and bounds checks cost
            // as much as the tile's multiply-adds).
            let rows = &sel_rows[..m];
            if sel.is_empty() {
                continue;
            }
            // Heads in groups of up to 4: each row chunk is loaded (and
            // widened) once per group, its accumulators stay in registers.
            let mut h0 = 0;
            while h0 < g {
                let hb = (g - h0).min(4);
                // The group's weights of the selected rows, gathered once
                // per block for all its tiles.
                let mut wsel = [[0.0f32; 4]; ROW_BLOCK];
                for (w, &j) in wsel.iter_mut().zip(sel) {
                    for (hh, x) in w[..hb].iter_mut().enumerate() {
                        *x = p[(h0 + hh) * p_stride + j];
                    }
                }
                let ws = &wsel[..m];
                let mut c = 0;
                macro_rules! tiles {
                    ($u:literal) => {
                        while c + $u * S::L <= full {
                            match hb {
                                4 => weighted_tile::<S, T, 4, $u>(s, acc, h0, d, c, ws, rows),
                                3 => weighted_tile::<S, T, 3, $u>(s, acc, h0, d, c, ws, rows),
                                2 => weighted_tile::<S, T, 2, $u>(s, acc, h0, d, c, ws, rows),
                                _ => weighted_tile::<S, T, 1, $u>(s, acc, h0, d, c, ws, rows),
                            }
                            c += $u * S::L;
                        }
                    };
                }
                // 32 vector registers (AVX-512): 4 heads x 4 vectors; else 4 x 2.
                if S::L >= 16 {
                    tiles!(4);
                } else {
                    tiles!(2);
                }
                for h in h0..h0 + hb {
                    let hh = h - h0;
                    let ah = &mut acc[h * d..(h + 1) * d];
                    let mut c = c;
                    while c < full {
                        let mut a = s.load(&ah[c..]);
                        for (w, r) in ws.iter().zip(rows) {
                            a = s.fma(s.splat(w[hh]), s.load_t(&r[c..c + S::L]), a);
                        }
                        s.store(&mut ah[c..], a);
                        c += S::L;
                    }
                    if full < d {
                        let mut a = s.load_part(&ah[full..], 0.0);
                        for (w, r) in ws.iter().zip(rows) {
                            let r = s.load_part(&r[full..d], 0.0);
                            a = s.fma(s.splat(w[hh]), r, a);
                        }
                        s.store_part(&mut ah[full..], a);
                    }
                }
                h0 += hb;
            }
        }
    }

    /// One register tile of `weighted_core`: heads `h0 .. h0 + HB`, columns
    /// `c .. c + U·L`, over the selected rows `rows` with their weights `ws`
    /// (`ws[m][hh]` of head `h0 + hh`) in order (each output element
    /// is the chain `acc = fma(p_ij, row_j[k], acc)` over increasing `j`).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn weighted_tile<S: Simd, T: Element, const HB: usize, const U: usize>(
        s: S,
        acc: &mut [f32],
        h0: usize,
        d: usize,
        c: usize,
        ws: &[[f32; 4]],
        rows: &[&[T]],
    ) {
        let mut a = [[s.splat(0.0); U]; HB];
        for (hh, ah) in a.iter_mut().enumerate() {
            for (u, x) in ah.iter_mut().enumerate() {
                *x = s.load(&acc[(h0 + hh) * d + c + u * S::L..]);
            }
        }
        for (w, r) in ws.iter().zip(rows) {
            let r = &r[c..c + U * S::L];
            let mut rv = [s.splat(0.0); U];
            for (x, rc) in rv.iter_mut().zip(r.chunks_exact(S::L)) {
                *x = s.load_t(rc);
            }
            for (ah, &wh) in a.iter_mut().zip(w) {
                let w = s.splat(wh);
                for (x, r) in ah.iter_mut().zip(&rv) {
                    *x = s.fma(w, *r, *x);
                }
            }
        }
        for (hh, ah) in a.iter().enumerate() {
            for (u, x) in ah.iter().enumerate() {
                s.store(&mut acc[(h0 + hh) * d + c + u * S::L..], *x);
            }
        }
    }

    #[inline(always)]
    pub(crate) fn max_f32<S: Simd>(s: S, x: &[f32]) -> f32 {
        let mut m = s.splat(f32::NEG_INFINITY);
        let mut chunks = x.chunks_exact(S::L);
        for c in &mut chunks {
            m = s.max(s.load(c), m);
        }
        let t = chunks.remainder();
        if !t.is_empty() {
            m = s.max(s.load_part(t, f32::NEG_INFINITY), m);
        }
        s.reduce_max(m)
    }

    const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// `ln 2` split: `LN2_HI` has 9 significant bits, so `n * LN2_HI` is
    /// exact for `|n| <= 2^15`.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;

    /// Vector `exp`; see [`super::exp_sum`] for the method and accuracy.
    #[inline(always)]
    pub(crate) fn exp<S: Simd>(s: S, x: S::V) -> S::V {
        // Clamp with `x` as the second operand so NaN propagates.
        let x = s.min(s.splat(89.0), s.max(s.splat(-104.0), x));
        let n = s.round(s.mul(x, s.splat(LOG2E)));
        let r = s.fma(n, s.splat(-LN2_HI), x);
        let r = s.fma(n, s.splat(-LN2_LO), r);
        let mut p = s.splat(1.0 / 5040.0);
        for c in [
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ] {
            p = s.fma(p, r, s.splat(c));
        }
        // n in [-150, 128]: two factors keep each 2^k normal.
        let n1 = s.round(s.mul(n, s.splat(0.5)));
        let n2 = s.sub(n, n1);
        s.mul(s.mul(p, s.pow2i(n1)), s.pow2i(n2))
    }

    #[inline(always)]
    pub(crate) fn exp_sum<S: Simd>(s: S, x: &mut [f32], shift: f32) -> f32 {
        let sh = s.splat(shift);
        let mut sum = s.splat(0.0);
        let mut chunks = x.chunks_exact_mut(S::L);
        for c in &mut chunks {
            let v = exp(s, s.sub(s.load(c), sh));
            s.store(c, v);
            sum = s.add(sum, v);
        }
        let t = chunks.into_remainder();
        if !t.is_empty() {
            let v = exp(s, s.sub(s.load_part(t, 0.0), sh));
            s.store_part(t, v);
            sum = s.add(sum, s.keep_first(v, t.len()));
        }
        s.reduce_add(sum)
    }

    #[cfg(test)]
    #[inline(always)]
    pub(crate) fn exp_slice<S: Simd>(s: S, x: &mut [f32]) {
        let mut chunks = x.chunks_exact_mut(S::L);
        for c in &mut chunks {
            let v = exp(s, s.load(c));
            s.store(c, v);
        }
        let t = chunks.into_remainder();
        if !t.is_empty() {
            let v = exp(s, s.load_part(t, 0.0));
            s.store_part(t, v);
        }
    }

    #[inline(always)]
    pub(crate) fn scale_f32<S: Simd>(s: S, x: &mut [f32], a: f32) {
        let av = s.splat(a);
        let mut chunks = x.chunks_exact_mut(S::L);
        for c in &mut chunks {
            let v = s.mul(s.load(c), av);
            s.store(c, v);
        }
        let t = chunks.into_remainder();
        if !t.is_empty() {
            let v = s.mul(s.load_part(t, 0.0), av);
            s.store_part(t, v);
        }
    }

    #[inline(always)]
    pub(crate) fn offset_f32<S: Simd>(s: S, x: &mut [f32], c: f32) {
        let cv = s.splat(c);
        let mut chunks = x.chunks_exact_mut(S::L);
        for ch in &mut chunks {
            let v = s.add(s.load(ch), cv);
            s.store(ch, v);
        }
        let t = chunks.into_remainder();
        if !t.is_empty() {
            let v = s.add(s.load_part(t, 0.0), cv);
            s.store_part(t, v);
        }
    }

    #[inline(always)]
    pub(crate) fn count_above<S: Simd>(s: S, x: &[f32], tau: f32) -> usize {
        let tv = s.splat(tau);
        let mut total = 0usize;
        // Per-lane f32 counters stay exact: at most 2^20 per lane per block.
        for block in x.chunks(S::L << 20) {
            let mut cnt = s.splat(0.0);
            let mut chunks = block.chunks_exact(S::L);
            for c in &mut chunks {
                cnt = s.add(cnt, s.gt_ones(s.load(c), tv));
            }
            let t = chunks.remainder();
            if !t.is_empty() {
                cnt = s.add(cnt, s.gt_ones(s.load_part(t, f32::NEG_INFINITY), tv));
            }
            total += s.reduce_add(cnt) as usize;
        }
        total
    }

    /// See [`super::sum_checked_f64`]. No comparison tests the class of a
    /// value (LLVM turns `x >= 0 & x < ∞` into integer class tests that do
    /// not vectorise): a lane-wise sum and minimum, then NaN and `±∞` show in
    /// the sum and negatives in the minimum.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    pub(crate) fn sum_checked_f64(x: &[f64]) -> (f64, bool) {
        let mut acc = [0.0f64; 8];
        let mut min = [f64::INFINITY; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                acc[l] += c[l];
                min[l] = if c[l] < min[l] { c[l] } else { min[l] };
            }
        }
        for (l, &v) in chunks.remainder().iter().enumerate() {
            acc[l] += v;
            min[l] = if v < min[l] { v } else { min[l] };
        }
        let sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        let low = min.iter().fold(f64::INFINITY, |a, &b| a.min(b));
        (sum, sum.is_finite() && low >= 0.0)
    }

    /// See [`super::caote_mask`]: selects only, so that it vectorises.
    #[inline(always)]
    pub(crate) fn caote_mask(
        arr: &[u32],
        lo_a: u32,
        hi_a: u32,
        lo2: &mut [f64],
        hi2: &mut [f64],
    ) -> usize {
        let mut n = 0usize;
        for ((l2, h2), &a) in lo2.iter_mut().zip(hi2.iter_mut()).zip(arr) {
            let c = (a >= lo_a) & (a < hi_a);
            *l2 = if c { 0.0 } else { f64::NAN };
            *h2 = if c { 0.0 } else { f64::INFINITY };
            n += usize::from(c);
        }
        n
    }

    /// See [`super::add_widened`].
    #[inline(always)]
    pub(crate) fn add_widened(acc: &mut [f64], x: &[f32]) {
        for (a, &v) in acc.iter_mut().zip(x) {
            *a += f64::from(v);
        }
    }

    /// See [`super::candidate_scan`]: blocks of 16 arrivals counted without
    /// branches; a block is searched for new candidates only when one of
    /// its lanes is one (rare: a few rows per segment).
    #[inline(always)]
    pub(crate) fn candidate_scan(
        arr: &[u32],
        lo_a: u32,
        hi_a: u32,
        new_from: u32,
        new_rows: &mut Vec<u32>,
    ) -> usize {
        let lo_new = lo_a.max(new_from);
        let mut n = 0usize;
        let mut base = 0u32;
        let mut blocks = arr.chunks_exact(16);
        for blk in &mut blocks {
            let mut cnt = 0u32;
            let mut any = 0u32;
            for &a in blk {
                cnt += u32::from((a >= lo_a) & (a < hi_a));
                any |= u32::from((a >= lo_new) & (a < hi_a));
            }
            n += cnt as usize;
            if any != 0 {
                new_rows.extend(
                    (base..)
                        .zip(blk)
                        .filter(|&(_, &a)| a >= lo_new && a < hi_a)
                        .map(|(j, _)| j),
                );
            }
            base += 16;
        }
        for (j, &a) in (base..).zip(blocks.remainder()) {
            n += usize::from((a >= lo_a) & (a < hi_a));
            if a >= lo_new && a < hi_a {
                new_rows.push(j);
            }
        }
        n
    }

    /// See [`super::min_f64`]: eight lane-wise minima by selects (NaN never
    /// wins `v < m`), then joined.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    pub(crate) fn min_f64(x: &[f64]) -> f64 {
        let mut m = [f64::INFINITY; 8];
        let mut chunks = x.chunks_exact(8);
        for c in &mut chunks {
            for l in 0..8 {
                m[l] = if c[l] < m[l] { c[l] } else { m[l] };
            }
        }
        for (l, &v) in chunks.remainder().iter().enumerate() {
            m[l] = if v < m[l] { v } else { m[l] };
        }
        m.iter()
            .fold(f64::INFINITY, |a, &b| if b < a { b } else { a })
    }

    /// See [`super::caote_bounds`]: written without branches (selects
    /// only) so that it vectorises under each entry's features.
    #[inline(always)]
    pub(crate) fn caote_bounds(b: super::CaoteBounds<'_>, lo2: &mut [f64], hi2: &mut [f64]) {
        // `h · inv + c` is `h · inv` exactly when `inv > 0` (c = 0, h ≥ 0)
        // and `uni` when `inv = 0` (h is finite).
        let c = if b.inv > 0.0 { 0.0 } else { b.uni };
        let rows = lo2
            .iter_mut()
            .zip(hi2.iter_mut())
            .zip(b.dist.iter().zip(b.stamp).zip(b.h));
        for ((l2, h2), ((&d32, &stamp), &hj)) in rows {
            let slack = b.drift - stamp;
            let dj = f64::from(d32);
            let e = slack + 1e-5 * (dj + 1.0);
            let fin = slack.abs() < f64::INFINITY;
            let dl = if fin { (dj - e).max(0.0) } else { 0.0 };
            let dh = if fin { dj + e } else { f64::INFINITY };
            let a = hj * b.inv + c;
            let inf = 1.0 - a < 1e-6;
            let zero = a <= 0.0;
            let r = a / (1.0 - a);
            let (el, eh) = (r * dl, r * dh);
            let el = if zero { 0.0 } else { el };
            let eh = if zero { 0.0 } else { eh };
            let el = if inf { f64::INFINITY } else { el };
            let eh = if inf { f64::INFINITY } else { eh };
            *l2 += el * el;
            *h2 += eh * eh;
        }
    }

    #[inline(always)]
    pub(crate) fn all_finite<S: Simd>(s: S, x: &[f32]) -> bool {
        let (ninf, pinf) = (s.splat(f32::NEG_INFINITY), s.splat(f32::INFINITY));
        // 1 in a lane while every value it saw was finite (NaN fails both
        // comparisons); padding lanes hold 0, which is finite.
        let mut ok = s.splat(1.0);
        let mut chunks = x.chunks_exact(S::L);
        for c in &mut chunks {
            let v = s.load(c);
            ok = s.mul(ok, s.mul(s.gt_ones(v, ninf), s.gt_ones(pinf, v)));
        }
        let t = chunks.remainder();
        if !t.is_empty() {
            let v = s.load_part(t, 0.0);
            ok = s.mul(ok, s.mul(s.gt_ones(v, ninf), s.gt_ones(pinf, v)));
        }
        s.reduce_add(ok) == S::L as f32
    }

    #[inline(always)]
    pub(crate) fn pow_relu_sum<S: Simd>(
        s: S,
        x: &[f32],
        tau: f32,
        mode: PowMode,
    ) -> (f32, f32, f32) {
        let tv = s.splat(tau);
        let zero = s.splat(0.0);
        let (mut s0, mut s1, mut s2) = (zero, zero, zero);
        // Padding lanes hold -inf: z = max(-inf - tau, 0) = 0 and the
        // comparison is false, so they contribute nothing.
        macro_rules! step {
            ($v:expr) => {{
                let v = $v;
                let z = s.max(s.sub(v, tv), zero);
                let on = s.gt_ones(v, tv);
                match mode {
                    PowMode::Alpha15 => {
                        s0 = s.fma(z, z, s0);
                        s1 = s.add(s1, z);
                        s2 = s.add(s2, on);
                    }
                    PowMode::Alpha2 => {
                        s0 = s.add(s0, z);
                        s1 = s.add(s1, on);
                    }
                    PowMode::General(e) => {
                        let em1 = e - 1.0;
                        let ze1 = s.map_lanes(z, |z| if z > 0.0 { z.powf(em1) } else { 0.0 });
                        s0 = s.fma(z, ze1, s0);
                        s1 = s.add(s1, ze1);
                        s2 = s.add(s2, on);
                    }
                }
            }};
        }
        let mut chunks = x.chunks_exact(S::L);
        for c in &mut chunks {
            step!(s.load(c));
        }
        let t = chunks.remainder();
        if !t.is_empty() {
            step!(s.load_part(t, f32::NEG_INFINITY));
        }
        if let PowMode::Alpha2 = mode {
            let c = s.reduce_add(s1);
            return (s.reduce_add(s0), c, c);
        }
        (s.reduce_add(s0), s.reduce_add(s1), s.reduce_add(s2))
    }

    #[inline(always)]
    pub(crate) fn to_f32_slice<S: Simd, T: Element>(s: S, src: &[T], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let (src, dst) = (&src[..n], &mut dst[..n]);
        let mut sc = src.chunks_exact(S::L);
        let mut dc = dst.chunks_exact_mut(S::L);
        for (a, b) in (&mut sc).zip(&mut dc) {
            s.store(b, s.load_t(a));
        }
        let t = sc.remainder();
        if !t.is_empty() {
            s.store_part(dc.into_remainder(), s.load_part(t, 0.0));
        }
    }

    #[inline(always)]
    pub(crate) fn from_f32_slice<S: Simd, T: Element>(s: S, src: &[f32], dst: &mut [T]) {
        let n = src.len().min(dst.len());
        let (src, dst) = (&src[..n], &mut dst[..n]);
        let mut sc = src.chunks_exact(S::L);
        let mut dc = dst.chunks_exact_mut(S::L);
        for (a, b) in (&mut sc).zip(&mut dc) {
            s.store_t(b, s.load(a));
        }
        let t = sc.remainder();
        if !t.is_empty() {
            s.store_part(dc.into_remainder(), s.load_part(t, 0.0));
        }
    }
}

#[cfg(test)]
mod tests;
