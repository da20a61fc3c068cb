//! Tolerances.
//!
//! `|a − e| ≤ abs + rel · |e|` element-wise (burn's formula). Presets:
//!
//! | preset | rel | abs | use |
//! |---|---|---|---|
//! | `STRICT` | 1e-6 | 1e-7 | f32 results of short f32 sums |
//! | `F32` | 1e-5 | 1e-6 | f32 kernels vs the f64 reference |
//! | `BALANCED` | 5e-3 | 1e-5 | scores through a long reduction |
//!
//! Low precision (f16, bf16) uses the flash-attention budget instead of a
//! fixed tolerance: see [`lowp_budget`].

#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    pub rel: f64,
    pub abs: f64,
}

pub const STRICT: Tolerance = Tolerance {
    rel: 1e-6,
    abs: 1e-7,
};
pub const F32: Tolerance = Tolerance {
    rel: 1e-5,
    abs: 1e-6,
};
pub const BALANCED: Tolerance = Tolerance {
    rel: 5e-3,
    abs: 1e-5,
};

impl Tolerance {
    pub fn allows(&self, actual: f64, expected: f64) -> bool {
        if actual.is_nan() || expected.is_nan() {
            return actual.is_nan() && expected.is_nan();
        }
        if actual.is_infinite() || expected.is_infinite() {
            return actual == expected;
        }
        (actual - expected).abs() <= self.abs + self.rel * expected.abs()
    }
}

/// The low-precision error budget (flash-attention's rule): the backend's
/// largest error against the exact answer may be at most twice the largest
/// error of the reference run in the storage dtype, plus a floor.
///
/// `exact`: reference in f64 on the storage-rounded inputs; `ref_lowp`: the
/// reference's own output rounded to the storage dtype.
pub fn lowp_budget(exact: &[f64], ref_lowp: &[f64], floor: f64) -> f64 {
    let e = exact
        .iter()
        .zip(ref_lowp)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    2.0 * e + floor
}
