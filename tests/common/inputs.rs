//! Seeded inputs with named distributions and the shape grid.

use std::fmt;

/// SplitMix64: small, seeded, reproducible.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    /// Uniform integer in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

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
