//! Row-level α-entmax: exact references, bisection, hybrid Halley–bisection,
//! backward pass (VJP), the α-gradient and the learned-α parametrisation.
//!
//! # Math
//!
//! For a score row `z ∈ R^n` and `α > 1`,
//!
//! ```text
//! entmax_α(z)_i = [ s_i − τ ]_+ ^ (1/(α−1)),   s = (α−1)·z,
//! ```
//!
//! with the threshold `τ` chosen so that the row sums to one, i.e. `τ` is the unique root of
//!
//! ```text
//! f(τ) = Σ_i [s_i − τ]_+ ^ c0 − 1,   c0 = 1/(α−1),
//! ```
//!
//! which is continuous, strictly decreasing and convex on `(−∞, max s)`. α = 2 is sparsemax,
//! α → 1 is softmax (the formula is unusable at α = 1: use softmax there; every solver here
//! rejects `α ≤ 1` with [`Error::Alpha`]).
//!
//! **τ is always reported in the scaled space `s = (α−1)·z` of the caller's (unshifted) row**,
//! e.g. for α = 1.5 and `z = [2, 1, 0, −1]` the threshold is `τ = (3 − √7)/4`.
//! Internally every solver subtracts the row maximum first (shift invariance:
//! `entmax(z + c) = entmax(z)`), so logits of any magnitude (±1e4, ±1e30) are safe.
//!
//! # Rules shared by every solver in this module
//!
//! * **Exact zeros / support**: entry `i` is in the support iff `s_i > τ` (strict); an entry
//!   sitting exactly on the threshold gets exactly `0`.
//! * **Ties** at the maximum (or anywhere) get identical probabilities: the maths is symmetric
//!   and every entry is computed by the same expression.
//! * **Masking**: `-inf` scores get exactly `0` and do not count in `n` (the number of visible
//!   entries used in the τ bounds). A row whose entries are all `-inf` returns all zeros,
//!   `support = 0`, `iterations = 0` and **`tau = f64::NEG_INFINITY`** (consistent with "every
//!   entry ≤ τ gets 0").
//! * **Errors**: empty row → [`Error::Shape`]; a NaN or `+inf` score → [`Error::NonFinite`];
//!   `α ≤ 1` or a non-finite α → [`Error::Alpha`] (α = 1 is softmax); invalid
//!   [`EntmaxOptions`] → [`Error::InvalidConfig`].
//! * A single visible entry gets `p = 1` (`τ = s_max − 1`).
//! * The iterative solvers accumulate in `f64` and **renormalise the output by its sum** (like
//!   `entmax_bisect(ensure_sum_one=True)`), so `Σp = 1` up to rounding even when stopped early.
//!
//! # Solvers
//!
//! | function | method | role |
//! |---|---|---|
//! | [`sparsemax_exact`], [`entmax15_exact`] | sort-based closed form, f64 | specification for α ∈ {2, 1.5} |
//! | [`entmax_exact_f64`] | dispatch to the above, else bisection to the last bit | the reference for any α |
//! | [`entmax_bisect_f64`], [`entmax_bisect`] | bisection (the `entmax` package baseline) | baseline |
//! | [`entmax_halley_f64`], [`entmax_halley`] | safeguarded Halley–bisection (AdaSplash) | what users call |
//!
//! The Halley update rule is exposed as [`halley_step`] / [`TauBracket`] and the bounds as
//! [`tau_bounds`], so SIMD and GPU backends reuse exactly the same rule.
//!
//! # Iteration count convention
//!
//! Both iterative solvers start at the midpoint of the bracket and report in
//! [`EntmaxResult::iterations`] the number of **τ updates**. The row is swept
//! `iterations + 1` times to evaluate `f` (plus one output sweep), so Halley and bisection
//! counts are directly comparable. They stop at whichever comes first: `|f(τ)| < tol`
//! or `iterations == max_iter`.

use crate::error::{Error, Result};

/// Half-width `ε` of the Halley acceptance window: a Halley candidate `τ_H` is accepted iff
/// `τ_lo − ε < τ_H < τ_hi + ε` (value used by the AdaSplash kernels), and, in
/// [`TauBracket`], `τ_H < max s` (for α > 2 and long rows `τ_hi = max s − n^(1−α)` lies
/// within `ε` of `max s`, and a τ at or past `max s` leaves no entry in the support).
pub const HALLEY_EPS: f64 = 1e-6;

/// Floor applied to `u = s_i − τ` when accumulating `f'` and `f''` for generic α (not for `f`
/// nor for the output). For α > 1.5 the term `u^(c0−2)` of `f''` blows up as `u → 0+`; the
/// floor keeps it finite (the AdaSplash kernels floor `u` at `1e-6` in all three sums). It only
/// changes the contribution of entries within `1e-12` of the threshold, and the bracket
/// safeguard decides acceptance anyway.
pub const DERIV_U_FLOOR: f64 = 1e-12;

/// Iteration cap of the reference bisection in [`entmax_exact_f64`] (it normally stops
/// earlier, when the bracket can no longer shrink in f64: about 55 halvings).
pub const EXACT_BISECT_MAX_ITER: u32 = 200;

// ---------------------------------------------------------------------------------------------
// Options and results
// ---------------------------------------------------------------------------------------------

/// Stopping rule of the iterative solvers ([`entmax_bisect`], [`entmax_halley`] and their f64
/// versions).
///
/// A solver stops at **whichever comes first**: `|f(τ)| < tol` (residual of the threshold
/// equation, evaluated in f64 before the final renormalisation) or `max_iter` τ updates.
/// `tol = 0.0` disables the tolerance test and runs exactly `max_iter` updates (the fixed
/// iteration count of the reference kernels, see [`EntmaxOptions::fixed_iterations`]).
///
/// [`Default`] is [`EntmaxOptions::halley`] (`max_iter = 20`, `tol = 1e-7`); Halley normally
/// stops on the tolerance after 3–6 updates. For bisection use [`EntmaxOptions::bisection`]
/// (`max_iter = 50`, `tol = 1e-7`): bisection gains one bit per update, so 20 updates are not
/// always enough to reach `tol`.
///
/// α > 2: `f` is concave between kinks with infinite slope, Halley often falls back to
/// bisection and needs more updates (measured on random rows: ≤ 21 updates for α = 2.5, ≤ 31
/// for α = 3, ≤ 46 for α = 4). Use `max_iter = 100` there and check
/// [`EntmaxResult::converged`]. Beyond α ≈ 4 the problem is badly conditioned in f64
/// (`p = u^(1/(α−1))` is extremely steep at the threshold) and `tol = 1e-7` may be unreachable.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EntmaxOptions {
    /// Maximum number of τ updates (≥ 1).
    pub max_iter: u32,
    /// Tolerance on `|f(τ)|` (finite, ≥ 0; `0` = run all `max_iter` updates).
    pub tol: f64,
}

impl EntmaxOptions {
    /// Default tolerance on `|f(τ)|`.
    pub const DEFAULT_TOL: f64 = 1e-7;
    /// Default update cap for Halley–bisection.
    pub const HALLEY_MAX_ITER: u32 = 20;
    /// Default update cap for plain bisection (the `entmax` package default `n_iter`).
    pub const BISECT_MAX_ITER: u32 = 50;

    /// Options with an explicit cap and tolerance.
    pub const fn new(max_iter: u32, tol: f64) -> Self {
        Self { max_iter, tol }
    }

    /// Halley–bisection defaults: `max_iter = 20`, `tol = 1e-7` (same as [`Default`]).
    pub const fn halley() -> Self {
        Self::new(Self::HALLEY_MAX_ITER, Self::DEFAULT_TOL)
    }

    /// Bisection defaults: `max_iter = 50`, `tol = 1e-7`.
    pub const fn bisection() -> Self {
        Self::new(Self::BISECT_MAX_ITER, Self::DEFAULT_TOL)
    }

    /// Exactly `n` updates, no tolerance test (what the AdaSplash kernels do with `niter = n`).
    pub const fn fixed_iterations(n: u32) -> Self {
        Self::new(n, 0.0)
    }

    /// Checks `max_iter ≥ 1` and `0 ≤ tol < ∞`.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        if self.max_iter == 0 {
            return Err(Error::InvalidConfig {
                policy: op,
                reason: "EntmaxOptions::max_iter must be at least 1".to_string(),
            });
        }
        if !(self.tol.is_finite() && self.tol >= 0.0) {
            return Err(Error::InvalidConfig {
                policy: op,
                reason: format!(
                    "EntmaxOptions::tol must be finite and >= 0, got {}",
                    self.tol
                ),
            });
        }
        Ok(())
    }
}

