//! Repeatable cost of the CPU kernels: one case per run, for instruction
//! counts under callgrind (the development VM shares its cores, so
//! wall-clock medians move by ±30 %; instruction counts do not).
//!
//! Cases: decode (32 query / 8 KV heads, D = 128, 32K or 4K tokens; dense,
//! index list, softmax and entmax at several α and supports), causal
//! prefill (1K tokens, 8 / 2 heads), row normalisers (64 × 4K) and the
//! crate's row solvers. Without `--once`: medians on a 1-thread pool. With
//! `--once`: one warm-up call, then `KVB_N` calls (default 1); the
//! instructions of one call are `(Ir(KVB_N=3) − Ir(KVB_N=1)) / 2`:
//!
//! ```sh
//! cargo bench --bench cost --no-run
//! B=$(ls -t target/release/deps/cost-* | grep -v '\.d$' | head -1)
//! for n in 1 3; do KVB_N=$n valgrind --tool=callgrind --callgrind-out-file=cg.$n \
//!   $B --once decode/f32/32K/dense/softmax; done
//! callgrind_annotate cg.1 | grep 'PROGRAM TOTALS'; callgrind_annotate cg.3 | grep 'PROGRAM TOTALS'
//! ```
//!
//! (valgrind has no AVX-512: the detected ISA under it is AVX2.)
use half::f16;
use kvsieve::cpu::Cpu;
use kvsieve::ops::{self, DecodeParams, PrefillParams};
use kvsieve::*;
use std::sync::Arc;
use std::time::Instant;

fn hash(i: usize) -> f32 {
    let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

struct Dec<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    segs: Segments,
    list: Option<IndexList>,
    norm: Normalizer,
    out: Vec<T>,
    geom: HeadGeometry,
}

fn dec<T: Element>(n: usize, k: Option<usize>, entmax: Option<(f32, f64)>) -> Dec<T> {
    let (hq, hkv, d) = (32, 8, 128);
    let segs = Segments::uniform(1, hkv, n).unwrap();
    let rows = segs.rows_needed();
    let (q, kk): (Vec<T>, Vec<T>) = match entmax {
        None => (
            (0..hq * d).map(|i| T::from_f32(hash(i))).collect(),
            (0..rows * d).map(|i| T::from_f32(hash(i + 7))).collect(),
        ),
        Some((_, share)) => {
            let every = (1.0 / share).round() as usize;
            (
                (0..hq * d)
                    .map(|i| {
                        T::from_f32(if i % d == 0 {
                            (d as f32).sqrt() * 4.0
                        } else {
                            0.0
                        })
                    })
                    .collect(),
                (0..rows * d)
                    .map(|i| {
                        let (j, col) = ((i / d) % n, i % d);
                        T::from_f32(if col == 0 {
                            if j % every == 0 { 1.0 } else { 0.0 }
                        } else {
                            1e-3 * hash(i)
                        })
                    })
                    .collect(),
            )
        }
    };
    let v = (0..rows * d).map(|i| T::from_f32(hash(i + 13))).collect();
    let list = k.map(|kk| {
        let stride = n / kk;
        let sets: Vec<IndexSet> = (0..segs.num_segments())
            .map(|s| {
                IndexSet::from_unsorted(
                    (0..kk)
                        .map(|i| (i * stride + (s * 31 + i * 17) % stride) as u32)
                        .collect(),
                )
            })
            .collect();
        IndexList::from_sets(Scope::KvHead, &sets).unwrap()
    });
    let norm = match entmax {
        None => Normalizer::Softmax,
        Some((a, _)) => Normalizer::Entmax { alpha: a },
    };
    Dec {
        q,
        k: kk,
        v,
        segs,
        list,
        norm,
        out: vec![T::default(); hq * d],
        geom: HeadGeometry::new(hq, hkv, d).unwrap(),
    }
}

fn run_dec<T: Element>(cpu: &Cpu, c: &mut Dec<T>) {
    let restrict = match &c.list {
        Some(l) => Restrict::Indices(l),
        None => Restrict::Dense,
    };
    let p = DecodeParams {
        geom: c.geom,
        segments: &c.segs,
        scale: None,
        normalizer: &c.norm,
        restrict,
    };
    ops::decode_attention(cpu, &p, &c.q, &c.k, &c.v, &mut c.out).unwrap();
}

#[inline(never)]
fn measure(f: &mut dyn FnMut()) {
    f()
}

