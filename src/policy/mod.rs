//! KV-cache policies: the [`KvPolicy`] trait, [`Plan`]s, [`Budget`]s, and one
//! file per policy. The driver that runs them is [`crate::attention`].
//!
//! | policy | kind | when | evidence it reads | plan |
//! |---|---|---|---|---|
//! | [`Full`] | identity | never | — | `KeepAll` |
//! | [`StreamingLlm`] | sinks + recent window | after prefill chunks and decode steps | — | `Drop` |
//! | [`H2O`] | accumulated attention + recent | after prefill chunks and decode steps | column sums, decode weights | `Drop` |
//! | [`SnapKv`] | observation-window vote, pooled | prefill end | window sums | `Evict` |
//! | [`Tova`] | current query's attention | after prefill chunks and decode steps | last query's weights | `Drop` |
//! | [`MorphKv`] | attention of the last W queries | after decode steps (the first compresses the prompt) | window rows, decode weights | `Drop` |
//! | [`Caote`] | attention-output error over any [`Scorer`] | after prefill blocks and decode steps | the scorer's + `value_distances` | `Drop` |
//! | [`Ems`] | Global-Local score, evict then merge | prefill end | column sums, window sums | `Merge` |
//! | [`TokenSelect`] | soft vote + sinks + local, Selection Cache | before prefill chunks and decode steps | its own Q·K scoring | `Select` (`KvHead`) |
//! | [`TidalDecode`] | top-k at selection layers, reused by later layers | selection layers: after attention; others: before | logits | `Select` (`QueryHead`) |
//! | [`Dam`] | static calibrated diagonal/vertical masks | before prefill chunks and decode steps | — | `SelectMask` / `Select` (`QueryHead`) |
//!
//! **Contract of a step** (what [`crate::attention::Session`] does, and what
//! an engine must do to drive a policy by hand), per layer:
//!
//! 1. prefill chunk: append the chunk's K/V; [`KvPolicy::before_prefill_chunk`]
//!    (a `Select` / `SelectMask` plan restricts the chunk's attention); causal
//!    attention with the evidence of [`KvPolicy::needs`]; then
//!    [`KvPolicy::on_prefill_chunk`] and, after the last chunk,
//!    [`KvPolicy::on_prefill_end`], each plan applied with
//!    [`crate::attention::apply_plan`];
//! 2. decode: append the new token's K/V; [`KvPolicy::select_for_attention`]
//!    (a `Select` plan restricts this step's attention); attention with the
//!    evidence; [`KvPolicy::on_decode_step`] and its plan applied.
//!
//! So eviction policies decide *after* the attention whose weights they
//! read: between steps a head holds at most its budget, and a decode step
//! attends to those tokens plus the new one (TOVA, H2O and MorphKV do the
//! same in their papers' code).
//!
//! Destructive plans (`Evict`, `Drop`, `Merge`) **must** be applied:
//! stateful policies (H2O accumulators, ...) compact their state when they
//! emit them, with the same row moves as the cache
//! ([`crate::cache::compaction_moves`]), and report an error at their next
//! hook if the cache and their state got out of sync.
//!
//! ```
//! use kvsieve::attention::{LayerInput, Session, SessionConfig};
//! use kvsieve::policy::{Budget, H2O, H2oConfig};
//! use kvsieve::{HeadGeometry, Ragged, reference::Reference};
//!
//! # fn main() -> kvsieve::Result<()> {
//! // One layer, 2 query heads on 1 KV head, D = 4; keep 8 tokens (4 recent).
//! let geom = HeadGeometry::new(2, 1, 4)?;
//! let h2o = H2O::new(H2oConfig { budget: Budget::tokens(8).with_recent(4), ..H2oConfig::default() })?;
//! let mut s = Session::new(Reference, geom, 1, 1, Box::new(h2o), SessionConfig::default())?;
//! let x = |n: usize| (0..n).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect::<Vec<f32>>();
//! let (q, k, v) = (x(20 * 2 * 4), x(20 * 4), x(20 * 4));
//! s.prefill(&Ragged::from_lens(&[20])?, &[LayerInput { q: &q, k: &k, v: &v }])?;
//! let (q, k, v) = (x(2 * 4), x(4), x(4));
//! let out = s.decode(&[LayerInput { q: &q, k: &k, v: &v }])?;
//! assert_eq!(out[0].len(), 2 * 4);
//! assert_eq!(s.cache().layer(0)?.segments().lens(), &[8]);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