impl Default for EntmaxOptions {
    fn default() -> Self {
        Self::halley()
    }
}

/// Output of an iterative row solver.
///
/// `T` is the element type of the probabilities (`f32` for the public f32 API, `f64` for the
/// `_f64` solvers, see [`EntmaxResult64`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EntmaxResult<T = f32> {
    /// `p = entmax_α(z)`, same length as the input row; exact zeros outside the support,
    /// renormalised so that `Σp = 1` (all zeros for a fully masked row).
    pub probs: Vec<T>,
    /// Final threshold in the scaled space `s = (α−1)·z` of the unshifted row
    /// (`f64::NEG_INFINITY` for a fully masked row).
    pub tau: f64,
    /// Number of τ updates performed (see the module docs for the convention).
    pub iterations: u32,
    /// Support size: number of entries with `s_i > τ` (= number of non-zero probabilities).
    pub support: usize,
    /// Number of Halley candidates rejected by the safeguard (replaced by a bisection step).
    /// Always 0 for bisection.
    pub fallbacks: u32,
    /// `true` iff the solver stopped on `|f(τ)| < tol` (as opposed to the `max_iter` cap).
    pub converged: bool,
    /// `f(τ) = Σ_i [s_i − τ]_+^(1/(α−1)) − 1` at the final τ, before renormalisation
    /// (0 for a fully masked row).
    pub residual: f64,
}

/// f64 version of [`EntmaxResult`].
pub type EntmaxResult64 = EntmaxResult<f64>;

// ---------------------------------------------------------------------------------------------
// Validation and row preparation
// ---------------------------------------------------------------------------------------------

fn check_alpha(op: &'static str, alpha: f64) -> Result<()> {
    if !alpha.is_finite() {
        return Err(Error::Alpha {
            op,
            alpha,
            reason: "alpha must be a finite number > 1",
        });
    }
    if alpha == 1.0 {
        return Err(Error::Alpha {
            op,
            alpha,
            reason: "alpha = 1 is softmax: use softmax instead (entmax needs alpha > 1)",
        });
    }
    if alpha < 1.0 {
        return Err(Error::Alpha {
            op,
            alpha,
            reason: "alpha must be > 1 (alpha = 1 is softmax)",
        });
    }
    Ok(())
}

/// A validated row: shifted scaled scores `s_i = (α−1)(z_i − max z)` (`-inf` kept for masked
/// entries), number of finite entries and the shift `(α−1)·max z`.
struct Row {
    s: Vec<f64>,
    n: usize,
    offset: f64,
}

/// Validates `z` and builds the shifted scaled row. `Ok(None)` means "all entries are -inf".
fn prepare<T: Copy + Into<f64>>(op: &'static str, z: &[T], scale: f64) -> Result<Option<Row>> {
    if z.is_empty() {
        return Err(Error::Shape {
            op,
            what: "expected a row with at least one score, got length 0".to_string(),
        });
    }
    let mut zmax = f64::NEG_INFINITY;
    let mut n = 0usize;
    for (i, &v) in z.iter().enumerate() {
        let v: f64 = v.into();
        if v.is_nan() {
            return Err(Error::NonFinite {
                op,
                what: format!("score z[{i}] is NaN"),
            });
        }
        if v == f64::INFINITY {
            return Err(Error::NonFinite {
                op,
                what: format!("score z[{i}] is +inf (only finite values or -inf are allowed)"),
            });
        }
        if v > f64::NEG_INFINITY {
            n += 1;
            if v > zmax {
                zmax = v;
            }
        }
    }
    if n == 0 {
        return Ok(None);
    }
    // z_i − zmax is −inf for masked entries (and may overflow to −inf for |z| ~ f64::MAX,
    // which correctly yields 0 for that entry).
    let s = z
        .iter()
        .map(|&v| {
            let d = v.into() - zmax;
            if d == 0.0 { 0.0 } else { scale * d }
        })
        .collect();
    Ok(Some(Row {
        s,
        n,
        offset: scale * zmax,
    }))
}

fn masked_result<T: Copy + Default>(len: usize) -> EntmaxResult<T> {
    EntmaxResult {
        probs: vec![T::default(); len],
        tau: f64::NEG_INFINITY,
        iterations: 0,
        support: 0,
        fallbacks: 0,
        converged: true,
        residual: 0.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Bounds and the shared update rule
// ---------------------------------------------------------------------------------------------

/// Bracket of the threshold for a row whose largest scaled score is `max_s` and which has `n`
/// visible (finite) entries:
///
/// ```text
/// τ_lo = max_s − 1                 (the max alone contributes 1, so f(τ_lo) ≥ 0)
/// τ_hi = max_s − n^(1−α)           (every p_i ≤ 1/n there, so f(τ_hi) ≤ 0)
/// ```
///
/// These are the AdaSplash attention-kernel bounds (and those of `entmax_bisect`). `n = 0` is
/// treated as `n = 1`. For `n = 1` the bracket is the single point `max_s − 1`, the answer.
pub fn tau_bounds(max_s: f64, n: usize, alpha: f64) -> (f64, f64) {
    let n = n.max(1) as f64;
    (max_s - 1.0, max_s - n.powf(1.0 - alpha))
}

/// One safeguarded Halley step on an **already tightened** bracket `[lo, hi]`:
///
/// ```text
/// τ_H = τ − 2·f·f' / (2·f'² − f·f'')
/// return τ_H            if lo − ε < τ_H < hi + ε     (ε = HALLEY_EPS)
///        (lo + hi) / 2  otherwise (also when τ_H is NaN or ±inf)
/// ```
///
/// `ff`, `df`, `ddf` are `f(τ)`, `f'(τ)`, `f''(τ)`. For α = 2 pass `ddf = 0` (Newton).
/// This is the stateless AdaSplash kernel rule (for kernels with a fixed iteration count). The
/// solvers of this module use [`TauBracket::halley`], which also tightens the bracket, counts
/// fallbacks, never steps to or past `max s` (this rule does not know `max s`: for α > 2
/// with `n^(1−α) < ε` a candidate in `[max s, τ_hi + ε)` would zero the row) and adds a
/// progress guard that prevents stalls (it does not fire on ordinary rows with α ≤ 2).
pub fn halley_step(ff: f64, df: f64, ddf: f64, tau: f64, lo: f64, hi: f64) -> f64 {
    halley_candidate(ff, df, ddf, tau, lo, hi).unwrap_or(0.5 * (lo + hi))
}

/// The Halley candidate if the safeguard accepts it, `None` if it must fall back.
fn halley_candidate(ff: f64, df: f64, ddf: f64, tau: f64, lo: f64, hi: f64) -> Option<f64> {
    let cand = tau - 2.0 * ff * df / (2.0 * df * df - ff * ddf);
    // NaN and ±inf fail one of the comparisons.
    (cand > lo - HALLEY_EPS && cand < hi + HALLEY_EPS).then_some(cand)
}

/// A bracket `[lo, hi]` around the threshold `τ*` (`f(lo) ≥ 0 ≥ f(hi)`), with the bisection and
/// hybrid Halley–bisection update rules used by every solver of this module. SIMD and GPU
/// backends should use (or transcribe) [`TauBracket::halley`] to get identical iterates.
///
/// # The update rule of [`TauBracket::halley`]
///
/// 1. Tighten: `f(τ) > 0` ⇒ `lo ← max(lo, τ)`; `f(τ) < 0` ⇒ `hi ← min(hi, τ)`.
/// 2. Halley candidate `τ_H = τ − 2·f·f' / (2·f'² − f·f'')`.
/// 3. Accept `τ_H` iff `lo − ε < τ_H < min(hi + ε, top)` (ε = [`HALLEY_EPS`], the AdaSplash
///    safeguard; NaN/±inf fail; `top` = `max s` for [`TauBracket::for_row`]) and the
///    progress guard below allows it.
/// 4. Otherwise take the bisection step `τ ← (lo + hi)/2` and count a fallback.
///
/// Every τ it returns is below `top` (a midpoint that rounds up to `top`, which needs `lo`
/// and `top` to be adjacent floats, is replaced by `lo`), so the largest entry stays in the
/// support and the output can always be renormalised.
///
/// Progress guard (not in the AdaSplash kernels): the update is a bisection step if `τ` lay
/// outside the bracket when `f(τ)` was evaluated (an accepted candidate in the ε margin, which
/// cannot tighten the bracket), or if `|f(τ)| > ½·|f|` of the evaluation two updates earlier.
/// Without it the kernel rule can stall: for α > 2, `f` is concave between the kinks where
/// entries enter the support, and the iterates can settle into a two-cycle (one point on each
/// side of a kink, or one in the ε margin below `lo`) that never reaches the root. While Halley
/// converges, `|f|` falls much faster than by half every two updates, so on ordinary rows
/// with α ≤ 2 the guard does not fire and the iterates equal those of the kernel rule
/// ([`halley_step`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TauBracket {
    /// Lower end: `f(lo) ≥ 0`.
    pub lo: f64,
    /// Upper end: `f(hi) ≤ 0`.
    pub hi: f64,
    /// Strict upper limit of every returned τ (`max s`; `+inf` for [`TauBracket::new`]).
    top: f64,
    /// Whether the τ of the last call to [`TauBracket::tighten`] lay in `[lo, hi]`.
    in_bracket: bool,
    /// `|f|` at the last two evaluations (most recent first), `+inf` before.
    abs_f: [f64; 2],
}

/// Result of one [`TauBracket::halley`] update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TauStep {
    /// The next τ to evaluate.
    pub tau: f64,
    /// `true` iff the Halley candidate was rejected and a bisection step was taken.
    pub fallback: bool,
}

