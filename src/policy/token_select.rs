//! `TokenSelect` (Wu et al. 2024): dynamic token-level KV selection with
//! per-head soft voting and a Selection Cache. Nothing is evicted; every
//! decode step (and every prefill chunk) attends to a subset of the cache.
//!
//! For one layer and one sequence with `N` cached tokens (the current
//! chunk already appended):
//!
//! 1. **Dense** when `n_init + k + n_local ≥ N` (the plan is `KeepAll`).
//! 2. Candidates `C = [n_init, N − n_local)`.
//! 3. Fingerprint `q̄ ∈ R^{Hq×D}`: the mean of the chunk's queries (one
//!    query in decode), as the engine hands them in.
//! 4. Criticality `l_{h,j} = s · q̄_h · k_{j, kv(h)}` with `kv(h) = ⌊h / G⌋`
//!    ([`TokenSelectConfig::gqa_modulo`] reproduces the release's `h mod Hkv`)
//!    and `s` the step's logit scale (`1/√D` by default) or `s = 1` with
//!    [`TokenSelectConfig::scaled`] `= false` (the released code).
//! 5. Soft vote `score_j = Σ_h softmax_{j ∈ C}(l_{h,·})_j`.
//! 6. Optional max pooling along `C` (odd kernel, "same" padding).
//! 7. `top-k` of the score (ties: lower index wins).
//! 8. Selection `[0, n_init) ∪ (top-k) ∪ [N − n_local, N)`, shared by every
//!    head of the layer (a [`Scope::KvHead`] list, the same set for every
//!    KV head of a sequence).
//!
//! **Selection Cache.** Per (layer, sequence), the top-k part of the last
//! selection is reused while `cos(q̄, q̄*) ≥ θ`, `q̄*` being the fingerprint
//! that last *triggered* a selection (it is not updated on a hit). On a miss
//! the selection and `q̄*` are recomputed. The first sparse step of a request
//! always selects. On a hit the sink and local windows are rebuilt for the
//! current `N`, so the newest tokens are always attended. Only sparse steps
//! count as look-ups; see [`TokenSelect::hit_rate`].
//!
//! **Positions.** The selected tokens are attended with RoPE positions
//! equal to their rank inside the selection (the paper's length
//! extrapolation, [`RopePositions::Rank`]) or their original positions
//! ([`RopePositions::Original`]); [`selection_positions`] gives either, read
//! from the cache's stored positions.
//!
//! Cost per step and layer (sparse case): one `qk_logits` pass of `Hq`
//! fingerprint rows over the `|C|` candidates (O(N·Hq·D), backend), one
//! `softmax_rows`, O(N·Hq) host work for the vote, one `topk_rows`. On a
//! cache hit: O(Hq·D) for the cosine and O(k + n_init + n_local) for the
//! list.
//!
//! Page: `docs/policies/token_select.md`.
#![forbid(unsafe_code)]

use super::{Capabilities, KvPolicy, Plan, StepCtx};
use crate::backend::{Backend, Ops};
use crate::cache::KvView;
use crate::dtype::Element;
use crate::error::{Error, Result, budget, config, shape};
use crate::layout::{
    BitMask, HeadGeometry, IndexList, IndexSet, MaskList, Ragged, Scope, Segments,
};
use crate::ops;

const OP: &str = "TokenSelect";

/// Which RoPE positions the selected tokens are attended with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RopePositions {
    /// Rank inside the selected list (`0, 1, …`; the paper's extrapolation
    /// mechanism; needs pre-RoPE keys or re-rotation).
    #[default]
    Rank,
    /// The tokens' original positions, as stored by the cache.
    Original,
}

