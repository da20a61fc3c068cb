//! The driver: a [`KvCache`], a [`KvPolicy`] and attention for every layer
//! of a model, applying every plan the policy emits.
//!
//! One decode step of one layer crosses cache → policy → ops once:
//!
//! ```text
//! append K/V ─► select_for_attention ─► decode_attention_with ─► on_decode_step ─► apply_plan
//!  (cache)        (policy: Select?)      (ops: output + the        (policy reads      (cache: drop /
//!                                         evidence Needs asks)      the evidence)      merge rows)
//! ```
//!
//! A prefill chunk is the same with `before_prefill_chunk` (a `Select` or
//! `SelectMask` plan restricts the chunk's attention: TokenSelect's chunk
//! selection, DAM's prefill masks), `prefill_attention_with` (column sums,
//! window weights), `on_prefill_chunk` and, after the last chunk,
//! `on_prefill_end`; then the layer's capacity is trimmed to its use.
//!
//! Evidence is computed by the attention op itself and only when the
//! policy's [`Needs`] ask for it; its buffers are reused across steps. A
//! plan is validated once, here, and the attention op takes the checked
//! restriction without checking it again.
//!
//! Engines that run layers in sequence use [`Session::prefill_chunk_layer`]
//! and [`Session::decode_layer`]; `examples/llama2c` shows the integration.
#![forbid(unsafe_code)]

use crate::backend::{Backend, DecodeEvidence, Normalizer, Ops, PrefillEvidence, Restrict};
use crate::backend::{Heads, evidence_blocks};
use crate::cache::KvCache;
use crate::dtype::Element;
use crate::error::{Result, config, shape};
use crate::layout::{HeadGeometry, IndexList, MaskList, Ragged};
use crate::ops;
use crate::policy::{Compaction, Evidence, KvPolicy, Needs, Phase, Plan, StepCtx};

/// A validated restriction of one attention call.
#[derive(Clone, Debug, PartialEq)]
pub enum Restriction {
    /// Token lists (decode).
    Indices(IndexList),
    /// Bit masks (prefill; single-row masks in decode).
    Mask(MaskList),
}

/// Applies a plan to one layer of a cache. `q_rows` is the step's query
/// rows (for prefill restrictions); `prefill` tells whether the plan
/// restricts a prefill chunk (a `Select` list then becomes per-query masks,
/// see [`crate::policy::selection_prefill_mask`]). Returns the restriction
/// for this step's attention (`Select`, `SelectMask`), validated against
/// the cache, or `None`; destructive plans are applied (`Evict`, `Drop`,
/// `Merge`).
pub fn apply_plan<B: Ops, T: Element>(
    backend: &B,
    cache: &mut KvCache<B, T>,
    layer: usize,
    plan: Plan,
    q_rows: &Ragged,
    prefill: bool,
) -> Result<Option<Restriction>> {
    const OP: &str = "apply_plan";
    match plan {
        Plan::KeepAll => Ok(None),
        Plan::Select(list) => {
            let l = cache.layer(layer)?;
            list.check_against(OP, l.geom(), l.segments())?;
            if prefill {
                let m =
                    crate::policy::selection_prefill_mask(&list, l.geom(), q_rows, l.segments())?;
                Ok(Some(Restriction::Mask(m)))
            } else {
                Ok(Some(Restriction::Indices(list)))
            }
        }
        Plan::SelectMask(mask) => {
            let l = cache.layer(layer)?;
            let rows: Vec<usize> = q_rows.lens().collect();
            mask.check_against(OP, l.geom(), l.segments(), &rows)?;
            Ok(Some(Restriction::Mask(mask)))
        }
        Plan::Evict(keep) => {
            cache.compact(backend, layer, &keep)?;
            Ok(None)
        }
        Plan::Drop(drop) => {
            cache.drop_rows(backend, layer, &drop)?;
            Ok(None)
        }
        Plan::Merge(spec) => {
            cache.merge(backend, layer, &spec)?;
            Ok(None)
        }
    }
}

