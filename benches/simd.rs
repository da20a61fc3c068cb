//! Bandwidth of the CPU SIMD primitives (`dot_multi`, `scores_rows`,
//! `axpy_multi`, `weighted_rows`) over a 64 MiB KV buffer, per ISA and
//! storage dtype, next to a same-run 256 MiB `copy_from_slice` (memcpy)
//! figure. Throughput is reported in bytes of KV data streamed per second.
//!
//! `cargo bench --bench simd -- --warm-up-time 1 --measurement-time 2`

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use kvsieve::cpu::{isa, simd};
use kvsieve::dtype::Element;
use std::hint::black_box;

const KV_BYTES: usize = 64 << 20;
const COPY_BYTES: usize = 256 << 20;
/// Head dim and GQA group size of the benchmarked decode step.
const D: usize = 128;
const G: usize = 4;

fn kv_buffer<T: Element>() -> Vec<T> {
    let n = KV_BYTES / size_of::<T>();
    // Written explicitly so every page is backed by real memory.
    (0..n)
        .map(|i| T::from_f32(((i * 7919) % 1021) as f32 / 1021.0 - 0.5))
        .collect()
}

fn bench_dtype<T: Element>(c: &mut Criterion) {
    let kv = kv_buffer::<T>();
    let n = kv.len() / D;
    let qs: Vec<f32> = (0..G * D).map(|i| (i % 17) as f32 / 17.0 - 0.5).collect();
    let ps: Vec<f32> = (0..G).map(|i| 1e-3 * (i + 1) as f32).collect();
    let dt = T::DTYPE;

    let mut group = c.benchmark_group(format!("kv64MiB_d{D}_g{G}"));
    group.sample_size(10);
    group.throughput(Throughput::Bytes(KV_BYTES as u64));
    for isa in isa::available() {
        group.bench_function(BenchmarkId::new(format!("dot_multi/{dt}"), isa), |b| {
            let mut out = [0.0f32; G];
            b.iter(|| {
                let mut s = 0.0f32;
                for row in kv.chunks_exact(D) {
                    simd::dot_multi(isa, &qs, G, row, &mut out);
                    s += out[0];
                }
                black_box(s)
            })
        });
        group.bench_function(BenchmarkId::new(format!("scores_rows/{dt}"), isa), |b| {
            let mut out = vec![0.0f32; G * n];
            b.iter(|| {
                simd::scores_rows(isa, &qs, G, &kv, D, 0.088, &mut out);
                black_box(out[n - 1])
            })
        });
        group.bench_function(BenchmarkId::new(format!("axpy_multi/{dt}"), isa), |b| {
            let mut acc = vec![0.0f32; G * D];
            b.iter(|| {
                for row in kv.chunks_exact(D) {
                    simd::axpy_multi(isa, &mut acc, G, &ps, row);
                }
                black_box(acc[0])
            })
        });
        group.bench_function(BenchmarkId::new(format!("weighted_rows/{dt}"), isa), |b| {
            // Dense weights (every row read): the entmax decode V pass.
            let p = vec![1e-6f32; G * n];
            let mut acc = vec![0.0f32; G * D];
            b.iter(|| {
                simd::weighted_rows(isa, &mut acc, G, &p, &kv, D);
                black_box(acc[0])
            })
        });
    }
    group.finish();
}

fn bench_memcpy(c: &mut Criterion) {
    let src: Vec<u8> = (0..COPY_BYTES).map(|i| i as u8).collect();
    let mut dst = vec![1u8; COPY_BYTES];
    let mut group = c.benchmark_group("memcpy");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(COPY_BYTES as u64));
    group.bench_function("copy_from_slice_256MiB", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(dst[COPY_BYTES - 1])
        })
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    eprintln!(
        "kvsieve simd bench: detected ISA = {}, available = {:?}",
        isa::detected(),
        isa::available()
    );
    bench_memcpy(c);
    bench_dtype::<f32>(c);
    bench_dtype::<f16>(c);
    bench_dtype::<bf16>(c);
}

criterion_group!(simd_benches, benches);
criterion_main!(simd_benches);
