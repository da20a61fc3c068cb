//! The reference backend against closed forms and the worked examples of
//! `shared/research/algorithms.md` (entmax A–C, TokenSelect §3.4, MorphKV
//! §4.5, CAOTE §5.4). The reference is never compared with another backend
//! here.

mod common;

use common::*;
use kvsieve::ops::{self, DecodeParams, PrefillParams, QkParams};
use kvsieve::reference::{Reference, entmax_f64, softmax_f64};
use kvsieve::*;

#[track_caller]
fn close(actual: &[f64], expected: &[f64], eps: f64) {
    assert_close(
        actual,
        expected,
        Tolerance { rel: 0.0, abs: eps },
        "worked example",
    );
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

// ------------------------------------------------------------ closed forms

#[test]
fn softmax_closed_forms() {
    // softmax([0, ln 3]) = [1/4, 3/4]; softmax of a constant row is uniform.
    close(&softmax_f64(&[0.0, 3f64.ln()]), &[0.25, 0.75], 1e-15);
    close(&softmax_f64(&[7.0; 4]), &[0.25; 4], 1e-15);
    // e^i / (e^1 + e^2 + e^3)
    let z = [1.0, 2.0, 3.0];
    let s: f64 = z.iter().map(|x: &f64| x.exp()).sum();
    close(&softmax_f64(&z), &z.map(|x| x.exp() / s), 1e-15);
}

#[test]
fn entmax_worked_example_a() {
    // α = 1.5, z = [2, 1, 0, −1]: p = [(4+√7)/8, (4−√7)/8, 0, 0].
    let r7 = 7f64.sqrt();
    let p = entmax_f64(&[2.0, 1.0, 0.0, -1.0], 1.5);
    close(&p, &[(4.0 + r7) / 8.0, (4.0 - r7) / 8.0, 0.0, 0.0], 1e-12);
    assert_eq!(&p[2..], &[0.0, 0.0], "entries below tau are exact zeros");
}

#[test]
fn entmax_worked_examples_b_and_c() {
    let p = entmax_f64(&[1.0, 0.8, 0.2, -0.5], 1.5);
    close(
        &p,
        &[0.516143837302743, 0.382457534921097, 0.101398627776160, 0.0],
        1e-9,
    );
    assert_eq!(p[3], 0.0);
    let p = entmax_f64(&[0.5, 0.4, 0.3, 0.2], 1.5);
    close(
        &p,
        &[
            0.327029775928819,
            0.272343258642940,
            0.222656741357060,
            0.177970224071181,
        ],
        1e-9,
    );
}

#[test]
fn entmax_other_alphas_on_example_a() {
    let z = [2.0, 1.0, 0.0, -1.0];
    // α = 2: entry 2 sits exactly on the threshold and gets 0.
    close(&entmax_f64(&z, 2.0), &[1.0, 0.0, 0.0, 0.0], 1e-12);
    close(
        &entmax_f64(&z, 1.75),
        &[0.901807134396, 0.098192865604, 0.0, 0.0],
        1e-9,
    );
    close(
        &entmax_f64(&z, 1.25),
        &[
            0.749986482300,
            0.214570235864,
            0.034379439206,
            0.001063842629,
        ],
        1e-9,
    );
}

#[test]
fn sparsemax_closed_form() {
    // sparsemax([0.5, 0.2, −1]): τ = (0.7 − 1)/2 = −0.15 → p = [0.65, 0.35, 0].
    close(
        &entmax_f64(&[0.5, 0.2, -1.0], 2.0),
        &[0.65, 0.35, 0.0],
        1e-12,
    );
}

#[test]
fn masking_rules() {
    let ninf = f64::NEG_INFINITY;
    for p in [softmax_f64(&[ninf, ninf]), entmax_f64(&[ninf, ninf], 1.5)] {
        assert_eq!(p, vec![0.0, 0.0], "a fully masked row is zeros, not NaN");
    }
    let p = softmax_f64(&[0.0, ninf, 0.0]);
    assert_eq!(p, vec![0.5, 0.0, 0.5]);
    let p = entmax_f64(&[1.0, ninf, 1.0], 1.5);
    close(&p, &[0.5, 0.0, 0.5], 1e-15); // ties at the max share mass
    assert_eq!(p[1], 0.0);
    // Huge logits: no NaN.
    for p in [
        softmax_f64(&[1e4, -1e4, 1e4]),
        entmax_f64(&[1e4, -1e4, 1e4], 1.5),
    ] {
        close(&p, &[0.5, 0.0, 0.5], 1e-12);
    }
    assert!(softmax_f64(&[0.0, f64::NAN]).iter().all(|x| x.is_nan()));
}

#[test]
fn host_helpers_match_reference_and_reject_bad_rows() {
    let p = softmax(&[0.0, 3f32.ln()]).unwrap();
    assert!((p[0] - 0.25).abs() < 1e-7 && (p[1] - 0.75).abs() < 1e-7);
    let p = entmax(&[2.0, 1.0, 0.0, -1.0], 1.5).unwrap();
    assert!((f64::from(p[0]) - 0.830718913883074).abs() < 1e-7);
    assert!(matches!(softmax(&[]), Err(Error::Shape { .. })));
    assert!(matches!(
        softmax(&[1.0, f32::NAN]),
        Err(Error::NonFinite { .. })
    ));
    assert!(matches!(
        entmax(&[1.0, f32::INFINITY], 1.5),
        Err(Error::NonFinite { .. })
    ));
    let e = entmax(&[1.0], 1.0).unwrap_err();
    assert!(
        e.to_string().contains("softmax"),
        "alpha = 1 points to softmax: {e}"
    );
    assert!(matches!(entmax(&[1.0], 0.5), Err(Error::Alpha { .. })));
    assert!(matches!(entmax(&[1.0], f32::NAN), Err(Error::Alpha { .. })));
}

// ------------------------------------------------------- worked examples via ops

#[test]
fn tokenselect_soft_vote_example() {
    // §3.4: two heads, five candidates; soft vote picks {0, 2}, summed logits tie.
    let rows = Ragged::uniform(2, 5).unwrap();
    let x = vec![4.0, 1.0, 0.0, 0.0, 3.0, 0.0, 2.0, 5.0, 0.0, 1.0];
    let mut p = vec![0.0f32; 10];
    ops::softmax_rows(&Reference, &rows, &x, &mut p).unwrap();
    close(
        &f64s(&p[..5]),
        &[0.6876, 0.0342, 0.0126, 0.0126, 0.2530],
        1e-4,
    );
    close(
        &f64s(&p[5..]),
        &[0.0062, 0.0460, 0.9246, 0.0062, 0.0169],
        1e-4,
    );
    let vote: Vec<f32> = (0..5).map(|j| p[j] + p[5 + j]).collect();
    close(
        &f64s(&vote),
        &[0.6938, 0.0803, 0.9372, 0.0188, 0.2699],
        1e-4,
    );
    let one = Ragged::uniform(1, 5).unwrap();
    let top = ops::topk_rows(&Reference, &one, 2, Scope::KvHead, &vote).unwrap();
    assert_eq!(top.list(0), &[0, 2]);
    // Summed logits [4, 3, 5, 0, 4]: tokens 0 and 4 tie for second; the lower index wins.
    let summed: Vec<f32> = (0..5).map(|j| x[j] + x[5 + j]).collect();
    let top = ops::topk_rows(&Reference, &one, 2, Scope::KvHead, &summed).unwrap();
    assert_eq!(top.list(0), &[0, 2]);
}

#[test]
fn morphkv_fusion_example() {
    // §4.5: W = 2 window rows over five old tokens, keep C − W = 3.
    let rows = Ragged::uniform(2, 5).unwrap();
    let x = vec![2.0, 0.0, 1.0, 0.0, 0.5, 0.0, 0.0, 3.0, 1.0, 0.0];
    let mut a = vec![0.0f32; 10];
    ops::softmax_rows(&Reference, &rows, &x, &mut a).unwrap();
    let sum: Vec<f32> = (0..5).map(|j| a[j] + a[5 + j]).collect();
    let max: Vec<f32> = (0..5).map(|j| a[j].max(a[5 + j])).collect();
    close(&f64s(&sum), &[0.5759, 0.1114, 0.9760, 0.1780, 0.1586], 1e-4);
    close(&f64s(&max), &[0.5371, 0.0727, 0.7784, 0.1053, 0.1199], 1e-4);
    let one = Ragged::uniform(1, 5).unwrap();
    let keep = |s: &[f32]| ops::topk_rows(&Reference, &one, 3, Scope::KvHead, &s.to_vec()).unwrap();
    assert_eq!(keep(&sum).list(0), &[0, 2, 3]);
    assert_eq!(keep(&max).list(0), &[0, 2, 4]);
}

/// One query over one-hot keys so that the logits equal `z`, values `v`.
fn caote_case(z: [f32; 3], v: [[f32; 2]; 3]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let geom = HeadGeometry::new(1, 1, 3).unwrap();
    let segs = Segments::uniform(1, 1, 3).unwrap();
    let k: Vec<f32> = vec![1., 0., 0., 0., 1., 0., 0., 0., 1.];
    let vv: Vec<f32> = v.iter().flat_map(|r| [r[0], r[1], 0.0]).collect();
    let q = z.to_vec();
    let norm = Normalizer::Softmax;
    let attend = |restrict: Restrict<'_>| {
        let mut out = vec![0.0f32; 3];
        let p = DecodeParams {
            geom,
            segments: &segs,
            scale: Some(1.0),
            normalizer: &norm,
            restrict,
        };
        ops::decode_attention(&Reference, &p, &q, &k, &vv, &mut out).unwrap();
        f64s(&out[..2])
    };
    let o = attend(Restrict::Dense);
    let alpha = softmax_f64(&z.map(f64::from));
    // CAOTE: c_j = a_j / (1 − a_j) · ‖o − v_j‖.
    let c: Vec<f64> = (0..3)
        .map(|j| {
            let d =
                ((o[0] - f64::from(v[j][0])).powi(2) + (o[1] - f64::from(v[j][1])).powi(2)).sqrt();
            alpha[j] / (1.0 - alpha[j]) * d
        })
        .collect();
    // Brute force: attention without token j, distance to o.
    let brute: Vec<f64> = (0..3u32)
        .map(|j| {
            let rest: Vec<u32> = (0..3).filter(|&i| i != j).collect();
            let list =
                IndexList::from_sets(Scope::KvHead, &[IndexSet::new(rest).unwrap()]).unwrap();
            let o2 = attend(Restrict::Indices(&list));
            ((o[0] - o2[0]).powi(2) + (o[1] - o2[1]).powi(2)).sqrt()
        })
        .collect();
    (o, c, brute)
}