/// Applies the plan of a hook that runs after attention: a selection there
/// would restrict nothing, so it is an error rather than silently dropped.
fn apply_post<B: Ops, T: Element>(
    backend: &B,
    cache: &mut KvCache<B, T>,
    layer: usize,
    plan: Plan,
    q_rows: &Ragged,
) -> Result<()> {
    if matches!(plan, Plan::Select(_) | Plan::SelectMask(_)) {
        return Err(config(
            "Session",
            "a Select plan after attention restricts nothing: return it from \
             before_prefill_chunk or select_for_attention",
        ));
    }
    apply_plan(backend, cache, layer, plan, q_rows, false).map(|_| ())
}

/// The compaction a destructive plan will make (for policies and tests
/// that mirror per-row state); `None` for non-destructive plans.
pub fn plan_compaction(plan: &Plan, segs: &crate::layout::Segments) -> Option<Compaction> {
    match plan {
        Plan::Evict(keep) => Some(Compaction::from_keep(keep)),
        Plan::Drop(drop) => Some(Compaction::from_drop(segs, drop)),
        Plan::Merge(spec) => Some(Compaction::from_keep(&spec.keep)),
        _ => None,
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

/// Reused evidence buffers (grown with headroom, never shrunk).
struct EvidenceBufs<B: Backend> {
    probs: Option<B::Buffer<f32>>,
    logits: Option<B::Buffer<f32>>,
    output: Option<B::Buffer<f32>>,
    col: Option<B::Buffer<f32>>,
    win: Option<B::Buffer<f32>>,
}

impl<B: Backend> EvidenceBufs<B> {
    fn new() -> Self {
        Self {
            probs: None,
            logits: None,
            output: None,
            col: None,
            win: None,
        }
    }
}

/// A buffer of at least `n` elements in `slot` (grown by a quarter more).
fn ensure<'s, B: Backend>(
    b: &B,
    slot: &'s mut Option<B::Buffer<f32>>,
    n: usize,
) -> Result<&'s mut B::Buffer<f32>> {
    let len = slot.as_ref().map_or(0, |x| b.buffer_len(x));
    if len < n || slot.is_none() {
        *slot = Some(b.zeros(n.saturating_add(n / 4).max(1))?);
    }
    slot.as_mut()
        .ok_or_else(|| config("Session", "evidence buffer missing"))
}

