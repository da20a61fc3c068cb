//! Regression tests of the fuzzing findings of issue #17, one test (or one
//! test body) per finding, named after it:
//!
//! 1. `entmax_alpha_above_2_is_never_all_zeros` (τ bracket passing max s);
//! 2. `cpu_entmax_is_accurate_for_every_alpha` (f32 τ for α > 2 and α → 1);
//! 3. `*_rejects_mismatched_*`, `mask_list_get_out_of_range_is_false`
//!    (panics on mismatched geometry / segments);
//! 4. `*_overflow*`, `*_too_large*` (integer overflow in size computations,
//!    allocations sized by user input);
//! 5. `*_is_an_error*`, `*_does_not_abort` (allocation aborts and overflow in
//!    budgets, policies, the cache, `SessionConfig` and `TraceConfig`);
//! 6. `finite_inputs_give_finite_outputs` (logit and value-sum overflow);
//!
//! and the findings of the fuzz targets of `fuzz/` (named after what they
//! check: `trace_loaders_reject_zero_query_heads`,
//! `fully_masked_rows_are_zero_with_nan_values`; `tests/ops.rs` has
//! `nan_rows_are_nan`).
//!
//! Findings 1, 3 and 4 concern host code and run once; 2 and 6 compare the
//! CPU backend (every ISA) with the reference. The GPU kernels solve τ in
//! f32 and cannot form logits past the f32 range (no f64 in WGSL): their
//! limits are written down in `docs/numerics.md`, so 2 and 6 run on the
//! reference and the CPU only (`reference_and_cpu!`).

mod common;

use common::*;
use kvsieve::attention::{LayerInput, Session, SessionConfig};
use kvsieve::cache::KvCache;
use kvsieve::entmax::{
    EntmaxOptions, TauBracket, entmax_bisect, entmax_bisect_f64, entmax_exact_f64, entmax_halley,
    entmax_halley_f64,
};
use kvsieve::ops::{self, DecodeParams, PrefillParams};
use kvsieve::policy::{
    Budget, H2O, H2oConfig, MorphKv, MorphKvConfig, MorphScoring, SnapKv, SnapKvConfig,
    StreamingLlm, StreamingLlmConfig,
};
use kvsieve::reference::Reference;
use kvsieve::*;

/// Expands generic bodies `fn body<B: Ops>(b: &B)` for the reference and
/// the CPU backend under every ISA (see the module docs for why not GPUs).
macro_rules! reference_and_cpu {
    ($($body:ident),* $(,)?) => {
        mod reference {
            $(
                #[test]
                fn $body() {
                    super::$body(&kvsieve::reference::Reference);
                }
            )*
        }
        mod cpu {
            $(
                #[test]
                fn $body() {
                    for isa in $crate::common::backends::cpu_isas() {
                        eprintln!("cpu backend, isa = {isa}");
                        super::$body(&kvsieve::cpu::Cpu::with_isa(isa));
                    }
                }
            )*
        }
    };
}

/// The attention tolerance of `docs/numerics.md` (f32 storage).
const ATTN: Tolerance = Tolerance {
    rel: 1e-4,
    abs: 5e-5,
};

// ------------------------------------------------------------------ finding 1

