//! Cache ops: gather, in-place compaction, weighted merge.
//!
//! * `gather_rows`: destination rows in parallel, each a plain copy.
//! * `scatter_rows`: source rows copied in place (unique destinations).
//! * `compact_rows`: per segment, kept rows move down in increasing order
//!   (`keep[i] ≥ i`, so a move never overwrites a row still to be read);
//!   segments are disjoint and are processed in parallel.
//! * `merge_rows`: per group (in parallel), `Σ w_m · src[member_m]`
//!   accumulated in f32 in member order, rounded once to the storage dtype.
#![forbid(unsafe_code)]

use rayon::prelude::*;

use super::Cpu;
use super::simd;
use super::workspace::grow;
use crate::backend::{CacheOps, CompactMeta, GatherMeta, MergeMeta, ScatterMeta};
use crate::dtype::Element;
use crate::error::Result;

impl CacheOps for Cpu {
    fn gather_rows<T: Element>(
        &self,
        meta: &GatherMeta,
        src: &Vec<T>,
        dst: &mut Vec<T>,
    ) -> Result<()> {
        let w = meta.width;
        self.install(|| {
            dst.par_chunks_mut(w)
                .zip(meta.indices.par_iter())
                .for_each(|(d, &s)| d.copy_from_slice(&src[s as usize * w..(s as usize + 1) * w]))
        });
        Ok(())
    }

    fn scatter_rows<T: Element>(
        &self,
        meta: &ScatterMeta,
        src: &Vec<T>,
        dst: &mut Vec<T>,
    ) -> Result<()> {
        let w = meta.width;
        for (s, &r) in src.chunks_exact(w).zip(&meta.indices) {
            let r = r as usize;
            dst[r * w..(r + 1) * w].copy_from_slice(s);
        }
        Ok(())
    }

    fn compact_rows<T: Element>(&self, meta: &CompactMeta, buf: &mut Vec<T>) -> Result<()> {
        let w = meta.width;
        // Disjoint segment slices, in buffer order.
        let mut order: Vec<usize> = (0..meta.segs.num_segments()).collect();
        order.sort_by_key(|&s| meta.segs.offset(s));
        let mut parts = Vec::with_capacity(order.len());
        let mut rest: &mut [T] = buf;
        let mut at = 0usize;
        for &s in &order {
            let r = meta.segs.rows_of(s);
            let tail = std::mem::take(&mut rest);
            let (_, tail) = tail.split_at_mut((r.start - at) * w);
            let (seg, tail) = tail.split_at_mut(r.len() * w);
            parts.push((s, seg));
            rest = tail;
            at = r.end;
        }
        self.install(|| {
            parts.into_par_iter().for_each(|(s, seg)| {
                for (i, &j) in meta.keep.list(s).iter().enumerate() {
                    let j = j as usize;
                    if i != j {
                        seg.copy_within(j * w..(j + 1) * w, i * w);
                    }
                }
            })
        });
        Ok(())
    }

    fn merge_rows<T: Element>(
        &self,
        meta: &MergeMeta,
        src: &Vec<T>,
        dst: &mut Vec<T>,
    ) -> Result<()> {
        let (w, isa) = (meta.width, self.isa);
        self.install(|| {
            dst.par_chunks_mut(w).enumerate().for_each(|(g, out)| {
                self.scratch.with(|buf| {
                    let acc = grow(buf, w);
                    acc.fill(0.0);
                    for m in meta.groups.range(g) {
                        let row = meta.members[m] as usize;
                        simd::axpy_multi(
                            isa,
                            acc,
                            1,
                            &meta.weights[m..m + 1],
                            &src[row * w..(row + 1) * w],
                        );
                    }
                    simd::from_f32_slice(isa, acc, out);
                })
            })
        });
        Ok(())
    }
}
