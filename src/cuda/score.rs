//! Q·K logits on the GPU (`qk_logits.cu`), through the attention work units.

use super::CudaBuffer;
use super::attn::{logits, prefill_plan};
use super::device::CudaBackend;
use crate::backend::{QkMeta, ScoreOps};
use crate::dtype::Element;
use crate::error::Result;

impl ScoreOps for CudaBackend {
    fn qk_logits<T: Element>(
        &self,
        meta: &QkMeta,
        q: &CudaBuffer<T>,
        k: &CudaBuffer<T>,
        out: &mut CudaBuffer<f32>,
    ) -> Result<()> {
        let (geom, segs) = (&meta.geom, &meta.segs);
        let hq = geom.num_q_heads();
        let plan = prefill_plan(geom, &meta.q_rows, segs, meta.causal, None);
        let n_out = meta.q_rows.total() * hq;
        let (mut o_base, mut o_cols) = (vec![0u32; n_out], vec![0u32; n_out]);
        for b in 0..segs.batch() {
            for i in 0..meta.q_rows.len_of(b) {
                let row = meta.q_rows.range(b).start + i;
                for h in 0..hq {
                    let kv = segs.len_of(segs.index(b, geom.kv_head(h)));
                    let block = meta.blocks.range(b * hq + h).start;
                    o_base[row * hq + h] = (block + i * kv) as u32;
                    o_cols[row * hq + h] = kv as u32;
                }
            }
        }
        logits::<T>(
            self,
            &plan,
            geom,
            meta.scale,
            &q.data,
            &k.data,
            &mut out.data,
            &o_base,
            &o_cols,
            "qk_logits",
        )
    }
}
