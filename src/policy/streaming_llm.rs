//! `StreamingLlm` (Xiao et al. 2023): keep the first `sink` tokens (attention
//! sinks) and the last `recent` tokens; evict everything in between.
//!
//! Per (sequence, KV head) whose sequence has seen `n` tokens: keep the
//! tokens of arrival `0 .. sink` and `n − recent .. n` once the head holds
//! more than `sink + recent`. No scores, no GQA reduction (the rule is
//! positional). Runs after each prefill chunk and each decode step's
//! attention, so a decode step attends to `sink + recent + 1` tokens and
//! then drops the oldest non-sink one. With hole-filling compaction the
//! newest token takes the dropped row: the recent window is a ring, one
//! row move per step. Cost per step: an O(L) scan of the arrivals on the
//! host and one row move. Positions keep their original values (engines
//! that re-rotate read them from the cache).
#![forbid(unsafe_code)]

use super::evidence::{keep_list, split_protected};
use super::{Capabilities, KvPolicy, Plan, StepCtx};
use crate::backend::Backend;
use crate::dtype::Element;
use crate::error::{Result, budget};

/// Settings of [`StreamingLlm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamingLlmConfig {
    /// Attention sinks kept at the start (paper: 4).
    pub sink: usize,
    /// Recent window kept at the end.
    pub recent: usize,
}

impl Default for StreamingLlmConfig {
    fn default() -> Self {
        Self {
            sink: 4,
            recent: 1020,
        }
    }
}

/// Sinks + recent window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamingLlm {
    cfg: StreamingLlmConfig,
}

impl StreamingLlm {
    /// Validates the config: at least one token must be kept.
    pub fn new(cfg: StreamingLlmConfig) -> Result<Self> {
        if cfg.sink + cfg.recent == 0 {
            return Err(budget(
                "StreamingLlm",
                "sink + recent = 0: every head keeps at least one token",
            ));
        }
        Ok(Self { cfg })
    }

    fn plan<B: Backend, T: Element>(&self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        let segs = ctx.kv.segments();
        let cap = self.cfg.sink.saturating_add(self.cfg.recent);
        if segs.lens().iter().all(|&l| l as usize <= cap) {
            return Ok(Plan::KeepAll);
        }
        let hkv = ctx.geom().num_kv_heads();
        let sets = (0..segs.num_segments())
            .map(|s| {
                let seen = ctx.kv.seen(s / hkv);
                split_protected(ctx.kv.arrivals(s), seen, self.cfg.sink, self.cfg.recent).1
            })
            .collect();
        Ok(Plan::Drop(keep_list(sets)?))
    }
}

impl<B: Backend, T: Element> KvPolicy<B, T> for StreamingLlm {
    fn name(&self) -> &'static str {
        "streaming_llm"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            evicts: true,
            ..Capabilities::default()
        }
    }
    fn on_prefill_chunk(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.plan(ctx)
    }
    fn on_decode_step(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.plan(ctx)
    }
}
