//! Shapes, ragged descriptors, index sets and bit masks — and all their
//! validation.
//!
//! Every type here is validated when it is built, so backends can index
//! without checks. See `docs/layouts.md` for the buffer orders.
#![forbid(unsafe_code)]

use crate::error::{Result, Size, shape, try_vec};

/// Attention head geometry: query heads, KV heads and head dimension.
///
/// Query head `h` reads KV head `h / group` (the HF / vLLM layout); K and V
/// are stored once per KV head and never repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HeadGeometry {
    num_q_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl HeadGeometry {
    /// Validates and builds a geometry. Errors when any count is zero,
    /// `num_q_heads % num_kv_heads != 0`, or `num_q_heads · head_dim` (the
    /// width of one token's query row) does not fit in a `u32`.
    pub fn new(num_q_heads: usize, num_kv_heads: usize, head_dim: usize) -> Result<Self> {
        const OP: &str = "HeadGeometry::new";
        if num_q_heads == 0 || num_kv_heads == 0 || head_dim == 0 {
            return Err(shape(
                OP,
                format!(
                    "head counts and head_dim must be positive, got num_q_heads = {num_q_heads}, \
                     num_kv_heads = {num_kv_heads}, head_dim = {head_dim}"
                ),
            ));
        }
        if !num_q_heads.is_multiple_of(num_kv_heads) {
            return Err(shape(
                OP,
                format!(
                    "num_q_heads = {num_q_heads} is not a multiple of num_kv_heads = {num_kv_heads} \
                     (GQA needs every KV head to serve the same number of query heads)"
                ),
            ));
        }
        Size::new(OP, "num_q_heads x head_dim (elements)", num_q_heads)
            .times(head_dim)
            .get_u32()?;
        Ok(Self {
            num_q_heads,
            num_kv_heads,
            head_dim,
        })
    }

    /// Number of query heads `Hq`.
    pub fn num_q_heads(&self) -> usize {
        self.num_q_heads
    }
    /// Number of KV heads `Hkv`.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// Head dimension `D`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// GQA group size `G = Hq / Hkv`.
    pub fn group(&self) -> usize {
        self.num_q_heads / self.num_kv_heads
    }
    /// The KV head read by query head `h`: `h / G`.
    pub fn kv_head(&self, q_head: usize) -> usize {
        q_head / self.group()
    }
    /// The default logit scale `1 / sqrt(D)`.
    pub fn default_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
}

/// A ragged partition described by an `indptr` array (`u32`, CSR style):
/// segment `i` covers `indptr[i] .. indptr[i + 1]`.
///
/// Invariants: `indptr.len() >= 1`, `indptr[0] == 0`, non-decreasing.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ragged {
    indptr: Vec<u32>,
}

impl Ragged {
    /// Validates an `indptr` array.
    pub fn new(indptr: Vec<u32>) -> Result<Self> {
        const OP: &str = "Ragged::new";
        if indptr.is_empty() {
            return Err(shape(OP, "indptr must hold at least one entry (0)"));
        }
        if indptr[0] != 0 {
            return Err(shape(OP, format!("indptr[0] must be 0, got {}", indptr[0])));
        }
        if let Some(i) = indptr.windows(2).position(|w| w[1] < w[0]) {
            return Err(shape(
                OP,
                format!(
                    "indptr must be non-decreasing, but indptr[{}] = {} > indptr[{}] = {}",
                    i,
                    indptr[i],
                    i + 1,
                    indptr[i + 1]
                ),
            ));
        }
        Ok(Self { indptr })
    }

    /// Builds the partition whose segment lengths are `lens`.
    pub fn from_lens(lens: &[u32]) -> Result<Self> {
        let mut indptr = Vec::with_capacity(lens.len() + 1);
        let mut acc = 0u32;
        indptr.push(0);
        for &l in lens {
            acc = acc
                .checked_add(l)
                .ok_or_else(|| shape("Ragged::from_lens", "total length overflows u32"))?;
            indptr.push(acc);
        }
        Ok(Self { indptr })
    }

