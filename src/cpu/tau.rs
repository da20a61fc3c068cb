//! The α-entmax threshold search in f32 SIMD sums, shared by the row
//! normaliser and the entmax attention kernels.
//!
//! The row (already scaled, `s = (α−1)·z`) is given to [`solve_tau`] as a
//! closure returning the threshold sums of [`simd::pow_relu_sum`] at a
//! candidate τ, summed over the row's chunks in a fixed order in f64. The
//! update rule is the crate's [`TauBracket::halley`] (bracket of
//! [`crate::entmax::tau_bounds`], start at its midpoint, safeguarded Halley
//! for α ∈ {1.5, 2}, safeguarded Newton for other α, whose f'' is not
//! summed). τ is kept representable in f32, so the sums are evaluated at
//! exactly the τ the bracket sees; the search stops when `|f(τ)| < TOL`,
//! when τ can no longer move in f32 (or an accepted Halley step moves it by
//! a few ulp only), or after [`MAX_ITER`] updates.
#![forbid(unsafe_code)]

use crate::cpu::simd::PowMode;
use crate::entmax::TauBracket;

/// Stop when `|Σp − 1| < TOL`. After renormalisation the error of every
/// `p_i` is at most about `2·|f|` for α ≤ 2 (a τ error `δ ≈ |f| / |f'|`
/// moves `p_i` by `|f'_i| δ`, and renormalisation removes the common part),
/// so this keeps the 1e-5 contract with margin for the f32 sums' noise.
pub(crate) const TOL: f64 = 2e-6;
/// Update cap (bisection fallbacks gain one bit each).
pub(crate) const MAX_ITER: u32 = 40;

/// `(f, f', f'')` from the three sums of [`crate::cpu::simd::pow_relu_sum`].
#[inline]
pub(crate) fn derivs(mode: PowMode, (a0, a1, a2): (f64, f64, f64)) -> (f64, f64, f64) {
    match mode {
        PowMode::Alpha15 => (a0 - 1.0, -2.0 * a1, 2.0 * a2),
        PowMode::Alpha2 => (a0 - 1.0, -a1, 0.0),
        PowMode::General(e) => (a0 - 1.0, -f64::from(e) * a1, 0.0),
    }
}

/// Threshold τ (scaled space) of a row with largest scaled score `max_s` and
/// `n` visible entries; `sums(τ)` returns the f64 totals of
/// `pow_relu_sum(row, τ, mode)`.
///
/// Returns `+inf` for a row with no visible entry (every weight 0) and NaN
/// when `max_s` is NaN or `+inf`.
pub(crate) fn solve_tau(
    alpha: f32,
    max_s: f32,
    n: usize,
    mut sums: impl FnMut(f32) -> (f64, f64, f64),
) -> f32 {
    if n == 0 || max_s == f32::NEG_INFINITY {
        return f32::INFINITY;
    }
    if !max_s.is_finite() {
        return f32::NAN;
    }
    let mode = PowMode::for_alpha(alpha);
    let mut br = TauBracket::for_row(f64::from(max_s), n, f64::from(alpha));
    let mut tau = br.midpoint() as f32;
    for _ in 0..MAX_ITER {
        let (f, df, ddf) = derivs(mode, sums(tau));
        if f.abs() < TOL {
            break;
        }
        let step = br.halley(f64::from(tau), f, df, ddf);
        let next = step.tau as f32;
        if next == tau || next.is_nan() {
            break;
        }
        // A Halley step of a few ulp: the f32 sums cannot resolve τ better.
        let tiny = (next - tau).abs() <= 4.0 * f32::EPSILON * tau.abs().max(1.0);
        tau = next;
        if tiny && !step.fallback {
            break;
        }
    }
    tau
}