impl TauBracket {
    /// A bracket with explicit ends (`lo ≤ hi`, `f(lo) ≥ 0 ≥ f(hi)`), no previous update and
    /// no `max s` (candidates up to `hi + ε` are accepted; use [`TauBracket::for_row`] or
    /// [`TauBracket::below`] to keep τ below the row maximum).
    pub fn new(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            hi,
            top: f64::INFINITY,
            in_bracket: true,
            abs_f: [f64::INFINITY; 2],
        }
    }

    /// The same bracket, with every returned τ kept strictly below `max_s`.
    pub fn below(self, max_s: f64) -> Self {
        Self { top: max_s, ..self }
    }

    /// The bracket of [`tau_bounds`], τ kept strictly below `max_s`.
    pub fn for_row(max_s: f64, n: usize, alpha: f64) -> Self {
        let (lo, hi) = tau_bounds(max_s, n, alpha);
        Self::new(lo, hi).below(max_s)
    }

    /// `(lo + hi) / 2`, the starting point of both solvers (`lo` if the midpoint rounds up
    /// to `max s`).
    pub fn midpoint(&self) -> f64 {
        let m = 0.5 * (self.lo + self.hi);
        if m < self.top { m } else { self.lo }
    }

    /// Tightens the bracket with the sign of `ff = f(tau)`: `ff > 0` ⇒ `lo ← max(lo, τ)`,
    /// `ff < 0` ⇒ `hi ← min(hi, τ)`; `ff = 0` (or NaN) leaves it unchanged. (The kernels assign
    /// without `max`/`min`; the two agree whenever τ is inside the bracket, and the clamp keeps
    /// the bracket from widening when τ lies in the ε margin.)
    pub fn tighten(&mut self, tau: f64, ff: f64) {
        self.in_bracket = self.lo <= tau && tau <= self.hi;
        if ff > 0.0 {
            self.lo = self.lo.max(tau);
        } else if ff < 0.0 {
            self.hi = self.hi.min(tau);
        }
    }

    /// One hybrid Halley–bisection update from `τ` with `ff = f(τ)`, `df = f'(τ)`,
    /// `ddf = f''(τ)` (see the type docs for the rule). Returns the next τ and whether the
    /// update fell back to bisection.
    pub fn halley(&mut self, tau: f64, ff: f64, df: f64, ddf: f64) -> TauStep {
        self.tighten(tau, ff);
        let progress = self.in_bracket && ff.abs() <= 0.5 * self.abs_f[1];
        self.abs_f = [ff.abs(), self.abs_f[0]];
        let accepted = if progress {
            halley_candidate(ff, df, ddf, tau, self.lo, self.hi).filter(|&t| t < self.top)
        } else {
            None
        };
        let (next, fallback) = match accepted {
            Some(t) => (t, false),
            None => (self.midpoint(), true),
        };
        TauStep {
            tau: next,
            fallback,
        }
    }

    /// One bisection update (the `entmax` package rule): `ff ≥ 0` ⇒ `lo ← τ`, else `hi ← τ`;
    /// returns the new midpoint.
    pub fn bisect(&mut self, tau: f64, ff: f64) -> f64 {
        if ff >= 0.0 {
            self.lo = tau;
        } else {
            self.hi = tau;
        }
        self.midpoint()
    }
}

// ---------------------------------------------------------------------------------------------
// Threshold sums
// ---------------------------------------------------------------------------------------------

/// `f`, `f'`, `f''` of the threshold equation at one τ, and the active-set size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThresholdSums {
    /// `f(τ) = Σ_{i∈S} u_i^c0 − 1`, `u_i = s_i − τ`, `S = {i : s_i > τ}`, `c0 = 1/(α−1)`.
    pub f: f64,
    /// `f'(τ) = −c0 Σ_{i∈S} u_i^(c0−1)` (α = 1.5: `−2Σu`; α = 2: `−|S|`).
    pub df: f64,
    /// `f''(τ) = c0 (c0−1) Σ_{i∈S} u_i^(c0−2)` (α = 1.5: `2|S|`; α = 2: `0`).
    pub ddf: f64,
    /// `|S|`.
    pub support: usize,
}

/// How `u^c0` and its derivatives are computed: closed forms for α ∈ {1.5, 2}.
#[derive(Debug, Clone, Copy)]
enum Power {
    /// α = 2: `p = u`.
    Two,
    /// α = 1.5: `p = u²`.
    OneHalf,
    /// Any other α.
    General {
        c0: f64,
        c1: f64,
        /// `DERIV_U_FLOOR^c1`, `DERIV_U_FLOOR^c2`.
        t1_floor: f64,
        t2_floor: f64,
    },
}

impl Power {
    fn new(alpha: f64) -> Self {
        if alpha == 2.0 {
            Power::Two
        } else if alpha == 1.5 {
            Power::OneHalf
        } else {
            let c0 = 1.0 / (alpha - 1.0);
            let c1 = c0 - 1.0;
            let c2 = c0 - 2.0;
            Power::General {
                c0,
                c1,
                t1_floor: DERIV_U_FLOOR.powf(c1),
                t2_floor: DERIV_U_FLOOR.powf(c2),
            }
        }
    }

    /// `u^c0` for `u > 0`.
    #[inline]
    fn p(self, u: f64) -> f64 {
        match self {
            Power::Two => u,
            Power::OneHalf => u * u,
            Power::General { c0, .. } => u.powf(c0),
        }
    }

    /// `f(τ)` only (bisection).
    fn f(self, s: &[f64], tau: f64) -> f64 {
        let mut acc = 0.0f64;
        for &si in s {
            let u = si - tau;
            if u > 0.0 {
                acc += self.p(u);
            }
        }
        acc - 1.0
    }

    /// `f`, `f'`, `f''` in one sweep (three f64 accumulators).
    fn sums(self, s: &[f64], tau: f64) -> ThresholdSums {
        let (mut a0, mut a1, mut a2, mut k) = (0.0f64, 0.0f64, 0.0f64, 0usize);
        match self {
            Power::Two => {
                for &si in s {
                    let u = si - tau;
                    if u > 0.0 {
                        a0 += u;
                        k += 1;
                    }
                }
                ThresholdSums {
                    f: a0 - 1.0,
                    df: -(k as f64),
                    ddf: 0.0,
                    support: k,
                }
            }
            Power::OneHalf => {
                for &si in s {
                    let u = si - tau;
                    if u > 0.0 {
                        a0 += u * u;
                        a1 += u;
                        k += 1;
                    }
                }
                ThresholdSums {
                    f: a0 - 1.0,
                    df: -2.0 * a1,
                    ddf: 2.0 * k as f64,
                    support: k,
                }
            }
            Power::General {
                c0,
                c1,
                t1_floor,
                t2_floor,
            } => {
                for &si in s {
                    let u = si - tau;
                    if u > 0.0 {
                        let t0 = u.powf(c0);
                        a0 += t0;
                        if u >= DERIV_U_FLOOR {
                            let t1 = t0 / u;
                            a1 += t1;
                            a2 += t1 / u;
                        } else {
                            a1 += t1_floor;
                            a2 += t2_floor;
                        }
                        k += 1;
                    }
                }
                ThresholdSums {
                    f: a0 - 1.0,
                    df: -c0 * a1,
                    ddf: c0 * c1 * a2,
                    support: k,
                }
            }
        }
    }
}

