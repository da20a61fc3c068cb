//! Validated entry points for every backend op.
//!
//! This is the only way user code reaches a backend: each function checks
//! shapes, indices, α and buffer lengths, builds the op's descriptor and
//! calls the backend. Backends may therefore assume valid input.
//!
//! Buffer orders are described in `docs/layouts.md`.

use crate::backend::*;
use crate::dtype::Element;
use crate::error::{Error, Result, Size, budget, shape};
use crate::layout::{HeadGeometry, IndexList, MaskList, Ragged, Scope, Segments};
use crate::paged::{PageScope, PageTable, PagedCompaction};

/// Checks that α is finite and `> 1`.
pub fn check_alpha(op: &'static str, alpha: f32) -> Result<()> {
    if !alpha.is_finite() {
        return Err(Error::Alpha {
            op,
            alpha: f64::from(alpha),
            reason: "alpha must be finite",
        });
    }
    if alpha == 1.0 {
        return Err(Error::Alpha {
            op,
            alpha: 1.0,
            reason: "alpha = 1 is softmax: use softmax (Normalizer::Softmax) instead",
        });
    }
    if alpha < 1.0 {
        return Err(Error::Alpha {
            op,
            alpha: f64::from(alpha),
            reason: "alpha-entmax needs alpha > 1",
        });
    }
    Ok(())
}

fn check_len<B: Backend, T: Element>(
    b: &B,
    op: &'static str,
    name: &str,
    buf: &B::Buffer<T>,
    want: usize,
) -> Result<()> {
    let got = b.buffer_len(buf);
    if got != want {
        return Err(shape(
            op,
            format!("{name} has {got} elements, expected {want}"),
        ));
    }
    Ok(())
}

/// Evidence outputs may be longer than their layout (reused buffers); only
/// the first `want` entries are written.
fn check_at_least<B: Backend, T: Element>(
    b: &B,
    op: &'static str,
    name: &str,
    buf: &B::Buffer<T>,
    want: usize,
) -> Result<()> {
    let got = b.buffer_len(buf);
    if got < want {
        return Err(shape(
            op,
            format!("{name} has {got} elements, expected at least {want}"),
        ));
    }
    Ok(())
}

fn check_kv<B: Backend, T: Element>(
    b: &B,
    op: &'static str,
    name: &str,
    buf: &B::Buffer<T>,
    segs: &Segments,
    d: usize,
) -> Result<()> {
    let got = b.buffer_len(buf);
    if got % d != 0 || got / d < segs.rows_needed() {
        return Err(shape(
            op,
            format!(
                "{name} has {got} elements; it must be [rows, {d}] with rows >= {} (the segments' extent)",
                segs.rows_needed()
            ),
        ));
    }
    Ok(())
}

/// The four buffers of an attention op: `q` and `out` hold `qn` elements,
/// `k` and `v` are `[rows, d]` covering the segments.
#[allow(clippy::too_many_arguments)]
fn check_attn_io<B: Backend, T: Element>(
    b: &B,
    op: &'static str,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &B::Buffer<T>,
    qn: usize,
    segs: &Segments,
    d: usize,
) -> Result<()> {
    check_len(b, op, "q", q, qn)?;
    check_kv(b, op, "k", k, segs, d)?;
    check_kv(b, op, "v", v, segs, d)?;
    check_len(b, op, "out", out, qn)
}

fn check_geom_segs(op: &'static str, geom: &HeadGeometry, segs: &Segments) -> Result<()> {
    if segs.num_kv_heads() != geom.num_kv_heads() {
        return Err(shape(
            op,
            format!(
                "segments describe {} KV heads, the geometry has {}",
                segs.num_kv_heads(),
                geom.num_kv_heads()
            ),
        ));
    }
    Ok(())
}

fn resolve_scale(op: &'static str, scale: Option<f32>, geom: &HeadGeometry) -> Result<f32> {
    match scale {
        None => Ok(geom.default_scale()),
        Some(s) if s.is_finite() => Ok(s),
        Some(s) => Err(shape(op, format!("scale must be finite, got {s}"))),
    }
}

