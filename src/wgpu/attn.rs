//! `decode_attention` and `prefill_attention`: one workgroup per attention
//! row (query, head), sharing `shaders/common_attend.wgsl`.

use crate::backend::{
    AttnOps, DecodeEvidence, DecodeMeta, Normalizer, PrefillEvidence, PrefillMeta, Restrict,
    evidence,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::{BitMask, MaskList};

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
    pub items: u32,
    /// Candidate count of each item (to plan the split path).
    pub n_cand: Vec<usize>,
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
    const HEADER: usize = 8;
    let base = HEADER + 8 * items.len();
    let mut words = Vec::with_capacity(base + aux.len());
    words.extend([
        u32c(op, items.len())?,
        u32c(op, d)?,
        scale.to_bits(),
        header_extra[0],
        header_extra[1],
        0,
        0,
        0,
    ]);
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

/// Records one attention op (+ pack) and submits it: one workgroup per row,
/// or the split path when a row is long.
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
    let lg = rec.scratch(padded_bytes(plan.lg_len, 4));
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
    pack_into(&mut rec, &target, out)?;
    rec.submit()
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
        let plan = plan(OP, d, meta.scale(), [0, 0], &items, &aux)?;
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
        )?;
        evidence::fallback::decode(self, meta, q, k, out, ev)
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
        let plan = plan(OP, d, meta.scale(), [0, 0], &items, &aux)?;
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
        )?;
        evidence::fallback::prefill(self, meta, q, k, ev)
    }
}
