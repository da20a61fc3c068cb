//! CUDA-specific checks beyond the conformance suite (`tests/ops.rs`, module `cuda::`):
//! every kernel loads, the no-device error, and the cases the suite's grid does not reach
//! (split-K over long contexts, GQA groups above 8 query heads per CTA, head dims on the
//! scalar path, determinism, unsupported shapes), and `every_kernel_is_launched`, which fails
//! when an entry of `src/cuda/kernels.rs` is never launched. GPU tests print `SKIPPED(cuda)`
//! without a device and fail under `KVSIEVE_REQUIRE=cuda`; with the feature `cuda-sim` they
//! run on the CPU simulator instead (always under `KVSIEVE_REQUIRE=cuda-sim`).
#![cfg(feature = "cuda")]

mod common;

use common::backends::{cuda, skip};
use common::*;
use half::bf16;
use kvsieve::cuda::{CudaBackend, KernelId};
use kvsieve::ops::{self, DecodeParams, EntmaxPrefillParams, PrefillParams};
use kvsieve::reference::Reference;
use kvsieve::*;

fn device() -> Option<&'static CudaBackend> {
    match cuda() {
        Ok(b) => Some(b),
        Err(reason) => {
            skip("cuda", &reason);
            None
        }
    }
}

#[test]
fn no_device_is_an_error_not_a_panic() {
    match CudaBackend::new(0) {
        Ok(b) => println!("cuda device: {:?} ({})", b.device_name(), b.arch()),
        Err(Error::NoDevice { backend, reason }) => {
            assert_eq!(backend, "cuda");
            assert!(!reason.is_empty());
        }
        Err(e) => panic!("expected NoDevice, got {e}"),
    }
}

#[test]
fn every_kernel_loads() {
    let Some(b) = device() else { return };
    let want: usize = KernelId::ALL.iter().map(|id| id.entries().len()).sum();
    assert_eq!(b.load_all_kernels().expect("load every kernel"), want);
}

/// Decode on the device against the reference (f64 on the same storage-rounded inputs).
#[allow(clippy::too_many_arguments)]
fn decode_vs_reference<T: Element>(
    b: &CudaBackend,
    hq: usize,
    hkv: usize,
    d: usize,
    lens: &[u32],
    norm: &Normalizer,
    seed: u64,
    tol: Tolerance,
) -> Vec<T> {
    let geom = HeadGeometry::new(hq, hkv, d).unwrap();
    let batch = lens.len() / hkv;
    let segs = Segments::packed(batch, hkv, lens).unwrap();
    let mut rng = Rng::new(seed);
    let q: Vec<T> = normal_vec(&mut rng, batch * hq * d, 1.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let p = DecodeParams {
        geom,
        segments: &segs,
        scale: None,
        normalizer: norm,
        restrict: Restrict::Dense,
    };
    let wide = |x: &[T]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
    let mut expect = vec![0.0f32; q.len()];
    ops::decode_attention(&Reference, &p, &wide(&q), &wide(&k), &wide(&v), &mut expect).unwrap();
    let mut out = b.zeros::<T>(q.len()).unwrap();
    let (qd, kd, vd) = (
        b.upload(&q).unwrap(),
        b.upload(&k).unwrap(),
        b.upload(&v).unwrap(),
    );
    ops::decode_attention(b, &p, &qd, &kd, &vd, &mut out).unwrap();
    let got = b.download(&out).unwrap();
    assert_close(
        &got.iter().map(|x| x.to_f64()).collect::<Vec<_>>(),
        &expect.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
        tol,
        &format!("cuda decode {} hq={hq} hkv={hkv} d={d} {norm:?}", T::DTYPE),
    );
    got
}

/// bf16 outputs: one rounding (2^-8 relative) on top of f32 accumulation.
const LOOSE: Tolerance = Tolerance {
    rel: 8e-3,
    abs: 4e-3,
};

#[test]
fn long_context_split_k_matches_reference() {
    let Some(b) = device() else { return };
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        let tol = Tolerance {
            rel: 1e-3,
            abs: 1e-4,
        };
        decode_vs_reference::<f32>(b, 8, 2, 128, &[40_000, 39_999], &norm, 1, tol);
        decode_vs_reference::<bf16>(b, 8, 2, 128, &[40_000, 12_345], &norm, 2, LOOSE);
    }
}

