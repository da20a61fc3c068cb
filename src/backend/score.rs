//! Scoring: Q·K logits.

use super::Backend;
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{HeadGeometry, Ragged, Segments};

/// Descriptor of a Q·K logits computation.
///
/// - `q`: `[total_q, Hq, D]`; sequence `b` owns query rows `q_rows.range(b)`.
/// - `k`: `[rows, D]`, segment `(b, g)` per [`Segments`].
/// - output: for every (sequence `b`, query head `h`) in that order, a
///   row-major block `q_len_b x kv_len(b, h/G)`; blocks are concatenated
///   (offsets in [`QkMeta::blocks`]), and [`QkMeta::logit_rows`] gives the
///   row partition (ready for the row normalisers).
/// - `z[i, j] = scale · q_i · k_j`. With `causal`, query `i` of a sequence
///   sits at position `kv_len − q_len + i` (bottom-right alignment, so a
///   decode query sees the whole cache) and keys after it get `-inf`.
#[derive(Clone, Debug)]
pub struct QkMeta {
    pub(crate) geom: HeadGeometry,
    pub(crate) q_rows: Ragged,
    pub(crate) segs: Segments,
    pub(crate) causal: bool,
    pub(crate) scale: f32,
    pub(crate) blocks: Ragged,
    pub(crate) logit_rows: Ragged,
}

impl QkMeta {
    /// Head geometry.
    pub fn geom(&self) -> &HeadGeometry {
        &self.geom
    }
    /// Query rows per sequence.
    pub fn q_rows(&self) -> &Ragged {
        &self.q_rows
    }
    /// KV segments.
    pub fn segments(&self) -> &Segments {
        &self.segs
    }
    /// Causal masking on.
    pub fn causal(&self) -> bool {
        self.causal
    }
    /// Logit scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Output blocks, one per (sequence, query head).
    pub fn blocks(&self) -> &Ragged {
        &self.blocks
    }
    /// Output rows, one per (sequence, query head, query row).
    pub fn logit_rows(&self) -> &Ragged {
        &self.logit_rows
    }
}

/// Scoring ops.
pub trait ScoreOps: Backend {
    /// Q·K logits (see [`QkMeta`] for shapes and masking).
    fn qk_logits<T: Element>(
        &self,
        meta: &QkMeta,
        q: &Self::Buffer<T>,
        k: &Self::Buffer<T>,
        out: &mut Self::Buffer<f32>,
    ) -> Result<()>;
}
