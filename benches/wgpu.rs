//! Decode attention on the wgpu backend: a Llama-3-8B-like head geometry
//! (32 query heads, 8 KV heads, head dim 128), one sequence, 4K and 32K
//! cached tokens, f32 and f16 storage, dense softmax and dense entmax-1.5.
//! Throughput is the K/V bytes read per step (plus q and out), so criterion
//! prints GB/s.
//!
//! `cargo bench --features wgpu --bench wgpu`
//!
//! On Mesa's lavapipe (a CPU driver) the numbers mean nothing: there only the
//! correctness check that runs before timing matters. Each case first runs at
//! a small size and is compared with the reference backend.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::f16;
use kvsieve::ops::{self, DecodeParams};
use kvsieve::reference::Reference;
use kvsieve::wgpu::Wgpu;
use kvsieve::{Backend, Element, HeadGeometry, Normalizer, Restrict, Segments};
use std::time::{Duration, Instant};

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;

fn values<T: Element>(n: usize, seed: usize) -> Vec<T> {
    (0..n)
        .map(|i| T::from_f32((((i + seed) * 7919) % 1021) as f32 / 1021.0 - 0.5))
        .collect()
}

/// Q, K and V of one benchmark case.
type Qkv<B, T> = (
    <B as Backend>::Buffer<T>,
    <B as Backend>::Buffer<T>,
    <B as Backend>::Buffer<T>,
);

/// Runs one decode step on `b`, writing `out`.
fn decode<B: Backend + kvsieve::Ops, T: Element>(
    b: &B,
    tokens: usize,
    norm: &Normalizer,
    bufs: &Qkv<B, T>,
    out: &mut B::Buffer<T>,
) {
    let geom = HeadGeometry::new(HQ, HKV, D).expect("geometry");
    let segs = Segments::uniform(1, HKV, tokens).expect("segments");
    let p = DecodeParams {
        geom,
        segments: &segs,
        scale: None,
        normalizer: norm,
        restrict: Restrict::Dense,
    };
    ops::decode_attention(b, &p, &bufs.0, &bufs.1, &bufs.2, out).expect("decode_attention");
}

fn upload<B: Backend, T: Element>(b: &B, tokens: usize) -> Qkv<B, T> {
    let kv = tokens * HKV * D;
    (
        b.upload(&values::<T>(HQ * D, 1)).expect("upload q"),
        b.upload(&values::<T>(kv, 2)).expect("upload k"),
        b.upload(&values::<T>(kv, 3)).expect("upload v"),
    )
}

/// The small-size check against the reference that precedes timing.
fn verify<T: Element>(b: &Wgpu, norm: &Normalizer) {
    let tokens = 300;
    let mut want = vec![T::default(); HQ * D];
    decode(
        &Reference,
        tokens,
        norm,
        &upload(&Reference, tokens),
        &mut want,
    );
    let mut out = b.zeros::<T>(HQ * D).expect("zeros");
    decode(b, tokens, norm, &upload(b, tokens), &mut out);
    let got = b.download(&out).expect("download");
    let err = got
        .iter()
        .zip(&want)
        .map(|(x, y)| (x.to_f64() - y.to_f64()).abs())
        .fold(0.0, f64::max);
    let tol = if T::DTYPE == kvsieve::DType::F32 {
        1e-4
    } else {
        4e-3
    };
    assert!(
        err <= tol,
        "wgpu decode {} {norm:?}: max error {err}",
        T::DTYPE
    );
}

fn bench_dtype<T: Element>(c: &mut Criterion, b: &Wgpu) {
    let mut g = c.benchmark_group(format!("decode/wgpu/llama3-8b/{}", T::DTYPE));
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        verify::<T>(b, &norm);
        let name = match norm {
            Normalizer::Softmax => "softmax",
            _ => "entmax15",
        };
        for tokens in [4096usize, 32768] {
            let bufs = upload::<Wgpu, T>(b, tokens);
            let mut out = b.zeros::<T>(HQ * D).expect("zeros");
            let bytes = (2 * tokens * HKV * D + 2 * HQ * D) * size_of::<T>();
            g.throughput(Throughput::Bytes(bytes as u64));
            g.bench_function(
                BenchmarkId::new(name, format!("ctx{}k", tokens / 1024)),
                |bch| {
                    bch.iter_custom(|iters| {
                        b.synchronize().expect("sync");
                        let t0 = Instant::now();
                        for _ in 0..iters {
                            decode(b, tokens, &norm, &bufs, &mut out);
                        }
                        b.synchronize().expect("sync");
                        t0.elapsed()
                    });
                },
            );
        }
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let b = match Wgpu::new() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("SKIPPED(wgpu): {e}");
            return;
        }
    };
    eprintln!("wgpu adapter: {:?}", b.adapter_info().name);
    bench_dtype::<f32>(c, &b);
    bench_dtype::<f16>(c, &b);
}

criterion_group!(wgpu_benches, benches);
criterion_main!(wgpu_benches);