#[test]
fn wide_groups_and_scalar_head_dims_match_reference() {
    let Some(b) = device() else { return };
    let tol = Tolerance {
        rel: 1e-4,
        abs: 5e-5,
    };
    let norms = [
        Normalizer::Softmax,
        Normalizer::Entmax { alpha: 2.0 },
        Normalizer::EntmaxPerHead {
            alphas: (0..32).map(|h| 1.1 + 0.1 * (h % 9) as f32).collect(),
        },
    ];
    for norm in &norms {
        // G = 16: two CTAs of 8 query heads per KV head.
        decode_vs_reference::<f32>(b, 32, 2, 64, &[300, 77], norm, 3, tol);
        // D = 256: scalar path for f32, 16-byte path for bf16; D = 80 and 24.
        if !matches!(norm, Normalizer::EntmaxPerHead { .. }) {
            decode_vs_reference::<f32>(b, 4, 1, 256, &[1000], norm, 4, tol);
            decode_vs_reference::<bf16>(b, 4, 1, 256, &[1000], norm, 5, LOOSE);
            decode_vs_reference::<f32>(b, 4, 2, 80, &[333, 5], norm, 6, tol);
            decode_vs_reference::<f32>(b, 2, 2, 24, &[64, 0], norm, 7, tol);
        }
    }
}

#[test]
fn decode_is_deterministic() {
    let Some(b) = device() else { return };
    let a = decode_vs_reference::<bf16>(
        b,
        8,
        2,
        128,
        &[20_000, 9_000],
        &Normalizer::Softmax,
        8,
        LOOSE,
    );
    let c = decode_vs_reference::<bf16>(
        b,
        8,
        2,
        128,
        &[20_000, 9_000],
        &Normalizer::Softmax,
        8,
        LOOSE,
    );
    assert_eq!(a, c, "two identical decode calls differ");
}

#[test]
fn unsupported_shapes_are_errors() {
    let Some(b) = device() else { return };
    let geom = HeadGeometry::new(1, 1, 512).unwrap();
    let segs = Segments::uniform(1, 1, 4).unwrap();
    let q = b.upload(&vec![0.5f32; 512]).unwrap();
    let kv = b.upload(&vec![0.5f32; 4 * 512]).unwrap();
    let mut out = b.zeros::<f32>(512).unwrap();
    let p = DecodeParams {
        geom,
        segments: &segs,
        scale: None,
        normalizer: &Normalizer::Softmax,
        restrict: Restrict::Dense,
    };
    let err = ops::decode_attention(b, &p, &q, &kv, &kv, &mut out).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
}

#[test]
fn entmax_prefill_backward_matches_reference() {
    let Some(b) = device() else { return };
    for (causal, d, seed) in [(true, 64, 11u64), (false, 65, 12), (true, 128, 13)] {
        let geom = HeadGeometry::new(4, 2, d).unwrap();
        let segs = Segments::with_capacity(2, 2, 40, vec![37, 20, 33, 9]).unwrap();
        let q_rows = Ragged::from_lens(&[9, 5]).unwrap();
        let mut rng = Rng::new(seed);
        let nq = q_rows.total() * 4 * d;
        let q: Vec<f32> = normal_vec(&mut rng, nq, 2.0);
        let k: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
        let v: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
        let dout: Vec<f32> = normal_vec(&mut rng, nq, 1.0);
        let alphas = [1.5f32, 2.0, 1.25, 1.75];
        let p = EntmaxPrefillParams {
            geom,
            q_rows: &q_rows,
            segments: &segs,
            causal,
            alphas: &alphas,
            scale: None,
            block_q: 16,
            block_k: 16,
            skip_blocks: true,
        };
        let nt = q_rows.total() * 4;
        let (mut out, mut tau) = (vec![0.0f32; nq], vec![0.0f32; nt]);
        ops::entmax_prefill(&Reference, &p, &q, &k, &v, &mut out, &mut tau).unwrap();
        let (mut dq, mut dk, mut dv, mut da) = (
            vec![0.0f32; nq],
            vec![0.0f32; k.len()],
            vec![0.0f32; k.len()],
            vec![0.0f32; 4],
        );
        ops::entmax_prefill_backward(
            &Reference, &p, &q, &k, &v, &tau, &dout, &mut dq, &mut dk, &mut dv, &mut da,
        )
        .unwrap();
        let up = |x: &[f32]| b.upload(x).unwrap();
        let (mut gq, mut gk, mut gv, mut ga) = (
            b.zeros::<f32>(nq).unwrap(),
            up(&vec![7.0f32; k.len()]),
            up(&vec![7.0f32; k.len()]),
            b.zeros::<f32>(4).unwrap(),
        );
        ops::entmax_prefill_backward(
            b,
            &p,
            &up(&q),
            &up(&k),
            &up(&v),
            &up(&tau),
            &up(&dout),
            &mut gq,
            &mut gk,
            &mut gv,
            &mut ga,
        )
        .unwrap();
        let tol = Tolerance {
            rel: 2e-3,
            abs: 2e-3,
        };
        let w = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        let ctx = format!("cuda entmax_prefill_backward causal={causal} d={d}");
        assert_close(
            &w(&b.download(&gq).unwrap()),
            &w(&dq),
            tol,
            &format!("{ctx} dq"),
        );
        assert_close(
            &w(&b.download(&gk).unwrap()),
            &w(&dk),
            tol,
            &format!("{ctx} dk"),
        );
        assert_close(
            &w(&b.download(&gv).unwrap()),
            &w(&dv),
            tol,
            &format!("{ctx} dv"),
        );
        assert_close(
            &w(&b.download(&ga).unwrap()),
            &w(&da),
            Tolerance {
                rel: 1e-2,
                abs: 1e-2,
            },
            &format!("{ctx} dalpha"),
        );
    }
}

