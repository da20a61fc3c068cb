//! Run-time instruction-set detection for the CPU backend.
//!
//! The crate is compiled for the baseline target (no `target-cpu=native`, no
//! crate-wide `target_feature`); vector code lives in `#[target_feature]`
//! functions that are only entered after the features were confirmed here.
//!
//! An [`Isa`] value is a *proof*: the vector variants carry a [`Detected`]
//! witness that can only be minted inside this module, after
//! `is_x86_feature_detected!` / `is_aarch64_feature_detected!` confirmed the
//! features. Safe code can therefore never hand an `Isa::Avx512(..)` to a
//! kernel on a machine without AVX-512. [`Isa::Scalar`] is always valid.
//!
//! # `KVSIEVE_ISA`
//!
//! The environment variable `KVSIEVE_ISA` (`scalar`, `avx2`, `avx512`,
//! `neon`; case-insensitive) may *narrow* the choice made by [`detected`]:
//! the result is the best available ISA that is not above the requested one on
//! this architecture's ladder (`scalar < avx2 < avx512` on x86,
//! `scalar < neon` on aarch64). Requesting an ISA of another architecture
//! gives `scalar`. An unknown value is ignored with one warning on stderr.

use std::fmt;
use std::sync::OnceLock;

/// Zero-sized witness that the features of an [`Isa`] variant were detected
/// at run time on this machine. It has no public constructor.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Detected(());

/// An instruction set the CPU kernels can run with.
///
/// Obtain vector variants from [`detected`], [`available`] or
/// [`Isa::from_name`]; all of them check the running CPU first.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// Portable scalar code (always available).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C, 256-bit vectors.
    Avx2(Detected),
    /// x86-64 AVX-512F (plus AVX2 + FMA + F16C), 512-bit vectors.
    Avx512(Detected),
    /// aarch64 Advanced SIMD, 128-bit vectors.
    Neon(Detected),
}

/// The ISA names without proof, used by the pure narrowing logic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Scalar,
    Avx2,
    Avx512,
    Neon,
}

impl Level {
    fn parse(s: &str) -> Option<Level> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Some(Level::Scalar),
            "avx2" => Some(Level::Avx2),
            "avx512" => Some(Level::Avx512),
            "neon" => Some(Level::Neon),
            _ => None,
        }
    }

    /// Rank on this level's architecture ladder and the architecture family
    /// (0 = any, 1 = x86, 2 = aarch64).
    fn rank_family(self) -> (u8, u8) {
        match self {
            Level::Scalar => (0, 0),
            Level::Avx2 => (1, 1),
            Level::Avx512 => (2, 1),
            Level::Neon => (1, 2),
        }
    }
}

/// Outcome of applying a `KVSIEVE_ISA` value to the detected levels.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Narrowed {
    /// The chosen level (always one of `available`).
    pub level: Level,
    /// Set when the request was not understood (the caller prints it once).
    pub warning: Option<String>,
}

/// Pure narrowing rule behind [`detected`].
///
/// `available` lists the levels the machine can run, best last, and must
/// contain [`Level::Scalar`]. `request` is the raw `KVSIEVE_ISA` value.
/// Returns the best available level not above the request (same
/// architecture family), the best available level for no / empty / unknown
/// requests (with a warning for unknown ones), and `Scalar` for a request of
/// another architecture.
pub(crate) fn narrow(request: Option<&str>, available: &[Level]) -> Narrowed {
    debug_assert!(available.contains(&Level::Scalar));
    let best = *available.last().unwrap_or(&Level::Scalar);
    let Some(raw) = request.filter(|r| !r.trim().is_empty()) else {
        return Narrowed {
            level: best,
            warning: None,
        };
    };
    let Some(want) = Level::parse(raw) else {
        return Narrowed {
            level: best,
            warning: Some(format!(
                "kvsieve: ignoring unknown KVSIEVE_ISA={raw:?} \
                 (expected scalar, avx2, avx512 or neon); using {}",
                level_name(best)
            )),
        };
    };
    let (want_rank, want_fam) = want.rank_family();
    let level = available
        .iter()
        .copied()
        .filter(|l| {
            let (rank, fam) = l.rank_family();
            rank <= want_rank && (fam == 0 || fam == want_fam)
        })
        .max_by_key(|l| l.rank_family().0)
        .unwrap_or(Level::Scalar);
    Narrowed {
        level,
        warning: None,
    }
}

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Scalar => "scalar",
        Level::Avx2 => "avx2",
        Level::Avx512 => "avx512",
        Level::Neon => "neon",
    }
}

/// Levels this machine supports, best last (always starts with `Scalar`).
fn available_levels() -> Vec<Level> {
    let mut v = vec![Level::Scalar];
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        if avx2 {
            v.push(Level::Avx2);
            if is_x86_feature_detected!("avx512f") {
                v.push(Level::Avx512);
            }
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            v.push(Level::Neon);
        }
    }
    v
}

