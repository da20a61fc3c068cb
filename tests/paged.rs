//! Paged KV (issue #14, phase 1): decode attention over page tables, page
//! table validation, and the cache ops on pages, on every backend.
//!
//! Every test name contains `paged` (the check runs
//! `cargo test paged`). Each decode case builds a contiguous cache
//! (`Segments::packed`) and the same tokens in a page pool: random page
//! tables with the pages in shuffled order, ragged lengths (a table of 0
//! tokens, `last_page_len` 1 and `P`), both layouts, one table per sequence
//! or per KV head (independent page orders per head, so one physical page
//! serves several heads), and every row the tables do not reach — slots past
//! `last_page_len`, pages in no table, other heads' slots — set to NaN, so a
//! kernel that read one would return NaN. The paged output must be the
//! contiguous op's output on the same backend (bitwise on the reference, the
//! CPU backend and CUDA, whose paged paths compute every dot and value chain
//! in the same order) and agree with the reference within the presets of
//! `docs/numerics.md`.
//!
//! The CUDA backend runs the same decode tests (its decode kernels with a
//! paged row map; on the SIMT simulator where there is no GPU), bitwise
//! against its contiguous decode. Backends
//! without a paged decode kernel yet (wgpu: a later phase) must return
//! `Error::Unsupported` for it, which the decode tests assert; the cache ops
//! and the validation run for real on them.

mod common;

use common::*;
use half::{bf16, f16};
use kvsieve::backend::{DecodeEvidence, Heads, evidence_blocks};
use kvsieve::ops::{self, DecodeParams, PagedAppendParams, PagedDecodeParams};
use kvsieve::reference::Reference;
use kvsieve::*;

const LAYOUTS: [PageLayout; 2] = [PageLayout::Hnd, PageLayout::Nhd];
const SCOPES: [PageScope; 2] = [PageScope::Sequence, PageScope::KvHead];
const HEADS: [Heads; 4] = [Heads::PerHead, Heads::Sum, Heads::Mean, Heads::Max];

/// Attention output tolerance for f32 storage (`docs/numerics.md`,
/// "attention output, f32 storage").
const ATTN_F32: Tolerance = Tolerance {
    rel: 1e-4,
    abs: 5e-5,
};

fn up<B: Backend, T: Element>(b: &B, x: &[T]) -> B::Buffer<T> {
    b.upload(x).expect("upload")
}
fn down<B: Backend, T: Element>(b: &B, x: &B::Buffer<T>) -> Vec<T> {
    b.download(x).expect("download")
}
fn wide<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f64()).collect()
}
fn widen<T: Element>(x: &[T]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}
fn eps_of(d: DType) -> f64 {
    match d {
        DType::F32 => f64::from(f32::EPSILON),
        DType::F16 => 2f64.powi(-10),
        DType::BF16 => 2f64.powi(-7),
    }
}

/// Whether the backend implements the paged op with the contiguous op's
/// arithmetic, so that it must match it bitwise: the reference, the CPU
/// backend, and CUDA (the same kernels and plan; only the row addresses
/// differ).
fn bitwise(b: &impl Backend) -> bool {
    matches!(b.name(), "reference" | "cpu" | "cuda")
}

/// Equal, or both NaN (the poisoned rows of a pool).
fn same<T: Element>(a: T, b: T) -> bool {
    a == b || (a.to_f64().is_nan() && b.to_f64().is_nan())
}

/// A Fisher–Yates shuffle of `0 .. n`.
fn shuffled(rng: &mut Rng, n: usize) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        v.swap(i, rng.below(i + 1));
    }
    v
}

/// A page table for segment lengths `seg_lens` (`s = b · Hkv + g`; equal
/// over the heads of a sequence for `PageScope::Sequence`) with the pages
/// in shuffled order and `spare` pages in no table. Per-KV-head tables draw
/// their pages from one shuffled order per head, so a page serves several
/// heads (disjoint rows).
fn random_table(
    rng: &mut Rng,
    layout: PageLayout,
    scope: PageScope,
    p: usize,
    hkv: usize,
    seg_lens: &[u32],
    spare: usize,
) -> PageTable {
    let batch = seg_lens.len() / hkv;
    let lens: Vec<usize> = match scope {
        PageScope::Sequence => (0..batch).map(|b| seg_lens[b * hkv] as usize).collect(),
        PageScope::KvHead => seg_lens.iter().map(|&l| l as usize).collect(),
    };
    let need = |g: Option<usize>| -> usize {
        lens.iter()
            .enumerate()
            .filter(|(i, _)| g.is_none_or(|g| i % hkv == g))
            .map(|(_, l)| l.div_ceil(p))
            .sum()
    };
    let num_pages = match scope {
        PageScope::Sequence => need(None),
        PageScope::KvHead => (0..hkv).map(|g| need(Some(g))).max().unwrap_or(0),
    } + spare;
    let orders: Vec<Vec<u32>> = (0..hkv).map(|_| shuffled(rng, num_pages)).collect();
    let mut next = vec![0usize; hkv];
    let mut indptr = vec![0u32];
    let mut indices = Vec::new();
    let mut last = Vec::new();
    for (i, &len) in lens.iter().enumerate() {
        let g = match scope {
            PageScope::Sequence => 0,
            PageScope::KvHead => i % hkv,
        };
        let n = len.div_ceil(p);
        indices.extend_from_slice(&orders[g][next[g]..next[g] + n]);
        next[g] += n;
        indptr.push(indices.len() as u32);
        last.push(if n == 0 {
            0
        } else {
            (len - (n - 1) * p) as u32
        });
    }
    PageTable::new(PageTableParts {
        layout,
        page_size: p,
        num_pages,
        num_kv_heads: hkv,
        scope,
        page_indptr: indptr,
        page_indices: indices,
        last_page_len: last,
    })
    .expect("valid random table")
}

/// The page pool holding the contiguous rows `x` (`segs`) at their paged
/// rows; every other row is NaN.
fn to_pool<T: Element>(table: &PageTable, segs: &Segments, x: &[T], d: usize) -> Vec<T> {
    let mut pool = vec![T::from_f64(f64::NAN); table.rows() * d];
    for s in 0..segs.num_segments() {
        for j in 0..segs.len_of(s) {
            let (src, dst) = (segs.offset(s) + j, table.row(s, j));
            pool[dst * d..(dst + 1) * d].copy_from_slice(&x[src * d..(src + 1) * d]);
        }
    }
    pool
}

/// One decode case: contiguous inputs, the same tokens paged, and the
/// restrictions.
struct Case<T> {
    geom: HeadGeometry,
    segs: Segments,
    table: PageTable,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    kp: Vec<T>,
    vp: Vec<T>,
    /// KvHead lists: ~30% of each segment (scattered).
    scattered: IndexList,
    /// QueryHead lists: one consecutive window per head (read as runs).
    window: IndexList,
    /// QueryHead masks: ~half of each segment.
    mask: MaskList,
}

/// Segment lengths for page size `p`: ragged, a table of 0 tokens, tables
/// ending with `last_page_len` 1 and `p`, one longer than a decode block.
fn case_lens(p: usize, scope: PageScope, hkv: usize) -> Vec<u32> {
    let tables: Vec<usize> = vec![3 * p, 2 * p + 1, 0, 1, 600 + p / 2];
    match scope {
        PageScope::Sequence => tables
            .iter()
            .flat_map(|&l| std::iter::repeat_n(l as u32, hkv))
            .collect(),
        // Different lengths per KV head of a sequence (head-wise budgets).
        PageScope::KvHead => tables
            .iter()
            .flat_map(|&l| (0..hkv).map(move |g| (l + g * (p + 1)) as u32))
            .collect(),
    }
}