/// Settings of [`TokenSelect`]. `Default` holds the paper's values.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenSelectConfig {
    /// Attention sinks always attended (paper: 128).
    pub n_init: usize,
    /// Tokens chosen by the soft vote (paper: 2048); at least 1.
    pub k: usize,
    /// Recent tokens always attended (paper: 512).
    pub n_local: usize,
    /// Selection Cache similarity threshold θ in `[-1, 1]` (paper: 0.9).
    pub theta: f32,
    /// Enables the Selection Cache (default on; the authors' release had it
    /// off).
    pub selection_cache: bool,
    /// Prefill chunk size (paper: 512), reported as
    /// [`Capabilities::prefill_block`].
    pub chunk: usize,
    /// Multiply the criticality by the step's logit scale (default `true`,
    /// `1/√D`); `false` uses raw `q · k` like the released code.
    pub scaled: bool,
    /// Max-pooling kernel over the vote (odd; `None` = off, the default).
    pub pool_kernel: Option<usize>,
    /// Positions reported by [`TokenSelect::rope_positions`].
    pub positions: RopePositions,
    /// Score query head `h` against KV head `h mod Hkv`, like the released
    /// Triton scorer (a bug there; default `false`: `⌊h / G⌋`, the HF /
    /// vLLM layout). Only for bit-compatibility experiments.
    pub gqa_modulo: bool,
}

impl Default for TokenSelectConfig {
    fn default() -> Self {
        Self {
            n_init: 128,
            k: 2048,
            n_local: 512,
            theta: 0.9,
            selection_cache: true,
            chunk: 512,
            scaled: true,
            pool_kernel: None,
            positions: RopePositions::Rank,
            gqa_modulo: false,
        }
    }
}

impl TokenSelectConfig {
    /// Checks the settings: `k ≥ 1`, `chunk ≥ 1`, θ in `[-1, 1]`, pooling
    /// kernel odd.
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(budget(OP, "k = 0: TokenSelect selects at least one token"));
        }
        if self.chunk == 0 {
            return Err(config(OP, "the prefill chunk must hold at least one token"));
        }
        if !(-1.0..=1.0).contains(&self.theta) {
            return Err(config(
                OP,
                format!(
                    "theta is a cosine similarity threshold and must be in [-1, 1], got {}",
                    self.theta
                ),
            ));
        }
        if let Some(ks) = self.pool_kernel
            && ks.is_multiple_of(2)
        {
            return Err(config(
                OP,
                format!("the pooling kernel must be odd (\"same\" padding), got {ks}"),
            ));
        }
        Ok(())
    }
}

/// Selection Cache counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Sparse steps that reused the cached selection.
    pub hits: u64,
    /// Sparse steps (hits and misses).
    pub lookups: u64,
}

impl CacheStats {
    /// `hits / lookups`; `None` before the first look-up.
    pub fn hit_rate(&self) -> Option<f64> {
        (self.lookups > 0).then(|| self.hits as f64 / self.lookups as f64)
    }
}

#[derive(Clone, Debug)]
struct Cached {
    fingerprint: Vec<f32>,
    topk: Vec<u32>,
    len: usize,
}

#[derive(Clone, Debug, Default)]
struct LayerState {
    seqs: Vec<Option<Cached>>,
    stats: CacheStats,
    last: Option<IndexList>,
}

/// Soft-vote token selection with a Selection Cache (see the module docs).
#[derive(Clone, Debug)]
pub struct TokenSelect {
    cfg: TokenSelectConfig,
    layers: Vec<LayerState>,
}

/// Cosine similarity in f64; `None` when a vector is zero or lengths differ.
fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    if a.len() != b.len() {
        return None;
    }
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    (aa > 0.0 && bb > 0.0).then(|| ab / (aa.sqrt() * bb.sqrt()))
}

/// 1-D max pooling, stride 1, "same" padding (odd kernel).
fn max_pool(x: &[f32], kernel: usize) -> Vec<f32> {
    let r = kernel / 2;
    (0..x.len())
        .map(|i| {
            let lo = i.saturating_sub(r);
            let hi = (i + r + 1).min(x.len());
            x[lo..hi].iter().copied().fold(f32::NEG_INFINITY, f32::max)
        })
        .collect()
}

/// Length of every KV head of sequence `b` (they must agree: the selection
/// is shared by the layer's heads).
fn seq_len(segs: &Segments, b: usize) -> Result<usize> {
    let n = segs.len_of(segs.index(b, 0));
    if let Some(g) = (1..segs.num_kv_heads()).find(|&g| segs.len_of(segs.index(b, g)) != n) {
        return Err(shape(
            OP,
            format!(
                "sequence {b}: KV head {g} holds {} tokens, KV head 0 holds {n}; a layer-shared selection needs equal lengths",
                segs.len_of(segs.index(b, g))
            ),
        ));
    }
    Ok(n)
}

