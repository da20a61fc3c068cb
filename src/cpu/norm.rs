//! Row normalisers: softmax and α-entmax over ragged f32 rows.
//!
//! Rows are independent and run in parallel; each row is computed by one
//! thread with a fixed reduction order.
//!
//! * softmax: `p_i = exp(x_i − m) / Σ_j exp(x_j − m)`, `m = max x`
//!   (SIMD max, vectorised exp-and-sum, one scaling pass).
//! * entmax, α ∈ [1.125, 2]: `s_i = (α−1)(x_i − m)` in place, τ by
//!   [`super::tau::solve_tau`] on SIMD threshold sums taken over chunks of
//!   [`CHUNK`] entries and added in f64 — over the candidates `s > −1` only
//!   (τ ≥ −1 = τ_lo), then `p_i = [s_i − τ]_+^{1/(α−1)}`
//!   renormalised by its sum.
//! * entmax, any other α (just above 1, or above 2): f32 is not enough
//!   (see `tau.rs`), so `s`, τ ([`super::tau::solve_tau64`]), `u` and `p`
//!   are computed in f64 from the f32 logits, exactly as the reference
//!   forms them, and `p` is rounded to f32 once.
#![forbid(unsafe_code)]

use rayon::prelude::*;

use super::Cpu;
use super::exact::weights64;
use super::isa::Isa;
use super::simd::{self, PowMode};
use super::tau::{f32_search, solve_tau};
use super::workspace::grow;
use crate::backend::{EntmaxRowsMeta, NormOps, RowsMeta};
use crate::error::Result;
use crate::layout::Ragged;

/// Entries per partial threshold sum (f32 inside, f64 across chunks).
pub(crate) const CHUNK: usize = 256;

/// Splits `out` into the rows of `rows` (mutable, disjoint).
pub(crate) fn split_rows<'a, T>(rows: &Ragged, mut out: &'a mut [T]) -> Vec<&'a mut [T]> {
    let mut v = Vec::with_capacity(rows.num_segments());
    for r in 0..rows.num_segments() {
        let (head, tail) = out.split_at_mut(rows.len_of(r));
        v.push(head);
        out = tail;
    }
    v
}

/// Softmax of one row in place: `-inf` → 0, no finite entry → zeros,
/// NaN or `+inf` anywhere → NaN everywhere.
pub(crate) fn softmax_row_inplace(isa: Isa, out: &mut [f32]) {
    let m = simd::max_f32(isa, out);
    if m == f32::NEG_INFINITY {
        // The SIMD max skips NaN: a row of only NaN and -inf lands here.
        let fill = if out.iter().any(|x| x.is_nan()) {
            f32::NAN
        } else {
            0.0
        };
        out.fill(fill);
        return;
    }
    if !m.is_finite() {
        out.fill(f32::NAN);
        return;
    }
    let sum = simd::exp_sum(isa, out, m);
    if sum.is_nan() {
        out.fill(f32::NAN);
        return;
    }
    simd::scale_f32(isa, out, 1.0 / sum);
}

/// Scratch of the entmax threshold searches: f32 and f64 candidates, and a
/// row of f64 logits or weights (the f64 path, `exact.rs`).
#[derive(Debug, Default)]
pub(crate) struct Cand {
    pub f32: Vec<f32>,
    pub f64: Vec<f64>,
    pub z: Vec<f64>,
}

/// α-entmax (α > 1) of one logit row in place, output renormalised; returns
/// τ in the scaled space `(α−1)·x` of the unshifted row (`+inf` when no
/// entry is finite, NaN for a NaN / `+inf` row). α ∈ [1.125, 2]: f32 search
/// ([`entmax_row_inplace_f32`]); other α: f64 ([`entmax_row_inplace_f64`]).
pub(crate) fn entmax_row_inplace(isa: Isa, row: &mut [f32], alpha: f32, cand: &mut Cand) -> f32 {
    if f32_search(alpha) {
        entmax_row_inplace_f32(isa, row, alpha, &mut cand.f32)
    } else {
        entmax_row_inplace_f64(row, alpha, cand)
    }
}

