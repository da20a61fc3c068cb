//! Host-side helpers shared by the policies: evidence blocks downloaded
//! from the attention ops, row state that follows the cache through
//! compactions, protected windows by arrival, and O(L) selection.
#![forbid(unsafe_code)]

use super::{Budget, GqaReduce, Heads, Plan, StepCtx};
use crate::backend::{Backend, Ops};
use crate::cache::{KvView, compaction_moves, drop_moves};
use crate::cpu::simd;
use crate::dtype::Element;
use crate::error::{Error, Result, Size, shape};
use crate::layout::{IndexList, IndexSet, Ragged, Scope, Segments};
use crate::ops;

/// Evidence blocks on the host: block `i` (per query head or per KV head,
/// see [`Heads`]) holds `rows × len` values. On backends whose memory is the
/// host's ([`Backend::host_view`]) the blocks borrow the evidence buffer
/// itself; elsewhere they own a downloaded copy.
#[derive(Clone, Debug)]
pub struct HostBlocks<'a> {
    data: std::borrow::Cow<'a, [f32]>,
    blocks: Ragged,
    heads: Heads,
}

impl<'a> HostBlocks<'a> {
    pub(crate) fn new(data: std::borrow::Cow<'a, [f32]>, blocks: Ragged, heads: Heads) -> Self {
        Self {
            data,
            blocks,
            heads,
        }
    }
    /// Block `i` (empty when out of range).
    pub fn block(&self, i: usize) -> &[f32] {
        if i >= self.blocks.num_segments() {
            return &[];
        }
        &self.data[self.blocks.range(i)]
    }
    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.num_segments()
    }
    /// Group treatment of the blocks.
    pub fn heads(&self) -> Heads {
        self.heads
    }
}

/// How a compaction moved one layer's rows: per segment the `(dst, src)`
/// moves of [`compaction_moves`] and the new length. Policies apply it to
/// any per-row state so that state and cache stay aligned.
#[derive(Clone, Debug, PartialEq)]
pub struct Compaction {
    /// Per segment: `(dst, src)` row moves.
    pub moves: Vec<Vec<(u32, u32)>>,
    /// Per segment: the new length.
    pub lens: Vec<u32>,
}

impl Compaction {
    /// The compaction of an `Evict(keep)` plan.
    pub fn from_keep(keep: &IndexList) -> Self {
        Self {
            moves: (0..keep.num_lists())
                .map(|s| compaction_moves(keep.list(s)))
                .collect(),
            lens: keep.indptr().lens().map(|n| n as u32).collect(),
        }
    }
    /// The compaction of a `Drop(drop)` plan over `segs`.
    pub fn from_drop(segs: &Segments, drop: &IndexList) -> Self {
        Self {
            moves: (0..drop.num_lists())
                .map(|s| drop_moves(segs.len_of(s), drop.list(s)))
                .collect(),
            lens: (0..drop.num_lists())
                .map(|s| (segs.len_of(s) - drop.list(s).len()) as u32)
                .collect(),
        }
    }
    /// Applies the moves of segment `s` to a row vector and truncates it.
    pub fn apply<X: Copy>(&self, s: usize, v: &mut Vec<X>) {
        if s >= self.lens.len() {
            return;
        }
        for &(dst, src) in &self.moves[s] {
            if (src as usize) < v.len() && (dst as usize) < v.len() {
                v[dst as usize] = v[src as usize];
            }
        }
        v.truncate(self.lens[s] as usize);
    }
}

/// The segment of block `i` of a `heads` layout.
pub(crate) fn segment_of(i: usize, heads: Heads, hq: usize, hkv: usize) -> usize {
    match heads {
        Heads::PerHead => {
            let (b, h) = (i / hq, i % hq);
            b * hkv + h / (hq / hkv).max(1)
        }
        _ => i,
    }
}

/// Per-row state of one layer, one vector per block of a `heads` layout,
/// kept aligned with the cache: every hook checks that the cache changed
/// only by appends since the state was last synced (a skipped `Evict` /
/// `Drop` / `Merge` plan is an error) and extends the vectors with `fill`
/// for the new tokens.
#[derive(Clone, Debug)]
pub(crate) struct RowState<X> {
    pub rows: Vec<Vec<X>>,
    heads: Heads,
    /// Per segment: length and `seen` of its sequence at the last sync.
    lens: Vec<u32>,
    seen: Vec<u32>,
}