#[test]
fn entmax_alpha_above_2_is_never_all_zeros() {
    // The reproducers of the issue.
    let r = entmax_halley(&[0.0; 195], 4.0, &EntmaxOptions::default()).unwrap();
    let s: f64 = r.probs.iter().map(|&p| f64::from(p)).sum();
    assert!((s - 1.0).abs() < 1e-5, "sum {s}: {:?}", &r.probs[..4]);
    for &p in &r.probs {
        assert!((f64::from(p) - 1.0 / 195.0).abs() < 1e-7, "{p}");
    }
    let rows = Ragged::uniform(1, 2).unwrap();
    let mut out = vec![0.0f32; 2];
    for isa in backends::cpu_isas() {
        let cpu = kvsieve::cpu::Cpu::with_isa(isa);
        ops::entmax_rows(&cpu, &rows, &[65.5], &vec![0.0f32, 0.0], &mut out).unwrap();
        assert_eq!(out, vec![0.5, 0.5], "{isa}");
    }
    // Every solver, α > 2 up to the huge, rows of ties where τ_hi + ε > max s.
    let o = EntmaxOptions::new(200, 1e-9);
    for alpha in [2.5f32, 4.0, 8.0, 65.5, 1e3, 1e9, 1e30] {
        for n in [2usize, 3, 195, 4099] {
            let want = 1.0 / n as f64;
            let z32 = vec![0.0f32; n];
            let z64 = vec![0.0f64; n];
            let a = f64::from(alpha);
            let ctx = format!("alpha {alpha} n {n}");
            for p in [
                entmax_halley(&z32, alpha, &o).unwrap().probs,
                entmax_bisect(&z32, alpha, &o).unwrap().probs,
            ] {
                assert_close(&wide32(&p), &vec![want; n], F32, &ctx);
            }
            for p in [
                entmax_halley_f64(&z64, a, &o).unwrap().probs,
                entmax_bisect_f64(&z64, a, &o).unwrap().probs,
                entmax_exact_f64(&z64, a).unwrap().0,
            ] {
                assert_close(&p, &vec![want; n], STRICT, &ctx);
            }
        }
    }
    // The update rule itself: a Halley candidate at or past `max s` is never
    // returned, even inside the ε margin above `hi`.
    let mut br = TauBracket::new(-1.0, -1e-9).below(0.0);
    // f = 0.5, f' = −1e3, f'' = 0 from τ = −0.5: Newton goes to 0.0 > hi.
    let step = br.halley(-0.5, 0.5, -1.0, 0.0);
    assert!(step.tau < 0.0 && step.fallback, "{step:?}");
    let mut br = TauBracket::for_row(0.0, 195, 4.0);
    for _ in 0..200 {
        let t = br.halley(br.hi, 1e-3, -1e-12, 0.0).tau;
        assert!(t < 0.0, "{t}");
    }
}

