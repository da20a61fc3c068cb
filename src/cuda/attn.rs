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

use super::device::{CudaBackend, DeviceBytes};
use super::kernels::{self, KernelId, entry};
use super::launch::{Arg, launch};
use super::{CudaBuffer, u32_of};
use crate::backend::{
    AttnOps, DecodeEvidence, DecodeMeta, Normalizer, PrefillEvidence, PrefillMeta, Restrict,
    evidence,
};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
use crate::layout::{BitMask, HeadGeometry, Scope};

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
}

impl Plan<'_> {
    fn units(&self) -> usize {
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
    fn items_per_out(&self, hq: usize) -> Vec<u32> {
        let mut n = vec![0u32; self.q_rows * hq];
        for (w, unit) in self.work.chunks(4).enumerate() {
            let h0 = (w % self.n_units) * self.heads_per_unit;
            for h in h0..h0 + self.heads_per_unit {
                n[unit[3] as usize * hq + h] = unit[1];
            }
        }
        n
    }
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
            let (off, len) = (segs.offset(s) as u32, segs.len_of(s) as u32);
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
    }
}

/// Device copies of a plan's tables.
struct PlanBufs {
    work: DeviceBytes,
    idx: DeviceBytes,
    mask: DeviceBytes,
}

fn plan_bufs(be: &CudaBackend, plan: &Plan<'_>) -> Result<PlanBufs> {
    Ok(PlanBufs {
        work: be.upload_u32(&plan.work)?,
        idx: be.upload_u32(plan.idx.unwrap_or(&[]))?,
        mask: be.upload_u32(plan.mask.as_deref().unwrap_or(&[]))?,
    })
}

/// Output of the entmax threshold pass, kept for entmax prefill.
pub(crate) struct EntmaxState {
    /// Logits workspace, row `o` at `o_base[o]`, `items[o]` entries.
    pub ws: DeviceBytes,
    pub o_base: DeviceBytes,
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
    let mut o_base = Vec::with_capacity(n_out);
    let mut acc = 0u64;
    for &n in &items {
        o_base.push(u32::try_from(acc).map_err(|_| Error::Unsupported {
            backend: "cuda",
            op,
            dtype: T::DTYPE,
        })?);
        acc += u64::from(n);
    }
    let mut ws = be.scratch(acc as usize * 4)?;
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
        items,
        tau,
        alpha_rows,
    })
}

/// Runs attention for a plan and writes `out` (`[q_rows, Hq, D]`). Returns the entmax
/// state when the normaliser is entmax (for entmax prefill's τ and tile statistics).
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
    op: &'static str,
) -> Result<Option<EntmaxState>> {
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
        None => (&empty, &empty, &empty),
    };
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
        ],
    )?;
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
        ],
    )?;
    Ok(state)
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
        let plan = decode_plan(meta);
        let alphas = head_alphas(meta.normalizer, meta.geom.num_q_heads());
        run(
            self,
            &plan,
            &meta.geom,
            meta.scale,
            alphas.as_deref(),
            q,
            k,
            v,
            out,
            "decode_attention",
        )?;
        evidence::fallback::decode(self, meta, q, k, out, ev)
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
        run(
            self,
            &plan,
            &meta.geom,
            meta.scale,
            alphas.as_deref(),
            q,
            k,
            v,
            out,
            "prefill_attention",
        )?;
        evidence::fallback::prefill(self, meta, q, k, ev)
    }
}