impl<X: Copy> RowState<X> {
    pub(crate) fn new(heads: Heads) -> Self {
        Self {
            rows: Vec::new(),
            heads,
            lens: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Brings the state to the cache's current shape (see the type docs).
    pub(crate) fn sync<B: Backend, T: Element>(
        &mut self,
        op: &'static str,
        ctx: &StepCtx<'_, B, T>,
        fill: X,
    ) -> Result<()> {
        let geom = ctx.geom();
        let (hq, hkv) = (geom.num_q_heads(), geom.num_kv_heads());
        let segs = ctx.kv.segments();
        let nblocks = ctx.batch() * self.heads.blocks_per_seq(geom);
        if self.rows.len() != nblocks {
            if !self.rows.is_empty() {
                return Err(shape(
                    op,
                    "the batch or head geometry changed; call reset() between requests",
                ));
            }
            self.rows = vec![Vec::new(); nblocks];
            self.lens = vec![0; segs.num_segments()];
            self.seen = vec![0; ctx.batch()];
        }
        for s in 0..segs.num_segments() {
            let b = s / hkv;
            let grown = (ctx.kv.seen(b) as u32).saturating_sub(self.seen[b]);
            let want = self.lens[s] + grown;
            if segs.len_of(s) as u32 != want {
                return Err(shape(
                    op,
                    format!(
                        "segment {s} holds {} tokens, the policy expected {want} \
                         (was an Evict / Drop / Merge plan not applied?)",
                        segs.len_of(s)
                    ),
                ));
            }
        }
        for (i, v) in self.rows.iter_mut().enumerate() {
            let s = segment_of(i, self.heads, hq, hkv);
            v.resize(segs.len_of(s), fill);
        }
        self.lens = segs.lens().to_vec();
        self.seen = (0..ctx.batch()).map(|b| ctx.kv.seen(b) as u32).collect();
        Ok(())
    }

    /// Takes the cache's current shape as synced (vectors of the segments'
    /// lengths filled with `fill`), without checking how it got there.
    pub(crate) fn adopt<B: Backend, T: Element>(&mut self, ctx: &StepCtx<'_, B, T>, fill: X) {
        let geom = ctx.geom();
        let (hq, hkv) = (geom.num_q_heads(), geom.num_kv_heads());
        let segs = ctx.kv.segments();
        let nblocks = ctx.batch() * self.heads.blocks_per_seq(geom);
        self.rows = (0..nblocks)
            .map(|i| vec![fill; segs.len_of(segment_of(i, self.heads, hq, hkv))])
            .collect();
        self.lens = segs.lens().to_vec();
        self.seen = (0..ctx.batch()).map(|b| ctx.kv.seen(b) as u32).collect();
    }

    /// The group treatment of the blocks.
    pub(crate) fn heads(&self) -> Heads {
        self.heads
    }

    /// Follows a compaction of the cache.
    pub(crate) fn retain(&mut self, c: &Compaction, hq: usize, hkv: usize) {
        for (i, v) in self.rows.iter_mut().enumerate() {
            c.apply(segment_of(i, self.heads, hq, hkv), v);
        }
        for (s, l) in self.lens.iter_mut().enumerate() {
            if let Some(&n) = c.lens.get(s) {
                *l = n;
            }
        }
    }
}

/// The last `cap` query vectors of every sequence, kept on the device as a
/// ring `[batch * cap, Hq * D]` (MorphKV's exact re-scoring mode).
pub(crate) struct QueryWindow<B: Backend, T: Element> {
    cap: usize,
    width: usize,
    buf: Option<B::Buffer<T>>,
    count: Vec<usize>,
    head: Vec<usize>,
}

impl<B: Ops, T: Element> QueryWindow<B, T> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            width: 0,
            buf: None,
            count: Vec::new(),
            head: Vec::new(),
        }
    }

    /// Pushes the queries of a step (`q_rows` per sequence); keeps the last `cap`.
    pub(crate) fn push(
        &mut self,
        be: &B,
        q: &B::Buffer<T>,
        q_rows: &Ragged,
        width: usize,
    ) -> Result<()> {
        let batch = q_rows.num_segments();
        if self.cap == 0 {
            return Ok(());
        }
        if self.buf.is_none() || self.width != width || self.count.len() != batch {
            // Ring rows are u32 row indices: a window too large for them (or
            // for memory) is an error here, not a wrapped index.
            const OP: &str = "MorphKv query window";
            let rows = Size::new(OP, "query rows", batch)
                .times(self.cap)
                .get_u32()? as usize;
            let n = Size::new(OP, "query values", rows)
                .times(width)
                .elements::<T>()?;
            self.buf = Some(be.zeros(n)?);
            self.width = width;
            self.count = vec![0; batch];
            self.head = vec![0; batch];
        }
        let mut src = Vec::new();
        let mut dst = Vec::new();
        for b in 0..batch {
            let r = q_rows.range(b);
            let take = r.len().min(self.cap);
            for row in r.end - take..r.end {
                src.push(row as u32);
                dst.push((b * self.cap + self.head[b]) as u32);
                self.head[b] = (self.head[b] + 1) % self.cap;
            }
            self.count[b] = (self.count[b] + take).min(self.cap);
        }
        if src.is_empty() {
            return Ok(());
        }
        let mut tmp = be.zeros::<T>(src.len() * width)?;
        ops::gather_rows(be, width, &src, q, &mut tmp)?;
        if let Some(buf) = self.buf.as_mut() {
            ops::scatter_rows(be, width, &dst, &tmp, buf)?;
        }
        Ok(())
    }

    /// The held queries packed in chronological order, `[total, Hq, D]`, with
    /// their row partition. `None` when empty.
    pub(crate) fn packed(&self, be: &B) -> Result<Option<(B::Buffer<T>, Ragged)>> {
        let Some(buf) = self.buf.as_ref() else {
            return Ok(None);
        };
        let mut idx = Vec::new();
        let mut lens = Vec::with_capacity(self.count.len());
        for b in 0..self.count.len() {
            let n = self.count[b];
            let start = (self.head[b] + (self.cap - n)) % self.cap;
            for i in 0..n {
                idx.push((b * self.cap + (start + i) % self.cap) as u32);
            }
            lens.push(n as u32);
        }
        if idx.is_empty() {
            return Ok(None);
        }
        let mut out = be.zeros::<T>(idx.len() * self.width)?;
        ops::gather_rows(be, self.width, &idx, buf, &mut out)?;
        Ok(Some((out, Ragged::from_lens(&lens)?)))
    }
}

