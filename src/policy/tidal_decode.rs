//! `TidalDecode` (Yang et al. 2024): position-persistent sparse attention.
//! Nothing is evicted; decode layers play one of three roles:
//!
//! - **full** layers `0 .. sparse_layer_start` (default 2): dense;
//! - **selection** layers (`sparse_layer_start` and the re-selection layers,
//!   default `[13]`): dense for their own output, and they choose the tokens
//!   the following layers read: per query head `h`,
//!   `ρ_h = argTopK_{j < N−1} (s · q_h · k_{j, kv(h)})` with `k − 1` entries,
//!   plus the current token `N − 1` (always attended, excluded from the
//!   top-k; ties: lower index wins);
//! - **sparse** layers (all others): attend only to the positions chosen by
//!   the most recent selection layer *of the same decode step* (head `h` of
//!   a sparse layer uses the selection of head `h`), indexing their own KV
//!   cache.
//!
//! Dense fallback when `N ≤ k`. Prefill is dense (the paper's decode-only
//! method): the prefill hooks return `KeepAll`.
//!
//! **GQA.** [`GqaMode::PerQueryHead`] (the paper's rule; lists of scope
//! [`Scope::QueryHead`], so a KV head may load up to `G·k` distinct tokens)
//! or [`GqaMode::PerKvHeadSummed`]: the logits of the `G` query heads of a
//! group are summed and one top-k is taken per KV head (scope
//! [`Scope::KvHead`]); *a deviation from the paper* for GQA efficiency (`k`
//! rows per KV head).
//!
//! **Default k = 256**: the released benchmark default (the paper's sweeps
//! range from 32 to 4096; 128 in the needle example, 4096 on LongBench).
//!
//! **KV-cache correction** (paper; absent from the released code): tokens
//! decoded with sparse attention get slightly wrong K/V in later layers,
//! and the error accumulates over long generations. With
//! [`TidalDecodeConfig::correction_interval`] `= Some(i)`,
//! [`TidalDecode::correction_due`] says, after every `i` decode steps, that
//! the engine should re-run the tokens of
//! [`TidalDecode::correction_window`] through the model with **full**
//! attention in every layer and overwrite their K/V rows in every layer's
//! cache (positions unchanged, e.g. with `ops::scatter_rows`) before
//! continuing. The policy itself never touches K/V. Off by default.
//!
//! Cost per decode step: a selection layer reads the logits its own dense
//! attention wrote as evidence (no second Q·K pass) and runs one
//! `topk_rows` on them (plus O(N·Hq) host work for the summed variant);
//! sparse layers cost O(Hq·k) to hand the stored list out.
//!
//! Page: `docs/policies/tidal_decode.md`.
#![forbid(unsafe_code)]

use super::{Capabilities, KvPolicy, Needs, Plan, StepCtx};
use crate::backend::Ops;
use crate::dtype::Element;
use crate::error::{Result, budget, config, shape};
use crate::layout::{IndexList, IndexSet, Ragged, Scope};
use crate::ops;

const OP: &str = "TidalDecode";

/// How selection treats the query heads of a GQA group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GqaMode {
    /// One top-k per query head (the paper).
    #[default]
    PerQueryHead,
    /// One top-k per KV head on the group-summed logits (deviation, for
    /// GQA-efficient kernels).
    PerKvHeadSummed,
}

/// Settings of [`TidalDecode`]. `Default` holds the paper's values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TidalDecodeConfig {
    /// Tokens attended by sparse layers, the current token included
    /// (default 256); at least 1.
    pub k: usize,
    /// First selection layer; layers before it are dense (default 2).
    pub sparse_layer_start: usize,
    /// Re-selection layers, each after `sparse_layer_start` (default `[13]`,
    /// Llama-3-8B).
    pub reselect_layers: Vec<usize>,
    /// GQA rule.
    pub gqa: GqaMode,
    /// KV-cache correction every this many decode steps (`None` = off, the
    /// default).
    pub correction_interval: Option<usize>,
}

impl Default for TidalDecodeConfig {
    fn default() -> Self {
        Self {
            k: 256,
            sparse_layer_start: 2,
            reselect_layers: vec![13],
            gqa: GqaMode::PerQueryHead,
            correction_interval: None,
        }
    }
}

impl TidalDecodeConfig {
    /// Checks the settings; with `num_layers`, also that every selection
    /// layer exists.
    pub fn validate(&self, num_layers: Option<usize>) -> Result<()> {
        if self.k == 0 {
            return Err(budget(
                OP,
                "k = 0: TidalDecode attends to at least the current token",
            ));
        }
        if let Some(&l) = self
            .reselect_layers
            .iter()
            .find(|&&l| l <= self.sparse_layer_start)
        {
            return Err(config(
                OP,
                format!(
                    "re-selection layer {l} must come after the first selection layer {}",
                    self.sparse_layer_start
                ),
            ));
        }
        if self.reselect_layers.windows(2).any(|w| w[1] <= w[0]) {
            return Err(config(
                OP,
                format!(
                    "re-selection layers must be strictly increasing, got {:?}",
                    self.reselect_layers
                ),
            ));
        }
        if self.correction_interval == Some(0) {
            return Err(config(
                OP,
                "the correction interval must be at least 1 step (None turns correction off)",
            ));
        }
        if let Some(n) = num_layers {
            let last = self
                .reselect_layers
                .last()
                .copied()
                .unwrap_or(self.sparse_layer_start);
            if last >= n {
                return Err(config(
                    OP,
                    format!("selection layer {last} is out of range for a model of {n} layers"),
                ));
            }
        }
        Ok(())
    }
}

