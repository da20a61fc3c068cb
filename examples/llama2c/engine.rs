//! The integration an engine author copies: a Llama forward pass whose
//! attention goes through a kvsieve [`Session`] — one layer at a time, the
//! way an engine runs — with any KV policy, on any backend.

use kvsieve::attention::{LayerInput, Session, SessionConfig};
use kvsieve::policy::KvPolicy;
use kvsieve::{HeadGeometry, Ops, Ragged};

use super::model::Model;

/// A policy for backend `B`.
pub type Dyn<B> = Box<dyn KvPolicy<B, f32>>;

/// A model plus a kvsieve session (one sequence) on backend `B`.
pub struct Engine<'m, B: Ops> {
    model: &'m Model,
    backend: B,
    session: Session<B, f32>,
    /// Position of the next token.
    pos: usize,
}

fn err(e: kvsieve::Error) -> String {
    e.to_string()
}

impl<'m, B: Ops + Clone> Engine<'m, B> {
    pub fn new(model: &'m Model, backend: B, policy: Dyn<B>) -> kvsieve::Result<Self> {
        let c = model.cfg;
        let geom = HeadGeometry::new(c.n_heads, c.n_kv_heads, c.head_dim())?;
        let session = Session::new(
            backend.clone(),
            geom,
            1,
            c.n_layers,
            policy,
            SessionConfig::default(),
        )?;
        Ok(Self {
            model,
            backend,
            session,
            pos: 0,
        })
    }

    /// Runs the prompt through every layer (causal prefill, then the
    /// policy's prefill hooks) and returns the logits after its last token.
    pub fn prefill(&mut self, tokens: &[usize]) -> Result<Vec<f32>, String> {
        let (m, n) = (self.model, tokens.len());
        if n == 0 || self.pos + n > m.cfg.seq_len {
            return Err(format!(
                "prompt of {n} tokens does not fit seq_len {}",
                m.cfg.seq_len
            ));
        }
        let mut xs: Vec<Vec<f32>> = tokens
            .iter()
            .map(|&t| m.embed(t))
            .collect::<Result<_, _>>()?;
        let rows = Ragged::uniform(1, n).map_err(err)?;
        for l in 0..m.cfg.n_layers {
            let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
            for (i, x) in xs.iter().enumerate() {
                let (qi, ki, vi) = m.qkv(l, x, self.pos + i);
                q.extend(qi);
                k.extend(ki);
                v.extend(vi);
            }
            let be = &self.backend;
            let (q, k, v) = (
                be.upload(&q).map_err(err)?,
                be.upload(&k).map_err(err)?,
                be.upload(&v).map_err(err)?,
            );
            let input = LayerInput {
                q: &q,
                k: &k,
                v: &v,
            };
            let att = self
                .session
                .prefill_chunk_layer(l, &rows, &input, true)
                .map_err(err)?;
            let att = self.backend.download(&att).map_err(err)?;
            let w = m.cfg.dim;
            for (i, x) in xs.iter_mut().enumerate() {
                m.finish_layer(l, x, &att[i * w..(i + 1) * w]);
            }
        }
        self.session.end_prefill_chunk();
        self.pos += n;
        Ok(m.logits(&xs[n - 1]))
    }

    /// Feeds one token (a decode step) and returns the next-token logits.
    pub fn step(&mut self, token: usize) -> Result<Vec<f32>, String> {
        let m = self.model;
        if self.pos >= m.cfg.seq_len {
            return Err(format!(
                "position {} reaches seq_len {}",
                self.pos, m.cfg.seq_len
            ));
        }
        let mut x = m.embed(token)?;
        for l in 0..m.cfg.n_layers {
            let (q, k, v) = m.qkv(l, &x, self.pos);
            let be = &self.backend;
            let (q, k, v) = (
                be.upload(&q).map_err(err)?,
                be.upload(&k).map_err(err)?,
                be.upload(&v).map_err(err)?,
            );
            let (att, _selection) = self
                .session
                .decode_layer(
                    l,
                    &LayerInput {
                        q: &q,
                        k: &k,
                        v: &v,
                    },
                )
                .map_err(err)?;
            let att = self.backend.download(&att).map_err(err)?;
            m.finish_layer(l, &mut x, &att);
        }
        self.session.end_decode_step();
        self.pos += 1;
        Ok(m.logits(&x))
    }

