//! The integration an engine author copies: a Llama forward pass whose
//! attention goes through a kvsieve [`Session`] — one layer at a time, the
//! way an engine runs — with any KV policy.

use kvsieve::attention::{LayerInput, Session, SessionConfig};
use kvsieve::policy::KvPolicy;
use kvsieve::reference::Reference;
use kvsieve::{HeadGeometry, Ragged};

use super::model::Model;

type Dyn = Box<dyn KvPolicy<Reference, f32>>;

/// A model plus a kvsieve session (one sequence).
pub struct Engine<'m> {
    model: &'m Model,
    session: Session<Reference, f32>,
    /// Position of the next token.
    pos: usize,
}

impl<'m> Engine<'m> {
    pub fn new(model: &'m Model, policy: Dyn) -> kvsieve::Result<Self> {
        let c = model.cfg;
        let geom = HeadGeometry::new(c.n_heads, c.n_kv_heads, c.head_dim())?;
        let session = Session::new(
            Reference,
            geom,
            1,
            c.n_layers,
            policy,
            SessionConfig::default(),
        )?;
        Ok(Self {
            model,
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
        let rows = Ragged::uniform(1, n).map_err(|e| e.to_string())?;
        for l in 0..m.cfg.n_layers {
            let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
            for (i, x) in xs.iter().enumerate() {
                let (qi, ki, vi) = m.qkv(l, x, self.pos + i);
                q.extend(qi);
                k.extend(ki);
                v.extend(vi);
            }
            let input = LayerInput {
                q: &q,
                k: &k,
                v: &v,
            };
            let att = self
                .session
                .prefill_chunk_layer(l, &rows, &input, true)
                .map_err(|e| e.to_string())?;
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
                .map_err(|e| e.to_string())?;
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
pub fn perplexity(
    model: &Model,
    policy: Dyn,
    tokens: &[usize],
    prompt: usize,
) -> Result<(f64, usize), String> {
    if prompt == 0 || prompt >= tokens.len() {
        return Err(format!(
            "prompt length {prompt} must be in 1..{}",
            tokens.len()
        ));
    }
    let mut e = Engine::new(model, policy).map_err(|e| e.to_string())?;
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
pub fn greedy(
    model: &Model,
    policy: Dyn,
    prompt: &[usize],
    n: usize,
) -> Result<Vec<usize>, String> {
    let mut e = Engine::new(model, policy).map_err(|e| e.to_string())?;
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