mod caote;
mod dam;
mod ems;

mod evidence;
mod full;
mod h2o;
mod morph_kv;
mod snapkv;
mod streaming_llm;
mod tidal_decode;
mod token_select;
mod tova;

pub use caote::{Caote, CaoteConfig, CaoteGqa, caote_scores, joint_eviction_error};
pub use dam::{Dam, DamConfig, DamThreshold, HeadPattern};
pub use ems::{AlignOver, Ems, EmsConfig, MergeKeys, global_local_scores};

pub use evidence::{Compaction, HostBlocks};
pub use full::Full;
pub use h2o::{H2O, H2oConfig, H2oScorer};
pub use morph_kv::{Fusion, MorphGqa, MorphKv, MorphKvConfig, MorphScoring};
pub use snapkv::{Pooling, SnapKv, SnapKvConfig, SnapKvScorer};
pub use streaming_llm::{StreamingLlm, StreamingLlmConfig};
pub use tidal_decode::{GqaMode, LayerRole, TidalDecode, TidalDecodeConfig};
pub use token_select::{
    CacheStats, RopePositions, TokenSelect, TokenSelectConfig, selection_positions,
    selection_prefill_mask,
};
pub use tova::{Tova, TovaConfig, TovaScorer};

use crate::backend::{Backend, evidence_blocks};
pub use crate::backend::{Heads, Window};
use crate::cache::{KvView, MergeSpec};
use crate::dtype::Element;
use crate::error::{Result, budget, shape};
use crate::layout::{HeadGeometry, IndexList, MaskList, Ragged};

/// The attention evidence a policy reads (so nothing is computed that no
/// policy uses). The driver asks the attention ops for exactly this; see
/// [`crate::backend::evidence`] for the quantities and layouts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Decode: the current query's attention weights.
    pub decode_probs: Option<Heads>,
    /// Decode: the raw scaled logits per query head.
    pub decode_logits: bool,
    /// Decode: the attention output in f32.
    pub decode_output: bool,
    /// Prefill: column sums of each chunk's attention weights.
    pub prefill_col_sums: Option<Heads>,
    /// Prefill: the weights of each chunk's last queries.
    pub prefill_window: Option<Window>,
}

impl Needs {
    /// True when nothing is asked for.
    pub fn is_empty(&self) -> bool {
        *self == Needs::default()
    }
}

/// What a policy does, declared up front.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Emits `Evict` / `Drop` plans (the cache shrinks).
    pub evicts: bool,
    /// Emits `Merge` plans.
    pub merges: bool,
    /// Emits `Select` / `SelectMask` plans (non-destructive, attention only).
    pub selects: bool,
    /// Evidence needed (every layer; see [`KvPolicy::needs`]).
    pub needs: Needs,
    /// Preferred prefill block size (block-wise prompt processing); `None`:
    /// any chunking.
    pub prefill_block: Option<usize>,
}

/// Which hook is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A prefill chunk was appended; its attention has not run yet.
    PrefillSelect,
    /// A prefill chunk was appended and attended.
    PrefillChunk,
    /// The prompt is complete (after the last chunk).
    PrefillEnd,
    /// A decode token was appended; this step's attention has not run yet.
    Select,
    /// A decode token was appended and attended.
    Decode,
}

