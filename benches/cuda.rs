//! GPU benchmark of the CUDA backend, with a device-to-device copy measured in the same run.
//!
//! `cargo bench --features cuda --bench cuda` (needs a GPU; prints `SKIPPED(cuda)` without).
//! Prints one markdown table: kernel, shape, time per call, bytes-based GB/s, % of the
//! H200's 4.8 TB/s and % of the same-run copy bandwidth, followed by the ratios the issue
//! targets. Times include the host side of each op (table uploads, scratch allocation),
//! because that is what a caller of `kvsieve::ops` pays.
//!
//! Sizes fit one H200 run of a few minutes; `KVSIEVE_BENCH_QUICK=1` shrinks every context
//! eightfold for a smoke run.

use half::bf16;
use kvsieve::cuda::CudaBackend;
use kvsieve::ops::{self, DecodeParams, QkParams};
use kvsieve::{
    Backend, HeadGeometry, IndexList, IndexSet, Normalizer, Ragged, Restrict, Scope, Segments,
};
use std::time::Instant;

const PEAK_GBS: f64 = 4800.0;

struct Row {
    kernel: String,
    shape: String,
    secs: f64,
    bytes: f64,
}

/// Mean seconds per call of `f` (synchronised), after warm-up calls.
fn time(b: &CudaBackend, mut f: impl FnMut() -> kvsieve::Result<()>) -> kvsieve::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    b.synchronize()?;
    let mut iters = 0u32;
    let start = Instant::now();
    while iters < 5 || (start.elapsed().as_secs_f64() < 0.5 && iters < 200) {
        f()?;
        iters += 1;
    }
    b.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / f64::from(iters))
}

fn fill(n: usize, seed: u64) -> Vec<bf16> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        })
        .collect()
}

