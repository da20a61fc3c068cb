//! Attention: split-K decode over a ragged cache, and tiled prefill.
//!
//! # Decode
//!
//! A *unit* is one (sequence, KV head) with the `G` query heads of its group
//! — or one (sequence, query head) when the restriction has
//! `Scope::QueryHead` (each head then has its own token set). A unit's token
//! stream (every position, the listed positions, or the masked-in positions)
//! is cut into fixed key blocks of [`DECODE_BLOCK`] stream entries (mask:
//! positions). Blocks of all units are processed in parallel:
//!
//! 1. scores `[gh, nb]` of the unit's pre-scaled f32 queries against the
//!    block's K rows, each K row read once for all heads
//!    ([`simd::scores_rows_strided`] / [`simd::scores_gather`] for lists and
//!    masks: rows are gathered, never copied);
//! 2. softmax: per head `m = max`, `p = exp(s − m)`, `l = Σp`, and
//!    `acc = Σ (p_j / l) v_j` ([`simd::weighted_rows_strided`] /
//!    [`simd::weighted_gather`]);
//!    entmax with α ∈ [1.125, 2]: scores and per-head block maxima only, then
//!    τ per (unit, head) over all its blocks (Halley–bisection on
//!    [`simd::pow_relu_sum`]), then, again per block in parallel,
//!    `p = [s − τ]_+^{1/(α−1)}`, `l = Σp` and `acc = Σ (p_j / l) v_j`, where
//!    V rows whose weight is zero for every head are never read; heads with
//!    other α take the f64 path (`exact.rs`: f64 logits, τ and weights, f64
//!    value sum) per (unit, head) in step 3;
//! 3. per unit, blocks are combined in block order with the weights
//!    `w_b = e^{m_b − M} l_b` (softmax) or `w_b = l_b` (entmax):
//!    `out = Σ_b (w_b / Σ_c w_c) acc_b`.
//!
//! Each `acc_b` and the combination are convex combinations of V rows, so the
//! value sums cannot overflow where the reference's output is finite
//! (`v = [3e38, 3e38]` gives `3e38`). Logits can: `q · k` of finite f32
//! inputs reaches `inf` (or NaN, `inf − inf`) past 3.4e38. A block whose
//! scores are not all finite marks its unit (block maximum = NaN), and every
//! head of the unit takes the f64 path: finite inputs give the reference's
//! finite answer, NaN inputs its NaN.
//!
//! Block boundaries depend only on the shapes, so the result is bitwise the
//! same for any number of threads. Selecting every token (list or mask)
//! gives bitwise the dense result.
//!
//! **Paged KV** (`decode_attention_paged`, [`crate::paged`]): the same
//! plan over the page table's segments, blocks cut by stream position as
//! above; only the row of a token changes, `PageTable::row(s, t)` instead of
//! `offset(s) + t`, and the cache is never copied. Each block's physical
//! rows are computed into the workspace and read with the gather kernels
//! ([`simd::scores_gather_runs`] / [`simd::weighted_gather_runs`] for
//! consecutive tokens, prefetching 8 KiB ahead; [`simd::scores_gather`] /
//! [`simd::weighted_gather`] for listed tokens), whose prefetch runs ahead
//! in token order and so crosses page boundaries, which the hardware
//! prefetcher does not follow (reading HND pages run by run with the
//! contiguous kernels instead measured 0.4–0.6x the contiguous throughput
//! at P = 16–64, shuffled pages, f16). The blocks are visited
//! block-major (block `b` of every unit, then block `b + 1`; `Slots`), so
//! the KV heads of a sequence read neighbouring slots of the same pages one
//! after the other instead of each sweeping the whole pool. Every dot and
//! every value chain (`acc = fma(p_j, v_j, acc)` in token order) is the one
//! the contiguous call computes, and blocks combine in the same order, so
//! the paged result and its evidence are bitwise the contiguous result on
//! the gathered rows.
//!
//! Layout of one block in the workspace (`f32`, stride `SB`):
//! `[nb, m_0..m_G, l_0..l_G | scores [G, BK] | raw [G, BK] | acc [G, D]]`,
//! where `raw` (the scores before normalisation) is present only when the
//! call asks for logits evidence.
//!
//! # Prefill
//!
//! Work items are tiles of [`PREFILL_TILE_Q`] query rows of one sequence
//! (all heads, so each item owns a contiguous block of `out`). Per KV head
//! group the item scores its `G · rows` queries against the visible key
//! strip (causal: keys up to the tile's last position), masks with `-inf`,
//! normalises each row in place (softmax or entmax with f32 τ) and
//! accumulates `P·V` with [`simd::weighted_rows_strided`] (zero-weight V
//! rows are skipped). Rows are normalised before `P·V`, so the value sum is
//! a convex combination. Rows of heads whose α needs it, and every row of a
//! strip whose f32 scores are not all finite (overflow of `q · k`), get their
//! weights from the f64 path (`exact.rs`) instead.
#![forbid(unsafe_code)]

use rayon::prelude::*;

use super::Cpu;
use super::exact::{dot64, needs_f64, weights64};
use super::isa::Isa;
use super::norm::{Cand, chunked_apply, chunked_sums, entmax_row_inplace, softmax_row_inplace};
use super::simd::{self, PowMode};
use super::tau::{f32_search, solve_tau};
use super::workspace::{DecodeWs, grow};
use crate::backend::{
    AttnOps, DecodeEvidence, DecodeMeta, Heads, Normalizer, PagedDecodeMeta, PrefillEvidence,
    PrefillMeta, Restrict,
};
use crate::backend::{Window, evidence_blocks};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{Ragged, Scope};
use crate::paged::{PageTable, SegmentPages};

/// Tokens per decode key block (fixed: the split-K boundaries).
pub const DECODE_BLOCK: usize = 512;
const BK: usize = DECODE_BLOCK;

/// Query rows per prefill work item.
pub const PREFILL_TILE_Q: usize = 16;

/// Where a unit's tokens come from.
#[derive(Clone, Copy)]
enum Src<'a> {
    Dense,
    List(&'a [u32]),
    Mask(&'a [u32]),
}

/// Where a unit's K/V rows live.
#[derive(Clone, Copy)]
enum Addr<'a> {
    /// Token `t` is row `off + t` (a contiguous segment).
    Contig(usize),
    /// Token `t` is row `pages.row(t)` (paged KV).
    Paged(SegmentPages<'a>),
}

/// One decode unit.
#[derive(Clone, Copy)]
struct Unit<'a> {
    /// First query head (within the sequence).
    h0: usize,
    /// Rows of the segment's tokens.
    addr: Addr<'a>,
    len: usize,
    src: Src<'a>,
}

impl Unit<'_> {
    /// The K/V row of token `t`.
    #[inline]
    fn row(&self, t: usize) -> usize {
        match self.addr {
            Addr::Contig(off) => off + t,
            Addr::Paged(pg) => pg.row(t),
        }
    }

    /// Length of the token stream the blocks cut (positions for masks).
    fn stream_len(&self) -> usize {
        match self.src {
            Src::List(l) => l.len(),
            Src::Dense | Src::Mask(_) => self.len,
        }
    }
}

/// The static shape of a decode call.
struct Plan<'m, 'a> {
    meta: &'m DecodeMeta<'a>,
    /// Paged KV: the page table (`None`: contiguous segments).
    pages: Option<&'a PageTable>,
    per_head: bool,
    /// Keep a copy of the raw scores per block (logits evidence).
    raw: bool,
    /// Group size (max heads per unit) and head dim.
    g: usize,
    d: usize,
    units: usize,
}

