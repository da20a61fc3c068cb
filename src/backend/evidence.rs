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
/// (`heads` blocks, concatenated). Used by the reference.
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
