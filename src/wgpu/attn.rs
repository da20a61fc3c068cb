//! `decode_attention` and `prefill_attention`: one workgroup per attention
//! row (query, head), sharing `shaders/common_attend.wgsl`, and their
//! evidence, recorded in the same submission:
//!
//! - decode: the attention pass keeps each row's raw logits and normaliser
//!   statistic beside its weights in the logits scratch; one light pass per
//!   requested output (`decode_attention_ev_probs`, `_ev_logits`) turns the
//!   candidate-indexed rows into token-indexed blocks, folded over the GQA
//!   group, and the statistics are copied out. No extra read of K or V.
//! - prefill: the attention pass keeps each row's normaliser statistics;
//!   `prefill_attention_evidence` (one invocation per key) recomputes `q · k`
//!   for the chunk's queries, the weights from those statistics, and
//!   accumulates column sums and the window in a fixed order.

use crate::backend::{
    AttnOps, DecodeEvidence, DecodeMeta, Heads, Normalizer, PrefillEvidence, PrefillMeta, Restrict,
    evidence_blocks,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{BitMask, MaskList, Ragged};

use super::device::{Rec, groups_for, padded_bytes, u32c};
use super::shaders::ShaderId;
use super::{Wgpu, WgpuBuffer, alpha_mode, out_target, pack_into};

/// `RESTRICT` override values.
pub(crate) const DENSE: u32 = 0;
const INDICES: u32 = 1;
const MASK: u32 = 2;

/// One attention row (see the table layout in `common_attend.wgsl`).
pub(crate) struct Item {
    pub q_off: usize,
    pub kv_row0: usize,
    pub n_cand: usize,
    /// Offset inside the auxiliary words (index lists or mask words).
    pub aux: usize,
    pub out_off: usize,
    pub alpha: f32,
    pub limit: usize,
}

/// The `meta` words of an attention dispatch: header, item table, aux words.
pub(crate) struct Plan {
    pub words: Vec<u32>,
    pub lg_len: usize,
    /// Length of the logits scratch: `lg_len`, plus the evidence regions.
    pub scratch_len: usize,
    pub items: u32,
    /// Candidate count of each item (to plan the split path).
    pub n_cand: Vec<usize>,
}

/// Words of the table header (see `common_attend.wgsl`).
const HEADER: usize = 16;
/// Header word: offset in the logits scratch of the evidence statistics.
const H_STATS: usize = 8;
/// Header word: offset in the logits scratch of the raw logits.
const H_RAW: usize = 9;
/// Header words: offsets of the op's evidence tables.
const H_EV: usize = 10;
const H_EV2: usize = 11;

/// A buffer bound by work recorded after the attention pass.
enum Bind {
    /// The op's table.
    Params,
    /// The logits scratch (weights, raw logits, statistics).
    Scratch,
    Q,
    K,
    /// A caller's buffer.
    Ext(wgpu::Buffer),
    /// A placeholder for an output that was not asked for.
    Dummy,
}

/// Work recorded after the attention pass, in the same submission.
enum After {
    Dispatch {
        entry: &'static str,
        bindings: Vec<(u32, Bind)>,
        groups: u32,
    },
    /// Copies `words` f32 from word `from` of the scratch to the start of `to`.
    CopyScratch {
        from: usize,
        to: wgpu::Buffer,
        words: usize,
    },
}

/// `Heads` as the evidence shaders fold it.
fn fold_mode(heads: Heads) -> u32 {
    match heads {
        Heads::PerHead => 0,
        Heads::Sum => 1,
        Heads::Mean => 2,
        Heads::Max => 3,
    }
}

/// Rows with at least this many candidates take the split path (logits and
/// P·V spread over many workgroups).
const SPLIT_MIN: usize = 512;
/// Candidates per chunk of the split path (one workgroup each).
const CHUNK: usize = super::device::WORKGROUP as usize;

pub(crate) fn plan(
    op: &'static str,
    d: usize,
    scale: f32,
    header_extra: [u32; 2],
    items: &[Item],
    aux: &[u32],
) -> Result<Plan> {
    let base = HEADER + 8 * items.len();
    let mut words = Vec::with_capacity(base + aux.len());
    words.extend([
        u32c(op, items.len())?,
        u32c(op, d)?,
        scale.to_bits(),
        header_extra[0],
        header_extra[1],
    ]);
    words.resize(HEADER, 0);
    let mut lg = 0usize;
    for it in items {
        words.extend([
            u32c(op, it.q_off)?,
            u32c(op, it.kv_row0)?,
            u32c(op, it.n_cand)?,
            u32c(op, base + it.aux)?,
            u32c(op, it.out_off)?,
            u32c(op, lg)?,
            it.alpha.to_bits(),
            u32c(op, it.limit)?,
        ]);
        lg += it.n_cand;
    }
    u32c(op, lg)?;
    words.extend_from_slice(aux);
    Ok(Plan {
        words,
        lg_len: lg,
        scratch_len: lg,
        items: u32c(op, items.len())?,
        n_cand: items.iter().map(|it| it.n_cand).collect(),
    })
}

fn mask_words(m: &MaskList) -> Vec<u32> {
    (0..m.num_lists())
        .flat_map(|i| m.words_of(i).iter().copied())
        .collect()
}

fn norm_constants(norm: &Normalizer, restrict: u32) -> Vec<(&'static str, u32)> {
    let mut c = vec![("RESTRICT", restrict)];
    match norm {
        Normalizer::Softmax => c.push(("NORM", 0)),
        Normalizer::Entmax { alpha } => {
            c.push(("NORM", 1));
            c.push(("ALPHA_MODE", alpha_mode(&[*alpha])));
        }
        Normalizer::EntmaxPerHead { alphas } => {
            c.push(("NORM", 1));
            c.push(("ALPHA_MODE", alpha_mode(alphas)));
        }
    }
    c
}

/// Records one attention op (+ its evidence `after`, + pack) and submits it:
/// one workgroup per row, or the split path when a row is long.
#[allow(clippy::too_many_arguments)]
fn run<T: Element>(
    b: &Wgpu,
    op: &'static str,
    shader: ShaderId,
    constants: &[(&'static str, u32)],
    mut plan: Plan,
    q: &WgpuBuffer<T>,
    k: &WgpuBuffer<T>,
    v: &WgpuBuffer<T>,
    out: &mut WgpuBuffer<T>,
    after: Vec<After>,
) -> Result<()> {
    let split = plan.n_cand.iter().any(|&n| n >= SPLIT_MIN);
    let d = plan.words[1] as usize;
    let mut n_chunks = 0usize;
    if split {
        // Per-item chunk indptr, then the chunk table (item, t0, t1, 0).
        let indptr_off = plan.words.len();
        plan.words[5] = u32c(op, indptr_off)?;
        let mut acc = 0u32;
        plan.words.push(0);
        for &n in &plan.n_cand {
            acc += u32c(op, n.div_ceil(CHUNK))?;
            plan.words.push(acc);
        }
        plan.words[6] = u32c(op, plan.words.len())?;
        for (item, &n) in plan.n_cand.iter().enumerate() {
            for t0 in (0..n).step_by(CHUNK) {
                plan.words.extend([
                    u32c(op, item)?,
                    u32c(op, t0)?,
                    u32c(op, (t0 + CHUNK).min(n))?,
                    0,
                ]);
            }
        }
        n_chunks = acc as usize;
    }
    let mut rec = Rec::new(&b.ctx, op);
    let m = rec.words(&plan.words);
    let lg = rec.scratch(padded_bytes(plan.scratch_len, 4));
    let target = out_target(&mut rec, out);
    let variant = b.ctx.variant(T::DTYPE);
    if split {
        let e = shader.entries();
        let partial = rec.scratch(padded_bytes(n_chunks * d, 4));
        let chunks = u32c(op, n_chunks)?;
        rec.dispatch_at(
            shader,
            e[1],
            variant,
            constants,
            &[(0, &m), (1, &q.raw), (2, &k.raw), (4, &lg)],
            chunks,
        )?;
        rec.dispatch_at(
            shader,
            e[2],
            variant,
            constants,
            &[(0, &m), (4, &lg)],
            plan.items,
        )?;
        rec.dispatch_at(
            shader,
            e[3],
            variant,
            constants,
            &[(0, &m), (3, &v.raw), (4, &lg), (5, &partial)],
            chunks,
        )?;
        rec.dispatch_at(
            shader,
            e[4],
            variant,
            constants,
            &[(0, &m), (4, &partial), (5, &target)],
            groups_for(plan.items as usize * d),
        )?;
    } else {
        rec.dispatch(
            shader,
            variant,
            constants,
            &[&m, &q.raw, &k.raw, &v.raw, &lg, &target],
            plan.items,
        )?;
    }
    if !after.is_empty() {
        // A placeholder for outputs that were not asked for.
        let dummy = rec.scratch(4);
        for a in after {
            record_after(
                &mut rec,
                a,
                shader,
                variant,
                constants,
                [&m, &lg, &q.raw, &k.raw, &dummy],
            )?;
        }
    }
    pack_into(&mut rec, &target, out)?;
    rec.submit()
}

/// Records one piece of evidence work; `bufs` are the params table, the
/// logits scratch, Q, K and the placeholder.
fn record_after(
    rec: &mut Rec<'_>,
    a: After,
    shader: ShaderId,
    variant: super::shaders::StorageVariant,
    constants: &[(&'static str, u32)],
    [m, lg, q, k, dummy]: [&wgpu::Buffer; 5],
) -> Result<()> {
    match a {
        After::Dispatch {
            entry,
            bindings,
            groups,
        } => {
            let bufs: Vec<(u32, &wgpu::Buffer)> = bindings
                .iter()
                .map(|(i, bd)| {
                    let buf = match bd {
                        Bind::Params => m,
                        Bind::Scratch => lg,
                        Bind::Q => q,
                        Bind::K => k,
                        Bind::Ext(x) => x,
                        Bind::Dummy => dummy,
                    };
                    (*i, buf)
                })
                .collect();
            rec.dispatch_at(shader, entry, variant, constants, &bufs, groups)
        }
        After::CopyScratch { from, to, words } => {
            if words > 0 {
                rec.copy_range(lg, (from * 4) as u64, &to, (words * 4) as u64);
            }
            Ok(())
        }
    }
}

/// Chunks of [`CHUNK`] tokens over each evidence block (first item, block
/// length, output offset, first token), after a 4-word table header.
fn push_decode_table(
    op: &'static str,
    words: &mut Vec<u32>,
    meta: &DecodeMeta<'_>,
    heads: Heads,
    blocks: &Ragged,
    src: usize,
) -> Result<(usize, u32)> {
    let (geom, segs) = (meta.geom(), meta.segments());
    let (hq, g) = (geom.num_q_heads(), geom.group());
    let per = heads.blocks_per_seq(geom);
    let nh = if heads == Heads::PerHead { 1 } else { g };
    let at = words.len();
    words.extend([0, fold_mode(heads), u32c(op, nh)?, u32c(op, src)?]);
    let mut chunks = 0usize;
    for b in 0..segs.batch() {
        for i in 0..per {
            let (first, seg) = match heads {
                Heads::PerHead => (b * hq + i, segs.index(b, geom.kv_head(i))),
                _ => (b * hq + i * g, segs.index(b, i)),
            };
            let len = segs.len_of(seg);
            let out_off = blocks.range(b * per + i).start;
            for j0 in (0..len).step_by(CHUNK) {
                words.extend([
                    u32c(op, first)?,
                    u32c(op, len)?,
                    u32c(op, out_off)?,
                    u32c(op, j0)?,
                ]);
                chunks += 1;
            }
        }
    }
    let chunks = u32c(op, chunks)?;
    words[at] = chunks;
    Ok((at, chunks))
}

/// Plans the decode evidence: scratch regions for the raw logits and the
/// statistics, the tables of the two token passes, and what runs after the
/// attention.
fn decode_evidence(
    op: &'static str,
    plan: &mut Plan,
    meta: &DecodeMeta<'_>,
    ev: &DecodeEvidence<'_, Wgpu>,
) -> Result<Vec<After>> {
    let mut after = Vec::new();
    if ev.is_empty() {
        return Ok(after);
    }
    let (geom, segs) = (meta.geom(), meta.segments());
    let n_items = segs.batch() * geom.num_q_heads();
    let ones = vec![1; segs.batch()];
    // Region offsets are never 0 (0 means "not asked" to the shader).
    let mut next = plan.lg_len.max(1);
    let raw_off = if ev.logits.is_some() {
        let r = next;
        next += plan.lg_len;
        r
    } else {
        0
    };
    let stats_off = if ev.stats.is_some() {
        let s = next;
        next += 4 * n_items;
        s
    } else {
        0
    };
    plan.scratch_len = plan.scratch_len.max(next);
    plan.words[H_RAW] = u32c(op, raw_off)?;
    plan.words[H_STATS] = u32c(op, stats_off)?;
    if let Some((heads, buf)) = &ev.probs {
        let blocks = evidence_blocks(geom, segs, *heads, &ones)?;
        let (at, chunks) = push_decode_table(op, &mut plan.words, meta, *heads, &blocks, 0)?;
        plan.words[H_EV] = u32c(op, at)?;
        after.push(After::Dispatch {
            entry: "decode_attention_ev_probs",
            bindings: vec![
                (0, Bind::Params),
                (4, Bind::Scratch),
                (5, Bind::Ext(buf.raw.clone())),
            ],
            groups: chunks,
        });
    }
    if let Some(buf) = &ev.logits {
        let blocks = evidence_blocks(geom, segs, Heads::PerHead, &ones)?;
        let (at, chunks) =
            push_decode_table(op, &mut plan.words, meta, Heads::PerHead, &blocks, raw_off)?;
        plan.words[H_EV2] = u32c(op, at)?;
        after.push(After::Dispatch {
            entry: "decode_attention_ev_logits",
            bindings: vec![
                (0, Bind::Params),
                (4, Bind::Scratch),
                (5, Bind::Ext(buf.raw.clone())),
            ],
            groups: chunks,
        });
    }
    if let Some(buf) = &ev.stats {
        after.push(After::CopyScratch {
            from: stats_off,
            to: buf.raw.clone(),
            words: n_items,
        });
    }
    Ok(after)
}

/// Plans the prefill evidence: the statistics region, the table of the key
/// pass (chunks of [`CHUNK`] keys per segment) and its dispatch.
fn prefill_evidence(
    op: &'static str,
    plan: &mut Plan,
    meta: &PrefillMeta<'_>,
    ev: &PrefillEvidence<'_, Wgpu>,
) -> Result<Vec<After>> {
    if ev.is_empty() {
        return Ok(Vec::new());
    }
    let (geom, segs, q_rows) = (meta.geom(), meta.segments(), meta.q_rows());
    let (hq, hkv, g) = (geom.num_q_heads(), geom.num_kv_heads(), geom.group());
    let batch = segs.batch();
    let n_items = q_rows.total() * hq;
    let stats_off = plan.lg_len.max(1);
    plan.scratch_len = plan.scratch_len.max(stats_off + 4 * n_items);
    plan.words[H_STATS] = u32c(op, stats_off)?;
    // Offset of the first block of segment (b, kv) in an evidence layout.
    let first_block = |heads: Heads, blocks: &Ragged, b: usize, kv: usize| match heads {
        Heads::PerHead => blocks.range(b * hq + kv * g).start,
        _ => blocks.range(b * hkv + kv).start,
    };
    let col = match &ev.col_sums {
        Some((heads, buf)) => Some((
            *heads,
            evidence_blocks(geom, segs, *heads, &vec![1; batch])?,
            buf.raw.clone(),
        )),
        None => None,
    };
    let win = match &ev.window {
        Some((w, buf)) => {
            let rows: Vec<usize> = q_rows.lens().map(|n| w.rows_for(n)).collect();
            Some((
                *w,
                evidence_blocks(geom, segs, w.heads, &rows)?,
                buf.raw.clone(),
            ))
        }
        None => None,
    };
    let words = &mut plan.words;
    let at = words.len();
    let flags = u32::from(col.is_some())
        | (u32::from(win.is_some()) << 1)
        | (u32::from(win.as_ref().is_some_and(|w| w.0.rows)) << 2);
    words.extend([
        0,
        flags,
        col.as_ref().map_or(0, |c| fold_mode(c.0)),
        win.as_ref().map_or(0, |w| fold_mode(w.0.heads)),
        u32c(
            op,
            win.as_ref()
                .map_or(0, |w| w.0.queries.min(q_rows.max_len())),
        )?,
        u32c(op, g)?,
        u32c(op, hq)?,
        0,
    ]);
    let mut chunks = 0usize;
    for b in 0..batch {
        let nq = q_rows.len_of(b);
        for kv in 0..hkv {
            let len = segs.len_of(segs.index(b, kv));
            let col_off = col
                .as_ref()
                .map_or(0, |(h, r, _)| first_block(*h, r, b, kv));
            let win_off = win
                .as_ref()
                .map_or(0, |(w, r, _)| first_block(w.heads, r, b, kv));
            for j0 in (0..len).step_by(CHUNK) {
                words.extend([
                    u32c(op, q_rows.range(b).start * hq)?,
                    u32c(op, nq)?,
                    u32c(op, len)?,
                    u32c(op, kv * g)?,
                    u32c(op, col_off)?,
                    u32c(op, win_off)?,
                    u32c(op, j0)?,
                    0,
                ]);
                chunks += 1;
            }
        }
    }
    let chunks = u32c(op, chunks)?;
    words[at] = chunks;
    words[H_EV] = u32c(op, at)?;
    let ext = |b: Option<wgpu::Buffer>| b.map_or(Bind::Dummy, Bind::Ext);
    Ok(vec![After::Dispatch {
        entry: "prefill_attention_evidence",
        bindings: vec![
            (0, Bind::Params),
            (1, Bind::Q),
            (2, Bind::K),
            (4, Bind::Scratch),
            (5, ext(col.map(|c| c.2))),
            (6, ext(win.map(|w| w.2))),
        ],
        groups: chunks,
    }])
}

impl AttnOps for Wgpu {
    fn decode_attention<T: Element>(
        &self,
        meta: &DecodeMeta<'_>,
        q: &WgpuBuffer<T>,
        k: &WgpuBuffer<T>,
        v: &WgpuBuffer<T>,
        out: &mut WgpuBuffer<T>,
        ev: &mut DecodeEvidence<'_, Self>,
    ) -> Result<()> {
        const OP: &str = "decode_attention";
        let (geom, segs) = (meta.geom(), meta.segments());
        let (hq, d) = (geom.num_q_heads(), geom.head_dim());
        let (restrict, aux) = match meta.restrict() {
            Restrict::Dense => (DENSE, Vec::new()),
            Restrict::Indices(list) => (INDICES, list.indices().to_vec()),
            Restrict::Mask(mask) => (MASK, mask_words(mask)),
        };
        let mut items = Vec::with_capacity(segs.batch() * hq);
        for b in 0..segs.batch() {
            for h in 0..hq {
                let s = segs.index(b, geom.kv_head(h));
                let len = segs.len_of(s);
                let (n_cand, aux_off) = match meta.restrict() {
                    Restrict::Dense => (len, 0),
                    Restrict::Indices(list) => {
                        let r = list.indptr().range(list.scope().list_of(b, h, geom));
                        (r.len(), r.start)
                    }
                    Restrict::Mask(mask) => (
                        len,
                        mask.word_indptr()
                            .range(mask.scope().list_of(b, h, geom))
                            .start,
                    ),
                };
                items.push(Item {
                    q_off: (b * hq + h) * d,
                    kv_row0: segs.offset(s),
                    n_cand,
                    aux: aux_off,
                    out_off: (b * hq + h) * d,
                    alpha: meta.normalizer().alpha(h).unwrap_or(0.0),
                    limit: n_cand,
                });
            }
        }
        let mut plan = plan(OP, d, meta.scale(), [0, 0], &items, &aux)?;
        let after = decode_evidence(OP, &mut plan, meta, ev)?;
        let constants = norm_constants(meta.normalizer(), restrict);
        run(
            self,
            OP,
            ShaderId::DecodeAttention,
            &constants,
            plan,
            q,
            k,
            v,
            out,
            after,
        )?;
        if let Some(o) = ev.output.as_deref_mut() {
            widen_into(self, OP, out, o)?;
        }
        Ok(())
    }

    fn prefill_attention<T: Element>(
        &self,
        meta: &PrefillMeta<'_>,
        q: &WgpuBuffer<T>,
        k: &WgpuBuffer<T>,
        v: &WgpuBuffer<T>,
        out: &mut WgpuBuffer<T>,
        ev: &mut PrefillEvidence<'_, Self>,
    ) -> Result<()> {
        const OP: &str = "prefill_attention";
        let (geom, segs, q_rows) = (meta.geom(), meta.segments(), meta.q_rows());
        let (hq, d) = (geom.num_q_heads(), geom.head_dim());
        let (restrict, aux) = match meta.mask() {
            None => (DENSE, Vec::new()),
            Some(mask) => (MASK, mask_words(mask)),
        };
        let mut items = Vec::with_capacity(q_rows.total() * hq);
        for b in 0..segs.batch() {
            let nq = q_rows.len_of(b);
            for h in 0..hq {
                let s = segs.index(b, geom.kv_head(h));
                let len = segs.len_of(s);
                for i in 0..nq {
                    let row = q_rows.range(b).start + i;
                    let aux_off = match meta.mask() {
                        None => 0,
                        Some(mask) => {
                            mask.word_indptr()
                                .range(mask.scope().list_of(b, h, geom))
                                .start
                                + i * BitMask::words_for(len)
                        }
                    };
                    items.push(Item {
                        q_off: (row * hq + h) * d,
                        kv_row0: segs.offset(s),
                        n_cand: len,
                        aux: aux_off,
                        out_off: (row * hq + h) * d,
                        alpha: meta.normalizer().alpha(h).unwrap_or(0.0),
                        limit: if meta.causal() {
                            (len + i + 1).saturating_sub(nq)
                        } else {
                            len
                        },
                    });
                }
            }
        }
        let mut plan = plan(OP, d, meta.scale(), [0, 0], &items, &aux)?;
        let after = prefill_evidence(OP, &mut plan, meta, ev)?;
        let constants = norm_constants(meta.normalizer(), restrict);
        run(
            self,
            OP,
            ShaderId::PrefillAttention,
            &constants,
            plan,
            q,
            k,
            v,
            out,
            after,
        )
    }
}

/// The stored output widened to f32 into `dst` (the decode output
/// evidence: the storage rounding included, as documented for backends
/// without an f32 output kernel).
fn widen_into<T: Element>(
    b: &Wgpu,
    op: &'static str,
    src: &WgpuBuffer<T>,
    dst: &mut WgpuBuffer<f32>,
) -> Result<()> {
    let mut rec = Rec::new(&b.ctx, op);
    let bytes = padded_bytes(src.len, 4);
    if T::DTYPE == crate::dtype::DType::F32 {
        rec.copy(&src.raw, &dst.raw, bytes);
    } else {
        let n = rec.words(&[u32c(op, src.len)?]);
        rec.dispatch(
            ShaderId::Widen,
            b.ctx.variant(T::DTYPE),
            &[],
            &[&n, &src.raw, &dst.raw],
            groups_for(src.len),
        )?;
    }
    rec.submit()
}