/// A backend instance of its own (same engine as [`device`]), so that its launch log holds
/// only this test's launches.
fn fresh(b: &CudaBackend) -> CudaBackend {
    #[cfg(feature = "cuda-sim")]
    if b.is_simulator() {
        return CudaBackend::simulator().expect("simulator");
    }
    let _ = b;
    CudaBackend::new(0).expect("device 0")
}

/// Every op once per dtype, kernel variant (vec / scalar, h4 / h8) and normaliser, each
/// checked against the reference at a tolerance that catches wrong results (not precision:
/// that is the conformance suite's job).
fn cover_dtype<T: Element>(b: &CudaBackend) {
    let tol = Tolerance {
        rel: 3e-2,
        abs: 3e-2,
    };
    let w = |x: &[T]| x.iter().map(|v| v.to_f64()).collect::<Vec<_>>();
    let w32 = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    let mut rng = Rng::new(77);
    // Cache ops (compact = gather + scatter).
    let width = 24;
    let segs = Segments::uniform(1, 2, 40).unwrap();
    let src: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * width, 1.0);
    let idx: Vec<u32> = (0..30).map(|i| (i * 7) % 80).collect();
    let (mut want, mut got) = (
        vec![T::default(); 30 * width],
        b.zeros::<T>(30 * width).unwrap(),
    );
    ops::gather_rows(&Reference, width, &idx, &src, &mut want).unwrap();
    ops::gather_rows(b, width, &idx, &b.upload(&src).unwrap(), &mut got).unwrap();
    assert_eq!(b.download(&got).unwrap(), want, "gather_rows {}", T::DTYPE);
    let keep: Vec<IndexSet> = (0..2)
        .map(|_| IndexSet::from_unsorted((0..40).filter(|i| i % 3 != 1).collect()))
        .collect();
    let keep = IndexList::from_sets(Scope::KvHead, &keep).unwrap();
    let mut want = src.clone();
    ops::compact_rows(&Reference, width, &segs, &keep, &mut want).unwrap();
    let mut got = b.upload(&src).unwrap();
    ops::compact_rows(b, width, &segs, &keep, &mut got).unwrap();
    assert_eq!(b.download(&got).unwrap(), want, "compact_rows {}", T::DTYPE);
    let dests: Vec<u32> = (0..10).map(|i| i * 8 + 3).collect();
    let rows: Vec<T> = normal_vec(&mut rng, 10 * width, 1.0);
    let mut want = src.clone();
    ops::scatter_rows(&Reference, width, &dests, &rows, &mut want).unwrap();
    let mut got = b.upload(&src).unwrap();
    ops::scatter_rows(b, width, &dests, &b.upload(&rows).unwrap(), &mut got).unwrap();
    assert_eq!(b.download(&got).unwrap(), want, "scatter_rows {}", T::DTYPE);
    let groups = Ragged::from_lens(&[2, 3]).unwrap();
    let (members, weights) = ([1u32, 5, 9, 2, 70], [0.5f32, 0.25, 1.0, -1.0, 2.0]);
    let (mut want, mut got) = (
        vec![T::default(); 2 * width],
        b.zeros::<T>(2 * width).unwrap(),
    );
    ops::merge_rows(
        &Reference, width, &groups, &members, &weights, &src, &mut want,
    )
    .unwrap();
    let up_src = b.upload(&src).unwrap();
    ops::merge_rows(b, width, &groups, &members, &weights, &up_src, &mut got).unwrap();
    assert_close(
        &w(&b.download(&got).unwrap()),
        &w(&want),
        tol,
        &format!("merge_rows {}", T::DTYPE),
    );

    // Attention-like kernels: D 64 (vec) / 65 (scalar), GQA 2 (h4) / 8 (h8).
    for d in [64, 65] {
        for g in [2, 8] {
            let geom = HeadGeometry::new(2 * g, 2, d).unwrap();
            let segs = Segments::with_capacity(1, 2, 40, vec![37, 40]).unwrap();
            let q: Vec<T> = normal_vec(&mut rng, 2 * g * d, 1.0);
            let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
            let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
            let (qd, kd, vd) = (
                b.upload(&q).unwrap(),
                b.upload(&k).unwrap(),
                b.upload(&v).unwrap(),
            );
            let ctx = format!("{} d={d} g={g}", T::DTYPE);
            for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
                let p = DecodeParams {
                    geom,
                    segments: &segs,
                    scale: None,
                    normalizer: &norm,
                    restrict: Restrict::Dense,
                };
                let mut want = vec![T::default(); q.len()];
                ops::decode_attention(&Reference, &p, &q, &k, &v, &mut want).unwrap();
                let mut got = b.zeros::<T>(q.len()).unwrap();
                ops::decode_attention(b, &p, &qd, &kd, &vd, &mut got).unwrap();
                let got = b.download(&got).unwrap();
                assert_close(&w(&got), &w(&want), tol, &format!("decode {ctx} {norm:?}"));
            }
            let q_rows = Ragged::from_lens(&[1]).unwrap();
            let qp = ops::QkParams {
                geom,
                q_rows: &q_rows,
                segments: &segs,
                causal: false,
                scale: None,
            };
            let n = ops::qk_layout(&qp).unwrap().blocks.total();
            let (mut want, mut got) = (vec![0.0f32; n], b.zeros::<f32>(n).unwrap());
            ops::qk_logits(&Reference, &qp, &q, &k, &mut want).unwrap();
            ops::qk_logits(b, &qp, &qd, &kd, &mut got).unwrap();
            assert_close(
                &w32(&b.download(&got).unwrap()),
                &w32(&want),
                tol,
                &format!("qk_logits {ctx}"),
            );
        }
        // Entmax prefill (tiles) and its backward (rows and keys kernels).
        let geom = HeadGeometry::new(4, 2, d).unwrap();
        let segs = Segments::with_capacity(1, 2, 20, vec![20, 17]).unwrap();
        let q_rows = Ragged::from_lens(&[6]).unwrap();
        let nq = 6 * 4 * d;
        let q: Vec<T> = normal_vec(&mut rng, nq, 2.0);
        let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
        let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
        let dout: Vec<T> = normal_vec(&mut rng, nq, 1.0);
        let alphas = [1.5f32, 2.0, 1.25, 1.75];
        let p = EntmaxPrefillParams {
            geom,
            q_rows: &q_rows,
            segments: &segs,
            causal: true,
            alphas: &alphas,
            scale: None,
            block_q: 4,
            block_k: 4,
            skip_blocks: true,
        };
        let (mut out, mut tau) = (vec![T::default(); nq], vec![0.0f32; 24]);
        ops::entmax_prefill(&Reference, &p, &q, &k, &v, &mut out, &mut tau).unwrap();
        let (qd, kd, vd) = (
            b.upload(&q).unwrap(),
            b.upload(&k).unwrap(),
            b.upload(&v).unwrap(),
        );
        let (mut got, mut gtau) = (b.zeros::<T>(nq).unwrap(), b.zeros::<f32>(24).unwrap());
        ops::entmax_prefill(b, &p, &qd, &kd, &vd, &mut got, &mut gtau).unwrap();
        let ctx = format!("entmax_prefill {} d={d}", T::DTYPE);
        assert_close(&w(&b.download(&got).unwrap()), &w(&out), tol, &ctx);
        let kn = k.len();
        let (mut dq, mut dk, mut dv, mut da) = (
            vec![0.0f32; nq],
            vec![0.0f32; kn],
            vec![0.0f32; kn],
            vec![0.0f32; 4],
        );
        ops::entmax_prefill_backward(
            &Reference, &p, &q, &k, &v, &tau, &dout, &mut dq, &mut dk, &mut dv, &mut da,
        )
        .unwrap();
        let (mut gq, mut gk, mut gv, mut ga) = (
            b.zeros::<f32>(nq).unwrap(),
            b.zeros::<f32>(kn).unwrap(),
            b.zeros::<f32>(kn).unwrap(),
            b.zeros::<f32>(4).unwrap(),
        );
        ops::entmax_prefill_backward(
            b,
            &p,
            &qd,
            &kd,
            &vd,
            &b.upload(&tau).unwrap(),
            &b.upload(&dout).unwrap(),
            &mut gq,
            &mut gk,
            &mut gv,
            &mut ga,
        )
        .unwrap();
        let bt = Tolerance {
            rel: 5e-2,
            abs: 5e-2,
        };
        assert_close(
            &w32(&b.download(&gq).unwrap()),
            &w32(&dq),
            bt,
            &format!("{ctx} dq"),
        );
        assert_close(
            &w32(&b.download(&gk).unwrap()),
            &w32(&dk),
            bt,
            &format!("{ctx} dk"),
        );
        assert_close(
            &w32(&b.download(&gv).unwrap()),
            &w32(&dv),
            bt,
            &format!("{ctx} dv"),
        );
    }
}

