//! Row normalisers: softmax and α-entmax.

use super::Backend;
use crate::error::Result;
use crate::layout::Ragged;

/// Ragged rows of an `f32` buffer: row `r` is `x[rows.range(r)]`.
#[derive(Clone, Debug)]
pub struct RowsMeta {
    pub(crate) rows: Ragged,
}

impl RowsMeta {
    /// The row partition.
    pub fn rows(&self) -> &Ragged {
        &self.rows
    }
}

/// Rows plus one α per row (α > 1, finite; validated).
#[derive(Clone, Debug)]
pub struct EntmaxRowsMeta {
    pub(crate) rows: Ragged,
    pub(crate) alphas: Vec<f32>,
}

impl EntmaxRowsMeta {
    /// The row partition.
    pub fn rows(&self) -> &Ragged {
        &self.rows
    }
    /// α of each row.
    pub fn alphas(&self) -> &[f32] {
        &self.alphas
    }
}

/// Row normalisers.
///
/// Shared rules: `-inf` entries get exactly 0; a row with no finite entry
/// (all `-inf`, or empty) outputs zeros; a row containing NaN or `+inf`
/// outputs NaN in every position (the host helpers [`crate::softmax`] and
/// [`crate::entmax()`] return [`crate::Error::NonFinite`] instead).
pub trait NormOps: Backend {
    /// `out_r = softmax(x_r)`: `exp(x_i - max) / Σ_j exp(x_j - max)` per row.
    fn softmax_rows(
        &self,
        meta: &RowsMeta,
        x: &Self::Buffer<f32>,
        out: &mut Self::Buffer<f32>,
    ) -> Result<()>;

    /// `out_r = α_r-entmax(x_r)`: `p_i = [(α−1) x_i − τ]_+^{1/(α−1)}` with τ
    /// chosen so that `Σ p = 1`. Entries at or below τ get exactly 0; ties
    /// at the maximum share mass equally.
    fn entmax_rows(
        &self,
        meta: &EntmaxRowsMeta,
        x: &Self::Buffer<f32>,
        out: &mut Self::Buffer<f32>,
    ) -> Result<()>;
}
