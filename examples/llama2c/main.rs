//! A tiny engine: a Llama forward pass over llama2.c checkpoints whose
//! attention runs through kvsieve with any KV policy, on any backend. It
//! generates text from a prompt (llama2.c tokenizers), or reports
//! perplexity on a token file and the agreement of greedy continuations
//! with the full cache. This is the integration example to copy.
//!
//! ```sh
//! # stories260K from llama2.c (../shared/models/stories260K): greedy text from BOS,
//! # the same 200 tokens as llama2.c's run.c at temperature 0
//! cargo run --release --example llama2c -- --checkpoint stories260K.bin \
//!     --tokenizer tok512.bin --generate 200
//! cargo run --release --example llama2c -- --checkpoint stories260K.bin \
//!     --tokenizer tok512.bin --prompt "Once upon a time" --policy h2o --budget 32
//! # perplexity on a llama2.c pretokenized shard (u16) or a text file of token ids
//! cargo run --release --example llama2c -- --checkpoint stories15M.bin --tokens data.bin \
//!     --policy h2o --budget 64
//! cargo run --release --example llama2c -- --demo   # a random tiny model, written on the fly
//! ```

mod engine;
mod model;
mod tokenizer;

use std::io::Write;
use std::path::PathBuf;

use kvsieve::Ops;
use kvsieve::eval::policies::{MIN_BUDGET, POLICIES, make_policy};
use model::{Config, Model};
use tokenizer::Tokenizer;

const HELP: &str = "usage: llama2c --checkpoint FILE (--tokenizer FILE | --tokens FILE) [flags]
       llama2c --demo [flags]
