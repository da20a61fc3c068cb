//! Host buffers for KV rows, backed by transparent huge pages where the OS
//! offers them.
//!
//! Decode streams (dense) or gathers (index lists) rows of a cache of tens
//! to hundreds of MiB. On 4 KiB pages every 4 KiB of rows costs a TLB entry,
//! and a gathered row usually costs a page walk (two-dimensional, so several
//! memory reads, inside a virtual machine). On Linux, [`kv_buffer`] and
//! [`kv_buffer_from`] ask the kernel to back a buffer with 2 MiB pages
//! (`madvise(MADV_HUGEPAGE)`, honoured when
//! `/sys/kernel/mm/transparent_hugepage/enabled` is `madvise` or `always`)
//! before its pages are first touched. On the development machine this
//! saved 7 % of single-thread f32 dense decode time and 6 % of a 256 MiB
//! copy's (`docs/results.md`, the decode bench). Elsewhere, or when the
//! kernel declines, they are plain `Vec`s.
//!
//! [`Cpu::zeros`](crate::Backend::zeros) and
//! [`Cpu::upload`](crate::Backend::upload) (and so [`KvCache`](crate::cache::KvCache)
//! on the CPU) use them; engines that own their KV memory can call them too,
//! or [`advise_huge_pages`] on memory they have allocated but not yet
//! written.

use crate::dtype::Element;
use crate::error::{Error, Result};

/// Buffers smaller than this stay as they are (they cannot hold an aligned
/// 2 MiB page with room to spare).
pub const HUGE_PAGE_MIN_BYTES: usize = 4 << 20;

/// A zeroed buffer of `len` elements, advised for huge pages when at least
/// [`HUGE_PAGE_MIN_BYTES`] long. The memory comes zeroed from the
/// allocator (`calloc`), so for large buffers pages are only committed when
/// first written, in 2 MiB steps: capacity that is never used costs no RAM.
/// Fails with [`Error::Device`] when the allocation fails.
pub fn kv_buffer<T: Element>(len: usize) -> Result<Vec<T>> {
    let mut v: Vec<T> = bytemuck::allocation::try_zeroed_vec(len).map_err(|()| oom::<T>(len))?;
    if size_of_val(v.as_slice()) >= HUGE_PAGE_MIN_BYTES {
        advise_huge_pages(&mut v);
    }
    Ok(v)
}

/// A copy of `data`, advised for huge pages (before it is written) when at
/// least [`HUGE_PAGE_MIN_BYTES`] long. Fails with [`Error::Device`] when
/// the allocation fails.
pub fn kv_buffer_from<T: Element>(data: &[T]) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(data.len())
        .map_err(|_| oom::<T>(data.len()))?;
    if size_of_val(data) >= HUGE_PAGE_MIN_BYTES {
        let spare = v.spare_capacity_mut();
        advise_range(spare.as_mut_ptr().cast::<u8>(), size_of_val(data));
    }
    v.extend_from_slice(data);
    Ok(v)
}

fn oom<T>(len: usize) -> Error {
    Error::Device {
        backend: "cpu",
        reason: format!("cannot allocate {len} elements of {} bytes", size_of::<T>()),
    }
}

/// Asks the OS to back the whole 4 KiB pages inside `buf` with transparent
/// huge pages. Best used before the memory is first written: pages already
/// faulted in stay small until the kernel collapses them in the background.
/// Returns whether the advice was accepted (`false` off Linux, for ranges
/// without a whole page, or when transparent huge pages are disabled).
/// Contents are never changed.
pub fn advise_huge_pages<T>(buf: &mut [T]) -> bool {
    advise_range(buf.as_mut_ptr().cast::<u8>(), size_of_val(buf))
}

#[cfg(target_os = "linux")]
fn advise_range(ptr: *mut u8, bytes: usize) -> bool {
    const PAGE: usize = 4096;
    /// `MADV_HUGEPAGE` from `<linux/mman.h>` (the same on every architecture).
    const MADV_HUGEPAGE: i32 = 14;
    unsafe extern "C" {
        /// `int madvise(void *addr, size_t length, int advice)` from the C
        /// library that std already links.
        fn madvise(addr: *mut u8, length: usize, advice: i32) -> i32;
    }
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + bytes) & !(PAGE - 1);
    if end <= start {
        return false;
    }
    // SAFETY: `[start, end)` is page-aligned and lies inside one live
    // allocation the caller holds a unique borrow of. MADV_HUGEPAGE only
    // changes how the kernel backs those pages, never their contents or
    // their mapping, so no Rust reference observes any change.
    unsafe { madvise(start as *mut u8, end - start, MADV_HUGEPAGE) == 0 }
}

#[cfg(not(target_os = "linux"))]
fn advise_range(_ptr: *mut u8, _bytes: usize) -> bool {
    false
}
