//! `Tova` (Oren et al. 2024): token omission via attention — at every step,
//! evict the tokens the current query attends to least.
//!
//! Score of token `j`: `s_j = reduce_{h ∈ G(g)} softmax(z_h)_j` for the
//! current (last) query of each sequence; the paper averages over heads
//! (default [`GqaReduce::Mean`], over the query heads of each KV head, so
//! budgets stay head-wise). Prefill chunks use the chunk's last query.
//! The weights are the attention op's own evidence (decode weights, or the
//! prefill window of one query): no second Q·K pass. Cost per step: O(L)
//! host work per KV head and one row move per evicted token.
//!
//! Order inside a decode step: the new token is appended, attention runs
//! over the cache, then TOVA drops the tokens the current query attended
//! to least until the budget holds (as the paper's code does: attention
//! sees `budget + 1` tokens, the cache keeps `budget` between steps).
#![forbid(unsafe_code)]

use super::evidence::{blocks_f64, evict_by_scores, reduce_group};
use super::{
    Budget, Capabilities, GqaReduce, Heads, KvPolicy, Needs, Phase, Plan, ScoreUpdate, Scorer,
    StepCtx, Window,
};
use crate::backend::Ops;
use crate::dtype::Element;
use crate::error::Result;

/// Settings of [`Tova`].
#[derive(Clone, Debug, PartialEq)]
pub struct TovaConfig {
    /// Token budget (TOVA itself protects nothing; add sinks/recent here).
    pub budget: Budget,
    /// Group reduction (paper: mean over heads).
    pub reduce: GqaReduce,
}

impl Default for TovaConfig {
    fn default() -> Self {
        Self {
            budget: Budget::tokens(512),
            reduce: GqaReduce::Mean,
        }
    }
}

/// The current query's attention (stateless).
#[derive(Clone, Copy, Debug, Default)]
pub struct TovaScorer;

impl<B: Ops, T: Element> Scorer<B, T> for TovaScorer {
    fn name(&self) -> &'static str {
        "tova"
    }
    fn needs(&self, heads: Heads) -> Needs {
        Needs {
            decode_probs: Some(heads),
            prefill_window: Some(Window {
                queries: 1,
                heads,
                rows: false,
            }),
            ..Needs::default()
        }
    }
    /// The current token (TOVA's scores come from its query, which
    /// attends to itself).
    fn protects(&self) -> (usize, usize) {
        (0, 1)
    }
    /// The scores are each decode step's weights.
    fn update(&self) -> ScoreUpdate {
        ScoreUpdate::Current
    }
    fn score(&mut self, ctx: &StepCtx<'_, B, T>, _heads: Heads) -> Result<Vec<Vec<f64>>> {
        let blocks = match ctx.phase {
            Phase::Decode => ctx.decode_probs()?,
            _ => ctx.window()?.1,
        };
        Ok(blocks_f64(&blocks))
    }
}

/// TOVA eviction.
#[derive(Clone, Debug)]
pub struct Tova {
    cfg: TovaConfig,
}

impl Tova {
    /// Validates the budget.
    pub fn new(cfg: TovaConfig) -> Result<Self> {
        cfg.budget.validate("Tova")?;
        Ok(Self { cfg })
    }
    fn step<B: Ops, T: Element>(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        // The evidence is already one f32 row per KV head (the op reduced
        // the group): rank it as is, without the scorer's f64 copy
        // (decision-identical, see `evict_by_scores`).
        let blocks = match ctx.phase {
            Phase::Decode => ctx.decode_probs()?,
            _ => ctx.window()?.1,
        };
        let kv: Vec<&[f32]> = (0..blocks.num_blocks()).map(|i| blocks.block(i)).collect();
        Ok(evict_by_scores("Tova", ctx, &self.cfg.budget, &kv)?.0)
    }
}

/// Reduces per-query-head scores to per-KV-head ones when `heads` is
/// [`Heads::PerHead`] (the layout a `Max` reduction of sums needs).
pub(crate) fn to_kv_scores<B: Ops, T: Element>(
    ctx: &StepCtx<'_, B, T>,
    heads: Heads,
    reduce: GqaReduce,
    scores: Vec<Vec<f64>>,
) -> Vec<Vec<f64>> {
    if heads != Heads::PerHead {
        return scores;
    }
    let g = ctx.geom();
    reduce_group(
        &scores,
        ctx.batch(),
        g.num_q_heads(),
        g.num_kv_heads(),
        reduce,
    )
}

impl<B: Ops, T: Element> KvPolicy<B, T> for Tova {
    fn name(&self) -> &'static str {
        "tova"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            evicts: true,
            needs: Scorer::<B, T>::needs(&TovaScorer, Heads::from(self.cfg.reduce)),
            ..Capabilities::default()
        }
    }
    fn on_prefill_chunk(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.step(ctx)
    }
    fn on_decode_step(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.step(ctx)
    }
}
