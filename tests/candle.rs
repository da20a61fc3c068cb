//! `kvsieve::candle`: tensors in and out of kvsieve's ops and `Session`.
//! Contiguous whole-storage CPU tensors are read in place and views are
//! copied correctly; the tensor wrappers and [`CandleSession`] give exactly
//! what the buffer API gives; bad tensors are errors.
#![cfg(feature = "candle")]

mod common;

use candle_core::{DType, Device, Tensor};
use kvsieve::attention::{LayerInput, Session};
use kvsieve::candle::{
    CandleSession, SessionConfig, borrows_storage, decode_attention, prefill_attention,
    with_host_vec,
};
use kvsieve::cpu::Cpu;
use kvsieve::eval::policies::make_policy;
use kvsieve::ops::{self, DecodeParams, PrefillParams};
use kvsieve::reference::Reference;
use kvsieve::{HeadGeometry, Normalizer, Ragged, Restrict, Segments};

const HQ: usize = 4;
const HKV: usize = 2;
const D: usize = 8;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = common::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn host(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn whole_contiguous_tensors_are_borrowed_and_views_copied() {
    let t = randn(&[6, 4], 1);
    assert!(borrows_storage::<f32>(&t));
    let addr = with_host_vec(&t, |v: &Vec<f32>| v.as_ptr() as usize).unwrap();
    let (storage, _) = t.storage_and_layout();
    let owned = match &*storage {
        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.as_ptr() as usize,
        _ => unreachable!(),
    };
    drop(storage);
    assert_eq!(addr, owned, "the tensor's own vector is handed out");
    let reshaped = t.reshape((2, 12)).unwrap();
    assert!(
        borrows_storage::<f32>(&reshaped),
        "reshape shares the storage"
    );
    for view in [
        t.narrow(0, 1, 3).unwrap(),
        t.narrow(1, 0, 2).unwrap(),
        t.t().unwrap(),
    ] {
        assert!(!borrows_storage::<f32>(&view));
        let got = with_host_vec(&view, |v: &Vec<f32>| v.clone()).unwrap();
        assert_eq!(got, host(&view.contiguous().unwrap()));
    }
    // The element type must match: no silent conversion.
    let h = t.to_dtype(DType::F16).unwrap();
    assert!(!borrows_storage::<f32>(&h));
    assert!(with_host_vec(&h, |_: &Vec<f32>| ()).is_err());
    assert!(borrows_storage::<half::f16>(&h));
    let ints = Tensor::new(&[1u32, 2, 3], &Device::Cpu).unwrap();
    assert!(with_host_vec(&ints, |_: &Vec<f32>| ()).is_err());
}

#[test]
fn tensor_ops_equal_buffer_ops() {
    let geom = HeadGeometry::new(HQ, HKV, D).unwrap();
    let n = 9;
    let segs = Segments::uniform(1, HKV, n).unwrap();
    // K/V as the cache stores them: [Hkv · n, D], head-major.
    let (k, v) = (randn(&[HKV * n, D], 2), randn(&[HKV * n, D], 3));
    let norm = Normalizer::Softmax;
    // Decode: one query; a transposed view on the way in takes the copy path.
    let q = randn(&[D, HQ], 4).t().unwrap();
    let p = DecodeParams {
        geom,
        segments: &segs,
        scale: None,
        normalizer: &norm,
        restrict: Restrict::Dense,
    };
    let got = decode_attention::<_, f32>(&Reference, &p, &q, &k, &v).unwrap();
    assert_eq!(got.dims(), &[1, HQ, D]);
    let mut want = vec![0f32; HQ * D];
    let qh = host(&q.contiguous().unwrap());
    ops::decode_attention(&Reference, &p, &qh, &host(&k), &host(&v), &mut want).unwrap();
    assert_eq!(host(&got), want);
    // Prefill: n causal queries.
    let q = randn(&[n, HQ, D], 5);
    let rows = Ragged::uniform(1, n).unwrap();
    let p = PrefillParams {
        geom,
        q_rows: &rows,
        segments: &segs,
        causal: true,
        mask: None,
        scale: None,
        normalizer: &norm,
    };
    let got = prefill_attention::<_, f32>(&Cpu::new(), &p, &q, &k, &v).unwrap();
    assert_eq!(got.dims(), &[n, HQ, D]);
    let mut want = vec![0f32; n * HQ * D];
    ops::prefill_attention(&Cpu::new(), &p, &host(&q), &host(&k), &host(&v), &mut want).unwrap();
    assert_eq!(host(&got), want);
    // Wrong sizes are errors, not panics.
    let short = randn(&[HQ * D - 1], 6);
    let p = DecodeParams {
        geom,
        segments: &segs,
        scale: None,
        normalizer: &norm,
        restrict: Restrict::Dense,
    };
    assert!(decode_attention::<_, f32>(&Reference, &p, &short, &k, &v).is_err());
}

/// The same prompt and decode steps through `CandleSession` and `Session`.
fn session_matches<B: kvsieve::candle::TensorBackend + 'static>(b: B, policy: &str, tol: f32) {
    let geom = HeadGeometry::new(HQ, HKV, D).unwrap();
    let mk = || make_policy::<B, f32>(policy, 16).unwrap();
    let mut cs =
        CandleSession::<B, f32>::new(b.clone(), geom, 1, 2, mk(), SessionConfig::default())
            .unwrap();
    let mut s = Session::<Cpu, f32>::new(
        Cpu::new(),
        geom,
        1,
        2,
        make_policy(policy, 16).unwrap(),
        SessionConfig::default(),
    )
    .unwrap();
    let close = |a: &[f32], b: &[f32], what: &str| {
        let err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(err <= tol, "{policy} {what}: max error {err}");
    };
    let n = 40;
    let rows = Ragged::uniform(1, n).unwrap();
    for l in 0..2 {
        let (q, k, v) = (
            randn(&[n, HQ, D], 10 + l as u64),
            randn(&[n, HKV, D], 20 + l as u64),
            randn(&[n, HKV, D], 30 + l as u64),
        );
        let got = cs.prefill_chunk_layer(l, &rows, &q, &k, &v, true).unwrap();
        assert_eq!(got.dims(), &[n, HQ, D]);
        let (qh, kh, vh) = (host(&q), host(&k), host(&v));
        let want = s
            .prefill_chunk_layer(
                l,
                &rows,
                &LayerInput {
                    q: &qh,
                    k: &kh,
                    v: &vh,
                },
                true,
            )
            .unwrap();
        close(&host(&got), &want, "prefill");
    }
    cs.end_prefill_chunk();
    s.end_prefill_chunk();
    for step in 0..6u64 {
        for l in 0..2 {
            let (q, k, v) = (
                randn(&[1, HQ * D], 100 + step * 7 + l as u64),
                randn(&[1, HKV * D], 200 + step * 7 + l as u64),
                randn(&[1, HKV * D], 300 + step * 7 + l as u64),
            );
            let (got, sel) = cs.decode_layer(l, &q, &k, &v).unwrap();
            assert_eq!(got.dims(), &[1, HQ, D]);
            let (qh, kh, vh) = (host(&q), host(&k), host(&v));
            let (want, want_sel) = s
                .decode_layer(
                    l,
                    &LayerInput {
                        q: &qh,
                        k: &kh,
                        v: &vh,
                    },
                )
                .unwrap();
            close(&host(&got), &want, "decode");
            assert_eq!(sel.is_some(), want_sel.is_some());
        }
        cs.end_decode_step();
        s.end_decode_step();
    }
    for l in 0..2 {
        assert_eq!(
            cs.session().cache().layer(l).unwrap().segments().lens(),
            s.cache().layer(l).unwrap().segments().lens(),
            "{policy} layer {l}"
        );
    }
}

