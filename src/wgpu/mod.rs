//! The WGSL backend (feature `wgpu`): every op as a compute shader.
//!
//! - [`Wgpu::new`] opens the first adapter wgpu finds (Vulkan, Metal, DX12;
//!   Mesa's lavapipe on a machine without a GPU) and returns
//!   [`Error::NoDevice`](crate::Error::NoDevice) when there is none.
//! - Shaders live in `shaders/<stem>.wgsl` (same stems as the ops), embedded
//!   with `include_str!` ([`shaders`]); pipelines are cached by (shader, entry
//!   point, storage variant, override constants) and specialised with
//!   pipeline-overridable constants (workgroup size, iteration cap,
//!   restriction kind, normaliser, α fast paths).
//! - Each op records its dispatches into one command encoder and submits
//!   once (a decode step is one submission); metadata and scratch buffers
//!   come from a small pool and are reused across calls.
//! - Storage: f32 as is; f16 through `shader-f16` where the adapter has it,
//!   else unpacked from `u32` words with `unpack2x16float`; bf16 unpacked from
//!   `u32` words. 16-bit buffers are padded to whole words. Shaders accumulate
//!   in f32 and write f32; a `pack` pass rounds to the storage dtype (round to
//!   nearest even, as `half`).
//! - Attention evidence (decode weights, logits, statistics; prefill column
//!   sums and windows), `value_distances` and the cache ops run on the
//!   device, in the op's one submission, with no download.
//! - What is not supported yet is listed in [`gaps::GAPS`] and returns
//!   [`Error::Unsupported`](crate::Error::Unsupported).
//!
//! See `docs/wgpu.md` for the design, numerics and the test setup.

mod attn;
mod cache_ops;
mod device;
mod entmax_attn;
pub mod gaps;
mod norm;
mod score;
mod select;
pub mod shaders;

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

pub use wgpu::naga;

use crate::backend::Backend;
use crate::dtype::Element;
use crate::error::Result;
use device::{Context, STORAGE, padded_bytes};

/// Options of [`Wgpu::with_options`].
#[derive(Clone, Copy, Debug)]
pub struct WgpuOptions {
    /// Use native f16 storage (`shader-f16`) when the adapter has it
    /// (default `true`); `false` forces the `u32`-word fallback.
    pub shader_f16: bool,
}

impl Default for WgpuOptions {
    fn default() -> Self {
        Self { shader_f16: true }
    }
}

/// The WGSL backend. Cloning is cheap (the device is shared).
#[derive(Clone)]
pub struct Wgpu {
    ctx: Arc<Context>,
}

impl fmt::Debug for Wgpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wgpu")
            .field("adapter", &self.ctx.info.name)
            .field("backend", &self.ctx.info.backend)
            .field("native_f16", &self.ctx.native_f16)
            .finish()
    }
}

impl Wgpu {
    /// Opens the default adapter with default options.
    pub fn new() -> Result<Self> {
        Self::with_options(WgpuOptions::default())
    }

    /// Opens the default adapter.
    pub fn with_options(opts: WgpuOptions) -> Result<Self> {
        Ok(Self {
            ctx: Arc::new(Context::open(opts.shader_f16)?),
        })
    }

    /// The adapter in use.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.ctx.info
    }

    /// Whether f16 storage is read natively (`shader-f16`).
    pub fn native_f16(&self) -> bool {
        self.ctx.native_f16
    }

    /// The wgpu device (to share it with an engine).
    pub fn device(&self) -> &wgpu::Device {
        &self.ctx.device
    }

    /// The wgpu queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.ctx.queue
    }
}