#[test]
fn every_kernel_is_launched() {
    let Some(shared) = device() else { return };
    let b = &fresh(shared);
    // Row normalisers and selection (f32 rows by contract).
    let rows = Ragged::from_lens(&[5, 300, 0, 33]).unwrap();
    let mut rng = Rng::new(5);
    let x: Vec<f32> = normal_vec(&mut rng, rows.total(), 2.0);
    let xd = b.upload(&x).unwrap();
    let w32 = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    let (mut want, mut got) = (vec![0.0f32; x.len()], b.zeros::<f32>(x.len()).unwrap());
    ops::softmax_rows(&Reference, &rows, &x, &mut want).unwrap();
    ops::softmax_rows(b, &rows, &xd, &mut got).unwrap();
    assert_close(
        &w32(&b.download(&got).unwrap()),
        &w32(&want),
        F32,
        "softmax_rows",
    );
    ops::entmax_rows(&Reference, &rows, &[1.5], &x, &mut want).unwrap();
    ops::entmax_rows(b, &rows, &[1.5], &xd, &mut got).unwrap();
    let tol = Tolerance {
        rel: 0.0,
        abs: 1e-5,
    };
    assert_close(
        &w32(&b.download(&got).unwrap()),
        &w32(&want),
        tol,
        "entmax_rows",
    );
    let want = ops::topk_rows(&Reference, &rows, 7, Scope::KvHead, &x).unwrap();
    let got = ops::topk_rows(b, &rows, 7, Scope::KvHead, &xd).unwrap();
    assert_eq!(got.indices(), want.indices(), "topk_rows");
    assert_eq!(
        ops::count_above(b, &rows, &xd, 0.5).unwrap(),
        ops::count_above(&Reference, &rows, &x, 0.5).unwrap(),
        "count_above"
    );
    cover_dtype::<f32>(b);
    cover_dtype::<half::f16>(b);
    cover_dtype::<bf16>(b);

    let launched = b.launched_kernels();
    let never: Vec<&str> = KernelId::ALL
        .iter()
        .flat_map(|id| id.entries())
        .filter(|e| !launched.contains(e))
        .collect();
    assert!(
        never.is_empty(),
        "kernels of src/cuda/kernels.rs never launched: {never:?} (add a case here)"
    );
}

