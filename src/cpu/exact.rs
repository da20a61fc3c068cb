//! The f64 path of the attention kernels: logits, normaliser and weights in
//! f64, for what f32 cannot do accurately.
//!
//! Two cases use it (see `docs/numerics.md`):
//!
//! * α-entmax with α outside [1.125, 2] ([`needs_f64`]): the weights are too
//!   sensitive to f32 rounding, of τ (α → 1: `p = u^{1/(α−1)}` with a huge
//!   exponent) and, for α > 2, of the logits themselves: a logit error `δ`
//!   changes the weight of an entry whose scaled score lies `u` above τ by
//!   `δ/u` of itself, and for α > 2 that weight is not small near τ
//!   (α = 65.5: `p ∝ u^{0.0155}`);
//! * a row whose f32 logits are not all finite although the inputs may be
//!   (`q · k` past 3.4e38).
//!
//! Logits are `scale · Σ q_i k_i` with every product exact (an f32 × f32
//! product fits in f64) and the sum in f64 over eight interleaved lanes
//! (fixed order, so results do not depend on threads); the normaliser is the
//! reference's formula in f64 (softmax `exp(z − max)/Σ`; entmax
//! `s = (α−1)(z − max)`, τ by [`solve_tau64`] for α < 2 and the support and
//! weights by the reference's `entmax::kink_solve` for α > 2,
//! `p = [s − τ]_+^{1/(α−1)}/Σp`).
#![forbid(unsafe_code)]

use super::tau::{f32_search, solve_tau64};
use crate::dtype::Element;

/// Whether the normaliser of a head (`None`: softmax) runs in f64.
#[inline]
pub(crate) fn needs_f64(alpha: Option<f32>) -> bool {
    alpha.is_some_and(|a| !f32_search(a))
}

/// `Σ_i a_i b_i` in f64 (exact products, eight accumulators in a fixed
/// order).
pub(crate) fn dot64<T: Element>(a: &[T], b: &[T]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            acc[l] += x[l].to_f64() * y[l].to_f64();
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += x.to_f64() * y.to_f64();
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))
}

/// Normalises the logits `z` in place into weights (f64): `-inf` → 0; no
/// finite entry → zeros; a NaN or `+inf` anywhere → NaN everywhere (the
/// reference's rules). `alpha`: `None` softmax, `Some(α)` α-entmax, with the
/// candidates of the threshold search in `cand`.
///
/// Returns τ (entmax) in the scaled space `(α−1)·z` of the unshifted row, 0
/// for softmax, `+inf` for a row with no finite entry, NaN for a NaN row.
pub(crate) fn weights64(z: &mut [f64], alpha: Option<f32>, cand: &mut Vec<f64>) -> f64 {
    if z.iter().any(|x| x.is_nan() || *x == f64::INFINITY) {
        z.fill(f64::NAN);
        return f64::NAN;
    }
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        z.fill(0.0);
        return f64::INFINITY;
    }
    let Some(alpha) = alpha else {
        let mut sum = 0.0;
        for x in z.iter_mut() {
            *x = (*x - m).exp();
            sum += *x;
        }
        z.iter_mut().for_each(|x| *x /= sum);
        return 0.0;
    };
    let a = f64::from(alpha);
    let (am1, c0) = (a - 1.0, 1.0 / (a - 1.0));
    // The reference's shifted scaled score (exactly 0 at the maximum).
    let scaled = |x: f64| {
        let d = x - m;
        if d == 0.0 { 0.0 } else { am1 * d }
    };
    cand.clear();
    let mut n = 0usize;
    for &x in z.iter() {
        if x > f64::NEG_INFINITY {
            n += 1;
            let s = scaled(x);
            if s > -1.0 {
                cand.push(s);
            }
        }
    }
    // α > 2: the weight of the smallest support entry is solved for, not τ
    // (`entmax::kink_solve`, as the reference does); α < 2: τ by Halley.
    let (tau, kink) = if a > 2.0 {
        let k = crate::entmax::kink_solve(cand, a);
        (k.tau(), Some(k))
    } else {
        (solve_tau64(a, cand, n), None)
    };
    let pw = |s: f64| match kink {
        Some(k) => k.weight(s, c0),
        None => {
            let u = s - tau;
            if u > 0.0 { u.powf(c0) } else { 0.0 }
        }
    };
    let sum: f64 = cand.iter().map(|&s| pw(s)).sum();
    let inv = if sum > 0.0 && sum.is_finite() {
        1.0 / sum
    } else {
        0.0
    };
    for x in z.iter_mut() {
        *x = if *x > f64::NEG_INFINITY {
            pw(scaled(*x)) * inv
        } else {
            0.0
        };
    }
    tau + am1 * m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot64_is_exact_on_f32_products() {
        let a: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 1e-7).collect();
        let b: Vec<f32> = (0..37).map(|i| 3e19 - i as f32 * 1e12).collect();
        let want: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        assert!((dot64(&a, &b) - want).abs() <= 1e-15 * want.abs());
        assert_eq!(dot64::<f32>(&[], &[]), 0.0);
    }

    #[test]
    fn weights64_follow_the_reference_rules() {
        let mut c = Vec::new();
        for alpha in [None, Some(1.05f32), Some(1.5), Some(4.0), Some(1e9)] {
            let mut z = vec![1e300, 1e300, f64::NEG_INFINITY];
            weights64(&mut z, alpha, &mut c);
            assert_eq!(z, vec![0.5, 0.5, 0.0], "{alpha:?}");
            let mut z = vec![f64::NEG_INFINITY; 2];
            weights64(&mut z, alpha, &mut c);
            assert_eq!(z, vec![0.0; 2]);
            let mut z = vec![0.0, f64::NAN];
            weights64(&mut z, alpha, &mut c);
            assert!(z.iter().all(|x| x.is_nan()));
        }
    }
}
