//! Paged KV (issue #14, deliverable 2): the page pool and the sequences
//! kept in it (`kvsieve::paged::pool`), on every backend.
//!
//! Every test name contains `paged`. Each test keeps a host model of every
//! sequence (the K and V rows of each (sequence, KV head) in token order)
//! and checks, after each call, that the rows read back through the
//! sequences' page table (`ops::gather_rows` at `PageTable::row`) equal the
//! model: nothing lost, nothing overwritten (a fork's parent intact after
//! its child writes), and that the pool's reference counts and counters are
//! what the tables imply. Paged decode over the sequences' table must equal
//! the contiguous decode of the model's rows.

mod common;

use kvsieve::ops;
use kvsieve::paged::{PagedCompaction, SeqId};
use kvsieve::*;

const LAYOUTS: [PageLayout; 2] = [PageLayout::Hnd, PageLayout::Nhd];
const SCOPES: [PageScope; 2] = [PageScope::Sequence, PageScope::KvHead];

/// The rows of one sequence: `rows[g][j]` is the K row (D values) of token
/// `j`, KV head `g`; V rows are the K rows negated.
type Model = Vec<Vec<Vec<f32>>>;

/// A pool and its K / V buffers, with the host model of every sequence.
struct World<B: Backend> {
    seqs: PagedSequences,
    k: B::Buffer<f32>,
    v: B::Buffer<f32>,
    model: Vec<(SeqId, Model)>,
    d: usize,
    hkv: usize,
    next: f32,
}

impl<B: Ops> World<B> {
    fn new(b: &B, layout: PageLayout, scope: PageScope, p: usize, pages: usize) -> Self {
        let (d, hkv) = (3, 2);
        let seqs = PagedSequences::new(layout, p, pages, hkv, scope).unwrap();
        let n = seqs.rows() * d;
        Self {
            k: b.upload(&vec![f32::NAN; n]).unwrap(),
            v: b.upload(&vec![f32::NAN; n]).unwrap(),
            seqs,
            model: Vec::new(),
            d,
            hkv,
            next: 1.0,
        }
    }
    fn model_of(&mut self, id: SeqId) -> &mut Model {
        &mut self.model.iter_mut().find(|(i, _)| *i == id).unwrap().1
    }
    fn add(&mut self) -> SeqId {
        let id = self.seqs.add_sequence().unwrap();
        self.model.push((id, vec![Vec::new(); self.hkv]));
        id
    }
    /// Appends `n` fresh tokens (distinct values) to `id`.
    fn append(&mut self, b: &B, id: SeqId, n: usize) -> Result<PageTable> {
        let (d, hkv) = (self.d, self.hkv);
        let mut k_new = Vec::with_capacity(n * hkv * d);
        let mut rows = vec![Vec::new(); hkv];
        for _ in 0..n {
            for row in rows.iter_mut() {
                let r: Vec<f32> = (0..d).map(|c| self.next + c as f32 * 0.25).collect();
                self.next += 1.0;
                k_new.extend_from_slice(&r);
                row.push(r);
            }
        }
        let v_new: Vec<f32> = k_new.iter().map(|x| -x).collect();
        let t = self.seqs.append(
            b,
            d,
            &[id],
            &Ragged::from_lens(&[n as u32]).unwrap(),
            &b.upload(&k_new).unwrap(),
            &b.upload(&v_new).unwrap(),
            &mut self.k,
            &mut self.v,
        )?;
        for (g, r) in rows.into_iter().enumerate() {
            self.model_of(id)[g].extend(r);
        }
        Ok(t)
    }
    fn fork(&mut self, b: &B, id: SeqId) -> Result<SeqId> {
        let c = self.seqs.fork(b, self.d, id, &mut self.k, &mut self.v)?;
        let m = self.model_of(id).clone();
        self.model.push((c, m));
        Ok(c)
    }
    /// Asserts that every live sequence reads back as its model, and that
    /// every reference count is the number of tables naming the key.
    fn check(&self, b: &B, what: &str) {
        let (d, hkv) = (self.d, self.hkv);
        let ids: Vec<SeqId> = self.model.iter().map(|m| m.0).collect();
        let table = self.seqs.table(&ids).unwrap();
        for (i, (id, model)) in self.model.iter().enumerate() {
            for (g, rows) in model.iter().enumerate() {
                let s = i * hkv + g;
                assert_eq!(table.segments().len_of(s), rows.len(), "{what}: length");
                let idx: Vec<u32> = (0..rows.len()).map(|j| table.row(s, j) as u32).collect();
                for (buf, sign) in [(&self.k, 1.0f32), (&self.v, -1.0)] {
                    let mut out = b.zeros::<f32>(idx.len() * d).unwrap();
                    ops::gather_rows(b, d, &idx, buf, &mut out).unwrap();
                    let want: Vec<f32> = rows.iter().flatten().map(|x| x * sign).collect();
                    assert_eq!(
                        b.download(&out).unwrap(),
                        want,
                        "{what}: rows of sequence {id:?}, head {g}"
                    );
                }
            }
        }
        let pool = self.seqs.pool();
        let heads = match pool.scope() {
            PageScope::Sequence => 1,
            PageScope::KvHead => hkv,
        };
        let mut used = vec![false; pool.num_pages()];
        for p in 0..pool.num_pages() as u32 {
            for h in 0..heads {
                let named = (0..table.num_tables())
                    .filter(|&t| t % heads == h && table.pages_of(t).contains(&p))
                    .count();
                assert_eq!(
                    pool.refs(p, h).unwrap() as usize,
                    named,
                    "{what}: refs of page {p}, head {h}"
                );
                used[p as usize] |= named > 0;
            }
        }
        let in_use = used.iter().filter(|&&u| u).count();
        assert_eq!(pool.pages_in_use(), in_use, "{what}: pages in use");
        assert_eq!(pool.free_pages(), pool.num_pages() - in_use, "{what}");
    }
}

