//! CPU decode attention: bandwidth against a same-run memory copy.
//!
//! Sweeps context (4K, 32K, 128K tokens), budget (dense vs an index list of
//! k = 2048), dtype (f32, f16, bf16), GQA group (1, 4, 8), batch (1, 4),
//! normaliser (softmax, entmax α = 1.5 at full and ~10% support) and thread
//! count (1, all). Index lists come in two shapes: scattered (one token in
//! every 16, jittered: each row on its own 4 KiB page) and paged (128 runs
//! of 16 consecutive tokens, Quest-style). Throughput is the bytes actually
//! read (K and V rows visited, the queries, the index lists). Before
//! criterion runs, the bench checks the CPU result against the reference on
//! a small preset and prints one summary line per case: the median of its
//! own repetitions, GB/s, and the ratio to a copy with the same thread
//! count, timed alternately with the kernel (`common::paired`). K, V and
//! the copy buffers are allocated by `kvsieve::cpu::alloc` (huge pages
//! where the OS offers them), as `Cpu::upload` and `KvCache` do; one f32
//! case repeats on plain `Vec`s (kernel and copy) to show what that buys.
//!
//! For index lists the bench also times a *gather floor*: one head's Q·K
//! over the same K rows plus the same over the V rows
//! (`simd::scores_gather`, same prefetching), i.e. reading the listed rows
//! with the least arithmetic the library has. It bounds what any decode
//! kernel can do with that list on this machine.
//!
//! **Paged KV** (issue #14): dense decode over the same 32K tokens kept in
//! page pools (`kvsieve::paged`), P = 16 and 64, pages in shuffled order,
//! HND and NHD, f16 and bf16, against the contiguous dense decode; the
//! contiguous call, the paged call and the copy are timed alternately, rep
//! by rep, so the throughput ratio sees one machine load (target: paged ≥
//! 0.95x contiguous).
//!
//! `cargo bench --bench decode -- --warm-up-time 1 --measurement-time 3`
//!
//! `KVSIEVE_BENCH_ONLY=paged` runs only the preset checks and the paged
//! comparison; `KVSIEVE_BENCH_ONLY=dense` only the checks and the dense 32K
//! cases (f32, f16, bf16), each line with its ratio to a streaming read of
//! 256 MiB timed in the same rotation (issue #18's ceiling).

mod common;

use std::sync::Arc;

use rayon::prelude::*;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use half::{bf16, f16};
use kvsieve::cpu::alloc::kv_buffer_from;
use kvsieve::cpu::{Cpu, isa, simd};
use kvsieve::ops::{self, DecodeParams, PagedDecodeParams};
use kvsieve::reference::Reference;
use kvsieve::*;

/// Shape of one decode case.
#[derive(Clone, Copy, Debug)]
struct Case {
    hq: usize,
    hkv: usize,
    d: usize,
    n: usize,
    batch: usize,
    /// `Some(k)`: index list of k tokens per (sequence, KV head).
    k: Option<usize>,
    /// Index list in runs of 16 consecutive tokens instead of scattered.
    pages: bool,
    /// K and V in plain `Vec`s instead of `cpu::alloc` (huge pages).
    plain: bool,
    /// `None`: softmax; `Some(share)`: entmax α = 1.5 with about that support.
    entmax: Option<f64>,
}

impl Case {
    fn name<T: Element>(&self) -> String {
        let budget = match (self.k, self.pages) {
            (None, _) => "dense".to_string(),
            (Some(k), false) => format!("idx{k}"),
            (Some(k), true) => format!("idx{k}pages"),
        };
        let budget = if self.plain {
            format!("{budget}/4KiB-pages")
        } else {
            budget
        };
        let norm = match self.entmax {
            None => "softmax".to_string(),
            Some(s) => format!("entmax1.5@{:.0}%", 100.0 * s),
        };
        format!(
            "{}/n{}K/{}q{}kv/b{}/{budget}/{norm}",
            T::DTYPE,
            self.n / 1024,
            self.hq,
            self.hkv,
            self.batch
        )
    }
}

