//! Attention on the GPU: the work-unit planner shared by decode, prefill, Q·K logits and
//! entmax prefill, and the two normaliser paths.
//!
//! A *work unit* is one (virtual row, head unit): a decode sequence or a prefill query row,
//! and a KV head (all G query heads of the group share each K/V load) or, for query-head
//! scoped restrictions, one query head. See `cuda/common.cuh` for the table format.
//!
//! - softmax: `decode_attention_split` (online softmax, one pass over K and V, split-K)
//!   then `decode_attention_combine` (fixed split order: deterministic);
//! - entmax: `qk_logits` into a workspace, `entmax_rows` (threshold per query row),
//!   `decode_attention_pv` (V rows only for tokens with a non-zero weight), combine.
//!
//! On request the pass leaves what the evidence kernels (`evidence.rs`) read: every
//! candidate's logit (softmax: written by the split kernel beside its scores; entmax: the
//! logits workspace it has anyway), the row statistics of the combine, and, written by the
//! combine itself, the f32 output before rounding and the normaliser statistic.

use super::device::{CudaBackend, DeviceBytes};
use super::evidence;
use super::kernels::{self, KernelId, entry};
use super::launch::{Arg, launch};
use super::{CudaBuffer, u32_of};
use crate::backend::{
    AttnOps, DecodeEvidence, DecodeMeta, Normalizer, PagedDecodeMeta, PrefillEvidence, PrefillMeta,
    Restrict,
};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::{BitMask, HeadGeometry, Scope};
use crate::paged::PageTable;

/// Query heads per CTA of the `_h8` kernels (`_h4`: 4).
const MAX_HEADS: usize = 8;

/// Query heads per CTA for units of `heads_per_unit` heads: 4 (fewer registers, more CTAs
/// per SM) when that covers the unit, else 8.
fn heads_per_cta(heads_per_unit: usize) -> usize {
    if heads_per_unit <= 4 { 4 } else { MAX_HEADS }
}
/// Threads per attention CTA (`KV_ATTN_THREADS`).
const ATTN_THREADS: u32 = 128;
/// Items per CTA of the logits kernel.
const QK_CHUNK: usize = 512;
/// Fewest tokens worth a split of their own.
const MIN_SPLIT: usize = 256;

/// Host tables of one attention call.
pub(crate) struct Plan<'a> {
    /// 4 `u32` per work unit (kv_off, n, base, q_row).
    pub work: Vec<u32>,
    /// Head units per virtual row.
    pub n_units: usize,
    /// Query heads per unit (G, or 1 for query-head scope).
    pub heads_per_unit: usize,
    /// 0 dense, 1 index list, 2 bit mask.
    pub mode: u32,
    pub idx: Option<&'a [u32]>,
    pub mask: Option<Vec<u32>>,
    /// Query rows (`q` / `out` have `q_rows · Hq` rows).
    pub q_rows: usize,
    /// Paged K/V (`None`: contiguous, a unit's token `t` is row `kv_off + t`).
    pub pages: Option<PageMap>,
}

/// The row map of paged K/V (`kv_row` in `cuda/common.cuh`): a unit's `kv_off` indexes
/// `map`, which holds, per segment and in token order, the pool row of slot 0 of each of
/// the segment's pages for its KV head; token `t` is row
/// `map[kv_off + (t >> shift)] + (t mod 2^shift) · stride`. Built from the page table on the
/// host (one `u32` per page and segment), never a copy of K or V.
pub(crate) struct PageMap {
    pub map: Vec<u32>,
    /// log2 of the page size.
    pub shift: u32,
    /// Rows between consecutive slots of a page (1 HND, Hkv NHD).
    pub stride: u32,
}

impl PageMap {
    /// The map of `table` and each segment's offset into it.
    fn new(table: &PageTable, op: &'static str, dt: DType) -> Result<(Self, Vec<u32>)> {
        let segs = table.segments();
        let shift = table.page_size().trailing_zeros();
        let mut map = Vec::new();
        let mut seg_off = Vec::with_capacity(segs.num_segments());
        for s in 0..segs.num_segments() {
            seg_off.push(u32::try_from(map.len()).map_err(|_| Error::Unsupported {
                backend: "cuda",
                op,
                dtype: dt,
            })?);
            let seg = table.segment(s);
            // Rows fit in a u32 (checked by `PageTable::new`).
            map.extend((0..seg.pages().len()).map(|j| seg.row(j << shift) as u32));
        }
        u32::try_from(map.len()).map_err(|_| Error::Unsupported {
            backend: "cuda",
            op,
            dtype: dt,
        })?;
        Ok((
            Self {
                map,
                shift,
                stride: u32_of(table.row_stride()),
            },
            seg_off,
        ))
    }
}

