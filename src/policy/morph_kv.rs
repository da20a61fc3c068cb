//! `MorphKv` (Ghadia et al., ICML 2025): a constant-size cache for long
//! responses, pruned at every decode step by the attention of the last `W`
//! queries.
//!
//! After each decode step's attention the cache of every KV head is pruned
//! back to `C` tokens: *recent* = the last `W` tokens by arrival (always
//! kept) and *old* = the rest, of which the `C − W` with the largest score
//! stay (ties to the earlier arrival). So the next step attends to `C + 1`
//! tokens, as in the paper, and the first decode step compresses the
//! prompt. The score fuses the attention `a_{w,j}` of each of the `W` most
//! recent queries (the current one included: at the next step they are the
//! `W` previous queries of the paper) over the window ([`Fusion`]):
//! `Sum` gives `s_j = Σ_w a_{w,j}`, `Max` gives `s_j = max_w a_{w,j}`.
//!
//! Two ways to get `a_{w,j}` ([`MorphScoring`]):
//!
//! - **`Evidence`** (default): the weights each remembered query's own
//!   attention produced (the decode op's evidence, and the prefill window's
//!   last `W` rows), GQA `max` over the group (the Mistral patch's rule,
//!   reduced by the op). Each query's weights are normalised over the cache
//!   *it* attended, not renormalised over the old tokens at pruning time
//!   (the paper's rule): the per-query constants this drops change the
//!   relative weight of window queries in the fusion, not any query's own
//!   ranking. Cost per step O(L) host work per KV head (the `Sum` fusion is
//!   a running sum; `Max` takes O(W·L)), memory `W` f32 rows per KV head.
//! - **`Rescore`**: the paper's exact rule. The `W` query vectors are kept
//!   and re-scored every step in one batched `qk_logits` over the cache,
//!   `a_{w,h,j} = softmax_{j ∈ old}(s · q_w · k_j)`, GQA per [`MorphGqa`]
//!   (`MaxOfSoftmax` or `SumLogits`). Cost per step O(W·G·L·D) on the
//!   backend plus O(W·Hq·L) host work: about `W` times the Q·K work of the
//!   attention it prunes (`docs/results.md`).
#![forbid(unsafe_code)]

use std::collections::VecDeque;

use super::evidence::{
    Compaction, QueryWindow, RowState, bottom_k, keep_list, layer_slot, split_protected,
    worst_one_by,
};
use super::{Capabilities, Heads, KvPolicy, Needs, Plan, StepCtx, Window};
use crate::backend::Ops;
use crate::dtype::Element;
use crate::error::{Result, budget, config, shape};
use crate::layout::Segments;
use crate::ops;

/// Aggregation over the query window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fusion {
    /// `sum_fused`: `s_j = Σ_w a_{w,j}`.
    Sum,
    /// `max_fused`: `s_j = max_w a_{w,j}`.
    Max,
}

/// GQA reduction of MorphKV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MorphGqa {
    /// Softmax per query head, then max over the group (the Mistral patch; default).
    MaxOfSoftmax,
    /// Sum the group's logits, then one softmax (the Llama patch; `Rescore` only).
    SumLogits,
}

/// Where the window's attention comes from (see the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MorphScoring {
    /// The attention ops' own weights, recorded per query (default).
    #[default]
    Evidence,
    /// Re-score the kept query vectors every step (the paper's exact rule).
    Rescore,
}

/// Settings of [`MorphKv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MorphKvConfig {
    /// Recent window `W` (queries remembered and tokens protected).
    pub window: usize,
    /// Capacity `C`: the cache is pruned to `C` tokens per KV head after
    /// every decode step (attention sees `C + 1`).
    pub capacity: usize,
    /// Window fusion.
    pub fusion: Fusion,
    /// GQA reduction.
    pub gqa: MorphGqa,
    /// Where the window's attention comes from.
    pub scoring: MorphScoring,
}

impl Default for MorphKvConfig {
    /// The LongBench setting of the reference code: `W = 32`, `C = 2000`, sum.
    fn default() -> Self {
        Self {
            window: 32,
            capacity: 2000,
            fusion: Fusion::Sum,
            gqa: MorphGqa::MaxOfSoftmax,
            scoring: MorphScoring::Evidence,
        }
    }
}

/// The recorded attention rows of one layer (`Evidence` scoring): per
/// segment the last `W` rows, oldest first, and their running sum.
#[derive(Default)]
struct Rows {
    ring: Vec<VecDeque<Vec<f32>>>,
    sums: Option<RowState<f64>>,
}

