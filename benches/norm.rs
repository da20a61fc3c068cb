//! CPU row normalisers: softmax vs α-entmax per element (issue 4 target:
//! row entmax α = 1.5 within 3x of softmax), next to a same-run copy.
//!
//! 64 rows of 4K and 32K f32 scores (N(0, 2²)), 1 and all threads,
//! softmax and entmax α ∈ {1.5, 2, 1.25}. Bytes read = the score rows.
//!
//! `cargo bench --bench norm -- --warm-up-time 1 --measurement-time 3`

mod common;

use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvsieve::cpu::{Cpu, isa};
use kvsieve::ops;
use kvsieve::reference::Reference;
use kvsieve::*;

fn scores(rows: usize, n: usize) -> (Ragged, Vec<f32>) {
    let mut s = 0x1234_5678_u64;
    let x = (0..rows * n)
        .map(|_| {
            // Sum of 4 uniforms: roughly normal.
            let mut acc = 0.0f32;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                acc += (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            2.0 * acc * 1.7
        })
        .collect();
    (Ragged::uniform(rows, n).unwrap(), x)
}

fn check_against_reference() {
    let (rows, x) = scores(4, 3000);
    let cpu = Cpu::new();
    for alpha in [None, Some(1.5f32), Some(2.0), Some(1.25)] {
        let (mut want, mut got) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()]);
        match alpha {
            None => {
                ops::softmax_rows(&Reference, &rows, &x, &mut want).unwrap();
                ops::softmax_rows(&cpu, &rows, &x, &mut got).unwrap();
            }
            Some(a) => {
                ops::entmax_rows(&Reference, &rows, &[a], &x, &mut want).unwrap();
                ops::entmax_rows(&cpu, &rows, &[a], &x, &mut got).unwrap();
            }
        }
        for (a, e) in got.iter().zip(&want) {
            assert!(
                (a - e).abs() <= 1e-5 + 1e-5 * e.abs(),
                "norm preset {alpha:?}: {a} vs {e}"
            );
        }
    }
    println!("kvsieve-norm | preset check against the reference: ok");
}

fn benches(crit: &mut Criterion) {
    check_against_reference();
    let pools: Vec<(Arc<rayon::ThreadPool>, f64)> = common::thread_counts()
        .into_iter()
        .map(|n| {
            let p = common::pool(n);
            let copy = common::copy_bandwidth(&p);
            println!(
                "kvsieve-norm | copy bandwidth, {n} thread(s): {:.2} GB/s",
                copy / 1e9
            );
            (p, copy)
        })
        .collect();
    println!("kvsieve-norm | isa = {}", isa::detected());
    for n in [4096usize, 32768] {
        let (rows, x) = scores(64, n);
        let mut out = vec![0.0f32; x.len()];
        let bytes = (x.len() * 4) as f64;
        let mut group = crit.benchmark_group("norm");
        group.sample_size(10);
        group.throughput(Throughput::Bytes(bytes as u64));
        for (pool, copy) in &pools {
            let t = pool.current_num_threads();
            let cpu = Cpu::with_isa(isa::detected()).pool(pool.clone());
            let mut soft = 0.0;
            for alpha in [None, Some(1.5f32), Some(2.0), Some(1.25)] {
                let name = match alpha {
                    None => format!("softmax/64x{}K/t{t}", n / 1024),
                    Some(a) => format!("entmax{a}/64x{}K/t{t}", n / 1024),
                };
                let mut f = || match alpha {
                    None => ops::softmax_rows(&cpu, &rows, &x, &mut out).unwrap(),
                    Some(a) => ops::entmax_rows(&cpu, &rows, &[a], &x, &mut out).unwrap(),
                };
                let secs = common::median_secs(15, &mut f);
                common::report("norm", &name, bytes, secs, *copy);
                let per = secs / x.len() as f64 * 1e9;
                if alpha.is_none() {
                    soft = per;
                    println!("kvsieve-norm | {name:<44} | {per:.3} ns/element");
                } else {
                    println!(
                        "kvsieve-norm | {name:<44} | {per:.3} ns/element | {:.2}x softmax",
                        per / soft
                    );
                }
                group.bench_function(BenchmarkId::from_parameter(&name), |b| b.iter(&mut f));
            }
        }
        group.finish();
    }
}

criterion_group!(norm_benches, benches);
criterion_main!(norm_benches);
