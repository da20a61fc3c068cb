//! `Caote` (Goel et al. 2025): attention-output-error token eviction, a
//! meta-policy on top of any base [`Scorer`].
//!
//! Per query head `h` of a segment with `L` tokens, the base scores `H_h` are
//! normalised to the simplex, `α_j = H_j / Σ_i H_i` (uniform when the sum is
//! 0), and the pseudo-output is `o = Σ_i α_i v_i` (`v̄ = (1/L) Σ_i v_i` for
//! FastCAOTE). The eviction error of token `j` is exactly
//!
//! ```text
//! c_j = α_j / (1 − α_j) · ‖o − v_j‖₂          (FastCAOTE: ‖v̄ − v_j‖₂)
//! ```
//!
//! (removing `j` and renormalising gives `o' = (o − α_j v_j)/(1 − α_j)` and
//! `‖o − o'‖ = c_j`). Guard: when `1 − α_j < 1e-6` the score is `+∞`, so a
//! token holding all the mass is never evicted.
//!
//! GQA (not documented by the paper; our rule, `ems_caote.md` A7): for KV
//! head `g` with query heads `G(g)`, `c_{g,j} = sqrt(Σ_{h ∈ G(g)} c_{h,j}²)`,
//! the L2 error of the group's concatenated outputs when `j` leaves the
//! shared KV head. [`CaoteGqa::MeanScores`] averages `α` over the group
//! first instead.
//!
//! Schedule: block-wise prefill (`block` tokens per chunk, default 128) with
//! eviction back to the budget after every block, and one eviction per
//! decode step once over budget, after that step's attention (whose
//! evidence feeds the base scorer). Protected sinks/recent tokens of the
//! budget stay protected, and so do the base method's own
//! ([`Scorer::protects`]: SnapKV's window, TOVA's current token).
//!
//! `‖o − v_j‖` is computed directly from the difference in f32 by
//! [`crate::ops::value_distances`] (the expanded form
//! `‖o‖² − 2 o·v + ‖v‖²` cancels exactly where CAOTE matters, `v_j ≈ o`).
//! Cost per hook: the base scorer and one `value_distances` (two passes
//! over V: the weighted sums, then the distances), O(L) host work per head.
#![forbid(unsafe_code)]

use super::evidence::{
    Compaction, RowState, candidate_arrivals, checked_sums, evict_by_scores, segment_of,
};
use super::{
    Budget, Capabilities, Heads, KvPolicy, Needs, Phase, Plan, ScoreUpdate, Scorer, StepCtx,
};
use crate::backend::{Backend, Ops, evidence_blocks};
use crate::cache::KvView;
use crate::cpu::simd;
use crate::dtype::Element;
use crate::error::{Error, Result, config, shape};
use crate::layout::{IndexList, IndexSet, Scope};
use crate::ops;

/// GQA rule of [`Caote`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaoteGqa {
    /// `c_g = sqrt(Σ_h c_h²)` (default).
    RootSumSquares,
    /// Average the normalised scores over the group, one CAOTE score per KV head.
    MeanScores,
}

/// Settings of [`Caote`].
#[derive(Clone, Debug, PartialEq)]
pub struct CaoteConfig {
    /// Token budget (with the base method's protected windows).
    pub budget: Budget,
    /// FastCAOTE: use the mean value instead of the weighted output.
    pub fast: bool,
    /// Prefill block size (paper: 128).
    pub block: usize,
    /// GQA rule.
    pub gqa: CaoteGqa,
    /// Follow the pseudo-output across decode steps and re-score only the
    /// rows the distance bounds cannot rule out (default); `false` runs the
    /// full pass every step (same decisions, for checking).
    pub incremental: bool,
}

impl Default for CaoteConfig {
    fn default() -> Self {
        Self {
            budget: Budget::tokens(2048),
            fast: false,
            block: 128,
            gqa: CaoteGqa::RootSumSquares,
            incremental: true,
        }
    }
}

/// CAOTE on top of the scorer `S` (e.g. [`super::H2oScorer`],
/// [`super::TovaScorer`], [`super::SnapKvScorer`] or your own).
#[derive(Clone, Debug)]
pub struct Caote<S> {
    cfg: CaoteConfig,
    scorer: S,
    layers: Vec<Option<LayerState>>,
    counts: CaoteCounts,
}

/// What CAOTE's decode steps cost (see [`KvPolicy::counters`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct CaoteCounts {
    /// Hooks run.
    hooks: u64,
    /// Full passes over V (prefill, first and refresh steps, loose bounds).
    full_passes: u64,
    /// Rows re-scored exactly on the host by incremental steps.
    rescored: u64,
    /// Decode steps decided inside a horizon, without the bound pass.
    horizon_steps: u64,
}

impl<S> Caote<S> {
    /// Validates the config.
    pub fn new(cfg: CaoteConfig, scorer: S) -> Result<Self> {
        cfg.budget.validate("Caote")?;
        if cfg.block == 0 {
            return Err(config("Caote", "block must be positive"));
        }
        Ok(Self {
            cfg,
            scorer,
            layers: Vec::new(),
            counts: CaoteCounts::default(),
        })
    }
    /// The base scorer.
    pub fn scorer(&self) -> &S {
        &self.scorer
    }
}

impl<B: Backend, T: Element> Scorer<B, T> for Box<dyn Scorer<B, T>> {
    fn name(&self) -> &'static str {
        self.as_ref().name()
    }
    fn needs(&self, heads: Heads) -> Needs {
        self.as_ref().needs(heads)
    }
    fn score(&mut self, ctx: &StepCtx<'_, B, T>, heads: Heads) -> Result<Vec<Vec<f64>>> {
        self.as_mut().score(ctx, heads)
    }
    fn lend(&mut self, ctx: &StepCtx<'_, B, T>, heads: Heads) -> Result<Vec<Vec<f64>>> {
        self.as_mut().lend(ctx, heads)
    }
    fn restore(&mut self, layer: usize, scores: Vec<Vec<f64>>) {
        self.as_mut().restore(layer, scores)
    }
    fn retain(&mut self, layer: usize, c: &Compaction) -> Result<()> {
        self.as_mut().retain(layer, c)
    }
    fn protects(&self) -> (usize, usize) {
        self.as_ref().protects()
    }
    fn update(&self) -> ScoreUpdate {
        self.as_ref().update()
    }
    fn reset(&mut self) {
        self.as_mut().reset()
    }
}

