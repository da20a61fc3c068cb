//! Attention evidence on the GPU (`kvsieve::backend::evidence`), from what the attention
//! pass left (`attn.rs`, [`Side`]): no extra read of V, no host round trip.
//!
//! - decode `output` and `stats`: written by the attention's combine kernel itself;
//! - decode `probs` and `logits`: `decode_attention_evidence_f32`, one thread per token of
//!   an evidence block, maps the token to its candidate (identity for dense rows and masks,
//!   binary search in a sorted index list), reads the logit the attention pass kept and,
//!   for the weights, the row statistics of the combine, and folds the GQA group's heads;
//!   it reads O(rows) floats and never K or V;
//! - prefill `col_sums` and `window`: `prefill_attention_evidence_*` (`prefill_attention.cu`),
//!   a second pass over the keys with the per-row statistics (O(rows) memory): each key's
//!   row group recomputes `q · k` for the chunk's queries of every head of its group and
//!   folds the weights in a fixed order (deterministic, no atomics).

use super::attn::{Plan, Side, variant};
use super::device::{CudaBackend, DeviceBytes};
use super::kernels::{self, KernelId, entry};
use super::launch::{Arg, launch};
use super::{CudaBuffer, u32_of};
use crate::backend::{
    DecodeEvidence, DecodeMeta, Heads, PrefillEvidence, PrefillMeta, Window, evidence_blocks,
};
use crate::dtype::Element;
use crate::error::Result;
use crate::layout::Ragged;

/// Threads (= tokens per chunk) of the decode evidence kernel.
const EV_THREADS: u32 = 256;
/// Threads per block of the prefill evidence kernel (`KV_ATTN_THREADS`).
const PF_THREADS: u32 = 128;
/// Keys per block of the prefill evidence kernel.
const PF_KEYS: usize = 64;

/// `Heads` as the kernels fold it.
fn fold_mode(heads: Heads) -> u32 {
    match heads {
        Heads::PerHead => 0,
        Heads::Sum => 1,
        Heads::Mean => 2,
        Heads::Max => 3,
    }
}

/// Decode `probs` and `logits` (the combine already wrote `output` and `stats`).
pub(crate) fn decode(
    be: &CudaBackend,
    meta: &DecodeMeta<'_>,
    plan: &Plan<'_>,
    side: &Side,
    ev: &mut DecodeEvidence<'_, CudaBackend>,
) -> Result<()> {
    if ev.probs.is_none() && ev.logits.is_none() {
        return Ok(());
    }
    let (geom, segs) = (&meta.geom, meta.segs);
    let (hq, g) = (geom.num_q_heads(), geom.group());
    let Some((ws, base, items)) = side.logits() else {
        return Ok(());
    };
    // Per output row: logits base, candidates, index-list start.
    let list_base = plan.per_out(hq, 2);
    let rows: Vec<u32> = (0..base.len())
        .flat_map(|o| {
            [
                base[o],
                items[o],
                if plan.mode == 1 { list_base[o] } else { 0 },
            ]
        })
        .collect();
    let rows = be.upload_u32(&rows)?;
    let ones = vec![1; segs.batch()];
    let pass = |heads: Heads, logits: bool, out: &mut DeviceBytes| -> Result<()> {
        let blocks = evidence_blocks(geom, segs, heads, &ones)?;
        let per = heads.blocks_per_seq(geom);
        let (nh, first_of) = match heads {
            Heads::PerHead => (1, 1),
            _ => (g, g),
        };
        let mut tab = Vec::new();
        for b in 0..segs.batch() {
            for i in 0..per {
                let blk = b * per + i;
                let r = blocks.range(blk);
                for j0 in (0..r.len()).step_by(EV_THREADS as usize) {
                    tab.extend([
                        u32_of(b * hq + i * first_of),
                        u32_of(r.start),
                        u32_of(r.len()),
                        u32_of(j0),
                    ]);
                }
            }
        }
        let tab_dev = be.upload_u32(&tab)?;
        let (rn, alphas) = match (logits, &side.row_norm) {
            (false, Some(rn)) => (Arg::In(rn), side.alphas.as_ref().map_or(Arg::Null, Arg::In)),
            _ => (Arg::Null, Arg::Null),
        };
        launch(
            be,
            KernelId::DecodeAttention,
            kernels::DECODE_EVIDENCE,
            (u32_of(tab.len() / 4), 1, 1),
            EV_THREADS,
            &mut [
                Arg::In(ws),
                Arg::In(&rows),
                Arg::In(&side.bufs.idx),
                Arg::U32(plan.mode),
                rn,
                alphas,
                Arg::U32(u32_of(hq)),
                Arg::In(&tab_dev),
                Arg::U32(u32_of(nh)),
                Arg::U32(fold_mode(heads)),
                Arg::U32(u32::from(logits)),
                Arg::Out(out),
            ],
        )
    };
    if let Some((heads, buf)) = ev.probs.as_mut() {
        pass(*heads, false, &mut buf.data)?;
    }
    if let Some(buf) = ev.logits.as_deref_mut() {
        pass(Heads::PerHead, true, &mut buf.data)?;
    }
    Ok(())
}

