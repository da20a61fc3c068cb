//! The single `unsafe` kernel launch of the CUDA backend.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::device::CudaBackend;
use super::kernels::KernelId;
use crate::error::Result;

/// One kernel argument. Device buffers travel as byte slices (`CudaSlice<u8>`); the kernel
/// reinterprets them as its parameter types.
pub(crate) enum Arg<'a> {
    /// A buffer the kernel reads.
    In(&'a CudaSlice<u8>),
    /// A buffer the kernel writes (and may read).
    Out(&'a mut CudaSlice<u8>),
    /// A null pointer (optional outputs).
    Null,
    /// A `u32` scalar.
    U32(u32),
    /// An `f32` scalar.
    F32(f32),
}

static NULL_PTR: u64 = 0;

/// Launches `name` from module `id` with `grid` blocks of `block` threads.
///
/// The caller (the op implementations of this backend) guarantees the invariant stated in
/// the SAFETY comment below; every call site builds `args` from descriptors that
/// `kvsieve::ops` validated.
pub(crate) fn launch(
    be: &CudaBackend,
    id: KernelId,
    name: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    args: &mut [Arg<'_>],
) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(());
    }
    let f = be.function(id, name)?;
    let stream = be.stream();
    let mut b = stream.launch_builder(&f);
    for a in args.iter_mut() {
        match a {
            Arg::In(s) => b.arg(*s),
            Arg::Out(s) => b.arg(&mut **s),
            Arg::Null => b.arg(&NULL_PTR),
            Arg::U32(x) => b.arg(&*x),
            Arg::F32(x) => b.arg(&*x),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `args` matches the kernel's C signature in number, order and type (pointers
    // for buffers, 8-byte null for optional pointers, u32/f32 scalars by value): each call
    // site mirrors the `extern "C"` declaration of its `cuda/<stem>.cu` entry. Every index a
    // kernel forms stays inside the buffers: the grid covers exactly the rows / work units
    // / elements the host tables describe, kernels guard their ragged tails, and the tables
    // come from descriptors `kvsieve::ops` validated (segments inside K/V, index lists and
    // masks inside their segments, buffer lengths checked). All buffers are live for the
    // duration of the launch and cudarc orders their later frees after the kernel.
    unsafe { b.launch(cfg) }.map_err(super::device::driver_err)?;
    Ok(())
}
