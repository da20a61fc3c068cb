//! Entmax attention (AdaSplash) in the reference: the tiled forward equals
//! prefill attention with the entmax normaliser, block skipping changes
//! nothing, and the three-pass backward matches finite differences (f64)
//! and the worked gradient examples of `algorithms.md` §1.7.

mod common;

use common::*;
use kvsieve::ops::{self, EntmaxPrefillParams, PrefillParams};
use kvsieve::reference::{EntmaxHead, Reference};
use kvsieve::*;

fn normal(rng: &mut Rng, n: usize, s: f64) -> Vec<f64> {
    (0..n).map(|_| s * rng.normal()).collect()
}

/// `L = Σ d_out · out` for a head.
fn loss(h: &EntmaxHead<'_>, d_out: &[f64]) -> f64 {
    h.forward().0.iter().zip(d_out).map(|(a, b)| a * b).sum()
}

/// Central differences of `L` with respect to every entry of `x`, where
/// `rebuild(x)` evaluates the loss.
fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    (0..x.len())
        .map(|i| {
            let mut a = x.to_vec();
            a[i] += h;
            let up = f(&a);
            a[i] -= 2.0 * h;
            (up - f(&a)) / (2.0 * h)
        })
        .collect()
}

#[test]
fn backward_matches_finite_differences() {
    let mut rng = Rng::new(11);
    for (case, alpha) in [1.25, 1.5, 2.0, 1.5].into_iter().enumerate() {
        let causal = case % 2 == 1;
        let (nq, nk, d) = (3, 5, 4);
        let q = normal(&mut rng, nq * d, 1.5);
        let k = normal(&mut rng, nk * d, 1.0);
        let v = normal(&mut rng, nk * d, 1.0);
        let dout = normal(&mut rng, nq * d, 1.0);
        let head = |q: &[f64], k: &[f64], v: &[f64], alpha: f64| {
            let h = EntmaxHead {
                q,
                k,
                v,
                d,
                causal,
                scale: 0.7,
                alpha,
            };
            loss(&h, &dout)
        };
        let h = EntmaxHead {
            q: &q,
            k: &k,
            v: &v,
            d,
            causal,
            scale: 0.7,
            alpha,
        };
        let (_, tau) = h.forward();
        let g = h.backward(&tau, &dout);
        let tol = Tolerance {
            rel: 1e-5,
            abs: 1e-6,
        };
        let ctx = format!("alpha={alpha} causal={causal}");
        assert_close(
            &g.dq,
            &numeric_grad(&q, |x| head(x, &k, &v, alpha)),
            tol,
            &format!("{ctx} dq"),
        );
        assert_close(
            &g.dk,
            &numeric_grad(&k, |x| head(&q, x, &v, alpha)),
            tol,
            &format!("{ctx} dk"),
        );
        assert_close(
            &g.dv,
            &numeric_grad(&v, |x| head(&q, &k, x, alpha)),
            tol,
            &format!("{ctx} dv"),
        );
        let da = numeric_grad(&[alpha], |a| head(&q, &k, &v, a[0]))[0];
        assert_close(
            &[g.dalpha],
            &[da],
            Tolerance {
                rel: 1e-4,
                abs: 1e-6,
            },
            &format!("{ctx} dalpha"),
        );
    }
}

/// One query over one-hot keys and values: logits = q, out = p, dq = dz.
fn one_hot_grad(z: [f64; 4], dy: [f64; 4]) -> Vec<f64> {
    let eye: Vec<f64> = (0..16)
        .map(|i| if i % 5 == 0 { 1.0 } else { 0.0 })
        .collect();
    let h = EntmaxHead {
        q: &z,
        k: &eye,
        v: &eye,
        d: 4,
        causal: false,
        scale: 1.0,
        alpha: 1.5,
    };
    let (p, tau) = h.forward();
    assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    h.backward(&tau, &dy).dq
}

