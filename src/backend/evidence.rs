//! Attention evidence: what an attention call can write beside its output,
//! so that policies never recompute Q·K or a softmax over the cache.
//!
//! Every evidence buffer is `f32` and *packed by block*: one block per
//! (sequence `b`, query head `h`) at index `b · Hq + h` ([`Heads::PerHead`])
//! or per (sequence `b`, KV head `g`) at index `b · Hkv + g` (a group
//! reduction), each block `rows × len(b, g)` row-major, where `len(b, g)`
//! is the length of KV segment `(b, g)` and `rows` depends on the output
//! (1 for decode weights, logits and prefill column sums; the window's query
//! count for window rows). Per query head this is exactly the layout of
//! `qk_logits`. [`evidence_blocks`] gives the partition.
//!
//! Weights are those of the call's normaliser (softmax or α-entmax) over
//! the tokens the call attends; a token the restriction (index list, mask,
//! causality) excludes has weight exactly 0 and logit `-inf`.
//!
//! | output | call | block rows | entry `(r, j)` |
//! |---|---|---|---|
//! | [`DecodeEvidence::probs`] | decode | 1 | `reduce_h p_{b,h,j}` |
//! | [`DecodeEvidence::logits`] | decode | 1 (per query head) | `z_{b,h,j} = scale · q · k_j` |
//! | [`DecodeEvidence::stats`] | decode | `[batch, Hq]` | softmax: `ln Σ_j e^{z_j}` over attended tokens (`-inf` when none); entmax: τ with `p_j = [(α−1) z_j − τ]_+^{1/(α−1)}` |
//! | [`DecodeEvidence::output`] | decode | `[batch, Hq, D]` | the attention output in f32, before rounding to the storage dtype (backends without a kernel for it round-trip the stored output) |
//! | [`PrefillEvidence::col_sums`] | prefill | 1 | `reduce_h Σ_i p_{b,h,i,j}` over the chunk's queries `i` |
//! | [`PrefillEvidence::window`] (summed) | prefill | 1 | `reduce_h Σ_{i ∈ last W} p_{b,h,i,j}` |
//! | [`PrefillEvidence::window`] (rows) | prefill | `min(W, n_q(b))` | `reduce_h p_{b,h,i,j}`, `i` = the r-th of the last queries, oldest first |
//!
//! `reduce_h` runs over the `G` query heads of KV head `g`: sum, mean (sum
//! / G) or max ([`Heads`]). For the summed outputs (column sums, summed
//! window) the reduction applies to the per-head sums: `Max` gives
//! `max_h Σ_i p_{h,i,j}` (ask for window rows to get `Σ_i max_h`).

use super::Backend;
use crate::error::{Result, shape};
use crate::layout::{HeadGeometry, Ragged, Segments};

/// How an evidence output treats the query heads of a GQA group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Heads {
    /// One block per query head.
    PerHead,
    /// Sum over the group (one block per KV head).
    Sum,
    /// Mean over the group.
    Mean,
    /// Maximum over the group.
    Max,
}

impl Heads {
    /// Number of blocks per sequence.
    pub fn blocks_per_seq(self, geom: &HeadGeometry) -> usize {
        match self {
            Heads::PerHead => geom.num_q_heads(),
            _ => geom.num_kv_heads(),
        }
    }
    /// Folds one head's value into a group accumulator (`first`: the
    /// group's first head). Mean divides at the end ([`Heads::finish`]).
    #[inline]
    pub(crate) fn fold(self, acc: f64, x: f64, first: bool) -> f64 {
        match self {
            _ if first => x,
            Heads::Max => acc.max(x),
            _ => acc + x,
        }
    }
    /// Finishes a group accumulator of `g` heads.
    #[inline]
    pub(crate) fn finish(self, acc: f64, g: usize) -> f64 {
        match self {
            Heads::Mean => acc / g as f64,
            _ => acc,
        }
    }
}

/// Which of a prefill chunk's last queries the window evidence covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    /// `W`: the last `min(W, n_q(b))` queries of each sequence (`W ≥ 1`).
    pub queries: usize,
    /// Group treatment.
    pub heads: Heads,
    /// `true`: one row per window query; `false`: summed over the window.
    pub rows: bool,
}

impl Window {
    /// Rows of a block of sequence `b` with `n_q` queries in the chunk.
    pub fn rows_for(&self, n_q: usize) -> usize {
        if self.rows { self.queries.min(n_q) } else { 1 }
    }
}

