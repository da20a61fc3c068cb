//! Evidence shared by the policies: attention rows over the cache (through
//! [`crate::ops`]), a device-side window of recent queries, and the host-side
//! selection helpers (O(N) per head on downloaded score vectors).
#![forbid(unsafe_code)]

use super::{Budget, GqaReduce, Plan, StepCtx};
use crate::backend::{Backend, Ops};
use crate::cache::LayerKv;
use crate::dtype::Element;
use crate::error::{Error, Result, shape};
use crate::layout::{IndexList, IndexSet, Ragged, Scope};
use crate::ops;

/// Attention rows of some queries over one layer's cache, on the host.
///
/// Block `(b, h)` holds `n_q(b)` rows, each as long as segment `(b, h / G)`.
#[derive(Clone, Debug)]
pub struct Probs {
    data: Vec<f32>,
    blocks: Ragged,
    q_rows: Ragged,
    kv_lens: Vec<usize>,
    hq: usize,
}

impl Probs {
    /// Number of query rows of sequence `b` (0 when out of range).
    pub fn n_q(&self, b: usize) -> usize {
        if b < self.q_rows.num_segments() {
            self.q_rows.len_of(b)
        } else {
            0
        }
    }
    /// Row `i` of (sequence `b`, query head `h`); empty when out of range.
    pub fn row(&self, b: usize, h: usize, i: usize) -> &[f32] {
        if b >= self.q_rows.num_segments() || h >= self.hq || i >= self.n_q(b) {
            return &[];
        }
        let blk = b * self.hq + h;
        let kv = self.kv_lens.get(blk).copied().unwrap_or(0);
        let start = self.blocks.range(blk).start + i * kv;
        self.data.get(start..start + kv).unwrap_or(&[])
    }
}

fn qk_rows<B: Ops, T: Element>(
    backend: &B,
    cache: &LayerKv<B, T>,
    q: &B::Buffer<T>,
    q_rows: &Ragged,
    causal: bool,
    scale: Option<f32>,
    softmax: bool,
) -> Result<Probs> {
    const OP: &str = "attention_probs";
    let geom = *cache.geom();
    let p = ops::QkParams {
        geom,
        q_rows,
        segments: cache.segments(),
        causal,
        scale,
    };
    let layout = ops::qk_layout(&p)?;
    let mut logits = backend.zeros::<f32>(layout.blocks.total())?;
    ops::qk_logits(backend, &p, q, cache.k(), &mut logits)?;
    let data = if softmax {
        let mut probs = backend.zeros::<f32>(layout.blocks.total())?;
        ops::softmax_rows(backend, &layout.rows, &logits, &mut probs)?;
        backend.download(&probs)?
    } else {
        backend.download(&logits)?
    };
    if let Some(i) = data.iter().position(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(Error::NonFinite {
            op: OP,
            what: format!(
                "attention score {i} is {} (NaN or infinite query / key?)",
                data[i]
            ),
        });
    }
    let segs = cache.segments();
    let mut kv_lens = Vec::with_capacity(segs.batch() * geom.num_q_heads());
    for b in 0..segs.batch() {
        for h in 0..geom.num_q_heads() {
            kv_lens.push(segs.len_of(segs.index(b, geom.kv_head(h))));
        }
    }
    Ok(Probs {
        data,
        blocks: layout.blocks,
        q_rows: q_rows.clone(),
        kv_lens,
        hq: geom.num_q_heads(),
    })
}

/// Softmax attention of `q` (`[total_q, Hq, D]`, rows per sequence in
/// `q_rows`, the last tokens of each segment) over the cache, computed with
/// [`ops::qk_logits`] and [`ops::softmax_rows`] and downloaded. NaN anywhere
/// is an [`Error::NonFinite`].
pub fn attention_probs<B: Ops, T: Element>(
    backend: &B,
    cache: &LayerKv<B, T>,
    q: &B::Buffer<T>,
    q_rows: &Ragged,
    causal: bool,
    scale: Option<f32>,
) -> Result<Probs> {
    qk_rows(backend, cache, q, q_rows, causal, scale, true)
}

