//! A minimal Llama forward pass over llama2.c checkpoints (export versions
//! 0 and 1, f32): RMSNorm, RoPE, GQA projections, SwiGLU. Attention itself
//! is left to the caller (kvsieve), which receives each layer's q, k, v and
//! returns the attention output.

use std::path::Path;

/// Model hyper-parameters from the checkpoint header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub seq_len: usize,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim()
    }
}

/// All weights, f32, row-major `[out, in]` matrices.
pub struct Model {
    pub cfg: Config,
    emb: Vec<f32>,
    att_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    final_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
    w3: Vec<f32>,
    /// `None` when the classifier shares the embedding.
    wcls: Option<Vec<f32>>,
}

/// Reads f32 values off a byte cursor.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<Vec<f32>, String> {
        let end = n
            .checked_mul(4)
            .and_then(|b| b.checked_add(self.at))
            .ok_or("size overflow")?;
        let chunk = self.bytes.get(self.at..end).ok_or_else(|| {
            format!(
                "checkpoint truncated while reading {what} ({n} floats at byte {})",
                self.at
            )
        })?;
        self.at = end;
        Ok(chunk
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

fn i32_at(b: &[u8], i: usize) -> Result<i32, String> {
    b.get(i..i + 4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .ok_or_else(|| "checkpoint header truncated".to_string())
}

const MAGIC: u32 = 0x616b_3432; // "ak42"

impl Model {
    /// Loads a llama2.c checkpoint (version 0 legacy or version 1).
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let magic = i32_at(bytes, 0)? as u32;
        let (version, hdr_at, body_at) = if magic == MAGIC {
            (i32_at(bytes, 4)?, 8, 256)
        } else {
            (0, 0, 28)
        };
        if version != 0 && version != 1 {
            return Err(format!(
                "unsupported llama2.c export version {version} (0 and 1 are f32)"
            ));
        }
        let h: Vec<i32> = (0..7)
            .map(|i| i32_at(bytes, hdr_at + 4 * i))
            .collect::<Result<_, _>>()?;
        let (shared, vocab) = if version == 0 {
            (h[5] > 0, h[5].unsigned_abs() as usize)
        } else {
            (
                *bytes.get(hdr_at + 28).ok_or("header truncated")? == 1,
                h[5].max(0) as usize,
            )
        };
        let pos = |x: i32, name: &str| {
            usize::try_from(x)
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| format!("header: {name} = {x} must be positive"))
        };
        let cfg = Config {
            dim: pos(h[0], "dim")?,
            hidden_dim: pos(h[1], "hidden_dim")?,
            n_layers: pos(h[2], "n_layers")?,
            n_heads: pos(h[3], "n_heads")?,
            n_kv_heads: pos(h[4], "n_kv_heads")?,
            vocab_size: pos(vocab as i32, "vocab_size")?,
            seq_len: pos(h[6], "seq_len")?,
        };
        if !cfg.dim.is_multiple_of(cfg.n_heads)
            || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads)
            || !cfg.head_dim().is_multiple_of(2)
        {
            return Err(format!("inconsistent header {cfg:?}"));
        }
        let (d, hd, l, kv) = (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.kv_dim());
        let mut r = Reader { bytes, at: body_at };
        let m = if version == 0 {
            let emb = r.take(cfg.vocab_size * d, "token embeddings")?;
            let att_norm = r.take(l * d, "attention norms")?;
            let wq = r.take(l * d * d, "wq")?;
            let wk = r.take(l * kv * d, "wk")?;
            let wv = r.take(l * kv * d, "wv")?;
            let wo = r.take(l * d * d, "wo")?;
            let ffn_norm = r.take(l * d, "ffn norms")?;
            let w1 = r.take(l * hd * d, "w1")?;
            let w2 = r.take(l * d * hd, "w2")?;
            let w3 = r.take(l * hd * d, "w3")?;
            let final_norm = r.take(d, "final norm")?;
            r.take(cfg.seq_len * cfg.head_dim(), "freqs (unused)")?;
            let wcls = if shared {
                None
            } else {
                Some(r.take(cfg.vocab_size * d, "classifier")?)
            };
            Model {
                cfg,
                emb,
                att_norm,
                ffn_norm,
                final_norm,
                wq,
                wk,
                wv,
                wo,
                w1,
                w2,
                w3,
                wcls,
            }
        } else {
            let att_norm = r.take(l * d, "attention norms")?;
            let ffn_norm = r.take(l * d, "ffn norms")?;
            let final_norm = r.take(d, "final norm")?;
            let emb = r.take(cfg.vocab_size * d, "token embeddings")?;
            let wq = r.take(l * d * d, "wq")?;
            let wk = r.take(l * kv * d, "wk")?;
            let wv = r.take(l * kv * d, "wv")?;
            let wo = r.take(l * d * d, "wo")?;
            let w1 = r.take(l * hd * d, "w1")?;
            let w2 = r.take(l * d * hd, "w2")?;
            let w3 = r.take(l * hd * d, "w3")?;
            let wcls = if shared {
                None
            } else {
                Some(r.take(cfg.vocab_size * d, "classifier")?)
            };
            Model {
                cfg,
                emb,
                att_norm,
                ffn_norm,
                final_norm,
                wq,
                wk,
                wv,
                wo,
                w1,
                w2,
                w3,
                wcls,
            }
        };
        Ok(m)
    }

    /// The residual stream of a token.
    pub fn embed(&self, token: usize) -> Result<Vec<f32>, String> {
        let d = self.cfg.dim;
        self.emb
            .get(token * d..(token + 1) * d)
            .map(<[f32]>::to_vec)
            .ok_or_else(|| {
                format!(
                    "token {token} is outside the vocabulary of {}",
                    self.cfg.vocab_size
                )
            })
    }

    /// `q [Hq·D]`, `k [Hkv·D]`, `v [Hkv·D]` of layer `l` at position `pos` (RoPE applied).
    pub fn qkv(&self, l: usize, x: &[f32], pos: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (d, kv) = (self.cfg.dim, self.cfg.kv_dim());
        let xb = rmsnorm(x, &self.att_norm[l * d..(l + 1) * d]);
        let mut q = matvec(&self.wq[l * d * d..(l + 1) * d * d], &xb);
        let mut k = matvec(&self.wk[l * kv * d..(l + 1) * kv * d], &xb);
        let v = matvec(&self.wv[l * kv * d..(l + 1) * kv * d], &xb);
        rope(&mut q, self.cfg.head_dim(), pos);
        rope(&mut k, self.cfg.head_dim(), pos);
        (q, k, v)
    }

    /// Adds the attention output (`att [Hq·D]`) and the SwiGLU block of layer `l` to `x`.
    pub fn finish_layer(&self, l: usize, x: &mut [f32], att: &[f32]) {
        let (d, hd) = (self.cfg.dim, self.cfg.hidden_dim);
        let o = matvec(&self.wo[l * d * d..(l + 1) * d * d], att);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let xb = rmsnorm(x, &self.ffn_norm[l * d..(l + 1) * d]);
        let h1 = matvec(&self.w1[l * hd * d..(l + 1) * hd * d], &xb);
        let h3 = matvec(&self.w3[l * hd * d..(l + 1) * hd * d], &xb);
        let h: Vec<f32> = h1
            .iter()
            .zip(&h3)
            .map(|(a, b)| a / (1.0 + (-a).exp()) * b)
            .collect();
        let o = matvec(&self.w2[l * d * hd..(l + 1) * d * hd], &h);
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
    }

    /// Vocabulary logits of the final residual stream.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let xb = rmsnorm(x, &self.final_norm);
        matvec(self.wcls.as_deref().unwrap_or(&self.emb), &xb)
    }
}