/// Evidence a decode call writes (every field optional).
pub struct DecodeEvidence<'e, B: Backend> {
    /// Attention weights of each sequence's query (1 row per block).
    pub probs: Option<(Heads, &'e mut B::Buffer<f32>)>,
    /// Scaled logits per query head (1 row per block; `-inf` where not attended).
    pub logits: Option<&'e mut B::Buffer<f32>>,
    /// Normaliser statistic per (sequence, query head), `[batch, Hq]`.
    pub stats: Option<&'e mut B::Buffer<f32>>,
    /// The output in f32, `[batch, Hq, D]`.
    pub output: Option<&'e mut B::Buffer<f32>>,
}

impl<B: Backend> Default for DecodeEvidence<'_, B> {
    fn default() -> Self {
        Self {
            probs: None,
            logits: None,
            stats: None,
            output: None,
        }
    }
}

impl<B: Backend> DecodeEvidence<'_, B> {
    /// No output requested.
    pub fn is_empty(&self) -> bool {
        self.probs.is_none()
            && self.logits.is_none()
            && self.stats.is_none()
            && self.output.is_none()
    }
}

/// Evidence a prefill call writes (every field optional).
pub struct PrefillEvidence<'e, B: Backend> {
    /// Column sums of the chunk's attention weights (1 row per block; the
    /// reduction applies to the per-head sums).
    pub col_sums: Option<(Heads, &'e mut B::Buffer<f32>)>,
    /// Weights of the chunk's last queries.
    pub window: Option<(Window, &'e mut B::Buffer<f32>)>,
}

impl<B: Backend> Default for PrefillEvidence<'_, B> {
    fn default() -> Self {
        Self {
            col_sums: None,
            window: None,
        }
    }
}

impl<B: Backend> PrefillEvidence<'_, B> {
    /// No output requested.
    pub fn is_empty(&self) -> bool {
        self.col_sums.is_none() && self.window.is_none()
    }
}

/// The block partition of an evidence buffer: block `(b, i)` (`i` a query
/// head for [`Heads::PerHead`], else a KV head) holds `rows[b] × len(b, g)`
/// entries. `rows` has one entry per sequence.
pub fn evidence_blocks(
    geom: &HeadGeometry,
    segs: &Segments,
    heads: Heads,
    rows: &[usize],
) -> Result<Ragged> {
    const OP: &str = "evidence_blocks";
    if rows.len() != segs.batch() {
        return Err(shape(
            OP,
            format!("{} row counts for {} sequences", rows.len(), segs.batch()),
        ));
    }
    let per = heads.blocks_per_seq(geom);
    let mut lens = Vec::with_capacity(segs.batch() * per);
    for (b, &r) in rows.iter().enumerate() {
        for i in 0..per {
            let g = match heads {
                Heads::PerHead => geom.kv_head(i),
                _ => i,
            };
            let n = r
                .checked_mul(segs.len_of(segs.index(b, g)))
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| shape(OP, "an evidence block overflows u32"))?;
            lens.push(n);
        }
    }
    Ragged::from_lens(&lens)
}

/// Host-side group reduction of per-query-head rows: `per_head[h]` is the
/// row of query head `h` of one sequence (each as long as its segment);
/// writes the blocks of that sequence in the layout of `heads` to `dst`
/// (`heads` blocks, concatenated). Used by the reference and by host
/// fallbacks.
pub(crate) fn reduce_heads_into(
    geom: &HeadGeometry,
    heads: Heads,
    per_head: &[Vec<f64>],
    dst: &mut [f32],
) {
    let g = geom.group();
    let mut at = 0;
    match heads {
        Heads::PerHead => {
            for row in per_head {
                for (d, &x) in dst[at..at + row.len()].iter_mut().zip(row) {
                    *d = x as f32;
                }
                at += row.len();
            }
        }
        _ => {
            for kv in 0..geom.num_kv_heads() {
                let group = &per_head[kv * g..(kv + 1) * g];
                let n = group.first().map_or(0, |r| r.len());
                for j in 0..n {
                    let mut acc = 0.0;
                    for (i, row) in group.iter().enumerate() {
                        acc = heads.fold(acc, row[j], i == 0);
                    }
                    dst[at + j] = heads.finish(acc, g) as f32;
                }
                at += n;
            }
        }
    }
}

