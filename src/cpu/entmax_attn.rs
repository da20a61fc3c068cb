//! α-entmax attention (AdaSplash) on the CPU: block-sparse prefill and its
//! three-pass backward.
//!
//! # Forward
//!
//! Work items are query tiles of `block_q` rows of one sequence (all
//! heads). Per query head the item scores its rows against the visible key
//! strip, finds τ per row (f32 Halley–bisection, renormalised weights),
//! classifies the `block_q × block_k` tiles (visible: some visible entry;
//! live: some non-zero weight) and accumulates `P·V` over the live tiles
//! only (with `skip_blocks`) or over every visible tile. A dead tile holds
//! only exact zeros and `weighted_rows` skips zero rows, so both give
//! bitwise the same output.
//!
//! # Backward
//!
//! Work items are (sequence, KV head) segments, which own disjoint rows of
//! `dk` / `dv`; the heads of the group are processed in order. Per head,
//! with `p_ij = [s_ij − τ_i]_+^{1/(α−1)}` and `u_ij = [s_ij − τ_i]_+^{(2−α)/(α−1)}`:
//!
//! 1. per query block over its tiles: `Õ_i = Σ u_ij v_j / Σ u_ij`,
//!    `δ_i = d_out_i · Õ_i`; on the same tiles `dS_ij = u_ij (d_out_i · v_j − δ_i)`;
//! 2. per key block over its tiles (query blocks in increasing order):
//!    `dV_j += Σ_i p_ij d_out_i`, `dK_j += Σ_i dS_ij (scale · q_i)`;
//! 3. per query block over its tiles: `dQ_i = scale Σ_j dS_ij k_j`;
//!
//! where the tiles visited are the live ones with `skip_blocks`, else every
//! visible one. `∂L/∂α` per row uses [`crate::entmax::entmax_alpha_grad_f64`]
//! on the row's support. The per-head matrices (`[q_len, kv_len]` f32: P, U,
//! `d_out·v`, dS and two transposes) are held whole per segment; this
//! backward is meant for training-sized chunks, not 100K-token rows.
#![forbid(unsafe_code)]

use rayon::prelude::*;

use super::Cpu;
use super::attn::query_tiles;
use super::norm::entmax_row_inplace;
use super::simd;
use super::workspace::grow;
use crate::backend::{BlockStats, EntmaxOps, EntmaxPrefillMeta};
use crate::dtype::Element;
use crate::entmax::entmax_alpha_grad_f64;
use crate::error::Result;

/// Number of visible keys of query row `i` (of `nq`) with `kv` keys.
fn visible(causal: bool, kv: usize, nq: usize, i: usize) -> usize {
    if causal {
        (kv + i + 1).saturating_sub(nq).min(kv)
    } else {
        kv
    }
}