fn build_case<T: Element>(
    seed: u64,
    geom: HeadGeometry,
    layout: PageLayout,
    scope: PageScope,
    p: usize,
) -> Case<T> {
    let mut rng = Rng::new(seed);
    let (hq, hkv, d) = (geom.num_q_heads(), geom.num_kv_heads(), geom.head_dim());
    let lens = case_lens(p, scope, hkv);
    let batch = lens.len() / hkv;
    let segs = Segments::packed(batch, hkv, &lens).unwrap();
    let table = random_table(&mut rng, layout, scope, p, hkv, &lens, 3);
    assert_eq!(table.segments().lens(), segs.lens());
    let q: Vec<T> = normal_vec(&mut rng, batch * hq * d, 2.0);
    let k: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let v: Vec<T> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
    let kp = to_pool(&table, &segs, &k, d);
    let vp = to_pool(&table, &segs, &v, d);
    let sets: Vec<IndexSet> = (0..segs.num_segments())
        .map(|s| {
            IndexSet::from_unsorted(
                (0..segs.len_of(s) as u32)
                    .filter(|_| rng.uniform() < 0.3)
                    .collect(),
            )
        })
        .collect();
    let scattered = IndexList::from_sets(Scope::KvHead, &sets).unwrap();
    let seg_of = |i: usize| segs.index(i / hq, geom.kv_head(i % hq));
    let windows: Vec<IndexSet> = (0..batch * hq)
        .map(|i| {
            let len = segs.len_of(seg_of(i)) as u32;
            let a = rng.below(len as usize + 1) as u32;
            IndexSet::new((a..len.min(a + 1 + rng.below(700) as u32)).collect()).unwrap()
        })
        .collect();
    let window = IndexList::from_sets(Scope::QueryHead, &windows).unwrap();
    let masks: Vec<BitMask> = (0..batch * hq)
        .map(|i| {
            let len = segs.len_of(seg_of(i));
            BitMask::from_bools(&(0..len).map(|_| rng.uniform() < 0.5).collect::<Vec<_>>())
        })
        .collect();
    let mask = MaskList::from_masks(Scope::QueryHead, &masks).unwrap();
    Case {
        geom,
        segs,
        table,
        q,
        k,
        v,
        kp,
        vp,
        scattered,
        window,
        mask,
    }
}

/// Softmax, α = 1.5, and a per-head α (including α = 3, which the CPU
/// backend computes on its f64 path).
fn norms(geom: &HeadGeometry) -> Vec<Normalizer> {
    let alphas = [1.5f32, 1.25, 2.0, 3.0];
    vec![
        Normalizer::Softmax,
        Normalizer::Entmax { alpha: 1.5 },
        Normalizer::EntmaxPerHead {
            alphas: (0..geom.num_q_heads()).map(|h| alphas[h % 4]).collect(),
        },
    ]
}

/// `true` when `b` has a paged decode kernel; `false` (after checking the
/// error) for the backend that does not have one yet (wgpu). Every other
/// backend (reference, CPU, CUDA) must run it.
fn paged_decode_supported<B: Ops>(b: &B) -> bool {
    let geom = HeadGeometry::new(2, 1, 4).unwrap();
    let table = PageTable::new(PageTableParts {
        layout: PageLayout::Hnd,
        page_size: 2,
        num_pages: 2,
        num_kv_heads: 1,
        scope: PageScope::Sequence,
        page_indptr: vec![0, 2],
        page_indices: vec![1, 0],
        last_page_len: vec![1],
    })
    .unwrap();
    let q = up(b, &[1.0f32; 8]);
    let kv = up(b, &[0.5f32; 16]);
    let mut out = b.zeros::<f32>(8).unwrap();
    let p = PagedDecodeParams {
        geom,
        pages: &table,
        scale: None,
        normalizer: &Normalizer::Softmax,
        restrict: Restrict::Dense,
    };
    match ops::decode_attention_paged(b, &p, &q, &kv, &kv, &mut out) {
        Ok(()) => true,
        Err(Error::Unsupported { backend, op, .. }) if b.name() == "wgpu" => {
            assert_eq!((backend, op), (b.name(), "decode_attention_paged"));
            eprintln!(
                "{}: no paged decode kernel yet; it returns Error::Unsupported (checked)",
                b.name()
            );
            false
        }
        Err(e) => panic!("{}: paged decode failed: {e}", b.name()),
    }
}

/// The reference's contiguous output on the f32-widened inputs ("exact")
/// against the backend's paged output: fixed tolerance for f32, the
/// low-precision budget for f16 / bf16.
fn check_attn<T: Element>(got: &[T], exact: &[f32], ref_lowp: &[T], ctx: &str) {
    let got = wide(got);
    let exact = wide(exact);
    if T::DTYPE == DType::F32 {
        assert_close(&got, &exact, ATTN_F32, ctx);
    } else {
        let budget = lowp_budget(&exact, &wide(ref_lowp), 0.6 * eps_of(T::DTYPE));
        let err = max_abs_diff(&got, &exact);
        assert!(err <= budget, "{ctx}: max error {err} > budget {budget}");
    }
}

fn decode_case<B: Ops, T: Element>(b: &B, c: &Case<T>, ctx0: &str) {
    let (qb, kb, vb) = (up(b, &c.q), up(b, &c.k), up(b, &c.v));
    let (kpb, vpb) = (up(b, &c.kp), up(b, &c.vp));
    let (qf, kf, vf) = (widen(&c.q), widen(&c.k), widen(&c.v));
    for norm in &norms(&c.geom) {
        for restrict in [
            Restrict::Dense,
            Restrict::Indices(&c.scattered),
            Restrict::Indices(&c.window),
            Restrict::Mask(&c.mask),
        ] {
            let ctx = format!("{ctx0} {norm:?} {restrict:?}");
            let cp = DecodeParams {
                geom: c.geom,
                segments: &c.segs,
                scale: None,
                normalizer: norm,
                restrict,
            };
            let pp = PagedDecodeParams {
                geom: c.geom,
                pages: &c.table,
                scale: None,
                normalizer: norm,
                restrict,
            };
            let mut paged = b.zeros::<T>(c.q.len()).unwrap();
            ops::decode_attention_paged(b, &pp, &qb, &kpb, &vpb, &mut paged).unwrap();
            let mut contig = b.zeros::<T>(c.q.len()).unwrap();
            ops::decode_attention(b, &cp, &qb, &kb, &vb, &mut contig).unwrap();
            let (paged, contig) = (down(b, &paged), down(b, &contig));
            assert!(
                paged.iter().all(|x| !x.to_f64().is_nan()),
                "{ctx}: NaN in the output: a poisoned row was read"
            );
            if bitwise(b) {
                assert!(paged == contig, "{ctx}: paged differs from contiguous");
            }
            let mut exact = vec![0.0f32; c.q.len()];
            ops::decode_attention(&Reference, &cp, &qf, &kf, &vf, &mut exact).unwrap();
            let mut ref_lowp = vec![T::default(); c.q.len()];
            ops::decode_attention(&Reference, &cp, &c.q, &c.k, &c.v, &mut ref_lowp).unwrap();
            check_attn(&paged, &exact, &ref_lowp, &ctx);
        }
    }
}