impl Plan<'_> {
    pub(crate) fn units(&self) -> usize {
        self.work.len() / 4
    }
    fn max_items(&self) -> usize {
        self.work
            .chunks(4)
            .map(|w| w[1] as usize)
            .max()
            .unwrap_or(0)
    }
    /// Items of the unit serving output row `o = q_row · Hq + h`, per `o`.
    pub(crate) fn items_per_out(&self, hq: usize) -> Vec<u32> {
        self.per_out(hq, 1)
    }
    /// Field `f` of the work unit (0 kv_off, 1 items, 2 base, 3 q_row) serving each output row.
    pub(crate) fn per_out(&self, hq: usize, f: usize) -> Vec<u32> {
        let mut n = vec![0u32; self.q_rows * hq];
        for (w, unit) in self.work.chunks(4).enumerate() {
            let h0 = (w % self.n_units) * self.heads_per_unit;
            for h in h0..h0 + self.heads_per_unit {
                n[unit[3] as usize * hq + h] = unit[f];
            }
        }
        n
    }
}

/// Offsets of rows of `items` entries laid end to end (the logits workspace).
pub(crate) fn row_bases(items: &[u32], op: &'static str, dt: DType) -> Result<(Vec<u32>, usize)> {
    let mut base = Vec::with_capacity(items.len());
    let mut acc = 0u64;
    for &n in items {
        base.push(u32::try_from(acc).map_err(|_| Error::Unsupported {
            backend: "cuda",
            op,
            dtype: dt,
        })?);
        acc += u64::from(n);
    }
    u32::try_from(acc).map_err(|_| Error::Unsupported {
        backend: "cuda",
        op,
        dtype: dt,
    })?;
    Ok((base, acc as usize))
}

/// Kernel variant for head dim `d`: (vector?, lanes per row).
pub(crate) fn variant(d: usize, dt: DType, op: &'static str) -> Result<(bool, u32)> {
    let vec = 16 / dt.size();
    if d.is_multiple_of(vec) && d / vec <= 32 {
        return Ok((true, (d / vec).next_power_of_two().max(4) as u32));
    }
    if d <= 256 {
        return Ok((false, d.div_ceil(8).next_power_of_two().max(4) as u32));
    }
    Err(Error::Unsupported {
        backend: "cuda",
        op,
        dtype: dt,
    })
}

/// Decode plan: one virtual row per sequence.
pub(crate) fn decode_plan<'a>(meta: &'a DecodeMeta<'_>) -> Plan<'a> {
    decode_plan_with(meta, &|s| meta.segs.offset(s) as u32)
}

/// Decode plan over paged K/V: the plan of the table's segments, with every unit's
/// `kv_off` its segment's offset into the page map.
pub(crate) fn paged_decode_plan<'a>(
    meta: &'a PagedDecodeMeta<'_>,
    op: &'static str,
    dt: DType,
) -> Result<Plan<'a>> {
    let (pages, seg_off) = PageMap::new(meta.pages(), op, dt)?;
    let mut plan = decode_plan_with(meta.decode(), &|s| seg_off[s]);
    plan.pages = Some(pages);
    Ok(plan)
}

