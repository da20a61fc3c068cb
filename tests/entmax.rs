//! Integration tests of `kvsieve::entmax`: solver cross-checks, f32 accuracy on long rows,
//! mathematical properties, finite-difference checks of the backward pass and the iteration
//! counts of Halley versus bisection.

use kvsieve::entmax::{
    EntmaxOptions, entmax_alpha_grad_f64, entmax_bisect, entmax_bisect_f64, entmax_exact_f64,
    entmax_halley, entmax_halley_f64, entmax_vjp, entmax_vjp_f64, entmax15_exact, sparsemax_exact,
};

/// SplitMix64 (Steele, Lea, Flood 2014), written out so the tests need no `rand`.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

fn normal_row(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| scale * rng.normal()).collect()
}

/// Many exact ties: values on a coarse grid.
fn tied_row(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| 0.5 * rng.below(5) as f64).collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn tight() -> EntmaxOptions {
    EntmaxOptions::new(100, 1e-12)
}

fn long_bisect() -> EntmaxOptions {
    EntmaxOptions::new(200, 0.0)
}

#[test]
fn exact_vs_bisection_vs_halley_alpha_15_and_2() {
    let mut rng = Rng(1);
    for n in 1..=300usize {
        for kind in 0..2 {
            let z = if kind == 0 {
                let scale = 1.0 + 4.0 * rng.uniform();
                normal_row(&mut rng, n, scale)
            } else {
                tied_row(&mut rng, n)
            };
            for alpha in [1.5, 2.0] {
                let (pe, te) = if alpha == 2.0 {
                    sparsemax_exact(&z).unwrap()
                } else {
                    entmax15_exact(&z).unwrap()
                };
                let (pr, tr) = entmax_exact_f64(&z, alpha).unwrap();
                assert_eq!(pe, pr);
                assert_eq!(te, tr);
                let b = entmax_bisect_f64(&z, alpha, &long_bisect()).unwrap();
                let h = entmax_halley_f64(&z, alpha, &tight()).unwrap();
                let ctx = format!("n {n} kind {kind} alpha {alpha}");
                assert!(max_abs_diff(&pe, &b.probs) < 1e-12, "bisect {ctx}");
                assert!(max_abs_diff(&pe, &h.probs) < 1e-10, "halley {ctx}");
                assert!((te - b.tau).abs() < 1e-12, "bisect tau {ctx}");
                assert!((te - h.tau).abs() < 1e-10, "halley tau {ctx}");
                assert!(h.converged, "{ctx}");
                let sum: f64 = pe.iter().sum();
                assert!((sum - 1.0).abs() < 1e-12, "{ctx}: sum {sum}");
                assert!(pe.iter().all(|&p| p >= 0.0));
                // Support = strict s_i > τ.
                let support = pe.iter().filter(|&&p| p > 0.0).count();
                assert_eq!(support, b.support, "{ctx}");
            }
        }
    }
}

#[test]
fn bisection_vs_halley_generic_alpha() {
    let mut rng = Rng(2);
    for alpha in [1.1, 1.25, 1.333, 1.75, 2.5, 3.0] {
        for n in (1..=300usize).step_by(7) {
            for kind in 0..2 {
                let z = if kind == 0 {
                    let scale = 1.0 + 4.0 * rng.uniform();
                    normal_row(&mut rng, n, scale)
                } else {
                    tied_row(&mut rng, n)
                };
                let (pe, te) = entmax_exact_f64(&z, alpha).unwrap();
                let h = entmax_halley_f64(&z, alpha, &tight()).unwrap();
                let ctx = format!("n {n} kind {kind} alpha {alpha}: {h:?}");
                assert!(h.converged, "{ctx}");
                assert!(max_abs_diff(&pe, &h.probs) < 1e-9, "{ctx}");
                assert!((te - h.tau).abs() < 1e-9, "{ctx}");
                let b = entmax_bisect_f64(&z, alpha, &EntmaxOptions::new(100, 1e-12)).unwrap();
                assert!(max_abs_diff(&pe, &b.probs) < 1e-9, "{ctx}");
            }
        }
    }
}