impl<'m, 'a> Plan<'m, 'a> {
    fn new(meta: &'m DecodeMeta<'a>, pages: Option<&'a PageTable>, raw: bool) -> Self {
        let per_head = match meta.restrict {
            Restrict::Indices(l) => l.scope() == Scope::QueryHead,
            Restrict::Mask(m) => m.scope() == Scope::QueryHead,
            Restrict::Dense => false,
        };
        let geom = &meta.geom;
        let batch = meta.segs.batch();
        Self {
            meta,
            pages,
            per_head,
            raw,
            g: geom.group(),
            d: geom.head_dim(),
            units: if per_head {
                batch * geom.num_q_heads()
            } else {
                batch * geom.num_kv_heads()
            },
        }
    }

    /// Heads per unit.
    fn gh(&self) -> usize {
        if self.per_head { 1 } else { self.g }
    }

    /// Workspace stride of one block.
    fn stride(&self) -> usize {
        1 + 2 * self.g + self.g * BK * (1 + usize::from(self.raw)) + self.g * self.d
    }

    /// The unit and head-in-unit of query head `hh` of segment `(b, g)`.
    fn unit_of_head(&self, b: usize, g: usize, hh: usize) -> (usize, usize) {
        let geom = &self.meta.geom;
        if self.per_head {
            (b * geom.num_q_heads() + g * self.g + hh, 0)
        } else {
            (b * geom.num_kv_heads() + g, hh)
        }
    }

    fn unit(&self, u: usize) -> Unit<'a> {
        let (geom, segs) = (&self.meta.geom, self.meta.segs);
        let (b, h0) = if self.per_head {
            (u / geom.num_q_heads(), u % geom.num_q_heads())
        } else {
            (u / geom.num_kv_heads(), (u % geom.num_kv_heads()) * self.g)
        };
        let s = segs.index(b, geom.kv_head(h0));
        let src = match self.meta.restrict {
            Restrict::Dense => Src::Dense,
            Restrict::Indices(l) => Src::List(l.list(l.scope().list_of(b, h0, geom))),
            Restrict::Mask(m) => Src::Mask(m.words_of(m.scope().list_of(b, h0, geom))),
        };
        Unit {
            h0,
            addr: match self.pages {
                None => Addr::Contig(segs.offset(s)),
                Some(p) => Addr::Paged(p.segment(s)),
            },
            len: segs.len_of(s),
            src,
        }
    }

    /// α of head `h0 + i` (`None`: softmax).
    fn alpha(&self, h: usize) -> Option<f32> {
        self.meta.normalizer.alpha(h)
    }
}

/// The rows of one block: contiguous positions or gathered ones.
enum Rows<'x> {
    Contig(usize, usize),
    Gather(&'x [u32]),
}

/// Token rows of block `blk` of `unit`; mask positions are written to `idx`.
fn block_rows<'x>(unit: &Unit<'x>, blk: usize, idx: &'x mut [u32]) -> Rows<'x> {
    let start = blk * BK;
    let end = (start + BK).min(unit.stream_len());
    match unit.src {
        Src::Dense => Rows::Contig(start, end - start),
        Src::List(l) => {
            let l = &l[start..end];
            match (l.first(), l.last()) {
                (Some(&a), Some(&z)) if (z - a) as usize + 1 == l.len() => {
                    Rows::Contig(a as usize, l.len())
                }
                _ => Rows::Gather(l),
            }
        }
        Src::Mask(words) => {
            let mut n = 0;
            let w0 = start / 32;
            for (w, &word) in words[w0..end.div_ceil(32)].iter().enumerate() {
                let w = w0 + w;
                let mut bits = word;
                while bits != 0 {
                    let t = w * 32 + bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    if t < end {
                        idx[n] = t as u32;
                        n += 1;
                    }
                }
            }
            if n == end - start {
                Rows::Contig(start, n)
            } else {
                Rows::Gather(&idx[..n])
            }
        }
    }
}

fn rows_len(r: &Rows<'_>) -> usize {
    match r {
        Rows::Contig(_, n) => *n,
        Rows::Gather(l) => l.len(),
    }
}

/// The physical rows of a block's tokens through its pages, in `prow`
/// (the gather path of paged KV); returns how many.
fn paged_rows(pg: &SegmentPages<'_>, rows: &Rows<'_>, prow: &mut [u32]) -> usize {
    match rows {
        Rows::Contig(a, n) => {
            let stride = pg.stride();
            let mut at = 0;
            for run in pg.runs(*a..a + n) {
                for (i, r) in prow[at..at + run.len].iter_mut().enumerate() {
                    *r = (run.row + i * stride) as u32;
                }
                at += run.len;
            }
            at
        }
        Rows::Gather(l) => {
            for (r, &t) in prow.iter_mut().zip(l.iter()) {
                *r = pg.row(t as usize) as u32;
            }
            l.len()
        }
    }
}

/// Scores `[gh, BK]` (stride BK) of the block's rows. Paged KV goes
/// through the block's physical rows, computed into `prow`, and the gather
/// kernels, whose prefetch runs ahead across page boundaries (consecutive
/// tokens: the page-run distance of [`simd::scores_gather_runs`]; listed
/// tokens: the scattered-row distance, as for a contiguous cache). Every path
/// computes each dot in the same order, so paged and contiguous KV give
/// bitwise the same scores.
#[allow(clippy::too_many_arguments)]
fn block_scores<T: Element>(
    isa: Isa,
    qs: &[f32],
    gh: usize,
    k: &[T],
    d: usize,
    unit: &Unit<'_>,
    rows: &Rows<'_>,
    prow: &mut [u32],
    sc: &mut [f32],
) {
    match (unit.addr, rows) {
        (Addr::Contig(off), Rows::Contig(a, n)) => {
            let r = &k[(off + a) * d..(off + a + n) * d];
            simd::scores_rows_strided(isa, qs, gh, r, d, 1.0, sc, BK);
        }
        (Addr::Contig(off), Rows::Gather(l)) => {
            simd::scores_gather(isa, qs, gh, k, d, off, l, 1.0, sc, BK)
        }
        (Addr::Paged(pg), Rows::Contig(..)) => {
            let n = paged_rows(&pg, rows, prow);
            simd::scores_gather_runs(isa, qs, gh, k, d, &prow[..n], 1.0, sc, BK)
        }
        (Addr::Paged(pg), Rows::Gather(_)) => {
            let n = paged_rows(&pg, rows, prow);
            simd::scores_gather(isa, qs, gh, k, d, 0, &prow[..n], 1.0, sc, BK)
        }
    }
}

/// `acc[gh, D] = Σ_j p[:, j] v_j` over the block's rows (zero rows skipped;
/// the paths of [`block_scores`], each the same chain of fused
/// multiply-adds in token order, so paged and contiguous agree bitwise).
#[allow(clippy::too_many_arguments)]
fn block_values<T: Element>(
    isa: Isa,
    p: &[f32],
    gh: usize,
    v: &[T],
    d: usize,
    unit: &Unit<'_>,
    rows: &Rows<'_>,
    prow: &mut [u32],
    acc: &mut [f32],
) {
    acc[..gh * d].fill(0.0);
    match (unit.addr, rows) {
        (Addr::Contig(off), Rows::Contig(a, n)) => {
            let r = &v[(off + a) * d..(off + a + n) * d];
            simd::weighted_rows_strided(isa, acc, gh, p, BK, r, d);
        }
        (Addr::Contig(off), Rows::Gather(l)) => {
            simd::weighted_gather(isa, acc, gh, p, BK, v, d, off, l)
        }
        (Addr::Paged(pg), Rows::Contig(..)) => {
            let n = paged_rows(&pg, rows, prow);
            simd::weighted_gather_runs(isa, acc, gh, p, BK, v, d, &prow[..n])
        }
        (Addr::Paged(pg), Rows::Gather(_)) => {
            let n = paged_rows(&pg, rows, prow);
            simd::weighted_gather(isa, acc, gh, p, BK, v, d, 0, &prow[..n])
        }
    }
}