fn wide32(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

// ------------------------------------------------------------------ finding 2

/// α values across (1, ∞): just above 1, the f32 search range [1.125, 2] and
/// its edges, above 2 up to huge.
const ALPHAS: [f32; 17] = [
    1.000_000_1,
    1.001,
    1.01,
    1.05,
    1.1,
    1.124,
    1.125,
    1.25,
    2.0,
    2.01,
    2.5,
    4.0,
    8.0,
    65.5,
    1e3,
    1e9,
    1e30,
];

/// One-head decodes with V in [1, 2] (the setting), α across (1, ∞),
/// and row entmax on the same logits.
fn cpu_entmax_is_accurate_for_every_alpha<B: Ops>(b: &B) {
    let mut rng = Rng::new(17);
    let geom = HeadGeometry::new(1, 1, 16).unwrap();
    for n in [7usize, 300, 1100] {
        let segs = Segments::uniform(1, 1, n).unwrap();
        let q: Vec<f32> = normal_vec(&mut rng, 16, 2.0);
        let k: Vec<f32> = normal_vec(&mut rng, n * 16, 1.0);
        let v: Vec<f32> = (0..n * 16).map(|_| 1.0 + rng.uniform() as f32).collect();
        for alpha in ALPHAS {
            let norm = Normalizer::Entmax { alpha };
            let p = DecodeParams {
                geom,
                segments: &segs,
                scale: None,
                normalizer: &norm,
                restrict: Restrict::Dense,
            };
            let mut want = vec![0.0f32; 16];
            ops::decode_attention(&Reference, &p, &q, &k, &v, &mut want).unwrap();
            let mut got = b.zeros::<f32>(16).unwrap();
            let (qb, kb, vb) = (up(b, &q), up(b, &k), up(b, &v));
            ops::decode_attention(b, &p, &qb, &kb, &vb, &mut got).unwrap();
            let ctx = format!("{} decode n={n} alpha={alpha}", b.name());
            assert_close(&wide32(&down(b, &got)), &wide32(&want), ATTN, &ctx);
            // Row entmax of logits with the spread of attention logits.
            let rows = Ragged::uniform(1, n).unwrap();
            let x: Vec<f32> = normal_vec(&mut rng, n, 2.0);
            let mut want = vec![0.0f32; n];
            ops::entmax_rows(&Reference, &rows, &[alpha], &x, &mut want).unwrap();
            let mut got = b.zeros::<f32>(n).unwrap();
            ops::entmax_rows(b, &rows, &[alpha], &up(b, &x), &mut got).unwrap();
            let ctx = format!("{} entmax_rows n={n} alpha={alpha}", b.name());
            let got = down(b, &got);
            assert_close(&wide32(&got), &wide32(&want), ENTMAX_ROWS, &ctx);
            assert_simplex(&got, 1e-5, &ctx);
        }
    }
    // Prefill: causal, GQA 2, per-head α on both sides of the f32 range.
    let geom = HeadGeometry::new(4, 2, 16).unwrap();
    let nq = 40;
    let segs = Segments::uniform(1, 2, 90).unwrap();
    let q_rows = Ragged::uniform(1, nq).unwrap();
    let q: Vec<f32> = normal_vec(&mut rng, nq * 4 * 16, 2.0);
    let k: Vec<f32> = normal_vec(&mut rng, 180 * 16, 1.0);
    let v: Vec<f32> = (0..180 * 16).map(|_| 1.0 + rng.uniform() as f32).collect();
    for alphas in [
        vec![1.000_000_1f32, 1.5, 4.0, 65.5],
        vec![1e9, 1.01, 2.0, 8.0],
    ] {
        let norm = Normalizer::EntmaxPerHead { alphas };
        let p = PrefillParams {
            geom,
            q_rows: &q_rows,
            segments: &segs,
            causal: true,
            mask: None,
            scale: None,
            normalizer: &norm,
        };
        let mut want = vec![0.0f32; q.len()];
        ops::prefill_attention(&Reference, &p, &q, &k, &v, &mut want).unwrap();
        let mut got = b.zeros::<f32>(q.len()).unwrap();
        let (qb, kb, vb) = (up(b, &q), up(b, &k), up(b, &v));
        ops::prefill_attention(b, &p, &qb, &kb, &vb, &mut got).unwrap();
        let ctx = format!("{} prefill {norm:?}", b.name());
        assert_close(&wide32(&down(b, &got)), &wide32(&want), ATTN, &ctx);
    }
}

/// α > 2 where τ lies closer to an entry than f64 resolves: `s = [0, −a]`
/// has `τ = −a − u` with `u = (1 − a^e)^(α−1)` (`e = 1/(α−1)`; for α = 65.5
/// and the `a` below, `u ≈ 1e-121`) and the weights `[a^e, 1 − a^e]` up to a
/// relative `u/a`. Bisection on τ gave `[0.64, 0.36]` for α = 65.5.
#[test]
fn entmax_weights_near_a_kink_are_exact() {
    for (alpha, a) in [
        (65.5f64, 0.415_622_558_687_644_75f64),
        (8.0, 0.9),
        (1e3, 0.5),
    ] {
        let e = 1.0 / (alpha - 1.0);
        let want = [a.powf(e), 1.0 - a.powf(e)];
        let z = [0.0, -a / (alpha - 1.0)];
        let (p, _) = entmax_exact_f64(&z, alpha).unwrap();
        assert_close(&p, &want, STRICT, &format!("reference alpha {alpha}"));
        // The CPU on the same f32 logits: rows and a one-token-dimension decode.
        let z32 = [0.0f32, (-a / (alpha - 1.0)) as f32];
        let (p32, _) =
            entmax_exact_f64(&[0.0, f64::from(z32[1])], alpha).expect("reference of the f32 row");
        for isa in backends::cpu_isas() {
            let cpu = kvsieve::cpu::Cpu::with_isa(isa);
            let mut out = vec![0.0f32; 2];
            let rows = Ragged::uniform(1, 2).unwrap();
            ops::entmax_rows(&cpu, &rows, &[alpha as f32], &z32.to_vec(), &mut out).unwrap();
            let ctx = format!("cpu {isa} rows alpha {alpha}");
            assert_close(&wide32(&out), &p32, F32, &ctx);
            let geom = HeadGeometry::new(1, 1, 1).unwrap();
            let segs = Segments::uniform(1, 1, 2).unwrap();
            let norm = Normalizer::Entmax {
                alpha: alpha as f32,
            };
            let p = DecodeParams {
                geom,
                segments: &segs,
                scale: Some(1.0),
                normalizer: &norm,
                restrict: Restrict::Dense,
            };
            let mut got = vec![0.0f32];
            ops::decode_attention(
                &cpu,
                &p,
                &vec![1.0f32],
                &z32.to_vec(),
                &vec![1.0, 0.0],
                &mut got,
            )
            .unwrap();
            let ctx = format!("cpu {isa} decode alpha {alpha}");
            assert_close(&[f64::from(got[0])], &p32[..1], F32, &ctx);
        }
    }
}

/// The entmax-rows contract of `docs/numerics.md`: 1e-5 per probability.
const ENTMAX_ROWS: Tolerance = Tolerance {
    rel: 0.0,
    abs: 1e-5,
};

fn up<B: Backend, T: Element>(b: &B, x: &[T]) -> B::Buffer<T> {
    b.upload(x).expect("upload")
}
fn down<B: Backend, T: Element>(b: &B, x: &B::Buffer<T>) -> Vec<T> {
    b.download(x).expect("download")
}

// ------------------------------------------------------------------ finding 3

#[test]
fn dam_decode_indices_rejects_mismatched_segments() {
    use kvsieve::policy::{Dam, HeadPattern};
    let geom = HeadGeometry::new(4, 2, 8).unwrap();
    let pattern = HeadPattern {
        diagonals: vec![0, 1],
        verticals: vec![0],
    };
    let dam = Dam::from_patterns(1, 4, 16, vec![pattern; 4]).expect("masks");
    // Four KV heads in the segments, two in the geometry.
    let segs = Segments::uniform(1, 4, 5).unwrap();
    assert!(matches!(
        dam.decode_indices(0, &geom, &segs),
        Err(Error::Shape { .. })
    ));
    assert!(dam.decode_mask(0, &geom, &segs).is_err());
    let ok = Segments::uniform(1, 2, 5).unwrap();
    assert_eq!(dam.decode_indices(0, &geom, &ok).unwrap().num_lists(), 4);
}

#[test]
fn index_list_check_against_rejects_mismatched_kv_heads() {
    let geom = HeadGeometry::new(4, 4, 8).unwrap();
    // One KV head in the segments: four KvHead lists would index segments 1..3.
    let segs = Segments::uniform(4, 1, 5).unwrap();
    let list = IndexList::from_sets(Scope::KvHead, &vec![IndexSet::all(2); 16]).unwrap();
    assert!(matches!(
        list.check_against("t", &geom, &segs),
        Err(Error::Shape { .. })
    ));
    let segs = Segments::uniform(1, 4, 5).unwrap();
    let list = IndexList::from_sets(Scope::KvHead, &vec![IndexSet::all(2); 4]).unwrap();
    assert!(list.check_against("t", &geom, &segs).is_ok());
}

#[test]
fn mask_list_check_against_rejects_short_q_rows() {
    let geom = HeadGeometry::new(2, 1, 8).unwrap();
    let segs = Segments::uniform(3, 1, 4).unwrap();
    let masks = MaskList::from_rows(Scope::KvHead, &vec![vec![BitMask::ones(4); 2]; 3]).unwrap();
    for q_rows in [vec![], vec![2], vec![2, 2]] {
        assert!(matches!(
            masks.check_against("t", &geom, &segs, &q_rows),
            Err(Error::Shape { .. })
        ));
    }
    assert!(masks.check_against("t", &geom, &segs, &[2, 2, 2]).is_ok());
    // Mismatched KV heads, too.
    let segs2 = Segments::uniform(1, 3, 4).unwrap();
    assert!(masks.check_against("t", &geom, &segs2, &[2]).is_err());
}

#[test]
fn mask_list_get_out_of_range_is_false() {
    let masks = MaskList::from_masks(Scope::KvHead, &[BitMask::ones(3)]).unwrap();
    assert!(masks.get(0, 0, 2));
    for (i, r, c) in [
        (1, 0, 0),
        (usize::MAX, 0, 0),
        (0, 1, 0),
        (0, 0, 3),
        (0, 0, usize::MAX),
    ] {
        assert!(!masks.get(i, r, c), "({i}, {r}, {c})");
    }
}

// ------------------------------------------------------------------ finding 4

fn is_too_large<T: std::fmt::Debug>(r: Result<T>) -> bool {
    match r {
        Err(e @ Error::TooLarge { .. }) => {
            // The message names the op and the limit.
            let m = e.to_string();
            assert!(m.contains("too large") && m.contains("limit"), "{m}");
            true
        }
        other => panic!("expected Error::TooLarge, got {other:?}"),
    }
}

#[test]
fn head_geometry_rejects_overflowing_row_width() {
    // 2^33 · 2^31 wraps to 0 in a release build.
    assert!(is_too_large(HeadGeometry::new(1 << 33, 1, 1 << 31)));
    assert!(is_too_large(HeadGeometry::new(usize::MAX, 1, usize::MAX)));
    assert!(is_too_large(HeadGeometry::new(1 << 16, 1, 1 << 16)));
    assert!(HeadGeometry::new(1 << 15, 1, 1 << 16).is_ok());
}

#[test]
fn npy_loader_rejects_overflowing_shape() {
    // Shape (2^62, 4, 1) of 4-byte values: the byte count wraps to 0.
    let mut header =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4, 1), }"
            .to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    let r = kvsieve::eval::io::load_npy_bytes("1", &[[&bytes, &bytes, &bytes]]);
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("data bytes"));
}