/// The f32 API against the f64 reference on long rows: |p − exact| ≤ 1e-5, |Σp − 1| ≤ 1e-5.
#[test]
fn f32_api_accuracy_long_rows() {
    let mut rng = Rng(3);
    let mut worst = 0.0f64;
    for n in [128usize, 1024, 8192, 32768] {
        for kind in 0..4 {
            for alpha in [1.25f32, 1.5, 1.75, 2.0] {
                let scale = 1.0 + 4.0 * rng.uniform();
                let mut z: Vec<f32> = normal_row(&mut rng, n, scale)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect();
                match kind {
                    // Attention sink: one dominant token.
                    1 => z[rng.below(n)] = 20.0 * scale as f32,
                    // Exact ties, including at the max.
                    2 => {
                        for v in &mut z {
                            *v = (*v * 2.0).round() * 0.5;
                        }
                    }
                    // 30% masked.
                    3 => {
                        for v in &mut z {
                            if rng.uniform() < 0.3 {
                                *v = f32::NEG_INFINITY;
                            }
                        }
                    }
                    _ => {}
                }
                let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
                let (pe, _) = entmax_exact_f64(&z64, f64::from(alpha)).unwrap();
                for (name, r) in [
                    (
                        "halley",
                        entmax_halley(&z, alpha, &EntmaxOptions::default()).unwrap(),
                    ),
                    (
                        "bisect",
                        entmax_bisect(&z, alpha, &EntmaxOptions::bisection()).unwrap(),
                    ),
                ] {
                    let p: Vec<f64> = r.probs.iter().map(|&x| f64::from(x)).collect();
                    let err = max_abs_diff(&p, &pe);
                    let sum: f64 = p.iter().sum();
                    let ctx = format!("{name} n {n} kind {kind} alpha {alpha}");
                    assert!(err <= 1e-5, "{ctx}: err {err}");
                    assert!((sum - 1.0).abs() <= 1e-5, "{ctx}: sum {sum}");
                    assert!(p.iter().all(|&x| x >= 0.0), "{ctx}");
                    if kind == 3 {
                        for (zi, pi) in z.iter().zip(&p) {
                            if *zi == f32::NEG_INFINITY {
                                assert_eq!(*pi, 0.0);
                            }
                        }
                    }
                    worst = worst.max(err);
                }
            }
        }
    }
    println!("worst |p - exact| over the f32 API: {worst:.3e}");
}

#[test]
fn shift_and_permutation() {
    let mut rng = Rng(4);
    for alpha in [1.25, 1.5, 1.75, 2.0, 2.5] {
        for n in [1usize, 2, 5, 33, 257] {
            let z = normal_row(&mut rng, n, 2.0);
            let base = entmax_halley_f64(&z, alpha, &tight()).unwrap();
            for c in [-3.75, 100.0] {
                let zc: Vec<f64> = z.iter().map(|x| x + c).collect();
                let r = entmax_halley_f64(&zc, alpha, &tight()).unwrap();
                assert!(max_abs_diff(&r.probs, &base.probs) < 1e-9);
                // τ shifts by (α−1)c.
                assert!((r.tau - base.tau - (alpha - 1.0) * c).abs() < 1e-9);
            }
            // A rotation followed by a reversal.
            let k = rng.below(n);
            let perm: Vec<usize> = (0..n).map(|i| (n - 1 - i + k) % n).collect();
            let zp: Vec<f64> = perm.iter().map(|&i| z[i]).collect();
            let r = entmax_halley_f64(&zp, alpha, &tight()).unwrap();
            for (j, &i) in perm.iter().enumerate() {
                assert!((r.probs[j] - base.probs[i]).abs() < 1e-12);
            }
        }
    }
}

#[test]
fn alpha_two_is_sparsemax_and_support_shrinks_with_alpha() {
    let mut rng = Rng(5);
    let grid = [1.1, 1.25, 1.333, 1.5, 1.75, 2.0, 2.5, 3.0];
    for n in [3usize, 10, 64, 500] {
        for _ in 0..5 {
            let scale = 1.0 + 2.0 * rng.uniform();
            let z = normal_row(&mut rng, n, scale);
            let (ps, ts) = sparsemax_exact(&z).unwrap();
            let h = entmax_halley_f64(&z, 2.0, &tight()).unwrap();
            assert!(max_abs_diff(&ps, &h.probs) < 1e-12);
            assert!((ts - h.tau).abs() < 1e-12);
            let b = entmax_bisect_f64(&z, 2.0, &long_bisect()).unwrap();
            assert!(max_abs_diff(&ps, &b.probs) < 1e-12);
            let mut prev = usize::MAX;
            for alpha in grid {
                let (p, _) = entmax_exact_f64(&z, alpha).unwrap();
                let support = p.iter().filter(|&&x| x > 0.0).count();
                assert!(support <= prev, "n {n} alpha {alpha}: {support} > {prev}");
                prev = support;
            }
        }
    }
}

#[test]
fn jacobian_rows_sum_to_zero() {
    let mut rng = Rng(6);
    for alpha in [1.25, 1.5, 2.0, 3.0] {
        for n in [1usize, 4, 50, 300] {
            let z = normal_row(&mut rng, n, 2.0);
            let (p, _) = entmax_exact_f64(&z, alpha).unwrap();
            for c in [1.0, -2.5] {
                let dz = entmax_vjp_f64(&p, &vec![c; n], alpha).unwrap();
                assert!(dz.iter().all(|x| x.abs() < 1e-12), "{dz:?}");
            }
            // f32 version agrees.
            let p32: Vec<f32> = p.iter().map(|&x| x as f32).collect();
            let dy: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let dy32: Vec<f32> = dy.iter().map(|&x| x as f32).collect();
            let a = entmax_vjp(&p32, &dy32, alpha as f32).unwrap();
            let b = entmax_vjp_f64(&p, &dy, alpha).unwrap();
            for (x, y) in a.iter().zip(&b) {
                assert!((f64::from(*x) - y).abs() < 1e-5);
            }
        }
    }
}

