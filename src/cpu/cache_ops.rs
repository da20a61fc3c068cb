//! Cache ops: gather, in-place compaction, weighted merge.
//!
//! * `gather_rows`: destination rows in parallel (serially below 256 KiB),
//!   each a plain copy.
//! * `scatter_rows`: source rows copied in place (unique destinations).
//! * `compact_rows`: the row moves of the compaction (sources and
//!   destinations disjoint), one copy each — O(moved rows), not O(cache).
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

/// Bytes below which [`CacheOps::gather_rows`] copies on the calling thread.
const SERIAL_GATHER: usize = 256 << 10;

impl CacheOps for Cpu {
    fn gather_rows<T: Element>(
        &self,
        meta: &GatherMeta,
        src: &Vec<T>,
        dst: &mut Vec<T>,
    ) -> Result<()> {
        let w = meta.width;
        let copy = |(d, &s): (&mut [T], &u32)| {
            d.copy_from_slice(&src[s as usize * w..(s as usize + 1) * w])
        };
        // A small gather (a policy's few rows) costs less than waking the
        // pool: below `SERIAL_GATHER` bytes it runs on the calling thread.
        if std::mem::size_of_val(dst.as_slice()) < SERIAL_GATHER {
            dst.chunks_mut(w).zip(&meta.indices).for_each(copy);
        } else {
            self.install(|| {
                dst.par_chunks_mut(w)
                    .zip(meta.indices.par_iter())
                    .for_each(copy)
            });
        }
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
        // Sources and destinations are disjoint: plain row copies.
        for &(dst, src) in &meta.moves {
            let (dst, src) = (dst as usize, src as usize);
            buf.copy_within(src * w..(src + 1) * w, dst * w);
        }
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
