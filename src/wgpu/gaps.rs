//! The known-gaps ledger: every (op, dtype) the wgpu backend does not run yet.
//!
//! A listed pair returns [`Error::Unsupported`]; `tests/wgpu_backend.rs`
//! checks the ledger against behaviour both ways (listed ⇒ `Unsupported`,
//! unlisted ⇒ runs). The same table is in `docs/wgpu.md`.

use crate::dtype::DType;
use crate::error::Error;

/// One unsupported (op, dtype) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gap {
    /// Op stem.
    pub op: &'static str,
    /// Storage dtype.
    pub dtype: DType,
    /// Why it is missing.
    pub reason: &'static str,
    /// The issue that will close it.
    pub issue: u32,
}

/// The ledger.
pub const GAPS: &[Gap] = &[
    Gap {
        op: "decode_attention_paged",
        dtype: DType::F32,
        reason: "no paged decode shader yet: the op returns Unsupported (the AttnOps default) until phase 2 of issue #14",
        issue: 14,
    },
    Gap {
        op: "decode_attention_paged",
        dtype: DType::F16,
        reason: "no paged decode shader yet: the op returns Unsupported (the AttnOps default) until phase 2 of issue #14",
        issue: 14,
    },
    Gap {
        op: "decode_attention_paged",
        dtype: DType::BF16,
        reason: "no paged decode shader yet: the op returns Unsupported (the AttnOps default) until phase 2 of issue #14",
        issue: 14,
    },
];

/// Whether `(op, dtype)` is in the ledger.
pub fn is_gap(op: &str, dtype: DType) -> bool {
    GAPS.iter().any(|g| g.op == op && g.dtype == dtype)
}

/// The error returned for a ledger entry.
pub(crate) fn unsupported(op: &'static str, dtype: DType) -> Error {
    debug_assert!(
        is_gap(op, dtype),
        "{op}/{dtype} returns Unsupported but is not in the ledger"
    );
    Error::Unsupported {
        backend: "wgpu",
        op,
        dtype,
    }
}