/// Found by the `loaders` fuzz target: `q` of shape `[T, 0, D]` (no query
/// head) was accepted, since `0 % Hkv == 0`.
#[test]
fn trace_loaders_reject_zero_query_heads() {
    let npy = |shape: [usize; 3]| {
        let mut header = format!(
            "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}, {}), }}",
            shape[0], shape[1], shape[2]
        );
        while !(10 + header.len() + 1).is_multiple_of(64) {
            header.push(' ');
        }
        header.push('\n');
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend((header.len() as u16).to_le_bytes());
        b.extend(header.as_bytes());
        b.extend(vec![0u8; 4 * shape.iter().product::<usize>()]);
        b
    };
    let (q, kv) = (npy([2, 0, 4]), npy([2, 1, 4]));
    let r = kvsieve::eval::io::load_npy_bytes("1", &[[&q, &kv, &kv]]);
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    let q = npy([2, 2, 4]);
    let t = kvsieve::eval::io::load_npy_bytes("1", &[[&q, &kv, &kv]]).unwrap();
    assert_eq!(
        (t.q_heads, t.kv_heads, t.head_dim, t.decode_steps),
        (2, 1, 4, 1)
    );
}

#[test]
fn segments_and_ragged_reject_overflow_and_huge_allocations() {
    assert!(is_too_large(Segments::uniform(1 << 40, 1 << 30, 1)));
    assert!(is_too_large(Segments::uniform(usize::MAX, 2, 0)));
    // 2^40 segments of length 0: 4 TiB of lengths, over MAX_ALLOC_BYTES.
    assert!(is_too_large(Segments::uniform(1 << 40, 1, 0)));
    assert!(is_too_large(Segments::uniform(1 << 20, 1 << 10, 1 << 10)));
    assert!(is_too_large(Segments::new(usize::MAX, 3, vec![], vec![])));
    assert!(is_too_large(Ragged::uniform(1 << 20, 1 << 20)));
    assert!(is_too_large(Ragged::uniform(usize::MAX, 0)));
    assert!(is_too_large(Ragged::uniform(1, 1 << 32)));
    let r = Ragged::uniform(3, 5).unwrap();
    assert_eq!(r.indptr(), &[0, 5, 10, 15]);
    assert_eq!(Ragged::uniform(0, 7).unwrap().indptr(), &[0]);
    assert_eq!(Segments::uniform(2, 2, 3).unwrap().rows_needed(), 12);
}

