//! The trace loaders: `eval::io::load_safetensors_bytes` and
//! `eval::io::load_npy_bytes`, on raw bytes or on files built from fuzzed
//! headers (shapes, dtypes, prompt lengths, metadata) so that the parsers'
//! later stages are reached.
//!
//! Invariants: errors, never panics or aborts; an accepted trace is
//! consistent: at least one layer, `q` of `T·Hq·D` values and `k`, `v` of
//! `T·Hkv·D` per layer, `Hkv` dividing `Hq`, `1 ≤ prompt_len ≤ T`,
//! `decode_steps = T − prompt_len`, every value finite, and the tensors equal
//! to the bytes given.
#![no_main]

use kvsieve::Error;
use kvsieve::eval::Trace;
use kvsieve::eval::io::{load_npy_bytes, load_safetensors_bytes};
use kvsieve_fuzz::*;
use libfuzzer_sys::fuzz_target;

fn check(t: &Trace) {
    assert!(!t.layers.is_empty());
    assert!(t.q_heads > 0 && t.kv_heads > 0 && t.head_dim > 0);
    assert_eq!(t.q_heads % t.kv_heads, 0);
    assert!(t.prompt_len >= 1);
    let n = t.prompt_len + t.decode_steps;
    for l in &t.layers {
        assert_eq!(l.q.len(), n * t.q_heads * t.head_dim);
        assert_eq!(l.k.len(), n * t.kv_heads * t.head_dim);
        assert_eq!(l.v.len(), l.k.len());
        assert!(l.q.iter().chain(&l.k).chain(&l.v).all(|x| x.is_finite()));
    }
}

/// A 3-D dimension: small, zero, or absurd.
fn dim(u: &mut Unstructured<'_>) -> Res<usize> {
    if u.ratio(1, 16)? {
        return Ok(*u.choose(&[0, usize::MAX, 1 << 62, (1 << 32) + 1])?);
    }
    u.int_in_range(1..=4)
}

/// The bytes of a `.npy` file with a fuzzed header and `f32`/`f16` data.
fn npy(u: &mut Unstructured<'_>, shape: [usize; 3]) -> Res<(Vec<u8>, Vec<f32>)> {
    let descr = *u.choose(&["<f4", "<f2", "<f8", "|u1", ">f4"])?;
    let fortran = if u.ratio(1, 16)? { "True" } else { "False" };
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': ({}, {}, {}), }}",
        shape[0], shape[1], shape[2]
    );
    if u.ratio(1, 16)? {
        header.truncate(u.int_in_range(0..=header.len())?);
    }
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((header.len() as u16).to_le_bytes());
    b.extend(header.as_bytes());
    let n = shape
        .iter()
        .try_fold(1usize, |a, &x| a.checked_mul(x))
        .unwrap_or(usize::MAX);
    let n = if n <= 64 { n } else { u.int_in_range(0..=64)? };
    let n = n + usize::from(u.ratio(1, 16)?);
    let mut vals = Vec::with_capacity(n);
    for _ in 0..n {
        let x = if u.ratio(1, 32)? { f32::NAN } else { tame(u)? };
        vals.push(x);
        match descr {
            "<f2" => b.extend(half::f16::from_f32(x).to_le_bytes()),
            _ => b.extend(x.to_le_bytes()),
        }
    }
    Ok((b, vals))
}

/// A safetensors file with fuzzed tensors (names, dtypes, shapes) and
/// metadata.
fn safetensors(u: &mut Unstructured<'_>) -> Res<Vec<u8>> {
    let layers = u.int_in_range(0..=2)?;
    let (t, hq, hkv, d) = (dim(u)?, dim(u)?, dim(u)?, dim(u)?);
    let mut entries = Vec::new();
    let mut data = Vec::new();
    for l in 0..layers {
        for (x, h) in [("q", hq), ("k", hkv), ("v", hkv)] {
            if u.ratio(1, 32)? {
                continue;
            }
            let dtype = *u.choose(&["F32", "F16", "BF16", "I8"])?;
            let size = if dtype == "F32" {
                4
            } else if dtype == "I8" {
                1
            } else {
                2
            };
            let n = t.saturating_mul(h).saturating_mul(d).min(64);
            let start = data.len();
            for _ in 0..n * size {
                data.push(if u.ratio(1, 64)? {
                    0xff
                } else {
                    u.int_in_range(0u8..=0x3f)?
                });
            }
            let end = data.len() + usize::from(u.ratio(1, 32)?);
            entries.push(format!(
                "\"layers.{l}.{x}\":{{\"dtype\":\"{dtype}\",\"shape\":[{t},{h},{d}],\"data_offsets\":[{start},{end}]}}"
            ));
        }
    }
    let pl = if u.ratio(1, 16)? {
        "x".to_string()
    } else {
        u.int_in_range(0u32..=5)?.to_string()
    };
    if u.ratio(7, 8)? {
        entries.push(format!("\"__metadata__\":{{\"prompt_len\":\"{pl}\"}}"));
    }
    let header = format!("{{{}}}", entries.join(","));
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    Ok(b)
}

fn run(u: &mut Unstructured<'_>) -> Res<()> {
    match u.int_in_range(0u8..=3)? {
        0 => {
            let bytes = u.bytes(u.len())?;
            if let Ok(t) = load_safetensors_bytes(bytes) {
                check(&t);
            }
        }
        1 => {
            let bytes = safetensors(u)?;
            match load_safetensors_bytes(&bytes) {
                Ok(t) => check(&t),
                Err(Error::Io { .. }) => {}
                Err(e) => panic!("load_safetensors_bytes: {e:?}"),
            }
        }
        2 => {
            let cut = u.int_in_range(0..=u.len())?;
            let a = u.bytes(cut)?;
            let rest = u.bytes(u.len())?;
            let _ = load_npy_bytes("1", &[[a, rest, a]]).map(|t| check(&t));
        }
        _ => {
            let layers = u.int_in_range(0..=2)?;
            let (t, hq, hkv, d) = (dim(u)?, dim(u)?, dim(u)?, dim(u)?);
            let mut files = Vec::new();
            let mut vals = Vec::new();
            for _ in 0..layers {
                let (q, qv) = npy(u, [t, hq, d])?;
                let (k, kv) = npy(u, [t, hkv, d])?;
                let (v, vv) = npy(u, [t, hkv, d])?;
                files.push([q, k, v]);
                vals.push([qv, kv, vv]);
            }
            let pl = if u.ratio(1, 16)? {
                " x".to_string()
            } else {
                format!("{}\n", u.int_in_range(0u32..=5)?)
            };
            let refs: Vec<[&[u8]; 3]> = files
                .iter()
                .map(|[q, k, v]| [q.as_slice(), k.as_slice(), v.as_slice()])
                .collect();
            match load_npy_bytes(&pl, &refs) {
                Ok(tr) => {
                    check(&tr);
                    for (l, layer) in tr.layers.iter().enumerate() {
                        for (got, want) in [&layer.q, &layer.k, &layer.v].into_iter().zip(&vals[l])
                        {
                            // f16 files round the values; tame values are exact in f16.
                            assert_eq!(got, want, "layer {l}");
                        }
                    }
                }
                Err(Error::Io { .. }) => {}
                Err(e) => panic!("load_npy_bytes: {e:?}"),
            }
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
