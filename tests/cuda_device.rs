//! CUDA-specific checks beyond the conformance suite (`tests/ops.rs`, module `cuda::`):
//! every kernel loads, the no-device error, and the cases the suite's grid does not reach
//! (split-K over long contexts, GQA groups above 8 query heads per CTA, head dims on the
//! scalar path, determinism, unsupported shapes). GPU tests print `SKIPPED(cuda)` without a
//! device and fail under `KVSIEVE_REQUIRE=cuda`.
#![cfg(feature = "cuda")]

mod common;

use common::backends::{cuda, skip};
use common::*;
use half::bf16;
use kvsieve::cuda::{CudaBackend, KernelId};
use kvsieve::ops::{self, DecodeParams, EntmaxPrefillParams};
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