#[test]
fn caote_worked_examples_and_brute_force_identity() {
    // §5.4 (a)
    let (o, c, brute) = caote_case([2.0, 1.0, 0.0], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]);
    close(&o, &[0.755272, 0.334759], 1e-6);
    close(&c, &[0.824052, 0.326123, 0.070130], 1e-6);
    close(&brute, &c, 1e-6);
    // §5.4 (b): CAOTE evicts token 2 although its attention is larger than token 3's.
    let (o, c, brute) = caote_case([2.0, 1.0, 0.0], [[1.0, 0.0], [0.8, 0.2], [-1.0, 2.0]]);
    close(&o, &[0.770993, 0.229007], 1e-6);
    close(&c, &[0.643591, 0.013292, 0.247796], 1e-6);
    close(&brute, &c, 1e-6);
}

// ------------------------------------------------------------ attention rules

#[test]
fn fully_masked_rows_give_zeros() {
    let geom = HeadGeometry::new(2, 1, 2).unwrap();
    let segs = Segments::uniform(1, 1, 3).unwrap();
    let q = vec![1.0f32; 4];
    let k = vec![1.0f32; 6];
    let v = vec![2.0f32; 6];
    let empty = IndexList::from_sets(Scope::KvHead, &[IndexSet::default()]).unwrap();
    let none =
        MaskList::from_masks(Scope::QueryHead, &[BitMask::zeros(3), BitMask::zeros(3)]).unwrap();
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        for restrict in [Restrict::Indices(&empty), Restrict::Mask(&none)] {
            let mut out = vec![f32::NAN; 4];
            let p = DecodeParams {
                geom,
                segments: &segs,
                scale: None,
                normalizer: &norm,
                restrict,
            };
            ops::decode_attention(&Reference, &p, &q, &k, &v, &mut out).unwrap();
            assert_eq!(out, vec![0.0; 4]);
        }
    }
    // An empty segment (a head evicted to nothing) is also zeros.
    let segs0 = Segments::uniform(1, 1, 0).unwrap();
    let mut out = vec![f32::NAN; 4];
    let norm = Normalizer::Softmax;
    let p = DecodeParams {
        geom,
        segments: &segs0,
        scale: None,
        normalizer: &norm,
        restrict: Restrict::Dense,
    };
    ops::decode_attention(&Reference, &p, &q, &vec![], &vec![], &mut out).unwrap();
    assert_eq!(out, vec![0.0; 4]);
}

