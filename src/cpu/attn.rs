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
//! Layout of one block in the workspace (`f32`, stride `SB`):
//! `[nb, m_0..m_G, l_0..l_G | scores [G, BK] | acc [G, D]]`.
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
use crate::backend::{AttnOps, DecodeMeta, Normalizer, PrefillMeta, Restrict};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::Scope;

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

/// One decode unit.
#[derive(Clone, Copy)]
struct Unit<'a> {
    /// First query head (within the sequence).
    h0: usize,
    /// Segment rows.
    off: usize,
    len: usize,
    src: Src<'a>,
}

impl Unit<'_> {
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
    per_head: bool,
    /// Group size (max heads per unit) and head dim.
    g: usize,
    d: usize,
    units: usize,
}

impl<'m, 'a> Plan<'m, 'a> {
    fn new(meta: &'m DecodeMeta<'a>) -> Self {
        let per_head = match meta.restrict {
            Restrict::Indices(l) => l.scope() == Scope::QueryHead,
            Restrict::Mask(m) => m.scope() == Scope::QueryHead,
            Restrict::Dense => false,
        };
        let geom = &meta.geom;
        let batch = meta.segs.batch();
        Self {
            meta,
            per_head,
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
        1 + 2 * self.g + self.g * BK + self.g * self.d
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
            off: segs.offset(s),
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

/// Scores `[gh, BK]` (stride BK) of the block's rows.
#[allow(clippy::too_many_arguments)]
fn block_scores<T: Element>(
    isa: Isa,
    qs: &[f32],
    gh: usize,
    k: &[T],
    d: usize,
    off: usize,
    rows: &Rows<'_>,
    sc: &mut [f32],
) {
    match rows {
        Rows::Contig(a, n) => {
            let r = &k[(off + a) * d..(off + a + n) * d];
            simd::scores_rows_strided(isa, qs, gh, r, d, 1.0, sc, BK);
        }
        Rows::Gather(l) => simd::scores_gather(isa, qs, gh, k, d, off, l, 1.0, sc, BK),
    }
}

/// `acc[gh, D] = Σ_j p[:, j] v_j` over the block's rows (zero rows skipped).
#[allow(clippy::too_many_arguments)]
fn block_values<T: Element>(
    isa: Isa,
    p: &[f32],
    gh: usize,
    v: &[T],
    d: usize,
    off: usize,
    rows: &Rows<'_>,
    acc: &mut [f32],
) {
    acc[..gh * d].fill(0.0);
    match rows {
        Rows::Contig(a, n) => {
            let r = &v[(off + a) * d..(off + a + n) * d];
            simd::weighted_rows_strided(isa, acc, gh, p, BK, r, d);
        }
        Rows::Gather(l) => simd::weighted_gather(isa, acc, gh, p, BK, v, d, off, l),
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

/// Head `i` of a decode unit on the f64 path (`exact.rs`): for a head whose
/// α needs it, or every head of a unit whose f32 scores are not all finite.
/// f64 logits over the unit's tokens, the f64 normaliser, the value sum in
/// f64 (rows of zero weight are not read).
#[allow(clippy::too_many_arguments)]
fn decode_head_f64<T: Element>(
    plan: &Plan<'_, '_>,
    unit: &Unit<'_>,
    i: usize,
    qv: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    cand: &mut Cand,
) {
    let d = plan.d;
    let scale = f64::from(plan.meta.scale);
    let logit = |j: usize| scale * dot64(qv, &k[(unit.off + j) * d..][..d]);
    let token = |t: usize| match unit.src {
        Src::Dense => t,
        Src::List(l) => l[t] as usize,
        Src::Mask(_) => t,
    };
    let visible = |t: usize| match unit.src {
        Src::Mask(words) => (words[t / 32] >> (t % 32)) & 1 == 1,
        _ => true,
    };
    // Masked-out positions become -inf (zero weight).
    cand.z.clear();
    cand.z.extend((0..unit.stream_len()).map(|t| {
        if visible(t) {
            logit(token(t))
        } else {
            f64::NEG_INFINITY
        }
    }));
    weights64(&mut cand.z, plan.alpha(unit.h0 + i), &mut cand.f64);
    let mut acc = [0.0f64; 16];
    for c0 in (0..d).step_by(16) {
        let w = (d - c0).min(16);
        acc[..w].fill(0.0);
        for (t, &p) in cand.z.iter().enumerate() {
            if p != 0.0 {
                let row = &v[(unit.off + token(t)) * d + c0..][..w];
                for (a, x) in acc[..w].iter_mut().zip(row) {
                    *a += p * x.to_f64();
                }
            }
        }
        for (o, &a) in out[c0..c0 + w].iter_mut().zip(&acc[..w]) {
            *o = T::from_f64(a);
        }
    }
}

/// Splits one workspace block into (header, scores, acc).
fn split_block(blk: &mut [f32], g: usize) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let (hdr, rest) = blk.split_at_mut(1 + 2 * g);
    let (sc, acc) = rest.split_at_mut(g * BK);
    (hdr, sc, acc)
}

fn decode<T: Element>(
    cpu: &Cpu,
    ws: &mut DecodeWs,
    meta: &DecodeMeta<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
) {
    let isa = cpu.isa;
    let plan = Plan::new(meta);
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
    let idx = grow(&mut ws.idx, total * BK);
    let unit_of = |i: usize| prefix.partition_point(|&p| p <= i) - 1;

    cpu.install(|| {
        // Phase 1: scores (and, for softmax, the whole block).
        blocks
            .par_chunks_mut(sb)
            .zip(idx.par_chunks_mut(BK))
            .enumerate()
            .for_each(|(i, (blk, idx))| {
                let u = unit_of(i);
                let unit = plan.unit(u);
                let rows = block_rows(&unit, i - prefix[u], idx);
                let nb = rows_len(&rows);
                let (hdr, sc, acc) = split_block(blk, g);
                hdr[0] = nb as f32;
                block_scores(isa, &qs[u * g * d..], gh, k, d, unit.off, &rows, sc);
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
                    block_values(isa, sc, gh, v, d, unit.off, &rows, acc);
                }
            });

        if entmax {
            // Phase 2: τ per (unit, head) over all the unit's blocks (α in
            // [1.125, 2]; other α take the f64 path in phase 4). 2a: the unit
            // maximum M per head, from the block maxima.
            let tau = grow(&mut ws.tau, units * g);
            let blocks_ro: &[f32] = blocks;
            tau.par_chunks_mut(g).enumerate().for_each(|(u, tu)| {
                let bs = &blocks_ro[prefix[u] * sb..prefix[u + 1] * sb];
                for (h, t) in tu.iter_mut().enumerate().take(gh) {
                    *t = bs
                        .chunks_exact(sb)
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
                let u = unit_of(i);
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
                let bs = &blocks_ro[prefix[u] * sb..prefix[u + 1] * sb];
                for (h, t) in tu.iter_mut().enumerate().take(gh) {
                    let alpha = plan.alpha(unit.h0 + h).unwrap_or(2.0);
                    if !f32_search(alpha) || t.is_nan() {
                        // The f64 path, in phase 4.
                        continue;
                    }
                    let mode = PowMode::for_alpha(alpha);
                    let n: usize = bs.chunks_exact(sb).map(|b| b[0] as usize).sum();
                    let max_s = if *t == f32::NEG_INFINITY { *t } else { 0.0 };
                    *t = solve_tau(alpha, max_s, n, |t| {
                        let mut s = (0.0, 0.0, 0.0);
                        for blk in bs.chunks_exact(sb) {
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
                .zip(idx.par_chunks_mut(BK))
                .enumerate()
                .for_each(|(i, (blk, idx))| {
                    let u = unit_of(i);
                    let unit = plan.unit(u);
                    let rows = block_rows(&unit, i - prefix[u], idx);
                    let nb = rows_len(&rows);
                    let (hdr, sc, acc) = split_block(blk, g);
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
                    block_values(isa, sc, gh, v, d, unit.off, &rows, acc);
                });
        }

        // Phase 4: combine the blocks of each unit in order.
        let comb = grow(&mut ws.comb, units * g * d);
        let blocks_ro: &[f32] = blocks;
        out.par_chunks_mut(gh * d)
            .zip(comb.par_chunks_mut(g * d))
            .enumerate()
            .for_each(|(u, (o, c))| {
                let bs = &blocks_ro[prefix[u] * sb..prefix[u + 1] * sb];
                let unit = plan.unit(u);
                let overflow = bs
                    .chunks_exact(sb)
                    .any(|b| b[1..1 + gh].iter().any(|m| m.is_nan()));
                // Block weight: e^{m_b − M} l_b (softmax) or l_b (entmax).
                let weight = |blk: &[f32], h: usize, big_m: f32| {
                    let f = if entmax {
                        1.0
                    } else if blk[1 + h] == f32::NEG_INFINITY {
                        0.0
                    } else {
                        (blk[1 + h] - big_m).exp()
                    };
                    f * blk[1 + g + h]
                };
                for h in 0..gh {
                    if overflow || needs_f64(plan.alpha(unit.h0 + h)) {
                        let qv = &q[(u * gh + h) * d..(u * gh + h + 1) * d];
                        let oh = &mut o[h * d..(h + 1) * d];
                        cpu.cands
                            .with(|cand| decode_head_f64(&plan, &unit, h, qv, k, v, oh, cand));
                        continue;
                    }
                    let ch = &mut c[h * d..(h + 1) * d];
                    ch.fill(0.0);
                    let big_m = bs
                        .chunks_exact(sb)
                        .map(|b| b[1 + h])
                        .fold(f32::NEG_INFINITY, f32::max);
                    let mut l = 0.0f32;
                    if big_m > f32::NEG_INFINITY {
                        l = bs.chunks_exact(sb).map(|b| weight(b, h, big_m)).sum();
                    }
                    let oh = &mut o[h * d..(h + 1) * d];
                    if l > 0.0 && l.is_finite() {
                        for blk in bs.chunks_exact(sb) {
                            let w = weight(blk, h, big_m);
                            if w == 0.0 {
                                continue;
                            }
                            let acc = &blk[1 + 2 * g + g * BK + h * d..][..d];
                            simd::axpy_multi(isa, ch, 1, &[w / l], acc);
                        }
                        simd::from_f32_slice(isa, ch, oh);
                    } else {
                        oh.fill(T::default());
                    }
                }
            });
    });
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

fn prefill<T: Element>(
    cpu: &Cpu,
    meta: &PrefillMeta<'_>,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
) {
    let isa = cpu.isa;
    let geom = &meta.geom;
    let (hq, hkv, g, d) = (
        geom.num_q_heads(),
        geom.num_kv_heads(),
        geom.group(),
        geom.head_dim(),
    );
    if d == 0 {
        return;
    }
    let tiles = query_tiles(meta.q_rows, hq * d, PREFILL_TILE_Q, out);
    cpu.install(|| {
        tiles.into_par_iter().for_each(|(b, i0, n, o)| {
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
                                    let row =
                                        &mut sc[(hh * n + i) * strip..(hh * n + i + 1) * strip];
                                    let qi = i0 + i;
                                    if !finite || needs_f64(meta.normalizer.alpha(h)) {
                                        // The f64 path (module docs, `exact.rs`).
                                        let qv = &q[((r0 + i) * hq + h) * d..][..d];
                                        let kr = &k[off * d..(off + strip) * d];
                                        let at = (b, h, qi, nq, kv);
                                        prefill_row_f64(meta, at, qv, kr, row, cand);
                                        continue;
                                    }
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
                            }
                            let vrows = &v[off * d..(off + strip) * d];
                            simd::weighted_rows_strided(isa, acc, rows, sc, strip, vrows, d);
                            // A row that sees no key outputs exact zeros even
                            // when V holds NaN / inf: the tiled V pass reads a
                            // V row once for every row of the tile, so its
                            // 0 · NaN would land in this row too.
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
        })
    });
}

impl AttnOps for Cpu {
    fn decode_attention<T: Element>(
        &self,
        meta: &DecodeMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
    ) -> Result<()> {
        self.decode_ws
            .with(|ws| decode(self, ws, meta, q, k, v, out));
        Ok(())
    }

    fn prefill_attention<T: Element>(
        &self,
        meta: &PrefillMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
    ) -> Result<()> {
        prefill(self, meta, q, k, v, out);
        Ok(())
    }
}