/// Reduces per-query-head score vectors (index `b * Hq + h`) to one vector
/// per segment (index `b * Hkv + g`).
pub(crate) fn reduce_group(
    scores: &[Vec<f64>],
    batch: usize,
    hq: usize,
    hkv: usize,
    how: GqaReduce,
) -> Vec<Vec<f64>> {
    let g = hq / hkv.max(1);
    let mut out = Vec::with_capacity(batch * hkv);
    for b in 0..batch {
        for kv in 0..hkv {
            let heads = &scores[b * hq + kv * g..b * hq + (kv + 1) * g];
            let n = heads.first().map_or(0, |v| v.len());
            let mut acc = vec![
                match how {
                    GqaReduce::Max => f64::NEG_INFINITY,
                    _ => 0.0,
                };
                n
            ];
            for hs in heads {
                for (a, &x) in acc.iter_mut().zip(hs) {
                    match how {
                        GqaReduce::Max => *a = a.max(x),
                        _ => *a += x,
                    }
                }
            }
            if how == GqaReduce::Mean {
                acc.iter_mut().for_each(|a| *a /= g as f64);
            }
            out.push(acc);
        }
    }
    out
}

/// Orders candidates best first: larger score, ties to the earlier arrival.
fn better(scores: &[f64], arrivals: &[u32], a: u32, b: u32) -> std::cmp::Ordering {
    scores[b as usize]
        .partial_cmp(&scores[a as usize])
        .unwrap_or(std::cmp::Ordering::Equal)
        .then(arrivals[a as usize].cmp(&arrivals[b as usize]))
}