impl<B: Ops> World<B> {
    /// Decode over the live sequences' page table must equal decode over
    /// the model's rows in a contiguous cache (bitwise: the paged decode of
    /// the reference, CPU and CUDA backends computes in the contiguous
    /// order). Backends without a paged decode kernel (wgpu, for now)
    /// must say `Unsupported`.
    fn check_decode(&self, b: &B, what: &str) {
        let (d, hkv) = (self.d, self.hkv);
        let geom = HeadGeometry::new(2 * hkv, hkv, d).unwrap();
        let ids: Vec<SeqId> = self.model.iter().map(|m| m.0).collect();
        let table = self.seqs.table(&ids).unwrap();
        let batch = ids.len();
        let q: Vec<f32> = (0..batch * geom.num_q_heads() * d)
            .map(|i| ((i * 7) % 5) as f32 * 0.01 - 0.02)
            .collect();
        let lens: Vec<u32> = self
            .model
            .iter()
            .flat_map(|m| m.1.iter().map(|r| r.len() as u32))
            .collect();
        let segs = Segments::packed(batch, hkv, &lens).unwrap();
        let kc: Vec<f32> = self
            .model
            .iter()
            .flat_map(|m| m.1.iter().flatten().flatten().copied())
            .collect();
        let vc: Vec<f32> = kc.iter().map(|x| -x).collect();
        let norm = Normalizer::Softmax;
        let qb = b.upload(&q).unwrap();
        let mut want = b.zeros::<f32>(q.len()).unwrap();
        let dp = ops::DecodeParams {
            geom,
            segments: &segs,
            scale: None,
            normalizer: &norm,
            restrict: Restrict::Dense,
        };
        let (kb, vb) = (b.upload(&kc).unwrap(), b.upload(&vc).unwrap());
        ops::decode_attention(b, &dp, &qb, &kb, &vb, &mut want).unwrap();
        let pp = ops::PagedDecodeParams {
            geom,
            pages: &table,
            scale: None,
            normalizer: &norm,
            restrict: Restrict::Dense,
        };
        let mut got = b.zeros::<f32>(q.len()).unwrap();
        match ops::decode_attention_paged(b, &pp, &qb, &self.k, &self.v, &mut got) {
            Ok(()) => {
                let (got, want) = (b.download(&got).unwrap(), b.download(&want).unwrap());
                assert!(got.iter().all(|x| x.is_finite()), "{what}: decode read NaN");
                assert_eq!(got, want, "{what}: paged decode");
            }
            Err(Error::Unsupported { .. }) if b.name() == "wgpu" => {}
            Err(e) => panic!("{what}: paged decode: {e}"),
        }
    }
}

