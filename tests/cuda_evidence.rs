//! The CUDA evidence kernels and `value_distances` against the reference, on shapes that
//! `tests/evidence.rs` does not reach: GQA groups of 1, 4 and 8 (and 12: two CTAs of heads),
//! head dims up to 256 on both the 16-byte and the scalar path, every dtype, decode rows
//! long enough for split-K, per-query-head index lists and masks with an empty row,
//! per-head α, a sequence with no query, evidence buffers longer than their layout (the
//! entries after it stay untouched), the f32 output before rounding (exact to f32, and the
//! stored output is its rounding), determinism of the prefill pass, and `value_distances`
//! for every group treatment (with `centers`) including rows that nearly equal their
//! weighted sum. On the CPU SIMT simulator (feature `cuda-sim`) when there is no GPU.
#![cfg(feature = "cuda")]

mod common;

use common::backends::{cuda, skip};
use common::*;
use half::{bf16, f16};
use kvsieve::backend::{DecodeEvidence, Heads, PrefillEvidence, Window, evidence_blocks};
use kvsieve::cuda::CudaBackend;
use kvsieve::ops::{self, DecodeParams, PrefillParams};
use kvsieve::reference::Reference;
use kvsieve::*;

const HEADS: [Heads; 4] = [Heads::PerHead, Heads::Sum, Heads::Mean, Heads::Max];
/// Value of the entries after an evidence layout (must stay as they were).
const SENTINEL: f32 = 7.25;
/// Entries appended after each evidence layout.
const EXTRA: usize = 5;

fn device() -> Option<&'static CudaBackend> {
    match cuda() {
        Ok(b) => Some(b),
        Err(reason) => {
            skip("cuda", &reason);
            None
        }
    }
}

/// An evidence buffer of `n` entries plus [`EXTRA`] sentinels.
fn ev_buf<B: Backend>(b: &B, n: usize) -> B::Buffer<f32> {
    b.upload(&vec![SENTINEL; n + EXTRA]).unwrap()
}

/// Compares the first `n` entries and checks the sentinels after them.
#[track_caller]
fn check_ev(got: &[f32], want: &[f32], n: usize, tol: Tolerance, ctx: &str) {
    assert_eq!(got.len(), n + EXTRA, "{ctx}: buffer length");
    assert!(
        got[n..].iter().all(|&x| x == SENTINEL),
        "{ctx}: entries after the layout were written: {:?}",
        &got[n..]
    );
    let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    assert_close(&wide(&got[..n]), &wide(&want[..n]), tol, ctx);
}

/// Probability tolerance of `tests/evidence.rs` (f32 weights against f64).
const PROBS: Tolerance = Tolerance {
    rel: 2e-5,
    abs: 2e-6,
};
/// The f32 output before rounding, against the reference's f64 sum (`docs/numerics.md`).
const OUT_F32: Tolerance = Tolerance {
    rel: 2e-5,
    abs: 2e-5,
};