/// Random shapes the grid of the conformance suite does not hold (any head dim up to 256,
/// GQA groups 1–12, ragged batches with empty segments, every restriction and scope,
/// random α), decode and prefill against the reference on f32 storage. 40 cases on the
/// simulator, 200 on a GPU; `KVSIEVE_FUZZ_SEED` and `KVSIEVE_FUZZ_CASES` (simulator) change
/// the seed and the count.
#[test]
fn random_shapes_match_reference() {
    let Some(b) = device() else { return };
    let tol = Tolerance {
        rel: 1e-4,
        abs: 5e-5,
    };
    let mut rng = Rng::new(
        std::env::var("KVSIEVE_FUZZ_SEED")
            .map(|s| s.parse().unwrap())
            .unwrap_or(2026),
    );
    let cases = if b.is_simulator() {
        std::env::var("KVSIEVE_FUZZ_CASES")
            .map(|s| s.parse().unwrap())
            .unwrap_or(40)
    } else {
        200
    };
    for case in 0..cases {
        let d = 1 + rng.below(256);
        let (hkv, g) = (1 + rng.below(3), 1 + rng.below(12));
        let hq = hkv * g;
        let batch = 1 + rng.below(3);
        let geom = HeadGeometry::new(hq, hkv, d).unwrap();
        let lens: Vec<u32> = (0..batch * hkv)
            .map(|_| match rng.below(4) {
                0 => rng.below(3) as u32,
                _ => rng.below(700) as u32,
            })
            .collect();
        let segs = Segments::packed(batch, hkv, &lens).unwrap();
        let q: Vec<f32> = normal_vec(&mut rng, batch * hq * d, 2.0);
        let k: Vec<f32> = normal_vec(&mut rng, segs.rows_needed().max(1) * d, 1.0);
        let v: Vec<f32> = normal_vec(&mut rng, segs.rows_needed().max(1) * d, 1.0);
        let norm = match rng.below(3) {
            0 => Normalizer::Softmax,
            1 => Normalizer::Entmax {
                alpha: 1.1 + rng.uniform() as f32 * 1.4,
            },
            _ => Normalizer::EntmaxPerHead {
                alphas: (0..hq).map(|_| 1.1 + rng.uniform() as f32 * 1.4).collect(),
            },
        };
        let scope = if rng.below(2) == 0 {
            Scope::KvHead
        } else {
            Scope::QueryHead
        };
        let lists = match scope {
            Scope::KvHead => batch * hkv,
            Scope::QueryHead => batch * hq,
        };
        let len_of = |i: usize| match scope {
            Scope::KvHead => lens[i],
            Scope::QueryHead => lens[(i / hq) * hkv + (i % hq) / g],
        };
        let sets: Vec<IndexSet> = (0..lists)
            .map(|i| {
                IndexSet::from_unsorted((0..len_of(i)).filter(|_| rng.uniform() < 0.4).collect())
            })
            .collect();
        let list = IndexList::from_sets(scope, &sets).unwrap();
        let masks: Vec<BitMask> = (0..lists)
            .map(|i| {
                BitMask::from_bools(
                    &(0..len_of(i))
                        .map(|_| rng.uniform() < 0.5)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        let masks = MaskList::from_masks(scope, &masks).unwrap();
        let restrict = match rng.below(3) {
            0 => Restrict::Dense,
            1 => Restrict::Indices(&list),
            _ => Restrict::Mask(&masks),
        };
        let p = DecodeParams {
            geom,
            segments: &segs,
            scale: None,
            normalizer: &norm,
            restrict,
        };
        let mut want = vec![0.0f32; q.len()];
        ops::decode_attention(&Reference, &p, &q, &k, &v, &mut want).unwrap();
        let mut got = b.zeros::<f32>(q.len()).unwrap();
        let (qd, kd, vd) = (
            b.upload(&q).unwrap(),
            b.upload(&k).unwrap(),
            b.upload(&v).unwrap(),
        );
        ops::decode_attention(b, &p, &qd, &kd, &vd, &mut got).unwrap();
        let w = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
        let ctx = format!("case {case}: decode {geom:?} lens {lens:?} {norm:?} {restrict:?}");
        assert_close(&w(&b.download(&got).unwrap()), &w(&want), tol, &ctx);

        // Prefill: up to 5 causal query rows per sequence (at most its shortest segment).
        let nq: Vec<u32> = (0..batch)
            .map(|s| {
                let shortest = (0..hkv).map(|h| lens[s * hkv + h]).min().unwrap_or(0);
                (1 + rng.below(5) as u32).min(shortest)
            })
            .collect();
        let q_rows = Ragged::from_lens(&nq).unwrap();
        let qp: Vec<f32> = normal_vec(&mut rng, q_rows.total() * hq * d, 2.0);
        let causal = rng.below(2) == 0;
        let pp = PrefillParams {
            geom,
            q_rows: &q_rows,
            segments: &segs,
            causal,
            mask: None,
            scale: None,
            normalizer: &norm,
        };
        let mut want = vec![0.0f32; qp.len()];
        ops::prefill_attention(&Reference, &pp, &qp, &k, &v, &mut want).unwrap();
        let mut got = b.zeros::<f32>(qp.len()).unwrap();
        ops::prefill_attention(b, &pp, &b.upload(&qp).unwrap(), &kd, &vd, &mut got).unwrap();
        let ctx = format!(
            "case {case}: prefill {geom:?} lens {lens:?} q {nq:?} causal={causal} {norm:?}"
        );
        assert_close(&w(&b.download(&got).unwrap()), &w(&want), tol, &ctx);
    }
}
