//! Paged KV: K and V kept in fixed-size pages addressed by a page table, as
//! serving engines keep them (vLLM, SGLang, FlashInfer, TensorRT-LLM).
//!
//! # Pages
//!
//! A *page* holds `P` token slots (`P` a power of two, `1 ..= 256`) of every
//! KV head. The K pool and the V pool are each one `[rows, D]` buffer with
//! `rows = num_pages · Hkv · P`, in one of two orders ([`PageLayout`]):
//!
//! | layout | shape | physical row of slot `t` (`0 ≤ t < P`) of page `p`, KV head `g` | used by |
//! |---|---|---|---|
//! | [`PageLayout::Hnd`] | `[pages, Hkv, P, D]` | `(p · Hkv + g) · P + t` | FlashInfer (`kv_layout="HND"`) |
//! | [`PageLayout::Nhd`] | `[pages, P, Hkv, D]` | `(p · P + t) · Hkv + g` | vLLM, FlashInfer's default |
//!
//! In HND the `P` slots of one head of a page are `P` consecutive rows (a
//! run the kernels stream); in NHD consecutive slots of one head are `Hkv`
//! rows apart.
//!
//! # Page tables
//!
//! A [`PageTable`] lists the pages of each *table* in CSR form, exactly as
//! FlashInfer's `BatchDecodeWithPagedKVCache` takes them:
//!
//! - `page_indptr` (`u32`, one entry per table plus one): table `i` owns
//!   `page_indices[page_indptr[i] .. page_indptr[i + 1]]`, in token order;
//! - `last_page_len[i]`: the slots in use in the table's last page, `1 ..= P`
//!   (`0` for a table with no pages);
//! - the length of table `i` with `n_i` pages is
//!   `L_i = P · (n_i − 1) + last_page_len[i]` (0 when `n_i = 0`); token `j`
//!   (`0 ≤ j < L_i`) sits in slot `j mod P` of page
//!   `page_indices[page_indptr[i] + ⌊j / P⌋]`.
//!
//! [`PageScope`] says which KV segment `s = b · Hkv + g` (sequence `b`, KV
//! head `g`, as in [`Segments`]) a table serves:
//!
//! | scope | tables | table of segment `s` | token counts |
//! |---|---|---|---|
//! | [`PageScope::Sequence`] | `batch` | `b` (all KV heads of the sequence share it) | one per sequence |
//! | [`PageScope::KvHead`] | `batch · Hkv` | `s` (one per KV head, FlashInfer's per-head block tables) | one per (sequence, KV head): head-wise budgets |
//!
//! A table of segment `(b, g)` only ever touches KV head `g`'s rows of its
//! pages. So two per-KV-head tables of *different* heads may name the same
//! page without sharing a row; the unit of sharing is the *page key*: the
//! page for [`PageScope::Sequence`], the pair (page, KV head) for
//! [`PageScope::KvHead`].
//!
//! # Sharing
//!
//! A page key may be named by several tables (prefix sharing, as engines
//! do): the attention ops read it for each of them. Ops that *write*
//! ([`crate::ops::append_paged`], [`crate::ops::compact_paged`],
//! [`crate::ops::drop_paged`]) return an error when a page key they would
//! write is named by more than one table (copy it first). A page key may
//! never appear twice in one table.
//!
//! # Validation
//!
//! [`PageTable::new`] checks everything once, so that kernels can index
//! through [`PageTable::row`] without checks: `P` a power of two in
//! `1 ..= 256`; `rows` fits in a `u32` (row indices are `u32` everywhere);
//! `page_indptr` starts at 0, never decreases and ends at
//! `page_indices.len()`; every page index below `num_pages`; no page twice in
//! one table; `last_page_len` in range; the segments' total length fits in a
//! `u32` (the packed numbering of [`PageTable::segments`]). The ops check the
//! K/V buffers against [`PageTable::rows`].
//!
//! **Why `P` may be below 16.** Engines use 16–256 (the issue's range), and
//! kernels reach full speed there; FlashInfer also accepts any page size
//! down to 1 (token-level paging, as sparse MLA kernels use). Nothing in the
//! kernels depends on `P ≥ 16`, and small pages let the tests cross many page
//! boundaries with few tokens, so every power of two from 1 is accepted. The
//! bound 256 keeps a page run inside one decode key block
//! ([`crate::cpu::DECODE_BLOCK`] is a multiple of every accepted `P`).
//!
//! # Pools and sequences
//!
//! [`PagePool`] hands out pages and counts the tables naming each page key;
//! [`PagedSequences`] keeps sequences in a pool (append, fork with shared
//! full pages and a copied last page, truncate, remove, eviction) and builds
//! the tables the ops take: see [`pool`] for the counts, the invariants and
//! an example.
//!
//! # Worked example
//!
//! `P = 4`, `Hkv = 2`, a pool of 6 pages (48 rows), one table per sequence:
//! sequence 0 holds 7 tokens in pages `[3, 0]`, sequence 1 holds 4 tokens in
//! page `[5]`.
//!
//! ```
//! use kvsieve::paged::{PageLayout, PageScope, PageTable, PageTableParts};
//!
//! # fn main() -> kvsieve::Result<()> {
//! let parts = PageTableParts {
//!     layout: PageLayout::Hnd,
//!     page_size: 4,
//!     num_pages: 6,
//!     num_kv_heads: 2,
//!     scope: PageScope::Sequence,
//!     page_indptr: vec![0, 2, 3],
//!     page_indices: vec![3, 0, 5],
//!     last_page_len: vec![3, 4],
//! };
//! let hnd = PageTable::new(parts.clone())?;
//! assert_eq!(hnd.rows(), 48);
//! assert_eq!(hnd.segments().lens(), &[7, 7, 4, 4]); // (b, g) = (0,0) (0,1) (1,0) (1,1)
//! // Token 2 of sequence 0, KV head 0: page 3, slot 2.
//! assert_eq!(hnd.row(0, 2), (3 * 2 + 0) * 4 + 2); // 26
//! // Token 5 of sequence 0, KV head 1: page 0, slot 1.
//! assert_eq!(hnd.row(1, 5), (0 * 2 + 1) * 4 + 1); // 5
//! let nhd = PageTable::new(PageTableParts { layout: PageLayout::Nhd, ..parts })?;
//! assert_eq!(nhd.row(0, 2), (3 * 4 + 2) * 2 + 0); // 28
//! assert_eq!(nhd.row(1, 5), (0 * 4 + 1) * 2 + 1); // 3
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