#[test]
fn bitmask_from_indices_rejects_too_large_len() {
    let idx = IndexSet::new(vec![1, 5]).unwrap();
    assert!(is_too_large(BitMask::from_indices(usize::MAX, &idx)));
    assert!(is_too_large(BitMask::from_indices(
        BitMask::MAX_LEN + 1,
        &idx
    )));
    assert!(is_too_large(BitMask::try_zeros(usize::MAX)));
    let m = BitMask::from_indices(40, &idx).unwrap();
    assert_eq!(m.to_indices(), idx);
}

/// `Backend::zeros` sized by the caller: an error for a length no machine
/// can hold (the reference used `vec!`, which aborts the process).
#[test]
fn backend_zeros_reject_huge_lengths() {
    for len in [usize::MAX, usize::MAX / 4, 1 << 45] {
        assert!(is_too_large(Reference.zeros::<f32>(len)));
        let cpu = kvsieve::cpu::Cpu::new();
        assert!(cpu.zeros::<f32>(len).is_err(), "cpu zeros({len})");
    }
    assert_eq!(Reference.zeros::<f32>(3).unwrap(), vec![0.0; 3]);
}

#[test]
fn cache_ops_reject_overflowing_width() {
    let b = Reference;
    let huge = usize::MAX / 2 + 1;
    let mut dst: Vec<f32> = vec![];
    // indices.len() · width = 2^64: wraps to 0 in release, panics in debug.
    assert!(is_too_large(ops::scatter_rows(
        &b,
        huge,
        &[0, 1],
        &vec![],
        &mut dst
    )));
    // gather and merge check their indices against the (empty) source first;
    // their sizes go through the same checked arithmetic.
    assert!(ops::gather_rows(&b, huge, &[0, 0], &vec![], &mut dst).is_err());
    let groups = Ragged::from_lens(&[1, 1]).unwrap();
    assert!(ops::merge_rows(&b, huge, &groups, &[0, 0], &[1.0, 1.0], &vec![], &mut dst).is_err());
    // Ordinary widths still work.
    let mut dst = vec![0.0f32; 4];
    ops::scatter_rows(&b, 2, &[1], &vec![5.0f32, 6.0], &mut dst).unwrap();
    assert_eq!(dst, vec![0.0, 0.0, 5.0, 6.0]);
}

// ------------------------------------------------------------------ finding 6