fn time(name: &str, once: bool, reps: usize, mut f: impl FnMut()) {
    if once {
        // `--once N`: one warm-up call, then N calls (instruction counts:
        // the difference of two runs with different N).
        let n: usize = std::env::var("KVB_N")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        f();
        for _ in 0..n {
            measure(&mut f);
        }
        println!("{name}: done");
        return;
    }
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name:40} median {:8.3} ms  min {:8.3} ms",
        t[reps / 2] * 1e3,
        t[0] * 1e3
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let once = args.iter().any(|a| a == "--once");
    let filter = args
        .iter()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .cloned()
        .unwrap_or_default();
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap(),
    );
    let cpu = Cpu::with_pool(pool);
    println!("isa {}", cpu.isa());
    let want = |n: &str| n.contains(&filter);
    macro_rules! d {
        ($name:expr, $t:ty, $n:expr, $k:expr, $e:expr, $reps:expr) => {
            if want($name) {
                let mut c = dec::<$t>($n, $k, $e);
                time($name, once, $reps, || run_dec(&cpu, &mut c));
            }
        };
    }
    d!("decode/f32/32K/dense/softmax", f32, 32768, None, None, 31);
    d!("decode/f16/32K/dense/softmax", f16, 32768, None, None, 31);
    d!(
        "decode/f32/32K/idx2048/softmax",
        f32,
        32768,
        Some(2048),
        None,
        61
    );
    d!(
        "decode/f32/32K/dense/entmax1.5@100%",
        f32,
        32768,
        None,
        Some((1.5, 1.0)),
        31
    );
    d!(
        "decode/f32/32K/dense/entmax1.5@10%",
        f32,
        32768,
        None,
        Some((1.5, 0.1)),
        31
    );
    d!(
        "decode/f32/4K/dense/entmax1.25@10%",
        f32,
        4096,
        None,
        Some((1.25, 0.1)),
        31
    );
    d!(
        "decode/f32/4K/dense/entmax3@10%",
        f32,
        4096,
        None,
        Some((3.0, 0.1)),
        11
    );
    d!(
        "decode/f32/4K/dense/entmax1.05@10%",
        f32,
        4096,
        None,
        Some((1.05, 0.1)),
        11
    );
    // Prefill: 1K causal, 8q/2kv, D=128, softmax and entmax 1.5.
    for (name, norm) in [
        ("prefill/f32/1K/softmax", Normalizer::Softmax),
        (
            "prefill/f32/1K/entmax1.5",
            Normalizer::Entmax { alpha: 1.5 },
        ),
    ] {
        if !want(name) {
            continue;
        }
        let (hq, hkv, d, n) = (8, 2, 128, 1024);
        let segs = Segments::uniform(1, hkv, n).unwrap();
        let q_rows = Ragged::uniform(1, n).unwrap();
        let q: Vec<f32> = (0..n * hq * d).map(|i| 2.0 * hash(i)).collect();
        let k: Vec<f32> = (0..n * hkv * d).map(|i| 2.0 * hash(i + 5)).collect();
        let v: Vec<f32> = (0..n * hkv * d).map(|i| hash(i + 9)).collect();
        let mut out = vec![0.0f32; q.len()];
        let p = PrefillParams {
            geom: HeadGeometry::new(hq, hkv, d).unwrap(),
            q_rows: &q_rows,
            segments: &segs,
            causal: true,
            mask: None,
            scale: None,
            normalizer: &norm,
        };
        time(name, once, 11, || {
            ops::prefill_attention(&cpu, &p, &q, &k, &v, &mut out).unwrap()
        });
    }
    // The crate's row solvers (what `cargo bench --bench entmax` times).
    for n in [1024usize, 32768] {
        let z: Vec<f32> = (0..n).map(|i| 4.0 * hash(i + 3)).collect();
        let name = format!("solver/halley1.5/{n}");
        if want(&name) {
            time(&name, once, 31, || {
                std::hint::black_box(
                    kvsieve::entmax::entmax_halley(
                        &z,
                        1.5,
                        &kvsieve::entmax::EntmaxOptions::halley(),
                    )
                    .unwrap(),
                );
            });
        }
        let name = format!("solver/bisect1.5/{n}");
        if want(&name) {
            time(&name, once, 31, || {
                std::hint::black_box(
                    kvsieve::entmax::entmax_bisect(
                        &z,
                        1.5,
                        &kvsieve::entmax::EntmaxOptions::bisection(),
                    )
                    .unwrap(),
                );
            });
        }
    }
    // Row normalisers: 64 rows of 4K.
    let (rows, n) = (64, 4096);
    let rg = Ragged::uniform(rows, n).unwrap();
    let x: Vec<f32> = (0..rows * n).map(|i| 6.8 * hash(i)).collect();
    let mut out = vec![0.0f32; x.len()];
    if want("rows/softmax") {
        time("rows/softmax", once, 31, || {
            ops::softmax_rows(&cpu, &rg, &x, &mut out).unwrap()
        });
    }
    for a in [1.5f32, 2.0, 1.25, 1.75, 1.05, 3.0] {
        let name = format!("rows/entmax{a}");
        if want(&name) {
            time(&name, once, 31, || {
                ops::entmax_rows(&cpu, &rg, &[a], &x, &mut out).unwrap()
            });
        }
    }
}
