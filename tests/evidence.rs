//! Attention evidence on every backend against a full-matrix computation:
//! every logit `z_ij = scale · q_i · k_j` in f64, masked, normalised row by
//! row with the reference normalisers (`softmax_f64` / `entmax_f64`), then
//! summed and reduced over the GQA group as each output asks. The
//! attention ops compute the same quantities on their own device, inside
//! their pass or in passes after it from what it left (CPU, wgpu, CUDA);
//! nothing here shares their code.

mod common;

use common::*;
use half::f16;
use kvsieve::backend::{DecodeEvidence, Heads, PrefillEvidence, Window, evidence_blocks};
use kvsieve::ops::{self, DecodeParams, PrefillParams};
use kvsieve::reference::{entmax_f64, softmax_f64};
use kvsieve::*;

const HEADS: [Heads; 4] = [Heads::PerHead, Heads::Sum, Heads::Mean, Heads::Max];

fn norm_row(z: &[f64], alpha: Option<f32>) -> Vec<f64> {
    match alpha {
        None => softmax_f64(z),
        Some(a) => entmax_f64(z, f64::from(a)),
    }
}

/// Reduces per-query-head rows (`per[h]`, each `rows × len`) of one
/// sequence over each group as `heads` asks; returns the blocks in order.
fn reduce(geom: &HeadGeometry, heads: Heads, per: &[Vec<f64>]) -> Vec<f64> {
    if heads == Heads::PerHead {
        return per.concat();
    }
    let g = geom.group();
    let mut out = Vec::new();
    for kv in 0..geom.num_kv_heads() {
        let grp = &per[kv * g..(kv + 1) * g];
        for j in 0..grp[0].len() {
            let xs = grp.iter().map(|r| r[j]);
            out.push(match heads {
                Heads::Sum => xs.sum(),
                Heads::Mean => xs.sum::<f64>() / g as f64,
                Heads::Max => xs.fold(f64::NEG_INFINITY, f64::max),
                Heads::PerHead => unreachable!(),
            });
        }
    }
    out
}

fn logit<T: Element>(q: &[T], k: &[T], scale: f64) -> f64 {
    scale
        * q.iter()
            .zip(k)
            .map(|(a, b)| a.to_f64() * b.to_f64())
            .sum::<f64>()
}

/// Weights of probabilities: f32 against f64 over rows of up to ~1000 terms.
fn close(got: &[f32], want: &[f64], abs: f64, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if w.is_infinite() {
            f64::from(g) == w
        } else {
            (f64::from(g) - w).abs() <= abs + 2e-5 * w.abs()
        };
        assert!(ok, "{ctx}: entry {i}: got {g}, want {w}");
    }
}