/// Decode plan with `kv_off(s)` the `kv_off` of units over segment `s`.
fn decode_plan_with<'a>(meta: &'a DecodeMeta<'_>, kv_off: &dyn Fn(usize) -> u32) -> Plan<'a> {
    let (geom, segs) = (&meta.geom, meta.segs);
    let (hq, hkv, g) = (geom.num_q_heads(), geom.num_kv_heads(), geom.group());
    let scope = match meta.restrict {
        Restrict::Dense => Scope::KvHead,
        Restrict::Indices(l) => l.scope(),
        Restrict::Mask(m) => m.scope(),
    };
    let (n_units, hpu) = match scope {
        Scope::KvHead => (hkv, g),
        Scope::QueryHead => (hq, 1),
    };
    let mut work = Vec::with_capacity(segs.batch() * n_units * 4);
    for b in 0..segs.batch() {
        for u in 0..n_units {
            let h = u * hpu;
            let s = segs.index(b, geom.kv_head(h));
            let (off, len) = (kv_off(s), segs.len_of(s) as u32);
            let list = scope.list_of(b, h, geom);
            let (n, base) = match meta.restrict {
                Restrict::Dense => (len, 0),
                Restrict::Indices(l) => (
                    l.list(list).len() as u32,
                    l.indptr().range(list).start as u32,
                ),
                Restrict::Mask(m) => (len, m.word_indptr().range(list).start as u32),
            };
            work.extend_from_slice(&[off, n, base, b as u32]);
        }
    }
    let (mode, idx, mask) = match meta.restrict {
        Restrict::Dense => (0, None, None),
        Restrict::Indices(l) => (1, Some(l.indices()), None),
        Restrict::Mask(m) => (2, None, Some(all_words(m))),
    };
    Plan {
        work,
        n_units,
        heads_per_unit: hpu,
        mode,
        idx,
        mask,
        q_rows: segs.batch(),
        pages: None,
    }
}

fn all_words(m: &crate::layout::MaskList) -> Vec<u32> {
    (0..m.num_lists())
        .flat_map(|i| m.words_of(i).iter().copied())
        .collect()
}

/// Prefill plan: one virtual row per query; causal rows see a prefix of their segment.
pub(crate) fn prefill_plan<'a>(
    geom: &HeadGeometry,
    q_rows: &crate::layout::Ragged,
    segs: &crate::layout::Segments,
    causal: bool,
    mask: Option<&crate::layout::MaskList>,
) -> Plan<'a> {
    let (hq, hkv, g) = (geom.num_q_heads(), geom.num_kv_heads(), geom.group());
    let scope = mask.map_or(Scope::KvHead, |m| m.scope());
    let (n_units, hpu) = match scope {
        Scope::KvHead => (hkv, g),
        Scope::QueryHead => (hq, 1),
    };
    let mut work = Vec::with_capacity(q_rows.total() * n_units * 4);
    for b in 0..segs.batch() {
        let nq = q_rows.len_of(b);
        for i in 0..nq {
            let q_row = (q_rows.range(b).start + i) as u32;
            for u in 0..n_units {
                let h = u * hpu;
                let s = segs.index(b, geom.kv_head(h));
                let (off, len) = (segs.offset(s), segs.len_of(s));
                let n = if causal {
                    (len + i + 1).saturating_sub(nq).min(len)
                } else {
                    len
                };
                let base = mask.map_or(0, |m| {
                    let list = scope.list_of(b, h, geom);
                    m.word_indptr().range(list).start + i * BitMask::words_for(len)
                });
                work.extend_from_slice(&[off as u32, n as u32, base as u32, q_row]);
            }
        }
    }
    Plan {
        work,
        n_units,
        heads_per_unit: hpu,
        mode: if mask.is_some() { 2 } else { 0 },
        idx: None,
        mask: mask.map(all_words),
        q_rows: q_rows.total(),
        pages: None,
    }
}

/// Device copies of a plan's tables.
pub(crate) struct PlanBufs {
    pub work: DeviceBytes,
    pub idx: DeviceBytes,
    pub mask: DeviceBytes,
    /// The page map (paged plans only).
    pub pages: Option<DeviceBytes>,
}

impl PlanBufs {
    /// The row-map arguments of the attention kernels (`pg`, `pshift`, `pstride`).
    fn page_args<'a>(&'a self, plan: &Plan<'_>) -> [Arg<'a>; 3] {
        match (&self.pages, &plan.pages) {
            (Some(map), Some(p)) => [Arg::In(map), Arg::U32(p.shift), Arg::U32(p.stride)],
            _ => [Arg::Null, Arg::U32(0), Arg::U32(0)],
        }
    }
}

