//! The main job (early form): decode attention over a synthetic long
//! context, comparing full softmax attention with the sparse variants the
//! reference backend already offers — top-k selection by Q·K logits,
//! α-entmax (exact zeros), and a StreamingLLM-style sink + recent window —
//! at several budgets.
//!
//! Run: `cargo run --release --example eval [-- --tokens N --seed S]`.
//!
//! Reported per method and budget: relative L2 error of the attention
//! output against full attention, attention mass retained (of the full
//! softmax), needle recall (planted tokens that the query targets), and the
//! share of KV rows read. Policies and backends join this table as their
//! issues land.

use kvsieve::eval::Rng;
use kvsieve::ops::{self, DecodeParams, QkParams};
use kvsieve::reference::Reference;
use kvsieve::{HeadGeometry, IndexList, IndexSet, Normalizer, Ragged, Restrict, Scope, Segments};

struct Args {
    tokens: usize,
    seed: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        tokens: 4096,
        seed: 7,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--tokens" => {
                args.tokens = value()?.parse().map_err(|e| format!("--tokens: {e}"))?;
                if args.tokens < 64 {
                    return Err("--tokens must be at least 64".into());
                }
            }
            "--seed" => args.seed = value()?.parse().map_err(|e| format!("--seed: {e}"))?,
            "-h" | "--help" => {
                println!("usage: eval [--tokens N (>= 64, default 4096)] [--seed S (default 7)]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag `{other}` (try --help)")),
        }
    }
    Ok(args)
}

/// A synthetic trace: one sequence, `n` cached tokens, GQA 8 query heads on
/// 2 KV heads, D = 64. Token 0 is an attention sink, the last tokens are
/// recent, and `needles` tokens have keys aligned with the queries.
struct Trace {
    geom: HeadGeometry,
    segs: Segments,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    needles: Vec<u32>,
}

fn trace(n: usize, seed: u64) -> kvsieve::Result<Trace> {
    let geom = HeadGeometry::new(8, 2, 64)?;
    let (hkv, d) = (geom.num_kv_heads(), geom.head_dim());
    let segs = Segments::uniform(1, hkv, n)?;
    let mut rng = Rng::new(seed);
    let mut k: Vec<f32> = (0..hkv * n * d).map(|_| rng.normal_f32()).collect();
    let v: Vec<f32> = (0..hkv * n * d).map(|_| rng.normal_f32()).collect();
    // A direction per KV head shared by its query group (correlated GQA queries).
    let dirs: Vec<f32> = (0..hkv * d).map(|_| rng.normal_f32()).collect();
    let q: Vec<f32> = (0..geom.num_q_heads() * d)
        .map(|i| dirs[geom.kv_head(i / d) * d + i % d] + 0.3 * rng.normal_f32())
        .collect();
    let needles: Vec<u32> = (1..=4).map(|i| (i * n / 5) as u32).collect();
    for g in 0..hkv {
        let row = |t: usize| (g * n + t) * d;
        for j in 0..d {
            k[row(0) + j] += 0.6 * dirs[g * d + j]; // sink
            for t in n - 16..n {
                k[row(t) + j] += 0.3 * dirs[g * d + j]; // recency
            }
            for &t in &needles {
                k[row(t as usize) + j] = 1.2 * dirs[g * d + j] + 0.2 * k[row(t as usize) + j];
            }
        }
    }
    Ok(Trace {
        geom,
        segs,
        q,
        k,
        v,
        needles,
    })
}

