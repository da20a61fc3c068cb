//! Every policy on every backend against the same policy on the reference:
//! a multi-step run (prefill, then decode steps) on a tie-free random trace
//! must keep the same tokens at every step and give the same attention
//! outputs within the f32 attention tolerance of `docs/numerics.md`.
//!
//! Stateful policies compact their own state when they emit a plan, so the
//! reference's plan cannot be forced onto another backend's policy; the
//! trace is continuous random data, where top-k near-ties (the only
//! legitimate source of divergence) do not occur at these sizes.

mod common;

use common::*;
use kvsieve::attention::{LayerInput, Session, SessionConfig};
use kvsieve::eval::policies::{POLICIES, make_policy};
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

/// Runs `name` on backend `b`; returns per-step outputs and kept positions.
#[allow(clippy::type_complexity)]
fn run<B: Ops + Clone + 'static>(
    b: &B,
    t: &Trace,
    name: &str,
) -> (Vec<Vec<Vec<f32>>>, Vec<Vec<Vec<u32>>>) {
    let policy = make_policy::<B, f32>(name, 24).unwrap();
    let mut s = Session::new(b.clone(), t.geom, 2, 2, policy, SessionConfig::default()).unwrap();
    let up = |x: &Vec<f32>| b.upload(x).unwrap();
    let bufs: Vec<[B::Buffer<f32>; 3]> = t
        .prefill
        .iter()
        .map(|l| [up(&l[0]), up(&l[1]), up(&l[2])])
        .collect();
    let inputs: Vec<LayerInput<'_, B, f32>> = bufs
        .iter()
        .map(|[q, k, v]| LayerInput { q, k, v })
        .collect();
    s.prefill(&t.tokens, &inputs).unwrap();
    let (mut outs, mut kept) = (Vec::new(), Vec::new());
    for step in &t.decode {
        let bufs: Vec<[B::Buffer<f32>; 3]> = step
            .iter()
            .map(|l| [up(&l[0]), up(&l[1]), up(&l[2])])
            .collect();
        let inputs: Vec<LayerInput<'_, B, f32>> = bufs
            .iter()
            .map(|[q, k, v]| LayerInput { q, k, v })
            .collect();
        let o = s.decode(&inputs).unwrap();
        outs.push(o.iter().map(|x| b.download(x).unwrap()).collect());
        let layer = s.cache().layer(1).unwrap();
        kept.push((0..4).map(|seg| layer.positions(seg).to_vec()).collect());
    }
    (outs, kept)
}

fn policies_match_reference<B: Ops + Clone + 'static>(b: &B) {
    let t = trace();
    for name in POLICIES {
        let (want_out, want_kept) = run(&Reference, &t, name);
        let (got_out, got_kept) = run(b, &t, name);
        for (step, (g, w)) in got_kept.iter().zip(&want_kept).enumerate() {
            assert_eq!(
                g,
                w,
                "{}: {name}: kept tokens differ at decode step {step}",
                b.name()
            );
        }
        for (step, (g, w)) in got_out.iter().zip(&want_out).enumerate() {
            for (l, (gl, wl)) in g.iter().zip(w).enumerate() {
                let wide = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
                let ctx = format!("{}: {name}: step {step} layer {l}", b.name());
                assert_close(
                    &wide(gl),
                    &wide(wl),
                    Tolerance {
                        rel: 1e-4,
                        abs: 5e-5,
                    },
                    &ctx,
                );
            }
        }
    }
}

backend_suite!(policies_match_reference);