use crate::error::{Error, Result, shape};
use crate::layout::Segments;

pub mod pool;
pub use pool::{PagePool, PagedSequences, SeqId};

/// Largest accepted page size (see the module docs).
pub const MAX_PAGE_SIZE: usize = 256;

/// Order of the rows of a page pool (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageLayout {
    /// `[pages, Hkv, P, D]`: slot `t` of page `p`, KV head `g` is row
    /// `(p · Hkv + g) · P + t` (FlashInfer's HND; one head's slots of a page
    /// are `P` consecutive rows).
    Hnd,
    /// `[pages, P, Hkv, D]`: slot `t` of page `p`, KV head `g` is row
    /// `(p · P + t) · Hkv + g` (vLLM's layout, FlashInfer's NHD).
    Nhd,
}

/// Which KV segments a table serves (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageScope {
    /// One table per sequence, shared by all its KV heads.
    Sequence,
    /// One table per (sequence, KV head), index `b · Hkv + g`.
    KvHead,
}

/// The raw arrays of a [`PageTable`] (validated by [`PageTable::new`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PageTableParts {
    /// Row order of the page pool.
    pub layout: PageLayout,
    /// Token slots per page `P` (a power of two, `1 ..= 256`).
    pub page_size: usize,
    /// Pages in the pool; K and V buffers are `[num_pages · Hkv · P, D]`.
    pub num_pages: usize,
    /// KV heads `Hkv` (every page holds all of them).
    pub num_kv_heads: usize,
    /// Tables per sequence or per (sequence, KV head).
    pub scope: PageScope,
    /// CSR offsets into `page_indices`, one per table plus one.
    pub page_indptr: Vec<u32>,
    /// Pages of every table, in token order.
    pub page_indices: Vec<u32>,
    /// Slots in use in each table's last page (`1 ..= P`; `0` for a table
    /// with no pages).
    pub last_page_len: Vec<u32>,
}