/// The role of a layer in a decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayerRole {
    /// Dense, no selection.
    Full,
    /// Dense, and chooses the tokens of the following sparse layers.
    Selection,
    /// Attends to the latest selection.
    Sparse,
}

#[derive(Clone, Debug)]
struct Selected {
    step: usize,
    layer: usize,
    lens: Vec<u32>,
    /// `None`: dense fallback.
    list: Option<IndexList>,
}

/// Position-persistent sparse decoding (see the module docs).
#[derive(Clone, Debug)]
pub struct TidalDecode {
    cfg: TidalDecodeConfig,
    current: Option<Selected>,
}

impl TidalDecode {
    /// Validates the config (layer indices are checked against the model at
    /// the first hook, or now with [`TidalDecode::for_layers`]).
    pub fn new(cfg: TidalDecodeConfig) -> Result<Self> {
        cfg.validate(None)?;
        Ok(Self { cfg, current: None })
    }

    /// Validates the config against a model of `num_layers` layers.
    pub fn for_layers(cfg: TidalDecodeConfig, num_layers: usize) -> Result<Self> {
        cfg.validate(Some(num_layers))?;
        Ok(Self { cfg, current: None })
    }

    /// The settings.
    pub fn config(&self) -> &TidalDecodeConfig {
        &self.cfg
    }

    /// The role of `layer`.
    pub fn role(&self, layer: usize) -> LayerRole {
        if layer < self.cfg.sparse_layer_start {
            LayerRole::Full
        } else if layer == self.cfg.sparse_layer_start || self.cfg.reselect_layers.contains(&layer)
        {
            LayerRole::Selection
        } else {
            LayerRole::Sparse
        }
    }

    /// True when the engine should run the KV-cache correction after decode
    /// step `step` (0-based): every `correction_interval` steps.
    pub fn correction_due(&self, step: usize) -> bool {
        match (self.cfg.correction_interval, step.checked_add(1)) {
            (Some(i), Some(done)) if i > 0 => done.is_multiple_of(i),
            _ => false,
        }
    }

    /// The decode steps whose K/V the correction due after `step`
    /// recomputes with full attention (`None` when no correction is due).
    pub fn correction_window(&self, step: usize) -> Option<std::ops::Range<usize>> {
        let i = self.cfg.correction_interval?;
        self.correction_due(step)
            .then(|| (step + 1 - i)..(step + 1))
    }

    /// The selection in force (the last selection layer's list; `None` when
    /// dense or none yet).
    pub fn current_selection(&self) -> Option<&IndexList> {
        self.current.as_ref().and_then(|s| s.list.as_ref())
    }