/// A device buffer of `len` elements of `T` (16-bit buffers are padded to
/// whole `u32` words).
pub struct WgpuBuffer<T: Element> {
    raw: wgpu::Buffer,
    len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T: Element> WgpuBuffer<T> {
    /// The underlying wgpu buffer (usage `STORAGE | COPY_SRC | COPY_DST`).
    pub fn raw(&self) -> &wgpu::Buffer {
        &self.raw
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the buffer holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T: Element> fmt::Debug for WgpuBuffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgpuBuffer<{}>[{}]", T::DTYPE, self.len)
    }
}

impl Backend for Wgpu {
    type Buffer<T: Element> = WgpuBuffer<T>;

    fn name(&self) -> &'static str {
        "wgpu"
    }

    fn upload<T: Element>(&self, data: &[T]) -> Result<WgpuBuffer<T>> {
        let buf = self.zeros::<T>(data.len())?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.ctx.queue.write_buffer(&buf.raw, 0, &bytes[..whole]);
        }
        if whole < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.ctx.queue.write_buffer(&buf.raw, whole as u64, &tail);
        }
        Ok(buf)
    }

    fn download<T: Element>(&self, buf: &WgpuBuffer<T>) -> Result<Vec<T>> {
        let n = buf.len * std::mem::size_of::<T>();
        let mut out = vec![T::zeroed(); buf.len];
        if n > 0 {
            let bytes = self.ctx.read_bytes(&buf.raw, n as u64)?;
            bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&bytes);
        }
        Ok(out)
    }

    fn zeros<T: Element>(&self, len: usize) -> Result<WgpuBuffer<T>> {
        let size = padded_bytes(len, std::mem::size_of::<T>());
        if size > self.ctx.device.limits().max_buffer_size {
            return Err(crate::error::shape(
                "wgpu::zeros",
                format!("{size} bytes exceed the device's largest buffer"),
            ));
        }
        let raw = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("kvsieve"),
            size,
            usage: STORAGE,
            mapped_at_creation: false,
        });
        Ok(WgpuBuffer {
            raw,
            len,
            _t: PhantomData,
        })
    }

    fn buffer_len<T: Element>(&self, buf: &WgpuBuffer<T>) -> usize {
        buf.len
    }

    fn synchronize(&self) -> Result<()> {
        self.ctx.wait()
    }
}

/// Where a shader writes the f32 results destined for `dst`: `dst` itself for
/// f32 storage, a scratch buffer (packed afterwards by [`pack_into`]) otherwise.
pub(crate) fn out_target<T: Element>(
    rec: &mut device::Rec<'_>,
    dst: &WgpuBuffer<T>,
) -> wgpu::Buffer {
    if T::DTYPE == crate::dtype::DType::F32 {
        dst.raw.clone()
    } else {
        rec.scratch(padded_bytes(dst.len, 4))
    }
}

/// Rounds the f32 values of `wide` into `dst` (no-op for f32 storage, where
/// `wide` is `dst`).
pub(crate) fn pack_into<T: Element>(
    rec: &mut device::Rec<'_>,
    wide: &wgpu::Buffer,
    dst: &WgpuBuffer<T>,
) -> Result<()> {
    if T::DTYPE == crate::dtype::DType::F32 {
        return Ok(());
    }
    let n = device::u32c("pack", dst.len)?;
    let meta = rec.words(&[n]);
    let variant = rec.ctx().variant(T::DTYPE);
    rec.dispatch(
        shaders::ShaderId::Pack,
        variant,
        &[],
        &[&meta, wide, &dst.raw],
        device::groups_for(dst.len.div_ceil(2)),
    )
}

/// `f32` bits of every value.
pub(crate) fn f32_bits(x: &[f32]) -> impl Iterator<Item = u32> + '_ {
    x.iter().map(|v| v.to_bits())
}

/// The α fast path (`ALPHA_MODE`) when every α equals 1.5 or 2.
pub(crate) fn alpha_mode(alphas: &[f32]) -> u32 {
    match alphas.first() {
        Some(&a) if alphas.iter().all(|&b| b == a) && a == 1.5 => 1,
        Some(&a) if alphas.iter().all(|&b| b == a) && a == 2.0 => 2,
        _ => 0,
    }
}
