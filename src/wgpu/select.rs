//! `topk_rows` (radix select, ties to the lower index) and `count_above`.

use crate::backend::{RowsMeta, SelectOps, TopkMeta};
use crate::error::Result;
use crate::layout::{IndexList, Ragged};

use super::device::{Rec, padded_bytes, u32c};
use super::shaders::{ShaderId, StorageVariant};
use super::{Wgpu, WgpuBuffer};

impl SelectOps for Wgpu {
    fn topk_rows(&self, meta: &TopkMeta, x: &WgpuBuffer<f32>) -> Result<IndexList> {
        const OP: &str = "topk_rows";
        let rows = meta.rows();
        let n = rows.num_segments();
        let k = meta.k();
        let lens: Vec<u32> = rows.lens().map(|l| l.min(k) as u32).collect();
        let out_rows = Ragged::from_lens(&lens)?;
        let mut words = vec![u32c(OP, n)?, u32c(OP, k.min(u32::MAX as usize))?];
        for r in 0..n {
            words.extend([
                rows.indptr()[r],
                u32c(OP, rows.len_of(r))?,
                out_rows.indptr()[r],
            ]);
        }
        let total = out_rows.total();
        let mut rec = Rec::new(&self.ctx, OP);
        let m = rec.words(&words);
        let picks = rec.scratch(padded_bytes(total, 4));
        rec.dispatch(
            ShaderId::TopkRows,
            StorageVariant::F32,
            &[],
            &[&m, &x.raw, &picks],
            words[0],
        )?;
        let staging = rec.readback(&picks, (total * 4) as u64);
        rec.submit()?;
        let bytes = self.ctx.map_read(&staging, (total * 4) as u64)?;
        let indices: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
        IndexList::new(meta.scope(), out_rows.indptr().to_vec(), indices)
    }

    fn count_above(
        &self,
        meta: &RowsMeta,
        x: &WgpuBuffer<f32>,
        threshold: f32,
    ) -> Result<Vec<u32>> {
        const OP: &str = "count_above";
        let rows = meta.rows();
        let n = rows.num_segments();
        let mut words = vec![u32c(OP, n)?, threshold.to_bits()];
        words.extend_from_slice(rows.indptr());
        let mut rec = Rec::new(&self.ctx, OP);
        let m = rec.words(&words);
        let counts = rec.scratch(padded_bytes(n, 4));
        rec.dispatch(
            ShaderId::CountAbove,
            StorageVariant::F32,
            &[],
            &[&m, &x.raw, &counts],
            words[0],
        )?;
        let staging = rec.readback(&counts, (n * 4) as u64);
        rec.submit()?;
        let bytes = self.ctx.map_read(&staging, (n * 4) as u64)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }
}
