//! The two real-text tasks: perplexity with the cache compressed as in
//! generation, and passkey retrieval.

use std::io::IsTerminal;

use indicatif::ProgressBar;

use super::model::Model;
use super::runner::{Lanes, Spec, nll};
use super::tokenizer::GgufTokenizer;
use kvsieve::cpu::Cpu;

/// The progress bar, plus a plain line with the ETA every 5 % when stderr
/// is not a terminal (CI logs, where the bar is not drawn).
pub struct Progress {
    pub bar: ProgressBar,
    pub log: bool,
}

impl Progress {
    pub fn new(bar: ProgressBar, quiet: bool) -> Self {
        Self {
            bar,
            log: !quiet && !std::io::stderr().is_terminal(),
        }
    }

    fn tick(&self, n: u64) {
        let len = self.bar.length().unwrap_or(0).max(1);
        let before = self.bar.position() * 20 / len;
        self.bar.inc(n);
        let after = self.bar.position() * 20 / len;
        if self.log && after > before {
            eprintln!(
                "eval: {}/{len} tokens ({}%) in {} s, ETA {} s",
                self.bar.position(),
                after * 5,
                self.bar.elapsed().as_secs(),
                self.bar.eta().as_secs()
            );
        }
    }

    fn say(&self, msg: String) {
        self.bar.set_message(msg);
    }
}

/// Perplexity of one lane over every scored token.
#[derive(Clone, Debug)]
pub struct PplRow {
    pub spec: Spec,
    pub ppl: f64,
    /// `ppl / ppl(full)`.
    pub ratio: f64,
    /// KV tokens per (layer, KV head) while scoring, averaged over steps.
    pub kv_tokens: f64,
    pub scored: usize,
}

pub struct PplSetup {
    pub window: usize,
    pub prompt: usize,
    pub windows: usize,
    pub chunk: usize,
}

/// Windows of `window` tokens; each: prefill the first `prompt` tokens,
/// then decode the rest one token at a time (teacher forcing), scoring
/// every decoded position while the policy keeps compressing the cache.
/// `specs[0]` must be the full cache (the reference of the ratios).
pub fn perplexity(
    model: &Model,
    cpu: &Cpu,
    specs: &[Spec],
    text: &[u32],
    s: &PplSetup,
    bar: &Progress,
) -> Result<Vec<PplRow>, String> {
    let p = specs.len();
    let (mut nll_sum, mut kv_sum, mut scored) = (vec![0.0f64; p], vec![0.0f64; p], 0usize);
    for w in 0..s.windows {
        let toks = &text[w * s.window..((w + 1) * s.window).min(text.len())];
        bar.say(format!(
            "perplexity: window {}/{}, prefill",
            w + 1,
            s.windows
        ));
        let mut lanes = Lanes::new(model, specs, cpu)?;
        let mut logits = lanes.prefill(&toks[..s.prompt], s.chunk)?;
        bar.tick(s.prompt as u64);
        bar.say(format!(
            "perplexity: window {}/{}, decode",
            w + 1,
            s.windows
        ));
        for i in s.prompt..toks.len() {
            let target = toks[i];
            for (l, z) in logits.iter().enumerate() {
                nll_sum[l] += nll(z, target);
                kv_sum[l] += lanes.cached_tokens(l);
            }
            scored += 1;
            if i + 1 < toks.len() {
                logits = lanes.step(&vec![target; p])?;
            }
            bar.tick(1);
        }
    }
    let ppl: Vec<f64> = nll_sum.iter().map(|s| (s / scored as f64).exp()).collect();
    Ok(specs
        .iter()
        .enumerate()
        .map(|(l, spec)| PplRow {
            spec: spec.clone(),
            ppl: ppl[l],
            ratio: ppl[l] / ppl[0],
            kv_tokens: kv_sum[l] / scored as f64,
            scored,
        })
        .collect())
}

/// One passkey trial of one lane.
#[derive(Clone, Debug)]
pub struct PasskeyRow {
    pub spec: Spec,
    pub length: usize,
    /// Depth of the key in the filler, percent.
    pub depth: usize,
    pub trial: usize,
    pub passkey: u32,
    pub answer: String,
    pub correct: bool,
    /// KV tokens per (layer, KV head) when the answer was generated.
    pub kv_tokens: f64,
}