/// Inputs of a case: K / V / q and the token sets.
struct Inputs<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    segs: Segments,
    list: Option<IndexList>,
    norm: Normalizer,
    /// Rows of V that carry non-zero weight (entmax) per segment.
    v_rows: usize,
}

fn hash(i: usize) -> f32 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

fn inputs<T: Element>(c: &Case) -> Inputs<T> {
    let segs = Segments::uniform(c.batch, c.hkv, c.n).unwrap();
    let rows = segs.rows_needed();
    let d = c.d;
    let (q, k, v_rows): (Vec<T>, Vec<T>, usize) = match c.entmax {
        None => (
            (0..c.batch * c.hq * d)
                .map(|i| T::from_f32(hash(i)))
                .collect(),
            (0..rows * d).map(|i| T::from_f32(hash(i + 7))).collect(),
            c.k.unwrap_or(c.n),
        ),
        Some(share) => {
            // q = e_0; k_j[0] = 1 on a `share` of tokens, 0 elsewhere, tiny
            // noise on the other coordinates: entmax keeps exactly those.
            let every = (1.0 / share).round() as usize;
            let q = (0..c.batch * c.hq * d)
                .map(|i| {
                    T::from_f32(if i % d == 0 {
                        (d as f32).sqrt() * 4.0
                    } else {
                        0.0
                    })
                })
                .collect();
            let k = (0..rows * d)
                .map(|i| {
                    let (j, col) = ((i / d) % c.n, i % d);
                    T::from_f32(if col == 0 {
                        if j % every == 0 { 1.0 } else { 0.0 }
                    } else {
                        1e-3 * hash(i)
                    })
                })
                .collect();
            (q, k, c.n.div_ceil(every))
        }
    };
    let v: Vec<T> = (0..rows * d).map(|i| T::from_f32(hash(i + 13))).collect();
    let (k, v) = if c.plain {
        (k, v)
    } else {
        (kv_buffer_from(&k).unwrap(), kv_buffer_from(&v).unwrap())
    };
    let list = c.k.map(|kk| {
        let stride = c.n / kk;
        let sets: Vec<IndexSet> = (0..segs.num_segments())
            .map(|s| {
                IndexSet::from_unsorted(
                    (0..kk)
                        .map(|i| {
                            if c.pages {
                                // Page i / 16 starts at a multiple of 16·stride.
                                (i / 16 * 16 * stride + i % 16) as u32
                            } else {
                                (i * stride + (s * 31 + i * 17) % stride) as u32
                            }
                        })
                        .collect(),
                )
            })
            .collect();
        IndexList::from_sets(Scope::KvHead, &sets).unwrap()
    });
    let norm = match c.entmax {
        None => Normalizer::Softmax,
        Some(_) => Normalizer::Entmax { alpha: 1.5 },
    };
    Inputs {
        q,
        k,
        v,
        segs,
        list,
        norm,
        v_rows,
    }
}

/// Bytes read by one call: K rows, V rows with non-zero weight, q, lists.
fn bytes_read<T: Element>(c: &Case, inp: &Inputs<T>) -> f64 {
    let row = (c.d * size_of::<T>()) as f64;
    let segs = (c.batch * c.hkv) as f64;
    let k_rows = c.k.unwrap_or(c.n) as f64;
    let lists = c.k.map_or(0.0, |k| (k * 4) as f64) * segs;
    segs * (k_rows + inp.v_rows as f64) * row
        + (c.batch * c.hq * c.d * size_of::<T>()) as f64
        + lists
}

