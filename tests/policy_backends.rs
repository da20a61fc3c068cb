//! Every policy on every backend against the same policy on the reference,
//! teacher-forced: a multi-step run (prefill, then decode steps) whose
//! inputs come from a fixed trace, not from the outputs, on a tie-free
//! random trace, must keep the same tokens at every step and give the same
//! attention outputs within the f32 attention tolerance of
//! `docs/numerics.md`. Covers every name of `eval::policies::POLICIES`, DAM
//! (fixed patterns: its prefill masks and decode lists) and MorphKV's exact
//! re-scoring mode, in f32 and f16 storage.
//!
//! Stateful policies compact their own state when they emit a plan, so the
//! reference's plan cannot be forced onto another backend's policy; the
//! trace is continuous random data, where top-k near-ties (the only
//! legitimate source of divergence) do not occur at these sizes.

mod common;

use common::*;
use kvsieve::attention::{LayerInput, Session, SessionConfig};
use kvsieve::eval::policies::{POLICIES, make_policy};
use kvsieve::policy::{Dam, HeadPattern, KvPolicy, MorphKv, MorphKvConfig, MorphScoring};
use kvsieve::reference::Reference;
use kvsieve::*;

struct Trace {
    geom: HeadGeometry,
    tokens: Ragged,
    prefill: Vec<[Vec<f32>; 3]>,
    decode: Vec<Vec<[Vec<f32>; 3]>>,
}

fn trace() -> Trace {
    let geom = HeadGeometry::new(8, 2, 16).unwrap();
    let tokens = Ragged::from_lens(&[40, 29]).unwrap();
    let mut rng = Rng::new(31);
    let (hq, hkv, d) = (8, 2, 16);
    let layer = |rng: &mut Rng, n: usize| -> [Vec<f32>; 3] {
        [
            normal_vec(rng, n * hq * d, 1.5),
            normal_vec(rng, n * hkv * d, 1.0),
            normal_vec(rng, n * hkv * d, 1.0),
        ]
    };
    let prefill = (0..2).map(|_| layer(&mut rng, tokens.total())).collect();
    let decode = (0..24)
        .map(|_| (0..2).map(|_| layer(&mut rng, 2)).collect())
        .collect();
    Trace {
        geom,
        tokens,
        prefill,
        decode,
    }
}

/// The policy `name` (a `POLICIES` name, `dam` or `morph_kv_rescore`).
fn policy<B: Ops + 'static, T: Element>(name: &str) -> Box<dyn KvPolicy<B, T>> {
    match name {
        "dam" => {
            let p = |d: Vec<u32>, v: Vec<u32>| HeadPattern {
                diagonals: d,
                verticals: v,
            };
            let pats = (0..2 * 8)
                .map(|i| p((0..3 + i as u32 % 5).collect(), vec![0, 1 + i as u32 % 7]))
                .collect();
            Box::new(Dam::from_patterns(2, 8, 64, pats).unwrap())
        }
        "morph_kv_rescore" => Box::new(
            MorphKv::new(MorphKvConfig {
                window: 8,
                capacity: 24,
                scoring: MorphScoring::Rescore,
                ..MorphKvConfig::default()
            })
            .unwrap(),
        ),
        _ => make_policy::<B, T>(name, 24).unwrap(),
    }
}

/// Runs `name` on backend `b`; returns per-step outputs and kept positions.
#[allow(clippy::type_complexity)]
fn run<B: Ops + Clone + 'static, T: Element>(
    b: &B,
    t: &Trace,
    name: &str,
) -> (Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<u32>>>) {
    let mut s = Session::new(
        b.clone(),
        t.geom,
        2,
        2,
        policy::<B, T>(name),
        SessionConfig::default(),
    )
    .unwrap();
    let up = |x: &Vec<f32>| {
        b.upload(&x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>())
            .unwrap()
    };
    let bufs: Vec<[B::Buffer<T>; 3]> = t
        .prefill
        .iter()
        .map(|l| [up(&l[0]), up(&l[1]), up(&l[2])])
        .collect();
    let inputs: Vec<LayerInput<'_, B, T>> = bufs
        .iter()
        .map(|[q, k, v]| LayerInput { q, k, v })
        .collect();
    s.prefill(&t.tokens, &inputs).unwrap();
    let (mut outs, mut kept) = (Vec::new(), Vec::new());
    for step in &t.decode {
        let bufs: Vec<[B::Buffer<T>; 3]> = step
            .iter()
            .map(|l| [up(&l[0]), up(&l[1]), up(&l[2])])
            .collect();
        let inputs: Vec<LayerInput<'_, B, T>> = bufs
            .iter()
            .map(|[q, k, v]| LayerInput { q, k, v })
            .collect();
        let o = s.decode(&inputs).unwrap();
        outs.push(
            o.iter()
                .map(|x| b.download(x).unwrap().iter().map(|v| v.to_f32()).collect())
                .collect(),
        );
        let layer = s.cache().layer(1).unwrap();
        kept.push(
            (0..4)
                .map(|seg| {
                    let mut p = layer.positions(seg).to_vec();
                    p.sort_unstable();
                    p
                })
                .collect(),
        );
    }
    (outs, kept)
}

fn policies_match_reference<B: Ops + Clone + 'static>(b: &B) {
    let t = trace();
    let names = POLICIES.iter().chain(&["dam", "morph_kv_rescore"]);
    for name in names.clone() {
        compare::<B, f32>(b, &t, name);
    }
    for name in ["h2o", "tova", "caote_h2o", "morph_kv", "snapkv", "dam"] {
        compare::<B, half::f16>(b, &t, name);
    }
}

fn compare<B: Ops + Clone + 'static, T: Element>(b: &B, t: &Trace, name: &str) {
    {
        let (want_out, want_kept) = run::<Reference, T>(&Reference, t, name);
        let (got_out, got_kept) = run::<B, T>(b, t, name);
        for (step, (g, w)) in got_kept.iter().zip(&want_kept).enumerate() {
            assert_eq!(
                g,
                w,
                "{}: {name} {}: kept tokens differ at decode step {step}",
                b.name(),
                T::DTYPE
            );
        }
        for (step, (g, w)) in got_out.iter().zip(&want_out).enumerate() {
            for (l, (gl, wl)) in g.iter().zip(w).enumerate() {
                let wide = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
                let ctx = format!("{}: {name} {}: step {step} layer {l}", b.name(), T::DTYPE);
                // f16 storage: the outputs are rounded once (≤ 2^-11
                // relative) after f32 accumulation on both sides.
                let tol = if T::DTYPE == DType::F32 {
                    Tolerance {
                        rel: 1e-4,
                        abs: 5e-5,
                    }
                } else {
                    Tolerance {
                        rel: 2e-3,
                        abs: 2e-3,
                    }
                };
                assert_close(&wide(gl), &wide(wl), tol, &ctx);
            }
        }
    }
}

backend_suite!(policies_match_reference);