    /// KV bytes held by the cache.
    pub fn kv_bytes(&self) -> usize {
        self.session.cache().bytes()
    }
}

/// `−log softmax(logits)[target]`.
pub fn nll(logits: &[f32], target: usize) -> f64 {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = f64::from(m)
        + logits
            .iter()
            .map(|&z| f64::from(z - m).exp())
            .sum::<f64>()
            .ln();
    lse - f64::from(logits[target])
}

pub fn argmax(logits: &[f32]) -> usize {
    (0..logits.len()).fold(0, |best, i| if logits[i] > logits[best] { i } else { best })
}

/// Perplexity of `tokens[prompt..]` given `tokens[..prompt]` (teacher forcing).
pub fn perplexity<B: Ops + Clone>(
    model: &Model,
    backend: &B,
    policy: Dyn<B>,
    tokens: &[usize],
    prompt: usize,
) -> Result<(f64, usize), String> {
    if prompt == 0 || prompt >= tokens.len() {
        return Err(format!(
            "prompt length {prompt} must be in 1..{}",
            tokens.len()
        ));
    }
    let mut e = Engine::new(model, backend.clone(), policy).map_err(err)?;
    let mut logits = e.prefill(&tokens[..prompt])?;
    let mut total = 0.0;
    for i in prompt..tokens.len() {
        total += nll(&logits, tokens[i]);
        if i + 1 < tokens.len() {
            logits = e.step(tokens[i])?;
        }
    }
    Ok(((total / (tokens.len() - prompt) as f64).exp(), e.kv_bytes()))
}

/// Greedy continuation of `prompt` for `n` tokens.
pub fn greedy<B: Ops + Clone>(
    model: &Model,
    backend: &B,
    policy: Dyn<B>,
    prompt: &[usize],
    n: usize,
) -> Result<Vec<usize>, String> {
    let mut e = Engine::new(model, backend.clone(), policy).map_err(err)?;
    let mut logits = e.prefill(prompt)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = argmax(&logits);
        out.push(t);
        if out.len() < n {
            logits = e.step(t)?;
        }
    }
    Ok(out)
}

/// What [`generate`] produced.
pub struct Generated {
    /// The new tokens (not the prompt).
    pub tokens: Vec<usize>,
    /// Seconds spent in the prompt's prefill (including its first token).
    pub prefill_s: f64,
    /// Seconds spent in decode steps.
    pub decode_s: f64,
}

/// Greedy generation as llama2.c's `run.c` does at temperature 0: prefill
/// `prompt`, then up to `n` argmax tokens, each handed to `emit(prev, token)`
/// as soon as it is chosen. Stops early at `stop` (llama2.c: BOS, its
/// sequence delimiter) or when the next position would pass `seq_len`.
pub fn generate<B: Ops + Clone>(
    model: &Model,
    backend: &B,
    policy: Dyn<B>,
    prompt: &[usize],
    n: usize,
    stop: Option<usize>,
    mut emit: impl FnMut(usize, usize) -> Result<(), String>,
) -> Result<Generated, String> {
    let mut e = Engine::new(model, backend.clone(), policy).map_err(err)?;
    let t0 = std::time::Instant::now();
    let mut logits = e.prefill(prompt)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let mut tokens = Vec::with_capacity(n);
    let mut prev = *prompt.last().ok_or("empty prompt")?;
    while tokens.len() < n {
        let t = argmax(&logits);
        if Some(t) == stop {
            break;
        }
        emit(prev, t)?;
        tokens.push(t);
        prev = t;
        if tokens.len() == n || e.pos >= model.cfg.seq_len {
            break;
        }
        logits = e.step(t)?;
    }
    Ok(Generated {
        tokens,
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
    })
}