#[test]
fn causal_prefill_first_row_copies_first_value() {
    // With causal masking, query 0 sees only key 0: its output is v_0 exactly.
    let geom = HeadGeometry::new(1, 1, 2).unwrap();
    let segs = Segments::uniform(1, 1, 3).unwrap();
    let q_rows = Ragged::uniform(1, 3).unwrap();
    let q = vec![0.3f32, -1.0, 2.0, 0.5, 1.0, 1.0];
    let k = vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
    let v = vec![5.0f32, -2.0, 1.0, 1.0, 0.0, 3.0];
    let mut out = vec![0.0f32; 6];
    let norm = Normalizer::Softmax;
    let p = PrefillParams {
        geom,
        q_rows: &q_rows,
        segments: &segs,
        causal: true,
        mask: None,
        scale: None,
        normalizer: &norm,
    };
    ops::prefill_attention(&Reference, &p, &q, &k, &v, &mut out).unwrap();
    assert_eq!(&out[..2], &[5.0, -2.0]);
    // The last row sees every key: equals a dense decode of that query.
    let segs1 = Segments::uniform(1, 1, 3).unwrap();
    let mut dec = vec![0.0f32; 2];
    let dp = DecodeParams {
        geom,
        segments: &segs1,
        scale: None,
        normalizer: &norm,
        restrict: Restrict::Dense,
    };
    ops::decode_attention(&Reference, &dp, &q[4..6].to_vec(), &k, &v, &mut dec).unwrap();
    assert_eq!(&out[4..6], &dec[..]);
}

