//! The layout constructors and their checks, with fuzzed (also absurd)
//! sizes: `HeadGeometry`, `Ragged`, `Segments`, `IndexSet`, `BitMask`,
//! `IndexList`, `MaskList`.
//!
//! Invariants: every constructor returns `Ok` or an error (never a panic or
//! an abort), and what it returns satisfies the type's documented invariants
//! (non-decreasing `indptr` from 0, non-overlapping segments within
//! `rows_needed`, strictly increasing index sets, no mask bit at or past the
//! length, `check_against` = every index inside its segment); the
//! accessors documented as total (`BitMask::get`, `MaskList::get`) answer
//! every index.
#![no_main]

use kvsieve::*;
use kvsieve_fuzz::*;
use libfuzzer_sys::fuzz_target;

fn check_ragged(r: &Ragged) {
    let p = r.indptr();
    assert_eq!(p[0], 0);
    assert!(p.windows(2).all(|w| w[0] <= w[1]), "{p:?}");
    assert_eq!(r.total(), *p.last().unwrap() as usize);
    assert_eq!(r.lens().sum::<usize>(), r.total());
    for i in 0..r.num_segments() {
        assert_eq!(r.range(i).len(), r.len_of(i));
    }
}

fn check_segments(s: &Segments) {
    assert_eq!(s.num_segments(), s.batch() * s.num_kv_heads());
    let mut spans: Vec<(usize, usize)> = (0..s.num_segments())
        .map(|i| (s.offset(i), s.offset(i) + s.len_of(i)))
        .filter(|r| r.1 > r.0)
        .collect();
    spans.sort();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "overlap {spans:?}"
    );
    assert!(spans.iter().all(|r| r.1 <= s.rows_needed()));
    assert!(s.rows_needed() <= u32::MAX as usize);
}

fn geometry(u: &mut Unstructured<'_>) -> Res<Option<HeadGeometry>> {
    let (hq, hkv, d) = (size(u, 8)?, size(u, 4)?, size(u, 16)?);
    let g = HeadGeometry::new(hq, hkv, d);
    match &g {
        Ok(g) => {
            assert!(hq > 0 && hkv > 0 && d > 0 && hq % hkv == 0);
            assert!(hq.checked_mul(d).is_some_and(|w| w <= u32::MAX as usize));
            assert_eq!(g.group() * g.num_kv_heads(), g.num_q_heads());
            for h in 0..g.num_q_heads().min(64) {
                assert!(g.kv_head(h) < g.num_kv_heads());
            }
        }
        Err(Error::Shape { .. } | Error::TooLarge { .. }) => {}
        Err(e) => panic!("HeadGeometry::new({hq}, {hkv}, {d}): {e:?}"),
    }
    Ok(g.ok())
}

fn segments(u: &mut Unstructured<'_>) -> Res<Option<Segments>> {
    let (batch, hkv) = (size(u, 3)?, size(u, 3)?);
    let n = batch.saturating_mul(hkv).min(16);
    let lens: Vec<u32> = (0..n + usize::from(u.ratio(1, 16)?))
        .map(|_| {
            if u.ratio(1, 16)? {
                u.arbitrary()
            } else {
                u.int_in_range(0..=50)
            }
        })
        .collect::<Res<_>>()?;
    let s = match u.int_in_range(0u8..=3)? {
        0 => Segments::uniform(batch, hkv, size(u, 50)?),
        1 => Segments::packed(batch, hkv, &lens),
        2 => Segments::with_capacity(batch, hkv, size(u, 60)?, lens.clone()),
        _ => {
            let offsets: Vec<u32> = (0..lens.len())
                .map(|_| {
                    if u.ratio(1, 16)? {
                        u.arbitrary()
                    } else {
                        u.int_in_range(0..=200)
                    }
                })
                .collect::<Res<_>>()?;
            Segments::new(batch, hkv, offsets, lens.clone())
        }
    };
    if let Ok(s) = &s {
        check_segments(s);
        let shrunk: Vec<u32> = s.lens().iter().map(|&l| l / 2).collect();
        check_segments(&s.shrink_to(shrunk).expect("shorter lengths"));
        assert!(s.shrink_to(vec![0; s.num_segments() + 1]).is_err());
    }
    Ok(s.ok())
}

