//! Regression tests of the fuzzing findings of issue #17, one test (or one
//! test body) per finding, named after it:
//!
//! 1. `entmax_alpha_above_2_is_never_all_zeros` (τ bracket passing max s);
//! 3. `*_rejects_mismatched_*`, `mask_list_get_out_of_range_is_false`
//!    (panics on mismatched geometry / segments);
//! 4. `*_overflow*`, `*_too_large*` (integer overflow in size computations,
//!    allocations sized by user input).

mod common;

use common::*;
use kvsieve::entmax::{
    EntmaxOptions, TauBracket, entmax_bisect, entmax_bisect_f64, entmax_exact_f64, entmax_halley,
    entmax_halley_f64,
};
use kvsieve::ops;
use kvsieve::reference::Reference;
use kvsieve::*;

// ------------------------------------------------------------------ finding 1

#[test]
fn entmax_alpha_above_2_is_never_all_zeros() {
    // The reproducers of the issue.
    let r = entmax_halley(&[0.0; 195], 4.0, &EntmaxOptions::default()).unwrap();
    let s: f64 = r.probs.iter().map(|&p| f64::from(p)).sum();
    assert!((s - 1.0).abs() < 1e-5, "sum {s}: {:?}", &r.probs[..4]);
    for &p in &r.probs {
        assert!((f64::from(p) - 1.0 / 195.0).abs() < 1e-7, "{p}");
    }
    let rows = Ragged::uniform(1, 2).unwrap();
    let mut out = vec![0.0f32; 2];
    for isa in backends::cpu_isas() {
        let cpu = kvsieve::cpu::Cpu::with_isa(isa);
        ops::entmax_rows(&cpu, &rows, &[65.5], &vec![0.0f32, 0.0], &mut out).unwrap();
        assert_eq!(out, vec![0.5, 0.5], "{isa}");
    }
    // Every solver, α > 2 up to the huge, rows of ties where τ_hi + ε > max s.
    let o = EntmaxOptions::new(200, 1e-9);
    for alpha in [2.5f32, 4.0, 8.0, 65.5, 1e3, 1e9, 1e30] {
        for n in [2usize, 3, 195, 4099] {
            let want = 1.0 / n as f64;
            let z32 = vec![0.0f32; n];
            let z64 = vec![0.0f64; n];
            let a = f64::from(alpha);
            let ctx = format!("alpha {alpha} n {n}");
            for p in [
                entmax_halley(&z32, alpha, &o).unwrap().probs,
                entmax_bisect(&z32, alpha, &o).unwrap().probs,
            ] {
                assert_close(&wide32(&p), &vec![want; n], F32, &ctx);
            }
            for p in [
                entmax_halley_f64(&z64, a, &o).unwrap().probs,
                entmax_bisect_f64(&z64, a, &o).unwrap().probs,
                entmax_exact_f64(&z64, a).unwrap().0,
            ] {
                assert_close(&p, &vec![want; n], STRICT, &ctx);
            }
        }
    }
    // The update rule itself: a Halley candidate at or past `max s` is never
    // returned, even inside the ε margin above `hi`.
    let mut br = TauBracket::new(-1.0, -1e-9).below(0.0);
    // f = 0.5, f' = −1e3, f'' = 0 from τ = −0.5: Newton goes to 0.0 > hi.
    let step = br.halley(-0.5, 0.5, -1.0, 0.0);
    assert!(step.tau < 0.0 && step.fallback, "{step:?}");
    let mut br = TauBracket::for_row(0.0, 195, 4.0);
    for _ in 0..200 {
        let t = br.halley(br.hi, 1e-3, -1e-12, 0.0).tau;
        assert!(t < 0.0, "{t}");
    }
}

