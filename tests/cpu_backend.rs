//! CPU-backend specific checks: bitwise determinism across rayon pool sizes
//! (1 and 3 threads, every ISA), the entmax prefill backward against the
//! reference, block skipping in the backward, and the huge-page KV buffers.

mod common;

use std::sync::Arc;

use common::*;
use half::{bf16, f16};
use kvsieve::cpu::{Cpu, isa};
use kvsieve::ops::{self, DecodeParams, EntmaxPrefillParams, PrefillParams, QkParams};
use kvsieve::reference::Reference;
use kvsieve::*;

fn pool(n: usize) -> Arc<rayon::ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap(),
    )
}

/// Every op output of one backend on a fixed mixed workload, as bits.
fn workload<T: Element>(b: &Cpu) -> Vec<u32> {
    let geom = HeadGeometry::new(8, 2, 65).unwrap();
    let segs = Segments::with_capacity(2, 2, 1700, vec![1500, 1300, 1100, 1700]).unwrap();
    let mut rng = Rng::new(42);
    let d = 65;
    let q: Vec<T> = normal_vec(&mut rng, 2 * 8 * d, 2.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let sets: Vec<IndexSet> = (0..4)
        .map(|s| {
            IndexSet::from_unsorted(
                (0..segs.len_of(s) as u32)
                    .filter(|_| rng.uniform() < 0.7)
                    .collect(),
            )
        })
        .collect();
    let list = IndexList::from_sets(Scope::KvHead, &sets).unwrap();
    let masks: Vec<BitMask> = (0..16)
        .map(|i| {
            let len = segs.len_of(segs.index(i / 8, (i % 8) / 4));
            BitMask::from_bools(&(0..len).map(|_| rng.uniform() < 0.5).collect::<Vec<_>>())
        })
        .collect();
    let masks = MaskList::from_masks(Scope::QueryHead, &masks).unwrap();
    let mut bits: Vec<u32> = Vec::new();
    let mut push = |x: &[T]| bits.extend(x.iter().map(|v| v.to_f32().to_bits()));
    for norm in [
        Normalizer::Softmax,
        Normalizer::Entmax { alpha: 1.5 },
        Normalizer::EntmaxPerHead {
            alphas: vec![1.25, 1.5, 2.0, 1.75, 1.5, 1.5, 2.0, 1.1],
        },
    ] {
        for restrict in [
            Restrict::Dense,
            Restrict::Indices(&list),
            Restrict::Mask(&masks),
        ] {
            let p = DecodeParams {
                geom,
                segments: &segs,
                scale: None,
                normalizer: &norm,
                restrict,
            };
            let mut out = vec![T::default(); q.len()];
            ops::decode_attention(b, &p, &q, &k, &v, &mut out).unwrap();
            push(&out);
        }
    }
    // Prefill (softmax and entmax), entmax prefill and its backward.
    let q_rows = Ragged::from_lens(&[37, 20]).unwrap();
    let segs2 = Segments::packed(2, 2, &[300, 300, 64, 64]).unwrap();
    let qp: Vec<T> = normal_vec(&mut rng, 57 * 8 * d, 2.0);
    let kp: Vec<T> = normal_vec(&mut rng, segs2.rows_needed() * d, 1.0);
    let vp: Vec<T> = normal_vec(&mut rng, segs2.rows_needed() * d, 1.0);
    for norm in [Normalizer::Softmax, Normalizer::Entmax { alpha: 1.5 }] {
        let p = PrefillParams {
            geom,
            q_rows: &q_rows,
            segments: &segs2,
            causal: true,
            mask: None,
            scale: None,
            normalizer: &norm,
        };
        let mut out = vec![T::default(); qp.len()];
        ops::prefill_attention(b, &p, &qp, &kp, &vp, &mut out).unwrap();
        push(&out);
    }
    let ep = EntmaxPrefillParams {
        geom,
        q_rows: &q_rows,
        segments: &segs2,
        causal: true,
        alphas: &[1.5],
        scale: None,
        block_q: 16,
        block_k: 16,
        skip_blocks: true,
    };
    let mut out = vec![T::default(); qp.len()];
    let mut tau = vec![0.0f32; 57 * 8];
    ops::entmax_prefill(b, &ep, &qp, &kp, &vp, &mut out, &mut tau).unwrap();
    push(&out);
    let dout: Vec<T> = normal_vec(&mut rng, qp.len(), 1.0);
    let (mut dq, mut dk, mut dv, mut da) = (
        vec![0.0f32; qp.len()],
        vec![0.0f32; kp.len()],
        vec![0.0f32; kp.len()],
        vec![0.0f32; 8],
    );
    ops::entmax_prefill_backward(
        b, &ep, &qp, &kp, &vp, &tau, &dout, &mut dq, &mut dk, &mut dv, &mut da,
    )
    .unwrap();
    for x in [&tau, &dq, &dk, &dv, &da] {
        bits.extend(x.iter().map(|v| v.to_bits()));
    }
    // Row normalisers and scores.
    let rows = Ragged::from_lens(&[5000, 1, 777]).unwrap();
    let x: Vec<f32> = normal_vec(&mut rng, rows.total(), 3.0);
    let mut o = vec![0.0f32; x.len()];
    ops::softmax_rows(b, &rows, &x, &mut o).unwrap();
    bits.extend(o.iter().map(|v| v.to_bits()));
    ops::entmax_rows(b, &rows, &[1.5], &x, &mut o).unwrap();
    bits.extend(o.iter().map(|v| v.to_bits()));
    let qk = QkParams {
        geom,
        q_rows: &q_rows,
        segments: &segs2,
        causal: true,
        scale: None,
    };
    let lay = ops::qk_layout(&qk).unwrap();
    let mut z = vec![0.0f32; lay.blocks.total()];
    ops::qk_logits(b, &qk, &qp, &kp, &mut z).unwrap();
    bits.extend(z.iter().map(|v| v.to_bits()));
    bits
}

#[test]
fn results_are_bitwise_identical_for_any_pool_size() {
    let (p1, p3) = (pool(1), pool(3));
    for isa in isa::available() {
        let one = Cpu::with_isa(isa).pool(p1.clone());
        let three = Cpu::with_isa(isa).pool(p3.clone());
        let global = Cpu::with_isa(isa);
        let a = workload::<f32>(&one);
        assert!(a == workload::<f32>(&three), "{isa}: f32, 1 vs 3 threads");
        assert!(
            a == workload::<f32>(&global),
            "{isa}: f32, 1 vs global pool"
        );
        // Repeated calls reuse the workspace: same bits again.
        assert!(a == workload::<f32>(&one), "{isa}: f32, repeated call");
        let h = workload::<f16>(&one);
        assert!(h == workload::<f16>(&three), "{isa}: f16, 1 vs 3 threads");
    }
}

#[test]
fn entmax_prefill_backward_matches_reference() {
    let geom = HeadGeometry::new(4, 2, 33).unwrap();
    let segs = Segments::packed(2, 2, &[70, 70, 40, 40]).unwrap();
    let q_rows = Ragged::from_lens(&[45, 40]).unwrap();
    let mut rng = Rng::new(11);
    let d = 33;
    let q: Vec<f32> = normal_vec(&mut rng, 85 * 4 * d, 2.0);
    let k: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let dout: Vec<f32> = normal_vec(&mut rng, q.len(), 1.0);
    let alphas = [1.5f32, 2.0, 1.25, 1.75];
    for isa in isa::available() {
        let cpu = Cpu::with_isa(isa);
        for (causal, skip) in [(true, true), (false, true), (true, false)] {
            let p = EntmaxPrefillParams {
                geom,
                q_rows: &q_rows,
                segments: &segs,
                causal,
                alphas: &alphas,
                scale: None,
                block_q: 16,
                block_k: 16,
                skip_blocks: skip,
            };
            let mut tau = vec![0.0f32; 85 * 4];
            let mut out = vec![0.0f32; q.len()];
            ops::entmax_prefill(&Reference, &p, &q, &k, &v, &mut out, &mut tau).unwrap();
            let grads = |b: &dyn Fn(&mut [Vec<f32>; 4])| {
                let mut g = [
                    vec![0.0f32; q.len()],
                    vec![0.0f32; k.len()],
                    vec![0.0f32; k.len()],
                    vec![0.0f32; 4],
                ];
                b(&mut g);
                g
            };
            let want = grads(&|g| {
                let [dq, dk, dv, da] = g;
                ops::entmax_prefill_backward(
                    &Reference, &p, &q, &k, &v, &tau, &dout, dq, dk, dv, da,
                )
                .unwrap()
            });
            let got = grads(&|g| {
                let [dq, dk, dv, da] = g;
                ops::entmax_prefill_backward(&cpu, &p, &q, &k, &v, &tau, &dout, dq, dk, dv, da)
                    .unwrap()
            });
            let wide = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
            for (name, a, e) in [
                ("dq", &got[0], &want[0]),
                ("dk", &got[1], &want[1]),
                ("dv", &got[2], &want[2]),
                ("dalpha", &got[3], &want[3]),
            ] {
                // f32 accumulation of O(100) terms of O(1).
                let tol = Tolerance {
                    rel: 1e-3,
                    abs: 1e-4,
                };
                let ctx = format!("{isa}: backward {name} causal={causal} skip={skip}");
                assert_close(&wide(a), &wide(e), tol, &ctx);
            }
        }
    }
}

#[test]
fn backward_block_skipping_changes_nothing() {
    let geom = HeadGeometry::new(4, 2, 16).unwrap();
    let segs = Segments::packed(2, 2, &[70, 70, 33, 33]).unwrap();
    let q_rows = Ragged::from_lens(&[40, 33]).unwrap();
    let mut rng = Rng::new(4);
    let q: Vec<f32> = normal_vec(&mut rng, 73 * 4 * 16, 6.0);
    let k: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * 16, 1.0);
    let v: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * 16, 1.0);
    let dout: Vec<f32> = normal_vec(&mut rng, q.len(), 1.0);
    let cpu = Cpu::new();
    let run = |skip: bool| {
        let p = EntmaxPrefillParams {
            geom,
            q_rows: &q_rows,
            segments: &segs,
            causal: true,
            alphas: &[1.25, 1.5, 2.0, 1.75],
            scale: None,
            block_q: 16,
            block_k: 16,
            skip_blocks: skip,
        };
        let mut tau = vec![0.0f32; 73 * 4];
        let mut out = vec![0.0f32; q.len()];
        let st = ops::entmax_prefill(&cpu, &p, &q, &k, &v, &mut out, &mut tau).unwrap();
        let (mut dq, mut dk, mut dv, mut da) = (
            vec![0.0f32; q.len()],
            vec![0.0f32; k.len()],
            vec![0.0f32; k.len()],
            vec![0.0f32; 4],
        );
        ops::entmax_prefill_backward(
            &cpu, &p, &q, &k, &v, &tau, &dout, &mut dq, &mut dk, &mut dv, &mut da,
        )
        .unwrap();
        (st, out, tau, dq, dk, dv, da)
    };
    let (a, b) = (run(true), run(false));
    assert!(
        a.0.live_tiles < a.0.visible_tiles,
        "expected dead tiles: {:?}",
        a.0
    );
    assert_eq!(a, b, "skipping dead tiles must not change any result");
}

