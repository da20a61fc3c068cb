//! The host side of the CPU SIMT simulator (feature `cuda-sim`): buffers in host memory and
//! the launch into the simulator built from `cuda/sim/` by `build.rs`.
//!
//! The simulator runs the kernel sources of `cuda/` compiled with the host C++ compiler. It
//! checks every memory access of kernel code against the buffers of the launch, so a kernel
//! can only touch the bytes this module hands it: reads of the inputs, reads and writes of
//! the outputs. What it checks and what it cannot is in `docs/cuda.md`.

use super::device::DeviceBytes;
use super::launch::Arg;
use crate::error::{Error, Result};

/// Host memory standing in for a device allocation: zeroed, 256-byte aligned like
/// `cuMemAlloc`, with a guard zone on each side that belongs to no other buffer (an overrun
/// is reported as out of bounds of this buffer; it never lands in a neighbour).
pub(crate) struct SimBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl SimBuf {
    /// `len` zero bytes.
    pub(crate) fn zeroed(len: usize) -> Self {
        // Large guard zones cost address space only: `vec![0; n]` maps fresh zero pages.
        let guard = len.clamp(4096, 1 << 26);
        let mem = vec![0u8; len + 2 * guard + 256];
        let pad = (mem.as_ptr() as usize + guard).wrapping_neg() % 256;
        SimBuf {
            mem,
            start: guard + pad,
            len,
        }
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

fn sim_err(reason: String) -> Error {
    Error::Device {
        backend: "cuda",
        reason: format!("cuda-sim: {reason}"),
    }
}

#[cfg(kvsieve_sim)]
mod ffi {
    use std::ffi::c_char;

    /// `KvsimArg` of `cuda/sim/kvsim.cpp`.
    #[repr(C)]
    pub struct KvsimArg {
        pub kind: u32,
        pub buf: i32,
        pub bits: u64,
    }

    /// `KvsimBuf` of `cuda/sim/kvsim.cpp`.
    #[repr(C)]
    pub struct KvsimBuf {
        pub ptr: *mut u8,
        pub len: u64,
        pub writable: u32,
    }

    pub const PARAM_PTR: u32 = 0;
    pub const PARAM_U32: u32 = 1;
    pub const PARAM_F32: u32 = 2;

    // SAFETY (of the declarations): they match the `extern "C"` definitions at the end of
    // `cuda/sim/kvsim.cpp`, which is compiled and linked by `build.rs` whenever
    // `kvsieve_sim` is set.
    unsafe extern "C" {
        pub safe fn kvsim_kernel_count() -> usize;
        pub safe fn kvsim_kernel_name(i: usize) -> *const c_char;
        pub fn kvsim_launch(
            name: *const c_char,
            grid: *const u32,
            block: *const u32,
            args: *const KvsimArg,
            nargs: usize,
            bufs: *const KvsimBuf,
            nbufs: usize,
            err: *mut c_char,
            err_cap: usize,
        ) -> i32;
    }
}

/// `Ok` when this build has the simulator.
pub(crate) fn available() -> Result<()> {
    if cfg!(kvsieve_sim) {
        Ok(())
    } else {
        Err(Error::NoDevice {
            backend: "cuda",
            reason: "this build has no CUDA simulator: no C++ compiler was found when kvsieve \
                     was built with the feature `cuda-sim` (see the build warning)"
                .into(),
        })
    }
}

/// Every kernel of the simulator build (the `__global__` functions of `cuda/*.cu` and of the
/// simulator's test sources `cuda/sim/*.cu`).
#[cfg(kvsieve_sim)]
pub(crate) fn kernel_names() -> Vec<String> {
    (0..ffi::kvsim_kernel_count())
        .map(|i| {
            let p = ffi::kvsim_kernel_name(i);
            assert!(!p.is_null(), "kvsim_kernel_name({i}) out of range");
            // SAFETY: for i below kvsim_kernel_count, kvsim_kernel_name returns a pointer
            // to the NUL-terminated name literal of a launch table row (static storage).
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[cfg(not(kvsieve_sim))]
pub(crate) fn kernel_names() -> Vec<String> {
    Vec::new()
}

/// `Ok` when the simulator build has kernel `name`.
pub(crate) fn has_kernel(name: &str) -> Result<()> {
    available()?;
    if kernel_names().iter().any(|n| n == name) {
        Ok(())
    } else {
        Err(sim_err(format!(
            "no kernel named `{name}` in the simulator build"
        )))
    }
}

/// Runs kernel `name` on the simulator: `grid` blocks of `block` threads, arguments as for a
/// device launch. Fails with the simulator's message (kernel, block, thread, what was wrong)
/// when a check trips.
#[cfg(kvsieve_sim)]
pub(crate) fn launch(
    name: &str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    args: &mut [Arg<'_>],
) -> Result<()> {
    use ffi::*;
    let mut bufs = Vec::with_capacity(args.len());
    let mut list = Vec::with_capacity(args.len());
    for a in args.iter_mut() {
        let (ptr, len, writable) = match a {
            Arg::In(DeviceBytes::Sim(b)) => {
                let s = b.bytes();
                (s.as_ptr().cast_mut(), s.len(), 0)
            }
            Arg::Out(DeviceBytes::Sim(b)) => {
                let s = b.bytes_mut();
                (s.as_mut_ptr(), s.len(), 1)
            }
            Arg::In(DeviceBytes::Driver(_)) | Arg::Out(DeviceBytes::Driver(_)) => {
                return Err(super::device::foreign_buffer());
            }
            Arg::Null => {
                list.push(KvsimArg {
                    kind: PARAM_PTR,
                    buf: -1,
                    bits: 0,
                });
                continue;
            }
            Arg::U32(x) => {
                list.push(KvsimArg {
                    kind: PARAM_U32,
                    buf: -1,
                    bits: u64::from(*x),
                });
                continue;
            }
            Arg::F32(x) => {
                list.push(KvsimArg {
                    kind: PARAM_F32,
                    buf: -1,
                    bits: u64::from(x.to_bits()),
                });
                continue;
            }
        };
        list.push(KvsimArg {
            kind: PARAM_PTR,
            buf: i32::try_from(bufs.len()).unwrap_or(i32::MAX),
            bits: 0,
        });
        bufs.push(KvsimBuf {
            ptr,
            len: len as u64,
            writable,
        });
    }
    let cname = std::ffi::CString::new(name).map_err(|e| sim_err(e.to_string()))?;
    let g = [grid.0, grid.1, grid.2];
    let b = [block.0, block.1, block.2];
    let mut err = vec![0u8; 2048];
    // SAFETY: every pointer is valid for the call: `cname`, `g`, `b`, `list`, `bufs` and `err`
    // are live locals with the lengths passed. Each `KvsimBuf` describes the bytes of a
    // buffer borrowed by `args` for the whole call: shared borrows (`Arg::In`) are marked
    // read-only, exclusive ones (`Arg::Out`) writable, and no buffer appears both ways (the
    // borrow checker forbids it). The simulator runs the launch to completion before it
    // returns and checks every access of kernel code before it happens: an access outside
    // these bytes, or a write to a read-only one, stops the launch with an error instead.
    // The message it writes fits `err` (it truncates to `err.len()`, NUL included).
    let rc = unsafe {
        kvsim_launch(
            cname.as_ptr(),
            g.as_ptr(),
            b.as_ptr(),
            list.as_ptr(),
            list.len(),
            bufs.as_ptr(),
            bufs.len(),
            err.as_mut_ptr().cast(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
    Err(sim_err(String::from_utf8_lossy(&err[..end]).into_owned()))
}

#[cfg(not(kvsieve_sim))]
pub(crate) fn launch(
    _name: &str,
    _grid: (u32, u32, u32),
    _block: (u32, u32, u32),
    _args: &mut [Arg<'_>],
) -> Result<()> {
    available()
}

#[cfg(all(test, kvsieve_sim))]
mod tests;
