//! Workloads for evaluating policies: seeded synthetic decode traces with
//! the structure real attention has (and the papers exploit), and loaders
//! for Q/K/V captured from a real model ([`io`]).
//!
//! A [`Trace`] holds, for every layer, the queries, keys and values of a
//! prompt of `prompt_len` tokens followed by `decode_steps` generated
//! tokens, in the layout of `docs/layouts.md` ("Traces"):
//! `q` is `[T, Hq, D]`, `k` and `v` are `[T, Hkv, D]` with
//! `T = prompt_len + decode_steps`.
//!
//! # The structural knobs of [`TraceConfig`]
//!
//! | knob | models | paper observation |
//! |---|---|---|
//! | `sinks`, `sink_strength` | the first tokens draw attention from every query | StreamingLLM: attention sinks |
//! | `recency`, `recency_decay` | nearby tokens are more similar (a slowly drifting positional component) | RoPE decay; SnapKV / EMS local scores |
//! | `heavy_hitters`, `heavy_strength` | a few mid-context tokens attended by most queries | H2O heavy hitters |
//! | `needles`, `needle_strength` | planted tokens whose keys match the query of one later decode step | needle-in-a-haystack; TokenSelect / TidalDecode retrieval |
//! | `topics`, `topic_shift_every`, `topic_strength` | the prompt is a sequence of topic segments; decoding moves between topics | MorphKV: long responses revisit earlier context; TokenSelect selection-cache hit rates |
//! | `group_correlation` | query heads of one GQA group share a direction | GQA groups attend alike (MorphKV / kvpress group reductions) |
//! | `layer_variation` | strengths vary per layer; layer 0 is flatter | TidalDecode: dense early layers; DAM: heterogeneity across layers |
#![forbid(unsafe_code)]

pub mod io;
pub mod policies;

use crate::error::{Result, Size, config, try_vec};

/// SplitMix64 with Box–Muller normals: small, seeded, reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x6A09_E667_F3BC_C909)
    }
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
    /// Standard normal as `f32`.
    pub fn normal_f32(&mut self) -> f32 {
        self.normal() as f32
    }
    /// Uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    /// A random unit vector of dimension `d`.
    pub fn unit(&mut self, d: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..d).map(|_| self.normal_f32()).collect();
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        v.iter_mut().for_each(|x| *x /= n);
        v
    }
}

/// Shape and structure of a synthetic trace (see the module docs for what
/// each knob models). Strengths are in units of `sqrt(D)`-scaled logits:
/// a component of strength `s` shared by a query and a key adds about `s`
/// to their scaled logit.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Number of layers.
    pub layers: usize,
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Decode steps (each appends one token).
    pub decode_steps: usize,
    /// Attention sinks at the start of the prompt.
    pub sinks: usize,
    /// Logit boost of a sink.
    pub sink_strength: f32,
    /// Logit boost between a query and a token at distance 0 (decays with distance).
    pub recency: f32,
    /// Correlation kept per token of distance by the positional drift (0..1).
    pub recency_decay: f32,
    /// Heavy-hitter tokens in the prompt.
    pub heavy_hitters: usize,
    /// Logit boost of a heavy hitter.
    pub heavy_strength: f32,
    /// Planted needles (each retrieved by one decode step).
    pub needles: usize,
    /// Logit of a needle for its query.
    pub needle_strength: f32,
    /// Topic segments in the prompt.
    pub topics: usize,
    /// Decode steps between topic shifts (0 = never).
    pub topic_shift_every: usize,
    /// Logit boost between a query and tokens of its topic.
    pub topic_strength: f32,
    /// Share of a query head's direction common to its GQA group (0..1).
    pub group_correlation: f32,
    /// Relative spread of the strengths across layers (0 = identical layers).
    pub layer_variation: f32,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            seed: 7,
            layers: 4,
            q_heads: 8,
            kv_heads: 2,
            head_dim: 64,
            prompt_len: 2048,
            decode_steps: 64,
            sinks: 4,
            sink_strength: 8.0,
            recency: 5.0,
            recency_decay: 0.98,
            heavy_hitters: 8,
            heavy_strength: 5.0,
            needles: 4,
            needle_strength: 12.0,
            topics: 8,
            topic_shift_every: 16,
            topic_strength: 2.5,
            group_correlation: 0.7,
            layer_variation: 0.3,
        }
    }
}