fn check_nan(op: &'static str, scores: &[f64], cand: &[u32]) -> Result<()> {
    if let Some(&j) = cand
        .iter()
        .find(|&&j| scores.get(j as usize).is_none_or(|x| x.is_nan()))
    {
        return Err(Error::NonFinite {
            op,
            what: format!("score of token {j} is NaN or missing"),
        });
    }
    Ok(())
}

/// The `k` best candidates by score (larger first, ties to the earlier
/// arrival), unsorted; O(|cand|). NaN scores are an error.
pub(crate) fn top_k(
    op: &'static str,
    scores: &[f64],
    arrivals: &[u32],
    cand: &[u32],
    k: usize,
) -> Result<Vec<u32>> {
    check_nan(op, scores, cand)?;
    let mut c = cand.to_vec();
    if k < c.len() {
        c.select_nth_unstable_by(k, |&a, &b| better(scores, arrivals, a, b));
        c.truncate(k);
    }
    Ok(c)
}

/// The `k` worst candidates (the complement of [`top_k`]); O(|cand|).
pub(crate) fn bottom_k(
    op: &'static str,
    scores: &[f64],
    arrivals: &[u32],
    cand: &[u32],
    k: usize,
) -> Result<Vec<u32>> {
    check_nan(op, scores, cand)?;
    let mut c = cand.to_vec();
    if k == 0 {
        return Ok(Vec::new());
    }
    if k == 1 {
        let worst = c
            .iter()
            .copied()
            .reduce(|a, b| {
                if better(scores, arrivals, a, b) == std::cmp::Ordering::Greater {
                    a
                } else {
                    b
                }
            })
            .into_iter()
            .collect();
        return Ok(worst);
    }
    if k < c.len() {
        let keep = c.len() - k;
        c.select_nth_unstable_by(keep, |&a, &b| better(scores, arrivals, a, b));
        c.drain(..keep);
    }
    Ok(c)
}

/// Builds a `KvHead` list from per-segment row sets (sorted here).
pub(crate) fn keep_list(sets: Vec<Vec<u32>>) -> Result<IndexList> {
    let sets: Vec<IndexSet> = sets.into_iter().map(IndexSet::from_unsorted).collect();
    IndexList::from_sets(Scope::KvHead, &sets)
}

/// Per segment: protected rows (the first `sink` and the last `recent`
/// arrivals of the sequence) and the candidates, by row.
pub(crate) fn split_protected(
    arrivals: &[u32],
    seen: usize,
    sink: usize,
    recent: usize,
) -> (Vec<u32>, Vec<u32>) {
    let (lo, hi) = candidate_arrivals(seen, sink, recent);
    let mut prot = Vec::new();
    let mut cand = Vec::with_capacity(arrivals.len());
    for (r, &a) in arrivals.iter().enumerate() {
        if a < lo || a >= hi {
            prot.push(r as u32);
        } else {
            cand.push(r as u32);
        }
    }
    (prot, cand)
}

/// The arrivals `lo..hi` of the candidates of [`split_protected`]: every
/// token is protected outside them.
pub(crate) fn candidate_arrivals(seen: usize, sink: usize, recent: usize) -> (u32, u32) {
    let lo = sink.min(u32::MAX as usize) as u32;
    let hi = seen.saturating_sub(recent).min(u32::MAX as usize) as u32;
    (lo, hi)
}