/// MorphKV eviction.
pub struct MorphKv<B: Ops, T: Element> {
    cfg: MorphKvConfig,
    rows: Vec<Rows>,
    queries: Vec<Option<QueryWindow<B, T>>>,
}

impl<B: Ops, T: Element> MorphKv<B, T> {
    /// Validates the config: `1 ≤ W < C`; `SumLogits` needs `Rescore`.
    pub fn new(cfg: MorphKvConfig) -> Result<Self> {
        if cfg.window == 0 {
            return Err(config("MorphKv", "window must be at least 1"));
        }
        if cfg.window >= cfg.capacity {
            return Err(budget(
                "MorphKv",
                format!(
                    "window {} is not smaller than the capacity {}",
                    cfg.window, cfg.capacity
                ),
            ));
        }
        if cfg.gqa == MorphGqa::SumLogits && cfg.scoring == MorphScoring::Evidence {
            return Err(config(
                "MorphKv",
                "SumLogits softmaxes group-summed logits, which the attention evidence does not hold: use MorphScoring::Rescore",
            ));
        }
        Ok(Self {
            cfg,
            rows: Vec::new(),
            queries: Vec::new(),
        })
    }

    fn query_window(&mut self, layer: usize) -> &mut QueryWindow<B, T> {
        let w = self.cfg.window;
        layer_slot(&mut self.queries, layer).get_or_insert_with(|| QueryWindow::new(w))
    }