impl TraceConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        const P: &str = "TraceConfig";
        if self.layers == 0 || self.q_heads == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(config(
                P,
                "layers, q_heads, kv_heads and head_dim must be positive",
            ));
        }
        if !self.q_heads.is_multiple_of(self.kv_heads) {
            return Err(config(
                P,
                format!(
                    "q_heads = {} is not a multiple of kv_heads = {}",
                    self.q_heads, self.kv_heads
                ),
            ));
        }
        if self.prompt_len == 0 {
            return Err(config(P, "prompt_len must be positive"));
        }
        let special = Size::new(P, "special tokens", self.sinks)
            .plus(self.heavy_hitters)
            .plus(self.needles)
            .value();
        if special > self.prompt_len as u128 {
            return Err(config(
                P,
                "sinks + heavy_hitters + needles exceed the prompt",
            ));
        }
        if self.needles > 0 && self.decode_steps == 0 {
            return Err(config(P, "needles need decode steps to retrieve them"));
        }
        if self.topics == 0 || self.topics > self.prompt_len {
            return Err(config(P, "topics must be in 1..=prompt_len"));
        }
        let unit = |x: f32| (0.0..=1.0).contains(&x);
        if !unit(self.recency_decay) || !unit(self.group_correlation) {
            return Err(config(
                P,
                "recency_decay and group_correlation must be in [0, 1]",
            ));
        }
        let strengths = [
            self.sink_strength,
            self.recency,
            self.heavy_strength,
            self.needle_strength,
            self.topic_strength,
            self.layer_variation,
        ];
        if strengths.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return Err(config(P, "strengths must be finite and non-negative"));
        }
        self.bytes().map(|_| ())
    }

    /// Bytes of the trace's tensors: `layers · (prompt_len + decode_steps) ·
    /// (Hq + 2·Hkv) · D` f32 values; [`crate::Error::TooLarge`] when that
    /// overflows or one layer's largest tensor is past
    /// [`crate::error::MAX_ALLOC_BYTES`].
    pub fn bytes(&self) -> Result<u128> {
        const P: &str = "TraceConfig";
        let tokens = Size::new(P, "tokens", self.prompt_len)
            .plus(self.decode_steps)
            .get()?;
        Size::new(P, "Q values of a layer", tokens)
            .times(self.q_heads.max(self.kv_heads))
            .times(self.head_dim)
            .elements::<f32>()?;
        let per_token = Size::new(P, "values per token", self.q_heads)
            .plus(self.kv_heads.saturating_mul(2))
            .times(self.head_dim)
            .get()?;
        Ok(Size::new(P, "trace bytes", self.layers)
            .times(tokens)
            .times(per_token)
            .times(4)
            .value())
    }
}

/// A planted needle: the token at `position` (in every KV head) has a key
/// aligned with the query of decode step `step` (all heads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needle {
    /// Token position in the prompt.
    pub position: usize,
    /// Decode step (0-based) whose query targets it.
    pub step: usize,
}

/// One layer's tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerTrace {
    /// Queries `[T, Hq, D]`.
    pub q: Vec<f32>,
    /// Keys `[T, Hkv, D]`.
    pub k: Vec<f32>,
    /// Values `[T, Hkv, D]`.
    pub v: Vec<f32>,
}

/// A prompt plus decode steps, for every layer.
#[derive(Clone, Debug, PartialEq)]
pub struct Trace {
    /// Query heads.
    pub q_heads: usize,
    /// KV heads.
    pub kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Prompt tokens.
    pub prompt_len: usize,
    /// Decode steps.
    pub decode_steps: usize,
    /// Per layer tensors.
    pub layers: Vec<LayerTrace>,
    /// Planted needles (empty for captured traces).
    pub needles: Vec<Needle>,
}