/// Normalises raw scores to the simplex (uniform when they sum to 0).
/// Negative or non-finite scores are an error.
#[cfg(test)]
pub(crate) fn to_simplex(op: &'static str, h: &[f64]) -> Result<Vec<f64>> {
    // One branch-free pass (NaN fails both comparisons), then the rare
    // search for the message.
    if !h
        .iter()
        .fold(true, |ok, &x| ok & (0.0..f64::INFINITY).contains(&x))
    {
        let x = h
            .iter()
            .find(|x| !x.is_finite() || **x < 0.0)
            .copied()
            .unwrap_or(f64::NAN);
        return Err(Error::NonFinite {
            op,
            what: format!("base score {x} (scores must be finite and non-negative)"),
        });
    }
    let s = simd::sum8_f64(h);
    if s > 0.0 {
        Ok(h.iter().map(|x| x / s).collect())
    } else {
        let n = h.len().max(1) as f64;
        Ok(vec![1.0 / n; h.len()])
    }
}

/// CAOTE's weights `α_ij = H_ij / Σ_j H_ij` (uniform when the sum is 0, as
/// `to_simplex`), read from the raw scores without materialising them.
struct Weights<'r> {
    raw: &'r [Vec<f64>],
    sums: &'r [f64],
}

impl Weights<'_> {
    /// `α_ij`, exactly as `to_simplex` computes it.
    fn at(&self, i: usize, j: usize) -> f64 {
        let s = self.sums[i];
        if s > 0.0 {
            self.raw[i][j] / s
        } else {
            1.0 / self.raw[i].len().max(1) as f64
        }
    }
    /// `1 / Σ_j H_ij` (0 when the sum is 0: the weights are then uniform).
    fn inv_sum(&self, i: usize) -> f64 {
        let s = self.sums[i];
        if s > 0.0 { 1.0 / s } else { 0.0 }
    }
}

/// CAOTE scores per block of `heads` (per (sequence, query head) for
/// [`Heads::PerHead`], else per (sequence, KV head)) for given weights
/// `alpha` (each summing to 1 over its segment; not renormalised here):
/// `c_j = α_j/(1 − α_j) · ‖o − v_j‖` with `o = Σ_i α_i v_i`, or `v̄` when
/// `fast`. `+∞` where `1 − α_j < 1e-6`. The distances come from
/// [`ops::value_distances`] (direct differences in f32, on the backend).
pub fn caote_scores<B: Ops, T: Element>(
    backend: &B,
    kv: &dyn KvView<B, T>,
    heads: Heads,
    alpha: &[Vec<f64>],
    fast: bool,
) -> Result<Vec<Vec<f64>>> {
    const OP: &str = "caote_scores";
    let geom = *kv.geom();
    let segs = kv.segments();
    let blocks = evidence_blocks(&geom, segs, heads, &vec![1; segs.batch()])?;
    if alpha.len() != blocks.num_segments() {
        return Err(shape(
            OP,
            format!(
                "{} weight vectors for {} blocks",
                alpha.len(),
                blocks.num_segments()
            ),
        ));
    }
    let mut w = Vec::with_capacity(blocks.total());
    for (i, a) in alpha.iter().enumerate() {
        if a.len() != blocks.len_of(i) {
            return Err(shape(
                OP,
                format!(
                    "block {i}: {} weights for {} tokens",
                    a.len(),
                    blocks.len_of(i)
                ),
            ));
        }
        if let Some(x) = a.iter().find(|x| !x.is_finite()) {
            return Err(Error::NonFinite {
                op: OP,
                what: format!("weight {x}"),
            });
        }
        w.extend(a.iter().map(|&x| x as f32));
    }
    let wb = backend.upload(&w)?;
    let mut dist = backend.zeros::<f32>(blocks.total())?;
    ops::value_distances(
        backend,
        geom,
        segs,
        heads,
        fast,
        &wb,
        kv.v(),
        &mut dist,
        None,
    )?;
    let dist = backend.download(&dist)?;
    Ok(alpha
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let dv = &dist[blocks.range(i)];
            a.iter()
                .zip(dv)
                .map(|(&a, &dj)| {
                    if 1.0 - a < 1e-6 {
                        f64::INFINITY
                    } else {
                        a / (1.0 - a) * f64::from(dj)
                    }
                })
                .collect()
        })
        .collect())
}

/// Exact output change when a whole set `S` is evicted at once (host-side
/// analysis helper, `ems_caote.md` A3.4):
/// `c_S = ‖Σ_{i∈S} α_i (o − v_i)‖ / (1 − Σ_{i∈S} α_i)`, `o = Σ_i α_i v_i`.
/// `values` is `[L, D]` row-major. Not additive over `S`.
pub fn joint_eviction_error(alpha: &[f64], values: &[f64], set: &[usize]) -> Result<f64> {
    const OP: &str = "joint_eviction_error";
    let n = alpha.len();
    if n == 0 || !values.len().is_multiple_of(n) {
        return Err(shape(
            OP,
            format!("{} values for {n} weights", values.len()),
        ));
    }
    let d = values.len() / n;
    if let Some(&j) = set.iter().find(|&&j| j >= n) {
        return Err(shape(OP, format!("token {j} out of range for {n} tokens")));
    }
    let mut o = vec![0.0; d];
    for (i, &a) in alpha.iter().enumerate() {
        for (x, v) in o.iter_mut().zip(&values[i * d..(i + 1) * d]) {
            *x += a * v;
        }
    }
    let mut e = vec![0.0; d];
    let mut mass = 0.0;
    for &i in set {
        mass += alpha[i];
        for ((x, oo), v) in e.iter_mut().zip(&o).zip(&values[i * d..(i + 1) * d]) {
            *x += alpha[i] * (oo - v);
        }
    }
    let rest = 1.0 - mass;
    if rest < 1e-12 {
        return Ok(f64::INFINITY);
    }
    Ok(e.iter().map(|x| x * x).sum::<f64>().sqrt() / rest)
}

/// Decode steps between exact re-computations of CAOTE's pseudo-outputs and
/// distances (bounds float drift of the incremental updates).
const REFRESH_STEPS: usize = 256;

/// Share of candidates above which CAOTE re-scores every row in one pass
/// instead of the ones its bounds cannot rule out.
const FULL_PASS_SHARE: f64 = 0.25;