/// Checks the query-row partition against the segments (one entry per
/// sequence) and, when `causal`, that each KV segment holds at least as many
/// tokens as its sequence has queries.
fn check_q_rows(op: &'static str, q_rows: &Ragged, segs: &Segments, causal: bool) -> Result<()> {
    if q_rows.num_segments() != segs.batch() {
        return Err(shape(
            op,
            format!(
                "q_rows has {} sequences, segments have {}",
                q_rows.num_segments(),
                segs.batch()
            ),
        ));
    }
    if causal {
        for b in 0..segs.batch() {
            for g in 0..segs.num_kv_heads() {
                let kv = segs.len_of(segs.index(b, g));
                if kv < q_rows.len_of(b) {
                    return Err(shape(
                        op,
                        format!(
                            "causal: sequence {b}, KV head {g} holds {kv} tokens but has {} queries \
                             (the chunk's own tokens must already be in the cache)",
                            q_rows.len_of(b)
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- normalisers

fn check_rows<B: Backend>(
    b: &B,
    op: &'static str,
    rows: &Ragged,
    x: &B::Buffer<f32>,
    out: &B::Buffer<f32>,
) -> Result<()> {
    check_len(b, op, "x", x, rows.total())?;
    check_len(b, op, "out", out, rows.total())
}

/// Row softmax over ragged rows (see [`NormOps::softmax_rows`]).
pub fn softmax_rows<B: NormOps>(
    b: &B,
    rows: &Ragged,
    x: &B::Buffer<f32>,
    out: &mut B::Buffer<f32>,
) -> Result<()> {
    check_rows(b, "softmax_rows", rows, x, out)?;
    b.softmax_rows(&RowsMeta { rows: rows.clone() }, x, out)
}

/// Row α-entmax over ragged rows (see [`NormOps::entmax_rows`]). `alphas`
/// holds one α for all rows or one per row.
pub fn entmax_rows<B: NormOps>(
    b: &B,
    rows: &Ragged,
    alphas: &[f32],
    x: &B::Buffer<f32>,
    out: &mut B::Buffer<f32>,
) -> Result<()> {
    const OP: &str = "entmax_rows";
    check_rows(b, OP, rows, x, out)?;
    let n = rows.num_segments();
    let alphas = match alphas.len() {
        1 => vec![alphas[0]; n],
        l if l == n => alphas.to_vec(),
        l => {
            return Err(shape(
                OP,
                format!("{l} alphas for {n} rows (give 1 or one per row)"),
            ));
        }
    };
    alphas.iter().try_for_each(|&a| check_alpha(OP, a))?;
    b.entmax_rows(
        &EntmaxRowsMeta {
            rows: rows.clone(),
            alphas,
        },
        x,
        out,
    )
}

// -------------------------------------------------------------------- scoring

/// Parameters of [`qk_logits`].
#[derive(Clone, Copy, Debug)]
pub struct QkParams<'a> {
    /// Head geometry.
    pub geom: HeadGeometry,
    /// Query rows per sequence (`[0, 1, 2, ..]` for one decode query each).
    pub q_rows: &'a Ragged,
    /// KV segments.
    pub segments: &'a Segments,
    /// Mask keys after each query's position (bottom-right aligned).
    pub causal: bool,
    /// Logit scale; `None` means `1 / sqrt(D)`.
    pub scale: Option<f32>,
}

/// Where [`qk_logits`] writes: one block per (sequence, query head), and one
/// row per (sequence, query head, query).
#[derive(Clone, Debug)]
pub struct QkLayout {
    /// Block of each (sequence `b`, query head `h`), index `b * Hq + h`.
    pub blocks: Ragged,
    /// Rows (one per query of each block), ready for the row normalisers.
    pub rows: Ragged,
}

/// The output layout of [`qk_logits`] for these parameters (to size `out`).
pub fn qk_layout(p: &QkParams<'_>) -> Result<QkLayout> {
    let m = qk_meta(p)?;
    Ok(QkLayout {
        blocks: m.blocks,
        rows: m.logit_rows,
    })
}

fn qk_meta(p: &QkParams<'_>) -> Result<QkMeta> {
    const OP: &str = "qk_logits";
    check_geom_segs(OP, &p.geom, p.segments)?;
    check_q_rows(OP, p.q_rows, p.segments, p.causal)?;
    let scale = resolve_scale(OP, p.scale, &p.geom)?;
    let hq = p.geom.num_q_heads();
    let mut block_lens = Vec::with_capacity(p.segments.batch() * hq);
    let mut row_lens = Vec::new();
    for b in 0..p.segments.batch() {
        let nq = p.q_rows.len_of(b);
        for h in 0..hq {
            let kv = p.segments.len_of(p.segments.index(b, p.geom.kv_head(h)));
            let n = u32::try_from(nq * kv).map_err(|_| shape(OP, "logit block overflows u32"))?;
            block_lens.push(n);
            row_lens.extend(std::iter::repeat_n(kv as u32, nq));
        }
    }
    Ok(QkMeta {
        geom: p.geom,
        q_rows: p.q_rows.clone(),
        segs: p.segments.clone(),
        causal: p.causal,
        scale,
        blocks: Ragged::from_lens(&block_lens)?,
        logit_rows: Ragged::from_lens(&row_lens)?,
    })
}

/// Q·K logits (see [`ScoreOps::qk_logits`]); returns the output layout.
pub fn qk_logits<B: ScoreOps, T: Element>(
    b: &B,
    p: &QkParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    out: &mut B::Buffer<f32>,
) -> Result<QkLayout> {
    const OP: &str = "qk_logits";
    let meta = qk_meta(p)?;
    let d = p.geom.head_dim();
    check_len(b, OP, "q", q, p.q_rows.total() * p.geom.num_q_heads() * d)?;
    check_kv(b, OP, "k", k, p.segments, d)?;
    check_len(b, OP, "out", out, meta.blocks.total())?;
    b.qk_logits(&meta, q, k, out)?;
    Ok(QkLayout {
        blocks: meta.blocks,
        rows: meta.logit_rows,
    })
}

/// `d_j = ‖o − v_j‖₂` for every token of every block, with `o` the
/// `weights`-weighted sum of the block's segment's value rows (`fast`: their
/// mean; `weights` is then ignored and may be empty); see [`DistMeta`].
/// `weights` and `out` are laid out by [`evidence_blocks`]`(geom, segments,
/// heads, &[1; batch])` (CAOTE's eviction errors); `centers`, when given,
/// receives every block's `o` (`[blocks, D]`, f32).
#[allow(clippy::too_many_arguments)]
pub fn value_distances<B: ScoreOps, T: Element>(
    b: &B,
    geom: HeadGeometry,
    segments: &Segments,
    heads: Heads,
    fast: bool,
    weights: &B::Buffer<f32>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<f32>,
    centers: Option<&mut B::Buffer<f32>>,
) -> Result<()> {
    const OP: &str = "value_distances";
    check_geom_segs(OP, &geom, segments)?;
    let blocks = evidence_blocks(&geom, segments, heads, &vec![1; segments.batch()])?;
    if !fast {
        check_len(b, OP, "weights", weights, blocks.total())?;
    }
    check_kv(b, OP, "v", v, segments, geom.head_dim())?;
    check_len(b, OP, "out", out, blocks.total())?;
    if let Some(c) = &centers {
        check_len(
            b,
            OP,
            "centers",
            *c,
            blocks.num_segments() * geom.head_dim(),
        )?;
    }
    let meta = DistMeta {
        geom,
        segs: segments.clone(),
        heads,
        blocks,
        fast,
    };
    b.value_distances(&meta, weights, v, out, centers)
}

// ------------------------------------------------------------------ selection

/// Per-row top-k (see [`SelectOps::topk_rows`]). `scope` only tags the
/// resulting list. `k = 0` is an error.
pub fn topk_rows<B: SelectOps>(
    b: &B,
    rows: &Ragged,
    k: usize,
    scope: Scope,
    x: &B::Buffer<f32>,
) -> Result<IndexList> {
    const OP: &str = "topk_rows";
    if k == 0 {
        return Err(budget(OP, "k must be at least 1"));
    }
    check_len(b, OP, "x", x, rows.total())?;
    b.topk_rows(
        &TopkMeta {
            rows: rows.clone(),
            k,
            scope,
        },
        x,
    )
}

/// Per-row count of entries `> threshold` (see [`SelectOps::count_above`]).
pub fn count_above<B: SelectOps>(
    b: &B,
    rows: &Ragged,
    x: &B::Buffer<f32>,
    threshold: f32,
) -> Result<Vec<u32>> {
    const OP: &str = "count_above";
    check_len(b, OP, "x", x, rows.total())?;
    if threshold.is_nan() {
        return Err(Error::NonFinite {
            op: OP,
            what: "threshold is NaN".into(),
        });
    }
    b.count_above(&RowsMeta { rows: rows.clone() }, x, threshold)
}

// ------------------------------------------------------------------ cache ops

fn check_width<B: Backend, T: Element>(
    b: &B,
    op: &'static str,
    width: usize,
    src: &B::Buffer<T>,
) -> Result<usize> {
    if width == 0 {
        return Err(shape(op, "row width must be positive"));
    }
    let len = b.buffer_len(src);
    if len % width != 0 {
        return Err(shape(
            op,
            format!("src has {len} elements, not a multiple of the row width {width}"),
        ));
    }
    Ok(len / width)
}

/// `dst[i] = src[indices[i]]` for rows of `width` elements.
pub fn gather_rows<B: CacheOps, T: Element>(
    b: &B,
    width: usize,
    indices: &[u32],
    src: &B::Buffer<T>,
    dst: &mut B::Buffer<T>,
) -> Result<()> {
    const OP: &str = "gather_rows";
    let rows = check_width(b, OP, width, src)?;
    if let Some(&i) = indices.iter().find(|&&i| i as usize >= rows) {
        return Err(shape(
            OP,
            format!("index {i} out of range for {rows} source rows"),
        ));
    }
    let n = Size::new(OP, "dst elements (indices x width)", indices.len())
        .times(width)
        .get()?;
    check_len(b, OP, "dst", dst, n)?;
    b.gather_rows(
        &GatherMeta {
            width,
            indices: indices.to_vec(),
        },
        src,
        dst,
    )
}

/// `dst[indices[i]] = src[i]` for rows of `width` elements (indices unique
/// and inside `dst`; `src` holds exactly `indices.len()` rows). Rows of
/// `dst` not named keep their contents.
pub fn scatter_rows<B: CacheOps, T: Element>(
    b: &B,
    width: usize,
    indices: &[u32],
    src: &B::Buffer<T>,
    dst: &mut B::Buffer<T>,
) -> Result<()> {
    const OP: &str = "scatter_rows";
    let rows = check_width(b, OP, width, dst)?;
    let n = Size::new(OP, "src elements (indices x width)", indices.len())
        .times(width)
        .get()?;
    check_len(b, OP, "src", src, n)?;
    if let Some(&i) = indices.iter().find(|&&i| i as usize >= rows) {
        return Err(shape(
            OP,
            format!("index {i} out of range for {rows} destination rows"),
        ));
    }
    let mut seen = vec![false; rows];
    for &i in indices {
        if std::mem::replace(&mut seen[i as usize], true) {
            return Err(shape(OP, format!("destination row {i} is named twice")));
        }
    }
    b.scatter_rows(
        &ScatterMeta {
            width,
            indices: indices.to_vec(),
        },
        src,
        dst,
    )
}

/// Compacts every segment of `buf` in place to the rows in `keep` (scope
/// `KvHead`, one sorted list per segment) and returns the new segments.
///
/// Rows already inside the new length stay where they are; each freed row
/// below the new length is filled by a kept row from above it, lowest hole
/// first (see [`crate::cache::compaction_moves`]). So a decode step that
/// evicts one token moves one row, not the tail of the cache; row order no
/// longer follows arrival order (the cache tracks arrivals and positions
/// per row).
pub fn compact_rows<B: CacheOps, T: Element>(
    b: &B,
    width: usize,
    segs: &Segments,
    keep: &IndexList,
    buf: &mut B::Buffer<T>,
) -> Result<Segments> {
    const OP: &str = "compact_rows";
    let rows = check_width(b, OP, width, buf)?;
    if rows < segs.rows_needed() {
        return Err(shape(
            OP,
            format!(
                "buffer has {rows} rows, segments need {}",
                segs.rows_needed()
            ),
        ));
    }
    if keep.scope() != Scope::KvHead || keep.num_lists() != segs.num_segments() {
        return Err(shape(
            OP,
            format!(
                "keep must hold one KvHead-scoped list per segment ({}), got {} {:?} lists",
                segs.num_segments(),
                keep.num_lists(),
                keep.scope()
            ),
        ));
    }
    for s in 0..segs.num_segments() {
        if let Some(&last) = keep.list(s).last()
            && last as usize >= segs.len_of(s)
        {
            return Err(shape(
                OP,
                format!("segment {s}: index {last} >= length {}", segs.len_of(s)),
            ));
        }
    }
    let new_segs = segs.shrink_to(keep.indptr().lens().map(|l| l as u32).collect())?;
    let mut moves = Vec::new();
    for s in 0..segs.num_segments() {
        let off = segs.offset(s) as u32;
        moves.extend(
            crate::cache::compaction_moves(keep.list(s))
                .into_iter()
                .map(|(d, r)| (off + d, off + r)),
        );
    }
    if !moves.is_empty() {
        b.compact_rows(&CompactMeta { width, moves }, buf)?;
    }
    Ok(new_segs)
}

/// Removes the rows in `drop` (scope `KvHead`, one sorted list per
/// segment) from every segment of `buf` in place: the compaction of
/// [`compact_rows`] for the complement, in O(dropped rows) (see
/// [`crate::cache::drop_moves`]). Returns the new segments.
pub fn drop_rows<B: CacheOps, T: Element>(
    b: &B,
    width: usize,
    segs: &Segments,
    drop: &IndexList,
    buf: &mut B::Buffer<T>,
) -> Result<Segments> {
    const OP: &str = "drop_rows";
    let rows = check_width(b, OP, width, buf)?;
    if rows < segs.rows_needed() {
        return Err(shape(
            OP,
            format!(
                "buffer has {rows} rows, segments need {}",
                segs.rows_needed()
            ),
        ));
    }
    if drop.scope() != Scope::KvHead || drop.num_lists() != segs.num_segments() {
        return Err(shape(
            OP,
            format!(
                "drop must hold one KvHead-scoped list per segment ({}), got {} {:?} lists",
                segs.num_segments(),
                drop.num_lists(),
                drop.scope()
            ),
        ));
    }
    let mut lens = Vec::with_capacity(segs.num_segments());
    let mut moves = Vec::new();
    for s in 0..segs.num_segments() {
        let (list, len) = (drop.list(s), segs.len_of(s));
        if let Some(&last) = list.last()
            && last as usize >= len
        {
            return Err(shape(
                OP,
                format!("segment {s}: index {last} >= length {len}"),
            ));
        }
        let off = segs.offset(s) as u32;
        moves.extend(
            crate::cache::drop_moves(len, list)
                .into_iter()
                .map(|(d, r)| (off + d, off + r)),
        );
        lens.push((len - list.len()) as u32);
    }
    let new_segs = segs.shrink_to(lens)?;
    if !moves.is_empty() {
        b.compact_rows(&CompactMeta { width, moves }, buf)?;
    }
    Ok(new_segs)
}

/// `dst[g] = Σ_{i ∈ groups.range(g)} weights[i] · src[members[i]]`.
pub fn merge_rows<B: CacheOps, T: Element>(
    b: &B,
    width: usize,
    groups: &Ragged,
    members: &[u32],
    weights: &[f32],
    src: &B::Buffer<T>,
    dst: &mut B::Buffer<T>,
) -> Result<()> {
    const OP: &str = "merge_rows";
    let rows = check_width(b, OP, width, src)?;
    if members.len() != groups.total() || weights.len() != groups.total() {
        return Err(shape(
            OP,
            format!(
                "groups cover {} members, got {} members and {} weights",
                groups.total(),
                members.len(),
                weights.len()
            ),
        ));
    }
    if let Some(&i) = members.iter().find(|&&i| i as usize >= rows) {
        return Err(shape(
            OP,
            format!("member {i} out of range for {rows} source rows"),
        ));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
        return Err(Error::NonFinite {
            op: OP,
            what: format!("weight {w}"),
        });
    }
    let n = Size::new(OP, "dst elements (groups x width)", groups.num_segments())
        .times(width)
        .get()?;
    check_len(b, OP, "dst", dst, n)?;
    b.merge_rows(
        &MergeMeta {
            width,
            groups: groups.clone(),
            members: members.to_vec(),
            weights: weights.to_vec(),
        },
        src,
        dst,
    )
}

// ------------------------------------------------------------------ attention

/// Parameters of [`decode_attention`].
#[derive(Clone, Copy, Debug)]
pub struct DecodeParams<'a> {
    /// Head geometry.
    pub geom: HeadGeometry,
    /// KV segments, one per (sequence, KV head).
    pub segments: &'a Segments,
    /// Logit scale; `None` means `1 / sqrt(D)`.
    pub scale: Option<f32>,
    /// Softmax or entmax.
    pub normalizer: &'a Normalizer,
    /// Dense, index list, or bit mask.
    pub restrict: Restrict<'a>,
}

/// Decode attention, one query per sequence (see [`AttnOps::decode_attention`]).
pub fn decode_attention<B: AttnOps, T: Element>(
    b: &B,
    p: &DecodeParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
) -> Result<()> {
    decode_attention_with(b, p, q, k, v, out, DecodeEvidence::default())
}

/// [`decode_attention`] that also writes the requested evidence (see
/// [`crate::backend::evidence`] for the layouts; size the buffers with
/// [`evidence_blocks`]`(geom, segments, heads, &[1; batch])`, `stats` is
/// `[batch, Hq]`).
pub fn decode_attention_with<B: AttnOps, T: Element>(
    b: &B,
    p: &DecodeParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
    ev: DecodeEvidence<'_, B>,
) -> Result<()> {
    decode_attention_impl(b, p, q, k, v, out, ev, false)
}

/// The decode entry point; `prechecked` skips the restriction's index
/// check (the driver validated it when it applied the plan).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention_impl<B: AttnOps, T: Element>(
    b: &B,
    p: &DecodeParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
    mut ev: DecodeEvidence<'_, B>,
    prechecked: bool,
) -> Result<()> {
    const OP: &str = "decode_attention";
    let scale = check_decode(
        OP,
        &p.geom,
        p.segments,
        p.normalizer,
        p.scale,
        p.restrict,
        prechecked,
    )?;
    let d = p.geom.head_dim();
    let qn = p.segments.batch() * p.geom.num_q_heads() * d;
    check_attn_io(b, OP, q, k, v, out, qn, p.segments, d)?;
    check_decode_evidence(b, OP, &p.geom, p.segments, &ev)?;
    let meta = DecodeMeta {
        geom: p.geom,
        segs: p.segments,
        scale,
        normalizer: p.normalizer,
        restrict: p.restrict,
    };
    b.decode_attention(&meta, q, k, v, out, &mut ev)
}

/// The decode checks that do not involve buffers: geometry against the
/// segments, the normaliser, the scale (returned) and the restriction
/// (skipped when `prechecked`).
fn check_decode(
    op: &'static str,
    geom: &HeadGeometry,
    segs: &Segments,
    normalizer: &Normalizer,
    scale: Option<f32>,
    restrict: Restrict<'_>,
    prechecked: bool,
) -> Result<f32> {
    check_geom_segs(op, geom, segs)?;
    normalizer.validate(op, geom)?;
    let scale = resolve_scale(op, scale, geom)?;
    match restrict {
        Restrict::Dense => {}
        _ if prechecked => {}
        Restrict::Indices(list) => list.check_against(op, geom, segs)?,
        Restrict::Mask(mask) => mask.check_against(op, geom, segs, &vec![1; segs.batch()])?,
    }
    Ok(scale)
}

/// The lengths of the decode evidence buffers (laid out over `segs`).
fn check_decode_evidence<B: Backend>(
    b: &B,
    op: &'static str,
    geom: &HeadGeometry,
    segs: &Segments,
    ev: &DecodeEvidence<'_, B>,
) -> Result<()> {
    let qn = segs.batch() * geom.num_q_heads() * geom.head_dim();
    if ev.probs.is_some() || ev.logits.is_some() {
        let ones = vec![1; segs.batch()];
        if let Some((heads, buf)) = &ev.probs {
            let n = evidence_blocks(geom, segs, *heads, &ones)?.total();
            check_at_least(b, op, "evidence probs", *buf, n)?;
        }
        if let Some(buf) = &ev.logits {
            let n = evidence_blocks(geom, segs, Heads::PerHead, &ones)?.total();
            check_at_least(b, op, "evidence logits", *buf, n)?;
        }
    }
    if let Some(buf) = &ev.output {
        check_at_least(b, op, "evidence output", *buf, qn)?;
    }
    if let Some(buf) = &ev.stats {
        check_at_least(
            b,
            op,
            "evidence stats",
            *buf,
            segs.batch() * geom.num_q_heads(),
        )?;
    }
    Ok(())
}

/// Parameters of [`prefill_attention`].
#[derive(Clone, Copy, Debug)]
pub struct PrefillParams<'a> {
    /// Head geometry.
    pub geom: HeadGeometry,
    /// Query rows per sequence.
    pub q_rows: &'a Ragged,
    /// KV segments (already holding the chunk's own tokens).
    pub segments: &'a Segments,
    /// Causal masking (bottom-right aligned).
    pub causal: bool,
    /// Optional per-(sequence, head) masks of `q_len x kv_len` bits.
    pub mask: Option<&'a MaskList>,
    /// Logit scale; `None` means `1 / sqrt(D)`.
    pub scale: Option<f32>,
    /// Softmax or entmax.
    pub normalizer: &'a Normalizer,
}

/// Prefill attention (see [`AttnOps::prefill_attention`]).
pub fn prefill_attention<B: AttnOps, T: Element>(
    b: &B,
    p: &PrefillParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
) -> Result<()> {
    prefill_attention_with(b, p, q, k, v, out, PrefillEvidence::default())
}

/// [`prefill_attention`] that also writes the requested evidence: column
/// sums (blocks of 1 row) and the last queries' weights (blocks of
/// [`crate::backend::Window::rows_for`]`(n_q(b))` rows). Size the buffers
/// with [`evidence_blocks`].
pub fn prefill_attention_with<B: AttnOps, T: Element>(
    b: &B,
    p: &PrefillParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
    ev: PrefillEvidence<'_, B>,
) -> Result<()> {
    prefill_attention_impl(b, p, q, k, v, out, ev, false)
}

/// The prefill entry point; `prechecked` skips the mask's shape check.
#[allow(clippy::too_many_arguments)]
pub(crate) fn prefill_attention_impl<B: AttnOps, T: Element>(
    b: &B,
    p: &PrefillParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
    mut ev: PrefillEvidence<'_, B>,
    prechecked: bool,
) -> Result<()> {
    const OP: &str = "prefill_attention";
    check_geom_segs(OP, &p.geom, p.segments)?;
    check_q_rows(OP, p.q_rows, p.segments, p.causal)?;
    p.normalizer.validate(OP, &p.geom)?;
    let scale = resolve_scale(OP, p.scale, &p.geom)?;
    if let Some(mask) = p.mask
        && !prechecked
    {
        let q_rows: Vec<usize> = p.q_rows.lens().collect();
        mask.check_against(OP, &p.geom, p.segments, &q_rows)?;
    }
    let d = p.geom.head_dim();
    let qn = p.q_rows.total() * p.geom.num_q_heads() * d;
    check_attn_io(b, OP, q, k, v, out, qn, p.segments, d)?;
    if let Some((heads, buf)) = &ev.col_sums {
        let ones = vec![1; p.segments.batch()];
        let n = evidence_blocks(&p.geom, p.segments, *heads, &ones)?.total();
        check_at_least(b, OP, "evidence col_sums", *buf, n)?;
    }
    if let Some((w, buf)) = &ev.window {
        if w.queries == 0 {
            return Err(shape(
                OP,
                "the evidence window must cover at least one query",
            ));
        }
        let rows: Vec<usize> = p.q_rows.lens().map(|n| w.rows_for(n)).collect();
        let n = evidence_blocks(&p.geom, p.segments, w.heads, &rows)?.total();
        check_at_least(b, OP, "evidence window", *buf, n)?;
    }
    let meta = PrefillMeta {
        geom: p.geom,
        q_rows: p.q_rows,
        segs: p.segments,
        causal: p.causal,
        mask: p.mask,
        scale,
        normalizer: p.normalizer,
    };
    b.prefill_attention(&meta, q, k, v, out, &mut ev)
}

// ----------------------------------------------------------- entmax attention

/// Parameters of [`entmax_prefill`] and [`entmax_prefill_backward`].
#[derive(Clone, Copy, Debug)]
pub struct EntmaxPrefillParams<'a> {
    /// Head geometry.
    pub geom: HeadGeometry,
    /// Query rows per sequence.
    pub q_rows: &'a Ragged,
    /// KV segments; each segment's length is the sequence's key length.
    pub segments: &'a Segments,
    /// Causal masking (bottom-right aligned).
    pub causal: bool,
    /// α: one for every head, or one per query head (each finite, > 1).
    pub alphas: &'a [f32],
    /// Logit scale; `None` means `1 / sqrt(D)`.
    pub scale: Option<f32>,
    /// Query tile height (AdaSplash: 16).
    pub block_q: usize,
    /// Key tile width (AdaSplash: 16).
    pub block_k: usize,
    /// Visit only live tiles.
    pub skip_blocks: bool,
}

fn entmax_prefill_meta<'a>(
    op: &'static str,
    p: &EntmaxPrefillParams<'a>,
) -> Result<EntmaxPrefillMeta<'a>> {
    check_geom_segs(op, &p.geom, p.segments)?;
    check_q_rows(op, p.q_rows, p.segments, p.causal)?;
    let hq = p.geom.num_q_heads();
    let alphas = match p.alphas.len() {
        1 => vec![p.alphas[0]; hq],
        l if l == hq => p.alphas.to_vec(),
        l => {
            return Err(shape(
                op,
                format!("{l} alphas for {hq} query heads (give 1 or one per head)"),
            ));
        }
    };
    alphas.iter().try_for_each(|&a| check_alpha(op, a))?;
    if p.block_q == 0 || p.block_k == 0 {
        return Err(shape(op, "block_q and block_k must be positive"));
    }
    Ok(EntmaxPrefillMeta {
        geom: p.geom,
        q_rows: p.q_rows,
        segs: p.segments,
        causal: p.causal,
        alphas,
        scale: resolve_scale(op, p.scale, &p.geom)?,
        block_q: p.block_q,
        block_k: p.block_k,
        skip_blocks: p.skip_blocks,
    })
}

/// Entmax prefill attention with optional block skipping (see
/// [`EntmaxOps::entmax_prefill`]). `out` is `[total_q, Hq, D]`, `tau`
/// `[total_q, Hq]`.
pub fn entmax_prefill<B: EntmaxOps, T: Element>(
    b: &B,
    p: &EntmaxPrefillParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
    tau: &mut B::Buffer<f32>,
) -> Result<BlockStats> {
    const OP: &str = "entmax_prefill";
    let meta = entmax_prefill_meta(OP, p)?;
    let (hq, d) = (p.geom.num_q_heads(), p.geom.head_dim());
    let qn = p.q_rows.total() * hq * d;
    check_attn_io(b, OP, q, k, v, out, qn, p.segments, d)?;
    check_len(b, OP, "tau", tau, p.q_rows.total() * hq)?;
    b.entmax_prefill(&meta, q, k, v, out, tau)
}

/// Backward of [`entmax_prefill`] (see [`EntmaxOps::entmax_prefill_backward`]).
/// `dq` is `[total_q, Hq, D]`; `dk`, `dv` have the length of `k`; `dalpha`
/// is `[Hq]`; all f32.
#[allow(clippy::too_many_arguments)]
pub fn entmax_prefill_backward<B: EntmaxOps, T: Element>(
    b: &B,
    p: &EntmaxPrefillParams<'_>,
    q: &B::Buffer<T>,
    k: &B::Buffer<T>,
    v: &B::Buffer<T>,
    tau: &B::Buffer<f32>,
    d_out: &B::Buffer<T>,
    dq: &mut B::Buffer<f32>,
    dk: &mut B::Buffer<f32>,
    dv: &mut B::Buffer<f32>,
    dalpha: &mut B::Buffer<f32>,
) -> Result<()> {
    const OP: &str = "entmax_prefill_backward";
    let meta = entmax_prefill_meta(OP, p)?;
    let (hq, d) = (p.geom.num_q_heads(), p.geom.head_dim());
    let qn = p.q_rows.total() * hq * d;
    check_len(b, OP, "q", q, qn)?;
    check_kv(b, OP, "k", k, p.segments, d)?;
    let kn = b.buffer_len(k);
    check_len(b, OP, "v", v, kn)?;
    check_len(b, OP, "tau", tau, p.q_rows.total() * hq)?;
    check_len(b, OP, "d_out", d_out, qn)?;
    check_len(b, OP, "dq", dq, qn)?;
    check_len(b, OP, "dk", dk, kn)?;
    check_len(b, OP, "dv", dv, kn)?;
    check_len(b, OP, "dalpha", dalpha, hq)?;
    b.entmax_prefill_backward(&meta, q, k, v, tau, d_out, dq, dk, dv, dalpha)
}

// ------------------------------------------------------------------- paged KV

/// Errors unless a page pool buffer is exactly `[table.rows(), d]`: a
/// buffer of any other length means the declared pool shape is not the
/// buffer's (FlashInfer's silent miscompute on a strided pool, issue #3856,
/// is what an unchecked shape gives).
fn check_pool<B: Backend, T: Element>(
    b: &B,
    op: &'static str,
    name: &str,
    buf: &B::Buffer<T>,
    table: &PageTable,
    d: usize,
) -> Result<()> {
    let want = Size::new(op, "page pool elements (rows x head_dim)", table.rows())
        .times(d)
        .get()?;
    let got = b.buffer_len(buf);
    if got != want {
        return Err(shape(
            op,
            format!(
                "{name} has {got} elements; a pool of {} pages x {} KV heads x {} slots of D = {d} \
                 is {want}",
                table.num_pages(),
                table.num_kv_heads(),
                table.page_size()
            ),
        ));
    }
    Ok(())
}

/// Parameters of [`decode_attention_paged`].
#[derive(Clone, Copy, Debug)]
pub struct PagedDecodeParams<'a> {
    /// Head geometry (its KV heads must be the page table's).
    pub geom: HeadGeometry,
    /// The page table: one table per sequence or per (sequence, KV head).
    pub pages: &'a PageTable,
    /// Logit scale; `None` means `1 / sqrt(D)`.
    pub scale: Option<f32>,
    /// Softmax or entmax.
    pub normalizer: &'a Normalizer,
    /// Dense, index list, or bit mask, in token coordinates of each segment
    /// (checked against [`PageTable::segments`]).
    pub restrict: Restrict<'a>,
}

