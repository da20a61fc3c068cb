//! wgpu-specific checks: the known-gaps ledger against behaviour, the f16
//! word fallback, 16-bit padding, large dispatches. The op conformance suite
//! itself runs on wgpu through `backend_suite!` in `tests/ops.rs`.
#![cfg(feature = "wgpu")]

mod common;

use common::backends::{skip, wgpu_device};
use common::*;
use half::{bf16, f16};
use kvsieve::ops::{self, DecodeParams, EntmaxPrefillParams, PrefillParams, QkParams};
use kvsieve::reference::Reference;
use kvsieve::wgpu::gaps::{GAPS, is_gap};
use kvsieve::wgpu::{Wgpu, WgpuOptions};
use kvsieve::*;

/// Every op of `kvsieve::Ops`, by stem, and whether it takes a storage dtype
/// (the others work on f32 logits only).
const OPS: [(&str, bool); 15] = [
    ("softmax_rows", false),
    ("entmax_rows", false),
    ("qk_logits", true),
    ("value_distances", true),
    ("topk_rows", false),
    ("count_above", false),
    ("gather_rows", true),
    ("compact_rows", true),
    ("scatter_rows", true),
    ("merge_rows", true),
    ("decode_attention", true),
    ("decode_attention_paged", true),
    ("prefill_attention", true),
    ("entmax_prefill", true),
    ("entmax_prefill_backward", true),
];