#[test]
fn worked_gradient_examples() {
    let tol = Tolerance {
        rel: 0.0,
        abs: 1e-9,
    };
    let a = [2.0, 1.0, 0.0, -1.0];
    assert_close(
        &one_hot_grad(a, [1.0, 0.0, 0.0, 0.0]),
        &[0.283473354757, -0.283473354757, 0.0, 0.0],
        tol,
        "A",
    );
    assert_close(
        &one_hot_grad(a, [1.0, 2.0, 3.0, 4.0]),
        &[-0.283473354757, 0.283473354757, 0.0, 0.0],
        tol,
        "A2",
    );
    let b = [1.0, 0.8, 0.2, -0.5];
    assert_close(
        &one_hot_grad(b, [1.0, 2.0, 3.0, 4.0]),
        &[-0.544823372353, 0.149443255822, 0.395380116531, 0.0],
        tol,
        "B",
    );
    let c = [0.5, 0.4, 0.3, 0.2];
    let dz = one_hot_grad(c, [1.0, 2.0, 3.0, 4.0]);
    assert_close(
        &dz,
        &[
            -0.785863610436,
            -0.195287870145,
            0.295287870145,
            0.685863610436,
        ],
        tol,
        "C",
    );
    // Jacobian rows sum to zero: the gradient of a shift is zero.
    assert!(dz.iter().sum::<f64>().abs() < 1e-12);
}

struct Case {
    geom: HeadGeometry,
    q_rows: Ragged,
    segs: Segments,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}

fn case(seed: u64, q_scale: f64) -> Case {
    let geom = HeadGeometry::new(4, 2, 16).unwrap();
    let segs = Segments::packed(2, 2, &[70, 70, 33, 33]).unwrap();
    let q_rows = Ragged::from_lens(&[40, 33]).unwrap();
    let mut rng = Rng::new(seed);
    Case {
        geom,
        q: normal_vec(&mut rng, q_rows.total() * 4 * 16, q_scale),
        k: normal_vec(&mut rng, segs.rows_needed() * 16, 1.0),
        v: normal_vec(&mut rng, segs.rows_needed() * 16, 1.0),
        q_rows,
        segs,
    }
}

fn params<'a>(c: &'a Case, alphas: &'a [f32], causal: bool, skip: bool) -> EntmaxPrefillParams<'a> {
    EntmaxPrefillParams {
        geom: c.geom,
        q_rows: &c.q_rows,
        segments: &c.segs,
        causal,
        alphas,
        scale: None,
        block_q: 16,
        block_k: 16,
        skip_blocks: skip,
    }
}

fn forward(c: &Case, p: &EntmaxPrefillParams<'_>) -> (Vec<f32>, Vec<f32>, BlockStats) {
    let mut out = vec![0.0f32; c.q.len()];
    let mut tau = vec![0.0f32; c.q_rows.total() * 4];
    let st = ops::entmax_prefill(&Reference, p, &c.q, &c.k, &c.v, &mut out, &mut tau).unwrap();
    (out, tau, st)
}

#[test]
fn forward_equals_prefill_attention_with_entmax() {
    let c = case(3, 2.0);
    for causal in [true, false] {
        let (out, _, _) = forward(&c, &params(&c, &[1.5], causal, true));
        let norm = Normalizer::Entmax { alpha: 1.5 };
        let pp = PrefillParams {
            geom: c.geom,
            q_rows: &c.q_rows,
            segments: &c.segs,
            causal,
            mask: None,
            scale: None,
            normalizer: &norm,
        };
        let mut expect = vec![0.0f32; c.q.len()];
        ops::prefill_attention(&Reference, &pp, &c.q, &c.k, &c.v, &mut expect).unwrap();
        let wide = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        assert_close(
            &wide(&out),
            &wide(&expect),
            Tolerance {
                rel: 1e-6,
                abs: 1e-6,
            },
            "entmax_prefill vs prefill_attention",
        );
    }
}

#[test]
fn block_skipping_changes_nothing_and_skips_tiles() {
    // Sharp logits (large q): small supports, so most tiles are dead.
    let c = case(4, 6.0);
    let alphas = [1.25f32, 1.5, 2.0, 1.75];
    for causal in [true, false] {
        let (o1, t1, s1) = forward(&c, &params(&c, &alphas, causal, true));
        let (o2, t2, s2) = forward(&c, &params(&c, &alphas, causal, false));
        assert_eq!(o1, o2, "block skipping must not change the output");
        assert_eq!(t1, t2);
        assert_eq!(s1, s2, "stats describe the mask, not the visiting order");
        assert!(
            s1.live_tiles < s1.visible_tiles,
            "expected dead tiles: {s1:?}"
        );
        // Backward: equal with and without skipping.
        let mut rng = Rng::new(9);
        let dout: Vec<f32> = normal_vec(&mut rng, c.q.len(), 1.0);
        let grads = |skip: bool| {
            let p = params(&c, &alphas, causal, skip);
            let (mut dq, mut dk, mut dv, mut da) = (
                vec![0.0f32; c.q.len()],
                vec![0.0f32; c.k.len()],
                vec![0.0f32; c.k.len()],
                vec![0.0f32; 4],
            );
            ops::entmax_prefill_backward(
                &Reference, &p, &c.q, &c.k, &c.v, &t1, &dout, &mut dq, &mut dk, &mut dv, &mut da,
            )
            .unwrap();
            (dq, dk, dv, da)
        };
        assert_eq!(grads(true), grads(false));
    }
}