/// Divides a block row of weights by their sum `l` before the value pass
/// (the block's `acc` is then a convex combination of V rows). Returns the
/// `l` the combine step uses: 0 (the block is dropped) when `l` is below the
/// smallest normal f32, whose reciprocal would overflow.
fn normalize_block(isa: Isa, row: &mut [f32], l: f32) -> f32 {
    if l >= f32::MIN_POSITIVE && l.is_finite() {
        simd::scale_f32(isa, row, 1.0 / l);
        l
    } else {
        row.fill(0.0);
        0.0
    }
}

/// Token of stream entry `t` of a unit (mask: the stream is every position).
fn stream_token(unit: &Unit<'_>, t: usize) -> usize {
    match unit.src {
        Src::Dense | Src::Mask(_) => t,
        Src::List(l) => l[t] as usize,
    }
}

/// f64 logits `scale · q·k` of head `i` of a decode unit over its stream, in
/// `z` (masked-out positions `-inf`): the f64 path (`exact.rs`).
fn head_logits64<T: Element>(
    plan: &Plan<'_, '_>,
    unit: &Unit<'_>,
    qv: &[T],
    k: &[T],
    z: &mut Vec<f64>,
) {
    let d = plan.d;
    let scale = f64::from(plan.meta.scale);
    let visible = |t: usize| match unit.src {
        Src::Mask(words) => (words[t / 32] >> (t % 32)) & 1 == 1,
        _ => true,
    };
    z.clear();
    z.extend((0..unit.stream_len()).map(|t| {
        if visible(t) {
            scale * dot64(qv, &k[unit.row(stream_token(unit, t)) * d..][..d])
        } else {
            f64::NEG_INFINITY
        }
    }));
}

/// Head `i` of a decode unit on the f64 path (`exact.rs`): for a head whose
/// α needs it, or every head of a unit whose f32 scores are not all finite.
/// f64 logits over the unit's tokens, the f64 normaliser, the value sum in
/// f64 (rows of zero weight are not read); `out` in the storage dtype, `comb`
/// the f32 row (the output evidence).
#[allow(clippy::too_many_arguments)]
fn decode_head_f64<T: Element>(
    plan: &Plan<'_, '_>,
    unit: &Unit<'_>,
    i: usize,
    qv: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    comb: &mut [f32],
    cand: &mut Cand,
) {
    let d = plan.d;
    head_logits64(plan, unit, qv, k, &mut cand.z);
    weights64(&mut cand.z, plan.alpha(unit.h0 + i), &mut cand.f64);
    let mut acc = [0.0f64; 16];
    for c0 in (0..d).step_by(16) {
        let w = (d - c0).min(16);
        acc[..w].fill(0.0);
        for (t, &p) in cand.z.iter().enumerate() {
            if p != 0.0 {
                let row = &v[unit.row(stream_token(unit, t)) * d + c0..][..w];
                for (a, x) in acc[..w].iter_mut().zip(row) {
                    *a += p * x.to_f64();
                }
            }
        }
        for ((o, c), &a) in out[c0..c0 + w]
            .iter_mut()
            .zip(&mut comb[c0..c0 + w])
            .zip(&acc[..w])
        {
            *o = T::from_f64(a);
            *c = a as f32;
        }
    }
}

/// Whether a unit's f32 scores overflowed in some block (block maximum NaN):
/// then every head of the unit takes the f64 path.
fn unit_overflows<'b>(mut bs: impl Iterator<Item = &'b [f32]>, gh: usize) -> bool {
    bs.any(|b| b[1..1 + gh].iter().any(|m| m.is_nan()))
}

/// Where the key blocks of a decode call are stored in the workspace.
///
/// Unit-major index `j = prefix[u] + b` names block `b` of unit `u`. For
/// contiguous KV a block is stored at slot `j` (each unit's blocks in a row:
/// a unit's K/V rows are one stream). For paged KV the slots are
/// block-major, ordered by `(b, u)`: the parallel passes then visit block
/// `b` of every KV head of a sequence one after the other, which read the
/// neighbouring slots of the same pages (HND: the next `P` rows of each
/// page; NHD: the next row of each token) while they are still in the
/// caches, instead of sweeping the whole pool once per KV head. Only the
/// visiting order changes: blocks and their combination order are the
/// same, so results are too.
#[derive(Clone, Copy)]
struct Slots<'w> {
    prefix: &'w [usize],
    /// Paged: the slot of each unit-major index, and its inverse.
    map: Option<(&'w [usize], &'w [usize])>,
}

impl<'w> Slots<'w> {
    /// The unit of unit-major index `j`.
    fn unit_of(&self, j: usize) -> usize {
        self.prefix.partition_point(|&p| p <= j) - 1
    }
    /// Unit-major index of the block stored at slot `i`.
    fn at(&self, i: usize) -> usize {
        self.map.map_or(i, |(_, at)| at[i])
    }
    /// Slot of unit-major index `j`.
    fn slot(&self, j: usize) -> usize {
        self.map.map_or(j, |(slot, _)| slot[j])
    }
    /// The stored blocks of unit `u` (stride `sb`), in block order.
    fn unit_blocks<'b>(
        &self,
        all: &'b [f32],
        sb: usize,
        u: usize,
    ) -> impl Iterator<Item = &'b [f32]> + Clone + use<'b, 'w> {
        let me = *self;
        (self.prefix[u]..self.prefix[u + 1]).map(move |j| &all[me.slot(j) * sb..][..sb])
    }
}

/// Combine weight of one block for head `h`: `e^{m_b − M} l_b` (softmax) or
/// `l_b` (entmax), where the block's weights were divided by `l_b`.
fn block_weight(blk: &[f32], g: usize, h: usize, big_m: f32, entmax: bool) -> f32 {
    let f = if entmax {
        1.0
    } else if blk[1 + h] == f32::NEG_INFINITY {
        0.0
    } else {
        (blk[1 + h] - big_m).exp()
    };
    f * blk[1 + g + h]
}

/// Splits one workspace block into (header, scores, raw scores, acc); the
/// raw area is empty unless the plan keeps it.
fn split_block(blk: &mut [f32], g: usize, raw: bool) -> Parts<'_> {
    let (hdr, rest) = blk.split_at_mut(1 + 2 * g);
    let (sc, rest) = rest.split_at_mut(g * BK);
    let (raw, acc) = rest.split_at_mut(if raw { g * BK } else { 0 });
    (hdr, sc, raw, acc)
}

/// A workspace block split into header, scores, raw scores and accumulators.
type Parts<'b> = (&'b mut [f32], &'b mut [f32], &'b mut [f32], &'b mut [f32]);

/// Read-only view of one workspace block's parts (as [`split_block`]).
fn block_parts(blk: &[f32], g: usize, raw: bool) -> (&[f32], &[f32], &[f32]) {
    let (hdr, rest) = blk.split_at(1 + 2 * g);
    let (sc, rest) = rest.split_at(g * BK);
    let raw = &rest[..if raw { g * BK } else { 0 }];
    (hdr, sc, raw)
}

