//! Prefill attention on the reference and the CPU backend with fuzzed
//! shapes (ragged queries and keys, GQA), causality, optional bit masks of
//! either scope, normalisers, scales and values.
//!
//! Invariants as the decode target: the same accept / reject decision; per
//! query row, zeros when it sees no key, else an output inside the hull of
//! the V rows it sees, finite for finite inputs with |v| < 3e38; on tame
//! inputs the CPU within 1e-4 relative / 5e-5 absolute of the reference, and
//! with V = 1 every output of a row that sees a key is 1.
#![no_main]

use kvsieve::ops::{self, PrefillParams};
use kvsieve::reference::Reference;
use kvsieve::*;
use kvsieve_fuzz::*;
use libfuzzer_sys::fuzz_target;

fn run(u: &mut Unstructured<'_>) -> Res<()> {
    let batch = u.int_in_range(1..=2)?;
    let hkv = u.int_in_range(1..=2)?;
    let g = u.int_in_range(1..=3)?;
    let d = u.int_in_range(1..=12)?;
    let hq = hkv * g;
    let geom = HeadGeometry::new(hq, hkv, d).expect("small geometry");
    let causal = u.arbitrary()?;
    let misfit = u.ratio(1, 16)?;
    let nqs: Vec<u32> = (0..batch)
        .map(|_| u.int_in_range(0..=24))
        .collect::<Res<_>>()?;
    let mut lens = Vec::new();
    for &nq in &nqs {
        for _ in 0..hkv {
            // Causal prefill needs the chunk's own tokens in the cache.
            let lo = if causal && !misfit { nq } else { 0 };
            lens.push(lo + u.int_in_range(0..=40)?);
        }
    }
    let segs = Segments::packed(batch, hkv, &lens).expect("segments");
    let q_rows = Ragged::from_lens(&nqs).expect("rows");
    let scope = if u.arbitrary()? {
        Scope::KvHead
    } else {
        Scope::QueryHead
    };
    let mask = if u.arbitrary()? {
        let mut lists = Vec::new();
        for i in 0..scope.count(batch, &geom) {
            let (b, kvh) = match scope {
                Scope::KvHead => (i / hkv, i % hkv),
                Scope::QueryHead => (i / hq, geom.kv_head(i % hq)),
            };
            let kv = segs.len_of(segs.index(b, kvh)) + usize::from(misfit);
            let keep = u.int_in_range(0u8..=4)?;
            let rows: Vec<BitMask> = (0..nqs[b])
                .map(|_| {
                    let bits: Vec<bool> = (0..kv)
                        .map(|_| u.int_in_range(0u8..=4).unwrap_or(0) < keep)
                        .collect();
                    BitMask::from_bools(&bits)
                })
                .collect();
            lists.push(rows);
        }
        Some(MaskList::from_rows(scope, &lists).expect("masks"))
    } else {
        None
    };
    let norm = match u.int_in_range(0u8..=2)? {
        0 => Normalizer::Softmax,
        1 => Normalizer::Entmax {
            alpha: any_alpha(u)?,
        },
        _ => Normalizer::EntmaxPerHead {
            alphas: (0..hq).map(|_| alpha(u)).collect::<Res<_>>()?,
        },
    };
    let tame_run = u.ratio(3, 4)?;
    let scale = match u.int_in_range(0u8..=3)? {
        0 => None,
        1 if !tame_run => Some(f32::from_bits(u.arbitrary()?)),
        _ => Some(f32::from(u.int_in_range(1u8..=32)?) / 16.0),
    };
    let rows = segs.rows_needed();
    let mut val = |n: usize| -> Res<Vec<f32>> {
        (0..n)
            .map(|_| if tame_run { tame(u) } else { wild(u) })
            .collect()
    };
    let total_q = q_rows.total();
    let q = val(total_q * hq * d)?;
    let k = val(rows * d)?;
    let v = val(rows * d)?;
    let p = PrefillParams {
        geom,
        q_rows: &q_rows,
        segments: &segs,
        causal,
        mask: mask.as_ref(),
        scale,
        normalizer: &norm,
    };
    let cpu = cpu(u)?;
    let mut want = vec![0.0f32; q.len()];
    let mut got = vec![0.0f32; q.len()];
    let rr = ops::prefill_attention(&Reference, &p, &q, &k, &v, &mut want);
    let rc = ops::prefill_attention(&cpu, &p, &q, &k, &v, &mut got);
    let ctx = || {
        format!(
            "{:?} nq {nqs:?} lens {lens:?} hq {hq} hkv {hkv} d {d} causal {causal} mask {} \
             {norm:?} scale {scale:?} tame {tame_run}",
            cpu.isa(),
            mask.as_ref()
                .map_or("none".to_string(), |m| format!("{:?}", m.scope()))
        )
    };
    assert_eq!(rr.is_ok(), rc.is_ok(), "{}: {rr:?} vs {rc:?}", ctx());
    if rr.is_err() {
        return Ok(());
    }
    let finite_in = q.iter().chain(&k).chain(&v).all(|x| x.is_finite())
        && v.iter().all(|x| x.abs() < 3e38)
        && scale.is_none_or(|s| s.is_finite());
    for b in 0..batch {
        let nq = q_rows.len_of(b);
        for h in 0..hq {
            let s = segs.index(b, geom.kv_head(h));
            let (off, kv) = (segs.offset(s), segs.len_of(s));
            for i in 0..nq {
                let pos = (kv + i).checked_sub(nq);
                let keys: Vec<usize> = (0..kv)
                    .filter(|&j| !causal || pos.is_some_and(|p| j <= p))
                    .filter(|&j| {
                        mask.as_ref()
                            .is_none_or(|m| m.get(m.scope().list_of(b, h, &geom), i, j))
                    })
                    .collect();
                let row = ((q_rows.range(b).start + i) * hq + h) * d;
                for (name, out) in [("reference", &want), ("cpu", &got)] {
                    let o = &out[row..row + d];
                    if keys.is_empty() {
                        assert!(o.iter().all(|&x| x == 0.0), "{name} {}: {o:?}", ctx());
                        continue;
                    }
                    if finite_in {
                        assert!(o.iter().all(|x| x.is_finite()), "{name} {}: {o:?}", ctx());
                    }
                    for (c, &x) in o.iter().enumerate().filter(|(_, x)| x.is_finite()) {
                        let (lo, hi) = keys
                            .iter()
                            .map(|&j| v[(off + j) * d + c])
                            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, z), y| {
                                (a.min(y), z.max(y))
                            });
                        // f32 sums of up to ~1000 weights: rounding of the attention
                        // tolerance's relative size (docs/numerics.md).
                        let slack = 1e-4 * lo.abs().max(hi.abs());
                        assert!(
                            x >= lo - slack && x <= hi + slack,
                            "{name} {}: row {b}/{i} head {h} col {c}: {x} outside [{lo}, {hi}]",
                            ctx()
                        );
                    }
                }
            }
        }
    }
    if tame_run {
        assert_all_close(&got, &want, 1e-4, 5e-5, &|| {
            format!("cpu vs reference {}", ctx())
        });
        let ones = vec![1.0f32; v.len()];
        ops::prefill_attention(&cpu, &p, &q, &k, &ones, &mut got).expect("accepted above");
        ops::prefill_attention(&Reference, &p, &q, &k, &ones, &mut want).expect("accepted");
        for (i, (&a, &e)) in got.iter().zip(&want).enumerate() {
            assert!(
                e == 0.0 || (e - 1.0).abs() < 1e-6,
                "reference sum {e} at {i}: {}",
                ctx()
            );
            assert!(
                close(f64::from(a), f64::from(e), 0.0, 1e-4),
                "cpu sum {a} vs {e} at {i}: {}",
                ctx()
            );
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