/// Score-based eviction: per segment whose length exceeds its budget, drop
/// the worst candidates (outside the protected windows) by `scores[s]`
/// (higher is more important). Returns the plan and its compaction
/// (`None` when nothing is evicted).
///
/// The scores may be f32 (TOVA ranks the attention's own f32 weights):
/// f32 → f64 is exact and monotone, so every comparison, tie and NaN check
/// decides as it would on the widened values; only the general path
/// (more than one token to drop) widens, per segment.
pub(crate) fn evict_by_scores<B: Backend, T: Element, X: Score, S: AsRef<[X]>>(
    op: &'static str,
    ctx: &StepCtx<'_, B, T>,
    budget: &Budget,
    scores: &[S],
) -> Result<(Plan, Option<Compaction>)> {
    let segs = ctx.kv.segments();
    let hkv = ctx.geom().num_kv_heads();
    if scores.len() != segs.num_segments() {
        return Err(shape(
            op,
            format!(
                "{} score vectors for {} segments",
                scores.len(),
                segs.num_segments()
            ),
        ));
    }
    let mut any = false;
    let mut sets = Vec::with_capacity(segs.num_segments());
    for (s, sc) in scores.iter().enumerate() {
        let sc = sc.as_ref();
        let (b, g) = (s / hkv, s % hkv);
        let len = segs.len_of(s);
        if sc.len() != len {
            return Err(shape(
                op,
                format!("segment {s}: {} scores for {len} tokens", sc.len()),
            ));
        }
        let bud = budget.resolve(op, ctx.layer, ctx.num_layers, g, hkv, ctx.kv.seen(b))?;
        if len <= bud {
            sets.push(IndexSet::default());
            continue;
        }
        any = true;
        let arr = ctx.kv.arrivals(s);
        let seen = ctx.kv.seen(b);
        let (sink, recent) = (budget.sink, budget.recent);
        let drop = match worst_one_by(op, sc, |x| x, arr, seen, sink, recent, len - bud) {
            Some(one) => one?,
            None => {
                let (prot, cand) = split_protected(arr, seen, budget.sink, budget.recent);
                let keep_cand = bud.saturating_sub(prot.len());
                let wide: Vec<f64> = sc.iter().map(|&x| x.into()).collect();
                bottom_k(op, &wide, arr, &cand, cand.len().saturating_sub(keep_cand))?
            }
        };
        sets.push(IndexSet::from_unsorted(drop));
    }
    if !any {
        return Ok((Plan::KeepAll, None));
    }
    let list = IndexList::from_sets(Scope::KvHead, &sets)?;
    let c = Compaction::from_drop(segs, &list);
    Ok((Plan::Drop(list), Some(c)))
}

/// The decode steady state of [`evict_by_scores`] in one pass without
/// allocating: when one token must go and the protected windows leave
/// at least two candidates, the worst candidate (lowest score, ties to the
/// later arrival). `None` when the general path applies.
/// Ranks `key(scores[r])` (the identity for [`evict_by_scores`]; MorphKV
/// ranks its running sums clamped at 0 without materialising them).
#[allow(clippy::too_many_arguments)]
pub(crate) fn worst_one_by<X: Score>(
    op: &'static str,
    scores: &[X],
    key: impl Fn(X) -> X,
    arrivals: &[u32],
    seen: usize,
    sink: usize,
    recent: usize,
    excess: usize,
) -> Option<Result<Vec<u32>>> {
    if excess != 1 || scores.len() < arrivals.len() {
        return None;
    }
    let (lo, hi) = candidate_arrivals(seen, sink, recent);
    let (mut best, mut n) = (None::<u32>, 0usize);
    for (r, &a) in arrivals.iter().enumerate() {
        if a < lo || a >= hi {
            continue;
        }
        let x = key(scores[r]);
        // NaN is the only value unequal to itself (also for f32).
        #[allow(clippy::eq_op)]
        if x != x {
            return Some(Err(Error::NonFinite {
                op,
                what: format!("score of token {r} is NaN"),
            }));
        }
        n += 1;
        let worse = match best {
            None => true,
            Some(w) => {
                let y = key(scores[w as usize]);
                x < y || (x == y && a > arrivals[w as usize])
            }
        };
        if worse {
            best = Some(r as u32);
        }
    }
    // With fewer than two candidates the protected windows decide the
    // count: the general path handles it.
    (n >= 2).then(|| Ok(best.into_iter().collect()))
}

/// A score element [`evict_by_scores`] ranks: f64, or the f32 weights of
/// the attention evidence (widened exactly where the general path needs it).
pub(crate) trait Score: Copy + PartialOrd + Into<f64> {}
impl Score for f64 {}
impl Score for f32 {}

