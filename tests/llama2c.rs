//! The llama2c integration example: on tiny random models the test writes
//! itself, both checkpoint versions load to the same model, attention
//! through kvsieve (Full) matches a plain softmax attention, large budgets
//! change nothing, and bad files fail cleanly; on the real stories260K
//! checkpoint (`../shared/models`, or `KVSIEVE_MODELS`), greedy generation
//! reproduces llama2.c's known answer on every backend that runs here.
//! Without the checkpoint the known-answer test prints `SKIPPED(models)`
//! (a failure under `KVSIEVE_REQUIRE=models`).

mod common;

#[path = "../examples/llama2c/engine.rs"]
#[allow(dead_code)]
mod engine;
#[path = "../examples/llama2c/model.rs"]
#[allow(dead_code)]
mod model;
#[path = "../examples/llama2c/tokenizer.rs"]
#[allow(dead_code)]
mod tokenizer;

use std::path::PathBuf;

use kvsieve::Ops;
use kvsieve::eval::policies::{POLICIES, make_policy};
use kvsieve::reference::Reference;
use model::{Config, Model};

const CFG: Config = Config {
    dim: 32,
    hidden_dim: 48,
    n_layers: 2,
    n_heads: 4,
    n_kv_heads: 2,
    vocab_size: 41,
    seq_len: 64,
};

fn tiny(version: u32, shared: bool) -> Model {
    let path = std::env::temp_dir().join(format!(
        "kvsieve-l2c-{}-{version}-{shared}.bin",
        std::process::id()
    ));
    model::write_random_checkpoint(&path, &CFG, version, shared, 9).unwrap();
    let m = Model::load(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    m
}

fn tokens(n: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 7 + 3) % CFG.vocab_size).collect()
}

/// A plain forward pass with its own softmax attention (no kvsieve).
fn naive_logits(m: &Model, toks: &[usize]) -> Vec<Vec<f32>> {
    let (hq, hkv, d) = (CFG.n_heads, CFG.n_kv_heads, CFG.head_dim());
    let mut keys = vec![Vec::<Vec<f32>>::new(); CFG.n_layers];
    let mut vals = vec![Vec::<Vec<f32>>::new(); CFG.n_layers];
    let mut out = Vec::new();
    for (pos, &t) in toks.iter().enumerate() {
        let mut x = m.embed(t).unwrap();
        for l in 0..CFG.n_layers {
            let (q, k, v) = m.qkv(l, &x, pos);
            keys[l].push(k);
            vals[l].push(v);
            let mut att = vec![0.0f32; hq * d];
            for h in 0..hq {
                let g = h / (hq / hkv);
                let qh = &q[h * d..(h + 1) * d];
                let z: Vec<f32> = keys[l]
                    .iter()
                    .map(|k| {
                        qh.iter()
                            .zip(&k[g * d..(g + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (d as f32).sqrt()
                    })
                    .collect();
                let mx = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = z.iter().map(|&s| (s - mx).exp()).collect();
                let sum: f32 = e.iter().sum();
                for (j, w) in e.iter().enumerate() {
                    for c in 0..d {
                        att[h * d + c] += w / sum * vals[l][j][g * d + c];
                    }
                }
            }
            m.finish_layer(l, &mut x, &att);
        }
        out.push(m.logits(&x));
    }
    out
}

#[test]
fn both_checkpoint_versions_load_the_same_model() {
    let toks = tokens(5);
    for shared in [true, false] {
        let (a, b) = (tiny(0, shared), tiny(1, shared));
        assert_eq!(a.cfg, CFG);
        assert_eq!(
            naive_logits(&a, &toks),
            naive_logits(&b, &toks),
            "shared = {shared}"
        );
    }
}

#[test]
fn kvsieve_attention_matches_plain_attention() {
    let m = tiny(1, false);
    let toks = tokens(20);
    let want = naive_logits(&m, &toks);
    let mut e = engine::Engine::new(&m, Reference, make_policy("full", 8).unwrap()).unwrap();
    let mut got = vec![e.prefill(&toks[..12]).unwrap()];
    for &t in &toks[12..] {
        got.push(e.step(t).unwrap());
    }
    for (i, g) in got.iter().enumerate() {
        let w = &want[11 + i];
        let err = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-4, "position {}: max logit error {err}", 11 + i);
    }
}

#[test]
fn every_policy_runs_and_large_budgets_equal_full() {
    let m = tiny(0, true);
    let toks = tokens(48);
    let (ppl_full, _) =
        engine::perplexity(&m, &Reference, make_policy("full", 8).unwrap(), &toks, 16).unwrap();
    let greedy_full = engine::greedy(
        &m,
        &Reference,
        make_policy("full", 8).unwrap(),
        &toks[..16],
        12,
    )
    .unwrap();
    for name in POLICIES {
        let (ppl, _) =
            engine::perplexity(&m, &Reference, make_policy(name, 64).unwrap(), &toks, 16).unwrap();
        assert_eq!(
            ppl, ppl_full,
            "{name} at a budget above the sequence length"
        );
        let (ppl_small, bytes) =
            engine::perplexity(&m, &Reference, make_policy(name, 8).unwrap(), &toks, 16).unwrap();
        assert!(
            ppl_small.is_finite() && ppl_small > 1.0,
            "{name}: {ppl_small}"
        );
        assert!(bytes > 0);
        let g = engine::greedy(
            &m,
            &Reference,
            make_policy(name, 64).unwrap(),
            &toks[..16],
            12,
        )
        .unwrap();
        assert_eq!(g, greedy_full, "{name}");
    }
}

#[test]
fn bad_checkpoints_are_errors() {
    let dir = std::env::temp_dir();
    let p = dir.join(format!("kvsieve-l2c-bad-{}.bin", std::process::id()));
    model::write_random_checkpoint(&p, &CFG, 1, true, 1).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert!(
        Model::from_bytes(&bytes[..bytes.len() - 4])
            .err()
            .unwrap()
            .contains("truncated")
    );
    let mut v2 = bytes.clone();
    v2[4] = 2;
    assert!(Model::from_bytes(&v2).err().unwrap().contains("version 2"));
    assert!(Model::from_bytes(&[1, 2, 3]).is_err());
    assert!(Model::load(&dir.join("kvsieve-no-such-checkpoint.bin")).is_err());
    let _ = std::fs::remove_file(&p);
    // A token outside the vocabulary is an error, not a panic.
    assert!(
        Model::from_bytes(&bytes)
            .unwrap()
            .embed(CFG.vocab_size)
            .is_err()
    );
}

/// What llama2.c's `run.c` prints for stories260K with temperature 0 and
/// 200 steps (the `expected_stdout` of llama2.c's `test_all.py`, final
/// newline stripped).
const STORIES260K_EXPECTED: &str = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, \"Lily, let's go to the park.\" Lily was sad and didn't know what to do. She said, \"I want to play with your ball, but I can't find it.\"\nLily was sad and didn't know what to do. She said, \"I'm sorry, Lily. I didn't know what to do.\"\nLily didn't want to help her mom, so she";

/// `stories260K/` under `KVSIEVE_MODELS` or `../shared/models`, or why not.
fn stories260k() -> Result<(PathBuf, PathBuf), String> {
    let root = std::env::var_os("KVSIEVE_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/models"));
    let dir = root.join("stories260K");
    let (ckpt, tok) = (dir.join("stories260K.bin"), dir.join("tok512.bin"));
    if ckpt.is_file() && tok.is_file() {
        Ok((ckpt, tok))
    } else {
        Err(format!(
            "no stories260K.bin and tok512.bin in {} (set KVSIEVE_MODELS)",
            dir.display()
        ))
    }
}

/// Greedy text from BOS with the full cache on `backend`.
fn stories_text<B: Ops + Clone + 'static>(backend: &B, n: usize) -> Option<String> {
    let (ckpt, tok) = match stories260k() {
        Ok(p) => p,
        Err(reason) => {
            common::backends::skip("models", &reason);
            return None;
        }
    };
    let m = Model::load(&ckpt).unwrap();
    let t = tokenizer::Tokenizer::load(&tok, m.cfg.vocab_size).unwrap();
    let mut text = Vec::new();
    let prompt = t.encode("", true);
    assert_eq!(prompt, [tokenizer::BOS]);
    let g = engine::generate(
        &m,
        backend,
        make_policy("full", 8).unwrap(),
        &prompt,
        n,
        Some(tokenizer::BOS),
        |prev, tok| {
            text.extend(t.decode(prev, tok)?);
            Ok(())
        },
    )
    .unwrap();
    assert_eq!(g.tokens.len(), n, "stopped early");
    Some(String::from_utf8(text).unwrap())
}

