//! Loading (and writing) Q/K/V traces captured from a real model.
//!
//! Two formats, both described in `docs/layouts.md` ("Traces"):
//!
//! - **safetensors**: one file with tensors `layers.{l}.q` `[T, Hq, D]`,
//!   `layers.{l}.k` and `layers.{l}.v` `[T, Hkv, D]` for `l = 0 .. L`
//!   (F32, F16 or BF16), and the metadata entry `prompt_len`.
//! - **npy**: a directory with `layer{l}.q.npy`, `layer{l}.k.npy`,
//!   `layer{l}.v.npy` (little-endian `<f4` or `<f2`, C order, 3-D as above)
//!   and a text file `prompt_len` holding the prompt length.
//!
//! `docs/capture_traces.py` writes the safetensors form from a Hugging Face
//! model.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use super::{LayerTrace, Trace};
use crate::error::{Error, Result, Size};

fn io_err(path: &Path, reason: impl Into<String>) -> Error {
    Error::Io {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// A 3-D f32 tensor read from a file.
struct Tensor3 {
    shape: [usize; 3],
    data: Vec<f32>,
}

/// Loads a trace from a `.safetensors` file or an npy directory.
pub fn load(path: &Path) -> Result<Trace> {
    if path.is_dir() {
        load_npy_dir(path)
    } else {
        load_safetensors(path)
    }
}

/// Loads a `.safetensors` trace.
pub fn load_safetensors(path: &Path) -> Result<Trace> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, format!("cannot read: {e}")))?;
    parse_safetensors(path, &bytes)
}

/// [`load_safetensors`] on the bytes of a file (errors name the path `<bytes>`).
pub fn load_safetensors_bytes(bytes: &[u8]) -> Result<Trace> {
    parse_safetensors(Path::new("<bytes>"), bytes)
}

fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Trace> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| io_err(path, format!("not a safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| io_err(path, format!("not a safetensors file: {e}")))?;
    let prompt_len: usize = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("prompt_len"))
        .ok_or_else(|| io_err(path, "metadata entry `prompt_len` is missing"))?
        .parse()
        .map_err(|e| io_err(path, format!("metadata `prompt_len`: {e}")))?;
    let mut layers = Vec::new();
    loop {
        let l = layers.len();
        let name = |x: &str| format!("layers.{l}.{x}");
        let Ok(q) = st.tensor(&name("q")) else { break };
        let get = |view: TensorView<'_>, what: &str| -> Result<Tensor3> {
            let shape: [usize; 3] = view.shape().try_into().map_err(|_| {
                io_err(
                    path,
                    format!("{what}: expected 3 dimensions, got {:?}", view.shape()),
                )
            })?;
            let data = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                Dtype::F16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                Dtype::BF16 => view
                    .data()
                    .chunks_exact(2)
                    .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                other => {
                    return Err(io_err(
                        path,
                        format!("{what}: dtype {other:?} is not F32, F16 or BF16"),
                    ));
                }
            };
            Ok(Tensor3 { shape, data })
        };
        let q = get(q, &name("q"))?;
        let k = get(
            st.tensor(&name("k"))
                .map_err(|_| io_err(path, format!("{} is missing", name("k"))))?,
            &name("k"),
        )?;
        let v = get(
            st.tensor(&name("v"))
                .map_err(|_| io_err(path, format!("{} is missing", name("v"))))?,
            &name("v"),
        )?;
        layers.push((q, k, v));
    }
    assemble(path, prompt_len, layers)
}

/// Loads an npy-directory trace.
pub fn load_npy_dir(dir: &Path) -> Result<Trace> {
    let pl_path = dir.join("prompt_len");
    let prompt_len = parse_prompt_len(
        &pl_path,
        &std::fs::read_to_string(&pl_path)
            .map_err(|e| io_err(&pl_path, format!("cannot read: {e}")))?,
    )?;
    let mut layers = Vec::new();
    while dir.join(format!("layer{}.q.npy", layers.len())).exists() {
        let l = layers.len();
        let read = |x: &str| read_npy(&dir.join(format!("layer{l}.{x}.npy")));
        layers.push((read("q")?, read("k")?, read("v")?));
    }
    assemble(dir, prompt_len, layers)
}