#[test]
fn candle_session_equals_session_on_cpu() {
    for policy in ["full", "h2o", "snapkv", "token_select", "tidal_decode"] {
        session_matches(Cpu::new(), policy, 0.0);
    }
}

#[test]
fn candle_session_on_reference_is_close_to_cpu() {
    session_matches(Reference, "h2o", 1e-5);
}

#[cfg(feature = "wgpu")]
#[test]
fn candle_session_on_wgpu_is_close_to_cpu() {
    if let Some(b) = common::backends::wgpu_device() {
        session_matches(b.clone(), "full", 1e-4);
        session_matches(b, "tova", 1e-4);
    }
}

#[test]
fn candle_session_rejects_bad_tensors() {
    let geom = HeadGeometry::new(HQ, HKV, D).unwrap();
    let mut cs = CandleSession::<Cpu, f32>::new(
        Cpu::new(),
        geom,
        1,
        1,
        make_policy("full", 8).unwrap(),
        SessionConfig::default(),
    )
    .unwrap();
    let rows = Ragged::uniform(1, 3).unwrap();
    let (q, k) = (randn(&[3, HQ, D], 1), randn(&[3, HKV, D], 2));
    let bad = randn(&[3, HKV, D - 1], 3);
    assert!(
        cs.prefill_chunk_layer(0, &rows, &q, &k, &bad, true)
            .is_err()
    );
    let f16 = k.to_dtype(DType::F16).unwrap();
    assert!(
        cs.prefill_chunk_layer(0, &rows, &q, &k, &f16, true)
            .is_err()
    );
    assert!(cs.prefill_chunk_layer(3, &rows, &q, &k, &k, true).is_err());
    assert!(
        cs.decode_layer(0, &q, &k, &k).is_err(),
        "3 rows for a batch of 1"
    );
}