/// Decode attention over paged KV, one query per sequence (see
/// [`AttnOps::decode_attention_paged`] and [`crate::paged`]).
///
/// `q` and `out` are `[batch, Hq, D]`; `k_pages` and `v_pages` are the page
/// pools, each exactly `[pages.rows(), D]`. The result is the one
/// [`decode_attention`] gives on the rows gathered into contiguous segments
/// (`row(s, j)` for `j < len(s)`); on the reference and the CPU backend it
/// is bitwise that result. Backends without a paged kernel return
/// [`Error::Unsupported`].
pub fn decode_attention_paged<B: AttnOps, T: Element>(
    b: &B,
    p: &PagedDecodeParams<'_>,
    q: &B::Buffer<T>,
    k_pages: &B::Buffer<T>,
    v_pages: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
) -> Result<()> {
    decode_attention_paged_with(b, p, q, k_pages, v_pages, out, DecodeEvidence::default())
}

/// [`decode_attention_paged`] that also writes the requested evidence, in
/// token coordinates exactly as [`decode_attention_with`] (size the
/// buffers with [`evidence_blocks`]`(geom, pages.segments(), heads, &[1;
/// batch])`; `stats` is `[batch, Hq]`).
pub fn decode_attention_paged_with<B: AttnOps, T: Element>(
    b: &B,
    p: &PagedDecodeParams<'_>,
    q: &B::Buffer<T>,
    k_pages: &B::Buffer<T>,
    v_pages: &B::Buffer<T>,
    out: &mut B::Buffer<T>,
    mut ev: DecodeEvidence<'_, B>,
) -> Result<()> {
    const OP: &str = "decode_attention_paged";
    crate::paged::check_kv_heads(OP, p.pages, p.geom.num_kv_heads())?;
    let segs = p.pages.segments();
    let scale = check_decode(OP, &p.geom, segs, p.normalizer, p.scale, p.restrict, false)?;
    let d = p.geom.head_dim();
    let qn = segs.batch() * p.geom.num_q_heads() * d;
    check_len(b, OP, "q", q, qn)?;
    check_pool(b, OP, "k_pages", k_pages, p.pages, d)?;
    check_pool(b, OP, "v_pages", v_pages, p.pages, d)?;
    check_len(b, OP, "out", out, qn)?;
    check_decode_evidence(b, OP, &p.geom, segs, &ev)?;
    let meta = PagedDecodeMeta {
        decode: DecodeMeta {
            geom: p.geom,
            segs,
            scale,
            normalizer: p.normalizer,
            restrict: p.restrict,
        },
        pages: p.pages,
    };
    b.decode_attention_paged(&meta, q, k_pages, v_pages, out, &mut ev)
}

