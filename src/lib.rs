//! # kvsieve
//!
//! KV-cache compression and sparse-attention kernels for LLM inference
//! engines: α-entmax attention, query-aware selection and KV eviction
//! policies behind one backend-agnostic set of ops.
//!
//! | concept | type |
//! |---|---|
//! | storage dtype | [`DType`], [`Element`] (`f32`, `half::f16`, `half::bf16`) |
//! | head geometry (GQA) | [`HeadGeometry`] |
//! | ragged batches | [`Ragged`] (`indptr`), [`Segments`] (one per sequence × KV head) |
//! | token sets | [`IndexSet`], [`IndexList`], [`BitMask`], [`MaskList`] |
//! | paged KV (HND / NHD pages, FlashInfer CSR page tables) | [`PageTable`], [`PageLayout`], [`PageScope`]; pools: [`PagePool`], [`PagedSequences`] ([`paged`]) |
//! | backends | [`reference::Reference`] (the specification); [`cpu::Cpu`] (SIMD + rayon, runtime ISA); `wgpu::Wgpu` (feature `wgpu`, WGSL shaders); `cuda::CudaBackend` (feature `cuda`, NVRTC) |
//! | validated ops | [`ops`] |
//! | row α-entmax solvers, backward, learned α | [`mod@entmax`] |
//! | KV cache with per-head lengths | [`cache::KvCache`] |
//! | policies | [`policy::KvPolicy`] and one type per method |
//! | the driver (cache → policy → ops, every plan applied) | [`attention::Session`], [`attention::apply_plan`] |
//! | policies over engine-owned KV | [`cache::KvView`], [`cache::KvParts`] |
//! | evaluation traces | [`eval`] |
//!
//! ```
//! use kvsieve::ops::{self, DecodeParams};
//! use kvsieve::{HeadGeometry, Normalizer, Restrict, Segments, reference::Reference};
//!
//! # fn main() -> kvsieve::Result<()> {
//! // One sequence, 2 query heads sharing 1 KV head (GQA group 2), D = 4, 3 cached tokens.
//! let geom = HeadGeometry::new(2, 1, 4)?;
//! let segs = Segments::uniform(1, 1, 3)?;
//! let q = vec![1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0];
//! let k = vec![1.0f32, 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0.];
//! let v = k.clone();
//! let mut out = vec![0.0f32; 8];
//! let norm = Normalizer::Entmax { alpha: 1.5 };
//! let params = DecodeParams { geom, segments: &segs, scale: Some(4.0), normalizer: &norm, restrict: Restrict::Dense };
//! ops::decode_attention(&Reference, &params, &q, &k, &v, &mut out)?;
//! // Entmax puts all the mass on the matching key: exact zeros elsewhere.
//! assert_eq!(&out[..4], &[1.0, 0.0, 0.0, 0.0]);
//! # Ok(()) }
//! ```
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs, clippy::undocumented_unsafe_blocks)]

pub mod attention;
pub mod backend;
pub mod cache;
#[cfg(feature = "candle")]
pub mod candle;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod entmax;
pub mod error;
pub mod eval;
pub mod layout;
pub mod ops;
pub mod paged;
pub mod policy;
pub mod reference;
#[cfg(feature = "wgpu")]
pub mod wgpu;

#[cfg(doctest)]
mod readme_doctest;

pub use backend::{Backend, BlockStats, Normalizer, Ops, Restrict};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use layout::{BitMask, HeadGeometry, IndexList, IndexSet, MaskList, Ragged, Scope, Segments};
pub use paged::{
    PageLayout, PagePool, PageScope, PageTable, PageTableParts, PagedSequences, SeqId,
};

/// Softmax of one row of scores, computed by the reference backend.
///
/// `-inf` entries get exactly 0; a row of only `-inf` returns zeros. An empty
/// row is a [`Error::Shape`]; NaN or `+inf` is a [`Error::NonFinite`].
pub fn softmax(scores: &[f32]) -> Result<Vec<f32>> {
    let z = check_row("softmax", scores)?;
    Ok(reference::softmax_f64(&z)
        .into_iter()
        .map(|p| p as f32)
        .collect())
}

/// α-entmax of one row of scores (α > 1), computed by the reference
/// backend: exact sort-based for α = 1.5 and α = 2, bisection otherwise.
///
/// Entries at or below the threshold get exactly 0. Masking and error rules
/// as [`softmax`]; α ≤ 1 or non-finite α is an [`Error::Alpha`].
pub fn entmax(scores: &[f32], alpha: f32) -> Result<Vec<f32>> {
    ops::check_alpha("entmax", alpha)?;
    let z = check_row("entmax", scores)?;
    Ok(reference::entmax_f64(&z, f64::from(alpha))
        .into_iter()
        .map(|p| p as f32)
        .collect())
}

fn check_row(op: &'static str, scores: &[f32]) -> Result<Vec<f64>> {
    if scores.is_empty() {
        return Err(error::shape(op, "the row is empty"));
    }
    if let Some(i) = scores
        .iter()
        .position(|x| x.is_nan() || *x == f32::INFINITY)
    {
        return Err(Error::NonFinite {
            op,
            what: format!("scores[{i}] = {}", scores[i]),
        });
    }
    Ok(scores.iter().map(|&x| f64::from(x)).collect())
}