fn run(u: &mut Unstructured<'_>) -> Res<()> {
    // Ragged.
    let lens: Vec<u32> = (0..u.int_in_range(0..=10)?)
        .map(|_| u.arbitrary())
        .collect::<Res<_>>()?;
    if let Ok(r) = Ragged::from_lens(&lens) {
        check_ragged(&r);
        assert_eq!(r.num_segments(), lens.len());
        check_ragged(&Ragged::new(r.indptr().to_vec()).expect("valid indptr"));
    } else {
        assert!(lens.iter().map(|&l| u64::from(l)).sum::<u64>() > u64::from(u32::MAX));
    }
    let raw: Vec<u32> = (0..u.int_in_range(0..=6)?)
        .map(|_| u.int_in_range(0..=20))
        .collect::<Res<_>>()?;
    if let Ok(r) = Ragged::new(raw) {
        check_ragged(&r);
    }
    let (n, len) = (size(u, 20)?, size(u, 20)?);
    if let Ok(r) = Ragged::uniform(n, len) {
        check_ragged(&r);
        assert!(r.lens().all(|l| l == len) && r.num_segments() == n);
    }

    // Geometry, segments, index sets and masks.
    let geom = geometry(u)?;
    let segs = segments(u)?;
    let idx: Vec<u32> = (0..u.int_in_range(0..=12)?)
        .map(|_| u.int_in_range(0..=70))
        .collect::<Res<_>>()?;
    let set = IndexSet::from_unsorted(idx.clone());
    assert!(set.as_slice().windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        IndexSet::new(idx.clone()).is_ok(),
        idx.windows(2).all(|w| w[0] < w[1])
    );
    let mlen = size(u, 80)?;
    match BitMask::from_indices(mlen, &set) {
        Ok(m) => {
            assert_eq!(m.len(), mlen);
            assert_eq!(m.to_indices(), set);
            assert_eq!(m.count_ones(), set.len());
            assert!(!m.get(mlen) && !m.get(usize::MAX));
            let again = BitMask::from_words(mlen, m.words().to_vec()).expect("own words");
            assert_eq!(again, m);
        }
        Err(Error::Shape { .. }) => assert!(set.bound() > mlen),
        Err(Error::TooLarge { .. }) => assert!(mlen > BitMask::MAX_LEN),
        Err(e) => panic!("BitMask::from_indices: {e:?}"),
    }
    let words: Vec<u32> = (0..u.int_in_range(0..=4)?)
        .map(|_| u.arbitrary())
        .collect::<Res<_>>()?;
    let wlen = u.int_in_range(0..=140)?;
    if let Ok(m) = BitMask::from_words(wlen, words) {
        assert!((wlen..m.words().len() * 32).all(|i| (m.words()[i / 32] >> (i % 32)) & 1 == 0));
        assert_eq!(m.to_indices().len(), m.count_ones());
    }

    let (Some(geom), Some(segs)) = (geom, segs) else {
        return Ok(());
    };
    if geom.num_q_heads() > 64 {
        return Ok(());
    }
    let scope = if u.arbitrary()? {
        Scope::KvHead
    } else {
        Scope::QueryHead
    };
    let count = scope.count(segs.batch(), &geom).min(40) + usize::from(u.ratio(1, 8)?);
    let sets: Vec<IndexSet> = (0..count)
        .map(|_| {
            let n = u.int_in_range(0..=8)?;
            Ok(IndexSet::from_unsorted(
                (0..n).map(|_| u.int_in_range(0..=52)).collect::<Res<_>>()?,
            ))
        })
        .collect::<Res<_>>()?;
    let list = IndexList::from_sets(scope, &sets).expect("small lists");
    assert_eq!(list.num_lists(), sets.len());
    if list.check_against("fuzz", &geom, &segs).is_ok() {
        assert_eq!(segs.num_kv_heads(), geom.num_kv_heads());
        assert_eq!(list.num_lists(), scope.count(segs.batch(), &geom));
        for b in 0..segs.batch() {
            for h in 0..geom.num_q_heads() {
                let s = segs.index(b, geom.kv_head(h));
                let l = list.list(scope.list_of(b, h, &geom));
                assert!(l.iter().all(|&j| (j as usize) < segs.len_of(s)));
            }
        }
    }
    let masks: Vec<Vec<BitMask>> = (0..count)
        .map(|_| {
            let rows = u.int_in_range(0..=3)?;
            let cols = u.int_in_range(0..=52)?;
            (0..rows)
                .map(|_| {
                    let bits: Vec<bool> = (0..cols).map(|_| u.arbitrary()).collect::<Res<_>>()?;
                    Ok(BitMask::from_bools(&bits))
                })
                .collect()
        })
        .collect::<Res<_>>()?;
    let ml = MaskList::from_rows(scope, &masks).expect("small masks");
    for i in 0..ml.num_lists() + 2 {
        for (r, c) in [(0, 0), (1, 3), (2, 51), (usize::MAX, 0), (0, usize::MAX)] {
            let want = masks
                .get(i)
                .and_then(|m| m.get(r))
                .is_some_and(|m| m.get(c));
            assert_eq!(ml.get(i, r, c), want, "get({i}, {r}, {c})");
        }
    }
    let q_rows: Vec<usize> = (0..u.int_in_range(0..=4)?)
        .map(|_| u.int_in_range(0..=3))
        .collect::<Res<_>>()?;
    if ml.check_against("fuzz", &geom, &segs, &q_rows).is_ok() {
        assert_eq!(q_rows.len(), segs.batch());
        assert_eq!(ml.num_lists(), scope.count(segs.batch(), &geom));
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
