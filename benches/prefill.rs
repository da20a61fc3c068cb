//! CPU prefill attention: GFLOP/s against a same-run peak of a tuned
//! dot-product loop (and bytes read against a same-run memory copy).
//!
//! Causal prefill of 4K tokens, 8 query heads / 2 KV heads (GQA 4), D = 128,
//! batch 1, f32 / f16 / bf16, softmax (and entmax α = 1.5 through
//! `entmax_prefill` for f16), 1 and all threads. FLOPs count the two matrix
//! products on visible (causal) pairs only: `4 · D · Hq · n(n+1)/2`.
//!
//! `cargo bench --bench prefill -- --warm-up-time 1 --measurement-time 3`

mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use kvsieve::cpu::{Cpu, isa, simd};
use kvsieve::ops::{self, EntmaxPrefillParams, PrefillParams};
use kvsieve::reference::Reference;
use kvsieve::*;

const HQ: usize = 8;
const HKV: usize = 2;
const D: usize = 128;

fn hash(i: usize) -> f32 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

struct Inputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    q_rows: Ragged,
    segs: Segments,
}

fn inputs<T: Element>(n: usize, hq: usize, hkv: usize, d: usize) -> Inputs<T> {
    let segs = Segments::uniform(1, hkv, n).unwrap();
    let fill = |len: usize, salt: usize| {
        (0..len)
            .map(|i| T::from_f32(2.0 * hash(i + salt)))
            .collect()
    };
    Inputs {
        q: fill(n * hq * d, 1),
        k: fill(segs.rows_needed() * d, 2),
        v: fill(segs.rows_needed() * d, 3),
        q_rows: Ragged::from_lens(&[n as u32]).unwrap(),
        segs,
    }
}

fn run<B: Ops<Buffer<T> = Vec<T>>, T: Element>(
    b: &B,
    inp: &Inputs<T>,
    geom: HeadGeometry,
    norm: &Normalizer,
    out: &mut Vec<T>,
) {
    let p = PrefillParams {
        geom,
        q_rows: &inp.q_rows,
        segments: &inp.segs,
        causal: true,
        mask: None,
        scale: None,
        normalizer: norm,
    };
    ops::prefill_attention::<B, T>(b, &p, &inp.q, &inp.k, &inp.v, out).unwrap();
}

fn check_against_reference() {
    let geom = HeadGeometry::new(4, 2, 64).unwrap();
    let inp = inputs::<f32>(150, 4, 2, 64);
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        let mut want = vec![0.0f32; inp.q.len()];
        run(&Reference, &inp, geom, &norm, &mut want);
        let mut got = vec![0.0f32; inp.q.len()];
        run(&Cpu::new(), &inp, geom, &norm, &mut got);
        for (a, e) in got.iter().zip(&want) {
            assert!(
                (a - e).abs() <= 5e-5 + 1e-4 * e.abs(),
                "prefill preset {norm:?}: {a} vs {e}"
            );
        }
    }
    println!("kvsieve-prefill | preset check against the reference: ok");
}

/// Peak FLOP/s of a tuned dot-product loop: 8 query rows against K rows
/// held in L1 (`simd::dot_multi`, each K chunk loaded once for 8 FMAs),
/// run on every thread of the pool.
fn peak_flops(pool: &rayon::ThreadPool) -> f64 {
    let isa = isa::detected();
    let qs: Vec<f32> = (0..8 * D).map(hash).collect();
    let rows: Vec<f32> = (0..64 * D).map(|i| hash(i + 5)).collect();
    let reps = 20_000;
    let threads = pool.current_num_threads();
    let secs = common::median_secs(5, || {
        pool.broadcast(|_| {
            let mut out = [0.0f32; 8];
            let mut s = 0.0f32;
            for _ in 0..reps {
                for r in rows.chunks_exact(D) {
                    simd::dot_multi(isa, &qs, 8, black_box(r), &mut out);
                    s += out[0];
                }
            }
            black_box(s);
        });
    });
    let flops = 2.0 * 8.0 * D as f64 * 64.0 * reps as f64 * threads as f64;
    flops / secs
}

