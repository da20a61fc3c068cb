//! Tests of every primitive under every available ISA against plain f64
//! loops.
//!
//! Tolerance rule for accumulations: `|got - exact| <= 1e-5 * Σ|term_k|`
//! (plus 1e-30 absolute), where `exact` is the f64 result on the same
//! (already rounded) inputs and the `term_k` are the products / summands.
//! This bounds f32 accumulation error independently of cancellation.
//! Element-wise operations (conversion, max, scale, count) must be exact;
//! `exp` must be within 2 ulp of the correctly rounded result.

use super::*;
use crate::cpu::isa::available;
use half::{bf16, f16};

const LENS: &[usize] = &[
    0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000,
];
const DS: &[usize] = &[1, 3, 64, 65, 128];

struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [lo, hi).
    fn f(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.f(lo, hi)).collect()
    }
    fn vec_t<T: Element>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::from_f32(self.f(-1.0, 1.0))).collect()
    }
}

fn all_ds() -> Vec<usize> {
    let mut v: Vec<usize> = LENS.iter().chain(DS).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

#[track_caller]
fn check(got: f32, exact: f64, abs_sum: f64, what: &dyn Fn() -> String) {
    let err = (f64::from(got) - exact).abs();
    assert!(
        err <= 1e-5 * abs_sum + 1e-30,
        "{}: got {got}, exact {exact}, err {err}, Σ|t| {abs_sum}",
        what()
    );
}

fn dot_multi_case<T: Element>() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for isa in available() {
        for &d in &all_ds() {
            for g in [1, 2, 3, 4, 5, 7, 8, 9, 12] {
                let qs = rng.vec(g * d, -1.0, 1.0);
                let row: Vec<T> = rng.vec_t(d);
                let mut out = vec![f32::NAN; g];
                dot_multi(isa, &qs, g, &row, &mut out);
                for i in 0..g {
                    let terms = (0..d).map(|k| f64::from(qs[i * d + k]) * row[k].to_f64());
                    let exact: f64 = terms.clone().sum();
                    let abs: f64 = terms.map(f64::abs).sum();
                    check(out[i], exact, abs, &|| {
                        format!("dot_multi {isa} {} d={d} g={g} i={i}", T::DTYPE)
                    });
                }
            }
        }
    }
}

#[test]
fn dot_multi_matches_f64() {
    dot_multi_case::<f32>();
    dot_multi_case::<f16>();
    dot_multi_case::<bf16>();
}