/// A validated page table (see the module docs for the layout, the math
/// and the rules).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PageTable {
    parts: PageTableParts,
    shift: u32,
    lens: Vec<u32>,
    segs: Segments,
}

impl PageTable {
    /// Validates `parts` (every rule of the module docs' *Validation*) and
    /// builds the table. Errors are [`Error::Shape`], or
    /// [`Error::TooLarge`] when `num_pages · Hkv · P` overflows a `u32`.
    pub fn new(parts: PageTableParts) -> Result<Self> {
        const OP: &str = "PageTable::new";
        let p = parts.page_size;
        if !p.is_power_of_two() || p > MAX_PAGE_SIZE {
            return Err(shape(
                OP,
                format!("page_size must be a power of two in 1..={MAX_PAGE_SIZE}, got {p}"),
            ));
        }
        let hkv = parts.num_kv_heads;
        if hkv == 0 {
            return Err(shape(OP, "num_kv_heads must be positive"));
        }
        crate::error::Size::new(
            OP,
            "pool rows (num_pages x num_kv_heads x page_size)",
            parts.num_pages,
        )
        .times(hkv)
        .times(p)
        .get_u32()?;
        let tables = parts.last_page_len.len();
        if tables == 0 {
            return Err(shape(OP, "a page table needs at least one table"));
        }
        if parts.scope == PageScope::KvHead && !tables.is_multiple_of(hkv) {
            return Err(shape(
                OP,
                format!(
                    "per-KV-head tables: {tables} tables is not a multiple of num_kv_heads = {hkv}"
                ),
            ));
        }
        let ind = &parts.page_indptr;
        if ind.len() != tables + 1 {
            return Err(shape(
                OP,
                format!(
                    "page_indptr has {} entries, expected {} (one per table plus one; \
                     last_page_len names {tables} tables)",
                    ind.len(),
                    tables + 1
                ),
            ));
        }
        if ind[0] != 0 {
            return Err(shape(
                OP,
                format!("page_indptr[0] must be 0, got {}", ind[0]),
            ));
        }
        if let Some(i) = ind.windows(2).position(|w| w[1] < w[0]) {
            return Err(shape(
                OP,
                format!(
                    "page_indptr must be non-decreasing, but page_indptr[{i}] = {} > page_indptr[{}] = {}",
                    ind[i],
                    i + 1,
                    ind[i + 1]
                ),
            ));
        }
        if ind[tables] as usize != parts.page_indices.len() {
            return Err(shape(
                OP,
                format!(
                    "page_indptr ends at {} but there are {} page indices",
                    ind[tables],
                    parts.page_indices.len()
                ),
            ));
        }
        if let Some(i) = parts
            .page_indices
            .iter()
            .position(|&x| x as usize >= parts.num_pages)
        {
            return Err(shape(
                OP,
                format!(
                    "page_indices[{i}] = {} is out of range for a pool of {} pages",
                    parts.page_indices[i], parts.num_pages
                ),
            ));
        }
        let mut lens = Vec::with_capacity(tables);
        let mut sorted = Vec::new();
        for i in 0..tables {
            let pages = &parts.page_indices[ind[i] as usize..ind[i + 1] as usize];
            let last = parts.last_page_len[i] as usize;
            match pages.len() {
                0 if last != 0 => {
                    return Err(shape(
                        OP,
                        format!(
                            "table {i} has no pages, so last_page_len[{i}] must be 0, got {last}"
                        ),
                    ));
                }
                n if n > 0 && !(1..=p).contains(&last) => {
                    return Err(shape(
                        OP,
                        format!(
                            "last_page_len[{i}] = {last} is out of range 1..={p} for a table of {n} pages"
                        ),
                    ));
                }
                _ => {}
            }
            sorted.clear();
            sorted.extend_from_slice(pages);
            sorted.sort_unstable();
            if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                return Err(shape(OP, format!("table {i} names page {} twice", w[0])));
            }
            // n ≤ num_pages and n · P ≤ rows ≤ u32::MAX (checked above).
            let len = (pages.len() * p).saturating_sub(p) + last;
            lens.push(len as u32);
        }
        let batch = match parts.scope {
            PageScope::Sequence => tables,
            PageScope::KvHead => tables / hkv,
        };
        let seg_lens: Vec<u32> = match parts.scope {
            PageScope::Sequence => lens
                .iter()
                .flat_map(|&l| std::iter::repeat_n(l, hkv))
                .collect(),
            PageScope::KvHead => lens.clone(),
        };
        let segs = Segments::packed(batch, hkv, &seg_lens).map_err(|_| {
            shape(
                OP,
                "the segments' total length overflows u32 (too many tokens across all \
                 (sequence, KV head) segments)",
            )
        })?;
        Ok(Self {
            shift: p.trailing_zeros(),
            parts,
            lens,
            segs,
        })
    }

    /// The raw arrays (to modify and validate again).
    pub fn parts(&self) -> &PageTableParts {
        &self.parts
    }
    /// Consumes the table, returning its arrays.
    pub fn into_parts(self) -> PageTableParts {
        self.parts
    }
    /// Row order of the pool.
    pub fn layout(&self) -> PageLayout {
        self.parts.layout
    }
    /// Token slots per page `P`.
    pub fn page_size(&self) -> usize {
        self.parts.page_size
    }
    /// Pages in the pool.
    pub fn num_pages(&self) -> usize {
        self.parts.num_pages
    }
    /// KV heads `Hkv`.
    pub fn num_kv_heads(&self) -> usize {
        self.parts.num_kv_heads
    }
    /// Table scope.
    pub fn scope(&self) -> PageScope {
        self.parts.scope
    }
    /// Number of tables (`batch` or `batch · Hkv`).
    pub fn num_tables(&self) -> usize {
        self.lens.len()
    }
    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.segs.batch()
    }
    /// The CSR offsets of the tables.
    pub fn page_indptr(&self) -> &[u32] {
        &self.parts.page_indptr
    }
    /// The pages of every table, concatenated.
    pub fn page_indices(&self) -> &[u32] {
        &self.parts.page_indices
    }
    /// Slots in use in each table's last page.
    pub fn last_page_len(&self) -> &[u32] {
        &self.parts.last_page_len
    }
    /// Pages of table `i`, in token order.
    ///
    /// # Panics
    ///
    /// If `i >= num_tables()` (like slice indexing).
    pub fn pages_of(&self, i: usize) -> &[u32] {
        let ind = &self.parts.page_indptr;
        &self.parts.page_indices[ind[i] as usize..ind[i + 1] as usize]
    }
    /// Tokens in table `i`: `P · (pages − 1) + last_page_len[i]`.
    ///
    /// # Panics
    ///
    /// If `i >= num_tables()`.
    pub fn table_len(&self, i: usize) -> usize {
        self.lens[i] as usize
    }
    /// The table serving segment `s = b · Hkv + g`: `b` or `s` (see
    /// [`PageScope`]).
    pub fn table_of(&self, s: usize) -> usize {
        match self.parts.scope {
            PageScope::Sequence => s / self.parts.num_kv_heads,
            PageScope::KvHead => s,
        }
    }
    /// One [`Segments`] entry per (sequence, KV head) with the tables'
    /// lengths, for everything that is laid out in token coordinates
    /// (restrictions, [`crate::backend::evidence_blocks`]). Its offsets are a
    /// packed numbering of the tokens; they are not rows of the page pool.
    pub fn segments(&self) -> &Segments {
        &self.segs
    }
    /// Rows of a K or V pool buffer: `num_pages · Hkv · P` (the buffer holds
    /// `rows · D` elements).
    pub fn rows(&self) -> usize {
        self.parts.num_pages * self.parts.num_kv_heads * self.parts.page_size
    }
    /// Rows between consecutive slots of one KV head in a page: 1 (HND) or
    /// `Hkv` (NHD).
    pub fn row_stride(&self) -> usize {
        match self.parts.layout {
            PageLayout::Hnd => 1,
            PageLayout::Nhd => self.parts.num_kv_heads,
        }
    }
    /// Pages a table of `len` tokens occupies: `⌈len / P⌉`.
    pub fn pages_for(&self, len: usize) -> usize {
        len.div_ceil(self.parts.page_size)
    }
    /// The pages of segment `s` as a row map (see [`SegmentPages`]).
    ///
    /// # Panics
    ///
    /// If `s >= segments().num_segments()`.
    pub fn segment(&self, s: usize) -> SegmentPages<'_> {
        let hkv = self.parts.num_kv_heads;
        SegmentPages {
            pages: self.pages_of(self.table_of(s)),
            len: self.segs.len_of(s),
            shift: self.shift,
            hkv,
            head: s % hkv,
            layout: self.parts.layout,
        }
    }
    /// The physical row of token `t` of segment `s = b · Hkv + g` (the
    /// layout formula of the module docs).
    ///
    /// # Panics
    ///
    /// If `s` is out of range or `t` is at or past the table's last page
    /// (like slice indexing); a `t` inside the last page but past its
    /// `last_page_len` maps to an unused slot.
    pub fn row(&self, s: usize, t: usize) -> usize {
        self.segment(s).row(t)
    }

    /// The page key of page `page` read by segment `s`: `page` for
    /// [`PageScope::Sequence`], `page · Hkv + g` for [`PageScope::KvHead`].
    pub(crate) fn key(&self, s: usize, page: u32) -> u64 {
        match self.parts.scope {
            PageScope::Sequence => u64::from(page),
            PageScope::KvHead => {
                u64::from(page) * self.parts.num_kv_heads as u64
                    + (s % self.parts.num_kv_heads) as u64
            }
        }
    }

    /// The page key of page `page` in table `i` (see [`PageTable::key`]).
    fn table_key(&self, i: usize, page: u32) -> u64 {
        match self.parts.scope {
            PageScope::Sequence => u64::from(page),
            PageScope::KvHead => self.key(i, page),
        }
    }

    /// Errors unless none of the page keys written by `writes` (pairs of a
    /// segment and its page-list position) is named by another table.
    /// O(pages · log written) for the table's pages, so a decode-step
    /// append that writes one page per segment stays cheap.
    pub(crate) fn check_exclusive(
        &self,
        op: &'static str,
        writes: impl Iterator<Item = (usize, usize)>,
    ) -> Result<()> {
        let mut written: Vec<(u64, u32, usize)> = writes
            .map(|(s, pi)| {
                let page = self.pages_of(self.table_of(s))[pi];
                (self.key(s, page), page, s)
            })
            .collect();
        if written.is_empty() {
            return Ok(());
        }
        written.sort_unstable();
        written.dedup_by_key(|w| w.0);
        // Tables naming each written key (a table names a key at most once).
        let mut named = vec![0u32; written.len()];
        for i in 0..self.num_tables() {
            for &page in self.pages_of(i) {
                let key = self.table_key(i, page);
                if let Ok(at) = written.binary_search_by_key(&key, |w| w.0) {
                    named[at] += 1;
                }
            }
        }
        if let Some(at) = named.iter().position(|&n| n > 1) {
            let (_, page, s) = written[at];
            return Err(shape(
                op,
                format!(
                    "page {page} (of segment {s}) is named by more than one table ({}), and this \
                     op would write it: shared pages are read-only (copy the page first)",
                    named[at]
                ),
            ));
        }
        Ok(())
    }
}