fn wide32(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

// ------------------------------------------------------------------ finding 3

#[test]
fn dam_decode_indices_rejects_mismatched_segments() {
    use kvsieve::policy::{Dam, HeadPattern};
    let geom = HeadGeometry::new(4, 2, 8).unwrap();
    let pattern = HeadPattern {
        diagonals: vec![0, 1],
        verticals: vec![0],
    };
    let dam = Dam::from_patterns(1, 4, 16, vec![pattern; 4]).expect("masks");
    // Four KV heads in the segments, two in the geometry.
    let segs = Segments::uniform(1, 4, 5).unwrap();
    assert!(matches!(
        dam.decode_indices(0, &geom, &segs),
        Err(Error::Shape { .. })
    ));
    assert!(dam.decode_mask(0, &geom, &segs).is_err());
    let ok = Segments::uniform(1, 2, 5).unwrap();
    assert_eq!(dam.decode_indices(0, &geom, &ok).unwrap().num_lists(), 4);
}

#[test]
fn index_list_check_against_rejects_mismatched_kv_heads() {
    let geom = HeadGeometry::new(4, 4, 8).unwrap();
    // One KV head in the segments: four KvHead lists would index segments 1..3.
    let segs = Segments::uniform(4, 1, 5).unwrap();
    let list = IndexList::from_sets(Scope::KvHead, &vec![IndexSet::all(2); 16]).unwrap();
    assert!(matches!(
        list.check_against("t", &geom, &segs),
        Err(Error::Shape { .. })
    ));
    let segs = Segments::uniform(1, 4, 5).unwrap();
    let list = IndexList::from_sets(Scope::KvHead, &vec![IndexSet::all(2); 4]).unwrap();
    assert!(list.check_against("t", &geom, &segs).is_ok());
}

#[test]
fn mask_list_check_against_rejects_short_q_rows() {
    let geom = HeadGeometry::new(2, 1, 8).unwrap();
    let segs = Segments::uniform(3, 1, 4).unwrap();
    let masks = MaskList::from_rows(Scope::KvHead, &vec![vec![BitMask::ones(4); 2]; 3]).unwrap();
    for q_rows in [vec![], vec![2], vec![2, 2]] {
        assert!(matches!(
            masks.check_against("t", &geom, &segs, &q_rows),
            Err(Error::Shape { .. })
        ));
    }
    assert!(masks.check_against("t", &geom, &segs, &[2, 2, 2]).is_ok());
    // Mismatched KV heads, too.
    let segs2 = Segments::uniform(1, 3, 4).unwrap();
    assert!(masks.check_against("t", &geom, &segs2, &[2]).is_err());
}

#[test]
fn mask_list_get_out_of_range_is_false() {
    let masks = MaskList::from_masks(Scope::KvHead, &[BitMask::ones(3)]).unwrap();
    assert!(masks.get(0, 0, 2));
    for (i, r, c) in [
        (1, 0, 0),
        (usize::MAX, 0, 0),
        (0, 1, 0),
        (0, 0, 3),
        (0, 0, usize::MAX),
    ] {
        assert!(!masks.get(i, r, c), "({i}, {r}, {c})");
    }
}

// ------------------------------------------------------------------ finding 4

fn is_too_large<T: std::fmt::Debug>(r: Result<T>) -> bool {
    match r {
        Err(e @ Error::TooLarge { .. }) => {
            // The message names the op and the limit.
            let m = e.to_string();
            assert!(m.contains("too large") && m.contains("limit"), "{m}");
            true
        }
        other => panic!("expected Error::TooLarge, got {other:?}"),
    }
}

#[test]
fn head_geometry_rejects_overflowing_row_width() {
    // 2^33 · 2^31 wraps to 0 in a release build.
    assert!(is_too_large(HeadGeometry::new(1 << 33, 1, 1 << 31)));
    assert!(is_too_large(HeadGeometry::new(usize::MAX, 1, usize::MAX)));
    assert!(is_too_large(HeadGeometry::new(1 << 16, 1, 1 << 16)));
    assert!(HeadGeometry::new(1 << 15, 1, 1 << 16).is_ok());
}

#[test]
fn npy_loader_rejects_overflowing_shape() {
    // Shape (2^62, 4, 1) of 4-byte values: the byte count wraps to 0.
    let mut header =
        "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4, 1), }"
            .to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    let r = kvsieve::eval::io::load_npy_bytes("1", &[[&bytes, &bytes, &bytes]]);
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("data bytes"));
}

#[test]
fn segments_and_ragged_reject_overflow_and_huge_allocations() {
    assert!(is_too_large(Segments::uniform(1 << 40, 1 << 30, 1)));
    assert!(is_too_large(Segments::uniform(usize::MAX, 2, 0)));
    // 2^40 segments of length 0: 4 TiB of lengths, over MAX_ALLOC_BYTES.
    assert!(is_too_large(Segments::uniform(1 << 40, 1, 0)));
    assert!(is_too_large(Segments::uniform(1 << 20, 1 << 10, 1 << 10)));
    assert!(is_too_large(Segments::new(usize::MAX, 3, vec![], vec![])));
    assert!(is_too_large(Ragged::uniform(1 << 20, 1 << 20)));
    assert!(is_too_large(Ragged::uniform(usize::MAX, 0)));
    assert!(is_too_large(Ragged::uniform(1, 1 << 32)));
    let r = Ragged::uniform(3, 5).unwrap();
    assert_eq!(r.indptr(), &[0, 5, 10, 15]);
    assert_eq!(Ragged::uniform(0, 7).unwrap().indptr(), &[0]);
    assert_eq!(Segments::uniform(2, 2, 3).unwrap().rows_needed(), 12);
}

#[test]
fn bitmask_from_indices_rejects_too_large_len() {
    let idx = IndexSet::new(vec![1, 5]).unwrap();
    assert!(is_too_large(BitMask::from_indices(usize::MAX, &idx)));
    assert!(is_too_large(BitMask::from_indices(
        BitMask::MAX_LEN + 1,
        &idx
    )));
    assert!(is_too_large(BitMask::try_zeros(usize::MAX)));
    let m = BitMask::from_indices(40, &idx).unwrap();
    assert_eq!(m.to_indices(), idx);
}

#[test]
fn cache_ops_reject_overflowing_width() {
    let b = Reference;
    let huge = usize::MAX / 2 + 1;
    let mut dst: Vec<f32> = vec![];
    // indices.len() · width = 2^64: wraps to 0 in release, panics in debug.
    assert!(is_too_large(ops::scatter_rows(
        &b,
        huge,
        &[0, 1],
        &vec![],
        &mut dst
    )));
    // gather and merge check their indices against the (empty) source first;
    // their sizes go through the same checked arithmetic.
    assert!(ops::gather_rows(&b, huge, &[0, 0], &vec![], &mut dst).is_err());
    let groups = Ragged::from_lens(&[1, 1]).unwrap();
    assert!(ops::merge_rows(&b, huge, &groups, &[0, 0], &[1.0, 1.0], &vec![], &mut dst).is_err());
    // Ordinary widths still work.
    let mut dst = vec![0.0f32; 4];
    ops::scatter_rows(&b, 2, &[1], &vec![5.0f32, 6.0], &mut dst).unwrap();
    assert_eq!(dst, vec![0.0, 0.0, 5.0, 6.0]);
}