    /// `n` segments of `len` each (the total must fit in a `u32`).
    pub fn uniform(n: usize, len: usize) -> Result<Self> {
        const OP: &str = "Ragged::uniform";
        let len = Size::new(OP, "segment length", len).get_u32()?;
        Size::new(OP, "total length (n x len)", n)
            .times(len as usize)
            .get_u32()?;
        let mut indptr = try_vec(
            OP,
            "indptr entries",
            Size::new(OP, "indptr entries", n).plus(1).get()?,
            0,
        )?;
        for (i, x) in indptr.iter_mut().enumerate() {
            // i · len ≤ n · len ≤ u32::MAX (checked above).
            *x = i as u32 * len;
        }
        Ok(Self { indptr })
    }

    /// Number of segments.
    pub fn num_segments(&self) -> usize {
        self.indptr.len() - 1
    }
    /// Sum of all segment lengths.
    pub fn total(&self) -> usize {
        *self.indptr.last().unwrap_or(&0) as usize
    }
    /// Range of segment `i`.
    ///
    /// # Panics
    ///
    /// If `i >= num_segments()` (like slice indexing).
    pub fn range(&self, i: usize) -> std::ops::Range<usize> {
        self.indptr[i] as usize..self.indptr[i + 1] as usize
    }
    /// Length of segment `i`.
    ///
    /// # Panics
    ///
    /// If `i >= num_segments()` (like slice indexing).
    pub fn len_of(&self, i: usize) -> usize {
        (self.indptr[i + 1] - self.indptr[i]) as usize
    }
    /// The raw `indptr` array.
    pub fn indptr(&self) -> &[u32] {
        &self.indptr
    }
    /// Iterator over segment lengths.
    pub fn lens(&self) -> impl Iterator<Item = usize> + '_ {
        self.indptr.windows(2).map(|w| (w[1] - w[0]) as usize)
    }
    /// Largest segment length (0 when there are no segments).
    pub fn max_len(&self) -> usize {
        self.lens().max().unwrap_or(0)
    }
}

/// Where each (sequence, KV head) segment of a KV buffer lives.
///
/// K and V buffers are `[rows, head_dim]` row-major; segment
/// `s = b * num_kv_heads + g` (sequence `b`, KV head `g`) is rows
/// `offset[s] .. offset[s] + len[s]`. Segments can have different lengths
/// (head-wise budgets) and may leave gaps (a cache with spare capacity).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Segments {
    batch: usize,
    num_kv_heads: usize,
    offsets: Vec<u32>,
    lens: Vec<u32>,
    rows: usize,
}

impl Segments {
    /// Validates explicit offsets and lengths (one per (sequence, KV head)).
    /// Segments must not overlap.
    pub fn new(
        batch: usize,
        num_kv_heads: usize,
        offsets: Vec<u32>,
        lens: Vec<u32>,
    ) -> Result<Self> {
        const OP: &str = "Segments::new";
        let n = Size::new(OP, "segments (batch x num_kv_heads)", batch)
            .times(num_kv_heads)
            .get()?;
        if batch == 0 || num_kv_heads == 0 {
            return Err(shape(
                OP,
                format!("batch and num_kv_heads must be positive, got {batch} and {num_kv_heads}"),
            ));
        }
        if offsets.len() != n || lens.len() != n {
            return Err(shape(
                OP,
                format!(
                    "expected {n} offsets and lengths (batch {batch} x {num_kv_heads} KV heads), got {} and {}",
                    offsets.len(),
                    lens.len()
                ),
            ));
        }
        let mut spans: Vec<(u64, u64)> = offsets
            .iter()
            .zip(&lens)
            .map(|(&o, &l)| (u64::from(o), u64::from(o) + u64::from(l)))
            .collect();
        let rows = spans.iter().map(|s| s.1).max().unwrap_or(0);
        if rows > u64::from(u32::MAX) {
            return Err(shape(OP, "segment end overflows u32"));
        }
        spans.retain(|s| s.1 > s.0);
        spans.sort_unstable();
        if let Some(w) = spans.windows(2).find(|w| w[1].0 < w[0].1) {
            return Err(shape(
                OP,
                format!(
                    "segments overlap: rows {}..{} and {}..{}",
                    w[0].0, w[0].1, w[1].0, w[1].1
                ),
            ));
        }
        Ok(Self {
            batch,
            num_kv_heads,
            offsets,
            lens,
            rows: rows as usize,
        })
    }