/// What a hook asks the driver to do with one layer's cache.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Nothing changes.
    KeepAll,
    /// Attend only to these tokens (scope `KvHead` or `QueryHead`); the
    /// cache is not modified. Decode: this step's attention. Prefill
    /// (`before_prefill_chunk`): every query of the chunk sees the listed
    /// tokens at or before it, plus itself.
    Select(IndexList),
    /// Prefill only: per-(sequence, head) `q_len × kv_len` masks for the
    /// chunk's attention (ANDed with causality).
    SelectMask(MaskList),
    /// Keep exactly these rows per (sequence, KV head) (scope `KvHead`,
    /// sorted); the others are freed ([`crate::cache::compaction_moves`]).
    Evict(IndexList),
    /// Free exactly these rows per (sequence, KV head) (scope `KvHead`,
    /// sorted): the same as `Evict` of the complement, in O(dropped).
    Drop(IndexList),
    /// Merge rows into kept rows, then keep `spec.keep`.
    Merge(MergeSpec),
}

/// Evidence of the attention call a hook follows (empty before attention,
/// and at `PrefillEnd` when the last chunk's own plan changed the cache).
/// Buffers may be longer than their layout (the driver reuses them); read
/// them with [`StepCtx::decode_probs`] and friends.
pub struct Evidence<'a, B: Backend> {
    /// Decode weights.
    pub probs: Option<(Heads, &'a B::Buffer<f32>)>,
    /// Decode logits per query head.
    pub logits: Option<&'a B::Buffer<f32>>,
    /// Decode output in f32, `[batch, Hq, D]`.
    pub output: Option<&'a B::Buffer<f32>>,
    /// Prefill column sums.
    pub col_sums: Option<(Heads, &'a B::Buffer<f32>)>,
    /// Prefill window.
    pub window: Option<(Window, &'a B::Buffer<f32>)>,
}

impl<B: Backend> Default for Evidence<'_, B> {
    fn default() -> Self {
        Self {
            probs: None,
            logits: None,
            output: None,
            col_sums: None,
            window: None,
        }
    }
}

/// Per-step context handed to a hook.
pub struct StepCtx<'a, B: Backend, T: Element> {
    /// The backend.
    pub backend: &'a B,
    /// Layer index.
    pub layer: usize,
    /// Number of layers of the model.
    pub num_layers: usize,
    /// This layer's KV (already holding this step's tokens).
    pub kv: &'a dyn KvView<B, T>,
    /// This step's queries `[total_q, Hq, D]`; sequence `b` owns rows
    /// `q_rows.range(b)`, which are the last `q_rows.len_of(b)` tokens of its
    /// segments.
    pub queries: &'a B::Buffer<T>,
    /// Query rows per sequence.
    pub q_rows: &'a Ragged,
    /// Step counter: prefill chunks count from 0, decode steps from 0.
    pub step: usize,
    /// The hook running.
    pub phase: Phase,
    /// Logit scale (`None` = `1 / sqrt(D)`).
    pub scale: Option<f32>,
    /// Evidence of this step's attention.
    pub evidence: Evidence<'a, B>,
}

