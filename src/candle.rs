//! candle integration (feature `candle`): kvsieve's attention ops and a
//! [`Session`] on [candle](https://github.com/huggingface/candle) [`Tensor`]s.
//!
//! | piece | what |
//! |---|---|
//! | [`CandleSession`] | a [`Session`] whose layer inputs and outputs are tensors: cache, policy and attention for every layer |
//! | [`decode_attention`], [`prefill_attention`] | the attention ops of [`crate::ops`] on tensors |
//! | [`with_host_vec`], [`borrows_storage`] | a tensor's elements as a host `Vec<T>`, borrowed when possible |
//! | [`TensorBackend`] | how a backend takes tensors in and hands tensors out (implemented for every backend) |
//! | [`CandleElement`], [`dtype`] | `f32`, `f16`, `bf16` on both sides |
//!
//! Layouts are kvsieve's (`docs/layouts.md`): queries `[tokens, Hq, D]`,
//! new keys and values `[tokens, Hkv, D]`, token-major with the sequences of
//! a batch in order (any tensor shape with that element order works, e.g.
//! `[tokens, Hq·D]` straight out of a projection); outputs come back as
//! `[tokens, Hq, D]` tensors on the device of the queries. Tensors must have
//! the element type of the session (`T`); nothing is converted silently.
//!
//! # Copies
//!
//! - **CPU tensors in** ([`cpu::Cpu`](crate::cpu::Cpu),
//!   [`Reference`](crate::reference::Reference)): zero-copy when the tensor
//!   is contiguous and is its whole storage (offset 0, every element), which
//!   is what a matmul, `reshape` or `contiguous` returns. kvsieve's host
//!   buffers are `Vec<T>` and candle keeps a CPU tensor's elements in a
//!   `Vec<T>` ([`candle_core::CpuStorage`]), so the tensor's own vector is
//!   borrowed, read-locked, for the duration of the call. A view into a
//!   larger storage (`narrow` of a fused QKV projection, a transpose) is
//!   copied once into a fresh vector: kvsieve's ops take whole buffers, not
//!   sub-slices. [`borrows_storage`] says which path a tensor takes.
//! - **CPU tensors out**: zero-copy; the attention output vector becomes the
//!   tensor's storage ([`Tensor::from_vec`]).
//! - **GPU backends** ([`wgpu::Wgpu`](crate::wgpu::Wgpu) with feature
//!   `wgpu`, [`cuda::CudaBackend`](crate::cuda::CudaBackend) with feature
//!   `cuda`): the inputs are uploaded from host memory and the outputs
//!   downloaded (one copy each way per call).
//! - **candle CUDA tensors**: zero-copy into kvsieve's CUDA backend is not
//!   possible through the public APIs, for three reasons. (1) candle's CUDA
//!   storage exists only with candle-core's own `cuda` feature, which
//!   compiles its kernels with `nvcc` at build time, and kvsieve must build
//!   with nothing but Rust (`design.md`, decision 10), so the `candle`
//!   feature does not enable it. (2) A kvsieve [`cuda::CudaBuffer`](crate::cuda::CudaBuffer)
//!   owns its device memory and has no public constructor from foreign
//!   memory (candle's `CudaSlice<T>`, even though both crates use cudarc
//!   0.19). (3) The two crates run on different CUDA streams, so sharing
//!   memory would also need an event handshake per call. The cheapest
//!   correct path is the one implemented: tensors on any non-CPU candle
//!   device are copied to the host ([`Tensor::to_device`]), then uploaded
//!   to the kvsieve backend; outputs go back to the queries' device.
//!
//! # Example
//!
//! One layer of a model with 4 query heads on 2 KV heads (head dim 8), H2O
//! keeping 16 tokens per head, on the CPU backend:
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use kvsieve::candle::{CandleSession, SessionConfig, borrows_storage};
//! use kvsieve::policy::{Budget, H2O, H2oConfig};
//! use kvsieve::{HeadGeometry, Ragged, cpu::Cpu};
//!
//! # fn main() -> candle_core::Result<()> {
//! let (hq, hkv, d) = (4, 2, 8);
//! let geom = HeadGeometry::new(hq, hkv, d).map_err(candle_core::Error::wrap)?;
//! let h2o = H2O::new(H2oConfig { budget: Budget::tokens(16).with_recent(4), ..H2oConfig::default() })
//!     .map_err(candle_core::Error::wrap)?;
//! let mut s = CandleSession::<Cpu, f32>::new(Cpu::new(), geom, 1, 1, Box::new(h2o), SessionConfig::default())?;
//!
//! // Prefill a 40-token prompt: q [40, Hq, D], k and v [40, Hkv, D].
//! let dev = Device::Cpu;
//! let q = Tensor::randn(0f32, 1.0, (40, hq, d), &dev)?;
//! let k = Tensor::randn(0f32, 1.0, (40, hkv, d), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (40, hkv, d), &dev)?;
//! assert!(borrows_storage::<f32>(&q)); // read in place, no copy
//! let rows = Ragged::uniform(1, 40).map_err(candle_core::Error::wrap)?;
//! let out = s.prefill_chunk_layer(0, &rows, &q, &k, &v, true)?;
//! s.end_prefill_chunk();
//! assert_eq!(out.dims(), &[40, hq, d]);
//!
//! // One decode step: q [1, Hq·D] (a projection's output shape works too).
//! let q = Tensor::randn(0f32, 1.0, (1, hq * d), &dev)?;
//! let k = Tensor::randn(0f32, 1.0, (1, hkv * d), &dev)?;
//! let v = Tensor::randn(0f32, 1.0, (1, hkv * d), &dev)?;
//! let (out, _selection) = s.decode_layer(0, &q, &k, &v)?;
//! s.end_decode_step();
//! assert_eq!(out.dims(), &[1, hq, d]);
//! // H2O evicted down to its budget: 16 tokens per KV head.
//! let lens = s.session().cache().layer(0).map_err(candle_core::Error::wrap)?.segments().lens().to_vec();
//! assert_eq!(lens, [16, 16]);
//! # Ok(()) }
//! ```
//!
//! `examples/gguf_llama` is a whole model built this way (quantized weights
//! and matmuls from candle, attention, KV cache and policy from kvsieve);
//! `docs/candle.md` walks through it.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use half::{bf16, f16};

