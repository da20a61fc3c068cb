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

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use kvsieve::attention::{LayerInput, Session, SessionConfig};
use kvsieve::eval::io::load;
use kvsieve::eval::policies::{MIN_BUDGET, POLICIES, make_policy, make_policy_for};
use kvsieve::eval::{Trace, TraceConfig};
use kvsieve::ops::{self, QkParams};
use kvsieve::policy::{Dam, DamConfig, KvPolicy};
use kvsieve::reference::Reference;
use kvsieve::{HeadGeometry, IndexList, Normalizer, Ops, Ragged, Restrict, Scope, Segments};

const HELP: &str = "usage: eval [flags]
  --backend NAME      cpu (default: SIMD + rayon) or reference (the f64 specification)
  --policies A,B,..   policies to run (default: all): POLICY_LIST, dam (calibrated
                      on the prompt's first 128 tokens)
  --budgets N,N,..    per-head token budgets (default 64,128,256)
  --prompt-len N      synthetic prompt length (default 1024)
  --steps N           synthetic decode steps (default 32)
  --layers N          synthetic layers (default 4; TidalDecode uses the paper's
                      layer roles — dense 0-1, selection 2 — from 3 layers on)
  --seed N            synthetic trace seed (default 7)
  --trace PATH        load a captured trace (.safetensors file or npy directory) instead
  --no-entmax         skip the entmax attention rows
  --out DIR           output directory (default out/eval)
  --quiet             no progress bar";

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

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        backend: "cpu".into(),
        policies: POLICIES
            .iter()
            .chain(&["dam"])
            .map(|s| s.to_string())
            .collect(),
        budgets: vec![64, 128, 256],
        trace_cfg: TraceConfig {
            layers: 4,
            prompt_len: 1024,
            decode_steps: 32,
            ..TraceConfig::default()
        },
        trace: None,
        entmax: true,
        out: PathBuf::from("out/eval"),
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |flag: &str, v: Option<String>| -> Result<usize, String> {
        v.ok_or_else(|| format!("{flag} needs a value"))?
            .parse()
            .map_err(|e| format!("{flag}: {e}"))
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--backend" => a.backend = it.next().ok_or("--backend needs a value")?,
            "--policies" => {
                let v = it.next().ok_or("--policies needs a value")?;
                a.policies = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                if let Some(bad) = a
                    .policies
                    .iter()
                    .find(|p| !POLICIES.contains(&p.as_str()) && p.as_str() != "dam")
                {
                    return Err(format!(
                        "unknown policy `{bad}` (known: {}, dam)",
                        POLICIES.join(", ")
                    ));
                }
            }
            "--budgets" => {
                let v = it.next().ok_or("--budgets needs a value")?;
                a.budgets = v
                    .split(',')
                    .map(|s| {
                        s.trim()
                            .parse::<usize>()
                            .map_err(|e| format!("--budgets: `{s}`: {e}"))
                    })
                    .collect::<Result<_, _>>()?;
                if a.budgets.is_empty() {
                    return Err("--budgets needs at least one value".into());
                }
                if let Some(b) = a.budgets.iter().find(|&&b| b < MIN_BUDGET) {
                    return Err(format!(
                        "--budgets: {b} is below the smallest budget, {MIN_BUDGET}"
                    ));
                }
            }
            "--prompt-len" => a.trace_cfg.prompt_len = num(&flag, it.next())?,
            "--steps" => a.trace_cfg.decode_steps = num(&flag, it.next())?,
            "--layers" => a.trace_cfg.layers = num(&flag, it.next())?,
            "--seed" => a.trace_cfg.seed = num(&flag, it.next())? as u64,
            "--trace" => a.trace = Some(PathBuf::from(it.next().ok_or("--trace needs a path")?)),
            "--no-entmax" => a.entmax = false,
            "--out" => a.out = PathBuf::from(it.next().ok_or("--out needs a directory")?),
            "--quiet" => a.quiet = true,
            "-h" | "--help" => {
                println!("{}", HELP.replace("POLICY_LIST", &POLICIES.join(", ")));
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag `{other}` (try --help)")),
        }
    }
    Ok(a)
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

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let trace = match &args.trace {
        Some(p) => load(p)?,
        None => Trace::synthetic(&args.trace_cfg)?,
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
    secs: f64,
    /// The attention alone over the cache after each step (same restriction).
    attn_secs: f64,
    bytes_read: f64,
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
        secs: 0.0,
        attn_secs: 0.0,
        bytes_read: 0.0,
    };
    for step in 0..tr.decode_steps {
        let t = p + step;
        let (mut outs, mut kept) = (Vec::new(), Vec::new());
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
            run.secs += start.elapsed().as_secs_f64();
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
            run.attn_secs += start.elapsed().as_secs_f64();
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
            ms_per_step: 1e3 * run.secs / tr.decode_steps as f64,
            attn_ms: 1e3 * run.attn_secs / tr.decode_steps as f64,
            gbps: run.bytes_read / run.secs.max(1e-12) / 1e9,
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
    write_outputs(&args.out, &rows)?;
    println!(
        "wrote {0}/results.csv, {0}/results.json, {0}/error_vs_budget.svg",
        args.out.display()
    );
    Ok(())
}

/// What the table's columns mean (printed under it).
const COLUMNS: &str = "columns: err = relative L2 error of each head's output against full attention \
(mean, p95); mass = full-softmax attention mass on the tokens attended; needles = planted \
tokens attended at the step that needs them; KV bytes / alloc = K+V in use / allocated after \
the run; KV kept = in use vs full; KV read = rows read per step vs the cache; ms/step = one \
driver step (append, policy hooks, attention with evidence, plan applied); attn ms = the \
attention alone over the cache the step left (same selection); x attn = their ratio: what \
the policy adds; GB/s = KV bytes read per step time.";

fn write_outputs(dir: &std::path::Path, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut csv = std::fs::File::create(dir.join("results.csv"))?;
    writeln!(
        csv,
        "method,budget,err_mean,err_p95,mass,needle_recall,kv_bytes,kv_alloc,kv_fraction,read_fraction,ms_per_step,attn_ms,gbps"
    )?;
    let mut json = String::from("[\n");
    for (i, r) in rows.iter().enumerate() {
        let recall = r.recall.map_or(String::new(), |x| format!("{x:.6}"));
        writeln!(
            csv,
            "{},{},{:.6e},{:.6e},{:.6},{},{},{},{:.6},{:.6},{:.6},{:.6},{:.4}",
            r.method,
            r.budget,
            r.err_mean,
            r.err_p95,
            r.mass,
            recall,
            r.kv_bytes,
            r.kv_alloc,
            r.kv_fraction,
            r.read_fraction,
            r.ms_per_step,
            r.attn_ms,
            r.gbps
        )?;
        json.push_str(&format!(
            "  {{\"method\": \"{}\", \"budget\": \"{}\", \"err_mean\": {:e}, \"err_p95\": {:e}, \"mass\": {}, \"needle_recall\": {}, \"kv_bytes\": {}, \"kv_alloc\": {}, \"kv_fraction\": {}, \"read_fraction\": {}, \"ms_per_step\": {}, \"attn_ms\": {}, \"gbps\": {}}}{}\n",
            r.method,
            r.budget,
            r.err_mean,
            r.err_p95,
            r.mass,
            r.recall.map_or("null".into(), |x| x.to_string()),
            r.kv_bytes,
            r.kv_alloc,
            r.kv_fraction,
            r.read_fraction,
            r.ms_per_step,
            r.attn_ms,
            r.gbps,
            if i + 1 < rows.len() { "," } else { "" }
        ));
    }
    json.push_str("]\n");
    std::fs::write(dir.join("results.json"), json)?;
    plot(&dir.join("error_vs_budget.svg"), rows)
}

/// Mean relative error against budget, one line per policy (log-log).
fn plot(path: &std::path::Path, rows: &[Row]) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let series: Vec<(String, Vec<(f64, f64)>)> = {
        let mut names: Vec<&str> = rows
            .iter()
            .filter(|r| r.budget.parse::<usize>().is_ok())
            .map(|r| r.method.as_str())
            .collect();
        names.dedup();
        names
            .into_iter()
            .map(|n| {
                let pts = rows
                    .iter()
                    .filter(|r| r.method == n)
                    .filter_map(|r| Some((r.budget.parse::<f64>().ok()?, r.err_mean.max(1e-6))))
                    .collect();
                (n.to_string(), pts)
            })
            .collect()
    };
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .collect();
    if xs.is_empty() {
        return Ok(());
    }
    let (x0, x1) = (
        xs.iter().copied().fold(f64::MAX, f64::min),
        xs.iter().copied().fold(0.0, f64::max),
    );
    let (y0, y1) = (
        ys.iter().copied().fold(f64::MAX, f64::min),
        ys.iter().copied().fold(0.0, f64::max),
    );
    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("attention output error vs KV budget", ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (x0 * 0.8..x1 * 1.25).log_scale(),
            (y0 * 0.5..y1 * 2.0).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("budget (tokens per KV head)")
        .y_desc("mean relative L2 error")
        .draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).mix(0.9);
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