fn bench_dtype<T: Element>(crit: &mut Criterion, pools: &[(Arc<rayon::ThreadPool>, f64, f64)]) {
    let n = 4096;
    let geom = HeadGeometry::new(HQ, HKV, D).unwrap();
    let inp = inputs::<T>(n, HQ, HKV, D);
    let flops = 4.0 * D as f64 * HQ as f64 * (n * (n + 1) / 2) as f64;
    let bytes = ((inp.q.len() + inp.k.len() + inp.v.len()) * size_of::<T>()) as f64;
    let mut out = vec![T::default(); inp.q.len()];
    let mut group = crit.benchmark_group("prefill");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes as u64));
    for (pool, copy, peak) in pools {
        let threads = pool.current_num_threads();
        let cpu = Cpu::with_isa(isa::detected()).pool(pool.clone());
        let norm = Normalizer::Softmax;
        let name = format!(
            "{}/n4K/{HQ}q{HKV}kv/d{D}/causal/softmax/t{threads}",
            T::DTYPE
        );
        let t = common::median_secs(3, || run(&cpu, &inp, geom, &norm, &mut out));
        common::report("prefill", &name, bytes, t, *copy);
        println!(
            "kvsieve-prefill | {name:<44} | {:>7.1} GFLOP/s | {:>5.1}% of peak ({:.1} GFLOP/s)",
            flops / t / 1e9,
            100.0 * flops / t / peak,
            peak / 1e9
        );
        group.bench_function(BenchmarkId::from_parameter(&name), |b| {
            b.iter(|| run(&cpu, &inp, geom, &norm, &mut out))
        });
    }
    group.finish();
}

fn bench_entmax(crit: &mut Criterion, pools: &[(Arc<rayon::ThreadPool>, f64, f64)]) {
    let n = 4096;
    let geom = HeadGeometry::new(HQ, HKV, D).unwrap();
    let inp = inputs::<f16>(n, HQ, HKV, D);
    let flops = 4.0 * D as f64 * HQ as f64 * (n * (n + 1) / 2) as f64;
    let mut out = vec![f16::default(); inp.q.len()];
    let mut tau = vec![0.0f32; n * HQ];
    let (pool, _, peak) = &pools[pools.len() - 1];
    let cpu = Cpu::with_isa(isa::detected()).pool(pool.clone());
    let p = EntmaxPrefillParams {
        geom,
        q_rows: &inp.q_rows,
        segments: &inp.segs,
        causal: true,
        alphas: &[1.5],
        scale: None,
        block_q: 16,
        block_k: 16,
        skip_blocks: true,
    };
    let mut stats = BlockStats::default();
    let t = common::median_secs(3, || {
        stats = ops::entmax_prefill(&cpu, &p, &inp.q, &inp.k, &inp.v, &mut out, &mut tau).unwrap();
    });
    let name = format!("f16/n4K/entmax_prefill1.5/t{}", pool.current_num_threads());
    println!(
        "kvsieve-prefill | {name:<44} | {:>9.3} ms | {:>7.1} GFLOP/s (dense-equivalent) | {:>5.1}% of peak | live tiles {:.1}%",
        t * 1e3,
        flops / t / 1e9,
        100.0 * flops / t / peak,
        100.0 * stats.live_fraction()
    );
    let mut group = crit.benchmark_group("prefill");
    group.sample_size(10);
    group.bench_function(BenchmarkId::from_parameter(&name), |b| {
        b.iter(|| {
            ops::entmax_prefill(&cpu, &p, &inp.q, &inp.k, &inp.v, &mut out, &mut tau).unwrap()
        })
    });
    group.finish();
}

