//! The wgpu evidence kernels, `value_distances` and both `compact_rows`
//! paths against the reference, on shapes `tests/evidence.rs` and
//! `tests/ops.rs` do not reach: the split (long-row) path of prefill with
//! evidence, per-query-head index lists, per-head α, bf16, evidence buffers
//! longer than their layout (entries after it stay untouched), rows with no
//! attended token; `value_distances` for every group treatment and dtype,
//! including rows that nearly equal their weighted sum (where the expanded
//! form `‖o‖² − 2 o·v + ‖v‖²` would cancel); whole-buffer equality of
//! compaction and scatter for rows of whole words (written in place) and
//! rows that share a word (16-bit, odd width: the widened path).
#![cfg(feature = "wgpu")]

mod common;

use common::backends::{skip, wgpu_device};
use common::*;
use half::{bf16, f16};
use kvsieve::backend::{DecodeEvidence, Heads, PrefillEvidence, Window, evidence_blocks};
use kvsieve::ops::{self, DecodeParams, PrefillParams};
use kvsieve::reference::Reference;
use kvsieve::wgpu::{Wgpu, WgpuOptions};
use kvsieve::*;

const HEADS: [Heads; 4] = [Heads::PerHead, Heads::Sum, Heads::Mean, Heads::Max];
/// Value of the entries after an evidence layout (must stay as they were).
const SENTINEL: f32 = 7.25;
/// Entries appended after each evidence layout.
const EXTRA: usize = 5;

/// An evidence buffer of `n` entries plus [`EXTRA`] sentinels, on `b`.
fn ev_buf<B: Backend>(b: &B, n: usize) -> B::Buffer<f32> {
    b.upload(&vec![SENTINEL; n + EXTRA]).unwrap()
}

/// Compares the first `n` entries of an evidence download and checks the
/// sentinels after them.
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

#[allow(clippy::too_many_arguments)]
fn decode_case<T: Element>(
    b: &Wgpu,
    geom: HeadGeometry,
    lens: &[u32],
    norm: &Normalizer,
    restrict: Restrict<'_>,
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
    for heads in HEADS {
        let n = evidence_blocks(&geom, &segs, heads, &ones).unwrap().total();
        let (mut want_p, mut want_z, mut want_s) = (
            ev_buf(&Reference, n),
            ev_buf(&Reference, per_head),
            ev_buf(&Reference, batch * hq),
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
                output: None,
            },
        )
        .unwrap();
        let (mut pb, mut lb, mut sb) = (ev_buf(b, n), ev_buf(b, per_head), ev_buf(b, batch * hq));
        let mut gout = b.zeros::<T>(q.len()).unwrap();
        let (qb, kb, vb) = (
            b.upload(&q).unwrap(),
            b.upload(&k).unwrap(),
            b.upload(&v).unwrap(),
        );
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
                output: None,
            },
        )
        .unwrap();
        let (got_p, got_z, got_s) = (
            b.download(&pb).unwrap(),
            b.download(&lb).unwrap(),
            b.download(&sb).unwrap(),
        );
        let ctx = format!("{ctx} {} {norm:?} {heads:?}", T::DTYPE);
        check_ev(&got_p, &want_p, n, PROBS, &format!("{ctx}: probs"));
        let tol_z = Tolerance {
            rel: 1e-5,
            abs: 1e-5 * (d as f64).sqrt(),
        };
        check_ev(&got_z, &want_z, per_head, tol_z, &format!("{ctx}: logits"));
        // Softmax: ln Σ e^z; entmax: τ (the f32 threshold search's against
        // the reference's exact one: measured within 5e-7).
        check_ev(&got_s, &want_s, batch * hq, F32, &format!("{ctx}: stats"));
    }
}