impl<'a, B: Backend, T: Element> StepCtx<'a, B, T> {
    /// Head geometry.
    pub fn geom(&self) -> &HeadGeometry {
        self.kv.geom()
    }
    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.kv.batch()
    }

    fn host(
        &self,
        what: &'static str,
        buf: Option<&'a B::Buffer<f32>>,
        heads: Heads,
        rows: &[usize],
    ) -> Result<HostBlocks<'a>> {
        let buf = buf.ok_or_else(|| {
            crate::error::config(
                "StepCtx",
                format!("the {what} evidence was not computed (declare it in Needs)"),
            )
        })?;
        let blocks = evidence_blocks(self.geom(), self.kv.segments(), heads, rows)?;
        let data = match self.backend.host_view(buf) {
            Some(v) => std::borrow::Cow::Borrowed(v),
            None => std::borrow::Cow::Owned(self.backend.download(buf)?),
        };
        if data.len() < blocks.total() {
            return Err(shape(
                "StepCtx",
                format!(
                    "the {what} evidence holds {} values, its layout {}",
                    data.len(),
                    blocks.total()
                ),
            ));
        }
        let data = match data {
            std::borrow::Cow::Borrowed(v) => std::borrow::Cow::Borrowed(&v[..blocks.total()]),
            std::borrow::Cow::Owned(mut v) => {
                v.truncate(blocks.total());
                std::borrow::Cow::Owned(v)
            }
        };
        Ok(HostBlocks::new(data, blocks, heads))
    }

    /// The decode weights on the host (one row per block).
    pub fn decode_probs(&self) -> Result<HostBlocks<'a>> {
        let heads = self.evidence.probs.map_or(Heads::Sum, |p| p.0);
        let ones = vec![1; self.batch()];
        self.host(
            "decode probs",
            self.evidence.probs.map(|p| p.1),
            heads,
            &ones,
        )
    }
    /// The decode logits on the host (per query head, one row per block).
    pub fn decode_logits(&self) -> Result<HostBlocks<'a>> {
        let ones = vec![1; self.batch()];
        self.host("decode logits", self.evidence.logits, Heads::PerHead, &ones)
    }
    /// The decode output in f32 on the host, `[batch, Hq, D]`.
    pub fn decode_output(&self) -> Result<Vec<f32>> {
        let buf = self.evidence.output.ok_or_else(|| {
            crate::error::config(
                "StepCtx",
                "the decode output evidence was not computed (declare it in Needs)",
            )
        })?;
        let g = self.geom();
        let n = self.batch() * g.num_q_heads() * g.head_dim();
        let mut v = self.backend.download(buf)?;
        if v.len() < n {
            return Err(shape("StepCtx", "the decode output evidence is too short"));
        }
        v.truncate(n);
        Ok(v)
    }
    /// The prefill column sums on the host (one row per block).
    pub fn col_sums(&self) -> Result<HostBlocks<'a>> {
        let heads = self.evidence.col_sums.map_or(Heads::Sum, |p| p.0);
        let ones = vec![1; self.batch()];
        self.host(
            "column sums",
            self.evidence.col_sums.map(|p| p.1),
            heads,
            &ones,
        )
    }
    /// The prefill window on the host (blocks of `Window::rows_for` rows).
    pub fn window(&self) -> Result<(Window, HostBlocks<'a>)> {
        let w = self.evidence.window.map(|p| p.0).unwrap_or(Window {
            queries: 1,
            heads: Heads::Sum,
            rows: false,
        });
        let rows: Vec<usize> = self.q_rows.lens().map(|n| w.rows_for(n)).collect();
        Ok((
            w,
            self.host("window", self.evidence.window.map(|p| p.1), w.heads, &rows)?,
        ))
    }
}

/// A KV-cache policy. Generic over the backend, object safe
/// (`Box<dyn KvPolicy<B, T>>`). Every hook has a `KeepAll` default.
pub trait KvPolicy<B: Backend, T: Element>: Send {
    /// Short name.
    fn name(&self) -> &'static str;
    /// What the policy does and needs.
    fn capabilities(&self) -> Capabilities;
    /// The evidence `layer`'s attention must produce (default: the
    /// capabilities' needs; TidalDecode asks only at its selection layers).
    fn needs(&self, _layer: usize) -> Needs {
        self.capabilities().needs
    }
    /// After a prefill chunk was appended, before its attention:
    /// `Select` / `SelectMask` restricts the chunk's attention.
    fn before_prefill_chunk(&mut self, _ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        Ok(Plan::KeepAll)
    }
    /// After a prefill chunk was attended (its evidence in `ctx`).
    fn on_prefill_chunk(&mut self, _ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        Ok(Plan::KeepAll)
    }
    /// After the last prefill chunk (and its `on_prefill_chunk`).
    fn on_prefill_end(&mut self, _ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        Ok(Plan::KeepAll)
    }
    /// After a decode token was appended, before attention: `Select`
    /// restricts this step's attention.
    fn select_for_attention(&mut self, _ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        Ok(Plan::KeepAll)
    }
    /// After this step's attention (its evidence in `ctx`).
    fn on_decode_step(&mut self, _ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        Ok(Plan::KeepAll)
    }
    /// Named work counters of the policy so far (e.g. CAOTE's full passes,
    /// the Selection Cache's hits), for reports and tests; empty by default.
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    /// Forgets all per-request state.
    fn reset(&mut self) {}
}

