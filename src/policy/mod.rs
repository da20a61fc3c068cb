//! KV-cache policies: the [`KvPolicy`] trait, [`Plan`]s, [`Budget`]s, and one
//! file per policy.
//!
//! | policy | kind | when | plan |
//! |---|---|---|---|
//! | [`Full`] | identity | never | `KeepAll` |
//! | [`StreamingLlm`] | sinks + recent window | every hook | `Evict` |
//! | [`H2O`] | accumulated attention + recent | prefill chunks, decode | `Evict` |
//! | [`SnapKv`] | observation-window vote, pooled | prefill end | `Evict` |
//! | [`Tova`] | current query's attention | prefill chunks, decode | `Evict` |
//! | [`MorphKv`] | attention of the last W queries | decode (first step compresses the prompt) | `Evict` |
//! | [`Caote`] | attention-output error over any [`Scorer`] | prefill blocks, decode | `Evict` |
//! | [`Ems`] | Global-Local score, evict then merge | prefill end | `Merge` |
//! | [`TokenSelect`] | soft vote + sinks + local, Selection Cache | prefill chunks, decode | `Select` (`KvHead`) |
//! | [`TidalDecode`] | top-k at selection layers, reused by later layers | decode | `Select` (`QueryHead`) |
//! | [`Dam`] | static calibrated diagonal/vertical masks | decode (prefill via [`Dam::prefill_mask`]) | `Select` (`QueryHead`) |
//!
//! **Contract of a step** (what [`Session`] does, and what an engine must do
//! to drive a policy by hand), per layer:
//!
//! 1. prefill chunk: append the chunk's K/V to the cache, run causal
//!    attention for the chunk's queries, call [`KvPolicy::on_prefill_chunk`]
//!    and apply its plan with [`apply_plan`];
//! 2. after the last chunk: [`KvPolicy::on_prefill_end`] (same queries as the
//!    last chunk), apply;
//! 3. decode: append the new token's K/V, [`KvPolicy::on_decode_step`], apply,
//!    then [`KvPolicy::select_for_attention`] and attend over the cache
//!    restricted to its selection (if any).
//!
//! Destructive plans (`Evict`, `Merge`) **must** be applied: stateful
//! policies (H2O accumulators, ...) compact their state when they emit them,
//! and report an error if the cache and their state get out of sync.
//!
//! ```
//! use kvsieve::policy::{Budget, H2O, H2oConfig, LayerInput, Session, SessionConfig};
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

pub use evidence::{Probs, attention_probs};
pub use full::Full;
pub use h2o::{H2O, H2oConfig, H2oScorer};
pub use morph_kv::{Fusion, MorphGqa, MorphKv, MorphKvConfig};
pub use snapkv::{Pooling, SnapKv, SnapKvConfig, SnapKvScorer};
pub use streaming_llm::{StreamingLlm, StreamingLlmConfig};
pub use tidal_decode::{GqaMode, LayerRole, TidalDecode, TidalDecodeConfig};
pub use token_select::{
    CacheStats, RopePositions, TokenSelect, TokenSelectConfig, selection_positions,
    selection_prefill_mask,
};
pub use tova::{Tova, TovaConfig, TovaScorer};

use crate::backend::{Backend, Normalizer, Ops, Restrict};
use crate::cache::{KvCache, LayerKv, MergeSpec};
use crate::dtype::Element;
use crate::error::{Result, budget, config, shape};
use crate::layout::{HeadGeometry, IndexList, Ragged};
use crate::ops;

/// Evidence a policy needs from the engine (so nothing is computed for a
/// policy that does not use it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    /// Query vectors of recent steps (MorphKV, SnapKV, EMS window).
    pub recent_queries: bool,
    /// Attention of the current query over the cache (TOVA, H2O, CAOTE).
    pub current_attention: bool,
    /// Attention accumulated over all queries so far (H2O, EMS).
    pub accumulated_attention: bool,
    /// Value vectors (CAOTE, EMS merging).
    pub values: bool,
}

/// What a policy does, declared up front.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Emits `Evict` plans (the cache shrinks).
    pub evicts: bool,
    /// Emits `Merge` plans.
    pub merges: bool,
    /// Emits `Select` plans (non-destructive, attention only).
    pub selects: bool,
    /// Evidence needed.
    pub needs: Needs,
    /// Preferred prefill block size (block-wise prompt processing); `None`:
    /// any chunking.
    pub prefill_block: Option<usize>,
}