impl Trace {
    /// Total tokens `T`.
    pub fn len(&self) -> usize {
        self.prompt_len + self.decode_steps
    }
    /// True when the trace holds no token.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Generates a synthetic trace.
    pub fn synthetic(cfg: &TraceConfig) -> Result<Self> {
        const P: &str = "Trace::synthetic";
        cfg.validate()?;
        let mut rng = Rng::new(cfg.seed);
        let (hq, hkv, d) = (cfg.q_heads, cfg.kv_heads, cfg.head_dim);
        let g = hq / hkv;
        let t_total = cfg.prompt_len + cfg.decode_steps;
        let sd = (d as f32).sqrt();

        // Special positions (shared by all layers): heavy hitters and needles
        // are spread over the prompt, away from the sinks.
        let mut taken = try_vec(P, "prompt flags", cfg.prompt_len, false)?;
        taken.iter_mut().take(cfg.sinks).for_each(|t| *t = true);
        let mut pick = |rng: &mut Rng| loop {
            let p = rng.below(cfg.prompt_len);
            if !taken[p] {
                taken[p] = true;
                break p;
            }
        };
        let heavy: Vec<usize> = (0..cfg.heavy_hitters).map(|_| pick(&mut rng)).collect();
        let needles: Vec<Needle> = (0..cfg.needles)
            .map(|i| Needle {
                position: pick(&mut rng),
                // In u128: the product may pass usize for huge configs.
                step: ((i as u128 + 1) * cfg.decode_steps as u128 / (cfg.needles as u128 + 1))
                    as usize,
            })
            .collect();
        let topic_of_token = |t: usize| {
            ((t as u128 * cfg.topics as u128 / cfg.prompt_len as u128) as usize).min(cfg.topics - 1)
        };

        let mut layers = Vec::new();
        layers
            .try_reserve_exact(cfg.layers)
            .map_err(|_| config(P, format!("cannot allocate {} layers", cfg.layers)))?;
        for layer in 0..cfg.layers {
            // Layer strengths: layer 0 is flatter, the rest vary around 1.
            let lv = |rng: &mut Rng| {
                let base = if layer == 0 { 0.4 } else { 1.0 };
                (base * (1.0 + cfg.layer_variation * rng.normal_f32())).max(0.0)
            };
            let (s_sink, s_rec, s_heavy, s_topic) =
                (lv(&mut rng), lv(&mut rng), lv(&mut rng), lv(&mut rng));
            // Sizes checked by `validate` (`bytes`); allocated fallibly.
            let mut q = try_vec(P, "Q values", t_total * hq * d, 0.0f32)?;
            let mut k = try_vec(P, "K values", t_total * hkv * d, 0.0f32)?;
            let mut v = try_vec(P, "V values", t_total * hkv * d, 0.0f32)?;
            for kv in 0..hkv {
                // Directions of this KV head.
                let sink_dir = rng.unit(d);
                let heavy_dir = rng.unit(d);
                let topic_dirs: Vec<Vec<f32>> = (0..cfg.topics).map(|_| rng.unit(d)).collect();
                let needle_dirs: Vec<Vec<f32>> = needles.iter().map(|_| rng.unit(d)).collect();
                let group_dir = rng.unit(d);
                // Positional drift: pos[t] = decay·pos[t−1] + sqrt(1−decay²)·noise.
                let rho = cfg.recency_decay;
                let mut pos = rng.unit(d);
                let mut positions = Vec::with_capacity(t_total);
                for _ in 0..t_total {
                    let noise = rng.unit(d);
                    for (p, n) in pos.iter_mut().zip(&noise) {
                        *p = rho * *p + (1.0 - rho * rho).sqrt() * n;
                    }
                    positions.push(pos.clone());
                }
                let add = |dst: &mut [f32], dir: &[f32], s: f32| {
                    dst.iter_mut().zip(dir).for_each(|(x, y)| *x += s * y)
                };
                // Keys and values. A key = noise + components; a query holding a
                // unit component of the same direction scaled by sqrt(D) gets a
                // logit boost of the key's strength (at scale 1/sqrt(D)).
                for t in 0..t_total {
                    let kr = &mut k[(t * hkv + kv) * d..][..d];
                    for x in kr.iter_mut() {
                        *x = 0.35 * rng.normal_f32();
                    }
                    if t < cfg.sinks {
                        add(kr, &sink_dir, cfg.sink_strength * s_sink);
                    }
                    if heavy.contains(&t) {
                        add(kr, &heavy_dir, cfg.heavy_strength * s_heavy);
                    }
                    if t < cfg.prompt_len {
                        add(
                            kr,
                            &topic_dirs[topic_of_token(t)],
                            cfg.topic_strength * s_topic,
                        );
                    }
                    if let Some(i) = needles.iter().position(|n| n.position == t) {
                        add(kr, &needle_dirs[i], cfg.needle_strength);
                    }
                    add(kr, &positions[t], cfg.recency * s_rec);
                    for x in &mut v[(t * hkv + kv) * d..][..d] {
                        *x = rng.normal_f32();
                    }
                }
                // Queries: a group direction shared by the GQA group (plus an
                // individual one), the sink / heavy / topic / position
                // directions, and the needle direction at its step.
                let c = cfg.group_correlation;
                for h in kv * g..(kv + 1) * g {
                    let own = rng.unit(d);
                    for t in 0..t_total {
                        let qr = &mut q[(t * hq + h) * d..][..d];
                        add(qr, &group_dir, c.sqrt() * sd * 0.5);
                        add(qr, &own, (1.0 - c).sqrt() * sd * 0.5);
                        add(qr, &sink_dir, sd);
                        add(qr, &heavy_dir, sd);
                        let topic = if t < cfg.prompt_len {
                            topic_of_token(t)
                        } else {
                            let step = t - cfg.prompt_len;
                            let shift = step.checked_div(cfg.topic_shift_every).unwrap_or(0);
                            (cfg.topics - 1 + cfg.topics - shift % cfg.topics) % cfg.topics
                        };
                        add(qr, &topic_dirs[topic], sd);
                        add(qr, &positions[t], sd);
                        if let Some(i) = needles.iter().position(|n| cfg.prompt_len + n.step == t) {
                            add(qr, &needle_dirs[i], sd);
                        }
                    }
                }
            }
            layers.push(LayerTrace { q, k, v });
        }
        Ok(Self {
            q_heads: hq,
            kv_heads: hkv,
            head_dim: d,
            prompt_len: cfg.prompt_len,
            decode_steps: cfg.decode_steps,
            layers,
            needles,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logit(tr: &Trace, layer: usize, t: usize, h: usize, j: usize) -> f32 {
        let (hq, hkv, d) = (tr.q_heads, tr.kv_heads, tr.head_dim);
        let kv = h / (hq / hkv);
        let l = &tr.layers[layer];
        let q = &l.q[(t * hq + h) * d..][..d];
        let k = &l.k[(j * hkv + kv) * d..][..d];
        q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
    }

    #[test]
    fn needles_rank_near_the_top_at_their_step() {
        let cfg = TraceConfig::default();
        let tr = Trace::synthetic(&cfg).unwrap();
        assert_eq!(tr.layers[0].q.len(), tr.len() * 8 * 64);
        for n in &tr.needles {
            let t = tr.prompt_len + n.step;
            for h in 0..tr.q_heads {
                let target = logit(&tr, 1, t, h, n.position);
                let better = (0..=t).filter(|&j| logit(&tr, 1, t, h, j) > target).count();
                // Within the top 0.5 % of the context (sinks and the newest tokens compete).
                assert!(
                    better <= t / 200,
                    "needle {n:?} head {h}: {better} tokens score higher"
                );
            }
        }
    }

    #[test]
    fn sinks_outscore_the_average_token() {
        let tr = Trace::synthetic(&TraceConfig::default()).unwrap();
        let t = tr.len() - 1;
        let mean: f32 = (0..t).map(|j| logit(&tr, 1, t, 0, j)).sum::<f32>() / t as f32;
        assert!(logit(&tr, 1, t, 0, 0) > mean + 2.0);
    }

    #[test]
    fn same_seed_same_trace_and_bad_configs_fail() {
        let cfg = TraceConfig {
            prompt_len: 64,
            decode_steps: 4,
            layers: 1,
            ..Default::default()
        };
        assert_eq!(
            Trace::synthetic(&cfg).unwrap(),
            Trace::synthetic(&cfg).unwrap()
        );
        for bad in [
            TraceConfig {
                q_heads: 6,
                kv_heads: 4,
                ..cfg.clone()
            },
            TraceConfig {
                prompt_len: 0,
                ..cfg.clone()
            },
            TraceConfig {
                recency_decay: 1.5,
                ..cfg.clone()
            },
            TraceConfig {
                needles: 2,
                decode_steps: 0,
                ..cfg.clone()
            },
            TraceConfig {
                sink_strength: f32::NAN,
                ..cfg.clone()
            },
        ] {
            assert!(Trace::synthetic(&bad).is_err(), "{bad:?}");
        }
    }
}