fn scores_rows_case<T: Element>() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let scale = 0.125f32;
    for isa in available() {
        for &d in DS {
            for n in [0, 1, 2, 3, 7, 17, 33] {
                for g in [1, 3, 4, 8, 9] {
                    let qs = rng.vec(g * d, -1.0, 1.0);
                    let rows: Vec<T> = rng.vec_t(n * d);
                    let mut out = vec![f32::NAN; g * n];
                    scores_rows(isa, &qs, g, &rows, d, scale, &mut out);
                    for i in 0..g {
                        for j in 0..n {
                            let terms = (0..d).map(|k| {
                                f64::from(scale)
                                    * f64::from(qs[i * d + k])
                                    * rows[j * d + k].to_f64()
                            });
                            let exact: f64 = terms.clone().sum();
                            let abs: f64 = terms.map(f64::abs).sum();
                            check(out[i * n + j], exact, abs, &|| {
                                format!("scores_rows {isa} {} d={d} n={n} g={g}", T::DTYPE)
                            });
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn scores_rows_matches_f64() {
    scores_rows_case::<f32>();
    scores_rows_case::<f16>();
    scores_rows_case::<bf16>();
}

fn axpy_multi_case<T: Element>() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for isa in available() {
        for &d in &all_ds() {
            for g in [1, 3, 5, 8] {
                let acc0 = rng.vec(g * d, -1.0, 1.0);
                let ps = rng.vec(g, 0.0, 1.0);
                let row: Vec<T> = rng.vec_t(d);
                let mut acc = acc0.clone();
                axpy_multi(isa, &mut acc, g, &ps, &row);
                for i in 0..g {
                    for k in 0..d {
                        let a = f64::from(acc0[i * d + k]);
                        let t = f64::from(ps[i]) * row[k].to_f64();
                        check(acc[i * d + k], a + t, a.abs() + t.abs(), &|| {
                            format!("axpy_multi {isa} {} d={d} g={g}", T::DTYPE)
                        });
                    }
                }
            }
        }
    }
}

#[test]
fn axpy_multi_matches_f64() {
    axpy_multi_case::<f32>();
    axpy_multi_case::<f16>();
    axpy_multi_case::<bf16>();
}

fn weighted_rows_case<T: Element>() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for isa in available() {
        for &d in DS {
            for n in [0, 1, 2, 3, 7, 17, 33, 65] {
                for g in [1, 3, 4, 8] {
                    let mut rows: Vec<T> = rng.vec_t(n * d);
                    let mut p = rng.vec(g * n, 0.0, 1.0);
                    for j in 0..n {
                        if j % 3 == 1 {
                            // A zero column: the row must not be read, so
                            // poison it with NaN.
                            for i in 0..g {
                                p[i * n + j] = if i % 2 == 0 { 0.0 } else { -0.0 };
                            }
                            rows[j * d..(j + 1) * d].fill(T::from_f32(f32::NAN));
                        } else if j % 3 == 2 {
                            // Zero for some heads only: the row is read.
                            p[j] = 0.0;
                        }
                    }
                    let acc0 = rng.vec(g * d, -1.0, 1.0);
                    let mut acc = acc0.clone();
                    weighted_rows(isa, &mut acc, g, &p, &rows, d);
                    for i in 0..g {
                        for k in 0..d {
                            let mut exact = f64::from(acc0[i * d + k]);
                            let mut abs = exact.abs();
                            for j in (0..n).filter(|j| j % 3 != 1) {
                                let t = f64::from(p[i * n + j]) * rows[j * d + k].to_f64();
                                exact += t;
                                abs += t.abs();
                            }
                            check(acc[i * d + k], exact, abs, &|| {
                                format!("weighted_rows {isa} {} d={d} n={n} g={g}", T::DTYPE)
                            });
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn weighted_rows_matches_f64_and_skips_zero_rows() {
    weighted_rows_case::<f32>();
    weighted_rows_case::<f16>();
    weighted_rows_case::<bf16>();
}

#[test]
fn max_and_scale_are_exact() {
    let mut rng = Rng(7);
    for isa in available() {
        assert_eq!(max_f32(isa, &[]), f32::NEG_INFINITY);
        for &n in LENS {
            let x = rng.vec(n, -100.0, 100.0);
            let exact = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_f32(isa, &x), exact, "max {isa} n={n}");
            // The maximum at every position (tails included).
            for pos in [0, n / 2, n.saturating_sub(1)] {
                if pos < n {
                    let mut y = x.clone();
                    y[pos] = 1e6;
                    assert_eq!(max_f32(isa, &y), 1e6, "max {isa} n={n} pos={pos}");
                }
            }
            let mut y = x.clone();
            scale_f32(isa, &mut y, 0.37);
            for (a, b) in x.iter().zip(&y) {
                assert_eq!(a * 0.37, *b, "scale {isa} n={n}");
            }
        }
    }
}

#[test]
fn count_above_is_exact() {
    let mut rng = Rng(11);
    for isa in available() {
        for &n in LENS {
            // Quantised values so that ties with tau occur.
            let x: Vec<f32> = (0..n).map(|_| (rng.f(-4.0, 4.0)).round()).collect();
            for tau in [f32::NEG_INFINITY, -1.0, 0.0, 0.5, 2.0, f32::INFINITY] {
                let exact = x.iter().filter(|&&v| v > tau).count();
                assert_eq!(count_above(isa, &x, tau), exact, "{isa} n={n} tau={tau}");
            }
        }
    }
}

#[test]
fn offset_f32_adds_to_every_lane() {
    for isa in available() {
        for &n in LENS {
            let mut x: Vec<f32> = (0..n).map(|i| i as f32).collect();
            offset_f32(isa, &mut x, -2.5);
            let want: Vec<f32> = (0..n).map(|i| i as f32 - 2.5).collect();
            assert_eq!(x, want, "{isa} n={n}");
        }
    }
}

#[test]
fn all_finite_finds_every_non_finite_lane() {
    for isa in available() {
        for &n in LENS {
            let x: Vec<f32> = (0..n).map(|i| i as f32 - 3.0).collect();
            assert!(all_finite(isa, &x), "{isa} n={n}");
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                for at in [0, n / 2, n.saturating_sub(1)] {
                    if n == 0 {
                        continue;
                    }
                    let mut y = x.clone();
                    y[at] = bad;
                    assert!(!all_finite(isa, &y), "{isa} n={n} {bad} at {at}");
                }
            }
        }
    }
}

/// Distance in units in the last place between two non-negative floats.
fn ulps(a: f32, b: f32) -> u32 {
    a.to_bits().abs_diff(b.to_bits())
}

#[test]
fn exp_sum_matches_f64() {
    let mut rng = Rng(99);
    for isa in available() {
        for &n in LENS {
            let x = rng.vec(n, -30.0, 10.0);
            let shift = rng.f(-2.0, 8.0);
            let mut y = x.clone();
            let sum = exp_sum(isa, &mut y, shift);
            let mut exact_sum = 0.0f64;
            for (a, b) in x.iter().zip(&y) {
                let e = f64::from(a - shift).exp();
                exact_sum += e;
                assert!(
                    ulps(*b, e as f32) <= 2,
                    "exp {isa}: {a}-{shift}: {b} vs {e}"
                );
            }
            check(sum, exact_sum, exact_sum, &|| {
                format!("exp_sum {isa} n={n}")
            });
        }
        // Masked rows: -inf maps to exactly 0, the max element to exactly 1.
        let mut y = vec![f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY, 1.0, -200.0];
        let s = exp_sum(isa, &mut y, 3.0);
        assert_eq!(y[0], 0.0);
        assert_eq!(y[1], 1.0);
        assert_eq!(y[2], 0.0);
        assert_eq!(y[4], 0.0);
        assert_eq!(s, 1.0 + y[3]);
    }
}

#[test]
fn exp_accuracy_sweep() {
    for isa in available() {
        let n = 400_000;
        let lo = -104.5f32;
        let hi = 89.5f32;
        let mut x: Vec<f32> = (0..n)
            .map(|i| lo + (hi - lo) * (i as f32 / n as f32))
            .collect();
        x.extend([
            0.0,
            -0.0,
            f32::NEG_INFINITY,
            f32::INFINITY,
            f32::NAN,
            88.72283,
            88.72284,
            -87.33655,
            -103.97,
            -103.98,
            1e-8,
            -1e-8,
        ]);
        let mut y = x.clone();
        dispatch!(isa, exp_slice(&mut y));
        let mut worst = (0u32, 0.0f32);
        for (a, b) in x.iter().zip(&y) {
            let e = f64::from(*a).exp() as f32;
            if a.is_nan() {
                assert!(b.is_nan(), "{isa}: exp(NaN) = {b}");
                continue;
            }
            let u = ulps(*b, e);
            if u > worst.0 {
                worst = (u, *a);
            }
        }
        eprintln!("{isa}: exp worst {} ulp at {}", worst.0, worst.1);
        assert!(
            worst.0 <= 2,
            "{isa}: exp worst {} ulp at x = {}",
            worst.0,
            worst.1
        );
        let at = |v: f32| x.iter().position(|&a| a.to_bits() == v.to_bits()).unwrap();
        assert_eq!(y[at(0.0)], 1.0);
        assert_eq!(y[at(-0.0)], 1.0);
        assert_eq!(y[at(f32::NEG_INFINITY)].to_bits(), 0);
        assert_eq!(y[at(f32::INFINITY)], f32::INFINITY);
        assert_eq!(y[at(88.72284)], f32::INFINITY);
        assert!(y[at(88.72283)].is_finite());
    }
}

fn pow_ref(x: &[f32], tau: f32, e: f64) -> ([f64; 3], [f64; 3]) {
    let mut s = [0.0f64; 3];
    for &v in x {
        let z = f64::from(v - tau);
        if f64::from(v) > f64::from(tau) && z > 0.0 {
            s[0] += z.powf(e);
            s[1] += z.powf(e - 1.0);
            s[2] += 1.0;
        }
    }
    (s, s)
}

#[test]
fn pow_relu_sum_matches_f64() {
    let mut rng = Rng(1234);
    let modes = [
        (PowMode::for_alpha(1.5), 2.0),
        (PowMode::for_alpha(2.0), 1.0),
        (PowMode::for_alpha(1.25), 4.0),
        (PowMode::for_alpha(3.0), 0.5),
    ];
    assert_eq!(modes[0].0, PowMode::Alpha15);
    assert_eq!(modes[1].0, PowMode::Alpha2);
    for isa in available() {
        for &n in LENS {
            let x = rng.vec(n, -1.0, 1.0);
            for tau in [-2.0, rng.f(-0.5, 0.5), 0.0, 2.0] {
                for (mode, e) in modes {
                    let (got0, got1, got2) = pow_relu_sum(isa, &x, tau, mode);
                    let (exact, abs) = pow_ref(&x, tau, e);
                    let what = || format!("pow_relu_sum {isa} {mode:?} n={n} tau={tau}");
                    check(got0, exact[0], abs[0], &what);
                    check(got1, exact[1], abs[1], &what);
                    assert_eq!(f64::from(got2), exact[2], "{}", what());
                }
            }
        }
    }
}

fn conversion_case<T: Element>() {
    let mut rng = Rng(4242);
    for isa in available() {
        for &n in LENS {
            // Random bit patterns (NaN excluded) exercise rounding, overflow
            // and subnormals of the narrow types.
            let src: Vec<f32> = (0..n)
                .map(|i| {
                    let v = if i % 2 == 0 {
                        f32::from_bits(rng.next_u64() as u32)
                    } else {
                        rng.f(-70000.0, 70000.0) * 10f32.powi((i % 13) as i32 - 9)
                    };
                    if v.is_nan() { 1.0 } else { v }
                })
                .collect();
            let mut narrow = vec![T::default(); n];
            from_f32_slice(isa, &src, &mut narrow);
            for (a, b) in src.iter().zip(&narrow) {
                assert_eq!(
                    bytemuck::bytes_of(b),
                    bytemuck::bytes_of(&T::from_f32(*a)),
                    "from_f32 {isa} {} {a}",
                    T::DTYPE
                );
            }
            let mut wide = vec![f32::NAN; n];
            to_f32_slice(isa, &narrow, &mut wide);
            for (a, b) in narrow.iter().zip(&wide) {
                assert_eq!(a.to_f32().to_bits(), b.to_bits(), "to_f32 {isa}");
            }
        }
        // NaN stays NaN through narrowing.
        let mut one = [T::default(); 1];
        from_f32_slice(isa, &[f32::NAN], &mut one);
        assert!(one[0].to_f32().is_nan());
    }
}

#[test]
fn conversions_are_exact() {
    conversion_case::<f32>();
    conversion_case::<f16>();
    conversion_case::<bf16>();
}

#[test]
fn results_are_bitwise_reproducible() {
    let mut rng = Rng(5);
    let (g, d, n) = (4, 65, 37);
    let qs = rng.vec(g * d, -1.0, 1.0);
    let rows: Vec<bf16> = rng.vec_t(n * d);
    for isa in available() {
        let run = || {
            let mut sc = vec![0.0; g * n];
            scores_rows(isa, &qs, g, &rows, d, 0.1, &mut sc);
            let m = max_f32(isa, &sc);
            let s = exp_sum(isa, &mut sc, m);
            let mut acc = vec![0.0; g * d];
            weighted_rows(isa, &mut acc, g, &sc, &rows, d);
            (sc, s, acc)
        };
        let a = run();
        for _ in 0..3 {
            let b = run();
            assert_eq!(a.1.to_bits(), b.1.to_bits());
            assert!(
                a.0.iter()
                    .zip(&b.0)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
            );
            assert!(
                a.2.iter()
                    .zip(&b.2)
                    .all(|(x, y)| x.to_bits() == y.to_bits())
            );
        }
    }
}

#[test]
fn dot_does_not_depend_on_group_size_or_row_pairing() {
    let mut rng = Rng(77);
    for isa in available() {
        for d in [3, 64, 65, 128, 1000] {
            let g = 15; // blocks of 8, 4, 2 and 1 heads
            let qs = rng.vec(g * d, -1.0, 1.0);
            let row: Vec<f16> = rng.vec_t(d);
            let mut all = vec![0.0; g];
            dot_multi(isa, &qs, g, &row, &mut all);
            // Three rows: a pair (two rows per pass) and an odd last row.
            let rows: Vec<f16> = row.iter().copied().chain(rng.vec_t(2 * d)).collect();
            let mut rows_out = vec![0.0; g * 3];
            scores_rows(isa, &qs, g, &rows, d, 1.0, &mut rows_out);
            for i in 0..g {
                let mut one = [0.0];
                dot_multi(isa, &qs[i * d..(i + 1) * d], 1, &row, &mut one);
                assert_eq!(one[0].to_bits(), all[i].to_bits(), "{isa} d={d} i={i}");
                for j in 0..3 {
                    let mut one = [0.0];
                    dot_multi(
                        isa,
                        &qs[i * d..(i + 1) * d],
                        1,
                        &rows[j * d..(j + 1) * d],
                        &mut one,
                    );
                    let got = rows_out[i * 3 + j];
                    assert_eq!(one[0].to_bits(), got.to_bits(), "{isa} d={d} i={i} j={j}");
                }
            }
        }
    }
}

#[test]
fn weighted_rows_equals_repeated_axpy() {
    let mut rng = Rng(31337);
    for isa in available() {
        for &d in DS.iter().chain(&[300, 1000]) {
            let (g, n) = (3, 70);
            let rows: Vec<f16> = rng.vec_t(n * d);
            let mut p = rng.vec(g * n, 0.0, 1.0);
            for j in (0..n).step_by(4) {
                for i in 0..g {
                    p[i * n + j] = 0.0;
                }
            }
            p[5] = 0.0;
            let mut a = rng.vec(g * d, -1.0, 1.0);
            let mut b = a.clone();
            weighted_rows(isa, &mut a, g, &p, &rows, d);
            for j in 0..n {
                if (0..g).all(|i| p[i * n + j] == 0.0) {
                    continue;
                }
                let pj: Vec<f32> = (0..g).map(|i| p[i * n + j]).collect();
                axpy_multi(isa, &mut b, g, &pj, &rows[j * d..(j + 1) * d]);
            }
            assert!(
                a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{isa} d={d}"
            );
        }
    }
}

/// The strided and gathered variants are bitwise equal to the contiguous
/// primitives on the same rows (the CPU decode relies on this for "select
/// everything == dense").
#[test]
fn strided_and_gathered_variants_equal_contiguous() {
    let mut rng = Rng(0x5eed);
    for isa in available() {
        for &d in DS {
            for (g, n) in [(1, 5), (4, 37), (8, 70)] {
                let src: Vec<bf16> = rng.vec_t((n + 9) * d);
                let base = 4;
                // Scattered rows, and the same rows copied contiguously.
                let idx: Vec<u32> = (0..n as u32).map(|j| (j * 7) % (n as u32 + 5)).collect();
                let rows: Vec<bf16> = idx
                    .iter()
                    .flat_map(|&j| src[(base + j as usize) * d..][..d].iter().copied())
                    .collect();
                let rows = &rows[..];
                let qs = rng.vec(g * d, -1.0, 1.0);
                let stride = n + 3;
                let mut a = vec![0.0f32; g * n];
                scores_rows(isa, &qs, g, rows, d, 0.7, &mut a);
                let mut b = vec![0.0f32; g * stride];
                scores_rows_strided(isa, &qs, g, rows, d, 0.7, &mut b, stride);
                let mut c = vec![0.0f32; g * stride];
                scores_gather(isa, &qs, g, &src, d, base, &idx, 0.7, &mut c, stride);
                let abs: Vec<u32> = idx.iter().map(|&j| j + base as u32).collect();
                let mut e = vec![0.0f32; g * stride];
                scores_gather_runs(isa, &qs, g, &src, d, &abs, 0.7, &mut e, stride);
                for i in 0..g {
                    for j in 0..n {
                        assert_eq!(a[i * n + j].to_bits(), b[i * stride + j].to_bits());
                        assert_eq!(a[i * n + j].to_bits(), c[i * stride + j].to_bits());
                        assert_eq!(a[i * n + j].to_bits(), e[i * stride + j].to_bits());
                    }
                }
                let mut p = rng.vec(g * n, 0.0, 1.0);
                for j in (0..n).step_by(3) {
                    for i in 0..g {
                        p[i * n + j] = 0.0;
                    }
                }
                let mut ps = vec![0.0f32; g * stride];
                for i in 0..g {
                    ps[i * stride..i * stride + n].copy_from_slice(&p[i * n..(i + 1) * n]);
                }
                let acc0 = rng.vec(g * d, -1.0, 1.0);
                let (mut x, mut y, mut z) = (acc0.clone(), acc0.clone(), acc0.clone());
                let mut w = acc0.clone();
                weighted_rows(isa, &mut x, g, &p, rows, d);
                weighted_rows_strided(isa, &mut y, g, &ps, stride, rows, d);
                weighted_gather(isa, &mut z, g, &ps, stride, &src, d, base, &idx);
                weighted_gather_runs(isa, &mut w, g, &ps, stride, &src, d, &abs);
                for k in 0..g * d {
                    assert_eq!(x[k].to_bits(), y[k].to_bits(), "{isa} strided d={d}");
                    assert_eq!(x[k].to_bits(), z[k].to_bits(), "{isa} gather d={d}");
                    assert_eq!(x[k].to_bits(), w[k].to_bits(), "{isa} gather runs d={d}");
                }
            }
        }
    }
}

#[test]
fn pow_relu_apply_matches_definition() {
    let mut rng = Rng(77);
    for isa in available() {
        for &n in LENS {
            let x: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 5 == 4 {
                        f32::NEG_INFINITY
                    } else {
                        rng.f(-2.0, 2.0)
                    }
                })
                .collect();
            for (alpha, mode) in [
                (1.5f32, PowMode::Alpha15),
                (2.0, PowMode::Alpha2),
                (1.25, PowMode::General(4.0)),
            ] {
                let tau = 0.1f32;
                let mut y = x.clone();
                let sum = pow_relu_apply(isa, &mut y, tau, mode);
                let mut exact = 0.0f64;
                for (a, b) in x.iter().zip(&y) {
                    let z = (f64::from(*a) - f64::from(tau)).max(0.0);
                    let e = z.powf(1.0 / f64::from(alpha - 1.0));
                    exact += e;
                    if z == 0.0 {
                        assert_eq!(*b, 0.0, "{isa} alpha={alpha}: exact zero");
                    } else {
                        assert!(
                            (f64::from(*b) - e).abs() <= 1e-5 * e.max(1.0),
                            "{isa} alpha={alpha}: {b} vs {e}"
                        );
                    }
                }
                assert!(
                    (f64::from(sum) - exact).abs() <= 1e-5 * exact.max(1.0),
                    "{isa} sum"
                );
            }
        }
    }
}

#[test]
fn shift_select_matches_scalar() {
    let mut rng = Rng(99);
    for isa in available() {
        for &n in LENS {
            let mut x: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 7 == 3 {
                        f32::NEG_INFINITY
                    } else {
                        rng.f(-3.0, 3.0)
                    }
                })
                .collect();
            let want: Vec<f32> = x.iter().map(|v| 0.5 * (v - 1.0)).collect();
            let cands: Vec<f32> = want.iter().copied().filter(|&v| v > -1.0).collect();
            let fin = want.iter().filter(|v| v.is_finite()).count();
            let mut c = vec![0.0f32; n];
            let (k, f, nan) = shift_select(isa, &mut x, 1.0, 0.5, -1.0, &mut c);
            assert_eq!(x, want, "{isa} n={n}");
            assert_eq!(&c[..k], &cands[..], "{isa} n={n}");
            assert_eq!((f, nan), (fin, false), "{isa} n={n}");
            if n > 0 {
                x[n / 2] = f32::NAN;
                assert!(
                    shift_select(isa, &mut x, 0.0, 1.0, -1.0, &mut c).2,
                    "{isa} NaN n={n}"
                );
            }
        }
    }
}

#[test]
fn sum_checked_f64_sums_in_lane_order_and_counts_bad_scores() {
    for isa in available() {
        for &n in LENS {
            // Values whose sum depends on the order (1e16 absorbs small terms).
            let x: Vec<f64> = (0..n)
                .map(|i| {
                    if i % 5 == 3 {
                        1e16
                    } else {
                        i as f64 * 0.37 + 1.0
                    }
                })
                .collect();
            let mut acc = [0.0f64; 8];
            for (i, &v) in x.iter().enumerate() {
                acc[i % 8] += v;
            }
            let want =
                ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            let (sum, ok) = sum_checked_f64(isa, &x);
            assert_eq!(sum.to_bits(), want.to_bits(), "{isa} n={n}");
            assert_eq!(sum8_f64(&x).to_bits(), want.to_bits(), "n={n}");
            assert!(ok, "{isa} n={n}");
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1e-300] {
                for at in [0, n / 2, n.saturating_sub(1)] {
                    if n == 0 {
                        continue;
                    }
                    let mut y = x.clone();
                    y[at] = bad;
                    assert!(!sum_checked_f64(isa, &y).1, "{isa} n={n} {bad} at {at}");
                }
            }
        }
        // Finite scores whose sum overflows fail; -0 is a non-negative score.
        assert!(!sum_checked_f64(isa, &[f64::MAX, f64::MAX]).1, "{isa}");
        assert_eq!(sum_checked_f64(isa, &[-0.0, 2.0]), (2.0, true), "{isa}");
    }
}

#[test]
fn caote_mask_marks_candidates_and_min_skips_the_rest() {
    for isa in available() {
        for &n in LENS {
            let arr: Vec<u32> = (0..n as u32)
                .map(|i| (i * 7919) % (n as u32).max(1))
                .collect();
            let (lo_a, hi_a) = (3u32, (n as u32).saturating_sub(5));
            let (mut lo2, mut hi2) = (vec![1.0; n], vec![1.0; n]);
            let got = caote_mask(isa, &arr, lo_a, hi_a, &mut lo2, &mut hi2);
            let want = arr.iter().filter(|&&a| a >= lo_a && a < hi_a).count();
            assert_eq!(got, want, "{isa} n={n}");
            for (j, &a) in arr.iter().enumerate() {
                let c = a >= lo_a && a < hi_a;
                assert_eq!(lo2[j].is_nan(), !c, "{isa} n={n} j={j}");
                assert_eq!(hi2[j], if c { 0.0 } else { f64::INFINITY }, "{isa} n={n}");
            }
            // The minimum over the values, NaN skipped, for any position of
            // the smallest one.
            let x: Vec<f64> = (0..n)
                .map(|i| {
                    if i % 3 == 1 {
                        f64::NAN
                    } else {
                        10.0 + i as f64
                    }
                })
                .collect();
            let want = x
                .iter()
                .copied()
                .filter(|v| !v.is_nan())
                .fold(f64::INFINITY, f64::min);
            assert_eq!(min_f64(isa, &x), want, "{isa} n={n}");
            for at in [0, n / 2, n.saturating_sub(1)] {
                if n == 0 {
                    continue;
                }
                let mut y = x.clone();
                y[at] = -1.5;
                assert_eq!(min_f64(isa, &y), -1.5, "{isa} n={n} at {at}");
            }
        }
        assert_eq!(min_f64(isa, &[]), f64::INFINITY, "{isa}");
    }
}

#[test]
fn candidate_scan_counts_candidates_and_lists_new_ones() {
    for isa in available() {
        for &n in LENS {
            let arr: Vec<u32> = (0..n as u32)
                .map(|i| (i * 7919) % (n as u32).max(1))
                .collect();
            let m = n as u32;
            for (lo_a, hi_a, from) in [(2, m.saturating_sub(3), m / 2), (0, m, 0), (5, 4, 0)] {
                let mut got = vec![99];
                let count = candidate_scan(isa, &arr, lo_a, hi_a, from, &mut got);
                let cand = |a: u32| a >= lo_a && a < hi_a;
                assert_eq!(
                    count,
                    arr.iter().filter(|&&a| cand(a)).count(),
                    "{isa} n={n}"
                );
                let want: Vec<u32> = std::iter::once(99)
                    .chain(
                        (0u32..)
                            .zip(&arr)
                            .filter(|&(_, &a)| cand(a) && a >= from)
                            .map(|p| p.0),
                    )
                    .collect();
                assert_eq!(got, want, "{isa} n={n} {lo_a} {hi_a} {from}");
            }
            let x: Vec<f32> = (0..n).map(|i| i as f32 * 0.3 - 1.0).collect();
            let mut acc: Vec<f64> = (0..n).map(|i| 1e8 + i as f64).collect();
            let want: Vec<f64> = acc.iter().zip(&x).map(|(a, &v)| a + f64::from(v)).collect();
            add_widened(isa, &mut acc, &x);
            assert_eq!(acc, want, "{isa} n={n}");
        }
    }
}

/// The bound pass against its formulas written with branches, bitwise, on
/// every ISA: stale and never-measured rows, weights 0, near 1, uniform.
#[test]
fn caote_bounds_match_the_branchy_formulas_bitwise() {
    let mut rng = Rng(0x5eed);
    for isa in available() {
        for &n in LENS {
            let dist: Vec<f32> = (0..n).map(|_| rng.f(0.0, 3.0)).collect();
            let stamp: Vec<f64> = (0..n)
                .map(|i| match i % 5 {
                    0 => f64::NEG_INFINITY,
                    _ => f64::from(rng.f(0.0, 0.5)),
                })
                .collect();
            let mut h: Vec<f64> = (0..n).map(|_| f64::from(rng.f(0.0, 1.0))).collect();
            if n > 2 {
                h[1] = 0.0;
                h[2] = 1e9; // α within 1e-6 of 1
            }
            let sum: f64 = h.iter().sum();
            for inv in [if sum > 0.0 { 1.0 / sum } else { 0.0 }, 0.0] {
                let b = CaoteBounds {
                    dist: &dist,
                    stamp: &stamp,
                    h: &h,
                    drift: 0.75,
                    inv,
                    uni: 1.0 / n.max(1) as f64,
                };
                let (mut lo, mut hi) = (vec![0.25; n], vec![0.5; n]);
                caote_bounds(isa, b, &mut lo, &mut hi);
                for j in 0..n {
                    let slack = b.drift - stamp[j];
                    let dj = f64::from(dist[j]);
                    let e = slack + 1e-5 * (dj + 1.0);
                    let (dl, dh) = if slack.is_finite() {
                        ((dj - e).max(0.0), dj + e)
                    } else {
                        (0.0, f64::INFINITY)
                    };
                    let a = if inv > 0.0 { h[j] * inv } else { b.uni };
                    let r = a / (1.0 - a);
                    let (el, eh) = if 1.0 - a < 1e-6 {
                        (f64::INFINITY, f64::INFINITY)
                    } else if a <= 0.0 {
                        (0.0, 0.0)
                    } else {
                        (r * dl, r * dh)
                    };
                    assert_eq!(
                        lo[j].to_bits(),
                        (0.25 + el * el).to_bits(),
                        "{isa} n={n} j={j}"
                    );
                    assert_eq!(
                        hi[j].to_bits(),
                        (0.5 + eh * eh).to_bits(),
                        "{isa} n={n} j={j}"
                    );
                }
            }
        }
    }
}