/// Decode steps a horizon (see [`Horizon`]) covers at most.
const HORIZON_STEPS: usize = 32;

/// Rows per segment a horizon keeps under watch.
const HORIZON_ROWS: usize = 64;

/// A multi-step bound for the [`Rule::Accumulate`] steady state (one row
/// evicted per over-budget segment per step). At a bound step `t0`, per
/// row, the score's lower bound valid for every later step while
/// `Σ_j H_ij ≤ smax_i` and `drift_i ≤ drift_cap_i`: raw scores only grow
/// (so `α_ij ≥ H_ij(t0) / smax_i`, and `α/(1 − α)` grows with `α`) and the
/// distance falls at most by the drift. Per segment the `HORIZON_ROWS`
/// candidates with the lowest such bound are watched (`rows`) and `floor2`
/// is the smallest squared bound of every other candidate of `t0`. A later
/// step scores the watched rows and the rows that became candidates since
/// `t0` (arrival ≥ `hi_a0`) as the bound pass would; when the worst of
/// them scores strictly below `floor2` it is the row the bound pass would
/// evict, and the pass is skipped.
#[derive(Clone, Debug)]
struct Horizon {
    /// `LayerState::steps` at `t0`.
    steps0: usize,
    /// Per block: the largest score sum the bounds allow.
    smax: Vec<f64>,
    /// Per block: the largest drift the bounds allow.
    drift_cap: Vec<f64>,
    /// Per segment: watched rows, and the floor of the others.
    segs: Vec<Option<HorizonSeg>>,
    /// Steps decided inside this horizon.
    taken: usize,
}

#[derive(Clone, Debug)]
struct HorizonSeg {
    rows: Vec<u32>,
    floor2: f64,
    hi_a0: u32,
}

impl Horizon {
    /// The watched rows follow a compaction: a moved row takes its new
    /// index, a dropped one leaves.
    fn remap(&mut self, c: &Compaction) {
        for (s, hs) in self.segs.iter_mut().enumerate() {
            let (Some(hs), Some(moves), Some(&len)) = (hs.as_mut(), c.moves.get(s), c.lens.get(s))
            else {
                continue;
            };
            hs.rows.retain_mut(|r| {
                if let Some(&(dst, _)) = moves.iter().find(|m| m.1 == *r) {
                    *r = dst;
                    true
                } else {
                    *r < len && !moves.iter().any(|m| m.0 == *r)
                }
            });
        }
    }
}

/// How CAOTE's pseudo-output follows a decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rule {
    /// Recomputed with a pass over V.
    Full,
    /// `U += output`, `o = U / ΣH` ([`ScoreUpdate::Accumulate`]).
    Accumulate,
    /// `o = output` ([`ScoreUpdate::Current`]).
    Current,
    /// FastCAOTE: `o` = the mean value row, `U += v_new`.
    MeanValue,
}

/// CAOTE's per-layer state for incremental decode steps: per block (query
/// head, or KV head for the mean rule) the numerator `U = Σ_j H_j v_j` of
/// the pseudo-output (f64), the pseudo-output `o`, the path length the
/// pseudo-output has travelled, and per row the last exact distance and
/// the path length when it was exact. `|‖o − v_j‖ − d_j| ≤ drift − stamp_j`
/// by the triangle inequality.
#[derive(Clone, Debug)]
struct LayerState {
    u: Vec<Vec<f64>>,
    o: Vec<Vec<f64>>,
    drift: Vec<f64>,
    dist: RowState<f32>,
    stamp: RowState<f64>,
    steps: usize,
    /// The current multi-step bound, if any.
    horizon: Option<Horizon>,
    /// Steps to wait before setting up another horizon (one that was left
    /// without a single step decided backs off).
    horizon_wait: usize,
}

/// The blocks of segment `s` (sequence `s / hkv`, KV head `s % hkv`): its
/// `per` query heads for [`Heads::PerHead`] (`per` = the group size), else
/// the segment's own block (`per` = 1).
fn blocks_of(heads: Heads, hq: usize, hkv: usize, per: usize, s: usize) -> std::ops::Range<usize> {
    let first = if heads == Heads::PerHead {
        (s / hkv) * hq + (s % hkv) * per
    } else {
        s
    };
    first..first + per
}