/// The pages of one segment: a map from token positions to rows of the
/// page pool, `row(t) = base(page_of(t)) + (t mod P) · stride` with
/// `base(p) = (p · Hkv + g) · P`, `stride = 1` (HND) or
/// `base(p) = p · P · Hkv + g`, `stride = Hkv` (NHD).
#[derive(Clone, Copy, Debug)]
pub struct SegmentPages<'a> {
    pages: &'a [u32],
    len: usize,
    shift: u32,
    hkv: usize,
    head: usize,
    layout: PageLayout,
}

/// A run of consecutive tokens inside one page: tokens
/// `token .. token + len` are rows `row + i · stride` (`i < len`; `stride`
/// from [`SegmentPages::stride`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageRun {
    /// First token of the run (segment position).
    pub token: usize,
    /// Its physical row.
    pub row: usize,
    /// Tokens in the run (at most `P`).
    pub len: usize,
}

impl<'a> SegmentPages<'a> {
    /// Tokens in the segment.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the segment holds no token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The segment's pages, in token order.
    pub fn pages(&self) -> &'a [u32] {
        self.pages
    }
    /// Rows between consecutive slots: 1 (HND) or `Hkv` (NHD).
    pub fn stride(&self) -> usize {
        match self.layout {
            PageLayout::Hnd => 1,
            PageLayout::Nhd => self.hkv,
        }
    }
    /// The row of slot 0 of page `page` for this segment's KV head.
    #[inline]
    fn base(&self, page: u32) -> usize {
        let p = page as usize;
        match self.layout {
            PageLayout::Hnd => (p * self.hkv + self.head) << self.shift,
            PageLayout::Nhd => ((p << self.shift) * self.hkv) + self.head,
        }
    }
    /// The physical row of token `t`.
    ///
    /// # Panics
    ///
    /// If `t` lies past the segment's last page.
    #[inline]
    pub fn row(&self, t: usize) -> usize {
        let slot = t & ((1 << self.shift) - 1);
        self.base(self.pages[t >> self.shift]) + slot * self.stride()
    }
    /// The page runs covering tokens `tokens` (in order; each run stays in
    /// one page).
    ///
    /// # Panics
    ///
    /// While iterating, if `tokens` reaches past the segment's last page.
    pub fn runs(&self, tokens: std::ops::Range<usize>) -> PageRuns<'a> {
        PageRuns {
            seg: *self,
            at: tokens.start,
            end: tokens.end.max(tokens.start),
        }
    }
}

