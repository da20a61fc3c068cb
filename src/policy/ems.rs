//! `Ems` (Li et al. 2024, "EMS: Adaptive Evict-then-Merge Strategy for
//! Head-wise KV Cache Compression Based on Global-Local Importance"): prompt
//! compression at prefill end, per KV head, with the reconstructed
//! specification of `ems_caote.md` B8 (no code or paper body was readable;
//! see `docs/policies/ems.md` for what is from the paper and what is ours).
//!
//! Per (sequence, KV head) with `N` prompt tokens, budget `B`, window `w`:
//!
//! 1. `s_Glo[j] = Σ_{i ≥ j} A[i, j]` over all prompt queries,
//!    `s_Loc[j] = Σ_{i in the last w queries, i ≥ j} A[i, j]`; GQA: summed
//!    over the group's query heads.
//! 2. `s_GL = max(s_Glo · mean(s_Loc) / mean(s_Glo), s_Loc)` (mean alignment
//!    over [`AlignOver`], then element-wise max).
//! 3. Keep the last `w` tokens and the protected sinks; among the older
//!    candidates keep the top `B − w − sink` by `s_GL`: the *important*
//!    tokens, which are the class centres. Memory per head is exactly `B`.
//! 4. *Irrelevant*: dropped candidates with `s_GL < tau_irr · mean(s_GL)`
//!    go to the zero class.
//! 5. *To-be-merged*: the rest; each picks `c* = argmax_c cos(k_t, k_c) ·
//!    cos(v_t, v_c)` (with `sign_guard`, both cosines must be positive) and
//!    joins it when the product is at least `theta`, else the zero class.
//! 6. Each centre `c` with members `M(c)` becomes, with
//!    `π_i = s_GL[i] / Σ_{m ∈ {c} ∪ M(c)} s_GL[m]`: `v_c ← Σ π_i v_i`, and
//!    with [`MergeKeys::DirectionCentreNorm`]
//!    `k_c ← ‖k_c‖ · normalize(Σ π_i k_i / ‖k_i‖)` (keys untouched with `Off`).
//! 7. Zero class: every dropped token gets a slot in `0 ..= K` (slot 0 = the
//!    zero class, slot `c` = centre `c`); slot 0 is dropped, so the same
//!    control flow serves every head.
//!
//! Decode tokens are appended uncompressed. `s_Glo` accumulates the
//! attention ops' column-sum evidence of every prefill chunk and `s_Loc` is
//! their window evidence of the last chunk (no Q·K pass of EMS's own, O(N)
//! memory). Cost at prefill end: one key and one value dot-product pass of
//! the dropped tokens against the centres, the row norms of K and V (all
//! ops), two `merge_rows` and a compaction; host work O(N log N + N·K) on
//! scalars per head.
#![forbid(unsafe_code)]

use super::evidence::{blocks_f64, keep_list, split_protected, top_k};
use super::tova::to_kv_scores;
use super::{
    Budget, BudgetSize, Capabilities, GqaReduce, H2oScorer, Heads, KvPolicy, Needs, Plan, Scorer,
    StepCtx, Window,
};
use crate::backend::Ops;
use crate::cache::{MergeSpec, row_dots, row_sq_norms};
use crate::dtype::Element;
use crate::error::{Error, Result, budget, config};
use crate::layout::{Ragged, Segments};
use crate::ops;

/// To-be-merged tokens scored against the centres at once (bounds the
/// cosine matrix held in memory).
const MERGE_CHUNK: usize = 512;

/// Over which tokens the means of the Global-Local alignment are taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlignOver {
    /// All prompt tokens (default).
    All,
    /// Only the candidates (tokens outside the window).
    Candidates,
}

/// How keys are merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeKeys {
    /// Merge the key directions, keep the centre's norm (default).
    DirectionCentreNorm,
    /// Leave keys untouched (safest under RoPE).
    Off,
}

