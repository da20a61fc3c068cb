//! The integration: a GGUF Llama ([`Model`], candle-core's quantized
//! matmuls) whose attention, KV cache and KV policy are kvsieve's, through
//! [`CandleSession`] — the way an engine runs, one layer at a time. For the
//! comparison test the same model can also run with candle's own attention
//! over a plain concatenated KV cache ([`Attention::Candle`]).

use candle_core::{D, Device, Tensor};
use kvsieve::candle::{CandleSession, SessionConfig, TensorBackend};
use kvsieve::policy::KvPolicy;
use kvsieve::{HeadGeometry, Ragged};

use super::model::{Model, Qkv, cerr};

/// Who runs attention and owns the KV cache.
pub enum Attention<B: TensorBackend> {
    /// kvsieve: cache, policy and attention kernels.
    Kvsieve(CandleSession<B, f32>),
    /// candle's own attention (matmul, causal mask, softmax) over a cache of
    /// concatenated K/V tensors per layer, `[t, Hkv, D]`.
    Candle(Vec<Option<(Tensor, Tensor)>>),
}

/// A model plus its attention state for one sequence.
pub struct Engine<'m, B: TensorBackend> {
    pub model: &'m Model,
    pub attn: Attention<B>,
    /// Position of the next token.
    pub pos: usize,
}

impl<'m, B: TensorBackend> Engine<'m, B> {
    /// Attention through kvsieve with `policy` on `backend`.
    pub fn kvsieve(
        model: &'m Model,
        backend: B,
        policy: Box<dyn KvPolicy<B, f32>>,
    ) -> Result<Self, String> {
        let c = model.cfg;
        let geom =
            HeadGeometry::new(c.n_heads, c.n_kv_heads, c.head_dim()).map_err(|e| e.to_string())?;
        let s = CandleSession::new(
            backend,
            geom,
            1,
            c.n_layers,
            policy,
            SessionConfig::default(),
        )
        .map_err(cerr)?;
        Ok(Self {
            model,
            attn: Attention::Kvsieve(s),
            pos: 0,
        })
    }

    /// Attention by candle (the comparison baseline).
    pub fn candle(model: &'m Model) -> Self {
        Self {
            model,
            attn: Attention::Candle(vec![None; model.cfg.n_layers]),
            pos: 0,
        }
    }

    /// KV-cache tokens held per (layer, KV head), averaged.
    pub fn cached_tokens(&self) -> f64 {
        match &self.attn {
            Attention::Kvsieve(s) => {
                let c = s.session().cache();
                let lens: Vec<u32> = (0..c.num_layers())
                    .filter_map(|l| c.layer(l).ok())
                    .flat_map(|l| l.segments().lens().to_vec())
                    .collect();
                lens.iter().map(|&x| f64::from(x)).sum::<f64>() / lens.len().max(1) as f64
            }
            Attention::Candle(kv) => kv
                .first()
                .and_then(|x| x.as_ref())
                .map_or(0.0, |(k, _)| k.dims()[0] as f64),
        }
    }

    /// Runs `tokens` (a decode step with `decode`, else a prompt chunk, the
    /// prompt's `last` one or not) and returns the hidden states `[n, dim]`.
    fn run(&mut self, tokens: &[u32], decode: bool, last: bool) -> Result<Tensor, String> {
        let m = self.model;
        let n = tokens.len();
        if n == 0 {
            return Err("no tokens to run".into());
        }
        if self.pos + n > m.cfg.context {
            return Err(format!(
                "{} tokens do not fit the model's context of {}",
                self.pos + n,
                m.cfg.context
            ));
        }
        let pos: Vec<usize> = (self.pos..self.pos + n).collect();
        let x = m.embed(tokens)?;
        let rows = Ragged::uniform(1, n).map_err(|e| e.to_string())?;
        let h = match &mut self.attn {
            Attention::Kvsieve(s) => {
                let h = m.forward(x, &pos, |l, Qkv { q, k, v }| {
                    if decode {
                        Ok(s.decode_layer(l, &q, &k, &v).map_err(cerr)?.0)
                    } else {
                        s.prefill_chunk_layer(l, &rows, &q, &k, &v, last)
                            .map_err(cerr)
                    }
                })?;
                if decode {
                    s.end_decode_step();
                } else {
                    s.end_prefill_chunk();
                }
                h
            }
            Attention::Candle(kv) => m.forward(x, &pos, |l, Qkv { q, k, v }| {
                let (k, v) = match kv[l].take() {
                    None => (k, v),
                    Some((k0, v0)) => (
                        Tensor::cat(&[&k0, &k], 0).map_err(cerr)?,
                        Tensor::cat(&[&v0, &v], 0).map_err(cerr)?,
                    ),
                };
                let out = candle_attention(&q, &k, &v).map_err(cerr)?;
                kv[l] = Some((k, v));
                Ok(out)
            })?,
        };
        self.pos += n;
        Ok(h)
    }