fn rmsnorm(x: &[f32], w: &[f32]) -> Vec<f32> {
    let ss = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + 1e-5;
    let s = 1.0 / ss.sqrt();
    x.iter().zip(w).map(|(a, b)| a * s * b).collect()
}

fn matvec(w: &[f32], x: &[f32]) -> Vec<f32> {
    w.chunks_exact(x.len())
        .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect()
}

/// llama2.c RoPE: rotate pairs `(2i, 2i+1)` of every head by `pos / 10000^(2i / head_dim)`.
pub fn rope(x: &mut [f32], head_dim: usize, pos: usize) {
    for head in x.chunks_exact_mut(head_dim) {
        for i in (0..head_dim).step_by(2) {
            let freq = 1.0 / 10000f32.powf(i as f32 / head_dim as f32);
            let (s, c) = (pos as f32 * freq).sin_cos();
            let (a, b) = (head[i], head[i + 1]);
            head[i] = a * c - b * s;
            head[i + 1] = a * s + b * c;
        }
    }
}

/// Writes a random checkpoint (for tests and demos): `version` 0 or 1.
/// The same `seed` gives the same weights in either version.
pub fn write_random_checkpoint(
    path: &Path,
    cfg: &Config,
    version: u32,
    shared: bool,
    seed: u64,
) -> std::io::Result<()> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    };
    let (d, hd, l, kv, v) = (
        cfg.dim,
        cfg.hidden_dim,
        cfg.n_layers,
        cfg.kv_dim(),
        cfg.vocab_size,
    );
    let mut rand = |n: usize, fan_in: usize| -> Vec<f32> {
        let s = 1.0 / (fan_in as f32).sqrt();
        (0..n).map(|_| s * next()).collect()
    };
    let emb = rand(v * d, d);
    let (wq, wk, wv, wo) = (
        rand(l * d * d, d),
        rand(l * kv * d, d),
        rand(l * kv * d, d),
        rand(l * d * d, d),
    );
    let (w1, w2, w3) = (
        rand(l * hd * d, d),
        rand(l * d * hd, hd),
        rand(l * hd * d, d),
    );
    let wcls = rand(v * d, d);
    let ones = |n: usize| vec![1.0f32; n];
    let mut out = Vec::new();
    let put = |out: &mut Vec<u8>, x: &[f32]| out.extend(x.iter().flat_map(|f| f.to_le_bytes()));
    let header = |out: &mut Vec<u8>, vocab: i32| {
        for x in [
            d as i32,
            hd as i32,
            l as i32,
            cfg.n_heads as i32,
            cfg.n_kv_heads as i32,
            vocab,
            cfg.seq_len as i32,
        ] {
            out.extend(x.to_le_bytes());
        }
    };
    if version == 0 {
        header(&mut out, if shared { v as i32 } else { -(v as i32) });
        for x in [
            &emb,
            &ones(l * d),
            &wq,
            &wk,
            &wv,
            &wo,
            &ones(l * d),
            &w1,
            &w2,
            &w3,
            &ones(d),
        ] {
            put(&mut out, x);
        }
        put(&mut out, &vec![0.0; cfg.seq_len * cfg.head_dim()]); // freqs, unused
    } else {
        out.extend(MAGIC.to_le_bytes());
        out.extend(1i32.to_le_bytes());
        header(&mut out, v as i32);
        out.push(u8::from(shared));
        out.resize(256, 0);
        for x in [
            &ones(l * d),
            &ones(l * d),
            &ones(d),
            &emb,
            &wq,
            &wk,
            &wv,
            &wo,
            &w1,
            &w2,
            &w3,
        ] {
            put(&mut out, x);
        }
    }
    if !shared {
        put(&mut out, &wcls);
    }
    std::fs::write(path, out)
}
