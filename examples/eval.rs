//! The main job: quality, memory and speed of every KV policy (and entmax
//! attention) over a budget sweep, on a synthetic long-context trace or on
//! Q/K/V captured from a real model.
//!
//! ```sh
//! cargo run --release --example eval                       # defaults (< 2 min on 2 cores)
//! cargo run --release --example eval -- --help             # flags
//! cargo run --release --example eval -- --trace my.safetensors --budgets 128,512
//! ```
//!
//! Per policy and budget it reports: relative L2 error of the attention
//! output against full attention (mean and p95 over decode steps, layers
//! and query heads), the full-softmax attention mass on the tokens the
//! policy attended, needle recall (synthetic traces), KV bytes kept and
//! allocated, time per decode step (the whole driver step: append, policy
//! hooks, attention with evidence, plan applied) against the attention
//! alone over the same cache, and the KV bytes read per second. Writes
//! `results.csv`, `results.json` and `error_vs_budget.svg` to `--out`
//! (default `out/eval`).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use kvsieve::attention::{LayerInput, Session, SessionConfig};
use kvsieve::eval::io::load;
use kvsieve::eval::policies::{MIN_BUDGET, POLICIES, make_policy, make_policy_for};
use kvsieve::eval::{Trace, TraceConfig};
use kvsieve::ops::{self, QkParams};
use kvsieve::policy::{Dam, DamConfig, KvPolicy};
use kvsieve::reference::Reference;
use kvsieve::{HeadGeometry, IndexList, Normalizer, Ops, Ragged, Restrict, Scope, Segments};
use serde::Serialize;

#[path = "eval_common/plot.rs"]
mod plot;

/// Flags of the synthetic / captured-trace run (`eval --model FILE.gguf`
/// has its own, see `examples/eval_real/cli.rs`).
#[derive(Parser, Debug)]
#[command(
    name = "eval",
    about = "Quality, memory and speed of every KV policy (and entmax attention) over a budget \
             sweep, on a synthetic long-context trace or a captured one.",
    after_help = COLUMNS_HELP
)]
struct Cli {
    /// cpu (SIMD + rayon) or reference (the f64 specification)
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "reference"])]
    backend: String,
    /// Policies to run, comma-separated (default: all, then dam, calibrated
    /// on the prompt's first 128 tokens)
    #[arg(long, value_name = "A,B,..", value_delimiter = ',', value_parser = parse_policy)]
    policies: Vec<String>,
    /// Per-head token budgets, comma-separated
    #[arg(long, value_name = "N,N,..", value_delimiter = ',', default_value = "64,128,256",
          value_parser = parse_budget)]
    budgets: Vec<usize>,
    /// Synthetic prompt length in tokens
    #[arg(long = "prompt-len", value_name = "N", default_value_t = 1024)]
    prompt_len: usize,
    /// Synthetic decode steps
    #[arg(long, value_name = "N", default_value_t = 32)]
    steps: usize,
    /// Synthetic layers (TidalDecode uses the paper's layer roles — dense
    /// 0-1, selection 2 — from 3 layers on)
    #[arg(long, value_name = "N", default_value_t = 4)]
    layers: usize,
    /// Synthetic trace seed
    #[arg(long, value_name = "N", default_value_t = 7)]
    seed: u64,
    /// Load a captured trace (.safetensors file or npy directory) instead
    #[arg(long, value_name = "PATH")]
    trace: Option<PathBuf>,
    /// Skip the entmax attention rows
    #[arg(long = "no-entmax")]
    no_entmax: bool,
    /// Output directory
    #[arg(long, value_name = "DIR", default_value = "out/eval")]
    out: PathBuf,
    /// No progress bar
    #[arg(long)]
    quiet: bool,
    /// Evaluate a real GGUF model instead: perplexity and passkey per policy
    /// (feature candle; `eval --model FILE.gguf --help` lists its flags)
    #[arg(long, value_name = "FILE.gguf")]
    model: Option<PathBuf>,
}

fn parse_policy(s: &str) -> Result<String, String> {
    let s = s.trim();
    if POLICIES.contains(&s) || s == "dam" {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown policy `{s}` (known: {}, dam)",
            POLICIES.join(", ")
        ))
    }
}