fn paged_pool_fork_truncate_remove_keep_every_row<B: Ops>(b: &B) {
    for layout in LAYOUTS {
        for scope in SCOPES {
            let what = format!("{layout:?} {scope:?}");
            let mut w = World::new(b, layout, scope, 4, 12);
            let a = w.add();
            w.append(b, a, 10).unwrap();
            w.check(b, &format!("{what}: prompt"));
            let a_pages = w.seqs.pages(a, 0).unwrap().to_vec();
            assert_eq!(a_pages.len(), 3);

            // Fork: full pages shared, the partial page copied.
            let c = w.fork(b, a).unwrap();
            let c_pages = w.seqs.pages(c, 0).unwrap().to_vec();
            assert_eq!(c_pages[..2], a_pages[..2], "{what}: full pages shared");
            assert_ne!(c_pages[2], a_pages[2], "{what}: partial page copied");
            assert_eq!(w.seqs.pool().refs(a_pages[0], 0).unwrap(), 2);
            assert_eq!(w.seqs.pool().refs(a_pages[2], 0).unwrap(), 1);
            w.check(b, &format!("{what}: fork"));

            // The child writes: the parent's rows stay.
            w.append(b, c, 3).unwrap();
            w.check(b, &format!("{what}: child append"));

            // Truncate the child into a shared page, then append: copy on write.
            w.seqs.truncate(c, 5).unwrap();
            for g in 0..w.hkv {
                w.model_of(c)[g].truncate(5);
            }
            assert_eq!(w.seqs.pages(c, 0).unwrap(), &a_pages[..2]);
            assert_eq!(w.seqs.pool().refs(a_pages[1], 0).unwrap(), 2);
            w.check(b, &format!("{what}: truncate"));
            w.append(b, c, 2).unwrap();
            assert_ne!(w.seqs.pages(c, 0).unwrap()[1], a_pages[1], "{what}: COW");
            assert_eq!(w.seqs.pool().refs(a_pages[1], 0).unwrap(), 1);
            w.check(b, &format!("{what}: append after truncate (COW)"));
            w.check_decode(b, &format!("{what}: decode after COW"));

            // Eviction on the parent into a page shared with the child: the
            // parent gets its own copy of that page first (copy on write),
            // the child keeps the original and its rows.
            let nseg = w.hkv;
            let keep = IndexList::new(
                Scope::KvHead,
                (0..=nseg as u32).map(|i| i * 9).collect(),
                (0..nseg).flat_map(|_| 1..10u32).collect(),
            )
            .unwrap();
            let shared = w.seqs.pages(c, 0).unwrap()[0];
            assert_eq!(shared, a_pages[0]);
            assert_eq!(w.seqs.pool().refs(shared, 0).unwrap(), 2);
            let free_before = w.seqs.pool().free_pages();
            w.seqs
                .compact(b, w.d, &[a], &keep, &mut w.k, &mut w.v)
                .unwrap();
            let kept: Vec<u32> = (1..10).collect();
            for g in 0..w.hkv {
                let m = &mut w.model_of(a)[g];
                for (dst, src) in kvsieve::cache::compaction_moves(&kept) {
                    m[dst as usize] = m[src as usize].clone();
                }
                m.truncate(kept.len());
            }
            let a_now = w.seqs.pages(a, 0).unwrap().to_vec();
            assert_ne!(
                a_now[0], shared,
                "{what}: the parent's copy of the shared page"
            );
            assert_eq!(a_now[1..], a_pages[1..], "{what}: private pages stay");
            assert_eq!(
                w.seqs.pages(c, 0).unwrap()[0],
                shared,
                "{what}: child keeps it"
            );
            assert_eq!(w.seqs.pool().refs(shared, 0).unwrap(), 1, "{what}");
            assert_eq!(
                w.seqs.pool().free_pages(),
                free_before - 1,
                "{what}: one copy"
            );
            w.check(b, &format!("{what}: compaction with copy on write"));
            w.check_decode(b, &format!("{what}: decode after compaction COW"));

            // A copy that finds no free page is an error that changes nothing.
            let mut full = World::new(b, layout, scope, 4, 2);
            let p = full.add();
            full.append(b, p, 8).unwrap();
            full.fork(b, p).unwrap(); // two full pages: shared, no copy
            assert_eq!(full.seqs.pool().free_pages(), 0);
            let keep = IndexList::new(
                Scope::KvHead,
                (0..=nseg as u32).map(|i| i * 7).collect(),
                (0..nseg).flat_map(|_| 1..8u32).collect(),
            )
            .unwrap();
            let before = full.seqs.pages(p, 0).unwrap().to_vec();
            assert!(
                matches!(
                    full.seqs
                        .compact(b, full.d, &[p], &keep, &mut full.k, &mut full.v),
                    Err(Error::OutOfPages { .. })
                ),
                "{what}: no page for the copy"
            );
            assert_eq!(full.seqs.pages(p, 0).unwrap(), &before[..], "{what}");
            full.check(b, &format!("{what}: copy without a free page"));

            // Dropping tokens from the child's own pages works: 13 tokens in
            // pages [a0, copy, n1, n2]; dropping 6 moves two rows into the
            // copy and releases n1, n2.
            w.append(b, c, 6).unwrap();
            let dropped = [4u32, 6, 9, 10, 11, 12];
            let drop = IndexList::new(
                Scope::KvHead,
                (0..=nseg as u32).map(|i| i * 6).collect(),
                (0..nseg).flat_map(|_| dropped).collect(),
            )
            .unwrap();
            let c_pages = w.seqs.pages(c, 0).unwrap().to_vec();
            let freed = w
                .seqs
                .drop_tokens(b, w.d, &[c], &drop, &mut w.k, &mut w.v)
                .unwrap();
            for g in 0..w.hkv {
                let m = &mut w.model_of(c)[g];
                let len = m.len();
                for (dst, src) in kvsieve::cache::drop_moves(len, &dropped) {
                    m[dst as usize] = m[src as usize].clone();
                }
                m.truncate(len - dropped.len());
            }
            assert_eq!(freed.released(0), &c_pages[2..], "{what}");
            assert_eq!(w.seqs.pages(c, 0).unwrap(), &c_pages[..2], "{what}");
            w.check(b, &format!("{what}: drop on the child"));

            // A stale compaction is rejected.
            let stale: PagedCompaction = freed.clone();
            assert!(w.seqs.apply_compaction(&[c], &stale).is_err(), "{what}");
            w.check(b, &format!("{what}: stale compaction"));

            // Remove: pages come back when no table names them.
            w.seqs.remove(a).unwrap();
            w.model.retain(|m| m.0 != a);
            assert!(w.seqs.remove(a).is_err(), "{what}: removed twice");
            w.check(b, &format!("{what}: remove parent"));
            w.seqs.remove(c).unwrap();
            w.model.clear();
            w.check(b, &format!("{what}: remove child"));
            assert_eq!(w.seqs.pool().free_pages(), 12, "{what}");

            // Slots are reused; the removed sequences' handles stay invalid.
            let n = w.add();
            assert!(n.index() < 2, "{what}: a removed slot is reused");
            assert!(n != a && n != c, "{what}: a new handle");
            assert!(w.seqs.lens(a).is_err() && w.seqs.lens(c).is_err(), "{what}");
            assert!(w.seqs.remove(a).is_err(), "{what}: stale handle");
            w.append(b, n, 5).unwrap();
            w.check(b, &format!("{what}: a sequence in a reused slot"));
            assert_eq!(w.seqs.num_sequences(), 1, "{what}");
        }
    }
}