fn forward<T: Element>(
    cpu: &Cpu,
    meta: &EntmaxPrefillMeta<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    tau: &mut [f32],
) -> BlockStats {
    let isa = cpu.isa;
    let geom = &meta.geom;
    let (hq, d) = (geom.num_q_heads(), geom.head_dim());
    let (bq, bk) = (meta.block_q, meta.block_k);
    let tiles = query_tiles(meta.q_rows, hq * d, bq, out);
    let taus = query_tiles(meta.q_rows, hq, bq, tau);
    let stats: Vec<BlockStats> = cpu.install(|| {
        tiles
            .into_par_iter()
            .zip(taus.into_par_iter())
            .map(|((b, i0, n, o), (_, _, _, t))| {
                let mut st = BlockStats::default();
                let nq = meta.q_rows.len_of(b);
                let r0 = meta.q_rows.range(b).start + i0;
                for h in 0..hq {
                    let s = meta.segs.index(b, geom.kv_head(h));
                    let (off, kv) = (meta.segs.offset(s), meta.segs.len_of(s));
                    let strip = visible(meta.causal, kv, nq, i0 + n - 1);
                    let alpha = meta.alphas[h];
                    cpu.cands.with(|cand| {
                        cpu.scratch.with(|buf| {
                            let buf = grow(buf, n * d * 2 + n * strip);
                            let (qs, rest) = buf.split_at_mut(n * d);
                            let (acc, sc) = rest.split_at_mut(n * d);
                            acc.fill(0.0);
                            for i in 0..n {
                                let dst = &mut qs[i * d..(i + 1) * d];
                                simd::to_f32_slice(isa, &q[((r0 + i) * hq + h) * d..][..d], dst);
                            }
                            if strip > 0 {
                                let krows = &k[off * d..(off + strip) * d];
                                simd::scores_rows_strided(
                                    isa, qs, n, krows, d, meta.scale, sc, strip,
                                );
                            }
                            for i in 0..n {
                                let row = &mut sc[i * strip..(i + 1) * strip];
                                row[visible(meta.causal, kv, nq, i0 + i)..].fill(f32::NEG_INFINITY);
                                t[i * hq + h] = entmax_row_inplace(isa, row, alpha, cand);
                            }
                            // Tiles: key blocks that hold a visible entry, and live ones.
                            for kb in 0..strip.div_ceil(bk) {
                                let (j0, j1) = (kb * bk, ((kb + 1) * bk).min(strip));
                                let live = (0..n).any(|i| {
                                    sc[i * strip + j0..i * strip + j1].iter().any(|&p| p != 0.0)
                                });
                                st.visible_tiles += 1;
                                st.live_tiles += usize::from(live);
                                if live || !meta.skip_blocks {
                                    let vrows = &v[(off + j0) * d..(off + j1) * d];
                                    simd::weighted_rows_strided(
                                        isa,
                                        acc,
                                        n,
                                        &sc[j0..],
                                        strip,
                                        vrows,
                                        d,
                                    );
                                }
                            }
                            for i in 0..n {
                                let a = &acc[i * d..(i + 1) * d];
                                simd::from_f32_slice(isa, a, &mut o[(i * hq + h) * d..][..d]);
                            }
                        })
                    });
                }
                st
            })
            .collect()
    });
    stats
        .into_iter()
        .fold(BlockStats::default(), |a, s| BlockStats {
            live_tiles: a.live_tiles + s.live_tiles,
            visible_tiles: a.visible_tiles + s.visible_tiles,
        })
}

/// `dst[j * rows + i] = src[i * cols + j]`.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    for i in 0..rows {
        for j in 0..cols {
            dst[j * rows + i] = src[i * cols + j];
        }
    }
}

/// The backward's inputs: `q`, `k`, `v`, the forward's `tau`, `d_out`.
type Inputs<'a, T> = (&'a [T], &'a [T], &'a [T], &'a [f32], &'a [T]);

