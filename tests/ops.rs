//! Op conformance: every backend against the reference, over the shape grid
//! of the harness (tail token counts, head dims 64 / 128 / 65, GQA groups
//! 1 / 4 / 8), every storage dtype and the named score distributions.
//!
//! The reference itself runs these bodies too (trivially equal to itself,
//! but the invariants — simplex rows, selection sizes, zero rows — are
//! re-checked on its output).

mod common;

use common::*;
use half::{bf16, f16};
use kvsieve::ops::{self, DecodeParams, PrefillParams, QkParams};
use kvsieve::reference::Reference;
use kvsieve::*;

fn up<B: Backend, T: Element>(b: &B, x: &[T]) -> B::Buffer<T> {
    b.upload(x).expect("upload")
}
fn down<B: Backend, T: Element>(b: &B, x: &B::Buffer<T>) -> Vec<T> {
    b.download(x).expect("download")
}
fn wide<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}

/// Machine epsilon of the storage dtype.
fn eps_of(d: DType) -> f64 {
    match d {
        DType::F32 => f64::from(f32::EPSILON),
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
    }
}

// ------------------------------------------------------------------ normalisers

fn score_rows(seed: u64) -> (Ragged, Vec<f32>, Vec<String>) {
    let mut rng = Rng::new(seed);
    let mut lens = Vec::new();
    let mut x = Vec::new();
    let mut names = Vec::new();
    for &n in &TOKENS {
        for dist in Dist::SCORES {
            lens.push(n as u32);
            x.extend(dist.sample(&mut rng, n));
            names.push(format!("n={n} {dist}"));
        }
    }
    (Ragged::from_lens(&lens).unwrap(), x, names)
}

fn softmax_rows_match_reference<B: Ops>(b: &B) {
    let (rows, x, names) = score_rows(1);
    let mut expect = vec![0.0f32; x.len()];
    ops::softmax_rows(&Reference, &rows, &x, &mut expect).unwrap();
    let mut out = b.zeros::<f32>(x.len()).unwrap();
    ops::softmax_rows(b, &rows, &up(b, &x), &mut out).unwrap();
    let out = down(b, &out);
    for (r, name) in names.iter().enumerate() {
        let range = rows.range(r);
        let ctx = format!("{}: softmax row {r} ({name})", b.name());
        assert_close(
            &wide(&out[range.clone()]),
            &wide(&expect[range.clone()]),
            F32,
            &ctx,
        );
        if x[range.clone()].iter().any(|v| v.is_finite()) {
            assert_simplex(&out[range], 1e-5, &ctx);
        } else {
            assert!(
                out[range].iter().all(|&p| p == 0.0),
                "{ctx}: masked row not zero"
            );
        }
    }
}

fn entmax_rows_match_reference<B: Ops>(b: &B) {
    let (rows, x, names) = score_rows(2);
    // Accuracy contract: 1e-5 absolute per probability (docs/numerics.md).
    let tol = Tolerance {
        rel: 0.0,
        abs: 1e-5,
    };
    for alpha in [1.25f32, 1.5, 2.0, 3.0] {
        let mut expect = vec![0.0f32; x.len()];
        ops::entmax_rows(&Reference, &rows, &[alpha], &x, &mut expect).unwrap();
        let mut out = b.zeros::<f32>(x.len()).unwrap();
        ops::entmax_rows(b, &rows, &[alpha], &up(b, &x), &mut out).unwrap();
        let out = down(b, &out);
        for (r, name) in names.iter().enumerate() {
            let range = rows.range(r);
            let ctx = format!("{}: entmax(alpha={alpha}) row {r} ({name})", b.name());
            assert_close(
                &wide(&out[range.clone()]),
                &wide(&expect[range.clone()]),
                tol,
                &ctx,
            );
            if x[range.clone()].iter().any(|v| v.is_finite()) {
                assert_simplex(&out[range.clone()], 1e-5, &ctx);
            }
            // Exact zeros where the reference has exact zeros below tau.
            for i in range {
                if expect[i] == 0.0 && out[i] != 0.0 {
                    assert!(
                        out[i] < 1e-6,
                        "{ctx}: index {i} should be an exact zero, got {}",
                        out[i]
                    );
                }
            }
        }
    }
}