/// Iterator of [`PageRun`]s (see [`SegmentPages::runs`]).
#[derive(Clone, Debug)]
pub struct PageRuns<'a> {
    seg: SegmentPages<'a>,
    at: usize,
    end: usize,
}

impl Iterator for PageRuns<'_> {
    type Item = PageRun;

    #[inline]
    fn next(&mut self) -> Option<PageRun> {
        if self.at >= self.end {
            return None;
        }
        let p = 1usize << self.seg.shift;
        let slot = self.at & (p - 1);
        let len = (p - slot).min(self.end - self.at);
        let run = PageRun {
            token: self.at,
            row: self.seg.row(self.at),
            len,
        };
        self.at += len;
        Some(run)
    }
}

/// What [`crate::ops::compact_paged`] and [`crate::ops::drop_paged`] return:
/// the shrunk table and the pages it no longer uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagedCompaction {
    /// The table after the compaction (each table keeps its first
    /// `⌈len' / P⌉` pages).
    pub table: PageTable,
    released_indptr: Vec<u32>,
    released: Vec<u32>,
    freed: Vec<u32>,
}

impl PagedCompaction {
    pub(crate) fn new(old: &PageTable, table: PageTable) -> Self {
        let mut released_indptr = Vec::with_capacity(old.num_tables() + 1);
        let mut released = Vec::new();
        released_indptr.push(0);
        for i in 0..old.num_tables() {
            released.extend_from_slice(&old.pages_of(i)[table.pages_of(i).len()..]);
            released_indptr.push(released.len() as u32);
        }
        let mut still: Vec<u32> = table.page_indices().to_vec();
        still.sort_unstable();
        let mut freed: Vec<u32> = released
            .iter()
            .copied()
            .filter(|p| still.binary_search(p).is_err())
            .collect();
        freed.sort_unstable();
        freed.dedup();
        Self {
            table,
            released_indptr,
            released,
            freed,
        }
    }
    /// Pages that table `i` no longer names (its tail pages, in token
    /// order). For [`PageScope::KvHead`] this frees only the table's KV head
    /// slots of each page.
    ///
    /// # Panics
    ///
    /// If `i` is not a table.
    pub fn released(&self, i: usize) -> &[u32] {
        &self.released[self.released_indptr[i] as usize..self.released_indptr[i + 1] as usize]
    }
    /// Pages that no table names any more (sorted, unique): the pages a pool
    /// can free.
    pub fn freed(&self) -> &[u32] {
        &self.freed
    }
}