/// `kv_buffer` / `kv_buffer_from` / `Cpu::{zeros, upload}`: right length,
/// zeroed or equal to the source, below and above the huge-page threshold.
#[test]
fn kv_buffers_are_zeroed_or_copied() {
    use kvsieve::cpu::alloc::{HUGE_PAGE_MIN_BYTES, kv_buffer, kv_buffer_from};
    let cpu = Cpu::new();
    for len in [0, 1, 1000, HUGE_PAGE_MIN_BYTES / 2 + 3] {
        let z = kv_buffer::<f16>(len).unwrap();
        assert_eq!(z.len(), len);
        assert!(z.iter().all(|x| x.to_bits() == 0));
        let z = cpu.zeros::<f32>(len).unwrap();
        assert!(z.len() == len && z.iter().all(|&x| x == 0.0));
        let data: Vec<f16> = (0..len).map(|i| f16::from_f32(i as f32 * 0.25)).collect();
        assert_eq!(kv_buffer_from(&data).unwrap(), data);
        assert_eq!(cpu.upload(&data).unwrap(), data);
    }
    // An impossible size is an error, not an abort.
    let err = kv_buffer::<f32>(usize::MAX / 2).unwrap_err();
    assert!(matches!(err, Error::Device { backend: "cpu", .. }), "{err}");
    assert!(cpu.zeros::<bf16>(usize::MAX / 4).is_err());
}

/// On Linux with transparent huge pages enabled (`madvise` or `always`),
/// the advice is accepted for a large buffer; it never changes contents.
#[test]
fn huge_page_advice_is_accepted_where_available() {
    use kvsieve::cpu::alloc::advise_huge_pages;
    let mut small = [7u8; 100];
    assert!(
        !advise_huge_pages(&mut small[1..50]),
        "no whole page inside"
    );
    let mut big: Vec<f32> = (0..(8 << 20) / 4).map(|i| i as f32).collect();
    let accepted = advise_huge_pages(&mut big);
    assert!(big.iter().enumerate().all(|(i, &x)| x == i as f32));
    let mode = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
    match mode {
        Ok(m) if cfg!(target_os = "linux") && !m.contains("[never]") => {
            assert!(
                accepted,
                "madvise(MADV_HUGEPAGE) refused with THP mode {m:?}"
            );
        }
        other => {
            backends::skip(
                "thp",
                &format!(
                    "transparent huge pages unavailable ({other:?}); advice returned {accepted}"
                ),
            );
        }
    }
}