/// Which hook is running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A prefill chunk was appended and attended.
    PrefillChunk,
    /// The prompt is complete.
    PrefillEnd,
    /// A decode token was appended (before attention).
    Decode,
    /// Selection for this step's attention.
    Select,
}

/// What a hook asks the driver to do with one layer's cache.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Nothing changes.
    KeepAll,
    /// Attend only to these tokens this step (scope `KvHead` or
    /// `QueryHead`); the cache is not modified.
    Select(IndexList),
    /// Keep exactly these rows per (sequence, KV head) (scope `KvHead`,
    /// sorted); the others are freed.
    Evict(IndexList),
    /// Merge rows into kept rows, then keep `spec.keep`.
    Merge(MergeSpec),
}

/// Per-step evidence handed to a hook.
pub struct StepCtx<'a, B: Backend, T: Element> {
    /// The backend.
    pub backend: &'a B,
    /// Layer index.
    pub layer: usize,
    /// Number of layers of the model.
    pub num_layers: usize,
    /// This layer's cache (already holding this step's tokens).
    pub cache: &'a LayerKv<B, T>,
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
}

impl<B: Backend, T: Element> StepCtx<'_, B, T> {
    /// Head geometry.
    pub fn geom(&self) -> &HeadGeometry {
        self.cache.geom()
    }
    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.cache.batch()
    }
}

/// A KV-cache policy. Generic over the backend, object safe
/// (`Box<dyn KvPolicy<B, T>>`). Every hook has a `KeepAll` default.
pub trait KvPolicy<B: Backend, T: Element>: Send {
    /// Short name.
    fn name(&self) -> &'static str;
    /// What the policy does and needs.
    fn capabilities(&self) -> Capabilities;
    /// After a prefill chunk was appended and attended.
    fn on_prefill_chunk(&mut self, _ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        Ok(Plan::KeepAll)
    }
    /// After the last prefill chunk.
    fn on_prefill_end(&mut self, _ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        Ok(Plan::KeepAll)
    }
    /// After a decode token was appended, before attention.
    fn on_decode_step(&mut self, _ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        Ok(Plan::KeepAll)
    }
    /// Just before decode attention: `Select` restricts this step's attention.
    fn select_for_attention(&mut self, _ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        Ok(Plan::KeepAll)
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
    /// Evidence needed.
    fn needs(&self) -> Needs;
    /// Non-negative raw scores, one vector per (sequence `b`, query head
    /// `h`) at index `b * Hq + h`, each as long as segment `(b, h / G)`.
    /// Called once per hook; stateful scorers update their state here.
    fn score(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Vec<Vec<f64>>>;
    /// The cache of `layer` was compacted to `keep`; compact any state.
    fn retain(&mut self, _layer: usize, _keep: &IndexList) -> Result<()> {
        Ok(())
    }
    /// Forgets all state.
    fn reset(&mut self) {}
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
            BudgetSize::Tokens(n) if self.sink + self.recent > n => Err(budget(
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

    /// Static checks: sizes positive, ratios in (0, 1], windows fit.
    pub fn validate(&self, op: &'static str) -> Result<()> {
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
                n.max(self.sink + self.recent).max(1)
            }
        })
    }
}

/// Applies a plan to one layer of a cache. Returns the selection to restrict
/// attention with (for `Select`), `None` otherwise.
pub fn apply_plan<B: Ops, T: Element>(
    backend: &B,
    cache: &mut KvCache<B, T>,
    layer: usize,
    plan: Plan,
) -> Result<Option<IndexList>> {
    match plan {
        Plan::KeepAll => Ok(None),
        Plan::Select(list) => {
            let l = cache.layer(layer)?;
            list.check_against("apply_plan", l.geom(), l.segments())?;
            Ok(Some(list))
        }
        Plan::Evict(keep) => {
            cache.compact(backend, layer, &keep)?;
            Ok(None)
        }
        Plan::Merge(spec) => {
            cache.merge(backend, layer, &spec)?;
            Ok(None)
        }
    }
}

/// One layer's inputs to a [`Session`] step: `q` is `[tokens, Hq, D]`,
/// `k` and `v` are `[tokens, Hkv, D]` (token-major, sequences in order).
pub struct LayerInput<'a, B: Backend, T: Element> {
    /// Queries.
    pub q: &'a B::Buffer<T>,
    /// New keys.
    pub k: &'a B::Buffer<T>,
    /// New values.
    pub v: &'a B::Buffer<T>,
}