/// dz from the VJP versus central differences of L(z) = Σ dy_i p_i(z) (h = 1e-6, f64).
#[test]
fn vjp_matches_finite_differences() {
    let mut rng = Rng(7);
    let h = 1e-6;
    for alpha in [1.25, 1.5, 2.0] {
        for n in [2usize, 5, 12, 40] {
            for _ in 0..3 {
                let z = normal_row(&mut rng, n, 1.5);
                let dy: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
                let loss = |z: &[f64]| -> f64 {
                    let (p, _) = entmax_exact_f64(z, alpha).unwrap();
                    p.iter().zip(&dy).map(|(a, b)| a * b).sum()
                };
                let (p, tau) = entmax_exact_f64(&z, alpha).unwrap();
                // Skip rows with an entry within 1e-4 of the threshold (p is not smooth there).
                if z.iter().any(|&x| ((alpha - 1.0) * x - tau).abs() < 1e-4) {
                    continue;
                }
                let dz = entmax_vjp_f64(&p, &dy, alpha).unwrap();
                for j in 0..n {
                    let mut zp = z.clone();
                    zp[j] += h;
                    let mut zm = z.clone();
                    zm[j] -= h;
                    let fd = (loss(&zp) - loss(&zm)) / (2.0 * h);
                    assert!(
                        (fd - dz[j]).abs() < 1e-6 * (1.0 + fd.abs()),
                        "alpha {alpha} n {n} j {j}: fd {fd} vjp {}",
                        dz[j]
                    );
                }
            }
        }
    }
}

/// ∂L/∂α versus central differences in α of L(α) = Σ dy_i p_i(α) for fixed z.
#[test]
fn alpha_gradient_matches_finite_differences() {
    let mut rng = Rng(8);
    let h = 1e-6;
    for alpha in [1.1, 1.25, 1.5, 1.75, 2.0, 2.5] {
        for n in [2usize, 6, 30, 200] {
            let z = normal_row(&mut rng, n, 1.5);
            let dy: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            let loss = |a: f64| -> f64 {
                let (p, _) = entmax_exact_f64(&z, a).unwrap();
                p.iter().zip(&dy).map(|(x, d)| x * d).sum()
            };
            let (p, _) = entmax_exact_f64(&z, alpha).unwrap();
            let g = entmax_alpha_grad_f64(&p, &dy, alpha).unwrap();
            let fd = (loss(alpha + h) - loss(alpha - h)) / (2.0 * h);
            assert!(
                (fd - g).abs() < 1e-5 * (1.0 + fd.abs()),
                "alpha {alpha} n {n}: fd {fd} formula {g}"
            );
        }
    }
}

/// Mean τ updates to reach |f(τ)| < 1e-6: safeguarded Halley versus plain bisection
/// (same bracket, same midpoint start, same counting).
#[test]
fn halley_needs_far_fewer_iterations_than_bisection() {
    let mut rng = Rng(9);
    let halley_opts = EntmaxOptions::new(100, 1e-6);
    let bisect_opts = EntmaxOptions::new(200, 1e-6);
    let (mut all_h, mut all_b, mut count) = (0u64, 0u64, 0u64);
    for alpha in [1.25f32, 1.5, 1.75, 2.0] {
        let (mut sh, mut sb, mut cnt, mut fb) = (0u64, 0u64, 0u64, 0u64);
        for n in [128usize, 512, 2048, 8192, 32768] {
            for _ in 0..3 {
                let scale = 1.0 + 4.0 * rng.uniform();
                let z: Vec<f32> = normal_row(&mut rng, n, scale)
                    .into_iter()
                    .map(|x| x as f32)
                    .collect();
                let h = entmax_halley(&z, alpha, &halley_opts).unwrap();
                let b = entmax_bisect(&z, alpha, &bisect_opts).unwrap();
                assert!(h.converged && b.converged);
                sh += u64::from(h.iterations);
                sb += u64::from(b.iterations);
                fb += u64::from(h.fallbacks);
                cnt += 1;
            }
        }
        println!(
            "alpha {alpha}: mean iterations to |f| < 1e-6: halley {:.2} (fallbacks {fb}), bisection {:.2}",
            sh as f64 / cnt as f64,
            sb as f64 / cnt as f64
        );
        all_h += sh;
        all_b += sb;
        count += cnt;
    }
    let (mh, mb) = (all_h as f64 / count as f64, all_b as f64 / count as f64);
    println!(
        "overall: halley {mh:.2}, bisection {mb:.2}, ratio {:.3}",
        mh / mb
    );
    assert!(mh <= mb / 4.0, "halley {mh} vs bisection {mb}");
}