fn plan_bufs(be: &CudaBackend, plan: &Plan<'_>) -> Result<PlanBufs> {
    Ok(PlanBufs {
        work: be.upload_u32(&plan.work)?,
        idx: be.upload_u32(plan.idx.unwrap_or(&[]))?,
        mask: be.upload_u32(plan.mask.as_deref().unwrap_or(&[]))?,
        pages: match &plan.pages {
            Some(p) => Some(be.upload_u32(&p.map)?),
            None => None,
        },
    })
}

/// Output of the entmax threshold pass, kept for entmax prefill.
pub(crate) struct EntmaxState {
    /// Logits workspace, row `o` at `o_base[o]`, `items[o]` entries.
    pub ws: DeviceBytes,
    pub o_base: DeviceBytes,
    pub o_base_host: Vec<u32>,
    pub items: Vec<u32>,
    /// (zmax, τ shifted) per output row.
    pub tau: DeviceBytes,
    /// α per output row.
    pub alpha_rows: DeviceBytes,
}

/// Writes the Q·K logits of every unit's items: `out[o_base[o] + i]`, `-inf` past the
/// unit's items up to `o_cols[o]` and for masked items.
#[allow(clippy::too_many_arguments)]
pub(crate) fn logits<T: Element>(
    be: &CudaBackend,
    plan: &Plan<'_>,
    geom: &HeadGeometry,
    scale: f32,
    q: &DeviceBytes,
    k: &DeviceBytes,
    out: &mut DeviceBytes,
    o_base: &[u32],
    o_cols: &[u32],
    op: &'static str,
) -> Result<()> {
    let d = geom.head_dim();
    let (vec, lanes) = variant(d, T::DTYPE, op)?;
    let bufs = plan_bufs(be, plan)?;
    let max_cols = o_cols.iter().copied().max().unwrap_or(0) as usize;
    let chunks = max_cols.div_ceil(QK_CHUNK);
    let hc = heads_per_cta(plan.heads_per_unit);
    let head_chunks = plan.heads_per_unit.div_ceil(hc);
    let (ob, oc) = (be.upload_u32(o_base)?, be.upload_u32(o_cols)?);
    let [pg, pshift, pstride] = bufs.page_args(plan);
    let name = entry(
        kernels::pick4(
            [
                &kernels::QK_VEC_H4,
                &kernels::QK_VEC_H8,
                &kernels::QK_SCALAR_H4,
                &kernels::QK_SCALAR_H8,
            ],
            vec,
            hc == 4,
        ),
        T::DTYPE,
    );
    launch(
        be,
        KernelId::QkLogits,
        name,
        (u32_of(plan.units()), u32_of(chunks), u32_of(head_chunks)),
        ATTN_THREADS,
        &mut [
            Arg::In(q),
            Arg::In(k),
            Arg::In(&bufs.work),
            Arg::In(&bufs.idx),
            Arg::In(&bufs.mask),
            Arg::U32(plan.mode),
            Arg::U32(u32_of(plan.n_units)),
            Arg::U32(u32_of(plan.heads_per_unit)),
            Arg::U32(u32_of(geom.num_q_heads())),
            Arg::U32(u32_of(d)),
            Arg::U32(lanes),
            Arg::F32(scale),
            Arg::U32(u32_of(QK_CHUNK)),
            Arg::Out(out),
            Arg::In(&ob),
            Arg::In(&oc),
            pg,
            pshift,
            pstride,
        ],
    )
}

/// Entmax passes 1 and 2: logits into a workspace, then the threshold of every output row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn entmax_thresholds<T: Element>(
    be: &CudaBackend,
    plan: &Plan<'_>,
    geom: &HeadGeometry,
    scale: f32,
    alphas: &[f32],
    q: &DeviceBytes,
    k: &DeviceBytes,
    op: &'static str,
) -> Result<EntmaxState> {
    let hq = geom.num_q_heads();
    let items = plan.items_per_out(hq);
    let n_out = items.len();
    let (o_base, total) = row_bases(&items, op, T::DTYPE)?;
    let mut ws = be.scratch(total * 4)?;
    logits::<T>(be, plan, geom, scale, q, k, &mut ws, &o_base, &items, op)?;
    let alpha_rows: Vec<f32> = (0..n_out).map(|o| alphas[o % hq]).collect();
    let (ob, len) = (be.upload_u32(&o_base)?, be.upload_u32(&items)?);
    let alpha_rows = be.upload_f32(&alpha_rows)?;
    let mut tau = be.scratch(n_out * 8)?;
    launch(
        be,
        KernelId::EntmaxRows,
        kernels::ENTMAX_ROWS,
        (u32_of(n_out), 1, 1),
        256,
        &mut [
            Arg::In(&ws),
            Arg::Null,
            Arg::In(&ob),
            Arg::In(&len),
            Arg::In(&alpha_rows),
            Arg::Out(&mut tau),
        ],
    )?;
    Ok(EntmaxState {
        ws,
        o_base: ob,
        o_base_host: o_base,
        items,
        tau,
        alpha_rows,
    })
}

