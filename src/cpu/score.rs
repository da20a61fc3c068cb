//! Q·K logits: one block `[q_len, kv_len]` per (sequence, query head).
//!
//! Blocks are independent and run in parallel. Within a block the f32
//! queries `[q_len, D]` are scored against the segment's K rows with
//! [`simd::scores_rows_strided`] (each K row read once for all the block's
//! queries); keys after a query's position get `-inf` when causal.
#![forbid(unsafe_code)]

use rayon::prelude::*;

use super::Cpu;
use super::norm::split_rows;
use super::simd;
use super::workspace::grow;
use crate::backend::{QkMeta, ScoreOps};
use crate::dtype::Element;
use crate::error::Result;

impl ScoreOps for Cpu {
    fn qk_logits<T: Element>(
        &self,
        meta: &QkMeta,
        q: &Vec<T>,
        k: &Vec<T>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let isa = self.isa;
        let (hq, d) = (meta.geom.num_q_heads(), meta.geom.head_dim());
        let blocks = split_rows(&meta.blocks, out);
        self.install(|| {
            blocks.into_par_iter().enumerate().for_each(|(bi, blk)| {
                let (b, h) = (bi / hq, bi % hq);
                let nq = meta.q_rows.len_of(b);
                let s = meta.segs.index(b, meta.geom.kv_head(h));
                let (off, kv) = (meta.segs.offset(s), meta.segs.len_of(s));
                if nq == 0 || kv == 0 {
                    return;
                }
                self.scratch.with(|buf| {
                    let qs = grow(buf, nq * d);
                    let r0 = meta.q_rows.range(b).start;
                    for i in 0..nq {
                        let row = &q[((r0 + i) * hq + h) * d..][..d];
                        simd::to_f32_slice(isa, row, &mut qs[i * d..(i + 1) * d]);
                    }
                    let rows = &k[off * d..(off + kv) * d];
                    simd::scores_rows_strided(isa, qs, nq, rows, d, meta.scale, blk, kv);
                });
                if meta.causal {
                    for i in 0..nq {
                        // Bottom-right aligned; validated kv >= nq when causal.
                        let pos = kv + i - nq;
                        blk[i * kv + pos + 1..(i + 1) * kv].fill(f32::NEG_INFINITY);
                    }
                }
            })
        });
        Ok(())
    }
}