/// Raw importance scores of a base method, used by [`Caote`] and by the
/// score-based baselines. Implement it to put CAOTE on top of your own
/// method.
pub trait Scorer<B: Backend, T: Element>: Send {
    /// Short name.
    fn name(&self) -> &'static str;
    /// Evidence needed to score with this group treatment.
    fn needs(&self, heads: Heads) -> Needs;
    /// Non-negative raw scores, one vector per block of `heads` (per
    /// (sequence, query head) at `b * Hq + h` for [`Heads::PerHead`], else
    /// per (sequence, KV head) at `b * Hkv + g`, reduced as `heads` says),
    /// each as long as its segment and indexed by row. Called once per
    /// hook; stateful scorers update their state here.
    fn score(&mut self, ctx: &StepCtx<'_, B, T>, heads: Heads) -> Result<Vec<Vec<f64>>>;
    /// [`Scorer::score`] for a caller that hands the vectors back with
    /// [`Scorer::restore`] before anything else touches the scorer: a scorer
    /// whose scores are its own state (H2O's sums) lends that state instead
    /// of copying it every step. Default: `score`.
    fn lend(&mut self, ctx: &StepCtx<'_, B, T>, heads: Heads) -> Result<Vec<Vec<f64>>> {
        self.score(ctx, heads)
    }
    /// Takes back the vectors [`Scorer::lend`] gave for `layer` (unchanged).
    /// Default: drops them.
    fn restore(&mut self, _layer: usize, _scores: Vec<Vec<f64>>) {}
    /// The cache of `layer` was compacted as `c` says; compact any state.
    fn retain(&mut self, _layer: usize, _c: &Compaction) -> Result<()> {
        Ok(())
    }
    /// Tokens the base method itself never evicts: `(sink, recent)` by
    /// arrival (CAOTE keeps them protected too).
    fn protects(&self) -> (usize, usize) {
        (0, 0)
    }
    /// How the raw scores change over a decode step (lets CAOTE move its
    /// pseudo-output without a pass over V).
    fn update(&self) -> ScoreUpdate {
        ScoreUpdate::Other
    }
    /// Forgets all state.
    fn reset(&mut self) {}
}

/// How a [`Scorer`]'s raw scores `H` change from one decode step to the
/// next, with `p` that step's attention weights over every cached row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScoreUpdate {
    /// No rule that CAOTE can follow incrementally (it re-scores fully).
    #[default]
    Other,
    /// `H ← H + p` (H2O): `Σ_j H_j v_j` grows by the attention output.
    Accumulate,
    /// `H = p` (TOVA): `Σ_j H_j v_j` is the attention output.
    Current,
}

/// How scores of the query heads of a GQA group become one score per KV head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GqaReduce {
    /// Sum over the group.
    Sum,
    /// Mean over the group (same ranking as `Sum`).
    Mean,
    /// Maximum over the group.
    Max,
}

impl From<GqaReduce> for Heads {
    fn from(r: GqaReduce) -> Heads {
        match r {
            GqaReduce::Sum => Heads::Sum,
            GqaReduce::Mean => Heads::Mean,
            GqaReduce::Max => Heads::Max,
        }
    }
}

/// A budget size: an absolute token count or a ratio of the tokens seen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BudgetSize {
    /// Keep at most this many tokens per (sequence, KV head).
    Tokens(usize),
    /// Keep `ceil(ratio · seen)` tokens, `seen` = tokens appended so far to
    /// the sequence; `0 < ratio ≤ 1`.
    Ratio(f32),
}