fn norm2(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// `α / (1 − α) · d`, `+∞` where `1 − α < 1e-6` (never evicted, whatever
/// the distance).
fn error(a: f64, d: f64) -> f64 {
    if 1.0 - a < 1e-6 {
        f64::INFINITY
    } else if a <= 0.0 {
        0.0
    } else {
        a / (1.0 - a) * d
    }
}

impl<S> Caote<S> {
    /// The scorer's group treatment: per query head for the root-sum-square
    /// rule, the group mean for [`CaoteGqa::MeanScores`].
    fn heads(&self) -> Heads {
        match self.cfg.gqa {
            CaoteGqa::RootSumSquares => Heads::PerHead,
            CaoteGqa::MeanScores => Heads::Mean,
        }
    }

    /// How the pseudo-output follows a decode step (see [`ScoreUpdate`]).
    fn rule<B: Ops, T: Element>(&self) -> Rule
    where
        S: Scorer<B, T>,
    {
        if self.cfg.fast {
            return Rule::MeanValue;
        }
        match self.scorer.update() {
            ScoreUpdate::Accumulate => Rule::Accumulate,
            ScoreUpdate::Current => Rule::Current,
            ScoreUpdate::Other => Rule::Full,
        }
    }

    /// The group-combined CAOTE score of one segment's row from per-block
    /// values `c_h` (root sum of squares over the group, or the single mean
    /// block).
    fn combine(c: impl Iterator<Item = f64>) -> f64 {
        c.map(|x| x * x).sum::<f64>().sqrt()
    }

    /// The score of row `j` from the state's distances, its blocks `blocks`
    /// combined.
    fn row_score(
        st: &LayerState,
        alpha: &Weights<'_>,
        blocks: std::ops::Range<usize>,
        j: usize,
    ) -> f64 {
        Self::combine(blocks.map(|i| error(alpha.at(i, j), f64::from(st.dist.rows[i][j]))))
    }

    /// One full pass: exact pseudo-outputs and distances for every row
    /// (`value_distances`), CAOTE scores per segment, and a fresh state.
    fn full_pass<B: Ops, T: Element>(
        &mut self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
        alpha: &Weights<'_>,
    ) -> Result<Vec<Vec<f64>>> {
        self.counts.full_passes += 1;
        let sums = alpha.sums;
        let geom = *ctx.geom();
        let (hq, hkv, d) = (geom.num_q_heads(), geom.num_kv_heads(), geom.head_dim());
        let segs = ctx.kv.segments();
        let be = ctx.backend;
        let blocks = evidence_blocks(&geom, segs, heads, &vec![1; segs.batch()])?;
        let w: Vec<f32> = (0..alpha.raw.len())
            .flat_map(|i| (0..alpha.raw[i].len()).map(move |j| alpha.at(i, j) as f32))
            .collect();
        let wb = be.upload(&w)?;
        let mut dist = be.zeros::<f32>(blocks.total())?;
        let mut cen = be.zeros::<f32>(blocks.num_segments() * d)?;
        ops::value_distances(
            be,
            geom,
            segs,
            heads,
            self.cfg.fast,
            &wb,
            ctx.kv.v(),
            &mut dist,
            Some(&mut cen),
        )?;
        let dist = be.download(&dist)?;
        let cen = be.download(&cen)?;
        let nb = blocks.num_segments();
        let mut st = LayerState {
            u: Vec::with_capacity(nb),
            o: Vec::with_capacity(nb),
            drift: vec![0.0; nb],
            dist: RowState::new(heads),
            stamp: RowState::new(heads),
            steps: 0,
            horizon: None,
            horizon_wait: 0,
        };
        st.dist.adopt(ctx, 0.0);
        st.stamp.adopt(ctx, 0.0);
        for i in 0..nb {
            let o: Vec<f64> = cen[i * d..(i + 1) * d]
                .iter()
                .map(|&x| f64::from(x))
                .collect();
            let scale = if self.cfg.fast {
                segs.len_of(segment_of(i, heads, hq, hkv)) as f64
            } else {
                sums[i]
            };
            st.u.push(o.iter().map(|x| x * scale).collect());
            st.o.push(o);
            st.dist.rows[i].copy_from_slice(&dist[blocks.range(i)]);
        }
        if ctx.layer >= self.layers.len() {
            self.layers.resize_with(ctx.layer + 1, || None);
        }
        self.layers[ctx.layer] = Some(st);
        Ok(self.scores_from_state(ctx, heads, alpha, None))
    }

    /// CAOTE scores per segment from the state's distances; rows outside
    /// `only` (per segment) get `+∞` (never the first evicted).
    fn scores_from_state<B: Ops, T: Element>(
        &self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
        alpha: &Weights<'_>,
        only: Option<&[Vec<u32>]>,
    ) -> Vec<Vec<f64>> {
        let geom = ctx.geom();
        let (hq, hkv) = (geom.num_q_heads(), geom.num_kv_heads());
        let per = if heads == Heads::PerHead {
            geom.group()
        } else {
            1
        };
        let st = match self.layers.get(ctx.layer) {
            Some(Some(st)) => st,
            _ => return Vec::new(),
        };
        let segs = ctx.kv.segments();
        (0..segs.num_segments())
            .map(|s| {
                let blocks = blocks_of(heads, hq, hkv, per, s);
                let mut out = vec![f64::INFINITY; segs.len_of(s)];
                let mut fill = |j: usize| out[j] = Self::row_score(st, alpha, blocks.clone(), j);
                match only {
                    Some(rows) => rows[s].iter().for_each(|&j| fill(j as usize)),
                    None => (0..segs.len_of(s)).for_each(&mut fill),
                }
                out
            })
            .collect()
    }

    /// One hook: the base scores lent by the scorer (no copy of H2O's sums),
    /// handed back before the scorer follows the compaction.
    fn step<B: Ops, T: Element>(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan>
    where
        S: Scorer<B, T>,
    {
        self.counts.hooks += 1;
        let heads = self.heads();
        let raw = self.scorer.lend(ctx, heads)?;
        let r = self.step_with(ctx, heads, &raw);
        self.scorer.restore(ctx.layer, raw);
        let (plan, comp) = r?;
        if let Some(c) = comp {
            self.scorer.retain(ctx.layer, &c)?;
        }
        Ok(plan)
    }

    fn step_with<B: Ops, T: Element>(
        &mut self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
        raw: &[Vec<f64>],
    ) -> Result<(Plan, Option<Compaction>)>
    where
        S: Scorer<B, T>,
    {
        const OP: &str = "Caote";
        let segs = ctx.kv.segments();
        let g = *ctx.geom();
        let (hq, hkv, d) = (g.num_q_heads(), g.num_kv_heads(), g.head_dim());
        // Validated (finite, non-negative) and summed in one pass.
        let sums = checked_sums(OP, ctx, heads, raw)?;
        let mut budget = self.cfg.budget.clone();
        let (sink, recent) = self.scorer.protects();
        budget.sink = budget.sink.max(sink);
        budget.recent = budget.recent.max(recent);
        let mut over = vec![false; segs.num_segments()];
        for (s, o) in over.iter_mut().enumerate() {
            let bud = budget.resolve(
                OP,
                ctx.layer,
                ctx.num_layers,
                s % hkv,
                hkv,
                ctx.kv.seen(s / hkv),
            )?;
            *o = segs.len_of(s) > bud;
        }
        let alpha = Weights { raw, sums: &sums };
        let rule = self.rule::<B, T>();
        let incremental = ctx.phase == Phase::Decode
            && self.cfg.incremental
            && rule != Rule::Full
            && matches!(self.layers.get(ctx.layer), Some(Some(st)) if st.steps < REFRESH_STEPS);
        if !incremental {
            if !over.iter().any(|&o| o) && ctx.phase == Phase::Decode && rule == Rule::Full {
                return Ok((Plan::KeepAll, None));
            }
            let scores = self.full_pass(ctx, heads, &alpha)?;
            return self.evict(ctx, heads, &budget, &scores, raw);
        }
        // Incremental: move the pseudo-outputs, then score only the rows the
        // distance bounds cannot rule out.
        let out = match rule {
            Rule::Accumulate | Rule::Current => Some(ctx.decode_output()?),
            _ => None,
        };
        let newest = if rule == Rule::MeanValue {
            let rows: Vec<u32> = (0..segs.num_segments())
                .map(|s| (segs.offset(s) + segs.len_of(s) - 1) as u32)
                .collect();
            Some(gather_host(ctx, &rows)?)
        } else {
            None
        };
        let st = self.layers[ctx.layer]
            .as_mut()
            .ok_or_else(|| config(OP, "missing state"))?;
        st.dist.sync(OP, ctx, 0.0)?;
        st.stamp.sync(OP, ctx, f64::NEG_INFINITY)?;
        st.steps += 1;
        let per = if heads == Heads::PerHead {
            g.group()
        } else {
            1
        };
        let mut step_drift = vec![0.0; st.o.len()];
        #[allow(clippy::needless_range_loop)]
        for i in 0..st.o.len() {
            let s = segment_of(i, heads, hq, hkv);
            let new_o: Vec<f64> = match rule {
                Rule::Accumulate | Rule::Current => {
                    let out = out.as_deref().unwrap_or(&[]);
                    // The block's output: its head, or the group's mean.
                    let (b, first) = if heads == Heads::PerHead {
                        (i / hq, i)
                    } else {
                        (s / hkv, (s / hkv) * hq + (s % hkv) * g.group())
                    };
                    let _ = b;
                    let n = if heads == Heads::PerHead {
                        1
                    } else {
                        g.group()
                    };
                    let mut o = vec![0.0f64; d];
                    for h in first..first + n {
                        for (a, &x) in o.iter_mut().zip(&out[h * d..(h + 1) * d]) {
                            *a += f64::from(x) / n as f64;
                        }
                    }
                    if rule == Rule::Accumulate {
                        for (u, x) in st.u[i].iter_mut().zip(&o) {
                            *u += x;
                        }
                        st.u[i]
                            .iter()
                            .map(|u| u / sums[i].max(f64::MIN_POSITIVE))
                            .collect()
                    } else {
                        o
                    }
                }
                _ => {
                    let nv = newest.as_ref().map_or(&[][..], |v| &v[s * d..(s + 1) * d]);
                    for (u, &x) in st.u[i].iter_mut().zip(nv) {
                        *u += f64::from(x);
                    }
                    let len = segs.len_of(s).max(1) as f64;
                    st.u[i].iter().map(|u| u / len).collect()
                }
            };
            step_drift[i] = norm2(&new_o, &st.o[i]);
            st.drift[i] += step_drift[i];
            st.o[i] = new_o;
        }
        st.horizon_wait = st.horizon_wait.saturating_sub(1);
        if !over.iter().any(|&o| o) {
            return Ok((Plan::KeepAll, None));
        }
        if rule == Rule::Accumulate
            && let Some((plan, comp)) = self.horizon_step(ctx, heads, &budget, &alpha, &over)?
        {
            self.counts.horizon_steps += 1;
            return self.follow(ctx, heads, plan, comp, raw);
        }
        let st = self.layers[ctx.layer]
            .as_mut()
            .ok_or_else(|| config(OP, "missing state"))?;
        // Bounds per candidate row; the rows that could be evicted.
        let mut need: Vec<Vec<u32>> = vec![Vec::new(); segs.num_segments()];
        let (mut lo2, mut hi2, mut sel) = (Vec::new(), Vec::new(), Vec::new());
        let inv: Vec<f64> = (0..raw.len()).map(|i| alpha.inv_sum(i)).collect();
        let mut total_cand = 0usize;
        let mut total_need = 0usize;
        // Whether every segment over its budget is in the decode steady
        // state of `evict_by_scores` (one token over, two candidates or more),
        // where the worst exactly scored row is its choice.
        let mut one_each = true;
        for s in 0..segs.num_segments() {
            if !over[s] {
                continue;
            }
            let (b, kv) = (s / hkv, s % hkv);
            let bud = budget.resolve(OP, ctx.layer, ctx.num_layers, kv, hkv, ctx.kv.seen(b))?;
            let arr = ctx.kv.arrivals(s);
            let (lo_a, hi_a) = candidate_arrivals(ctx.kv.seen(b), budget.sink, budget.recent);
            // Upper and lower bounds of every row's score, squared (the group
            // combination is a root sum of squares; squares order the same),
            // head by head over contiguous rows so the loop is branch-free.
            // Rows outside the candidates start at NaN / +∞, which no bound
            // makes eligible or minimal.
            let len = segs.len_of(s);
            lo2.resize(len, 0.0);
            hi2.resize(len, 0.0);
            let isa = crate::cpu::isa::detected();
            let n_cand = simd::caote_mask(isa, arr, lo_a, hi_a, &mut lo2[..len], &mut hi2[..len]);
            let prot = arr.len() - n_cand;
            one_each &= segs.len_of(s) == bud + 1 && n_cand >= 2;
            let m = segs.len_of(s) - bud.max(prot).min(segs.len_of(s));
            let m = m.min(n_cand);
            if m == 0 {
                continue;
            }
            total_cand += n_cand;
            let blocks = blocks_of(heads, hq, hkv, per, s);
            for i in blocks.clone() {
                let b = simd::CaoteBounds {
                    dist: &st.dist.rows[i][..len],
                    stamp: &st.stamp.rows[i][..len],
                    h: &raw[i][..len],
                    drift: st.drift[i],
                    inv: inv[i],
                    uni: 1.0 / len.max(1) as f64,
                };
                // error(α, d) = r·d with r = α/(1 − α) (α within an ulp of
                // `Weights::at`: bounds only, whose slack is far larger).
                simd::caote_bounds(isa, b, &mut lo2[..len], &mut hi2[..len]);
            }
            // The m-th smallest upper bound among the candidates: a row whose
            // lower bound exceeds it cannot be among the m evicted.
            let t = if m == 1 {
                simd::min_f64(isa, &hi2[..len])
            } else {
                sel.clear();
                sel.extend(
                    lo2[..len]
                        .iter()
                        .zip(&hi2[..len])
                        .filter(|(l, _)| !l.is_nan())
                        .map(|(_, &h)| h),
                );
                let (_, x, _) = sel.select_nth_unstable_by(m - 1, |a, b| a.total_cmp(b));
                *x
            };
            // NaN (not a candidate) fails `≤`; rows in increasing order.
            need[s] = (0u32..)
                .zip(&lo2[..len])
                .filter(|&(_, &l)| l <= t)
                .map(|(j, _)| j)
                .collect();
            total_need += need[s].len();
        }
        if total_need as f64 > FULL_PASS_SHARE * total_cand.max(1) as f64 {
            let scores = self.full_pass(ctx, heads, &alpha)?;
            return self.evict(ctx, heads, &budget, &scores, raw);
        }
        self.rescore(ctx, heads, &need)?;
        if one_each
            && let Some((plan, comp)) = self.worst_needed(ctx, heads, &alpha, &need, &over, None)?
        {
            if rule == Rule::Accumulate {
                self.set_horizon(ctx, heads, &budget, &alpha, &over, &step_drift)?;
            }
            return self.follow(ctx, heads, plan, comp, raw);
        }
        let scores = self.scores_from_state(ctx, heads, &alpha, Some(&need));
        self.evict(ctx, heads, &budget, &scores, raw)
    }

    /// Exact distances (host, f64, stored as f32 with the current drift as
    /// stamp) of the rows `need[s]` of every segment.
    fn rescore<B: Ops, T: Element>(
        &mut self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
        need: &[Vec<u32>],
    ) -> Result<()> {
        let g = *ctx.geom();
        let (hq, hkv, d) = (g.num_q_heads(), g.num_kv_heads(), g.head_dim());
        let per = if heads == Heads::PerHead {
            g.group()
        } else {
            1
        };
        let segs = ctx.kv.segments();
        let rows: Vec<u32> = (0..segs.num_segments())
            .flat_map(|s| need[s].iter().map(move |&j| (segs.offset(s) as u32) + j))
            .collect();
        let vh = gather_host(ctx, &rows)?;
        self.counts.rescored += rows.len() as u64;
        let st = self.layers[ctx.layer]
            .as_mut()
            .ok_or_else(|| config("Caote", "missing state"))?;
        let mut at = 0usize;
        for (s, rows_s) in need.iter().enumerate() {
            let blocks = blocks_of(heads, hq, hkv, per, s);
            for &j in rows_s {
                let v = &vh[at * d..(at + 1) * d];
                at += 1;
                for i in blocks.clone() {
                    let dj = st.o[i]
                        .iter()
                        .zip(v)
                        .map(|(o, &x)| (o - f64::from(x)).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    st.dist.rows[i][j as usize] = dj as f32;
                    st.stamp.rows[i][j as usize] = st.drift[i];
                }
            }
        }
        Ok(())
    }

    /// Sets up a [`Horizon`] at a bound step (after the exact re-scoring):
    /// per over-budget segment, every candidate's lower bound for the next
    /// `HORIZON_STEPS` steps, assuming each step adds at most 1.01 to a
    /// block's score sum (attention weights sum to 1) and moves the
    /// pseudo-output at most 4x this step's drift. Both are checked at every
    /// later step; none is set up while `horizon_wait` runs or a sum is 0.
    fn set_horizon<B: Ops, T: Element>(
        &mut self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
        budget: &Budget,
        alpha: &Weights<'_>,
        over: &[bool],
        step_drift: &[f64],
    ) -> Result<()> {
        let g = *ctx.geom();
        let (hq, hkv) = (g.num_q_heads(), g.num_kv_heads());
        let per = if heads == Heads::PerHead {
            g.group()
        } else {
            1
        };
        let segs = ctx.kv.segments();
        let Some(Some(st)) = self.layers.get_mut(ctx.layer) else {
            return Ok(());
        };
        st.horizon = None;
        if st.horizon_wait > 0 || alpha.sums.iter().any(|&x| x <= 0.0) {
            return Ok(());
        }
        let k = HORIZON_STEPS as f64;
        let smax: Vec<f64> = alpha.sums.iter().map(|&x| x + 1.01 * k).collect();
        let drift_cap: Vec<f64> = (0..st.drift.len())
            .map(|i| st.drift[i] + 4.0 * k * step_drift.get(i).copied().unwrap_or(0.0))
            .collect();
        let isa = crate::cpu::isa::detected();
        let (mut lo2, mut hi2, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
        let mut out = Vec::with_capacity(segs.num_segments());
        for (s, &o) in over.iter().enumerate().take(segs.num_segments()) {
            if !o {
                out.push(None);
                continue;
            }
            let b = s / hkv;
            let len = segs.len_of(s);
            let (lo_a, hi_a) = candidate_arrivals(ctx.kv.seen(b), budget.sink, budget.recent);
            lo2.resize(len, 0.0);
            hi2.resize(len, 0.0);
            let arr = ctx.kv.arrivals(s);
            simd::caote_mask(isa, arr, lo_a, hi_a, &mut lo2[..len], &mut hi2[..len]);
            let blocks = blocks_of(heads, hq, hkv, per, s);
            for i in blocks.clone() {
                let bounds = simd::CaoteBounds {
                    dist: &st.dist.rows[i][..len],
                    stamp: &st.stamp.rows[i][..len],
                    h: &alpha.raw[i][..len],
                    drift: drift_cap[i],
                    inv: 1.0 / smax[i],
                    uni: 1.0 / len.max(1) as f64,
                };
                simd::caote_bounds(isa, bounds, &mut lo2[..len], &mut hi2[..len]);
            }
            pairs.clear();
            pairs.extend(
                (0u32..)
                    .zip(&lo2[..len])
                    .filter(|(_, l)| !l.is_nan())
                    .map(|(j, &l)| (l, j)),
            );
            let floor2 = if pairs.len() > HORIZON_ROWS {
                pairs.select_nth_unstable_by(HORIZON_ROWS, |a, b| a.0.total_cmp(&b.0));
                let f = pairs[HORIZON_ROWS].0;
                pairs.truncate(HORIZON_ROWS);
                f
            } else {
                f64::INFINITY
            };
            out.push(Some(HorizonSeg {
                rows: pairs.iter().map(|p| p.1).collect(),
                floor2,
                hi_a0: hi_a,
            }));
        }
        st.horizon = Some(Horizon {
            steps0: st.steps,
            smax,
            drift_cap,
            segs: out,
            taken: 0,
        });
        Ok(())
    }

    /// A decode step inside the current [`Horizon`]: its watched rows and
    /// the new candidates are bounded and re-scored as the bound pass would
    /// do; the plan when every over-budget segment's worst of them is below
    /// its floor. `None` (and the horizon is dropped) when a condition of
    /// the horizon fails: then the bound pass decides.
    fn horizon_step<B: Ops, T: Element>(
        &mut self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
        budget: &Budget,
        alpha: &Weights<'_>,
        over: &[bool],
    ) -> Result<Option<(Plan, Compaction)>> {
        const OP: &str = "Caote";
        let g = *ctx.geom();
        let (hq, hkv) = (g.num_q_heads(), g.num_kv_heads());
        let per = if heads == Heads::PerHead {
            g.group()
        } else {
            1
        };
        let segs = ctx.kv.segments();
        let nseg = segs.num_segments();
        let Some(Some(st)) = self.layers.get_mut(ctx.layer) else {
            return Ok(None);
        };
        let Some(h) = st.horizon.take() else {
            return Ok(None);
        };
        let give_up = |st: &mut LayerState, h: Horizon| {
            if h.taken == 0 {
                st.horizon_wait = HORIZON_STEPS / 4;
            }
        };
        let valid = st.steps <= h.steps0 + HORIZON_STEPS
            && h.segs.len() == nseg
            && h.smax.len() == alpha.sums.len()
            && h.drift_cap.len() == st.drift.len()
            && (0..alpha.sums.len()).all(|i| {
                alpha.sums[i] > 0.0 && alpha.sums[i] <= h.smax[i] && st.drift[i] <= h.drift_cap[i]
            });
        if !valid {
            give_up(st, h);
            return Ok(None);
        }
        let isa = crate::cpu::isa::detected();
        let mut need: Vec<Vec<u32>> = vec![Vec::new(); nseg];
        let mut floor2 = vec![f64::INFINITY; nseg];
        let (mut rows, mut lo2, mut hi2) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dist, mut stamp, mut hh) = (Vec::new(), Vec::new(), Vec::new());
        for s in 0..nseg {
            if !over[s] {
                continue;
            }
            let Some(hs) = &h.segs[s] else {
                give_up(st, h);
                return Ok(None);
            };
            let (b, kv) = (s / hkv, s % hkv);
            let bud = budget.resolve(OP, ctx.layer, ctx.num_layers, kv, hkv, ctx.kv.seen(b))?;
            let len = segs.len_of(s);
            let (lo_a, hi_a) = candidate_arrivals(ctx.kv.seen(b), budget.sink, budget.recent);
            // The watched rows, and the rows that became candidates since t0.
            rows.clear();
            rows.extend_from_slice(&hs.rows);
            let n_cand =
                simd::candidate_scan(isa, ctx.kv.arrivals(s), lo_a, hi_a, hs.hi_a0, &mut rows);
            if len != bud + 1 || n_cand < 2 || rows.iter().any(|&j| j as usize >= len) {
                give_up(st, h);
                return Ok(None);
            }
            rows.sort_unstable();
            lo2.clear();
            lo2.resize(rows.len(), 0.0);
            hi2.clear();
            hi2.resize(rows.len(), 0.0);
            let blocks = blocks_of(heads, hq, hkv, per, s);
            for i in blocks.clone() {
                dist.clear();
                dist.extend(rows.iter().map(|&j| st.dist.rows[i][j as usize]));
                stamp.clear();
                stamp.extend(rows.iter().map(|&j| st.stamp.rows[i][j as usize]));
                hh.clear();
                hh.extend(rows.iter().map(|&j| alpha.raw[i][j as usize]));
                let bounds = simd::CaoteBounds {
                    dist: &dist,
                    stamp: &stamp,
                    h: &hh,
                    drift: st.drift[i],
                    inv: alpha.inv_sum(i),
                    uni: 1.0 / len.max(1) as f64,
                };
                simd::caote_bounds(isa, bounds, &mut lo2, &mut hi2);
            }
            let t = simd::min_f64(isa, &hi2);
            need[s] = rows
                .iter()
                .zip(&lo2)
                .filter(|&(_, &l)| l <= t)
                .map(|(&j, _)| j)
                .collect();
            floor2[s] = hs.floor2;
        }
        st.horizon = Some(h);
        self.rescore(ctx, heads, &need)?;
        let r = self.worst_needed(ctx, heads, alpha, &need, over, Some(&floor2))?;
        if let Some(Some(st)) = self.layers.get_mut(ctx.layer)
            && let Some(mut h) = st.horizon.take()
        {
            if r.is_some() {
                h.taken += 1;
                st.horizon = Some(h);
            } else {
                give_up(st, h);
            }
        }
        Ok(r)
    }

    /// The decode steady state of [`Self::evict`] without a score vector per
    /// segment: every segment over its budget drops its worst row among
    /// `need` (lowest score, ties to the later arrival), which is the row
    /// `evict_by_scores` drops when the scores outside `need` are `+∞`, as
    /// [`Self::scores_from_state`] makes them. `None` when a segment's worst
    /// is `+∞` (then `evict_by_scores` breaks the tie among every candidate),
    /// or (with `floor2`, per segment) not strictly below the floor.
    fn worst_needed<B: Ops, T: Element>(
        &self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
        alpha: &Weights<'_>,
        need: &[Vec<u32>],
        over: &[bool],
        floor2: Option<&[f64]>,
    ) -> Result<Option<(Plan, Compaction)>> {
        let g = ctx.geom();
        let (hq, hkv) = (g.num_q_heads(), g.num_kv_heads());
        let per = if heads == Heads::PerHead {
            g.group()
        } else {
            1
        };
        let Some(Some(st)) = self.layers.get(ctx.layer) else {
            return Ok(None);
        };
        let segs = ctx.kv.segments();
        let mut sets = Vec::with_capacity(need.len());
        for (s, rows) in need.iter().enumerate() {
            if !over[s] {
                sets.push(IndexSet::default());
                continue;
            }
            let blocks = blocks_of(heads, hq, hkv, per, s);
            let arr = ctx.kv.arrivals(s);
            let mut worst: Option<(f64, u32)> = None;
            for &j in rows {
                let x = Self::row_score(st, alpha, blocks.clone(), j as usize);
                let worse = worst
                    .is_none_or(|(y, w)| x < y || (x == y && arr[j as usize] > arr[w as usize]));
                if worse {
                    worst = Some((x, j));
                }
            }
            // Below the floor of every unwatched row, with a relative margin
            // for the rounding of the root sum of squares.
            let below =
                floor2.is_none_or(|f| worst.is_some_and(|(x, _)| x * x * (1.0 + 1e-9) < f[s]));
            match worst {
                Some((x, j)) if x < f64::INFINITY && below => {
                    sets.push(IndexSet::from_unsorted(vec![j]))
                }
                _ => return Ok(None),
            }
        }
        let list = IndexList::from_sets(Scope::KvHead, &sets)?;
        let comp = Compaction::from_drop(segs, &list);
        Ok(Some((Plan::Drop(list), comp)))
    }

    /// Drops the worst rows by `scores`; the state and the pseudo-output
    /// numerators follow (the scorer follows the returned compaction).
    fn evict<B: Ops, T: Element>(
        &mut self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
        budget: &Budget,
        scores: &[Vec<f64>],
        raw: &[Vec<f64>],
    ) -> Result<(Plan, Option<Compaction>)>
    where
        S: Scorer<B, T>,
    {
        const OP: &str = "Caote";
        let (plan, comp) = evict_by_scores(OP, ctx, budget, scores)?;
        let Some(comp) = comp else {
            return Ok((plan, None));
        };
        self.follow(ctx, heads, plan, comp, raw)
    }

    /// The state and the pseudo-output numerators follow an eviction.
    fn follow<B: Ops, T: Element>(
        &mut self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
        plan: Plan,
        comp: Compaction,
        raw: &[Vec<f64>],
    ) -> Result<(Plan, Option<Compaction>)>
    where
        S: Scorer<B, T>,
    {
        let g = *ctx.geom();
        let (hq, hkv, d) = (g.num_q_heads(), g.num_kv_heads(), g.head_dim());
        let per = if heads == Heads::PerHead {
            g.group()
        } else {
            1
        };
        let rule = self.rule::<B, T>();
        // Numerators lose the evicted rows: U −= H_e v_e (mean: −v_e).
        if let (Plan::Drop(list), Some(Some(_))) = (&plan, self.layers.get(ctx.layer))
            && matches!(rule, Rule::Accumulate | Rule::MeanValue)
        {
            let segs = ctx.kv.segments();
            let raw_rows: Vec<u32> = (0..list.num_lists())
                .flat_map(|s| list.list(s).iter().map(move |&j| segs.offset(s) as u32 + j))
                .collect();
            let vh = gather_host(ctx, &raw_rows)?;
            if let Some(Some(st)) = self.layers.get_mut(ctx.layer) {
                let mut at = 0usize;
                for s in 0..list.num_lists() {
                    let blocks = blocks_of(heads, hq, hkv, per, s);
                    for &j in list.list(s) {
                        let v = &vh[at * d..(at + 1) * d];
                        at += 1;
                        for i in blocks.clone() {
                            let w = if rule == Rule::MeanValue {
                                1.0
                            } else {
                                raw.get(i)
                                    .and_then(|r| r.get(j as usize))
                                    .copied()
                                    .unwrap_or(0.0)
                            };
                            for (u, &x) in st.u[i].iter_mut().zip(v) {
                                *u -= w * f64::from(x);
                            }
                        }
                    }
                }
            }
        }
        if let Some(Some(st)) = self.layers.get_mut(ctx.layer) {
            st.dist.retain(&comp, hq, hkv);
            st.stamp.retain(&comp, hq, hkv);
            if let Some(h) = st.horizon.as_mut() {
                h.remap(&comp);
            }
        }
        Ok((plan, Some(comp)))
    }
}

/// Value rows `rows` (buffer rows) on the host as f32, `[rows, D]`.
fn gather_host<B: Ops, T: Element>(ctx: &StepCtx<'_, B, T>, rows: &[u32]) -> Result<Vec<f32>> {
    let d = ctx.geom().head_dim();
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut buf = ctx.backend.zeros::<T>(rows.len() * d)?;
    ops::gather_rows(ctx.backend, d, rows, ctx.kv.v(), &mut buf)?;
    Ok(ctx
        .backend
        .download(&buf)?
        .iter()
        .map(|x| x.to_f32())
        .collect())
}

impl<B: Ops, T: Element, S: Scorer<B, T>> KvPolicy<B, T> for Caote<S> {
    fn name(&self) -> &'static str {
        if self.cfg.fast { "fast_caote" } else { "caote" }
    }
    fn capabilities(&self) -> Capabilities {
        let mut needs = self.scorer.needs(self.heads());
        needs.decode_output = matches!(self.rule::<B, T>(), Rule::Accumulate | Rule::Current);
        Capabilities {
            evicts: true,
            needs,
            prefill_block: Some(self.cfg.block),
            ..Capabilities::default()
        }
    }
    fn on_prefill_chunk(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.step(ctx)
    }
    fn on_decode_step(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.step(ctx)
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("hooks", self.counts.hooks),
            ("full_passes", self.counts.full_passes),
            ("rescored_rows", self.counts.rescored),
            ("horizon_steps", self.counts.horizon_steps),
        ]
    }
    fn reset(&mut self) {
        self.scorer.reset();
        self.layers.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_read_the_simplex_without_materialising_it() {
        let raw = vec![
            vec![3.0, 1.0, 0.0],
            vec![0.0, 0.0],
            (0..37).map(f64::from).collect(),
        ];
        let sums: Vec<f64> = raw.iter().map(|h| simd::sum8_f64(h)).collect();
        let w = Weights {
            raw: &raw,
            sums: &sums,
        };
        for (i, h) in raw.iter().enumerate() {
            let want = to_simplex("t", h).unwrap();
            for (j, &a) in want.iter().enumerate() {
                assert_eq!(w.at(i, j), a);
            }
        }
        assert_eq!(simd::sum8_f64(&raw[2]), (0..37).map(f64::from).sum::<f64>());
    }

    #[test]
    fn simplex_normalisation() {
        assert_eq!(to_simplex("t", &[3.0, 1.0]).unwrap(), vec![0.75, 0.25]);
        assert_eq!(to_simplex("t", &[0.0, 0.0]).unwrap(), vec![0.5, 0.5]);
        assert!(to_simplex("t", &[-1.0, 2.0]).is_err());
        assert!(to_simplex("t", &[f64::NAN]).is_err());
    }

    #[test]
    fn joint_error_of_one_token_is_the_caote_score() {
        // §5.4 (a): c = [0.824052, 0.326123, 0.070130].
        let z = [2.0f64, 1.0, 0.0];
        let e: Vec<f64> = z.iter().map(|x| x.exp()).collect();
        let s: f64 = e.iter().sum();
        let a: Vec<f64> = e.iter().map(|x| x / s).collect();
        let v = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        for (j, want) in [0.824052, 0.326123, 0.070130].iter().enumerate() {
            assert!((joint_eviction_error(&a, &v, &[j]).unwrap() - want).abs() < 1e-6);
        }
        assert!(joint_eviction_error(&a, &v, &[5]).is_err());
    }
}