/// What an attention pass should leave for the evidence (nothing by default).
#[derive(Default)]
pub(crate) struct SideOut<'a> {
    /// Keep every candidate's logit (row `o` at its base, `items[o]` entries, `-inf` where a
    /// mask clears the item).
    pub logits: bool,
    /// Keep the row statistics of the combine (3 floats per output row, see
    /// `decode_attention.cu`).
    pub row_norm: bool,
    /// The output in f32 before rounding (`[q_rows, Hq, D]`).
    pub out_f32: Option<&'a mut DeviceBytes>,
    /// The normaliser statistic per output row.
    pub stats: Option<&'a mut DeviceBytes>,
}

/// Candidate logits left by an attention pass.
pub(crate) struct Logits {
    pub ws: DeviceBytes,
    /// Row `o` starts at `base[o]` and has `items[o]` entries.
    pub base: Vec<u32>,
    pub items: Vec<u32>,
}

/// What an attention pass leaves: the entmax state (entmax), the plan's device tables, and
/// the side outputs asked for.
pub(crate) struct Side {
    pub state: Option<EntmaxState>,
    pub bufs: PlanBufs,
    /// Softmax candidate logits (entmax: `state.ws`).
    pub logits: Option<Logits>,
    pub row_norm: Option<DeviceBytes>,
    /// α per query head (entmax only).
    pub alphas: Option<DeviceBytes>,
}

impl Side {
    /// The candidate logits, whichever normaliser ran.
    pub(crate) fn logits(&self) -> Option<(&DeviceBytes, &[u32], &[u32])> {
        match (&self.logits, &self.state) {
            (Some(l), _) => Some((&l.ws, &l.base, &l.items)),
            (None, Some(s)) => Some((&s.ws, &s.o_base_host, &s.items)),
            _ => None,
        }
    }
}

