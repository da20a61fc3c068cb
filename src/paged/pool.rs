//! The page pool and the sequences kept in it: the host side that hands out
//! pages, counts references and builds the [`PageTable`]s the paged ops take.
//!
//! # Page keys and reference counts
//!
//! The unit a pool counts is the *page key* of the [`crate::paged`] module
//! docs: the page for [`PageScope::Sequence`], the pair (page, KV head `g`)
//! for [`PageScope::KvHead`] (a per-KV-head table only touches head `g`'s
//! rows of a page, so the `Hkv` keys of one page are allocated
//! independently). [`PagePool`] keeps, for every key, `refs(key)` = the
//! number of tables naming it; a key is *free* iff `refs(key) = 0`, and a
//! page is free iff all its keys are. Invariants:
//!
//! - `free_pages() + pages_in_use() = num_pages()`;
//! - a key is on its KV head's free list iff `refs(key) = 0`;
//! - [`PagePool::alloc`] returns a free key with `refs = 1`, or
//!   [`Error::OutOfPages`] (nothing allocated) when the head's free list is
//!   empty; [`PagePool::release`] frees the key when its count drops to 0.
//!
//! # Sequences
//!
//! [`PagedSequences`] owns a pool and the tables of each sequence (one, or
//! one per KV head) and keeps `refs(key)` equal to the number of tables of
//! live sequences naming `key`. It never writes a key with `refs > 1`:
//!
//! | call | pages | rows written |
//! |---|---|---|
//! | [`PagedSequences::append`] | allocates `⌈(L + n) / P⌉ − ⌈L / P⌉` per table; a shared partly filled last page is first copied to a fresh page (copy on write) | the new tokens ([`crate::ops::append_paged`]) and the copies |
//! | [`PagedSequences::fork`] | the child retains the parent's `⌊L / P⌋` full pages; its partly filled last page is a fresh copy | the `L mod P` slots copied |
//! | [`PagedSequences::truncate`] | releases the pages past `⌈L' / P⌉` | none |
//! | [`PagedSequences::remove`] | releases every page | none |
//! | [`PagedSequences::compact`], [`PagedSequences::drop_tokens`] | release the pages the shrunk tables no longer name | the compaction's moves, after a copy (on write) of each shared page a move lands in |
//!
//! Copies go through [`crate::ops::gather_rows`] and
//! [`crate::ops::scatter_rows`], so they run on every backend. A failing
//! call leaves the pool and the tables as they were (a completed copy on
//! write is kept: it changes no token).
//!
//! # Example
//!
//! A pool of 8 pages of `P = 4`, one KV head, `D = 2`: a 6-token prompt,
//! a fork, one decode token for the child.
//!
//! ```
//! use kvsieve::paged::{PageLayout, PageScope, PagedSequences};
//! use kvsieve::{Ragged, reference::Reference};
//!
//! # fn main() -> kvsieve::Result<()> {
//! let b = Reference;
//! let (d, hkv) = (2, 1);
//! let mut seqs = PagedSequences::new(PageLayout::Hnd, 4, 8, hkv, PageScope::Sequence)?;
//! let rows = seqs.rows() * d;
//! let (mut k, mut v) = (vec![0f32; rows], vec![0f32; rows]);
//!
//! let a = seqs.add_sequence()?;
//! let prompt: Vec<f32> = (0..6 * hkv * d).map(|x| x as f32).collect();
//! seqs.append(&b, d, &[a], &Ragged::from_lens(&[6])?, &prompt, &prompt, &mut k, &mut v)?;
//! assert_eq!(seqs.pool().pages_in_use(), 2); // 4 + 2 tokens
//!
//! let c = seqs.fork(&b, d, a, &mut k, &mut v)?;
//! assert_eq!(seqs.pool().refs(seqs.pages(a, 0)?[0], 0)?, 2); // the full page is shared
//! assert_ne!(seqs.pages(a, 0)?[1], seqs.pages(c, 0)?[1]); // the partial page was copied
//!
//! let step = vec![100f32, 101.0];
//! let table = seqs.append(&b, d, &[c], &Ragged::from_lens(&[1])?, &step, &step, &mut k, &mut v)?;
//! assert_eq!(table.table_len(0), 7);
//! assert_eq!(seqs.lens(a)?, vec![6]); // the parent is untouched
//!
//! seqs.remove(a)?;
//! seqs.remove(c)?;
//! assert_eq!(seqs.pool().free_pages(), 8);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use super::{PageLayout, PageScope, PageTable, PageTableParts, PagedCompaction};
use crate::backend::CacheOps;
use crate::dtype::Element;
use crate::error::{Error, Result, Size, shape};
use crate::layout::{IndexList, Ragged};