/// Host-side evidence for backends without a fused evidence kernel: one
/// extra Q·K pass on the device (`qk_logits`), then the weights are
/// normalised on the host (f64, the reference's normalisers) and uploaded.
/// Costs one more read of the keys and O(rows) host work per query.
#[cfg(feature = "cuda")]
pub(crate) mod fallback {
    use super::*;
    use crate::backend::{
        CacheOps, DecodeMeta, GatherMeta, Normalizer, PrefillMeta, QkMeta, Restrict, ScoreOps,
    };
    use crate::dtype::Element;
    use crate::reference::normalize;

    /// The normaliser statistic of one row (see the module table).
    fn row_stat(z: &[f64], w: &[f64], alpha: Option<f32>) -> f64 {
        let Some(top) = (0..z.len())
            .filter(|&j| z[j] > f64::NEG_INFINITY)
            .max_by(|&a, &b| z[a].total_cmp(&z[b]).then(b.cmp(&a)))
        else {
            return f64::NEG_INFINITY;
        };
        match alpha {
            None => {
                let m = z[top];
                m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
            }
            Some(a) => {
                let am1 = f64::from(a) - 1.0;
                am1 * z[top] - w[top].powf(am1)
            }
        }
    }

    /// Logits of `q_rows` queries over `segs` (causal as given), downloaded.
    #[allow(clippy::too_many_arguments)]
    fn logits<B: ScoreOps, T: Element>(
        b: &B,
        geom: &HeadGeometry,
        q_rows: &Ragged,
        segs: &Segments,
        causal: bool,
        scale: f32,
        q: &B::Buffer<T>,
        k: &B::Buffer<T>,
    ) -> Result<(Vec<f32>, Ragged)> {
        let hq = geom.num_q_heads();
        let mut block_lens = Vec::with_capacity(segs.batch() * hq);
        let mut row_lens = Vec::new();
        for bi in 0..segs.batch() {
            let nq = q_rows.len_of(bi);
            for h in 0..hq {
                let kv = segs.len_of(segs.index(bi, geom.kv_head(h)));
                block_lens.push((nq * kv) as u32);
                row_lens.extend(std::iter::repeat_n(kv as u32, nq));
            }
        }
        let meta = QkMeta {
            geom: *geom,
            q_rows: q_rows.clone(),
            segs: segs.clone(),
            causal,
            scale,
            blocks: Ragged::from_lens(&block_lens)?,
            logit_rows: Ragged::from_lens(&row_lens)?,
        };
        let mut out = b.zeros::<f32>(meta.blocks.total())?;
        b.qk_logits(&meta, q, k, &mut out)?;
        Ok((b.download(&out)?, meta.blocks))
    }

    fn alpha(norm: &Normalizer, h: usize) -> Option<f32> {
        norm.alpha(h)
    }