/// `f(τ)`, `f'(τ)`, `f''(τ)` and the active-set size for a scaled row `s` (any shift; `-inf`
/// entries are ignored), exactly as the Halley solver accumulates them (f64, closed forms for
/// α ∈ {1.5, 2}, derivative floor [`DERIV_U_FLOOR`] for other α). Useful to check other
/// backends. α is not validated here (α must be > 1).
pub fn threshold_sums_f64(s: &[f64], tau: f64, alpha: f64) -> ThresholdSums {
    Power::new(alpha).sums(s, tau)
}

// ---------------------------------------------------------------------------------------------
// Solver cores (on a prepared, shifted row: max s = 0)
// ---------------------------------------------------------------------------------------------

struct Solved {
    p: Vec<f64>,
    tau: f64,
    iterations: u32,
    fallbacks: u32,
    converged: bool,
    residual: f64,
    support: usize,
}

/// Output sweep: `p_i = [s_i − τ]_+^c0`, renormalised by the sum.
fn finish(
    s: &[f64],
    pw: Power,
    tau: f64,
    iterations: u32,
    fallbacks: u32,
    converged: bool,
) -> Solved {
    let mut p = Vec::with_capacity(s.len());
    let mut sum = 0.0f64;
    let mut support = 0usize;
    for &si in s {
        let u = si - tau;
        let v = if u > 0.0 {
            support += 1;
            pw.p(u)
        } else {
            0.0
        };
        sum += v;
        p.push(v);
    }
    // τ ≤ τ_hi < max s (= 0) in every solver, so the max entry is active and sum > 0. Guard
    // anyway (a start τ outside the bracket from the hidden entry point).
    if sum > 0.0 && sum.is_finite() {
        let inv = 1.0 / sum;
        for v in &mut p {
            *v *= inv;
        }
    }
    Solved {
        p,
        tau,
        iterations,
        fallbacks,
        converged,
        residual: sum - 1.0,
        support,
    }
}

fn solve_bisect(s: &[f64], n: usize, alpha: f64, opts: &EntmaxOptions) -> Solved {
    let pw = Power::new(alpha);
    let mut br = TauBracket::for_row(0.0, n, alpha);
    let mut tau = br.midpoint();
    let mut it = 0u32;
    let mut converged = false;
    loop {
        let ff = pw.f(s, tau);
        if ff.abs() < opts.tol {
            converged = true;
            break;
        }
        if it >= opts.max_iter {
            break;
        }
        tau = br.bisect(tau, ff);
        it += 1;
    }
    finish(s, pw, tau, it, 0, converged)
}

fn solve_halley(
    s: &[f64],
    n: usize,
    alpha: f64,
    opts: &EntmaxOptions,
    start: Option<f64>,
) -> Solved {
    let pw = Power::new(alpha);
    let mut br = TauBracket::for_row(0.0, n, alpha);
    let mut tau = start.unwrap_or_else(|| br.midpoint());
    let mut it = 0u32;
    let mut fallbacks = 0u32;
    let mut converged = false;
    loop {
        let t = pw.sums(s, tau);
        if t.f.abs() < opts.tol {
            converged = true;
            break;
        }
        if it >= opts.max_iter {
            break;
        }
        let step = br.halley(tau, t.f, t.df, t.ddf);
        fallbacks += u32::from(step.fallback);
        tau = step.tau;
        it += 1;
    }
    finish(s, pw, tau, it, fallbacks, converged)
}

/// Bisection until the bracket cannot shrink in f64 (or [`EXACT_BISECT_MAX_ITER`]); returns the
/// lower end, which satisfies `f(τ) ≥ 0` and is within one ulp of the root.
fn solve_bisect_exact(s: &[f64], n: usize, alpha: f64) -> Solved {
    let pw = Power::new(alpha);
    let mut br = TauBracket::for_row(0.0, n, alpha);
    let mut it = 0u32;
    while it < EXACT_BISECT_MAX_ITER {
        let mid = br.midpoint();
        if mid <= br.lo || mid >= br.hi {
            break;
        }
        let ff = pw.f(s, mid);
        br.bisect(mid, ff);
        it += 1;
    }
    finish(s, pw, br.lo, it, 0, true)
}

fn to_result<T>(row: &Row, solved: Solved, conv: impl Fn(f64) -> T) -> EntmaxResult<T> {
    EntmaxResult {
        probs: solved.p.into_iter().map(conv).collect(),
        tau: solved.tau + row.offset,
        iterations: solved.iterations,
        support: solved.support,
        fallbacks: solved.fallbacks,
        converged: solved.converged,
        residual: solved.residual,
    }
}

// ---------------------------------------------------------------------------------------------
// Exact references (f64)
// ---------------------------------------------------------------------------------------------

/// Finite entries of `z` shifted by the max and sorted descending, plus the max.
/// `Ok(None)` if all entries are `-inf`.
fn sorted_shifted(op: &'static str, z: &[f64], scale: f64) -> Result<Option<(Vec<f64>, Row)>> {
    let Some(row) = prepare(op, z, scale)? else {
        return Ok(None);
    };
    let mut v: Vec<f64> = row.s.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_unstable_by(|a, b| b.total_cmp(a));
    Ok(Some((v, row)))
}

fn probs_from_tau(s: &[f64], tau: f64, pw: Power) -> Vec<f64> {
    s.iter()
        .map(|&si| {
            let u = si - tau;
            if u > 0.0 { pw.p(u) } else { 0.0 }
        })
        .collect()
}

/// Exact sparsemax (α = 2) by sorting, in f64: `p_i = [z_i − τ]_+`.
///
/// With the finite entries sorted descending `z_(1) ≥ … ≥ z_(n)` and prefix sums `c_k`, the
/// support size is `k* = max{k : 1 + k·z_(k) > c_k}` and `τ = (c_{k*} − 1)/k*` (scaled space
/// = unscaled space for α = 2). O(n log n). Same rules as the module docs (strict support,
/// `-inf` → 0, all `-inf` → zeros with `τ = -inf`, errors for empty rows and NaN/`+inf`).
///
/// Returns `(p, τ)`.
pub fn sparsemax_exact(z: &[f64]) -> Result<(Vec<f64>, f64)> {
    const OP: &str = "sparsemax_exact";
    let Some((v, row)) = sorted_shifted(OP, z, 1.0)? else {
        return Ok((vec![0.0; z.len()], f64::NEG_INFINITY));
    };
    let mut c = 0.0f64;
    let mut best = (1usize, v[0] - 1.0);
    for (k0, &x) in v.iter().enumerate() {
        let k = (k0 + 1) as f64;
        c += x;
        if 1.0 + k * x > c {
            best = (k0 + 1, (c - 1.0) / k);
        }
    }
    let tau = best.1;
    Ok((probs_from_tau(&row.s, tau, Power::Two), tau + row.offset))
}

/// Exact 1.5-entmax by sorting, in f64: `p_i = [s_i − τ]_+²`, `s = z/2`.
///
/// With `x = (z − max z)/2` sorted descending: for every `k`, `mean_k`, `ss_k = Σ_{i≤k}
/// (x_(i) − mean_k)²`, `δ_k = (1 − ss_k)/k`, `τ_k = mean_k − √max(δ_k, 0)`; the support size
/// is the largest `k` with `τ_k ≤ x_(k)` (the condition is equivalent to
/// `Σ_{i≤k}(x_(i) − x_(k))² ≤ 1`, which is monotone in `k`) and `τ = τ_{k*}`. Mean and `ss`
/// are accumulated with Welford's update. τ is reported in the scaled space `s = z/2` of the
/// unshifted row (Example A: `z = [2, 1, 0, −1]` ⇒ `τ = (3 − √7)/4`). Same rules as the module
/// docs.
///
/// Returns `(p, τ)`.
pub fn entmax15_exact(z: &[f64]) -> Result<(Vec<f64>, f64)> {
    const OP: &str = "entmax15_exact";
    let Some((v, row)) = sorted_shifted(OP, z, 0.5)? else {
        return Ok((vec![0.0; z.len()], f64::NEG_INFINITY));
    };
    let (mut mean, mut ss) = (0.0f64, 0.0f64);
    let mut tau = v[0] - 1.0;
    for (k0, &x) in v.iter().enumerate() {
        let k = (k0 + 1) as f64;
        let d = x - mean;
        mean += d / k;
        ss += d * (x - mean);
        let delta = (1.0 - ss) / k;
        let tk = mean - delta.max(0.0).sqrt();
        if tk <= x {
            tau = tk;
        }
    }
    Ok((
        probs_from_tau(&row.s, tau, Power::OneHalf),
        tau + row.offset,
    ))
}

