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

use super::evidence::{Compaction, check_scores, evict_by_scores};
use super::{Budget, Capabilities, Heads, KvPolicy, Needs, Plan, Scorer, StepCtx};
use crate::backend::{Backend, Ops, evidence_blocks};
use crate::cache::KvView;
use crate::dtype::Element;
use crate::error::{Error, Result, config, shape};
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
}

impl Default for CaoteConfig {
    fn default() -> Self {
        Self {
            budget: Budget::tokens(2048),
            fast: false,
            block: 128,
            gqa: CaoteGqa::RootSumSquares,
        }
    }
}

/// CAOTE on top of the scorer `S` (e.g. [`super::H2oScorer`],
/// [`super::TovaScorer`], [`super::SnapKvScorer`] or your own).
#[derive(Clone, Debug)]
pub struct Caote<S> {
    cfg: CaoteConfig,
    scorer: S,
}

impl<S> Caote<S> {
    /// Validates the config.
    pub fn new(cfg: CaoteConfig, scorer: S) -> Result<Self> {
        cfg.budget.validate("Caote")?;
        if cfg.block == 0 {
            return Err(config("Caote", "block must be positive"));
        }
        Ok(Self { cfg, scorer })
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
    fn retain(&mut self, layer: usize, c: &Compaction) -> Result<()> {
        self.as_mut().retain(layer, c)
    }
    fn protects(&self) -> (usize, usize) {
        self.as_ref().protects()
    }
    fn reset(&mut self) {
        self.as_mut().reset()
    }
}

/// Normalises raw scores to the simplex (uniform when they sum to 0).
/// Negative or non-finite scores are an error.
pub(crate) fn to_simplex(op: &'static str, h: &[f64]) -> Result<Vec<f64>> {
    if let Some(x) = h.iter().find(|x| !x.is_finite() || **x < 0.0) {
        return Err(Error::NonFinite {
            op,
            what: format!("base score {x} (scores must be finite and non-negative)"),
        });
    }
    let s: f64 = h.iter().sum();
    if s > 0.0 {
        Ok(h.iter().map(|x| x / s).collect())
    } else {
        let n = h.len().max(1) as f64;
        Ok(vec![1.0 / n; h.len()])
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
    ops::value_distances(backend, geom, segs, heads, fast, &wb, kv.v(), &mut dist)?;
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

impl<S> Caote<S> {
    /// The scorer's group treatment: per query head for the root-sum-square
    /// rule, the group mean for [`CaoteGqa::MeanScores`].
    fn heads(&self) -> Heads {
        match self.cfg.gqa {
            CaoteGqa::RootSumSquares => Heads::PerHead,
            CaoteGqa::MeanScores => Heads::Mean,
        }
    }

    fn step<B: Ops, T: Element>(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan>
    where
        S: Scorer<B, T>,
    {
        const OP: &str = "Caote";
        let segs = ctx.kv.segments();
        let g = *ctx.geom();
        let hkv = g.num_kv_heads();
        let heads = self.heads();
        let raw = self.scorer.score(ctx, heads)?;
        check_scores(OP, ctx, heads, &raw)?;
        let mut budget = self.cfg.budget.clone();
        let (sink, recent) = self.scorer.protects();
        budget.sink = budget.sink.max(sink);
        budget.recent = budget.recent.max(recent);
        let needs_eviction = (0..segs.num_segments()).try_fold(false, |acc, s| {
            let bud = budget.resolve(
                OP,
                ctx.layer,
                ctx.num_layers,
                s % hkv,
                hkv,
                ctx.kv.seen(s / hkv),
            )?;
            Ok::<bool, Error>(acc || segs.len_of(s) > bud)
        })?;
        if !needs_eviction {
            return Ok(Plan::KeepAll);
        }
        let alpha = raw
            .iter()
            .map(|h| to_simplex(OP, h))
            .collect::<Result<Vec<_>>>()?;
        let c = caote_scores(ctx.backend, ctx.kv, heads, &alpha, self.cfg.fast)?;
        let kv_scores: Vec<Vec<f64>> = if heads == Heads::PerHead {
            let grp = g.group();
            (0..ctx.batch() * hkv)
                .map(|si| {
                    let (b, kv) = (si / hkv, si % hkv);
                    let base = b * g.num_q_heads() + kv * grp;
                    (0..c[base].len())
                        .map(|j| (0..grp).map(|k| c[base + k][j].powi(2)).sum::<f64>().sqrt())
                        .collect()
                })
                .collect()
        } else {
            c
        };
        let (plan, comp) = evict_by_scores(OP, ctx, &budget, &kv_scores)?;
        if let Some(comp) = comp {
            self.scorer.retain(ctx.layer, &comp)?;
        }
        Ok(plan)
    }
}

impl<B: Ops, T: Element, S: Scorer<B, T>> KvPolicy<B, T> for Caote<S> {
    fn name(&self) -> &'static str {
        if self.cfg.fast { "fast_caote" } else { "caote" }
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            evicts: true,
            needs: self.scorer.needs(self.heads()),
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
    fn reset(&mut self) {
        self.scorer.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
