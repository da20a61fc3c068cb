//! Paged KV on the reference and the CPU backend with fuzzed page tables
//! (also invalid: page sizes, pool sizes, out-of-range, repeated and shared
//! pages, broken `page_indptr`, `last_page_len` out of range), both page
//! layouts and scopes, restrictions, normalisers and pools whose unused
//! slots hold NaN.
//!
//! Invariants: `PageTable::new` and the ops return errors, never panic;
//! both backends accept or reject the same decode; an accepted paged decode
//! equals, bitwise on each backend, the contiguous decode over the rows
//! gathered through `PageTable::row` (outputs and group-mean weights), and
//! on tame inputs the CPU is within the attention tolerance of the
//! reference; an accepted `drop_paged` leaves, per segment, exactly the
//! rows `ops::drop_rows` leaves in the contiguous copy, and the pages it
//! reports freed are in no table.
#![no_main]

use kvsieve::backend::{DecodeEvidence, Heads, evidence_blocks};
use kvsieve::ops::{self, DecodeParams, PagedDecodeParams};
use kvsieve::paged::{PageLayout, PageScope, PageTable, PageTableParts};
use kvsieve::reference::Reference;
use kvsieve::*;
use kvsieve_fuzz::*;
use libfuzzer_sys::fuzz_target;