/// Mint the proof for a level. Only called with levels returned by
/// [`available_levels`], i.e. after the run-time feature checks passed.
fn certify(l: Level) -> Isa {
    debug_assert!(available_levels().contains(&l));
    match l {
        Level::Scalar => Isa::Scalar,
        Level::Avx2 => Isa::Avx2(Detected(())),
        Level::Avx512 => Isa::Avx512(Detected(())),
        Level::Neon => Isa::Neon(Detected(())),
    }
}

impl Isa {
    /// Lower-case name (`scalar`, `avx2`, `avx512`, `neon`).
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2(_) => "avx2",
            Isa::Avx512(_) => "avx512",
            Isa::Neon(_) => "neon",
        }
    }

    /// Parse a name (case-insensitive) and return that ISA **only if this
    /// machine can run it**; `None` for unknown or unavailable names.
    pub fn from_name(name: &str) -> Option<Isa> {
        let l = Level::parse(name)?;
        available_levels().contains(&l).then(|| certify(l))
    }

    /// Vector width in `f32` lanes (1 for scalar).
    pub const fn lanes(self) -> usize {
        match self {
            Isa::Scalar => 1,
            Isa::Avx2(_) => 8,
            Isa::Avx512(_) => 16,
            Isa::Neon(_) => 4,
        }
    }
}

impl fmt::Debug for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The ISA the CPU kernels use: the best one this machine supports, narrowed
/// by `KVSIEVE_ISA` (see the module docs). Detected once per process.
pub fn detected() -> Isa {
    static CHOSEN: OnceLock<Isa> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let req = std::env::var("KVSIEVE_ISA").ok();
        let n = narrow(req.as_deref(), &available_levels());
        if let Some(w) = n.warning {
            eprintln!("{w}");
        }
        certify(n.level)
    })
}

/// Every ISA this machine can run, `Scalar` first, best last. Ignores
/// `KVSIEVE_ISA` (meant for tests and benchmarks).
pub fn available() -> Vec<Isa> {
    available_levels().into_iter().map(certify).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const X86: &[Level] = &[Level::Scalar, Level::Avx2, Level::Avx512];
    const X86_AVX2: &[Level] = &[Level::Scalar, Level::Avx2];
    const ARM: &[Level] = &[Level::Scalar, Level::Neon];
    const BARE: &[Level] = &[Level::Scalar];

    fn lvl(req: Option<&str>, av: &[Level]) -> Level {
        narrow(req, av).level
    }

    #[test]
    fn no_request_picks_best() {
        assert_eq!(lvl(None, X86), Level::Avx512);
        assert_eq!(lvl(Some(""), X86_AVX2), Level::Avx2);
        assert_eq!(lvl(None, ARM), Level::Neon);
        assert_eq!(lvl(None, BARE), Level::Scalar);
    }

    #[test]
    fn request_narrows_never_widens() {
        assert_eq!(lvl(Some("scalar"), X86), Level::Scalar);
        assert_eq!(lvl(Some("avx2"), X86), Level::Avx2);
        assert_eq!(lvl(Some(" AVX512 "), X86), Level::Avx512);
        // Missing ISA: best one below it.
        assert_eq!(lvl(Some("avx512"), X86_AVX2), Level::Avx2);
        assert_eq!(lvl(Some("avx512"), BARE), Level::Scalar);
        assert_eq!(lvl(Some("avx2"), BARE), Level::Scalar);
        assert_eq!(lvl(Some("neon"), ARM), Level::Neon);
        assert_eq!(lvl(Some("scalar"), ARM), Level::Scalar);
        // Other architecture: scalar.
        assert_eq!(lvl(Some("neon"), X86), Level::Scalar);
        assert_eq!(lvl(Some("avx2"), ARM), Level::Scalar);
        for req in ["scalar", "avx2", "avx512", "neon"] {
            assert!(narrow(Some(req), X86).warning.is_none());
        }
    }

    #[test]
    fn unknown_request_is_ignored_with_warning() {
        let n = narrow(Some("sse9"), X86);
        assert_eq!(n.level, Level::Avx512);
        assert!(n.warning.unwrap().contains("sse9"));
        let n = narrow(Some("avx-512"), ARM);
        assert_eq!(n.level, Level::Neon);
        assert!(n.warning.is_some());
    }

    #[test]
    fn detection_is_consistent() {
        let av = available();
        assert_eq!(av[0], Isa::Scalar);
        assert!(av.contains(&detected()));
        for isa in &av {
            assert_eq!(Isa::from_name(isa.name()), Some(*isa));
        }
        assert_eq!(Isa::from_name("bogus"), None);
        #[cfg(not(target_arch = "aarch64"))]
        assert_eq!(Isa::from_name("neon"), None);
        #[cfg(not(target_arch = "x86_64"))]
        assert_eq!(Isa::from_name("avx2"), None);
    }
}
