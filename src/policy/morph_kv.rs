//! `MorphKv` (Ghadia et al., ICML 2025): a constant-size cache for long
//! responses, pruned at every decode step by the attention of the last `W`
//! queries.
//!
//! With `L` cached tokens (the current one last), *recent* = the last
//! `W + 1` rows (always kept) and *old* = rows `0 .. L − W − 1`. For each of
//! the `W` most recent **previous** queries `q_w` (stored as vectors, not
//! logits) and each query head `h`, `a_{w,h,j} = softmax_{j ∈ old}(s · q_w · k_j)`.
//! GQA ([`MorphGqa`], default `MaxOfSoftmax`): `a_{w,j} = max_{h ∈ G} a_{w,h,j}`
//! (or `SumLogits`: softmax of the group-summed logits). Fusion over the
//! window ([`Fusion`]): `Sum` gives `s_j = Σ_w a_{w,j}`, `Max` gives
//! `s_j = max_w a_{w,j}`. Keep the `C − W` old tokens with the largest `s_j`
//! (ties to the lower index) plus the recent rows: `C + 1` tokens per KV
//! head. Runs at every decode step once `L > C + 1`, so the first decode step
//! compresses the whole prompt; prefill only records the last `W` queries.
//!
//! Cost per step: one Q·K pass of `W` queries over the cache (ops) and
//! `O(W · G · L)` host work for the softmaxes over the old tokens.
#![forbid(unsafe_code)]

use super::evidence::{QueryWindow, attention_logits, keep_list, layer_slot, top_k};
use super::{Capabilities, KvPolicy, Needs, Plan, StepCtx};
use crate::backend::Ops;
use crate::dtype::Element;
use crate::error::{Result, budget, config};

/// Aggregation over the query window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fusion {
    /// `sum_fused`: `s_j = Σ_w a_{w,j}`.
    Sum,
    /// `max_fused`: `s_j = max_w a_{w,j}`.
    Max,
}

/// GQA reduction of MorphKV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MorphGqa {
    /// Softmax per query head, then max over the group (the Mistral patch; default).
    MaxOfSoftmax,
    /// Sum the group's logits, then one softmax (the Llama patch).
    SumLogits,
}

/// Settings of [`MorphKv`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MorphKvConfig {
    /// Recent window `W` (queries remembered and tokens protected).
    pub window: usize,
    /// Capacity `C`: the cache is pruned to `C + 1` tokens per KV head.
    pub capacity: usize,
    /// Window fusion.
    pub fusion: Fusion,
    /// GQA reduction.
    pub gqa: MorphGqa,
}

impl Default for MorphKvConfig {
    /// The LongBench setting of the reference code: `W = 32`, `C = 2000`, sum.
    fn default() -> Self {
        Self {
            window: 32,
            capacity: 2000,
            fusion: Fusion::Sum,
            gqa: MorphGqa::MaxOfSoftmax,
        }
    }
}

/// MorphKV eviction.
pub struct MorphKv<B: Ops, T: Element> {
    cfg: MorphKvConfig,
    windows: Vec<Option<QueryWindow<B, T>>>,
}

impl<B: Ops, T: Element> MorphKv<B, T> {
    /// Validates the config: `1 ≤ W < C`.
    pub fn new(cfg: MorphKvConfig) -> Result<Self> {
        if cfg.window == 0 {
            return Err(config("MorphKv", "window must be at least 1"));
        }
        if cfg.window >= cfg.capacity {
            return Err(budget(
                "MorphKv",
                format!(
                    "window {} is not smaller than the capacity {}",
                    cfg.window, cfg.capacity
                ),
            ));
        }
        Ok(Self {
            cfg,
            windows: Vec::new(),
        })
    }

    fn window(&mut self, layer: usize) -> &mut QueryWindow<B, T> {
        let w = self.cfg.window;
        layer_slot(&mut self.windows, layer).get_or_insert_with(|| QueryWindow::new(w))
    }
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| x / s).collect()
}

impl<B: Ops, T: Element> KvPolicy<B, T> for MorphKv<B, T> {
    fn name(&self) -> &'static str {
        "morph_kv"
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
        let g = *ctx.geom();
        self.window(ctx.layer).push(
            ctx.backend,
            ctx.queries,
            ctx.q_rows,
            g.num_q_heads() * g.head_dim(),
        )?;
        Ok(Plan::KeepAll)
    }
    fn on_decode_step(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        const OP: &str = "MorphKv";
        let g = *ctx.geom();
        let (w, c) = (self.cfg.window, self.cfg.capacity);
        let segs = ctx.cache.segments();
        let over = segs.lens().iter().any(|&l| l as usize > c + 1);
        let mut plan = Plan::KeepAll;
        if over {
            let win = self.window(ctx.layer);
            let packed = win.packed(ctx.backend)?;
            let logits = match &packed {
                Some((q, rows)) => Some(attention_logits(
                    ctx.backend,
                    ctx.cache,
                    q,
                    rows,
                    ctx.scale,
                )?),
                None => None,
            };
            let (hq, hkv, grp) = (g.num_q_heads(), g.num_kv_heads(), g.group());
            let mut sets = Vec::with_capacity(segs.num_segments());
            for s in 0..segs.num_segments() {
                let (b, kv) = (s / hkv, s % hkv);
                let len = segs.len_of(s);
                if len <= c + 1 {
                    sets.push((0..len as u32).collect());
                    continue;
                }
                let old = len - (w + 1);
                let mut score = vec![0.0f64; old];
                if let Some(lg) = &logits {
                    for r in 0..lg.n_q(b) {
                        let a: Vec<f64> = match self.cfg.gqa {
                            MorphGqa::MaxOfSoftmax => {
                                let mut a = vec![f64::NEG_INFINITY; old];
                                for h in kv * grp..(kv + 1) * grp {
                                    let z: Vec<f64> = lg
                                        .row(b, h, r)
                                        .iter()
                                        .take(old)
                                        .map(|&x| f64::from(x))
                                        .collect();
                                    for (m, p) in a.iter_mut().zip(softmax(&z)) {
                                        *m = m.max(p);
                                    }
                                }
                                a
                            }
                            MorphGqa::SumLogits => {
                                let mut z = vec![0.0f64; old];
                                for h in kv * grp..(kv + 1) * grp {
                                    for (x, &l) in
                                        z.iter_mut().zip(lg.row(b, h, r).iter().take(old))
                                    {
                                        *x += f64::from(l);
                                    }
                                }
                                softmax(&z)
                            }
                        };
                        for (sc, p) in score.iter_mut().zip(a) {
                            match self.cfg.fusion {
                                Fusion::Sum => *sc += p,
                                Fusion::Max => *sc = sc.max(p),
                            }
                        }
                    }
                }
                let cand: Vec<u32> = (0..old as u32).collect();
                let mut keep = top_k(OP, &score, &cand, c - w)?;
                keep.extend(old as u32..len as u32);
                sets.push(keep);
                let _ = hq;
            }
            plan = Plan::Evict(keep_list(sets)?);
        }
        // The current query joins the window after it was used (it is excluded).
        self.window(ctx.layer).push(
            ctx.backend,
            ctx.queries,
            ctx.q_rows,
            g.num_q_heads() * g.head_dim(),
        )?;
        Ok(plan)
    }
    fn reset(&mut self) {
        self.windows.clear();
    }
}