fn paged_pool_exhaustion_is_an_error<B: Ops>(b: &B) {
    for scope in SCOPES {
        let mut w = World::new(b, PageLayout::Hnd, scope, 4, 3);
        let a = w.add();
        w.append(b, a, 10).unwrap();
        let x = w.add();
        // 10 + 3 tokens need 4 pages: refused, nothing allocated or written.
        assert!(matches!(
            w.append(b, a, 3),
            Err(Error::OutOfPages { requested: 1, .. })
        ));
        assert!(matches!(w.append(b, x, 1), Err(Error::OutOfPages { .. })));
        assert_eq!(w.seqs.pool().free_pages(), 0);
        // The fork needs a page for its partial last page.
        assert!(matches!(w.fork(b, a), Err(Error::OutOfPages { .. })));
        w.check(b, &format!("{scope:?}: after the refusals"));
        // Filling the last page needs no new page.
        w.append(b, a, 2).unwrap();
        // A full sequence forks without a page: it shares all of them.
        let c = w.fork(b, a).unwrap();
        assert_eq!(
            w.seqs
                .pool()
                .refs(w.seqs.pages(a, 0).unwrap()[2], 0)
                .unwrap(),
            2
        );
        w.check(b, &format!("{scope:?}: fork of a full sequence"));
        assert!(matches!(w.append(b, c, 1), Err(Error::OutOfPages { .. })));
        w.seqs.remove(a).unwrap();
        w.model.retain(|m| m.0 != a);
        w.append(b, c, 1).unwrap_err();
        w.check(b, &format!("{scope:?}: remove parent"));
        w.seqs.truncate(c, 4).unwrap();
        for g in 0..w.hkv {
            w.model_of(c)[g].truncate(4);
        }
        assert_eq!(w.seqs.pool().free_pages(), 2);
        w.append(b, c, 5).unwrap();
        w.check(b, &format!("{scope:?}: regrow"));
        // Bad handles and buffers are errors.
        assert!(w.seqs.truncate(c, 100).is_err());
        assert!(w.seqs.table(&[c, c]).is_err());
        let mut short = b.zeros::<f32>(3).unwrap();
        let mut v = b.zeros::<f32>(3).unwrap();
        assert!(w.seqs.fork(b, 3, c, &mut short, &mut v).is_err());
    }
}

