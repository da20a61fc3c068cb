//! `Dam` (Zhang et al. 2025): a static per-(layer, query head) sparse
//! attention mask learned offline from calibration attention maps, and
//! extended to any length.
//!
//! From the averaged `PCL × PCL` map `Ā` of one (layer, head):
//!
//! 1. Box–Cox amplification: `X = max(Ā, 1e-10)`, `B = (X^λ − 1)/λ`
//!    (`ln X` when `λ = 0`), then `B ← B − min B` when `min B < 0`.
//! 2. True mask `M = 1[B ≥ τ]`, `τ` fixed ([`DamThreshold::Fixed`]) or the
//!    given percentile of `B` over the causal cells `j ≤ i` of that head
//!    ([`DamThreshold::Percentile`], linear interpolation).
//! 3. Pattern matching: diagonal `r` covers `(i, i − r)`, vertical `c`
//!    covers `(i, c)` for `i ≥ c`; a pattern with match ratio
//!    `γ = |M ∩ P| / |P| ≥ μ` is kept. Diagonal 0 is always kept, so no row
//!    is ever empty.
//! 4. The mask at any length is the union of the kept patterns:
//!    `allowed(i, j) = j ≤ i ∧ (i − j ∈ diagonals ∨ j ∈ verticals)`.
//!
//! **Deviation (edge guard):** a pattern covering fewer than
//! [`DamConfig::min_support`] cells of the calibration map (the last few
//! verticals, the longest diagonals) is not matched except diagonal 0: such
//! short patterns are matched by chance (a bright sink column alone matches
//! diagonal `PCL − 1`) and would extend into spurious long patterns. Set it
//! to 1 for the paper's exact rule.
//!
//! Positions: keys at row `j` of the cache are at position `j`; the queries
//! of a prefill chunk are bottom-right aligned (row `r` of `q_len` is at
//! `kv_len − q_len + r`), as in [`crate::ops`]; the decode query is at
//! `kv_len − 1`. DAM keeps the whole cache.
//!
//! Cost: calibration O(L·H·PCL²) once, offline. Per decode step and head
//! the index list costs O(|diagonals| + |verticals|) (no dense mask);
//! prefill masks cost `q_len · kv_len` bits per head.
//!
//! Page: `docs/policies/dam.md`.
#![forbid(unsafe_code)]

use super::{Capabilities, KvPolicy, Plan, StepCtx};
use crate::backend::Backend;
use crate::dtype::Element;
use crate::error::{Error, Result, config, shape};
use crate::layout::{
    BitMask, HeadGeometry, IndexList, IndexSet, MaskList, Ragged, Scope, Segments,
};

const OP: &str = "Dam";
const MAGIC: &[u8; 8] = b"KVSVDAM\0";
const VERSION: u16 = 1;

/// How the threshold τ is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DamThreshold {
    /// The same τ for every head (on the shifted Box–Cox value).
    Fixed(f32),
    /// Per head, this percentile (0–100) of the causal cells' values.
    Percentile(f32),
}

/// Settings of [`Dam::calibrate`].
#[derive(Clone, Debug, PartialEq)]
pub struct DamConfig {
    /// Box–Cox λ (default 0.5).
    pub lambda: f32,
    /// Threshold (default `Fixed(0.3)`, the mask-generation script's value,
    /// ≈ attention ≥ 0.0225 with λ = 0.5).
    pub threshold: DamThreshold,
    /// Match ratio μ in `(0, 1]` (default 0.8).
    pub mu: f32,
    /// Pattern capture length of the calibration maps (default 128).
    pub pcl: usize,
    /// Minimum cells a pattern must cover to be matched (default 16; see
    /// the module docs; 1 = the paper's rule).
    pub min_support: usize,
}

impl Default for DamConfig {
    fn default() -> Self {
        Self {
            lambda: 0.5,
            threshold: DamThreshold::Fixed(0.3),
            mu: 0.8,
            pcl: 128,
            min_support: 16,
        }
    }
}