/// Geometry of case `i`: a Latin square over (layout, scope) x page size
/// for the 16 decode cases, so each page size and each (layout, scope) meets
/// every geometry. GQA groups of 4 or less and of 8 (the CUDA backend's
/// `_h4` and `_h8` kernels), vector and scalar head dims (33).
fn case_geom(i: usize) -> HeadGeometry {
    [
        HeadGeometry::new(8, 2, 64).unwrap(),
        HeadGeometry::new(4, 2, 33).unwrap(),
        HeadGeometry::new(6, 3, 16).unwrap(),
        HeadGeometry::new(16, 2, 32).unwrap(),
    ][(i + i / 4) % 4]
}

fn paged_decode_matches_contiguous_and_reference<B: Ops>(b: &B) {
    if !paged_decode_supported(b) {
        return;
    }
    let mut i = 0;
    for layout in LAYOUTS {
        for scope in SCOPES {
            for p in [1usize, 4, 16, 64] {
                let geom = case_geom(i);
                let ctx = |t: DType| {
                    format!(
                        "{}: paged decode {t} {layout:?} {scope:?} P={p} {geom:?}",
                        b.name()
                    )
                };
                let seed = 100 + i as u64;
                // On the CUDA simulator one dtype per case, rotating.
                if sim_runs(b, i, 3) {
                    decode_case::<B, f32>(
                        b,
                        &build_case(seed, geom, layout, scope, p),
                        &ctx(DType::F32),
                    );
                }
                if sim_runs(b, i + 1, 3) {
                    decode_case::<B, f16>(
                        b,
                        &build_case(seed, geom, layout, scope, p),
                        &ctx(DType::F16),
                    );
                }
                if sim_runs(b, i + 2, 3) {
                    decode_case::<B, bf16>(
                        b,
                        &build_case(seed, geom, layout, scope, p),
                        &ctx(DType::BF16),
                    );
                }
                i += 1;
            }
        }
    }
}

/// `got` against `want`: bitwise on the backends of [`bitwise`] (NaN equal
/// to NaN), else within `abs + rel·|want|` (the evidence rows of
/// `docs/numerics.md`).
fn check_evidence(b: &impl Backend, got: &[f32], want: &[f32], tol: Tolerance, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = if bitwise(b) || w.is_infinite() {
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
        } else {
            tol.allows(f64::from(g), f64::from(w))
        };
        assert!(ok, "{ctx}: entry {i}: paged {g}, contiguous {w}");
    }
}

fn evidence_case<B: Ops, T: Element>(b: &B, c: &Case<T>, ctx0: &str) {
    let (qb, kb, vb) = (up(b, &c.q), up(b, &c.k), up(b, &c.v));
    let (kpb, vpb) = (up(b, &c.kp), up(b, &c.vp));
    let (batch, hq, d) = (c.segs.batch(), c.geom.num_q_heads(), c.geom.head_dim());
    let ones = vec![1; batch];
    for norm in &norms(&c.geom) {
        for restrict in [
            Restrict::Dense,
            Restrict::Indices(&c.scattered),
            Restrict::Mask(&c.mask),
        ] {
            for heads in HEADS {
                let ctx = format!("{ctx0} {norm:?} {restrict:?} {heads:?}");
                // Evidence is in token coordinates: the table's segments
                // size it exactly as the contiguous segments do.
                let blocks = evidence_blocks(&c.geom, c.table.segments(), heads, &ones).unwrap();
                assert_eq!(
                    blocks,
                    evidence_blocks(&c.geom, &c.segs, heads, &ones).unwrap()
                );
                let per_head =
                    evidence_blocks(&c.geom, c.table.segments(), Heads::PerHead, &ones).unwrap();
                let run = |paged: bool| {
                    let mut probs = b.zeros::<f32>(blocks.total()).unwrap();
                    let mut logits = b.zeros::<f32>(per_head.total()).unwrap();
                    let mut stats = b.zeros::<f32>(batch * hq).unwrap();
                    let mut output = b.zeros::<f32>(batch * hq * d).unwrap();
                    let mut out = b.zeros::<T>(batch * hq * d).unwrap();
                    let ev = DecodeEvidence {
                        probs: Some((heads, &mut probs)),
                        logits: Some(&mut logits),
                        stats: Some(&mut stats),
                        output: Some(&mut output),
                    };
                    if paged {
                        let p = PagedDecodeParams {
                            geom: c.geom,
                            pages: &c.table,
                            scale: None,
                            normalizer: norm,
                            restrict,
                        };
                        ops::decode_attention_paged_with(b, &p, &qb, &kpb, &vpb, &mut out, ev)
                            .unwrap();
                    } else {
                        let p = DecodeParams {
                            geom: c.geom,
                            segments: &c.segs,
                            scale: None,
                            normalizer: norm,
                            restrict,
                        };
                        ops::decode_attention_with(b, &p, &qb, &kb, &vb, &mut out, ev).unwrap();
                    }
                    [
                        down(b, &probs),
                        down(b, &logits),
                        down(b, &stats),
                        down(b, &output),
                    ]
                };
                let (pg, ct) = (run(true), run(false));
                let tol = |rel, abs| Tolerance { rel, abs };
                for (name, i, t) in [
                    ("probs", 0, tol(2e-5, 2e-6)),
                    ("logits", 1, tol(2e-5, 1e-5 * (d as f64).sqrt())),
                    ("stats", 2, tol(1e-5, 1e-6)),
                    ("output", 3, tol(2e-5, 2e-5)),
                ] {
                    check_evidence(b, &pg[i], &ct[i], t, &format!("{ctx} {name}"));
                }
                assert!(
                    pg[0].iter().all(|x| !x.is_nan()),
                    "{ctx}: NaN probability: a poisoned row was read"
                );
            }
        }
    }
}

fn paged_decode_evidence_matches_contiguous<B: Ops>(b: &B) {
    if !paged_decode_supported(b) {
        return;
    }
    let mut i = 0;
    for layout in LAYOUTS {
        for scope in SCOPES {
            let p = [4usize, 16][i % 2];
            let geom = case_geom(i);
            let ctx = |t: DType| {
                format!(
                    "{}: paged evidence {t} {layout:?} {scope:?} P={p} {geom:?}",
                    b.name()
                )
            };
            let seed = 300 + i as u64;
            // On the CUDA simulator one dtype per case, rotating.
            if sim_runs(b, i, 2) {
                evidence_case::<B, f32>(
                    b,
                    &build_case(seed, geom, layout, scope, p),
                    &ctx(DType::F32),
                );
            }
            if sim_runs(b, i + 1, 2) {
                evidence_case::<B, f16>(
                    b,
                    &build_case(seed, geom, layout, scope, p),
                    &ctx(DType::F16),
                );
            }
            i += 1;
        }
    }
}