#[allow(clippy::too_many_arguments)]
fn decode_case<T: Element>(
    b: &CudaBackend,
    geom: HeadGeometry,
    lens: &[u32],
    norm: &Normalizer,
    restrict: Restrict<'_>,
    heads_set: &[Heads],
    seed: u64,
    ctx: &str,
) {
    let batch = lens.len() / geom.num_kv_heads();
    let segs = Segments::with_capacity(
        batch,
        geom.num_kv_heads(),
        *lens.iter().max().unwrap() as usize + 3,
        lens.to_vec(),
    )
    .unwrap();
    let (hq, d) = (geom.num_q_heads(), geom.head_dim());
    let mut rng = Rng::new(seed);
    let q: Vec<T> = normal_vec(&mut rng, batch * hq * d, 2.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let p = DecodeParams {
        geom,
        segments: &segs,
        scale: None,
        normalizer: norm,
        restrict,
    };
    let ones = vec![1; batch];
    let per_head = evidence_blocks(&geom, &segs, Heads::PerHead, &ones)
        .unwrap()
        .total();
    let (qb, kb, vb) = (
        b.upload(&q).unwrap(),
        b.upload(&k).unwrap(),
        b.upload(&v).unwrap(),
    );
    let mut plain = b.zeros::<T>(q.len()).unwrap();
    ops::decode_attention(b, &p, &qb, &kb, &vb, &mut plain).unwrap();
    let plain = b.download(&plain).unwrap();
    for &heads in heads_set {
        let n = evidence_blocks(&geom, &segs, heads, &ones).unwrap().total();
        let (mut want_p, mut want_z, mut want_s, mut want_o) = (
            ev_buf(&Reference, n),
            ev_buf(&Reference, per_head),
            ev_buf(&Reference, batch * hq),
            ev_buf(&Reference, q.len()),
        );
        let mut out = vec![T::default(); q.len()];
        ops::decode_attention_with(
            &Reference,
            &p,
            &q,
            &k,
            &v,
            &mut out,
            DecodeEvidence {
                probs: Some((heads, &mut want_p)),
                logits: Some(&mut want_z),
                stats: Some(&mut want_s),
                output: Some(&mut want_o),
            },
        )
        .unwrap();
        let (mut pb, mut lb, mut sb, mut ob) = (
            ev_buf(b, n),
            ev_buf(b, per_head),
            ev_buf(b, batch * hq),
            ev_buf(b, q.len()),
        );
        let mut gout = b.zeros::<T>(q.len()).unwrap();
        ops::decode_attention_with(
            b,
            &p,
            &qb,
            &kb,
            &vb,
            &mut gout,
            DecodeEvidence {
                probs: Some((heads, &mut pb)),
                logits: Some(&mut lb),
                stats: Some(&mut sb),
                output: Some(&mut ob),
            },
        )
        .unwrap();
        let ctx = format!("{ctx} {} {geom:?} {norm:?} {heads:?}", T::DTYPE);
        let stored = b.download(&gout).unwrap();
        assert_eq!(stored, plain, "{ctx}: evidence changed the output");
        check_ev(
            &b.download(&pb).unwrap(),
            &want_p,
            n,
            PROBS,
            &format!("{ctx}: probs"),
        );
        let tol_z = Tolerance {
            rel: 1e-5,
            abs: 1e-5 * (d as f64).sqrt(),
        };
        check_ev(
            &b.download(&lb).unwrap(),
            &want_z,
            per_head,
            tol_z,
            &format!("{ctx}: logits"),
        );
        check_ev(
            &b.download(&sb).unwrap(),
            &want_s,
            batch * hq,
            F32,
            &format!("{ctx}: stats"),
        );
        // The output before rounding: f32-exact for every storage dtype, and the stored
        // output is its rounding.
        let of = b.download(&ob).unwrap();
        check_ev(&of, &want_o, q.len(), OUT_F32, &format!("{ctx}: output"));
        for (i, (o, s)) in of.iter().zip(&stored).enumerate() {
            assert_eq!(
                T::from_f32(*o),
                *s,
                "{ctx}: output {i}: evidence {o} does not round to the stored output"
            );
        }
    }
}

/// Per-query-head index lists (one empty) and masks (one empty row) over `segs`.
fn restrictions(geom: &HeadGeometry, segs: &Segments, seed: u64) -> (IndexList, MaskList) {
    let hq = geom.num_q_heads();
    let mut rng = Rng::new(seed);
    let n = segs.batch() * hq;
    let len = |x: usize| segs.len_of(segs.index(x / hq, geom.kv_head(x % hq)));
    let sets: Vec<IndexSet> = (0..n)
        .map(|x| {
            if x == 1 {
                return IndexSet::from_unsorted(Vec::new());
            }
            IndexSet::from_unsorted((0..len(x) as u32).filter(|_| rng.uniform() < 0.5).collect())
        })
        .collect();
    let masks: Vec<BitMask> = (0..n)
        .map(|x| {
            BitMask::from_bools(
                &(0..len(x))
                    .map(|_| x != 2 && rng.uniform() < 0.6)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    (
        IndexList::from_sets(Scope::QueryHead, &sets).unwrap(),
        MaskList::from_masks(Scope::QueryHead, &masks).unwrap(),
    )
}

/// Decode evidence: GQA 8 with D = 256 over rows long enough for split-K (and an empty
/// segment) in every dtype; GQA 4 with D = 80 (scalar path) and GQA 1 with D = 16, under
/// every restriction and normaliser (per-head α included).
#[test]
fn decode_evidence_matches_reference() {
    let Some(b) = device() else { return };
    let geom = HeadGeometry::new(8, 1, 256).unwrap();
    let lens = [600u32, 0];
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        decode_case::<f32>(b, geom, &lens, &norm, Restrict::Dense, &HEADS, 1, "g8");
        decode_case::<bf16>(
            b,
            geom,
            &lens,
            &norm,
            Restrict::Dense,
            &[Heads::Max],
            2,
            "g8",
        );
        decode_case::<f16>(
            b,
            geom,
            &lens,
            &norm,
            Restrict::Dense,
            &[Heads::Mean],
            3,
            "g8",
        );
    }
    for (geom, lens) in [
        (HeadGeometry::new(8, 2, 80).unwrap(), vec![300u32, 7, 45, 0]),
        (HeadGeometry::new(2, 2, 16).unwrap(), vec![33u32, 5, 1, 70]),
    ] {
        let segs = Segments::with_capacity(2, 2, 303, lens.clone()).unwrap();
        let (list, mask) = restrictions(&geom, &segs, 4);
        let hq = geom.num_q_heads();
        let norms = [
            Normalizer::Softmax,
            Normalizer::Entmax { alpha: 2.0 },
            Normalizer::EntmaxPerHead {
                alphas: (0..hq).map(|h| 1.25 + 0.25 * (h % 4) as f32).collect(),
            },
        ];
        for (ni, norm) in norms.iter().enumerate() {
            for (ri, restrict) in [
                Restrict::Dense,
                Restrict::Indices(&list),
                Restrict::Mask(&mask),
            ]
            .into_iter()
            .enumerate()
            {
                let heads = [HEADS[(ni + ri) % 4], HEADS[(ni + ri + 2) % 4]];
                let seed = 10 + (3 * ni + ri) as u64;
                decode_case::<f32>(b, geom, &lens, norm, restrict, &heads, seed, "restrict");
                if ri == ni {
                    decode_case::<bf16>(b, geom, &lens, norm, restrict, &heads, seed, "lowp");
                }
            }
        }
    }
}

/// One prefill call with evidence on `b`.
#[allow(clippy::too_many_arguments)]
fn prefill_ev<B: Ops, T: Element>(
    b: &B,
    p: &PrefillParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
    col: Option<(Heads, usize)>,
    win: Option<(Window, usize)>,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let mut cb = col.map(|(_, n)| ev_buf(b, n));
    let mut wb = win.map(|(_, n)| ev_buf(b, n));
    ops::prefill_attention_with(
        b,
        p,
        q,
        k,
        v,
        out,
        PrefillEvidence {
            col_sums: col.map(|(h, _)| h).zip(cb.as_mut()),
            window: win.map(|(w, _)| w).zip(wb.as_mut()),
        },
    )
    .unwrap();
    (
        cb.map(|x| b.download(&x).unwrap()),
        wb.map(|x| b.download(&x).unwrap()),
    )
}

#[allow(clippy::too_many_arguments)]
fn prefill_case<T: Element>(
    b: &CudaBackend,
    geom: HeadGeometry,
    lens: &[u32],
    nq: &[u32],
    causal: bool,
    masked: bool,
    norm: &Normalizer,
    windows: &[(usize, bool)],
    seed: u64,
) {
    let batch = nq.len();
    let hkv = geom.num_kv_heads();
    let segs = Segments::packed(batch, hkv, lens).unwrap();
    let q_rows = Ragged::from_lens(nq).unwrap();
    let (hq, d) = (geom.num_q_heads(), geom.head_dim());
    let mut rng = Rng::new(seed);
    let q: Vec<T> = normal_vec(&mut rng, q_rows.total() * hq * d, 2.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let masks: Vec<Vec<BitMask>> = (0..batch * hq)
        .map(|x| {
            let (bi, h) = (x / hq, x % hq);
            let len = segs.len_of(segs.index(bi, geom.kv_head(h)));
            (0..q_rows.len_of(bi))
                .map(|_| {
                    BitMask::from_bools(&(0..len).map(|_| rng.uniform() < 0.5).collect::<Vec<_>>())
                })
                .collect()
        })
        .collect();
    let mask = MaskList::from_rows(Scope::QueryHead, &masks).unwrap();
    let p = PrefillParams {
        geom,
        q_rows: &q_rows,
        segments: &segs,
        causal,
        mask: masked.then_some(&mask),
        scale: None,
        normalizer: norm,
    };
    let ones = vec![1; batch];
    let max_nq = *nq.iter().max().unwrap() as usize;
    let (qb, kb, vb) = (
        b.upload(&q).unwrap(),
        b.upload(&k).unwrap(),
        b.upload(&v).unwrap(),
    );
    let mut plain = b.zeros::<T>(q.len()).unwrap();
    ops::prefill_attention(b, &p, &qb, &kb, &vb, &mut plain).unwrap();
    let plain = b.download(&plain).unwrap();
    let tol = Tolerance {
        rel: 2e-5,
        abs: 2e-6 * max_nq.max(1) as f64,
    };
    for (wi, &(queries, rows)) in windows.iter().enumerate() {
        let heads = HEADS[(wi + seed as usize) % 4];
        let win = Window {
            queries,
            heads: HEADS[(wi + seed as usize + 1) % 4],
            rows,
        };
        let wrows: Vec<usize> = q_rows.lens().map(|x| win.rows_for(x)).collect();
        let nc = evidence_blocks(&geom, &segs, heads, &ones).unwrap().total();
        let nw = evidence_blocks(&geom, &segs, win.heads, &wrows)
            .unwrap()
            .total();
        let mut out = vec![T::default(); q.len()];
        let (rc, rw) = prefill_ev(
            &Reference,
            &p,
            &q,
            &k,
            &v,
            &mut out,
            Some((heads, nc)),
            Some((win, nw)),
        );
        let mut gout = b.zeros::<T>(q.len()).unwrap();
        let (gc, gw) = prefill_ev(
            b,
            &p,
            &qb,
            &kb,
            &vb,
            &mut gout,
            Some((heads, nc)),
            Some((win, nw)),
        );
        let ctx = format!(
            "prefill {} {geom:?} lens={lens:?} nq={nq:?} causal={causal} mask={masked} \
             {norm:?} col {heads:?} {win:?}",
            T::DTYPE
        );
        assert_eq!(
            b.download(&gout).unwrap(),
            plain,
            "{ctx}: evidence changed the output"
        );
        let gw = gw.unwrap();
        check_ev(
            &gc.unwrap(),
            &rc.unwrap(),
            nc,
            tol,
            &format!("{ctx}: col_sums"),
        );
        check_ev(&gw, &rw.unwrap(), nw, tol, &format!("{ctx}: window"));
        // The window alone: the same bits (one deterministic pass, no atomics).
        let (_, only) = prefill_ev(b, &p, &qb, &kb, &vb, &mut gout, None, Some((win, nw)));
        assert_eq!(only.unwrap(), gw, "{ctx}: window alone differs");
    }
}

/// Prefill evidence: GQA 8 with D = 256 and GQA 4 with D = 24 (scalar), causal or not,
/// per-query-head masks, per-head α, a sequence with no query, windows of one query, of
/// several (rows or summed) and longer than the chunk, bf16 and f16.
#[test]
fn prefill_evidence_matches_reference() {
    let Some(b) = device() else { return };
    let wins = [(3usize, true), (40, false), (1, true), (2, false)];
    let g8 = HeadGeometry::new(8, 1, 256).unwrap();
    let g4 = HeadGeometry::new(4, 1, 24).unwrap();
    // Softmax, or entmax with one α per query head.
    let norm_for = |ni: usize, hq: usize| match ni {
        0 => Normalizer::Softmax,
        _ => Normalizer::EntmaxPerHead {
            alphas: (0..hq).map(|h| [1.5, 1.25, 2.0, 1.75][h % 4]).collect(),
        },
    };
    for ni in 0..2 {
        let (n8, n4) = (norm_for(ni, 8), norm_for(ni, 4));
        let seed = 50 + ni as u64;
        prefill_case::<f32>(b, g8, &[70, 5], &[6, 0], true, false, &n8, &wins[..2], seed);
        for (causal, masked) in [(true, false), (true, true), (false, true)] {
            // A sequence with no query (a mask cannot describe one).
            let nq: &[u32] = if masked { &[9, 1, 4] } else { &[9, 0, 4] };
            let seed = seed + 2 * u64::from(masked) + 4 * u64::from(causal);
            prefill_case::<f32>(b, g4, &[130, 9, 30], nq, causal, masked, &n4, &wins, seed);
        }
        prefill_case::<bf16>(b, g4, &[70, 12], &[7, 12], true, true, &n4, &wins[..2], 60);
        prefill_case::<f16>(b, g8, &[40, 12], &[5, 3], true, false, &n8, &wins[2..], 61);
    }
    // GQA 1: one head per group (the folds are the identity).
    let g1 = HeadGeometry::new(2, 2, 64).unwrap();
    let norm = Normalizer::Entmax { alpha: 1.5 };
    prefill_case::<f32>(
        b,
        g1,
        &[65, 20, 3, 3],
        &[5, 3],
        true,
        false,
        &norm,
        &wins,
        70,
    );
}

// ------------------------------------------------------------------ value_distances

#[allow(clippy::too_many_arguments)]
fn distances_case<T: Element>(
    b: &CudaBackend,
    geom: HeadGeometry,
    segs: &Segments,
    v: &[T],
    heads: Heads,
    fast: bool,
    tol: Tolerance,
    rng: &mut Rng,
    ctx: &str,
) {
    let ones = vec![1; segs.batch()];
    let blocks = evidence_blocks(&geom, segs, heads, &ones).unwrap();
    // Attention-like weights: positive, each block summing to 1.
    let mut w = vec![0.0f32; blocks.total()];
    for i in 0..blocks.num_segments() {
        let r = blocks.range(i);
        let raw: Vec<f64> = r.clone().map(|_| rng.uniform().powi(3)).collect();
        let s: f64 = raw.iter().sum::<f64>().max(1e-30);
        for (x, y) in w[r].iter_mut().zip(raw) {
            *x = (y / s) as f32;
        }
    }
    let weights: Vec<f32> = if fast { Vec::new() } else { w };
    let nc = blocks.num_segments() * geom.head_dim();
    let (mut want, mut want_c) = (vec![0.0f32; blocks.total()], vec![0.0f32; nc]);
    ops::value_distances(
        &Reference,
        geom,
        segs,
        heads,
        fast,
        &weights,
        &v.to_vec(),
        &mut want,
        Some(&mut want_c),
    )
    .unwrap();
    // Outputs start as garbage: every entry must be written.
    let mut got = b.upload(&vec![SENTINEL; blocks.total()]).unwrap();
    let mut got_c = b.upload(&vec![SENTINEL; nc]).unwrap();
    let (wb, vb) = (b.upload(&weights).unwrap(), b.upload(v).unwrap());
    ops::value_distances(
        b,
        geom,
        segs,
        heads,
        fast,
        &wb,
        &vb,
        &mut got,
        Some(&mut got_c),
    )
    .unwrap();
    let wide = |x: &[f32]| x.iter().map(|&y| f64::from(y)).collect::<Vec<_>>();
    let ctx = format!("{ctx} {} {geom:?} {heads:?} fast={fast}", T::DTYPE);
    let centers = b.download(&got_c).unwrap();
    assert_close(
        &wide(&centers),
        &wide(&want_c),
        Tolerance {
            rel: 1e-5,
            abs: 1e-5,
        },
        &format!("{ctx}: centers"),
    );
    let dist = b.download(&got).unwrap();
    assert_close(&wide(&dist), &wide(&want), tol, &ctx);
    // Without centers: the same distances.
    let mut alone = b.zeros::<f32>(blocks.total()).unwrap();
    ops::value_distances(b, geom, segs, heads, fast, &wb, &vb, &mut alone, None).unwrap();
    assert_eq!(b.download(&alone).unwrap(), dist, "{ctx}: without centers");
}

fn distances_dtype<T: Element>(b: &CudaBackend, heads_set: &[Heads]) {
    // G = 8, D = 256 (one CTA per segment); G = 12 (two head chunks); G = 1, D = 33 (idle
    // threads split the tokens into lanes); empty segments and a segment of one row.
    for (geom, lens) in [
        (HeadGeometry::new(8, 1, 256).unwrap(), vec![300u32, 0]),
        (HeadGeometry::new(24, 2, 40).unwrap(), vec![17u32, 1]),
        (
            HeadGeometry::new(3, 3, 33).unwrap(),
            vec![400, 5, 0, 2, 1, 130],
        ),
    ] {
        let segs =
            Segments::packed(lens.len() / geom.num_kv_heads(), geom.num_kv_heads(), &lens).unwrap();
        let mut rng = Rng::new(u64::from(lens[0]));
        let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * geom.head_dim(), 1.0);
        for &heads in heads_set {
            for fast in [false, true] {
                distances_case(b, geom, &segs, &v, heads, fast, F32, &mut rng, "random");
            }
        }
    }
}

#[test]
fn value_distances_match_reference() {
    let Some(b) = device() else { return };
    distances_dtype::<f32>(b, &HEADS);
    distances_dtype::<f16>(b, &[Heads::PerHead, Heads::Mean]);
    distances_dtype::<bf16>(b, &[Heads::Sum, Heads::PerHead]);
}

/// Rows that nearly equal their weighted sum (a constant row of magnitude 100–200 plus noise
/// of 1e-3): distances about 1e-2 that the direct form keeps within the f32 rounding of `o`
/// (the expanded form `‖o‖² − 2 o·v + ‖v‖²` loses them to cancellation).
#[test]
fn value_distances_do_not_cancel() {
    let Some(b) = device() else { return };
    let geom = HeadGeometry::new(2, 1, 64).unwrap();
    let segs = Segments::packed(1, 1, &[96]).unwrap();
    let mut rng = Rng::new(12);
    let base: Vec<f64> = (0..64).map(|_| 100.0 * (1.0 + rng.uniform())).collect();
    let v: Vec<f32> = (0..96 * 64)
        .map(|i| (base[i % 64] + 1e-3 * rng.normal()) as f32)
        .collect();
    let tol = Tolerance {
        rel: 0.0,
        abs: 1e-4,
    };
    for heads in HEADS {
        for fast in [false, true] {
            distances_case(b, geom, &segs, &v, heads, fast, tol, &mut rng, "near o");
        }
    }
}

/// Calls with nothing to attend: a prefill chunk without any query (no attention launch, the
/// evidence pass alone writes the zeros of every block) and a decode over empty segments
/// (every block empty, the statistic `-inf`), against the reference.
#[test]
fn evidence_of_empty_calls() {
    let Some(b) = device() else { return };
    let geom = HeadGeometry::new(4, 2, 16).unwrap();
    let lens = [9u32, 3, 0, 5];
    let segs = Segments::packed(2, 2, &lens).unwrap();
    let q_rows = Ragged::from_lens(&[0, 0]).unwrap();
    let k: Vec<f32> = normal_vec(&mut Rng::new(3), segs.rows_needed() * 16, 1.0);
    let (kb, vb) = (b.upload(&k).unwrap(), b.upload(&k).unwrap());
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        let p = PrefillParams {
            geom,
            q_rows: &q_rows,
            segments: &segs,
            causal: true,
            mask: None,
            scale: None,
            normalizer: &norm,
        };
        for (wi, rows) in [false, true].into_iter().enumerate() {
            let (heads, win) = (
                HEADS[wi],
                Window {
                    queries: 2,
                    heads: HEADS[wi + 2],
                    rows,
                },
            );
            let nc = evidence_blocks(&geom, &segs, heads, &[1, 1])
                .unwrap()
                .total();
            let nw = evidence_blocks(&geom, &segs, win.heads, &[win.rows_for(0); 2])
                .unwrap()
                .total();
            let (rc, rw) = prefill_ev(
                &Reference,
                &p,
                &Vec::<f32>::new(),
                &k,
                &k,
                &mut Vec::new(),
                Some((heads, nc)),
                Some((win, nw)),
            );
            let (gc, gw) = prefill_ev(
                b,
                &p,
                &b.zeros::<f32>(0).unwrap(),
                &kb,
                &vb,
                &mut b.zeros::<f32>(0).unwrap(),
                Some((heads, nc)),
                Some((win, nw)),
            );
            let ctx = format!("empty prefill {norm:?} {heads:?} {win:?}");
            check_ev(
                &gc.unwrap(),
                &rc.unwrap(),
                nc,
                STRICT,
                &format!("{ctx}: col"),
            );
            check_ev(
                &gw.unwrap(),
                &rw.unwrap(),
                nw,
                STRICT,
                &format!("{ctx}: window"),
            );
        }
    }
    let empty = Segments::packed(2, 2, &[0, 0, 0, 0]).unwrap();
    let q: Vec<f32> = normal_vec(&mut Rng::new(4), 2 * 4 * 16, 1.0);
    let qb = b.upload(&q).unwrap();
    let norm = Normalizer::Softmax;
    let p = DecodeParams {
        geom,
        segments: &empty,
        scale: None,
        normalizer: &norm,
        restrict: Restrict::Dense,
    };
    let mut stats = ev_buf(b, 8);
    let mut probs = ev_buf(b, 0);
    let mut out = b.upload(&vec![1.0f32; q.len()]).unwrap();
    ops::decode_attention_with(
        b,
        &p,
        &qb,
        &kb,
        &vb,
        &mut out,
        DecodeEvidence {
            probs: Some((Heads::Max, &mut probs)),
            stats: Some(&mut stats),
            ..Default::default()
        },
    )
    .unwrap();
    let stats = b.download(&stats).unwrap();
    assert!(
        stats[..8].iter().all(|&x| x == f32::NEG_INFINITY),
        "{stats:?}"
    );
    assert!(stats[8..].iter().all(|&x| x == SENTINEL), "{stats:?}");
    assert!(b.download(&probs).unwrap().iter().all(|&x| x == SENTINEL));
    assert!(b.download(&out).unwrap().iter().all(|&x| x == 0.0));
}
