//! What a policy costs next to the attention it shrinks (issue #13's
//! targets), on the CPU backend, 32 query / 8 KV heads, D = 128, f16,
//! batch 1, one layer, 1 and all threads:
//!
//! 1. **decode**: one `Session::decode_layer` step (append, policy hooks,
//!    attention with the evidence the policy needs, plan applied) of an
//!    eviction policy holding a budget of 4096 tokens, against plain dense
//!    decode over a 4096-token cache. The step's cost depends on the cache
//!    the policy keeps, not on how many tokens it has seen, so the session
//!    reaches its steady state from a `budget + 512`-token prompt (prefilled
//!    in chunks of 512) and 32 warm-up steps; medians of 24 timed steps,
//!    each followed by one timed plain decode (the ratio's denominator, so
//!    both medians see the same machine), and the median time of the
//!    policy's decode hooks within the step (its host work, which more
//!    attention threads do not shrink). A second line times plain decode
//!    with and without the group-mean weights alternately (48 pairs).
//! 2. **prefill**: `prefill_attention_with` at 8K tokens with H2O's column
//!    sums and with SnapKV's window (32 queries, summed), against the same
//!    prefill without evidence; medians of 3 runs.
//! 3. **memory** (`KVSIEVE_BENCH_RSS=1`): the whole-process peak RSS of a
//!    Session prefill of a 32K-token prompt (`KVSIEVE_BENCH_RSS_LEN`) through
//!    each policy, in a child process each, against `Full`.
//!
//! `cargo bench --bench policies` (add `KVSIEVE_BENCH_RSS=1` for part 3;
//! `KVSIEVE_BENCH_ONLY=<policy>` and `KVSIEVE_BENCH_STEPS=<n>` narrow part 1
//! for profiling; `KVSIEVE_BENCH_COUNTERS=1` prints each policy's counters).

mod common;

use std::time::Instant;

use half::f16;
use kvsieve::attention::{LayerInput, Session, SessionConfig};
use kvsieve::backend::{DecodeEvidence, Heads, PrefillEvidence, Window, evidence_blocks};
use kvsieve::cpu::Cpu;
use kvsieve::eval::Rng;
use kvsieve::ops::{self, DecodeParams, PrefillParams};
use kvsieve::policy::*;
use kvsieve::*;

const HQ: usize = 32;
const HKV: usize = 8;
const D: usize = 128;
const BUDGET: usize = 4096;

fn geom() -> HeadGeometry {
    HeadGeometry::new(HQ, HKV, D).expect("geometry")
}

fn rand_f16(rng: &mut Rng, n: usize) -> Vec<f16> {
    (0..n).map(|_| f16::from_f32(rng.normal_f32())).collect()
}

/// The policies of the decode and memory parts, by name.
fn policy(name: &str) -> Box<dyn KvPolicy<Cpu, f16>> {
    let b = Budget::tokens(BUDGET);
    match name {
        "full" => Box::new(Full),
        "h2o" => Box::new(
            H2O::new(H2oConfig {
                budget: b.with_sink(4).with_recent(BUDGET / 4),
                ..H2oConfig::default()
            })
            .expect("h2o"),
        ),
        "tova" => Box::new(
            Tova::new(TovaConfig {
                budget: b,
                ..TovaConfig::default()
            })
            .expect("tova"),
        ),
        "caote_h2o" => Box::new(
            Caote::new(
                CaoteConfig {
                    budget: b.with_sink(4).with_recent(BUDGET / 4),
                    ..CaoteConfig::default()
                },
                H2oScorer::default(),
            )
            .expect("caote"),
        ),
        "morph_kv" => Box::new(
            MorphKv::new(MorphKvConfig {
                window: 32,
                capacity: BUDGET,
                ..MorphKvConfig::default()
            })
            .expect("morph_kv"),
        ),
        "snapkv" => Box::new(
            SnapKv::new(SnapKvConfig {
                budget: b,
                window: 32,
                ..SnapKvConfig::default()
            })
            .expect("snapkv"),
        ),
        "ems" => Box::new(
            Ems::new(EmsConfig {
                budget: b,
                window: 32,
                ..EmsConfig::default()
            })
            .expect("ems"),
        ),
        other => panic!("unknown policy {other}"),
    }
}