    /// Packed segments: lengths in (sequence, KV head) order, no gaps.
    pub fn packed(batch: usize, num_kv_heads: usize, lens: &[u32]) -> Result<Self> {
        let r = Ragged::from_lens(lens)?;
        let offsets = r.indptr()[..lens.len()].to_vec();
        Self::new(batch, num_kv_heads, offsets, lens.to_vec())
    }

    /// Every sequence and head of length `len` (the `[batch, kv_heads, len, d]`
    /// layout of candle / HF caches). The total number of rows must fit in a
    /// `u32`.
    pub fn uniform(batch: usize, num_kv_heads: usize, len: usize) -> Result<Self> {
        const OP: &str = "Segments::uniform";
        let n = Size::new(OP, "segments (batch x num_kv_heads)", batch)
            .times(num_kv_heads)
            .get()?;
        let len = Size::new(OP, "segment length", len).get_u32()?;
        Size::new(OP, "rows (batch x num_kv_heads x len)", n)
            .times(len as usize)
            .get_u32()?;
        Self::packed(
            batch,
            num_kv_heads,
            &try_vec(OP, "segment lengths", n, len)?,
        )
    }

    /// A cache with `capacity` rows reserved per (sequence, KV head) and
    /// `lens` of them in use (`[batch, kv_heads, capacity, d]`).
    pub fn with_capacity(
        batch: usize,
        num_kv_heads: usize,
        capacity: usize,
        lens: Vec<u32>,
    ) -> Result<Self> {
        const OP: &str = "Segments::with_capacity";
        let cap = u32::try_from(capacity).map_err(|_| shape(OP, "capacity overflows u32"))?;
        if let Some((i, &l)) = lens.iter().enumerate().find(|(_, l)| **l > cap) {
            return Err(shape(
                OP,
                format!("segment {i} has length {l} > capacity {capacity}"),
            ));
        }
        Size::new(OP, "rows (segments x capacity)", lens.len())
            .times(cap as usize)
            .get_u32()?;
        let offsets = (0..lens.len() as u32).map(|s| s * cap).collect();
        Self::new(batch, num_kv_heads, offsets, lens)
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Number of KV heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }
    /// Number of segments (`batch * num_kv_heads`).
    pub fn num_segments(&self) -> usize {
        self.lens.len()
    }
    /// First row of segment `s`.
    pub fn offset(&self, s: usize) -> usize {
        self.offsets[s] as usize
    }
    /// Length of segment `s`.
    pub fn len_of(&self, s: usize) -> usize {
        self.lens[s] as usize
    }
    /// Segment index of (sequence `b`, KV head `g`).
    pub fn index(&self, b: usize, g: usize) -> usize {
        b * self.num_kv_heads + g
    }
    /// Rows of segment `s` in the buffer.
    pub fn rows_of(&self, s: usize) -> std::ops::Range<usize> {
        self.offset(s)..self.offset(s) + self.len_of(s)
    }
    /// All segment offsets.
    pub fn offsets(&self) -> &[u32] {
        &self.offsets
    }
    /// All segment lengths.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }
    /// Minimum number of rows a K or V buffer must have.
    pub fn rows_needed(&self) -> usize {
        self.rows
    }
    /// Total rows in use.
    pub fn total_len(&self) -> usize {
        self.lens.iter().map(|&l| l as usize).sum()
    }
    /// The same segments with new lengths (offsets kept). Each new length must
    /// not exceed the old one.
    pub fn shrink_to(&self, lens: Vec<u32>) -> Result<Self> {
        const OP: &str = "Segments::shrink_to";
        if lens.len() != self.lens.len() {
            return Err(shape(
                OP,
                format!("expected {} lengths, got {}", self.lens.len(), lens.len()),
            ));
        }
        if let Some(s) = (0..lens.len()).find(|&s| lens[s] > self.lens[s]) {
            return Err(shape(
                OP,
                format!(
                    "segment {s}: new length {} > old length {}",
                    lens[s], self.lens[s]
                ),
            ));
        }
        Ok(Self {
            lens,
            ..self.clone()
        })
    }
}

/// A sorted set of unique `u32` indices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct IndexSet(Vec<u32>);

