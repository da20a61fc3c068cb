//! CUDA backend (feature `cuda`): cudarc with dynamic loading, kernels compiled at run time
//! with NVRTC.
//!
//! | piece | where |
//! |---|---|
//! | context, stream, per-device module cache | [`CudaBackend`] (`device.rs`) |
//! | kernel sources and entry names | [`kernels`] (`cuda/<stem>.cu` + `cuda/common.cuh`) |
//! | the one launch point (the `unsafe` driver launch, or the simulator) | `launch.rs` |
//! | the CPU SIMT simulator (feature `cuda-sim`): buffers, launches, its detector tests | `sim.rs` (+ `cuda/sim/`, `build.rs`) |
//! | ops | `norm.rs`, `score.rs`, `select.rs`, `cache_ops.rs`, `attn.rs`, `entmax_attn.rs` |
//!
//! Building needs no toolkit and no GPU. At run time [`CudaBackend::new`] needs `libcuda`
//! (the driver) and `libnvrtc` (for example from the `nvidia-cuda-nvrtc-cu12` wheel, on
//! `LD_LIBRARY_PATH`) and returns [`crate::Error::NoDevice`] otherwise. See `docs/cuda.md`.
//!
//! Storage dtypes f32, f16 and bf16; every sum in f32 (f64 inside threshold searches).
//! Small metadata (index lists, masks, work tables) is uploaded per call.

mod attn;
mod cache_ops;
mod device;
mod entmax_attn;
pub mod kernels;
mod launch;
mod norm;
mod score;
mod select;
#[cfg(feature = "cuda-sim")]
mod sim;

pub use device::{CudaBackend, CudaBuffer};
pub use kernels::KernelId;

use crate::backend::Backend;
use crate::dtype::Element;
use crate::error::Result;

impl Backend for CudaBackend {
    type Buffer<T: Element> = CudaBuffer<T>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn upload<T: Element>(&self, data: &[T]) -> Result<CudaBuffer<T>> {
        let bytes = self.upload_bytes(bytemuck::cast_slice(data))?;
        Ok(self.buffer(bytes, data.len()))
    }

    fn download<T: Element>(&self, buf: &CudaBuffer<T>) -> Result<Vec<T>> {
        let bytes = self.download_bytes(&buf.data, buf.len() * size_of::<T>())?;
        Ok(device::pod_vec(&bytes))
    }

    fn zeros<T: Element>(&self, len: usize) -> Result<CudaBuffer<T>> {
        let bytes = self.scratch(len * size_of::<T>())?;
        Ok(self.buffer(bytes, len))
    }

    fn buffer_len<T: Element>(&self, buf: &CudaBuffer<T>) -> usize {
        buf.len()
    }

    fn synchronize(&self) -> Result<()> {
        self.wait()
    }
}

/// Row tables of a ragged partition: `(base, len)` per row.
pub(crate) fn row_tables(rows: &crate::layout::Ragged) -> (Vec<u32>, Vec<u32>) {
    let ip = rows.indptr();
    let base = ip[..ip.len() - 1].to_vec();
    let len = ip.windows(2).map(|w| w[1] - w[0]).collect();
    (base, len)
}

/// `u32` of a host-side count the validated descriptors already bound by `u32`.
pub(crate) fn u32_of(x: usize) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}
