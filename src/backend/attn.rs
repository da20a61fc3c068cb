//! Attention: decode over a ragged KV cache, and prefill.

use super::{Backend, DecodeEvidence, PrefillEvidence};
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::layout::{HeadGeometry, IndexList, MaskList, Ragged, Segments};
use crate::paged::PageTable;

/// How logits become attention weights.
#[derive(Clone, Debug, PartialEq)]
pub enum Normalizer {
    /// `softmax`.
    Softmax,
    /// α-entmax with one α (> 1) for every head.
    Entmax {
        /// α (finite, > 1).
        alpha: f32,
    },
    /// α-entmax with one α per query head (learned per-head α).
    EntmaxPerHead {
        /// α per query head (finite, > 1), length `Hq`.
        alphas: Vec<f32>,
    },
}

impl Normalizer {
    /// α used by query head `h` (`None` for softmax).
    pub fn alpha(&self, h: usize) -> Option<f32> {
        match self {
            Normalizer::Softmax => None,
            Normalizer::Entmax { alpha } => Some(*alpha),
            Normalizer::EntmaxPerHead { alphas } => alphas.get(h).copied(),
        }
    }

    /// Checks every α (> 1, finite) and the per-head length.
    pub fn validate(&self, op: &'static str, geom: &HeadGeometry) -> Result<()> {
        let check = |a: f32| crate::ops::check_alpha(op, a);
        match self {
            Normalizer::Softmax => Ok(()),
            Normalizer::Entmax { alpha } => check(*alpha),
            Normalizer::EntmaxPerHead { alphas } => {
                if alphas.len() != geom.num_q_heads() {
                    return Err(Error::Shape {
                        op,
                        what: format!(
                            "{} per-head alphas for {} query heads",
                            alphas.len(),
                            geom.num_q_heads()
                        ),
                    });
                }
                alphas.iter().try_for_each(|&a| check(a))
            }
        }
    }
}

/// Which cached tokens a decode query may attend to.
#[derive(Clone, Copy, Debug)]
pub enum Restrict<'a> {
    /// Every token of the segment.
    Dense,
    /// Only the listed tokens (sorted unique positions inside the segment).
    Indices(&'a IndexList),
    /// Only tokens whose bit is set (one single-row mask per list).
    Mask(&'a MaskList),
}

/// Descriptor of a decode attention call.
///
/// - `q`: `[batch, Hq, D]`; `k`, `v`: `[rows, D]` with segment (b, g) per
///   [`Segments`]; `out`: `[batch, Hq, D]`.
/// - `out[b, h] = Σ_j w_j v_j`, `w = normalizer(scale · q[b, h] · k_j)` over
///   the tokens `j` of segment `(b, h / G)` allowed by the restriction.
/// - No allowed token (empty segment, empty list, empty mask): zeros.
#[derive(Clone, Debug)]
pub struct DecodeMeta<'a> {
    pub(crate) geom: HeadGeometry,
    pub(crate) segs: &'a Segments,
    pub(crate) scale: f32,
    pub(crate) normalizer: &'a Normalizer,
    pub(crate) restrict: Restrict<'a>,
}

impl DecodeMeta<'_> {
    /// Head geometry.
    pub fn geom(&self) -> &HeadGeometry {
        &self.geom
    }
    /// KV segments.
    pub fn segments(&self) -> &Segments {
        self.segs
    }
    /// Logit scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Normaliser.
    pub fn normalizer(&self) -> &Normalizer {
        self.normalizer
    }
    /// Restriction.
    pub fn restrict(&self) -> Restrict<'_> {
        self.restrict
    }
}

/// Descriptor of a decode attention call over paged KV
/// ([`crate::paged`]).
///
/// - `q`: `[batch, Hq, D]`; `k`, `v`: page pools `[rows, D]`,
///   `rows = num_pages · Hkv · P` ([`PageTable::rows`]); `out`:
///   `[batch, Hq, D]`.
/// - Exactly the contiguous decode ([`DecodeMeta`]) over the segments of
///   [`PageTable::segments`], with token `j` of segment `s` read from row
///   [`PageTable::row`]`(s, j)` of `k` and `v`: `out[b, h] = Σ_j w_j v_j`,
///   `w = normalizer(scale · q[b, h] · k_j)` over the tokens `j` of segment
///   `(b, h / G)` that the restriction allows. Restrictions and evidence are
///   in token coordinates (positions `0 .. len` of the segment), as in the
///   contiguous op.
/// - Rows the tables do not reach (slots past `last_page_len`, pages in no
///   table, other KV heads' slots of a per-KV-head table's pages) are never
///   read.
#[derive(Clone, Debug)]
pub struct PagedDecodeMeta<'a> {
    /// The decode over the table's segments (offsets unused).
    pub(crate) decode: DecodeMeta<'a>,
    pub(crate) pages: &'a PageTable,
}