    /// Decode evidence (see [`DecodeEvidence`]).
    pub(crate) fn decode<B: ScoreOps, T: Element>(
        b: &B,
        meta: &DecodeMeta<'_>,
        q: &B::Buffer<T>,
        k: &B::Buffer<T>,
        out: &B::Buffer<T>,
        ev: &mut DecodeEvidence<'_, B>,
    ) -> Result<()> {
        if ev.is_empty() {
            return Ok(());
        }
        if let Some(buf) = ev.output.as_deref_mut() {
            // The stored output, widened (its storage rounding included).
            let mut o: Vec<f32> = b.download(out)?.iter().map(|x| x.to_f32()).collect();
            o.resize(b.buffer_len(buf), 0.0);
            *buf = b.upload(&o)?;
        }
        if ev.probs.is_none() && ev.logits.is_none() && ev.stats.is_none() {
            return Ok(());
        }
        let (geom, segs) = (&meta.geom, meta.segs);
        let hq = geom.num_q_heads();
        let ones = vec![1; segs.batch()];
        let (z_all, blocks) = logits(
            b,
            geom,
            &Ragged::uniform(segs.batch(), 1)?,
            segs,
            false,
            meta.scale,
            q,
            k,
        )?;
        let probs_blocks = match &ev.probs {
            Some((heads, _)) => Some(evidence_blocks(geom, segs, *heads, &ones)?),
            None => None,
        };
        let mut probs_host = probs_blocks.as_ref().map(|r| vec![0.0f32; r.total()]);
        let mut logits_host = ev.logits.as_ref().map(|_| vec![0.0f32; blocks.total()]);
        let mut stats_host = vec![0.0f32; segs.batch() * hq];
        for bi in 0..segs.batch() {
            let mut ps = Vec::with_capacity(hq);
            let mut zs = Vec::with_capacity(hq);
            for h in 0..hq {
                let s = segs.index(bi, geom.kv_head(h));
                let len = segs.len_of(s);
                let raw = &z_all[blocks.range(bi * hq + h)];
                let mut z: Vec<f64> = vec![f64::NEG_INFINITY; len];
                let mut allow = |j: usize| z[j] = f64::from(raw[j]);
                match meta.restrict {
                    Restrict::Dense => (0..len).for_each(&mut allow),
                    Restrict::Indices(list) => list
                        .list(list.scope().list_of(bi, h, geom))
                        .iter()
                        .for_each(|&j| allow(j as usize)),
                    Restrict::Mask(mask) => {
                        let m = mask.scope().list_of(bi, h, geom);
                        (0..len).filter(|&j| mask.get(m, 0, j)).for_each(&mut allow);
                    }
                }
                let a = alpha(meta.normalizer, h);
                let w = normalize(&z, a);
                stats_host[bi * hq + h] = row_stat(&z, &w, a) as f32;
                ps.push(w);
                zs.push(z);
            }
            if let (Some(host), Some(pb), Some((heads, _))) =
                (probs_host.as_mut(), &probs_blocks, &ev.probs)
            {
                let first = bi * heads.blocks_per_seq(geom);
                let (lo, hi) = (
                    pb.range(first).start,
                    pb.range(first + heads.blocks_per_seq(geom) - 1).end,
                );
                reduce_heads_into(geom, *heads, &ps, &mut host[lo..hi]);
            }
            if let Some(host) = logits_host.as_mut() {
                let (lo, hi) = (
                    blocks.range(bi * hq).start,
                    blocks.range(bi * hq + hq - 1).end,
                );
                reduce_heads_into(geom, Heads::PerHead, &zs, &mut host[lo..hi]);
            }
        }
        // Buffers may be longer than their layout: keep their length.
        if let (Some((_, buf)), Some(mut host)) = (ev.probs.as_mut(), probs_host) {
            host.resize(b.buffer_len(*buf), 0.0);
            **buf = b.upload(&host)?;
        }
        if let (Some(buf), Some(mut host)) = (ev.logits.as_deref_mut(), logits_host) {
            host.resize(b.buffer_len(buf), 0.0);
            *buf = b.upload(&host)?;
        }
        if let Some(buf) = ev.stats.as_deref_mut() {
            stats_host.resize(b.buffer_len(buf), 0.0);
            *buf = b.upload(&stats_host)?;
        }
        Ok(())
    }

    /// Query rows per fallback prefill tile (bounds the logits held at once).
    const TILE: usize = 64;

