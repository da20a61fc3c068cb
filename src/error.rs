//! The crate's single error type.
//!
//! Every public entry point validates its input before any backend runs and
//! reports what was wrong through one of these variants. No user input can
//! make kvsieve panic.
//!
//! Sizes computed from user-supplied counts go through `Size` (exact
//! arithmetic, so an overflow is an [`Error::TooLarge`] in debug and release
//! builds alike, never a wrap or a panic), and buffers sized by user input
//! are allocated by `try_vec` (a limit check, then a fallible reservation),
//! so a tiny input asking for a huge buffer gets an error instead of aborting
//! the process.

use crate::dtype::DType;
use std::fmt;

/// Everything that can go wrong in kvsieve.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A buffer, slice or descriptor has the wrong length or shape.
    /// `what` states what was expected and what was seen.
    Shape {
        /// The op or constructor that rejected the input.
        op: &'static str,
        /// Expected versus seen.
        what: String,
    },
    /// A budget or `k` is out of range (zero, larger than allowed, windows that
    /// do not fit in the budget, ...).
    Budget {
        /// The op or policy that rejected the budget.
        op: &'static str,
        /// What was wrong.
        what: String,
    },
    /// α outside the accepted range: α-entmax needs a finite α > 1
    /// (α = 1 is softmax: use [`crate::softmax`] or `Normalizer::Softmax`).
    Alpha {
        /// The op that rejected α.
        op: &'static str,
        /// The rejected value.
        alpha: f64,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// NaN (or `+inf`) in an input that must be finite or `-inf`.
    NonFinite {
        /// The op that found the value.
        op: &'static str,
        /// Where it was found.
        what: String,
    },
    /// A policy or op configuration value is out of range.
    InvalidConfig {
        /// The policy or op being configured.
        policy: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The backend does not implement this op for this dtype (yet).
    Unsupported {
        /// Backend name (`reference`, `cpu`, `wgpu`, `cuda`).
        backend: &'static str,
        /// Op stem.
        op: &'static str,
        /// Storage dtype asked for.
        dtype: DType,
    },
    /// No device of this backend could be opened.
    NoDevice {
        /// Backend name.
        backend: &'static str,
        /// Why (driver message, missing library, ...).
        reason: String,
    },
    /// A file could not be read, written or parsed.
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A device call failed after the device was opened.
    Device {
        /// Backend name.
        backend: &'static str,
        /// The device's message.
        reason: String,
    },
    /// A page pool has too few free pages (or free page keys of one KV head)
    /// for an allocation; nothing was allocated. An engine preempts or evicts
    /// a sequence and retries.
    OutOfPages {
        /// The pool call that ran out.
        op: &'static str,
        /// Pages asked for.
        requested: usize,
        /// Pages (page keys) that were free.
        free: usize,
    },
    /// A size computed from the input overflows, exceeds a limit, or asks for
    /// more memory than the allocator can give (see [`MAX_ALLOC_BYTES`]).
    TooLarge {
        /// The op or constructor that computed the size.
        op: &'static str,
        /// What was being sized, with its unit (`"mask bits"`, `"bytes"`, ...).
        what: String,
        /// The exact size asked for (saturating at `u128::MAX`).
        requested: u128,
        /// The largest size allowed.
        limit: u128,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape { op, what } => write!(f, "{op}: shape error: {what}"),
            Error::Budget { op, what } => write!(f, "{op}: budget error: {what}"),
            Error::Alpha { op, alpha, reason } => {
                write!(f, "{op}: alpha = {alpha} is not allowed: {reason}")
            }
            Error::NonFinite { op, what } => write!(f, "{op}: non-finite input: {what}"),
            Error::InvalidConfig { policy, reason } => {
                write!(f, "{policy}: invalid configuration: {reason}")
            }
            Error::Unsupported { backend, op, dtype } => {
                write!(f, "{backend}: op `{op}` is not supported for dtype {dtype}")
            }
            Error::NoDevice { backend, reason } => write!(f, "{backend}: no device: {reason}"),
            Error::Device { backend, reason } => write!(f, "{backend}: device error: {reason}"),
            Error::Io { path, reason } => write!(f, "{path}: {reason}"),
            Error::OutOfPages {
                op,
                requested,
                free,
            } => write!(f, "{op}: out of pages: {requested} requested, {free} free"),
            Error::TooLarge {
                op,
                what,
                requested,
                limit,
            } => {
                let req = if *requested == u128::MAX {
                    "more than 2^128".to_string()
                } else {
                    requested.to_string()
                };
                write!(f, "{op}: too large: {what}: {req} requested, limit {limit}")
            }
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Shorthand for a [`Error::Shape`].
pub(crate) fn shape(op: &'static str, what: impl Into<String>) -> Error {
    Error::Shape {
        op,
        what: what.into(),
    }
}

/// Shorthand for an [`Error::Budget`].
pub(crate) fn budget(op: &'static str, what: impl Into<String>) -> Error {
    Error::Budget {
        op,
        what: what.into(),
    }
}

/// Shorthand for an [`Error::InvalidConfig`].
#[allow(dead_code)] // used by the policies
pub(crate) fn config(policy: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidConfig {
        policy,
        reason: reason.into(),
    }
}

/// The most bytes kvsieve allocates for one buffer whose size comes from user
/// input (1 TiB). Larger requests fail with [`Error::TooLarge`] before any
/// allocation; smaller ones are reserved fallibly ([`Vec::try_reserve_exact`]),
/// so a request the allocator refuses is an [`Error::TooLarge`] too, not an
/// abort.
pub const MAX_ALLOC_BYTES: usize = 1 << 40;

/// A size computed from user-supplied counts, exactly (in `u128`, saturating),
/// so that overflow is reported instead of wrapping (release) or panicking
/// (debug). The one helper for every size computation on user input:
///
/// ```text
/// let n = Size::new(OP, "K elements", batch).times(heads).times(len).times(d).get()?;
/// let words: Vec<u32> = try_vec(OP, "mask words", n_words, 0)?;
/// ```
#[derive(Clone, Copy, Debug)]
#[must_use]
pub(crate) struct Size {
    op: &'static str,
    what: &'static str,
    n: u128,
}

impl Size {
    /// Starts from `n` (a count of `what`, named in the error).
    pub(crate) fn new(op: &'static str, what: &'static str, n: usize) -> Self {
        Self {
            op,
            what,
            n: n as u128,
        }
    }
    /// `self · k`.
    pub(crate) fn times(self, k: usize) -> Self {
        Self {
            n: self.n.saturating_mul(k as u128),
            ..self
        }
    }
    /// `self + k`.
    pub(crate) fn plus(self, k: usize) -> Self {
        Self {
            n: self.n.saturating_add(k as u128),
            ..self
        }
    }
    /// The exact value (saturated at `u128::MAX`), for messages.
    pub(crate) fn value(self) -> u128 {
        self.n
    }
    /// The size, if it is at most `limit`; else [`Error::TooLarge`].
    pub(crate) fn at_most(self, limit: u128) -> Result<usize> {
        let limit = limit.min(usize::MAX as u128);
        if self.n > limit {
            return Err(Error::TooLarge {
                op: self.op,
                what: self.what.to_string(),
                requested: self.n,
                limit,
            });
        }
        Ok(self.n as usize)
    }
    /// The size, if it fits in `usize`.
    pub(crate) fn get(self) -> Result<usize> {
        self.at_most(usize::MAX as u128)
    }
    /// The size as a `u32` (token positions, `indptr` entries), if it fits.
    pub(crate) fn get_u32(self) -> Result<u32> {
        self.at_most(u128::from(u32::MAX)).map(|n| n as u32)
    }
    /// The size as a count of `T` elements to allocate: checks that
    /// `n · size_of::<T>()` is at most [`MAX_ALLOC_BYTES`].
    pub(crate) fn elements<T>(self) -> Result<usize> {
        let bytes = self.n.saturating_mul(std::mem::size_of::<T>() as u128);
        if bytes > MAX_ALLOC_BYTES as u128 {
            return Err(Error::TooLarge {
                op: self.op,
                what: format!("bytes for {} {}", self.n, self.what),
                requested: bytes,
                limit: MAX_ALLOC_BYTES as u128,
            });
        }
        Ok(self.n as usize)
    }
}

/// `vec![value; n]` for a user-sized buffer: [`Size::elements`] (the
/// [`MAX_ALLOC_BYTES`] limit), then a fallible reservation, so neither a huge
/// request nor an allocator refusal aborts the process.
pub(crate) fn try_vec<T: Clone>(
    op: &'static str,
    what: &'static str,
    n: usize,
    value: T,
) -> Result<Vec<T>> {
    let n = Size::new(op, what, n).elements::<T>()?;
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::TooLarge {
        op,
        what: format!("bytes for {n} {what} (the allocator refused)"),
        requested: (n as u128).saturating_mul(std::mem::size_of::<T>() as u128),
        limit: MAX_ALLOC_BYTES as u128,
    })?;
    v.resize(n, value);
    Ok(v)
}
