//! `H2O` (Zhang et al. 2023): heavy hitters by accumulated attention plus a
//! recent window.
//!
//! Score of token `j` for query head `h`: `s_{h,j} = Σ_t softmax_t(z_t)_j`
//! over every query `t` seen since `j` entered the cache (prefill chunks
//! causally, then one decode query per step). GQA: the group's scores are
//! reduced with [`GqaReduce`] (default `Sum`). Once a head holds more tokens
//! than its budget, keep the protected sink/recent tokens (by arrival) and
//! the top `budget − protected` candidates by score.
//!
//! The sums come from the attention ops as evidence: a prefill chunk's
//! column sums and a decode step's weights, reduced over the group by the
//! op (per query head for `Max`, whose maximum is taken over the
//! accumulated sums). Memory O(L) per KV head, no `[n, n]` matrix; cost
//! per step O(L) host work per KV head and one row move per evicted token.
#![forbid(unsafe_code)]

use super::evidence::{Compaction, RowState, evict_by_scores, layer_slot};
use super::tova::to_kv_scores;
use super::{
    Budget, Capabilities, GqaReduce, Heads, KvPolicy, Needs, Phase, Plan, ScoreUpdate, Scorer,
    StepCtx,
};
use crate::backend::Ops;
use crate::dtype::Element;
use crate::error::{Result, config};

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

/// Accumulated attention per (layer, block, row), blocks of the group
/// treatment the first call asks for.
#[derive(Clone, Debug, Default)]
pub struct H2oScorer {
    acc: Vec<Option<RowState<f64>>>,
    heads: (usize, usize),
}

impl H2oScorer {
    /// Adds this step's evidence to the accumulators of `ctx.layer`.
    fn accumulate<B: Ops, T: Element>(
        &mut self,
        ctx: &StepCtx<'_, B, T>,
        heads: Heads,
    ) -> Result<&RowState<f64>> {
        const OP: &str = "H2O";
        self.heads = (ctx.geom().num_q_heads(), ctx.geom().num_kv_heads());
        let st = layer_slot(&mut self.acc, ctx.layer).get_or_insert_with(|| RowState::new(heads));
        if st.heads() != heads {
            return Err(config(
                OP,
                "the scorer was first used with another group treatment",
            ));
        }
        st.sync(OP, ctx, 0.0)?;
        let ev = match ctx.phase {
            Phase::PrefillChunk => Some(ctx.col_sums()?),
            Phase::Decode => Some(ctx.decode_probs()?),
            _ => None,
        };
        if let Some(ev) = ev {
            let isa = crate::cpu::isa::detected();
            for (i, a) in st.rows.iter_mut().enumerate() {
                crate::cpu::simd::add_widened(isa, a, ev.block(i));
            }
        }
        Ok(st)
    }
}

impl<B: Ops, T: Element> Scorer<B, T> for H2oScorer {
    fn name(&self) -> &'static str {
        "h2o"
    }
    fn needs(&self, heads: Heads) -> Needs {
        Needs {
            decode_probs: Some(heads),
            prefill_col_sums: Some(heads),
            ..Needs::default()
        }
    }
    fn score(&mut self, ctx: &StepCtx<'_, B, T>, heads: Heads) -> Result<Vec<Vec<f64>>> {
        Ok(self.accumulate(ctx, heads)?.rows.clone())
    }
    /// The sums themselves, without a copy.
    fn lend(&mut self, ctx: &StepCtx<'_, B, T>, heads: Heads) -> Result<Vec<Vec<f64>>> {
        self.accumulate(ctx, heads)?;
        let st = self.acc.get_mut(ctx.layer).and_then(Option::as_mut);
        Ok(st
            .map(|st| std::mem::take(&mut st.rows))
            .unwrap_or_default())
    }
    fn restore(&mut self, layer: usize, scores: Vec<Vec<f64>>) {
        if let Some(Some(st)) = self.acc.get_mut(layer) {
            st.rows = scores;
        }
    }
    /// The sums grow by each decode step's weights.
    fn update(&self) -> ScoreUpdate {
        ScoreUpdate::Accumulate
    }
    fn retain(&mut self, layer: usize, c: &Compaction) -> Result<()> {
        if let Some(Some(st)) = self.acc.get_mut(layer) {
            st.retain(c, self.heads.0, self.heads.1);
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

    /// The evidence layout the accumulators use: reduced by the op for
    /// `Sum` / `Mean`, per query head for `Max`.
    fn heads(&self) -> Heads {
        match self.cfg.reduce {
            GqaReduce::Max => Heads::PerHead,
            r => r.into(),
        }
    }

    fn step<B: Ops, T: Element>(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        let heads = self.heads();
        let rows = &self.scorer.accumulate(ctx, heads)?.rows;
        let (plan, c) = if heads == Heads::PerHead {
            let kv = to_kv_scores(ctx, heads, self.cfg.reduce, rows.clone());
            evict_by_scores("H2O", ctx, &self.cfg.budget, &kv)?
        } else {
            evict_by_scores("H2O", ctx, &self.cfg.budget, rows)?
        };
        if let Some(c) = c {
            Scorer::<B, T>::retain(&mut self.scorer, ctx.layer, &c)?;
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
            needs: Scorer::<B, T>::needs(&self.scorer, self.heads()),
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