/// Parameters of [`append_paged`].
#[derive(Clone, Copy, Debug)]
pub struct PagedAppendParams<'a> {
    /// Head dimension `D` (row width of the pools).
    pub head_dim: usize,
    /// The page table before the append.
    pub pages: &'a PageTable,
    /// New tokens per sequence: `n_b = tokens.len_of(b)` (every KV head of
    /// the sequence gets them).
    pub tokens: &'a Ragged,
    /// CSR offsets of `new_pages`, one list per table plus one.
    pub new_page_indptr: &'a [u32],
    /// The pages each table grows by, in token order: exactly
    /// `⌈(len + n) / P⌉ − ⌈len / P⌉` for a table of `len` tokens given `n`
    /// new ones (the caller's pool provides them).
    pub new_pages: &'a [u32],
}

/// Appends new tokens to paged KV: token `i` (`i < n_b`) of sequence `b`
/// goes to position `len(s) + i` of every segment `s = b · Hkv + g`, i.e.
/// row [`PageTable::row`]`(s, len(s) + i)` of the grown table, in `k_pages`
/// and `v_pages`. Returns the grown table (each table's pages followed by
/// its new pages, `last_page_len` updated).
///
/// `k_new`, `v_new` are `[tokens.total(), Hkv, D]` (token-major, sequences
/// in order, as [`crate::cache::KvCache::append`] takes them); the pools
/// are exactly `[pages.rows(), D]`. Errors when the new pages are not
/// exactly those the tokens need (the tokens do not fit, or pages would be
/// left empty), when a new page is out of the pool or already in the table,
/// and when a page the append writes (the partly filled last page, the new
/// pages) is named by another table (shared pages are read-only: copy on
/// write first). Rows other than the appended ones are not touched.
pub fn append_paged<B: CacheOps, T: Element>(
    b: &B,
    p: &PagedAppendParams<'_>,
    k_new: &B::Buffer<T>,
    v_new: &B::Buffer<T>,
    k_pages: &mut B::Buffer<T>,
    v_pages: &mut B::Buffer<T>,
) -> Result<PageTable> {
    const OP: &str = "append_paged";
    let (table, d) = (p.pages, p.head_dim);
    if d == 0 {
        return Err(shape(OP, "head_dim must be positive"));
    }
    let hkv = table.num_kv_heads();
    if p.tokens.num_segments() != table.batch() {
        return Err(shape(
            OP,
            format!(
                "tokens has {} sequences, the page table has {}",
                p.tokens.num_segments(),
                table.batch()
            ),
        ));
    }
    let tables = table.num_tables();
    let add = Ragged::new(p.new_page_indptr.to_vec())?;
    if add.num_segments() != tables || add.total() != p.new_pages.len() {
        return Err(shape(
            OP,
            format!(
                "new_page_indptr must have {} entries ending at {} (one list per table), got {} \
                 ending at {}",
                tables + 1,
                p.new_pages.len(),
                p.new_page_indptr.len(),
                add.total()
            ),
        ));
    }
    let seq_of = |i: usize| match table.scope() {
        PageScope::Sequence => i,
        PageScope::KvHead => i / hkv,
    };
    let ps = table.page_size();
    let mut parts = table.parts().clone();
    parts.page_indptr.clear();
    parts.page_indptr.push(0);
    parts.page_indices.clear();
    for i in 0..tables {
        let (len, n) = (table.table_len(i), p.tokens.len_of(seq_of(i)));
        let new_len = Size::new(OP, "tokens of one table", len)
            .plus(n)
            .get_u32()? as usize;
        let need = table.pages_for(new_len) - table.pages_of(i).len();
        let got = add.len_of(i);
        if got != need {
            return Err(shape(
                OP,
                format!(
                    "table {i} holds {len} tokens in {} pages of {ps}: {n} new tokens need {need} \
                     new pages, got {got}",
                    table.pages_of(i).len()
                ),
            ));
        }
        parts.page_indices.extend_from_slice(table.pages_of(i));
        parts
            .page_indices
            .extend_from_slice(&p.new_pages[add.range(i)]);
        parts
            .page_indptr
            .push(Size::new(OP, "page indices", parts.page_indices.len()).get_u32()?);
        parts.last_page_len[i] = (new_len - (table.pages_for(new_len).max(1) - 1) * ps) as u32;
    }
    let grown = PageTable::new(parts)?;
    let nseg = table.segments().num_segments();
    let shift = ps.trailing_zeros();
    grown.check_exclusive(
        OP,
        (0..nseg).flat_map(|s| {
            let (len, n) = (table.segments().len_of(s), p.tokens.len_of(s / hkv));
            let pages = if n == 0 {
                0..0
            } else {
                len >> shift..((len + n - 1) >> shift) + 1
            };
            pages.map(move |pi| (s, pi))
        }),
    )?;
    let want = Size::new(OP, "new K/V elements (tokens x Hkv x D)", p.tokens.total())
        .times(hkv)
        .times(d)
        .get()?;
    check_len(b, OP, "k_new", k_new, want)?;
    check_len(b, OP, "v_new", v_new, want)?;
    check_pool(b, OP, "k_pages", k_pages, table, d)?;
    check_pool(b, OP, "v_pages", v_pages, table, d)?;
    // Source row (t, g) of `k_new` goes to `dst[t · Hkv + g]`. Rows are
    // unique: tokens of one segment map to distinct rows, segments of one
    // table to distinct KV heads, and the written page keys are exclusive.
    let mut dst = Vec::with_capacity(p.tokens.total() * hkv);
    for bi in 0..table.batch() {
        for i in 0..p.tokens.len_of(bi) {
            for g in 0..hkv {
                let s = bi * hkv + g;
                dst.push(grown.row(s, table.segments().len_of(s) + i) as u32);
            }
        }
    }
    if !dst.is_empty() {
        let meta = ScatterMeta {
            width: d,
            indices: dst,
        };
        b.scatter_rows(&meta, k_new, k_pages)?;
        b.scatter_rows(&meta, v_new, v_pages)?;
    }
    Ok(grown)
}