fn assert_known_answer(backend: &str, got: &str) {
    if got != STORIES260K_EXPECTED {
        let at = got
            .bytes()
            .zip(STORIES260K_EXPECTED.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(STORIES260K_EXPECTED.len()));
        panic!(
            "{backend}: stories260K differs from llama2.c at byte {at}:\n got: {got:?}\nwant: {STORIES260K_EXPECTED:?}"
        );
    }
}

#[test]
fn stories260k_matches_llama2c_on_reference() {
    if let Some(text) = stories_text(&Reference, 200) {
        assert_known_answer("reference", &text);
    }
}

#[test]
fn stories260k_matches_llama2c_on_cpu() {
    if let Some(text) = stories_text(&kvsieve::cpu::Cpu::new(), 200) {
        assert_known_answer("cpu", &text);
    }
}

#[cfg(feature = "wgpu")]
#[test]
fn stories260k_matches_llama2c_on_wgpu() {
    let Some(b) = common::backends::wgpu_device() else {
        return;
    };
    if let Some(text) = stories_text(&b, 200) {
        assert_known_answer("wgpu", &text);
    }
}

#[cfg(feature = "cuda")]
#[test]
fn stories260k_matches_llama2c_on_cuda() {
    match common::backends::cuda() {
        Ok(b) => {
            if let Some(text) = stories_text(b, 200) {
                assert_known_answer("cuda", &text);
            }
        }
        Err(reason) => common::backends::skip("cuda", &reason),
    }
}

#[test]
fn tokenizer_round_trips_and_rejects_bad_files() {
    let Ok((ckpt, tok)) = stories260k() else {
        common::backends::skip(
            "models",
            "no stories260K (see stories260k_matches_llama2c_on_reference)",
        );
        return;
    };
    let m = Model::load(&ckpt).unwrap();
    let t = tokenizer::Tokenizer::load(&tok, m.cfg.vocab_size).unwrap();
    let text = "Once upon a time, Lily saw a big red ball. \u{e9}t\u{e9}!";
    let ids = t.encode(text, true);
    assert_eq!(ids[0], tokenizer::BOS);
    assert!(
        ids.len() < text.len(),
        "merges shorten the sequence: {ids:?}"
    );
    let mut back = Vec::new();
    for w in ids.windows(2) {
        back.extend(t.decode(w[0], w[1]).unwrap());
    }
    assert_eq!(String::from_utf8(back).unwrap(), text);
    let bytes = std::fs::read(&tok).unwrap();
    assert!(tokenizer::Tokenizer::from_bytes(&bytes[..100], m.cfg.vocab_size).is_err());
    assert!(t.decode(1, m.cfg.vocab_size).is_err());
}