/// A budget of at least [`MIN_BUDGET`] tokens.
fn parse_budget(s: &str) -> Result<usize, String> {
    let b: usize = s.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    if b < MIN_BUDGET {
        return Err(format!("{b} is below the smallest budget, {MIN_BUDGET}"));
    }
    Ok(b)
}

struct Args {
    backend: String,
    policies: Vec<String>,
    budgets: Vec<usize>,
    trace_cfg: TraceConfig,
    trace: Option<PathBuf>,
    entmax: bool,
    out: PathBuf,
    quiet: bool,
}

/// Parses the command line; `--help` prints and exits 0, errors become a
/// one-line `eval: ...` message (exit 2, as every other error).
fn parse_args() -> Result<Args, String> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help (and --version): clap's text on stdout.
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => return Err(clap_message(&e)),
    };
    let policies = if cli.policies.is_empty() {
        POLICIES
            .iter()
            .chain(&["dam"])
            .map(|s| s.to_string())
            .collect()
    } else {
        cli.policies
    };
    Ok(Args {
        backend: cli.backend,
        policies,
        budgets: cli.budgets,
        trace_cfg: TraceConfig {
            layers: cli.layers,
            prompt_len: cli.prompt_len,
            decode_steps: cli.steps,
            seed: cli.seed,
            ..TraceConfig::default()
        },
        trace: cli.trace,
        entmax: !cli.no_entmax,
        out: cli.out,
        quiet: cli.quiet,
    })
}

/// clap's error as one line (without its `error: ` prefix and usage block).
fn clap_message(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or("").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    format!("{first} (try --help)")
}

#[path = "eval_real/mod.rs"]
mod eval_real;

fn main() {
    if std::env::args().skip(1).any(|a| a == "--model") {
        return eval_real::main(); // a real model (feature candle): examples/eval_real/
    }
    if let Err(e) = run() {
        eprintln!("eval: {e}");
        std::process::exit(2);
    }
}

/// Bytes of memory the run needs, roughly: the trace, the cache and uploads
/// (twice the trace), and three `[step][layer][head][token]` tables (full
/// logits, the full cache's and a policy's attended positions).
fn memory_needed(c: &TraceConfig) -> Option<u128> {
    let t = (c.prompt_len as u128).checked_add(c.decode_steps as u128)?;
    let l = c.layers as u128;
    let trace = l * t * ((c.q_heads + 2 * c.kv_heads) as u128) * (c.head_dim as u128) * 4;
    let tables = 3 * (c.decode_steps as u128) * l * (c.q_heads as u128) * t * 4;
    trace.checked_mul(2)?.checked_add(tables)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes (Linux), else `None`.
fn memory_available() -> Option<u128> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let trace = match &args.trace {
        Some(p) => load(p)?,
        None => {
            let c = &args.trace_cfg;
            c.validate()?;
            let gib = |b: u128| b as f64 / (1u128 << 30) as f64;
            match (memory_needed(c), memory_available()) {
                (None, _) => {
                    return Err(format!(
                        "--prompt-len {} / --steps {} / --layers {}: the trace's size overflows",
                        c.prompt_len, c.decode_steps, c.layers
                    )
                    .into());
                }
                (Some(need), Some(avail)) if need > avail => {
                    return Err(format!(
                        "--prompt-len {} / --steps {} / --layers {} need about {:.1} GiB, more than the {:.1} GiB available",
                        c.prompt_len,
                        c.decode_steps,
                        c.layers,
                        gib(need),
                        gib(avail)
                    )
                    .into());
                }
                _ => {}
            }
            Trace::synthetic(c)?
        }
    };
    if trace.decode_steps == 0 {
        return Err("the trace has no decode steps to evaluate".into());
    }
    match args.backend.as_str() {
        "reference" => evaluate(Reference, "reference", &args, &trace),
        "cpu" => {
            let cpu = kvsieve::cpu::Cpu::new();
            let name = format!("cpu ({}, {} threads)", cpu.isa(), cpu.num_threads());
            evaluate(cpu, &name, &args, &trace)
        }
        other => Err(format!("unknown backend `{other}` (available: reference, cpu)").into()),
    }
}

/// One row of the results table.
struct Row {
    method: String,
    budget: String,
    err_mean: f64,
    err_p95: f64,
    mass: f64,
    recall: Option<f64>,
    kv_bytes: usize,
    kv_alloc: usize,
    kv_fraction: f64,
    read_fraction: f64,
    ms_per_step: f64,
    attn_ms: f64,
    gbps: f64,
}