/// A row with NaN (or `+inf`) is NaN on every backend (`docs/numerics.md`),
/// also when every other entry is `-inf` or the NaN is alone: the SIMD max
/// skips NaN, and such rows came out as zeros on the CPU (issue #17 fuzzing).
fn nan_rows_are_nan<B: Ops>(b: &B) {
    let ninf = f32::NEG_INFINITY;
    let rows_in: [&[f32]; 6] = [
        &[f32::NAN],
        &[f32::NAN, ninf, ninf],
        &[ninf, f32::NAN],
        &[1.0, f32::NAN, 2.0],
        &[f32::INFINITY, 0.0],
        &[ninf, f32::INFINITY],
    ];
    let lens: Vec<u32> = rows_in.iter().map(|r| r.len() as u32).collect();
    let rows = Ragged::from_lens(&lens).unwrap();
    let x: Vec<f32> = rows_in.concat();
    let mut out = b.zeros::<f32>(x.len()).unwrap();
    ops::softmax_rows(b, &rows, &up(b, &x), &mut out).unwrap();
    let got = down(b, &out);
    assert!(
        got.iter().all(|p| p.is_nan()),
        "{}: softmax {got:?}",
        b.name()
    );
    for alpha in [1.5f32, 2.0, 1.25, 1.05, 4.0] {
        ops::entmax_rows(b, &rows, &[alpha], &up(b, &x), &mut out).unwrap();
        let got = down(b, &out);
        assert!(
            got.iter().all(|p| p.is_nan()),
            "{}: entmax alpha {alpha} {got:?}",
            b.name()
        );
    }
}

// --------------------------------------------------------------------- scoring

/// One geometry per case, rotating through the grid.
fn case_geom(i: usize) -> HeadGeometry {
    let g = GROUPS[i % GROUPS.len()];
    let d = HEAD_DIMS[(i / GROUPS.len()) % HEAD_DIMS.len()];
    HeadGeometry::new(2 * g, 2, d).unwrap()
}

/// Ragged KV segments: batch 2, two KV heads, lengths around `n`
/// (head-wise budgets: each segment has its own length).
fn case_segments(n: usize) -> Segments {
    let n = n as u32;
    Segments::with_capacity(
        2,
        2,
        n as usize + 3,
        vec![n, n.saturating_sub(1).max(1), n.div_ceil(2), n],
    )
    .unwrap()
}

