//! Entmax attention (AdaSplash) in f64: τ per row, block mask, tiled
//! forward, three-pass backward.

use crate::backend::{BlockStats, EntmaxOps, EntmaxPrefillMeta};
use crate::dtype::Element;
use crate::error::Result;

use super::Reference;

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One attention head of one sequence, in f64.
///
/// `q` is `[nq, d]`, `k` and `v` are `[nk, d]`; query `i` sits at position
/// `nk − nq + i` (bottom-right aligned) and, with `causal`, sees keys up to
/// that position.
#[derive(Clone, Debug)]
pub struct EntmaxHead<'a> {
    /// Queries `[nq, d]`.
    pub q: &'a [f64],
    /// Keys `[nk, d]`.
    pub k: &'a [f64],
    /// Values `[nk, d]`.
    pub v: &'a [f64],
    /// Head dimension.
    pub d: usize,
    /// Causal masking.
    pub causal: bool,
    /// Logit scale.
    pub scale: f64,
    /// α > 1.
    pub alpha: f64,
}

/// Gradients of one head.
#[derive(Clone, Debug, PartialEq)]
pub struct EntmaxHeadGrads {
    /// `∂L/∂q`, `[nq, d]`.
    pub dq: Vec<f64>,
    /// `∂L/∂k`, `[nk, d]`.
    pub dk: Vec<f64>,
    /// `∂L/∂v`, `[nk, d]`.
    pub dv: Vec<f64>,
    /// `∂L/∂α`.
    pub dalpha: f64,
}

/// Scaled scores, thresholds and the tile lists of one head.
struct Prepared {
    nq: usize,
    nk: usize,
    /// `s_ij = (α−1)·scale·q_i·k_j`, `-inf` where not visible; `[nq, nk]`.
    s: Vec<f64>,
    /// τ per row (`+inf` for a row with no visible key).
    tau: Vec<f64>,
    /// Per query block, the key blocks to visit (all visible ones, or only
    /// live ones when skipping).
    visit: Vec<Vec<usize>>,
    stats: BlockStats,
}