fn run<B: Ops<Buffer<T> = Vec<T>>, T: Element>(b: &B, c: &Case, inp: &Inputs<T>, out: &mut Vec<T>) {
    let geom = HeadGeometry::new(c.hq, c.hkv, c.d).unwrap();
    let restrict = match &inp.list {
        Some(l) => Restrict::Indices(l),
        None => Restrict::Dense,
    };
    let p = DecodeParams {
        geom,
        segments: &inp.segs,
        scale: None,
        normalizer: &inp.norm,
        restrict,
    };
    ops::decode_attention::<B, T>(b, &p, &inp.q, &inp.k, &inp.v, out).unwrap();
}

/// The small preset every run starts with: CPU vs reference.
fn check_against_reference() {
    for entmax in [None, Some(0.1)] {
        for k in [None, Some(64)] {
            let c = Case {
                hq: 8,
                hkv: 2,
                d: 64,
                n: 700,
                batch: 2,
                k,
                pages: false,
                plain: false,
                entmax,
            };
            let inp = inputs::<f32>(&c);
            let mut want = vec![0.0f32; inp.q.len()];
            run(&Reference, &c, &inp, &mut want);
            let mut got = vec![0.0f32; inp.q.len()];
            run(&Cpu::new(), &c, &inp, &mut got);
            for (a, e) in got.iter().zip(&want) {
                assert!(
                    (a - e).abs() <= 5e-5 + 1e-4 * e.abs(),
                    "decode preset {c:?}: {a} vs {e}"
                );
            }
        }
    }
    println!("kvsieve-decode | preset check against the reference: ok");
}

/// One pool and its copy yardstick.
type Pool = (Arc<rayon::ThreadPool>, common::CopyRef);

/// Benchmarks one case on every pool; returns the median seconds per pool.
fn bench_case<T: Element>(crit: &mut Criterion, c: &Case, pools: &mut [Pool]) -> Vec<f64> {
    let inp = inputs::<T>(c);
    let bytes = bytes_read(c, &inp);
    let mut out = vec![T::default(); inp.q.len()];
    let mut secs = Vec::new();
    let mut group = crit.benchmark_group("decode");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes as u64));
    for (pool, copy) in pools.iter_mut() {
        let threads = pool.current_num_threads();
        let cpu = Cpu::with_isa(isa::detected()).pool(pool.clone());
        let name = format!("{}/t{threads}", c.name::<T>());
        let reps = if c.n > 65536 { 5 } else { 15 };
        let (t, bw, rd) = common::paired_rw(copy, reps, || run(&cpu, c, &inp, &mut out));
        common::report_rw("decode", &name, bytes, t, bw, rd);
        secs.push(t);
        group.bench_function(BenchmarkId::from_parameter(&name), |b| {
            b.iter(|| run(&cpu, c, &inp, &mut out))
        });
    }
    group.finish();
    secs
}

/// The gather floor of an index-list case on each pool: one head's Q·K over
/// the listed K rows plus the same over the listed V rows, segments in
/// parallel; median seconds, timed alternately with the copy like the
/// kernel (so both start from a cache the copy has swept).
fn gather_floor<T: Element>(c: &Case, pools: &mut [Pool]) -> Vec<f64> {
    let inp = inputs::<T>(c);
    let list = inp.list.as_ref().expect("an index-list case");
    let isa = isa::detected();
    let d = c.d;
    let q1: Vec<f32> = (0..d).map(hash).collect();
    let mut outs = vec![0.0f32; inp.segs.num_segments() * c.n];
    pools
        .iter_mut()
        .map(|(pool, copy)| {
            let floor = || {
                pool.install(|| {
                    outs.par_chunks_mut(c.n).enumerate().for_each(|(s, out)| {
                        let (off, idx) = (inp.segs.offset(s), list.list(s));
                        for src in [&inp.k, &inp.v] {
                            simd::scores_gather(isa, &q1, 1, src, d, off, idx, 1.0, out, c.n);
                        }
                    })
                });
                std::hint::black_box(&outs);
            };
            common::paired(copy, 15, floor).0
        })
        .collect()
}