/// The support and weights of an α > 2 row, solved where f64 resolves them (see
/// [`entmax_exact_f64`]): every entry `s > v` gets `(s − v + u)^(1/(α−1))`, every entry
/// `s = v` (the smallest support value) gets `p`, the others 0; `τ = v − u`,
/// `u = p^(α−1)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Kink {
    /// Smallest value in the support.
    pub v: f64,
    /// `v − τ` (may underflow to 0 while `p` does not).
    pub u: f64,
    /// Weight of each entry equal to `v`.
    pub p: f64,
}

impl Kink {
    /// The (unnormalised) weight of an entry with shifted scaled score `s`.
    #[inline]
    pub(crate) fn weight(&self, s: f64, c0: f64) -> f64 {
        if s > self.v {
            (s - self.v + self.u).powf(c0)
        } else if s == self.v {
            self.p
        } else {
            0.0
        }
    }
    /// The threshold `τ = v − u`.
    pub(crate) fn tau(&self) -> f64 {
        self.v - self.u
    }
}

/// [`Kink`] of the entries `c` (shifted scaled scores of one row, max 0, a superset of
/// the support such as every finite entry or every entry `> −1`; sorted in place,
/// descending) for α > 2.
///
/// 1. The support: with `f(v) = Σ_{c_i > v} (c_i − v)^(1/(α−1)) − 1` non-decreasing as
///    `v` runs down the sorted values, the smallest support value is the last `v = c_k`
///    with `f(c_k) < 0` (binary search).
/// 2. The weight `p` of each entry at `v` (there are `m`): the root of the increasing
///    `h(p) = m·p + Σ_{c_i > v} (c_i − v + p^(α−1))^(1/(α−1)) − 1` on
///    `[0, min(1/m, (v − v')^(1/(α−1)))]` (`v'` the next smaller value, or −1), by bisection
///    until the bracket stops shrinking.
///
/// Parametrising by `p` instead of τ is what makes this accurate for α > 2: `p = u^(1/(α−1))`
/// is steep in `u = v − τ`, so τ itself may need to lie within `1e-120` of `v` (α = 65.5,
/// `p ≈ 0.0135`), far below the resolution of f64, while `p` is resolved to the last bit.
pub(crate) fn kink_solve(c: &mut [f64], alpha: f64) -> Kink {
    let c0 = 1.0 / (alpha - 1.0);
    c.sort_unstable_by(|a, b| b.total_cmp(a));
    let f_at = |k: usize| -> f64 {
        let v = c[k];
        c[..k]
            .iter()
            .take_while(|&&x| x > v)
            .map(|&x| (x - v).powf(c0))
            .sum::<f64>()
            - 1.0
    };
    // Largest k with f(c_k) < 0 (f(c_0) = −1).
    let (mut lo, mut hi) = (0usize, c.len());
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if f_at(mid) < 0.0 { lo = mid } else { hi = mid }
    }
    let v = c[lo];
    let first = c.partition_point(|&x| x > v);
    let last = c.partition_point(|&x| x >= v);
    let m = (last - first) as f64;
    let next = c.get(last).copied().unwrap_or(-1.0).max(-1.0);
    let above = &c[..first];
    let h = |p: f64| {
        let u = p.powf(alpha - 1.0);
        m * p + above.iter().map(|&x| (x - v + u).powf(c0)).sum::<f64>() - 1.0
    };
    let (mut plo, mut phi) = (0.0f64, (1.0 / m).min((v - next).powf(c0)));
    for _ in 0..EXACT_BISECT_MAX_ITER {
        let mid = 0.5 * (plo + phi);
        if mid <= plo || mid >= phi {
            break;
        }
        if h(mid) < 0.0 { plo = mid } else { phi = mid }
    }
    // The end with the smaller |h|.
    let p = if h(phi).abs() <= h(plo).abs() {
        phi
    } else {
        plo
    };
    Kink {
        v,
        u: p.powf(alpha - 1.0),
        p,
    }
}

/// The f64 reference for any α > 1: α = 2 → [`sparsemax_exact`], α = 1.5 →
/// [`entmax15_exact`]; other α < 2: bisection on the bounds of [`tau_bounds`] until the
/// bracket cannot shrink in f64 (≤ [`EXACT_BISECT_MAX_ITER`] halvings); α > 2: sort, find
/// the support, and solve for the weight of its smallest entry instead of τ (for α > 2, τ
/// can lie closer to an entry than f64 resolves: α = 65.5 on `s = [0, −0.4156]` has
/// `τ = s_1 − 1e-121` and weights `[0.9865, 0.0135]`, which any bisection on τ turns into
/// `[0.64, 0.36]`). Output renormalised. Returns `(p, τ)` with τ in the scaled space
/// `s = (α−1)·z`.
pub fn entmax_exact_f64(z: &[f64], alpha: f64) -> Result<(Vec<f64>, f64)> {
    const OP: &str = "entmax_exact_f64";
    check_alpha(OP, alpha)?;
    if alpha == 2.0 {
        return sparsemax_exact(z);
    }
    if alpha == 1.5 {
        return entmax15_exact(z);
    }
    let Some(row) = prepare(OP, z, alpha - 1.0)? else {
        return Ok((vec![0.0; z.len()], f64::NEG_INFINITY));
    };
    if alpha > 2.0 {
        let mut c: Vec<f64> = row.s.iter().copied().filter(|x| x.is_finite()).collect();
        let kink = kink_solve(&mut c, alpha);
        let c0 = 1.0 / (alpha - 1.0);
        let mut p: Vec<f64> = row.s.iter().map(|&s| kink.weight(s, c0)).collect();
        let sum: f64 = p.iter().sum();
        if sum > 0.0 && sum.is_finite() {
            p.iter_mut().for_each(|x| *x /= sum);
        }
        return Ok((p, kink.tau() + row.offset));
    }
    let solved = solve_bisect_exact(&row.s, row.n, alpha);
    Ok((solved.p, solved.tau + row.offset))
}

// ---------------------------------------------------------------------------------------------
// Iterative solvers: f64 and f32 public API
// ---------------------------------------------------------------------------------------------

fn run<T: Copy + Into<f64>, U: Copy + Default>(
    op: &'static str,
    z: &[T],
    alpha: f64,
    opts: &EntmaxOptions,
    solver: impl FnOnce(&Row) -> Solved,
    conv: impl Fn(f64) -> U,
) -> Result<EntmaxResult<U>> {
    check_alpha(op, alpha)?;
    opts.validate(op)?;
    match prepare(op, z, alpha - 1.0)? {
        None => Ok(masked_result(z.len())),
        Some(row) => {
            let solved = solver(&row);
            Ok(to_result(&row, solved, conv))
        }
    }
}

/// Plain bisection in f64 (the `entmax` package baseline, `entmax_bisect`).
///
/// Bounds of [`tau_bounds`] (`τ_lo = m − 1`, `τ_hi = m − n^(1−α)`, `n` = visible entries),
/// start at the midpoint, halve (`f ≥ 0` ⇒ `τ_lo ← τ`, else `τ_hi ← τ`) until `|f(τ)| < tol`
/// or `max_iter` updates; output renormalised by its sum. Any α > 1 (also α > 2).
pub fn entmax_bisect_f64(z: &[f64], alpha: f64, opts: &EntmaxOptions) -> Result<EntmaxResult64> {
    run(
        "entmax_bisect_f64",
        z,
        alpha,
        opts,
        |r| solve_bisect(&r.s, r.n, alpha, opts),
        |x| x,
    )
}

/// Hybrid Halley–bisection in f64 (AdaSplash §1.4), see [`entmax_halley`].
pub fn entmax_halley_f64(z: &[f64], alpha: f64, opts: &EntmaxOptions) -> Result<EntmaxResult64> {
    run(
        "entmax_halley_f64",
        z,
        alpha,
        opts,
        |r| solve_halley(&r.s, r.n, alpha, opts, None),
        |x| x,
    )
}

/// [`entmax_halley_f64`] started at `start_tau` (scaled space of the unshifted row, like the
/// reported τ) instead of the bracket midpoint. For tests of the safeguard and for reproducing
/// the row-kernel trace (`start = m − 0.5`); the start should lie in the bracket of
/// [`tau_bounds`].
#[doc(hidden)]
pub fn entmax_halley_f64_from(
    z: &[f64],
    alpha: f64,
    opts: &EntmaxOptions,
    start_tau: f64,
) -> Result<EntmaxResult64> {
    run(
        "entmax_halley_f64_from",
        z,
        alpha,
        opts,
        |r| solve_halley(&r.s, r.n, alpha, opts, Some(start_tau - r.offset)),
        |x| x,
    )
}