/// Runs `op` once on a small valid input with storage `T`.
fn run_op<T: Element>(b: &Wgpu, op: &str) -> Result<()> {
    let geom = HeadGeometry::new(4, 2, 8)?;
    let segs = Segments::uniform(1, 2, 5)?;
    let mut rng = Rng::new(9);
    let rows = Ragged::from_lens(&[5, 3])?;
    let x = b.upload(&Dist::Normal(1.0).sample(&mut rng, 8))?;
    let mut out = b.zeros::<f32>(8)?;
    let q = b.upload(&normal_vec::<T>(&mut rng, 4 * 8, 1.0))?;
    let k = b.upload(&normal_vec::<T>(&mut rng, 10 * 8, 1.0))?;
    let v = b.upload(&normal_vec::<T>(&mut rng, 10 * 8, 1.0))?;
    let q_rows = Ragged::from_lens(&[1])?;
    let entmax_p = EntmaxPrefillParams {
        geom,
        q_rows: &q_rows,
        segments: &segs,
        causal: true,
        alphas: &[1.5],
        scale: None,
        block_q: 16,
        block_k: 16,
        skip_blocks: true,
    };
    match op {
        "softmax_rows" => ops::softmax_rows(b, &rows, &x, &mut out),
        "entmax_rows" => ops::entmax_rows(b, &rows, &[1.5], &x, &mut out),
        "topk_rows" => ops::topk_rows(b, &rows, 2, Scope::KvHead, &x).map(drop),
        "count_above" => ops::count_above(b, &rows, &x, 0.0).map(drop),
        "qk_logits" => {
            let p = QkParams {
                geom,
                q_rows: &q_rows,
                segments: &segs,
                causal: true,
                scale: None,
            };
            let mut z = b.zeros::<f32>(ops::qk_layout(&p)?.blocks.total())?;
            ops::qk_logits(b, &p, &q, &k, &mut z).map(drop)
        }
        "value_distances" => {
            let w = b.upload(&[0.25f32; 10])?;
            let mut dist = b.zeros::<f32>(10)?;
            ops::value_distances(
                b,
                geom,
                &segs,
                kvsieve::backend::Heads::Sum,
                false,
                &w,
                &v,
                &mut dist,
                None,
            )
        }
        "gather_rows" => {
            let mut dst = b.zeros::<T>(16)?;
            ops::gather_rows(b, 8, &[3, 1], &k, &mut dst)
        }
        "compact_rows" => {
            let keep = IndexList::from_sets(
                Scope::KvHead,
                &[IndexSet::new(vec![1, 4])?, IndexSet::new(vec![0])?],
            )?;
            let mut kk = b.upload(&b.download(&k)?)?;
            ops::compact_rows(b, 8, &segs, &keep, &mut kk).map(drop)
        }
        "scatter_rows" => {
            let mut dst = b.upload(&b.download(&k)?)?;
            let rows = b.upload(&normal_vec::<T>(&mut rng, 16, 1.0))?;
            ops::scatter_rows(b, 8, &[7, 2], &rows, &mut dst)
        }
        "merge_rows" => {
            let mut dst = b.zeros::<T>(16)?;
            let groups = Ragged::from_lens(&[2, 1])?;
            ops::merge_rows(b, 8, &groups, &[0, 1, 2], &[0.5, 0.5, 1.0], &k, &mut dst)
        }
        "decode_attention" => {
            let mut o = b.zeros::<T>(4 * 8)?;
            let p = DecodeParams {
                geom,
                segments: &segs,
                scale: None,
                normalizer: &Normalizer::Softmax,
                restrict: Restrict::Dense,
            };
            ops::decode_attention(b, &p, &q, &k, &v, &mut o)
        }
        "decode_attention_paged" => {
            // The 10 rows of `k` / `v` as a pool of 5 HND pages of 1 slot
            // (2 KV heads), two pages per KV head's 2 tokens.
            let pages = PageTable::new(PageTableParts {
                layout: PageLayout::Hnd,
                page_size: 1,
                num_pages: 5,
                num_kv_heads: 2,
                scope: PageScope::Sequence,
                page_indptr: vec![0, 2],
                page_indices: vec![3, 1],
                last_page_len: vec![1],
            })?;
            let mut o = b.zeros::<T>(4 * 8)?;
            let p = ops::PagedDecodeParams {
                geom,
                pages: &pages,
                scale: None,
                normalizer: &Normalizer::Softmax,
                restrict: Restrict::Dense,
            };
            ops::decode_attention_paged(b, &p, &q, &k, &v, &mut o)
        }
        "prefill_attention" => {
            let mut o = b.zeros::<T>(4 * 8)?;
            let p = PrefillParams {
                geom,
                q_rows: &q_rows,
                segments: &segs,
                causal: true,
                mask: None,
                scale: None,
                normalizer: &Normalizer::Softmax,
            };
            ops::prefill_attention(b, &p, &q, &k, &v, &mut o)
        }
        "entmax_prefill" => {
            let mut o = b.zeros::<T>(4 * 8)?;
            let mut tau = b.zeros::<f32>(4)?;
            ops::entmax_prefill(b, &entmax_p, &q, &k, &v, &mut o, &mut tau).map(drop)
        }
        "entmax_prefill_backward" => {
            let mut o = b.zeros::<T>(4 * 8)?;
            let mut tau = b.zeros::<f32>(4)?;
            ops::entmax_prefill(b, &entmax_p, &q, &k, &v, &mut o, &mut tau)?;
            let (mut dq, mut dk, mut dv, mut da) = (
                b.zeros::<f32>(4 * 8)?,
                b.zeros::<f32>(10 * 8)?,
                b.zeros::<f32>(10 * 8)?,
                b.zeros::<f32>(4)?,
            );
            ops::entmax_prefill_backward(
                b, &entmax_p, &q, &k, &v, &tau, &o, &mut dq, &mut dk, &mut dv, &mut da,
            )
        }
        other => panic!("unknown op {other}"),
    }
}

fn run_dtype(b: &Wgpu, op: &str, dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 => run_op::<f32>(b, op),
        DType::F16 => run_op::<f16>(b, op),
        DType::BF16 => run_op::<bf16>(b, op),
    }
}

#[test]
fn gaps_ledger_entries_are_well_formed() {
    for g in GAPS {
        assert!(
            OPS.iter().any(|(op, _)| *op == g.op),
            "ledger names unknown op {}",
            g.op
        );
        assert!(!g.reason.is_empty() && g.issue > 0, "{g:?}");
    }
}

#[test]
fn gaps_ledger_matches_behaviour() {
    let Some(b) = wgpu_device() else { return };
    for (op, typed) in OPS {
        let dtypes: &[DType] = if typed { &DType::ALL } else { &[DType::F32] };
        for &dtype in dtypes {
            match (run_dtype(&b, op, dtype), is_gap(op, dtype)) {
                (Ok(()), false) => {}
                (
                    Err(Error::Unsupported {
                        op: o, dtype: d, ..
                    }),
                    true,
                ) => {
                    assert_eq!((o, d), (op, dtype));
                }
                (Ok(()), true) => panic!("{op}/{dtype} works: remove it from the ledger"),
                (Err(e), true) => panic!("{op}/{dtype} is in the ledger but fails with {e}"),
                (Err(e), false) => panic!("{op}/{dtype} fails and is not in the ledger: {e}"),
            }
        }
    }
}