/// Decode and prefill, one head of dimension 1 (the reproducers) and
/// of dimension 3, every normaliser and restriction: finite inputs of any
/// magnitude give the reference's finite outputs.
fn finite_inputs_give_finite_outputs<B: Ops>(b: &B) {
    let norms = [
        Normalizer::Softmax,
        Normalizer::Entmax { alpha: 1.5 },
        Normalizer::Entmax { alpha: 1.05 },
        Normalizer::Entmax { alpha: 4.0 },
    ];
    // (q, k, v, expected out), D = 1, two tokens.
    let cases: [(f32, [f32; 2], [f32; 2], f32); 5] = [
        (1e20, [1e20, 1e20], [1.0, 1.0], 1.0),
        (1e20, [1e20, -1e20], [1.0, 2.0], 1.0),
        (-1e20, [1e20, 1e20], [1.0, 3.0], 2.0),
        (1.0, [0.5, 0.5], [3e38, 3e38], 3e38),
        (1.0, [0.5, 0.5], [f32::MAX, f32::MAX], f32::MAX),
    ];
    let geom = HeadGeometry::new(1, 1, 1).unwrap();
    let segs = Segments::uniform(1, 1, 2).unwrap();
    let list = IndexList::from_sets(Scope::KvHead, &[IndexSet::all(2)]).unwrap();
    let mask = MaskList::from_masks(Scope::KvHead, &[BitMask::ones(2)]).unwrap();
    for norm in &norms {
        for &(q, k, v, want) in &cases {
            for restrict in [
                Restrict::Dense,
                Restrict::Indices(&list),
                Restrict::Mask(&mask),
            ] {
                let p = DecodeParams {
                    geom,
                    segments: &segs,
                    scale: None,
                    normalizer: norm,
                    restrict,
                };
                let mut out = b.zeros::<f32>(1).unwrap();
                let (qb, kb, vb) = (up(b, &[q]), up(b, &k), up(b, &v));
                ops::decode_attention(b, &p, &qb, &kb, &vb, &mut out).unwrap();
                let got = down(b, &out)[0];
                let ctx = format!(
                    "{} decode {norm:?} {restrict:?} q={q} k={k:?} v={v:?}",
                    b.name()
                );
                assert!(got.is_finite(), "{ctx}: {got}");
                assert_close(&[f64::from(got)], &[f64::from(want)], F32, &ctx);
            }
            // Prefill: both queries see both keys.
            let q_rows = Ragged::uniform(1, 2).unwrap();
            let p = PrefillParams {
                geom,
                q_rows: &q_rows,
                segments: &segs,
                causal: false,
                mask: None,
                scale: None,
                normalizer: norm,
            };
            let mut out = b.zeros::<f32>(2).unwrap();
            let (qb, kb, vb) = (up(b, &[q, q]), up(b, &k), up(b, &v));
            ops::prefill_attention(b, &p, &qb, &kb, &vb, &mut out).unwrap();
            let got = down(b, &out);
            let ctx = format!("{} prefill {norm:?} q={q} k={k:?} v={v:?}", b.name());
            assert!(got.iter().all(|x| x.is_finite()), "{ctx}: {got:?}");
            assert_close(&wide32(&got), &[f64::from(want); 2], F32, &ctx);
        }
    }
    // D = 3 with one overflowing logit among ordinary ones, GQA 2, a long
    // segment (several decode blocks), against the reference.
    let geom = HeadGeometry::new(2, 1, 3).unwrap();
    let n = 1100;
    let segs = Segments::uniform(1, 1, n).unwrap();
    let mut rng = Rng::new(6);
    let mut k: Vec<f32> = normal_vec(&mut rng, n * 3, 1.0);
    k[700 * 3] = 3e19;
    k[701 * 3] = 2.9e19;
    let v: Vec<f32> = (0..n * 3).map(|i| (i % 7) as f32 * 4e37).collect();
    let q = vec![2e19f32, 0.5, -0.5, 1.0, 1.0, 1.0];
    for norm in &norms {
        let p = DecodeParams {
            geom,
            segments: &segs,
            scale: None,
            normalizer: norm,
            restrict: Restrict::Dense,
        };
        let mut want = vec![0.0f32; 6];
        ops::decode_attention(&Reference, &p, &q, &k, &v, &mut want).unwrap();
        assert!(want.iter().all(|x| x.is_finite()), "{want:?}");
        let mut out = b.zeros::<f32>(6).unwrap();
        let (qb, kb, vb) = (up(b, &q), up(b, &k), up(b, &v));
        ops::decode_attention(b, &p, &qb, &kb, &vb, &mut out).unwrap();
        let ctx = format!("{} long decode {norm:?}", b.name());
        assert_close(&wide32(&down(b, &out)), &wide32(&want), ATTN, &ctx);
    }
}