    /// Prefills `tokens` — in one chunk, or in chunks of the policy's
    /// `prefill_block` when it asks for them (TokenSelect) — and returns the
    /// logits of every position (`all`) or of the last one: `[rows, vocab]`.
    pub fn prefill(&mut self, tokens: &[u32], all: bool) -> Result<Tensor, String> {
        if self.pos != 0 || tokens.is_empty() {
            return Err("prefill runs once, at position 0, on a non-empty prompt".into());
        }
        let block = match &self.attn {
            Attention::Kvsieve(s) => s.session().policy().capabilities().prefill_block,
            Attention::Candle(_) => None,
        };
        let chunk = block.unwrap_or(tokens.len()).max(1);
        let nchunks = tokens.len().div_ceil(chunk);
        let hs = tokens
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| self.run(c, false, i + 1 == nchunks))
            .collect::<Result<Vec<_>, _>>()?;
        let h = Tensor::cat(&hs, 0).map_err(cerr)?;
        let h = if all {
            h
        } else {
            h.narrow(0, tokens.len() - 1, 1).map_err(cerr)?
        };
        self.model.logits(&h)
    }

    /// One decode step; returns the next-token logits `[vocab]`.
    pub fn step(&mut self, token: u32) -> Result<Vec<f32>, String> {
        if self.pos == 0 {
            return Err("decode needs a prefilled prompt".into());
        }
        let h = self.run(&[token], true, false)?;
        self.model
            .logits(&h)
            .and_then(|t| t.flatten_all().and_then(|t| t.to_vec1()).map_err(cerr))
    }
}

/// Causal softmax attention by candle: `q` `[n, Hq, D]` (the last `n` of the
/// `t` cached positions), `k`, `v` `[t, Hkv, D]`; returns `[n, Hq, D]`.
pub fn candle_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let (n, hq, d) = q.dims3()?;
    let (t, hkv, _) = k.dims3()?;
    let g = hq / hkv;
    // Query heads h = kv * g + j share KV head kv: [Hkv, n·g, D].
    let qg = q
        .reshape((n, hkv, g, d))?
        .permute((1, 0, 2, 3))?
        .contiguous()?
        .reshape((hkv, n * g, d))?;
    let kt = k.permute((1, 2, 0))?.contiguous()?; // [Hkv, D, t]
    let s = (qg.matmul(&kt)? / (d as f64).sqrt())?.reshape((hkv, n, g, t))?;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j > t - n + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    let s = s.broadcast_add(&Tensor::from_vec(mask, (n, 1, t), &Device::Cpu)?)?;
    let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
    let p = e
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .reshape((hkv, n * g, t))?;
    let vh = v.permute((1, 0, 2))?.contiguous()?; // [Hkv, t, D]
    p.matmul(&vh)?
        .reshape((hkv, n, g, d))?
        .permute((1, 0, 2, 3))?
        .contiguous()?
        .reshape((n, hq, d))
}

/// Index of the largest logit (the first on ties).
pub fn argmax(logits: &[f32]) -> u32 {
    (0..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best }) as u32
}

/// Policy `name` at `budget` for a model of `num_layers` layers:
/// `kvsieve::eval::policies::make_policy_for` (TidalDecode with the paper's
/// layer roles: dense layers 0–1, selection at layer 2), plus, for deep
/// models (more than 14 layers), TidalDecode's re-selection at layer 13 as
/// the paper configures it for Llama-3-8B; on SmolLM2's 30 layers reusing
/// layer 2's selection all the way up costs perplexity the re-selection
/// recovers. The one policy helper of `gguf_llama` and `eval --model`.
pub fn policy<B: TensorBackend + 'static>(
    name: &str,
    budget: usize,
    num_layers: usize,
) -> Result<Box<dyn KvPolicy<B, f32>>, String> {
    use kvsieve::eval::policies::make_policy_for;
    use kvsieve::policy::{TidalDecode, TidalDecodeConfig};
    // Budgets and names follow make_policy_for's rules.
    let p = make_policy_for::<B, f32>(name, budget, num_layers).map_err(|e| e.to_string())?;
    if name != "tidal_decode" || num_layers <= 14 {
        return Ok(p);
    }
    let cfg = TidalDecodeConfig {
        k: budget,
        sparse_layer_start: 2,
        reselect_layers: vec![13],
        ..TidalDecodeConfig::default()
    };
    Ok(Box::new(
        TidalDecode::for_layers(cfg, num_layers).map_err(|e| e.to_string())?,
    ))
}
