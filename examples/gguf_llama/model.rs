//! A Llama-architecture model from a GGUF file on candle-core: quantized
//! weights and matmuls (`candle_core::quantized`: `gguf_file`, `QMatMul`),
//! RMSNorm, RoPE, SwiGLU. Attention is not here: [`Model::forward`] hands
//! each layer's q, k, v to the caller (kvsieve, or candle's own attention in
//! the comparison test) and continues with the output it gets back.

use std::fs::File;
use std::path::Path;

use candle_core::quantized::{QMatMul, QTensor, gguf_file};
use candle_core::{DType, Device, Module, Tensor};
use kvsieve::candle::with_host_vec;

/// Hyper-parameters from the GGUF metadata (`llama.*`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    pub context: usize,
    pub rope_theta: f32,
    pub rms_eps: f64,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
}

struct Layer {
    attn_norm: Tensor,
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    ffn_norm: Tensor,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
}

/// How the GGUF's quantized matrices are multiplied (all through candle's
/// [`QMatMul`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// Dequantized to f32 at load (`QMatMul::Tensor`): f32 activations.
    F32,
    /// Dequantized to f16 at load (`QMatMul::TensorF16`): half the memory,
    /// activations rounded to f16 for each matmul.
    F16,
    /// As stored (`QMatMul::QTensor`): llama.cpp's arithmetic, activations
    /// quantized to 8 bits per 32-element block for every matmul.
    Quantized,
}

impl Weights {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "quantized" => Ok(Self::Quantized),
            other => Err(format!("unknown weights `{other}` (f32, f16, quantized)")),
        }
    }

    fn matmul(self, q: QTensor) -> candle_core::Result<QMatMul> {
        let dev = Device::Cpu;
        Ok(match self {
            Self::F32 => QMatMul::Tensor(q.dequantize(&dev)?),
            Self::F16 => QMatMul::TensorF16(q.dequantize_f16(&dev)?),
            Self::Quantized => QMatMul::from_qtensor(q)?,
        })
    }
}

/// The weights, on the CPU.
pub struct Model {
    pub cfg: Config,
    /// Dequantized token embeddings `[vocab, dim]` (lookups).
    embedding: Tensor,
    layers: Vec<Layer>,
    out_norm: Tensor,
    /// The classifier (the token embedding when the file ties them).
    output: QMatMul,
    /// RoPE tables `[context, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// One layer's projections handed to the attention callback: `q`
/// `[n, Hq, D]`, `k`, `v` `[n, Hkv, D]` (RoPE applied), all contiguous.
pub struct Qkv {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
}

fn meta<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value, String> {
    ct.metadata
        .get(key)
        .ok_or_else(|| format!("GGUF metadata has no `{key}`"))
}

fn meta_usize(ct: &gguf_file::Content, key: &str) -> Result<usize, String> {
    let v = meta(ct, key)?;
    let n = v
        .to_u64()
        .or_else(|_| v.to_u32().map(u64::from))
        .or_else(|_| v.to_i32().map(|x| x.max(0) as u64))
        .map_err(|e| format!("`{key}`: {e}"))?;
    usize::try_from(n)
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("`{key}` = {n} must be positive"))
}

fn meta_f32(ct: &gguf_file::Content, key: &str, default: f32) -> Result<f32, String> {
    match ct.metadata.get(key) {
        None => Ok(default),
        Some(v) => v.to_f32().map_err(|e| format!("`{key}`: {e}")),
    }
}

/// `candle_core::Error` → `String` for the example's error type.
pub fn cerr(e: candle_core::Error) -> String {
    e.to_string()
}

impl Model {
    /// Loads a Llama-architecture GGUF file; its matrices become
    /// [`QMatMul`]s as `weights` says.
    pub fn load(path: &Path, weights: Weights) -> Result<(Self, gguf_file::Content), String> {
        let at = |e: String| format!("{}: {e}", path.display());
        let mut file = File::open(path).map_err(|e| at(e.to_string()))?;
        let ct = gguf_file::Content::read(&mut file).map_err(|e| at(e.to_string()))?;
        let model = Self::from_content(&ct, &mut file, weights).map_err(at)?;
        Ok((model, ct))
    }