/// Per-layer state storage, grown on first use.
pub(crate) fn layer_slot<S: Default>(v: &mut Vec<S>, layer: usize) -> &mut S {
    if v.len() <= layer {
        v.resize_with(layer + 1, S::default);
    }
    &mut v[layer]
}

/// Checks a scorer's output (one vector per block of `heads`, each as long
/// as its segment, every score finite and non-negative, every sum finite)
/// and returns each vector's sum, in the one pass of [`simd::sum_checked_f64`] (bitwise
/// [`simd::sum8_f64`]).
pub(crate) fn checked_sums<B: Backend, T: Element>(
    op: &'static str,
    ctx: &StepCtx<'_, B, T>,
    heads: Heads,
    scores: &[Vec<f64>],
) -> Result<Vec<f64>> {
    let g = ctx.geom();
    let segs = ctx.kv.segments();
    let want = ctx.batch() * heads.blocks_per_seq(g);
    if scores.len() != want {
        return Err(shape(
            op,
            format!(
                "the scorer returned {} vectors, expected {want}",
                scores.len()
            ),
        ));
    }
    let isa = crate::cpu::isa::detected();
    let mut sums = Vec::with_capacity(scores.len());
    for (i, v) in scores.iter().enumerate() {
        let len = segs.len_of(segment_of(i, heads, g.num_q_heads(), g.num_kv_heads()));
        if v.len() != len {
            return Err(shape(
                op,
                format!("scorer vector {i} has {} scores for {len} tokens", v.len()),
            ));
        }
        // A vectorised sum and check (the CPU's pass); the search for the
        // message only on failure.
        let (sum, ok) = simd::sum_checked_f64(isa, v);
        if !ok {
            let what = match v.iter().find(|x| !x.is_finite() || **x < 0.0) {
                Some(x) => {
                    format!("scorer vector {i} holds {x} (scores must be finite and non-negative)")
                }
                None => format!("scorer vector {i} sums to {sum}"),
            };
            return Err(Error::NonFinite { op, what });
        }
        sums.push(sum);
    }
    Ok(sums)
}

/// Host rows of a [`HostBlocks`] layout as f64 vectors (one per block).
pub(crate) fn blocks_f64(h: &HostBlocks<'_>) -> Vec<Vec<f64>> {
    (0..h.num_blocks())
        .map(|i| h.block(i).iter().map(|&x| f64::from(x)).collect())
        .collect()
}