impl DamConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if !self.lambda.is_finite() {
            return Err(config(
                OP,
                format!("lambda must be finite, got {}", self.lambda),
            ));
        }
        if !(self.mu > 0.0 && self.mu <= 1.0) {
            return Err(config(
                OP,
                format!("the match ratio mu must be in (0, 1], got {}", self.mu),
            ));
        }
        if self.pcl == 0 || u32::try_from(self.pcl).is_err() {
            return Err(config(
                OP,
                format!(
                    "the pattern capture length must be in 1..2^32, got {}",
                    self.pcl
                ),
            ));
        }
        match self.threshold {
            DamThreshold::Fixed(t) if !t.is_finite() => {
                Err(config(OP, format!("tau must be finite, got {t}")))
            }
            DamThreshold::Percentile(p) if !(0.0..=100.0).contains(&p) => Err(config(
                OP,
                format!("the threshold percentile must be in [0, 100], got {p}"),
            )),
            _ => Ok(()),
        }
    }
}

/// The compact mask of one (layer, query head): matched diagonal offsets
/// `r` (`j = i − r`) and vertical columns `c` (`j = c`, `i ≥ c`), both
/// sorted. Diagonal 0 is always present.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HeadPattern {
    /// Diagonal offsets.
    pub diagonals: Vec<u32>,
    /// Vertical columns.
    pub verticals: Vec<u32>,
}

impl HeadPattern {
    /// Whether query position `i` may attend to key position `j`.
    pub fn allows(&self, i: usize, j: usize) -> bool {
        j <= i
            && (u32::try_from(i - j).is_ok_and(|r| self.diagonals.binary_search(&r).is_ok())
                || u32::try_from(j).is_ok_and(|c| self.verticals.binary_search(&c).is_ok()))
    }

    /// The keys `0 ..= i` that query position `i` attends to, restricted to
    /// `j < kv_len`, sorted (O(|diagonals| + |verticals|)).
    pub fn keys_of(&self, i: usize, kv_len: usize) -> IndexSet {
        let v: Vec<u32> = self
            .diagonals
            .iter()
            .filter_map(|&r| i.checked_sub(r as usize))
            .chain(
                self.verticals
                    .iter()
                    .map(|&c| c as usize)
                    .filter(|&c| c <= i),
            )
            .filter(|&j| j < kv_len)
            .map(|j| j as u32)
            .collect();
        IndexSet::from_unsorted(v)
    }

    /// Row of query position `i` over `kv_len` keys.
    pub fn row(&self, i: usize, kv_len: usize) -> BitMask {
        let keys = self.keys_of(i, kv_len);
        let mut m = BitMask::zeros(kv_len);
        for &j in keys.as_slice() {
            m.set(j as usize, true);
        }
        m
    }

    fn check(&self, what: &str) -> Result<()> {
        for (name, v) in [
            ("diagonals", &self.diagonals),
            ("verticals", &self.verticals),
        ] {
            if v.windows(2).any(|w| w[1] <= w[0]) {
                return Err(shape(
                    OP,
                    format!("{what}: {name} must be strictly increasing"),
                ));
            }
        }
        if self.diagonals.first() != Some(&0) {
            return Err(shape(OP, format!("{what}: diagonal 0 must be present")));
        }
        Ok(())
    }
}

/// Box–Cox amplification with the shift to a zero minimum (f64).
fn box_cox(map: &[f32], lambda: f64) -> Vec<f64> {
    let mut b: Vec<f64> = map
        .iter()
        .map(|&a| {
            let x = f64::from(a).max(1e-10);
            if lambda == 0.0 {
                x.ln()
            } else {
                (x.powf(lambda) - 1.0) / lambda
            }
        })
        .collect();
    let min = b.iter().copied().fold(f64::INFINITY, f64::min);
    if min < 0.0 {
        b.iter_mut().for_each(|x| *x -= min);
    }
    b
}