/// Runs attention for a plan and writes `out` (`[q_rows, Hq, D]`) and the side outputs of
/// `side`. Returns what the pass left (the entmax state for entmax prefill's τ and tile
/// statistics, and the evidence inputs); `None` when there is no output row.
#[allow(clippy::too_many_arguments)]
pub(crate) fn run<T: Element>(
    be: &CudaBackend,
    plan: &Plan<'_>,
    geom: &HeadGeometry,
    scale: f32,
    alphas: Option<&[f32]>,
    q: &CudaBuffer<T>,
    k: &CudaBuffer<T>,
    v: &CudaBuffer<T>,
    out: &mut CudaBuffer<T>,
    side: SideOut<'_>,
    op: &'static str,
) -> Result<Option<Side>> {
    let (hq, d) = (geom.num_q_heads(), geom.head_dim());
    let (vec, lanes) = variant(d, T::DTYPE, op)?;
    let n_out = plan.q_rows * hq;
    if n_out == 0 {
        return Ok(None);
    }
    let units = plan.units();
    let hc = heads_per_cta(plan.heads_per_unit);
    let head_chunks = plan.heads_per_unit.div_ceil(hc);
    let max_items = plan.max_items();
    // Split-K: enough CTAs to fill the device, never splits shorter than MIN_SPLIT tokens.
    let ctas = (units * head_chunks).max(1);
    let want = (4 * be.sm_count() as usize).div_ceil(ctas);
    let splits = want.clamp(1, max_items.div_ceil(MIN_SPLIT).max(1));
    let chunk = max_items.div_ceil(splits).max(1);
    let splits = max_items.div_ceil(chunk).max(1);
    let mut part = be.scratch(splits * n_out * (d + 2) * 4)?;
    let bufs = plan_bufs(be, plan)?;
    let state = match alphas {
        Some(a) => Some(entmax_thresholds::<T>(
            be, plan, geom, scale, a, &q.data, &k.data, op,
        )?),
        None => None,
    };
    let alphas_dev = be.upload_f32(alphas.unwrap_or(&[]))?;
    // Softmax candidate logits, written by the split kernel beside its scores.
    let mut logits = if side.logits && state.is_none() {
        let items = plan.items_per_out(hq);
        let (base, total) = row_bases(&items, op, T::DTYPE)?;
        Some((
            Logits {
                ws: be.scratch(total * 4)?,
                base: Vec::new(),
                items,
            },
            base,
        ))
    } else {
        None
    };
    let logits_base = match &logits {
        Some((_, base)) => Some(be.upload_u32(base)?),
        None => None,
    };
    let table = if state.is_some() {
        kernels::pick4(
            [
                &kernels::ATTN_PV_VEC_H4,
                &kernels::ATTN_PV_VEC_H8,
                &kernels::ATTN_PV_SCALAR_H4,
                &kernels::ATTN_PV_SCALAR_H8,
            ],
            vec,
            hc == 4,
        )
    } else if logits.is_some() {
        kernels::pick4(
            [
                &kernels::ATTN_SPLIT_EV_VEC_H4,
                &kernels::ATTN_SPLIT_EV_VEC_H8,
                &kernels::ATTN_SPLIT_EV_SCALAR_H4,
                &kernels::ATTN_SPLIT_EV_SCALAR_H8,
            ],
            vec,
            hc == 4,
        )
    } else {
        kernels::pick4(
            [
                &kernels::ATTN_SPLIT_VEC_H4,
                &kernels::ATTN_SPLIT_VEC_H8,
                &kernels::ATTN_SPLIT_SCALAR_H4,
                &kernels::ATTN_SPLIT_SCALAR_H8,
            ],
            vec,
            hc == 4,
        )
    };
    let empty = be.scratch(16)?;
    let (ws, ob, tau) = match &state {
        Some(s) => (&s.ws, &s.o_base, &s.tau),
        None => (&empty, logits_base.as_ref().unwrap_or(&empty), &empty),
    };
    let zout = match logits.as_mut() {
        Some((l, _)) => Arg::Out(&mut l.ws),
        None => Arg::Null,
    };
    let [pg, pshift, pstride] = bufs.page_args(plan);
    launch(
        be,
        KernelId::DecodeAttention,
        entry(table, T::DTYPE),
        (u32_of(units), u32_of(splits), u32_of(head_chunks)),
        ATTN_THREADS,
        &mut [
            Arg::In(&q.data),
            Arg::In(&k.data),
            Arg::In(&v.data),
            Arg::In(&bufs.work),
            Arg::In(&bufs.idx),
            Arg::In(&bufs.mask),
            Arg::U32(plan.mode),
            Arg::U32(u32_of(plan.n_units)),
            Arg::U32(u32_of(plan.heads_per_unit)),
            Arg::U32(u32_of(hq)),
            Arg::U32(u32_of(d)),
            Arg::U32(lanes),
            Arg::F32(scale),
            Arg::U32(u32_of(chunk)),
            Arg::Out(&mut part),
            Arg::U32(u32_of(n_out)),
            Arg::In(ws),
            Arg::In(ob),
            Arg::In(tau),
            Arg::In(&alphas_dev),
            zout,
            pg,
            pshift,
            pstride,
        ],
    )?;
    let mut row_norm = if side.row_norm {
        Some(be.scratch(n_out * 3 * 4)?)
    } else {
        None
    };
    let (tau_arg, alpha_arg) = match &state {
        Some(s) => (Arg::In(&s.tau), Arg::In(&alphas_dev)),
        None => (Arg::Null, Arg::Null),
    };
    launch(
        be,
        KernelId::DecodeAttention,
        entry(&kernels::ATTN_COMBINE, T::DTYPE),
        (u32_of(n_out), 1, 1),
        128,
        &mut [
            Arg::In(&part),
            Arg::U32(u32_of(splits)),
            Arg::U32(u32_of(n_out)),
            Arg::U32(u32_of(d)),
            Arg::Out(&mut out.data),
            Arg::opt_out(side.out_f32),
            Arg::opt_out(row_norm.as_mut()),
            Arg::opt_out(side.stats),
            tau_arg,
            alpha_arg,
            Arg::U32(u32_of(hq)),
        ],
    )?;
    let alphas = state.as_ref().map(|_| alphas_dev);
    Ok(Some(Side {
        state,
        bufs,
        logits: logits.map(|(mut l, base)| {
            l.base = base;
            l
        }),
        row_norm,
        alphas,
    }))
}