/// Decode evidence on shapes the conformance test does not cover: per
/// query head index lists (one of them empty: statistic `-inf`), masks with
/// an empty row, per-head α, bf16 and f16 storage, and rows long enough for
/// the split path under every restriction.
#[test]
fn decode_evidence_extra_shapes_match_reference() {
    let Some(b) = wgpu_device() else { return };
    let geom = HeadGeometry::new(8, 2, 40).unwrap();
    let lens = [700u32, 0, 45, 1300];
    let segs = Segments::with_capacity(2, 2, 1303, lens.to_vec()).unwrap();
    let mut rng = Rng::new(901);
    let hq = geom.num_q_heads();
    let sets: Vec<IndexSet> = (0..2 * hq)
        .map(|x| {
            let len = segs.len_of(segs.index(x / hq, geom.kv_head(x % hq))) as u32;
            if x == 3 {
                return IndexSet::from_unsorted(Vec::new());
            }
            IndexSet::from_unsorted((0..len).filter(|_| rng.uniform() < 0.6).collect())
        })
        .collect();
    let list = IndexList::from_sets(Scope::QueryHead, &sets).unwrap();
    let masks: Vec<BitMask> = (0..2 * hq)
        .map(|x| {
            let len = segs.len_of(segs.index(x / hq, geom.kv_head(x % hq)));
            let on = x != 5;
            BitMask::from_bools(
                &(0..len)
                    .map(|_| on && rng.uniform() < 0.7)
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mask = MaskList::from_masks(Scope::QueryHead, &masks).unwrap();
    let alphas = vec![1.5, 1.25, 2.0, 1.75, 1.5, 1.3, 1.5, 1.6];
    let norms = [
        Normalizer::Softmax,
        Normalizer::Entmax { alpha: 1.5 },
        Normalizer::EntmaxPerHead { alphas },
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
            let seed = 10 + (3 * ni + ri) as u64;
            let ctx = format!("decode {restrict:?}");
            decode_case::<f32>(&b, geom, &lens, norm, restrict, seed, &ctx);
            if ni == 0 || ri == 1 {
                decode_case::<bf16>(&b, geom, &lens, norm, restrict, seed, &ctx);
                decode_case::<f16>(&b, geom, &lens, norm, restrict, seed, &ctx);
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn prefill_case<T: Element>(
    b: &Wgpu,
    geom: HeadGeometry,
    lens: &[u32],
    nq: &[u32],
    causal: bool,
    masked: bool,
    norm: &Normalizer,
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
    for (hi, heads) in HEADS.into_iter().enumerate() {
        for (queries, rows) in [(3usize, true), (max_nq + 4, false), (1, true), (6, false)] {
            let win = Window {
                queries,
                heads: HEADS[(hi + queries) % 4],
                rows,
            };
            let wrows: Vec<usize> = q_rows.lens().map(|x| win.rows_for(x)).collect();
            let nc = evidence_blocks(&geom, &segs, heads, &ones).unwrap().total();
            let nw = evidence_blocks(&geom, &segs, win.heads, &wrows)
                .unwrap()
                .total();
            let (mut rc, mut rw) = (ev_buf(&Reference, nc), ev_buf(&Reference, nw));
            let mut out = vec![T::default(); q.len()];
            ops::prefill_attention_with(
                &Reference,
                &p,
                &q,
                &k,
                &v,
                &mut out,
                PrefillEvidence {
                    col_sums: Some((heads, &mut rc)),
                    window: Some((win, &mut rw)),
                },
            )
            .unwrap();
            let (mut gc, mut gw) = (ev_buf(b, nc), ev_buf(b, nw));
            let mut gout = b.zeros::<T>(q.len()).unwrap();
            let (qb, kb, vb) = (
                b.upload(&q).unwrap(),
                b.upload(&k).unwrap(),
                b.upload(&v).unwrap(),
            );
            ops::prefill_attention_with(
                b,
                &p,
                &qb,
                &kb,
                &vb,
                &mut gout,
                PrefillEvidence {
                    col_sums: Some((heads, &mut gc)),
                    window: Some((win, &mut gw)),
                },
            )
            .unwrap();
            let ctx = format!(
                "prefill {} {geom:?} lens={lens:?} nq={nq:?} causal={causal} mask={masked} \
                 {norm:?} col {heads:?} {win:?}",
                T::DTYPE
            );
            let tol = Tolerance {
                rel: 2e-5,
                abs: 2e-6 * max_nq as f64,
            };
            check_ev(
                &b.download(&gc).unwrap(),
                &rc,
                nc,
                tol,
                &format!("{ctx}: col_sums"),
            );
            check_ev(
                &b.download(&gw).unwrap(),
                &rw,
                nw,
                tol,
                &format!("{ctx}: window"),
            );
            // Only one of the two outputs asked for: the same values.
            let mut only = ev_buf(b, nw);
            ops::prefill_attention_with(
                b,
                &p,
                &qb,
                &kb,
                &vb,
                &mut gout,
                PrefillEvidence {
                    col_sums: None,
                    window: Some((win, &mut only)),
                },
            )
            .unwrap();
            assert_eq!(
                b.download(&only).unwrap(),
                b.download(&gw).unwrap(),
                "{ctx}: window alone differs from window beside column sums"
            );
        }
    }
}

/// Prefill evidence on shapes the conformance test does not cover: rows
/// long enough for the split path (with evidence), per-query-head masks,
/// per-head α, bf16, a sequence with no query, windows longer than the chunk.
#[test]
fn prefill_evidence_extra_shapes_match_reference() {
    let Some(b) = wgpu_device() else { return };
    let geom = HeadGeometry::new(4, 2, 24).unwrap();
    let alphas = vec![1.5, 1.25, 2.0, 1.75];
    let norms = [Normalizer::Softmax, Normalizer::EntmaxPerHead { alphas }];
    for (ni, norm) in norms.iter().enumerate() {
        for (causal, masked) in [(true, false), (true, true), (false, true)] {
            let seed = 50 + ni as u64 + 2 * u64::from(masked);
            // A sequence with no query (a mask cannot describe one).
            let nq: &[u32] = if masked { &[9, 1, 4] } else { &[9, 0, 4] };
            prefill_case::<f32>(
                &b,
                geom,
                &[600, 520, 9, 30, 4, 4],
                nq,
                causal,
                masked,
                norm,
                seed,
            );
        }
        prefill_case::<bf16>(&b, geom, &[70, 33, 12, 12], &[7, 12], true, true, norm, 60);
    }
}

/// The `u32`-word f16 path (adapters without `shader-f16`) through the
/// evidence passes (the prefill pass reads Q and K again).
#[test]
fn evidence_on_the_f16_word_path_matches_reference() {
    let Some(_) = wgpu_device() else { return };
    let b = match Wgpu::with_options(WgpuOptions { shader_f16: false }) {
        Ok(b) => b,
        Err(e) => {
            skip("wgpu", &e.to_string());
            return;
        }
    };
    let geom = HeadGeometry::new(4, 2, 24).unwrap();
    let norm = Normalizer::Entmax { alpha: 1.5 };
    decode_case::<f16>(
        &b,
        geom,
        &[600, 3, 45, 9],
        &norm,
        Restrict::Dense,
        3,
        "words",
    );
    prefill_case::<f16>(&b, geom, &[40, 33, 12, 12], &[7, 12], true, false, &norm, 4);
}

// ------------------------------------------------------------ value_distances

#[allow(clippy::too_many_arguments)]
fn distances_case<T: Element>(
    b: &Wgpu,
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
    let mut want = vec![0.0f32; blocks.total()];
    let nc = blocks.num_segments() * geom.head_dim();
    let mut want_c = vec![0.0f32; nc];
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
    let mut got = b.zeros::<f32>(blocks.total()).unwrap();
    let mut got_c = b.zeros::<f32>(nc).unwrap();
    ops::value_distances(
        b,
        geom,
        segs,
        heads,
        fast,
        &b.upload(&weights).unwrap(),
        &b.upload(v).unwrap(),
        &mut got,
        Some(&mut got_c),
    )
    .unwrap();
    let widec = |x: &[f32]| x.iter().map(|&y| f64::from(y)).collect::<Vec<_>>();
    assert_close(
        &widec(&b.download(&got_c).unwrap()),
        &widec(&want_c),
        Tolerance {
            rel: 1e-5,
            abs: 1e-5,
        },
        &format!("{ctx} centers {} {heads:?} fast={fast}", T::DTYPE),
    );
    let wide = |x: &[f32]| x.iter().map(|&y| f64::from(y)).collect::<Vec<_>>();
    assert_close(
        &wide(&b.download(&got).unwrap()),
        &wide(&want),
        tol,
        &format!("{ctx} {} {heads:?} fast={fast}", T::DTYPE),
    );
}

fn distances_dtype<T: Element>(b: &Wgpu) {
    // D = 33 with G = 1 leaves idle invocations (lane split); D = 64 with
    // G = 4 does not; an empty segment and a long one.
    for (geom, lens) in [
        (HeadGeometry::new(8, 2, 64).unwrap(), vec![300u32, 0, 1, 77]),
        (
            HeadGeometry::new(3, 3, 33).unwrap(),
            vec![900, 5, 40, 2, 0, 130],
        ),
    ] {
        let segs =
            Segments::packed(lens.len() / geom.num_kv_heads(), geom.num_kv_heads(), &lens).unwrap();
        let mut rng = Rng::new(lens[0] as u64);
        let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * geom.head_dim(), 1.0);
        for heads in HEADS {
            for fast in [false, true] {
                distances_case(
                    &b.clone(),
                    geom,
                    &segs,
                    &v,
                    heads,
                    fast,
                    F32,
                    &mut rng,
                    "random",
                );
            }
        }
    }
}

#[test]
fn value_distances_match_reference() {
    let Some(b) = wgpu_device() else { return };
    distances_dtype::<f32>(&b);
    distances_dtype::<f16>(&b);
    distances_dtype::<bf16>(&b);
}

/// Rows that nearly equal their weighted sum (a constant row of magnitude
/// 100–200 plus noise of 1e-3): the distances are about 1e-2 and the direct
/// form keeps them within f32 rounding of `o` (measured 2e-5); the expanded
/// form loses them to cancellation (swapped in as a check, it returned 0).
#[test]
fn value_distances_do_not_cancel() {
    let Some(b) = wgpu_device() else { return };
    let geom = HeadGeometry::new(2, 1, 64).unwrap();
    let segs = Segments::packed(1, 1, &[96]).unwrap();
    let mut rng = Rng::new(12);
    let base: Vec<f64> = (0..64).map(|_| 100.0 * (1.0 + rng.uniform())).collect();
    let v: Vec<f32> = (0..96 * 64)
        .map(|i| (base[i % 64] + 1e-3 * rng.normal()) as f32)
        .collect();
    // f32 rounding of o (|o| ≈ 150): about 2^-24 · 150 per coordinate.
    let tol = Tolerance {
        rel: 0.0,
        abs: 1e-4,
    };
    for heads in HEADS {
        for fast in [false, true] {
            distances_case(&b, geom, &segs, &v, heads, fast, tol, &mut rng, "near o");
        }
    }
}

// --------------------------------------------------------------- compact_rows

fn compact_case<T: Element>(b: &Wgpu, width: usize, seed: u64) {
    let segs = Segments::with_capacity(2, 3, 61, vec![60, 1, 33, 0, 59, 17]).unwrap();
    let rows = segs.rows_needed() + 3;
    let mut rng = Rng::new(seed);
    let src: Vec<T> = normal_vec(&mut rng, rows * width, 1.0);
    for share in [0.97, 0.5, 0.1, 0.0] {
        let sets: Vec<IndexSet> = (0..segs.num_segments())
            .map(|s| {
                IndexSet::from_unsorted(
                    (0..segs.len_of(s) as u32)
                        .filter(|_| rng.uniform() < share)
                        .collect(),
                )
            })
            .collect();
        let keep = IndexList::from_sets(Scope::KvHead, &sets).unwrap();
        let mut want = src.clone();
        let new_ref = ops::compact_rows(&Reference, width, &segs, &keep, &mut want).unwrap();
        let mut got = b.upload(&src).unwrap();
        let new_b = ops::compact_rows(b, width, &segs, &keep, &mut got).unwrap();
        assert_eq!(new_b, new_ref);
        // The whole buffer: moved rows, rows left in place, rows past the
        // new lengths and past the segments.
        assert_eq!(
            b.download(&got).unwrap(),
            want,
            "compact_rows {} width {width} keep share {share}",
            T::DTYPE
        );
    }
}

/// f32 rows and even-width 16-bit rows are whole words (moved in place);
/// odd-width 16-bit rows share words (the widened path, odd buffer length
/// included).
#[test]
fn compact_rows_both_paths_match_reference() {
    let Some(b) = wgpu_device() else { return };
    for width in [64usize, 65, 1, 2] {
        compact_case::<f32>(&b, width, 1 + width as u64);
        compact_case::<f16>(&b, width, 2 + width as u64);
        compact_case::<bf16>(&b, width, 3 + width as u64);
    }
}

fn scatter_case<T: Element>(b: &Wgpu, width: usize, seed: u64) {
    let rows = 37;
    let mut rng = Rng::new(seed);
    let dst: Vec<T> = normal_vec(&mut rng, rows * width, 1.0);
    for n in [1usize, 5, rows] {
        let mut idx: Vec<u32> = (0..rows as u32).collect();
        for i in (1..idx.len()).rev() {
            idx.swap(i, rng.below(i + 1));
        }
        idx.truncate(n);
        let src: Vec<T> = normal_vec(&mut rng, n * width, 1.0);
        let mut want = dst.clone();
        ops::scatter_rows(&Reference, width, &idx, &src, &mut want).unwrap();
        let mut got = b.upload(&dst).unwrap();
        ops::scatter_rows(b, width, &idx, &b.upload(&src).unwrap(), &mut got).unwrap();
        assert_eq!(
            b.download(&got).unwrap(),
            want,
            "scatter_rows {} width {width}, {n} rows",
            T::DTYPE
        );
    }
}

/// The same two paths for `scatter_rows` (appending tokens to a cache).
#[test]
fn scatter_rows_both_paths_match_reference() {
    let Some(b) = wgpu_device() else { return };
    for width in [64usize, 65, 1, 2] {
        scatter_case::<f32>(&b, width, 4 + width as u64);
        scatter_case::<f16>(&b, width, 5 + width as u64);
        scatter_case::<bf16>(&b, width, 6 + width as u64);
    }
}
