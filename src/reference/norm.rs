use crate::backend::{EntmaxRowsMeta, NormOps, RowsMeta};
use crate::error::Result;

use super::Reference;

/// Classifies a row: `Err(())` if it holds NaN or `+inf`, else the indices
/// of its finite entries.
fn finite_entries(z: &[f64]) -> std::result::Result<Vec<usize>, ()> {
    if z.iter().any(|x| x.is_nan() || *x == f64::INFINITY) {
        return Err(());
    }
    Ok((0..z.len()).filter(|&i| z[i].is_finite()).collect())
}

/// Softmax of one row in f64: `exp(z_i − max) / Σ exp(z_j − max)`.
///
/// `-inf` entries get exactly 0; a row with no finite entry gives zeros; a
/// row with NaN or `+inf` gives NaN everywhere.
pub fn softmax_f64(z: &[f64]) -> Vec<f64> {
    let Ok(fin) = finite_entries(z) else {
        return vec![f64::NAN; z.len()];
    };
    let mut p = vec![0.0; z.len()];
    if fin.is_empty() {
        return p;
    }
    let m = fin.iter().map(|&i| z[i]).fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for &i in &fin {
        p[i] = (z[i] - m).exp();
        sum += p[i];
    }
    for &i in &fin {
        p[i] /= sum;
    }
    p
}

/// α-entmax of one row in f64 (α > 1): exact sort-based algorithms for
/// α = 2 (sparsemax) and α = 1.5, long bisection otherwise
/// ([`crate::entmax::entmax_exact_f64`]).
///
/// Masking rules as [`softmax_f64`]. α is assumed validated (> 1, finite).
pub fn entmax_f64(z: &[f64], alpha: f64) -> Vec<f64> {
    let Ok(fin) = finite_entries(z) else {
        return vec![f64::NAN; z.len()];
    };
    let mut p = vec![0.0; z.len()];
    if fin.is_empty() {
        return p;
    }
    let zf: Vec<f64> = fin.iter().map(|&i| z[i]).collect();
    match crate::entmax::entmax_exact_f64(&zf, alpha) {
        Ok((pf, _tau)) => {
            for (k, &i) in fin.iter().enumerate() {
                p[i] = pf[k];
            }
            p
        }
        // Unreachable with validated α and finite entries; keep the NaN rule.
        Err(_) => vec![f64::NAN; z.len()],
    }
}

impl NormOps for Reference {
    fn softmax_rows(&self, meta: &RowsMeta, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        for r in 0..meta.rows.num_segments() {
            let range = meta.rows.range(r);
            let z: Vec<f64> = x[range.clone()].iter().map(|&v| f64::from(v)).collect();
            for (o, p) in out[range].iter_mut().zip(softmax_f64(&z)) {
                *o = p as f32;
            }
        }
        Ok(())
    }

    fn entmax_rows(&self, meta: &EntmaxRowsMeta, x: &Vec<f32>, out: &mut Vec<f32>) -> Result<()> {
        for r in 0..meta.rows.num_segments() {
            let range = meta.rows.range(r);
            let z: Vec<f64> = x[range.clone()].iter().map(|&v| f64::from(v)).collect();
            let p = entmax_f64(&z, f64::from(meta.alphas[r]));
            for (o, p) in out[range].iter_mut().zip(p) {
                *o = p as f32;
            }
        }
        Ok(())
    }
}
