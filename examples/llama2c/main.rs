//! A tiny engine: a Llama forward pass over llama2.c checkpoints whose
//! attention runs through kvsieve with any KV policy. Reports perplexity on
//! a token file and the agreement of greedy continuations with the full
//! cache. This is the integration example to copy.
//!
//! ```sh
//! # stories15M.bin from the llama2.c model zoo (karpathy/tinyllamas on Hugging Face),
//! # tokens: a llama2.c pretokenized shard (u16) or a text file of token ids
//! cargo run --release --example llama2c -- --checkpoint stories15M.bin --tokens data.bin \
//!     --policy h2o --budget 64
//! cargo run --release --example llama2c -- --demo   # a random tiny model, written on the fly
//! ```

mod engine;
mod model;

use std::path::PathBuf;

use kvsieve::eval::policies::{MIN_BUDGET, POLICIES, make_policy};
use model::{Config, Model};

const HELP: &str = "usage: llama2c (--checkpoint FILE --tokens FILE | --demo) [flags]
  --policy NAME     KV policy (default h2o): POLICY_LIST
  --budget N        per-head token budget (default 64)
  --prompt-len N    prompt tokens (default: half of the evaluated tokens, at most 128)
  --max-tokens N    tokens of the file to evaluate (default: up to the model's seq_len)
  --generate N      greedy tokens to compare with the full cache (default 32)";

struct Args {
    checkpoint: Option<PathBuf>,
    tokens: Option<PathBuf>,
    demo: bool,
    policy: String,
    budget: usize,
    prompt_len: Option<usize>,
    max_tokens: Option<usize>,
    generate: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        checkpoint: None,
        tokens: None,
        demo: false,
        policy: "h2o".into(),
        budget: 64,
        prompt_len: None,
        max_tokens: None,
        generate: 32,
    };
    let mut it = std::env::args().skip(1);
    let num = |flag: &str, v: Option<String>| -> Result<usize, String> {
        v.ok_or_else(|| format!("{flag} needs a value"))?
            .parse()
            .map_err(|e| format!("{flag}: {e}"))
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--checkpoint" => {
                a.checkpoint = Some(it.next().ok_or("--checkpoint needs a path")?.into())
            }
            "--tokens" => a.tokens = Some(it.next().ok_or("--tokens needs a path")?.into()),
            "--demo" => a.demo = true,
            "--policy" => a.policy = it.next().ok_or("--policy needs a name")?,
            "--budget" => a.budget = num(&flag, it.next())?,
            "--prompt-len" => a.prompt_len = Some(num(&flag, it.next())?),
            "--max-tokens" => a.max_tokens = Some(num(&flag, it.next())?),
            "--generate" => a.generate = num(&flag, it.next())?,
            "-h" | "--help" => {
                println!("{}", HELP.replace("POLICY_LIST", &POLICIES.join(", ")));
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag `{other}` (try --help)")),
        }
    }
    if a.budget < MIN_BUDGET {
        return Err(format!("--budget must be at least {MIN_BUDGET}"));
    }
    if !a.demo && (a.checkpoint.is_none() || a.tokens.is_none()) {
        return Err("give --checkpoint and --tokens, or --demo (try --help)".into());
    }
    Ok(a)
}

/// Token ids from a llama2.c pretokenized shard (u16 little-endian) or, for
/// `.txt` files, whitespace-separated integers.
fn read_tokens(path: &std::path::Path, vocab: usize) -> Result<Vec<usize>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let toks: Vec<usize> = if path.extension().is_some_and(|e| e == "txt") {
        String::from_utf8_lossy(&bytes)
            .split_whitespace()
            .map(|s| {
                s.parse::<usize>()
                    .map_err(|e| format!("{}: `{s}`: {e}", path.display()))
            })
            .collect::<Result<_, _>>()?
    } else {
        if bytes.len() % 2 != 0 {
            return Err(format!(
                "{}: odd byte count for a u16 token file",
                path.display()
            ));
        }
        bytes
            .chunks_exact(2)
            .map(|c| usize::from(u16::from_le_bytes([c[0], c[1]])))
            .collect()
    };
    if let Some(t) = toks.iter().find(|&&t| t >= vocab) {
        return Err(format!(
            "{}: token {t} outside the vocabulary of {vocab}",
            path.display()
        ));
    }
    Ok(toks)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("llama2c: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let (model, tokens) = if args.demo {
        let cfg = Config {
            dim: 64,
            hidden_dim: 172,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            vocab_size: 97,
            seq_len: 256,
        };
        let path =
            std::env::temp_dir().join(format!("kvsieve-llama2c-demo-{}.bin", std::process::id()));
        model::write_random_checkpoint(&path, &cfg, 1, true, 42).map_err(|e| e.to_string())?;
        let m = Model::load(&path)?;
        let _ = std::fs::remove_file(&path);
        let toks: Vec<usize> = (0..200)
            .map(|i| (i * 37 + i * i) % cfg.vocab_size)
            .collect();
        (m, toks)
    } else {
        let m = Model::load(args.checkpoint.as_deref().ok_or("missing --checkpoint")?)?;
        let t = read_tokens(
            args.tokens.as_deref().ok_or("missing --tokens")?,
            m.cfg.vocab_size,
        )?;
        (m, t)
    };
    let n = args
        .max_tokens
        .unwrap_or(model.cfg.seq_len)
        .min(tokens.len())
        .min(model.cfg.seq_len);
    if n < 2 {
        return Err(format!("need at least 2 tokens, have {n}"));
    }
    let prompt = args.prompt_len.unwrap_or((n / 2).min(128));
    if prompt == 0 || prompt >= n {
        return Err(format!("--prompt-len must be in 1..{n}"));
    }
    let toks = &tokens[..n];
    let policy = || make_policy(&args.policy, args.budget).map_err(|e| e.to_string());
    let full = || make_policy("full", MIN_BUDGET).map_err(|e| e.to_string());
    let (ppl_full, bytes_full) = engine::perplexity(&model, full()?, toks, prompt)?;
    let (ppl_pol, bytes_pol) = engine::perplexity(&model, policy()?, toks, prompt)?;
    let n_gen = args.generate.min(model.cfg.seq_len - prompt);
    let g_full = engine::greedy(&model, full()?, &toks[..prompt], n_gen)?;
    let g_pol = engine::greedy(&model, policy()?, &toks[..prompt], n_gen)?;
    let agree = g_full.iter().zip(&g_pol).filter(|(a, b)| a == b).count();
    let first = g_full.iter().zip(&g_pol).position(|(a, b)| a != b);
    println!("model {:?}", model.cfg);
    println!(
        "{n} tokens, prompt {prompt}, policy {} at budget {}",
        args.policy, args.budget
    );
    println!(
        "perplexity  full {ppl_full:.4}   {} {ppl_pol:.4}   (ratio {:.4})",
        args.policy,
        ppl_pol / ppl_full
    );
    println!(
        "KV bytes    full {bytes_full}   {} {bytes_pol}",
        args.policy
    );
    println!(
        "greedy      {agree}/{n_gen} tokens agree with the full cache; first divergence at {}",
        first.map_or("none".to_string(), |i| i.to_string())
    );
    Ok(())
}