#[allow(clippy::too_many_arguments)]
fn decode<'a, T: Element>(
    cpu: &Cpu,
    ws: &mut DecodeWs,
    meta: &DecodeMeta<'a>,
    pages: Option<&'a PageTable>,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    ev: &mut DecodeEvidence<'_, Cpu>,
) {
    let isa = cpu.isa;
    let plan = Plan::new(meta, pages, ev.logits.is_some());
    let (g, d, gh, units) = (plan.g, plan.d, plan.gh(), plan.units);
    if units == 0 || d == 0 {
        return;
    }
    let entmax = !matches!(meta.normalizer, Normalizer::Softmax);
    let sb = plan.stride();

    // Block prefix sums and pre-scaled f32 queries (scale, and α−1 for entmax).
    let prefix = grow(&mut ws.prefix, units + 1);
    prefix[0] = 0;
    let qs = grow(&mut ws.qs, units * g * d);
    for u in 0..units {
        let unit = plan.unit(u);
        prefix[u + 1] = prefix[u] + unit.stream_len().div_ceil(BK);
        let qu = &mut qs[u * g * d..u * g * d + gh * d];
        simd::to_f32_slice(isa, &q[u * gh * d..(u + 1) * gh * d], qu);
        for i in 0..gh {
            let c = match plan.alpha(unit.h0 + i) {
                Some(a) => meta.scale * (a - 1.0),
                None => meta.scale,
            };
            simd::scale_f32(isa, &mut qu[i * d..(i + 1) * d], c);
        }
    }
    let total = prefix[units];
    let prefix: &[usize] = prefix;
    let qs: &[f32] = qs;
    let blocks = grow(&mut ws.blocks, total * sb);
    // Per block: mask positions, then (paged KV) physical rows.
    let ibk = if pages.is_some() { 2 * BK } else { BK };
    let idx = grow(&mut ws.idx, total * ibk);
    let map = if pages.is_some() {
        let slot = grow(&mut ws.slot, total);
        let at = grow(&mut ws.at, total);
        let most = (0..units)
            .map(|u| prefix[u + 1] - prefix[u])
            .max()
            .unwrap_or(0);
        let mut next = 0;
        for b in 0..most {
            for u in 0..units {
                if prefix[u] + b < prefix[u + 1] {
                    slot[prefix[u] + b] = next;
                    at[next] = prefix[u] + b;
                    next += 1;
                }
            }
        }
        Some((&*slot, &*at))
    } else {
        None
    };
    let slots = Slots { prefix, map };

    cpu.install(|| {
        // Phase 1: scores (and, for softmax, the whole block).
        blocks
            .par_chunks_mut(sb)
            .zip(idx.par_chunks_mut(ibk))
            .enumerate()
            .for_each(|(i, (blk, idx))| {
                let j = slots.at(i);
                let u = slots.unit_of(j);
                let unit = plan.unit(u);
                let (idx, prow) = idx.split_at_mut(BK);
                let rows = block_rows(&unit, j - prefix[u], idx);
                let nb = rows_len(&rows);
                let (hdr, sc, raw, acc) = split_block(blk, g, plan.raw);
                hdr[0] = nb as f32;
                block_scores(isa, &qs[u * g * d..], gh, k, d, &unit, &rows, prow, sc);
                if plan.raw {
                    raw.copy_from_slice(sc);
                }
                let mut finite = true;
                for h in 0..gh {
                    let row = &mut sc[h * BK..h * BK + nb];
                    // NaN marks a unit for the f64 path (see the module docs).
                    let m = if simd::all_finite(isa, row) {
                        simd::max_f32(isa, row)
                    } else {
                        finite = false;
                        f32::NAN
                    };
                    hdr[1 + h] = m;
                    if !entmax {
                        hdr[1 + g + h] = if !m.is_finite() {
                            row.fill(0.0);
                            0.0
                        } else {
                            let l = simd::exp_sum(isa, row, m);
                            normalize_block(isa, row, l)
                        };
                    }
                }
                if !entmax && finite {
                    block_values(isa, sc, gh, v, d, &unit, &rows, prow, acc);
                }
            });

        if entmax {
            // Phase 2: τ per (unit, head) over all the unit's blocks (α in
            // [1.125, 2]; other α take the f64 path in phase 4). 2a: the unit
            // maximum M per head, from the block maxima.
            let tau = grow(&mut ws.tau, units * g);
            let blocks_ro: &[f32] = blocks;
            tau.par_chunks_mut(g).enumerate().for_each(|(u, tu)| {
                let bs = slots.unit_blocks(blocks_ro, sb, u);
                for (h, t) in tu.iter_mut().enumerate().take(gh) {
                    *t = bs
                        .clone()
                        .map(|b| b[1 + h])
                        .fold(f32::NEG_INFINITY, f32::max);
                }
            });
            // 2b: scores shifted by M, so τ is searched near [−1, 0] where f32
            // resolves it (`s − M` is exact for the candidates `s ≥ M − 1`
            // when |M| ≥ 2; unshifted, τ ≈ M has the resolution of M, and
            // none at all below M once |M| ≥ 2^24).
            let mtab: &[f32] = tau;
            blocks.par_chunks_mut(sb).enumerate().for_each(|(i, blk)| {
                let u = slots.unit_of(slots.at(i));
                let unit = plan.unit(u);
                let nb = blk[0] as usize;
                for h in 0..gh {
                    let m = mtab[u * g + h];
                    let alpha = plan.alpha(unit.h0 + h).unwrap_or(2.0);
                    if m.is_finite() && f32_search(alpha) {
                        simd::offset_f32(isa, &mut blk[1 + 2 * g + h * BK..][..nb], -m);
                    }
                }
            });
            // 2c: τ (relative to M) by the f32 search.
            let blocks_ro: &[f32] = blocks;
            tau.par_chunks_mut(g).enumerate().for_each(|(u, tu)| {
                let unit = plan.unit(u);
                let bs = slots.unit_blocks(blocks_ro, sb, u);
                for (h, t) in tu.iter_mut().enumerate().take(gh) {
                    let alpha = plan.alpha(unit.h0 + h).unwrap_or(2.0);
                    if !f32_search(alpha) || t.is_nan() {
                        // The f64 path, in phase 4.
                        continue;
                    }
                    let mode = PowMode::for_alpha(alpha);
                    let n: usize = bs.clone().map(|b| b[0] as usize).sum();
                    let max_s = if *t == f32::NEG_INFINITY { *t } else { 0.0 };
                    *t = solve_tau(alpha, max_s, n, |t| {
                        let mut s = (0.0, 0.0, 0.0);
                        for blk in bs.clone() {
                            let nb = blk[0] as usize;
                            let row = &blk[1 + 2 * g + h * BK..][..nb];
                            let r = chunked_sums(isa, row, t, mode);
                            s = (s.0 + r.0, s.1 + r.1, s.2 + r.2);
                        }
                        s
                    });
                }
            });
            let tau: &[f32] = tau;
            // Phase 3: weights and V per block.
            blocks
                .par_chunks_mut(sb)
                .zip(idx.par_chunks_mut(ibk))
                .enumerate()
                .for_each(|(i, (blk, idx))| {
                    let j = slots.at(i);
                    let u = slots.unit_of(j);
                    let unit = plan.unit(u);
                    let (idx, prow) = idx.split_at_mut(BK);
                    let rows = block_rows(&unit, j - prefix[u], idx);
                    let nb = rows_len(&rows);
                    let (hdr, sc, _, acc) = split_block(blk, g, plan.raw);
                    if hdr[1..1 + gh].iter().any(|m| m.is_nan()) {
                        return;
                    }
                    for h in 0..gh {
                        let alpha = plan.alpha(unit.h0 + h).unwrap_or(2.0);
                        let row = &mut sc[h * BK..h * BK + nb];
                        let l = if f32_search(alpha) {
                            chunked_apply(isa, row, tau[u * g + h], PowMode::for_alpha(alpha))
                        } else {
                            0.0 // the f64 path, in phase 4
                        };
                        hdr[1 + g + h] = normalize_block(isa, row, l as f32);
                    }
                    block_values(isa, sc, gh, v, d, &unit, &rows, prow, acc);
                });
        }

        // Phase 4: combine the blocks of each unit in order.
        let comb = grow(&mut ws.comb, units * g * d);
        let norm = grow(&mut ws.norm, units * g * 2);
        let blocks_ro: &[f32] = blocks;
        out.par_chunks_mut(gh * d)
            .zip(comb.par_chunks_mut(g * d))
            .zip(norm.par_chunks_mut(2 * g))
            .enumerate()
            .for_each(|(u, ((o, c), nm))| {
                let bs = slots.unit_blocks(blocks_ro, sb, u);
                let unit = plan.unit(u);
                let overflow = unit_overflows(bs.clone(), gh);
                for h in 0..gh {
                    let ch = &mut c[h * d..(h + 1) * d];
                    if overflow || needs_f64(plan.alpha(unit.h0 + h)) {
                        let qv = &q[(u * gh + h) * d..(u * gh + h + 1) * d];
                        let oh = &mut o[h * d..(h + 1) * d];
                        cpu.cands
                            .with(|cand| decode_head_f64(&plan, &unit, h, qv, k, v, oh, ch, cand));
                        // The evidence pass recomputes this head in f64 too.
                        nm[2 * h] = f32::NAN;
                        nm[2 * h + 1] = f32::NAN;
                        continue;
                    }
                    ch.fill(0.0);
                    let big_m = bs
                        .clone()
                        .map(|b| b[1 + h])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let mut l = 0.0f32;
                    if big_m > f32::NEG_INFINITY {
                        l = bs
                            .clone()
                            .map(|b| block_weight(b, g, h, big_m, entmax))
                            .sum();
                    }
                    nm[2 * h] = big_m;
                    nm[2 * h + 1] = l;
                    let oh = &mut o[h * d..(h + 1) * d];
                    if l > 0.0 && l.is_finite() {
                        for blk in bs.clone() {
                            let w = block_weight(blk, g, h, big_m, entmax);
                            if w == 0.0 {
                                continue;
                            }
                            let acc = &blk[sb - g * d + h * d..][..d];
                            simd::axpy_multi(isa, ch, 1, &[w / l], acc);
                        }
                        simd::from_f32_slice(isa, ch, oh);
                    } else {
                        oh.fill(T::default());
                    }
                }
            });

        if let Some(o) = ev.output.as_deref_mut() {
            // The combined f32 rows, before rounding to the storage dtype.
            for u in 0..units {
                let c = &comb[u * g * d..u * g * d + gh * d];
                o[u * gh * d..(u + 1) * gh * d].copy_from_slice(c);
            }
        }
        if ev.probs.is_some() || ev.logits.is_some() || ev.stats.is_some() {
            let tau: &[f32] = if entmax { &ws.tau[..units * g] } else { &[] };
            let ctx = EvidenceCtx {
                cpu,
                q,
                k,
                plan: &plan,
                slots,
                blocks: blocks_ro,
                idx: &*idx,
                ibk,
                norm: &ws.norm[..units * g * 2],
                tau,
                entmax,
            };
            decode_evidence(&ctx, ev);
        }
    });
}