/// A fixed set of pages with a free list and a reference count per page
/// key (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagePool {
    num_pages: usize,
    num_kv_heads: usize,
    scope: PageScope,
    /// Key classes: 1 ([`PageScope::Sequence`]) or `Hkv`.
    classes: usize,
    /// `refs[page · classes + head]`.
    refs: Vec<u32>,
    /// One stack of free pages per key class (lowest page on top first).
    free: Vec<Vec<u32>>,
    /// Keys in use per page.
    live: Vec<u32>,
    in_use: usize,
}

impl PagePool {
    /// A pool of `num_pages` free pages of `num_kv_heads` KV heads, counted
    /// per page ([`PageScope::Sequence`]) or per (page, KV head)
    /// ([`PageScope::KvHead`]). Errors when `num_kv_heads` is 0 or the keys
    /// do not fit in `u32` page indices.
    pub fn new(num_pages: usize, num_kv_heads: usize, scope: PageScope) -> Result<Self> {
        const OP: &str = "PagePool::new";
        if num_kv_heads == 0 {
            return Err(shape(OP, "num_kv_heads must be positive"));
        }
        let classes = match scope {
            PageScope::Sequence => 1,
            PageScope::KvHead => num_kv_heads,
        };
        let keys = Size::new(OP, "page keys (pages x key classes)", num_pages)
            .times(classes)
            .get_u32()? as usize;
        let stack: Vec<u32> = (0..num_pages as u32).rev().collect();
        Ok(Self {
            num_pages,
            num_kv_heads,
            scope,
            classes,
            refs: vec![0; keys],
            free: vec![stack; classes],
            live: vec![0; num_pages],
            in_use: 0,
        })
    }
    /// Pages in the pool.
    pub fn num_pages(&self) -> usize {
        self.num_pages
    }
    /// KV heads of every page.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// How keys are counted.
    pub fn scope(&self) -> PageScope {
        self.scope
    }
    /// Pages none of whose keys is in use.
    pub fn free_pages(&self) -> usize {
        self.num_pages - self.in_use
    }
    /// Pages with at least one key in use.
    pub fn pages_in_use(&self) -> usize {
        self.in_use
    }
    /// Free keys of KV head `head` (use 0 for [`PageScope::Sequence`]):
    /// how many [`PagePool::alloc`]`(head)` calls succeed.
    pub fn free_keys(&self, head: usize) -> Result<usize> {
        self.class("PagePool::free_keys", head)?;
        Ok(self.free[head].len())
    }

    fn class(&self, op: &'static str, head: usize) -> Result<()> {
        if head >= self.classes {
            return Err(shape(
                op,
                format!(
                    "head {head} out of range: a {:?}-scoped pool counts {} key(s) per page \
                     (use 0 for PageScope::Sequence)",
                    self.scope, self.classes
                ),
            ));
        }
        Ok(())
    }
    fn key(&self, op: &'static str, page: u32, head: usize) -> Result<usize> {
        self.class(op, head)?;
        if page as usize >= self.num_pages {
            return Err(shape(
                op,
                format!(
                    "page {page} out of range for a pool of {} pages",
                    self.num_pages
                ),
            ));
        }
        Ok(page as usize * self.classes + head)
    }

    /// The reference count of key (`page`, `head`) (`head` 0 for
    /// [`PageScope::Sequence`]).
    pub fn refs(&self, page: u32, head: usize) -> Result<u32> {
        Ok(self.refs[self.key("PagePool::refs", page, head)?])
    }
    /// Takes a free key of KV head `head` (0 for [`PageScope::Sequence`])
    /// and returns its page, with count 1. [`Error::OutOfPages`] when there
    /// is none.
    pub fn alloc(&mut self, head: usize) -> Result<u32> {
        Ok(self.alloc_n(head, 1)?[0])
    }
    /// Takes `n` free keys of KV head `head`, all or none
    /// ([`Error::OutOfPages`] when fewer are free).
    pub fn alloc_n(&mut self, head: usize, n: usize) -> Result<Vec<u32>> {
        const OP: &str = "PagePool::alloc";
        self.class(OP, head)?;
        let free = self.free[head].len();
        if free < n {
            return Err(Error::OutOfPages {
                op: OP,
                requested: n,
                free,
            });
        }
        let pages = self.free[head].split_off(free - n);
        let pages: Vec<u32> = pages.into_iter().rev().collect();
        for &p in &pages {
            self.refs[p as usize * self.classes + head] = 1;
            self.live[p as usize] += 1;
            if self.live[p as usize] == 1 {
                self.in_use += 1;
            }
        }
        Ok(pages)
    }
    /// Adds a reference to a key in use (a table starts sharing it).
    /// Errors when the key is free or the count would overflow.
    pub fn retain(&mut self, page: u32, head: usize) -> Result<()> {
        const OP: &str = "PagePool::retain";
        let k = self.key(OP, page, head)?;
        match self.refs[k] {
            0 => Err(shape(
                OP,
                format!("page {page} (head {head}) is free: allocate it"),
            )),
            u32::MAX => Err(shape(OP, "reference count overflow")),
            n => {
                self.refs[k] = n + 1;
                Ok(())
            }
        }
    }
    /// Drops a reference; returns true when the key became free (back on
    /// the free list). Errors when the key is already free.
    pub fn release(&mut self, page: u32, head: usize) -> Result<bool> {
        const OP: &str = "PagePool::release";
        let k = self.key(OP, page, head)?;
        match self.refs[k] {
            0 => Err(shape(
                OP,
                format!("page {page} (head {head}) is already free"),
            )),
            n => {
                self.refs[k] = n - 1;
                if n > 1 {
                    return Ok(false);
                }
                self.free[head].push(page);
                self.live[page as usize] -= 1;
                if self.live[page as usize] == 0 {
                    self.in_use -= 1;
                }
                Ok(true)
            }
        }
    }
}