fn run(u: &mut Unstructured<'_>) -> Res<()> {
    let batch = u.int_in_range(1..=3)?;
    let hkv = u.int_in_range(1..=3)?;
    let g = u.int_in_range(1..=3)?;
    let d = u.int_in_range(1..=12)?;
    let hq = hkv * g;
    let geom = HeadGeometry::new(hq, hkv, d).expect("small geometry");
    let misfit = u.ratio(1, 8)?;
    let page_size = if misfit && u.arbitrary()? {
        usize::from(u.arbitrary::<u16>()?)
    } else {
        1 << u.int_in_range(0..=4)?
    };
    let num_pages = if misfit && u.arbitrary()? {
        u.arbitrary::<u32>()? as usize
    } else {
        u.int_in_range(0..=10)?
    };
    let scope = if u.arbitrary()? {
        PageScope::Sequence
    } else {
        PageScope::KvHead
    };
    let layout = if u.arbitrary()? {
        PageLayout::Hnd
    } else {
        PageLayout::Nhd
    };
    let tables = match scope {
        PageScope::Sequence => batch,
        PageScope::KvHead => batch * hkv,
    } + usize::from(misfit && u.arbitrary()?);
    // Distinct pages per table from a shuffled pool (a misfit run may
    // repeat a page, go past the pool, or share pages between tables).
    let mut free: Vec<u32> = (0..num_pages.min(64) as u32).collect();
    let (mut indptr, mut indices, mut last) = (vec![0u32], Vec::new(), Vec::new());
    for _ in 0..tables {
        let n = u.int_in_range(0..=3usize)?;
        for _ in 0..n {
            let p = if misfit && u.ratio(1, 4)? {
                u.arbitrary::<u32>()? % (num_pages as u32).saturating_add(2).max(1)
            } else if free.is_empty() {
                break;
            } else {
                let i = u.choose_index(free.len())?;
                free.swap_remove(i)
            };
            indices.push(p);
        }
        indptr.push(indices.len() as u32);
        let pages = (indptr[indptr.len() - 1] - indptr[indptr.len() - 2]) as usize;
        last.push(if misfit && u.ratio(1, 4)? {
            u.int_in_range(0..=page_size as u32 + 1)?
        } else if pages == 0 {
            0
        } else {
            u.int_in_range(1..=page_size.max(1) as u32)?
        });
    }
    if misfit && u.ratio(1, 4)? && indptr.len() > 1 {
        let i = u.choose_index(indptr.len())?;
        indptr[i] = u.arbitrary()?;
    }
    let table = match PageTable::new(PageTableParts {
        layout,
        page_size,
        num_pages,
        num_kv_heads: hkv,
        scope,
        page_indptr: indptr,
        page_indices: indices,
        last_page_len: last,
    }) {
        Ok(t) => t,
        Err(_) => return Ok(()),
    };
    // An extra table in a misfit run makes one more sequence.
    let batch = table.batch();
    let rows = table.rows();
    if rows > 1 << 16 {
        // A valid table over a pool too large to allocate here: the ops
        // must reject small buffers.
        let q = vec![0.0f32; batch * hq * d];
        let (k, v, mut out) = (vec![0.0f32; d], vec![0.0f32; d], q.clone());
        let p = PagedDecodeParams {
            geom,
            pages: &table,
            scale: None,
            normalizer: &Normalizer::Softmax,
            restrict: Restrict::Dense,
        };
        assert!(ops::decode_attention_paged(&Reference, &p, &q, &k, &v, &mut out).is_err());
        return Ok(());
    }
    let segs = table.segments().clone();
    let nseg = segs.num_segments();
    let lens: Vec<u32> = (0..nseg).map(|s| segs.len_of(s) as u32).collect();
    let packed = Segments::packed(batch, hkv, &lens).expect("segments");
    // Pools of NaN; the rows in use get values (shared pages: the last
    // writer's, read the same way by every table naming them).
    let tame_run = u.ratio(3, 4)?;
    let mut val = || -> Res<f32> { if tame_run { tame(u) } else { wild(u) } };
    let (mut kp, mut vp) = (vec![f32::NAN; rows * d], vec![f32::NAN; rows * d]);
    for s in 0..nseg {
        for t in 0..segs.len_of(s) {
            let r = table.row(s, t);
            for c in 0..d {
                kp[r * d + c] = val()?;
                vp[r * d + c] = val()?;
            }
        }
    }
    let gather = |pool: &[f32], table: &PageTable| -> Vec<f32> {
        let segs = table.segments();
        (0..segs.num_segments())
            .flat_map(|s| (0..segs.len_of(s)).map(move |t| (s, t)))
            .flat_map(|(s, t)| pool[table.row(s, t) * d..][..d].iter().copied())
            .collect()
    };
    let (kc, vc) = (gather(&kp, &table), gather(&vp, &table));
    let q: Vec<f32> = (0..batch * hq * d).map(|_| val()).collect::<Res<_>>()?;
    let list = if u.arbitrary()? {
        let sets: Vec<IndexSet> = (0..nseg + usize::from(misfit && u.arbitrary()?))
            .map(|s| {
                let len = lens.get(s).copied().unwrap_or(1);
                let keep = u.int_in_range(0u8..=4).unwrap_or(2);
                IndexSet::new(
                    (0..len)
                        .filter(|_| u.int_in_range(0u8..=4).unwrap_or(0) < keep)
                        .collect(),
                )
                .expect("increasing")
            })
            .collect();
        Some(IndexList::from_sets(Scope::KvHead, &sets).expect("lists"))
    } else {
        None
    };
    let restrict = list.as_ref().map_or(Restrict::Dense, Restrict::Indices);
    let norm = if u.arbitrary()? {
        Normalizer::Softmax
    } else {
        Normalizer::Entmax { alpha: alpha(u)? }
    };
    let cpu = cpu(u)?;
    let pp = PagedDecodeParams {
        geom,
        pages: &table,
        scale: None,
        normalizer: &norm,
        restrict,
    };
    let cp = DecodeParams {
        geom,
        segments: &packed,
        scale: None,
        normalizer: &norm,
        restrict,
    };
    let nw = evidence_blocks(&geom, &packed, Heads::Mean, &vec![1; batch])
        .expect("blocks")
        .total();
    let ctx = || format!("{table:?} {norm:?} tame {tame_run} list {list:?} {:?}", cpu.isa());
    let mut outs = Vec::new();
    let mut accepted = Vec::new();
    for paged in [true, false] {
        for on_cpu in [false, true] {
            let mut out = vec![0.0f32; q.len()];
            let mut w = vec![0.0f32; nw];
            macro_rules! ev {
                () => {
                    DecodeEvidence {
                        probs: Some((Heads::Mean, &mut w)),
                        ..DecodeEvidence::default()
                    }
                };
            }
            let r = match (paged, on_cpu) {
                (true, false) => ops::decode_attention_paged_with(
                    &Reference,
                    &pp,
                    &q,
                    &kp,
                    &vp,
                    &mut out,
                    ev!(),
                ),
                (true, true) => {
                    ops::decode_attention_paged_with(&cpu, &pp, &q, &kp, &vp, &mut out, ev!())
                }
                (false, false) => {
                    ops::decode_attention_with(&Reference, &cp, &q, &kc, &vc, &mut out, ev!())
                }
                (false, true) => {
                    ops::decode_attention_with(&cpu, &cp, &q, &kc, &vc, &mut out, ev!())
                }
            };
            accepted.push(r.is_ok());
            outs.push((out, w));
        }
    }
    assert!(
        accepted.iter().all(|&a| a == accepted[0]),
        "{accepted:?}: {}",
        ctx()
    );
    if !accepted[0] {
        return Ok(());
    }
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for (name, i) in [("reference", 0), ("cpu", 1)] {
        assert_eq!(bits(&outs[i].0), bits(&outs[i + 2].0), "{name} out: {}", ctx());
        assert_eq!(bits(&outs[i].1), bits(&outs[i + 2].1), "{name} weights: {}", ctx());
    }
    if tame_run {
        assert_all_close(&outs[1].0, &outs[0].0, 1e-4, 5e-5, &|| {
            format!("cpu vs reference {}", ctx())
        });
    }

    // Eviction within the pages against the contiguous compaction.
    let drop_sets: Vec<IndexSet> = (0..nseg)
        .map(|s| {
            IndexSet::new(
                (0..lens[s])
                    .filter(|_| u.int_in_range(0u8..=3).unwrap_or(0) == 0)
                    .collect(),
            )
            .expect("increasing")
        })
        .collect();
    let drop = IndexList::from_sets(Scope::KvHead, &drop_sets).expect("lists");
    let (mut kp2, mut vp2) = (kp.clone(), vp.clone());
    let Ok(c) = ops::drop_paged(&cpu, d, &table, &drop, &mut kp2, &mut vp2) else {
        return Ok(());
    };
    let mut kc2 = kc.clone();
    let new_packed = ops::drop_rows(&Reference, d, &packed, &drop, &mut kc2).expect("contiguous");
    let got = gather(&kp2, &c.table);
    let want: Vec<f32> = (0..nseg)
        .flat_map(|s| kc2[new_packed.offset(s) * d..][..new_packed.len_of(s) * d].to_vec())
        .collect();
    assert_eq!(bits(&got), bits(&want), "drop_paged rows: {}", ctx());
    for &p in c.freed() {
        assert!(
            !c.table.page_indices().contains(&p),
            "freed page {p} still in the table: {}",
            ctx()
        );
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
