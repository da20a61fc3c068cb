//! The one kernel launch of the CUDA backend: on a device through the driver (the single
//! `unsafe` driver launch), or on the CPU through the SIMT simulator (feature `cuda-sim`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::device::{CudaBackend, DeviceBytes, Engine};
use super::kernels::KernelId;
use crate::error::Result;

/// One kernel argument. Device buffers travel as bytes; the kernel reinterprets them as its
/// parameter types.
pub(crate) enum Arg<'a> {
    /// A buffer the kernel reads.
    In(&'a DeviceBytes),
    /// A buffer the kernel writes (and may read).
    Out(&'a mut DeviceBytes),
    /// A null pointer (optional outputs).
    Null,
    /// A `u32` scalar.
    U32(u32),
    /// An `f32` scalar.
    F32(f32),
}

impl<'a> Arg<'a> {
    /// An optional input: the buffer, or a null pointer.
    pub(crate) fn opt_in(x: Option<&'a DeviceBytes>) -> Self {
        x.map_or(Arg::Null, Arg::In)
    }
    /// An optional output: the buffer, or a null pointer.
    pub(crate) fn opt_out(x: Option<&'a mut DeviceBytes>) -> Self {
        x.map_or(Arg::Null, Arg::Out)
    }
}

static NULL_PTR: u64 = 0;

/// Launches `name` from module `id` with `grid` blocks of `block` threads, on the backend's
/// device or simulator, and records the name for [`CudaBackend::launched_kernels`].
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
    match be.engine() {
        Engine::Driver { .. } => driver_launch(be, id, name, grid, block, args)?,
        #[cfg(feature = "cuda-sim")]
        Engine::Sim => super::sim::launch(name, grid, (block, 1, 1), args)?,
    }
    be.record_launch(name);
    Ok(())
}

fn driver_launch(
    be: &CudaBackend,
    id: KernelId,
    name: &'static str,
    grid: (u32, u32, u32),
    block: u32,
    args: &mut [Arg<'_>],
) -> Result<()> {
    let f = be.function(id, name)?;
    let stream = be.stream()?;
    let mut b = stream.launch_builder(&f);
    for a in args.iter_mut() {
        match a {
            Arg::In(DeviceBytes::Driver(s)) => b.arg(s),
            Arg::Out(DeviceBytes::Driver(s)) => b.arg(s),
            Arg::Null => b.arg(&NULL_PTR),
            Arg::U32(x) => b.arg(&*x),
            Arg::F32(x) => b.arg(&*x),
            #[cfg(feature = "cuda-sim")]
            Arg::In(_) | Arg::Out(_) => return Err(super::device::foreign_buffer()),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: `args` matches the kernel's C signature in number, order and type (pointers
    // for buffers, 8-byte null for optional pointers, u32/f32 scalars by value): each call
    // site mirrors the `extern "C"` declaration of its `cuda/<stem>.cu` entry (the
    // simulator checks this at every launch). Every index a kernel forms stays inside the
    // buffers: the grid covers exactly the rows / work units / elements the host tables
    // describe, kernels guard their ragged tails, and the tables come from descriptors
    // `kvsieve::ops` validated (segments inside K/V, page maps built from page tables whose
    // rows lie inside the K/V pools, index lists and masks inside their segments, buffer
    // lengths checked). All buffers are live for the duration of the
    // launch and cudarc orders their later frees after the kernel.
    unsafe { b.launch(cfg) }.map_err(super::device::driver_err)?;
    Ok(())
}