/// A per-(sequence, layer, KV head) token budget with protected windows.
///
/// The first `sink` and the last `recent` tokens of every head are never
/// evicted. With a [`BudgetSize::Tokens`] size, `sink + recent` larger than
/// the size is an error ([`crate::Error::Budget`]); with a ratio, the
/// resolved budget is raised to `sink + recent` when smaller. Every budget
/// keeps at least one token per head.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    /// The default size.
    pub size: BudgetSize,
    /// Protected attention sinks (first tokens).
    pub sink: usize,
    /// Protected recent window (last tokens).
    pub recent: usize,
    /// Per-layer overrides `(layer, size)`.
    pub per_layer: Vec<(usize, BudgetSize)>,
    /// Per-head overrides `(layer, kv_head, size)` (win over per-layer).
    pub per_head: Vec<(usize, usize, BudgetSize)>,
}

impl Budget {
    /// `n` tokens per head, no protected windows.
    pub fn tokens(n: usize) -> Self {
        Self {
            size: BudgetSize::Tokens(n),
            sink: 0,
            recent: 0,
            per_layer: Vec::new(),
            per_head: Vec::new(),
        }
    }
    /// A ratio of the tokens seen, no protected windows.
    pub fn ratio(r: f32) -> Self {
        Self {
            size: BudgetSize::Ratio(r),
            ..Self::tokens(1)
        }
    }
    /// Sets the protected sink window.
    pub fn with_sink(mut self, sink: usize) -> Self {
        self.sink = sink;
        self
    }
    /// Sets the protected recent window.
    pub fn with_recent(mut self, recent: usize) -> Self {
        self.recent = recent;
        self
    }
    /// Adds a per-layer override.
    pub fn with_layer(mut self, layer: usize, size: BudgetSize) -> Self {
        self.per_layer.push((layer, size));
        self
    }
    /// Adds a per-head override.
    pub fn with_head(mut self, layer: usize, kv_head: usize, size: BudgetSize) -> Self {
        self.per_head.push((layer, kv_head, size));
        self
    }

    fn check_size(&self, op: &'static str, size: BudgetSize) -> Result<()> {
        match size {
            BudgetSize::Tokens(0) => Err(budget(
                op,
                "a budget of 0 tokens: every head keeps at least one token",
            )),
            BudgetSize::Tokens(n) if self.sink.saturating_add(self.recent) > n => Err(budget(
                op,
                format!(
                    "protected windows (sink {} + recent {}) are larger than the budget of {n} tokens",
                    self.sink, self.recent
                ),
            )),
            BudgetSize::Ratio(r) if !(r > 0.0 && r <= 1.0) => Err(budget(
                op,
                format!("a budget ratio must be in (0, 1], got {r}"),
            )),
            _ => Ok(()),
        }
    }