#[test]
fn qk_logits_are_scaled_dots_with_causal_neg_inf() {
    let geom = HeadGeometry::new(1, 1, 2).unwrap();
    let segs = Segments::uniform(1, 1, 3).unwrap();
    let q_rows = Ragged::uniform(1, 2).unwrap();
    let q = vec![1.0f32, 2.0, 3.0, 4.0];
    let k = vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
    let p = QkParams {
        geom,
        q_rows: &q_rows,
        segments: &segs,
        causal: true,
        scale: Some(0.5),
    };
    let layout = ops::qk_layout(&p).unwrap();
    let mut out = vec![0.0f32; layout.blocks.total()];
    ops::qk_logits(&Reference, &p, &q, &k, &mut out).unwrap();
    // Query 0 sits at position 1 (bottom-right aligned): key 2 is masked.
    let ninf = f32::NEG_INFINITY;
    assert_eq!(out, vec![0.5, 1.0, ninf, 1.5, 2.0, 3.5]);
    assert_eq!(layout.rows.num_segments(), 2);
}

// ------------------------------------------------------------------ bad input

#[test]
fn bad_input_returns_errors_with_useful_messages() {
    let e = HeadGeometry::new(6, 4, 64).unwrap_err();
    assert!(e.to_string().contains("multiple"), "{e}");
    assert!(HeadGeometry::new(0, 0, 64).is_err());
    let geom = HeadGeometry::new(2, 1, 2).unwrap();
    let segs = Segments::uniform(1, 1, 3).unwrap();
    let norm = Normalizer::Softmax;
    let p = DecodeParams {
        geom,
        segments: &segs,
        scale: None,
        normalizer: &norm,
        restrict: Restrict::Dense,
    };
    let (k, v) = (vec![0.0f32; 6], vec![0.0f32; 6]);
    let mut out = vec![0.0f32; 4];
    // q too short.
    let e = ops::decode_attention(&Reference, &p, &vec![0.0f32; 3], &k, &v, &mut out).unwrap_err();
    assert!(
        e.to_string().contains("q has 3 elements, expected 4"),
        "{e}"
    );
    // k shorter than the segments.
    let e = ops::decode_attention(
        &Reference,
        &p,
        &vec![0.0f32; 4],
        &k[..4].to_vec(),
        &v,
        &mut out,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
    // Segments for another KV head count.
    let segs2 = Segments::uniform(1, 2, 3).unwrap();
    let p2 = DecodeParams {
        segments: &segs2,
        ..p
    };
    assert!(ops::decode_attention(&Reference, &p2, &vec![0.0f32; 4], &k, &v, &mut out).is_err());
    // α ≤ 1 and per-head α of the wrong length.
    for norm in [
        Normalizer::Entmax { alpha: 1.0 },
        Normalizer::Entmax { alpha: 0.5 },
        Normalizer::EntmaxPerHead { alphas: vec![1.5] },
    ] {
        let p3 = DecodeParams {
            normalizer: &norm,
            ..p
        };
        assert!(
            ops::decode_attention(&Reference, &p3, &vec![0.0f32; 4], &k, &v, &mut out).is_err()
        );
    }
    // An index outside its segment, and a keep list larger than the cache.
    let far = IndexList::new(Scope::KvHead, vec![0, 1], vec![3]).unwrap();
    let p4 = DecodeParams {
        restrict: Restrict::Indices(&far),
        ..p
    };
    assert!(ops::decode_attention(&Reference, &p4, &vec![0.0f32; 4], &k, &v, &mut out).is_err());
    let mut buf = vec![0.0f32; 6];
    let keep4 = IndexList::new(Scope::KvHead, vec![0, 4], vec![0, 1, 2, 3]).unwrap();
    let e = ops::compact_rows(&Reference, 2, &segs, &keep4, &mut buf).unwrap_err();
    assert!(e.to_string().contains("index 3"), "{e}");
    // k = 0, NaN threshold, mismatched row lengths.
    let rows = Ragged::uniform(1, 3).unwrap();
    assert!(matches!(
        ops::topk_rows(&Reference, &rows, 0, Scope::KvHead, &vec![0.0; 3]),
        Err(Error::Budget { .. })
    ));
    assert!(ops::count_above(&Reference, &rows, &vec![0.0; 3], f32::NAN).is_err());
    let mut o = vec![0.0f32; 2];
    assert!(ops::softmax_rows(&Reference, &rows, &vec![0.0; 3], &mut o).is_err());
    assert!(
        ops::entmax_rows(
            &Reference,
            &rows,
            &[1.5, 1.5],
            &vec![0.0; 3],
            &mut vec![0.0; 3]
        )
        .is_err()
    );
    // Causal prefill with more queries than cached tokens.
    let q_rows = Ragged::uniform(1, 4).unwrap();
    let pp = PrefillParams {
        geom,
        q_rows: &q_rows,
        segments: &segs,
        causal: true,
        mask: None,
        scale: None,
        normalizer: &norm,
    };
    let e = ops::prefill_attention(
        &Reference,
        &pp,
        &vec![0.0f32; 16],
        &k,
        &v,
        &mut vec![0.0f32; 16],
    )
    .unwrap_err();
    assert!(e.to_string().contains("causal"), "{e}");
    // Non-finite scale and merge weight.
    let p5 = DecodeParams {
        scale: Some(f32::NAN),
        ..p
    };
    assert!(ops::decode_attention(&Reference, &p5, &vec![0.0f32; 4], &k, &v, &mut out).is_err());
    let groups = Ragged::uniform(1, 1).unwrap();
    assert!(
        ops::merge_rows(
            &Reference,
            2,
            &groups,
            &[0],
            &[f32::NAN],
            &k,
            &mut vec![0.0f32; 2]
        )
        .is_err()
    );
}