fn decode_case<B: Ops, T: Element>(b: &B, i: usize, n: usize, norms: &[Normalizer]) {
    let g = [1, 4, 2][i % 3];
    let geom = HeadGeometry::new(2 * g, 2, [16, 64, 33][i % 3]).unwrap();
    let segs = Segments::with_capacity(
        2,
        2,
        n + 5,
        vec![n as u32, (n as u32).div_ceil(3), n as u32 / 2, n as u32],
    )
    .unwrap();
    let (hq, d, batch) = (geom.num_q_heads(), geom.head_dim(), segs.batch());
    let mut rng = Rng::new(40 + i as u64);
    let q: Vec<T> = normal_vec(&mut rng, batch * hq * d, 2.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let sets: Vec<IndexSet> = (0..segs.num_segments())
        .map(|s| {
            IndexSet::from_unsorted(
                (0..segs.len_of(s) as u32)
                    .filter(|_| rng.uniform() < 0.4)
                    .collect(),
            )
        })
        .collect();
    let list = IndexList::from_sets(Scope::KvHead, &sets).unwrap();
    let masks: Vec<BitMask> = (0..batch * hq)
        .map(|x| {
            let len = segs.len_of(segs.index(x / hq, geom.kv_head(x % hq)));
            BitMask::from_bools(&(0..len).map(|_| rng.uniform() < 0.5).collect::<Vec<_>>())
        })
        .collect();
    let mask = MaskList::from_masks(Scope::QueryHead, &masks).unwrap();
    let scale = f64::from(geom.default_scale());
    let ones = vec![1; batch];
    for norm in norms {
        for restrict in [
            Restrict::Dense,
            Restrict::Indices(&list),
            Restrict::Mask(&mask),
        ] {
            // Expected: per (b, h) logits over the allowed tokens, weights.
            let mut exp_p: Vec<Vec<Vec<f64>>> = Vec::new();
            let mut exp_z: Vec<Vec<Vec<f64>>> = Vec::new();
            for bi in 0..batch {
                let (mut ps, mut zs) = (Vec::new(), Vec::new());
                for h in 0..hq {
                    let s = segs.index(bi, geom.kv_head(h));
                    let (off, len) = (segs.offset(s), segs.len_of(s));
                    let allowed = |j: usize| match restrict {
                        Restrict::Dense => true,
                        Restrict::Indices(l) => l
                            .list(l.scope().list_of(bi, h, &geom))
                            .contains(&(j as u32)),
                        Restrict::Mask(m) => m.get(m.scope().list_of(bi, h, &geom), 0, j),
                    };
                    let qv = &q[(bi * hq + h) * d..][..d];
                    let z: Vec<f64> = (0..len)
                        .map(|j| {
                            if allowed(j) {
                                logit(qv, &k[(off + j) * d..][..d], scale)
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    ps.push(norm_row(&z, norm.alpha(h)));
                    zs.push(z);
                }
                exp_p.push(ps);
                exp_z.push(zs);
            }
            let p = DecodeParams {
                geom,
                segments: &segs,
                scale: None,
                normalizer: norm,
                restrict,
            };
            let ctx = format!(
                "{}: decode {} n={n} {geom:?} {norm:?} {restrict:?}",
                b.name(),
                T::DTYPE
            );
            for heads in HEADS {
                let blocks = evidence_blocks(&geom, &segs, heads, &ones).unwrap();
                let per_head = evidence_blocks(&geom, &segs, Heads::PerHead, &ones).unwrap();
                let mut probs = b.zeros::<f32>(blocks.total()).unwrap();
                let mut logits = b.zeros::<f32>(per_head.total()).unwrap();
                let mut stats = b.zeros::<f32>(batch * hq).unwrap();
                let mut out_f32 = b.zeros::<f32>(q.len()).unwrap();
                let mut out = b.zeros::<T>(q.len()).unwrap();
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
                    &mut out,
                    DecodeEvidence {
                        probs: Some((heads, &mut probs)),
                        logits: Some(&mut logits),
                        stats: Some(&mut stats),
                        output: Some(&mut out_f32),
                    },
                )
                .unwrap();
                // The output is unchanged by asking for evidence.
                let mut plain = b.zeros::<T>(q.len()).unwrap();
                ops::decode_attention(b, &p, &qb, &kb, &vb, &mut plain).unwrap();
                assert_eq!(
                    b.download(&out).unwrap(),
                    b.download(&plain).unwrap(),
                    "{ctx}: evidence changed the output"
                );
                let want: Vec<f64> = exp_p
                    .iter()
                    .flat_map(|ps| reduce(&geom, heads, ps))
                    .collect();
                close(
                    &b.download(&probs).unwrap(),
                    &want,
                    2e-6,
                    &format!("{ctx} probs {heads:?}"),
                );
                let want_z: Vec<f64> = exp_z.iter().flat_map(|zs| zs.concat()).collect();
                let tol_z = 1e-5 * (d as f64).sqrt();
                close(
                    &b.download(&logits).unwrap(),
                    &want_z,
                    tol_z,
                    &format!("{ctx} logits"),
                );
                // The f32 output: Σ_j p_j v_j from the full matrix; its
                // storage-dtype rounding is the attention output.
                let of = b.download(&out_f32).unwrap();
                let want_o: Vec<f64> = (0..batch * hq)
                    .flat_map(|i| {
                        let (bi, h) = (i / hq, i % hq);
                        let s = segs.index(bi, geom.kv_head(h));
                        let off = segs.offset(s);
                        let w = &exp_p[bi][h];
                        (0..d)
                            .map(|c| {
                                w.iter()
                                    .enumerate()
                                    .map(|(j, &pj)| pj * v[(off + j) * d + c].to_f64())
                                    .sum::<f64>()
                            })
                            .collect::<Vec<f64>>()
                    })
                    .collect();
                let tol_o =
                    if T::DTYPE == DType::F32 || matches!(b.name(), "reference" | "cpu" | "cuda") {
                        2e-5
                    } else {
                        // Backends that round-trip the stored output (wgpu).
                        8e-3
                    };
                close(&of, &want_o, tol_o, &format!("{ctx} output"));
                // The stored output is the f32 one rounded once (the
                // reference rounds from f64, which may differ at a tie).
                if b.name() != "reference" {
                    let stored = b.download(&out).unwrap();
                    for (o, s) in of.iter().zip(&stored) {
                        assert_eq!(
                            T::from_f32(*o),
                            *s,
                            "{ctx}: output evidence vs stored output"
                        );
                    }
                }
                // Statistic: softmax ln Σ e^z; entmax τ reproduces the weights.
                let st = b.download(&stats).unwrap();
                for bi in 0..batch {
                    for h in 0..hq {
                        let z = &exp_z[bi][h];
                        let w = &exp_p[bi][h];
                        let t = f64::from(st[bi * hq + h]);
                        match norm.alpha(h) {
                            None => {
                                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                                let want = if m == f64::NEG_INFINITY {
                                    m
                                } else {
                                    m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
                                };
                                close(&[t as f32], &[want], 1e-5, &format!("{ctx} lse"));
                            }
                            Some(a) => {
                                let am1 = f64::from(a) - 1.0;
                                for (j, &zj) in z.iter().enumerate() {
                                    if w[j] > 1e-3 {
                                        let pj = (am1 * zj - t).max(0.0).powf(1.0 / am1);
                                        assert!(
                                            (pj - w[j]).abs() < 1e-3,
                                            "{ctx}: tau {t} gives {pj} for weight {}",
                                            w[j]
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Softmax and an α whose τ every backend searches in f32.
const NORMS: [Normalizer; 2] = [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }];

/// α outside [1.125, 2]: the CPU backend's f64 path (`cpu/exact.rs`), whose
/// evidence is computed apart from the fused pass.
const NORMS_F64: [Normalizer; 2] = [
    Normalizer::Entmax { alpha: 1.05 },
    Normalizer::Entmax { alpha: 4.0 },
];

fn decode_evidence_matches_full_matrix<B: Ops>(b: &B) {
    for (i, &n) in [1usize, 7, 33, 129, 600, 1100].iter().enumerate() {
        decode_case::<B, f32>(b, i, n, &NORMS);
    }
    decode_case::<B, f16>(b, 7, 70, &NORMS);
}

fn decode_evidence_at_extreme_alpha_matches_full_matrix<B: Ops>(b: &B) {
    for (i, &n) in [7usize, 600].iter().enumerate() {
        decode_case::<B, f32>(b, i, n, &NORMS_F64);
    }
}

fn prefill_case<B: Ops, T: Element>(b: &B, i: usize, n: usize, norms: &[Normalizer]) {
    let g = [1, 4, 2][i % 3];
    let geom = HeadGeometry::new(2 * g, 2, [16, 64, 33][i % 3]).unwrap();
    let nq0 = n.min(21);
    let nq1 = (n / 2).clamp(1, 5);
    let segs = Segments::with_capacity(
        2,
        2,
        n + 3,
        vec![n as u32, n as u32, (n as u32).max(nq1 as u32), nq1 as u32],
    )
    .unwrap();
    let q_rows = Ragged::from_lens(&[nq0 as u32, nq1 as u32]).unwrap();
    let (hq, d, batch) = (geom.num_q_heads(), geom.head_dim(), segs.batch());
    let mut rng = Rng::new(70 + i as u64);
    let q: Vec<T> = normal_vec(&mut rng, q_rows.total() * hq * d, 2.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let masks: Vec<Vec<BitMask>> = (0..segs.num_segments())
        .map(|s| {
            (0..q_rows.len_of(s / 2))
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
    let scale = f64::from(geom.default_scale());
    let ones = vec![1; batch];
    for (ni, norm) in norms.iter().enumerate() {
        for (vi, (causal, m)) in [(true, None), (false, None), (true, Some(&mask))]
            .into_iter()
            .enumerate()
        {
            // On the CUDA simulator half the variants, rotating (`sim_runs`).
            if !sim_runs(b, i + ni + vi, 2) {
                continue;
            }
            // Full matrix: weights[b][h] = nq × len.
            let mut w_all: Vec<Vec<Vec<Vec<f64>>>> = Vec::new();
            for bi in 0..batch {
                let nq = q_rows.len_of(bi);
                let mut per_h = Vec::new();
                for h in 0..hq {
                    let kvh = geom.kv_head(h);
                    let s = segs.index(bi, kvh);
                    let (off, len) = (segs.offset(s), segs.len_of(s));
                    let rows: Vec<Vec<f64>> = (0..nq)
                        .map(|r| {
                            let pos = len + r - nq;
                            let qv = &q[((q_rows.range(bi).start + r) * hq + h) * d..][..d];
                            let z: Vec<f64> = (0..len)
                                .map(|j| {
                                    let vis = (!causal || j <= pos)
                                        && m.is_none_or(|mk| {
                                            mk.get(mk.scope().list_of(bi, h, &geom), r, j)
                                        });
                                    if vis {
                                        logit(qv, &k[(off + j) * d..][..d], scale)
                                    } else {
                                        f64::NEG_INFINITY
                                    }
                                })
                                .collect();
                            norm_row(&z, norm.alpha(h))
                        })
                        .collect();
                    per_h.push(rows);
                }
                w_all.push(per_h);
            }
            let p = PrefillParams {
                geom,
                q_rows: &q_rows,
                segments: &segs,
                causal,
                mask: m,
                scale: None,
                normalizer: norm,
            };
            let ctx = format!(
                "{}: prefill {} n={n} {geom:?} {norm:?} causal={causal} mask={}",
                b.name(),
                T::DTYPE,
                m.is_some()
            );
            for (hi, heads) in HEADS.iter().copied().enumerate() {
                // usize::MAX: a window longer than any chunk (the whole
                // chunk; `qi + W` overflowed on the CPU, found by the
                // `policies` fuzz target).
                let wq = [1, 4, 32, usize::MAX][(i + hi) % 4];
                let rows_mode = hi % 2 == 0;
                let win = Window {
                    queries: wq,
                    heads: HEADS[(hi + 1) % 4],
                    rows: rows_mode,
                };
                let wrows: Vec<usize> = q_rows.lens().map(|x| win.rows_for(x)).collect();
                let cb = evidence_blocks(&geom, &segs, heads, &ones).unwrap();
                let wb = evidence_blocks(&geom, &segs, win.heads, &wrows).unwrap();
                let mut col = b.zeros::<f32>(cb.total()).unwrap();
                let mut wbuf = b.zeros::<f32>(wb.total()).unwrap();
                let mut out = b.zeros::<T>(q.len()).unwrap();
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
                    &mut out,
                    PrefillEvidence {
                        col_sums: Some((heads, &mut col)),
                        window: Some((win, &mut wbuf)),
                    },
                )
                .unwrap();
                let mut plain = b.zeros::<T>(q.len()).unwrap();
                ops::prefill_attention(b, &p, &qb, &kb, &vb, &mut plain).unwrap();
                assert_eq!(
                    b.download(&out).unwrap(),
                    b.download(&plain).unwrap(),
                    "{ctx}: evidence changed the output"
                );
                let mut want_col = Vec::new();
                let mut want_win = Vec::new();
                for (bi, per_h) in w_all.iter().enumerate() {
                    let nq = q_rows.len_of(bi);
                    let sums: Vec<Vec<f64>> = per_h
                        .iter()
                        .map(|rows| {
                            let mut s = vec![0.0; rows.first().map_or(0, |r| r.len())];
                            for r in rows {
                                for (a, x) in s.iter_mut().zip(r) {
                                    *a += x;
                                }
                            }
                            s
                        })
                        .collect();
                    // Blocks with no query rows still span their segment.
                    let sums: Vec<Vec<f64>> = sums
                        .into_iter()
                        .enumerate()
                        .map(|(h, s)| {
                            let len = segs.len_of(segs.index(bi, geom.kv_head(h)));
                            if s.is_empty() { vec![0.0; len] } else { s }
                        })
                        .collect();
                    want_col.extend(reduce(&geom, heads, &sums));
                    let lo = nq.saturating_sub(wq);
                    let wins: Vec<Vec<f64>> = per_h
                        .iter()
                        .enumerate()
                        .map(|(h, rows)| {
                            let len = segs.len_of(segs.index(bi, geom.kv_head(h)));
                            if rows_mode {
                                rows[lo..].concat()
                            } else {
                                let mut s = vec![0.0; len];
                                for r in &rows[lo..] {
                                    for (a, x) in s.iter_mut().zip(r) {
                                        *a += x;
                                    }
                                }
                                s
                            }
                        })
                        .collect();
                    want_win.extend(reduce(&geom, win.heads, &wins));
                }
                let abs = 2e-6 * nq0 as f64;
                close(
                    &b.download(&col).unwrap(),
                    &want_col,
                    abs,
                    &format!("{ctx} col_sums {heads:?}"),
                );
                close(
                    &b.download(&wbuf).unwrap(),
                    &want_win,
                    abs,
                    &format!("{ctx} window {win:?}"),
                );
            }
        }
    }
}

fn prefill_evidence_matches_full_matrix<B: Ops>(b: &B) {
    for (i, &n) in [1usize, 7, 33, 129, 300].iter().enumerate() {
        prefill_case::<B, f32>(b, i, n, &NORMS);
    }
    prefill_case::<B, f16>(b, 5, 40, &NORMS);
}

fn prefill_evidence_at_extreme_alpha_matches_full_matrix<B: Ops>(b: &B) {
    prefill_case::<B, f32>(b, 1, 40, &NORMS_F64);
}

backend_suite!(
    decode_evidence_matches_full_matrix,
    prefill_evidence_matches_full_matrix,
);

// α outside [1.125, 2] on the backends that are accurate there: the GPU
// backends solve τ and form logits in f32 and keep f32-sized errors
// (`docs/numerics.md`, "GPU backends").
#[test]
fn reference_evidence_at_extreme_alpha_matches_full_matrix() {
    decode_evidence_at_extreme_alpha_matches_full_matrix(&kvsieve::reference::Reference);
    prefill_evidence_at_extreme_alpha_matches_full_matrix(&kvsieve::reference::Reference);
}

#[test]
fn cpu_evidence_at_extreme_alpha_matches_full_matrix() {
    for isa in common::backends::cpu_isas() {
        let cpu = kvsieve::cpu::Cpu::with_isa(isa);
        decode_evidence_at_extreme_alpha_matches_full_matrix(&cpu);
        prefill_evidence_at_extreme_alpha_matches_full_matrix(&cpu);
    }
}

/// Logits past the f32 range (`q = 1e20`): the CPU backend recomputes such
/// units on its f64 path, and their evidence (weights, logits, output) must
/// match the reference's.
#[test]
fn cpu_evidence_of_overflowing_logits_matches_reference() {
    let geom = HeadGeometry::new(2, 1, 4).unwrap();
    let segs = Segments::uniform(1, 1, 3).unwrap();
    let q = vec![1e20f32, 0.0, 0.0, 0.0, 1e20, 1e20, 0.0, 0.0];
    let k = vec![
        1e20f32, 0.0, 0.0, 0.0, 1e20, 0.0, 0.0, 0.0, 0.0, 1e20, 0.0, 0.0,
    ];
    let v: Vec<f32> = (0..12).map(|x| x as f32).collect();
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        let cpu = kvsieve::cpu::Cpu::new();
        let (pc, lc, oc) = evidence_of(&cpu, &geom, &segs, &q, &k, &v, norm.clone());
        let reference = kvsieve::reference::Reference;
        let (pr, lr, or) = evidence_of(&reference, &geom, &segs, &q, &k, &v, norm.clone());
        for (what, got, want) in [
            ("probs", &pc, &pr),
            ("logits", &lc, &lr),
            ("output", &oc, &or),
        ] {
            // Logits past f32's range round to inf in the f32 evidence
            // buffer, as the reference's do; weights and output are finite.
            assert!(
                what == "logits" || got.iter().all(|x| x.is_finite()),
                "{norm:?} {what}: {got:?}"
            );
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(
                    g == w || (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                    "{norm:?} {what}: cpu {got:?} reference {want:?}"
                );
            }
        }
    }
}

/// Decode evidence (per-head probs, logits) and the output of one call.
fn evidence_of<B: Ops>(
    b: &B,
    geom: &HeadGeometry,
    segs: &Segments,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    norm: Normalizer,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let ones = vec![1; segs.batch()];
    let pb = evidence_blocks(geom, segs, Heads::PerHead, &ones).unwrap();
    let mut probs = b.zeros::<f32>(pb.total()).unwrap();
    let mut logits = b.zeros::<f32>(pb.total()).unwrap();
    let mut out = b.zeros::<f32>(q.len()).unwrap();
    let params = DecodeParams {
        geom: *geom,
        segments: segs,
        scale: None,
        normalizer: &norm,
        restrict: Restrict::Dense,
    };
    let ev = DecodeEvidence {
        probs: Some((Heads::PerHead, &mut probs)),
        logits: Some(&mut logits),
        ..DecodeEvidence::default()
    };
    ops::decode_attention_with(
        b,
        &params,
        &b.upload(q).unwrap(),
        &b.upload(k).unwrap(),
        &b.upload(v).unwrap(),
        &mut out,
        ev,
    )
    .unwrap();
    (
        b.download(&probs).unwrap(),
        b.download(&logits).unwrap(),
        b.download(&out).unwrap(),
    )
}