const INTRO: &str = "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.";
const FILLER: &str =
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
const QUESTION: &str = " What is the pass key? The pass key is";
/// Tokens generated for the answer.
const ANSWER_TOKENS: usize = 8;

/// The prompt: intro, filler repeated to `length` tokens in all, the key
/// sentence between two filler sentences at `depth` percent of the filler,
/// the question.
pub fn passkey_prompt(
    tok: &GgufTokenizer,
    length: usize,
    depth: usize,
    key: u32,
) -> Result<Vec<u32>, String> {
    let intro = tok.encode(INTRO)?;
    let unit = tok.encode(FILLER)?;
    let needle = tok.encode(&format!(
        " The pass key is {key}. Remember it. {key} is the pass key."
    ))?;
    let question = tok.encode(QUESTION)?;
    let fixed = intro.len() + needle.len() + question.len();
    if length < fixed + unit.len() {
        return Err(format!(
            "a passkey prompt of {length} tokens is too short (at least {})",
            fixed + unit.len()
        ));
    }
    let units = (length - fixed) / unit.len();
    let before = (units * depth + 50) / 100;
    let mut p = intro;
    for _ in 0..before {
        p.extend(&unit);
    }
    p.extend(&needle);
    for _ in before..units {
        p.extend(&unit);
    }
    // Pad to the exact length with the start of one more filler sentence.
    let pad = length - fixed - units * unit.len();
    p.extend(&unit[..pad]);
    p.extend(&question);
    debug_assert_eq!(p.len(), length);
    Ok(p)
}

/// The first run of digits of `s`.
fn first_number(s: &str) -> Option<u32> {
    let digits: String = s
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

pub struct PasskeySetup {
    pub lengths: Vec<usize>,
    pub depths: Vec<usize>,
    pub trials: usize,
    pub chunk: usize,
    pub seed: u64,
}

/// Every (length, depth, trial): prefill the prompt in every lane, generate
/// [`ANSWER_TOKENS`] greedy tokens per lane, compare the first number with
/// the key.
pub fn passkey(
    model: &Model,
    tok: &GgufTokenizer,
    cpu: &Cpu,
    specs: &[Spec],
    s: &PasskeySetup,
    bar: &Progress,
) -> Result<Vec<PasskeyRow>, String> {
    let mut rng = kvsieve::eval::Rng::new(s.seed);
    let mut rows = Vec::new();
    for &length in &s.lengths {
        for &depth in &s.depths {
            for trial in 0..s.trials {
                let key = 10_000 + rng.below(90_000) as u32;
                bar.say(format!("passkey: {length} tokens, depth {depth}%"));
                let prompt = passkey_prompt(tok, length, depth, key)?;
                let mut lanes = Lanes::new(model, specs, cpu)?;
                let mut logits = lanes.prefill(&prompt, s.chunk)?;
                let mut out: Vec<Vec<u32>> = vec![Vec::new(); specs.len()];
                for step in 0..ANSWER_TOKENS {
                    let next: Vec<u32> = logits.iter().map(|z| argmax(z)).collect();
                    for (o, &t) in out.iter_mut().zip(&next) {
                        o.push(t);
                    }
                    if step + 1 < ANSWER_TOKENS {
                        logits = lanes.step(&next)?;
                    }
                }
                for (l, spec) in specs.iter().enumerate() {
                    let answer = tok.decode(&out[l])?;
                    rows.push(PasskeyRow {
                        spec: spec.clone(),
                        length,
                        depth,
                        trial,
                        passkey: key,
                        correct: first_number(&answer) == Some(key),
                        answer,
                        kv_tokens: lanes.cached_tokens(l),
                    });
                }
                bar.tick(length as u64);
            }
        }
    }
    Ok(rows)
}

fn argmax(z: &[f32]) -> u32 {
    (0..z.len()).fold(0, |b, i| if z[i] > z[b] { i } else { b }) as u32
}