fn qk_case<B: Ops, T: Element>(b: &B, i: usize, n: usize, causal: bool) {
    let geom = case_geom(i);
    let segs = case_segments(n);
    let mut rng = Rng::new(100 + i as u64);
    let nq = if causal { 1.max(n / 2).min(5) } else { 3 };
    let q_rows = Ragged::from_lens(&[nq as u32, 1]).unwrap();
    let d = geom.head_dim();
    let q: Vec<T> = normal_vec(&mut rng, q_rows.total() * geom.num_q_heads() * d, 1.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let p = QkParams {
        geom,
        q_rows: &q_rows,
        segments: &segs,
        causal,
        scale: None,
    };
    let layout = ops::qk_layout(&p).unwrap();
    let mut expect = vec![0.0f32; layout.blocks.total()];
    ops::qk_logits(&Reference, &p, &q, &k, &mut expect).unwrap();
    let mut out = b.zeros::<f32>(layout.blocks.total()).unwrap();
    ops::qk_logits(b, &p, &up(b, &q), &up(b, &k), &mut out).unwrap();
    let ctx = format!(
        "{}: qk_logits {} n={n} {geom:?} causal={causal}",
        b.name(),
        T::DTYPE
    );
    // f32 accumulation of a D-term dot product of O(1) terms.
    let tol = Tolerance {
        rel: 1e-5,
        abs: 1e-5 * (d as f64).sqrt(),
    };
    assert_close(&wide(&down(b, &out)), &wide(&expect), tol, &ctx);
}

fn qk_logits_match_reference<B: Ops>(b: &B) {
    for (i, &n) in TOKENS.iter().enumerate() {
        for causal in [false, true] {
            qk_case::<B, f32>(b, i, n, causal);
            qk_case::<B, f16>(b, i + 1, n, causal);
            qk_case::<B, bf16>(b, i + 2, n, causal);
        }
    }
}

// ------------------------------------------------------------------- selection

fn topk_rows_match_reference<B: Ops>(b: &B) {
    let (rows, x, names) = score_rows(3);
    for k in [1usize, 2, 7, 32, 100, 5000] {
        let expect = ops::topk_rows(&Reference, &rows, k, Scope::KvHead, &x).unwrap();
        let got = ops::topk_rows(b, &rows, k, Scope::KvHead, &up(b, &x)).unwrap();
        for (r, name) in names.iter().enumerate() {
            let ctx = format!("{}: topk k={k} row {r} ({name})", b.name());
            assert_eq!(got.list(r).len(), k.min(rows.len_of(r)), "{ctx}: size");
            // Ties go to the lower index on every backend: exact equality.
            assert_eq!(got.list(r), expect.list(r), "{ctx}");
        }
    }
}

fn count_above_matches_reference<B: Ops>(b: &B) {
    let (rows, x, _) = score_rows(4);
    for t in [f32::NEG_INFINITY, -1.0, 0.0, 0.5, 3.0] {
        let expect = ops::count_above(&Reference, &rows, &x, t).unwrap();
        assert_eq!(
            ops::count_above(b, &rows, &up(b, &x), t).unwrap(),
            expect,
            "{}: t = {t}",
            b.name()
        );
    }
}

// ------------------------------------------------------------------- cache ops

fn cache_ops_case<B: Ops, T: Element>(b: &B) {
    let mut rng = Rng::new(5);
    let width = 65;
    let segs = case_segments(129);
    let src: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * width, 1.0);
    // gather: a few rows and more than 256 KiB (the CPU backend copies the
    // first serially, the second in parallel)
    for count in [300, 2500] {
        let idx: Vec<u32> = (0..count)
            .map(|_| rng.below(segs.rows_needed()) as u32)
            .collect();
        let mut expect = vec![T::default(); idx.len() * width];
        ops::gather_rows(&Reference, width, &idx, &src, &mut expect).unwrap();
        let mut got = b.zeros::<T>(idx.len() * width).unwrap();
        ops::gather_rows(b, width, &idx, &up(b, &src), &mut got).unwrap();
        assert_eq!(
            down(b, &got),
            expect,
            "{}: gather_rows {} of {count} rows",
            b.name(),
            T::DTYPE
        );
    }
    // compact
    let sets: Vec<IndexSet> = (0..segs.num_segments())
        .map(|s| {
            IndexSet::from_unsorted(
                (0..segs.len_of(s) as u32)
                    .filter(|_| rng.uniform() < 0.4)
                    .collect(),
            )
        })
        .collect();
    let keep = IndexList::from_sets(Scope::KvHead, &sets).unwrap();
    let mut expect = src.clone();
    let new_ref = ops::compact_rows(&Reference, width, &segs, &keep, &mut expect).unwrap();
    let mut got = up(b, &src);
    let new_b = ops::compact_rows(b, width, &segs, &keep, &mut got).unwrap();
    assert_eq!(new_b, new_ref);
    let got = down(b, &got);
    for s in 0..new_ref.num_segments() {
        let r = new_ref.rows_of(s);
        assert_eq!(
            got[r.start * width..r.end * width],
            expect[r.start * width..r.end * width],
            "{}: compact seg {s}",
            b.name()
        );
    }
    // scatter: distinct destination rows
    let mut dests: Vec<u32> = (0..segs.rows_needed() as u32).collect();
    for i in (1..dests.len()).rev() {
        dests.swap(i, rng.below(i + 1));
    }
    dests.truncate(50);
    let rows: Vec<T> = normal_vec(&mut rng, 50 * width, 1.0);
    let mut expect = src.clone();
    ops::scatter_rows(&Reference, width, &dests, &rows, &mut expect).unwrap();
    let mut got = up(b, &src);
    ops::scatter_rows(b, width, &dests, &up(b, &rows), &mut got).unwrap();
    assert_eq!(
        down(b, &got),
        expect,
        "{}: scatter_rows {}",
        b.name(),
        T::DTYPE
    );
    // merge
    let groups = Ragged::from_lens(&[3, 0, 1, 5]).unwrap();
    let members: Vec<u32> = (0..groups.total())
        .map(|_| rng.below(segs.rows_needed()) as u32)
        .collect();
    let weights: Vec<f32> = (0..groups.total()).map(|_| rng.uniform() as f32).collect();
    let mut expect = vec![T::default(); 4 * width];
    ops::merge_rows(
        &Reference,
        width,
        &groups,
        &members,
        &weights,
        &src,
        &mut expect,
    )
    .unwrap();
    let mut got = b.zeros::<T>(4 * width).unwrap();
    ops::merge_rows(
        b,
        width,
        &groups,
        &members,
        &weights,
        &up(b, &src),
        &mut got,
    )
    .unwrap();
    let tol = Tolerance {
        rel: 1e-5 + eps_of(T::DTYPE),
        abs: 1e-6,
    };
    assert_close(
        &wide(&down(b, &got)),
        &wide(&expect),
        tol,
        &format!("{}: merge_rows {}", b.name(), T::DTYPE),
    );
}