/// Two sequences sharing their first two pages (a shared prompt prefix):
/// reads see the shared rows in both tables.
fn paged_decode_reads_shared_prefix_pages<B: Ops>(b: &B) {
    if !paged_decode_supported(b) {
        return;
    }
    let (p, hkv) = (8usize, 2usize);
    let geom = HeadGeometry::new(4, hkv, 32).unwrap();
    let d = geom.head_dim();
    for layout in LAYOUTS {
        // Sequence 0: pages [4, 1, 2] (21 tokens); sequence 1: [4, 1, 0]
        // (19 tokens); pages 4 and 1 hold the common first 16 tokens.
        let table = PageTable::new(PageTableParts {
            layout,
            page_size: p,
            num_pages: 6,
            num_kv_heads: hkv,
            scope: PageScope::Sequence,
            page_indptr: vec![0, 3, 6],
            page_indices: vec![4, 1, 2, 4, 1, 0],
            last_page_len: vec![5, 3],
        })
        .unwrap();
        let mut rng = Rng::new(9);
        let segs = Segments::packed(2, hkv, &[21, 21, 19, 19]).unwrap();
        let mut k: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
        let mut v: Vec<f32> = normal_vec(&mut rng, segs.rows_needed() * d, 1.0);
        for x in [&mut k, &mut v] {
            for g in 0..hkv {
                let (a, c) = (segs.offset(g), segs.offset(hkv + g));
                x.copy_within(a * d..(a + 16) * d, c * d);
            }
        }
        let kp = to_pool(&table, &segs, &k, d);
        let vp = to_pool(&table, &segs, &v, d);
        let q: Vec<f32> = normal_vec(&mut rng, 2 * 4 * d, 2.0);
        let norm = Normalizer::Softmax;
        let mut paged = b.zeros::<f32>(q.len()).unwrap();
        let pp = PagedDecodeParams {
            geom,
            pages: &table,
            scale: None,
            normalizer: &norm,
            restrict: Restrict::Dense,
        };
        ops::decode_attention_paged(b, &pp, &up(b, &q), &up(b, &kp), &up(b, &vp), &mut paged)
            .unwrap();
        let cp = DecodeParams {
            geom,
            segments: &segs,
            scale: None,
            normalizer: &norm,
            restrict: Restrict::Dense,
        };
        let mut want = vec![0.0f32; q.len()];
        ops::decode_attention(&Reference, &cp, &q, &k, &v, &mut want).unwrap();
        assert_close(
            &wide(&down(b, &paged)),
            &wide(&want),
            ATTN_F32,
            &format!("{}: shared prefix {layout:?}", b.name()),
        );
    }
}

// ------------------------------------------------------------------ cache ops

/// The expected contents of a paged cache: the rows of every segment in
/// token order (`d` elements each).
type Rows<T> = Vec<Vec<T>>;

/// Checks that the pool holds exactly `want[s]` at the rows of segment `s`
/// and NaN (the initial poison) at every row no table reaches.
fn check_pool_contents<T: Element>(table: &PageTable, pool: &[T], want: &Rows<T>, ctx: &str) {
    let d = pool.len() / table.rows();
    let mut used = vec![false; table.rows()];
    for (s, rows) in want.iter().enumerate() {
        assert_eq!(
            table.segments().len_of(s),
            rows.len() / d,
            "{ctx}: segment {s} length"
        );
        for j in 0..rows.len() / d {
            let r = table.row(s, j);
            assert!(!used[r], "{ctx}: row {r} holds two tokens");
            used[r] = true;
            assert!(
                pool[r * d..(r + 1) * d]
                    .iter()
                    .zip(&rows[j * d..(j + 1) * d])
                    .all(|(&a, &b)| same(a, b)),
                "{ctx}: segment {s} token {j} (row {r}) differs"
            );
        }
    }
    for (r, u) in used.iter().enumerate() {
        if !u {
            assert!(
                pool[r * d..(r + 1) * d].iter().all(|x| x.to_f64().is_nan()),
                "{ctx}: row {r} is in no table but was written"
            );
        }
    }
}

/// Appends `n[b]` new tokens to every KV head of sequence `b`, drawing new
/// pages from `free` (one free list per page-key head: `free[0]` for
/// per-sequence tables, `free[g]` for KV head `g`'s slots); updates `want`.
#[allow(clippy::too_many_arguments)]
fn append<B: Ops, T: Element>(
    b: &B,
    rng: &mut Rng,
    table: &PageTable,
    n: &[u32],
    free: &mut [Vec<u32>],
    pools: (&mut B::Buffer<T>, &mut B::Buffer<T>),
    want: (&mut Rows<T>, &mut Rows<T>),
    d: usize,
) -> PageTable {
    let hkv = table.num_kv_heads();
    let tokens = Ragged::from_lens(n).unwrap();
    let mut indptr = vec![0u32];
    let mut pages = Vec::new();
    for i in 0..table.num_tables() {
        let (bi, h) = match table.scope() {
            PageScope::Sequence => (i, 0),
            PageScope::KvHead => (i / hkv, i % hkv),
        };
        let len = table.table_len(i);
        let need = table.pages_for(len + n[bi] as usize) - table.pages_of(i).len();
        for _ in 0..need {
            pages.push(free[h].pop().expect("a free page"));
        }
        indptr.push(pages.len() as u32);
    }
    let k_new: Vec<T> = normal_vec(rng, tokens.total() * hkv * d, 1.0);
    let v_new: Vec<T> = normal_vec(rng, tokens.total() * hkv * d, 1.0);
    let p = PagedAppendParams {
        head_dim: d,
        pages: table,
        tokens: &tokens,
        new_page_indptr: &indptr,
        new_pages: &pages,
    };
    let grown = ops::append_paged(b, &p, &up(b, &k_new), &up(b, &v_new), pools.0, pools.1)
        .unwrap_or_else(|e| panic!("{}: append_paged: {e}", b.name()));
    for (wx, x) in [(want.0, &k_new), (want.1, &v_new)] {
        for bi in 0..table.batch() {
            for t in tokens.range(bi) {
                for g in 0..hkv {
                    wx[bi * hkv + g]
                        .extend_from_slice(&x[(t * hkv + g) * d..(t * hkv + g + 1) * d]);
                }
            }
        }
    }
    grown
}

/// The contiguous compaction (`ops::compact_rows` / `ops::drop_rows` on the
/// reference) of `want` with `lists`.
fn contiguous_compaction<T: Element>(
    want: &Rows<T>,
    lists: &IndexList,
    drop: bool,
    d: usize,
) -> Rows<T> {
    let lens: Vec<u32> = want.iter().map(|r| (r.len() / d) as u32).collect();
    let hkv = 1; // a flat list of segments
    let segs = Segments::packed(lens.len(), hkv, &lens).unwrap();
    let mut buf: Vec<T> = want.concat();
    let new = if drop {
        ops::drop_rows(&Reference, d, &segs, lists, &mut buf).unwrap()
    } else {
        ops::compact_rows(&Reference, d, &segs, lists, &mut buf).unwrap()
    };
    (0..lens.len())
        .map(|s| buf[new.offset(s) * d..(new.offset(s) + new.len_of(s)) * d].to_vec())
        .collect()
}