/// Compacts paged KV in place to the tokens in `keep` (scope `KvHead`, one
/// sorted list per segment, token coordinates): the hole-filling compaction
/// of [`compact_rows`] ([`crate::cache::compaction_moves`]) on each
/// segment's tokens, its row moves made on the physical rows
/// ([`PageTable::row`]) of `k_pages` and `v_pages` (each exactly
/// `[pages.rows(), D]`). Returns the shrunk table (each table keeps its first
/// `⌈len' / P⌉` pages) and the pages it released ([`PagedCompaction`]).
///
/// Errors when a list is out of range, when the KV heads of a per-sequence
/// table keep different counts (one table has one length: use per-KV-head
/// tables for head-wise budgets), and when a page a row moves into is named
/// by another table (shared pages are read-only).
pub fn compact_paged<B: CacheOps, T: Element>(
    b: &B,
    head_dim: usize,
    pages: &PageTable,
    keep: &IndexList,
    k_pages: &mut B::Buffer<T>,
    v_pages: &mut B::Buffer<T>,
) -> Result<PagedCompaction> {
    paged_compaction(
        b,
        "compact_paged",
        head_dim,
        pages,
        keep,
        |_, list| list.len(),
        |_, list| crate::cache::compaction_moves(list),
        (k_pages, v_pages),
    )
}

