//! Selection on the GPU: radix-select top-k and threshold counts, one block per row.

use super::device::CudaBackend;
use super::kernels::{COUNT_ABOVE, KernelId, TOPK_ROWS};
use super::launch::{Arg, launch};
use super::{CudaBuffer, row_tables, u32_of};
use crate::backend::{RowsMeta, SelectOps, TopkMeta};
use crate::error::Result;
use crate::layout::{IndexList, Ragged};

const ROW_THREADS: u32 = 256;

impl SelectOps for CudaBackend {
    fn topk_rows(&self, meta: &TopkMeta, x: &CudaBuffer<f32>) -> Result<IndexList> {
        let rows = meta.rows.num_segments();
        let k = meta.k.min(meta.rows.max_len());
        let (base, len) = row_tables(&meta.rows);
        let counts: Vec<u32> = len.iter().map(|&l| l.min(u32_of(k))).collect();
        let mut sel = self.scratch(rows * k * 4)?;
        if k > 0 {
            let (base, len) = (self.upload_u32(&base)?, self.upload_u32(&len)?);
            launch(
                self,
                KernelId::TopkRows,
                TOPK_ROWS,
                (u32_of(rows), 1, 1),
                ROW_THREADS,
                &mut [
                    Arg::In(&x.data),
                    Arg::In(&base),
                    Arg::In(&len),
                    Arg::U32(u32_of(k)),
                    Arg::Out(&mut sel),
                ],
            )?;
        }
        let all = self.download_u32(&sel, rows * k)?;
        let mut indices = Vec::with_capacity(counts.iter().map(|&c| c as usize).sum());
        for (r, &c) in counts.iter().enumerate() {
            indices.extend_from_slice(&all[r * k..r * k + c as usize]);
        }
        IndexList::new(
            meta.scope,
            Ragged::from_lens(&counts)?.indptr().to_vec(),
            indices,
        )
    }

    fn count_above(
        &self,
        meta: &RowsMeta,
        x: &CudaBuffer<f32>,
        threshold: f32,
    ) -> Result<Vec<u32>> {
        let rows = meta.rows.num_segments();
        let (base, len) = row_tables(&meta.rows);
        let (base, len) = (self.upload_u32(&base)?, self.upload_u32(&len)?);
        let mut counts = self.scratch(rows * 4)?;
        launch(
            self,
            KernelId::CountAbove,
            COUNT_ABOVE,
            (u32_of(rows), 1, 1),
            ROW_THREADS,
            &mut [
                Arg::In(&x.data),
                Arg::In(&base),
                Arg::In(&len),
                Arg::F32(threshold),
                Arg::Out(&mut counts),
            ],
        )?;
        self.download_u32(&counts, rows)
    }
}