/// What the decode evidence pass reads from the workspace (and, for heads
/// on the f64 path, from the inputs).
struct EvidenceCtx<'c, 'm, 'a, T> {
    cpu: &'c Cpu,
    q: &'c [T],
    k: &'c [T],
    plan: &'c Plan<'m, 'a>,
    slots: Slots<'c>,
    blocks: &'c [f32],
    idx: &'c [u32],
    /// Stride of one block in `idx`.
    ibk: usize,
    /// Per unit and head: `(M, L)` of the combine (NaN: the head took the
    /// f64 path).
    norm: &'c [f32],
    /// Per unit and head: τ (entmax), relative to the unit maximum `M`.
    tau: &'c [f32],
    entmax: bool,
}

/// Splits `buf` into consecutive chunks of the given lengths.
fn split_lens(mut buf: &mut [f32], lens: impl Iterator<Item = usize>) -> Vec<&mut [f32]> {
    let mut v = Vec::new();
    for n in lens {
        let (a, b) = std::mem::take(&mut buf).split_at_mut(n);
        v.push(a);
        buf = b;
    }
    v
}

/// The evidence of one decode call, from the workspace of the main pass:
/// per segment `(b, g)` (in parallel), for each query head of the group,
/// `p_j = ŝ_j · w_b / L` at the token of every stream entry (`ŝ` the
/// block-normalised weights, `w_b` the block's combine weight), folded over
/// the group, and the raw logits. Heads on the f64 path get the same
/// evidence from [`head_evidence64`].
fn decode_evidence<T: Element>(c: &EvidenceCtx<'_, '_, '_, T>, ev: &mut DecodeEvidence<'_, Cpu>) {
    let plan = c.plan;
    let meta = plan.meta;
    let (geom, segs) = (&meta.geom, meta.segs);
    let (g, sb) = (plan.g, plan.stride());
    let nseg = segs.num_segments();
    let lens = || (0..nseg).map(|s| segs.len_of(s));
    let heads = ev.probs.as_ref().map(|p| p.0);
    let mut probs: Vec<Option<&mut [f32]>> = match ev.probs.as_mut() {
        Some((Heads::PerHead, buf)) => split_lens(buf, lens().map(|l| l * g))
            .into_iter()
            .map(Some)
            .collect(),
        Some((_, buf)) => split_lens(buf, lens()).into_iter().map(Some).collect(),
        None => (0..nseg).map(|_| None).collect(),
    };
    let mut logits: Vec<Option<&mut [f32]>> = match ev.logits.as_deref_mut() {
        Some(buf) => split_lens(buf, lens().map(|l| l * g))
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..nseg).map(|_| None).collect(),
    };
    let mut stats: Vec<Option<&mut [f32]>> = match ev.stats.as_deref_mut() {
        Some(buf) => split_lens(buf, (0..nseg).map(|_| g))
            .into_iter()
            .map(Some)
            .collect(),
        None => (0..nseg).map(|_| None).collect(),
    };
    let work: Vec<_> = probs
        .iter_mut()
        .zip(logits.iter_mut())
        .zip(stats.iter_mut())
        .enumerate()
        .map(|(s, ((p, l), st))| (s, p.take(), l.take(), st.take()))
        .collect();
    work.into_par_iter()
        .for_each(|(s, mut pr, mut lg, mut st)| {
            let (b, kv) = (s / geom.num_kv_heads(), s % geom.num_kv_heads());
            let len = segs.len_of(s);
            if let Some(p) = pr.as_deref_mut() {
                p.fill(0.0);
            }
            if let Some(l) = lg.as_deref_mut() {
                l.fill(f32::NEG_INFINITY);
            }
            for hh in 0..g {
                let (u, i) = plan.unit_of_head(b, kv, hh);
                let unit = plan.unit(u);
                let (big_m, l) = (c.norm[(u * g + i) * 2], c.norm[(u * g + i) * 2 + 1]);
                if big_m.is_nan() {
                    let out = HeadEvidence {
                        hh,
                        len,
                        heads,
                        probs: pr.as_deref_mut(),
                        logits: lg.as_deref_mut(),
                        stat: st.as_deref_mut().map(|st| &mut st[hh]),
                    };
                    let qv = &c.q[(u * plan.gh() + i) * plan.d..][..plan.d];
                    c.cpu
                        .cands
                        .with(|cand| head_evidence64(plan, &unit, i, qv, c.k, out, cand));
                    continue;
                }
                let am1 = plan.alpha(unit.h0 + i).map_or(1.0, |a| a - 1.0);
                if let Some(st) = st.as_deref_mut() {
                    st[hh] = if l <= 0.0 || !l.is_finite() {
                        f32::NEG_INFINITY
                    } else if c.entmax {
                        c.tau[u * g + i] + big_m
                    } else {
                        big_m + l.ln()
                    };
                }
                let prefix = c.slots.prefix;
                for j in prefix[u]..prefix[u + 1] {
                    let blk = c.slots.slot(j);
                    let (hdr, sc, raw) =
                        block_parts(&c.blocks[blk * sb..(blk + 1) * sb], g, plan.raw);
                    let nb = hdr[0] as usize;
                    let start = (j - prefix[u]) * BK;
                    let f = if l > 0.0 && l.is_finite() {
                        block_weight(hdr, g, i, big_m, c.entmax) / l
                    } else {
                        0.0
                    };
                    let row = &sc[i * BK..i * BK + nb];
                    if let Src::Dense = unit.src {
                        // Tokens `start .. start + nb`: whole slices, so the
                        // loops vectorise (same operations, same order).
                        if let (Some(p), Some(h)) = (pr.as_deref_mut(), heads) {
                            let at = if h == Heads::PerHead { hh * len } else { 0 } + start;
                            fold_probs(h, &mut p[at..at + nb], row, f);
                        }
                        if let Some(lg) = lg.as_deref_mut() {
                            let dst = &mut lg[hh * len + start..][..nb];
                            for (y, &r) in dst.iter_mut().zip(&raw[i * BK..i * BK + nb]) {
                                *y = r / am1;
                            }
                        }
                        continue;
                    }
                    for (t, &x) in row.iter().enumerate() {
                        let tok = match unit.src {
                            Src::Dense => start + t,
                            Src::List(list) => list[start + t] as usize,
                            Src::Mask(_) => c.idx[blk * c.ibk + t] as usize,
                        };
                        if let (Some(p), Some(h)) = (pr.as_deref_mut(), heads) {
                            let w = x * f;
                            match h {
                                Heads::PerHead => p[hh * len + tok] = w,
                                Heads::Max => p[tok] = p[tok].max(w),
                                _ => p[tok] += w,
                            }
                        }
                        if let Some(lg) = lg.as_deref_mut() {
                            lg[hh * len + tok] = raw[i * BK + t] / am1;
                        }
                    }
                }
            }
            if let (Some(p), Some(Heads::Mean)) = (pr, heads) {
                let inv = 1.0 / g as f32;
                p.iter_mut().for_each(|x| *x *= inv);
            }
        });
}