/// Plain bisection for an f32 row (accumulation in f64): the baseline, see
/// [`entmax_bisect_f64`]. Use [`EntmaxOptions::bisection`] (50 updates, `tol = 1e-7`).
///
/// `z`: one row of `n` logits (`-inf` = masked). Returns `p` (length `n`) and the diagnostics
/// of [`EntmaxResult`].
pub fn entmax_bisect(z: &[f32], alpha: f32, opts: &EntmaxOptions) -> Result<EntmaxResult> {
    let a = f64::from(alpha);
    run(
        "entmax_bisect",
        z,
        a,
        opts,
        |r| solve_bisect(&r.s, r.n, a, opts),
        |x| x as f32,
    )
}

/// α-entmax of one f32 row by hybrid Halley–bisection (AdaSplash): what users call.
///
/// * scaled shifted scores `s_i = (α−1)(z_i − max z)`, accumulated in f64;
/// * bracket of [`tau_bounds`] (`τ_lo = m − 1`, `τ_hi = m − n^(1−α)`, `n` = finite entries),
///   start at its midpoint;
/// * each update: one sweep for `f`, `f'`, `f''` ([`ThresholdSums`]; α = 1.5 uses
///   `Σu² − 1, −2Σu, 2|S|` and α = 2 uses `Σu − 1, −|S|, 0`, i.e. Newton — no `powf`),
///   then [`TauBracket::halley`]: tighten, Halley candidate, accept iff
///   `τ_lo − ε < τ_H < τ_hi + ε` (ε = [`HALLEY_EPS`]) else bisect;
/// * stop when `|f(τ)| < opts.tol` or after `opts.max_iter` updates;
/// * output `p_i = [s_i − τ]_+^(1/(α−1))` renormalised by its sum (unlike the AdaSplash kernels,
///   which do not renormalise), then rounded to f32.
///
/// With the default options the result is within `1e-5` (absolute) of [`entmax_exact_f64`] and
/// `|Σp − 1| ≤ 1e-5`. Support is strict (`s_i > τ`), ties share mass, `-inf` gets 0; see the
/// module docs for errors and the fully masked row.
pub fn entmax_halley(z: &[f32], alpha: f32, opts: &EntmaxOptions) -> Result<EntmaxResult> {
    let a = f64::from(alpha);
    run(
        "entmax_halley",
        z,
        a,
        opts,
        |r| solve_halley(&r.s, r.n, a, opts, None),
        |x| x as f32,
    )
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

fn check_pair(op: &'static str, p: usize, dy: usize) -> Result<()> {
    if p != dy {
        return Err(Error::Shape {
            op,
            what: format!("p and dy must have the same length, got {p} and {dy}"),
        });
    }
    Ok(())
}

/// `g_i = p_i^(2−α)` on the support (`p_i > 0`), 0 elsewhere.
fn gate(p: f64, alpha: f64) -> f64 {
    if p > 0.0 {
        if alpha == 2.0 {
            1.0
        } else if alpha == 1.5 {
            p.sqrt()
        } else {
            p.powf(2.0 - alpha)
        }
    } else {
        0.0
    }
}

fn vjp_core<T: Copy + Into<f64>>(p: &[T], dy: &[T], alpha: f64) -> Vec<f64> {
    let g: Vec<f64> = p.iter().map(|&x| gate(x.into(), alpha)).collect();
    let (mut sg, mut sgd) = (0.0f64, 0.0f64);
    for (&gi, &d) in g.iter().zip(dy) {
        sg += gi;
        sgd += gi * d.into();
    }
    if sg <= 0.0 {
        return vec![0.0; p.len()];
    }
    let mean = sgd / sg;
    g.iter()
        .zip(dy)
        .map(|(&gi, &d)| {
            if gi > 0.0 {
                gi * (d.into() - mean)
            } else {
                0.0
            }
        })
        .collect()
}

/// Vector–Jacobian product of α-entmax (backward pass) for one row, in f64.
///
/// The Jacobian of `p = entmax_α(z)` w.r.t. the **unscaled** `z` is `diag(g) − g gᵀ/Σg` with
/// `g_i = p_i^(2−α)` on the support (`p_i > 0`) and 0 elsewhere (sparsemax: `g = 1[p>0]`,
/// 1.5-entmax: `g = √p`), so
///
/// ```text
/// dz_i = g_i·dy_i − g_i·(Σ_j g_j dy_j)/(Σ_j g_j).
/// ```
///
/// Entries outside the support get exactly 0; if `p` has no positive entry (fully masked row)
/// `dz = 0`. `p` and `dy` must have the same length ([`Error::Shape`]); α as in the forward.
pub fn entmax_vjp_f64(p: &[f64], dy: &[f64], alpha: f64) -> Result<Vec<f64>> {
    const OP: &str = "entmax_vjp_f64";
    check_alpha(OP, alpha)?;
    check_pair(OP, p.len(), dy.len())?;
    Ok(vjp_core(p, dy, alpha))
}

/// f32 version of [`entmax_vjp_f64`] (accumulates in f64).
pub fn entmax_vjp(p: &[f32], dy: &[f32], alpha: f32) -> Result<Vec<f32>> {
    const OP: &str = "entmax_vjp";
    let a = f64::from(alpha);
    check_alpha(OP, a)?;
    check_pair(OP, p.len(), dy.len())?;
    Ok(vjp_core(p, dy, a).into_iter().map(|x| x as f32).collect())
}

fn alpha_grad_core<T: Copy + Into<f64>>(p: &[T], dy: &[T], alpha: f64) -> f64 {
    let am1 = alpha - 1.0;
    let (mut sg, mut h) = (0.0f64, 0.0f64);
    for &x in p {
        let x: f64 = x.into();
        sg += gate(x, alpha);
        if x > 0.0 {
            h += x * x.ln();
        }
    }
    if sg <= 0.0 {
        return 0.0;
    }
    let mut acc = 0.0f64;
    for (&x, &d) in p.iter().zip(dy) {
        let x: f64 = x.into();
        let pt = gate(x, alpha) / sg;
        let si = if x > 0.0 { x * x.ln() } else { 0.0 };
        acc += d.into() * ((x - pt) / (am1 * am1) - (si - pt * h) / am1);
    }
    acc
}

/// Gradient of a loss w.r.t. α for one row, given `p = entmax_α(z)` and `dy = ∂L/∂p`
/// (Correia et al. 2019, "Adaptively Sparse Transformers"), in f64:
///
/// ```text
/// ∂L/∂α = Σ_i dy_i [ (p_i − p̃_i)/(α−1)² − (S_i − p̃_i·H)/(α−1) ],
/// p̃ = g/Σg,  g_i = p_i^(2−α) on the support,  S_i = p_i ln p_i (0 if p_i = 0),  H = Σ_i S_i.
/// ```
///
/// Returns 0 for a fully masked row. `p` and `dy` must have the same length.
pub fn entmax_alpha_grad_f64(p: &[f64], dy: &[f64], alpha: f64) -> Result<f64> {
    const OP: &str = "entmax_alpha_grad_f64";
    check_alpha(OP, alpha)?;
    check_pair(OP, p.len(), dy.len())?;
    Ok(alpha_grad_core(p, dy, alpha))
}

/// f32-input version of [`entmax_alpha_grad_f64`] (accumulates and returns f64).
pub fn entmax_alpha_grad(p: &[f32], dy: &[f32], alpha: f32) -> Result<f64> {
    const OP: &str = "entmax_alpha_grad";
    let a = f64::from(alpha);
    check_alpha(OP, a)?;
    check_pair(OP, p.len(), dy.len())?;
    Ok(alpha_grad_core(p, dy, a))
}

// ---------------------------------------------------------------------------------------------
// Learned α
// ---------------------------------------------------------------------------------------------

/// Numerically stable logistic sigmoid (never evaluates `exp` of a positive argument).
fn sigmoid(a: f32) -> f32 {
    if a >= 0.0 {
        1.0 / (1.0 + (-a).exp())
    } else {
        let e = a.exp();
        e / (1.0 + e)
    }
}

/// Learned-α parametrisation of Correia et al.: `α = 1 + sigmoid(a) ∈ (1, 2)` for an
/// unconstrained per-head logit `a` (sigmoid computed stably, no overflow for any `a`).
///
/// In f32, `α` rounds to exactly `1.0` for `a ≲ −16.6` (and to `2.0` for `a ≳ 16.6`); entmax
/// rejects `α = 1`, so keep `a` in a moderate range (e.g. clamp to `[−10, 10]`).
///
/// One gradient step on `a`, given `∂L/∂α` from [`entmax_alpha_grad`]:
///
/// ```
/// use kvsieve::entmax::{alpha_from_logit, dalpha_dlogit, entmax_alpha_grad, entmax_halley,
///                       EntmaxOptions};
///
/// let mut a = 0.0f32; // α = 1.5
/// let z = [2.0f32, 1.0, 0.0, -1.0];
/// let alpha = alpha_from_logit(a);
/// assert_eq!(alpha, 1.5);
/// let p = entmax_halley(&z, alpha, &EntmaxOptions::default()).unwrap().probs;
/// // loss L = -log p_0 (make the first entry more likely): dL/dp = [-1/p_0, 0, 0, 0]
/// let dy = [-1.0 / p[0], 0.0, 0.0, 0.0];
/// let dl_dalpha = entmax_alpha_grad(&p, &dy, alpha).unwrap();
/// let dl_da = dl_dalpha as f32 * dalpha_dlogit(a);
/// a -= 0.5 * dl_da;
/// // Larger α = sparser = more mass on the largest logit: the step increases α.
/// assert!(alpha_from_logit(a) > alpha);
/// let p_new = entmax_halley(&z, alpha_from_logit(a), &EntmaxOptions::default()).unwrap().probs;
/// assert!(p_new[0] > p[0]);
/// ```
pub fn alpha_from_logit(a: f32) -> f32 {
    1.0 + sigmoid(a)
}

/// `dα/da = sigmoid(a)·(1 − sigmoid(a))` for [`alpha_from_logit`] (computed as
/// `sigmoid(a)·sigmoid(−a)`, accurate in both tails).
pub fn dalpha_dlogit(a: f32) -> f32 {
    sigmoid(a) * sigmoid(-a)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-9;

    fn close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "entry {i}: {x} vs {y} (tol {tol})");
        }
    }

    fn tight() -> EntmaxOptions {
        EntmaxOptions::new(100, 1e-13)
    }

    /// Runs every f64 solver on `z` and checks p and τ against the golden values.
    fn check_all(z: &[f64], alpha: f64, tau: f64, p: &[f64]) {
        let (pe, te) = entmax_exact_f64(z, alpha).unwrap();
        close(&pe, p, TOL);
        assert!((te - tau).abs() <= TOL, "exact tau {te} vs {tau}");
        let b = entmax_bisect_f64(z, alpha, &tight()).unwrap();
        close(&b.probs, p, TOL);
        assert!((b.tau - tau).abs() <= TOL, "bisect tau {} vs {tau}", b.tau);
        let h = entmax_halley_f64(z, alpha, &tight()).unwrap();
        close(&h.probs, p, TOL);
        assert!((h.tau - tau).abs() <= TOL, "halley tau {} vs {tau}", h.tau);
        assert!(h.converged);
        let zf: Vec<f32> = z.iter().map(|&x| x as f32).collect();
        let h32 = entmax_halley(&zf, alpha as f32, &EntmaxOptions::default()).unwrap();
        for (x, y) in h32.probs.iter().zip(p) {
            assert!((f64::from(*x) - y).abs() <= 1e-6);
        }
    }

    // Example A (algorithms.md §1.7): α = 1.5, z = [2, 1, 0, −1], s = z/2 = [1, .5, 0, −.5].
    // Support {1, 2}: (1 − τ)² + (0.5 − τ)² = 1 ⇔ 2τ² − 3τ + 0.25 = 0 ⇒ τ = (3 − √7)/4;
    // p = [(1 − τ)², (0.5 − τ)²] = [(4 + √7)/8, (4 − √7)/8].
    #[test]
    fn example_a() {
        let z = [2.0, 1.0, 0.0, -1.0];
        let r7 = 7f64.sqrt();
        let tau = (3.0 - r7) / 4.0;
        assert!((tau - 0.0885621722338524).abs() < 1e-15);
        let p = [(4.0 + r7) / 8.0, (4.0 - r7) / 8.0, 0.0, 0.0];
        check_all(&z, 1.5, tau, &p);
        let (pe, _) = entmax15_exact(&z).unwrap();
        assert_eq!(pe[2], 0.0);
        assert_eq!(pe[3], 0.0);

        // Attention-kernel trace (τ_lo = 0, τ_hi = 0.5, start 0.25): §1.7 lists
        // 0.0921052632 → 0.0885621979 → 0.0885621722 (10 digits given).
        let trace = [0.0921052632, 0.0885621979, 0.0885621722];
        for (k, want) in trace.iter().enumerate() {
            let r =
                entmax_halley_f64(&z, 1.5, &EntmaxOptions::fixed_iterations(k as u32 + 1)).unwrap();
            assert_eq!(r.iterations, k as u32 + 1);
            assert_eq!(r.fallbacks, 0);
            assert!((r.tau - want).abs() < 1e-10, "iter {}: {}", k + 1, r.tau);
        }
        // Converged to 1e-10 in 3 iterations.
        let r = entmax_halley_f64(&z, 1.5, &EntmaxOptions::fixed_iterations(3)).unwrap();
        assert!((r.tau - tau).abs() < 1e-10);
        // Row-kernel trace (start m − 0.5 = 0.5): 0.0714285714 → 0.0885594069 → 0.0885621722.
        let trace = [0.0714285714, 0.0885594069, 0.0885621722];
        for (k, want) in trace.iter().enumerate() {
            let o = EntmaxOptions::fixed_iterations(k as u32 + 1);
            let r = entmax_halley_f64_from(&z, 1.5, &o, 0.5).unwrap();
            assert!((r.tau - want).abs() < 1e-10, "iter {}: {}", k + 1, r.tau);
        }

        // Backward (g = √p): hand-checkable, dz_1 = g1 − g1²/(g1 + g2) with g = √p;
        // golden values from §1.7.
        let d = 0.283473354757;
        let dz = entmax_vjp_f64(&p, &[1.0, 0.0, 0.0, 0.0], 1.5).unwrap();
        close(&dz, &[d, -d, 0.0, 0.0], 1e-11);
        let dz = entmax_vjp_f64(&p, &[1.0, 2.0, 3.0, 4.0], 1.5).unwrap();
        close(&dz, &[-d, d, 0.0, 0.0], 1e-11);
        // Closed form: g1 g2 /(g1 + g2) with g = √p.
        let (g1, g2) = (p[0].sqrt(), p[1].sqrt());
        assert!((g1 * g2 / (g1 + g2) - d).abs() < 1e-11);
    }

    // Example B: α = 1.5, z = [1, .8, .2, −.5], support 3, s = [.5, .4, .1]:
    // 3τ² − 2τ + 0.42 − 1 = 0 ⇒ τ = (2 − √10.96)/6 (matches §1.7: −0.218431511908228).
    #[test]
    fn example_b() {
        let z = [1.0, 0.8, 0.2, -0.5];
        let tau = (2.0 - 10.96f64.sqrt()) / 6.0;
        assert!((tau - -0.218431511908228).abs() < 1e-14);
        let s = [0.5, 0.4, 0.1];
        let p = [
            (s[0] - tau).powi(2),
            (s[1] - tau).powi(2),
            (s[2] - tau).powi(2),
            0.0,
        ];
        close(
            &p,
            &[0.516143837302743, 0.382457534921097, 0.101398627776160, 0.0],
            1e-14,
        );
        check_all(&z, 1.5, tau, &p);
        // VJP golden values from §1.7.
        let dz = entmax_vjp_f64(&p, &[1.0, 2.0, 3.0, 4.0], 1.5).unwrap();
        close(
            &dz,
            &[-0.544823372353, 0.149443255822, 0.395380116531, 0.0],
            1e-11,
        );
        // α-gradient: mpmath (30 digits) central difference of L(α) = Σ dy_i p_i(α) with
        // h = 1e-10 gives −0.4561720618586048 (the formula agrees to 20 digits).
        let ga = entmax_alpha_grad_f64(&p, &[1.0, 2.0, 3.0, 4.0], 1.5).unwrap();
        assert!((ga - -0.4561720618586048).abs() < 1e-12, "{ga}");
    }

    // Example C: α = 1.5, z = [.5, .4, .3, .2], full support, s = [.25, .2, .15, .1]:
    // 4τ² − 1.4τ + 0.135 − 1 = 0 ⇒ τ = (1.4 − √15.8)/8 (§1.7: −0.321865172858795).
    #[test]
    fn example_c() {
        let z = [0.5, 0.4, 0.3, 0.2];
        let tau = (1.4 - 15.8f64.sqrt()) / 8.0;
        assert!((tau - -0.321865172858795).abs() < 1e-14);
        let p: Vec<f64> = [0.25, 0.2, 0.15, 0.1]
            .iter()
            .map(|s| (s - tau).powi(2))
            .collect();
        close(
            &p,
            &[
                0.327029775928819,
                0.272343258642940,
                0.222656741357060,
                0.177970224071181,
            ],
            1e-14,
        );
        check_all(&z, 1.5, tau, &p);
        let dz = entmax_vjp_f64(&p, &[1.0, 2.0, 3.0, 4.0], 1.5).unwrap();
        close(
            &dz,
            &[
                -0.785863610436,
                -0.195287870145,
                0.295287870145,
                0.685863610436,
            ],
            1e-11,
        );
    }

    // z = [2, 1, 0, −1] with other α (§1.7, re-checked with a 200-step mpmath bisection at 30
    // digits). α = 2: s = z, τ = 1 exactly and entry 2 sits on the threshold → exactly 0.
    #[test]
    fn example_other_alpha() {
        let z = [2.0, 1.0, 0.0, -1.0];
        check_all(&z, 2.0, 1.0, &[1.0, 0.0, 0.0, 0.0]);
        let (p, tau) = sparsemax_exact(&z).unwrap();
        assert_eq!(p, vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(tau, 1.0);
        let h = entmax_halley_f64(&z, 2.0, &EntmaxOptions::default()).unwrap();
        assert_eq!(h.probs, vec![1.0, 0.0, 0.0, 0.0]);
        assert_eq!(h.support, 1);
        check_all(
            &z,
            1.75,
            0.574587737255819,
            &[0.901807134396210, 0.098192865603790, 0.0, 0.0],
        );
        check_all(
            &z,
            1.25,
            -0.430600665861472,
            &[
                0.749986482300480,
                0.214570235864296,
                0.034379439206421,
                0.001063842628803,
            ],
        );
    }

    #[test]
    fn bad_input() {
        let z = [1.0f32, 2.0];
        let o = EntmaxOptions::default();
        for f in [entmax_halley, entmax_bisect] {
            match f(&z, 1.0, &o) {
                Err(Error::Alpha { alpha, reason, .. }) => {
                    assert_eq!(alpha, 1.0);
                    assert!(reason.contains("softmax"));
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(f(&z, 0.5, &o), Err(Error::Alpha { .. })));
            assert!(matches!(f(&z, f32::NAN, &o), Err(Error::Alpha { .. })));
            assert!(matches!(f(&z, f32::INFINITY, &o), Err(Error::Alpha { .. })));
            assert!(matches!(
                f(&[1.0, f32::NAN], 1.5, &o),
                Err(Error::NonFinite { .. })
            ));
            assert!(matches!(
                f(&[1.0, f32::INFINITY], 1.5, &o),
                Err(Error::NonFinite { .. })
            ));
            assert!(matches!(f(&[], 1.5, &o), Err(Error::Shape { .. })));
            assert!(matches!(
                f(&z, 1.5, &EntmaxOptions::new(0, 1e-7)),
                Err(Error::InvalidConfig { .. })
            ));
            assert!(matches!(
                f(&z, 1.5, &EntmaxOptions::new(10, f64::NAN)),
                Err(Error::InvalidConfig { .. })
            ));
        }
        assert!(matches!(sparsemax_exact(&[]), Err(Error::Shape { .. })));
        assert!(matches!(
            entmax15_exact(&[f64::NAN]),
            Err(Error::NonFinite { .. })
        ));
        assert!(matches!(
            entmax_exact_f64(&[1.0], 1.0),
            Err(Error::Alpha { .. })
        ));
        assert!(matches!(
            entmax_vjp(&[1.0], &[1.0, 2.0], 1.5),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            entmax_alpha_grad(&[1.0], &[1.0], 1.0),
            Err(Error::Alpha { .. })
        ));
    }

    #[test]
    fn masked_and_degenerate_rows() {
        let o = EntmaxOptions::default();
        let ninf = f32::NEG_INFINITY;
        for f in [entmax_halley, entmax_bisect] {
            for alpha in [1.25f32, 1.5, 2.0, 3.0] {
                let r = f(&[ninf, ninf, ninf], alpha, &o).unwrap();
                assert_eq!(r.probs, vec![0.0; 3]);
                assert_eq!(r.tau, f64::NEG_INFINITY);
                assert_eq!(r.support, 0);
                // Single visible entry.
                let r = f(&[ninf, 3.0, ninf], alpha, &o).unwrap();
                assert_eq!(r.probs, vec![0.0, 1.0, 0.0]);
                assert_eq!(r.support, 1);
                let r = f(&[7.0], alpha, &o).unwrap();
                assert_eq!(r.probs, vec![1.0]);
                // Ties at the max share mass exactly.
                let r = f(&[5.0, 1.0, 5.0, ninf], alpha, &o).unwrap();
                assert_eq!(r.probs[0], r.probs[2]);
                assert_eq!(r.probs[3], 0.0);
                // Huge logits.
                for big in [1e4f32, 1e30, 3e38] {
                    let r = f(&[big, -big, 0.0, big * 0.5], alpha, &o).unwrap();
                    assert!(r.probs.iter().all(|p| p.is_finite()));
                    assert_eq!(r.probs, vec![1.0, 0.0, 0.0, 0.0]);
                    let r = f(&[big, big, -big], alpha, &o).unwrap();
                    assert_eq!(r.probs, vec![0.5, 0.5, 0.0]);
                }
            }
        }
        for f in [sparsemax_exact, entmax15_exact] {
            let (p, t) = f(&[f64::NEG_INFINITY; 2]).unwrap();
            assert_eq!(p, vec![0.0; 2]);
            assert_eq!(t, f64::NEG_INFINITY);
            let (p, _) = f(&[1e30, -1e30, f64::NEG_INFINITY]).unwrap();
            assert_eq!(p, vec![1.0, 0.0, 0.0]);
        }
        let (p, _) = entmax_exact_f64(&[1e300, -1e300], 1.25).unwrap();
        assert_eq!(p, vec![1.0, 0.0]);
    }

    /// Forces the safeguard: start just below τ_hi for α ≥ 1.75 (f'' blows up as u → 0+) and
    /// checks that at least one Halley candidate is rejected and that the solver still converges.
    #[test]
    fn safeguard_fallback_is_exercised() {
        let mut total_fallbacks = 0;
        let mut state = 0x1234_5678_9abc_def0u64;
        for &alpha in &[1.75f64, 2.0, 2.5, 3.0] {
            for n in [4usize, 16, 128, 1024] {
                let z: Vec<f64> = (0..n)
                    .map(|_| {
                        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                        let mut x = state;
                        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                        x ^= x >> 31;
                        4.0 * ((x >> 11) as f64 / (1u64 << 53) as f64) - 2.0
                    })
                    .collect();
                let zmax = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let m = (alpha - 1.0) * zmax;
                let (_, hi) = tau_bounds(m, n, alpha);
                let start = hi - 1e-9;
                let o = EntmaxOptions::new(60, 1e-12);
                let r = entmax_halley_f64_from(&z, alpha, &o, start).unwrap();
                assert!(r.converged, "alpha {alpha} n {n}: {r:?}");
                let (pe, te) = entmax_exact_f64(&z, alpha).unwrap();
                close(&r.probs, &pe, 1e-9);
                assert!((r.tau - te).abs() < 1e-9);
                total_fallbacks += r.fallbacks;
            }
        }
        println!("adversarial starts: {total_fallbacks} bisection fallbacks");
        assert!(total_fallbacks >= 1, "no fallback happened");
        // A direct check of the update rule: a candidate far outside the bracket bisects.
        let mut br = TauBracket::new(-1.0, 0.0);
        let st = br.halley(-0.5, -0.1, -0.01, 0.0); // Newton step to −10.5
        assert!(st.fallback);
        assert_eq!(br.hi, -0.5);
        assert_eq!(st.tau, -0.75);
        assert_eq!(halley_step(f64::NAN, 1.0, 1.0, 0.0, -1.0, 0.0), -0.5);
    }

    #[test]
    fn learned_alpha() {
        assert_eq!(alpha_from_logit(0.0), 1.5);
        assert_eq!(dalpha_dlogit(0.0), 0.25);
        assert!(alpha_from_logit(-200.0) >= 1.0 && alpha_from_logit(200.0) <= 2.0);
        assert!(alpha_from_logit(f32::MAX).is_finite());
        assert!(dalpha_dlogit(-200.0) >= 0.0 && dalpha_dlogit(-200.0).is_finite());
        for a in [-5.0f32, -1.0, 0.3, 2.0, 6.0] {
            let h = 1e-3f32;
            let fd = (alpha_from_logit(a + h) - alpha_from_logit(a - h)) / (2.0 * h);
            assert!((fd - dalpha_dlogit(a)).abs() < 1e-3, "{a}: {fd}");
        }
    }
}
