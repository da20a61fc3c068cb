//! `softmax_rows`, `entmax_rows`: one workgroup per row.

use crate::backend::{EntmaxRowsMeta, NormOps, RowsMeta};
use crate::dtype::DType;
use crate::error::Result;

use super::device::{Rec, u32c};
use super::shaders::{ShaderId, StorageVariant};
use super::{Wgpu, WgpuBuffer, alpha_mode, f32_bits};

impl NormOps for Wgpu {
    fn softmax_rows(
        &self,
        meta: &RowsMeta,
        x: &WgpuBuffer<f32>,
        out: &mut WgpuBuffer<f32>,
    ) -> Result<()> {
        const OP: &str = "softmax_rows";
        let rows = meta.rows();
        let n = u32c(OP, rows.num_segments())?;
        let mut words = vec![n];
        words.extend_from_slice(rows.indptr());
        let mut rec = Rec::new(&self.ctx, OP);
        let m = rec.words(&words);
        rec.dispatch(
            ShaderId::SoftmaxRows,
            StorageVariant::F32,
            &[],
            &[&m, &x.raw, &out.raw],
            n,
        )?;
        rec.submit()
    }

    fn entmax_rows(
        &self,
        meta: &EntmaxRowsMeta,
        x: &WgpuBuffer<f32>,
        out: &mut WgpuBuffer<f32>,
    ) -> Result<()> {
        const OP: &str = "entmax_rows";
        let _ = DType::F32;
        let rows = meta.rows();
        let n = u32c(OP, rows.num_segments())?;
        let mut words = vec![n];
        words.extend_from_slice(rows.indptr());
        words.extend(f32_bits(meta.alphas()));
        let mut rec = Rec::new(&self.ctx, OP);
        let m = rec.words(&words);
        rec.dispatch(
            ShaderId::EntmaxRows,
            StorageVariant::F32,
            &[("ALPHA_MODE", alpha_mode(meta.alphas()))],
            &[&m, &x.raw, &out.raw],
            n,
        )?;
        rec.submit()
    }
}