/// Folds one head's block of weights `row · f` into `dst` (the block's
/// tokens, contiguous): `PerHead` stores, `Max` keeps the maximum, `Sum` and
/// `Mean` add (the mean divides at the end).
fn fold_probs(h: Heads, dst: &mut [f32], row: &[f32], f: f32) {
    match h {
        Heads::PerHead => dst.iter_mut().zip(row).for_each(|(y, &x)| *y = x * f),
        Heads::Max => dst
            .iter_mut()
            .zip(row)
            .for_each(|(y, &x)| *y = y.max(x * f)),
        Heads::Sum | Heads::Mean => dst.iter_mut().zip(row).for_each(|(y, &x)| *y += x * f),
    }
}

/// Where one head's decode evidence goes (see [`decode_evidence`]).
struct HeadEvidence<'e> {
    /// Head within the group, and the segment's length.
    hh: usize,
    len: usize,
    heads: Option<Heads>,
    probs: Option<&'e mut [f32]>,
    logits: Option<&'e mut [f32]>,
    stat: Option<&'e mut f32>,
}

/// The decode evidence of head `i` of `unit` on the f64 path: f64 logits and
/// weights as [`decode_head_f64`] computes them; the statistic is
/// `ln Σ e^{z}` (softmax) or `τ = (α−1) z_top − p_top^{α−1}` (entmax, from
/// the weight of the largest logit), `-inf` when no token is attended.
fn head_evidence64<T: Element>(
    plan: &Plan<'_, '_>,
    unit: &Unit<'_>,
    i: usize,
    qv: &[T],
    k: &[T],
    out: HeadEvidence<'_>,
    cand: &mut Cand,
) {
    let HeadEvidence {
        hh,
        len,
        heads,
        probs,
        logits,
        stat,
    } = out;
    let alpha = plan.alpha(unit.h0 + i);
    head_logits64(plan, unit, qv, k, &mut cand.z);
    let z = &mut cand.z;
    if let Some(lg) = logits {
        for (t, &x) in z.iter().enumerate() {
            if x > f64::NEG_INFINITY || x.is_nan() {
                lg[hh * len + stream_token(unit, t)] = x as f32;
            }
        }
    }
    let top = (0..z.len())
        .filter(|&t| !(z[t] == f64::NEG_INFINITY))
        .max_by(|&a, &b| z[a].total_cmp(&z[b]).then(b.cmp(&a)));
    let (z_top, lse) = match top {
        Some(t) => {
            let m = z[t];
            (m, m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln())
        }
        None => (f64::NEG_INFINITY, f64::NEG_INFINITY),
    };
    weights64(z, alpha, &mut cand.f64);
    if let Some(st) = stat {
        *st = match (top, alpha) {
            (None, _) => f32::NEG_INFINITY,
            (Some(_), None) => lse as f32,
            (Some(t), Some(a)) => {
                let am1 = f64::from(a) - 1.0;
                (am1 * z_top - z[t].powf(am1)) as f32
            }
        };
    }
    if let (Some(p), Some(h)) = (probs, heads) {
        for (t, &w) in z.iter().enumerate() {
            let (tok, w) = (stream_token(unit, t), w as f32);
            match h {
                Heads::PerHead => p[hh * len + tok] = w,
                Heads::Max => p[tok] = p[tok].max(w),
                _ => p[tok] += w,
            }
        }
    }
}

/// Softmax or entmax (f32 τ, renormalised) of one logit row in place.
/// `-inf` entries get 0; a row with no finite entry becomes zeros.
pub(crate) fn normalize_inplace(isa: Isa, row: &mut [f32], alpha: Option<f32>, cand: &mut Cand) {
    match alpha {
        None => softmax_row_inplace(isa, row),
        Some(a) => {
            entmax_row_inplace(isa, row, a, cand);
        }
    }
}

/// Query tiles of a prefill call: `(sequence, first row in the sequence,
/// rows, out block)`, each out block `[rows, Hq, D]`.
pub(crate) type Tile<'o, T> = (usize, usize, usize, &'o mut [T]);