impl IndexSet {
    /// Validates that `v` is strictly increasing.
    pub fn new(v: Vec<u32>) -> Result<Self> {
        if let Some(i) = v.windows(2).position(|w| w[1] <= w[0]) {
            return Err(shape(
                "IndexSet::new",
                format!(
                    "indices must be strictly increasing, but [{}] = {} and [{}] = {}",
                    i,
                    v[i],
                    i + 1,
                    v[i + 1]
                ),
            ));
        }
        Ok(Self(v))
    }
    /// Sorts and de-duplicates.
    pub fn from_unsorted(mut v: Vec<u32>) -> Self {
        v.sort_unstable();
        v.dedup();
        Self(v)
    }
    /// `0 .. n`.
    pub fn all(n: u32) -> Self {
        Self((0..n).collect())
    }
    /// The indices.
    pub fn as_slice(&self) -> &[u32] {
        &self.0
    }
    /// Number of indices.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Largest index plus one (0 when empty).
    pub fn bound(&self) -> usize {
        self.0.last().map_or(0, |&x| x as usize + 1)
    }
    /// Consumes the set.
    pub fn into_vec(self) -> Vec<u32> {
        self.0
    }
}

/// A bit mask packed in `u32` words: bit `i % 32` of word `i / 32` is token
/// `i` (little bit order). Bits at and past `len` are always zero.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BitMask {
    len: usize,
    words: Vec<u32>,
}

impl BitMask {
    /// The most bits a mask may have: one per `u32` token position (2^32, in
    /// 512 MiB of words).
    pub const MAX_LEN: usize = 1 << 32;

    /// Number of `u32` words that hold `len` bits.
    pub const fn words_for(len: usize) -> usize {
        len.div_ceil(32)
    }
    /// All bits clear.
    ///
    /// # Panics
    ///
    /// If `len > MAX_LEN` or the words cannot be allocated; [`BitMask::try_zeros`]
    /// returns an error instead.
    pub fn zeros(len: usize) -> Self {
        match Self::try_zeros(len) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }
    /// All bits clear, or [`crate::Error::TooLarge`] when `len > MAX_LEN` or
    /// the allocator refuses the words.
    pub fn try_zeros(len: usize) -> Result<Self> {
        const OP: &str = "BitMask::try_zeros";
        let len = Size::new(OP, "mask bits", len).at_most(Self::MAX_LEN as u128)?;
        Ok(Self {
            len,
            words: try_vec(OP, "mask words", Self::words_for(len), 0)?,
        })
    }
    /// All `len` bits set (panics like [`BitMask::zeros`]).
    pub fn ones(len: usize) -> Self {
        let mut m = Self::zeros(len);
        for i in 0..len {
            m.set(i, true);
        }
        m
    }
    /// From booleans.
    pub fn from_bools(bits: &[bool]) -> Self {
        let mut m = Self::zeros(bits.len());
        for (i, &b) in bits.iter().enumerate() {
            m.set(i, b);
        }
        m
    }
    /// From an index set (indices must be `< len`, `len ≤ MAX_LEN`).
    pub fn from_indices(len: usize, idx: &IndexSet) -> Result<Self> {
        const OP: &str = "BitMask::from_indices";
        Size::new(OP, "mask bits", len).at_most(Self::MAX_LEN as u128)?;
        if idx.bound() > len {
            return Err(shape(
                OP,
                format!(
                    "index {} out of range for a mask of {len} bits",
                    idx.bound() - 1
                ),
            ));
        }
        let mut m = Self::try_zeros(len)?;
        for &i in idx.as_slice() {
            m.set(i as usize, true);
        }
        Ok(m)
    }
    /// Validates packed words: exactly `words_for(len)` words, no bit set at or past `len`.
    pub fn from_words(len: usize, words: Vec<u32>) -> Result<Self> {
        const OP: &str = "BitMask::from_words";
        if words.len() != Self::words_for(len) {
            return Err(shape(
                OP,
                format!(
                    "{len} bits need {} words, got {}",
                    Self::words_for(len),
                    words.len()
                ),
            ));
        }
        if !len.is_multiple_of(32)
            && let Some(&last) = words.last()
            && last >> (len % 32) != 0
        {
            return Err(shape(OP, format!("bits at or past len = {len} are set")));
        }
        Ok(Self { len, words })
    }
    /// Number of bits.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the mask has no bits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bit `i` (false when out of range).
    pub fn get(&self, i: usize) -> bool {
        i < self.len && (self.words[i / 32] >> (i % 32)) & 1 == 1
    }
    /// Sets bit `i` (ignored when out of range).
    pub fn set(&mut self, i: usize, on: bool) {
        if i < self.len {
            if on {
                self.words[i / 32] |= 1 << (i % 32);
            } else {
                self.words[i / 32] &= !(1 << (i % 32));
            }
        }
    }
    /// Number of set bits.
    pub fn count_ones(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// Set bits as an index set.
    pub fn to_indices(&self) -> IndexSet {
        IndexSet(
            (0..self.len as u32)
                .filter(|&i| self.get(i as usize))
                .collect(),
        )
    }
    /// The packed words.
    pub fn words(&self) -> &[u32] {
        &self.words
    }
}

/// Which heads a per-segment list belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One list per (sequence, KV head); every query head of the group uses it.
    KvHead,
    /// One list per (sequence, query head).
    QueryHead,
}

