//! Row α-entmax threshold search: Halley–bisection (AdaSplash) against plain
//! bisection (the `entmax` package baseline).
//!
//! Prints, before timing, the mean number of τ updates each method needs to
//! reach `|f(τ)| < 1e-6` over α ∈ {1.25, 1.5, 1.75, 2} and rows of 128 to
//! 32K normal logits (the issue-4 target: Halley ≤ 1/4 of bisection), then
//! times both on one row per length with criterion.
//!
//! `cargo bench --bench entmax`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvsieve::entmax::{EntmaxOptions, entmax_bisect, entmax_halley};
use kvsieve::eval::Rng;

const ALPHAS: [f32; 4] = [1.25, 1.5, 1.75, 2.0];
const LENS: [usize; 5] = [128, 1024, 4096, 16384, 32768];

fn row(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| 2.0 * rng.normal_f32()).collect()
}

fn iteration_table() {
    let opts = |max_iter| EntmaxOptions::new(max_iter, 1e-6);
    let mut rng = Rng::new(1);
    println!("entmax τ updates to |f(τ)| < 1e-6 (mean of 8 rows per cell)");
    println!(
        "{:>6} {:>7} {:>8} {:>10} {:>7}",
        "alpha", "n", "halley", "bisection", "ratio"
    );
    let (mut sum_h, mut sum_b) = (0.0, 0.0);
    for alpha in ALPHAS {
        for n in LENS {
            let (mut h, mut b) = (0.0, 0.0);
            for _ in 0..8 {
                let z = row(&mut rng, n);
                h += f64::from(
                    entmax_halley(&z, alpha, &opts(100))
                        .expect("finite row")
                        .iterations,
                );
                b += f64::from(
                    entmax_bisect(&z, alpha, &opts(200))
                        .expect("finite row")
                        .iterations,
                );
            }
            println!(
                "{alpha:>6} {n:>7} {:>8.2} {:>10.2} {:>7.3}",
                h / 8.0,
                b / 8.0,
                h / b
            );
            sum_h += h;
            sum_b += b;
        }
    }
    println!(
        "overall: Halley {:.2}, bisection {:.2}, ratio {:.3} (target ≤ 0.25)\n",
        sum_h / 160.0,
        sum_b / 160.0,
        sum_h / sum_b
    );
}

fn bench(c: &mut Criterion) {
    iteration_table();
    let mut rng = Rng::new(2);
    let mut g = c.benchmark_group("entmax_row");
    for n in [1024usize, 32768] {
        let z = row(&mut rng, n);
        g.throughput(Throughput::Bytes((n * 4) as u64));
        g.bench_with_input(BenchmarkId::new("halley_a1.5", n), &z, |b, z| {
            b.iter(|| entmax_halley(black_box(z), 1.5, &EntmaxOptions::halley()))
        });
        g.bench_with_input(BenchmarkId::new("bisect_a1.5", n), &z, |b, z| {
            b.iter(|| entmax_bisect(black_box(z), 1.5, &EntmaxOptions::bisection()))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
