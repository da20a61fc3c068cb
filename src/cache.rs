//! The KV cache: per layer K, V and original positions for a ragged batch,
//! with one length per (sequence, KV head).
//!
//! Layout of one layer: K and V are `[rows, D]` buffers of the backend;
//! segment `s = b * Hkv + g` (sequence `b`, KV head `g`) owns rows
//! `offset(s) .. offset(s) + cap(s)`, of which the first `len(s)` are in use
//! (see [`Segments`]). Each segment has its own capacity, so head-wise
//! budgets really free memory after [`KvCache::shrink_to_fit`]. Query head
//! `h` reads KV head `h / G`; K/V are never repeated per query head.
//!
//! Original token positions and *arrival indices* (a token's index among
//! the tokens appended to its sequence) are kept on the host beside the
//! rows and move with them through compaction and merging, so engines can
//! keep post-RoPE keys or re-rotate, and policies know which rows are
//! recent without relying on row order.
//!
//! **Compaction fills holes.** Evicting rows keeps every kept row that is
//! already inside the new length in place and moves kept rows from above
//! the new length into the freed rows ([`compaction_moves`]): one decode
//! step that evicts one token moves one row. Row order is therefore not
//! arrival order after an eviction; [`KvView::arrivals`] is.
//!
//! **Memory follows use.** After a compaction or merge that leaves a layer
//! using less than half of its capacity, and at the end of a prefill
//! ([`KvCache::trim`]), each segment's capacity becomes its length plus a
//! small headroom, so evicted tokens return their memory.
//!
//! Policies read a cache through [`KvView`]; [`LayerKv`] is one
//! implementation and [`KvParts`] wraps buffers an engine owns.
//!
//! All tensor work (appending rows, compaction, merging, growth) goes
//! through the backend's ops, so optimised backends accelerate it.
#![forbid(unsafe_code)]

use crate::backend::{Backend, CompactMeta, Ops};
use crate::dtype::Element;
use crate::error::{Result, shape};
use crate::layout::{HeadGeometry, IndexList, Ragged, Scope, Segments};
use crate::ops;

/// A merge of cache rows: every group's weighted sum replaces its target
/// row, then the cache is compacted to `keep`.
///
/// Indices are segment-local (row `i` of segment `s` is buffer row
/// `offset(s) + i`). For group `g` with target `(s, t)`:
/// `V[s, t] ← Σ_i v_weights[i] · V[s, members[i]]` over `i ∈ groups.range(g)`,
/// and, when `k_weights` is given, `K[s, t] ← Σ_i k_weights[i] · K[s, members[i]]`,
/// optionally rescaled to the Euclidean norm `k_norms[g]`. All groups read
/// the rows as they were before the merge.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeSpec {
    /// Rows kept per segment after the merge (scope [`Scope::KvHead`]).
    pub keep: IndexList,
    /// `(segment, segment-local row)` of each group; every target must be kept.
    pub targets: Vec<(u32, u32)>,
    /// Group partition of `members` / weights (one group per target).
    pub groups: Ragged,
    /// Segment-local source rows (in the target's segment).
    pub members: Vec<u32>,
    /// Value weights, one per member.
    pub v_weights: Vec<f32>,
    /// Key weights, one per member; `None` leaves keys untouched.
    pub k_weights: Option<Vec<f32>>,
    /// Norm each merged key is rescaled to (one per group); `None`: no rescale.
    pub k_norms: Option<Vec<f32>>,
}

/// K, V and positions of one layer.
pub struct LayerKv<B: Backend, T: Element> {
    k: B::Buffer<T>,
    v: B::Buffer<T>,
    segs: Segments,
    caps: Vec<u32>,
    positions: Vec<u32>,
    arrivals: Vec<u32>,
    seen: Vec<u32>,
    geom: HeadGeometry,
}

/// What a policy reads of one layer's KV: buffers, segments, and per row
/// the original position and the arrival index. [`LayerKv`] implements it;
/// [`KvParts`] wraps memory an engine owns.
///
/// Contract: `k` and `v` are `[rows, D]` covering [`Segments::rows_needed`];
/// `positions(s)` and `arrivals(s)` hold one entry per row of segment `s`
/// in use; arrival indices are unique within a sequence's segment and
/// below [`KvView::seen`] (the newest tokens have the largest).
pub trait KvView<B: Backend, T: Element> {
    /// Head geometry.
    fn geom(&self) -> &HeadGeometry;
    /// Segments in use.
    fn segments(&self) -> &Segments;
    /// K rows `[rows, D]`.
    fn k(&self) -> &B::Buffer<T>;
    /// V rows `[rows, D]`.
    fn v(&self) -> &B::Buffer<T>;
    /// Original positions of the rows of segment `s` (empty when out of range).
    fn positions(&self, s: usize) -> &[u32];
    /// Arrival index of each row of segment `s`: the token's index among
    /// the tokens appended to its sequence (empty when out of range).
    fn arrivals(&self, s: usize) -> &[u32];
    /// Tokens appended so far to sequence `b`.
    fn seen(&self, b: usize) -> usize;
    /// Number of sequences.
    fn batch(&self) -> usize {
        self.segments().batch()
    }
}

