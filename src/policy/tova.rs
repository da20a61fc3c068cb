//! `Tova` (Oren et al. 2024): token omission via attention — at every step,
//! evict the tokens the current query attends to least.
//!
//! Score of token `j`: `s_j = reduce_{h ∈ G(g)} softmax(z_h)_j` for the
//! current (last) query of each sequence; the paper averages over heads
//! (default [`GqaReduce::Mean`], over the query heads of each KV head, so
//! budgets stay head-wise). Prefill chunks use the chunk's last query.
//! Cost per step: one Q·K pass and one softmax (ops), O(L) host work.
//!
//! Order inside a decode step: the new token is appended, TOVA evicts down
//! to the budget using the current query's attention, then attention runs
//! over the kept tokens (the cache never exceeds the budget at attention).
#![forbid(unsafe_code)]

use super::evidence::{attention_probs, evict_by_scores, reduce_group};
use super::{Budget, Capabilities, GqaReduce, KvPolicy, Needs, Plan, Scorer, StepCtx};
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

/// The current query's attention, per query head (stateless).
#[derive(Clone, Copy, Debug, Default)]
pub struct TovaScorer;

impl<B: Ops, T: Element> Scorer<B, T> for TovaScorer {
    fn name(&self) -> &'static str {
        "tova"
    }
    fn needs(&self) -> Needs {
        Needs {
            current_attention: true,
            ..Needs::default()
        }
    }
    fn score(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Vec<Vec<f64>>> {
        let probs = attention_probs(
            ctx.backend,
            ctx.cache,
            ctx.queries,
            ctx.q_rows,
            true,
            ctx.scale,
        )?;
        let g = ctx.geom();
        let segs = ctx.cache.segments();
        let mut out = Vec::with_capacity(ctx.batch() * g.num_q_heads());
        for b in 0..ctx.batch() {
            for h in 0..g.num_q_heads() {
                let n = probs.n_q(b);
                if n == 0 {
                    out.push(vec![0.0; segs.len_of(segs.index(b, g.kv_head(h)))]);
                } else {
                    out.push(
                        probs
                            .row(b, h, n - 1)
                            .iter()
                            .map(|&p| f64::from(p))
                            .collect(),
                    );
                }
            }
        }
        Ok(out)
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
        let raw = Scorer::<B, T>::score(&mut TovaScorer, ctx)?;
        let g = ctx.geom();
        let kv = reduce_group(
            &raw,
            ctx.batch(),
            g.num_q_heads(),
            g.num_kv_heads(),
            self.cfg.reduce,
        );
        evict_by_scores("Tova", ctx, &self.cfg.budget, &kv)
    }
}

impl<B: Ops, T: Element> KvPolicy<B, T> for Tova {
    fn name(&self) -> &'static str {
        "tova"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            evicts: true,
            needs: Scorer::<B, T>::needs(&TovaScorer),
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
