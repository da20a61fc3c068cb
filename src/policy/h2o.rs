//! `H2O` (Zhang et al. 2023): heavy hitters by accumulated attention plus a
//! recent window.
//!
//! Score of token `j` for query head `h`: `s_{h,j} = Σ_t softmax_t(z_t)_j`
//! over every query `t` seen since `j` entered the cache (prefill chunks
//! causally, then one decode query per step). GQA: the group's scores are
//! reduced with [`GqaReduce`] (default `Sum`). Once a head holds more tokens
//! than its budget, keep the protected sink/recent rows and the top
//! `budget − protected` candidates by score. Cost per step: one Q·K pass
//! and one softmax over the cache (ops), O(L) host work per head.
#![forbid(unsafe_code)]

use super::evidence::{
    attention_probs, evict_by_scores, layer_slot, reduce_group, retain_state, sync_state,
};
use super::{Budget, Capabilities, GqaReduce, KvPolicy, Needs, Phase, Plan, Scorer, StepCtx};
use crate::backend::Ops;
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::IndexList;

/// Settings of [`H2O`].
#[derive(Clone, Debug, PartialEq)]
pub struct H2oConfig {
    /// Token budget; `recent` is the protected recent window (paper: half of
    /// the budget heavy hitters, half recent).
    pub budget: Budget,
    /// Group reduction of the per-query-head scores.
    pub reduce: GqaReduce,
}

impl Default for H2oConfig {
    fn default() -> Self {
        Self {
            budget: Budget::tokens(256).with_recent(128),
            reduce: GqaReduce::Sum,
        }
    }
}

/// Accumulated attention per (layer, sequence, query head, token).
#[derive(Clone, Debug, Default)]
pub struct H2oScorer {
    acc: Vec<Vec<Vec<f64>>>,
    heads: (usize, usize),
}

impl<B: Ops, T: Element> Scorer<B, T> for H2oScorer {
    fn name(&self) -> &'static str {
        "h2o"
    }
    fn needs(&self) -> Needs {
        Needs {
            accumulated_attention: true,
            current_attention: true,
            ..Needs::default()
        }
    }
    fn score(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Vec<Vec<f64>>> {
        self.heads = (ctx.geom().num_q_heads(), ctx.geom().num_kv_heads());
        let acc = layer_slot(&mut self.acc, ctx.layer);
        sync_state("H2O", ctx, acc)?;
        if matches!(ctx.phase, Phase::PrefillChunk | Phase::Decode) {
            let probs = attention_probs(
                ctx.backend,
                ctx.cache,
                ctx.queries,
                ctx.q_rows,
                true,
                ctx.scale,
            )?;
            let hq = ctx.geom().num_q_heads();
            for (i, a) in acc.iter_mut().enumerate() {
                let (b, h) = (i / hq, i % hq);
                for r in 0..probs.n_q(b) {
                    for (x, &p) in a.iter_mut().zip(probs.row(b, h, r)) {
                        *x += f64::from(p);
                    }
                }
            }
        }
        Ok(acc.clone())
    }
    fn retain(&mut self, layer: usize, keep: &IndexList) -> Result<()> {
        if let Some(acc) = self.acc.get_mut(layer) {
            retain_state(acc, keep, self.heads.0, self.heads.1);
        }
        Ok(())
    }
    fn reset(&mut self) {
        self.acc.clear();
    }
}

/// Heavy-hitter oracle.
#[derive(Clone, Debug)]
pub struct H2O {
    cfg: H2oConfig,
    scorer: H2oScorer,
}

impl H2O {
    /// Validates the budget.
    pub fn new(cfg: H2oConfig) -> Result<Self> {
        cfg.budget.validate("H2O")?;
        Ok(Self {
            cfg,
            scorer: H2oScorer::default(),
        })
    }

    fn step<B: Ops, T: Element>(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        let raw = Scorer::<B, T>::score(&mut self.scorer, ctx)?;
        let g = ctx.geom();
        let kv = reduce_group(
            &raw,
            ctx.batch(),
            g.num_q_heads(),
            g.num_kv_heads(),
            self.cfg.reduce,
        );
        let plan = evict_by_scores("H2O", ctx, &self.cfg.budget, &kv)?;
        if let Plan::Evict(keep) = &plan {
            Scorer::<B, T>::retain(&mut self.scorer, ctx.layer, keep)?;
        }
        Ok(plan)
    }
}

impl<B: Ops, T: Element> KvPolicy<B, T> for H2O {
    fn name(&self) -> &'static str {
        "h2o"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            evicts: true,
            needs: Scorer::<B, T>::needs(&self.scorer),
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
        Scorer::<B, T>::reset(&mut self.scorer);
    }
}
