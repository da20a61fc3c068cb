//! Cache ops on the GPU: gather, scatter, two-phase in-place compaction, weighted merge.

use super::device::{CudaBackend, DeviceBytes};
use super::kernels::{GATHER, KernelId, MERGE, PerDtype, SCATTER, entry};
use super::launch::{Arg, launch};
use super::{CudaBuffer, u32_of};
use crate::backend::{CacheOps, CompactMeta, GatherMeta, MergeMeta, ScatterMeta};
use crate::dtype::Element;
use crate::error::Result;

const THREADS: u32 = 256;

/// Blocks of a grid-stride copy of `total` elements.
fn copy_blocks(total: usize) -> u32 {
    u32_of(total.div_ceil(THREADS as usize).clamp(1, 1 << 20))
}

/// `dst` rows from `src` rows through an index list of `rows.len()` rows of
/// `width` elements with `kernel` and its per-dtype entry `names`:
/// `GatherRows` / `GATHER` (`dst[i] = src[rows[i]]`) or
/// `ScatterRows` / `SCATTER` (`dst[rows[i]] = src[i]`); both take the same arguments.
fn move_rows<T: Element>(
    be: &CudaBackend,
    (kernel, names): (KernelId, &PerDtype),
    src: &DeviceBytes,
    dst: &mut DeviceBytes,
    rows: &[u32],
    width: usize,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let idx = be.upload_u32(rows)?;
    launch(
        be,
        kernel,
        entry(names, T::DTYPE),
        (copy_blocks(rows.len() * width), 1, 1),
        THREADS,
        &mut [
            Arg::In(src),
            Arg::Out(dst),
            Arg::In(&idx),
            Arg::U32(u32_of(rows.len())),
            Arg::U32(u32_of(width)),
        ],
    )
}

impl CacheOps for CudaBackend {
    fn gather_rows<T: Element>(
        &self,
        meta: &GatherMeta,
        src: &CudaBuffer<T>,
        dst: &mut CudaBuffer<T>,
    ) -> Result<()> {
        move_rows::<T>(
            self,
            (KernelId::GatherRows, &GATHER),
            &src.data,
            &mut dst.data,
            &meta.indices,
            meta.width,
        )
    }

    fn compact_rows<T: Element>(&self, meta: &CompactMeta, buf: &mut CudaBuffer<T>) -> Result<()> {
        let from: Vec<u32> = meta.moves.iter().map(|m| m.1).collect();
        let to: Vec<u32> = meta.moves.iter().map(|m| m.0).collect();
        if from.is_empty() {
            return Ok(());
        }
        // Phase 1: the moved rows into scratch; phase 2: scatter them to their new places.
        let width = meta.width;
        let mut tmp = self.scratch(from.len() * width * size_of::<T>())?;
        move_rows::<T>(
            self,
            (KernelId::GatherRows, &GATHER),
            &buf.data,
            &mut tmp,
            &from,
            width,
        )?;
        move_rows::<T>(
            self,
            (KernelId::ScatterRows, &SCATTER),
            &tmp,
            &mut buf.data,
            &to,
            width,
        )
    }

    fn scatter_rows<T: Element>(
        &self,
        meta: &ScatterMeta,
        src: &CudaBuffer<T>,
        dst: &mut CudaBuffer<T>,
    ) -> Result<()> {
        move_rows::<T>(
            self,
            (KernelId::ScatterRows, &SCATTER),
            &src.data,
            &mut dst.data,
            &meta.indices,
            meta.width,
        )
    }

    fn merge_rows<T: Element>(
        &self,
        meta: &MergeMeta,
        src: &CudaBuffer<T>,
        dst: &mut CudaBuffer<T>,
    ) -> Result<()> {
        let groups = meta.groups.num_segments();
        let indptr = self.upload_u32(meta.groups.indptr())?;
        let members = self.upload_u32(&meta.members)?;
        let weights = self.upload_f32(&meta.weights)?;
        launch(
            self,
            KernelId::MergeRows,
            entry(&MERGE, T::DTYPE),
            (u32_of(groups), u32_of(meta.width.div_ceil(128)), 1),
            128,
            &mut [
                Arg::In(&src.data),
                Arg::Out(&mut dst.data),
                Arg::In(&indptr),
                Arg::In(&members),
                Arg::In(&weights),
                Arg::U32(u32_of(meta.width)),
            ],
        )
    }
}