/// A [`KvView`] over buffers and host metadata an engine owns (no copy).
/// `positions` and `arrivals` are indexed like the K/V rows (`[rows]`),
/// `seen` has one entry per sequence.
///
/// An engine that keeps its own KV runs a policy's hook over a `KvParts`
/// and applies destructive plans itself: `ops::drop_rows` /
/// `ops::compact_rows` on K and V, and the same moves on its per-row
/// metadata ([`crate::policy::Compaction`]).
///
/// ```
/// use kvsieve::backend::{DecodeEvidence, Heads, evidence_blocks};
/// use kvsieve::cache::{KvParts, KvView};
/// use kvsieve::ops::{self, DecodeParams};
/// use kvsieve::policy::{Budget, Compaction, Evidence, KvPolicy, Phase, Plan, StepCtx, Tova, TovaConfig};
/// use kvsieve::{HeadGeometry, Normalizer, Ragged, Restrict, Segments, reference::Reference};
///
/// # fn main() -> kvsieve::Result<()> {
/// // The engine's cache: one sequence, one KV head, D = 2, 4 tokens (the
/// // newest last) in a buffer of 8 rows.
/// let geom = HeadGeometry::new(1, 1, 2)?;
/// let mut segs = Segments::with_capacity(1, 1, 8, vec![4])?;
/// let mut k = vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
/// let mut v = k.clone();
/// let mut positions: Vec<u32> = (0..8).collect();
/// let mut arrivals: Vec<u32> = (0..8).collect();
/// let seen = vec![4u32];
/// let q = vec![2.0f32, 0.0];
/// // Attention with the evidence TOVA asks for (its current query's weights).
/// let mut tova = Tova::new(TovaConfig { budget: Budget::tokens(3), ..TovaConfig::default() })?;
/// let heads = KvPolicy::<Reference, f32>::needs(&tova, 0).decode_probs.unwrap_or(Heads::Mean);
/// let mut probs = vec![0.0f32; evidence_blocks(&geom, &segs, heads, &[1])?.total()];
/// let mut out = vec![0.0f32; 2];
/// let p = DecodeParams { geom, segments: &segs, scale: Some(1.0), normalizer: &Normalizer::Softmax, restrict: Restrict::Dense };
/// ops::decode_attention_with(&Reference, &p, &q, &k, &v, &mut out,
///     DecodeEvidence { probs: Some((heads, &mut probs)), ..DecodeEvidence::default() })?;
/// let plan = {
///     let kv = KvParts::new(&Reference, KvParts {
///         geom, segments: &segs, k: &k, v: &v, positions: &positions, arrivals: &arrivals, seen: &seen,
///     })?;
///     let ctx = StepCtx {
///         backend: &Reference, layer: 0, num_layers: 1, kv: &kv, queries: &q,
///         q_rows: &Ragged::uniform(1, 1)?, step: 0, phase: Phase::Decode, scale: Some(1.0),
///         evidence: Evidence { probs: Some((heads, &probs)), ..Evidence::default() },
///     };
///     tova.on_decode_step(&ctx)?
/// };
/// // TOVA drops the token the query attends to least (row 1, key [0, 1]).
/// let Plan::Drop(drop) = plan else { unreachable!() };
/// assert_eq!(drop.list(0), &[1]);
/// let c = Compaction::from_drop(&segs, &drop);
/// let new_segs = ops::drop_rows(&Reference, 2, &segs, &drop, &mut k)?;
/// ops::drop_rows(&Reference, 2, &segs, &drop, &mut v)?;
/// c.apply(0, &mut positions);
/// c.apply(0, &mut arrivals);
/// segs = new_segs;
/// assert_eq!(segs.lens(), &[3]);
/// assert_eq!(&positions[..3], &[0, 3, 2]); // the newest token took the freed row
/// # Ok(()) }
/// ```
pub struct KvParts<'a, B: Backend, T: Element> {
    /// Head geometry.
    pub geom: HeadGeometry,
    /// Segments in use.
    pub segments: &'a Segments,
    /// K rows.
    pub k: &'a B::Buffer<T>,
    /// V rows.
    pub v: &'a B::Buffer<T>,
    /// Original position of every buffer row.
    pub positions: &'a [u32],
    /// Arrival index of every buffer row.
    pub arrivals: &'a [u32],
    /// Tokens appended per sequence.
    pub seen: &'a [u32],
}

impl<'a, B: Backend, T: Element> KvParts<'a, B, T> {
    /// Checks the metadata against the segments and buffers.
    pub fn new(backend: &B, parts: KvParts<'a, B, T>) -> Result<Self> {
        const OP: &str = "KvParts::new";
        let p = parts;
        let d = p.geom.head_dim();
        let rows = p.segments.rows_needed();
        for (name, buf) in [("k", p.k), ("v", p.v)] {
            let n = backend.buffer_len(buf);
            if n % d != 0 || n / d < rows {
                return Err(shape(
                    OP,
                    format!("{name} has {n} elements, expected [rows >= {rows}, {d}]"),
                ));
            }
        }
        if p.segments.num_kv_heads() != p.geom.num_kv_heads() {
            return Err(shape(OP, "segments and geometry disagree on the KV heads"));
        }
        if p.positions.len() < rows || p.arrivals.len() < rows {
            return Err(shape(
                OP,
                format!("positions and arrivals need {rows} entries (one per row)"),
            ));
        }
        if p.seen.len() != p.segments.batch() {
            return Err(shape(OP, "seen needs one entry per sequence"));
        }
        for s in 0..p.segments.num_segments() {
            let b = s / p.geom.num_kv_heads();
            if let Some(&a) = p.arrivals[p.segments.rows_of(s)]
                .iter()
                .find(|&&a| a >= p.seen[b])
            {
                return Err(shape(
                    OP,
                    format!("segment {s}: arrival {a} is not below seen = {}", p.seen[b]),
                ));
            }
        }
        Ok(p)
    }
}

