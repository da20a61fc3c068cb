//! Scoring: Q·K logits.

use super::{Backend, Heads};
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

/// Descriptor of `value_distances`: one block per (sequence, query head)
/// ([`Heads::PerHead`]) or per (sequence, KV head) (any reduction), each
/// as long as its KV segment, in the layout of
/// [`crate::backend::evidence_blocks`] with one row.
///
/// For block `i` over segment `s` with weights `w` (the `weights` block):
/// `o = Σ_j w_j v_j` (`fast`: `o = (1/L) Σ_j v_j`), accumulated in f32 or
/// wider, and `d_j = ‖o − v_j‖₂` computed directly from the difference
/// (never as `‖o‖² − 2 o·v + ‖v‖²`, which cancels when `v_j ≈ o`).
#[derive(Clone, Debug)]
pub struct DistMeta {
    pub(crate) geom: HeadGeometry,
    pub(crate) segs: Segments,
    pub(crate) heads: Heads,
    pub(crate) blocks: Ragged,
    pub(crate) fast: bool,
}

impl DistMeta {
    /// Head geometry.
    pub fn geom(&self) -> &HeadGeometry {
        &self.geom
    }
    /// KV segments.
    pub fn segments(&self) -> &Segments {
        &self.segs
    }
    /// Block layout.
    pub fn heads(&self) -> Heads {
        self.heads
    }
    /// Block partition of the weights and the output.
    pub fn blocks(&self) -> &Ragged {
        &self.blocks
    }
    /// Mean value instead of the weighted sum.
    pub fn fast(&self) -> bool {
        self.fast
    }
    /// The segment of block `i`.
    pub fn segment_of(&self, i: usize) -> usize {
        match self.heads {
            Heads::PerHead => {
                let hq = self.geom.num_q_heads();
                self.segs.index(i / hq, self.geom.kv_head(i % hq))
            }
            _ => i,
        }
    }
}

/// The specification of `value_distances` on host slices, in f64; writes
/// the weighted sums to `centers` (`[blocks, D]`) when given.
pub(crate) fn value_distances_host<T: Element>(
    meta: &DistMeta,
    w: &[f32],
    v: &[T],
    out: &mut [f32],
    mut centers: Option<&mut [f32]>,
) {
    let d = meta.geom.head_dim();
    for i in 0..meta.blocks.num_segments() {
        let s = meta.segment_of(i);
        let (off, len) = (meta.segs.offset(s), meta.segs.len_of(s));
        let r = meta.blocks.range(i);
        let mut o = vec![0.0f64; d];
        for j in 0..len {
            let wj = if meta.fast {
                1.0 / len as f64
            } else {
                f64::from(w[r.start + j])
            };
            for (a, x) in o.iter_mut().zip(&v[(off + j) * d..][..d]) {
                *a += wj * x.to_f64();
            }
        }
        if let Some(c) = centers.as_deref_mut() {
            for (dst, &a) in c[i * d..(i + 1) * d].iter_mut().zip(&o) {
                *dst = a as f32;
            }
        }
        for j in 0..len {
            let row = &v[(off + j) * d..][..d];
            let d2: f64 = o
                .iter()
                .zip(row)
                .map(|(a, x)| (a - x.to_f64()).powi(2))
                .sum();
            out[r.start + j] = d2.sqrt() as f32;
        }
    }
}

/// Scoring ops.
pub trait ScoreOps: Backend {
    /// Distances of value rows to the weighted value sum (see
    /// [`DistMeta`]), and the sums themselves (`centers`, `[blocks, D]`
    /// f32) when asked. The default downloads `weights` and `v`, runs the
    /// f64 specification on the host and uploads the result: backends
    /// without a kernel (CUDA today) use it.
    fn value_distances<T: Element>(
        &self,
        meta: &DistMeta,
        weights: &Self::Buffer<f32>,
        v: &Self::Buffer<T>,
        out: &mut Self::Buffer<f32>,
        centers: Option<&mut Self::Buffer<f32>>,
    ) -> Result<()> {
        let w = self.download(weights)?;
        let vh = self.download(v)?;
        let mut o = vec![0.0f32; self.buffer_len(out)];
        match centers {
            Some(c) => {
                let mut ch = vec![0.0f32; self.buffer_len(c)];
                value_distances_host(meta, &w, &vh, &mut o, Some(&mut ch));
                *c = self.upload(&ch)?;
            }
            None => value_distances_host(meta, &w, &vh, &mut o, None),
        }
        *out = self.upload(&o)?;
        Ok(())
    }

    /// Q·K logits (see [`QkMeta`] for shapes and masking).
    fn qk_logits<T: Element>(
        &self,
        meta: &QkMeta,
        q: &Self::Buffer<T>,
        k: &Self::Buffer<T>,
        out: &mut Self::Buffer<f32>,
    ) -> Result<()>;
}