/// Head-major copies of a layer's K for logits: `[Hkv, T, D]`.
fn head_major(x: &[f32], t: usize, h: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for tok in 0..t {
        for g in 0..h {
            out[(g * t + tok) * d..][..d].copy_from_slice(&x[(tok * h + g) * d..][..d]);
        }
    }
    out
}

/// Full-cache logits of every decode query: `[step][layer][head] -> [P + step + 1]`.
fn full_logits<B: Ops>(
    b: &B,
    tr: &Trace,
    geom: HeadGeometry,
) -> kvsieve::Result<Vec<Vec<Vec<Vec<f32>>>>> {
    let (t_all, hkv, d) = (tr.len(), tr.kv_heads, tr.head_dim);
    let hq = tr.q_heads;
    let kh: Vec<Vec<f32>> = tr
        .layers
        .iter()
        .map(|l| head_major(&l.k, t_all, hkv, d))
        .collect();
    let q_rows = Ragged::uniform(1, 1)?;
    let mut all = Vec::with_capacity(tr.decode_steps);
    for s in 0..tr.decode_steps {
        let t = tr.prompt_len + s;
        let segs = Segments::with_capacity(1, hkv, t_all, vec![(t + 1) as u32; hkv])?;
        let mut per_layer = Vec::with_capacity(tr.layers.len());
        for (l, layer) in tr.layers.iter().enumerate() {
            let q = b.upload(&layer.q[t * hq * d..(t + 1) * hq * d])?;
            let k = b.upload(&kh[l])?;
            let p = QkParams {
                geom,
                q_rows: &q_rows,
                segments: &segs,
                causal: false,
                scale: None,
            };
            let layout = ops::qk_layout(&p)?;
            let mut out = b.zeros::<f32>(layout.blocks.total())?;
            ops::qk_logits(b, &p, &q, &k, &mut out)?;
            let out = b.download(&out)?;
            per_layer.push(
                (0..hq)
                    .map(|h| out[layout.blocks.range(h)].to_vec())
                    .collect(),
            );
        }
        all.push(per_layer);
    }
    Ok(all)
}

