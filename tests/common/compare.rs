//! Comparisons with useful failure messages.

use super::tolerance::Tolerance;

/// Asserts `actual ≈ expected` element-wise; `ctx` names the case (seed,
/// shape, distribution).
#[track_caller]
pub fn assert_close(actual: &[f64], expected: &[f64], tol: Tolerance, ctx: &str) {
    assert_eq!(actual.len(), expected.len(), "{ctx}: length differs");
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            tol.allows(a, e),
            "{ctx}: index {i}: got {a}, expected {e} (|diff| = {}, tol {tol:?})",
            (a - e).abs()
        );
    }
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Asserts each row is a probability vector: non-negative and summing to 1
/// within `eps` (rows with no finite input must be all zero instead).
#[track_caller]
pub fn assert_simplex(p: &[f32], eps: f64, ctx: &str) {
    assert!(
        p.iter().all(|&x| x >= 0.0),
        "{ctx}: negative probability in {p:?}"
    );
    let s: f64 = p.iter().map(|&x| f64::from(x)).sum();
    assert!((s - 1.0).abs() <= eps, "{ctx}: sum = {s}");
}

/// Asserts two selections are the same set, allowing an index to differ only
/// when its reference score lies within `tie_eps` of the k-th largest
/// reference score (a genuine near-tie that summation order may flip).
#[track_caller]
pub fn assert_same_selection(
    actual: &[u32],
    expected: &[u32],
    scores: &[f32],
    tie_eps: f32,
    ctx: &str,
) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{ctx}: selection sizes differ"
    );
    if actual == expected {
        return;
    }
    let mut sorted: Vec<f32> = expected.iter().map(|&i| scores[i as usize]).collect();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let kth = sorted.first().copied().unwrap_or(f32::NEG_INFINITY);
    for i in actual
        .iter()
        .filter(|i| !expected.contains(i))
        .chain(expected.iter().filter(|i| !actual.contains(i)))
    {
        let s = scores[*i as usize];
        assert!(
            (s - kth).abs() <= tie_eps || (s == kth),
            "{ctx}: index {i} (score {s}) differs and is not a near-tie of the k-th score {kth}"
        );
    }
}
