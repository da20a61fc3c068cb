//! Reusable scratch buffers.
//!
//! A [`Pool`] is a stack of buffer sets behind a mutex. A call takes one set
//! (creating it on first use), grows it to the sizes it needs, and returns it
//! when done; buffers only ever grow, so once the largest shape has been seen
//! a call allocates nothing. Concurrent calls on one backend take different
//! sets, so the mutex is held only for the push and the pop.
#![forbid(unsafe_code)]

use std::sync::Mutex;

/// A stack of reusable `W`s.
#[derive(Debug, Default)]
pub(crate) struct Pool<W> {
    items: Mutex<Vec<W>>,
}

impl<W: Default> Pool<W> {
    /// Runs `f` with a buffer set from the pool (a fresh one if empty).
    pub(crate) fn with<R>(&self, f: impl FnOnce(&mut W) -> R) -> R {
        let mut w = self
            .items
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or_default();
        let r = f(&mut w);
        self.items.lock().unwrap_or_else(|e| e.into_inner()).push(w);
        r
    }
}

/// Grows `v` to at least `n` elements (never shrinks, never reallocates
/// when it is already large enough) and returns the first `n`.
pub(crate) fn grow<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::default());
    }
    &mut v[..n]
}

/// Scratch of one decode call (see `attn.rs` for the layout of `blocks`).
#[derive(Debug, Default)]
pub(crate) struct DecodeWs {
    /// Per key block: header, scores, accumulators.
    pub blocks: Vec<f32>,
    /// Per key block: the gathered token positions (mask restriction),
    /// then, for paged KV, the block's physical rows.
    pub idx: Vec<u32>,
    /// Per unit: the pre-scaled f32 queries.
    pub qs: Vec<f32>,
    /// Per unit: the first block (prefix sums), length `units + 1`.
    pub prefix: Vec<usize>,
    /// Paged KV: the workspace slot of each block (block-major order) and
    /// the block stored at each slot.
    pub slot: Vec<usize>,
    /// See `slot`.
    pub at: Vec<usize>,
    /// Per unit and head: the entmax threshold.
    pub tau: Vec<f32>,
    /// Per unit: the combined f32 output.
    pub comb: Vec<f32>,
    /// Per unit and head: the combine's `(M, L)` (evidence pass).
    pub norm: Vec<f32>,
}
