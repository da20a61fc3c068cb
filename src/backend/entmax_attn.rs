//! α-entmax attention (AdaSplash): block-sparse prefill and its backward.

use super::Backend;
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{HeadGeometry, Ragged, Segments};

/// Descriptor of an entmax prefill (forward or backward).
///
/// Shapes as [`super::PrefillMeta`]: `q` `[total_q, Hq, D]`, `k`/`v`
/// `[rows, D]` per [`Segments`] (each segment's length is the sequence's
/// key length, so ragged batches are the per-sequence key-length mask),
/// `out` like `q`, `tau` `[total_q, Hq]` (f32).
///
/// Math, per (sequence, query head `h`, query row `i`): logits
/// `z_ij = scale · q_i · k_j` over the visible keys (causal: `j ≤ pos_i`,
/// bottom-right aligned), scaled scores `s_ij = (α_h − 1) z_ij`, the
/// threshold `τ_i` with `Σ_j [s_ij − τ_i]_+^{1/(α−1)} = 1`, weights
/// `p_ij = [s_ij − τ_i]_+^{1/(α−1)}` and `out_i = Σ_j p_ij v_j`. A row with
/// no visible key stores `τ = +inf` and outputs zeros.
///
/// Block skipping: keys are tiled in blocks of `block_k`, queries in blocks
/// of `block_q`; a tile is *live* when some visible entry has `s > τ`. With
/// `skip_blocks` the output pass visits only live tiles (each query block's
/// CSR list of live key blocks); without it, every tile. Results are equal:
/// dead tiles hold only exact zeros.
#[derive(Clone, Debug)]
pub struct EntmaxPrefillMeta<'a> {
    pub(crate) geom: HeadGeometry,
    pub(crate) q_rows: &'a Ragged,
    pub(crate) segs: &'a Segments,
    pub(crate) causal: bool,
    pub(crate) alphas: Vec<f32>,
    pub(crate) scale: f32,
    pub(crate) block_q: usize,
    pub(crate) block_k: usize,
    pub(crate) skip_blocks: bool,
}

impl EntmaxPrefillMeta<'_> {
    /// Head geometry.
    pub fn geom(&self) -> &HeadGeometry {
        &self.geom
    }
    /// Query rows per sequence.
    pub fn q_rows(&self) -> &Ragged {
        self.q_rows
    }
    /// KV segments.
    pub fn segments(&self) -> &Segments {
        self.segs
    }
    /// Causal masking on.
    pub fn causal(&self) -> bool {
        self.causal
    }
    /// α per query head.
    pub fn alphas(&self) -> &[f32] {
        &self.alphas
    }
    /// Logit scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Query tile height.
    pub fn block_q(&self) -> usize {
        self.block_q
    }
    /// Key tile width.
    pub fn block_k(&self) -> usize {
        self.block_k
    }
    /// Whether dead tiles are skipped.
    pub fn skip_blocks(&self) -> bool {
        self.skip_blocks
    }
}

/// Tile statistics of an entmax prefill.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// Tiles holding at least one non-zero weight.
    pub live_tiles: usize,
    /// Tiles holding at least one visible (unmasked) entry.
    pub visible_tiles: usize,
}

impl BlockStats {
    /// Share of visible tiles that are live (1 = no skipping possible).
    pub fn live_fraction(&self) -> f64 {
        if self.visible_tiles == 0 {
            0.0
        } else {
            self.live_tiles as f64 / self.visible_tiles as f64
        }
    }
}

/// Entmax attention ops.
pub trait EntmaxOps: Backend {
    /// Forward (see [`EntmaxPrefillMeta`]): writes `out` and `tau`.
    fn entmax_prefill<T: Element>(
        &self,
        meta: &EntmaxPrefillMeta<'_>,
        q: &Self::Buffer<T>,
        k: &Self::Buffer<T>,
        v: &Self::Buffer<T>,
        out: &mut Self::Buffer<T>,
        tau: &mut Self::Buffer<f32>,
    ) -> Result<BlockStats>;

    /// Backward of [`EntmaxOps::entmax_prefill`] given `d_out` (like `q`)
    /// and the forward's `tau`: the three-pass AdaSplash structure.
    ///
    /// 1. `Õ_i = Σ_j u_ij v_j / Σ_j u_ij` with `u_ij = p_ij^{2−α}` on the
    ///    support, and `δ_i = d_out_i · Õ_i`;
    /// 2. per key block over its live query blocks: `dV_j += Σ_i p_ij d_out_i`,
    ///    `dS_ij = u_ij (d_out_i · v_j − δ_i)`, `dK_j += scale Σ_i dS_ij q_i`;
    /// 3. per query block over its live key blocks: `dQ_i = scale Σ_j dS_ij k_j`.
    ///
    /// `dq` is `[total_q, Hq, D]`, `dk`/`dv` are `[rows, D]` like `k`/`v`
    /// (GQA: summed over the group; rows outside every segment are zero),
    /// all f32; `dalpha` `[Hq]` holds `∂L/∂α_h` summed over rows and
    /// sequences.
    #[allow(clippy::too_many_arguments)]
    fn entmax_prefill_backward<T: Element>(
        &self,
        meta: &EntmaxPrefillMeta<'_>,
        q: &Self::Buffer<T>,
        k: &Self::Buffer<T>,
        v: &Self::Buffer<T>,
        tau: &Self::Buffer<f32>,
        d_out: &Self::Buffer<T>,
        dq: &mut Self::Buffer<f32>,
        dk: &mut Self::Buffer<f32>,
        dv: &mut Self::Buffer<f32>,
        dalpha: &mut Self::Buffer<f32>,
    ) -> Result<()>;
}