    /// Pushes one query's weights (`block(s)` per segment) into the ring.
    fn record<'a>(&mut self, layer: usize, nseg: usize, block: impl Fn(usize) -> &'a [f32]) {
        let w = self.cfg.window;
        let sum = self.cfg.fusion == Fusion::Sum;
        let st = layer_slot(&mut self.rows, layer);
        if st.ring.len() != nseg {
            st.ring = (0..nseg).map(|_| VecDeque::new()).collect();
        }
        for s in 0..nseg {
            let row = block(s);
            let old = if st.ring[s].len() == w {
                st.ring[s].pop_front()
            } else {
                None
            };
            if sum && let Some(acc) = st.sums.as_mut().and_then(|x| x.rows.get_mut(s)) {
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += f64::from(p);
                }
                for (a, &p) in acc.iter_mut().zip(old.iter().flatten()) {
                    *a -= f64::from(p);
                }
            }
            // The row leaving the window lends its allocation to the new one.
            let mut r = old.unwrap_or_default();
            r.clear();
            r.extend_from_slice(row);
            st.ring[s].push_back(r);
        }
    }

    /// Scores of segment `s` from the ring (`Evidence`).
    fn ring_scores(&self, layer: usize, s: usize, len: usize) -> Vec<f64> {
        let Some(st) = self.rows.get(layer) else {
            return vec![0.0; len];
        };
        match self.cfg.fusion {
            Fusion::Sum => st.sums.as_ref().and_then(|x| x.rows.get(s)).map_or_else(
                || vec![0.0; len],
                |v| v.iter().map(|x| x.max(0.0)).collect(),
            ),
            Fusion::Max => {
                let mut m = vec![0.0f64; len];
                for row in st.ring.get(s).into_iter().flatten() {
                    for (a, &p) in m.iter_mut().zip(row) {
                        *a = a.max(f64::from(p));
                    }
                }
                m
            }
        }
    }

    /// Scores of every segment by re-scoring the kept queries (`Rescore`).
    fn rescore(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Vec<Vec<f64>>> {
        let g = *ctx.geom();
        let (hq, hkv, grp) = (g.num_q_heads(), g.num_kv_heads(), g.group());
        let segs = ctx.kv.segments();
        let w = self.cfg.window;
        let packed = self.query_window(ctx.layer).packed(ctx.backend)?;
        let mut out: Vec<Vec<f64>> = (0..segs.num_segments())
            .map(|s| vec![0.0; segs.len_of(s)])
            .collect();
        let Some((q, rows)) = packed else {
            return Ok(out);
        };
        let p = ops::QkParams {
            geom: g,
            q_rows: &rows,
            segments: segs,
            causal: false,
            scale: ctx.scale,
        };
        let layout = ops::qk_layout(&p)?;
        let mut logits = ctx.backend.zeros::<f32>(layout.blocks.total())?;
        ops::qk_logits(ctx.backend, &p, &q, ctx.kv.k(), &mut logits)?;
        let lg = ctx.backend.download(&logits)?;
        for (s, score) in out.iter_mut().enumerate() {
            let (b, kv) = (s / hkv, s % hkv);
            let len = segs.len_of(s);
            let arr = ctx.kv.arrivals(s);
            let old_end = ctx.kv.seen(b).saturating_sub(w) as u32;
            let old: Vec<usize> = (0..len).filter(|&j| arr[j] < old_end).collect();
            for r in 0..rows.len_of(b) {
                let row = |h: usize| {
                    let blk = &lg[layout.blocks.range(b * hq + h)];
                    &blk[r * len..(r + 1) * len]
                };
                let a: Vec<f64> = match self.cfg.gqa {
                    MorphGqa::MaxOfSoftmax => {
                        let mut a = vec![f64::NEG_INFINITY; old.len()];
                        for h in kv * grp..(kv + 1) * grp {
                            let z: Vec<f64> = old.iter().map(|&j| f64::from(row(h)[j])).collect();
                            for (m, p) in a.iter_mut().zip(softmax(&z)) {
                                *m = m.max(p);
                            }
                        }
                        a
                    }
                    MorphGqa::SumLogits => {
                        let mut z = vec![0.0f64; old.len()];
                        for h in kv * grp..(kv + 1) * grp {
                            for (x, &j) in z.iter_mut().zip(&old) {
                                *x += f64::from(row(h)[j]);
                            }
                        }
                        softmax(&z)
                    }
                };
                for (&j, p) in old.iter().zip(a) {
                    match self.cfg.fusion {
                        Fusion::Sum => score[j] += p,
                        Fusion::Max => score[j] = score[j].max(p),
                    }
                }
            }
        }
        Ok(out)
    }

    /// The worst old token of segment `s` when exactly one must go, ranked
    /// by the running sums clamped at 0 as [`Self::ring_scores`] ranks them,
    /// in one pass without allocating (`None`: the general path applies).
    fn worst_by_sums(
        &self,
        ctx: &StepCtx<'_, B, T>,
        s: usize,
        excess: usize,
    ) -> Option<Result<Vec<u32>>> {
        if self.cfg.fusion != Fusion::Sum {
            return None;
        }
        let sums = self.rows.get(ctx.layer)?.sums.as_ref()?.rows.get(s)?;
        let hkv = ctx.geom().num_kv_heads();
        worst_one_by(
            "MorphKv",
            sums,
            |x| x.max(0.0),
            ctx.kv.arrivals(s),
            ctx.kv.seen(s / hkv),
            0,
            self.cfg.window,
            excess,
        )
    }

    /// Prunes every segment over the capacity; the compaction for the state.
    /// `one(s, excess)` may answer a segment's drop set directly (the decode
    /// steady state); otherwise `scores(s, len)` ranks its old tokens.
    fn prune(
        &self,
        ctx: &StepCtx<'_, B, T>,
        one: &dyn Fn(usize, usize) -> Option<Result<Vec<u32>>>,
        scores: &dyn Fn(usize, usize) -> Vec<f64>,
    ) -> Result<(Plan, Option<Compaction>)> {
        const OP: &str = "MorphKv";
        let segs: &Segments = ctx.kv.segments();
        let hkv = ctx.geom().num_kv_heads();
        let c = self.cfg.capacity;
        if segs.lens().iter().all(|&l| l as usize <= c) {
            return Ok((Plan::KeepAll, None));
        }
        let mut sets = Vec::with_capacity(segs.num_segments());
        for s in 0..segs.num_segments() {
            let len = segs.len_of(s);
            if len <= c {
                sets.push(Vec::new());
                continue;
            }
            if let Some(drop) = one(s, len - c) {
                sets.push(drop?);
                continue;
            }
            let arr = ctx.kv.arrivals(s);
            let (_, old) = split_protected(arr, ctx.kv.seen(s / hkv), 0, self.cfg.window);
            let sc = scores(s, len);
            if sc.len() != len {
                return Err(shape(
                    OP,
                    format!("segment {s}: {} scores for {len} tokens", sc.len()),
                ));
            }
            sets.push(bottom_k(OP, &sc, arr, &old, len - c)?);
        }
        let list = keep_list(sets)?;
        let comp = Compaction::from_drop(segs, &list);
        Ok((Plan::Drop(list), Some(comp)))
    }
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return vec![0.0; z.len()];
    }
    let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