impl EntmaxHead<'_> {
    fn nq(&self) -> usize {
        self.q.len() / self.d
    }
    fn nk(&self) -> usize {
        self.k.len() / self.d
    }
    fn visible(&self, i: usize, j: usize) -> bool {
        !self.causal
            || (self.nk() + i)
                .checked_sub(self.nq())
                .is_some_and(|pos| j <= pos)
    }

    /// Logits `z_ij`, τ per row (exact, [`crate::entmax::entmax_exact_f64`]),
    /// and the tile lists.
    fn prepare(&self, tau_in: Option<&[f64]>, bq: usize, bk: usize, skip: bool) -> Prepared {
        let (nq, nk, d) = (self.nq(), self.nk(), self.d);
        let am1 = self.alpha - 1.0;
        let mut s = vec![f64::NEG_INFINITY; nq * nk];
        let mut tau = vec![f64::INFINITY; nq];
        for i in 0..nq {
            let mut zs = Vec::new();
            for j in 0..nk {
                if self.visible(i, j) {
                    let z = self.scale * dot(&self.q[i * d..][..d], &self.k[j * d..][..d]);
                    s[i * nk + j] = am1 * z;
                    zs.push(z);
                }
            }
            tau[i] = match tau_in {
                Some(t) => t[i],
                None if zs.is_empty() => f64::INFINITY,
                None => {
                    crate::entmax::entmax_exact_f64(&zs, self.alpha).map_or(f64::NAN, |(_, t)| t)
                }
            };
        }
        let (tq, tk) = (nq.div_ceil(bq), nk.div_ceil(bk));
        let mut visit = vec![Vec::new(); tq];
        let mut stats = BlockStats::default();
        for (qb, list) in visit.iter_mut().enumerate() {
            for kb in 0..tk {
                let (mut any_visible, mut live) = (false, false);
                for i in qb * bq..((qb + 1) * bq).min(nq) {
                    for j in kb * bk..((kb + 1) * bk).min(nk) {
                        let x = s[i * nk + j];
                        any_visible |= x > f64::NEG_INFINITY;
                        live |= x > tau[i];
                    }
                }
                stats.visible_tiles += usize::from(any_visible);
                stats.live_tiles += usize::from(live);
                if (skip && live) || (!skip && any_visible) {
                    list.push(kb);
                }
            }
        }
        Prepared {
            nq,
            nk,
            s,
            tau,
            visit,
            stats,
        }
    }

    /// `p = [s − τ]_+^{1/(α−1)}` and `u = [s − τ]_+^{(2−α)/(α−1)}` (= `p^{2−α}`).
    fn weights(&self, x: f64, tau: f64) -> (f64, f64) {
        let u = x - tau;
        if u > 0.0 {
            let am1 = self.alpha - 1.0;
            (u.powf(1.0 / am1), u.powf((2.0 - self.alpha) / am1))
        } else {
            (0.0, 0.0)
        }
    }

    /// Forward with tiles of `bq x bk`; returns `(out [nq, d], τ [nq], stats)`.
    pub fn forward_tiled(
        &self,
        bq: usize,
        bk: usize,
        skip: bool,
    ) -> (Vec<f64>, Vec<f64>, BlockStats) {
        let pre = self.prepare(None, bq, bk, skip);
        let d = self.d;
        let mut out = vec![0.0; pre.nq * d];
        for (qb, list) in pre.visit.iter().enumerate() {
            for i in qb * bq..((qb + 1) * bq).min(pre.nq) {
                for &kb in list {
                    for j in kb * bk..((kb + 1) * bk).min(pre.nk) {
                        let (p, _) = self.weights(pre.s[i * pre.nk + j], pre.tau[i]);
                        if p != 0.0 {
                            for c in 0..d {
                                out[i * d + c] += p * self.v[j * d + c];
                            }
                        }
                    }
                }
            }
        }
        (out, pre.tau, pre.stats)
    }

    /// Forward without tiles: `(out, τ)`.
    pub fn forward(&self) -> (Vec<f64>, Vec<f64>) {
        let (out, tau, _) = self.forward_tiled(1, 1, false);
        (out, tau)
    }

    /// Backward given `d_out` `[nq, d]` and the forward's τ (three passes,
    /// visiting only live tiles when `skip`).
    pub fn backward_tiled(
        &self,
        tau: &[f64],
        d_out: &[f64],
        bq: usize,
        bk: usize,
        skip: bool,
    ) -> EntmaxHeadGrads {
        let pre = self.prepare(Some(tau), bq, bk, skip);
        let (nq, nk, d) = (pre.nq, pre.nk, self.d);
        let am1 = self.alpha - 1.0;
        let w = |i: usize, j: usize| self.weights(pre.s[i * nk + j], pre.tau[i]);
        let tiles = |qb: usize, kb: usize| {
            (qb * bq..((qb + 1) * bq).min(nq))
                .flat_map(move |i| (kb * bk..((kb + 1) * bk).min(nk)).map(move |j| (i, j)))
        };
        // Pass 1: Õ_i = Σ u v / Σ u, δ_i = d_out_i · Õ_i.
        let mut delta = vec![0.0; nq];
        let mut o2 = vec![0.0; nq * d];
        let mut usum = vec![0.0; nq];
        for (qb, list) in pre.visit.iter().enumerate() {
            for &kb in list {
                for (i, j) in tiles(qb, kb) {
                    let (_, u) = w(i, j);
                    usum[i] += u;
                    for c in 0..d {
                        o2[i * d + c] += u * self.v[j * d + c];
                    }
                }
            }
        }
        for i in 0..nq {
            if usum[i] > 0.0 {
                delta[i] = (0..d)
                    .map(|c| d_out[i * d + c] * o2[i * d + c] / usum[i])
                    .sum();
            }
        }
        // dS_ij = u_ij (d_out_i · v_j − δ_i); dz = dS (the (α−1) factor cancels).
        let ds = |i: usize, j: usize, u: f64| {
            u * (dot(&d_out[i * d..][..d], &self.v[j * d..][..d]) - delta[i])
        };
        // Pass 2: per key block, dV and dK.
        let mut dk = vec![0.0; nk * d];
        let mut dv = vec![0.0; nk * d];
        for (qb, list) in pre.visit.iter().enumerate() {
            for &kb in list {
                for (i, j) in tiles(qb, kb) {
                    let (p, u) = w(i, j);
                    if u == 0.0 && p == 0.0 {
                        continue;
                    }
                    let g = ds(i, j, u);
                    for c in 0..d {
                        dv[j * d + c] += p * d_out[i * d + c];
                        dk[j * d + c] += self.scale * g * self.q[i * d + c];
                    }
                }
            }
        }
        // Pass 3: per query block, dQ; and ∂L/∂α row by row.
        let mut dq = vec![0.0; nq * d];
        let mut dalpha = 0.0;
        for (qb, list) in pre.visit.iter().enumerate() {
            for i in qb * bq..((qb + 1) * bq).min(nq) {
                let (mut ps, mut dys) = (Vec::new(), Vec::new());
                for &kb in list {
                    for j in kb * bk..((kb + 1) * bk).min(nk) {
                        let (p, u) = w(i, j);
                        if p == 0.0 && u == 0.0 {
                            continue;
                        }
                        let g = ds(i, j, u);
                        for c in 0..d {
                            dq[i * d + c] += self.scale * g * self.k[j * d + c];
                        }
                        ps.push(p);
                        dys.push(dot(&d_out[i * d..][..d], &self.v[j * d..][..d]));
                    }
                }
                if !ps.is_empty() {
                    dalpha += crate::entmax::entmax_alpha_grad_f64(&ps, &dys, self.alpha)
                        .unwrap_or(f64::NAN);
                }
            }
        }
        debug_assert!(am1 > 0.0);
        EntmaxHeadGrads { dq, dk, dv, dalpha }
    }

    /// Backward without tiles.
    pub fn backward(&self, tau: &[f64], d_out: &[f64]) -> EntmaxHeadGrads {
        self.backward_tiled(tau, d_out, 1, 1, false)
    }
}