fn softmax(z: &[f32]) -> Vec<f64> {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f64> = z.iter().map(|&x| f64::from(x - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn p95(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 * 0.95).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(0.0)
}

/// DAM calibrated on the trace itself: per (layer, query head) the causal
/// softmax attention map of the prompt's first `PCL = min(128, prompt)`
/// tokens (f64 on the host).
fn calibrated_dam<B: Ops + 'static>(tr: &Trace) -> kvsieve::Result<Box<dyn KvPolicy<B, f32>>> {
    let pcl = tr.prompt_len.min(128);
    let (hq, hkv, d) = (tr.q_heads, tr.kv_heads, tr.head_dim);
    let g = hq / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let maps: Vec<Vec<Vec<f32>>> = tr
        .layers
        .iter()
        .map(|l| {
            (0..hq)
                .map(|h| {
                    let mut m = vec![0.0f32; pcl * pcl];
                    for i in 0..pcl {
                        let qv = &l.q[(i * hq + h) * d..][..d];
                        let z: Vec<f64> = (0..=i)
                            .map(|j| {
                                let kv = &l.k[(j * hkv + h / g) * d..][..d];
                                scale
                                    * qv.iter()
                                        .zip(kv)
                                        .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                        .sum::<f64>()
                            })
                            .collect();
                        let mx = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = z.iter().map(|x| (x - mx).exp()).collect();
                        let sum: f64 = e.iter().sum();
                        for (j, x) in e.iter().enumerate() {
                            m[i * pcl + j] = (x / sum) as f32;
                        }
                    }
                    m
                })
                .collect()
        })
        .collect();
    let refs: Vec<Vec<&[f32]>> = maps
        .iter()
        .map(|l| l.iter().map(|m| m.as_slice()).collect())
        .collect();
    let cfg = DamConfig {
        pcl,
        min_support: DamConfig::default().min_support.min(pcl),
        ..DamConfig::default()
    };
    Ok(Box::new(Dam::calibrate(&cfg, &refs)?))
}

/// One layer's prompt Q, K, V on the backend.
type Qkv<B> = (
    <B as kvsieve::Backend>::Buffer<f32>,
    <B as kvsieve::Backend>::Buffer<f32>,
    <B as kvsieve::Backend>::Buffer<f32>,
);

/// Runs one configuration (a policy at a budget, or entmax) and scores it.
struct RunOut {
    outs: Vec<Vec<Vec<f32>>>,
    /// Attended original positions per step, layer and query head.
    kept: Vec<Vec<Vec<Vec<u32>>>>,
    kv_bytes: usize,
    kv_alloc: usize,
    /// Seconds of each decode step (all layers).
    secs: Vec<f64>,
    /// The attention alone over the cache after each step (same
    /// restriction), per step.
    attn_secs: Vec<f64>,
    bytes_read: f64,
}

/// Median of per-step times (robust to a busy machine's spikes; 0 when
/// there are none).
fn median(x: &[f64]) -> f64 {
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

fn run_session<B: Ops + Clone + 'static>(
    b: &B,
    tr: &Trace,
    geom: HeadGeometry,
    policy: Box<dyn KvPolicy<B, f32>>,
    normalizer: Normalizer,
) -> kvsieve::Result<RunOut> {
    let (hq, hkv, d) = (tr.q_heads, tr.kv_heads, tr.head_dim);
    let cfg = SessionConfig {
        normalizer: normalizer.clone(),
        ..SessionConfig::default()
    };
    let mut s = Session::new(b.clone(), geom, 1, tr.layers.len(), policy, cfg)?;
    let p = tr.prompt_len;
    let up = |x: &[f32]| b.upload(x);
    let pre: Vec<Qkv<B>> = tr
        .layers
        .iter()
        .map(|l| {
            Ok((
                up(&l.q[..p * hq * d])?,
                up(&l.k[..p * hkv * d])?,
                up(&l.v[..p * hkv * d])?,
            ))
        })
        .collect::<kvsieve::Result<_>>()?;
    let inputs: Vec<LayerInput<'_, B, f32>> =
        pre.iter().map(|(q, k, v)| LayerInput { q, k, v }).collect();
    s.prefill(&Ragged::uniform(1, p)?, &inputs)?;
    let mut run = RunOut {
        outs: vec![],
        kept: vec![],
        kv_bytes: 0,
        kv_alloc: 0,
        secs: Vec::new(),
        attn_secs: Vec::new(),
        bytes_read: 0.0,
    };
    for step in 0..tr.decode_steps {
        let t = p + step;
        let (mut outs, mut kept) = (Vec::new(), Vec::new());
        let (mut step_secs, mut step_attn) = (0.0f64, 0.0f64);
        for (li, l) in tr.layers.iter().enumerate() {
            let (q, k, v) = (
                up(&l.q[t * hq * d..(t + 1) * hq * d])?,
                up(&l.k[t * hkv * d..(t + 1) * hkv * d])?,
                up(&l.v[t * hkv * d..(t + 1) * hkv * d])?,
            );
            let start = Instant::now();
            let (out, sel) = s.decode_layer(
                li,
                &LayerInput {
                    q: &q,
                    k: &k,
                    v: &v,
                },
            )?;
            b.synchronize()?;
            step_secs += start.elapsed().as_secs_f64();
            outs.push(b.download(&out)?);
            let layer = s.cache().layer(li)?;
            // The attention alone over the cache the step left (the
            // policy's selection, if any): the cost the policy adds to.
            let p = ops::DecodeParams {
                geom,
                segments: layer.segments(),
                scale: None,
                normalizer: &normalizer,
                restrict: sel.as_ref().map_or(Restrict::Dense, Restrict::Indices),
            };
            let mut plain = b.zeros::<f32>(hq * d)?;
            let start = Instant::now();
            ops::decode_attention(b, &p, &q, layer.k(), layer.v(), &mut plain)?;
            b.synchronize()?;
            step_attn += start.elapsed().as_secs_f64();
            let heads: Vec<Vec<u32>> = (0..hq)
                .map(|h| {
                    let g = geom.kv_head(h);
                    let pos = layer.positions(g);
                    match &sel {
                        None => pos.to_vec(),
                        Some(list) => list_of(list, h, &geom)
                            .iter()
                            .map(|&i| pos[i as usize])
                            .collect(),
                    }
                })
                .collect();
            // KV rows read: per KV head, the union of its query heads' rows.
            for g in 0..hkv {
                let mut rows: Vec<u32> = (g * geom.group()..(g + 1) * geom.group())
                    .flat_map(|h| heads[h].clone())
                    .collect();
                rows.sort_unstable();
                rows.dedup();
                run.bytes_read += (rows.len() * 2 * d * 4) as f64;
            }
            kept.push(heads);
        }
        s.end_decode_step();
        run.secs.push(step_secs);
        run.attn_secs.push(step_attn);
        run.outs.push(outs);
        run.kept.push(kept);
    }
    run.kv_bytes = s.cache().bytes();
    run.kv_alloc = s.cache().allocated_bytes();
    Ok(run)
}

fn list_of<'a>(list: &'a IndexList, h: usize, geom: &HeadGeometry) -> &'a [u32] {
    match list.scope() {
        Scope::KvHead => list.list(geom.kv_head(h)),
        Scope::QueryHead => list.list(h),
    }
}

