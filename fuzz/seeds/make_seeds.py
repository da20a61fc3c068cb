#!/usr/bin/env python3
"""Writes the small seed corpora of the fuzz targets (fuzz/seeds/<target>/).

Structured targets decode their input with `arbitrary::Unstructured`, so any
bytes are valid seeds: a few deterministic pseudo-random inputs of several
lengths each. The byte-format targets also get valid files (a DAM mask file,
a safetensors and an npy trace) behind the selector bytes their `run` reads
first. Run from `fuzz/`: `python3 seeds/make_seeds.py`.
"""
import json
import os
import random
import struct

rng = random.Random(17)
here = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(here, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


for target in ["entmax_rows", "dam", "loaders", "layout", "decode", "prefill", "cache_ops"]:
    for i, n in enumerate([16, 64, 256, 1024, 4096]):
        put(target, f"random-{i}", bytes(rng.randrange(256) for _ in range(n)))


def fnv1a(b):
    h = 0x811C9DC5
    for x in b:
        h = ((h ^ x) * 0x01000193) & 0xFFFFFFFF
    return h


# A DAM file: 2 layers x 2 heads, pcl 8 (format of Dam::to_bytes).
body = b"KVSVDAM\0" + struct.pack("<H", 1) + struct.pack("<III", 2, 2, 8)
for diag, vert in [([0, 1], [0]), ([0], []), ([0, 2, 5], [1, 3]), ([0, 1, 2], [7])]:
    body += struct.pack("<II", len(diag), len(vert))
    body += b"".join(struct.pack("<I", x) for x in diag + vert)
dam = body + struct.pack("<I", fnv1a(body))
# `run` reads a bool (1 byte, odd = bytes mode), then `fix` (even = keep).
put("dam", "valid-file", b"\x01\x00" + dam)


def npy(shape, values):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d, %d), }" % shape
    while (10 + len(header) + 1) % 64:
        header += " "
    header += "\n"
    return (b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
            + b"".join(struct.pack("<f", v) for v in values))


t, hq, hkv, d = 3, 2, 1, 2
tensors, data = {}, b""
for name, h in [("q", hq), ("k", hkv), ("v", hkv)]:
    vals = [rng.randrange(-128, 129) / 64 for _ in range(t * h * d)]
    raw = b"".join(struct.pack("<f", v) for v in vals)
    tensors[f"layers.0.{name}"] = {"dtype": "F32", "shape": [t, h, d],
                                   "data_offsets": [len(data), len(data) + len(raw)]}
    data += raw
tensors["__metadata__"] = {"prompt_len": "2"}
header = json.dumps(tensors, separators=(",", ":")).encode()
st = struct.pack("<Q", len(header)) + header + data
# `run` reads a selector in 0..=3 first (one byte, 0 = raw safetensors bytes).
put("loaders", "valid-safetensors", b"\x00" + st)
q = npy((t, hq, d), [0.5] * (t * hq * d))
k = npy((t, hkv, d), [0.25] * (t * hkv * d))
# Selector 2: the input split in two npy files (q, then k = v = the rest).
put("loaders", "valid-npy", b"\x02" + bytes([len(q) & 0xFF]) + q + k)


# The policies target (added later; its own generator, so the seeds above
# stay as they were).
prng = random.Random(23)
for i, n in enumerate([16, 64, 256, 1024, 4096]):
    put("policies", f"random-{i}", bytes(prng.randrange(256) for _ in range(n)))