/// Linear-interpolation percentile (numpy's default) of unsorted values.
fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let pos = p / 100.0 * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// Matches the patterns of one calibration map.
fn match_head(cfg: &DamConfig, map: &[f32]) -> HeadPattern {
    let l = cfg.pcl;
    let b = box_cox(map, f64::from(cfg.lambda));
    let tau = match cfg.threshold {
        DamThreshold::Fixed(t) => f64::from(t),
        DamThreshold::Percentile(p) => {
            let causal = (0..l)
                .flat_map(|i| (0..=i).map(move |j| (i, j)))
                .map(|(i, j)| b[i * l + j])
                .collect();
            percentile(causal, f64::from(p))
        }
    };
    let on = |i: usize, j: usize| b[i * l + j] >= tau;
    let mu = f64::from(cfg.mu);
    let ok = |hits: usize, cells: usize| {
        cells >= cfg.min_support.max(1) && hits as f64 >= mu * cells as f64
    };
    let mut diagonals = vec![0u32];
    for r in 1..l {
        let hits = (r..l).filter(|&i| on(i, i - r)).count();
        if ok(hits, l - r) {
            diagonals.push(r as u32);
        }
    }
    let verticals = (0..l)
        .filter(|&c| ok((c..l).filter(|&i| on(i, c)).count(), l - c))
        .map(|c| c as u32)
        .collect();
    HeadPattern {
        diagonals,
        verticals,
    }
}

/// DAM masks of a model: one [`HeadPattern`] per (layer, query head).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dam {
    num_layers: usize,
    num_heads: usize,
    pcl: usize,
    heads: Vec<HeadPattern>,
}

impl Dam {
    /// Builds the masks from calibration maps: `maps[layer][head]` is the
    /// averaged `PCL × PCL` attention map of that (layer, query head),
    /// row-major (query `i`, key `j`). Every layer needs the same number of
    /// heads; NaN or infinite values are errors; negative values count as 0.
    pub fn calibrate(cfg: &DamConfig, maps: &[Vec<&[f32]>]) -> Result<Self> {
        cfg.validate()?;
        let num_layers = maps.len();
        let num_heads = maps.first().map_or(0, Vec::len);
        if num_layers == 0 || num_heads == 0 {
            return Err(shape(
                OP,
                "calibration needs at least one layer and one head",
            ));
        }
        let cells = cfg
            .pcl
            .checked_mul(cfg.pcl)
            .ok_or_else(|| shape(OP, "PCL² overflows"))?;
        let mut heads = Vec::with_capacity(num_layers * num_heads);
        for (layer, row) in maps.iter().enumerate() {
            if row.len() != num_heads {
                return Err(shape(
                    OP,
                    format!(
                        "layer {layer} has {} maps, layer 0 has {num_heads}",
                        row.len()
                    ),
                ));
            }
            for (h, map) in row.iter().enumerate() {
                if map.len() != cells {
                    return Err(shape(
                        OP,
                        format!(
                            "map (layer {layer}, head {h}) has {} values, a {1} x {1} map has {cells}",
                            map.len(),
                            cfg.pcl
                        ),
                    ));
                }
                if let Some(i) = map.iter().position(|x| !x.is_finite()) {
                    return Err(Error::NonFinite {
                        op: OP,
                        what: format!("map (layer {layer}, head {h}) cell {i} is {}", map[i]),
                    });
                }
                heads.push(match_head(cfg, map));
            }
        }
        Ok(Self {
            num_layers,
            num_heads,
            pcl: cfg.pcl,
            heads,
        })
    }

    /// Builds from explicit patterns, `patterns[layer * num_heads + head]`
    /// (each sorted, with diagonal 0); `pcl` is recorded for reference.
    pub fn from_patterns(
        num_layers: usize,
        num_heads: usize,
        pcl: usize,
        patterns: Vec<HeadPattern>,
    ) -> Result<Self> {
        if num_layers == 0
            || num_heads == 0
            || num_layers.checked_mul(num_heads) != Some(patterns.len())
        {
            return Err(shape(
                OP,
                format!(
                    "{} patterns for {num_layers} layers x {num_heads} heads (both positive)",
                    patterns.len()
                ),
            ));
        }
        if u32::try_from(pcl).is_err() {
            return Err(shape(OP, "pcl overflows u32"));
        }
        for (i, p) in patterns.iter().enumerate() {
            p.check(&format!("pattern {i}"))?;
        }
        Ok(Self {
            num_layers,
            num_heads,
            pcl,
            heads: patterns,
        })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }
    /// Number of query heads per layer.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }
    /// Pattern capture length of the calibration.
    pub fn pcl(&self) -> usize {
        self.pcl
    }
    /// The pattern of (layer, query head).
    pub fn pattern(&self, layer: usize, head: usize) -> Option<&HeadPattern> {
        (layer < self.num_layers && head < self.num_heads)
            .then(|| &self.heads[layer * self.num_heads + head])
    }