fn run() -> kvsieve::Result<()> {
    let b = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("SKIPPED(cuda): {e}");
            assert!(
                !std::env::var("KVSIEVE_REQUIRE")
                    .is_ok_and(|v| v.split(',').any(|x| x.trim() == "cuda")),
                "KVSIEVE_REQUIRE=cuda but no device: {e}"
            );
            return Ok(());
        }
    };
    let quick = std::env::var("KVSIEVE_BENCH_QUICK").is_ok();
    let ctx = |n: usize| if quick { n / 8 } else { n };
    println!("device: {} ({})", b.device_name()?, b.arch());
    b.load_all_kernels()?;
    let mut rows = Vec::new();

    // Same-run copy bandwidth: 1 GiB read + 1 GiB written.
    let copy_elems = ctx(512 << 20);
    let src = b.upload(&fill(copy_elems, 1))?;
    let mut dst = b.zeros::<bf16>(copy_elems)?;
    let t = time(&b, || b.copy_buffer(&src, &mut dst))?;
    let copy_bytes = 2.0 * (copy_elems * 2) as f64;
    rows.push(Row {
        kernel: "copy (device to device)".into(),
        shape: format!("{} MiB", (copy_elems * 2) >> 20),
        secs: t,
        bytes: copy_bytes,
    });
    let copy_gbs = copy_bytes / t / 1e9;
    drop((src, dst));

    // Llama-3-8B-like layer: 32 query heads, 8 KV heads, d = 128, bf16.
    let geom = HeadGeometry::new(32, 8, 128)?;
    let d = 128;
    let mut decode = |batch: usize,
                      tokens: usize,
                      norm: &Normalizer,
                      select: Option<usize>,
                      label: &str|
     -> kvsieve::Result<f64> {
        let segs = Segments::uniform(batch, 8, tokens)?;
        let kv = fill(segs.rows_needed() * d, 2);
        let (k, v) = (b.upload(&kv)?, b.upload(&fill(segs.rows_needed() * d, 3))?);
        drop(kv);
        let q = b.upload(&fill(batch * 32 * d, 4))?;
        let mut out = b.zeros::<bf16>(batch * 32 * d)?;
        let list;
        let restrict = match select {
            None => Restrict::Dense,
            Some(n) => {
                let step = (tokens / n).max(1);
                let set = IndexSet::new((0..n).map(|i| (i * step) as u32).collect())?;
                list = IndexList::from_sets(Scope::KvHead, &vec![set; batch * 8])?;
                Restrict::Indices(&list)
            }
        };
        let p = DecodeParams {
            geom,
            segments: &segs,
            scale: None,
            normalizer: norm,
            restrict,
        };
        let t = time(&b, || ops::decode_attention(&b, &p, &q, &k, &v, &mut out))?;
        let read_tokens = select.unwrap_or(tokens) * batch * 8;
        rows.push(Row {
            kernel: format!("decode_attention {label}"),
            shape: format!("b{batch} ctx{}k 32q/8kv d128 bf16", tokens / 1024),
            secs: t,
            bytes: (read_tokens * d * 2 * 2) as f64,
        });
        Ok(t)
    };
    let dense32 = decode(
        8,
        ctx(32 << 10),
        &Normalizer::Softmax,
        None,
        "dense softmax",
    )?;
    let entmax32 = decode(
        8,
        ctx(32 << 10),
        &Normalizer::Entmax { alpha: 1.5 },
        None,
        "dense entmax1.5",
    )?;
    let dense128 = decode(
        1,
        ctx(128 << 10),
        &Normalizer::Softmax,
        None,
        "dense softmax",
    )?;
    let _sparse = decode(
        8,
        ctx(128 << 10),
        &Normalizer::Softmax,
        Some(2048),
        "index list 2048",
    )?;

    // Selection at 128K: Q·K logits of every query head, then top-2048 per row.
    let tokens = ctx(128 << 10);
    let segs = Segments::uniform(1, 8, tokens)?;
    let k = b.upload(&fill(segs.rows_needed() * d, 5))?;
    let q = b.upload(&fill(32 * d, 6))?;
    let q_rows = Ragged::from_lens(&[1])?;
    let qp = QkParams {
        geom,
        q_rows: &q_rows,
        segments: &segs,
        causal: false,
        scale: None,
    };
    let layout = ops::qk_layout(&qp)?;
    let mut logits = b.zeros::<f32>(layout.blocks.total())?;
    let t_qk = time(&b, || {
        ops::qk_logits(&b, &qp, &q, &k, &mut logits).map(|_| ())
    })?;
    rows.push(Row {
        kernel: "qk_logits".into(),
        shape: format!("b1 ctx{}k 32q/8kv d128 bf16", tokens / 1024),
        secs: t_qk,
        bytes: (tokens * 8 * d * 2 + layout.blocks.total() * 4) as f64,
    });
    let t_topk = time(&b, || {
        ops::topk_rows(&b, &layout.rows, 2048, Scope::QueryHead, &logits).map(|_| ())
    })?;
    rows.push(Row {
        kernel: "topk_rows k=2048".into(),
        shape: format!("32 rows x {}k f32", tokens / 1024),
        secs: t_topk,
        bytes: (layout.blocks.total() * 4) as f64,
    });
    let mut probs = b.zeros::<f32>(layout.blocks.total())?;
    let t_soft = time(&b, || {
        ops::softmax_rows(&b, &layout.rows, &logits, &mut probs)
    })?;
    rows.push(Row {
        kernel: "softmax_rows".into(),
        shape: format!("32 rows x {}k f32", tokens / 1024),
        secs: t_soft,
        bytes: (layout.blocks.total() * 8) as f64,
    });
    let t_ent = time(&b, || {
        ops::entmax_rows(&b, &layout.rows, &[1.5], &logits, &mut probs)
    })?;
    rows.push(Row {
        kernel: "entmax_rows a=1.5".into(),
        shape: format!("32 rows x {}k f32", tokens / 1024),
        secs: t_ent,
        bytes: (layout.blocks.total() * 8) as f64,
    });

    println!();
    println!("| kernel | shape | time (us) | GB/s | % of 4.8 TB/s | % of copy |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let gbs = r.bytes / r.secs / 1e9;
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.1} | {:.1} |",
            r.kernel,
            r.shape,
            r.secs * 1e6,
            gbs,
            100.0 * gbs / PEAK_GBS,
            100.0 * gbs / copy_gbs
        );
    }
    println!();
    println!("copy bandwidth (same run): {copy_gbs:.0} GB/s");
    println!(
        "targets: dense decode b8 32k >= 80% of copy; sparse decode >= 70% of copy on bytes read; \
         selection (qk + top-k) at 128k <= 15% of dense 128k: {:.1}%; entmax / softmax decode at 32k <= 1.3: {:.2}",
        100.0 * (t_qk + t_topk) / dense128,
        entmax32 / dense32
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("cuda bench failed: {e}");
        std::process::exit(1);
    }
}
