//! The decode hot path does not allocate: after a warm-up call, repeated
//! decode steps (dense and index-list, softmax and entmax) are counted with
//! a counting global allocator.
//!
//! The CPU backend's own buffers come from its workspace pool. What may
//! remain is rayon's job injection when a call enters a pool from outside
//! (its lock-free queue allocates a block every few dozen jobs), so the test
//! allows fewer than one allocation per step on average and requires zero
//! on the serial path (a 1-thread pool entered from inside itself, counted
//! on the thread that runs the op). The paged decode is checked on the
//! serial path.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kvsieve::cpu::Cpu;
use kvsieve::ops::{self, DecodeParams};
use kvsieve::*;

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Allocations made by this thread (the serial checks count only the
    /// thread that runs the op, so that the test harness printing another
    /// test's result meanwhile does not count).
    static MINE: Cell<usize> = const { Cell::new(0) };
}

/// Allocations made so far by the calling thread.
fn mine() -> usize {
    MINE.with(Cell::get)
}

fn count() {
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    // `try_with`: no count (and no panic) while the thread is torn down.
    let _ = MINE.try_with(|c| c.set(c.get() + 1));
}

// SAFETY: forwards to the system allocator unchanged; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The allocation counter is global: the tests of this binary take turns.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn decode_steps_do_not_allocate() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let geom = HeadGeometry::new(8, 2, 64).unwrap();
    let segs = Segments::uniform(2, 2, 3000).unwrap();
    let n = segs.rows_needed() * 64;
    let q: Vec<f32> = (0..2 * 8 * 64).map(|i| (i % 7) as f32 * 0.1).collect();
    let k: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 * 0.05).collect();
    let v = k.clone();
    let sets: Vec<IndexSet> = (0..4)
        .map(|_| IndexSet::from_unsorted((0..3000).step_by(3).collect()))
        .collect();
    let list = IndexList::from_sets(Scope::KvHead, &sets).unwrap();
    let soft = Normalizer::Softmax;
    let ent = Normalizer::Entmax { alpha: 1.5 };
    let pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap(),
    );
    let serial = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap(),
    );
    let cases = [
        (&soft, Restrict::Dense),
        (&soft, Restrict::Indices(&list)),
        (&ent, Restrict::Dense),
        (&ent, Restrict::Indices(&list)),
    ];
    let mut out = vec![0.0f32; q.len()];
    let steps = 50;
    // Parallel pool, entered from the test thread.
    let cpu = Cpu::new().pool(pool);
    for (norm, restrict) in cases {
        let p = DecodeParams {
            geom,
            segments: &segs,
            scale: None,
            normalizer: norm,
            restrict,
        };
        ops::decode_attention(&cpu, &p, &q, &k, &v, &mut out).unwrap();
        let before = ALLOCS.load(Ordering::Relaxed);
        for _ in 0..steps {
            ops::decode_attention(&cpu, &p, &q, &k, &v, &mut out).unwrap();
        }
        let per_step = (ALLOCS.load(Ordering::Relaxed) - before) as f64 / steps as f64;
        assert!(
            per_step < 1.0,
            "{norm:?} {restrict:?}: {per_step} allocations per step"
        );
    }
    // Serial: a 1-thread pool entered from its own worker: zero allocations.
    let cpu1 = Cpu::new().pool(serial.clone());
    serial.install(|| {
        for (norm, restrict) in cases {
            let p = DecodeParams {
                geom,
                segments: &segs,
                scale: None,
                normalizer: norm,
                restrict,
            };
            ops::decode_attention(&cpu1, &p, &q, &k, &v, &mut out).unwrap();
            let before = mine();
            for _ in 0..steps {
                ops::decode_attention(&cpu1, &p, &q, &k, &v, &mut out).unwrap();
            }
            let n = mine() - before;
            assert_eq!(
                n, 0,
                "{norm:?} {restrict:?}: {n} allocations in {steps} serial steps"
            );
        }
    });
}

/// The same for paged KV (`decode_attention_paged`, HND and NHD pools with
/// the pages in reverse order): the serial path allocates nothing.
#[test]
fn paged_decode_steps_do_not_allocate() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let geom = HeadGeometry::new(8, 2, 64).unwrap();
    let (p, n) = (16usize, 3000usize);
    let pages = n.div_ceil(p);
    let q: Vec<f32> = (0..2 * 8 * 64).map(|i| (i % 7) as f32 * 0.1).collect();
    let sets: Vec<IndexSet> = (0..4)
        .map(|_| IndexSet::from_unsorted((0..n as u32).step_by(3).collect()))
        .collect();
    let list = IndexList::from_sets(Scope::KvHead, &sets).unwrap();
    let soft = Normalizer::Softmax;
    let ent = Normalizer::Entmax { alpha: 1.5 };
    let serial = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap(),
    );
    let cpu1 = Cpu::new().pool(serial.clone());
    let mut out = vec![0.0f32; q.len()];
    let steps = 20;
    for layout in [PageLayout::Hnd, PageLayout::Nhd] {
        let table = PageTable::new(PageTableParts {
            layout,
            page_size: p,
            num_pages: 2 * pages,
            num_kv_heads: 2,
            scope: PageScope::Sequence,
            page_indptr: vec![0, pages as u32, 2 * pages as u32],
            page_indices: (0..2 * pages as u32).rev().collect(),
            last_page_len: vec![(n - (pages - 1) * p) as u32; 2],
        })
        .unwrap();
        let kv: Vec<f32> = (0..table.rows() * 64)
            .map(|i| ((i * 31) % 17) as f32 * 0.05)
            .collect();
        serial.install(|| {
            for (norm, restrict) in [
                (&soft, Restrict::Dense),
                (&soft, Restrict::Indices(&list)),
                (&ent, Restrict::Dense),
            ] {
                let pp = ops::PagedDecodeParams {
                    geom,
                    pages: &table,
                    scale: None,
                    normalizer: norm,
                    restrict,
                };
                ops::decode_attention_paged(&cpu1, &pp, &q, &kv, &kv, &mut out).unwrap();
                let before = mine();
                for _ in 0..steps {
                    ops::decode_attention_paged(&cpu1, &pp, &q, &kv, &kv, &mut out).unwrap();
                }
                let n = mine() - before;
                assert_eq!(
                    n, 0,
                    "{layout:?} {norm:?} {restrict:?}: {n} allocations in {steps} serial steps"
                );
            }
        });
    }
}