impl Scope {
    /// Number of lists for a batch and geometry.
    pub fn count(self, batch: usize, geom: &HeadGeometry) -> usize {
        match self {
            Scope::KvHead => batch * geom.num_kv_heads(),
            Scope::QueryHead => batch * geom.num_q_heads(),
        }
    }
    /// The list read by query head `h` of sequence `b`.
    pub fn list_of(self, b: usize, h: usize, geom: &HeadGeometry) -> usize {
        match self {
            Scope::KvHead => b * geom.num_kv_heads() + geom.kv_head(h),
            Scope::QueryHead => b * geom.num_q_heads() + h,
        }
    }
}

/// Ragged lists of token indices, one sorted unique list per (sequence, head)
/// (see [`Scope`]): list `i` is `indices[indptr[i] .. indptr[i + 1]]`, and
/// every index is a row position inside that list's KV segment.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IndexList {
    scope: Scope,
    indptr: Ragged,
    indices: Vec<u32>,
}

impl IndexList {
    /// Builds from one [`IndexSet`] per list.
    pub fn from_sets(scope: Scope, sets: &[IndexSet]) -> Result<Self> {
        let lens = sets
            .iter()
            .map(|s| Size::new("IndexList::from_sets", "indices in one list", s.len()).get_u32())
            .collect::<Result<Vec<u32>>>()?;
        let indptr = Ragged::from_lens(&lens)?;
        let indices = sets
            .iter()
            .flat_map(|s| s.as_slice().iter().copied())
            .collect();
        Ok(Self {
            scope,
            indptr,
            indices,
        })
    }
    /// Validates raw CSR arrays (each list strictly increasing).
    pub fn new(scope: Scope, indptr: Vec<u32>, indices: Vec<u32>) -> Result<Self> {
        let indptr = Ragged::new(indptr)?;
        if indptr.total() != indices.len() {
            return Err(shape(
                "IndexList::new",
                format!(
                    "indptr ends at {} but there are {} indices",
                    indptr.total(),
                    indices.len()
                ),
            ));
        }
        for i in 0..indptr.num_segments() {
            IndexSet::new(indices[indptr.range(i)].to_vec())?;
        }
        Ok(Self {
            scope,
            indptr,
            indices,
        })
    }
    /// The scope.
    pub fn scope(&self) -> Scope {
        self.scope
    }
    /// Number of lists.
    pub fn num_lists(&self) -> usize {
        self.indptr.num_segments()
    }
    /// List `i`.
    ///
    /// # Panics
    ///
    /// If `i >= num_lists()` (like slice indexing).
    pub fn list(&self, i: usize) -> &[u32] {
        &self.indices[self.indptr.range(i)]
    }
    /// The CSR offsets.
    pub fn indptr(&self) -> &Ragged {
        &self.indptr
    }
    /// All indices, concatenated.
    pub fn indices(&self) -> &[u32] {
        &self.indices
    }
    /// Checks the lists against a geometry and KV segments: the segments
    /// have the geometry's KV heads, one list per head of the scope, every
    /// index inside its segment.
    pub fn check_against(
        &self,
        op: &'static str,
        geom: &HeadGeometry,
        segs: &Segments,
    ) -> Result<()> {
        check_kv_heads(op, geom, segs)?;
        let want = self.scope.count(segs.batch(), geom);
        if self.num_lists() != want {
            return Err(shape(
                op,
                format!(
                    "index list has {} lists, the {:?} scope needs {want}",
                    self.num_lists(),
                    self.scope
                ),
            ));
        }
        for i in 0..want {
            let seg = match self.scope {
                Scope::KvHead => i,
                Scope::QueryHead => {
                    let (b, h) = (i / geom.num_q_heads(), i % geom.num_q_heads());
                    segs.index(b, geom.kv_head(h))
                }
            };
            if let Some(&last) = self.list(i).last()
                && last as usize >= segs.len_of(seg)
            {
                return Err(shape(
                    op,
                    format!(
                        "list {i}: index {last} out of range for a segment of {} tokens",
                        segs.len_of(seg)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Errors unless `segs` has the KV heads of `geom` (else segment indices
/// computed from the geometry would run past the segments).
fn check_kv_heads(op: &'static str, geom: &HeadGeometry, segs: &Segments) -> Result<()> {
    if segs.num_kv_heads() != geom.num_kv_heads() {
        return Err(shape(
            op,
            format!(
                "segments describe {} KV heads, the geometry has {}",
                segs.num_kv_heads(),
                geom.num_kv_heads()
            ),
        ));
    }
    Ok(())
}

/// Ragged bit masks, one per (sequence, head) (see [`Scope`]), each
/// `rows x cols` bits with every row padded to whole `u32` words.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MaskList {
    scope: Scope,
    shapes: Vec<(u32, u32)>,
    word_indptr: Ragged,
    words: Vec<u32>,
}

impl MaskList {
    /// Builds from per-list rows of [`BitMask`]s: `masks[i][r]` is row `r` of list `i`.
    /// All rows of one list must have the same length.
    pub fn from_rows(scope: Scope, masks: &[Vec<BitMask>]) -> Result<Self> {
        let mut shapes = Vec::with_capacity(masks.len());
        let mut lens = Vec::with_capacity(masks.len());
        let mut words = Vec::new();
        for (i, rows) in masks.iter().enumerate() {
            let cols = rows.first().map_or(0, |m| m.len());
            if let Some(r) = rows.iter().position(|m| m.len() != cols) {
                return Err(shape(
                    "MaskList::from_rows",
                    format!(
                        "list {i}: row {r} has {} bits, row 0 has {cols}",
                        rows[r].len()
                    ),
                ));
            }
            const OP: &str = "MaskList::from_rows";
            let w = Size::new(OP, "words of one mask (rows x words per row)", rows.len())
                .times(BitMask::words_for(cols))
                .get_u32()?;
            shapes.push((
                Size::new(OP, "mask rows", rows.len()).get_u32()?,
                Size::new(OP, "mask columns", cols).get_u32()?,
            ));
            lens.push(w);
            for m in rows {
                words.extend_from_slice(m.words());
            }
        }
        Ok(Self {
            scope,
            shapes,
            word_indptr: Ragged::from_lens(&lens)?,
            words,
        })
    }
    /// One single-row mask per list (decode).
    pub fn from_masks(scope: Scope, masks: &[BitMask]) -> Result<Self> {
        let rows: Vec<Vec<BitMask>> = masks.iter().map(|m| vec![m.clone()]).collect();
        Self::from_rows(scope, &rows)
    }
    /// The scope.
    pub fn scope(&self) -> Scope {
        self.scope
    }
    /// Number of lists.
    pub fn num_lists(&self) -> usize {
        self.shapes.len()
    }
    /// `(rows, cols)` of list `i`.
    ///
    /// # Panics
    ///
    /// If `i >= num_lists()` (like slice indexing).
    pub fn shape_of(&self, i: usize) -> (usize, usize) {
        (self.shapes[i].0 as usize, self.shapes[i].1 as usize)
    }
    /// Bit (`row`, `col`) of list `i` (false when any of the three is out of
    /// range).
    pub fn get(&self, i: usize, row: usize, col: usize) -> bool {
        if i >= self.num_lists() {
            return false;
        }
        let (rows, cols) = self.shape_of(i);
        if row >= rows || col >= cols {
            return false;
        }
        let base = self.word_indptr.range(i).start + row * BitMask::words_for(cols);
        (self.words[base + col / 32] >> (col % 32)) & 1 == 1
    }
    /// The packed words of list `i`.
    ///
    /// # Panics
    ///
    /// If `i >= num_lists()` (like slice indexing).
    pub fn words_of(&self, i: usize) -> &[u32] {
        &self.words[self.word_indptr.range(i)]
    }
    /// Word offsets of the lists.
    pub fn word_indptr(&self) -> &Ragged {
        &self.word_indptr
    }
    /// Checks shape against a geometry, segments and the number of query rows
    /// per sequence (`q_rows[b]`, one entry per sequence; 1 per sequence in
    /// decode).
    pub fn check_against(
        &self,
        op: &'static str,
        geom: &HeadGeometry,
        segs: &Segments,
        q_rows: &[usize],
    ) -> Result<()> {
        check_kv_heads(op, geom, segs)?;
        if q_rows.len() != segs.batch() {
            return Err(shape(
                op,
                format!(
                    "{} query-row counts for {} sequences",
                    q_rows.len(),
                    segs.batch()
                ),
            ));
        }
        let want = self.scope.count(segs.batch(), geom);
        if self.num_lists() != want {
            return Err(shape(
                op,
                format!(
                    "mask list has {} masks, the {:?} scope needs {want}",
                    self.num_lists(),
                    self.scope
                ),
            ));
        }
        let heads = match self.scope {
            Scope::KvHead => geom.num_kv_heads(),
            Scope::QueryHead => geom.num_q_heads(),
        };
        for i in 0..want {
            let (b, h) = (i / heads, i % heads);
            let g = match self.scope {
                Scope::KvHead => h,
                Scope::QueryHead => geom.kv_head(h),
            };
            let expect = (q_rows[b], segs.len_of(segs.index(b, g)));
            if self.shape_of(i) != expect {
                return Err(shape(
                    op,
                    format!(
                        "mask {i} is {:?} (rows, cols), expected {:?}",
                        self.shape_of(i),
                        expect
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_rejects_bad_gqa() {
        assert!(HeadGeometry::new(32, 8, 128).is_ok());
        assert!(HeadGeometry::new(6, 4, 64).is_err());
        assert!(HeadGeometry::new(0, 1, 64).is_err());
        let g = HeadGeometry::new(32, 8, 128).unwrap();
        assert_eq!(g.group(), 4);
        assert_eq!(g.kv_head(7), 1);
    }

    #[test]
    fn ragged_validates() {
        assert!(Ragged::new(vec![]).is_err());
        assert!(Ragged::new(vec![1, 2]).is_err());
        assert!(Ragged::new(vec![0, 3, 2]).is_err());
        let r = Ragged::new(vec![0, 3, 3, 7]).unwrap();
        assert_eq!(r.num_segments(), 3);
        assert_eq!(r.len_of(2), 4);
        assert_eq!(r.total(), 7);
    }

    #[test]
    fn segments_detect_overlap_and_capacity() {
        assert!(Segments::new(1, 2, vec![0, 2], vec![3, 3]).is_err());
        let s = Segments::with_capacity(2, 2, 10, vec![3, 10, 0, 5]).unwrap();
        assert_eq!(s.rows_of(3), 30..35);
        assert_eq!(s.rows_needed(), 35);
        assert!(Segments::with_capacity(1, 1, 4, vec![5]).is_err());
    }

    #[test]
    fn bitmask_packs_little_bit_order() {
        let m = BitMask::from_bools(&[true, false, true]);
        assert_eq!(m.words(), &[0b101]);
        assert!(BitMask::from_words(3, vec![0b1000]).is_err());
        let m = BitMask::from_indices(40, &IndexSet::new(vec![0, 33]).unwrap()).unwrap();
        assert_eq!(m.words(), &[1, 2]);
        assert_eq!(m.to_indices().as_slice(), &[0, 33]);
    }

    #[test]
    fn index_list_checks_ranges() {
        let geom = HeadGeometry::new(2, 1, 4).unwrap();
        let segs = Segments::uniform(1, 1, 5).unwrap();
        let ok = IndexList::new(Scope::KvHead, vec![0, 2], vec![1, 4]).unwrap();
        assert!(ok.check_against("t", &geom, &segs).is_ok());
        let bad = IndexList::new(Scope::KvHead, vec![0, 1], vec![5]).unwrap();
        assert!(bad.check_against("t", &geom, &segs).is_err());
        assert!(IndexList::new(Scope::KvHead, vec![0, 2], vec![3, 3]).is_err());
        let wrong_scope = IndexList::new(Scope::QueryHead, vec![0, 1], vec![0]).unwrap();
        assert!(wrong_scope.check_against("t", &geom, &segs).is_err());
    }
}