impl<B: Backend, T: Element> KvView<B, T> for KvParts<'_, B, T> {
    fn geom(&self) -> &HeadGeometry {
        &self.geom
    }
    fn segments(&self) -> &Segments {
        self.segments
    }
    fn k(&self) -> &B::Buffer<T> {
        self.k
    }
    fn v(&self) -> &B::Buffer<T> {
        self.v
    }
    fn positions(&self, s: usize) -> &[u32] {
        rows_of(self.segments, self.positions, s)
    }
    fn arrivals(&self, s: usize) -> &[u32] {
        rows_of(self.segments, self.arrivals, s)
    }
    fn seen(&self, b: usize) -> usize {
        self.seen.get(b).map_or(0, |&x| x as usize)
    }
}

fn rows_of<'x>(segs: &Segments, per_row: &'x [u32], s: usize) -> &'x [u32] {
    if s >= segs.num_segments() {
        return &[];
    }
    per_row.get(segs.rows_of(s)).unwrap_or(&[])
}

/// The row moves that compact a segment to `keep` (sorted, unique,
/// segment-local): `(dst, src)` pairs, each hole below `keep.len()` filled
/// by the next kept row at or above it, lowest first. Rows of `keep`
/// already below `keep.len()` stay in place. Empty when nothing moves.
///
/// ```
/// // Keep rows 0, 2, 5, 6 of 7: row 5 fills hole 1, row 6 fills hole 3.
/// assert_eq!(kvsieve::cache::compaction_moves(&[0, 2, 5, 6]), vec![(1, 5), (3, 6)]);
/// ```
pub fn compaction_moves(keep: &[u32]) -> Vec<(u32, u32)> {
    let n = keep.len() as u32;
    let inside = keep.partition_point(|&j| j < n);
    let fillers = &keep[inside..];
    let mut moves = Vec::with_capacity(fillers.len());
    let mut kept = keep[..inside].iter().peekable();
    let mut f = fillers.iter();
    for hole in 0..n {
        if kept.peek() == Some(&&hole) {
            kept.next();
            continue;
        }
        match f.next() {
            Some(&src) => moves.push((hole, src)),
            None => break,
        }
    }
    moves
}

/// The moves of [`compaction_moves`] for the complement of `drop` (sorted,
/// unique, below `len`), in O(|drop|) time.
///
/// ```
/// // Drop rows 1 and 3 of 7: the same moves as keeping 0, 2, 4, 5, 6.
/// assert_eq!(kvsieve::cache::drop_moves(7, &[1, 3]), vec![(1, 5), (3, 6)]);
/// ```
pub fn drop_moves(len: usize, drop: &[u32]) -> Vec<(u32, u32)> {
    let n = len.saturating_sub(drop.len()) as u32;
    let inside = drop.partition_point(|&j| j < n);
    let mut above = drop[inside..].iter().peekable();
    let mut moves = Vec::with_capacity(inside);
    let mut src = n;
    for &hole in &drop[..inside] {
        while above.peek() == Some(&&src) {
            above.next();
            src += 1;
        }
        moves.push((hole, src));
        src += 1;
    }
    moves
}

/// Headroom left above a segment's length when capacity is trimmed: a
/// decode step appends one token before it evicts one.
fn headroom(len: u32) -> u32 {
    (len / 8).max(16)
}

impl<B: Backend, T: Element> LayerKv<B, T> {
    /// K rows `[rows, D]`.
    pub fn k(&self) -> &B::Buffer<T> {
        &self.k
    }
    /// V rows `[rows, D]`.
    pub fn v(&self) -> &B::Buffer<T> {
        &self.v
    }
    /// Segments in use (offsets and lengths).
    pub fn segments(&self) -> &Segments {
        &self.segs
    }
    /// Head geometry.
    pub fn geom(&self) -> &HeadGeometry {
        &self.geom
    }
    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.segs.batch()
    }
    /// Tokens of segment `s` in use. `s` out of range gives 0.
    pub fn len_of(&self, s: usize) -> usize {
        self.segs.lens().get(s).map_or(0, |&l| l as usize)
    }
    /// Reserved rows of segment `s`.
    pub fn capacity_of(&self, s: usize) -> usize {
        self.caps.get(s).map_or(0, |&c| c as usize)
    }
    /// Original positions of the tokens of segment `s` (empty when out of range).
    pub fn positions(&self, s: usize) -> &[u32] {
        rows_of(&self.segs, &self.positions, s)
    }
    /// Arrival indices of the tokens of segment `s` (see [`KvView::arrivals`]).
    pub fn arrivals(&self, s: usize) -> &[u32] {
        rows_of(&self.segs, &self.arrivals, s)
    }
    /// Tokens appended so far to sequence `b` (its next position by default).
    pub fn seen(&self, b: usize) -> usize {
        self.seen.get(b).map_or(0, |&x| x as usize)
    }
    /// Bytes of K and V in use by segment `s`: `len · 2 · D · sizeof(T)`.
    pub fn bytes_of(&self, s: usize) -> usize {
        self.len_of(s) * 2 * self.geom.head_dim() * T::DTYPE.size()
    }
    /// Bytes of K and V in use by the layer.
    pub fn bytes(&self) -> usize {
        self.segs.total_len() * 2 * self.geom.head_dim() * T::DTYPE.size()
    }
    /// Bytes of K and V allocated (capacity) by the layer.
    pub fn allocated_bytes(&self) -> usize {
        self.caps.iter().map(|&c| c as usize).sum::<usize>()
            * 2
            * self.geom.head_dim()
            * T::DTYPE.size()
    }
}