/// [`load_npy_dir`] on in-memory files: the text of `prompt_len` and, per
/// layer, the bytes of its q, k and v `.npy` files (errors name `<bytes>`).
pub fn load_npy_bytes(prompt_len: &str, layers: &[[&[u8]; 3]]) -> Result<Trace> {
    let path = Path::new("<bytes>");
    let prompt_len = parse_prompt_len(path, prompt_len)?;
    let layers = layers
        .iter()
        .map(|[q, k, v]| {
            Ok((
                parse_npy(path, q)?,
                parse_npy(path, k)?,
                parse_npy(path, v)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    assemble(path, prompt_len, layers)
}

fn parse_prompt_len(path: &Path, text: &str) -> Result<usize> {
    text.trim()
        .parse()
        .map_err(|e| io_err(path, format!("not a number: {e}")))
}

/// Checks shapes across layers and builds the trace.
fn assemble(
    path: &Path,
    prompt_len: usize,
    layers: Vec<(Tensor3, Tensor3, Tensor3)>,
) -> Result<Trace> {
    let Some((q0, k0, _)) = layers.first() else {
        return Err(io_err(
            path,
            "no layer found (expected layers.0.q / layer0.q.npy)",
        ));
    };
    let [t, hq, d] = q0.shape;
    let hkv = k0.shape[1];
    if hq == 0 || hkv == 0 || hq % hkv != 0 || d == 0 || t == 0 {
        return Err(io_err(
            path,
            format!("bad shapes: q {:?}, k {:?}", q0.shape, k0.shape),
        ));
    }
    if prompt_len == 0 || prompt_len > t {
        return Err(io_err(
            path,
            format!("prompt_len = {prompt_len} must be in 1..={t}"),
        ));
    }
    let mut out = Vec::with_capacity(layers.len());
    for (l, (q, k, v)) in layers.into_iter().enumerate() {
        if q.shape != [t, hq, d] || k.shape != [t, hkv, d] || v.shape != [t, hkv, d] {
            return Err(io_err(
                path,
                format!(
                    "layer {l}: shapes q {:?}, k {:?}, v {:?} differ from layer 0",
                    q.shape, k.shape, v.shape
                ),
            ));
        }
        if [&q.data, &k.data, &v.data]
            .iter()
            .any(|x| x.iter().any(|f| !f.is_finite()))
        {
            return Err(io_err(path, format!("layer {l}: non-finite values")));
        }
        out.push(LayerTrace {
            q: q.data,
            k: k.data,
            v: v.data,
        });
    }
    Ok(Trace {
        q_heads: hq,
        kv_heads: hkv,
        head_dim: d,
        prompt_len,
        decode_steps: t - prompt_len,
        layers: out,
        needles: Vec::new(),
    })
}

/// Reads a 3-D little-endian `<f4` or `<f2` C-order `.npy` file.
fn read_npy(path: &Path) -> Result<Tensor3> {
    let bytes = std::fs::read(path).map_err(|e| io_err(path, format!("cannot read: {e}")))?;
    parse_npy(path, &bytes)
}

/// Parses the bytes of a `.npy` file (see [`read_npy`]).
fn parse_npy(path: &Path, bytes: &[u8]) -> Result<Tensor3> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(io_err(path, "not an .npy file (bad magic)"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(io_err(path, format!("unsupported .npy version {v}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or_else(|| io_err(path, "truncated or non-UTF-8 header"))?;
    let field = |key: &str| -> Option<&str> {
        let at = header.find(&format!("'{key}'"))? + key.len() + 2;
        Some(header[at..].trim_start().strip_prefix(':')?.trim_start())
    };
    let descr = field("descr")
        .and_then(|s| s.strip_prefix('\''))
        .and_then(|s| s.split('\'').next());
    let size = match descr {
        Some("<f4") => 4,
        Some("<f2") => 2,
        other => {
            return Err(io_err(
                path,
                format!("dtype {other:?} is not '<f4' or '<f2'"),
            ));
        }
    };
    if field("fortran_order").is_some_and(|s| s.starts_with("True")) {
        return Err(io_err(path, "Fortran-ordered arrays are not supported"));
    }
    let dims: Vec<usize> = field("shape")
        .and_then(|s| s.strip_prefix('('))
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| io_err(path, "no shape in the header"))?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|e| io_err(path, format!("shape: {e}")))
        })
        .collect::<Result<_>>()?;
    let shape: [usize; 3] = dims
        .as_slice()
        .try_into()
        .map_err(|_| io_err(path, format!("expected 3 dimensions, got {dims:?}")))?;
    const OP: &str = "read_npy";
    let data_bytes = Size::new(OP, "data bytes (shape x dtype size)", shape[0])
        .times(shape[1])
        .times(shape[2])
        .times(size);
    let body = &bytes[start + hlen..];
    if data_bytes.get().ok() != Some(body.len()) {
        return Err(io_err(
            path,
            format!(
                "shape {shape:?} of {size}-byte values needs {} data bytes, found {}",
                data_bytes.value(),
                body.len()
            ),
        ));
    }
    let data = if size == 4 {
        body.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    } else {
        body.chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect()
    };
    Ok(Tensor3 { shape, data })
}

/// Writes a 3-D `<f4` `.npy` file.
pub fn write_npy(path: &Path, shape: [usize; 3], data: &[f32]) -> Result<()> {
    if shape.iter().product::<usize>() != data.len() {
        return Err(io_err(path, "data length does not match the shape"));
    }
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}, {}, {}), }}",
        shape[0], shape[1], shape[2]
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(data.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::write(path, bytes).map_err(|e| io_err(path, format!("cannot write: {e}")))
}

/// Writes a trace as an npy directory (created if missing).
pub fn save_npy_dir(trace: &Trace, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, format!("cannot create: {e}")))?;
    let t = trace.len();
    for (l, layer) in trace.layers.iter().enumerate() {
        write_npy(
            &dir.join(format!("layer{l}.q.npy")),
            [t, trace.q_heads, trace.head_dim],
            &layer.q,
        )?;
        write_npy(
            &dir.join(format!("layer{l}.k.npy")),
            [t, trace.kv_heads, trace.head_dim],
            &layer.k,
        )?;
        write_npy(
            &dir.join(format!("layer{l}.v.npy")),
            [t, trace.kv_heads, trace.head_dim],
            &layer.v,
        )?;
    }
    let pl = dir.join("prompt_len");
    std::fs::write(&pl, trace.prompt_len.to_string())
        .map_err(|e| io_err(&pl, format!("cannot write: {e}")))
}