// The one place this module names the session types (they may move).
use crate::attention::LayerInput;
pub use crate::attention::{Session, SessionConfig};

use crate::backend::Ops;
use crate::dtype::Element;
use crate::layout::{HeadGeometry, IndexList, Ragged};
use crate::ops::{self, DecodeParams, PrefillParams};
use crate::policy::KvPolicy;

type Result<T> = candle_core::Result<T>;

/// A kvsieve error as a candle error (the original is kept as its source).
fn wrap(e: crate::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// Storage element types shared by kvsieve and candle.
pub trait CandleElement: Element + candle_core::WithDType {
    /// The vector of a CPU storage, when it holds this type.
    fn cpu_vec(s: &CpuStorage) -> Option<&Vec<Self>>;
}

impl CandleElement for f32 {
    fn cpu_vec(s: &CpuStorage) -> Option<&Vec<f32>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl CandleElement for f16 {
    fn cpu_vec(s: &CpuStorage) -> Option<&Vec<f16>> {
        match s {
            CpuStorage::F16(v) => Some(v),
            _ => None,
        }
    }
}

impl CandleElement for bf16 {
    fn cpu_vec(s: &CpuStorage) -> Option<&Vec<bf16>> {
        match s {
            CpuStorage::BF16(v) => Some(v),
            _ => None,
        }
    }
}

/// The kvsieve storage dtype of a candle dtype (`None` for the types kvsieve
/// does not store).
pub fn dtype(d: candle_core::DType) -> Option<crate::DType> {
    match d {
        candle_core::DType::F32 => Some(crate::DType::F32),
        candle_core::DType::F16 => Some(crate::DType::F16),
        candle_core::DType::BF16 => Some(crate::DType::BF16),
        _ => None,
    }
}

fn check_dtype<T: CandleElement>(t: &Tensor) -> Result<()> {
    let want = <T as candle_core::WithDType>::DTYPE;
    if t.dtype() != want {
        candle_core::bail!(
            "kvsieve::candle: a {:?} tensor where {:?} is expected (convert with `to_dtype`)",
            t.dtype(),
            want
        );
    }
    Ok(())
}

/// Whether [`with_host_vec`] borrows `t`'s own storage (zero-copy) rather
/// than copying: a CPU tensor of element type `T`, contiguous, covering its
/// whole storage.
pub fn borrows_storage<T: CandleElement>(t: &Tensor) -> bool {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cpu) => T::cpu_vec(cpu).is_some_and(|v| {
            layout.is_contiguous()
                && layout.start_offset() == 0
                && v.len() == layout.shape().elem_count()
        }),
        _ => false,
    }
}