impl<B: Backend, T: Element> KvView<B, T> for LayerKv<B, T> {
    fn geom(&self) -> &HeadGeometry {
        &self.geom
    }
    fn segments(&self) -> &Segments {
        &self.segs
    }
    fn k(&self) -> &B::Buffer<T> {
        &self.k
    }
    fn v(&self) -> &B::Buffer<T> {
        &self.v
    }
    fn positions(&self, s: usize) -> &[u32] {
        LayerKv::positions(self, s)
    }
    fn arrivals(&self, s: usize) -> &[u32] {
        LayerKv::arrivals(self, s)
    }
    fn seen(&self, b: usize) -> usize {
        LayerKv::seen(self, b)
    }
}

/// The KV cache of a model: one [`LayerKv`] per layer.
pub struct KvCache<B: Backend, T: Element> {
    geom: HeadGeometry,
    layers: Vec<LayerKv<B, T>>,
}

fn segs_for(batch: usize, hkv: usize, caps: &[u32], lens: Vec<u32>) -> Result<Segments> {
    let r = Ragged::from_lens(caps)?;
    Segments::new(batch, hkv, r.indptr()[..caps.len()].to_vec(), lens)
}

impl<B: Ops, T: Element> KvCache<B, T> {
    /// An empty cache for `batch` sequences and `num_layers` layers.
    pub fn new(backend: &B, geom: HeadGeometry, batch: usize, num_layers: usize) -> Result<Self> {
        Self::with_capacity(backend, geom, batch, num_layers, 0)
    }

