//! `qk_logits`: one workgroup per logit row; `value_distances`: one
//! workgroup per KV segment (`shaders/value_distances.wgsl`).

use crate::backend::{DistMeta, Heads, QkMeta, ScoreOps};
use crate::dtype::Element;
use crate::error::Result;

use super::device::{Rec, padded_bytes, u32c};
use super::shaders::ShaderId;
use super::{Wgpu, WgpuBuffer};

impl ScoreOps for Wgpu {
    fn value_distances<T: Element>(
        &self,
        meta: &DistMeta,
        weights: &WgpuBuffer<f32>,
        v: &WgpuBuffer<T>,
        out: &mut WgpuBuffer<f32>,
        centers: Option<&mut WgpuBuffer<f32>>,
    ) -> Result<()> {
        const OP: &str = "value_distances";
        let (geom, segs) = (meta.geom(), meta.segments());
        let d = geom.head_dim();
        let gh = if meta.heads() == Heads::PerHead {
            geom.group()
        } else {
            1
        };
        let n_segs = segs.num_segments();
        let mut words = vec![
            u32c(OP, n_segs)?,
            u32c(OP, d)?,
            u32c(OP, gh)?,
            u32::from(meta.fast()),
            0,
            0,
            0,
            0,
        ];
        words.reserve(4 * n_segs);
        // The gh blocks of segment s are consecutive in the block order
        // (PerHead: blocks b·Hq + g·G + hh; otherwise block s itself).
        let o_per = if meta.fast() { d } else { gh * d };
        for s in 0..n_segs {
            let first = match meta.heads() {
                Heads::PerHead => {
                    let (b, g) = (s / geom.num_kv_heads(), s % geom.num_kv_heads());
                    b * geom.num_q_heads() + g * geom.group()
                }
                _ => s,
            };
            words.extend([
                u32c(OP, segs.offset(s))?,
                u32c(OP, segs.len_of(s))?,
                u32c(OP, meta.blocks().range(first).start)?,
                u32c(OP, s * o_per)?,
            ]);
        }
        let mut rec = Rec::new(&self.ctx, OP);
        let m = rec.words(&words);
        let o = rec.scratch(padded_bytes(n_segs * o_per, 4));
        let variant = self.ctx.variant(T::DTYPE);
        rec.dispatch(
            ShaderId::ValueDistances,
            variant,
            &[],
            &[&m, &v.raw, &weights.raw, &o, &out.raw],
            words[0],
        )?;
        if let Some(c) = centers {
            // Every block's o: the scratch holds them per segment (one
            // shared mean per segment with `fast`).
            let row = (d * 4) as u64;
            if o_per == gh * d {
                rec.copy(&o, &c.raw, (n_segs * o_per * 4) as u64);
            } else {
                for s in 0..n_segs {
                    for hh in 0..gh {
                        rec.copy_at(&o, s as u64 * row, &c.raw, (s * gh + hh) as u64 * row, row);
                    }
                }
            }
        }
        rec.submit()
    }

    fn qk_logits<T: Element>(
        &self,
        meta: &QkMeta,
        q: &WgpuBuffer<T>,
        k: &WgpuBuffer<T>,
        out: &mut WgpuBuffer<f32>,
    ) -> Result<()> {
        const OP: &str = "qk_logits";
        let (geom, segs, q_rows) = (meta.geom(), meta.segments(), meta.q_rows());
        let (hq, d) = (geom.num_q_heads(), geom.head_dim());
        let n_rows = meta.logit_rows().num_segments();
        let mut words = vec![0u32; 8];
        words[0] = u32c(OP, n_rows)?;
        words[1] = u32c(OP, d)?;
        words[2] = meta.scale().to_bits();
        words.reserve(5 * n_rows);
        for b in 0..segs.batch() {
            let nq = q_rows.len_of(b);
            for h in 0..hq {
                let s = segs.index(b, geom.kv_head(h));
                let kv = segs.len_of(s);
                let block = meta.blocks().range(b * hq + h).start;
                for i in 0..nq {
                    let row = q_rows.range(b).start + i;
                    let limit = if meta.causal() {
                        (kv + i + 1).saturating_sub(nq)
                    } else {
                        kv
                    };
                    words.extend([
                        u32c(OP, (row * hq + h) * d)?,
                        u32c(OP, segs.offset(s))?,
                        u32c(OP, kv)?,
                        u32c(OP, limit)?,
                        u32c(OP, block + i * kv)?,
                    ]);
                }
            }
        }
        let mut rec = Rec::new(&self.ctx, OP);
        let m = rec.words(&words);
        let variant = self.ctx.variant(T::DTYPE);
        rec.dispatch(
            ShaderId::QkLogits,
            variant,
            &[],
            &[&m, &q.raw, &k.raw, &out.raw],
            words[0],
        )?;
        rec.submit()
    }
}