/// Settings of [`Ems`] (every unknown of the paper is a field; defaults of
/// `ems_caote.md` B8).
#[derive(Clone, Debug, PartialEq)]
pub struct EmsConfig {
    /// Per-head budget `B` (paper headline: 256). `sink` is honoured,
    /// `recent` is replaced by `window`.
    pub budget: Budget,
    /// Local window `w` (32).
    pub window: usize,
    /// Alignment means (all tokens).
    pub align_over: AlignOver,
    /// Sparsity cut `tau_irr` (0.5); `f64::INFINITY` sends every dropped token
    /// to the zero class.
    pub tau_irr: f64,
    /// Redundancy threshold `theta` on `cos(k)·cos(v)` (0.5); `> 1` disables merging.
    pub theta: f64,
    /// Require both cosines to be positive (fixes the sign issue of the product).
    pub sign_guard: bool,
    /// Key merge rule.
    pub merge_keys: MergeKeys,
    /// GQA reduction of `s_Glo` and `s_Loc` (sum over the group).
    pub reduce: GqaReduce,
}

impl Default for EmsConfig {
    fn default() -> Self {
        Self {
            budget: Budget::tokens(256),
            window: 32,
            align_over: AlignOver::All,
            tau_irr: 0.5,
            theta: 0.5,
            sign_guard: true,
            merge_keys: MergeKeys::DirectionCentreNorm,
            reduce: GqaReduce::Sum,
        }
    }
}

/// The Global-Local score `max(s_Glo · mean(s_Loc)/mean(s_Glo), s_Loc)`;
/// means over all tokens, or over `0 .. candidates` with
/// [`AlignOver::Candidates`]. A zero global mean leaves `s_Loc`.
pub fn global_local_scores(
    s_glo: &[f64],
    s_loc: &[f64],
    align: AlignOver,
    candidates: usize,
) -> Vec<f64> {
    let n = match align {
        AlignOver::All => s_glo.len(),
        AlignOver::Candidates => candidates.min(s_glo.len()),
    };
    let mean = |x: &[f64]| {
        if n == 0 {
            0.0
        } else {
            x[..n].iter().sum::<f64>() / n as f64
        }
    };
    let (mg, ml) = (mean(s_glo), mean(s_loc));
    let f = if mg > 0.0 { ml / mg } else { 0.0 };
    s_glo
        .iter()
        .zip(s_loc)
        .map(|(&g, &l)| (g * f).max(l))
        .collect()
}

/// EMS prompt compression.
pub struct Ems<B: Ops, T: Element> {
    cfg: EmsConfig,
    global: H2oScorer,
    _marker: std::marker::PhantomData<fn() -> (B, T)>,
}

impl<B: Ops, T: Element> Ems<B, T> {
    /// Validates the config.
    pub fn new(cfg: EmsConfig) -> Result<Self> {
        const OP: &str = "Ems";
        cfg.budget.validate(OP)?;
        if cfg.window == 0 {
            return Err(config(OP, "window must be at least 1"));
        }
        if cfg.tau_irr.is_nan() || cfg.tau_irr < 0.0 {
            return Err(config(
                OP,
                format!("tau_irr must be >= 0 (inf allowed), got {}", cfg.tau_irr),
            ));
        }
        if !cfg.theta.is_finite() && cfg.theta != f64::INFINITY {
            return Err(config(
                OP,
                format!("theta must be a number, got {}", cfg.theta),
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
                    OP,
                    format!(
                        "window {} (+ sink {}) is larger than the budget of {n} tokens",
                        cfg.window, cfg.budget.sink
                    ),
                ));
            }
        }
        Ok(Self {
            cfg,
            global: H2oScorer::default(),
            _marker: std::marker::PhantomData,
        })
    }
}

