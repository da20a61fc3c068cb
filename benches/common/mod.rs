//! Shared helpers of the CPU benches: thread pools, a same-run memory copy
//! bandwidth, a peak dot-product rate, manual medians and the summary lines.
#![allow(dead_code)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

/// Bytes of the copy buffers (larger than the last-level cache).
pub const COPY_BYTES: usize = 256 << 20;

/// A rayon pool of `n` threads.
pub fn pool(n: usize) -> Arc<rayon::ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .expect("thread pool"),
    )
}

/// The thread counts benchmarked: 1 and every hardware thread.
pub fn thread_counts() -> Vec<usize> {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    if all > 1 { vec![1, all] } else { vec![1] }
}

/// Median wall time (seconds) of `reps` runs of `f` after one warm-up run.
pub fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut t)
}

/// The copy yardstick of one pool: two [`COPY_BYTES`] buffers, allocated
/// like the KV buffers the kernels read (`kvsieve::cpu::alloc`, huge pages
/// where the OS offers them), copied in one chunk per thread.
pub struct CopyRef {
    pool: Arc<rayon::ThreadPool>,
    src: Vec<f32>,
    dst: Vec<f32>,
}

impl CopyRef {
    pub fn new(pool: Arc<rayon::ThreadPool>) -> Self {
        let n = COPY_BYTES / 4;
        let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let src = kvsieve::cpu::alloc::kv_buffer_from(&src).expect("copy buffer");
        let dst = kvsieve::cpu::alloc::kv_buffer(n).expect("copy buffer");
        Self { pool, src, dst }
    }

    /// The same yardstick on plain `Vec`s (4 KiB pages unless the OS puts
    /// every mapping on huge pages): the baseline of the huge-page case.
    pub fn plain(pool: Arc<rayon::ThreadPool>) -> Self {
        let n = COPY_BYTES / 4;
        let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let dst = vec![1.0f32; n];
        Self { pool, src, dst }
    }

    /// Seconds of one copy of the buffer.
    pub fn once(&mut self) -> f64 {
        let chunk = self.src.len() / self.pool.current_num_threads();
        let (src, dst) = (&self.src, &mut self.dst);
        let s = Instant::now();
        self.pool.install(|| {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(black_box(s)))
        });
        black_box(&self.dst);
        s.elapsed().as_secs_f64()
    }

    /// Seconds of one streaming read of the source buffer (a sum over 16
    /// independent lanes per thread, far below the read rate in
    /// arithmetic): the read ceiling a read-only kernel is held to.
    pub fn read_once(&mut self) -> f64 {
        let chunk = self.src.len() / self.pool.current_num_threads();
        let src = &self.src;
        let s = Instant::now();
        let total: f32 = self.pool.install(|| {
            src.par_chunks(chunk)
                .map(|c| {
                    let mut acc = [0.0f32; 16];
                    for b in black_box(c).chunks_exact(16) {
                        for (a, &x) in acc.iter_mut().zip(b) {
                            *a += x;
                        }
                    }
                    acc.iter().sum::<f32>()
                })
                .sum()
        });
        black_box(total);
        s.elapsed().as_secs_f64()
    }

    /// Bytes copied per second: the median of 7 copies after a warm-up.
    pub fn bandwidth(&mut self) -> f64 {
        self.once();
        let mut t: Vec<f64> = (0..7).map(|_| self.once()).collect();
        COPY_BYTES as f64 / median(&mut t)
    }
}

fn median(t: &mut [f64]) -> f64 {
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// `reps` runs of `f` alternated with `reps` copies (after one warm-up of
/// each): `(median seconds of f, median copy bytes per second)`. On a
/// shared machine whose load drifts, alternating keeps the two medians
/// under the same conditions, so their ratio is steadier than against one
/// copy measured at start-up.
pub fn paired(copy: &mut CopyRef, reps: usize, mut f: impl FnMut()) -> (f64, f64) {
    f();
    copy.once();
    let mut tf = Vec::with_capacity(reps);
    let mut tc = Vec::with_capacity(reps);
    for _ in 0..reps {
        let s = Instant::now();
        f();
        tf.push(s.elapsed().as_secs_f64());
        tc.push(copy.once());
    }
    (median(&mut tf), COPY_BYTES as f64 / median(&mut tc))
}

/// [`paired`] with a streaming read ([`CopyRef::read_once`]) timed in the
/// same rotation: `(median seconds of f, copy bytes/s, read bytes/s)`.
pub fn paired_rw(copy: &mut CopyRef, reps: usize, mut f: impl FnMut()) -> (f64, f64, f64) {
    f();
    copy.once();
    copy.read_once();
    let (mut tf, mut tc, mut tr) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        let s = Instant::now();
        f();
        tf.push(s.elapsed().as_secs_f64());
        tc.push(copy.once());
        tr.push(copy.read_once());
    }
    let bytes = COPY_BYTES as f64;
    (
        median(&mut tf),
        bytes / median(&mut tc),
        bytes / median(&mut tr),
    )
}

/// [`report`] with the ratio to a same-run streaming read beside the copy.
pub fn report_rw(bench: &str, name: &str, bytes: f64, secs: f64, copy: f64, read: f64) {
    let gbs = bytes / secs / 1e9;
    println!(
        "kvsieve-{bench} | {name:<44} | {:>9.3} ms | {gbs:>7.2} GB/s | {:>5.1}% of copy | {:>5.1}% of read ({:.2} GB/s)",
        secs * 1e3,
        100.0 * bytes / secs / copy,
        100.0 * bytes / secs / read,
        read / 1e9
    );
}

/// Copy bandwidth (bytes copied per second) of the pool's [`CopyRef`].
pub fn copy_bandwidth(pool: &Arc<rayon::ThreadPool>) -> f64 {
    CopyRef::new(pool.clone()).bandwidth()
}

/// One summary line: `name`, median, GB/s of `bytes` read, ratio to copy.
pub fn report(bench: &str, name: &str, bytes: f64, secs: f64, copy: f64) -> f64 {
    let gbs = bytes / secs / 1e9;
    let ratio = bytes / secs / copy;
    println!(
        "kvsieve-{bench} | {name:<44} | {:>9.3} ms | {gbs:>7.2} GB/s | {:>5.1}% of copy",
        secs * 1e3,
        100.0 * ratio
    );
    ratio
}
