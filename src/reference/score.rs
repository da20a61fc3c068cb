use crate::backend::{DistMeta, QkMeta, ScoreOps, score::value_distances_host};
use crate::dtype::Element;
use crate::error::Result;

use super::{Reference, dot};

impl ScoreOps for Reference {
    fn value_distances<T: Element>(
        &self,
        meta: &DistMeta,
        w: &Vec<f32>,
        v: &Vec<T>,
        out: &mut Vec<f32>,
        centers: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        value_distances_host(meta, w, v, out, centers.map(|c| c.as_mut_slice()));
        Ok(())
    }

    fn qk_logits<T: Element>(
        &self,
        meta: &QkMeta,
        q: &Vec<T>,
        k: &Vec<T>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let (hq, d) = (meta.geom.num_q_heads(), meta.geom.head_dim());
        let scale = f64::from(meta.scale);
        for b in 0..meta.segs.batch() {
            let nq = meta.q_rows.len_of(b);
            for h in 0..hq {
                let s = meta.segs.index(b, meta.geom.kv_head(h));
                let (off, kv) = (meta.segs.offset(s), meta.segs.len_of(s));
                let block = meta.blocks.range(b * hq + h).start;
                for i in 0..nq {
                    let row = meta.q_rows.range(b).start + i;
                    let qv = &q[(row * hq + h) * d..][..d];
                    // Bottom-right aligned position; causal calls have kv >= nq (validated).
                    let pos = (kv + i).checked_sub(nq);
                    for j in 0..kv {
                        let z = if meta.causal && pos.is_none_or(|p| j > p) {
                            f64::NEG_INFINITY
                        } else {
                            scale * dot(qv, &k[(off + j) * d..][..d])
                        };
                        out[block + i * kv + j] = z as f32;
                    }
                }
            }
        }
        Ok(())
    }
}