/// Random keep (or drop) lists, equal counts over the heads of a
/// per-sequence table.
fn random_lists(rng: &mut Rng, table: &PageTable, share: f64) -> IndexList {
    let segs = table.segments();
    let hkv = segs.num_kv_heads();
    let mut sets = Vec::new();
    let mut count = 0;
    for s in 0..segs.num_segments() {
        let len = segs.len_of(s);
        if table.scope() == PageScope::KvHead || s % hkv == 0 {
            count = ((len as f64 * share).round() as usize).min(len);
        }
        let mut order = shuffled(rng, len);
        order.truncate(count);
        sets.push(IndexSet::from_unsorted(order));
    }
    IndexList::from_sets(Scope::KvHead, &sets).unwrap()
}

/// Checks a compaction's page accounting: each table keeps its first
/// `⌈len / P⌉` pages, `released` lists the rest, `freed` the pages no
/// table names any more; no page is lost.
fn check_released(old: &PageTable, c: &paged::PagedCompaction, ctx: &str) {
    let new = &c.table;
    let mut all_new: Vec<u32> = new.page_indices().to_vec();
    all_new.sort_unstable();
    let mut freed_expect: Vec<u32> = Vec::new();
    for i in 0..old.num_tables() {
        let keep = new.pages_for(new.table_len(i));
        assert_eq!(
            new.pages_of(i),
            &old.pages_of(i)[..keep],
            "{ctx}: table {i} pages"
        );
        assert_eq!(
            c.released(i),
            &old.pages_of(i)[keep..],
            "{ctx}: table {i} released"
        );
        freed_expect.extend(
            c.released(i)
                .iter()
                .filter(|p| all_new.binary_search(p).is_err()),
        );
    }
    freed_expect.sort_unstable();
    freed_expect.dedup();
    assert_eq!(c.freed(), &freed_expect[..], "{ctx}: freed pages");
    let mut before: Vec<u32> = old.page_indices().to_vec();
    before.sort_unstable();
    before.dedup();
    let mut after: Vec<u32> = all_new.iter().chain(c.freed()).copied().collect();
    after.sort_unstable();
    after.dedup();
    assert_eq!(before, after, "{ctx}: pages lost or invented");
}

fn round_trip<B: Ops, T: Element>(
    b: &B,
    layout: PageLayout,
    scope: PageScope,
    p: usize,
    seed: u64,
) {
    let ctx = format!(
        "{}: paged cache ops {} {layout:?} {scope:?} P={p}",
        b.name(),
        T::DTYPE
    );
    let (batch, hkv, d) = (3usize, 2usize, 24usize);
    let num_pages = 40 * 8 / p + 8;
    let mut rng = Rng::new(seed);
    let empty = PageTable::new(PageTableParts {
        layout,
        page_size: p,
        num_pages,
        num_kv_heads: hkv,
        scope,
        page_indptr: vec![
            0;
            1 + if scope == PageScope::Sequence {
                batch
            } else {
                batch * hkv
            }
        ],
        page_indices: vec![],
        last_page_len: vec![
            0;
            if scope == PageScope::Sequence {
                batch
            } else {
                batch * hkv
            }
        ],
    })
    .unwrap();
    let poison = vec![T::from_f64(f64::NAN); empty.rows() * d];
    let (mut kp, mut vp) = (up(b, &poison), up(b, &poison));
    let mut wk: Rows<T> = vec![Vec::new(); batch * hkv];
    let mut wv: Rows<T> = vec![Vec::new(); batch * hkv];
    let keys = if scope == PageScope::Sequence { 1 } else { hkv };
    let mut free: Vec<Vec<u32>> = (0..keys).map(|_| shuffled(&mut rng, num_pages)).collect();
    // A prompt chunk (ragged, one sequence empty), then decode steps.
    let mut table = append(
        b,
        &mut rng,
        &empty,
        &[(2 * p + 3) as u32, 0, 5],
        &mut free,
        (&mut kp, &mut vp),
        (&mut wk, &mut wv),
        d,
    );
    for _ in 0..p + 2 {
        table = append(
            b,
            &mut rng,
            &table,
            &[1, 1, 1],
            &mut free,
            (&mut kp, &mut vp),
            (&mut wk, &mut wv),
            d,
        );
    }
    check_pool_contents(
        &table,
        &down(b, &kp),
        &wk,
        &format!("{ctx} K after appends"),
    );
    check_pool_contents(
        &table,
        &down(b, &vp),
        &wv,
        &format!("{ctx} V after appends"),
    );
    // Evict to about half, then drop a few more.
    for (drop, share) in [(false, 0.5), (true, 0.3)] {
        let lists = random_lists(&mut rng, &table, share);
        let c = if drop {
            ops::drop_paged(b, d, &table, &lists, &mut kp, &mut vp)
        } else {
            ops::compact_paged(b, d, &table, &lists, &mut kp, &mut vp)
        }
        .unwrap_or_else(|e| panic!("{ctx}: compaction: {e}"));
        let step = format!("{ctx} {}", if drop { "drop" } else { "compact" });
        check_released(&table, &c, &step);
        wk = contiguous_compaction(&wk, &lists, drop, d);
        wv = contiguous_compaction(&wv, &lists, drop, d);
        // Released rows keep their old contents; poison them in the
        // expectation by re-poisoning the released rows on the host.
        let mut hk = down(b, &kp);
        let mut hv = down(b, &vp);
        repoison(&table, &c.table, &mut hk, d);
        repoison(&table, &c.table, &mut hv, d);
        check_pool_contents(&c.table, &hk, &wk, &format!("{step} K"));
        check_pool_contents(&c.table, &hv, &wv, &format!("{step} V"));
        kp = up(b, &hk);
        vp = up(b, &hv);
        match scope {
            PageScope::Sequence => free[0].extend_from_slice(c.freed()),
            PageScope::KvHead => {
                for i in 0..table.num_tables() {
                    free[i % hkv].extend_from_slice(c.released(i));
                }
            }
        }
        table = c.table;
    }
    // Freed pages are reused by later appends.
    table = append(
        b,
        &mut rng,
        &table,
        &[p as u32 + 1, 2, 0],
        &mut free,
        (&mut kp, &mut vp),
        (&mut wk, &mut wv),
        d,
    );
    check_pool_contents(&table, &down(b, &kp), &wk, &format!("{ctx} K after reuse"));
    check_pool_contents(&table, &down(b, &vp), &wv, &format!("{ctx} V after reuse"));
}

/// Sets to NaN every row that `old` reached and `new` does not (the rows a
/// compaction vacated keep stale values, which the test does not care
/// about), so that [`check_pool_contents`] can check the rest.
fn repoison<T: Element>(old: &PageTable, new: &PageTable, pool: &mut [T], d: usize) {
    let reached = |t: &PageTable| {
        let mut r = vec![false; t.rows()];
        for s in 0..t.segments().num_segments() {
            for j in 0..t.segments().len_of(s) {
                r[t.row(s, j)] = true;
            }
        }
        r
    };
    let (a, b) = (reached(old), reached(new));
    for r in 0..a.len() {
        if a[r] && !b[r] {
            pool[r * d..(r + 1) * d].fill(T::from_f64(f64::NAN));
        }
    }
}

fn paged_append_and_compaction_round_trip<B: Ops>(b: &B) {
    let mut seed = 500;
    for layout in LAYOUTS {
        for scope in SCOPES {
            for p in [1usize, 4, 16] {
                round_trip::<B, f32>(b, layout, scope, p, seed);
                seed += 1;
            }
            round_trip::<B, f16>(b, layout, scope, 8, seed);
            round_trip::<B, bf16>(b, layout, scope, 8, seed + 1);
            seed += 2;
        }
    }
}