    /// The selection of a selection layer, from its own (dense) attention's
    /// logits (the evidence of this step): top-`(k − 1)` per head over every
    /// token but the current one, plus the current token.
    fn select<B: Ops, T: Element>(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<()> {
        let geom = *ctx.geom();
        let (hq, hkv) = (geom.num_q_heads(), geom.num_kv_heads());
        let segs = ctx.kv.segments();
        let batch = ctx.batch();
        if ctx.q_rows.num_segments() != batch || ctx.q_rows.lens().any(|l| l != 1) {
            return Err(shape(
                OP,
                "TidalDecode selects in decode only: one query per sequence",
            ));
        }
        let k = self.cfg.k;
        let lens = segs.lens().to_vec();
        let store = |list| Selected {
            step: ctx.step,
            layer: ctx.layer,
            lens: lens.clone(),
            list,
        };
        if lens.iter().all(|&n| n as usize <= k) {
            self.current = Some(store(None));
            return Ok(());
        }
        // The current token is every segment's last row: TidalDecode never
        // evicts, so rows are in arrival order.
        for s in 0..segs.num_segments() {
            let arr = ctx.kv.arrivals(s);
            if arr
                .last()
                .is_some_and(|&a| a as usize + 1 != ctx.kv.seen(s / hkv))
            {
                return Err(shape(
                    OP,
                    format!(
                        "segment {s}: the current token is not the last row (was the cache compacted?)"
                    ),
                ));
            }
        }
        let be = ctx.backend;
        let lists: Vec<IndexSet> = if k == 1 {
            Vec::new()
        } else {
            match self.cfg.gqa {
                GqaMode::PerQueryHead => {
                    // Rows [N − 1, 1] per (sequence, query head) block of the
                    // logits evidence: the candidates, then the current token.
                    let logits = ctx.evidence.logits.ok_or_else(|| {
                        config(OP, "the selection layer's logits evidence is missing")
                    })?;
                    let mut rl = Vec::with_capacity(2 * batch * hq + 1);
                    for b in 0..batch {
                        for h in 0..hq {
                            let n = segs.len_of(segs.index(b, geom.kv_head(h))) as u32;
                            rl.push(n.saturating_sub(1));
                            rl.push(n.min(1));
                        }
                    }
                    let used: usize = rl.iter().map(|&x| x as usize).sum();
                    rl.push((be.buffer_len(logits) - used) as u32);
                    let picked = ops::topk_rows(
                        be,
                        &Ragged::from_lens(&rl)?,
                        k - 1,
                        Scope::QueryHead,
                        logits,
                    )?;
                    (0..batch * hq)
                        .map(|i| IndexSet::from_unsorted(picked.list(2 * i).to_vec()))
                        .collect()
                }
                GqaMode::PerKvHeadSummed => {
                    let host = ctx.decode_logits()?;
                    let g = geom.group();
                    let mut summed = Vec::with_capacity(segs.total_len());
                    let mut rl = Vec::with_capacity(batch * hkv);
                    for b in 0..batch {
                        for kvh in 0..hkv {
                            let n = segs.len_of(segs.index(b, kvh)).saturating_sub(1);
                            let mut acc = vec![0.0f64; n];
                            for h in kvh * g..(kvh + 1) * g {
                                for (a, &z) in acc.iter_mut().zip(host.block(b * hq + h)) {
                                    *a += f64::from(z);
                                }
                            }
                            summed.extend(acc.iter().map(|&a| a as f32));
                            rl.push(n as u32);
                        }
                    }
                    let buf = be.upload(&summed)?;
                    let picked =
                        ops::topk_rows(be, &Ragged::from_lens(&rl)?, k - 1, Scope::KvHead, &buf)?;
                    (0..picked.num_lists())
                        .map(|i| IndexSet::from_unsorted(picked.list(i).to_vec()))
                        .collect()
                }
            }
        };
        let scope = match self.cfg.gqa {
            GqaMode::PerQueryHead => Scope::QueryHead,
            GqaMode::PerKvHeadSummed => Scope::KvHead,
        };
        let heads = scope.count(1, &geom);
        let mut sets = Vec::with_capacity(batch * heads);
        for b in 0..batch {
            for h in 0..heads {
                let g = if scope == Scope::QueryHead {
                    geom.kv_head(h)
                } else {
                    h
                };
                let n = segs.len_of(segs.index(b, g)) as u32;
                let set = if n as usize <= k || n == 0 {
                    IndexSet::all(n)
                } else {
                    let mut v = lists
                        .get(b * heads + h)
                        .map(|s| s.as_slice().to_vec())
                        .unwrap_or_default();
                    v.push(n - 1);
                    IndexSet::from_unsorted(v)
                };
                sets.push(set);
            }
        }
        self.current = Some(store(Some(IndexList::from_sets(scope, &sets)?)));
        Ok(())
    }
}

impl<B: Ops, T: Element> KvPolicy<B, T> for TidalDecode {
    fn name(&self) -> &'static str {
        "tidal_decode"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            selects: true,
            ..Capabilities::default()
        }
    }
    /// Logits, at the selection layers only.
    fn needs(&self, layer: usize) -> Needs {
        Needs {
            decode_logits: self.role(layer) == LayerRole::Selection,
            ..Needs::default()
        }
    }
    /// A selection layer chooses after its own dense attention.
    fn on_decode_step(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        if self.role(ctx.layer) == LayerRole::Selection {
            self.select(ctx)?;
        }
        Ok(Plan::KeepAll)
    }
    fn select_for_attention(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.cfg.validate(Some(ctx.num_layers))?;
        match self.role(ctx.layer) {
            LayerRole::Full | LayerRole::Selection => Ok(Plan::KeepAll),
            LayerRole::Sparse => {
                let Some(sel) = self
                    .current
                    .as_ref()
                    .filter(|s| s.step == ctx.step && s.layer < ctx.layer)
                else {
                    return Err(config(
                        OP,
                        format!(
                            "sparse layer {} at decode step {} runs before any selection layer of this step (layers must run in order)",
                            ctx.layer, ctx.step
                        ),
                    ));
                };
                if sel.lens.as_slice() != ctx.kv.segments().lens() {
                    return Err(shape(
                        OP,
                        format!(
                            "layer {} holds {:?} tokens per head, selection layer {} held {:?}: position persistence needs equal caches",
                            ctx.layer,
                            ctx.kv.segments().lens(),
                            sel.layer,
                            sel.lens
                        ),
                    ));
                }
                Ok(sel.list.clone().map_or(Plan::KeepAll, Plan::Select))
            }
        }
    }
    fn reset(&mut self) {
        self.current = None;
    }
}

/// The examples of `docs/policies/tidal_decode.md`, run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/policies/tidal_decode.md")]
struct DocExamples;