#[test]
fn op_backward_sums_gqa_groups() {
    // dK and dV of a KV head are the sums over its query heads, per sequence.
    let c = case(5, 1.0);
    let p = params(&c, &[1.5], true, true);
    let (_, tau, _) = forward(&c, &p);
    let mut rng = Rng::new(6);
    let dout: Vec<f32> = normal_vec(&mut rng, c.q.len(), 1.0);
    let (mut dq, mut dk, mut dv, mut da) = (
        vec![0.0f32; c.q.len()],
        vec![0.0f32; c.k.len()],
        vec![0.0f32; c.k.len()],
        vec![0.0f32; 4],
    );
    ops::entmax_prefill_backward(
        &Reference, &p, &c.q, &c.k, &c.v, &tau, &dout, &mut dq, &mut dk, &mut dv, &mut da,
    )
    .unwrap();
    let (hq, d) = (4, 16);
    let mut dk_expect = vec![0.0f64; c.k.len()];
    let mut da_expect = [0.0f64; 4];
    for b in 0..2 {
        for h in 0..hq {
            let s = c.segs.index(b, c.geom.kv_head(h));
            let rows = c.q_rows.range(b);
            let pick = |x: &[f32], r: std::ops::Range<usize>| -> Vec<f64> {
                r.flat_map(|r| {
                    x[(r * hq + h) * d..][..d]
                        .iter()
                        .map(|&v| f64::from(v))
                        .collect::<Vec<_>>()
                })
                .collect()
            };
            let kv = c.segs.rows_of(s);
            let wide = |x: &[f32]| {
                x[kv.start * d..kv.end * d]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect::<Vec<_>>()
            };
            let (q, k, v) = (pick(&c.q, rows.clone()), wide(&c.k), wide(&c.v));
            let head = EntmaxHead {
                q: &q,
                k: &k,
                v: &v,
                d,
                causal: true,
                scale: 0.25,
                alpha: 1.5,
            };
            let t: Vec<f64> = rows.clone().map(|r| f64::from(tau[r * hq + h])).collect();
            let g = head.backward(&t, &pick(&dout, rows));
            for (j, x) in g.dk.iter().enumerate() {
                dk_expect[kv.start * d + j] += x;
            }
            da_expect[h] += g.dalpha;
        }
    }
    let wide = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    assert_close(
        &wide(&dk),
        &dk_expect,
        Tolerance {
            rel: 1e-4,
            abs: 1e-5,
        },
        "dk",
    );
    assert_close(
        &wide(&da),
        &da_expect,
        Tolerance {
            rel: 1e-4,
            abs: 1e-5,
        },
        "dalpha",
    );
}

#[test]
fn bad_entmax_prefill_input() {
    let c = case(1, 1.0);
    let mut out = vec![0.0f32; c.q.len()];
    let mut tau = vec![0.0f32; c.q_rows.total() * 4];
    for (alphas, bq) in [(&[1.0f32][..], 16), (&[1.5, 1.5][..], 16), (&[1.5][..], 0)] {
        let p = EntmaxPrefillParams {
            block_q: bq,
            ..params(&c, alphas, true, true)
        };
        assert!(ops::entmax_prefill(&Reference, &p, &c.q, &c.k, &c.v, &mut out, &mut tau).is_err());
    }
    let p = params(&c, &[1.5], true, true);
    let mut short = vec![0.0f32; 3];
    assert!(ops::entmax_prefill(&Reference, &p, &c.q, &c.k, &c.v, &mut out, &mut short).is_err());
}