/// Calls `f` with the elements of `t` in row-major order as a host vector:
/// `t`'s own storage when [`borrows_storage`] (zero-copy; the storage is
/// read-locked while `f` runs), otherwise a contiguous host copy. Errors
/// when `t` is not of element type `T`.
pub fn with_host_vec<T: CandleElement, R>(t: &Tensor, f: impl FnOnce(&Vec<T>) -> R) -> Result<R> {
    check_dtype::<T>(t)?;
    {
        let (storage, layout) = t.storage_and_layout();
        if let Storage::Cpu(cpu) = &*storage
            && let Some(v) = T::cpu_vec(cpu)
            && layout.is_contiguous()
            && layout.start_offset() == 0
            && v.len() == layout.shape().elem_count()
        {
            return Ok(f(v));
        }
    }
    let v: Vec<T> = t.to_device(&Device::Cpu)?.flatten_all()?.to_vec1()?;
    Ok(f(&v))
}

/// How a backend takes candle tensors in and hands tensors out. Implemented
/// for every backend of the crate (see the module docs for the copies each
/// one makes).
pub trait TensorBackend: Ops + Clone {
    /// Calls `f` with `t` as a buffer of this backend.
    fn with_buffer<T: CandleElement, R>(
        &self,
        t: &Tensor,
        f: impl FnOnce(&Self::Buffer<T>) -> R,
    ) -> Result<R>;
    /// A tensor of `shape` on `device` holding `buf`.
    fn to_tensor<T: CandleElement>(
        &self,
        buf: Self::Buffer<T>,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor>;
}

/// Host backends (buffers are `Vec<T>`): borrow in, move out.
macro_rules! host_backend {
    ($ty:ty) => {
        impl TensorBackend for $ty {
            fn with_buffer<T: CandleElement, R>(
                &self,
                t: &Tensor,
                f: impl FnOnce(&Vec<T>) -> R,
            ) -> Result<R> {
                with_host_vec(t, f)
            }
            fn to_tensor<T: CandleElement>(
                &self,
                buf: Vec<T>,
                shape: &[usize],
                device: &Device,
            ) -> Result<Tensor> {
                Tensor::from_vec(buf, shape, device)
            }
        }
    };
}

host_backend!(crate::reference::Reference);
host_backend!(crate::cpu::Cpu);

/// Device backends: upload from the host, download to the host.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
macro_rules! device_backend {
    ($ty:ty) => {
        impl TensorBackend for $ty {
            fn with_buffer<T: CandleElement, R>(
                &self,
                t: &Tensor,
                f: impl FnOnce(&Self::Buffer<T>) -> R,
            ) -> Result<R> {
                let buf = with_host_vec(t, |v: &Vec<T>| crate::Backend::upload(self, v))?
                    .map_err(wrap)?;
                Ok(f(&buf))
            }
            fn to_tensor<T: CandleElement>(
                &self,
                buf: Self::Buffer<T>,
                shape: &[usize],
                device: &Device,
            ) -> Result<Tensor> {
                let v = crate::Backend::download(self, &buf).map_err(wrap)?;
                Tensor::from_vec(v, shape, device)
            }
        }
    };
}

#[cfg(feature = "wgpu")]
device_backend!(crate::wgpu::Wgpu);
#[cfg(feature = "cuda")]
device_backend!(crate::cuda::CudaBackend);

/// `[tokens, heads, d]` for an output of `len` elements.
fn out_shape(len: usize, heads: usize, d: usize) -> [usize; 3] {
    [len / (heads * d).max(1), heads, d]
}

/// [`ops::decode_attention`] on tensors: `q` `[batch, Hq, D]`, `k`, `v` the
/// cache rows the segments of `p` cover; returns `[batch, Hq, D]` on `q`'s
/// device.
pub fn decode_attention<B: TensorBackend, T: CandleElement>(
    b: &B,
    p: &DecodeParams<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    let n = q.elem_count();
    let mut out = b.zeros::<T>(n).map_err(wrap)?;
    b.with_buffer(q, |qb| {
        b.with_buffer(k, |kb| {
            b.with_buffer(v, |vb| ops::decode_attention(b, p, qb, kb, vb, &mut out))
        })
    })???
    .map_err(wrap)?;
    let (hq, d) = (p.geom.num_q_heads(), p.geom.head_dim());
    b.to_tensor(out, &out_shape(n, hq, d), q.device())
}

/// [`ops::prefill_attention`] on tensors: `q` `[tokens, Hq, D]`, `k`, `v`
/// the cache rows the segments of `p` cover; returns `[tokens, Hq, D]` on
/// `q`'s device.
pub fn prefill_attention<B: TensorBackend, T: CandleElement>(
    b: &B,
    p: &PrefillParams<'_>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    let n = q.elem_count();
    let mut out = b.zeros::<T>(n).map_err(wrap)?;
    b.with_buffer(q, |qb| {
        b.with_buffer(k, |kb| {
            b.with_buffer(v, |vb| ops::prefill_attention(b, p, qb, kb, vb, &mut out))
        })
    })???
    .map_err(wrap)?;
    let (hq, d) = (p.geom.num_q_heads(), p.geom.head_dim());
    b.to_tensor(out, &out_shape(n, hq, d), q.device())
}

/// A [`Session`] driven with candle tensors: the KV cache, the policy and
/// attention for every layer of a model, one layer at a time (the order of
/// the hooks is the session's).
pub struct CandleSession<B: TensorBackend, T: CandleElement> {
    backend: B,
    geom: HeadGeometry,
    session: Session<B, T>,
}

impl<B: TensorBackend, T: CandleElement> CandleSession<B, T> {
    /// A session for `batch` sequences and `num_layers` layers (see
    /// [`Session::new`]).
    pub fn new(
        backend: B,
        geom: HeadGeometry,
        batch: usize,
        num_layers: usize,
        policy: Box<dyn KvPolicy<B, T>>,
        cfg: SessionConfig,
    ) -> Result<Self> {
        let session =
            Session::new(backend.clone(), geom, batch, num_layers, policy, cfg).map_err(wrap)?;
        Ok(Self {
            backend,
            geom,
            session,
        })
    }