/// Plain dense decode over a `BUDGET`-token cache, optionally writing the
/// group-mean weights TOVA and H2O ask for: the step's reference.
struct Plain {
    segs: Segments,
    q: Vec<f16>,
    k: Vec<f16>,
    v: Vec<f16>,
    out: Vec<f16>,
    w: Vec<f32>,
}

impl Plain {
    fn new(cpu: &Cpu) -> Self {
        let mut rng = Rng::new(9);
        let segs = Segments::uniform(1, HKV, BUDGET).expect("segments");
        let n = evidence_blocks(&geom(), &segs, Heads::Mean, &[1])
            .expect("blocks")
            .total();
        Plain {
            q: rand_f16(&mut rng, HQ * D),
            k: cpu
                .upload(&rand_f16(&mut rng, HKV * BUDGET * D))
                .expect("k"),
            v: cpu
                .upload(&rand_f16(&mut rng, HKV * BUDGET * D))
                .expect("v"),
            out: vec![f16::ZERO; HQ * D],
            w: vec![0.0f32; n],
            segs,
        }
    }

    /// Seconds of one call.
    fn time(&mut self, cpu: &Cpu, probs: bool) -> f64 {
        let p = DecodeParams {
            geom: geom(),
            segments: &self.segs,
            scale: None,
            normalizer: &Normalizer::Softmax,
            restrict: Restrict::Dense,
        };
        let ev = DecodeEvidence {
            probs: probs.then_some((Heads::Mean, &mut self.w)),
            ..DecodeEvidence::default()
        };
        let start = Instant::now();
        ops::decode_attention_with(cpu, &p, &self.q, &self.k, &self.v, &mut self.out, ev)
            .expect("decode");
        start.elapsed().as_secs_f64()
    }
}

/// A policy whose decode hooks are timed: the policy's own host work of a
/// step (the part that does not shrink with more attention threads).
struct Timed {
    inner: Box<dyn KvPolicy<Cpu, f16>>,
    hooks: std::sync::Arc<std::sync::Mutex<f64>>,
}

impl Timed {
    fn timed(
        &mut self,
        f: impl FnOnce(&mut dyn KvPolicy<Cpu, f16>) -> Result<Plan>,
    ) -> Result<Plan> {
        let t = Instant::now();
        let r = f(self.inner.as_mut());
        *self.hooks.lock().expect("timer") += t.elapsed().as_secs_f64();
        r
    }
}