fn cache_ops_match_reference<B: Ops>(b: &B) {
    cache_ops_case::<B, f32>(b);
    cache_ops_case::<B, f16>(b);
    cache_ops_case::<B, bf16>(b);
}

// ------------------------------------------------------------------- attention

/// Output tolerance for f32 storage (docs/numerics.md): f32 accumulation and
/// an f32 threshold search against the f64 reference.
const ATTN_F32: Tolerance = Tolerance {
    rel: 1e-4,
    abs: 5e-5,
};

/// Compares a backend's attention output with the reference. f32: fixed
/// tolerance; f16 / bf16: the low-precision budget (2x the reference's own
/// storage-dtype error, plus a floor).
fn check_attn<T: Element>(got: &[T], inputs_f32_exact: &[f32], ref_lowp: &[T], ctx: &str) {
    let got = wide(got);
    let exact = wide(inputs_f32_exact);
    if T::DTYPE == DType::F32 {
        assert_close(&got, &exact, ATTN_F32, ctx);
    } else {
        let budget = lowp_budget(&exact, &wide(ref_lowp), 0.6 * eps_of(T::DTYPE));
        let err = max_abs_diff(&got, &exact);
        assert!(err <= budget, "{ctx}: max error {err} > budget {budget}");
    }
}

fn widen<T: Element>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