/// After a compaction, paged decode equals the contiguous decode on the
/// contiguous compaction of the same rows (no row lost or misplaced).
fn paged_decode_after_compaction_matches_contiguous<B: Ops>(b: &B) {
    if !paged_decode_supported(b) {
        return;
    }
    for (i, scope) in SCOPES.into_iter().enumerate() {
        let geom = HeadGeometry::new(4, 2, 32).unwrap();
        let c = build_case::<f32>(700 + i as u64, geom, PageLayout::Hnd, scope, 16);
        let d = geom.head_dim();
        let mut rng = Rng::new(7);
        let keep = random_lists(&mut rng, &c.table, 0.4);
        let (mut kp, mut vp) = (up(b, &c.kp), up(b, &c.vp));
        let res = ops::compact_paged(b, d, &c.table, &keep, &mut kp, &mut vp).unwrap();
        let mut k = c.k.clone();
        let mut v = c.v.clone();
        let segs = ops::compact_rows(&Reference, d, &c.segs, &keep, &mut k).unwrap();
        ops::compact_rows(&Reference, d, &c.segs, &keep, &mut v).unwrap();
        for norm in &norms(&geom) {
            let pp = PagedDecodeParams {
                geom,
                pages: &res.table,
                scale: None,
                normalizer: norm,
                restrict: Restrict::Dense,
            };
            let mut paged = b.zeros::<f32>(c.q.len()).unwrap();
            ops::decode_attention_paged(b, &pp, &up(b, &c.q), &kp, &vp, &mut paged).unwrap();
            let cp = DecodeParams {
                geom,
                segments: &segs,
                scale: None,
                normalizer: norm,
                restrict: Restrict::Dense,
            };
            let mut want = vec![0.0f32; c.q.len()];
            ops::decode_attention(&Reference, &cp, &c.q, &k, &v, &mut want).unwrap();
            assert_close(
                &wide(&down(b, &paged)),
                &wide(&want),
                ATTN_F32,
                &format!(
                    "{}: paged decode after compaction {scope:?} {norm:?}",
                    b.name()
                ),
            );
        }
    }
}

// ----------------------------------------------------------------- validation

fn err_text(r: Result<impl std::fmt::Debug>) -> String {
    match r {
        Ok(x) => panic!("expected an error, got {x:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn paged_table_rejects_bad_tables() {
    let ok = PageTableParts {
        layout: PageLayout::Nhd,
        page_size: 16,
        num_pages: 8,
        num_kv_heads: 2,
        scope: PageScope::Sequence,
        page_indptr: vec![0, 2, 3],
        page_indices: vec![5, 1, 7],
        last_page_len: vec![16, 1],
    };
    let t = PageTable::new(ok.clone()).unwrap();
    assert_eq!(t.segments().lens(), &[32, 32, 1, 1]);
    type Edit = Box<dyn Fn(&mut PageTableParts)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "P not a power of two",
            Box::new(|p| p.page_size = 24),
            "power of two",
        ),
        (
            "P too large",
            Box::new(|p| p.page_size = 512),
            "power of two",
        ),
        ("P zero", Box::new(|p| p.page_size = 0), "power of two"),
        (
            "no KV heads",
            Box::new(|p| p.num_kv_heads = 0),
            "num_kv_heads",
        ),
        (
            "indptr too short",
            Box::new(|p| p.page_indptr = vec![0, 2]),
            "entries",
        ),
        (
            "indptr not from 0",
            Box::new(|p| p.page_indptr = vec![1, 2, 3]),
            "page_indptr[0]",
        ),
        (
            "indptr decreasing",
            Box::new(|p| p.page_indptr = vec![0, 3, 2]),
            "non-decreasing",
        ),
        (
            "indptr not ending at indices",
            Box::new(|p| p.page_indptr = vec![0, 1, 2]),
            "ends at",
        ),
        (
            "page out of the pool",
            Box::new(|p| p.page_indices = vec![5, 1, 8]),
            "out of range",
        ),
        (
            "page twice in a table",
            Box::new(|p| p.page_indices = vec![5, 5, 7]),
            "twice",
        ),
        (
            "last_page_len 0",
            Box::new(|p| p.last_page_len = vec![0, 1]),
            "last_page_len[0]",
        ),
        (
            "last_page_len > P",
            Box::new(|p| p.last_page_len = vec![17, 1]),
            "last_page_len[0]",
        ),
        (
            "empty table with a last page length",
            Box::new(|p| {
                p.page_indptr = vec![0, 0, 3];
                p.last_page_len = vec![1, 1];
            }),
            "no pages",
        ),
        (
            "per-head tables not a multiple of Hkv",
            Box::new(|p| {
                p.scope = PageScope::KvHead;
                p.page_indptr = vec![0, 3];
                p.last_page_len = vec![1];
            }),
            "multiple",
        ),
        (
            "no table",
            Box::new(|p| {
                p.page_indptr = vec![0];
                p.page_indices = vec![];
                p.last_page_len = vec![];
            }),
            "at least one",
        ),
        (
            "rows overflow u32",
            Box::new(|p| p.num_pages = 1 << 28),
            "too large",
        ),
    ];
    for (name, f, want) in cases {
        let mut p = ok.clone();
        f(&mut p);
        let e = err_text(PageTable::new(p));
        assert!(
            e.contains(want),
            "{name}: error `{e}` does not mention `{want}`"
        );
    }
    // Sharing across tables is allowed (reads), and so is a page named by
    // per-KV-head tables of different heads.
    let mut shared = ok.clone();
    shared.page_indices = vec![5, 1, 5];
    assert!(PageTable::new(shared).is_ok());
    // Every accepted page size.
    for p in [1usize, 2, 4, 8, 16, 32, 64, 128, 256] {
        let mut x = ok.clone();
        x.page_size = p;
        x.last_page_len = vec![p as u32, 1];
        assert!(PageTable::new(x).is_ok(), "P = {p}");
    }
}