impl TokenSelect {
    /// Validates the config (see [`TokenSelectConfig::validate`]).
    pub fn new(cfg: TokenSelectConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            layers: Vec::new(),
        })
    }

    /// The settings.
    pub fn config(&self) -> &TokenSelectConfig {
        &self.cfg
    }

    /// Selection Cache counters of `layer` (zeros for a layer never seen).
    pub fn cache_stats(&self, layer: usize) -> CacheStats {
        self.layers
            .get(layer)
            .map_or_else(CacheStats::default, |l| l.stats)
    }

    /// Selection Cache counters summed over layers.
    pub fn total_cache_stats(&self) -> CacheStats {
        self.layers
            .iter()
            .fold(CacheStats::default(), |acc, l| CacheStats {
                hits: acc.hits + l.stats.hits,
                lookups: acc.lookups + l.stats.lookups,
            })
    }

    /// Hit rate of `layer`'s Selection Cache (`None` before its first sparse step).
    pub fn hit_rate(&self, layer: usize) -> Option<f64> {
        self.cache_stats(layer).hit_rate()
    }

    /// Hit rate over all layers.
    pub fn total_hit_rate(&self) -> Option<f64> {
        self.total_cache_stats().hit_rate()
    }

    /// Clears the counters (kept across [`KvPolicy::reset`]).
    pub fn reset_stats(&mut self) {
        for l in &mut self.layers {
            l.stats = CacheStats::default();
        }
    }

    /// The last selection emitted for `layer` (`None`: dense or never run).
    pub fn last_selection(&self, layer: usize) -> Option<&IndexList> {
        self.layers.get(layer).and_then(|l| l.last.as_ref())
    }

    /// RoPE positions of a selection in the configured mode (see
    /// [`selection_positions`]).
    pub fn rope_positions<B: Backend, T: Element>(
        &self,
        cache: &dyn KvView<B, T>,
        selection: Option<&IndexList>,
    ) -> Result<Vec<Vec<u32>>> {
        selection_positions(cache, selection, self.cfg.positions)
    }

    /// Per-sequence fingerprints (mean of the step's queries, `[Hq·D]`).
    fn fingerprints<B: Ops, T: Element>(
        &self,
        ctx: &StepCtx<'_, B, T>,
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let g = ctx.geom();
        let w = g.num_q_heads() * g.head_dim();
        let batch = ctx.batch();
        if ctx.q_rows.num_segments() != batch {
            return Err(shape(
                OP,
                format!(
                    "q_rows has {} sequences, the cache has {batch}",
                    ctx.q_rows.num_segments()
                ),
            ));
        }
        let want = ctx.q_rows.total() * w;
        if ctx.backend.buffer_len(ctx.queries) != want {
            return Err(shape(
                OP,
                format!(
                    "queries have {} elements, expected [{}, {}, {}]",
                    ctx.backend.buffer_len(ctx.queries),
                    ctx.q_rows.total(),
                    g.num_q_heads(),
                    g.head_dim()
                ),
            ));
        }
        let q = ctx.backend.download(ctx.queries)?;
        let mut out = Vec::with_capacity(batch);
        for b in 0..batch {
            let r = ctx.q_rows.range(b);
            if r.is_empty() {
                out.push(None);
                continue;
            }
            let mut acc = vec![0.0f64; w];
            for row in r.clone() {
                for (a, x) in acc.iter_mut().zip(&q[row * w..(row + 1) * w]) {
                    *a += x.to_f64();
                }
            }
            let n = r.len() as f64;
            let fp: Vec<f32> = acc.iter().map(|a| (a / n) as f32).collect();
            if let Some(x) = fp.iter().find(|x| !x.is_finite()) {
                return Err(Error::NonFinite {
                    op: OP,
                    what: format!("query fingerprint of sequence {b} holds {x}"),
                });
            }
            out.push(Some(fp));
        }
        Ok(out)
    }

    /// Pooled soft votes over the candidates of the sequences in `which`,
    /// computed with `qk_logits` + `softmax_rows` on the backend.
    fn votes<B: Ops, T: Element>(
        &self,
        ctx: &StepCtx<'_, B, T>,
        which: &[(usize, usize)],
        fps: &[Option<Vec<f32>>],
    ) -> Result<Vec<Vec<f32>>> {
        let geom = *ctx.geom();
        let (hq, hkv) = (geom.num_q_heads(), geom.num_kv_heads());
        let segs = ctx.kv.segments();
        let mut offsets = Vec::with_capacity(which.len() * hkv);
        let mut lens = Vec::with_capacity(which.len() * hkv);
        let mut q = Vec::with_capacity(which.len() * hq * geom.head_dim());
        for &(b, n) in which {
            let cand = n - self.cfg.n_init - self.cfg.n_local;
            for g in 0..hkv {
                offsets.push((segs.offset(segs.index(b, g)) + self.cfg.n_init) as u32);
                lens.push(cand as u32);
            }
            let fp = fps[b]
                .as_ref()
                .ok_or_else(|| shape(OP, format!("sequence {b} has no query")))?;
            if self.cfg.gqa_modulo {
                // Slot `g·G + i` (read by KV head g) takes query head `g + i·Hkv`.
                let (d, grp) = (geom.head_dim(), geom.group());
                for slot in 0..hq {
                    let h = slot / grp + (slot % grp) * hkv;
                    q.extend(fp[h * d..(h + 1) * d].iter().map(|&x| T::from_f32(x)));
                }
            } else {
                q.extend(fp.iter().map(|&x| T::from_f32(x)));
            }
        }
        let cand_segs = Segments::new(which.len(), hkv, offsets, lens)?;
        let q_rows = Ragged::uniform(which.len(), 1)?;
        let p = ops::QkParams {
            geom,
            q_rows: &q_rows,
            segments: &cand_segs,
            causal: false,
            scale: if self.cfg.scaled {
                ctx.scale
            } else {
                Some(1.0)
            },
        };
        let be = ctx.backend;
        let layout = ops::qk_layout(&p)?;
        let qbuf = be.upload(&q)?;
        let mut logits = be.zeros::<f32>(layout.blocks.total())?;
        ops::qk_logits(be, &p, &qbuf, ctx.kv.k(), &mut logits)?;
        let mut probs = be.zeros::<f32>(layout.blocks.total())?;
        ops::softmax_rows(be, &layout.rows, &logits, &mut probs)?;
        let probs = be.download(&probs)?;
        let mut out = Vec::with_capacity(which.len());
        for (c, &(b, n)) in which.iter().enumerate() {
            let cand = n - self.cfg.n_init - self.cfg.n_local;
            let mut acc = vec![0.0f64; cand];
            for h in 0..hq {
                for (a, &p) in acc.iter_mut().zip(&probs[layout.blocks.range(c * hq + h)]) {
                    *a += f64::from(p);
                }
            }
            let vote: Vec<f32> = acc.iter().map(|&a| a as f32).collect();
            if let Some(i) = vote.iter().position(|x| !x.is_finite()) {
                return Err(Error::NonFinite {
                    op: OP,
                    what: format!(
                        "sequence {b}: soft vote of candidate {i} is {} (NaN or infinite query / key?)",
                        vote[i]
                    ),
                });
            }
            out.push(match self.cfg.pool_kernel {
                Some(ks) if ks > 1 => max_pool(&vote, ks),
                _ => vote,
            });
        }
        Ok(out)
    }

    /// The pooled soft vote over the candidates `[n_init, N − n_local)` of
    /// every sequence of the step (empty for a sequence with no candidate or
    /// no query). Does not touch the Selection Cache.
    pub fn candidate_scores<B: Ops, T: Element>(
        &self,
        ctx: &StepCtx<'_, B, T>,
    ) -> Result<Vec<Vec<f32>>> {
        self.cfg.validate()?;
        let fps = self.fingerprints(ctx)?;
        let segs = ctx.kv.segments();
        let mut which = Vec::new();
        for (b, fp) in fps.iter().enumerate() {
            let n = seq_len(segs, b)?;
            if fp.is_some() && n > self.cfg.n_init.saturating_add(self.cfg.n_local) {
                which.push((b, n));
            }
        }
        let votes = if which.is_empty() {
            Vec::new()
        } else {
            self.votes(ctx, &which, &fps)?
        };
        let mut out = vec![Vec::new(); ctx.batch()];
        for ((b, _), v) in which.into_iter().zip(votes) {
            out[b] = v;
        }
        Ok(out)
    }

    /// One selection for the step of `ctx` (prefill chunk or decode).
    fn select<B: Ops, T: Element>(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.cfg.validate()?;
        let segs = ctx.kv.segments();
        let batch = ctx.batch();
        let window = self
            .cfg
            .n_init
            .saturating_add(self.cfg.k)
            .saturating_add(self.cfg.n_local);
        let lens = (0..batch)
            .map(|b| seq_len(segs, b))
            .collect::<Result<Vec<_>>>()?;
        if ctx.layer >= ctx.num_layers {
            return Err(shape(
                OP,
                format!(
                    "layer {} out of range for a model of {} layers",
                    ctx.layer, ctx.num_layers
                ),
            ));
        }
        if ctx.layer >= self.layers.len() {
            self.layers.resize_with(ctx.layer + 1, LayerState::default);
        }
        if lens.iter().all(|&n| n <= window) {
            self.layers[ctx.layer].last = None;
            return Ok(Plan::KeepAll);
        }
        let fps = self.fingerprints(ctx)?;
        let (theta, use_cache) = (f64::from(self.cfg.theta), self.cfg.selection_cache);
        let state = &mut self.layers[ctx.layer];
        state.seqs.resize(batch, None);
        let mut topk: Vec<Option<Vec<u32>>> = vec![None; batch];
        let mut misses = Vec::new();
        for b in 0..batch {
            let (n, Some(fp)) = (lens[b], fps[b].as_ref()) else {
                continue;
            };
            if n <= window {
                continue;
            }
            state.stats.lookups += 1;
            let hit = state.seqs[b].as_ref().filter(|c| {
                use_cache
                    && c.len <= n
                    && c.topk.last().is_none_or(|&j| (j as usize) < n)
                    && cosine(fp, &c.fingerprint).is_some_and(|s| s >= theta)
            });
            if let Some(c) = hit {
                state.stats.hits += 1;
                topk[b] = Some(c.topk.clone());
            } else {
                misses.push((b, n));
            }
        }
        if !misses.is_empty() {
            let votes = self.votes(ctx, &misses, &fps)?;
            let rows =
                Ragged::from_lens(&votes.iter().map(|v| v.len() as u32).collect::<Vec<_>>())?;
            let flat: Vec<f32> = votes.concat();
            let buf = ctx.backend.upload(&flat)?;
            let picked = ops::topk_rows(ctx.backend, &rows, self.cfg.k, Scope::KvHead, &buf)?;
            let state = &mut self.layers[ctx.layer];
            for (c, &(b, n)) in misses.iter().enumerate() {
                let sel: Vec<u32> = picked
                    .list(c)
                    .iter()
                    .map(|&j| j + self.cfg.n_init as u32)
                    .collect();
                topk[b] = Some(sel.clone());
                state.seqs[b] = Some(Cached {
                    fingerprint: fps[b].clone().unwrap_or_default(),
                    topk: sel,
                    len: n,
                });
            }
        }
        let hkv = ctx.geom().num_kv_heads();
        let mut sets = Vec::with_capacity(batch * hkv);
        for b in 0..batch {
            let n = lens[b];
            let set = match &topk[b] {
                None => IndexSet::all(n as u32),
                Some(t) => {
                    let mut v: Vec<u32> = (0..self.cfg.n_init.min(n) as u32).collect();
                    v.extend_from_slice(t);
                    v.extend(n.saturating_sub(self.cfg.n_local) as u32..n as u32);
                    IndexSet::from_unsorted(v)
                }
            };
            for _ in 0..hkv {
                sets.push(set.clone());
            }
        }
        let list = IndexList::from_sets(Scope::KvHead, &sets)?;
        self.layers[ctx.layer].last = Some(list.clone());
        Ok(Plan::Select(list))
    }
}