pub(crate) fn query_tiles<'o, T>(
    q_rows: &crate::layout::Ragged,
    row_width: usize,
    tile: usize,
    mut out: &'o mut [T],
) -> Vec<Tile<'o, T>> {
    let mut v = Vec::new();
    for b in 0..q_rows.num_segments() {
        let nq = q_rows.len_of(b);
        let mut i0 = 0;
        while i0 < nq {
            let n = tile.min(nq - i0);
            let (head, tail) = std::mem::take(&mut out).split_at_mut(n * row_width);
            v.push((b, i0, n, head));
            out = tail;
            i0 += n;
        }
    }
    v
}

/// Whether key `j` is visible to query row `i` (of `nq`) of list `mask_list`.
#[inline]
pub(crate) fn mask_bit(words: &[u32], wpr: usize, i: usize, j: usize) -> bool {
    (words[i * wpr + j / 32] >> (j % 32)) & 1 == 1
}

/// The weights of prefill query row `qi` (of `nq`) of sequence `b`, head `h`
/// over the strip `row.len()` of its `kv` keys on the f64 path (`exact.rs`):
/// f64 logits of the visible keys (causality and mask; others `-inf`), the
/// f64 normaliser, rounded to f32.
fn prefill_row_f64<T: Element>(
    meta: &PrefillMeta<'_>,
    (b, h, qi, nq, kv): (usize, usize, usize, usize, usize),
    qv: &[T],
    krows: &[T],
    row: &mut [f32],
    cand: &mut Cand,
) {
    let d = qv.len();
    let pos = (kv + qi).checked_sub(nq);
    let mask = meta.mask.map(|m| (m, m.scope().list_of(b, h, &meta.geom)));
    let scale = f64::from(meta.scale);
    cand.z.clear();
    cand.z.extend((0..row.len()).map(|j| {
        let seen = (!meta.causal || pos.is_some_and(|p| j <= p))
            && mask.is_none_or(|(m, li)| m.get(li, qi, j));
        if seen {
            scale * dot64(qv, &krows[j * d..(j + 1) * d])
        } else {
            f64::NEG_INFINITY
        }
    }));
    weights64(&mut cand.z, meta.normalizer.alpha(h), &mut cand.f64);
    for (x, &w) in row.iter_mut().zip(&cand.z) {
        *x = w as f32;
    }
}

/// Per-group evidence accumulators of a prefill call, shaped per query
/// head (blocks `(b, h)` of `rows × len(b, h/G)`), summed over groups and
/// reduced over heads at the end.
#[derive(Default)]
struct PrefillAcc {
    col: Vec<f32>,
    win: Vec<f32>,
}

/// The evidence layouts of a prefill call (per query head).
struct PrefillEv<'r> {
    col: Option<&'r Ragged>,
    win: Option<(Window, &'r Ragged)>,
}

/// One query tile of a prefill call: every KV head's group of query heads
/// scores the visible key strip, normalises in place, accumulates `P·V`,
/// and adds its weights to the evidence accumulators.
#[allow(clippy::too_many_arguments)]
fn prefill_tile<T: Element>(
    cpu: &Cpu,
    meta: &PrefillMeta<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    (b, i0, n, o): Tile<'_, T>,
    ev: &PrefillEv<'_>,
    acc_ev: &mut PrefillAcc,
) {
    let isa = cpu.isa;
    let geom = &meta.geom;
    let (hq, hkv, g, d) = (
        geom.num_q_heads(),
        geom.num_kv_heads(),
        geom.group(),
        geom.head_dim(),
    );
    let nq = meta.q_rows.len_of(b);
    let r0 = meta.q_rows.range(b).start + i0;
    for kvh in 0..hkv {
        let s = meta.segs.index(b, kvh);
        let (off, kv) = (meta.segs.offset(s), meta.segs.len_of(s));
        // Visible strip: causal keys up to the tile's last position.
        let strip = if meta.causal {
            (kv + i0 + n).saturating_sub(nq).min(kv)
        } else {
            kv
        };
        let rows = g * n;
        cpu.cands.with(|cand| {
            cpu.scratch.with(|buf| {
                let buf = grow(buf, rows * d + rows * strip.max(1) + rows * d);
                let (qs, rest) = buf.split_at_mut(rows * d);
                let (sc, acc) = rest.split_at_mut(rows * strip.max(1));
                // Rows ordered (head, query).
                for hh in 0..g {
                    let h = kvh * g + hh;
                    for i in 0..n {
                        let dst = &mut qs[(hh * n + i) * d..(hh * n + i + 1) * d];
                        simd::to_f32_slice(isa, &q[((r0 + i) * hq + h) * d..][..d], dst);
                        simd::scale_f32(isa, dst, meta.scale);
                    }
                }
                acc.fill(0.0);
                if strip > 0 {
                    let krows = &k[off * d..(off + strip) * d];
                    simd::scores_rows_strided(isa, qs, rows, krows, d, 1.0, sc, strip);
                    let finite = simd::all_finite(isa, &sc[..rows * strip]);
                    for hh in 0..g {
                        let h = kvh * g + hh;
                        let mask = meta.mask.map(|m| {
                            let li = m.scope().list_of(b, h, geom);
                            (m.words_of(li), kv.div_ceil(32))
                        });
                        for i in 0..n {
                            let row = &mut sc[(hh * n + i) * strip..(hh * n + i + 1) * strip];
                            let qi = i0 + i;
                            if !finite || needs_f64(meta.normalizer.alpha(h)) {
                                // The f64 path (module docs, `exact.rs`).
                                let qv = &q[((r0 + i) * hq + h) * d..][..d];
                                let at = (b, h, qi, nq, kv);
                                prefill_row_f64(meta, at, qv, krows, row, cand);
                            } else {
                                if meta.causal {
                                    let vis = (kv + qi + 1).saturating_sub(nq).min(strip);
                                    row[vis..].fill(f32::NEG_INFINITY);
                                }
                                if let Some((words, wpr)) = mask {
                                    for (j, x) in row.iter_mut().enumerate() {
                                        if !mask_bit(words, wpr, qi, j) {
                                            *x = f32::NEG_INFINITY;
                                        }
                                    }
                                }
                                normalize_inplace(isa, row, meta.normalizer.alpha(h), cand);
                            }
                            let blk = b * hq + h;
                            if let Some(cb) = ev.col {
                                let at = cb.range(blk).start;
                                for (a, &p) in acc_ev.col[at..at + strip].iter_mut().zip(row.iter())
                                {
                                    *a += p;
                                }
                            }
                            if let Some((w, wb)) = ev.win
                                && w.queries >= nq - qi
                            {
                                let r = if w.rows {
                                    qi + w.queries.min(nq) - nq
                                } else {
                                    0
                                };
                                if acc_ev.win.is_empty() {
                                    acc_ev.win = vec![0.0; wb.total()];
                                }
                                let at = wb.range(blk).start + r * kv;
                                for (a, &p) in acc_ev.win[at..at + strip].iter_mut().zip(row.iter())
                                {
                                    *a += p;
                                }
                            }
                        }
                    }
                    let vrows = &v[off * d..(off + strip) * d];
                    simd::weighted_rows_strided(isa, acc, rows, sc, strip, vrows, d);
                    // A row that sees no key outputs exact zeros even when V
                    // holds NaN / inf: the tiled V pass reads a V row once for
                    // every row of the tile, so its 0 · NaN would land in this
                    // row too.
                    for (r, a) in acc.chunks_exact_mut(d).enumerate() {
                        if sc[r * strip..(r + 1) * strip].iter().all(|&w| w == 0.0) {
                            a.fill(0.0);
                        }
                    }
                }
                for hh in 0..g {
                    let h = kvh * g + hh;
                    for i in 0..n {
                        let a = &acc[(hh * n + i) * d..(hh * n + i + 1) * d];
                        simd::from_f32_slice(isa, a, &mut o[(i * hq + h) * d..][..d]);
                    }
                }
            })
        });
    }
}