    /// The kvsieve session (its cache, policy and backend).
    pub fn session(&self) -> &Session<B, T> {
        &self.session
    }

    fn run<R>(
        &mut self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        f: impl FnOnce(&mut Session<B, T>, &LayerInput<'_, B, T>) -> crate::Result<R>,
    ) -> Result<R> {
        let (be, session) = (&self.backend, &mut self.session);
        be.with_buffer(q, |q| {
            be.with_buffer(k, |k| {
                be.with_buffer(v, |v| f(session, &LayerInput { q, k, v }))
            })
        })???
        .map_err(wrap)
    }

    fn output(&self, buf: B::Buffer<T>, device: &Device) -> Result<Tensor> {
        let (hq, d) = (self.geom.num_q_heads(), self.geom.head_dim());
        let n = self.backend.buffer_len(&buf);
        self.backend.to_tensor(buf, &out_shape(n, hq, d), device)
    }

    /// One layer's share of a prefill chunk (see
    /// [`Session::prefill_chunk_layer`]): `q` `[tokens, Hq, D]`, `k`, `v`
    /// `[tokens, Hkv, D]`, `q_rows` tokens per sequence. Returns the
    /// attention output `[tokens, Hq, D]` on `q`'s device.
    pub fn prefill_chunk_layer(
        &mut self,
        layer: usize,
        q_rows: &Ragged,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        last: bool,
    ) -> Result<Tensor> {
        let out = self.run(q, k, v, |s, x| {
            s.prefill_chunk_layer(layer, q_rows, x, last)
        })?;
        self.output(out, q.device())
    }

    /// Marks the end of a prefill chunk (see [`Session::end_prefill_chunk`]).
    pub fn end_prefill_chunk(&mut self) {
        self.session.end_prefill_chunk();
    }

    /// One layer of a decode step (see [`Session::decode_layer`]): `q`
    /// `[batch, Hq, D]`, `k`, `v` `[batch, Hkv, D]`. Returns the attention
    /// output `[batch, Hq, D]` on `q`'s device and the selection used
    /// (`None` = every cached token).
    pub fn decode_layer(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Option<IndexList>)> {
        let (out, sel) = self.run(q, k, v, |s, x| s.decode_layer(layer, x))?;
        Ok((self.output(out, q.device())?, sel))
    }

    /// Marks the end of a decode step (see [`Session::end_decode_step`]).
    pub fn end_decode_step(&mut self) {
        self.session.end_decode_step();
    }
}
