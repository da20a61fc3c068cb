//! DAM: the byte format (`Dam::from_bytes`, raw or with the checksum fixed
//! up so that the structure is reached) and calibration (`Dam::calibrate`
//! with fuzzed settings and maps), then the masks and index lists of the
//! parsed or calibrated masks on fuzzed geometries and segments.
//!
//! Invariants: errors, never panics; a parsed file re-serialises to the same
//! bytes; a calibrated `Dam` has valid patterns (diagonal 0, strictly
//! increasing) and round-trips through the byte format; `decode_indices`
//! lists exactly the set bits of `decode_mask`, which equals the last row of
//! `prefill_mask` and the patterns' `allows`.
#![no_main]

use kvsieve::policy::{Dam, DamConfig, DamThreshold};
use kvsieve::*;
use kvsieve_fuzz::*;
use libfuzzer_sys::fuzz_target;

/// FNV-1a, the format's checksum (`docs/policies/dam.md`).
fn fnv1a(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ u32::from(x)).wrapping_mul(0x0100_0193)
    })
}

fn check_dam(dam: &Dam, u: &mut Unstructured<'_>) -> Res<()> {
    let bytes = dam.to_bytes();
    assert_eq!(&Dam::from_bytes(&bytes).expect("own bytes"), dam);
    for l in 0..dam.num_layers() {
        for h in 0..dam.num_heads() {
            let p = dam.pattern(l, h).expect("in range");
            assert_eq!(p.diagonals.first(), Some(&0));
            assert!(p.diagonals.windows(2).all(|w| w[0] < w[1]));
            assert!(p.verticals.windows(2).all(|w| w[0] < w[1]));
        }
    }
    assert!(dam.pattern(dam.num_layers(), 0).is_none());
    // Masks on a geometry with the masks' head count (or not).
    let hq = if u.ratio(7, 8)? {
        dam.num_heads()
    } else {
        u.int_in_range(1..=8)?
    };
    if hq == 0 || hq > 16 {
        return Ok(());
    }
    let hkv = if u.arbitrary()? { hq } else { 1 };
    let geom = HeadGeometry::new(hq, hkv, 4).expect("small geometry");
    let batch = u.int_in_range(1..=2)?;
    let seg_heads = if u.ratio(15, 16)? { hkv } else { hkv + 1 };
    let lens: Vec<u32> = (0..batch * seg_heads)
        .map(|_| u.int_in_range(0..=70))
        .collect::<Res<_>>()?;
    let segs = Segments::packed(batch, seg_heads, &lens).expect("segments");
    let layer = if u.ratio(15, 16)? {
        u.int_in_range(0..=dam.num_layers() - 1)?
    } else {
        dam.num_layers()
    };
    let mask = dam.decode_mask(layer, &geom, &segs);
    let list = dam.decode_indices(layer, &geom, &segs);
    // An empty segment: decode_indices gives an empty list, decode_mask an
    // error (prefill_mask needs a cached token per query); else they agree.
    if lens.iter().all(|&l| l > 0) {
        assert_eq!(mask.is_ok(), list.is_ok(), "{mask:?} vs {list:?}");
    }
    let (Ok(mask), Ok(list)) = (mask, list) else {
        return Ok(());
    };
    let nq = u.int_in_range(1..=3)?;
    let q_rows = Ragged::uniform(batch, nq).expect("rows");
    let pre = dam.prefill_mask(layer, &geom, &q_rows, &segs);
    for b in 0..batch {
        for h in 0..hq {
            let i = b * hq + h;
            let kv = segs.len_of(segs.index(b, geom.kv_head(h)));
            let bits: Vec<u32> = (0..kv as u32)
                .filter(|&j| mask.get(i, 0, j as usize))
                .collect();
            assert_eq!(list.list(i), &bits[..], "list vs mask ({b}, {h})");
            let p = dam.pattern(layer, h).expect("in range");
            for j in 0..kv {
                assert_eq!(
                    mask.get(i, 0, j),
                    p.allows(kv - 1, j),
                    "allows ({b}, {h}, {j})"
                );
            }
            if let Ok(pre) = &pre
                && kv >= nq
            {
                for j in 0..kv {
                    assert_eq!(pre.get(i, nq - 1, j), mask.get(i, 0, j), "prefill last row");
                }
            }
        }
    }
    Ok(())
}

fn run(u: &mut Unstructured<'_>) -> Res<()> {
    if u.arbitrary()? {
        // The byte format.
        let fix = u.arbitrary::<bool>()?;
        let mut bytes = u.bytes(u.len())?.to_vec();
        if fix && bytes.len() >= 4 {
            let n = bytes.len() - 4;
            let sum = fnv1a(&bytes[..n]);
            bytes[n..].copy_from_slice(&sum.to_le_bytes());
        }
        match Dam::from_bytes(&bytes) {
            Ok(dam) => {
                assert_eq!(dam.to_bytes(), bytes, "not canonical");
                if dam.num_heads() <= 16 && dam.num_layers() <= 64 {
                    check_dam(&dam, &mut Unstructured::new(&bytes))?;
                }
            }
            Err(Error::Shape { .. }) => {}
            Err(e) => panic!("from_bytes: unexpected error kind {e:?}"),
        }
        return Ok(());
    }
    // Calibration.
    let pcl = if u.ratio(1, 16)? {
        size(u, 1)?
    } else {
        u.int_in_range(1..=12)?
    };
    let cfg = DamConfig {
        lambda: if u.ratio(1, 8)? {
            f32::from_bits(u.arbitrary()?)
        } else {
            tame(u)?
        },
        threshold: if u.arbitrary()? {
            DamThreshold::Fixed(if u.ratio(1, 8)? { wild(u)? } else { tame(u)? })
        } else {
            DamThreshold::Percentile(f32::from(u.int_in_range(-8i16..=108)?))
        },
        mu: f32::from(u.int_in_range(-2i8..=12)?) / 10.0,
        pcl,
        min_support: size(u, 20)?,
    };
    let layers = u.int_in_range(1..=2)?;
    let heads = u.int_in_range(1..=3)?;
    let cells = pcl.saturating_mul(pcl).min(144) + usize::from(u.ratio(1, 16)?);
    let wild_maps = u.ratio(1, 8)?;
    let maps: Vec<Vec<Vec<f32>>> = (0..layers)
        .map(|_| {
            (0..heads)
                .map(|_| {
                    (0..cells)
                        .map(|_| {
                            if wild_maps {
                                wild(u)
                            } else {
                                Ok(tame(u)?.abs() / 2.0)
                            }
                        })
                        .collect()
                })
                .collect()
        })
        .collect::<Res<_>>()?;
    let refs: Vec<Vec<&[f32]>> = maps
        .iter()
        .map(|l| l.iter().map(|m| m.as_slice()).collect())
        .collect();
    match Dam::calibrate(&cfg, &refs) {
        Ok(dam) => {
            assert!(cfg.validate().is_ok());
            assert_eq!(
                (dam.num_layers(), dam.num_heads(), dam.pcl()),
                (layers, heads, pcl)
            );
            check_dam(&dam, u)?;
        }
        Err(Error::InvalidConfig { .. } | Error::Shape { .. } | Error::NonFinite { .. }) => {}
        Err(e) => panic!("calibrate: unexpected error kind {e:?}"),
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
