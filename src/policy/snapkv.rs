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
//! (plus any protected sinks). The votes are the attention op's window
//! evidence of the last prefill chunk (summed over the window, reduced over
//! the group by the op): no second Q·K pass, O(L) memory. Host work
//! O(L·kernel) per head. Decode steps keep everything.
#![forbid(unsafe_code)]

use super::evidence::{arrival_order, blocks_f64, evict_by_scores, segment_of};
use super::{
    Budget, BudgetSize, Capabilities, GqaReduce, Heads, KvPolicy, Needs, Phase, Plan, Scorer,
    StepCtx, Window,
};
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

/// SnapKV window votes as a [`Scorer`] (for [`super::Caote`]): the last
/// `min(window, n_q)` queries of the current step (in decode: the current
/// query), pooled along positions.
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

/// Pools every block along its segment's arrival order.
fn pool_blocks<B: Ops, T: Element>(
    ctx: &StepCtx<'_, B, T>,
    heads: Heads,
    votes: &[Vec<f64>],
    kernel: usize,
    how: Pooling,
    prefix_of: impl Fn(usize) -> usize,
) -> Vec<Vec<f64>> {
    let g = ctx.geom();
    votes
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let s = segment_of(i, heads, g.num_q_heads(), g.num_kv_heads());
            let order = arrival_order(ctx.kv, s);
            let prefix = prefix_of(s).min(v.len());
            let ordered: Vec<f64> = order[..prefix].iter().map(|&r| v[r as usize]).collect();
            let pooled = pool(&ordered, kernel, how);
            let mut out = vec![f64::INFINITY; v.len()];
            for (&r, p) in order[..prefix].iter().zip(pooled) {
                out[r as usize] = p;
            }
            out
        })
        .collect()
}

impl<B: Ops, T: Element> Scorer<B, T> for SnapKvScorer {
    fn name(&self) -> &'static str {
        "snapkv"
    }
    fn needs(&self, heads: Heads) -> Needs {
        Needs {
            decode_probs: Some(heads),
            prefill_window: Some(Window {
                queries: self.window.max(1),
                heads,
                rows: false,
            }),
            ..Needs::default()
        }
    }
    /// The observation window.
    fn protects(&self) -> (usize, usize) {
        (0, self.window)
    }
    fn score(&mut self, ctx: &StepCtx<'_, B, T>, heads: Heads) -> Result<Vec<Vec<f64>>> {
        if self.kernel == 0 || self.kernel.is_multiple_of(2) {
            return Err(config(
                "SnapKvScorer",
                format!(
                    "the pooling kernel must be odd and positive, got {}",
                    self.kernel
                ),
            ));
        }
        let votes = match ctx.phase {
            Phase::Decode => blocks_f64(&ctx.decode_probs()?),
            _ => blocks_f64(&ctx.window()?.1),
        };
        let segs = ctx.kv.segments();
        let pooled = pool_blocks(ctx, heads, &votes, self.kernel, self.pooling, |s| {
            segs.len_of(s)
        });
        Ok(pooled)
    }
}

/// SnapKV prompt compression.
pub struct SnapKv<B: Ops, T: Element> {
    cfg: SnapKvConfig,
    _marker: std::marker::PhantomData<fn() -> (B, T)>,
}

impl<B: Ops, T: Element> SnapKv<B, T> {
    /// Validates the config (odd kernel, window inside the budget).
    pub fn new(cfg: SnapKvConfig) -> Result<Self> {
        check(&cfg, "SnapKv")?;
        Ok(Self {
            cfg,
            _marker: std::marker::PhantomData,
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
                prefill_window: Some(Window {
                    queries: self.cfg.window,
                    heads: Heads::from(self.cfg.reduce),
                    rows: false,
                }),
                ..Needs::default()
            },
            ..Capabilities::default()
        }
    }
    fn on_prefill_end(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        if ctx.evidence.window.is_none() {
            return Ok(Plan::KeepAll);
        }
        let heads = Heads::from(self.cfg.reduce);
        let votes = blocks_f64(&ctx.window()?.1);
        let segs = ctx.kv.segments();
        let w = self.cfg.window;
        let pooled = pool_blocks(ctx, heads, &votes, self.cfg.kernel, self.cfg.pooling, |s| {
            segs.len_of(s).saturating_sub(w)
        });
        let mut bud = self.cfg.budget.clone();
        bud.recent = bud.recent.max(w);
        Ok(evict_by_scores("SnapKv", ctx, &bud, &pooled)?.0)
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