With --tokenizer (and no --tokens): greedy generation, the text on stdout
and tokens/s on stderr. With --tokens: perplexity of the token file and
greedy agreement with the full cache.
  --tokenizer FILE  llama2.c tokenizer (tokenizer.bin, tok512.bin, ...)
  --prompt TEXT     prompt to continue (default: empty, generation starts at BOS)
  --tokens FILE     llama2.c pretokenized shard (u16) or a .txt file of token ids
  --backend NAME    reference, cpu (default), wgpu or cuda (with those features)
  --policy NAME     KV policy (default: full for generation, h2o otherwise): POLICY_LIST
  --budget N        per-head token budget (default 64)
  --generate N      tokens to generate (default: 256 for generation, 32 otherwise)
  --prompt-len N    prompt tokens of the token file (default: half the evaluated tokens, at most 128)
  --max-tokens N    tokens of the file to evaluate (default: up to the model's seq_len)";

struct Args {
    checkpoint: Option<PathBuf>,
    tokenizer: Option<PathBuf>,
    prompt: String,
    tokens: Option<PathBuf>,
    demo: bool,
    backend: String,
    policy: Option<String>,
    budget: usize,
    prompt_len: Option<usize>,
    max_tokens: Option<usize>,
    generate: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        checkpoint: None,
        tokenizer: None,
        prompt: String::new(),
        tokens: None,
        demo: false,
        backend: "cpu".into(),
        policy: None,
        budget: 64,
        prompt_len: None,
        max_tokens: None,
        generate: None,
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
            "--tokenizer" => {
                a.tokenizer = Some(it.next().ok_or("--tokenizer needs a path")?.into())
            }
            "--prompt" => a.prompt = it.next().ok_or("--prompt needs a text")?,
            "--tokens" => a.tokens = Some(it.next().ok_or("--tokens needs a path")?.into()),
            "--demo" => a.demo = true,
            "--backend" => a.backend = it.next().ok_or("--backend needs a name")?,
            "--policy" => a.policy = Some(it.next().ok_or("--policy needs a name")?),
            "--budget" => a.budget = num(&flag, it.next())?,
            "--prompt-len" => a.prompt_len = Some(num(&flag, it.next())?),
            "--max-tokens" => a.max_tokens = Some(num(&flag, it.next())?),
            "--generate" => a.generate = Some(num(&flag, it.next())?),
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
    if let Some(p) = &a.policy
        && !POLICIES.contains(&p.as_str())
    {
        return Err(format!(
            "unknown policy `{p}` (known: {})",
            POLICIES.join(", ")
        ));
    }
    if !a.demo && (a.checkpoint.is_none() || (a.tokens.is_none() && a.tokenizer.is_none())) {
        return Err(
            "give --checkpoint with --tokenizer (generation) or --tokens (perplexity), or --demo (try --help)"
                .into(),
        );
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
    match args.backend.as_str() {
        "reference" => run_on(&args, kvsieve::reference::Reference),
        "cpu" => run_on(&args, kvsieve::cpu::Cpu::new()),
        #[cfg(feature = "wgpu")]
        "wgpu" => run_on(
            &args,
            kvsieve::wgpu::Wgpu::new().map_err(|e| e.to_string())?,
        ),
        #[cfg(feature = "cuda")]
        "cuda" => run_on(
            &args,
            kvsieve::cuda::CudaBackend::new(0).map_err(|e| e.to_string())?,
        ),
        #[cfg(not(all(feature = "wgpu", feature = "cuda")))]
        b @ ("wgpu" | "cuda") => Err(format!(
            "--backend {b}: this build lacks the `{b}` feature (cargo run --features {b} ...)"
        )),
        other => Err(format!(
            "unknown backend `{other}` (reference, cpu, wgpu, cuda)"
        )),
    }
}

fn run_on<B: Ops + Clone + 'static>(args: &Args, backend: B) -> Result<(), String> {
    if !args.demo && args.tokens.is_none() {
        return generate(args, &backend);
    }
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
    let name = args.policy.as_deref().unwrap_or("h2o");
    let policy = || make_policy(name, args.budget).map_err(|e| e.to_string());
    let full = || make_policy("full", MIN_BUDGET).map_err(|e| e.to_string());
    let be = &backend;
    let (ppl_full, bytes_full) = engine::perplexity(&model, be, full()?, toks, prompt)?;
    let (ppl_pol, bytes_pol) = engine::perplexity(&model, be, policy()?, toks, prompt)?;
    let n_gen = args.generate.unwrap_or(32).min(model.cfg.seq_len - prompt);
    let g_full = engine::greedy(&model, be, full()?, &toks[..prompt], n_gen)?;
    let g_pol = engine::greedy(&model, be, policy()?, &toks[..prompt], n_gen)?;
    let agree = g_full.iter().zip(&g_pol).filter(|(a, b)| a == b).count();
    let first = g_full.iter().zip(&g_pol).position(|(a, b)| a != b);
    println!("model {:?}, backend {}", model.cfg, backend.name());
    println!(
        "{n} tokens, prompt {prompt}, policy {name} at budget {}",
        args.budget
    );
    println!(
        "perplexity  full {ppl_full:.4}   {name} {ppl_pol:.4}   (ratio {:.4})",
        ppl_pol / ppl_full
    );
    println!("KV bytes    full {bytes_full}   {name} {bytes_pol}");
    println!(
        "greedy      {agree}/{n_gen} tokens agree with the full cache; first divergence at {}",
        first.map_or("none".to_string(), |i| i.to_string())
    );
    Ok(())
}

/// Greedy generation from `--prompt` (BOS first, as llama2.c): the text on
/// stdout as it is produced, statistics on stderr.
fn generate<B: Ops + Clone + 'static>(args: &Args, backend: &B) -> Result<(), String> {
    let model = Model::load(args.checkpoint.as_deref().ok_or("missing --checkpoint")?)?;
    let tok = Tokenizer::load(
        args.tokenizer.as_deref().ok_or("missing --tokenizer")?,
        model.cfg.vocab_size,
    )?;
    let prompt = tok.encode(&args.prompt, true);
    if prompt.len() > model.cfg.seq_len {
        return Err(format!(
            "the prompt is {} tokens, the model's seq_len is {}",
            prompt.len(),
            model.cfg.seq_len
        ));
    }
    let name = args.policy.as_deref().unwrap_or("full");
    let policy = make_policy(name, args.budget).map_err(|e| e.to_string())?;
    let n = args.generate.unwrap_or(256);
    let mut out = std::io::stdout().lock();
    out.write_all(args.prompt.as_bytes())
        .map_err(|e| e.to_string())?;
    let g = engine::generate(
        &model,
        backend,
        policy,
        &prompt,
        n,
        Some(tokenizer::BOS),
        |prev, t| {
            let piece = tok.decode(prev, t)?;
            out.write_all(&piece).map_err(|e| e.to_string())?;
            out.flush().map_err(|e| e.to_string())
        },
    )?;
    writeln!(out)
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    let decoded = g.tokens.len().saturating_sub(1);
    eprintln!(
        "llama2c: {} tokens in {:.3} s on {} ({name}): prompt {} tokens {:.1} ms, decode {:.1} tokens/s",
        g.tokens.len(),
        g.prefill_s + g.decode_s,
        backend.name(),
        prompt.len(),
        g.prefill_s * 1e3,
        if g.decode_s > 0.0 {
            decoded as f64 / g.decode_s
        } else {
            0.0
        }
    );
    Ok(())
}