/// Scaled logits `scale · q · k_j` (no mask), downloaded.
pub(crate) fn attention_logits<B: Ops, T: Element>(
    backend: &B,
    cache: &LayerKv<B, T>,
    q: &B::Buffer<T>,
    q_rows: &Ragged,
    scale: Option<f32>,
) -> Result<Probs> {
    qk_rows(backend, cache, q, q_rows, false, scale, false)
}

/// The last `cap` query vectors of every sequence, kept on the device as a
/// ring `[batch * cap, Hq * D]`.
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
            self.buf = Some(be.zeros(batch * self.cap * width)?);
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
            let start = (self.head[b] + self.cap - n) % self.cap;
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

/// The `k` best candidates by score (larger first, ties to the lower index),
/// returned unsorted. NaN scores are an error.
pub(crate) fn top_k(op: &'static str, scores: &[f64], cand: &[u32], k: usize) -> Result<Vec<u32>> {
    if let Some(&j) = cand
        .iter()
        .find(|&&j| scores.get(j as usize).is_none_or(|x| x.is_nan()))
    {
        return Err(Error::NonFinite {
            op,
            what: format!("score of token {j} is NaN or missing"),
        });
    }
    let mut c = cand.to_vec();
    c.sort_by(|&a, &b| {
        scores[b as usize]
            .partial_cmp(&scores[a as usize])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    c.truncate(k);
    Ok(c)
}

/// Builds a `KvHead` list from per-segment kept rows (sorted here).
pub(crate) fn keep_list(sets: Vec<Vec<u32>>) -> Result<IndexList> {
    let sets: Vec<IndexSet> = sets.into_iter().map(IndexSet::from_unsorted).collect();
    IndexList::from_sets(Scope::KvHead, &sets)
}

/// Per segment: protected rows (first `sink`, last `recent`) and candidates.
pub(crate) fn split_protected(len: usize, sink: usize, recent: usize) -> (Vec<u32>, Vec<u32>) {
    let lo = sink.min(len);
    let hi = len.saturating_sub(recent).max(lo);
    let prot = (0..lo as u32).chain(hi as u32..len as u32).collect();
    let cand = (lo as u32..hi as u32).collect();
    (prot, cand)
}

/// Score-based eviction: per segment whose length exceeds its budget, keep
/// the protected rows and the best candidates by `scores[s]` (higher is
/// more important). Returns `KeepAll` when nothing is evicted.
pub(crate) fn evict_by_scores<B: Backend, T: Element>(
    op: &'static str,
    ctx: &StepCtx<'_, B, T>,
    budget: &Budget,
    scores: &[Vec<f64>],
) -> Result<Plan> {
    let segs = ctx.cache.segments();
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
        let (b, g) = (s / hkv, s % hkv);
        let len = segs.len_of(s);
        if sc.len() != len {
            return Err(shape(
                op,
                format!("segment {s}: {} scores for {len} tokens", sc.len()),
            ));
        }
        let bud = budget.resolve(op, ctx.layer, ctx.num_layers, g, hkv, ctx.cache.seen(b))?;
        if len <= bud {
            sets.push((0..len as u32).collect());
            continue;
        }
        any = true;
        let (mut keep, cand) = split_protected(len, budget.sink, budget.recent);
        let k = bud.saturating_sub(keep.len());
        keep.extend(top_k(op, sc, &cand, k)?);
        sets.push(keep);
    }
    if any {
        Ok(Plan::Evict(keep_list(sets)?))
    } else {
        Ok(Plan::KeepAll)
    }
}

/// Keeps a per-(sequence, query head) token state in sync with the cache:
/// extends each vector with zeros for newly appended tokens; errors when a
/// vector is longer than its segment (a destructive plan was not applied).
pub(crate) fn sync_state<B: Backend, T: Element>(
    op: &'static str,
    ctx: &StepCtx<'_, B, T>,
    state: &mut Vec<Vec<f64>>,
) -> Result<()> {
    let geom = ctx.geom();
    let segs = ctx.cache.segments();
    let n = segs.batch() * geom.num_q_heads();
    if state.len() != n {
        if state.iter().any(|v| !v.is_empty()) {
            return Err(shape(
                op,
                "the batch changed; call reset() between requests",
            ));
        }
        *state = vec![Vec::new(); n];
    }
    for (i, v) in state.iter_mut().enumerate() {
        let (b, h) = (i / geom.num_q_heads(), i % geom.num_q_heads());
        let len = segs.len_of(segs.index(b, geom.kv_head(h)));
        if v.len() > len {
            return Err(shape(
                op,
                format!(
                    "policy state holds {} tokens but the cache segment {} (was an Evict plan not applied?)",
                    v.len(),
                    len
                ),
            ));
        }
        v.resize(len, 0.0);
    }
    Ok(())
}

/// Compacts a per-(sequence, query head) state along `keep` (KvHead scope).
pub(crate) fn retain_state(state: &mut [Vec<f64>], keep: &IndexList, hq: usize, hkv: usize) {
    let g = hq / hkv.max(1);
    for (i, v) in state.iter_mut().enumerate() {
        let (b, h) = (i / hq, i % hq);
        let s = b * hkv + h / g;
        if s < keep.num_lists() {
            *v = keep
                .list(s)
                .iter()
                .filter_map(|&j| v.get(j as usize).copied())
                .collect();
        }
    }
}

/// Per-layer state storage, grown on first use.
pub(crate) fn layer_slot<S: Default>(v: &mut Vec<S>, layer: usize) -> &mut S {
    if v.len() <= layer {
        v.resize_with(layer + 1, S::default);
    }
    &mut v[layer]
}

/// Checks a scorer's output: one vector per (sequence, query head), each as
/// long as its segment, every score finite and non-negative.
pub(crate) fn check_scores<B: Backend, T: Element>(
    op: &'static str,
    ctx: &StepCtx<'_, B, T>,
    scores: &[Vec<f64>],
) -> Result<()> {
    let g = ctx.geom();
    let segs = ctx.cache.segments();
    let want = ctx.batch() * g.num_q_heads();
    if scores.len() != want {
        return Err(shape(
            op,
            format!(
                "the scorer returned {} vectors, expected {want} (batch x query heads)",
                scores.len()
            ),
        ));
    }
    for (i, v) in scores.iter().enumerate() {
        let (b, h) = (i / g.num_q_heads(), i % g.num_q_heads());
        let len = segs.len_of(segs.index(b, g.kv_head(h)));
        if v.len() != len {
            return Err(shape(
                op,
                format!("scorer vector {i} has {} scores for {len} tokens", v.len()),
            ));
        }
        if let Some(x) = v.iter().find(|x| !x.is_finite() || **x < 0.0) {
            return Err(Error::NonFinite {
                op,
                what: format!(
                    "scorer vector {i} holds {x} (scores must be finite and non-negative)"
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Reference;

    #[test]
    fn top_k_breaks_ties_to_the_lower_index_and_rejects_nan() {
        let s = [1.0, 3.0, 3.0, 0.5, 3.0];
        let mut k = top_k("t", &s, &[0, 1, 2, 3, 4], 2).unwrap();
        k.sort_unstable();
        assert_eq!(k, [1, 2]);
        assert!(top_k("t", &[f64::NAN, 1.0], &[0, 1], 1).is_err());
    }

    #[test]
    fn protected_windows_split() {
        assert_eq!(
            split_protected(10, 2, 3),
            (vec![0, 1, 7, 8, 9], vec![2, 3, 4, 5, 6])
        );
        assert_eq!(split_protected(3, 2, 3), (vec![0, 1, 2], vec![]));
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
