//! The crate's single error type.
//!
//! Every public entry point validates its input before any backend runs and
//! reports what was wrong through one of these variants. No user input can
//! make kvsieve panic.

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