/// A page table holding `n` tokens per KV head of one sequence in pages of
/// `p` (whole pages), the pages in a shuffled order (seeded).
fn shuffled_table(layout: PageLayout, p: usize, hkv: usize, n: usize) -> PageTable {
    let pages = n.div_ceil(p);
    let mut order: Vec<u32> = (0..pages as u32).collect();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..pages).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    PageTable::new(PageTableParts {
        layout,
        page_size: p,
        num_pages: pages,
        num_kv_heads: hkv,
        scope: PageScope::Sequence,
        page_indptr: vec![0, pages as u32],
        page_indices: order,
        last_page_len: vec![(n - (pages - 1) * p) as u32],
    })
    .unwrap()
}

/// The contiguous rows `x` (`segs`) copied into a page pool at their paged
/// rows (`cpu::alloc` buffer, as `Cpu::upload` gives).
fn to_pool<T: Element>(table: &PageTable, segs: &Segments, x: &[T], d: usize) -> Vec<T> {
    let mut pool = vec![T::default(); table.rows() * d];
    for s in 0..segs.num_segments() {
        for j in 0..segs.len_of(s) {
            let (src, dst) = (segs.offset(s) + j, table.row(s, j));
            pool[dst * d..(dst + 1) * d].copy_from_slice(&x[src * d..(src + 1) * d]);
        }
    }
    kv_buffer_from(&pool).unwrap()
}

fn run_paged<T: Element>(
    cpu: &Cpu,
    c: &Case,
    table: &PageTable,
    q: &Vec<T>,
    kp: &Vec<T>,
    vp: &Vec<T>,
    out: &mut Vec<T>,
) {
    let geom = HeadGeometry::new(c.hq, c.hkv, c.d).unwrap();
    let p = PagedDecodeParams {
        geom,
        pages: table,
        scale: None,
        normalizer: &Normalizer::Softmax,
        restrict: Restrict::Dense,
    };
    ops::decode_attention_paged(cpu, &p, q, kp, vp, out).unwrap();
}

/// The paged preset: paged decode on the CPU against the reference's
/// contiguous decode of the same tokens (both layouts, a ragged tail page).
fn check_paged_against_reference() {
    let c = Case {
        hq: 8,
        hkv: 2,
        d: 64,
        n: 700,
        batch: 1,
        k: None,
        pages: false,
        plain: false,
        entmax: None,
    };
    let inp = inputs::<f32>(&c);
    let mut want = vec![0.0f32; inp.q.len()];
    run(&Reference, &c, &inp, &mut want);
    for layout in [PageLayout::Hnd, PageLayout::Nhd] {
        let table = shuffled_table(layout, 16, c.hkv, c.n);
        let kp = to_pool(&table, &inp.segs, &inp.k, c.d);
        let vp = to_pool(&table, &inp.segs, &inp.v, c.d);
        let mut got = vec![0.0f32; inp.q.len()];
        run_paged(&Cpu::new(), &c, &table, &inp.q, &kp, &vp, &mut got);
        for (a, e) in got.iter().zip(&want) {
            assert!(
                (a - e).abs() <= 5e-5 + 1e-4 * e.abs(),
                "paged preset {layout:?}: {a} vs {e}"
            );
        }
    }
    println!("kvsieve-decode | paged preset check against the reference: ok");
}

/// Median seconds of the contiguous and the paged call and the copy
/// bandwidth, the three timed alternately (`reps` rounds after a warm-up).
fn paired3(
    copy: &mut common::CopyRef,
    reps: usize,
    mut a: impl FnMut(),
    mut b: impl FnMut(),
) -> (f64, f64, f64) {
    let med = |t: &mut Vec<f64>| {
        t.sort_by(|x, y| x.total_cmp(y));
        t[t.len() / 2]
    };
    a();
    b();
    copy.once();
    let (mut ta, mut tb, mut tc) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let s = std::time::Instant::now();
        a();
        ta.push(s.elapsed().as_secs_f64());
        let s = std::time::Instant::now();
        b();
        tb.push(s.elapsed().as_secs_f64());
        tc.push(copy.once());
    }
    (
        med(&mut ta),
        med(&mut tb),
        common::COPY_BYTES as f64 / med(&mut tc),
    )
}