#[test]
fn reports_adapter() {
    let Some(b) = wgpu_device() else { return };
    let info = b.adapter_info();
    eprintln!(
        "wgpu adapter: {} ({:?}, {:?}), native f16: {}",
        info.name,
        info.backend,
        info.device_type,
        b.native_f16()
    );
}

#[test]
fn odd_length_16bit_buffers_round_trip() {
    let Some(b) = wgpu_device() else { return };
    let mut rng = Rng::new(3);
    for n in [0usize, 1, 7, 64, 65] {
        let h: Vec<f16> = normal_vec(&mut rng, n, 1.0);
        assert_eq!(b.download(&b.upload(&h).unwrap()).unwrap(), h, "f16 n={n}");
        let h: Vec<bf16> = normal_vec(&mut rng, n, 1.0);
        assert_eq!(b.download(&b.upload(&h).unwrap()).unwrap(), h, "bf16 n={n}");
    }
}

/// The `u32`-word f16 path (adapters without `shader-f16`) gives the same
/// results as the native one on every f16 op.
#[test]
fn f16_word_fallback_matches_native() {
    let Some(native) = wgpu_device() else { return };
    let words = match Wgpu::with_options(WgpuOptions { shader_f16: false }) {
        Ok(b) => b,
        Err(e) => {
            skip("wgpu", &e.to_string());
            return;
        }
    };
    assert!(!words.native_f16());
    let geom = HeadGeometry::new(8, 2, 65).unwrap();
    let segs = Segments::packed(2, 2, &[33, 7, 129, 1]).unwrap();
    let mut rng = Rng::new(11);
    let q: Vec<f16> = normal_vec(&mut rng, 2 * 8 * 65, 2.0);
    let k: Vec<f16> = normal_vec(&mut rng, segs.rows_needed() * 65, 1.0);
    let v: Vec<f16> = normal_vec(&mut rng, segs.rows_needed() * 65, 1.0);
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        let p = DecodeParams {
            geom,
            segments: &segs,
            scale: None,
            normalizer: &norm,
            restrict: Restrict::Dense,
        };
        let mut expect = vec![f16::ZERO; q.len()];
        ops::decode_attention(&Reference, &p, &q, &k, &v, &mut expect).unwrap();
        let run = |b: &Wgpu| {
            let mut out = b.zeros::<f16>(q.len()).unwrap();
            let (qb, kb, vb) = (
                b.upload(&q).unwrap(),
                b.upload(&k).unwrap(),
                b.upload(&v).unwrap(),
            );
            ops::decode_attention(b, &p, &qb, &kb, &vb, &mut out).unwrap();
            b.download(&out).unwrap()
        };
        let (a, w) = (run(&native), run(&words));
        assert_eq!(a, w, "{norm:?}: native and word f16 paths differ");
        let err = a
            .iter()
            .zip(&expect)
            .map(|(x, y)| (x.to_f64() - y.to_f64()).abs())
            .fold(0.0, f64::max);
        assert!(err < 4e-3, "{norm:?}: f16 error {err}");
    }
}

/// More rows than one dispatch dimension holds (65 535 workgroups): the
/// 2-D dispatch path.
#[test]
fn more_rows_than_one_dispatch_dimension() {
    let Some(b) = wgpu_device() else { return };
    let n = 70_000usize;
    let rows = Ragged::uniform(n, 2).unwrap();
    let mut rng = Rng::new(5);
    let x = Dist::Normal(1.0).sample(&mut rng, 2 * n);
    let mut expect = vec![0.0f32; 2 * n];
    ops::softmax_rows(&Reference, &rows, &x, &mut expect).unwrap();
    let mut out = b.zeros::<f32>(2 * n).unwrap();
    ops::softmax_rows(&b, &rows, &b.upload(&x).unwrap(), &mut out).unwrap();
    let got = b.download(&out).unwrap();
    let wide = |v: &[f32]| v.iter().map(|&x| f64::from(x)).collect::<Vec<_>>();
    assert_close(&wide(&got), &wide(&expect), F32, "softmax 70k rows");
}

