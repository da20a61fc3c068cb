//! The backend contract: a small [`Backend`] core (buffers, upload,
//! download) and one trait per op family.
//!
//! | family | trait | ops |
//! |---|---|---|
//! | normalisers | [`NormOps`] | `softmax_rows`, `entmax_rows` |
//! | scoring | [`ScoreOps`] | `qk_logits`, `value_distances` |
//! | selection | [`SelectOps`] | `topk_rows`, `count_above` |
//! | cache ops | [`CacheOps`] | `gather_rows`, `scatter_rows`, `compact_rows`, `merge_rows` |
//! | attention | [`AttnOps`] | `decode_attention`, `decode_attention_paged` ([`crate::paged`] KV), `prefill_attention` (with optional [`evidence`]) |
//! | entmax attention | [`EntmaxOps`] | `entmax_prefill`, `entmax_prefill_backward` |
//!
//! **Why descriptors.** Every op method takes a `*Meta` descriptor that only
//! [`crate::ops`] can build, and only after validating every shape, index
//! and buffer length. A backend may therefore index without checks; user
//! code reaches the backends only through `kvsieve::ops`, so no user input
//! can make a backend panic.
//!
//! **Buffers.** Large tensors (Q, K, V, logits, outputs) live in
//! `Backend::Buffer<T>`; small metadata (`indptr` arrays, index lists, bit
//! masks) travels on the host inside the descriptors, like FlashInfer's
//! plan/run split. Logits and probabilities are always `f32`; Q/K/V/outputs
//! may be f32, f16 or bf16 and are accumulated in f32 (f64 in the reference).

mod attn;
mod cache_ops;
mod entmax_attn;
pub mod evidence;
mod norm;
pub(crate) mod score;
mod select;

pub use attn::{AttnOps, DecodeMeta, Normalizer, PagedDecodeMeta, PrefillMeta, Restrict};
pub use cache_ops::{CacheOps, CompactMeta, GatherMeta, MergeMeta, ScatterMeta};
pub use entmax_attn::{BlockStats, EntmaxOps, EntmaxPrefillMeta};
pub use evidence::{DecodeEvidence, Heads, PrefillEvidence, Window, evidence_blocks};
pub use norm::{EntmaxRowsMeta, NormOps, RowsMeta};
pub use score::{DistMeta, QkMeta, ScoreOps};
pub use select::{SelectOps, TopkMeta};

use crate::dtype::Element;
use crate::error::Result;

/// The core every backend implements: named buffers that can be uploaded,
/// downloaded and allocated.
pub trait Backend: Send + Sync {
    /// A device buffer of `T`.
    type Buffer<T: Element>: Send + Sync;

    /// Short lower-case name (`reference`, `cpu`, `wgpu`, `cuda`).
    fn name(&self) -> &'static str;
    /// Copies host data into a new buffer.
    fn upload<T: Element>(&self, data: &[T]) -> Result<Self::Buffer<T>>;
    /// Copies a buffer back to the host.
    fn download<T: Element>(&self, buf: &Self::Buffer<T>) -> Result<Vec<T>>;
    /// A buffer of `len` zeros.
    fn zeros<T: Element>(&self, len: usize) -> Result<Self::Buffer<T>>;
    /// Number of elements in a buffer.
    fn buffer_len<T: Element>(&self, buf: &Self::Buffer<T>) -> usize;
    /// The buffer's elements in place when this backend's memory is the
    /// host's (the reference and the CPU), so that policies read evidence
    /// without a copy; `None` (the default) where a read needs
    /// [`Backend::download`].
    fn host_view<'a, T: Element>(&self, buf: &'a Self::Buffer<T>) -> Option<&'a [T]> {
        let _ = buf;
        None
    }
    /// Waits for queued work (no-op on host backends).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// Every op family: what a policy or an engine needs from a backend.
pub trait Ops: NormOps + ScoreOps + SelectOps + CacheOps + AttnOps + EntmaxOps {}
impl<B: NormOps + ScoreOps + SelectOps + CacheOps + AttnOps + EntmaxOps> Ops for B {}
