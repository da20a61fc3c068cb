//! The α-entmax threshold search, shared by the row normaliser and the
//! entmax attention kernels: in f32 SIMD sums for α ∈ [[`F32_ALPHA_MIN`], 2]
//! ([`solve_tau`]), in f64 for every other α ([`solve_tau64`]).
//!
//! # Why two searches
//!
//! With `u = s − τ` and `e = 1/(α−1)`, an error `δ` in `u` moves `p = u^e`
//! by `e·u^(e−1)·δ`. In f32, `δ` is about `2^-24·(1 + |τ|)` from rounding `τ`
//! and `s − τ` alone. For α ∈ [1.125, 2] (`1 ≤ e ≤ 8`) that is at most
//! `8·δ ≈ 1e-6`: the f32 search keeps the 1e-5 contract. For α just above 1,
//! `e` is huge (α = 1 + 2^-23 has `e = 2^23`, so `p` moves by half its value);
//! for α > 2, `e < 1` and the slope `u^(e−1)` is unbounded at the threshold
//! (α = 65.5: an entry `1e-7` above τ has `p ≈ 0.78·p_max`). Those α get τ,
//! `u` and `p` in f64, as the reference computes them.
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

/// Smallest α searched in f32 (see the module docs): α ∈ [1.125, 2] keeps
/// `e = 1/(α−1) ≤ 8`.
pub(crate) const F32_ALPHA_MIN: f32 = 1.125;

/// Whether α is searched in f32 ([`solve_tau`]); other α use [`solve_tau64`].
#[inline]
pub(crate) fn f32_search(alpha: f32) -> bool {
    (F32_ALPHA_MIN..=2.0).contains(&alpha)
}

/// Stop the f64 search when `|Σp − 1| < TOL64`.
pub(crate) const TOL64: f64 = 1e-12;
/// Update cap of the f64 search (about 55 bisections exhaust a bracket of
/// width 1 in f64; Halley steps normally stop it far earlier).
pub(crate) const MAX_ITER64: u32 = 100;

/// Threshold τ in f64 of the candidates `s` (scaled scores *shifted so that
/// the row maximum is 0*, every entry `> −1`: no other entry can be in the
/// support) of a row with `n ≥ 1` visible entries, by the crate's
/// [`TauBracket::halley`] rule on f64 sums
/// ([`crate::entmax::threshold_sums_f64`]: `f`, `f'`, `f''`).
///
/// Stops when `|f(τ)| < TOL64`; when `|f| < 1e-6` and the Newton distance
/// `|f/f'|` is within 4 ulp of τ (the sums cannot resolve τ better; near a
/// kink for α > 2, `|f'|` is huge while `|f|` is not small, hence the first
/// condition); when τ stops moving; or after [`MAX_ITER64`] updates. The result is clamped into the final bracket
/// and is `< 0` (strictly below the maximum, which therefore stays in the
/// support).
pub(crate) fn solve_tau64(alpha: f64, s: &[f64], n: usize) -> f64 {
    let mut br = TauBracket::for_row(0.0, n, alpha);
    if n <= 1 {
        return br.lo;
    }
    let mut tau = br.midpoint();
    for _ in 0..MAX_ITER64 {
        let t = crate::entmax::threshold_sums_f64(s, tau, alpha);
        let newton = (t.f / t.df).abs();
        if t.f.abs() < TOL64 || (t.f.abs() < 1e-6 && newton <= 4.0 * f64::EPSILON * tau.abs()) {
            break;
        }
        let next = br.halley(tau, t.f, t.df, t.ddf).tau;
        if next == tau || next.is_nan() {
            break;
        }
        tau = next;
    }
    let tau = tau.clamp(br.lo, br.hi);
    if tau < 0.0 { tau } else { br.lo }
}

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
    if tau >= max_s {
        tau = max_s.next_down();
    }
    for _ in 0..MAX_ITER {
        let (f, df, ddf) = derivs(mode, sums(tau));
        if f.abs() < TOL {
            break;
        }
        let step = br.halley(f64::from(tau), f, df, ddf);
        let mut next = step.tau as f32;
        if next >= max_s {
            // Rounded up to the maximum: keep the largest entry in the support.
            next = max_s.next_down();
        }
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