/// α per query head, or `None` for softmax.
pub(crate) fn head_alphas(norm: &Normalizer, hq: usize) -> Option<Vec<f32>> {
    match norm {
        Normalizer::Softmax => None,
        _ => Some((0..hq).map(|h| norm.alpha(h).unwrap_or(2.0)).collect()),
    }
}

impl AttnOps for CudaBackend {
    fn decode_attention<T: Element>(
        &self,
        meta: &DecodeMeta<'_>,
        q: &CudaBuffer<T>,
        k: &CudaBuffer<T>,
        v: &CudaBuffer<T>,
        out: &mut CudaBuffer<T>,
        ev: &mut DecodeEvidence<'_, Self>,
    ) -> Result<()> {
        decode(
            self,
            meta,
            &decode_plan(meta),
            q,
            k,
            v,
            out,
            ev,
            "decode_attention",
        )
    }

    /// The contiguous decode's kernels with the paged row map: K and V are read in place
    /// through the page table (`PageMap`); restrictions and evidence are in token
    /// coordinates, as on the table's segments.
    fn decode_attention_paged<T: Element>(
        &self,
        meta: &PagedDecodeMeta<'_>,
        q: &CudaBuffer<T>,
        k: &CudaBuffer<T>,
        v: &CudaBuffer<T>,
        out: &mut CudaBuffer<T>,
        ev: &mut DecodeEvidence<'_, Self>,
    ) -> Result<()> {
        const OP: &str = "decode_attention_paged";
        let plan = paged_decode_plan(meta, OP, T::DTYPE)?;
        decode(self, meta.decode(), &plan, q, k, v, out, ev, OP)
    }

    fn prefill_attention<T: Element>(
        &self,
        meta: &PrefillMeta<'_>,
        q: &CudaBuffer<T>,
        k: &CudaBuffer<T>,
        v: &CudaBuffer<T>,
        out: &mut CudaBuffer<T>,
        ev: &mut PrefillEvidence<'_, Self>,
    ) -> Result<()> {
        let plan = prefill_plan(&meta.geom, meta.q_rows, meta.segs, meta.causal, meta.mask);
        let alphas = head_alphas(meta.normalizer, meta.geom.num_q_heads());
        let side = SideOut {
            row_norm: !ev.is_empty(),
            ..SideOut::default()
        };
        let side = run(
            self,
            &plan,
            &meta.geom,
            meta.scale,
            alphas.as_deref(),
            q,
            k,
            v,
            out,
            side,
            "prefill_attention",
        )?;
        evidence::prefill(self, meta, &plan, side.as_ref(), q, k, ev)
    }
}

/// Decode attention for a (contiguous or paged) plan, and its evidence.
#[allow(clippy::too_many_arguments)]
fn decode<T: Element>(
    be: &CudaBackend,
    meta: &DecodeMeta<'_>,
    plan: &Plan<'_>,
    q: &CudaBuffer<T>,
    k: &CudaBuffer<T>,
    v: &CudaBuffer<T>,
    out: &mut CudaBuffer<T>,
    ev: &mut DecodeEvidence<'_, CudaBackend>,
    op: &'static str,
) -> Result<()> {
    let alphas = head_alphas(meta.normalizer, meta.geom.num_q_heads());
    let side = SideOut {
        logits: ev.probs.is_some() || ev.logits.is_some(),
        row_norm: ev.probs.is_some(),
        out_f32: ev.output.as_deref_mut().map(|b| &mut b.data),
        stats: ev.stats.as_deref_mut().map(|b| &mut b.data),
    };
    let side = run(
        be,
        plan,
        &meta.geom,
        meta.scale,
        alphas.as_deref(),
        q,
        k,
        v,
        out,
        side,
        op,
    )?;
    match side {
        Some(side) => evidence::decode(be, meta, plan, &side, ev),
        None => Ok(()),
    }
}
