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
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

/// Copy bandwidth (bytes copied per second) of a 256 MiB buffer split
/// over the pool's threads: the yardstick of every kernel's GB/s.
pub fn copy_bandwidth(pool: &rayon::ThreadPool) -> f64 {
    let src: Vec<u8> = (0..COPY_BYTES).map(|i| i as u8).collect();
    let mut dst = vec![1u8; COPY_BYTES];
    let chunk = COPY_BYTES / pool.current_num_threads();
    let secs = median_secs(7, || {
        pool.install(|| {
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(black_box(s)))
        });
        black_box(&dst);
    });
    COPY_BYTES as f64 / secs
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
