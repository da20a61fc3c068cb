//! Row normalisers on the GPU: one block per row.

use super::device::CudaBackend;
use super::kernels::{ENTMAX_ROWS, KernelId, SOFTMAX_ROWS};
use super::launch::{Arg, launch};
use super::{CudaBuffer, row_tables, u32_of};
use crate::backend::{EntmaxRowsMeta, NormOps, RowsMeta};
use crate::error::Result;

const ROW_THREADS: u32 = 256;

impl NormOps for CudaBackend {
    fn softmax_rows(
        &self,
        meta: &RowsMeta,
        x: &CudaBuffer<f32>,
        out: &mut CudaBuffer<f32>,
    ) -> Result<()> {
        let (base, len) = row_tables(&meta.rows);
        let (base, len) = (self.upload_u32(&base)?, self.upload_u32(&len)?);
        launch(
            self,
            KernelId::SoftmaxRows,
            SOFTMAX_ROWS,
            (u32_of(meta.rows.num_segments()), 1, 1),
            ROW_THREADS,
            &mut [
                Arg::In(&x.data),
                Arg::Out(&mut out.data),
                Arg::In(&base),
                Arg::In(&len),
            ],
        )
    }

    fn entmax_rows(
        &self,
        meta: &EntmaxRowsMeta,
        x: &CudaBuffer<f32>,
        out: &mut CudaBuffer<f32>,
    ) -> Result<()> {
        let (base, len) = row_tables(&meta.rows);
        let (base, len) = (self.upload_u32(&base)?, self.upload_u32(&len)?);
        let alphas = self.upload_f32(&meta.alphas)?;
        launch(
            self,
            KernelId::EntmaxRows,
            ENTMAX_ROWS,
            (u32_of(meta.rows.num_segments()), 1, 1),
            ROW_THREADS,
            &mut [
                Arg::In(&x.data),
                Arg::Out(&mut out.data),
                Arg::In(&base),
                Arg::In(&len),
                Arg::In(&alphas),
                Arg::Null,
            ],
        )
    }
}
