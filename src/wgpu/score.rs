//! `qk_logits`: one workgroup per logit row.

use crate::backend::{QkMeta, ScoreOps};
use crate::dtype::Element;
use crate::error::Result;

use super::device::{Rec, u32c};
use super::shaders::ShaderId;
use super::{Wgpu, WgpuBuffer};

impl ScoreOps for Wgpu {
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