fn decode_case<B: Ops, T: Element>(b: &B, i: usize, n: usize) {
    let geom = case_geom(i);
    let segs = case_segments(n);
    let mut rng = Rng::new(1000 + i as u64);
    let d = geom.head_dim();
    let batch = segs.batch();
    let q: Vec<T> = normal_vec(&mut rng, batch * geom.num_q_heads() * d, 2.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let (qf, kf, vf) = (widen(&q), widen(&k), widen(&v));
    let kv_sets: Vec<IndexSet> = (0..segs.num_segments())
        .map(|s| {
            IndexSet::from_unsorted(
                (0..segs.len_of(s) as u32)
                    .filter(|_| rng.uniform() < 0.3)
                    .collect(),
            )
        })
        .collect();
    let by_kv = IndexList::from_sets(Scope::KvHead, &kv_sets).unwrap();
    let q_masks: Vec<BitMask> = (0..batch * geom.num_q_heads())
        .map(|i| {
            let len = segs
                .len_of(segs.index(i / geom.num_q_heads(), geom.kv_head(i % geom.num_q_heads())));
            BitMask::from_bools(&(0..len).map(|_| rng.uniform() < 0.5).collect::<Vec<_>>())
        })
        .collect();
    let by_q = MaskList::from_masks(Scope::QueryHead, &q_masks).unwrap();
    let alphas: Vec<f32> = (0..geom.num_q_heads())
        .map(|h| 1.25 + 0.25 * (h % 4) as f32)
        .collect();
    let norms = [
        Normalizer::Softmax,
        Normalizer::Entmax { alpha: 1.5 },
        Normalizer::EntmaxPerHead { alphas },
    ];
    for norm in &norms {
        for restrict in [
            Restrict::Dense,
            Restrict::Indices(&by_kv),
            Restrict::Mask(&by_q),
        ] {
            let p = DecodeParams {
                geom,
                segments: &segs,
                scale: None,
                normalizer: norm,
                restrict,
            };
            let mut exact = vec![0.0f32; q.len()];
            ops::decode_attention(&Reference, &p, &qf, &kf, &vf, &mut exact).unwrap();
            let mut ref_lowp = vec![T::default(); q.len()];
            ops::decode_attention(&Reference, &p, &q, &k, &v, &mut ref_lowp).unwrap();
            let mut out = b.zeros::<T>(q.len()).unwrap();
            ops::decode_attention(b, &p, &up(b, &q), &up(b, &k), &up(b, &v), &mut out).unwrap();
            let ctx = format!(
                "{}: decode {} n={n} {geom:?} {norm:?} {restrict:?}",
                b.name(),
                T::DTYPE
            );
            check_attn(&down(b, &out), &exact, &ref_lowp, &ctx);
        }
    }
}

fn decode_attention_matches_reference<B: Ops>(b: &B) {
    for (i, &n) in TOKENS.iter().enumerate() {
        decode_case::<B, f32>(b, i, n);
        decode_case::<B, f16>(b, i + 1, n);
        decode_case::<B, bf16>(b, i + 2, n);
    }
}

fn prefill_case<B: Ops, T: Element>(b: &B, i: usize, n: usize) {
    let geom = case_geom(i);
    let segs = case_segments(n);
    let mut rng = Rng::new(2000 + i as u64);
    let d = geom.head_dim();
    let min_len = segs.lens().iter().copied().min().unwrap_or(0) as usize;
    let nq = min_len.clamp(1, 9);
    let q_rows = Ragged::from_lens(&[nq as u32, 1]).unwrap();
    let q: Vec<T> = normal_vec(&mut rng, q_rows.total() * geom.num_q_heads() * d, 2.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let (qf, kf, vf) = (widen(&q), widen(&k), widen(&v));
    let masks: Vec<Vec<BitMask>> = (0..segs.num_segments())
        .map(|s| {
            let rows = q_rows.len_of(s / geom.num_kv_heads());
            (0..rows)
                .map(|_| {
                    BitMask::from_bools(
                        &(0..segs.len_of(s))
                            .map(|_| rng.uniform() < 0.6)
                            .collect::<Vec<_>>(),
                    )
                })
                .collect()
        })
        .collect();
    let mask = MaskList::from_rows(Scope::KvHead, &masks).unwrap();
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        for (causal, m) in [(true, None), (false, None), (true, Some(&mask))] {
            let p = PrefillParams {
                geom,
                q_rows: &q_rows,
                segments: &segs,
                causal,
                mask: m,
                scale: None,
                normalizer: &norm,
            };
            let mut exact = vec![0.0f32; q.len()];
            ops::prefill_attention(&Reference, &p, &qf, &kf, &vf, &mut exact).unwrap();
            let mut ref_lowp = vec![T::default(); q.len()];
            ops::prefill_attention(&Reference, &p, &q, &k, &v, &mut ref_lowp).unwrap();
            let mut out = b.zeros::<T>(q.len()).unwrap();
            ops::prefill_attention(b, &p, &up(b, &q), &up(b, &k), &up(b, &v), &mut out).unwrap();
            let ctx = format!(
                "{}: prefill {} n={n} {geom:?} {norm:?} causal={causal} mask={}",
                b.name(),
                T::DTYPE,
                m.is_some()
            );
            check_attn(&down(b, &out), &exact, &ref_lowp, &ctx);
        }
    }
}

fn prefill_attention_matches_reference<B: Ops>(b: &B) {
    // On the CUDA simulator one dtype per length, rotating (`sim_runs`).
    for (i, &n) in TOKENS.iter().enumerate() {
        if sim_runs(b, i, 3) {
            prefill_case::<B, f32>(b, i, n);
        }
        if sim_runs(b, i + 1, 3) {
            prefill_case::<B, f16>(b, i + 1, n);
        }
        if sim_runs(b, i + 2, 3) {
            prefill_case::<B, bf16>(b, i + 2, n);
        }
    }
}

/// Metamorphic: selecting every token equals dense attention; a mask of all
/// ones equals no mask.
fn full_selection_equals_dense<B: Ops>(b: &B) {
    let geom = HeadGeometry::new(8, 2, 64).unwrap();
    let segs = case_segments(129);
    let mut rng = Rng::new(7);
    let q: Vec<f32> = normal_vec(&mut rng, 2 * 8 * 64, 1.0);
    let k: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * 64, 1.0);
    let v: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * 64, 1.0);
    let all: Vec<IndexSet> = segs.lens().iter().map(|&l| IndexSet::all(l)).collect();
    let all = IndexList::from_sets(Scope::KvHead, &all).unwrap();
    let ones: Vec<BitMask> = segs
        .lens()
        .iter()
        .map(|&l| BitMask::ones(l as usize))
        .collect();
    let ones = MaskList::from_masks(Scope::KvHead, &ones).unwrap();
    let norm = Normalizer::Entmax { alpha: 1.5 };
    let run = |restrict| {
        let p = DecodeParams {
            geom,
            segments: &segs,
            scale: None,
            normalizer: &norm,
            restrict,
        };
        let mut out = b.zeros::<f32>(q.len()).unwrap();
        ops::decode_attention(b, &p, &up(b, &q), &up(b, &k), &up(b, &v), &mut out).unwrap();
        down(b, &out)
    };
    let dense = run(Restrict::Dense);
    assert_eq!(run(Restrict::Indices(&all)), dense, "{}", b.name());
    assert_eq!(run(Restrict::Mask(&ones)), dense, "{}", b.name());
}