impl KvPolicy<Cpu, f16> for Timed {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn needs(&self, layer: usize) -> Needs {
        self.inner.needs(layer)
    }
    fn before_prefill_chunk(&mut self, ctx: &StepCtx<'_, Cpu, f16>) -> Result<Plan> {
        self.inner.before_prefill_chunk(ctx)
    }
    fn on_prefill_chunk(&mut self, ctx: &StepCtx<'_, Cpu, f16>) -> Result<Plan> {
        self.inner.on_prefill_chunk(ctx)
    }
    fn on_prefill_end(&mut self, ctx: &StepCtx<'_, Cpu, f16>) -> Result<Plan> {
        self.inner.on_prefill_end(ctx)
    }
    fn select_for_attention(&mut self, ctx: &StepCtx<'_, Cpu, f16>) -> Result<Plan> {
        self.timed(|p| p.select_for_attention(ctx))
    }
    fn on_decode_step(&mut self, ctx: &StepCtx<'_, Cpu, f16>) -> Result<Plan> {
        self.timed(|p| p.on_decode_step(ctx))
    }
    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.inner.counters()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Medians (seconds) of one decode step of `name` at its steady state, of
/// the plain decode timed right after each step (alternating, so both see
/// the same machine), and of the policy's decode hooks within the step.
fn decode_step(cpu: &Cpu, name: &str, plain: &mut Plain) -> (f64, f64, f64) {
    let g = geom();
    let mut rng = Rng::new(7);
    let cfg = SessionConfig {
        prefill_chunk: Some(512),
        ..SessionConfig::default()
    };
    let hooks = std::sync::Arc::new(std::sync::Mutex::new(0.0));
    let timed = Timed {
        inner: policy(name),
        hooks: hooks.clone(),
    };
    let mut s = Session::new(cpu.clone(), g, 1, 1, Box::new(timed), cfg).expect("session");
    let n = BUDGET + 512;
    let (q, k, v) = (
        rand_f16(&mut rng, n * HQ * D),
        rand_f16(&mut rng, n * HKV * D),
        rand_f16(&mut rng, n * HKV * D),
    );
    s.prefill(
        &Ragged::from_lens(&[n as u32]).expect("rows"),
        &[LayerInput {
            q: &q,
            k: &k,
            v: &v,
        }],
    )
    .expect("prefill");
    let timed: usize = std::env::var("KVSIEVE_BENCH_STEPS")
        .ok()
        .and_then(|x| x.parse().ok())
        .unwrap_or(24);
    let steps: Vec<[Vec<f16>; 3]> = (0..32 + timed)
        .map(|_| {
            [
                rand_f16(&mut rng, HQ * D),
                rand_f16(&mut rng, HKV * D),
                rand_f16(&mut rng, HKV * D),
            ]
        })
        .collect();
    let (mut t, mut tp, mut th) = (Vec::new(), Vec::new(), Vec::new());
    for (i, [q, k, v]) in steps.iter().enumerate() {
        *hooks.lock().expect("timer") = 0.0;
        let start = Instant::now();
        s.decode_layer(0, &LayerInput { q, k, v }).expect("decode");
        s.end_decode_step();
        if i >= 32 {
            t.push(start.elapsed().as_secs_f64());
            th.push(*hooks.lock().expect("timer"));
            tp.push(plain.time(cpu, false));
        }
    }
    if std::env::var("KVSIEVE_BENCH_COUNTERS").is_ok() {
        eprintln!("counters {name}: {:?}", s.policy().counters());
    }
    let len = s.cache().layer(0).expect("layer").len_of(0);
    assert!(
        name == "full" || name == "snapkv" || name == "ems" || len == BUDGET,
        "{name} holds {len} tokens, not its budget"
    );
    (median(t), median(tp), median(th))
}

/// Medians (seconds) of plain decode with and without the group-mean
/// weights, timed alternately.
fn plain_pair(cpu: &Cpu, plain: &mut Plain) -> (f64, f64) {
    plain.time(cpu, false);
    plain.time(cpu, true);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..48 {
        a.push(plain.time(cpu, false));
        b.push(plain.time(cpu, true));
    }
    (median(a), median(b))
}

/// Medians of an 8K prefill: plain, with H2O's column sums, with SnapKV's window.
fn prefill(cpu: &Cpu) -> [f64; 3] {
    let g = geom();
    let n = 8192;
    let mut rng = Rng::new(11);
    let segs = Segments::uniform(1, HKV, n).expect("segments");
    let rows = Ragged::from_lens(&[n as u32]).expect("rows");
    let q = rand_f16(&mut rng, n * HQ * D);
    let k = cpu.upload(&rand_f16(&mut rng, n * HKV * D)).expect("k");
    let v = cpu.upload(&rand_f16(&mut rng, n * HKV * D)).expect("v");
    let mut out = vec![f16::ZERO; q.len()];
    let p = PrefillParams {
        geom: g,
        q_rows: &rows,
        segments: &segs,
        causal: true,
        mask: None,
        scale: None,
        normalizer: &Normalizer::Softmax,
    };
    let col_n = evidence_blocks(&g, &segs, Heads::Sum, &[1])
        .expect("blocks")
        .total();
    let win = Window {
        queries: 32,
        heads: Heads::Mean,
        rows: false,
    };
    let win_n = evidence_blocks(&g, &segs, Heads::Mean, &[1])
        .expect("blocks")
        .total();
    let mut col = vec![0.0f32; col_n];
    let mut wb = vec![0.0f32; win_n];
    let plain = common::median_secs(3, || {
        ops::prefill_attention(cpu, &p, &q, &k, &v, &mut out).expect("prefill")
    });
    let with_col = common::median_secs(3, || {
        ops::prefill_attention_with(
            cpu,
            &p,
            &q,
            &k,
            &v,
            &mut out,
            PrefillEvidence {
                col_sums: Some((Heads::Sum, &mut col)),
                window: None,
            },
        )
        .expect("prefill")
    });
    let with_win = common::median_secs(3, || {
        ops::prefill_attention_with(
            cpu,
            &p,
            &q,
            &k,
            &v,
            &mut out,
            PrefillEvidence {
                col_sums: None,
                window: Some((win, &mut wb)),
            },
        )
        .expect("prefill")
    });
    [plain, with_col, with_win]
}

/// The child of part 3: prefill `n` tokens through `name`, print peak RSS.
fn rss_child(name: &str, n: usize) {
    let cpu = Cpu::new();
    let g = geom();
    let mut rng = Rng::new(13);
    let (q, k, v) = (
        rand_f16(&mut rng, n * HQ * D),
        rand_f16(&mut rng, n * HKV * D),
        rand_f16(&mut rng, n * HKV * D),
    );
    let start = Instant::now();
    let mut s =
        Session::new(cpu, g, 1, 1, policy(name), SessionConfig::default()).expect("session");
    s.prefill(
        &Ragged::from_lens(&[n as u32]).expect("rows"),
        &[LayerInput {
            q: &q,
            k: &k,
            v: &v,
        }],
    )
    .expect("prefill");
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    println!(
        "RSS {name} {hwm} {:.1} {}",
        start.elapsed().as_secs_f64(),
        s.cache().allocated_bytes()
    );
}

fn main() {
    if let (Ok(name), Ok(n)) = (
        std::env::var("KVSIEVE_BENCH_RSS_CHILD"),
        std::env::var("KVSIEVE_BENCH_RSS_LEN"),
    ) {
        rss_child(&name, n.parse().expect("length"));
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let only = std::env::var("KVSIEVE_BENCH_ONLY").ok();
    let policies: Vec<&str> = ["full", "h2o", "tova", "caote_h2o", "morph_kv"]
        .into_iter()
        .filter(|p| only.as_deref().is_none_or(|o| o == *p))
        .collect();
    for threads in common::thread_counts() {
        let cpu = Cpu::new().pool(common::pool(threads));
        let mut plain = Plain::new(&cpu);
        let (base, with_probs) = plain_pair(&cpu, &mut plain);
        println!(
            "kvsieve-policies | decode {threads} thr | plain dense decode over {BUDGET} tokens | {:>8.3} ms",
            base * 1e3
        );
        println!(
            "kvsieve-policies | decode {threads} thr | the same with group-mean weights | {:>8.3} ms | {:>5.2}x plain",
            with_probs * 1e3,
            with_probs / base
        );
        for &name in &policies {
            let (t, tp, th) = decode_step(&cpu, name, &mut plain);
            println!(
                "kvsieve-policies | decode {threads} thr | {name:<10} step at budget {BUDGET} | {:>8.3} ms | plain between steps {:>8.3} ms | {:>5.2}x plain | policy hooks {:>6.3} ms",
                t * 1e3,
                tp * 1e3,
                t / tp,
                th * 1e3
            );
        }
        if only.is_some() {
            continue;
        }
        let [plain, col, win] = prefill(&cpu);
        println!(
            "kvsieve-policies | prefill {threads} thr | 8K plain {:.3} s | column sums {:.3} s ({:.3}x) | window {:.3} s ({:.3}x)",
            plain,
            col,
            col / plain,
            win,
            win / plain
        );
    }
    if std::env::var("KVSIEVE_BENCH_RSS").is_ok() {
        let n: usize = std::env::var("KVSIEVE_BENCH_RSS_LEN")
            .ok()
            .and_then(|x| x.parse().ok())
            .unwrap_or(32768);
        let exe = std::env::current_exe().expect("exe");
        let mut full = 0u64;
        for name in [
            "full",
            "h2o",
            "tova",
            "snapkv",
            "ems",
            "caote_h2o",
            "morph_kv",
        ] {
            let out = std::process::Command::new(&exe)
                .env("KVSIEVE_BENCH_RSS_CHILD", name)
                .env("KVSIEVE_BENCH_RSS_LEN", n.to_string())
                .output()
                .expect("child");
            let line = String::from_utf8_lossy(&out.stdout);
            let f: Vec<&str> = line
                .lines()
                .find(|l| l.starts_with("RSS "))
                .unwrap_or("RSS ? 0 0 0")
                .split_whitespace()
                .collect();
            let kb: u64 = f[2].parse().unwrap_or(0);
            if name == "full" {
                full = kb;
            }
            println!(
                "kvsieve-policies | memory | prefill {n} tokens through {name:<10} | peak RSS {:>7.1} MiB | {:.2}x full | {} s | KV allocated after {:.1} MiB",
                kb as f64 / 1024.0,
                kb as f64 / full.max(1) as f64,
                f[3],
                f[4].parse::<f64>().unwrap_or(0.0) / (1 << 20) as f64
            );
        }
    }
}