fn max_abs(x: &[f32]) -> f64 {
    x.iter().map(|v| f64::from(v.abs())).fold(0.0, f64::max)
}

fn backward_case<T: Element>(
    b: &Wgpu,
    geom: HeadGeometry,
    lens: &[u32],
    nq: &[u32],
    causal: bool,
    alphas: &[f32],
) {
    let segs = Segments::packed(nq.len(), geom.num_kv_heads(), lens).unwrap();
    let q_rows = Ragged::from_lens(nq).unwrap();
    let d = geom.head_dim();
    let hq = geom.num_q_heads();
    let mut rng = Rng::new(77 + lens[0] as u64);
    let qn = q_rows.total() * hq * d;
    let kn = segs.rows_needed() * d;
    let q: Vec<T> = normal_vec(&mut rng, qn, 3.0);
    let k: Vec<T> = normal_vec(&mut rng, kn, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, kn, 1.0);
    let dout: Vec<T> = normal_vec(&mut rng, qn, 1.0);
    let p = EntmaxPrefillParams {
        geom,
        q_rows: &q_rows,
        segments: &segs,
        causal,
        alphas,
        scale: None,
        block_q: 16,
        block_k: 16,
        skip_blocks: true,
    };
    let nt = q_rows.total() * hq;
    let mut out = vec![T::default(); qn];
    let mut tau = vec![0.0f32; nt];
    ops::entmax_prefill(&Reference, &p, &q, &k, &v, &mut out, &mut tau).unwrap();
    let (mut dq, mut dk, mut dv, mut da) = (
        vec![0.0f32; qn],
        vec![0.0f32; kn],
        vec![0.0f32; kn],
        vec![0.0f32; hq],
    );
    ops::entmax_prefill_backward(
        &Reference, &p, &q, &k, &v, &tau, &dout, &mut dq, &mut dk, &mut dv, &mut da,
    )
    .unwrap();
    let (mut gq, mut gk, mut gv, mut ga) = (
        b.zeros::<f32>(qn).unwrap(),
        b.zeros::<f32>(kn).unwrap(),
        b.zeros::<f32>(kn).unwrap(),
        b.zeros::<f32>(hq).unwrap(),
    );
    ops::entmax_prefill_backward(
        b,
        &p,
        &b.upload(&q).unwrap(),
        &b.upload(&k).unwrap(),
        &b.upload(&v).unwrap(),
        &b.upload(&tau).unwrap(),
        &b.upload(&dout).unwrap(),
        &mut gq,
        &mut gk,
        &mut gv,
        &mut ga,
    )
    .unwrap();
    let ctx = format!(
        "backward {} {geom:?} lens={lens:?} nq={nq:?} causal={causal}",
        T::DTYPE
    );
    let wide = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
    for (name, got, want) in [
        ("dq", b.download(&gq).unwrap(), dq),
        ("dk", b.download(&gk).unwrap(), dk),
        ("dv", b.download(&gv).unwrap(), dv),
        ("dalpha", b.download(&ga).unwrap(), da),
    ] {
        let tol = Tolerance {
            rel: 1e-3,
            abs: 1e-4 * max_abs(&want).max(1.0),
        };
        assert_close(&wide(&got), &wide(&want), tol, &format!("{ctx}: {name}"));
    }
}

/// The backward has no conformance body in `tests/ops.rs` yet: check it here
/// against the reference (ragged batch, GQA, causal and not, α per head).
#[test]
fn entmax_prefill_backward_matches_reference() {
    let Some(b) = wgpu_device() else { return };
    let g4 = HeadGeometry::new(8, 2, 16).unwrap();
    let g1 = HeadGeometry::new(2, 2, 65).unwrap();
    let alphas = [1.5, 1.25, 1.75, 1.5, 1.5, 1.25, 1.75, 1.5];
    for causal in [true, false] {
        backward_case::<f32>(&b, g4, &[37, 20, 50, 9], &[5, 9], causal, &alphas);
        backward_case::<f32>(&b, g1, &[130, 33, 7, 40], &[7, 3], causal, &alphas[..2]);
        backward_case::<f16>(&b, g4, &[37, 20, 50, 9], &[5, 9], causal, &[1.5]);
        backward_case::<bf16>(&b, g1, &[130, 33, 7, 40], &[7, 3], causal, &alphas[..2]);
    }
}