/// Settings of a [`Session`].
#[derive(Clone, Debug, PartialEq)]
pub struct SessionConfig {
    /// Attention normaliser.
    pub normalizer: Normalizer,
    /// Logit scale (`None` = `1 / sqrt(D)`).
    pub scale: Option<f32>,
    /// Prefill chunk size; `None` uses the policy's `prefill_block` or the
    /// whole prompt.
    pub prefill_chunk: Option<usize>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            normalizer: Normalizer::Softmax,
            scale: None,
            prefill_chunk: None,
        }
    }
}

/// A small driver: a cache, a policy and attention for every layer of a
/// model, so tests and examples can run prefill and decode steps in a few
/// lines (see the module docs for the order of the hooks).
pub struct Session<B: Ops, T: Element> {
    backend: B,
    geom: HeadGeometry,
    cache: KvCache<B, T>,
    policy: Box<dyn KvPolicy<B, T>>,
    cfg: SessionConfig,
    chunks: usize,
    steps: usize,
}

impl<B: Ops, T: Element> Session<B, T> {
    /// A session for `batch` sequences and `num_layers` layers.
    pub fn new(
        backend: B,
        geom: HeadGeometry,
        batch: usize,
        num_layers: usize,
        policy: Box<dyn KvPolicy<B, T>>,
        cfg: SessionConfig,
    ) -> Result<Self> {
        if cfg.prefill_chunk == Some(0) {
            return Err(config("Session", "prefill_chunk must be positive"));
        }
        let cache = KvCache::new(&backend, geom, batch, num_layers)?;
        Ok(Self {
            backend,
            geom,
            cache,
            policy,
            cfg,
            chunks: 0,
            steps: 0,
        })
    }

    /// The cache.
    pub fn cache(&self) -> &KvCache<B, T> {
        &self.cache
    }
    /// The policy.
    pub fn policy(&self) -> &dyn KvPolicy<B, T> {
        self.policy.as_ref()
    }
    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn check_layers(&self, op: &'static str, n: usize) -> Result<()> {
        if n != self.cache.num_layers() {
            return Err(shape(
                op,
                format!(
                    "{n} layer inputs for a session of {} layers",
                    self.cache.num_layers()
                ),
            ));
        }
        Ok(())
    }