/// Removes the tokens in `drop` (scope `KvHead`, one sorted list per
/// segment) from paged KV: the compaction of [`compact_paged`] for the
/// complement, in O(dropped rows) ([`crate::cache::drop_moves`]). Returns
/// the shrunk table and the released pages; errors as [`compact_paged`].
pub fn drop_paged<B: CacheOps, T: Element>(
    b: &B,
    head_dim: usize,
    pages: &PageTable,
    drop: &IndexList,
    k_pages: &mut B::Buffer<T>,
    v_pages: &mut B::Buffer<T>,
) -> Result<PagedCompaction> {
    paged_compaction(
        b,
        "drop_paged",
        head_dim,
        pages,
        drop,
        |len, list| len - list.len(),
        crate::cache::drop_moves,
        (k_pages, v_pages),
    )
}

/// The body of [`compact_paged`] / [`drop_paged`]: `new_len(len, list)` and
/// `moves(len, list)` (token coordinates) per segment.
#[allow(clippy::too_many_arguments)]
fn paged_compaction<B: CacheOps, T: Element>(
    b: &B,
    op: &'static str,
    d: usize,
    table: &PageTable,
    lists: &IndexList,
    new_len: impl Fn(usize, &[u32]) -> usize,
    moves: impl Fn(usize, &[u32]) -> Vec<(u32, u32)>,
    (k_pages, v_pages): (&mut B::Buffer<T>, &mut B::Buffer<T>),
) -> Result<PagedCompaction> {
    if d == 0 {
        return Err(shape(op, "head_dim must be positive"));
    }
    check_pool(b, op, "k_pages", k_pages, table, d)?;
    check_pool(b, op, "v_pages", v_pages, table, d)?;
    let segs = table.segments();
    let nseg = segs.num_segments();
    crate::paged::check_segment_lists(op, nseg, lists)?;
    let mut lens = vec![0usize; table.num_tables()];
    for s in 0..nseg {
        let (list, len) = (lists.list(s), segs.len_of(s));
        if let Some(&last) = list.last()
            && last as usize >= len
        {
            return Err(shape(
                op,
                format!("segment {s}: index {last} >= length {len}"),
            ));
        }
        let n = new_len(len, list);
        let t = table.table_of(s);
        // A per-sequence table serves all KV heads: the first sets its
        // length, the others must agree.
        let first_of_table = table.scope() == PageScope::KvHead || s % segs.num_kv_heads() == 0;
        if !first_of_table && lens[t] != n {
            return Err(shape(
                op,
                format!(
                    "sequence {t}: KV heads keep {} and {n} tokens, but a per-sequence page table \
                     has one length (use PageScope::KvHead tables for head-wise budgets)",
                    lens[t]
                ),
            ));
        }
        lens[t] = n;
    }
    let shift = table.page_size().trailing_zeros();
    let mut phys = Vec::new();
    let mut written = Vec::new();
    for s in 0..nseg {
        let seg = table.segment(s);
        for (dst, src) in moves(segs.len_of(s), lists.list(s)) {
            written.push((s, (dst as usize) >> shift));
            phys.push((seg.row(dst as usize) as u32, seg.row(src as usize) as u32));
        }
    }
    written.dedup();
    table.check_exclusive(op, written.into_iter())?;
    let mut parts = table.parts().clone();
    parts.page_indptr.clear();
    parts.page_indptr.push(0);
    parts.page_indices.clear();
    for (i, &n) in lens.iter().enumerate() {
        let keep = table.pages_for(n);
        parts
            .page_indices
            .extend_from_slice(&table.pages_of(i)[..keep]);
        parts.page_indptr.push(parts.page_indices.len() as u32);
        parts.last_page_len[i] = (n - keep.saturating_sub(1) * table.page_size()) as u32;
    }
    let shrunk = PageTable::new(parts)?;
    if !phys.is_empty() {
        // Destinations are exclusive rows, distinct from every source (a
        // source in the same row would put a shared page key in two tables,
        // or one token in two places); sources of different tables may
        // coincide in a shared page, which a copy reads twice.
        let meta = CompactMeta {
            width: d,
            moves: phys,
        };
        b.compact_rows(&meta, k_pages)?;
        b.compact_rows(&meta, v_pages)?;
    }
    Ok(PagedCompaction::new(table, shrunk))
}