/// Gradients of one segment: `(dq [G, nq, D], dalpha [G])`; `dk`, `dv` are
/// the segment's rows (accumulated over the group).
#[allow(clippy::too_many_arguments)]
fn backward_segment<T: Element>(
    cpu: &Cpu,
    meta: &EntmaxPrefillMeta<'_>,
    b: usize,
    kvh: usize,
    (q, k, v, tau, d_out): Inputs<'_, T>,
    dk: &mut [f32],
    dv: &mut [f32],
) -> (Vec<f32>, Vec<f64>) {
    let isa = cpu.isa;
    let geom = &meta.geom;
    let (hq, g, d) = (geom.num_q_heads(), geom.group(), geom.head_dim());
    let (bq, bk) = (meta.block_q, meta.block_k);
    let s = meta.segs.index(b, kvh);
    let (off, kv) = (meta.segs.offset(s), meta.segs.len_of(s));
    let nq = meta.q_rows.len_of(b);
    let r0 = meta.q_rows.range(b).start;
    let mut dq = vec![0.0f32; g * nq * d];
    let mut dalpha = vec![0.0f64; g];
    if nq == 0 || kv == 0 {
        return (dq, dalpha);
    }
    let (tq, tk) = (nq.div_ceil(bq), kv.div_ceil(bk));
    let mm = nq * kv;
    let mut qs = vec![0.0f32; nq * d];
    let mut dos = vec![0.0f32; nq * d];
    let mut p = vec![0.0f32; mm];
    let mut u = vec![0.0f32; mm];
    let mut dy = vec![0.0f32; mm];
    let mut ds = vec![0.0f32; mm];
    let mut pt = vec![0.0f32; mm];
    let mut dst = vec![0.0f32; mm];
    let mut o2 = vec![0.0f32; nq * d];
    let krows = &k[off * d..(off + kv) * d];
    let vrows = &v[off * d..(off + kv) * d];
    for hh in 0..g {
        let h = kvh * g + hh;
        let alpha = meta.alphas[h];
        let am1 = alpha - 1.0;
        let (e, e1) = (1.0 / am1, 1.0 / am1 - 1.0);
        for i in 0..nq {
            let r = (r0 + i) * hq + h;
            simd::to_f32_slice(isa, &q[r * d..(r + 1) * d], &mut qs[i * d..(i + 1) * d]);
            simd::to_f32_slice(
                isa,
                &d_out[r * d..(r + 1) * d],
                &mut dos[i * d..(i + 1) * d],
            );
        }
        // Logits, then p and u from the forward's τ.
        simd::scores_rows_strided(isa, &qs, nq, krows, d, meta.scale, &mut p, kv);
        for i in 0..nq {
            let t = tau[(r0 + i) * hq + h];
            let vis = visible(meta.causal, kv, nq, i);
            for j in 0..kv {
                let x = am1 * p[i * kv + j] - t;
                let (pp, uu) = if j < vis && x > 0.0 {
                    match alpha {
                        1.5 => (x * x, x),
                        2.0 => (x, 1.0),
                        _ => (x.powf(e), x.powf(e1)),
                    }
                } else {
                    (0.0, 0.0)
                };
                p[i * kv + j] = pp;
                u[i * kv + j] = uu;
            }
        }
        // Tiles to visit, per query block.
        let visit: Vec<Vec<usize>> = (0..tq)
            .map(|qb| {
                let (i0, i1) = (qb * bq, ((qb + 1) * bq).min(nq));
                (0..tk)
                    .filter(|&kb| {
                        let (j0, j1) = (kb * bk, ((kb + 1) * bk).min(kv));
                        if meta.skip_blocks {
                            (i0..i1).any(|i| p[i * kv + j0..i * kv + j1].iter().any(|&x| x != 0.0))
                        } else {
                            j0 < visible(meta.causal, kv, nq, i1 - 1)
                        }
                    })
                    .collect()
            })
            .collect();
        // Pass 1: Õ, δ, and dS on the visited tiles.
        o2.fill(0.0);
        ds.fill(0.0);
        dy.fill(0.0);
        for (qb, list) in visit.iter().enumerate() {
            let (i0, i1) = (qb * bq, ((qb + 1) * bq).min(nq));
            for &kb in list {
                let (j0, j1) = (kb * bk, ((kb + 1) * bk).min(kv));
                let vb = &vrows[j0 * d..j1 * d];
                simd::weighted_rows_strided(
                    isa,
                    &mut o2[i0 * d..],
                    i1 - i0,
                    &u[i0 * kv + j0..],
                    kv,
                    vb,
                    d,
                );
                simd::scores_rows_strided(
                    isa,
                    &dos[i0 * d..],
                    i1 - i0,
                    vb,
                    d,
                    1.0,
                    &mut dy[i0 * kv + j0..],
                    kv,
                );
            }
            for i in i0..i1 {
                let mut usum = 0.0f64;
                for &kb in list {
                    let (j0, j1) = (kb * bk, ((kb + 1) * bk).min(kv));
                    usum += u[i * kv + j0..i * kv + j1]
                        .iter()
                        .map(|&x| f64::from(x))
                        .sum::<f64>();
                }
                let delta = if usum > 0.0 {
                    let dot: f64 = (0..d)
                        .map(|c| f64::from(dos[i * d + c]) * f64::from(o2[i * d + c]))
                        .sum();
                    (dot / usum) as f32
                } else {
                    0.0
                };
                for &kb in list {
                    let (j0, j1) = (kb * bk, ((kb + 1) * bk).min(kv));
                    for j in j0..j1 {
                        ds[i * kv + j] = u[i * kv + j] * (dy[i * kv + j] - delta);
                    }
                }
                // ∂L/∂α on the row's support.
                let (mut ps, mut dys) = (Vec::new(), Vec::new());
                for j in 0..kv {
                    if p[i * kv + j] > 0.0 {
                        ps.push(f64::from(p[i * kv + j]));
                        dys.push(f64::from(dy[i * kv + j]));
                    }
                }
                if !ps.is_empty() {
                    dalpha[hh] +=
                        entmax_alpha_grad_f64(&ps, &dys, f64::from(alpha)).unwrap_or(f64::NAN);
                }
            }
        }
        // Pass 2: per key block over its query blocks, in order.
        transpose(&p, nq, kv, &mut pt);
        transpose(&ds, nq, kv, &mut dst);
        simd::scale_f32(isa, &mut qs, meta.scale);
        for kb in 0..tk {
            let (j0, j1) = (kb * bk, ((kb + 1) * bk).min(kv));
            for (qb, list) in visit.iter().enumerate() {
                if !list.contains(&kb) {
                    continue;
                }
                let (i0, i1) = (qb * bq, ((qb + 1) * bq).min(nq));
                simd::weighted_rows_strided(
                    isa,
                    &mut dv[j0 * d..],
                    j1 - j0,
                    &pt[j0 * nq + i0..],
                    nq,
                    &dos[i0 * d..i1 * d],
                    d,
                );
                simd::weighted_rows_strided(
                    isa,
                    &mut dk[j0 * d..],
                    j1 - j0,
                    &dst[j0 * nq + i0..],
                    nq,
                    &qs[i0 * d..i1 * d],
                    d,
                );
            }
        }
        // Pass 3: per query block over its key blocks.
        let dqh = &mut dq[hh * nq * d..(hh + 1) * nq * d];
        for (qb, list) in visit.iter().enumerate() {
            let (i0, i1) = (qb * bq, ((qb + 1) * bq).min(nq));
            for &kb in list {
                let (j0, j1) = (kb * bk, ((kb + 1) * bk).min(kv));
                simd::weighted_rows_strided(
                    isa,
                    &mut dqh[i0 * d..],
                    i1 - i0,
                    &ds[i0 * kv + j0..],
                    kv,
                    &krows[j0 * d..j1 * d],
                    d,
                );
            }
        }
        simd::scale_f32(isa, dqh, meta.scale);
    }
    (dq, dalpha)
}