/// The head (b, h) of a prefill call, widened to f64.
struct Gathered {
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    q_row0: usize,
    kv_off: usize,
}

fn gather<T: Element>(
    meta: &EntmaxPrefillMeta<'_>,
    b: usize,
    h: usize,
    q: &[T],
    k: &[T],
    v: &[T],
) -> Gathered {
    let (hq, d) = (meta.geom.num_q_heads(), meta.geom.head_dim());
    let s = meta.segs.index(b, meta.geom.kv_head(h));
    let rows = meta.q_rows.range(b);
    let q: Vec<f64> = rows
        .clone()
        .flat_map(|r| q[(r * hq + h) * d..][..d].iter().map(|x| x.to_f64()))
        .collect();
    let kv = meta.segs.rows_of(s);
    let wide = |x: &[T]| {
        x[kv.start * d..kv.end * d]
            .iter()
            .map(|x| x.to_f64())
            .collect::<Vec<_>>()
    };
    Gathered {
        q,
        k: wide(k),
        v: wide(v),
        q_row0: rows.start,
        kv_off: kv.start,
    }
}

impl EntmaxOps for Reference {
    fn entmax_prefill<T: Element>(
        &self,
        meta: &EntmaxPrefillMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
        tau: &mut Vec<f32>,
    ) -> Result<BlockStats> {
        let (hq, d) = (meta.geom.num_q_heads(), meta.geom.head_dim());
        let mut stats = BlockStats::default();
        for b in 0..meta.segs.batch() {
            for h in 0..hq {
                let g = gather(meta, b, h, q, k, v);
                let head = EntmaxHead {
                    q: &g.q,
                    k: &g.k,
                    v: &g.v,
                    d,
                    causal: meta.causal,
                    scale: f64::from(meta.scale),
                    alpha: f64::from(meta.alphas[h]),
                };
                let (o, t, st) = head.forward_tiled(meta.block_q, meta.block_k, meta.skip_blocks);
                stats.live_tiles += st.live_tiles;
                stats.visible_tiles += st.visible_tiles;
                for (i, ti) in t.iter().enumerate() {
                    let r = g.q_row0 + i;
                    tau[r * hq + h] = *ti as f32;
                    for c in 0..d {
                        out[(r * hq + h) * d + c] = T::from_f64(o[i * d + c]);
                    }
                }
            }
        }
        Ok(stats)
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
        let (hq, d) = (meta.geom.num_q_heads(), meta.geom.head_dim());
        let mut dk64 = vec![0.0f64; dk.len()];
        let mut dv64 = vec![0.0f64; dv.len()];
        let mut da64 = vec![0.0f64; hq];
        for b in 0..meta.segs.batch() {
            for h in 0..hq {
                let g = gather(meta, b, h, q, k, v);
                let head = EntmaxHead {
                    q: &g.q,
                    k: &g.k,
                    v: &g.v,
                    d,
                    causal: meta.causal,
                    scale: f64::from(meta.scale),
                    alpha: f64::from(meta.alphas[h]),
                };
                let rows = meta.q_rows.range(b);
                let t: Vec<f64> = rows.clone().map(|r| f64::from(tau[r * hq + h])).collect();
                let dout: Vec<f64> = rows
                    .clone()
                    .flat_map(|r| d_out[(r * hq + h) * d..][..d].iter().map(|x| x.to_f64()))
                    .collect();
                let gr =
                    head.backward_tiled(&t, &dout, meta.block_q, meta.block_k, meta.skip_blocks);
                for (i, r) in rows.enumerate() {
                    for c in 0..d {
                        dq[(r * hq + h) * d + c] = gr.dq[i * d + c] as f32;
                    }
                }
                for (j, (a, bv)) in gr.dk.chunks(d).zip(gr.dv.chunks(d)).enumerate() {
                    for c in 0..d {
                        dk64[(g.kv_off + j) * d + c] += a[c];
                        dv64[(g.kv_off + j) * d + c] += bv[c];
                    }
                }
                da64[h] += gr.dalpha;
            }
        }
        for (o, x) in dk.iter_mut().zip(dk64) {
            *o = x as f32;
        }
        for (o, x) in dv.iter_mut().zip(dv64) {
            *o = x as f32;
        }
        for (o, x) in dalpha.iter_mut().zip(da64) {
            *o = x as f32;
        }
        Ok(())
    }
}
