//! Lanes: one kvsieve session per (policy, budget), all fed the same
//! sequence in lockstep so the model's matmuls run on every lane's rows at
//! once (`[lanes · tokens, dim]`), while each lane keeps its own residual
//! stream, KV cache and policy state.
//!
//! Prompts are prefilled in chunks, as an engine does with long prompts:
//! policies that evict during prefill (H2O, TOVA, CAOTE, SnapKV, ...) do so
//! after every chunk, so later chunks attend to the compressed cache, and
//! policies that select during prefill (TokenSelect, TidalDecode) restrict
//! even the first chunk's attention. So every chunk, the first included,
//! runs once per lane.

use candle_core::Tensor;
use kvsieve::candle::{CandleSession, SessionConfig};
use kvsieve::cpu::Cpu;
use kvsieve::eval::policies::MIN_BUDGET;
use kvsieve::{HeadGeometry, Ragged};
use rayon::prelude::*;

use super::model::{Model, Qkv, cerr};

/// A policy at a budget (`None`: the full cache).
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub policy: String,
    pub budget: Option<usize>,
}

struct Lane {
    session: CandleSession<Cpu, f32>,
}

pub struct Lanes<'m> {
    model: &'m Model,
    lanes: Vec<Lane>,
    /// Position of the next token (the same in every lane).
    pub pos: usize,
}

fn rows_of(t: &Tensor, lane: usize, n: usize) -> Result<Tensor, String> {
    t.narrow(0, lane * n, n).map_err(cerr)
}

impl<'m> Lanes<'m> {
    pub fn new(model: &'m Model, specs: &[Spec], cpu: &Cpu) -> Result<Self, String> {
        let c = model.cfg;
        let geom =
            HeadGeometry::new(c.n_heads, c.n_kv_heads, c.head_dim()).map_err(|e| e.to_string())?;
        let lanes = specs
            .iter()
            .map(|s| {
                let policy =
                    super::engine::policy(&s.policy, s.budget.unwrap_or(MIN_BUDGET), c.n_layers)?;
                let session = CandleSession::new(
                    cpu.clone(),
                    geom,
                    1,
                    c.n_layers,
                    policy,
                    SessionConfig::default(),
                )
                .map_err(cerr)?;
                Ok(Lane { session })
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            model,
            lanes,
            pos: 0,
        })
    }

    /// KV tokens held by lane `i`, averaged over (layer, KV head).
    pub fn cached_tokens(&self, i: usize) -> f64 {
        let c = self.lanes[i].session.session().cache();
        let lens: Vec<u32> = (0..c.num_layers())
            .filter_map(|l| c.layer(l).ok())
            .flat_map(|l| l.segments().lens().to_vec())
            .collect();
        lens.iter().map(|&x| f64::from(x)).sum::<f64>() / lens.len().max(1) as f64
    }

    fn check_fits(&self, n: usize) -> Result<(), String> {
        if self.pos + n > self.model.cfg.context {
            return Err(format!(
                "{} tokens exceed the model's context of {}",
                self.pos + n,
                self.model.cfg.context
            ));
        }
        Ok(())
    }

    /// Prefills `tokens` (the same prompt in every lane) in chunks of
    /// `chunk`; returns each lane's logits after the last token.
    pub fn prefill(&mut self, tokens: &[u32], chunk: usize) -> Result<Vec<Vec<f32>>, String> {
        if self.pos != 0 || tokens.is_empty() || chunk == 0 {
            return Err("prefill runs once, at position 0, on a non-empty prompt".into());
        }
        self.check_fits(tokens.len())?;
        let (m, p) = (self.model, self.lanes.len());
        // No chunk longer than any lane's policy asks for (TokenSelect:
        // its local window), as an engine honours `prefill_block`.
        let chunk = self
            .lanes
            .iter()
            .filter_map(|l| l.session.session().policy().capabilities().prefill_block)
            .fold(chunk, usize::min)
            .max(1);
        let nchunks = tokens.len().div_ceil(chunk);
        let mut last_h = None;
        for (ci, toks) in tokens.chunks(chunk).enumerate() {
            let n = toks.len();
            let last = ci + 1 == nchunks;
            let rows = Ragged::uniform(1, n).map_err(|e| e.to_string())?;
            let ids: Vec<u32> = (0..p).flat_map(|_| toks.iter().copied()).collect();
            let pos: Vec<usize> = (0..p).flat_map(|_| self.pos..self.pos + n).collect();
            let lanes = &mut self.lanes;
            let h = m.forward(m.embed(&ids)?, &pos, |l, Qkv { q, k, v }| {
                let outs = lanes
                    .par_iter_mut()
                    .enumerate()
                    .map(|(i, lane)| {
                        let (qi, ki, vi) =
                            (rows_of(&q, i, n)?, rows_of(&k, i, n)?, rows_of(&v, i, n)?);
                        lane.session
                            .prefill_chunk_layer(l, &rows, &qi, &ki, &vi, last)
                            .map_err(cerr)
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                Tensor::cat(&outs, 0).map_err(cerr)
            })?;
            for lane in &mut self.lanes {
                lane.session.end_prefill_chunk();
            }
            self.pos += n;
            if last {
                last_h = Some((h, n));
            }
        }
        let (h, n) = last_h.ok_or("no prompt chunk")?;
        let lasts: Vec<Tensor> = (0..p)
            .map(|i| h.narrow(0, i * n + n - 1, 1).map_err(cerr))
            .collect::<Result<_, _>>()?;
        self.logits(&lasts)
    }
    /// One decode step: lane `i` feeds `tokens[i]`; returns each lane's
    /// next-token logits.
    pub fn step(&mut self, tokens: &[u32]) -> Result<Vec<Vec<f32>>, String> {
        let (m, p) = (self.model, self.lanes.len());
        if self.pos == 0 || tokens.len() != p {
            return Err(format!(
                "a decode step needs a prefilled prompt and one token per lane ({p})"
            ));
        }
        self.check_fits(1)?;
        let pos = vec![self.pos; p];
        let lanes = &mut self.lanes;
        let h = m.forward(m.embed(tokens)?, &pos, |l, Qkv { q, k, v }| {
            // Lanes are independent: run them on the rayon pool.
            let outs = lanes
                .par_iter_mut()
                .enumerate()
                .map(|(i, lane)| {
                    let (o, _) = lane
                        .session
                        .decode_layer(
                            l,
                            &rows_of(&q, i, 1)?,
                            &rows_of(&k, i, 1)?,
                            &rows_of(&v, i, 1)?,
                        )
                        .map_err(cerr)?;
                    Ok(o)
                })
                .collect::<Result<Vec<_>, String>>()?;
            Tensor::cat(&outs, 0).map_err(cerr)
        })?;
        for lane in &mut self.lanes {
            lane.session.end_decode_step();
        }
        self.pos += 1;
        let rows: Vec<Tensor> = (0..p)
            .map(|i| h.narrow(0, i, 1).map_err(cerr))
            .collect::<Result<_, _>>()?;
        self.logits(&rows)
    }

    fn logits(&self, rows: &[Tensor]) -> Result<Vec<Vec<f32>>, String> {
        let h = Tensor::cat(rows, 0).map_err(cerr)?;
        let z = self.model.logits(&h)?;
        z.to_vec2().map_err(cerr)
    }
}

/// `−log softmax(logits)[target]`, in f64.
pub fn nll(logits: &[f32], target: u32) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = f64::from(m)
        + logits
            .iter()
            .map(|&z| f64::from(z - m).exp())
            .sum::<f64>()
            .ln();
    lse - f64::from(logits[target as usize])
}