/// Per-KV-head tables keep head-wise lengths; each head's keys of a page
/// are counted and reused separately.
fn paged_pool_head_wise_eviction_releases_per_head_keys<B: Ops>(b: &B) {
    for layout in LAYOUTS {
        let what = format!("{layout:?}");
        let mut w = World::new(b, layout, PageScope::KvHead, 4, 6);
        let a = w.add();
        w.append(b, a, 16).unwrap();
        assert_eq!(w.seqs.pool().pages_in_use(), 4);
        // Head 0 keeps 4 tokens (1 page), head 1 keeps 12 (3 pages).
        let keep0: Vec<u32> = vec![1, 5, 9, 15];
        let keep1: Vec<u32> = (0..16).filter(|j| j % 4 != 2).collect();
        let keep = IndexList::new(
            Scope::KvHead,
            vec![0, 4, 16],
            keep0.iter().chain(&keep1).copied().collect(),
        )
        .unwrap();
        let c = w
            .seqs
            .compact(b, w.d, &[a], &keep, &mut w.k, &mut w.v)
            .unwrap();
        for (g, kept) in [keep0, keep1].iter().enumerate() {
            let m = &mut w.model_of(a)[g];
            for (dst, src) in kvsieve::cache::compaction_moves(kept) {
                m[dst as usize] = m[src as usize].clone();
            }
            m.truncate(kept.len());
        }
        assert_eq!((c.released(0).len(), c.released(1).len()), (3, 1), "{what}");
        assert_eq!(w.seqs.lens(a).unwrap(), vec![4, 12]);
        assert_eq!(w.seqs.pool().pages_in_use(), 3, "{what}");
        assert_eq!(w.seqs.pool().free_keys(0).unwrap(), 5, "{what}");
        assert_eq!(w.seqs.pool().free_keys(1).unwrap(), 3, "{what}");
        w.check(b, &format!("{what}: head-wise compaction"));
        // A new sequence reuses head 0's freed keys of pages head 1 still uses.
        let x = w.add();
        w.append(b, x, 12).unwrap();
        assert_eq!(w.seqs.pool().pages_in_use(), 6, "{what}");
        let a1 = w.seqs.pages(a, 1).unwrap().to_vec();
        assert!(
            w.seqs.pages(x, 0).unwrap().iter().any(|p| a1.contains(p)),
            "{what}: head 0 of x shares a page with head 1 of a"
        );
        w.check(b, &format!("{what}: reuse of per-head keys"));
        w.check_decode(b, &format!("{what}: decode"));
        assert!(matches!(w.append(b, x, 1), Err(Error::OutOfPages { .. })));
    }
}

