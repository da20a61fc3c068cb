//! Shared input decoding and checks of the kvsieve fuzz targets.
//!
//! Inputs are decoded with `arbitrary::Unstructured` (re-exported by
//! libfuzzer-sys). Two families of values:
//!
//! * *tame*: multiples of 2^-6 in [−2, 2], where the f32 backends must agree
//!   with the f64 reference within the tolerances of `docs/numerics.md`
//!   (every product and every f64 sum of them is exact, so the reference and
//!   the CPU's f64 path see the same logits);
//! * *wild*: any f32 (huge, tiny, ±inf, NaN): no panic, errors where the
//!   docs promise them, finite outputs for finite inputs, outputs inside the
//!   hull of the values attended.
//!
//! Sizes are small, or absurd (≥ 2^40) to probe the size checks: sizes in
//! between would only make the fuzzer allocate gigabytes legitimately.

pub use libfuzzer_sys::arbitrary::Unstructured;

/// The result of decoding from an `Unstructured` (not `kvsieve::Result`).
pub type Res<T> = libfuzzer_sys::arbitrary::Result<T>;

use kvsieve::cpu::{Cpu, isa};

/// α values across (1, ∞): the f32 search range [1.125, 2] and its edges,
/// just above 1, above 2 up to huge.
pub const ALPHAS: [f32; 20] = [
    1.000_000_1,
    1.001,
    1.01,
    1.05,
    1.1,
    1.124,
    1.125,
    1.25,
    1.5,
    1.75,
    2.0,
    2.01,
    2.5,
    3.0,
    4.0,
    8.0,
    65.5,
    1e3,
    1e9,
    1e30,
];

/// An α > 1: from the table, or any finite f32 above 1.
pub fn alpha(u: &mut Unstructured<'_>) -> Res<f32> {
    if u.ratio(3, 4)? {
        return Ok(ALPHAS[u.choose_index(ALPHAS.len())?]);
    }
    let a = f32::from_bits(u.arbitrary()?).abs();
    Ok(if a.is_finite() && a > 1.0 { a } else { 1.5 })
}

/// A possibly invalid α (NaN, ≤ 1, inf): for error paths.
pub fn any_alpha(u: &mut Unstructured<'_>) -> Res<f32> {
    if u.ratio(1, 8)? {
        Ok(f32::from_bits(u.arbitrary()?))
    } else {
        alpha(u)
    }
}

/// A tame value: a multiple of 2^-6 in [−2, 2].
pub fn tame(u: &mut Unstructured<'_>) -> Res<f32> {
    Ok(f32::from(u.int_in_range(-128i16..=128)?) / 64.0)
}

/// A wild value: tame, any bit pattern, or a huge / tiny magnitude.
pub fn wild(u: &mut Unstructured<'_>) -> Res<f32> {
    Ok(match u.int_in_range(0u8..=7)? {
        0..=2 => tame(u)?,
        3 => f32::from_bits(u.arbitrary()?),
        4 => {
            let e = u.int_in_range(10i32..=38)?;
            let s = if u.arbitrary()? { -1.0 } else { 1.0 };
            s * 10f32.powi(e) * (1.0 + tame(u)?.abs())
        }
        5 => 1e-30 * tame(u)?,
        6 => *u.choose(&[
            0.0,
            -0.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            3e38,
            -3e38,
        ])?,
        _ => tame(u)? * 1e4,
    })
}

/// A size: usually in `0..=max`, sometimes absurd (≥ 2^40, up to `usize::MAX`).
pub fn size(u: &mut Unstructured<'_>, max: usize) -> Res<usize> {
    if u.ratio(1, 16)? {
        let shift = u.int_in_range(40u32..=63)?;
        return Ok(*u.choose(&[usize::MAX, 1usize << shift, (1 << shift) + 1])?);
    }
    u.int_in_range(0..=max)
}

/// The CPU backend on one of the instruction sets this machine has.
pub fn cpu(u: &mut Unstructured<'_>) -> Res<Cpu> {
    let isas = isa::available();
    Ok(Cpu::with_isa(isas[u.choose_index(isas.len())?]))
}

/// `|a − e| ≤ abs + rel·|e|`, NaN only against NaN, infinities equal.
pub fn close(a: f64, e: f64, rel: f64, abs: f64) -> bool {
    if a.is_nan() || e.is_nan() {
        return a.is_nan() && e.is_nan();
    }
    if a.is_infinite() || e.is_infinite() {
        return a == e;
    }
    (a - e).abs() <= abs + rel * e.abs()
}

/// Asserts element-wise closeness with a message naming the case.
#[track_caller]
pub fn assert_all_close(got: &[f32], want: &[f32], rel: f64, abs: f64, ctx: &dyn Fn() -> String) {
    assert_eq!(got.len(), want.len(), "{}: lengths", ctx());
    for (i, (&a, &e)) in got.iter().zip(want).enumerate() {
        assert!(
            close(f64::from(a), f64::from(e), rel, abs),
            "{}: index {i}: got {a}, want {e}",
            ctx()
        );
    }
}

/// Asserts that a row of weights is a probability vector (or all zeros when
/// `empty`), with `-inf` logits at exactly 0 and weights non-increasing in
/// the logits (ties equal).
#[track_caller]
pub fn assert_weights(z: &[f32], p: &[f32], empty: bool, ctx: &dyn Fn() -> String) {
    assert_eq!(z.len(), p.len(), "{}: lengths", ctx());
    if empty {
        assert!(p.iter().all(|&x| x == 0.0), "{}: {p:?} not all 0", ctx());
        return;
    }
    let sum: f64 = p.iter().map(|&x| f64::from(x)).sum();
    assert!((sum - 1.0).abs() <= 1e-5, "{}: sum {sum}", ctx());
    for (i, (&zi, &pi)) in z.iter().zip(p).enumerate() {
        assert!((0.0..=1.0).contains(&pi), "{}: p[{i}] = {pi}", ctx());
        if zi == f32::NEG_INFINITY {
            assert_eq!(pi, 0.0, "{}: p[{i}] of a -inf logit", ctx());
        }
    }
    // Monotone: sort by z and check p never increases (1e-6 slack for the
    // rounding of the renormalisation).
    let mut order: Vec<usize> = (0..z.len()).collect();
    order.sort_by(|&a, &b| z[b].total_cmp(&z[a]));
    for w in order.windows(2) {
        let (a, b) = (w[0], w[1]);
        if z[a] == z[b] {
            assert_eq!(p[a], p[b], "{}: tie {a}, {b} unequal", ctx());
        } else {
            assert!(p[a] + 1e-6 >= p[b], "{}: p not monotone at {a}, {b}", ctx());
        }
    }
}