/// A small driver: a cache, a policy and attention for every layer of a
/// model (see the module docs for the order of the hooks).
pub struct Session<B: Ops, T: Element> {
    backend: B,
    geom: HeadGeometry,
    cache: KvCache<B, T>,
    policy: Box<dyn KvPolicy<B, T>>,
    cfg: SessionConfig,
    chunks: usize,
    steps: usize,
    ev: EvidenceBufs<B>,
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
        cfg.normalizer.validate("Session", &geom)?;
        let cache = KvCache::new(&backend, geom, batch, num_layers)?;
        Ok(Self {
            backend,
            geom,
            cache,
            policy,
            cfg,
            chunks: 0,
            steps: 0,
            ev: EvidenceBufs::new(),
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

    /// The chunk size of [`Session::prefill`] for a prompt whose longest
    /// sequence has `max_len` tokens: the configured size, or the policy's
    /// block, or the whole prompt; at least the longest evidence window, so
    /// that the last chunk holds the window's queries.
    fn chunk_size(&self, max_len: usize) -> usize {
        let window = (0..self.cache.num_layers())
            .filter_map(|l| self.policy.needs(l).prefill_window.map(|w| w.queries))
            .max()
            .unwrap_or(1);
        self.cfg
            .prefill_chunk
            .or(self.policy.capabilities().prefill_block)
            .unwrap_or(max_len)
            .max(window.min(max_len))
            .max(1)
    }

    /// Runs the prompt (`tokens` new tokens per sequence) through every layer
    /// in chunks and returns each layer's attention output `[tokens, Hq, D]`.
    ///
    /// Chunks are aligned to the end of every sequence, so the last chunk
    /// holds every sequence's last queries (the prefill window evidence).
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
        if tokens.num_segments() != self.cache.batch() {
            return Err(shape(
                OP,
                format!(
                    "tokens has {} sequences, the session has {}",
                    tokens.num_segments(),
                    self.cache.batch()
                ),
            ));
        }
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
        let chunk = self.chunk_size(tokens.max_len());
        let nchunks = tokens.max_len().div_ceil(chunk);
        let mut outs: Vec<B::Buffer<T>> = Vec::with_capacity(layers.len());
        for _ in layers {
            outs.push(self.backend.zeros(tokens.total() * hq * d)?);
        }
        for c in 0..nchunks {
            let last = c + 1 == nchunks;
            // Chunk `c` of sequence b ends `(nchunks - 1 - c) * chunk` tokens
            // before the sequence's end.
            let mut lens = Vec::with_capacity(tokens.num_segments());
            let mut rows = Vec::new();
            for b in 0..tokens.num_segments() {
                let r = tokens.range(b);
                let back = (nchunks - 1 - c) * chunk;
                let hi = r.end.saturating_sub(back).max(r.start);
                let lo = if c == 0 {
                    r.start
                } else {
                    hi.saturating_sub(chunk).max(r.start)
                };
                lens.push((hi - lo) as u32);
                rows.extend(lo as u32..hi as u32);
            }
            let q_rows = Ragged::from_lens(&lens)?;
            for (li, x) in layers.iter().enumerate() {
                let be = &self.backend;
                let mut q = be.zeros::<T>(rows.len() * hq * d)?;
                let mut k = be.zeros::<T>(rows.len() * hkv * d)?;
                let mut v = be.zeros::<T>(rows.len() * hkv * d)?;
                ops::gather_rows(be, hq * d, &rows, x.q, &mut q)?;
                ops::gather_rows(be, hkv * d, &rows, x.k, &mut k)?;
                ops::gather_rows(be, hkv * d, &rows, x.v, &mut v)?;
                let out = self.prefill_layer(li, &q_rows, &q, &k, &v, last)?;
                ops::scatter_rows(&self.backend, hq * d, &rows, &out, &mut outs[li])?;
            }
            self.chunks += 1;
        }
        Ok(outs)
    }

    /// One layer's share of a prefill chunk, for engines that run layers one
    /// after another (the next layer's input depends on this one's output):
    /// appends the chunk's K/V (`k`, `v` `[tokens, Hkv, D]`), runs
    /// [`KvPolicy::before_prefill_chunk`], causal attention for its queries
    /// (`q` `[tokens, Hq, D]`, `q_rows` tokens per sequence) with the
    /// policy's evidence, [`KvPolicy::on_prefill_chunk`] and, with `last`,
    /// [`KvPolicy::on_prefill_end`], applying every plan. Returns the
    /// attention output `[tokens, Hq, D]`. Call [`Session::end_prefill_chunk`]
    /// once every layer has seen the chunk. The prefill window evidence
    /// covers the last chunk's queries: make it at least as long as the
    /// policy's window.
    pub fn prefill_chunk_layer(
        &mut self,
        li: usize,
        q_rows: &Ragged,
        x: &LayerInput<'_, B, T>,
        last: bool,
    ) -> Result<B::Buffer<T>> {
        self.prefill_layer(li, q_rows, x.q, x.k, x.v, last)
    }

    /// Marks the end of a prefill chunk driven with [`Session::prefill_chunk_layer`].
    pub fn end_prefill_chunk(&mut self) {
        self.chunks += 1;
    }

    /// Runs the hook of `phase` for layer `li` with `evidence`.
    #[allow(clippy::too_many_arguments)]
    fn run_hook(
        policy: &mut dyn KvPolicy<B, T>,
        backend: &B,
        cache: &KvCache<B, T>,
        scale: Option<f32>,
        li: usize,
        q: &B::Buffer<T>,
        q_rows: &Ragged,
        step: usize,
        phase: Phase,
        evidence: Evidence<'_, B>,
    ) -> Result<Plan> {
        let ctx = StepCtx {
            backend,
            layer: li,
            num_layers: cache.num_layers(),
            kv: cache.layer(li)?,
            queries: q,
            q_rows,
            step,
            phase,
            scale,
            evidence,
        };
        match phase {
            Phase::PrefillSelect => policy.before_prefill_chunk(&ctx),
            Phase::PrefillChunk => policy.on_prefill_chunk(&ctx),
            Phase::PrefillEnd => policy.on_prefill_end(&ctx),
            Phase::Select => policy.select_for_attention(&ctx),
            Phase::Decode => policy.on_decode_step(&ctx),
        }
    }

    /// Append, restriction, attention with evidence and the post-attention
    /// hooks for one layer of a prefill chunk.
    fn prefill_layer(
        &mut self,
        li: usize,
        q_rows: &Ragged,
        q: &B::Buffer<T>,
        k: &B::Buffer<T>,
        v: &B::Buffer<T>,
        last: bool,
    ) -> Result<B::Buffer<T>> {
        const OP: &str = "Session::prefill";
        let (hq, d) = (self.geom.num_q_heads(), self.geom.head_dim());
        if self.backend.buffer_len(q) != q_rows.total() * hq * d {
            return Err(shape(
                OP,
                format!("q must be [{}, {hq}, {d}]", q_rows.total()),
            ));
        }
        self.cache.append(&self.backend, li, q_rows, k, v, None)?;
        let step = self.chunks;
        let plan = Self::run_hook(
            self.policy.as_mut(),
            &self.backend,
            &self.cache,
            self.cfg.scale,
            li,
            q,
            q_rows,
            step,
            Phase::PrefillSelect,
            Evidence::default(),
        )?;
        let restriction = apply_plan(&self.backend, &mut self.cache, li, plan, q_rows, true)?;
        let mask = match &restriction {
            Some(Restriction::Mask(m)) => Some(m),
            Some(Restriction::Indices(_)) | None => None,
        };
        let needs: Needs = self.policy.needs(li);
        let l = self.cache.layer(li)?;
        let segs = l.segments();
        let batch = segs.batch();
        let ones = vec![1; batch];
        let col_n = match needs.prefill_col_sums {
            Some(h) => evidence_blocks(&self.geom, segs, h, &ones)?.total(),
            None => 0,
        };
        let win_n = match needs.prefill_window {
            Some(w) => {
                let rows: Vec<usize> = q_rows.lens().map(|n| w.rows_for(n)).collect();
                evidence_blocks(&self.geom, segs, w.heads, &rows)?.total()
            }
            None => 0,
        };
        let be = &self.backend;
        let mut col = match needs.prefill_col_sums {
            Some(h) => Some((h, ensure(be, &mut self.ev.col, col_n)?)),
            None => None,
        };
        let mut win = match needs.prefill_window {
            Some(w) => Some((w, ensure(be, &mut self.ev.win, win_n)?)),
            None => None,
        };
        let mut out = be.zeros::<T>(q_rows.total() * hq * d)?;
        let p = ops::PrefillParams {
            geom: self.geom,
            q_rows,
            segments: segs,
            causal: true,
            mask,
            scale: self.cfg.scale,
            normalizer: &self.cfg.normalizer,
        };
        ops::prefill_attention_impl(
            be,
            &p,
            q,
            l.k(),
            l.v(),
            &mut out,
            PrefillEvidence {
                col_sums: col.as_mut().map(|(h, b)| (*h, &mut **b)),
                window: win.as_mut().map(|(w, b)| (*w, &mut **b)),
            },
            true,
        )?;
        let evidence = Evidence {
            probs: None,
            logits: None,
            output: None,
            col_sums: col.map(|(h, b)| (h, &*b)),
            window: win.map(|(w, b)| (w, &*b)),
        };
        let plan = Self::run_hook(
            self.policy.as_mut(),
            &self.backend,
            &self.cache,
            self.cfg.scale,
            li,
            q,
            q_rows,
            step,
            Phase::PrefillChunk,
            evidence,
        )?;
        let destructive = !matches!(plan, Plan::KeepAll);
        apply_post(&self.backend, &mut self.cache, li, plan, q_rows)?;
        if last {
            // The chunk's evidence still describes the cache unless the
            // chunk hook changed it.
            let evidence = if destructive {
                Evidence::default()
            } else {
                Evidence {
                    probs: None,
                    logits: None,
                    output: None,
                    col_sums: needs
                        .prefill_col_sums
                        .and_then(|h| self.ev.col.as_ref().map(|b| (h, b))),
                    window: needs
                        .prefill_window
                        .and_then(|w| self.ev.win.as_ref().map(|b| (w, b))),
                }
            };
            let plan = Self::run_hook(
                self.policy.as_mut(),
                &self.backend,
                &self.cache,
                self.cfg.scale,
                li,
                q,
                q_rows,
                step + 1,
                Phase::PrefillEnd,
                evidence,
            )?;
            apply_post(&self.backend, &mut self.cache, li, plan, q_rows)?;
            self.cache.trim(&self.backend, li)?;
        }
        Ok(out)
    }

    /// One layer of a decode step, for engines that run layers one after
    /// another: appends the token's K/V, runs
    /// [`KvPolicy::select_for_attention`], attends (restricted to the
    /// selection, with the policy's evidence), runs
    /// [`KvPolicy::on_decode_step`] and applies its plan. Returns the
    /// attention output `[batch, Hq, D]` and the selection used (`None` =
    /// every cached token). Call [`Session::end_decode_step`] once every
    /// layer has run.
    pub fn decode_layer(
        &mut self,
        li: usize,
        x: &LayerInput<'_, B, T>,
    ) -> Result<(B::Buffer<T>, Option<IndexList>)> {
        const OP: &str = "Session::decode_layer";
        let batch = self.cache.batch();
        self.check_decode_input(OP, x)?;
        let q_rows = Ragged::uniform(batch, 1)?;
        self.decode_layer_unchecked(li, &q_rows, x)
    }

    fn check_decode_input(&self, op: &'static str, x: &LayerInput<'_, B, T>) -> Result<()> {
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
                op,
                format!("decode inputs must be [{batch}, H, {d}] (Hq = {hq}, Hkv = {hkv})"),
            ));
        }
        Ok(())
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
        let step = self.steps;
        let plan = Self::run_hook(
            self.policy.as_mut(),
            &self.backend,
            &self.cache,
            self.cfg.scale,
            li,
            x.q,
            q_rows,
            step,
            Phase::Select,
            Evidence::default(),
        )?;
        let restriction = apply_plan(&self.backend, &mut self.cache, li, plan, q_rows, false)?;
        let needs = self.policy.needs(li);
        let l = self.cache.layer(li)?;
        let segs = l.segments();
        let ones = vec![1; segs.batch()];
        let be = &self.backend;
        let mut probs = match needs.decode_probs {
            Some(h) => {
                let n = evidence_blocks(&self.geom, segs, h, &ones)?.total();
                Some((h, ensure(be, &mut self.ev.probs, n)?))
            }
            None => None,
        };
        let mut logits = if needs.decode_logits {
            let n = evidence_blocks(&self.geom, segs, Heads::PerHead, &ones)?.total();
            Some(ensure(be, &mut self.ev.logits, n)?)
        } else {
            None
        };
        let mut output = if needs.decode_output {
            Some(ensure(be, &mut self.ev.output, q_rows.total() * hq * d)?)
        } else {
            None
        };
        let mut out = be.zeros::<T>(q_rows.total() * hq * d)?;
        let p = ops::DecodeParams {
            geom: self.geom,
            segments: segs,
            scale: self.cfg.scale,
            normalizer: &self.cfg.normalizer,
            restrict: match &restriction {
                None => Restrict::Dense,
                Some(Restriction::Indices(list)) => Restrict::Indices(list),
                Some(Restriction::Mask(m)) => Restrict::Mask(m),
            },
        };
        ops::decode_attention_impl(
            be,
            &p,
            x.q,
            l.k(),
            l.v(),
            &mut out,
            DecodeEvidence {
                probs: probs.as_mut().map(|(h, b)| (*h, &mut **b)),
                logits: logits.as_deref_mut(),
                stats: None,
                output: output.as_deref_mut(),
            },
            true,
        )?;
        let evidence = Evidence {
            probs: probs.map(|(h, b)| (h, &*b)),
            logits: logits.map(|b| &*b),
            output: output.map(|b| &*b),
            col_sums: None,
            window: None,
        };
        let plan = Self::run_hook(
            self.policy.as_mut(),
            &self.backend,
            &self.cache,
            self.cfg.scale,
            li,
            x.q,
            q_rows,
            step,
            Phase::Decode,
            evidence,
        )?;
        apply_post(&self.backend, &mut self.cache, li, plan, q_rows)?;
        let sel = match restriction {
            Some(Restriction::Indices(list)) => Some(list),
            _ => None,
        };
        Ok((out, sel))
    }

    /// One decode step: one new token per sequence. Returns each layer's
    /// attention output `[batch, Hq, D]`.
    pub fn decode(&mut self, layers: &[LayerInput<'_, B, T>]) -> Result<Vec<B::Buffer<T>>> {
        const OP: &str = "Session::decode";
        self.check_layers(OP, layers.len())?;
        let batch = self.cache.batch();
        let q_rows = Ragged::uniform(batch, 1)?;
        // Validate every layer before any cache is touched.
        for x in layers {
            self.check_decode_input(OP, x)?;
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