    /// Runs the prompt (`tokens` new tokens per sequence) through every layer
    /// in chunks and returns each layer's attention output `[tokens, Hq, D]`.
    pub fn prefill(
        &mut self,
        tokens: &Ragged,
        layers: &[LayerInput<'_, B, T>],
    ) -> Result<Vec<B::Buffer<T>>> {
        const OP: &str = "Session::prefill";
        self.check_layers(OP, layers.len())?;
        let (hq, hkv, d) = (
            self.geom.num_q_heads(),
            self.geom.num_kv_heads(),
            self.geom.head_dim(),
        );
        let be = &self.backend;
        for x in layers {
            if be.buffer_len(x.q) != tokens.total() * hq * d
                || be.buffer_len(x.k) != tokens.total() * hkv * d
                || be.buffer_len(x.v) != tokens.total() * hkv * d
            {
                return Err(shape(
                    OP,
                    format!(
                        "layer inputs must be [{}, H, {d}] for q (Hq = {hq}) and k, v (Hkv = {hkv})",
                        tokens.total()
                    ),
                ));
            }
        }
        let chunk = self
            .cfg
            .prefill_chunk
            .or(self.policy.capabilities().prefill_block)
            .unwrap_or(tokens.max_len())
            .max(1);
        let nchunks = tokens.max_len().div_ceil(chunk);
        let mut outs: Vec<B::Buffer<T>> = Vec::with_capacity(layers.len());
        for _ in layers {
            outs.push(self.backend.zeros(tokens.total() * hq * d)?);
        }
        let mut last: Option<(Ragged, Vec<B::Buffer<T>>)> = None;
        for c in 0..nchunks {
            let mut lens = Vec::with_capacity(tokens.num_segments());
            let mut rows = Vec::new();
            for b in 0..tokens.num_segments() {
                let r = tokens.range(b);
                let lo = (r.start + c * chunk).min(r.end);
                let hi = (lo + chunk).min(r.end);
                lens.push((hi - lo) as u32);
                rows.extend(lo as u32..hi as u32);
            }
            let q_rows = Ragged::from_lens(&lens)?;
            let mut chunk_qs = Vec::with_capacity(layers.len());
            for (li, x) in layers.iter().enumerate() {
                let be = &self.backend;
                let mut q = be.zeros::<T>(rows.len() * hq * d)?;
                let mut k = be.zeros::<T>(rows.len() * hkv * d)?;
                let mut v = be.zeros::<T>(rows.len() * hkv * d)?;
                ops::gather_rows(be, hq * d, &rows, x.q, &mut q)?;
                ops::gather_rows(be, hkv * d, &rows, x.k, &mut k)?;
                ops::gather_rows(be, hkv * d, &rows, x.v, &mut v)?;
                let out = self.prefill_layer(li, &q_rows, &q, &k, &v)?;
                ops::scatter_rows(&self.backend, hq * d, &rows, &out, &mut outs[li])?;
                chunk_qs.push(q);
            }
            self.chunks += 1;
            last = Some((q_rows, chunk_qs));
        }
        if let Some((q_rows, qs)) = last {
            for (li, q) in qs.iter().enumerate() {
                self.hook(li, q, &q_rows, self.chunks, Phase::PrefillEnd)?;
            }
        }
        Ok(outs)
    }

    /// One layer's share of a prefill chunk, for engines that run layers one
    /// after another (the next layer's input depends on this one's output):
    /// appends the chunk's K/V (`k`, `v` `[tokens, Hkv, D]`), runs causal
    /// attention for its queries (`q` `[tokens, Hq, D]`, `q_rows` tokens per
    /// sequence), calls [`KvPolicy::on_prefill_chunk`] and applies the plan.
    /// With `last`, also calls [`KvPolicy::on_prefill_end`]. Returns the
    /// attention output `[tokens, Hq, D]`. Call [`Session::end_prefill_chunk`]
    /// once every layer has seen the chunk.
    pub fn prefill_chunk_layer(
        &mut self,
        li: usize,
        q_rows: &Ragged,
        x: &LayerInput<'_, B, T>,
        last: bool,
    ) -> Result<B::Buffer<T>> {
        let out = self.prefill_layer(li, q_rows, x.q, x.k, x.v)?;
        if last {
            self.hook(li, x.q, q_rows, self.chunks + 1, Phase::PrefillEnd)?;
        }
        Ok(out)
    }

    /// Marks the end of a prefill chunk driven with [`Session::prefill_chunk_layer`].
    pub fn end_prefill_chunk(&mut self) {
        self.chunks += 1;
    }

    /// Runs the hook of `phase` for layer `li`, applies its plan, and returns
    /// the selection of a `Select` plan.
    fn hook(
        &mut self,
        li: usize,
        q: &B::Buffer<T>,
        q_rows: &Ragged,
        step: usize,
        phase: Phase,
    ) -> Result<Option<IndexList>> {
        let plan = {
            let ctx = ctx_of(
                &self.backend,
                &self.cache,
                self.cfg.scale,
                li,
                q,
                q_rows,
                step,
                phase,
            )?;
            match phase {
                Phase::PrefillChunk => self.policy.on_prefill_chunk(&ctx)?,
                Phase::PrefillEnd => self.policy.on_prefill_end(&ctx)?,
                Phase::Decode => self.policy.on_decode_step(&ctx)?,
                Phase::Select => self.policy.select_for_attention(&ctx)?,
            }
        };
        apply_plan(&self.backend, &mut self.cache, li, plan)
    }

    /// Append, causal attention and `on_prefill_chunk` for one layer.
    fn prefill_layer(
        &mut self,
        li: usize,
        q_rows: &Ragged,
        q: &B::Buffer<T>,
        k: &B::Buffer<T>,
        v: &B::Buffer<T>,
    ) -> Result<B::Buffer<T>> {
        let hq_d = self.geom.num_q_heads() * self.geom.head_dim();
        self.cache.append(&self.backend, li, q_rows, k, v, None)?;
        let l = self.cache.layer(li)?;
        let mut out = self.backend.zeros::<T>(q_rows.total() * hq_d)?;
        let p = ops::PrefillParams {
            geom: self.geom,
            q_rows,
            segments: l.segments(),
            causal: true,
            mask: None,
            scale: self.cfg.scale,
            normalizer: &self.cfg.normalizer,
        };
        ops::prefill_attention(&self.backend, &p, q, l.k(), l.v(), &mut out)?;
        self.hook(li, q, q_rows, self.chunks, Phase::PrefillChunk)?;
        Ok(out)
    }

    /// One layer of a decode step, for engines that run layers one after
    /// another: appends the token's K/V, runs [`KvPolicy::on_decode_step`] and
    /// [`KvPolicy::select_for_attention`], applies their plans and attends.
    /// Returns the attention output `[batch, Hq, D]` and the selection used
    /// (`None` = every cached token). Call [`Session::end_decode_step`] once
    /// every layer has run.
    pub fn decode_layer(
        &mut self,
        li: usize,
        x: &LayerInput<'_, B, T>,
    ) -> Result<(B::Buffer<T>, Option<IndexList>)> {
        const OP: &str = "Session::decode_layer";
        let batch = self.cache.batch();
        let (hq, hkv, d) = (
            self.geom.num_q_heads(),
            self.geom.num_kv_heads(),
            self.geom.head_dim(),
        );
        let be = &self.backend;
        if be.buffer_len(x.q) != batch * hq * d
            || be.buffer_len(x.k) != batch * hkv * d
            || be.buffer_len(x.v) != batch * hkv * d
        {
            return Err(shape(
                OP,
                format!("decode inputs must be [{batch}, H, {d}] (Hq = {hq}, Hkv = {hkv})"),
            ));
        }
        let q_rows = Ragged::uniform(batch, 1)?;
        self.decode_layer_unchecked(li, &q_rows, x)
    }

    /// Marks the end of a decode step driven with [`Session::decode_layer`].
    pub fn end_decode_step(&mut self) {
        self.steps += 1;
    }

    fn decode_layer_unchecked(
        &mut self,
        li: usize,
        q_rows: &Ragged,
        x: &LayerInput<'_, B, T>,
    ) -> Result<(B::Buffer<T>, Option<IndexList>)> {
        let (hq, d) = (self.geom.num_q_heads(), self.geom.head_dim());
        self.cache
            .append(&self.backend, li, q_rows, x.k, x.v, None)?;
        self.hook(li, x.q, q_rows, self.steps, Phase::Decode)?;
        let sel = self.hook(li, x.q, q_rows, self.steps, Phase::Select)?;
        let l = self.cache.layer(li)?;
        let mut out = self.backend.zeros::<T>(q_rows.total() * hq * d)?;
        let p = ops::DecodeParams {
            geom: self.geom,
            segments: l.segments(),
            scale: self.cfg.scale,
            normalizer: &self.cfg.normalizer,
            restrict: sel.as_ref().map_or(Restrict::Dense, Restrict::Indices),
        };
        ops::decode_attention(&self.backend, &p, x.q, l.k(), l.v(), &mut out)?;
        Ok((out, sel))
    }

    /// One decode step: one new token per sequence. Returns each layer's
    /// attention output `[batch, Hq, D]`.
    pub fn decode(&mut self, layers: &[LayerInput<'_, B, T>]) -> Result<Vec<B::Buffer<T>>> {
        const OP: &str = "Session::decode";
        self.check_layers(OP, layers.len())?;
        let batch = self.cache.batch();
        let (hq, hkv, d) = (
            self.geom.num_q_heads(),
            self.geom.num_kv_heads(),
            self.geom.head_dim(),
        );
        let q_rows = Ragged::uniform(batch, 1)?;
        // Validate every layer before any cache is touched.
        for x in layers {
            let be = &self.backend;
            if be.buffer_len(x.q) != batch * hq * d
                || be.buffer_len(x.k) != batch * hkv * d
                || be.buffer_len(x.v) != batch * hkv * d
            {
                return Err(shape(
                    OP,
                    format!("decode inputs must be [{batch}, H, {d}] (Hq = {hq}, Hkv = {hkv})"),
                ));
            }
        }
        let mut outs = Vec::with_capacity(layers.len());
        for (li, x) in layers.iter().enumerate() {
            let (out, _) = self.decode_layer_unchecked(li, &q_rows, x)?;
            outs.push(out);
        }
        self.steps += 1;
        Ok(outs)
    }
}

#[allow(clippy::too_many_arguments)]
fn ctx_of<'a, B: Ops, T: Element>(
    backend: &'a B,
    cache: &'a KvCache<B, T>,
    scale: Option<f32>,
    layer: usize,
    queries: &'a B::Buffer<T>,
    q_rows: &'a Ragged,
    step: usize,
    phase: Phase,
) -> Result<StepCtx<'a, B, T>> {
    Ok(StepCtx {
        backend,
        layer,
        num_layers: cache.num_layers(),
        cache: cache.layer(layer)?,
        queries,
        q_rows,
        step,
        phase,
        scale,
    })
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
