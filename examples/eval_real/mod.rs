//! `eval --model FILE.gguf`: KV policies on a real model (feature
//! `candle`). For every policy and budget: (a) perplexity over a long real
//! English text with the cache compressed as in generation (a prompt
//! prefilled in chunks, then every later token scored by a decode step),
//! against the full cache; (b) passkey retrieval, a number hidden at
//! depths 10–90 % of filler text at 1K, 2K and 4K tokens. Prints tables and
//! writes `ppl.csv`, `passkey.csv`, `results.json` and SVG plots to `--out`.
//!
//! ```sh
//! cargo run --release --features candle --example eval -- \
//!     --model target/models/SmolLM2-135M-Instruct.Q4_1.gguf
//! ```
//!
//! Every policy runs in lockstep with the others ([`runner`]): the model's
//! matmuls take all lanes' rows at once, each lane keeps its own cache.

#[cfg(feature = "candle")]
mod cli;
#[cfg(feature = "candle")]
#[path = "../gguf_llama/engine.rs"]
#[allow(dead_code)]
mod engine;
#[cfg(feature = "candle")]
#[path = "../gguf_llama/model.rs"]
#[allow(dead_code)]
mod model;
#[cfg(feature = "candle")]
mod report;
#[cfg(feature = "candle")]
mod runner;
#[cfg(feature = "candle")]
mod tasks;
#[cfg(feature = "candle")]
#[path = "../gguf_llama/tokenizer.rs"]
#[allow(dead_code)]
mod tokenizer;

/// Entry point of `eval --model ...`; exits 2 with a message on errors.
pub fn main() {
    #[cfg(feature = "candle")]
    if let Err(e) = cli::run() {
        eprintln!("eval: {e}");
        std::process::exit(2);
    }
    #[cfg(not(feature = "candle"))]
    {
        eprintln!(
            "eval: --model needs the candle feature (cargo run --release --features candle --example eval -- --model FILE.gguf)"
        );
        std::process::exit(2);
    }
}