/// A handle to a sequence of [`PagedSequences`]: the slot it occupies and
/// that slot's generation. [`PagedSequences::remove`] frees the slot for a
/// later sequence and bumps its generation, so the removed sequence's
/// handle stays invalid (until 2³² removals of the same slot wrap it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId {
    slot: u32,
    generation: u32,
}

impl SeqId {
    /// The slot (live sequences have distinct slots, below the most
    /// sequences ever live at once).
    pub fn index(self) -> usize {
        self.slot as usize
    }
}

impl std::fmt::Display for SeqId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.slot, self.generation)
    }
}

/// One table: its pages in token order and its length `L`
/// (`⌈L / P⌉ = pages.len()`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Table {
    pages: Vec<u32>,
    len: usize,
}

/// Sequences in a [`PagePool`]: each sequence owns one table
/// ([`PageScope::Sequence`]) or one per KV head ([`PageScope::KvHead`],
/// table `g` uses head `g`'s keys), and the pool's counts are the number
/// of tables naming each key (see the module docs for what each call does
/// to the pages).
#[derive(Clone, Debug)]
pub struct PagedSequences {
    pool: PagePool,
    layout: PageLayout,
    page_size: usize,
    /// Per slot: the live sequence's tables.
    seqs: Vec<Option<Vec<Table>>>,
    /// Per slot: its generation (bumped on removal).
    generations: Vec<u32>,
    /// Slots of removed sequences, for reuse.
    free_slots: Vec<u32>,
}

/// A copy of the first `slots` slots of `src` to `dst` for key class `head`.
struct SlotCopy {
    head: usize,
    src: u32,
    dst: u32,
    slots: usize,
}

