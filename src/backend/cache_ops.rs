//! Cache ops: gather, scatter, in-place compaction (row moves), weighted merge.

use super::Backend;
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::Ragged;

/// `dst[i] = src[indices[i]]` for rows of `width` elements.
#[derive(Clone, Debug)]
pub struct GatherMeta {
    pub(crate) width: usize,
    pub(crate) indices: Vec<u32>,
}

impl GatherMeta {
    /// Row width in elements.
    pub fn width(&self) -> usize {
        self.width
    }
    /// Source row of each destination row.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }
}

/// In-place row moves of a compaction: row `src` is copied to row `dst`
/// for every pair `(dst, src)`. Built by `ops` from a keep list (see
/// [`crate::cache::compaction_moves`]): destinations are unique, no row is
/// both a source and a destination, and sources are unique too except in
/// the paged compaction, where two tables may move a row out of a page
/// they share (read twice). So the moves can run in any order.
#[derive(Clone, Debug)]
pub struct CompactMeta {
    pub(crate) width: usize,
    pub(crate) moves: Vec<(u32, u32)>,
}

impl CompactMeta {
    /// Row width in elements.
    pub fn width(&self) -> usize {
        self.width
    }
    /// `(dst, src)` buffer rows.
    pub fn moves(&self) -> &[(u32, u32)] {
        &self.moves
    }
}

/// `dst[g] = Σ_{i ∈ group g} w_i · src[member_i]`.
#[derive(Clone, Debug)]
pub struct MergeMeta {
    pub(crate) width: usize,
    pub(crate) groups: Ragged,
    pub(crate) members: Vec<u32>,
    pub(crate) weights: Vec<f32>,
}

impl MergeMeta {
    /// Row width in elements.
    pub fn width(&self) -> usize {
        self.width
    }
    /// Members of each group (CSR over `members` / `weights`).
    pub fn groups(&self) -> &Ragged {
        &self.groups
    }
    /// Source rows.
    pub fn members(&self) -> &[u32] {
        &self.members
    }
    /// Weights (finite).
    pub fn weights(&self) -> &[f32] {
        &self.weights
    }
}

/// `dst[indices[i]] = src[i]` for rows of `width` elements; the indices are
/// unique, so the order of the writes does not matter.
#[derive(Clone, Debug)]
pub struct ScatterMeta {
    pub(crate) width: usize,
    pub(crate) indices: Vec<u32>,
}

impl ScatterMeta {
    /// Row width in elements.
    pub fn width(&self) -> usize {
        self.width
    }
    /// Destination row of each source row (unique, in range).
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }
}

/// Cache ops.
pub trait CacheOps: Backend {
    /// Gathers rows: `dst[i, :] = src[indices[i], :]`.
    fn gather_rows<T: Element>(
        &self,
        meta: &GatherMeta,
        src: &Self::Buffer<T>,
        dst: &mut Self::Buffer<T>,
    ) -> Result<()>;

    /// Compacts every segment in place (safe because kept lists are sorted,
    /// so `keep[i] >= i`). Rows past the new length are left as they were.
    fn compact_rows<T: Element>(&self, meta: &CompactMeta, buf: &mut Self::Buffer<T>)
    -> Result<()>;

    /// Weighted merge of groups of rows; an empty group writes zeros.
    /// Accumulates in f32 (f64 in the reference), rounds once.
    fn merge_rows<T: Element>(
        &self,
        meta: &MergeMeta,
        src: &Self::Buffer<T>,
        dst: &mut Self::Buffer<T>,
    ) -> Result<()>;

    /// Scatters rows: `dst[indices[i], :] = src[i, :]`; other rows of `dst`
    /// are left as they were (appending new tokens to a cache).
    ///
    /// The default implementation round-trips through the host (download,
    /// write, upload); device backends should override it.
    fn scatter_rows<T: Element>(
        &self,
        meta: &ScatterMeta,
        src: &Self::Buffer<T>,
        dst: &mut Self::Buffer<T>,
    ) -> Result<()> {
        let s = self.download(src)?;
        let mut d = self.download(dst)?;
        let w = meta.width;
        for (i, &r) in meta.indices.iter().enumerate() {
            let r = r as usize;
            d[r * w..(r + 1) * w].copy_from_slice(&s[i * w..(i + 1) * w]);
        }
        *dst = self.upload(&d)?;
        Ok(())
    }
}