impl<'a> PagedDecodeMeta<'a> {
    /// The decode descriptor in token coordinates (its segments are
    /// [`PageTable::segments`]).
    pub fn decode(&self) -> &DecodeMeta<'a> {
        &self.decode
    }
    /// The page table.
    pub fn pages(&self) -> &PageTable {
        self.pages
    }
}

/// Descriptor of a prefill attention call.
///
/// - `q`: `[total_q, Hq, D]`, sequence `b` owns rows `q_rows.range(b)`;
///   `k`, `v` as in decode (the segment holds the cache *including* the
///   chunk's own tokens, which are its last `q_len` rows); `out` like `q`.
/// - Query `i` of sequence `b` sits at position `kv_len − q_len + i`; with
///   `causal` it sees keys `0 ..= that position`.
/// - `mask` (optional): one `q_len x kv_len` mask per (sequence, head) of its
///   scope; a key must be allowed by the mask *and* by causality.
/// - A query row with no allowed key outputs zeros.
#[derive(Clone, Debug)]
pub struct PrefillMeta<'a> {
    pub(crate) geom: HeadGeometry,
    pub(crate) q_rows: &'a Ragged,
    pub(crate) segs: &'a Segments,
    pub(crate) causal: bool,
    pub(crate) mask: Option<&'a MaskList>,
    pub(crate) scale: f32,
    pub(crate) normalizer: &'a Normalizer,
}

impl PrefillMeta<'_> {
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
    /// Optional mask.
    pub fn mask(&self) -> Option<&MaskList> {
        self.mask
    }
    /// Logit scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }
    /// Normaliser.
    pub fn normalizer(&self) -> &Normalizer {
        self.normalizer
    }
}

/// Attention ops.
pub trait AttnOps: Backend + Sized {
    /// Decode attention over a ragged KV cache (see [`DecodeMeta`]), and the
    /// requested evidence (see [`super::evidence`]; buffers validated by
    /// `ops`). GQA: one pass over a KV head's rows serves every query head
    /// of its group.
    fn decode_attention<T: Element>(
        &self,
        meta: &DecodeMeta<'_>,
        q: &Self::Buffer<T>,
        k: &Self::Buffer<T>,
        v: &Self::Buffer<T>,
        out: &mut Self::Buffer<T>,
        evidence: &mut DecodeEvidence<'_, Self>,
    ) -> Result<()>;

    /// Decode attention over paged KV (see [`PagedDecodeMeta`]) and the
    /// requested evidence, laid out in token coordinates exactly as for
    /// [`AttnOps::decode_attention`] over [`PageTable::segments`].
    ///
    /// The default implementation returns [`Error::Unsupported`] (op
    /// `decode_attention_paged`, for every dtype): a backend without a paged
    /// kernel fails loudly instead of ignoring the page table. The reference,
    /// the CPU backend and the CUDA backend implement it.
    fn decode_attention_paged<T: Element>(
        &self,
        meta: &PagedDecodeMeta<'_>,
        q: &Self::Buffer<T>,
        k: &Self::Buffer<T>,
        v: &Self::Buffer<T>,
        out: &mut Self::Buffer<T>,
        evidence: &mut DecodeEvidence<'_, Self>,
    ) -> Result<()> {
        let _ = (meta, q, k, v, out, evidence);
        Err(Error::Unsupported {
            backend: self.name(),
            op: "decode_attention_paged",
            dtype: T::DTYPE,
        })
    }

    /// Prefill attention (see [`PrefillMeta`]) and the requested evidence.
    fn prefill_attention<T: Element>(
        &self,
        meta: &PrefillMeta<'_>,
        q: &Self::Buffer<T>,
        k: &Self::Buffer<T>,
        v: &Self::Buffer<T>,
        out: &mut Self::Buffer<T>,
        evidence: &mut PrefillEvidence<'_, Self>,
    ) -> Result<()>;
}