    /// An empty cache with `capacity` rows reserved per (layer, sequence, KV head).
    pub fn with_capacity(
        backend: &B,
        geom: HeadGeometry,
        batch: usize,
        num_layers: usize,
        capacity: usize,
    ) -> Result<Self> {
        const OP: &str = "KvCache::new";
        if batch == 0 || num_layers == 0 {
            return Err(shape(
                OP,
                format!("batch and num_layers must be positive, got {batch} and {num_layers}"),
            ));
        }
        let nseg = batch * geom.num_kv_heads();
        let cap = u32::try_from(capacity).map_err(|_| shape(OP, "capacity overflows u32"))?;
        let caps = vec![cap; nseg];
        let rows = nseg
            .checked_mul(capacity)
            .filter(|r| u32::try_from(*r).is_ok())
            .ok_or_else(|| shape(OP, "capacity overflows u32 rows"))?;
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            layers.push(LayerKv {
                k: backend.zeros(rows * geom.head_dim())?,
                v: backend.zeros(rows * geom.head_dim())?,
                segs: segs_for(batch, geom.num_kv_heads(), &caps, vec![0; nseg])?,
                caps: caps.clone(),
                positions: vec![0; rows],
                arrivals: vec![0; rows],
                seen: vec![0; batch],
                geom,
            });
        }
        Ok(Self { geom, layers })
    }

    /// Head geometry.
    pub fn geom(&self) -> &HeadGeometry {
        &self.geom
    }
    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.layers.first().map_or(0, |l| l.batch())
    }
    /// One layer (error when out of range).
    pub fn layer(&self, layer: usize) -> Result<&LayerKv<B, T>> {
        self.layers.get(layer).ok_or_else(|| {
            shape(
                "KvCache::layer",
                format!(
                    "layer {layer} out of range for a cache of {} layers",
                    self.layers.len()
                ),
            )
        })
    }
    fn layer_mut(&mut self, layer: usize) -> Result<&mut LayerKv<B, T>> {
        let n = self.layers.len();
        self.layers.get_mut(layer).ok_or_else(|| {
            shape(
                "KvCache",
                format!("layer {layer} out of range for a cache of {n} layers"),
            )
        })
    }
    /// K/V bytes in use, all layers.
    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|l| l.bytes()).sum()
    }
    /// K/V bytes allocated, all layers.
    pub fn allocated_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.allocated_bytes()).sum()
    }

    /// Re-lays out one layer with new per-segment capacities (each at least
    /// the segment's length). Rows in use are moved with `gather_rows` +
    /// `scatter_rows`; slack rows are zero.
    fn relayout(backend: &B, l: &mut LayerKv<B, T>, caps: Vec<u32>) -> Result<()> {
        let d = l.geom.head_dim();
        let lens = l.segs.lens().to_vec();
        let new_segs = segs_for(l.segs.batch(), l.segs.num_kv_heads(), &caps, lens)?;
        let total_rows: usize = caps.iter().map(|&c| c as usize).sum();
        let mut src_rows = Vec::with_capacity(l.segs.total_len());
        let mut dst_rows = Vec::with_capacity(l.segs.total_len());
        for s in 0..l.segs.num_segments() {
            for i in 0..l.segs.len_of(s) {
                src_rows.push((l.segs.offset(s) + i) as u32);
                dst_rows.push((new_segs.offset(s) + i) as u32);
            }
        }
        let mut nk = backend.zeros::<T>(total_rows * d)?;
        let mut nv = backend.zeros::<T>(total_rows * d)?;
        if !src_rows.is_empty() {
            let mut tmp = backend.zeros::<T>(src_rows.len() * d)?;
            ops::gather_rows(backend, d, &src_rows, &l.k, &mut tmp)?;
            ops::scatter_rows(backend, d, &dst_rows, &tmp, &mut nk)?;
            ops::gather_rows(backend, d, &src_rows, &l.v, &mut tmp)?;
            ops::scatter_rows(backend, d, &dst_rows, &tmp, &mut nv)?;
        }
        let mut pos = vec![0u32; total_rows];
        let mut arr = vec![0u32; total_rows];
        for (&s, &t) in src_rows.iter().zip(&dst_rows) {
            pos[t as usize] = l.positions[s as usize];
            arr[t as usize] = l.arrivals[s as usize];
        }
        l.k = nk;
        l.v = nv;
        l.positions = pos;
        l.arrivals = arr;
        l.segs = new_segs;
        l.caps = caps;
        Ok(())
    }

    /// Makes room for `extra[s]` more rows in every segment `s` of `layer`
    /// (capacity at least doubles when it grows).
    pub fn reserve(&mut self, backend: &B, layer: usize, extra: &[u32]) -> Result<()> {
        let l = self.layer_mut(layer)?;
        if extra.len() != l.segs.num_segments() {
            return Err(shape(
                "KvCache::reserve",
                format!(
                    "{} extra counts for {} segments",
                    extra.len(),
                    l.segs.num_segments()
                ),
            ));
        }
        let mut grow = false;
        let mut caps = l.caps.clone();
        for (s, (&e, cap)) in extra.iter().zip(caps.iter_mut()).enumerate() {
            let need = l.segs.lens()[s]
                .checked_add(e)
                .ok_or_else(|| shape("KvCache::reserve", "length overflows u32"))?;
            if need > *cap {
                *cap = need.max(cap.saturating_mul(2));
                grow = true;
            }
        }
        if grow {
            Self::relayout(backend, l, caps)?;
        }
        Ok(())
    }

    /// Releases slack: every segment's capacity becomes its length.
    pub fn shrink_to_fit(&mut self, backend: &B, layer: usize) -> Result<()> {
        let l = self.layer_mut(layer)?;
        let caps = l.segs.lens().to_vec();
        Self::relayout(backend, l, caps)
    }

    /// Sets every segment's capacity of `layer` to its length plus a small
    /// headroom (`max(16, len / 8)` rows), unless every segment is already
    /// within that headroom of it: what the driver does at the end of a
    /// prefill (so the first decode steps do not double the buffers) and
    /// after an eviction leaves the layer under half full.
    pub fn trim(&mut self, backend: &B, layer: usize) -> Result<()> {
        let l = self.layer_mut(layer)?;
        let fits = l
            .segs
            .lens()
            .iter()
            .zip(&l.caps)
            .all(|(&n, &c)| c > n && c - n <= headroom(n));
        if fits {
            return Ok(());
        }
        let caps: Vec<u32> = l
            .segs
            .lens()
            .iter()
            .map(|&n| n.saturating_add(headroom(n)))
            .collect();
        Self::relayout(backend, l, caps)
    }

    /// [`KvCache::trim`] when the layer uses less than half its capacity.
    fn trim_if_sparse(&mut self, backend: &B, layer: usize) -> Result<()> {
        let l = self.layer(layer)?;
        let cap: u64 = l.caps.iter().map(|&c| u64::from(c)).sum();
        if 2 * (l.segs.total_len() as u64) < cap {
            self.trim(backend, layer)?;
        }
        Ok(())
    }

    /// Appends new tokens to `layer` for the whole batch in one call.
    ///
    /// `tokens` partitions the new tokens by sequence (`n_b` new tokens for
    /// sequence `b`); `k_new`, `v_new` are `[total_new, Hkv, D]` (token-major,
    /// the layout of a projected chunk). `positions` (one per new token)
    /// defaults to `seen(b), seen(b) + 1, ..`.
    pub fn append(
        &mut self,
        backend: &B,
        layer: usize,
        tokens: &Ragged,
        k_new: &B::Buffer<T>,
        v_new: &B::Buffer<T>,
        positions: Option<&[u32]>,
    ) -> Result<()> {
        const OP: &str = "KvCache::append";
        let geom = self.geom;
        let (hkv, d) = (geom.num_kv_heads(), geom.head_dim());
        {
            let l = self.layer(layer)?;
            if tokens.num_segments() != l.batch() {
                return Err(shape(
                    OP,
                    format!(
                        "tokens has {} sequences, the cache has {}",
                        tokens.num_segments(),
                        l.batch()
                    ),
                ));
            }
        }
        let want = tokens.total() * hkv * d;
        for (name, buf) in [("k_new", k_new), ("v_new", v_new)] {
            if backend.buffer_len(buf) != want {
                return Err(shape(
                    OP,
                    format!(
                        "{name} has {} elements, expected [{}, {hkv}, {d}] = {want}",
                        backend.buffer_len(buf),
                        tokens.total()
                    ),
                ));
            }
        }
        if let Some(p) = positions
            && p.len() != tokens.total()
        {
            return Err(shape(
                OP,
                format!("{} positions for {} new tokens", p.len(), tokens.total()),
            ));
        }
        let batch = tokens.num_segments();
        let mut extra = Vec::with_capacity(batch * hkv);
        for b in 0..batch {
            extra.extend(std::iter::repeat_n(tokens.len_of(b) as u32, hkv));
        }
        self.reserve(backend, layer, &extra)?;
        let l = self.layer_mut(layer)?;
        let mut dst = Vec::with_capacity(tokens.total() * hkv);
        let mut lens = l.segs.lens().to_vec();
        for b in 0..batch {
            for (i, t) in tokens.range(b).enumerate() {
                for g in 0..hkv {
                    let s = l.segs.index(b, g);
                    let row = l.segs.offset(s) + l.segs.len_of(s) + i;
                    dst.push(row as u32);
                    let pos = match positions {
                        Some(p) => p[t],
                        None => l.seen[b].saturating_add(i as u32),
                    };
                    l.positions[row] = pos;
                    l.arrivals[row] = l.seen[b].saturating_add(i as u32);
                }
            }
            for g in 0..hkv {
                lens[b * hkv + g] += tokens.len_of(b) as u32;
            }
            l.seen[b] = l.seen[b].saturating_add(tokens.len_of(b) as u32);
        }
        ops::scatter_rows(backend, d, &dst, k_new, &mut l.k)?;
        ops::scatter_rows(backend, d, &dst, v_new, &mut l.v)?;
        l.segs = segs_for(batch, hkv, &l.caps, lens)?;
        Ok(())
    }

    /// Compacts `layer` in place to the rows in `keep` (one sorted list per
    /// segment, scope [`Scope::KvHead`]) by filling holes
    /// ([`compaction_moves`]); positions and arrivals follow their rows.
    /// Trims the capacity when the layer ends up less than half full.
    pub fn compact(&mut self, backend: &B, layer: usize, keep: &IndexList) -> Result<()> {
        const OP: &str = "KvCache::compact";
        let l = self.layer(layer)?;
        if keep.scope() != Scope::KvHead || keep.num_lists() != l.segs.num_segments() {
            return Err(shape(
                OP,
                format!(
                    "keep must hold one KvHead list per segment ({}), got {} {:?} lists",
                    l.segs.num_segments(),
                    keep.num_lists(),
                    keep.scope()
                ),
            ));
        }
        let mut moves = Vec::with_capacity(l.segs.num_segments());
        for s in 0..l.segs.num_segments() {
            let list = keep.list(s);
            if let Some(&last) = list.last()
                && last as usize >= l.segs.len_of(s)
            {
                return Err(shape(
                    OP,
                    format!("segment {s}: index {last} >= length {}", l.segs.len_of(s)),
                ));
            }
            moves.push(compaction_moves(list));
        }
        let lens = keep.indptr().lens().map(|n| n as u32).collect();
        self.apply_moves(backend, layer, &moves, lens)
    }

    /// Removes the rows in `drop` (one sorted list per segment, scope
    /// [`Scope::KvHead`]) from `layer`: the same compaction as keeping the
    /// complement, in O(dropped rows).
    pub fn drop_rows(&mut self, backend: &B, layer: usize, drop: &IndexList) -> Result<()> {
        const OP: &str = "KvCache::drop_rows";
        let l = self.layer(layer)?;
        if drop.scope() != Scope::KvHead || drop.num_lists() != l.segs.num_segments() {
            return Err(shape(
                OP,
                format!(
                    "drop must hold one KvHead list per segment ({}), got {} {:?} lists",
                    l.segs.num_segments(),
                    drop.num_lists(),
                    drop.scope()
                ),
            ));
        }
        let mut moves = Vec::with_capacity(l.segs.num_segments());
        let mut lens = Vec::with_capacity(l.segs.num_segments());
        for s in 0..l.segs.num_segments() {
            let (list, len) = (drop.list(s), l.segs.len_of(s));
            if let Some(&last) = list.last()
                && last as usize >= len
            {
                return Err(shape(
                    OP,
                    format!("segment {s}: index {last} >= length {len}"),
                ));
            }
            moves.push(drop_moves(len, list));
            lens.push((len - list.len()) as u32);
        }
        self.apply_moves(backend, layer, &moves, lens)
    }

    /// Applies per-segment `(dst, src)` row moves (segment-local) and the
    /// new lengths; positions and arrivals follow.
    fn apply_moves(
        &mut self,
        backend: &B,
        layer: usize,
        moves: &[Vec<(u32, u32)>],
        lens: Vec<u32>,
    ) -> Result<()> {
        let d = self.geom.head_dim();
        let l = self.layer_mut(layer)?;
        let new_segs = l.segs.shrink_to(lens)?;
        let mut abs = Vec::new();
        for (s, m) in moves.iter().enumerate() {
            let off = l.segs.offset(s) as u32;
            abs.extend(m.iter().map(|&(dst, src)| (off + dst, off + src)));
        }
        if !abs.is_empty() {
            let meta = CompactMeta {
                width: d,
                moves: abs,
            };
            backend.compact_rows(&meta, &mut l.k)?;
            backend.compact_rows(&meta, &mut l.v)?;
            for &(dst, src) in &meta.moves {
                l.positions[dst as usize] = l.positions[src as usize];
                l.arrivals[dst as usize] = l.arrivals[src as usize];
            }
        }
        l.segs = new_segs;
        self.trim_if_sparse(backend, layer)
    }

    /// Applies a [`MergeSpec`]: merged rows replace their targets, then the
    /// layer is compacted to `spec.keep`.
    pub fn merge(&mut self, backend: &B, layer: usize, spec: &MergeSpec) -> Result<()> {
        const OP: &str = "KvCache::merge";
        let d = self.geom.head_dim();
        let l = self.layer(layer)?;
        let segs = l.segs.clone();
        if spec.keep.scope() != Scope::KvHead || spec.keep.num_lists() != segs.num_segments() {
            return Err(shape(
                OP,
                format!(
                    "keep must hold one KvHead list per segment ({})",
                    segs.num_segments()
                ),
            ));
        }
        let ng = spec.groups.num_segments();
        let nm = spec.groups.total();
        if spec.targets.len() != ng || spec.members.len() != nm || spec.v_weights.len() != nm {
            return Err(shape(
                OP,
                format!(
                    "{ng} groups over {nm} members need {ng} targets and {nm} members and value weights, got {}, {}, {}",
                    spec.targets.len(),
                    spec.members.len(),
                    spec.v_weights.len()
                ),
            ));
        }
        if spec.k_weights.as_ref().is_some_and(|w| w.len() != nm)
            || spec.k_norms.as_ref().is_some_and(|n| n.len() != ng)
        {
            return Err(shape(
                OP,
                "k_weights needs one weight per member and k_norms one norm per group",
            ));
        }
        if spec.k_norms.is_some() && spec.k_weights.is_none() {
            return Err(shape(OP, "k_norms without k_weights"));
        }
        let mut target_rows = Vec::with_capacity(ng);
        let mut member_rows = Vec::with_capacity(nm);
        for (g, &(s, t)) in spec.targets.iter().enumerate() {
            let s = s as usize;
            if s >= segs.num_segments() || t as usize >= segs.len_of(s) {
                return Err(shape(
                    OP,
                    format!("target {g} = ({s}, {t}) is outside the cache"),
                ));
            }
            if spec.keep.list(s).binary_search(&t).is_err() {
                return Err(shape(OP, format!("target {g} = ({s}, {t}) is not kept")));
            }
            target_rows.push((segs.offset(s) + t as usize) as u32);
            for m in spec.groups.range(g) {
                let r = spec.members[m] as usize;
                if r >= segs.len_of(s) {
                    return Err(shape(
                        OP,
                        format!("group {g}: member {r} outside segment {s}"),
                    ));
                }
                member_rows.push((segs.offset(s) + r) as u32);
            }
        }
        if ng > 0 {
            let l = self.layer_mut(layer)?;
            let mut tmp = backend.zeros::<T>(ng * d)?;
            ops::merge_rows(
                backend,
                d,
                &spec.groups,
                &member_rows,
                &spec.v_weights,
                &l.v,
                &mut tmp,
            )?;
            ops::scatter_rows(backend, d, &target_rows, &tmp, &mut l.v)?;
            if let Some(kw) = &spec.k_weights {
                ops::merge_rows(backend, d, &spec.groups, &member_rows, kw, &l.k, &mut tmp)?;
                if let Some(norms) = &spec.k_norms {
                    let sq = row_sq_norms(backend, &tmp, d)?;
                    let scale: Vec<f32> = sq
                        .iter()
                        .zip(norms)
                        .map(|(&q, &n)| {
                            let cur = f64::from(q.max(0.0)).sqrt();
                            if cur > 0.0 && n.is_finite() {
                                (f64::from(n) / cur) as f32
                            } else {
                                1.0
                            }
                        })
                        .collect();
                    let one = Ragged::uniform(ng, 1)?;
                    let idx: Vec<u32> = (0..ng as u32).collect();
                    let mut scaled = backend.zeros::<T>(ng * d)?;
                    ops::merge_rows(backend, d, &one, &idx, &scale, &tmp, &mut scaled)?;
                    tmp = scaled;
                }
                ops::scatter_rows(backend, d, &target_rows, &tmp, &mut l.k)?;
            }
        }
        self.compact(backend, layer, &spec.keep)
    }
}