/// Writes a trace as a `.safetensors` file (F32).
pub fn save_safetensors(trace: &Trace, path: &Path) -> Result<()> {
    let t = trace.len();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = trace
        .layers
        .iter()
        .enumerate()
        .flat_map(|(l, layer)| {
            [
                ("q", trace.q_heads, &layer.q),
                ("k", trace.kv_heads, &layer.k),
                ("v", trace.kv_heads, &layer.v),
            ]
            .map(|(x, h, data)| {
                (
                    format!("layers.{l}.{x}"),
                    vec![t, h, trace.head_dim],
                    data.iter().flat_map(|f| f.to_le_bytes()).collect(),
                )
            })
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
                .map_err(|e| io_err(path, format!("{name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("prompt_len".to_string(), trace.prompt_len.to_string())]);
    let out = safetensors::serialize(views, Some(meta))
        .map_err(|e| io_err(path, format!("serialize: {e}")))?;
    std::fs::write(path, out).map_err(|e| io_err(path, format!("cannot write: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::TraceConfig;

    fn small() -> Trace {
        let cfg = TraceConfig {
            prompt_len: 40,
            decode_steps: 3,
            layers: 2,
            head_dim: 8,
            needles: 1,
            heavy_hitters: 2,
            ..Default::default()
        };
        let mut t = Trace::synthetic(&cfg).unwrap();
        t.needles.clear();
        t
    }

    #[test]
    fn round_trips_through_both_formats() {
        let dir = std::env::temp_dir().join(format!("kvsieve-io-{}", std::process::id()));
        let tr = small();
        save_npy_dir(&tr, &dir.join("npy")).unwrap();
        assert_eq!(load(&dir.join("npy")).unwrap(), tr);
        save_safetensors(&tr, &dir.join("t.safetensors")).unwrap();
        assert_eq!(load(&dir.join("t.safetensors")).unwrap(), tr);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unreadable_files_give_errors() {
        let dir = std::env::temp_dir().join(format!("kvsieve-io-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            load(&dir.join("missing.safetensors")),
            Err(Error::Io { .. })
        ));
        std::fs::write(dir.join("junk.safetensors"), b"not a tensor file").unwrap();
        assert!(load(&dir.join("junk.safetensors")).is_err());
        // An npy directory without prompt_len, then with a truncated file.
        assert!(load(&dir).is_err());
        std::fs::write(dir.join("prompt_len"), "3").unwrap();
        std::fs::write(
            dir.join("layer0.q.npy"),
            b"\x93NUMPY\x01\x00\x10\x00{'descr'",
        )
        .unwrap();
        assert!(load(&dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