/// The special-value rules of `docs/numerics.md` on the device: NaN or +inf
/// in a row gives NaN, an all `-inf` row gives zeros, ±1e4 logits give no
/// NaN; top-k ranks NaN below `-inf` below finite values, ties to the lower
/// index; `count_above` never counts NaN.
#[test]
fn special_values_follow_the_numerics_rules() {
    let Some(b) = wgpu_device() else { return };
    let (inf, nan) = (f32::INFINITY, f32::NAN);
    let rows_in: Vec<Vec<f32>> = vec![
        vec![1.0, nan, 0.5],
        vec![inf, 0.0, -1.0],
        vec![-inf, -inf, -inf],
        vec![1e4, -1e4, 1e4, 0.0],
        vec![-inf, 2.0, -inf, 2.0, 1.0],
        vec![0.0, -0.0, nan, -inf, 3.0, 3.0],
    ];
    let lens: Vec<u32> = rows_in.iter().map(|r| r.len() as u32).collect();
    let rows = Ragged::from_lens(&lens).unwrap();
    let x: Vec<f32> = rows_in.concat();
    let xb = b.upload(&x).unwrap();
    let same = |a: f32, e: f32| (a.is_nan() && e.is_nan()) || (a - e).abs() <= 1e-6;
    for alpha in [None, Some(1.5f32), Some(1.25)] {
        let mut want = vec![0.0f32; x.len()];
        let mut got = b.zeros::<f32>(x.len()).unwrap();
        match alpha {
            None => {
                ops::softmax_rows(&Reference, &rows, &x, &mut want).unwrap();
                ops::softmax_rows(&b, &rows, &xb, &mut got).unwrap();
            }
            Some(a) => {
                ops::entmax_rows(&Reference, &rows, &[a], &x, &mut want).unwrap();
                ops::entmax_rows(&b, &rows, &[a], &xb, &mut got).unwrap();
            }
        }
        let got = b.download(&got).unwrap();
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            assert!(same(g, w), "alpha {alpha:?}: index {i}: got {g}, want {w}");
        }
    }
    for k in [1usize, 2, 3, 5] {
        let want = ops::topk_rows(&Reference, &rows, k, Scope::QueryHead, &x).unwrap();
        let got = ops::topk_rows(&b, &rows, k, Scope::QueryHead, &xb).unwrap();
        assert_eq!(got, want, "top-{k}");
    }
    for t in [f32::NEG_INFINITY, -1e4, 0.0, -0.0, 2.0, f32::INFINITY] {
        assert_eq!(
            ops::count_above(&b, &rows, &xb, t).unwrap(),
            ops::count_above(&Reference, &rows, &x, t).unwrap(),
            "count_above {t}"
        );
    }
}

/// Issue #17, finding 1, on the WGSL row normaliser: for α > 2 and long rows
/// the Halley window reached past max s and emptied the support (all-zero or
/// NaN rows); rows of ties must come out uniform.
#[test]
fn entmax_alpha_above_2_is_never_all_zeros() {
    let Some(b) = wgpu_device() else { return };
    for (alpha, n) in [(65.5f32, 2usize), (4.0, 195), (8.0, 1000), (1e9, 3)] {
        let rows = Ragged::uniform(1, n).unwrap();
        let x = b.upload(&vec![0.0f32; n]).unwrap();
        let mut out = b.zeros::<f32>(n).unwrap();
        ops::entmax_rows(&b, &rows, &[alpha], &x, &mut out).unwrap();
        let got = b.download(&out).unwrap();
        let want = vec![1.0 / n as f64; n];
        assert_close(
            &got.iter().map(|&p| f64::from(p)).collect::<Vec<_>>(),
            &want,
            F32,
            &format!("wgpu entmax_rows alpha {alpha} n {n}"),
        );
    }
}
