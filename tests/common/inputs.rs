//! Seeded inputs with named distributions and the shape grid.

use std::fmt;

/// The crate's seeded SplitMix64 generator (normals by Box–Muller).
pub use kvsieve::eval::Rng;

/// Named score / tensor distributions (flashinfer style: the name appears in
/// failure messages).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dist {
    /// N(0, σ²).
    Normal(f64),
    /// N(0, 1) with entry 0 boosted by `+boost` (an attention sink).
    Sink(f64),
    /// Values drawn from only `levels` distinct values: exact ties.
    Ties(usize),
    /// N(0, 1) with a share `p` of entries set to `-inf`.
    NegInf(f64),
}

impl fmt::Display for Dist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dist::Normal(s) => write!(f, "normal(sigma={s})"),
            Dist::Sink(b) => write!(f, "sink(boost={b})"),
            Dist::Ties(l) => write!(f, "ties(levels={l})"),
            Dist::NegInf(p) => write!(f, "neg_inf(share={p})"),
        }
    }
}

impl Dist {
    /// All distributions used by the score tests.
    pub const SCORES: [Dist; 5] = [
        Dist::Normal(1.0),
        Dist::Normal(5.0),
        Dist::Sink(8.0),
        Dist::Ties(3),
        Dist::NegInf(0.3),
    ];

    /// `n` samples (in `f32`).
    pub fn sample(self, rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| match self {
                Dist::Normal(s) => (s * rng.normal()) as f32,
                Dist::Sink(b) => (rng.normal() + if i == 0 { b } else { 0.0 }) as f32,
                Dist::Ties(l) => rng.below(l) as f32 * 0.5,
                Dist::NegInf(p) => {
                    if rng.uniform() < p {
                        f32::NEG_INFINITY
                    } else {
                        rng.normal() as f32
                    }
                }
            })
            .collect()
    }
}

/// Token counts that hit tails (tile ± 1, primes, 1).
pub const TOKENS: [usize; 12] = [1, 2, 3, 7, 31, 32, 33, 127, 128, 129, 1000, 4099];
/// Head dims: the two common ones plus an odd one.
pub const HEAD_DIMS: [usize; 3] = [64, 128, 65];
/// GQA group sizes.
pub const GROUPS: [usize; 3] = [1, 4, 8];

/// `n` standard-normal values scaled by `s`, as `T`.
pub fn normal_vec<T: kvsieve::Element>(rng: &mut Rng, n: usize, s: f64) -> Vec<T> {
    (0..n).map(|_| T::from_f64(s * rng.normal())).collect()
}