/// Offset of the first block over segment `(b, g)` in an evidence layout of `heads`.
fn first_block(heads: Heads, blocks: &Ragged, b: usize, g: usize, hq: usize, hkv: usize) -> usize {
    let group = hq / hkv;
    match heads {
        Heads::PerHead => blocks.range(b * hq + g * group).start,
        _ => blocks.range(b * hkv + g).start,
    }
}

/// Prefill `col_sums` and `window`: one key pass with the row statistics of the attention
/// (`side` is `None` when the chunk has no query: the outputs are then zeros, still written).
pub(crate) fn prefill<T: Element>(
    be: &CudaBackend,
    meta: &PrefillMeta<'_>,
    plan: &Plan<'_>,
    side: Option<&Side>,
    q: &CudaBuffer<T>,
    k: &CudaBuffer<T>,
    ev: &mut PrefillEvidence<'_, CudaBackend>,
) -> Result<()> {
    const OP: &str = "prefill_attention";
    if ev.is_empty() {
        return Ok(());
    }
    let (geom, segs, q_rows) = (&meta.geom, meta.segs, meta.q_rows);
    let (hq, hkv, g, d) = (
        geom.num_q_heads(),
        geom.num_kv_heads(),
        geom.group(),
        geom.head_dim(),
    );
    let (vec, lanes) = variant(d, T::DTYPE, OP)?;
    let batch = segs.batch();
    let col = match &ev.col_sums {
        Some((heads, _)) => Some((
            *heads,
            evidence_blocks(geom, segs, *heads, &vec![1; batch])?,
        )),
        None => None,
    };
    let win: Option<(Window, Ragged)> = match &ev.window {
        Some((w, _)) => {
            let rows: Vec<usize> = q_rows.lens().map(|n| w.rows_for(n)).collect();
            Some((*w, evidence_blocks(geom, segs, w.heads, &rows)?))
        }
        None => None,
    };
    let mut seg = Vec::new();
    for b in 0..batch {
        for kv in 0..hkv {
            let s = segs.index(b, kv);
            let len = segs.len_of(s);
            let col_off = col
                .as_ref()
                .map_or(0, |(h, r)| first_block(*h, r, b, kv, hq, hkv));
            let win_off = win
                .as_ref()
                .map_or(0, |(w, r)| first_block(w.heads, r, b, kv, hq, hkv));
            for j0 in (0..len).step_by(PF_KEYS) {
                seg.extend([
                    u32_of(segs.offset(s)),
                    u32_of(len),
                    u32_of(j0),
                    u32_of(q_rows.range(b).start),
                    u32_of(q_rows.len_of(b)),
                    u32_of(kv * g),
                    u32_of(col_off),
                    u32_of(win_off),
                ]);
            }
        }
    }
    // Per output row: visible keys (causal prefix) and mask word start.
    let (vis, mbase) = (plan.per_out(hq, 1), plan.per_out(hq, 2));
    let rows: Vec<u32> = vis.iter().zip(&mbase).flat_map(|(&n, &m)| [n, m]).collect();
    let (seg_dev, rows_dev) = (be.upload_u32(&seg)?, be.upload_u32(&rows)?);
    let mask_dev;
    let mask = match side {
        Some(s) => &s.bufs.mask,
        None => {
            mask_dev = be.scratch(16)?;
            &mask_dev
        }
    };
    let flags = u32::from(col.is_some())
        | (u32::from(win.is_some()) << 1)
        | (u32::from(win.as_ref().is_some_and(|w| w.0.rows)) << 2);
    let table = if vec {
        &kernels::PREFILL_EV_VEC
    } else {
        &kernels::PREFILL_EV_SCALAR
    };
    let rn = side.and_then(|s| s.row_norm.as_ref());
    let alphas = side.and_then(|s| s.alphas.as_ref());
    let col_out = ev.col_sums.as_mut().map(|(_, b)| &mut b.data);
    let win_out = ev.window.as_mut().map(|(_, b)| &mut b.data);
    launch(
        be,
        KernelId::PrefillAttention,
        entry(table, T::DTYPE),
        (u32_of(seg.len() / 8), 1, 1),
        PF_THREADS,
        &mut [
            Arg::In(&q.data),
            Arg::In(&k.data),
            Arg::In(&seg_dev),
            Arg::In(&rows_dev),
            Arg::In(mask),
            Arg::U32(u32::from(meta.mask.is_some())),
            Arg::opt_in(rn),
            Arg::opt_in(alphas),
            Arg::U32(u32_of(hq)),
            Arg::U32(u32_of(g)),
            Arg::U32(u32_of(d)),
            Arg::U32(lanes),
            Arg::F32(meta.scale),
            Arg::U32(u32_of(PF_KEYS)),
            Arg::U32(flags),
            Arg::U32(col.as_ref().map_or(0, |c| fold_mode(c.0))),
            Arg::U32(win.as_ref().map_or(0, |w| fold_mode(w.0.heads))),
            Arg::U32(u32_of(win.as_ref().map_or(1, |w| w.0.queries))),
            Arg::opt_out(col_out),
            Arg::opt_out(win_out),
        ],
    )
}