/// The KV view's rows in arrival order for segment `s` (identity on a
/// cache that was never compacted).
pub(crate) fn arrival_order<B: Backend, T: Element>(kv: &dyn KvView<B, T>, s: usize) -> Vec<u32> {
    let arr = kv.arrivals(s);
    let mut rows: Vec<u32> = (0..arr.len() as u32).collect();
    if arr.windows(2).any(|w| w[1] < w[0]) {
        rows.sort_by_key(|&r| arr[r as usize]);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Reference;

    #[test]
    fn top_and_bottom_k_break_ties_by_arrival_and_reject_nan() {
        let s = [1.0, 3.0, 3.0, 0.5, 3.0];
        let arr = [0, 1, 2, 3, 4];
        let mut k = top_k("t", &s, &arr, &[0, 1, 2, 3, 4], 2).unwrap();
        k.sort_unstable();
        assert_eq!(k, [1, 2]);
        let mut d = bottom_k("t", &s, &arr, &[0, 1, 2, 3, 4], 3).unwrap();
        d.sort_unstable();
        assert_eq!(d, [0, 3, 4]);
        assert_eq!(bottom_k("t", &s, &arr, &[1, 2, 4], 1).unwrap(), [4]);
        assert!(top_k("t", &[f64::NAN, 1.0], &[0, 1], &[0, 1], 1).is_err());
    }

    /// The one-pass steady state (MorphKV's clamped sums, TOVA's and H2O's
    /// scores) drops exactly the row the general path drops: random scores
    /// with ties, negatives and zeros, rows in hole-filled arrival order.
    #[test]
    fn worst_one_by_equals_bottom_k_on_the_keyed_scores() {
        let mut rng = crate::eval::Rng::new(5);
        for case in 0..400 {
            let n = 2 + case % 37;
            let vals = [-1e-17, -0.5, 0.0, 0.25, 0.25, 1.0, 3.0];
            let scores: Vec<f64> = (0..n)
                .map(|_| vals[(rng.uniform() * vals.len() as f64) as usize % vals.len()])
                .collect();
            // Arrivals: a permutation of 0..n (eviction fills holes from the tail).
            let mut arr: Vec<u32> = (0..n as u32).collect();
            for i in (1..n).rev() {
                arr.swap(i, (rng.uniform() * (i + 1) as f64) as usize % (i + 1));
            }
            let (sink, recent) = (case % 3, case % 5);
            let key = |x: f64| x.max(0.0);
            let keyed: Vec<f64> = scores.iter().map(|&x| key(x)).collect();
            let (_, cand) = split_protected(&arr, n, sink, recent);
            let got = worst_one_by("t", &scores, key, &arr, n, sink, recent, 1);
            match got {
                Some(got) => {
                    assert!(cand.len() >= 2, "case {case}");
                    let want = bottom_k("t", &keyed, &arr, &cand, 1).unwrap();
                    assert_eq!(got.unwrap(), want, "case {case}: {scores:?} {arr:?}");
                }
                None => assert!(cand.len() < 2, "case {case}"),
            }
        }
        assert!(
            worst_one_by("t", &[0.0f64, f64::NAN], |x| x, &[0, 1], 2, 0, 0, 1)
                .unwrap()
                .is_err()
        );
    }

    #[test]
    fn protected_windows_follow_arrivals() {
        // Rows in arrival order, then after a hole fill (row 2 holds the newest).
        assert_eq!(
            split_protected(&[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 10, 2, 3),
            (vec![0, 1, 7, 8, 9], vec![2, 3, 4, 5, 6])
        );
        assert_eq!(
            split_protected(&[0, 1, 9, 3, 4, 5, 6, 7, 8], 10, 2, 3),
            (vec![0, 1, 2, 7, 8], vec![3, 4, 5, 6])
        );
    }

    #[test]
    fn compaction_follows_the_cache_rule() {
        let segs = Segments::uniform(1, 1, 7).unwrap();
        let drop = IndexList::new(Scope::KvHead, vec![0, 2], vec![1, 3]).unwrap();
        let c = Compaction::from_drop(&segs, &drop);
        let mut v: Vec<u32> = (0..7).collect();
        c.apply(0, &mut v);
        assert_eq!(v, [0, 5, 2, 6, 4]);
        let keep = IndexList::new(Scope::KvHead, vec![0, 5], vec![0, 2, 4, 5, 6]).unwrap();
        assert_eq!(Compaction::from_keep(&keep), c);
    }

    #[test]
    fn query_window_keeps_the_last_queries_in_order() {
        let be = Reference;
        let mut w = QueryWindow::<Reference, f32>::new(3);
        // Two sequences, width 1: chunks of 2 then 2 then 1 and 0 rows.
        w.push(
            &be,
            &vec![1.0, 2.0, 10.0, 20.0],
            &Ragged::from_lens(&[2, 2]).unwrap(),
            1,
        )
        .unwrap();
        w.push(
            &be,
            &vec![3.0, 4.0, 30.0],
            &Ragged::from_lens(&[2, 1]).unwrap(),
            1,
        )
        .unwrap();
        let (q, rows) = w.packed(&be).unwrap().unwrap();
        assert_eq!(rows.indptr(), &[0, 3, 6]);
        assert_eq!(q, vec![2.0, 3.0, 4.0, 10.0, 20.0, 30.0]);
    }

    #[test]
    fn group_reductions() {
        let s = vec![vec![1.0, 4.0], vec![3.0, 2.0]];
        assert_eq!(
            reduce_group(&s, 1, 2, 1, GqaReduce::Sum),
            vec![vec![4.0, 6.0]]
        );
        assert_eq!(
            reduce_group(&s, 1, 2, 1, GqaReduce::Mean),
            vec![vec![2.0, 3.0]]
        );
        assert_eq!(
            reduce_group(&s, 1, 2, 1, GqaReduce::Max),
            vec![vec![3.0, 4.0]]
        );
    }
}