fn entmax_prefill_case<B: Ops, T: Element>(b: &B, i: usize, n: usize) {
    let geom = case_geom(i);
    let segs = case_segments(n);
    let mut rng = Rng::new(3000 + i as u64);
    let d = geom.head_dim();
    let min_len = segs.lens().iter().copied().min().unwrap_or(0) as usize;
    let q_rows = Ragged::from_lens(&[min_len.clamp(1, 40) as u32, 1]).unwrap();
    let q: Vec<T> = normal_vec(&mut rng, q_rows.total() * geom.num_q_heads() * d, 3.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let (qf, kf, vf) = (widen(&q), widen(&k), widen(&v));
    let alphas: Vec<f32> = (0..geom.num_q_heads())
        .map(|h| [1.5, 2.0, 1.25, 1.75][h % 4])
        .collect();
    let nt = q_rows.total() * geom.num_q_heads();
    for (causal, skip) in [(true, true), (false, true), (true, false)] {
        let p = ops::EntmaxPrefillParams {
            geom,
            q_rows: &q_rows,
            segments: &segs,
            causal,
            alphas: &alphas,
            scale: None,
            block_q: 16,
            block_k: 16,
            skip_blocks: skip,
        };
        let (mut exact, mut tau_ref) = (vec![0.0f32; q.len()], vec![0.0f32; nt]);
        let st_ref =
            ops::entmax_prefill(&Reference, &p, &qf, &kf, &vf, &mut exact, &mut tau_ref).unwrap();
        let mut ref_lowp = vec![T::default(); q.len()];
        ops::entmax_prefill(
            &Reference,
            &p,
            &q,
            &k,
            &v,
            &mut ref_lowp,
            &mut vec![0.0f32; nt],
        )
        .unwrap();
        let (mut out, mut tau) = (b.zeros::<T>(q.len()).unwrap(), b.zeros::<f32>(nt).unwrap());
        let st = ops::entmax_prefill(
            b,
            &p,
            &up(b, &q),
            &up(b, &k),
            &up(b, &v),
            &mut out,
            &mut tau,
        )
        .unwrap();
        let ctx = format!(
            "{}: entmax_prefill {} n={n} {geom:?} causal={causal} skip={skip}",
            b.name(),
            T::DTYPE
        );
        check_attn(&down(b, &out), &exact, &ref_lowp, &ctx);
        // tau is in the scaled space (alpha - 1) * logits: f32 search accuracy.
        assert_close(
            &wide(&down(b, &tau)),
            &wide(&tau_ref),
            Tolerance {
                rel: 1e-4,
                abs: 1e-4,
            },
            &ctx,
        );
        // Live tiles may differ only at threshold near-ties; the reference's count is exact.
        assert!(
            st.visible_tiles == st_ref.visible_tiles,
            "{ctx}: {st:?} vs {st_ref:?}"
        );
    }
}

fn entmax_prefill_matches_reference<B: Ops>(b: &B) {
    // On the CUDA simulator one dtype per length, rotating (`sim_runs`).
    for (i, &n) in TOKENS.iter().enumerate().filter(|(_, n)| **n <= 1000) {
        if sim_runs(b, i, 3) {
            entmax_prefill_case::<B, f32>(b, i, n);
        }
        if sim_runs(b, i + 1, 3) {
            entmax_prefill_case::<B, f16>(b, i + 1, n);
        }
        if sim_runs(b, i + 2, 3) {
            entmax_prefill_case::<B, bf16>(b, i + 2, n);
        }
    }
}

backend_suite!(
    softmax_rows_match_reference,
    entmax_rows_match_reference,
    nan_rows_are_nan,
    qk_logits_match_reference,
    topk_rows_match_reference,
    count_above_matches_reference,
    cache_ops_match_reference,
    decode_attention_matches_reference,
    prefill_attention_matches_reference,
    full_selection_equals_dense,
    entmax_prefill_matches_reference,
);