/// Errors unless `lists` holds one [`crate::layout::Scope::KvHead`] list per segment
/// (`nseg` of them): the row lists of the paged write ops.
pub(crate) fn check_segment_lists(
    op: &'static str,
    nseg: usize,
    lists: &crate::layout::IndexList,
) -> Result<()> {
    if lists.scope() != crate::layout::Scope::KvHead || lists.num_lists() != nseg {
        return Err(shape(
            op,
            format!(
                "expected one KvHead-scoped list per segment ({nseg}), got {} {:?} lists",
                lists.num_lists(),
                lists.scope()
            ),
        ));
    }
    Ok(())
}

/// Errors unless `table` has the KV heads of a geometry.
pub(crate) fn check_kv_heads(op: &'static str, table: &PageTable, hkv: usize) -> Result<()> {
    if table.num_kv_heads() != hkv {
        return Err(Error::Shape {
            op,
            what: format!(
                "the page table has {} KV heads, the geometry has {hkv}",
                table.num_kv_heads()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(scope: PageScope, layout: PageLayout) -> PageTableParts {
        PageTableParts {
            layout,
            page_size: 4,
            num_pages: 6,
            num_kv_heads: 2,
            scope,
            page_indptr: vec![0, 2, 3],
            page_indices: vec![3, 0, 5],
            last_page_len: vec![3, 4],
        }
    }

    #[test]
    fn paged_rows_follow_the_layout_formulas() {
        for layout in [PageLayout::Hnd, PageLayout::Nhd] {
            let t = PageTable::new(parts(PageScope::Sequence, layout)).unwrap();
            let mut seen = std::collections::HashSet::new();
            for s in 0..4 {
                let seg = t.segment(s);
                let g = s % 2;
                for j in 0..seg.len() {
                    let (p, slot) = (t.pages_of(s / 2)[j / 4] as usize, j % 4);
                    let want = match layout {
                        PageLayout::Hnd => (p * 2 + g) * 4 + slot,
                        PageLayout::Nhd => (p * 4 + slot) * 2 + g,
                    };
                    assert_eq!(t.row(s, j), want, "{layout:?} s={s} j={j}");
                    assert!(want < t.rows());
                    assert!(seen.insert(want), "row {want} used twice");
                }
                let runs: Vec<PageRun> = seg.runs(1..seg.len()).collect();
                let covered: usize = runs.iter().map(|r| r.len).sum();
                assert_eq!(covered, seg.len() - 1);
                for r in runs {
                    for i in 0..r.len {
                        assert_eq!(r.row + i * seg.stride(), t.row(s, r.token + i));
                    }
                }
            }
        }
    }

    #[test]
    fn paged_table_validation() {
        let ok = parts(PageScope::Sequence, PageLayout::Hnd);
        assert!(PageTable::new(ok.clone()).is_ok());
        let bad = |f: &dyn Fn(&mut PageTableParts)| {
            let mut p = ok.clone();
            f(&mut p);
            PageTable::new(p).is_err()
        };
        assert!(bad(&|p| p.page_size = 3));
        assert!(bad(&|p| p.page_size = 512));
        assert!(bad(&|p| p.page_size = 0));
        assert!(bad(&|p| p.page_indptr = vec![0, 2]));
        assert!(bad(&|p| p.page_indptr = vec![1, 2, 3]));
        assert!(bad(&|p| p.page_indptr = vec![0, 3, 2]));
        assert!(bad(&|p| p.page_indptr = vec![0, 1, 2]));
        assert!(bad(&|p| p.page_indices = vec![3, 0, 6]));
        assert!(bad(&|p| p.page_indices = vec![3, 3, 5]));
        assert!(bad(&|p| p.last_page_len = vec![0, 4]));
        assert!(bad(&|p| p.last_page_len = vec![5, 4]));
        assert!(bad(&|p| p.num_pages = usize::MAX));
        assert!(bad(&|p| p.num_kv_heads = 0));
        assert!(bad(&|p| {
            p.page_indptr = vec![0, 0, 3];
            p.page_indices = vec![3, 0, 5];
            p.last_page_len = vec![1, 4];
        }));
        // Shared across tables is fine for reads.
        assert!(!bad(&|p| p.page_indices = vec![3, 0, 3]));
        // Per-KV-head tables need a multiple of Hkv tables.
        assert!(!bad(&|p| p.scope = PageScope::KvHead));
        assert!(bad(&|p| {
            p.scope = PageScope::KvHead;
            p.page_indptr = vec![0, 3];
            p.last_page_len = vec![1];
        }));
    }
}