    fn from_content(
        ct: &gguf_file::Content,
        file: &mut File,
        weights: Weights,
    ) -> Result<Self, String> {
        let arch = meta(ct, "general.architecture")?
            .to_string()
            .map_err(cerr)?
            .clone();
        if arch != "llama" {
            return Err(format!(
                "architecture `{arch}`: this runner reads Llama-architecture files only"
            ));
        }
        let dev = Device::Cpu;
        let mut tensor = |name: &str| -> Result<QTensor, String> {
            ct.tensor(file, name, &dev)
                .map_err(|e| format!("tensor `{name}`: {e}"))
        };
        let embd = tensor("token_embd.weight")?;
        let (vocab_size, emb_dim) = embd.shape().dims2().map_err(cerr)?;
        let cfg = Config {
            dim: meta_usize(ct, "llama.embedding_length")?,
            hidden_dim: meta_usize(ct, "llama.feed_forward_length")?,
            n_layers: meta_usize(ct, "llama.block_count")?,
            n_heads: meta_usize(ct, "llama.attention.head_count")?,
            n_kv_heads: meta_usize(ct, "llama.attention.head_count_kv")?,
            vocab_size,
            context: meta_usize(ct, "llama.context_length")?,
            rope_theta: meta_f32(ct, "llama.rope.freq_base", 10_000.0)?,
            rms_eps: f64::from(meta_f32(
                ct,
                "llama.attention.layer_norm_rms_epsilon",
                1e-5,
            )?),
        };
        if emb_dim != cfg.dim
            || !cfg.dim.is_multiple_of(cfg.n_heads)
            || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads)
            || !cfg.head_dim().is_multiple_of(2)
        {
            return Err(format!("inconsistent hyper-parameters {cfg:?}"));
        }
        if let Ok(rope_dims) = meta_usize(ct, "llama.rope.dimension_count")
            && rope_dims != cfg.head_dim()
        {
            return Err(format!(
                "partial RoPE ({rope_dims} of {} dims) is not supported",
                cfg.head_dim()
            ));
        }
        let f32_of = |q: QTensor| q.dequantize(&dev).map_err(cerr);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in 0..cfg.n_layers {
            let mut qm = |name: &str| -> Result<QMatMul, String> {
                weights
                    .matmul(tensor(&format!("blk.{l}.{name}.weight"))?)
                    .map_err(cerr)
            };
            layers.push(Layer {
                wq: qm("attn_q")?,
                wk: qm("attn_k")?,
                wv: qm("attn_v")?,
                wo: qm("attn_output")?,
                w_gate: qm("ffn_gate")?,
                w_up: qm("ffn_up")?,
                w_down: qm("ffn_down")?,
                attn_norm: f32_of(tensor(&format!("blk.{l}.attn_norm.weight"))?)?,
                ffn_norm: f32_of(tensor(&format!("blk.{l}.ffn_norm.weight"))?)?,
            });
        }
        let out_norm = f32_of(tensor("output_norm.weight")?)?;
        let embedding = embd.dequantize(&dev).map_err(cerr)?;
        let output = if ct.tensor_infos.contains_key("output.weight") {
            weights.matmul(tensor("output.weight")?).map_err(cerr)?
        } else if weights == Weights::F32 {
            QMatMul::Tensor(embedding.clone()) // tied: share the dequantized table
        } else {
            weights.matmul(embd).map_err(cerr)?
        };
        // RoPE as ggml's "normal" mode (GGUF Llama q/k weights are permuted
        // for it): pairs (2i, 2i+1) rotate by pos · θ^(−2i/D).
        let half = cfg.head_dim() / 2;
        let (mut cos, mut sin) = (
            Vec::with_capacity(cfg.context * half),
            Vec::with_capacity(cfg.context * half),
        );
        for p in 0..cfg.context {
            for i in 0..half {
                let freq = 1.0 / f64::from(cfg.rope_theta).powf(2.0 * i as f64 / (2 * half) as f64);
                let (s, c) = (p as f64 * freq).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Ok(Self {
            cfg,
            embedding,
            layers,
            out_norm,
            output,
            cos,
            sin,
        })
    }

    /// Embeddings of `tokens`: `[n, dim]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor, String> {
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(format!(
                "token {t} is outside the vocabulary of {}",
                self.cfg.vocab_size
            ));
        }
        let ids = Tensor::new(tokens, &Device::Cpu).map_err(cerr)?;
        self.embedding.index_select(&ids, 0).map_err(cerr)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let ms = x.sqr()?.mean_keepdim(1)?;
        x.broadcast_div(&(ms + self.cfg.rms_eps)?.sqrt()?)?
            .broadcast_mul(w)
    }

    /// RoPE of a projection `[n, H·D]` for positions `pos[i]`, as `[n, H, D]`
    /// (reads the projection's storage in place, writes a new tensor).
    fn rope(&self, x: &Tensor, heads: usize, pos: &[usize]) -> Result<Tensor, String> {
        let (d, half) = (self.cfg.head_dim(), self.cfg.head_dim() / 2);
        let n = pos.len();
        if let Some(p) = pos.iter().find(|&&p| p >= self.cfg.context) {
            return Err(format!(
                "position {p} is past the model's context of {}",
                self.cfg.context
            ));
        }
        let out = with_host_vec(x, |src: &Vec<f32>| {
            let mut out = vec![0f32; src.len()];
            for (i, &p) in pos.iter().enumerate() {
                let (c, s) = (
                    &self.cos[p * half..(p + 1) * half],
                    &self.sin[p * half..(p + 1) * half],
                );
                for h in 0..heads {
                    let at = (i * heads + h) * d;
                    for j in 0..half {
                        let (a, b) = (src[at + 2 * j], src[at + 2 * j + 1]);
                        out[at + 2 * j] = a * c[j] - b * s[j];
                        out[at + 2 * j + 1] = a * s[j] + b * c[j];
                    }
                }
            }
            out
        })
        .map_err(cerr)?;
        Tensor::from_vec(out, (n, heads, d), &Device::Cpu).map_err(cerr)
    }

    /// Runs `x` (`[n, dim]`, row `i` at position `pos[i]`) through every
    /// layer. `attend(layer, qkv)` returns the attention output `[n, Hq, D]`
    /// (or `[n, Hq·D]`). Returns the final hidden states `[n, dim]`.
    pub fn forward(
        &self,
        mut x: Tensor,
        pos: &[usize],
        mut attend: impl FnMut(usize, Qkv) -> Result<Tensor, String>,
    ) -> Result<Tensor, String> {
        let (hq, hkv) = (self.cfg.n_heads, self.cfg.n_kv_heads);
        let n = pos.len();
        for (l, w) in self.layers.iter().enumerate() {
            let h = self.rms_norm(&x, &w.attn_norm).map_err(cerr)?;
            let q = self.rope(&w.wq.forward(&h).map_err(cerr)?, hq, pos)?;
            let k = self.rope(&w.wk.forward(&h).map_err(cerr)?, hkv, pos)?;
            let v =
                w.wv.forward(&h)
                    .and_then(|v| v.reshape((n, hkv, self.cfg.head_dim())))
                    .map_err(cerr)?;
            let att = attend(l, Qkv { q, k, v })?;
            let step = || -> candle_core::Result<Tensor> {
                let att = att.reshape((n, self.cfg.dim))?;
                let x = (&x + w.wo.forward(&att)?)?;
                let h = self.rms_norm(&x, &w.ffn_norm)?;
                let g = w.w_gate.forward(&h)?.silu()?;
                let u = w.w_up.forward(&h)?;
                &x + w.w_down.forward(&(g * u)?)?
            };
            x = step().map_err(cerr)?;
        }
        Ok(x)
    }

    /// Vocabulary logits of hidden states `[n, dim]`: `[n, vocab]`.
    pub fn logits(&self, x: &Tensor) -> Result<Tensor, String> {
        let h = self.rms_norm(x, &self.out_norm).map_err(cerr)?;
        self.output
            .forward(&h)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(cerr)
    }
}