impl EntmaxOps for Cpu {
    fn entmax_prefill<T: Element>(
        &self,
        meta: &EntmaxPrefillMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
        tau: &mut Vec<f32>,
    ) -> Result<BlockStats> {
        Ok(forward(self, meta, q, k, v, out, tau))
    }

    fn entmax_prefill_backward<T: Element>(
        &self,
        meta: &EntmaxPrefillMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        tau: &Vec<f32>,
        d_out: &Vec<T>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
        dalpha: &mut Vec<f32>,
    ) -> Result<()> {
        let geom = &meta.geom;
        let (hq, hkv, g, d) = (
            geom.num_q_heads(),
            geom.num_kv_heads(),
            geom.group(),
            geom.head_dim(),
        );
        dk.fill(0.0);
        dv.fill(0.0);
        dq.fill(0.0);
        // Disjoint dk / dv rows per segment, in buffer order.
        let segs = meta.segs;
        let mut order: Vec<usize> = (0..segs.num_segments()).collect();
        order.sort_by_key(|&s| segs.offset(s));
        let mut parts = Vec::with_capacity(order.len());
        let (mut rk, mut rv): (&mut [f32], &mut [f32]) = (dk, dv);
        let mut at = 0usize;
        for &s in &order {
            let r = segs.rows_of(s);
            let (_, tk) = std::mem::take(&mut rk).split_at_mut((r.start - at) * d);
            let (_, tv) = std::mem::take(&mut rv).split_at_mut((r.start - at) * d);
            let (sk, tk) = tk.split_at_mut(r.len() * d);
            let (sv, tv) = tv.split_at_mut(r.len() * d);
            parts.push((s, sk, sv));
            rk = tk;
            rv = tv;
            at = r.end;
        }
        let inputs = (
            q.as_slice(),
            k.as_slice(),
            v.as_slice(),
            tau.as_slice(),
            d_out.as_slice(),
        );
        let mut results: Vec<(usize, Vec<f32>, Vec<f64>)> = self.install(|| {
            parts
                .into_par_iter()
                .map(|(s, sk, sv)| {
                    let (b, kvh) = (s / hkv, s % hkv);
                    let (gq, ga) = backward_segment(self, meta, b, kvh, inputs, sk, sv);
                    (s, gq, ga)
                })
                .collect()
        });
        results.sort_by_key(|r| r.0);
        let mut da = vec![0.0f64; hq];
        for (s, gq, ga) in results {
            let (b, kvh) = (s / hkv, s % hkv);
            let nq = meta.q_rows.len_of(b);
            let r0 = meta.q_rows.range(b).start;
            for hh in 0..g {
                let h = kvh * g + hh;
                da[h] += ga[hh];
                for i in 0..nq {
                    let r = (r0 + i) * hq + h;
                    dq[r * d..(r + 1) * d]
                        .copy_from_slice(&gq[(hh * nq + i) * d..(hh * nq + i + 1) * d]);
                }
            }
        }
        for (o, x) in dalpha.iter_mut().zip(da) {
            *o = x as f32;
        }
        Ok(())
    }
}