/// The worked example of `docs/layouts.md` ("Paged KV").
#[test]
fn paged_layouts_worked_example() {
    let parts = PageTableParts {
        layout: PageLayout::Hnd,
        page_size: 4,
        num_pages: 6,
        num_kv_heads: 2,
        scope: PageScope::Sequence,
        page_indptr: vec![0, 2, 3],
        page_indices: vec![3, 0, 5],
        last_page_len: vec![3, 4],
    };
    let hnd = PageTable::new(parts.clone()).unwrap();
    let nhd = PageTable::new(PageTableParts {
        layout: PageLayout::Nhd,
        ..parts
    })
    .unwrap();
    assert_eq!(hnd.rows(), 48);
    assert_eq!(hnd.segments().lens(), &[7, 7, 4, 4]);
    // (sequence, token, [HND head 0, head 1], [NHD head 0, head 1])
    for (b, t, h, n) in [
        (0, 0, [24, 28], [24, 25]),
        (0, 2, [26, 30], [28, 29]),
        (0, 3, [27, 31], [30, 31]),
        (0, 4, [0, 4], [0, 1]),
        (0, 6, [2, 6], [4, 5]),
        (1, 0, [40, 44], [40, 41]),
        (1, 3, [43, 47], [46, 47]),
    ] {
        for g in 0..2 {
            assert_eq!(
                hnd.row(b * 2 + g, t),
                h[g],
                "HND seq {b} token {t} head {g}"
            );
            assert_eq!(
                nhd.row(b * 2 + g, t),
                n[g],
                "NHD seq {b} token {t} head {g}"
            );
        }
    }
    let runs: Vec<(usize, usize, usize)> = hnd
        .segment(1)
        .runs(0..7)
        .map(|r| (r.token, r.row, r.len))
        .collect();
    assert_eq!(runs, vec![(0, 28, 4), (4, 4, 3)]);
    // Append 2 tokens to both sequences with new pages 1 and 2.
    let d = 2;
    let (mut kp, mut vp) = (vec![0.0f32; 48 * d], vec![0.0f32; 48 * d]);
    let tokens = Ragged::from_lens(&[2, 2]).unwrap();
    let new: Vec<f32> = (0..4 * 2 * d).map(|i| i as f32 + 1.0).collect();
    let p = PagedAppendParams {
        head_dim: d,
        pages: &hnd,
        tokens: &tokens,
        new_page_indptr: &[0, 1, 2],
        new_pages: &[1, 2],
    };
    let grown = ops::append_paged(&Reference, &p, &new, &new, &mut kp, &mut vp).unwrap();
    assert_eq!(grown.page_indices(), &[3, 0, 1, 5, 2]);
    assert_eq!(grown.last_page_len(), &[1, 2]);
    // Sequence 0's tokens 7 and 8: slot 3 of page 0, slot 0 of page 1 (HND
    // rows 3 and 8 for KV head 0); `new` row (token 0, head 0) is [1, 2].
    assert_eq!(grown.row(0, 7), 3);
    assert_eq!(grown.row(0, 8), 8);
    assert_eq!(&kp[3 * d..4 * d], &[1.0, 2.0]);
    assert_eq!(&kp[8 * d..9 * d], &new[2 * d..3 * d]); // token 1, head 0
}

fn paged_ops_reject_bad_input<B: Ops>(b: &B) {
    let (p, hkv, d) = (4usize, 2usize, 8usize);
    let geom = HeadGeometry::new(4, hkv, d).unwrap();
    let table = PageTable::new(PageTableParts {
        layout: PageLayout::Hnd,
        page_size: p,
        num_pages: 6,
        num_kv_heads: hkv,
        scope: PageScope::Sequence,
        page_indptr: vec![0, 2, 3],
        page_indices: vec![3, 0, 5],
        last_page_len: vec![3, 4],
    })
    .unwrap();
    let rows = table.rows();
    let q = up(b, &vec![0.5f32; 2 * 4 * d]);
    let kv = up(b, &vec![0.25f32; rows * d]);
    let short = up(b, &vec![0.25f32; (rows - 1) * d]);
    let long = up(b, &vec![0.25f32; (rows + 1) * d]);
    let mut out = b.zeros::<f32>(2 * 4 * d).unwrap();
    let norm = Normalizer::Softmax;
    let params = |restrict| PagedDecodeParams {
        geom,
        pages: &table,
        scale: None,
        normalizer: &norm,
        restrict,
    };
    let dense = params(Restrict::Dense);
    let name = b.name();
    // Buffers.
    for (what, k) in [("short k", &short), ("long k", &long)] {
        let e = err_text(ops::decode_attention_paged(b, &dense, &q, k, &kv, &mut out));
        assert!(e.contains("k_pages"), "{name}: {what}: {e}");
    }
    let e = err_text(ops::decode_attention_paged(
        b, &dense, &q, &kv, &short, &mut out,
    ));
    assert!(e.contains("v_pages"), "{name}: {e}");
    let e = err_text(ops::decode_attention_paged(
        b, &dense, &kv, &kv, &kv, &mut out,
    ));
    assert!(e.contains("q has"), "{name}: {e}");
    // Geometry with other KV heads.
    let other = PagedDecodeParams {
        geom: HeadGeometry::new(4, 4, d).unwrap(),
        ..dense
    };
    let e = err_text(ops::decode_attention_paged(
        b, &other, &q, &kv, &kv, &mut out,
    ));
    assert!(e.contains("KV heads"), "{name}: {e}");
    // Restrictions are in token coordinates: sequence 1 has 4 tokens.
    let list = IndexList::new(Scope::KvHead, vec![0, 1, 2, 3, 4], vec![6, 0, 4, 0]).unwrap();
    let e = err_text(ops::decode_attention_paged(
        b,
        &params(Restrict::Indices(&list)),
        &q,
        &kv,
        &kv,
        &mut out,
    ));
    assert!(e.contains("out of range"), "{name}: {e}");
    let masks: Vec<BitMask> = [7usize, 7, 4, 5]
        .iter()
        .map(|&n| BitMask::zeros(n))
        .collect();
    let mask = MaskList::from_masks(Scope::KvHead, &masks).unwrap();
    let e = err_text(ops::decode_attention_paged(
        b,
        &params(Restrict::Mask(&mask)),
        &q,
        &kv,
        &kv,
        &mut out,
    ));
    assert!(e.contains("mask 3"), "{name}: {e}");
    // Evidence sized for the wrong segments.
    let mut probs = b.zeros::<f32>(7 + 4 - 1).unwrap();
    let e = err_text(ops::decode_attention_paged_with(
        b,
        &dense,
        &q,
        &kv,
        &kv,
        &mut out,
        DecodeEvidence {
            probs: Some((Heads::Sum, &mut probs)),
            ..DecodeEvidence::default()
        },
    ));
    assert!(e.contains("evidence probs"), "{name}: {e}");

    // append_paged: the tokens need 1 new page for sequence 0 (7 + 2 = 9
    // tokens, 3 pages) and 1 for sequence 1 (4 + 2 = 6).
    let tokens = Ragged::from_lens(&[2, 2]).unwrap();
    let new_kv = up(b, &vec![1.0f32; 4 * hkv * d]);
    let (mut kp, mut vp) = (
        up(b, &vec![0.0f32; rows * d]),
        up(b, &vec![0.0f32; rows * d]),
    );
    let mut try_append = |indptr: &[u32], pages: &[u32], tokens: &Ragged, knew: &B::Buffer<f32>| {
        let p = PagedAppendParams {
            head_dim: d,
            pages: &table,
            tokens,
            new_page_indptr: indptr,
            new_pages: pages,
        };
        ops::append_paged(b, &p, knew, &new_kv, &mut kp, &mut vp)
            .map(|t| t.segments().lens().to_vec())
    };
    let ok = try_append(&[0, 1, 2], &[1, 2], &tokens, &new_kv).unwrap();
    assert_eq!(ok, vec![9, 9, 6, 6], "{name}: append lengths");
    for (what, indptr, pages, want) in [
        (
            "too few pages (do not fit)",
            vec![0, 1, 1],
            vec![1],
            "need 1 new pages, got 0",
        ),
        (
            "too many pages",
            vec![0, 2, 3],
            vec![1, 2, 4],
            "need 1 new pages, got 2",
        ),
        (
            "page out of the pool",
            vec![0, 1, 2],
            vec![1, 6],
            "out of range",
        ),
        (
            "page already in the table",
            vec![0, 1, 2],
            vec![3, 2],
            "twice",
        ),
        (
            "page of another table (shared)",
            vec![0, 1, 2],
            vec![5, 2],
            "more than one table",
        ),
        (
            "indptr of the wrong length",
            vec![0, 2],
            vec![1, 2],
            "new_page_indptr",
        ),
    ] {
        let e = err_text(try_append(&indptr, &pages, &tokens, &new_kv));
        assert!(e.contains(want), "{name}: append, {what}: {e}");
    }
    let e = err_text(try_append(
        &[0, 1, 2],
        &[1, 2],
        &Ragged::from_lens(&[4]).unwrap(),
        &new_kv,
    ));
    assert!(e.contains("sequences"), "{name}: {e}");
    let e = err_text(try_append(&[0, 1, 2], &[1, 2], &tokens, &short));
    assert!(e.contains("k_new"), "{name}: {e}");

    // compact_paged / drop_paged.
    let (mut kp, mut vp) = (
        up(b, &vec![0.0f32; rows * d]),
        up(b, &vec![0.0f32; rows * d]),
    );
    let uneven = IndexList::new(Scope::KvHead, vec![0, 2, 3, 4, 5], vec![0, 1, 0, 0, 1]).unwrap();
    let e = err_text(ops::compact_paged(b, d, &table, &uneven, &mut kp, &mut vp));
    assert!(e.contains("one length"), "{name}: {e}");
    let range = IndexList::new(Scope::KvHead, vec![0, 1, 2, 3, 4], vec![0, 0, 4, 4]).unwrap();
    let e = err_text(ops::drop_paged(b, d, &table, &range, &mut kp, &mut vp));
    assert!(e.contains(">= length"), "{name}: {e}");
    let scope = IndexList::new(Scope::QueryHead, vec![0, 1, 2, 3, 4], vec![0, 0, 0, 0]).unwrap();
    let e = err_text(ops::compact_paged(b, d, &table, &scope, &mut kp, &mut vp));
    assert!(e.contains("KvHead"), "{name}: {e}");
    let mut short_k = up(b, &vec![0.25f32; (rows - 1) * d]);
    let e = err_text(ops::compact_paged(
        b,
        d,
        &table,
        &range,
        &mut short_k,
        &mut vp,
    ));
    assert!(e.contains("k_pages"), "{name}: {e}");
}