    /// Prefill evidence (see [`PrefillEvidence`]), one sequence and one
    /// tile of queries at a time.
    pub(crate) fn prefill<B: ScoreOps + CacheOps, T: Element>(
        b: &B,
        meta: &PrefillMeta<'_>,
        q: &B::Buffer<T>,
        k: &B::Buffer<T>,
        ev: &mut PrefillEvidence<'_, B>,
    ) -> Result<()> {
        if ev.is_empty() {
            return Ok(());
        }
        let (geom, segs) = (&meta.geom, meta.segs);
        let (hq, hkv, d) = (geom.num_q_heads(), geom.num_kv_heads(), geom.head_dim());
        let batch = segs.batch();
        let ones = vec![1; batch];
        let per_head = evidence_blocks(geom, segs, Heads::PerHead, &ones)?;
        let mut col = vec![0.0f64; per_head.total()];
        let win = ev.window.as_ref().map(|(w, _)| *w);
        let win_rows: Vec<usize> = meta
            .q_rows
            .lens()
            .map(|n| win.map_or(0, |w| w.rows_for(n)))
            .collect();
        let win_blocks = evidence_blocks(geom, segs, Heads::PerHead, &win_rows)?;
        let mut wacc = vec![0.0f64; win_blocks.total()];
        for bi in 0..batch {
            let nq = meta.q_rows.len_of(bi);
            let offsets: Vec<u32> = (0..hkv)
                .map(|g| segs.offset(segs.index(bi, g)) as u32)
                .collect();
            let lens: Vec<usize> = (0..hkv).map(|g| segs.len_of(segs.index(bi, g))).collect();
            let mut i0 = 0;
            while i0 < nq {
                let n = TILE.min(nq - i0);
                // The tile's queries sit at the end of segments truncated
                // after its last query (bottom-right alignment).
                let tl: Vec<u32> = lens
                    .iter()
                    .map(|&kv| {
                        if meta.causal {
                            (kv + i0 + n).saturating_sub(nq) as u32
                        } else {
                            kv as u32
                        }
                    })
                    .collect();
                let tsegs = Segments::new(1, hkv, offsets.clone(), tl.clone())?;
                let rows: Vec<u32> = (0..n)
                    .map(|i| (meta.q_rows.range(bi).start + i0 + i) as u32)
                    .collect();
                let mut qt = b.zeros::<T>(n * hq * d)?;
                b.gather_rows(
                    &GatherMeta {
                        width: hq * d,
                        indices: rows,
                    },
                    q,
                    &mut qt,
                )?;
                let causal = meta.causal && tl.iter().all(|&l| l as usize >= n);
                let (z_all, blocks) = logits(
                    b,
                    geom,
                    &Ragged::uniform(1, n)?,
                    &tsegs,
                    causal,
                    meta.scale,
                    &qt,
                    k,
                )?;
                for h in 0..hq {
                    let g = geom.kv_head(h);
                    let kvt = tl[g] as usize;
                    let blk = &z_all[blocks.range(h)];
                    let mask_list = meta.mask.map(|m| m.scope().list_of(bi, h, geom));
                    for i in 0..n {
                        let qi = i0 + i;
                        let mut z: Vec<f64> = blk[i * kvt..(i + 1) * kvt]
                            .iter()
                            .map(|&x| f64::from(x))
                            .collect();
                        if meta.causal && !causal {
                            // A tile longer than its truncated segment.
                            let vis = (lens[g] + qi + 1).saturating_sub(nq).min(kvt);
                            z[vis..].fill(f64::NEG_INFINITY);
                        }
                        if let (Some(m), Some(li)) = (meta.mask, mask_list) {
                            for (j, x) in z.iter_mut().enumerate() {
                                if !m.get(li, qi, j) {
                                    *x = f64::NEG_INFINITY;
                                }
                            }
                        }
                        let w = normalize(&z, alpha(meta.normalizer, h));
                        let at = per_head.range(bi * hq + h).start;
                        for (c, &x) in col[at..at + kvt].iter_mut().zip(&w) {
                            *c += x;
                        }
                        if let Some(wd) = win
                            && qi + wd.queries >= nq
                        {
                            let r = if wd.rows {
                                qi + wd.queries.min(nq) - nq
                            } else {
                                0
                            };
                            let at = win_blocks.range(bi * hq + h).start + r * lens[g];
                            for (c, &x) in wacc[at..at + kvt].iter_mut().zip(&w) {
                                *c += x;
                            }
                        }
                    }
                }
                i0 += n;
            }
        }
        let finish = |src: &[f64], src_blocks: &Ragged, heads: Heads, rows: &[usize]| {
            let dst_blocks = evidence_blocks(geom, segs, heads, rows)?;
            let mut host = vec![0.0f32; dst_blocks.total()];
            for bi in 0..batch {
                let per: Vec<Vec<f64>> = (0..hq)
                    .map(|h| src[src_blocks.range(bi * hq + h)].to_vec())
                    .collect();
                let first = bi * heads.blocks_per_seq(geom);
                let lo = dst_blocks.range(first).start;
                let hi = dst_blocks.range(first + heads.blocks_per_seq(geom) - 1).end;
                reduce_heads_into(geom, heads, &per, &mut host[lo..hi]);
            }
            Ok::<_, crate::error::Error>(host)
        };
        if let Some((heads, buf)) = ev.col_sums.as_mut() {
            let mut host = finish(&col, &per_head, *heads, &ones)?;
            host.resize(b.buffer_len(*buf), 0.0);
            **buf = b.upload(&host)?;
        }
        if let Some((w, buf)) = ev.window.as_mut() {
            let mut host = finish(&wacc, &win_blocks, w.heads, &win_rows)?;
            host.resize(b.buffer_len(*buf), 0.0);
            **buf = b.upload(&host)?;
        }
        Ok(())
    }
}