// `step`, layer and head index several parallel per-step tables at once.
#[allow(clippy::needless_range_loop)]
fn evaluate<B: Ops + Clone + 'static>(
    b: B,
    name: &str,
    args: &Args,
    tr: &Trace,
) -> Result<(), Box<dyn std::error::Error>> {
    let geom = HeadGeometry::new(tr.q_heads, tr.kv_heads, tr.head_dim)?;
    let (hq, d) = (tr.q_heads, tr.head_dim);
    let logits = full_logits(&b, tr, geom)?;
    let full = run_session(
        &b,
        tr,
        geom,
        make_policy("full", MIN_BUDGET)?,
        Normalizer::Softmax,
    )?;
    let full_bytes = full.kv_bytes;

    let mut jobs: Vec<(String, Option<usize>)> = Vec::new();
    for p in &args.policies {
        if p == "full" || p == "dam" {
            jobs.push((p.clone(), None));
        } else {
            jobs.extend(args.budgets.iter().map(|&bud| (p.clone(), Some(bud))));
        }
    }
    if args.entmax {
        jobs.push(("entmax_1.5".into(), None));
        jobs.push(("entmax_2".into(), None));
    }
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(jobs.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    let mut rows = Vec::new();
    for (method, budget) in &jobs {
        bar.set_message(format!(
            "{method} {}",
            budget.map_or("".into(), |x| x.to_string())
        ));
        let (run, budget_s) = if let Some(alpha) = method.strip_prefix("entmax_") {
            let alpha: f32 = alpha.parse()?;
            let r = run_session(
                &b,
                tr,
                geom,
                make_policy("full", MIN_BUDGET)?,
                Normalizer::Entmax { alpha },
            )?;
            (r, "adaptive".to_string())
        } else if method == "dam" {
            let r = run_session(&b, tr, geom, calibrated_dam(tr)?, Normalizer::Softmax)?;
            (r, "calibrated".to_string())
        } else {
            let bud = budget.unwrap_or(tr.len());
            let policy = make_policy_for(method, bud, tr.layers.len())?;
            let r = run_session(&b, tr, geom, policy, Normalizer::Softmax)?;
            (r, budget.map_or("all".to_string(), |x| x.to_string()))
        };
        let (mut errs, mut masses) = (Vec::new(), Vec::new());
        let (mut hits, mut total) = (0usize, 0usize);
        let (mut read, mut cached) = (0usize, 0usize);
        for step in 0..tr.decode_steps {
            for l in 0..tr.layers.len() {
                let mut per_head = Vec::with_capacity(hq);
                for h in 0..hq {
                    let o = &run.outs[step][l][h * d..(h + 1) * d];
                    let f = &full.outs[step][l][h * d..(h + 1) * d];
                    errs.push(rel_err(o, f));
                    let w = softmax(&logits[step][l][h]);
                    let attended: Vec<u32> = if method.starts_with("entmax") {
                        let mut p = vec![0.0f32; w.len()];
                        let alpha: f32 = method["entmax_".len()..].parse()?;
                        let rows = Ragged::uniform(1, w.len())?;
                        ops::entmax_rows(&Reference, &rows, &[alpha], &logits[step][l][h], &mut p)?;
                        (0..p.len() as u32)
                            .filter(|&j| p[j as usize] > 0.0)
                            .collect()
                    } else {
                        run.kept[step][l][h].clone()
                    };
                    masses.push(attended.iter().map(|&j| w[j as usize]).sum::<f64>());
                    for n in tr.needles.iter().filter(|n| n.step == step) {
                        total += 1;
                        hits += usize::from(attended.contains(&(n.position as u32)));
                    }
                    per_head.push(attended);
                }
                // Rows a KV head reads: the union over its query heads.
                for g in 0..tr.kv_heads {
                    let mut u: Vec<u32> =
                        per_head[g * geom.group()..(g + 1) * geom.group()].concat();
                    u.sort_unstable();
                    u.dedup();
                    read += u.len();
                    cached += tr.prompt_len + step + 1;
                }
            }
        }
        let n = errs.len() as f64;
        rows.push(Row {
            method: method.clone(),
            budget: budget_s,
            err_mean: errs.iter().sum::<f64>() / n,
            err_p95: p95(errs),
            mass: masses.iter().sum::<f64>() / n,
            recall: (total > 0).then(|| hits as f64 / total as f64),
            kv_bytes: run.kv_bytes,
            kv_alloc: run.kv_alloc,
            kv_fraction: run.kv_bytes as f64 / full_bytes.max(1) as f64,
            read_fraction: read as f64 / cached.max(1) as f64,
            ms_per_step: 1e3 * median(&run.secs),
            attn_ms: 1e3 * median(&run.attn_secs),
            gbps: run.bytes_read / run.secs.iter().sum::<f64>().max(1e-12) / 1e9,
        });
        bar.inc(1);
    }
    bar.finish_and_clear();

    println!(
        "kvsieve eval — backend {name}; trace: {} layers, {} q / {} KV heads, D = {}, prompt {}, {} decode steps{}",
        tr.layers.len(),
        tr.q_heads,
        tr.kv_heads,
        tr.head_dim,
        tr.prompt_len,
        tr.decode_steps,
        args.trace.as_ref().map_or(
            format!(", synthetic seed {}", args.trace_cfg.seed),
            |p| format!(", from {}", p.display())
        )
    );
    println!(
        "{:<15} {:>10} {:>10} {:>10} {:>7} {:>7} {:>10} {:>10} {:>7} {:>7} {:>8} {:>8} {:>6} {:>7}",
        "method",
        "budget",
        "err mean",
        "err p95",
        "mass",
        "needles",
        "KV bytes",
        "KV alloc",
        "KV kept",
        "KV read",
        "ms/step",
        "attn ms",
        "x attn",
        "GB/s"
    );
    for r in &rows {
        println!(
            "{:<15} {:>10} {:>10.3e} {:>10.3e} {:>6.1}% {:>7} {:>10} {:>10} {:>6.1}% {:>6.1}% {:>8.3} {:>8.3} {:>6.2} {:>7.2}",
            r.method,
            r.budget,
            r.err_mean,
            r.err_p95,
            100.0 * r.mass,
            r.recall
                .map_or("-".into(), |x| format!("{:.0}%", 100.0 * x)),
            r.kv_bytes,
            r.kv_alloc,
            100.0 * r.kv_fraction,
            100.0 * r.read_fraction,
            r.ms_per_step,
            r.attn_ms,
            r.ms_per_step / r.attn_ms.max(1e-9),
            r.gbps
        );
    }
    println!("{COLUMNS}");
    let written = write_outputs(&args.out, &rows, &args.budgets)?;
    println!(
        "wrote {}",
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// What the table's columns mean (printed under it and in `--help`).
const COLUMNS: &str = "columns: err = relative L2 error of each head's output against full attention \
(mean, p95); mass = full-softmax attention mass on the tokens attended; needles = planted \
tokens attended at the step that needs them; KV bytes / alloc = K+V in use / allocated after \
the run; KV kept = in use vs full; KV read = rows read per step vs the cache; ms/step = median \
driver step (append, policy hooks, attention with evidence, plan applied); attn ms = the \
attention alone over the cache the step left (same selection); x attn = their ratio: what \
the policy adds; GB/s = KV bytes read per step time.";

/// `--help`'s epilogue: the table's columns and the files written.
const COLUMNS_HELP: &str = "The table (one row per policy and budget):
  method    the policy, or entmax_1.5 / entmax_2 (full cache, entmax attention)
  budget    tokens kept (or attended) per KV head; `all` for the full cache,
            `adaptive` for entmax, `calibrated` for DAM
  err mean  relative L2 error of each query head's attention output against
  err p95   full softmax attention over the whole cache (mean, 95th percentile)
  mass      full-softmax attention mass on the tokens the method attended
  needles   planted tokens attended at the decode step whose query targets
            them (synthetic traces; `-` otherwise)
  KV bytes  K+V bytes in use / allocated after the run
  KV alloc
  KV kept   KV bytes in use against the full cache
  KV read   KV rows read per step against the rows cached
  ms/step   one driver step, median over the decode steps: append, policy
            hooks, attention with evidence, plan applied (all layers)
  attn ms   the attention alone over the cache the step left (same
            selection), median over the steps
  x attn    ms/step / attn ms: what the policy adds to attention
  GB/s      KV bytes read per step time
Writes results.csv, results.json (numbers as numbers; budget null when not a
token count) and error_vs_budget.svg to --out.
Real models: eval --model FILE.gguf --help (feature candle).";

/// One row of `results.csv` / `results.json`.
#[derive(Serialize)]
struct Record<'a> {
    method: &'a str,
    /// Tokens per KV head; `None` for the full cache, entmax and DAM.
    budget: Option<usize>,
    /// `tokens`, `all`, `adaptive` or `calibrated`.
    budget_kind: &'a str,
    err_mean: f64,
    err_p95: f64,
    mass: f64,
    needle_recall: Option<f64>,
    kv_bytes: usize,
    kv_alloc: usize,
    kv_fraction: f64,
    read_fraction: f64,
    ms_per_step: f64,
    attn_ms: f64,
    gbps: f64,
}

impl Row {
    fn record(&self) -> Record<'_> {
        let budget = self.budget.parse::<usize>().ok();
        Record {
            method: &self.method,
            budget,
            budget_kind: if budget.is_some() {
                "tokens"
            } else {
                &self.budget
            },
            err_mean: self.err_mean,
            err_p95: self.err_p95,
            mass: self.mass,
            needle_recall: self.recall,
            kv_bytes: self.kv_bytes,
            kv_alloc: self.kv_alloc,
            kv_fraction: self.kv_fraction,
            read_fraction: self.read_fraction,
            ms_per_step: self.ms_per_step,
            attn_ms: self.attn_ms,
            gbps: self.gbps,
        }
    }
}

/// Writes `results.csv` (the `csv` crate), `results.json` (`serde_json`)
/// and, when some policy ran at a budget, `error_vs_budget.svg`; returns
/// the paths written.
fn write_outputs(
    dir: &std::path::Path,
    rows: &[Row],
    budgets: &[usize],
) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let records: Vec<Record> = rows.iter().map(Row::record).collect();
    let mut written = Vec::new();
    let path = dir.join("results.csv");
    let mut csv = csv::Writer::from_path(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    for r in &records {
        csv.serialize(r)?;
    }
    csv.flush()?;
    written.push(path);
    let path = dir.join("results.json");
    let json = serde_json::to_string_pretty(&records)?;
    std::fs::write(&path, json + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
    written.push(path);
    let path = dir.join("error_vs_budget.svg");
    if plot_errors(&path, rows, budgets)? {
        written.push(path);
    }
    Ok(written)
}

/// Mean relative error against budget, one line per policy (log-log),
/// ticks at the budgets run. `Ok(false)`: no policy ran at a budget, no
/// plot written.
fn plot_errors(
    path: &std::path::Path,
    rows: &[Row],
    budgets: &[usize],
) -> Result<bool, Box<dyn std::error::Error>> {
    let mut names: Vec<&str> = Vec::new();
    for r in rows.iter().filter(|r| r.budget.parse::<usize>().is_ok()) {
        if !names.contains(&r.method.as_str()) {
            names.push(&r.method);
        }
    }
    let series: plot::Series = names
        .into_iter()
        .map(|n| {
            let pts = rows
                .iter()
                .filter(|r| r.method == n)
                .filter_map(|r| Some((r.budget.parse::<f64>().ok()?, r.err_mean.max(1e-6))))
                .collect();
            (n.to_string(), pts)
        })
        .collect();
    if series.is_empty() {
        return Ok(false);
    }
    plot::line_plot(
        path,
        "attention output error vs KV budget",
        &plot::Axis {
            desc: "budget (tokens per KV head)",
            log: true,
            ticks: budgets.iter().map(|&b| (b as f64, b.to_string())).collect(),
            range: None,
        },
        &plot::Axis {
            desc: "mean relative L2 error (log scale)",
            log: true,
            ticks: Vec::new(),
            range: None,
        },
        &series,
    )?;
    Ok(true)
}