/// Ops that write refuse pages named by two tables; reads and writes to
/// exclusive pages of the same tables work.
fn paged_writes_reject_shared_pages<B: Ops>(b: &B) {
    let (p, hkv, d) = (4usize, 1usize, 8usize);
    // Sequences 0 and 1 share page 2 (their first 4 tokens); sequence 0's
    // last page 0 is shared too (both tables name it: prefix of 6 tokens
    // shared, last page partly filled).
    let table = PageTable::new(PageTableParts {
        layout: PageLayout::Nhd,
        page_size: p,
        num_pages: 6,
        num_kv_heads: hkv,
        scope: PageScope::Sequence,
        page_indptr: vec![0, 2, 5],
        page_indices: vec![2, 0, 2, 0, 4],
        last_page_len: vec![2, 3],
    })
    .unwrap();
    let rows = table.rows();
    let (mut kp, mut vp) = (
        up(b, &vec![0.0f32; rows * d]),
        up(b, &vec![0.0f32; rows * d]),
    );
    let name = b.name();
    // Appending one token to sequence 0 writes its shared last page.
    let tokens = Ragged::from_lens(&[1, 0]).unwrap();
    let new_kv = up(b, &vec![1.0f32; hkv * d]);
    let params = PagedAppendParams {
        head_dim: d,
        pages: &table,
        tokens: &tokens,
        new_page_indptr: &[0, 0, 0],
        new_pages: &[],
    };
    let e = err_text(ops::append_paged(
        b, &params, &new_kv, &new_kv, &mut kp, &mut vp,
    ));
    assert!(e.contains("more than one table"), "{name}: {e}");
    // Appending to sequence 1 writes only its own last page 4.
    let tokens = Ragged::from_lens(&[0, 1]).unwrap();
    let params = PagedAppendParams {
        tokens: &tokens,
        ..params
    };
    let grown = ops::append_paged(b, &params, &new_kv, &new_kv, &mut kp, &mut vp).unwrap();
    assert_eq!(grown.segments().lens(), &[6, 12]);
    // Dropping token 1 of sequence 1 moves its last token into shared page 2.
    let drop = IndexList::new(Scope::KvHead, vec![0, 0, 1], vec![1]).unwrap();
    let e = err_text(ops::drop_paged(b, d, &grown, &drop, &mut kp, &mut vp));
    assert!(e.contains("more than one table"), "{name}: {e}");
    // Dropping token 9 (exclusive page 4) moves token 11 into page 4 only.
    let drop = IndexList::new(Scope::KvHead, vec![0, 0, 1], vec![9]).unwrap();
    let c = ops::drop_paged(b, d, &grown, &drop, &mut kp, &mut vp).unwrap();
    assert_eq!(c.table.segments().lens(), &[6, 11]);
    // Dropping sequence 1's last 4 tokens releases page 4 (no move); the
    // shared pages stay with sequence 0, so only page 4 is freed.
    let drop = IndexList::new(Scope::KvHead, vec![0, 0, 3], vec![8, 9, 10]).unwrap();
    let c = ops::drop_paged(b, d, &c.table, &drop, &mut kp, &mut vp).unwrap();
    assert_eq!(c.table.pages_of(1), &[2, 0]);
    assert_eq!(c.released(1), &[4]);
    assert_eq!(c.freed(), &[4]);
}

/// The CPU backend's paged decode is bitwise the same for any pool size.
#[test]
fn cpu_paged_decode_is_bitwise_identical_for_any_pool_size() {
    use std::sync::Arc;
    let pool = |n| {
        Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .unwrap(),
        )
    };
    let (p1, p3) = (pool(1), pool(3));
    let geom = HeadGeometry::new(8, 2, 64).unwrap();
    for isa in common::backends::cpu_isas() {
        let one = kvsieve::cpu::Cpu::with_isa(isa).pool(p1.clone());
        let three = kvsieve::cpu::Cpu::with_isa(isa).pool(p3.clone());
        for (i, (layout, scope)) in [
            (PageLayout::Hnd, PageScope::Sequence),
            (PageLayout::Nhd, PageScope::KvHead),
        ]
        .into_iter()
        .enumerate()
        {
            let c = build_case::<f16>(900 + i as u64, geom, layout, scope, 16);
            for norm in &norms(&geom) {
                let pp = PagedDecodeParams {
                    geom,
                    pages: &c.table,
                    scale: None,
                    normalizer: norm,
                    restrict: Restrict::Indices(&c.scattered),
                };
                let run = |cpu: &kvsieve::cpu::Cpu| {
                    let mut out = vec![f16::ZERO; c.q.len()];
                    ops::decode_attention_paged(cpu, &pp, &c.q, &c.kp, &c.vp, &mut out).unwrap();
                    out
                };
                assert!(
                    run(&one) == run(&three),
                    "{isa} {layout:?} {scope:?} {norm:?}"
                );
            }
        }
    }
}

backend_suite!(
    paged_decode_matches_contiguous_and_reference,
    paged_decode_evidence_matches_contiguous,
    paged_decode_reads_shared_prefix_pages,
    paged_append_and_compaction_round_trip,
    paged_decode_after_compaction_matches_contiguous,
    paged_ops_reject_bad_input,
    paged_writes_reject_shared_pages,
);