    fn layer_patterns(
        &self,
        op: &'static str,
        layer: usize,
        geom: &HeadGeometry,
    ) -> Result<&[HeadPattern]> {
        if layer >= self.num_layers {
            return Err(shape(
                op,
                format!(
                    "layer {layer} out of range for masks of {} layers",
                    self.num_layers
                ),
            ));
        }
        if geom.num_q_heads() != self.num_heads {
            return Err(shape(
                op,
                format!(
                    "the masks have {} heads per layer, the geometry {} query heads",
                    self.num_heads,
                    geom.num_q_heads()
                ),
            ));
        }
        Ok(&self.heads[layer * self.num_heads..(layer + 1) * self.num_heads])
    }

    /// Masks for masked prefill of `layer` (scope [`Scope::QueryHead`], one
    /// `q_len × kv_len` mask per (sequence, query head), bottom-right
    /// aligned), for [`crate::ops::prefill_attention`].
    pub fn prefill_mask(
        &self,
        layer: usize,
        geom: &HeadGeometry,
        q_rows: &Ragged,
        segs: &Segments,
    ) -> Result<MaskList> {
        const PM: &str = "Dam::prefill_mask";
        let pats = self.layer_patterns(PM, layer, geom)?;
        if q_rows.num_segments() != segs.batch() || segs.num_kv_heads() != geom.num_kv_heads() {
            return Err(shape(
                PM,
                "q_rows / segments do not match the batch and geometry",
            ));
        }
        let mut masks = Vec::with_capacity(segs.batch() * geom.num_q_heads());
        for b in 0..segs.batch() {
            for (h, p) in pats.iter().enumerate() {
                let kv = segs.len_of(segs.index(b, geom.kv_head(h)));
                let nq = q_rows.len_of(b);
                if nq > kv {
                    return Err(shape(
                        PM,
                        format!("sequence {b}: {nq} queries but {kv} cached tokens"),
                    ));
                }
                masks.push((0..nq).map(|r| p.row(kv - nq + r, kv)).collect());
            }
        }
        MaskList::from_rows(Scope::QueryHead, &masks)
    }

    /// Single-row masks for decode of `layer` (query at `kv_len − 1`), scope
    /// [`Scope::QueryHead`], for `Restrict::Mask`.
    pub fn decode_mask(
        &self,
        layer: usize,
        geom: &HeadGeometry,
        segs: &Segments,
    ) -> Result<MaskList> {
        let q_rows = Ragged::uniform(segs.batch(), 1)?;
        self.prefill_mask(layer, geom, &q_rows, segs)
    }

    /// The decode tokens as an index list (scope [`Scope::QueryHead`]), for
    /// `Restrict::Indices`; built from the patterns without a dense mask.
    pub fn decode_indices(
        &self,
        layer: usize,
        geom: &HeadGeometry,
        segs: &Segments,
    ) -> Result<IndexList> {
        let pats = self.layer_patterns("Dam::decode_indices", layer, geom)?;
        let mut sets = Vec::with_capacity(segs.batch() * geom.num_q_heads());
        for b in 0..segs.batch() {
            for (h, p) in pats.iter().enumerate() {
                let kv = segs.len_of(segs.index(b, geom.kv_head(h)));
                sets.push(if kv == 0 {
                    IndexSet::default()
                } else {
                    p.keys_of(kv - 1, kv)
                });
            }
        }
        IndexList::from_sets(Scope::QueryHead, &sets)
    }