impl<B: Ops, T: Element> KvPolicy<B, T> for MorphKv<B, T> {
    fn name(&self) -> &'static str {
        "morph_kv"
    }
    fn capabilities(&self) -> Capabilities {
        let needs = match self.cfg.scoring {
            MorphScoring::Evidence => Needs {
                decode_probs: Some(Heads::Max),
                prefill_window: Some(Window {
                    queries: self.cfg.window,
                    heads: Heads::Max,
                    rows: true,
                }),
                ..Needs::default()
            },
            MorphScoring::Rescore => Needs::default(),
        };
        Capabilities {
            evicts: true,
            needs,
            ..Capabilities::default()
        }
    }
    fn on_prefill_chunk(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        if self.cfg.scoring == MorphScoring::Rescore {
            let g = *ctx.geom();
            self.query_window(ctx.layer).push(
                ctx.backend,
                ctx.queries,
                ctx.q_rows,
                g.num_q_heads() * g.head_dim(),
            )?;
        }
        Ok(Plan::KeepAll)
    }
    fn on_prefill_end(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        if self.cfg.scoring == MorphScoring::Rescore || ctx.evidence.window.is_none() {
            return Ok(Plan::KeepAll);
        }
        let (w, blocks) = ctx.window()?;
        let segs = ctx.kv.segments();
        let nseg = segs.num_segments();
        let st = layer_slot(&mut self.rows, ctx.layer);
        let sums = st.sums.get_or_insert_with(|| RowState::new(Heads::Max));
        sums.sync("MorphKv", ctx, 0.0)?;
        st.ring = (0..nseg).map(|_| VecDeque::new()).collect();
        let hkv = ctx.geom().num_kv_heads();
        for s in 0..nseg {
            let len = segs.len_of(s);
            let nrows = w.rows_for(ctx.q_rows.len_of(s / hkv));
            let blk = blocks.block(s);
            for r in 0..nrows {
                let row = blk[r * len..(r + 1) * len].to_vec();
                for (a, &p) in sums.rows[s].iter_mut().zip(&row) {
                    *a += f64::from(p);
                }
                st.ring[s].push_back(row);
            }
        }
        Ok(Plan::KeepAll)
    }
    fn on_decode_step(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        let segs = ctx.kv.segments();
        let nseg = segs.num_segments();
        let (hq, hkv) = (ctx.geom().num_q_heads(), ctx.geom().num_kv_heads());
        match self.cfg.scoring {
            MorphScoring::Evidence => {
                let probs = ctx.decode_probs()?;
                {
                    let st = layer_slot(&mut self.rows, ctx.layer);
                    let sums = st.sums.get_or_insert_with(|| RowState::new(Heads::Max));
                    sums.sync("MorphKv", ctx, 0.0)?;
                    for (s, ring) in st.ring.iter_mut().enumerate() {
                        for row in ring.iter_mut() {
                            row.resize(segs.len_of(s), 0.0);
                        }
                    }
                }
                self.record(ctx.layer, nseg, |s| probs.block(s));
                let (plan, comp) = self.prune(
                    ctx,
                    &|s, excess| self.worst_by_sums(ctx, s, excess),
                    &|s, len| self.ring_scores(ctx.layer, s, len),
                )?;
                if let Some(c) = comp {
                    let st = layer_slot(&mut self.rows, ctx.layer);
                    for (s, ring) in st.ring.iter_mut().enumerate() {
                        for row in ring.iter_mut() {
                            c.apply(s, row);
                        }
                    }
                    if let Some(x) = st.sums.as_mut() {
                        x.retain(&c, hq, hkv);
                    }
                }
                Ok(plan)
            }
            MorphScoring::Rescore => {
                let g = *ctx.geom();
                self.query_window(ctx.layer).push(
                    ctx.backend,
                    ctx.queries,
                    ctx.q_rows,
                    g.num_q_heads() * g.head_dim(),
                )?;
                if segs.lens().iter().all(|&l| l as usize <= self.cfg.capacity) {
                    return Ok(Plan::KeepAll);
                }
                let scores = self.rescore(ctx)?;
                Ok(self.prune(ctx, &|_, _| None, &|s, _| scores[s].clone())?.0)
            }
        }
    }
    fn reset(&mut self) {
        self.rows.clear();
        self.queries.clear();
    }
}
