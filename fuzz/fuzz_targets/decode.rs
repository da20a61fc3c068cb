//! Decode attention on the reference and the CPU backend with fuzzed shapes
//! (ragged segments with gaps, GQA), restrictions (index lists and bit masks
//! of either scope), normalisers (softmax, entmax with any α, per-head α),
//! scales and values.
//!
//! Invariants: both backends accept or reject the same calls; an accepted
//! call gives, per (sequence, head), zeros when no token is allowed, else an
//! output inside the hull of the attended V rows, finite for finite inputs
//! with |v| < 3e38; on tame inputs the CPU is within the attention tolerance
//! of `docs/numerics.md` (1e-4 relative, 5e-5 absolute) of the reference,
//! and with V = 1 every attended output is 1 (the weights sum to one).
#![no_main]

use kvsieve::ops::{self, DecodeParams};
use kvsieve::reference::Reference;
use kvsieve::*;
use kvsieve_fuzz::*;
use libfuzzer_sys::fuzz_target;

/// A restriction built from the input (owned).
enum Owned {
    Dense,
    List(IndexList),
    Mask(MaskList),
}

fn run(u: &mut Unstructured<'_>) -> Res<()> {
    let batch = u.int_in_range(1..=3)?;
    let hkv = u.int_in_range(1..=3)?;
    let g = u.int_in_range(1..=4)?;
    let d = u.int_in_range(1..=20)?;
    let hq = hkv * g;
    let geom = HeadGeometry::new(hq, hkv, d).expect("small geometry");
    let long = u.ratio(1, 8)?;
    let lens: Vec<u32> = (0..batch * hkv)
        .map(|_| {
            if long {
                u.int_in_range(0..=1100)
            } else {
                u.int_in_range(0..=40)
            }
        })
        .collect::<Res<_>>()?;
    let cap = lens.iter().copied().max().unwrap_or(0) as usize + u.int_in_range(0..=3)?;
    let segs = if u.arbitrary()? {
        Segments::with_capacity(batch, hkv, cap, lens.clone()).expect("segments")
    } else {
        Segments::packed(batch, hkv, &lens).expect("segments")
    };
    let scope = if u.arbitrary()? {
        Scope::KvHead
    } else {
        Scope::QueryHead
    };
    let lists = scope.count(batch, &geom);
    let seg_of = |i: usize| match scope {
        Scope::KvHead => i,
        Scope::QueryHead => segs.index(i / hq, geom.kv_head(i % hq)),
    };
    // Occasionally a restriction that does not fit (wrong count or range).
    let misfit = u.ratio(1, 16)?;
    let restrict = match u.int_in_range(0u8..=2)? {
        0 => Owned::Dense,
        1 => {
            let mut sets = Vec::new();
            for i in 0..lists + usize::from(misfit) {
                let len = segs.len_of(seg_of(i.min(lists - 1))) + usize::from(misfit);
                let keep = u.int_in_range(0u8..=4)?;
                let set: Vec<u32> = (0..len as u32)
                    .filter(|_| u.int_in_range(0u8..=4).unwrap_or(0) < keep)
                    .collect();
                sets.push(IndexSet::new(set).expect("increasing"));
            }
            Owned::List(IndexList::from_sets(scope, &sets).expect("lists"))
        }
        _ => {
            let mut masks = Vec::new();
            for i in 0..lists {
                let len = segs.len_of(seg_of(i)) + usize::from(misfit);
                let keep = u.int_in_range(0u8..=4)?;
                let bits: Vec<bool> = (0..len)
                    .map(|_| u.int_in_range(0u8..=4).unwrap_or(0) < keep)
                    .collect();
                masks.push(BitMask::from_bools(&bits));
            }
            Owned::Mask(MaskList::from_masks(scope, &masks).expect("masks"))
        }
    };
    let norm = match u.int_in_range(0u8..=2)? {
        0 => Normalizer::Softmax,
        1 => Normalizer::Entmax {
            alpha: any_alpha(u)?,
        },
        _ => Normalizer::EntmaxPerHead {
            alphas: (0..hq + usize::from(misfit))
                .map(|_| alpha(u))
                .collect::<Res<_>>()?,
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
    let q = val(batch * hq * d)?;
    let k = val(rows * d)?;
    let v = val(rows * d)?;

    let r = match &restrict {
        Owned::Dense => Restrict::Dense,
        Owned::List(l) => Restrict::Indices(l),
        Owned::Mask(m) => Restrict::Mask(m),
    };
    let p = DecodeParams {
        geom,
        segments: &segs,
        scale,
        normalizer: &norm,
        restrict: r,
    };
    let cpu = cpu(u)?;
    let mut want = vec![0.0f32; q.len()];
    let mut got = vec![0.0f32; q.len()];
    let rr = ops::decode_attention(&Reference, &p, &q, &k, &v, &mut want);
    let rc = ops::decode_attention(&cpu, &p, &q, &k, &v, &mut got);
    let ctx = || {
        format!(
            "{:?} batch {batch} hq {hq} hkv {hkv} d {d} lens {lens:?} {norm:?} scale {scale:?} \
             tame {tame_run} restrict {}",
            cpu.isa(),
            match &restrict {
                Owned::Dense => "dense".to_string(),
                Owned::List(l) => format!("{:?} {:?}", l.scope(), l.indices()),
                Owned::Mask(m) => format!("{:?} mask", m.scope()),
            }
        )
    };
    assert_eq!(rr.is_ok(), rc.is_ok(), "{}: {rr:?} vs {rc:?}", ctx());
    if rr.is_err() {
        return Ok(());
    }
    // Per (sequence, head): the attended tokens.
    let finite_in = q.iter().chain(&k).chain(&v).all(|x| x.is_finite())
        && v.iter().all(|x| x.abs() < 3e38)
        && scale.is_none_or(|s| s.is_finite());
    for b in 0..batch {
        for h in 0..hq {
            let s = segs.index(b, geom.kv_head(h));
            let (off, len) = (segs.offset(s), segs.len_of(s));
            let tokens: Vec<usize> = match &restrict {
                Owned::Dense => (0..len).collect(),
                Owned::List(l) => l
                    .list(l.scope().list_of(b, h, &geom))
                    .iter()
                    .map(|&j| j as usize)
                    .collect(),
                Owned::Mask(m) => {
                    let li = m.scope().list_of(b, h, &geom);
                    (0..len).filter(|&j| m.get(li, 0, j)).collect()
                }
            };
            let row = (b * hq + h) * d;
            for (name, out) in [("reference", &want), ("cpu", &got)] {
                let o = &out[row..row + d];
                if tokens.is_empty() {
                    assert!(o.iter().all(|&x| x == 0.0), "{name} {}: {o:?} not 0", ctx());
                    continue;
                }
                if finite_in {
                    assert!(o.iter().all(|x| x.is_finite()), "{name} {}: {o:?}", ctx());
                }
                for (c, &x) in o.iter().enumerate() {
                    if !x.is_finite() {
                        continue;
                    }
                    let col = tokens.iter().map(|&j| v[(off + j) * d + c]);
                    let (lo, hi) = col.fold((f32::INFINITY, f32::NEG_INFINITY), |(a, z), y| {
                        (a.min(y), z.max(y))
                    });
                    // f32 sums of up to ~1000 weights: rounding of the attention
                    // tolerance's relative size (docs/numerics.md).
                    let slack = 1e-4 * lo.abs().max(hi.abs());
                    assert!(
                        x >= lo - slack && x <= hi + slack,
                        "{name} {}: out[{b},{h},{c}] = {x} outside [{lo}, {hi}]",
                        ctx()
                    );
                }
            }
        }
    }
    if tame_run {
        assert_all_close(&got, &want, 1e-4, 5e-5, &|| {
            format!("cpu vs reference {}", ctx())
        });
        // V = 1: every attended output is 1.
        let ones = vec![1.0f32; v.len()];
        ops::decode_attention(&cpu, &p, &q, &k, &ones, &mut got).expect("accepted above");
        ops::decode_attention(&Reference, &p, &q, &k, &ones, &mut want).expect("accepted");
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