fn decode(t: &Trace, norm: &Normalizer, restrict: Restrict<'_>) -> kvsieve::Result<Vec<f32>> {
    let p = DecodeParams {
        geom: t.geom,
        segments: &t.segs,
        scale: None,
        normalizer: norm,
        restrict,
    };
    let mut out = vec![0.0f32; t.q.len()];
    ops::decode_attention(&Reference, &p, &t.q, &t.k, &t.v, &mut out)?;
    Ok(out)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

fn main() {
    if let Err(e) = run() {
        eprintln!("eval: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    let n = args.tokens;
    let t = trace(n, args.seed)?;
    let (hq, hkv) = (t.geom.num_q_heads(), t.geom.num_kv_heads());
    let softmax = Normalizer::Softmax;
    let full = decode(&t, &softmax, Restrict::Dense)?;

    // Full softmax weights per query head, for the retained-mass column.
    let q_rows = Ragged::uniform(1, 1)?;
    let qk = QkParams {
        geom: t.geom,
        q_rows: &q_rows,
        segments: &t.segs,
        causal: false,
        scale: None,
    };
    let layout = ops::qk_layout(&qk)?;
    let mut logits = vec![0.0f32; layout.blocks.total()];
    ops::qk_logits(&Reference, &qk, &t.q, &t.k, &mut logits)?;
    let mut weights = vec![0.0f32; logits.len()];
    ops::softmax_rows(&Reference, &layout.rows, &logits, &mut weights)?;
    // Group-summed logits per KV head: one selection serves its query group.
    let group_scores: Vec<f32> = (0..hkv)
        .flat_map(|g| {
            let lg = &logits;
            (0..n).map(move |j| {
                (0..hq)
                    .filter(|&h| h / (hq / hkv) == g)
                    .map(|h| lg[h * n + j])
                    .sum()
            })
        })
        .collect();
    let kv_rows = Ragged::uniform(hkv, n)?;

    println!(
        "kvsieve eval — reference backend, {n} tokens, 8 q heads / 2 KV heads, D = 64, seed {}",
        args.seed
    );
    println!(
        "{:<16} {:>7} {:>12} {:>10} {:>8} {:>9}",
        "method", "budget", "rel L2 err", "mass kept", "needles", "KV read"
    );
    let row = |name: &str, budget: String, out: &[f32], kept: &[Vec<u32>]| {
        let mass: f64 = (0..hq)
            .map(|h| {
                kept[h / (hq / hkv)]
                    .iter()
                    .map(|&j| f64::from(weights[h * n + j as usize]))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / hq as f64;
        let hits = t
            .needles
            .iter()
            .filter(|x| kept.iter().all(|s| s.contains(x)))
            .count();
        let read: usize = kept.iter().map(Vec::len).sum();
        println!(
            "{name:<16} {budget:>7} {:>12.3e} {:>9.1}% {:>5}/{} {:>8.1}%",
            rel_l2(out, &full),
            100.0 * mass,
            hits,
            t.needles.len(),
            100.0 * read as f64 / (hkv * n) as f64
        );
    };
    let everything: Vec<Vec<u32>> = (0..hkv).map(|_| (0..n as u32).collect()).collect();
    row("full", "100%".into(), &full, &everything);
    for pct in [1usize, 2, 5, 10, 25] {
        let k = (n * pct / 100).max(1);
        let top = ops::topk_rows(&Reference, &kv_rows, k, Scope::KvHead, &group_scores)?;
        let out = decode(&t, &softmax, Restrict::Indices(&top))?;
        let kept: Vec<Vec<u32>> = (0..hkv).map(|g| top.list(g).to_vec()).collect();
        row("topk-qk", format!("{pct}%"), &out, &kept);
        let sinks = 4.min(k) as u32;
        let window: Vec<IndexSet> = (0..hkv)
            .map(|_| {
                IndexSet::from_unsorted(
                    (0..sinks)
                        .chain((n - (k - sinks as usize)) as u32..n as u32)
                        .collect(),
                )
            })
            .collect();
        let window = IndexList::from_sets(Scope::KvHead, &window)?;
        let out = decode(&t, &softmax, Restrict::Indices(&window))?;
        let kept: Vec<Vec<u32>> = (0..hkv).map(|g| window.list(g).to_vec()).collect();
        row("sink+recent", format!("{pct}%"), &out, &kept);
    }
    for alpha in [1.5f32, 2.0] {
        let norm = Normalizer::Entmax { alpha };
        let out = decode(&t, &norm, Restrict::Dense)?;
        let mut p = vec![0.0f32; logits.len()];
        ops::entmax_rows(&Reference, &layout.rows, &[alpha], &logits, &mut p)?;
        // Rows a KV head must read: any query head of its group with p > 0.
        let kept: Vec<Vec<u32>> = (0..hkv)
            .map(|g| {
                (0..n as u32)
                    .filter(|&j| {
                        (0..hq).any(|h| h / (hq / hkv) == g && p[h * n + j as usize] > 0.0)
                    })
                    .collect()
            })
            .collect();
        row(&format!("entmax a={alpha}"), "adaptive".into(), &out, &kept);
    }
    Ok(())
}