    /// Serialises the masks: magic `KVSVDAM\0`, version `u16`, then
    /// little-endian `u32` `num_layers`, `num_heads`, `pcl`, and per
    /// (layer, head) `n_diag`, `n_vert` and the values; a trailing FNV-1a
    /// `u32` checksum of everything before it.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        for x in [self.num_layers, self.num_heads, self.pcl] {
            out.extend_from_slice(&(x as u32).to_le_bytes());
        }
        for p in &self.heads {
            out.extend_from_slice(&(p.diagonals.len() as u32).to_le_bytes());
            out.extend_from_slice(&(p.verticals.len() as u32).to_le_bytes());
            for &x in p.diagonals.iter().chain(&p.verticals) {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Parses [`Dam::to_bytes`] output. Wrong magic, unknown version,
    /// truncation, trailing bytes, a bad checksum or invalid patterns are
    /// [`Error::Shape`] errors.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        const FB: &str = "Dam::from_bytes";
        let err = |what: &str| shape(FB, what.to_string());
        if bytes.len() < MAGIC.len() + 2 + 12 + 4 {
            return Err(err("truncated: too short for a DAM header"));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(err("bad magic: not a kvsieve DAM mask file"));
        }
        let (body, tail) = bytes.split_at(bytes.len() - 4);
        let stored = u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]);
        let mut r = Reader {
            b: body,
            at: MAGIC.len(),
        };
        let version = r.u16()?;
        if version != VERSION {
            return Err(shape(
                FB,
                format!("unsupported version {version} (this build reads {VERSION})"),
            ));
        }
        if fnv1a(body) != stored {
            return Err(err("checksum mismatch: the bytes are corrupt"));
        }
        let (nl, nh, pcl) = (r.u32()? as usize, r.u32()? as usize, r.u32()? as usize);
        let n = nl
            .checked_mul(nh)
            .filter(|&n| n <= r.left() / 8)
            .ok_or_else(|| err("truncated: head count larger than the data"))?;
        let mut heads = Vec::with_capacity(n);
        for _ in 0..n {
            let (nd, nv) = (r.u32()? as usize, r.u32()? as usize);
            if nd.saturating_add(nv) > r.left() / 4 {
                return Err(err("truncated: pattern lengths larger than the data"));
            }
            let diagonals = (0..nd).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
            let verticals = (0..nv).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
            heads.push(HeadPattern {
                diagonals,
                verticals,
            });
        }
        if r.left() != 0 {
            return Err(shape(FB, format!("{} trailing bytes", r.left())));
        }
        Self::from_patterns(nl, nh, pcl, heads)
            .map_err(|e| shape(FB, format!("invalid patterns: {e}")))
    }
}

fn fnv1a(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ u32::from(x)).wrapping_mul(0x0100_0193)
    })
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self
            .b
            .get(self.at..self.at + N)
            .ok_or_else(|| shape("Dam::from_bytes", "truncated"))?;
        self.at += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16> {
        self.take::<2>().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
}

impl<B: Backend, T: Element> KvPolicy<B, T> for Dam {
    fn name(&self) -> &'static str {
        "dam"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            selects: true,
            // Prefill masks hold `q_len × kv_len` bits per query head:
            // chunks bound them.
            prefill_block: Some(512),
            ..Capabilities::default()
        }
    }
    /// The chunk's prefill masks (DAM's own prefill phase).
    fn before_prefill_chunk(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.prefill_mask(ctx.layer, ctx.geom(), ctx.q_rows, ctx.kv.segments())
            .map(Plan::SelectMask)
    }
    /// The decode mask's tokens as a `QueryHead` list.
    fn select_for_attention(&mut self, ctx: &StepCtx<'_, B, T>) -> Result<Plan> {
        self.decode_indices(ctx.layer, ctx.geom(), ctx.kv.segments())
            .map(Plan::Select)
    }
}

/// The examples of `docs/policies/dam.md`, run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../docs/policies/dam.md")]
struct DocExamples;