/// [`entmax_row_inplace`] with the f32 τ search.
///
/// One pass shifts and scales the row (`s = (α−1)(x − max)`, so `max s = 0`)
/// and copies the *candidates* `s > −1` into `cand`: τ ≥ τ_lo = −1, so no
/// other entry can ever be in the support, and the Halley iterations sweep
/// only the candidates (typically a small share of the row). Then one pass
/// writes `p = [s − τ]_+^{1/(α−1)}` and one renormalises.
pub(crate) fn entmax_row_inplace_f32(
    isa: Isa,
    row: &mut [f32],
    alpha: f32,
    cand: &mut Vec<f32>,
) -> f32 {
    let m = simd::max_f32(isa, row);
    if m == f32::NEG_INFINITY {
        // The SIMD max skips NaN: a row of only NaN and -inf lands here.
        if row.iter().any(|x| x.is_nan()) {
            row.fill(f32::NAN);
            return f32::NAN;
        }
        row.fill(0.0);
        return f32::INFINITY;
    }
    if !m.is_finite() {
        row.fill(f32::NAN);
        return f32::NAN;
    }
    let am1 = alpha - 1.0;
    let c = grow(cand, row.len());
    let (k, fin, nan) = simd::shift_select(isa, row, m, am1, -1.0, c);
    if nan {
        row.fill(f32::NAN);
        return f32::NAN;
    }
    let c = &c[..k];
    let mode = PowMode::for_alpha(alpha);
    let tau = solve_tau(alpha, 0.0, fin, |t| chunked_sums(isa, c, t, mode));
    let sum = chunked_apply(isa, row, tau, mode);
    if sum > 0.0 && sum.is_finite() {
        simd::scale_f32(isa, row, (1.0 / sum) as f32);
    }
    tau + am1 * m
}

/// [`entmax_row_inplace`] in f64 ([`super::exact::weights64`] on the f32
/// logits widened: the reference's `s = (α−1)(x − max)`, τ by
/// [`super::tau::solve_tau64`], `p` rounded to f32 once).
pub(crate) fn entmax_row_inplace_f64(row: &mut [f32], alpha: f32, cand: &mut Cand) -> f32 {
    cand.z.clear();
    cand.z.extend(row.iter().map(|&x| f64::from(x)));
    let tau = weights64(&mut cand.z, Some(alpha), &mut cand.f64);
    for (x, &p) in row.iter_mut().zip(&cand.z) {
        *x = p as f32;
    }
    tau as f32
}

/// Threshold sums of a scaled row, chunk by chunk, added in f64.
pub(crate) fn chunked_sums(isa: Isa, s: &[f32], tau: f32, mode: PowMode) -> (f64, f64, f64) {
    let mut t = (0.0f64, 0.0f64, 0.0f64);
    for c in s.chunks(CHUNK) {
        let (a, b, n) = simd::pow_relu_sum(isa, c, tau, mode);
        t.0 += f64::from(a);
        t.1 += f64::from(b);
        t.2 += f64::from(n);
    }
    t
}

/// `s = [s − τ]_+^e` in place, chunk by chunk; returns the f64 sum.
pub(crate) fn chunked_apply(isa: Isa, s: &mut [f32], tau: f32, mode: PowMode) -> f64 {
    s.chunks_mut(CHUNK)
        .map(|c| f64::from(simd::pow_relu_apply(isa, c, tau, mode)))
        .sum()
}

/// α-entmax of one row into `out`.
pub(crate) fn entmax_row(isa: Isa, x: &[f32], alpha: f32, out: &mut [f32], cand: &mut Cand) {
    out.copy_from_slice(x);
    entmax_row_inplace(isa, out, alpha, cand);
}

impl NormOps for Cpu {
    fn softmax_rows(&self, meta: &RowsMeta, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        let isa = self.isa;
        let rows = &meta.rows;
        let outs = split_rows(rows, out);
        self.install(|| {
            outs.into_par_iter().enumerate().for_each(|(r, o)| {
                o.copy_from_slice(&x[rows.range(r)]);
                softmax_row_inplace(isa, o);
            })
        });
        Ok(())
    }

    fn entmax_rows(&self, meta: &EntmaxRowsMeta, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        let isa = self.isa;
        let rows = &meta.rows;
        let outs = split_rows(rows, out);
        self.install(|| {
            outs.into_par_iter().enumerate().for_each(|(r, o)| {
                self.cands
                    .with(|cand| entmax_row(isa, &x[rows.range(r)], meta.alphas[r], o, cand));
            })
        });
        Ok(())
    }
}