    /// Static checks: sizes positive, ratios in (0, 1], windows fit (and
    /// `sink + recent` fits in `usize`).
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if self.sink.checked_add(self.recent).is_none() {
            return Err(budget(
                op,
                format!(
                    "protected windows sink {} + recent {} overflow",
                    self.sink, self.recent
                ),
            ));
        }
        self.check_size(op, self.size)?;
        for &(_, s) in &self.per_layer {
            self.check_size(op, s)?;
        }
        for &(_, _, s) in &self.per_head {
            self.check_size(op, s)?;
        }
        Ok(())
    }

    /// The budget of `kv_head` in `layer` for a sequence that has seen
    /// `seen` tokens. Errors when an override names a layer or head the
    /// model does not have.
    pub fn resolve(
        &self,
        op: &'static str,
        layer: usize,
        num_layers: usize,
        kv_head: usize,
        num_kv_heads: usize,
        seen: usize,
    ) -> Result<usize> {
        self.validate(op)?;
        if let Some(&(l, _)) = self.per_layer.iter().find(|(l, _)| *l >= num_layers) {
            return Err(shape(
                op,
                format!("a per-layer budget names layer {l}, the model has {num_layers} layers"),
            ));
        }
        if let Some(&(l, g, _)) = self
            .per_head
            .iter()
            .find(|(l, g, _)| *l >= num_layers || *g >= num_kv_heads)
        {
            return Err(shape(
                op,
                format!(
                    "a per-head budget names (layer {l}, KV head {g}), the model has {num_layers} layers and {num_kv_heads} KV heads"
                ),
            ));
        }
        let size = self
            .per_head
            .iter()
            .rev()
            .find(|(l, g, _)| *l == layer && *g == kv_head)
            .map(|x| x.2)
            .or_else(|| {
                self.per_layer
                    .iter()
                    .rev()
                    .find(|(l, _)| *l == layer)
                    .map(|x| x.1)
            })
            .unwrap_or(self.size);
        Ok(match size {
            BudgetSize::Tokens(n) => n,
            BudgetSize::Ratio(r) => {
                // A relative slack absorbs the binary rounding of `r`
                // (0.2f32 · 50 must give 10, not 11).
                let x = f64::from(r) * seen as f64;
                let n = (x - 1e-6 * x.max(1.0)).ceil() as usize;
                // `validate` above checked that the sum fits.
                n.max(self.sink.saturating_add(self.recent)).max(1)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;

    #[test]
    fn budget_validation_and_resolution() {
        assert!(matches!(
            Budget::tokens(0).validate("t"),
            Err(Error::Budget { .. })
        ));
        assert!(matches!(
            Budget::tokens(4).with_recent(5).validate("t"),
            Err(Error::Budget { .. })
        ));
        assert!(
            Budget::tokens(4)
                .with_sink(2)
                .with_recent(2)
                .validate("t")
                .is_ok()
        );
        assert!(matches!(
            Budget::ratio(1.5).validate("t"),
            Err(Error::Budget { .. })
        ));
        let b = Budget::tokens(10)
            .with_layer(1, BudgetSize::Tokens(6))
            .with_head(1, 0, BudgetSize::Ratio(0.5));
        assert_eq!(b.resolve("t", 0, 2, 0, 2, 100).unwrap(), 10);
        assert_eq!(b.resolve("t", 1, 2, 1, 2, 100).unwrap(), 6);
        assert_eq!(b.resolve("t", 1, 2, 0, 2, 7).unwrap(), 4);
        assert!(
            matches!(b.resolve("t", 0, 1, 0, 2, 7), Err(Error::Shape { .. })),
            "layer 1 does not exist"
        );
        let bad_head = Budget::tokens(4).with_head(0, 3, BudgetSize::Tokens(2));
        assert!(
            matches!(
                bad_head.resolve("t", 0, 1, 0, 2, 7),
                Err(Error::Shape { .. })
            ),
            "KV head 3 of 2"
        );
        // Ratios keep at least one token and at least the protected windows.
        assert_eq!(Budget::ratio(0.01).resolve("t", 0, 1, 0, 1, 3).unwrap(), 1);
        assert_eq!(
            Budget::ratio(0.1)
                .with_recent(8)
                .resolve("t", 0, 1, 0, 1, 20)
                .unwrap(),
            8
        );
        assert_eq!(Budget::ratio(0.2).resolve("t", 0, 1, 0, 1, 50).unwrap(), 10);
    }

    #[test]
    fn policies_are_object_safe() {
        use crate::reference::Reference;
        let ps: Vec<Box<dyn KvPolicy<Reference, f32>>> = vec![
            Box::new(Full),
            Box::new(H2O::new(H2oConfig::default()).unwrap()),
            Box::new(MorphKv::new(MorphKvConfig::default()).unwrap()),
            Box::new(
                Caote::new(
                    CaoteConfig::default(),
                    Box::new(TovaScorer) as Box<dyn Scorer<Reference, f32>>,
                )
                .unwrap(),
            ),
            Box::new(Ems::new(EmsConfig::default()).unwrap()),
        ];
        assert_eq!(ps.len(), 5);
        assert_eq!(ps[3].name(), "caote");
    }
}
