//! `SnapKv` (Li et al. 2024): one-shot prompt compression at prefill end from
//! the attention of an observation window.
//!
//! Let the prompt hold `L` tokens and `W` (default 32) be the observation
//! window (the last `W` prompt queries). Per query head `h`:
//! `vote_{h,j} = Σ_{t ∈ window} softmax_t(z_t)_j` (causal), reduced over the
//! GQA group with [`GqaReduce`] (default `Mean`: "pooled over the group"),
//! then smoothed along positions of the prefix `0 .. L − W` by a 1-D pooling
//! of odd `kernel` (default average pooling, kernel 5, zero padding counted
//! in the mean like PyTorch `avg_pool1d`; max pooling is the option used
//! with kernel 7). Keep the window plus the top `budget − W` prefix tokens
//! (plus any protected sinks). Cost: one Q·K pass of `W` queries over the
//! prompt and a softmax (ops), O(L·kernel) host work per head. Decode steps
//! keep everything.
#![forbid(unsafe_code)]

use super::evidence::{QueryWindow, attention_probs, evict_by_scores, layer_slot, reduce_group};
use super::{Budget, BudgetSize, Capabilities, GqaReduce, KvPolicy, Needs, Plan, Scorer, StepCtx};
use crate::backend::Ops;
use crate::dtype::Element;
use crate::error::{Result, budget, config};

/// 1-D pooling of the votes along positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// Average pooling (zero padding included in the mean).
    Avg,
    /// Max pooling.
    Max,
    /// No pooling.
    None,
}

/// Settings of [`SnapKv`].
#[derive(Clone, Debug, PartialEq)]
pub struct SnapKvConfig {
    /// Token budget per head (the window is always kept and counts in it).
    pub budget: Budget,
    /// Observation window `W`.
    pub window: usize,
    /// Pooling kernel (odd).
    pub kernel: usize,
    /// Pooling kind.
    pub pooling: Pooling,
    /// Group reduction.
    pub reduce: GqaReduce,
}

impl Default for SnapKvConfig {
    fn default() -> Self {
        Self {
            budget: Budget::tokens(1024),
            window: 32,
            kernel: 5,
            pooling: Pooling::Avg,
            reduce: GqaReduce::Mean,
        }
    }
}

pub(crate) fn pool(x: &[f64], kernel: usize, how: Pooling) -> Vec<f64> {
    let r = kernel / 2;
    let n = x.len();
    (0..n)
        .map(|i| {
            let lo = i.saturating_sub(r);
            let hi = (i + r + 1).min(n);
            match how {
                Pooling::None => x[i],
                Pooling::Avg => x[lo..hi].iter().sum::<f64>() / kernel as f64,
                Pooling::Max => x[lo..hi].iter().copied().fold(f64::NEG_INFINITY, f64::max),
            }
        })
        .collect()
}

fn check(cfg: &SnapKvConfig, op: &'static str) -> Result<()> {
    cfg.budget.validate(op)?;
    if cfg.kernel == 0 || cfg.kernel.is_multiple_of(2) {
        return Err(config(
            op,
            format!(
                "the pooling kernel must be odd and positive, got {}",
                cfg.kernel
            ),
        ));
    }
    if cfg.window == 0 {
        return Err(config(
            op,
            "the observation window must hold at least one query",
        ));
    }
    let sizes = std::iter::once(cfg.budget.size)
        .chain(cfg.budget.per_layer.iter().map(|x| x.1))
        .chain(cfg.budget.per_head.iter().map(|x| x.2));
    for s in sizes {
        if let BudgetSize::Tokens(n) = s
            && cfg.window + cfg.budget.sink > n
        {
            return Err(budget(
                op,
                format!(
                    "window {} (+ sink {}) is larger than the budget of {n} tokens",
                    cfg.window, cfg.budget.sink
                ),
            ));
        }
    }
    Ok(())
}

/// Window votes per query head: the last `min(W, n_q)` rows of `q` summed,
/// then pooled over the whole row.
fn votes<B: Ops, T: Element>(
    ctx: &StepCtx<'_, B, T>,
    q: &B::Buffer<T>,
    q_rows: &crate::layout::Ragged,
    window: usize,
) -> Result<Vec<Vec<f64>>> {
    let probs = attention_probs(ctx.backend, ctx.cache, q, q_rows, true, ctx.scale)?;
    let g = ctx.geom();
    let segs = ctx.cache.segments();
    let mut out = Vec::with_capacity(ctx.batch() * g.num_q_heads());
    for b in 0..ctx.batch() {
        for h in 0..g.num_q_heads() {
            let mut v = vec![0.0f64; segs.len_of(segs.index(b, g.kv_head(h)))];
            let n = probs.n_q(b);
            for r in n.saturating_sub(window)..n {
                for (x, &p) in v.iter_mut().zip(probs.row(b, h, r)) {
                    *x += f64::from(p);
                }
            }
            out.push(v);
        }
    }
    Ok(out)
}

