//! TEMPORARY placeholder (replaced by the entmax module).
use crate::error::Result;
/// Placeholder: bisection in f64.
pub fn entmax_exact_f64(z: &[f64], alpha: f64) -> Result<(Vec<f64>, f64)> {
    let am1 = alpha - 1.0;
    let s: Vec<f64> = z.iter().map(|x| x * am1).collect();
    let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let (mut lo, mut hi) = (m - 1.0, m);
    let p = |t: f64| -> Vec<f64> {
        s.iter()
            .map(|x| if *x > t { (x - t).powf(1.0 / am1) } else { 0.0 })
            .collect()
    };
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if p(mid).iter().sum::<f64>() >= 1.0 {
            lo = mid
        } else {
            hi = mid
        }
    }
    let mut out = p(lo);
    let sum: f64 = out.iter().sum();
    out.iter_mut().for_each(|x| *x /= sum);
    Ok((out, lo))
}