/// Paged against contiguous dense decode (target ≥ 0.95x throughput): one
/// summary line per (dtype, layout, P, threads).
fn paged_vs_contiguous<T: Element>(crit: &mut Criterion, base: &Case, pools: &mut [Pool]) {
    let inp = inputs::<T>(base);
    let bytes = bytes_read(base, &inp);
    let mut out = vec![T::default(); inp.q.len()];
    let mut group = crit.benchmark_group("decode");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(bytes as u64));
    for layout in [PageLayout::Hnd, PageLayout::Nhd] {
        for p in [16usize, 64] {
            let table = shuffled_table(layout, p, base.hkv, base.n);
            let kp = to_pool(&table, &inp.segs, &inp.k, base.d);
            let vp = to_pool(&table, &inp.segs, &inp.v, base.d);
            for (pool, copy) in pools.iter_mut() {
                let threads = pool.current_num_threads();
                let cpu = Cpu::with_isa(isa::detected()).pool(pool.clone());
                let mut out2 = vec![T::default(); inp.q.len()];
                let (tc, tp, bw) = paired3(
                    copy,
                    15,
                    || run(&cpu, base, &inp, &mut out),
                    || run_paged(&cpu, base, &table, &inp.q, &kp, &vp, &mut out2),
                );
                assert!(out == out2, "paged and contiguous outputs differ");
                let name = format!("{}/paged-{layout:?}-P{p}/t{threads}", base.name::<T>());
                common::report(
                    "decode",
                    &format!("{}/t{threads}", base.name::<T>()),
                    bytes,
                    tc,
                    bw,
                );
                common::report("decode", &name, bytes, tp, bw);
                println!(
                    "kvsieve-decode | {} {layout:?} P={p} t{threads}: paged {:.3} ms, contiguous {:.3} ms: paged throughput = {:.3}x contiguous (target >= 0.95x)",
                    T::DTYPE,
                    tp * 1e3,
                    tc * 1e3,
                    tc / tp
                );
                group.bench_function(BenchmarkId::from_parameter(&name), |b| {
                    b.iter(|| run_paged(&cpu, base, &table, &inp.q, &kp, &vp, &mut out2))
                });
            }
        }
    }
    group.finish();
}

