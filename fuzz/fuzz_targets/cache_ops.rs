//! The cache ops (`gather_rows`, `scatter_rows`, `compact_rows`,
//! `merge_rows`) on the reference and the CPU backend, with fuzzed widths
//! (also absurd ones), indices (also out of range or repeated), segments,
//! keep lists and weights (also non-finite).
//!
//! Invariants: both backends accept or reject the same calls, every
//! rejection is an error (never a panic); accepted calls give bitwise equal
//! results for the moves (gather, scatter, compact) and the `merge_rows`
//! tolerance of `docs/numerics.md` for merges; gather and scatter match a
//! direct computation; compaction returns the kept lengths and puts each
//! kept row where `cache::compaction_moves` says (holes filled from above),
//! every row below the new length holding exactly one kept row.
#![no_main]

use kvsieve::reference::Reference;
use kvsieve::*;
use kvsieve_fuzz::*;
use libfuzzer_sys::fuzz_target;

fn run(u: &mut Unstructured<'_>) -> Res<()> {
    let width = size(u, 9)?;
    let src_rows: usize = u.int_in_range(0..=24)?;
    // Element count of the buffers (a multiple of the width, or not).
    let n_src = if u.ratio(1, 16)? {
        u.int_in_range(0..=200)?
    } else {
        src_rows.saturating_mul(width.min(9))
    };
    let wild_src = u.ratio(1, 4)?;
    let src: Vec<f32> = (0..n_src)
        .map(|_| if wild_src { wild(u) } else { tame(u) })
        .collect::<Res<_>>()?;
    let n_idx = u.int_in_range(0..=30)?;
    let idx: Vec<u32> = (0..n_idx)
        .map(|_| {
            if u.ratio(1, 16)? {
                u.arbitrary()
            } else {
                u.int_in_range(0..=src_rows as u32 + 1)
            }
        })
        .collect::<Res<_>>()?;
    let cpu = cpu(u)?;
    let ctx = || {
        format!(
            "{:?} width {width} src {} idx {idx:?}",
            cpu.isa(),
            src.len()
        )
    };
    let out_len = if u.ratio(1, 16)? {
        u.int_in_range(0..=300)?
    } else {
        idx.len().saturating_mul(width.min(9))
    };

    match u.int_in_range(0u8..=3)? {
        0 => {
            let (mut a, mut b) = (vec![0.0f32; out_len], vec![0.0f32; out_len]);
            let rr = ops::gather_rows(&Reference, width, &idx, &src, &mut a);
            let rc = ops::gather_rows(&cpu, width, &idx, &src, &mut b);
            assert_eq!(rr.is_ok(), rc.is_ok(), "gather {}: {rr:?} {rc:?}", ctx());
            if rr.is_ok() {
                assert_eq!(bits(&a), bits(&b), "gather {}", ctx());
                for (i, &j) in idx.iter().enumerate() {
                    let (s, t) = (j as usize * width, i * width);
                    assert_eq!(
                        bits(&a[t..t + width]),
                        bits(&src[s..s + width]),
                        "gather {}",
                        ctx()
                    );
                }
            }
        }
        1 => {
            let dst0: Vec<f32> = (0..out_len).map(|_| tame(u)).collect::<Res<_>>()?;
            let (mut a, mut b) = (dst0.clone(), dst0.clone());
            let rr = ops::scatter_rows(&Reference, width, &idx, &src, &mut a);
            let rc = ops::scatter_rows(&cpu, width, &idx, &src, &mut b);
            assert_eq!(rr.is_ok(), rc.is_ok(), "scatter {}: {rr:?} {rc:?}", ctx());
            if rr.is_ok() {
                assert_eq!(bits(&a), bits(&b), "scatter {}", ctx());
                let mut want = dst0;
                for (i, &j) in idx.iter().enumerate() {
                    let (s, t) = (i * width, j as usize * width);
                    want[t..t + width].copy_from_slice(&src[s..s + width]);
                }
                assert_eq!(bits(&a), bits(&want), "scatter {}", ctx());
            }
        }
        2 => {
            let batch = u.int_in_range(1..=2)?;
            let hkv = u.int_in_range(1..=2)?;
            let lens: Vec<u32> = (0..batch * hkv)
                .map(|_| u.int_in_range(0..=6))
                .collect::<Res<_>>()?;
            let cap = 6 + u.int_in_range(0..=2)?;
            let segs = Segments::with_capacity(batch, hkv, cap, lens.clone()).expect("segments");
            let lists = batch * hkv + usize::from(u.ratio(1, 16)?);
            let mut sets = Vec::new();
            for s in 0..lists {
                let len = lens.get(s).copied().unwrap_or(3) + u32::from(u.ratio(1, 16)?);
                let set: Vec<u32> = (0..len)
                    .filter(|_| u.arbitrary().unwrap_or(false))
                    .collect();
                sets.push(IndexSet::new(set).expect("increasing"));
            }
            let scope = if u.ratio(15, 16)? {
                Scope::KvHead
            } else {
                Scope::QueryHead
            };
            let keep = IndexList::from_sets(scope, &sets).expect("lists");
            let n = if u.ratio(15, 16)? {
                segs.rows_needed().saturating_mul(width.min(9))
            } else {
                u.int_in_range(0..=100)?
            };
            let buf0: Vec<f32> = (0..n).map(|_| tame(u)).collect::<Res<_>>()?;
            let (mut a, mut b) = (buf0.clone(), buf0.clone());
            let rr = ops::compact_rows(&Reference, width, &segs, &keep, &mut a);
            let rc = ops::compact_rows(&cpu, width, &segs, &keep, &mut b);
            assert_eq!(rr.is_ok(), rc.is_ok(), "compact {}: {rr:?} {rc:?}", ctx());
            if let (Ok(ns), Ok(nc)) = (rr, rc) {
                assert_eq!(ns, nc, "compact {}", ctx());
                assert_eq!(bits(&a), bits(&b), "compact {}", ctx());
                for s in 0..segs.num_segments() {
                    let kept = keep.list(s);
                    assert_eq!(ns.len_of(s), kept.len(), "compact {}", ctx());
                    assert_eq!(ns.offset(s), segs.offset(s), "compact {}", ctx());
                    // Hole-filling compaction: kept rows below the new
                    // length stay, each hole takes the next kept row above.
                    let mut at: Vec<u32> = kept.to_vec();
                    for (dst, src) in kvsieve::cache::compaction_moves(kept) {
                        if let Some(r) = at.iter().position(|&x| x == src) {
                            at[r] = dst;
                        }
                    }
                    let mut rows: Vec<u32> = at.clone();
                    rows.sort_unstable();
                    assert!(
                        rows.iter().enumerate().all(|(r, &x)| x as usize == r),
                        "compact {}: rows {at:?}",
                        ctx()
                    );
                    for (&j, &r) in kept.iter().zip(&at) {
                        let from = (segs.offset(s) + j as usize) * width;
                        let to = (segs.offset(s) + r as usize) * width;
                        assert_eq!(
                            bits(&a[to..to + width]),
                            bits(&buf0[from..from + width]),
                            "compact {}",
                            ctx()
                        );
                    }
                }
            }
        }
        _ => {
            let groups = u.int_in_range(0..=6)?;
            let glens: Vec<u32> = (0..groups)
                .map(|_| u.int_in_range(0..=4))
                .collect::<Res<_>>()?;
            let groups = Ragged::from_lens(&glens).expect("groups");
            let members: Vec<u32> = (0..groups.total())
                .map(|i| idx.get(i).copied().map_or(Ok(0), Ok))
                .collect::<Res<_>>()?;
            let members = if u.ratio(1, 16)? {
                idx.clone()
            } else {
                members
            };
            let weights: Vec<f32> = (0..members.len())
                .map(|_| if u.ratio(1, 32)? { wild(u) } else { tame(u) })
                .collect::<Res<_>>()?;
            let n = if u.ratio(15, 16)? {
                groups.num_segments().saturating_mul(width.min(9))
            } else {
                u.int_in_range(0..=60)?
            };
            let (mut a, mut b) = (vec![0.0f32; n], vec![0.0f32; n]);
            let rr = ops::merge_rows(&Reference, width, &groups, &members, &weights, &src, &mut a);
            let rc = ops::merge_rows(&cpu, width, &groups, &members, &weights, &src, &mut b);
            assert_eq!(rr.is_ok(), rc.is_ok(), "merge {}: {rr:?} {rc:?}", ctx());
            if rr.is_ok() && !wild_src && weights.iter().all(|w| w.abs() <= 2.0) {
                // f32 accumulation of at most 4 terms of magnitude ≤ 4·2.
                assert_all_close(&b, &a, 1e-5 + f64::from(f32::EPSILON), 1e-6 * 32.0, &|| {
                    format!("merge {}", ctx())
                });
            }
        }
    }
    Ok(())
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
