//! Selection: top-k and threshold counting.

use super::{Backend, RowsMeta};
use crate::error::Result;
use crate::layout::{IndexList, Ragged, Scope};

/// Descriptor of a per-row top-k.
#[derive(Clone, Debug)]
pub struct TopkMeta {
    pub(crate) rows: Ragged,
    pub(crate) k: usize,
    pub(crate) scope: Scope,
}

impl TopkMeta {
    /// The row partition.
    pub fn rows(&self) -> &Ragged {
        &self.rows
    }
    /// `k` (≥ 1).
    pub fn k(&self) -> usize {
        self.k
    }
    /// Scope tag given to the resulting [`IndexList`].
    pub fn scope(&self) -> Scope {
        self.scope
    }
}

/// Selection ops.
pub trait SelectOps: Backend {
    /// Per row, the positions of the `min(k, len)` largest entries, returned
    /// sorted ascending by position (one list per row).
    ///
    /// Order: larger value first; equal values go to the **lower index**;
    /// `-inf` ranks below every finite value and NaN below `-inf`, so they
    /// are only taken when the row has fewer than `k` other entries.
    fn topk_rows(&self, meta: &TopkMeta, x: &Self::Buffer<f32>) -> Result<IndexList>;

    /// Per row, the number of entries strictly greater than `threshold`.
    fn count_above(
        &self,
        meta: &RowsMeta,
        x: &Self::Buffer<f32>,
        threshold: f32,
    ) -> Result<Vec<u32>>;
}