/// RoPE positions of the tokens of a selection, one vector per list of
/// `selection` (per segment when `None`, meaning every token):
/// [`RopePositions::Rank`] gives `0 .. len` (the query then sits at rank
/// `len − 1` when the current token is selected, as it is whenever
/// `n_local ≥ 1`); [`RopePositions::Original`] reads the positions the cache
/// stored for those rows.
pub fn selection_positions<B: Backend, T: Element>(
    cache: &dyn KvView<B, T>,
    selection: Option<&IndexList>,
    mode: RopePositions,
) -> Result<Vec<Vec<u32>>> {
    const POS: &str = "selection_positions";
    let segs = cache.segments();
    let geom = cache.geom();
    let Some(list) = selection else {
        return Ok((0..segs.num_segments())
            .map(|s| match mode {
                RopePositions::Rank => (0..segs.len_of(s) as u32).collect(),
                RopePositions::Original => cache.positions(s).to_vec(),
            })
            .collect());
    };
    list.check_against(POS, geom, segs)?;
    Ok((0..list.num_lists())
        .map(|i| {
            let s = match list.scope() {
                Scope::KvHead => i,
                Scope::QueryHead => {
                    let (b, h) = (i / geom.num_q_heads(), i % geom.num_q_heads());
                    segs.index(b, geom.kv_head(h))
                }
            };
            let idx = list.list(i);
            match mode {
                RopePositions::Rank => (0..idx.len() as u32).collect(),
                RopePositions::Original => {
                    let pos = cache.positions(s);
                    idx.iter().map(|&j| pos[j as usize]).collect()
                }
            }
        })
        .collect())
}