/// Issue-4 target: block skipping is faster than the no-skip variant when
/// fewer than half the tiles are live, and at most 10 % slower when all are.
/// The logit scale sets the sparsity (sharper logits, smaller supports).
fn bench_entmax_skipping(pools: &[(Arc<rayon::ThreadPool>, f64, f64)]) {
    let n = 2048;
    let geom = HeadGeometry::new(HQ, HKV, D).unwrap();
    // Banded attention (as RoPE makes it): q_t = k_t = sinusoidal position
    // features, so q_i . k_j = sum_m cos((i - j) w_m) peaks at i = j and the
    // support of a sharp row stays near the diagonal (few live tiles).
    let mut inp = inputs::<f16>(n, HQ, HKV, D);
    let feat = |t: usize, c: usize| {
        let w = 10000f32.powf(-((c / 2 * 2) as f32) / D as f32);
        let a = t as f32 * w;
        if c.is_multiple_of(2) {
            a.cos()
        } else {
            a.sin()
        }
    };
    for t in 0..n {
        for h in 0..HQ {
            for c in 0..D {
                inp.q[(t * HQ + h) * D + c] = f16::from_f32(feat(t, c));
            }
        }
        for g in 0..HKV {
            for c in 0..D {
                inp.k[(g * n + t) * D + c] = f16::from_f32(feat(t, c));
            }
        }
    }
    let mut out = vec![f16::default(); inp.q.len()];
    let mut tau = vec![0.0f32; n * HQ];
    let (pool, _, _) = &pools[pools.len() - 1];
    let cpu = Cpu::with_isa(isa::detected()).pool(pool.clone());
    for logit_scale in [0.05f32, 0.25, 1.0, 4.0] {
        let run = |skip: bool, out: &mut Vec<f16>, tau: &mut Vec<f32>| {
            let p = EntmaxPrefillParams {
                geom,
                q_rows: &inp.q_rows,
                segments: &inp.segs,
                causal: true,
                alphas: &[1.5],
                scale: Some(logit_scale / (D as f32).sqrt()),
                block_q: 16,
                block_k: 16,
                skip_blocks: skip,
            };
            ops::entmax_prefill(&cpu, &p, &inp.q, &inp.k, &inp.v, out, tau).unwrap()
        };
        let stats = run(true, &mut out, &mut tau);
        let with = common::median_secs(3, || {
            run(true, &mut out, &mut tau);
        });
        let without = common::median_secs(3, || {
            run(false, &mut out, &mut tau);
        });
        println!(
            "kvsieve-prefill | f16/n2K/banded/entmax_prefill1.5 scale x{logit_scale:<5} t{} | live tiles {:>5.1}% | skip {:>8.2} ms | no-skip {:>8.2} ms | skip/no-skip {:.3}",
            pool.current_num_threads(),
            100.0 * stats.live_fraction(),
            with * 1e3,
            without * 1e3,
            with / without
        );
    }
}

fn benches(crit: &mut Criterion) {
    check_against_reference();
    let start = Instant::now();
    let pools: Vec<(Arc<rayon::ThreadPool>, f64, f64)> = common::thread_counts()
        .into_iter()
        .map(|n| {
            let p = common::pool(n);
            let copy = common::copy_bandwidth(&p);
            let peak = peak_flops(&p);
            println!(
                "kvsieve-prefill | {n} thread(s): copy {:.2} GB/s, peak dot-product {:.1} GFLOP/s",
                copy / 1e9,
                peak / 1e9
            );
            (p, copy, peak)
        })
        .collect();
    println!(
        "kvsieve-prefill | isa = {} (setup {:.1}s)",
        isa::detected(),
        start.elapsed().as_secs_f64()
    );
    bench_dtype::<f32>(crit, &pools);
    bench_dtype::<f16>(crit, &pools);
    bench_dtype::<bf16>(crit, &pools);
    bench_entmax(crit, &pools);
    bench_entmax_skipping(&pools);
}

criterion_group!(prefill_benches, benches);
criterion_main!(prefill_benches);