/// Most tile groups a prefill with evidence uses (each group accumulates
/// its evidence privately; groups are fixed by the shapes, so results do
/// not depend on the number of threads).
const EVIDENCE_GROUPS: usize = 16;

/// Cuts `tiles` into at most `groups` runs of consecutive tiles of about
/// equal cost (visible keys × rows).
fn group_tiles<'o, T>(
    meta: &PrefillMeta<'_>,
    tiles: Vec<Tile<'o, T>>,
    groups: usize,
) -> Vec<Vec<Tile<'o, T>>> {
    let cost = |&(b, i0, n, _): &Tile<'o, T>| {
        let nq = meta.q_rows.len_of(b);
        let kv = meta.segs.len_of(meta.segs.index(b, 0));
        let strip = if meta.causal {
            (kv + i0 + n).saturating_sub(nq).min(kv)
        } else {
            kv
        };
        (strip.max(1) * n) as u64
    };
    let total: u64 = tiles.iter().map(cost).sum();
    let per = total.div_ceil(groups.max(1) as u64).max(1);
    let mut out: Vec<Vec<Tile<'o, T>>> = Vec::new();
    let mut cur = Vec::new();
    let mut acc = 0u64;
    for t in tiles {
        acc += cost(&t);
        cur.push(t);
        if acc >= per {
            out.push(std::mem::take(&mut cur));
            acc = 0;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Sums per-group accumulators in group order into `total` (per query head).
fn sum_groups(parts: &[&[f32]], total: &mut [f32]) {
    total.fill(0.0);
    for p in parts {
        if p.is_empty() {
            continue;
        }
        for (t, &x) in total.iter_mut().zip(p.iter()) {
            *t += x;
        }
    }
}

/// Writes per-query-head blocks `src` (partition `src_blocks`) to `dst` in
/// the layout of `heads` (`dst_blocks`), reducing over each GQA group.
fn reduce_blocks(
    geom: &crate::layout::HeadGeometry,
    heads: Heads,
    src: &[f32],
    src_blocks: &Ragged,
    dst: &mut [f32],
    dst_blocks: &Ragged,
) {
    if heads == Heads::PerHead {
        dst[..src.len()].copy_from_slice(src);
        return;
    }
    let (hq, hkv, g) = (geom.num_q_heads(), geom.num_kv_heads(), geom.group());
    for bi in 0..dst_blocks.num_segments() {
        let (b, kv) = (bi / hkv, bi % hkv);
        let out = &mut dst[dst_blocks.range(bi)];
        for hh in 0..g {
            let x = &src[src_blocks.range(b * hq + kv * g + hh)];
            for (o, &v) in out.iter_mut().zip(x) {
                *o = if hh == 0 {
                    v
                } else if heads == Heads::Max {
                    o.max(v)
                } else {
                    *o + v
                };
            }
        }
        if heads == Heads::Mean {
            let inv = 1.0 / g as f32;
            out.iter_mut().for_each(|o| *o *= inv);
        }
    }
}

fn prefill<T: Element>(
    cpu: &Cpu,
    meta: &PrefillMeta<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    ev: &mut PrefillEvidence<'_, Cpu>,
) -> Result<()> {
    let geom = &meta.geom;
    let (hq, d) = (geom.num_q_heads(), geom.head_dim());
    if d == 0 {
        return Ok(());
    }
    let batch = meta.segs.batch();
    let col_blocks = match &ev.col_sums {
        Some(_) => Some(evidence_blocks(
            geom,
            meta.segs,
            Heads::PerHead,
            &vec![1; batch],
        )?),
        None => None,
    };
    let win_blocks = match &ev.window {
        Some((w, _)) => {
            let rows: Vec<usize> = meta.q_rows.lens().map(|n| w.rows_for(n)).collect();
            Some((*w, evidence_blocks(geom, meta.segs, Heads::PerHead, &rows)?))
        }
        None => None,
    };
    let pev = PrefillEv {
        col: col_blocks.as_ref(),
        win: win_blocks.as_ref().map(|(w, r)| (*w, r)),
    };
    let tiles = query_tiles(meta.q_rows, hq * d, PREFILL_TILE_Q, out);
    if ev.is_empty() {
        cpu.install(|| {
            tiles
                .into_par_iter()
                .for_each(|t| prefill_tile(cpu, meta, q, k, v, t, &pev, &mut PrefillAcc::default()))
        });
        return Ok(());
    }
    let groups = group_tiles(meta, tiles, EVIDENCE_GROUPS);
    let col_len = col_blocks.as_ref().map_or(0, |r| r.total());
    let accs: Vec<PrefillAcc> = cpu.install(|| {
        groups
            .into_par_iter()
            .map(|grp| {
                let mut acc = PrefillAcc {
                    col: vec![0.0; col_len],
                    win: Vec::new(),
                };
                for t in grp {
                    prefill_tile(cpu, meta, q, k, v, t, &pev, &mut acc);
                }
                acc
            })
            .collect()
    });
    if let (Some((heads, buf)), Some(src_blocks)) = (ev.col_sums.as_mut(), &col_blocks) {
        let mut total = vec![0.0f32; col_len];
        let parts: Vec<&[f32]> = accs.iter().map(|a| a.col.as_slice()).collect();
        sum_groups(&parts, &mut total);
        let dst_blocks = evidence_blocks(geom, meta.segs, *heads, &vec![1; batch])?;
        reduce_blocks(geom, *heads, &total, src_blocks, buf, &dst_blocks);
    }
    if let (Some((w, buf)), Some((_, src_blocks))) = (ev.window.as_mut(), &win_blocks) {
        let mut total = vec![0.0f32; src_blocks.total()];
        let parts: Vec<&[f32]> = accs.iter().map(|a| a.win.as_slice()).collect();
        sum_groups(&parts, &mut total);
        let rows: Vec<usize> = meta.q_rows.lens().map(|n| w.rows_for(n)).collect();
        let dst_blocks = evidence_blocks(geom, meta.segs, w.heads, &rows)?;
        reduce_blocks(geom, w.heads, &total, src_blocks, buf, &dst_blocks);
    }
    Ok(())
}

impl AttnOps for Cpu {
    fn decode_attention<T: Element>(
        &self,
        meta: &DecodeMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
        ev: &mut DecodeEvidence<'_, Self>,
    ) -> Result<()> {
        self.decode_ws
            .with(|ws| decode(self, ws, meta, None, q, k, v, out, ev));
        Ok(())
    }

    fn decode_attention_paged<T: Element>(
        &self,
        meta: &PagedDecodeMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
        ev: &mut DecodeEvidence<'_, Self>,
    ) -> Result<()> {
        let (dm, pages) = (&meta.decode, meta.pages);
        self.decode_ws
            .with(|ws| decode(self, ws, dm, Some(pages), q, k, v, out, ev));
        Ok(())
    }

    fn prefill_attention<T: Element>(
        &self,
        meta: &PrefillMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
        ev: &mut PrefillEvidence<'_, Self>,
    ) -> Result<()> {
        prefill(self, meta, q, k, v, out, ev)
    }
}