/// Turns a chunk's selection (scope `KvHead` or `QueryHead`) into the
/// `q_len × kv_len` masks of [`ops::prefill_attention`] (same scope): query
/// row `r` of sequence `b` sits at position `kv_len − q_len + r`
/// (bottom-right aligned) and may attend to the selected tokens at or
/// before it, plus itself (so no row is empty). Use it with
/// `causal: true`.
pub fn selection_prefill_mask(
    selection: &IndexList,
    geom: &HeadGeometry,
    q_rows: &Ragged,
    segs: &Segments,
) -> Result<MaskList> {
    const MASK: &str = "selection_prefill_mask";
    selection.check_against(MASK, geom, segs)?;
    if q_rows.num_segments() != segs.batch() {
        return Err(shape(
            MASK,
            format!(
                "q_rows has {} sequences, segments have {}",
                q_rows.num_segments(),
                segs.batch()
            ),
        ));
    }
    let heads = match selection.scope() {
        Scope::KvHead => geom.num_kv_heads(),
        Scope::QueryHead => geom.num_q_heads(),
    };
    let mut masks = Vec::with_capacity(selection.num_lists());
    for i in 0..selection.num_lists() {
        let (b, h) = (i / heads, i % heads);
        let g = match selection.scope() {
            Scope::KvHead => h,
            Scope::QueryHead => geom.kv_head(h),
        };
        let kv = segs.len_of(segs.index(b, g));
        let nq = q_rows.len_of(b);
        if nq > kv {
            return Err(shape(
                MASK,
                format!("sequence {b}: {nq} queries but only {kv} cached tokens"),
            ));
        }
        let base = BitMask::from_indices(kv, &IndexSet::new(selection.list(i).to_vec())?)?;
        let rows = (0..nq)
            .map(|r| {
                let mut m = base.clone();
                m.set(kv - nq + r, true);
                m
            })
            .collect();
        masks.push(rows);
    }
    MaskList::from_rows(selection.scope(), &masks)
}

impl<B: Ops, T: Element> KvPolicy<B, T> for TokenSelect {
    fn name(&self) -> &'static str {
        "token_select"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            selects: true,
            prefill_block: Some(self.cfg.chunk),
            ..Capabilities::default()
        }
    }
    /// Selection for the chunk's own attention (the driver turns the list
    /// into prefill masks with [`selection_prefill_mask`]).
    fn before_prefill_chunk(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.select(ctx)
    }
    fn select_for_attention(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.select(ctx)
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = self.total_cache_stats();
        vec![("cache_hits", c.hits), ("cache_lookups", c.lookups)]
    }
    fn reset(&mut self) {
        for l in &mut self.layers {
            l.seqs.clear();
            l.last = None;
        }
    }
}

/// The examples of `docs/policies/token_select.md`, run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/policies/token_select.md")]
struct DocExamples;