impl PagedSequences {
    /// An empty set of sequences over a fresh pool. The K and V pools are
    /// `[rows(), D]` with `rows() = num_pages · Hkv · P` in `layout`. Errors
    /// as [`PageTable::new`] for the geometry (`P` a power of two in
    /// `1 ..= 256`, `rows()` within `u32`).
    pub fn new(
        layout: PageLayout,
        page_size: usize,
        num_pages: usize,
        num_kv_heads: usize,
        scope: PageScope,
    ) -> Result<Self> {
        let s = Self {
            pool: PagePool::new(num_pages, num_kv_heads, scope)?,
            layout,
            page_size,
            seqs: Vec::new(),
            generations: Vec::new(),
            free_slots: Vec::new(),
        };
        // Validates P and the pool size the way the ops will.
        s.table(&[])?;
        Ok(s)
    }
    /// The pool (counters, reference counts).
    pub fn pool(&self) -> &PagePool {
        &self.pool
    }
    /// Token slots per page `P`.
    pub fn page_size(&self) -> usize {
        self.page_size
    }
    /// Row order of the K and V pools.
    pub fn layout(&self) -> PageLayout {
        self.layout
    }
    /// Rows of a K or V pool buffer: `num_pages · Hkv · P`.
    pub fn rows(&self) -> usize {
        self.pool.num_pages * self.pool.num_kv_heads * self.page_size
    }
    /// Live sequences.
    pub fn num_sequences(&self) -> usize {
        self.seqs.iter().filter(|s| s.is_some()).count()
    }
    fn tables_per_seq(&self) -> usize {
        self.pool.classes
    }
    fn seq(&self, op: &'static str, id: SeqId) -> Result<&Vec<Table>> {
        self.seqs
            .get(id.index())
            .filter(|_| self.generations[id.index()] == id.generation)
            .and_then(Option::as_ref)
            .ok_or_else(|| shape(op, format!("sequence {id} does not exist")))
    }
    /// Errors unless `ids` are live and distinct.
    fn check_ids(&self, op: &'static str, ids: &[SeqId]) -> Result<()> {
        let mut sorted = ids.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(shape(op, format!("sequence {} is named twice", w[0])));
        }
        for &id in ids {
            self.seq(op, id)?;
        }
        Ok(())
    }

    /// Adds an empty sequence, in the slot of a removed one when there is
    /// one.
    pub fn add_sequence(&mut self) -> Result<SeqId> {
        let empty = Table {
            pages: Vec::new(),
            len: 0,
        };
        let tables = Some(vec![empty; self.tables_per_seq()]);
        let slot = match self.free_slots.pop() {
            Some(slot) => slot,
            None => {
                let slot = Size::new("PagedSequences::add_sequence", "sequences", self.seqs.len())
                    .get_u32()?;
                self.seqs.push(None);
                self.generations.push(0);
                slot
            }
        };
        self.seqs[slot as usize] = tables;
        Ok(SeqId {
            slot,
            generation: self.generations[slot as usize],
        })
    }
    /// Tokens of each table of `id` (one entry, or one per KV head).
    pub fn lens(&self, id: SeqId) -> Result<Vec<usize>> {
        Ok(self
            .seq("PagedSequences::lens", id)?
            .iter()
            .map(|t| t.len)
            .collect())
    }
    /// Pages of table `table` of `id` (0, or the KV head for
    /// [`PageScope::KvHead`]), in token order.
    pub fn pages(&self, id: SeqId, table: usize) -> Result<&[u32]> {
        const OP: &str = "PagedSequences::pages";
        self.seq(OP, id)?
            .get(table)
            .map(|t| t.pages.as_slice())
            .ok_or_else(|| shape(OP, format!("table {table} out of range")))
    }

    /// The page table of the sequences `ids` (distinct, live), in that
    /// order: sequence `i` of the batch is `ids[i]`; for
    /// [`PageScope::KvHead`] table `i · Hkv + g` is its head-`g` table.
    pub fn table(&self, ids: &[SeqId]) -> Result<PageTable> {
        const OP: &str = "PagedSequences::table";
        self.check_ids(OP, ids)?;
        let tps = self.tables_per_seq();
        let mut parts = PageTableParts {
            layout: self.layout,
            page_size: self.page_size,
            num_pages: self.pool.num_pages,
            num_kv_heads: self.pool.num_kv_heads,
            scope: self.pool.scope,
            page_indptr: vec![0],
            page_indices: Vec::new(),
            last_page_len: Vec::new(),
        };
        let mut push = |t: &Table| -> Result<()> {
            parts.page_indices.extend_from_slice(&t.pages);
            parts
                .page_indptr
                .push(Size::new(OP, "page indices", parts.page_indices.len()).get_u32()?);
            let full = t.pages.len().saturating_sub(1) * self.page_size;
            parts.last_page_len.push((t.len - full) as u32);
            Ok(())
        };
        if ids.is_empty() {
            // A table needs one sequence: validate the geometry with empty ones.
            let empty = Table {
                pages: Vec::new(),
                len: 0,
            };
            for _ in 0..tps {
                push(&empty)?;
            }
        }
        for &id in ids {
            for t in self.seq(OP, id)? {
                push(t)?;
            }
        }
        PageTable::new(parts)
    }

    /// Errors unless `buf` is a pool buffer `[rows(), D]`.
    fn check_pool<B: CacheOps, T: Element>(
        &self,
        b: &B,
        op: &'static str,
        d: usize,
        buf: &B::Buffer<T>,
    ) -> Result<()> {
        if d == 0 {
            return Err(shape(op, "head_dim must be positive"));
        }
        let want = Size::new(op, "pool elements (rows x D)", self.rows())
            .times(d)
            .get()?;
        let got = b.buffer_len(buf);
        if got != want {
            return Err(shape(
                op,
                format!(
                    "a pool buffer has {got} elements, expected {} rows x D = {d} = {want}",
                    self.rows()
                ),
            ));
        }
        Ok(())
    }

    /// The physical row of (page, KV head `g`, slot `t`).
    fn row(&self, page: u32, g: usize, t: usize) -> u32 {
        let (p, hkv, ps) = (page as usize, self.pool.num_kv_heads, self.page_size);
        (match self.layout {
            PageLayout::Hnd => (p * hkv + g) * ps + t,
            PageLayout::Nhd => (p * ps + t) * hkv + g,
        }) as u32
    }

    /// Copies slots of K and V rows page to page (gather, then scatter: any
    /// backend).
    fn copy_slots<B: CacheOps, T: Element>(
        &self,
        b: &B,
        d: usize,
        copies: &[SlotCopy],
        (k, v): (&mut B::Buffer<T>, &mut B::Buffer<T>),
    ) -> Result<()> {
        let (mut src, mut dst) = (Vec::new(), Vec::new());
        for c in copies {
            let heads = match self.pool.scope {
                PageScope::Sequence => 0..self.pool.num_kv_heads,
                PageScope::KvHead => c.head..c.head + 1,
            };
            for g in heads {
                for t in 0..c.slots {
                    src.push(self.row(c.src, g, t));
                    dst.push(self.row(c.dst, g, t));
                }
            }
        }
        if src.is_empty() {
            return Ok(());
        }
        let mut tmp = b.zeros::<T>(src.len() * d)?;
        for buf in [k, v] {
            crate::ops::gather_rows(b, d, &src, buf, &mut tmp)?;
            crate::ops::scatter_rows(b, d, &dst, &tmp, buf)?;
        }
        Ok(())
    }

    /// Allocates `count[h]` keys for each class `h`, all or none.
    fn alloc_classes(&mut self, op: &'static str, count: &[usize]) -> Result<Vec<Vec<u32>>> {
        for (h, &n) in count.iter().enumerate() {
            let free = self.pool.free[h].len();
            if free < n {
                return Err(Error::OutOfPages {
                    op,
                    requested: n,
                    free,
                });
            }
        }
        count
            .iter()
            .enumerate()
            .map(|(h, &n)| self.pool.alloc_n(h, n))
            .collect()
    }

    fn release_all(&mut self, head: usize, pages: &[u32]) {
        for &p in pages {
            // Every page of a table holds a reference (the invariant), so
            // this cannot fail.
            let released = self.pool.release(p, head);
            debug_assert!(released.is_ok(), "{released:?}");
        }
    }

    /// Appends `tokens.len_of(i)` tokens to sequence `ids[i]` (every KV head
    /// gets them): copies a shared partly filled last page first (copy on
    /// write), allocates the pages the tokens need, then writes `k_new`,
    /// `v_new` (`[tokens.total(), Hkv, D]`, token-major) with
    /// [`crate::ops::append_paged`]. Returns the grown page table of `ids`
    /// (ready for [`crate::ops::decode_attention_paged`]). Errors with
    /// [`Error::OutOfPages`] when the pool cannot hold the tokens (nothing
    /// allocated, nothing written) and as `append_paged` on bad buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn append<B: CacheOps, T: Element>(
        &mut self,
        b: &B,
        head_dim: usize,
        ids: &[SeqId],
        tokens: &Ragged,
        k_new: &B::Buffer<T>,
        v_new: &B::Buffer<T>,
        k_pages: &mut B::Buffer<T>,
        v_pages: &mut B::Buffer<T>,
    ) -> Result<PageTable> {
        const OP: &str = "PagedSequences::append";
        self.check_ids(OP, ids)?;
        if tokens.num_segments() != ids.len() {
            return Err(shape(
                OP,
                format!(
                    "tokens has {} sequences, {} ids given",
                    tokens.num_segments(),
                    ids.len()
                ),
            ));
        }
        self.check_pool(b, OP, head_dim, k_pages)?;
        self.check_pool(b, OP, head_dim, v_pages)?;
        let ps = self.page_size;
        let tps = self.tables_per_seq();
        // Plan: COW sources and new pages per table, counted per key class.
        let mut count = vec![0usize; tps];
        let mut cows = Vec::new(); // (batch table, head, page, slots)
        let mut need = Vec::with_capacity(ids.len() * tps);
        for (i, &id) in ids.iter().enumerate() {
            let n = tokens.len_of(i);
            for (h, t) in self.seq(OP, id)?.iter().enumerate() {
                let new_len = Size::new(OP, "tokens of one table", t.len)
                    .plus(n)
                    .get_u32()? as usize;
                let grow = new_len.div_ceil(ps) - t.pages.len();
                let slots = t.len % ps;
                if n > 0 && slots != 0 {
                    let last = *t.pages.last().unwrap_or(&0);
                    if self.pool.refs(last, h)? > 1 {
                        cows.push((i * tps + h, h, last, slots));
                        count[h] += 1;
                    }
                }
                count[h] += grow;
                need.push(grow);
            }
        }
        let mut fresh = self.alloc_classes(OP, &count)?;
        // Copy on write (kept even if the append fails: it changes no token).
        let cow_pages: Vec<u32> = cows
            .iter()
            .map(|&(_, h, _, _)| fresh[h].pop().unwrap_or(0))
            .collect();
        let copies: Vec<SlotCopy> = cows
            .iter()
            .zip(&cow_pages)
            .map(|(&(_, head, src, slots), &dst)| SlotCopy {
                head,
                src,
                dst,
                slots,
            })
            .collect();
        if let Err(e) = self.copy_slots(b, head_dim, &copies, (k_pages, v_pages)) {
            for (h, pages) in fresh.iter().enumerate() {
                self.release_all(h, pages);
            }
            for c in &copies {
                self.release_all(c.head, &[c.dst]);
            }
            return Err(e);
        }
        for (&(bt, h, src, _), &dst) in cows.iter().zip(&cow_pages) {
            if let Some(Some(seq)) = self.seqs.get_mut(ids[bt / tps].index())
                && let Some(last) = seq[h].pages.last_mut()
            {
                *last = dst;
            }
            self.release_all(h, &[src]);
        }
        // New pages, in batch table order.
        let mut indptr = vec![0u32];
        let mut new_pages = Vec::new();
        let mut taken = vec![0usize; tps];
        for (bt, &g) in need.iter().enumerate() {
            let h = bt % tps;
            new_pages.extend_from_slice(&fresh[h][taken[h]..taken[h] + g]);
            taken[h] += g;
            indptr.push(new_pages.len() as u32);
        }
        let before = self.table(ids)?;
        let params = crate::ops::PagedAppendParams {
            head_dim,
            pages: &before,
            tokens,
            new_page_indptr: &indptr,
            new_pages: &new_pages,
        };
        let grown = match crate::ops::append_paged(b, &params, k_new, v_new, k_pages, v_pages) {
            Ok(t) => t,
            Err(e) => {
                for (h, pages) in fresh.iter().enumerate() {
                    self.release_all(h, pages);
                }
                return Err(e);
            }
        };
        for (i, &id) in ids.iter().enumerate() {
            if let Some(Some(seq)) = self.seqs.get_mut(id.index()) {
                for (h, t) in seq.iter_mut().enumerate() {
                    let bt = i * tps + h;
                    t.pages = grown.pages_of(bt).to_vec();
                    t.len = grown.table_len(bt);
                }
            }
        }
        Ok(grown)
    }

    /// A new sequence with the tokens of `parent`: it shares the parent's
    /// full pages (their counts go up by one) and gets a fresh copy of the
    /// partly filled last page of each table (rows copied in `k_pages`,
    /// `v_pages` on the backend). [`Error::OutOfPages`] when no page is
    /// free for a copy.
    pub fn fork<B: CacheOps, T: Element>(
        &mut self,
        b: &B,
        head_dim: usize,
        parent: SeqId,
        k_pages: &mut B::Buffer<T>,
        v_pages: &mut B::Buffer<T>,
    ) -> Result<SeqId> {
        const OP: &str = "PagedSequences::fork";
        self.check_pool(b, OP, head_dim, k_pages)?;
        self.check_pool(b, OP, head_dim, v_pages)?;
        let tables = self.seq(OP, parent)?.clone();
        let ps = self.page_size;
        let mut count = vec![0usize; tables.len()];
        for (h, t) in tables.iter().enumerate() {
            count[h] = usize::from(t.len % ps != 0);
        }
        let mut fresh = self.alloc_classes(OP, &count)?;
        let mut copies = Vec::new();
        let mut child = Vec::with_capacity(tables.len());
        for (h, t) in tables.iter().enumerate() {
            let full = t.len / ps;
            let mut pages = t.pages[..full].to_vec();
            if let Some(dst) = fresh[h].pop() {
                copies.push(SlotCopy {
                    head: h,
                    src: t.pages[full],
                    dst,
                    slots: t.len % ps,
                });
                pages.push(dst);
            }
            child.push(Table { pages, len: t.len });
        }
        if let Err(e) = self.copy_slots(b, head_dim, &copies, (k_pages, v_pages)) {
            for c in &copies {
                self.release_all(c.head, &[c.dst]);
            }
            return Err(e);
        }
        let id = match self.add_sequence() {
            Ok(id) => id,
            Err(e) => {
                for c in &copies {
                    self.release_all(c.head, &[c.dst]);
                }
                return Err(e);
            }
        };
        for (h, t) in tables.iter().enumerate() {
            for &p in &t.pages[..t.len / ps] {
                self.pool.retain(p, h)?;
            }
        }
        self.seqs[id.index()] = Some(child);
        Ok(id)
    }

    /// Removes `id`, releasing every page of its tables (a page returns to
    /// the pool when no other table names it).
    pub fn remove(&mut self, id: SeqId) -> Result<()> {
        self.seq("PagedSequences::remove", id)?;
        let tables = self.seqs[id.index()].take().unwrap_or_default();
        for (h, t) in tables.iter().enumerate() {
            self.release_all(h, &t.pages);
        }
        self.generations[id.index()] = id.generation.wrapping_add(1);
        self.free_slots.push(id.slot);
        Ok(())
    }

    /// Keeps the first `len` tokens of every table of `id` (tables already
    /// at most `len` long are unchanged) and releases the pages past
    /// `⌈len / P⌉`. Errors when `len` exceeds every table's length.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<()> {
        const OP: &str = "PagedSequences::truncate";
        let longest = self.seq(OP, id)?.iter().map(|t| t.len).max().unwrap_or(0);
        if len > longest {
            return Err(shape(
                OP,
                format!("cannot truncate sequence {id} of {longest} tokens to {len}"),
            ));
        }
        let ps = self.page_size;
        let mut tables = self.seqs[id.index()].take().unwrap_or_default();
        for (h, t) in tables.iter_mut().enumerate() {
            if t.len > len {
                let gone = t.pages.split_off(len.div_ceil(ps));
                self.release_all(h, &gone);
                t.len = len;
            }
        }
        self.seqs[id.index()] = Some(tables);
        Ok(())
    }

    /// The pages a compaction would write that another table shares: per
    /// segment of `table`, the page of every move's destination (`moves(len,
    /// list)`) whose key has more than one reference, as `(table, position
    /// in the table)`, sorted and without repeats. Errors on lists that do
    /// not fit `table` (count, order, range).
    fn shared_writes(
        &self,
        op: &'static str,
        table: &PageTable,
        lists: &IndexList,
        moves: impl Fn(usize, &[u32]) -> Vec<(u32, u32)>,
    ) -> Result<Vec<(usize, usize)>> {
        let segs = table.segments();
        let nseg = segs.num_segments();
        crate::paged::check_segment_lists(op, nseg, lists)?;
        let shift = self.page_size.trailing_zeros();
        let mut out = Vec::new();
        for s in 0..nseg {
            let (list, len) = (lists.list(s), segs.len_of(s));
            if let Some(&last) = list.last()
                && last as usize >= len
            {
                return Err(shape(
                    op,
                    format!("segment {s}: index {last} >= length {len}"),
                ));
            }
            let t = table.table_of(s);
            let h = t % self.tables_per_seq();
            let pages = table.pages_of(t);
            for (dst, _) in moves(len, list) {
                let at = (dst as usize) >> shift;
                if self.pool.refs(pages[at], h)? > 1 {
                    out.push((t, at));
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(out)
    }

    /// Copy on write before a compaction of `ids`: every page of `shared`
    /// (`(table, position)` of [`PagedSequences::table`]`(ids)`) is
    /// replaced in its table by a fresh page holding a copy of all its
    /// slots, and the shared page loses that table's reference. All pages
    /// are allocated first: [`Error::OutOfPages`] (nothing changed) when the
    /// pool cannot hold the copies.
    #[allow(clippy::too_many_arguments)]
    fn unshare<B: CacheOps, T: Element>(
        &mut self,
        op: &'static str,
        b: &B,
        head_dim: usize,
        ids: &[SeqId],
        table: &PageTable,
        shared: &[(usize, usize)],
        (k_pages, v_pages): (&mut B::Buffer<T>, &mut B::Buffer<T>),
    ) -> Result<()> {
        if shared.is_empty() {
            return Ok(());
        }
        let tps = self.tables_per_seq();
        let mut count = vec![0usize; tps];
        for &(t, _) in shared {
            count[t % tps] += 1;
        }
        let mut fresh = self.alloc_classes(op, &count)?;
        let copies: Vec<SlotCopy> = shared
            .iter()
            .map(|&(t, at)| SlotCopy {
                head: t % tps,
                src: table.pages_of(t)[at],
                dst: fresh[t % tps].pop().unwrap_or(0),
                slots: self.page_size,
            })
            .collect();
        if let Err(e) = self.copy_slots(b, head_dim, &copies, (k_pages, v_pages)) {
            for c in &copies {
                self.release_all(c.head, &[c.dst]);
            }
            return Err(e);
        }
        for (&(t, at), c) in shared.iter().zip(&copies) {
            if let Some(Some(seq)) = self.seqs.get_mut(ids[t / tps].index()) {
                seq[c.head].pages[at] = c.dst;
            }
            self.release_all(c.head, &[c.src]);
        }
        Ok(())
    }

    /// Evicts: compacts the sequences `ids` to the tokens in `keep` with
    /// [`crate::ops::compact_paged`] (one sorted list per segment of
    /// [`PagedSequences::table`]`(ids)`), then releases the pages the shrunk
    /// tables no longer name ([`PagedSequences::apply_compaction`]). A page
    /// another table shares (a forked prefix) that a row would move into is
    /// first copied for these sequences (copy on write; the other tables
    /// keep theirs); [`Error::OutOfPages`], nothing changed, when no page is
    /// free for a copy.
    #[allow(clippy::too_many_arguments)]
    pub fn compact<B: CacheOps, T: Element>(
        &mut self,
        b: &B,
        head_dim: usize,
        ids: &[SeqId],
        keep: &IndexList,
        k_pages: &mut B::Buffer<T>,
        v_pages: &mut B::Buffer<T>,
    ) -> Result<PagedCompaction> {
        const OP: &str = "PagedSequences::compact";
        let table = self.table(ids)?;
        let moves = |_: usize, l: &[u32]| crate::cache::compaction_moves(l);
        let shared = self.shared_writes(OP, &table, keep, moves)?;
        self.unshare(OP, b, head_dim, ids, &table, &shared, (k_pages, v_pages))?;
        let table = if shared.is_empty() {
            table
        } else {
            self.table(ids)?
        };
        let c = crate::ops::compact_paged(b, head_dim, &table, keep, k_pages, v_pages)?;
        self.apply_compaction(ids, &c)?;
        Ok(c)
    }

    /// [`PagedSequences::compact`] for the complement of `drop`
    /// ([`crate::ops::drop_paged`]).
    #[allow(clippy::too_many_arguments)]
    pub fn drop_tokens<B: CacheOps, T: Element>(
        &mut self,
        b: &B,
        head_dim: usize,
        ids: &[SeqId],
        drop: &IndexList,
        k_pages: &mut B::Buffer<T>,
        v_pages: &mut B::Buffer<T>,
    ) -> Result<PagedCompaction> {
        const OP: &str = "PagedSequences::drop_tokens";
        let table = self.table(ids)?;
        let shared = self.shared_writes(OP, &table, drop, crate::cache::drop_moves)?;
        self.unshare(OP, b, head_dim, ids, &table, &shared, (k_pages, v_pages))?;
        let table = if shared.is_empty() {
            table
        } else {
            self.table(ids)?
        };
        let c = crate::ops::drop_paged(b, head_dim, &table, drop, k_pages, v_pages)?;
        self.apply_compaction(ids, &c)?;
        Ok(c)
    }

    /// Records a compaction of [`PagedSequences::table`]`(ids)` made by
    /// [`crate::ops::compact_paged`] / [`crate::ops::drop_paged`]: each
    /// table keeps the pages `c.table` names and releases
    /// [`PagedCompaction::released`]. Errors (nothing changed) when `c` does
    /// not shrink the current tables of `ids`. Note that the ops only refuse
    /// writes to pages shared *within* the table they are given: for
    /// sequences that share pages with others, call
    /// [`PagedSequences::compact`] instead.
    pub fn apply_compaction(&mut self, ids: &[SeqId], c: &PagedCompaction) -> Result<()> {
        const OP: &str = "PagedSequences::apply_compaction";
        let old = self.table(ids)?;
        let new = &c.table;
        let same_geometry = new.layout() == old.layout()
            && new.page_size() == old.page_size()
            && new.num_pages() == old.num_pages()
            && new.num_kv_heads() == old.num_kv_heads()
            && new.scope() == old.scope()
            && new.num_tables() == old.num_tables();
        if !same_geometry {
            return Err(shape(
                OP,
                "the compaction's table has another geometry or number of tables than the \
                 sequences' table",
            ));
        }
        for t in 0..old.num_tables() {
            let (was, now) = (old.pages_of(t), new.pages_of(t));
            let ok = now.len() <= was.len()
                && now == &was[..now.len()]
                && c.released(t) == &was[now.len()..]
                && new.table_len(t) <= old.table_len(t);
            if !ok {
                return Err(shape(
                    OP,
                    format!(
                        "table {t}: the compaction does not shrink the current table (stale or \
                         from other sequences)"
                    ),
                ));
            }
        }
        let tps = self.tables_per_seq();
        for (i, &id) in ids.iter().enumerate() {
            let mut tables = self.seqs[id.index()].take().unwrap_or_default();
            for (h, tab) in tables.iter_mut().enumerate() {
                let bt = i * tps + h;
                self.release_all(h, c.released(bt));
                tab.pages.truncate(new.pages_of(bt).len());
                tab.len = new.table_len(bt);
            }
            self.seqs[id.index()] = Some(tables);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paged_pool_counts_and_exhaustion() {
        let mut pool = PagePool::new(3, 2, PageScope::Sequence).unwrap();
        let a = pool.alloc_n(0, 2).unwrap();
        assert_eq!(a, vec![0, 1]);
        assert_eq!((pool.free_pages(), pool.pages_in_use()), (1, 2));
        assert!(matches!(
            pool.alloc_n(0, 2),
            Err(Error::OutOfPages {
                requested: 2,
                free: 1,
                ..
            })
        ));
        assert_eq!(pool.free_pages(), 1, "a failed alloc takes nothing");
        pool.retain(0, 0).unwrap();
        assert_eq!(pool.refs(0, 0).unwrap(), 2);
        assert!(!pool.release(0, 0).unwrap());
        assert!(pool.release(0, 0).unwrap());
        assert!(pool.release(0, 0).is_err());
        assert!(pool.retain(0, 0).is_err());
        assert!(
            pool.alloc(1).is_err(),
            "a per-sequence pool has one key class"
        );
        assert_eq!(pool.free_pages() + pool.pages_in_use(), 3);

        // Per-KV-head keys: a page is in use while any head's key is.
        let mut pool = PagePool::new(2, 2, PageScope::KvHead).unwrap();
        let p = pool.alloc(1).unwrap();
        assert_eq!(pool.pages_in_use(), 1);
        assert_eq!(pool.free_keys(0).unwrap(), 2);
        assert_eq!(pool.alloc(0).unwrap(), p);
        assert_eq!(pool.pages_in_use(), 1);
        assert!(pool.release(p, 1).unwrap());
        assert_eq!(pool.pages_in_use(), 1);
        assert!(pool.release(p, 0).unwrap());
        assert_eq!(pool.pages_in_use(), 0);
    }
}