fn benches(crit: &mut Criterion) {
    check_against_reference();
    check_paged_against_reference();
    let only = std::env::var("KVSIEVE_BENCH_ONLY").ok();
    let only_paged = only.as_deref() == Some("paged");
    let mut pools: Vec<Pool> = common::thread_counts()
        .into_iter()
        .map(|n| {
            let p = common::pool(n);
            let mut copy = common::CopyRef::new(p.clone());
            println!(
                "kvsieve-decode | copy bandwidth, {n} thread(s): {:.2} GB/s at start-up (256 MiB buffer; each line below uses its own alternated copy)",
                copy.bandwidth() / 1e9
            );
            (p, copy)
        })
        .collect();
    println!(
        "kvsieve-decode | isa = {}, threads = {:?}",
        isa::detected(),
        common::thread_counts()
    );
    let last = pools.len() - 1;
    let base = Case {
        hq: 32,
        hkv: 8,
        d: 128,
        n: 32 * 1024,
        batch: 1,
        k: None,
        pages: false,
        plain: false,
        entmax: None,
    };
    let sparse = Case {
        k: Some(2048),
        ..base
    };
    let paged = Case {
        pages: true,
        ..sparse
    };
    // Issue #18: dense 32K decode per dtype against the read ceiling only.
    if only.as_deref() == Some("dense") {
        bench_case::<f32>(crit, &base, &mut pools);
        bench_case::<f16>(crit, &base, &mut pools);
        bench_case::<bf16>(crit, &base, &mut pools);
        return;
    }
    // Issue #14: paged dense decode against contiguous (f16, bf16).
    paged_vs_contiguous::<f16>(crit, &base, &mut pools);
    paged_vs_contiguous::<bf16>(crit, &base, &mut pools);
    if only_paged {
        return;
    }
    // Target: dense 32K, all dtypes, 1 and all threads; index list k = 2048.
    macro_rules! dense_vs_sparse {
        ($t:ty) => {{
            let dense = bench_case::<$t>(crit, &base, &mut pools);
            let idx = bench_case::<$t>(crit, &sparse, &mut pools);
            let pages = bench_case::<$t>(crit, &paged, &mut pools);
            let floor = gather_floor::<$t>(&sparse, &mut pools);
            let pfloor = gather_floor::<$t>(&paged, &mut pools);
            for i in 0..pools.len() {
                let bound = 2048.0 / base.n as f64 * dense[i];
                println!(
                    "kvsieve-decode | {} t{}: (k/N) x dense = {:.3} ms; scattered idx2048 {:.2}x, its gather floor {:.2}x; paged idx2048 {:.2}x, its gather floor {:.2}x (target <= 1.25x)",
                    <$t as Element>::DTYPE,
                    pools[i].0.current_num_threads(),
                    bound * 1e3,
                    idx[i] / bound,
                    floor[i] / bound,
                    pages[i] / bound,
                    pfloor[i] / bound,
                );
            }
        }};
    }
    dense_vs_sparse!(f32);
    dense_vs_sparse!(f16);
    dense_vs_sparse!(bf16);
    // What huge pages buy: f32 dense and scattered index list, one thread,
    // K / V and the copy in plain `Vec`s, against the same cases on
    // `cpu::alloc` buffers.
    {
        let mut plain = [(
            pools[0].0.clone(),
            common::CopyRef::plain(pools[0].0.clone()),
        )];
        for c in [base, sparse] {
            let huge = bench_case::<f32>(crit, &c, &mut pools[..1]);
            let small = bench_case::<f32>(crit, &Case { plain: true, ..c }, &mut plain);
            println!(
                "kvsieve-decode | {} t1: 4 KiB pages {:.2} ms, huge pages {:.2} ms ({:.0} % less time)",
                c.name::<f32>(),
                small[0] * 1e3,
                huge[0] * 1e3,
                100.0 * (1.0 - huge[0] / small[0])
            );
        }
        println!(
            "kvsieve-decode | copy, 1 thread: 4 KiB pages {:.2} GB/s, huge pages {:.2} GB/s",
            plain[0].1.bandwidth() / 1e9,
            pools[0].1.bandwidth() / 1e9
        );
    }

    let all = &mut pools[last..];
    // Context sweep (f16, all threads).
    for n in [4 * 1024, 128 * 1024] {
        bench_case::<f16>(crit, &Case { n, ..base }, all);
    }
    // GQA group sweep at 8K (f16): G = 1 (32 KV heads) and G = 8 (4 KV heads).
    for hkv in [32, 4] {
        bench_case::<f16>(
            crit,
            &Case {
                hkv,
                n: 8 * 1024,
                ..base
            },
            all,
        );
    }
    // Batch 4 at 4K (f16).
    bench_case::<f16>(
        crit,
        &Case {
            batch: 4,
            n: 4 * 1024,
            ..base
        },
        all,
    );
    // Entmax α = 1.5 vs softmax (f32, 32K): full support and ~10%.
    let soft = bench_case::<f32>(crit, &base, &mut pools);
    for share in [1.0, 0.1] {
        let e = bench_case::<f32>(
            crit,
            &Case {
                entmax: Some(share),
                ..base
            },
            &mut pools,
        );
        for (i, (s, e)) in soft.iter().zip(&e).enumerate() {
            println!(
                "kvsieve-decode | entmax1.5 support {:.0}% / softmax, pool {i}: {:.2}",
                100.0 * share,
                e / s
            );
        }
    }
}

criterion_group!(decode_benches, benches);
criterion_main!(decode_benches);