/// Squared Euclidean norm of every row of a `[rows, D]` buffer, computed with
/// [`ops::qk_logits`] (each row is its own one-token sequence, scale 1).
pub(crate) fn row_sq_norms<B: Ops, T: Element>(
    backend: &B,
    buf: &B::Buffer<T>,
    d: usize,
) -> Result<Vec<f32>> {
    let len = backend.buffer_len(buf);
    if d == 0 || len % d != 0 {
        return Err(shape(
            "row_sq_norms",
            format!("{len} elements is not a multiple of D = {d}"),
        ));
    }
    let rows = len / d;
    if rows == 0 {
        return Ok(Vec::new());
    }
    row_dots(
        backend,
        buf,
        buf,
        d,
        &Ragged::uniform(rows, 1)?,
        &Segments::packed(rows, 1, &vec![1; rows])?,
    )
}

/// Dot products between the rows of `a` (queries, one block per
/// pseudo-sequence, `q_rows`) and the rows of `b` (keys, `segs`), as
/// `qk_logits` with one head, scale 1 and no mask.
pub(crate) fn row_dots<B: Ops, T: Element>(
    backend: &B,
    a: &B::Buffer<T>,
    b: &B::Buffer<T>,
    d: usize,
    q_rows: &Ragged,
    segs: &Segments,
) -> Result<Vec<f32>> {
    let geom = HeadGeometry::new(1, 1, d)?;
    let p = ops::QkParams {
        geom,
        q_rows,
        segments: segs,
        causal: false,
        scale: Some(1.0),
    };
    let layout = ops::qk_layout(&p)?;
    let mut out = backend.zeros::<f32>(layout.blocks.total())?;
    ops::qk_logits(backend, &p, a, b, &mut out)?;
    backend.download(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::IndexSet;
    use crate::reference::Reference;

    fn rows(n: usize, hkv: usize, d: usize, base: f32) -> Vec<f32> {
        (0..n * hkv * d).map(|i| base + i as f32).collect()
    }

    #[test]
    fn append_compact_merge_round_trip() {
        let be = Reference;
        let geom = HeadGeometry::new(4, 2, 2).unwrap();
        let mut c = KvCache::<Reference, f32>::new(&be, geom, 2, 1).unwrap();
        let t = Ragged::from_lens(&[3, 1]).unwrap();
        let k = rows(4, 2, 2, 0.0);
        c.append(&be, 0, &t, &k, &k, None).unwrap();
        let t2 = Ragged::from_lens(&[2, 2]).unwrap();
        let k2 = rows(4, 2, 2, 100.0);
        c.append(&be, 0, &t2, &k2, &k2, None).unwrap();
        let l = c.layer(0).unwrap();
        assert_eq!(l.segments().lens(), &[5, 5, 3, 3]);
        assert_eq!(l.positions(0), &[0, 1, 2, 3, 4]);
        assert_eq!(l.positions(3), &[0, 1, 2]);
        // segment 1 (seq 0, head 1): rows of token t head 1 = [t*4 + 2, t*4 + 3]
        let s1 = l.segments().offset(1);
        assert_eq!(&l.k()[s1 * 2..s1 * 2 + 2], &[2.0, 3.0]);
        let keep = IndexList::from_sets(
            Scope::KvHead,
            &[
                IndexSet::new(vec![0, 4]).unwrap(),
                IndexSet::new(vec![1]).unwrap(),
                IndexSet::new(vec![2]).unwrap(),
                IndexSet::new(vec![0, 1, 2]).unwrap(),
            ],
        )
        .unwrap();
        c.compact(&be, 0, &keep).unwrap();
        let l = c.layer(0).unwrap();
        assert_eq!(l.segments().lens(), &[2, 1, 1, 3]);
        assert_eq!(l.positions(0), &[0, 4]);
        assert_eq!(l.bytes_of(0), 2 * 2 * 2 * 4);
        assert_eq!(l.seen(0), 5);
        c.shrink_to_fit(&be, 0).unwrap();
        assert_eq!(
            c.layer(0).unwrap().allocated_bytes(),
            c.layer(0).unwrap().bytes()
        );
        assert_eq!(c.layer(0).unwrap().positions(0), &[0, 4]);
    }

    #[test]
    fn explicit_positions_and_growth() {
        let be = Reference;
        let geom = HeadGeometry::new(1, 1, 1).unwrap();
        let mut c = KvCache::<Reference, f32>::with_capacity(&be, geom, 1, 1, 2).unwrap();
        assert_eq!(c.allocated_bytes(), 2 * 2 * 4);
        let t = Ragged::from_lens(&[3]).unwrap();
        c.append(
            &be,
            0,
            &t,
            &vec![1.0, 2.0, 3.0],
            &vec![4.0, 5.0, 6.0],
            Some(&[10, 20, 30]),
        )
        .unwrap();
        let l = c.layer(0).unwrap();
        assert_eq!(l.positions(0), &[10, 20, 30]);
        assert!(l.capacity_of(0) >= 3);
        assert_eq!(&l.k()[..3], &[1.0, 2.0, 3.0]);
        assert!(
            c.append(&be, 0, &t, &vec![0.0; 3], &vec![0.0; 3], Some(&[1]))
                .is_err()
        );
    }

    #[test]
    fn merge_replaces_targets_and_rescales_keys() {
        let be = Reference;
        let geom = HeadGeometry::new(1, 1, 2).unwrap();
        let mut c = KvCache::<Reference, f32>::new(&be, geom, 1, 1).unwrap();
        let t = Ragged::from_lens(&[3]).unwrap();
        let k = vec![3.0f32, 4.0, 0.0, 2.0, 1.0, 1.0];
        c.append(&be, 0, &t, &k, &k, None).unwrap();
        let spec = MergeSpec {
            keep: IndexList::new(Scope::KvHead, vec![0, 1], vec![0]).unwrap(),
            targets: vec![(0, 0)],
            groups: Ragged::from_lens(&[2]).unwrap(),
            members: vec![0, 1],
            v_weights: vec![0.5, 0.5],
            k_weights: Some(vec![0.5, 0.5]),
            k_norms: Some(vec![5.0]),
        };
        c.merge(&be, 0, &spec).unwrap();
        let l = c.layer(0).unwrap();
        assert_eq!(l.segments().lens(), &[1]);
        assert_eq!(&l.v()[..2], &[1.5, 3.0]);
        let n = (l.k()[0] * l.k()[0] + l.k()[1] * l.k()[1]).sqrt();
        assert!((n - 5.0).abs() < 1e-5);
        let bad = MergeSpec {
            targets: vec![(0, 2)],
            ..spec
        };
        assert!(c.merge(&be, 0, &bad).is_err());
    }

    #[test]
    fn bad_input_is_an_error() {
        let be = Reference;
        let geom = HeadGeometry::new(2, 1, 2).unwrap();
        assert!(KvCache::<Reference, f32>::new(&be, geom, 0, 1).is_err());
        let mut c = KvCache::<Reference, f32>::new(&be, geom, 1, 2).unwrap();
        let t = Ragged::from_lens(&[1]).unwrap();
        assert!(
            c.append(&be, 2, &t, &vec![0.0; 2], &vec![0.0; 2], None)
                .is_err()
        );
        assert!(
            c.append(&be, 0, &t, &vec![0.0; 3], &vec![0.0; 2], None)
                .is_err()
        );
        assert!(c.layer(5).is_err());
    }
}
