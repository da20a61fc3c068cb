//! The CPU backend: runtime-dispatched SIMD ([`isa`], [`simd`]) and rayon.
//!
//! [`Cpu`] implements every op family of [`crate::backend`] for `f32`,
//! `f16` and `bf16` storage (converted in registers, accumulated in `f32`);
//! buffers are `Vec<T>` on the host (large ones backed by huge pages, [`alloc`]).
//!
//! | file | ops |
//! |---|---|
//! | `norm.rs` | `softmax_rows`, `entmax_rows` (Halley–bisection on SIMD threshold sums) |
//! | `score.rs` | `qk_logits` |
//! | `select.rs` | `topk_rows` (partial selection), `count_above` |
//! | `cache_ops.rs` | `gather_rows`, `compact_rows`, `merge_rows` |
//! | `attn.rs` | `decode_attention` (split-K), `decode_attention_paged` (the same over page tables), `prefill_attention` (tiled strips) |
//! | `entmax_attn.rs` | `entmax_prefill`, `entmax_prefill_backward` (block skipping) |
//! | `exact.rs` | the f64 path: logits, normaliser, weights (α outside [1.125, 2], f32 logit overflow) |
//! | `tau.rs` | the threshold searches (f32 SIMD sums; f64 for α outside [1.125, 2]) shared by the normalisers |
//! | `workspace.rs` | reusable scratch buffers (no allocation per decode step) |
//! | `alloc.rs` | KV buffers backed by transparent huge pages ([`alloc`]) |
//!
//! # Parallelism and determinism
//!
//! Work is split into items whose boundaries depend only on the shapes
//! (sequence, KV head, fixed key blocks of [`DECODE_BLOCK`] tokens, fixed
//! query tiles), never on the number of threads. Each item is computed by one
//! thread in a fixed order, and partial results are combined in a fixed
//! order, so every op returns bitwise identical results for any rayon pool
//! size (tested with pools of 1 and 3 threads). Results differ between ISAs
//! in the last bits (vector width changes summation order).
//!
//! # Workspace
//!
//! Scratch memory lives in per-backend pools (`workspace.rs`): a call
//! pops a buffer set (or creates one the first time), grows it if the shapes
//! need more, and pushes it back. After the first call with the largest
//! shape, a decode step performs no heap allocation (tested with a counting
//! allocator in `tests/cpu_alloc.rs`). Concurrent calls on one `Cpu` each get
//! their own buffers.

pub mod alloc;
pub mod isa;
pub mod simd;

mod attn;
mod cache_ops;
mod entmax_attn;
mod exact;
mod norm;
mod score;
mod select;
mod tau;
mod workspace;

pub use attn::DECODE_BLOCK;

use std::fmt;
use std::sync::Arc;

use crate::backend::Backend;
use crate::dtype::Element;
use crate::error::Result;
use isa::Isa;
use workspace::{DecodeWs, Pool};

/// The CPU backend (SIMD + rayon). Buffers are `Vec<T>`.
///
/// ```
/// use kvsieve::cpu::Cpu;
/// let cpu = Cpu::new(); // best detected ISA, global rayon pool
/// assert_eq!(kvsieve::Backend::name(&cpu), "cpu");
/// ```
pub struct Cpu {
    isa: Isa,
    pool: Option<Arc<rayon::ThreadPool>>,
    decode_ws: Pool<DecodeWs>,
    scratch: Pool<Vec<f32>>,
    cands: Pool<norm::Cand>,
}

impl Cpu {
    /// The detected ISA ([`isa::detected`], honouring `KVSIEVE_ISA`) on the
    /// global rayon pool.
    pub fn new() -> Self {
        Self::with_isa(isa::detected())
    }

    /// A given ISA (a proof token from [`isa::available`]) on the global
    /// rayon pool.
    pub fn with_isa(isa: Isa) -> Self {
        Self {
            isa,
            pool: None,
            decode_ws: Pool::default(),
            scratch: Pool::default(),
            cands: Pool::default(),
        }
    }

    /// The detected ISA on a caller-owned rayon pool.
    pub fn with_pool(pool: Arc<rayon::ThreadPool>) -> Self {
        Self::new().pool(pool)
    }

    /// Builder: run on `pool` instead of the global rayon pool.
    pub fn pool(mut self, pool: Arc<rayon::ThreadPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The instruction set the kernels use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Number of threads the kernels may use.
    pub fn num_threads(&self) -> usize {
        match &self.pool {
            Some(p) => p.current_num_threads(),
            None => rayon::current_num_threads(),
        }
    }

    /// Runs `f` inside the backend's pool.
    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(p) => p.install(f),
            None => f(),
        }
    }
}

impl Default for Cpu {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for Cpu {
    /// Same ISA and pool, fresh (empty) workspaces.
    fn clone(&self) -> Self {
        Self {
            isa: self.isa,
            pool: self.pool.clone(),
            decode_ws: Pool::default(),
            scratch: Pool::default(),
            cands: Pool::default(),
        }
    }
}

impl fmt::Debug for Cpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cpu")
            .field("isa", &self.isa)
            .field("threads", &self.num_threads())
            .finish()
    }
}

impl Backend for Cpu {
    type Buffer<T: Element> = Vec<T>;

    fn name(&self) -> &'static str {
        "cpu"
    }
    fn upload<T: Element>(&self, data: &[T]) -> Result<Vec<T>> {
        alloc::kv_buffer_from(data)
    }
    fn download<T: Element>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }
    fn zeros<T: Element>(&self, len: usize) -> Result<Vec<T>> {
        alloc::kv_buffer(len)
    }
    fn host_view<'a, T: Element>(&self, buf: &'a Vec<T>) -> Option<&'a [T]> {
        Some(buf)
    }
    fn buffer_len<T: Element>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
}