impl<B: Ops, T: Element> Ems<B, T> {
    /// Evidence layout: reduced by the op for `Sum` / `Mean`, per query
    /// head for `Max` (the maximum of accumulated sums).
    fn heads(&self) -> Heads {
        match self.cfg.reduce {
            GqaReduce::Max => Heads::PerHead,
            r => r.into(),
        }
    }
}

impl<B: Ops, T: Element> KvPolicy<B, T> for Ems<B, T> {
    fn name(&self) -> &'static str {
        "ems"
    }
    fn capabilities(&self) -> Capabilities {
        let heads = self.heads();
        Capabilities {
            evicts: true,
            merges: true,
            needs: Needs {
                prefill_col_sums: Some(heads),
                prefill_window: Some(Window {
                    queries: self.cfg.window,
                    heads,
                    rows: false,
                }),
                ..Needs::default()
            },
            ..Capabilities::default()
        }
    }
    fn on_prefill_chunk(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        let heads = self.heads();
        Scorer::<B, T>::score(&mut self.global, ctx, heads)?;
        Ok(Plan::KeepAll)
    }
    fn on_prefill_end(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.compress(ctx)
    }
    fn reset(&mut self) {
        Scorer::<B, T>::reset(&mut self.global);
    }
}

impl<B: Ops, T: Element> Ems<B, T> {
    fn compress(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        const OP: &str = "Ems";
        let cfg = &self.cfg;
        let geom = *ctx.geom();
        let (hkv, d) = (geom.num_kv_heads(), geom.head_dim());
        let segs = ctx.kv.segments().clone();
        let nseg = segs.num_segments();
        if ctx.evidence.window.is_none() {
            return Ok(Plan::KeepAll);
        }
        for s in 0..nseg {
            if ctx.kv.arrivals(s).windows(2).any(|w| w[1] < w[0]) {
                return Err(config(
                    OP,
                    format!(
                        "segment {s} is not in arrival order: EMS compresses an uncompacted prompt"
                    ),
                ));
            }
        }
        let heads = self.heads();
        let glo = Scorer::<B, T>::score(&mut self.global, ctx, heads)?;
        let loc = blocks_f64(&ctx.window()?.1);
        let glo = to_kv_scores(ctx, heads, cfg.reduce, glo);
        let loc = to_kv_scores(ctx, heads, cfg.reduce, loc);

        // Per segment: kept rows, centres, and the dropped tokens to merge.
        let mut keep_sets = Vec::with_capacity(nseg);
        let mut centres: Vec<Vec<u32>> = vec![Vec::new(); nseg];
        let mut tbm: Vec<Vec<u32>> = vec![Vec::new(); nseg];
        let mut sgl_all: Vec<Vec<f64>> = vec![Vec::new(); nseg];
        let mut any = false;
        let mut window_budget = cfg.budget.clone();
        window_budget.recent = cfg.window;
        for s in 0..nseg {
            let (b, g) = (s / hkv, s % hkv);
            let n = segs.len_of(s);
            // The window is EMS's protected recent area (ratio budgets are
            // raised to fit it, token budgets were checked at construction).
            let bud =
                window_budget.resolve(OP, ctx.layer, ctx.num_layers, g, hkv, ctx.kv.seen(b))?;
            if n <= bud || cfg.window >= n {
                keep_sets.push((0..n as u32).collect::<Vec<u32>>());
                continue;
            }
            if cfg.window + cfg.budget.sink > bud {
                return Err(budget(
                    OP,
                    format!(
                        "window {} (+ sink) is larger than the resolved budget {bud}",
                        cfg.window
                    ),
                ));
            }
            any = true;
            let cand_end = n - cfg.window;
            let sgl = global_local_scores(&glo[s], &loc[s], cfg.align_over, cand_end);
            if let Some(x) = sgl.iter().find(|x| !x.is_finite()) {
                return Err(Error::NonFinite {
                    op: OP,
                    what: format!("Global-Local score {x}"),
                });
            }
            let arr = ctx.kv.arrivals(s);
            let (prot, cand) = split_protected(arr, ctx.kv.seen(b), cfg.budget.sink, cfg.window);
            let k = bud - prot.len();
            let important = top_k(OP, &sgl, arr, &cand, k)?;
            let mut keep = prot.clone();
            keep.extend(&important);
            let mut cs: Vec<u32> = prot
                .iter()
                .copied()
                .filter(|&j| (j as usize) < cand_end)
                .chain(important.iter().copied())
                .collect();
            cs.sort_unstable();
            let mut kept = vec![false; n];
            keep.iter().for_each(|&j| kept[j as usize] = true);
            let mean = sgl.iter().sum::<f64>() / n as f64;
            for j in 0..cand_end {
                if kept[j] {
                    continue;
                }
                let irrelevant = cfg.tau_irr == f64::INFINITY || sgl[j] < cfg.tau_irr * mean;
                if !irrelevant && cfg.theta <= 1.0 {
                    tbm[s].push(j as u32);
                }
            }
            centres[s] = cs;
            keep_sets.push(keep);
            sgl_all[s] = sgl;
        }
        if !any {
            return Ok(Plan::KeepAll);
        }
        let keep = keep_list(keep_sets)?;
        let n_tbm: usize = tbm.iter().map(Vec::len).sum();
        let n_c: usize = centres.iter().map(Vec::len).sum();
        if n_tbm == 0 || n_c == 0 {
            return Ok(Plan::Evict(keep));
        }

        // Cosines of every to-merge token against its head's centres (ops),
        // in chunks of `MERGE_CHUNK` tokens so memory stays O(chunk × K).
        let abs = |s: usize, rows: &[u32]| {
            rows.iter()
                .map(|&j| (segs.offset(s) + j as usize) as u32)
                .collect::<Vec<u32>>()
        };
        let be = ctx.backend;
        let kn = row_sq_norms(be, ctx.kv.k(), d)?;
        let vn = row_sq_norms(be, ctx.kv.v(), d)?;
        let norm = |sq: &[f32], r: usize| f64::from(sq[r].max(0.0)).sqrt();

        let mut targets = Vec::new();
        let mut lens = Vec::new();
        let mut members = Vec::new();
        let mut v_weights = Vec::new();
        let mut k_weights = Vec::new();
        let mut k_norms = Vec::new();
        for s in 0..nseg {
            let nc = centres[s].len();
            if tbm[s].is_empty() || nc == 0 {
                continue;
            }
            let c_rows = abs(s, &centres[s]);
            let c_segs = Segments::packed(1, 1, &[nc as u32])?;
            // Slot 0 is the zero class, slot c + 1 is centre c.
            let mut slot_members: Vec<Vec<u32>> = vec![Vec::new(); nc + 1];
            for chunk in tbm[s].chunks(MERGE_CHUNK) {
                let t_rows = abs(s, chunk);
                let q_rows = Ragged::from_lens(&[chunk.len() as u32])?;
                let dots = |buf: &B::Buffer<T>| -> Result<Vec<f32>> {
                    let mut a = be.zeros::<T>(t_rows.len() * d)?;
                    let mut c = be.zeros::<T>(c_rows.len() * d)?;
                    ops::gather_rows(be, d, &t_rows, buf, &mut a)?;
                    ops::gather_rows(be, d, &c_rows, buf, &mut c)?;
                    row_dots(be, &a, &c, d, &q_rows, &c_segs)
                };
                let kd = dots(ctx.kv.k())?;
                let vd = dots(ctx.kv.v())?;
                for (ti, &t) in chunk.iter().enumerate() {
                    let tr = segs.offset(s) + t as usize;
                    let (tk, tv) = (norm(&kn, tr), norm(&vn, tr));
                    let mut best: Option<(usize, f64)> = None;
                    for (ci, &c) in centres[s].iter().enumerate() {
                        let cr = segs.offset(s) + c as usize;
                        let (ck, cv) = (norm(&kn, cr), norm(&vn, cr));
                        if tk == 0.0 || tv == 0.0 || ck == 0.0 || cv == 0.0 {
                            continue;
                        }
                        let cos_k = f64::from(kd[ti * nc + ci]) / (tk * ck);
                        let cos_v = f64::from(vd[ti * nc + ci]) / (tv * cv);
                        if cfg.sign_guard && (cos_k <= 0.0 || cos_v <= 0.0) {
                            continue;
                        }
                        let r = cos_k * cos_v;
                        if best.is_none_or(|(_, br)| r > br) {
                            best = Some((ci, r));
                        }
                    }
                    let slot = match best {
                        Some((ci, r)) if r >= cfg.theta => ci + 1,
                        _ => 0,
                    };
                    slot_members[slot].push(t);
                }
            }
            for (ci, ms) in slot_members.iter().enumerate().skip(1) {
                if ms.is_empty() {
                    continue;
                }
                let c = centres[s][ci - 1];
                let group: Vec<u32> = std::iter::once(c).chain(ms.iter().copied()).collect();
                let total: f64 = group.iter().map(|&j| sgl_all[s][j as usize]).sum();
                let pis: Vec<f64> = group
                    .iter()
                    .map(|&j| {
                        if total > 0.0 {
                            sgl_all[s][j as usize] / total
                        } else {
                            1.0 / group.len() as f64
                        }
                    })
                    .collect();
                targets.push((s as u32, c));
                lens.push(group.len() as u32);
                for (&j, &pi) in group.iter().zip(&pis) {
                    members.push(j);
                    v_weights.push(pi as f32);
                    let kr = norm(&kn, segs.offset(s) + j as usize);
                    k_weights.push(if kr > 0.0 { (pi / kr) as f32 } else { 0.0 });
                }
                k_norms.push(norm(&kn, segs.offset(s) + c as usize) as f32);
            }
        }
        if targets.is_empty() {
            return Ok(Plan::Evict(keep));
        }
        let keys = cfg.merge_keys == MergeKeys::DirectionCentreNorm;
        Ok(Plan::Merge(MergeSpec {
            keep,
            targets,
            groups: Ragged::from_lens(&lens)?,
            members,
            v_weights,
            k_weights: keys.then_some(k_weights),
            k_norms: keys.then_some(k_norms),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_local_alignment_edge_cases() {
        // Zero global mass leaves the local score.
        assert_eq!(
            global_local_scores(&[0.0, 0.0], &[0.3, 0.7], AlignOver::All, 2),
            vec![0.3, 0.7]
        );
        // Per-query form of B3: rows summing to 1 give sum s_Glo = N_q, sum s_Loc = w.
        let s = global_local_scores(&[2.0, 1.0, 1.0], &[0.5, 0.5, 1.0], AlignOver::All, 3);
        assert_eq!(s, vec![1.0, 0.5, 1.0]);
    }

    #[test]
    fn config_validation() {
        use crate::reference::Reference;
        assert!(Ems::<Reference, f32>::new(EmsConfig::default()).is_ok());
        assert!(
            Ems::<Reference, f32>::new(EmsConfig {
                window: 0,
                ..EmsConfig::default()
            })
            .is_err()
        );
        assert!(
            Ems::<Reference, f32>::new(EmsConfig {
                tau_irr: -1.0,
                ..EmsConfig::default()
            })
            .is_err()
        );
        assert!(
            Ems::<Reference, f32>::new(EmsConfig {
                theta: f64::NAN,
                ..EmsConfig::default()
            })
            .is_err()
        );
        assert!(
            Ems::<Reference, f32>::new(EmsConfig {
                tau_irr: f64::INFINITY,
                theta: 2.0,
                ..EmsConfig::default()
            })
            .is_ok()
        );
    }
}