/// The target: a 32K-token prompt evicted to a 10% budget returns
/// at least 85% of its pages to the pool (P = 16).
fn paged_pool_evicting_32k_prompt_to_10_percent_frees_85_percent_of_pages<B: Ops>(b: &B) {
    let (p, len, d) = (16usize, 32768usize, 2usize);
    let pages = len / p;
    let mut seqs = PagedSequences::new(PageLayout::Hnd, p, pages, 1, PageScope::Sequence).unwrap();
    let rows = seqs.rows() * d;
    let (mut k, mut v) = (b.zeros::<f32>(rows).unwrap(), b.zeros::<f32>(rows).unwrap());
    let a = seqs.add_sequence().unwrap();
    let k_new: Vec<f32> = (0..len * d).map(|x| x as f32).collect();
    let v_new: Vec<f32> = k_new.iter().map(|x| -x).collect();
    seqs.append(
        b,
        d,
        &[a],
        &Ragged::from_lens(&[len as u32]).unwrap(),
        &b.upload(&k_new).unwrap(),
        &b.upload(&v_new).unwrap(),
        &mut k,
        &mut v,
    )
    .unwrap();
    assert_eq!(seqs.pool().free_pages(), 0);
    let budget = len / 10;
    let keep: Vec<u32> = (0..budget as u32).map(|j| j * 10).collect();
    let list = IndexList::new(Scope::KvHead, vec![0, budget as u32], keep.clone()).unwrap();
    let c = seqs.compact(b, d, &[a], &list, &mut k, &mut v).unwrap();
    let freed = seqs.pool().free_pages();
    assert_eq!(freed, c.freed().len());
    assert!(
        freed * 100 >= pages * 85,
        "{freed} of {pages} pages returned"
    );
    assert_eq!(seqs.lens(a).unwrap(), vec![budget]);
    // The kept tokens, in the compaction's row order (kept rows below the
    // new length stay; the others fill holes), read back exactly.
    let table = seqs.table(&[a]).unwrap();
    let mut order: Vec<u32> = (0..len as u32).collect();
    for (dst, src) in kvsieve::cache::compaction_moves(&keep) {
        order[dst as usize] = order[src as usize];
    }
    let idx: Vec<u32> = (0..budget).map(|j| table.row(0, j) as u32).collect();
    let mut out = b.zeros::<f32>(budget * d).unwrap();
    ops::gather_rows(b, d, &idx, &k, &mut out).unwrap();
    let want: Vec<f32> = order[..budget]
        .iter()
        .flat_map(|&t| (0..d).map(move |c| (t as usize * d + c) as f32))
        .collect();
    assert_eq!(b.download(&out).unwrap(), want);
    let mut sorted = order[..budget].to_vec();
    sorted.sort_unstable();
    assert_eq!(sorted, keep, "every kept token is there once");
}

backend_suite!(
    paged_pool_fork_truncate_remove_keep_every_row,
    paged_pool_exhaustion_is_an_error,
    paged_pool_head_wise_eviction_releases_per_head_keys,
    paged_pool_evicting_32k_prompt_to_10_percent_frees_85_percent_of_pages,
);