/// SnapKV window votes as a [`Scorer`] (for [`super::Caote`]): the last
/// `min(window, n_q)` queries of the current step, pooled along positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapKvScorer {
    /// Observation window.
    pub window: usize,
    /// Pooling kernel (odd).
    pub kernel: usize,
    /// Pooling kind.
    pub pooling: Pooling,
}

impl Default for SnapKvScorer {
    fn default() -> Self {
        Self {
            window: 32,
            kernel: 5,
            pooling: Pooling::Avg,
        }
    }
}

impl<B: Ops, T: Element> Scorer<B, T> for SnapKvScorer {
    fn name(&self) -> &'static str {
        "snapkv"
    }
    fn needs(&self) -> Needs {
        Needs {
            recent_queries: true,
            current_attention: true,
            ..Needs::default()
        }
    }
    fn score(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Vec<Vec<f64>>> {
        if self.kernel == 0 || self.kernel.is_multiple_of(2) {
            return Err(config(
                "SnapKvScorer",
                format!(
                    "the pooling kernel must be odd and positive, got {}",
                    self.kernel
                ),
            ));
        }
        let v = votes(ctx, ctx.queries, ctx.q_rows, self.window.max(1))?;
        Ok(v.iter()
            .map(|x| pool(x, self.kernel, self.pooling))
            .collect())
    }
}

/// SnapKV prompt compression.
pub struct SnapKv<B: Ops, T: Element> {
    cfg: SnapKvConfig,
    windows: Vec<Option<QueryWindow<B, T>>>,
}

impl<B: Ops, T: Element> SnapKv<B, T> {
    /// Validates the config (odd kernel, window inside the budget).
    pub fn new(cfg: SnapKvConfig) -> Result<Self> {
        check(&cfg, "SnapKv")?;
        Ok(Self {
            cfg,
            windows: Vec::new(),
        })
    }
}

impl<B: Ops, T: Element> KvPolicy<B, T> for SnapKv<B, T> {
    fn name(&self) -> &'static str {
        "snapkv"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            evicts: true,
            needs: Needs {
                recent_queries: true,
                ..Needs::default()
            },
            ..Capabilities::default()
        }
    }
    fn on_prefill_chunk(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        let w = self.cfg.window;
        let slot =
            layer_slot(&mut self.windows, ctx.layer).get_or_insert_with(|| QueryWindow::new(w));
        let g = ctx.geom();
        slot.push(
            ctx.backend,
            ctx.queries,
            ctx.q_rows,
            g.num_q_heads() * g.head_dim(),
        )?;
        Ok(Plan::KeepAll)
    }
    fn on_prefill_end(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        let Some(Some(win)) = self.windows.get(ctx.layer) else {
            return Ok(Plan::KeepAll);
        };
        let Some((q, q_rows)) = win.packed(ctx.backend)? else {
            return Ok(Plan::KeepAll);
        };
        let raw = votes(ctx, &q, &q_rows, self.cfg.window)?;
        let g = ctx.geom();
        let kv = reduce_group(
            &raw,
            ctx.batch(),
            g.num_q_heads(),
            g.num_kv_heads(),
            self.cfg.reduce,
        );
        let segs = ctx.cache.segments();
        let pooled: Vec<Vec<f64>> = kv
            .iter()
            .enumerate()
            .map(|(s, x)| {
                let prefix = segs.len_of(s).saturating_sub(self.cfg.window);
                let mut p = pool(&x[..prefix.min(x.len())], self.cfg.kernel, self.cfg.pooling);
                p.extend(std::iter::repeat_n(f64::INFINITY, x.len() - p.len()));
                p
            })
            .collect();
        let mut bud = self.cfg.budget.clone();
        bud.recent = bud.recent.max(self.cfg.window);
        let plan = evict_by_scores("SnapKv", ctx, &bud, &pooled)?;
        if let Some(w) = self.windows.get_mut(ctx.layer) {
            *w = None;
        }
        Ok(plan)
    }
    fn reset(&mut self) {
        self.windows.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooling_matches_avg_pool1d_with_zero_padding() {
        let x = [0.0, 0.0, 5.0, 0.0, 0.0, 0.0];
        assert_eq!(
            pool(&x, 5, Pooling::Avg),
            vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
        );
        assert_eq!(
            pool(&x, 3, Pooling::Max),
            vec![0.0, 5.0, 5.0, 5.0, 0.0, 0.0]
        );
        assert_eq!(pool(&x, 7, Pooling::None), x.to_vec());
    }
}