/// Found by the `prefill` fuzz target: a prefill row that sees no key came
/// out NaN on the CPU when another row of its tile attends to a V row
/// holding NaN (the tiled value pass adds `0 · NaN`). Fully masked rows are
/// zeros whatever V holds; so are decode heads with an empty selection.
fn fully_masked_rows_are_zero_with_nan_values<B: Ops>(b: &B) {
    let geom = HeadGeometry::new(2, 1, 2).unwrap();
    let segs = Segments::uniform(1, 1, 2).unwrap();
    let v = vec![f32::NAN, 1.0, 2.0, f32::INFINITY];
    let (k, q) = (vec![0.5f32; 4], vec![1.0f32; 8]);
    let norms = [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }];
    for norm in &norms {
        // Prefill: query row 0 sees nothing, row 1 everything.
        let q_rows = Ragged::uniform(1, 2).unwrap();
        let rows = vec![BitMask::zeros(2), BitMask::ones(2)];
        let mask = MaskList::from_rows(Scope::KvHead, &[rows]).unwrap();
        let p = PrefillParams {
            geom,
            q_rows: &q_rows,
            segments: &segs,
            causal: false,
            mask: Some(&mask),
            scale: None,
            normalizer: norm,
        };
        let mut out = b.zeros::<f32>(8).unwrap();
        let (qb, kb, vb) = (up(b, &q), up(b, &k), up(b, &v));
        ops::prefill_attention(b, &p, &qb, &kb, &vb, &mut out).unwrap();
        let got = down(b, &out);
        assert_eq!(
            &got[..4],
            &[0.0; 4],
            "{} prefill {norm:?}: {got:?}",
            b.name()
        );
        // Decode: head 0 selects nothing, head 1 both tokens.
        let list = IndexList::from_sets(Scope::QueryHead, &[IndexSet::default(), IndexSet::all(2)])
            .unwrap();
        let p = DecodeParams {
            geom,
            segments: &segs,
            scale: None,
            normalizer: norm,
            restrict: Restrict::Indices(&list),
        };
        let mut out = b.zeros::<f32>(4).unwrap();
        let qb = up(b, &q[..4]);
        ops::decode_attention(b, &p, &qb, &kb, &vb, &mut out).unwrap();
        let got = down(b, &out);
        assert_eq!(
            &got[..2],
            &[0.0; 2],
            "{} decode {norm:?}: {got:?}",
            b.name()
        );
    }
}

reference_and_cpu!(
    cpu_entmax_is_accurate_for_every_alpha,
    finite_inputs_give_finite_outputs,
    fully_masked_rows_are_zero_with_nan_values
);

// ------------------------------------------- findings 4 and 5: policies, cache

/// Runs a 40-token prompt and 3 decode steps of a 2-query / 1-KV-head model
/// on the reference through a `Session` with `policy`.
fn run_session(
    policy: Box<dyn kvsieve::policy::KvPolicy<Reference, f32>>,
    cfg: SessionConfig,
) -> Result<()> {
    let geom = HeadGeometry::new(2, 1, 4)?;
    let mut s = Session::new(Reference, geom, 1, 1, policy, cfg)?;
    let mut rng = Rng::new(17);
    let n = 40;
    let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        normal_vec(&mut rng, n * 8, 1.0),
        normal_vec(&mut rng, n * 4, 1.0),
        normal_vec(&mut rng, n * 4, 1.0),
    );
    let input = LayerInput {
        q: &q,
        k: &k,
        v: &v,
    };
    s.prefill(&Ragged::uniform(1, n)?, &[input])?;
    for _ in 0..3 {
        let (q, k, v): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            normal_vec(&mut rng, 8, 1.0),
            normal_vec(&mut rng, 4, 1.0),
            normal_vec(&mut rng, 4, 1.0),
        );
        s.decode(&[LayerInput {
            q: &q,
            k: &k,
            v: &v,
        }])?;
    }
    Ok(())
}

#[test]
fn budget_sink_plus_recent_overflow_is_an_error() {
    let b = Budget::tokens(8).with_sink(usize::MAX).with_recent(2);
    assert!(
        matches!(b.validate("t"), Err(Error::Budget { .. })),
        "{:?}",
        b.validate("t")
    );
    assert!(b.resolve("t", 0, 1, 0, 1, 100).is_err());
    let b = Budget::ratio(0.5)
        .with_sink(usize::MAX)
        .with_recent(usize::MAX);
    assert!(b.resolve("t", 0, 1, 0, 1, 100).is_err());
    // Large but summable windows still resolve (the windows win).
    let b = Budget::ratio(0.5).with_sink(1 << 40).with_recent(1);
    assert_eq!(b.resolve("t", 0, 1, 0, 1, 100).unwrap(), (1 << 40) + 1);
}

