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
use crate::backend::{DistMeta, Heads, QkMeta, ScoreOps};
use crate::dtype::Element;
use crate::error::Result;

impl ScoreOps for Cpu {
    /// Per KV segment (in parallel): the `G` (or one) weighted sums in one
    /// pass over its V rows ([`simd::weighted_rows_strided`]), then every
    /// row's distance to each of them in a second pass.
    fn value_distances<T: Element>(
        &self,
        meta: &DistMeta,
        w: &Vec<f32>,
        v: &Vec<T>,
        out: &mut Vec<f32>,
        centers: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        let isa = self.isa;
        let (geom, segs) = (&meta.geom, &meta.segs);
        let d = geom.head_dim();
        let gh = if meta.heads == Heads::PerHead {
            geom.group()
        } else {
            1
        };
        let mut parts = Vec::with_capacity(segs.num_segments());
        let mut rest: &mut [f32] = out;
        let mut crest: &mut [f32] = match centers {
            Some(c) => c.as_mut_slice(),
            None => &mut [],
        };
        let with_centers = !crest.is_empty();
        let mut at = 0usize;
        for s in 0..segs.num_segments() {
            let n = gh * segs.len_of(s);
            let (a, b) = std::mem::take(&mut rest).split_at_mut(n);
            let nc = if with_centers { gh * d } else { 0 };
            let (ca, cb) = std::mem::take(&mut crest).split_at_mut(nc);
            parts.push((s, at, a, ca));
            rest = b;
            crest = cb;
            at += n;
        }
        self.install(|| {
            parts.into_par_iter().for_each(|(s, at, o, cen)| {
                let (off, len) = (segs.offset(s), segs.len_of(s));
                if len == 0 {
                    return;
                }
                self.scratch.with(|buf| {
                    let buf = grow(buf, gh * d + d + if meta.fast { len } else { 0 });
                    let (acc, rest) = buf.split_at_mut(gh * d);
                    let (row, uni) = rest.split_at_mut(d);
                    acc.fill(0.0);
                    let vrows = &v[off * d..(off + len) * d];
                    if meta.fast {
                        uni.fill(1.0 / len as f32);
                        simd::weighted_rows_strided(isa, acc, 1, uni, len, vrows, d);
                        for h in 1..gh {
                            acc.copy_within(0..d, h * d);
                        }
                    } else {
                        let p = &w[at..at + gh * len];
                        simd::weighted_rows_strided(isa, acc, gh, p, len, vrows, d);
                    }
                    if !cen.is_empty() {
                        cen.copy_from_slice(acc);
                    }
                    for j in 0..len {
                        simd::to_f32_slice(isa, &vrows[j * d..(j + 1) * d], row);
                        for h in 0..gh {
                            let oh = &acc[h * d..(h + 1) * d];
                            let d2: f32 = oh
                                .iter()
                                .zip(row.iter())
                                .map(|(a, x)| (a - x) * (a - x))
                                .sum();
                            o[h * len + j] = d2.sqrt();
                        }
                    }
                });
            })
        });
        Ok(())
    }

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