#[test]
fn streaming_llm_with_overflowing_windows_keeps_everything() {
    let cfg = StreamingLlmConfig {
        sink: usize::MAX,
        recent: usize::MAX,
    };
    let p = StreamingLlm::new(cfg).unwrap();
    run_session(Box::new(p), SessionConfig::default()).unwrap();
    assert!(StreamingLlm::new(StreamingLlmConfig { sink: 0, recent: 0 }).is_err());
}

#[test]
fn snapkv_huge_window_does_not_abort() {
    // A window far past the prompt: checked without overflow, and the window
    // evidence is min(window, prompt) rows, so nothing huge is allocated.
    let cfg = SnapKvConfig {
        budget: Budget::ratio(0.5),
        window: 1 << 40,
        ..SnapKvConfig::default()
    };
    run_session(
        Box::new(SnapKv::new(cfg).unwrap()),
        SessionConfig::default(),
    )
    .unwrap();
    let cfg = SnapKvConfig {
        budget: Budget::tokens(64).with_sink(4),
        window: usize::MAX,
        ..SnapKvConfig::default()
    };
    assert!(matches!(
        SnapKv::<Reference, f32>::new(cfg),
        Err(Error::Budget { .. })
    ));
}

#[test]
fn morph_kv_huge_window_and_capacity_is_an_error_not_an_abort() {
    let cfg = MorphKvConfig {
        window: 1 << 40,
        capacity: 1 << 41,
        scoring: MorphScoring::Rescore,
        ..MorphKvConfig::default()
    };
    let p: MorphKv<Reference, f32> = MorphKv::new(cfg).unwrap();
    let r = run_session(Box::new(p), SessionConfig::default());
    assert!(is_too_large(r));
    // Evidence scoring keeps no queries: the same sizes just work.
    let cfg = MorphKvConfig {
        window: 1 << 40,
        capacity: 1 << 41,
        ..MorphKvConfig::default()
    };
    let p: MorphKv<Reference, f32> = MorphKv::new(cfg).unwrap();
    run_session(Box::new(p), SessionConfig::default()).unwrap();
}

#[test]
fn session_prefill_chunk_of_usize_max_is_one_chunk() {
    let cfg = SessionConfig {
        prefill_chunk: Some(usize::MAX),
        ..SessionConfig::default()
    };
    let p = H2O::new(H2oConfig {
        budget: Budget::tokens(16),
        ..H2oConfig::default()
    })
    .unwrap();
    run_session(Box::new(p), cfg).unwrap();
}

#[test]
fn kv_cache_with_huge_batch_or_layers_is_an_error() {
    let geom = HeadGeometry::new(2, 1, 4).unwrap();
    let new =
        |batch, layers| KvCache::<Reference, f32>::new(&Reference, geom, batch, layers).map(|_| ());
    assert!(is_too_large(new(1 << 40, 1)));
    assert!(is_too_large(new(usize::MAX, 1)));
    assert!(is_too_large(new(1, 1 << 40)));
    assert!(is_too_large(new(1, usize::MAX)));
    let with_cap =
        KvCache::<Reference, f32>::with_capacity(&Reference, geom, 1 << 20, 1, 1 << 20).map(|_| ());
    assert!(is_too_large(with_cap));
    assert!(new(2, 3).is_ok());
}

#[test]
fn trace_config_overflow_and_huge_prompts_are_errors() {
    use kvsieve::eval::{Trace, TraceConfig};
    // The eval example's `--prompt-len 100000000` (4 layers, 8 q / 2 KV
    // heads, D = 64) asked for 300 GB and aborted.
    let big = TraceConfig {
        prompt_len: 100_000_000,
        ..TraceConfig::default()
    };
    assert_eq!(big.bytes().unwrap(), 4 * 100_000_064 * 12 * 64 * 4);
    let huge = TraceConfig {
        prompt_len: usize::MAX,
        ..TraceConfig::default()
    };
    assert!(is_too_large(huge.validate()));
    assert!(is_too_large(Trace::synthetic(&huge)));
    let over = TraceConfig {
        sinks: usize::MAX,
        heavy_hitters: 2,
        ..TraceConfig::default()
    };
    assert!(over.validate().is_err());
    let steps = TraceConfig {
        decode_steps: usize::MAX,
        ..TraceConfig::default()
    };
    assert!(is_too_large(steps.validate()));
    assert!(TraceConfig::default().validate().is_ok());
}
