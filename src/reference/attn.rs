use crate::backend::evidence::reduce_heads_into;
use crate::backend::{
    AttnOps, DecodeEvidence, DecodeMeta, Heads, PagedDecodeMeta, PrefillEvidence, PrefillMeta,
    Restrict, evidence_blocks,
};
use crate::dtype::Element;
use crate::error::Result;

use super::{Reference, dot, normalize};

/// `Σ_j w_j v_j` over `tokens` (row of token `j`: `row(j)`), written to
/// `out`.
fn weighted_sum<T: Element>(
    v: &[T],
    d: usize,
    row: &dyn Fn(usize) -> usize,
    tokens: &[usize],
    w: &[f64],
    out: &mut [T],
) {
    let mut acc = vec![0.0f64; d];
    for (&j, &wj) in tokens.iter().zip(w) {
        if wj != 0.0 {
            for (a, x) in acc.iter_mut().zip(&v[row(j) * d..][..d]) {
                *a += wj * x.to_f64();
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = T::from_f64(a);
    }
}

/// One query row against `tokens` of a segment (row of token `j`:
/// `row(j)`): logits, normaliser, `P·V`. Returns the logits and weights
/// (over `tokens`).
#[allow(clippy::too_many_arguments)]
fn attend<T: Element>(
    qv: &[T],
    k: &[T],
    v: &[T],
    d: usize,
    row: &dyn Fn(usize) -> usize,
    tokens: &[usize],
    scale: f64,
    alpha: Option<f32>,
    out: &mut [T],
) -> (Vec<f64>, Vec<f64>) {
    let z: Vec<f64> = tokens
        .iter()
        .map(|&j| scale * dot(qv, &k[row(j) * d..][..d]))
        .collect();
    let w = normalize(&z, alpha);
    weighted_sum(v, d, row, tokens, &w, out);
    (z, w)
}

/// A segment-long row holding `vals[i]` at `tokens[i]` and `fill` elsewhere.
fn scatter_row(len: usize, tokens: &[usize], vals: &[f64], fill: f64) -> Vec<f64> {
    let mut r = vec![fill; len];
    for (&j, &x) in tokens.iter().zip(vals) {
        r[j] = x;
    }
    r
}

/// The normaliser statistic of one row: softmax `ln Σ e^z` (`-inf` when
/// empty), entmax τ such that `p_j = [(α−1) z_j − τ]_+^{1/(α−1)}`.
fn row_stat(z: &[f64], w: &[f64], alpha: Option<f32>) -> f64 {
    let Some(top) = (0..z.len()).max_by(|&a, &b| z[a].total_cmp(&z[b]).then(b.cmp(&a))) else {
        return f64::NEG_INFINITY;
    };
    match alpha {
        None => {
            let m = z[top];
            m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln()
        }
        Some(a) => {
            let am1 = f64::from(a) - 1.0;
            am1 * z[top] - w[top].powf(am1)
        }
    }
}

/// Writes the blocks of one sequence (`per_head[h]`: rows of query head `h`,
/// each `rows × len`) into `dst` at the sequence's first block.
fn put_blocks(
    geom: &crate::layout::HeadGeometry,
    heads: Heads,
    blocks: &crate::layout::Ragged,
    b: usize,
    per_head: &[Vec<f64>],
    dst: &mut [f32],
) {
    let first = b * heads.blocks_per_seq(geom);
    let start = blocks.range(first).start;
    let end = blocks.range(first + heads.blocks_per_seq(geom) - 1).end;
    reduce_heads_into(geom, heads, per_head, &mut dst[start..end]);
}

/// Decode over the segments of `meta`, token `j` of segment `s` read from
/// row `row_of(s, j)` of `k` and `v` (the contiguous op and the paged op
/// differ only there).
#[allow(clippy::too_many_arguments)]
fn decode<T: Element>(
    meta: &DecodeMeta<'_>,
    row_of: &dyn Fn(usize, usize) -> usize,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &mut [T],
    ev: &mut DecodeEvidence<'_, Reference>,
) -> Result<()> {
    let (geom, segs) = (&meta.geom, meta.segs);
    let (hq, d) = (geom.num_q_heads(), geom.head_dim());
    let ones = vec![1; segs.batch()];
    let probs_blocks = match &ev.probs {
        Some((heads, _)) => Some(evidence_blocks(geom, segs, *heads, &ones)?),
        None => None,
    };
    let logit_blocks = evidence_blocks(geom, segs, Heads::PerHead, &ones)?;
    for b in 0..segs.batch() {
        let mut probs = Vec::with_capacity(hq);
        let mut logits = Vec::with_capacity(hq);
        for h in 0..hq {
            let s = segs.index(b, geom.kv_head(h));
            let len = segs.len_of(s);
            let row = |j: usize| row_of(s, j);
            let tokens: Vec<usize> = match meta.restrict {
                Restrict::Dense => (0..len).collect(),
                Restrict::Indices(list) => list
                    .list(list.scope().list_of(b, h, geom))
                    .iter()
                    .map(|&j| j as usize)
                    .collect(),
                Restrict::Mask(mask) => {
                    let m = mask.scope().list_of(b, h, geom);
                    (0..len).filter(|&j| mask.get(m, 0, j)).collect()
                }
            };
            let qr = (b * hq + h) * d;
            let alpha = meta.normalizer.alpha(h);
            let (z, w) = attend(
                &q[qr..qr + d],
                k,
                v,
                d,
                &row,
                &tokens,
                f64::from(meta.scale),
                alpha,
                &mut out[qr..qr + d],
            );
            if let Some(st) = ev.stats.as_deref_mut() {
                st[b * hq + h] = row_stat(&z, &w, alpha) as f32;
            }
            if let Some(o) = ev.output.as_deref_mut() {
                let mut acc = vec![0.0f64; d];
                for (&j, &wj) in tokens.iter().zip(&w) {
                    for (a, x) in acc.iter_mut().zip(&v[row(j) * d..][..d]) {
                        *a += wj * x.to_f64();
                    }
                }
                for (dst, a) in o[qr..qr + d].iter_mut().zip(acc) {
                    *dst = a as f32;
                }
            }
            probs.push(scatter_row(len, &tokens, &w, 0.0));
            logits.push(scatter_row(len, &tokens, &z, f64::NEG_INFINITY));
        }
        if let (Some((heads, buf)), Some(blocks)) = (ev.probs.as_mut(), &probs_blocks) {
            put_blocks(geom, *heads, blocks, b, &probs, buf);
        }
        if let Some(buf) = ev.logits.as_deref_mut() {
            put_blocks(geom, Heads::PerHead, &logit_blocks, b, &logits, buf);
        }
    }
    Ok(())
}

impl AttnOps for Reference {
    fn decode_attention<T: Element>(
        &self,
        meta: &DecodeMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
        ev: &mut DecodeEvidence<'_, Self>,
    ) -> Result<()> {
        let segs = meta.segs;
        decode(meta, &|s, j| segs.offset(s) + j, q, k, v, out, ev)
    }

    /// The specification of the paged op: the contiguous decode with every
    /// row looked up through [`crate::paged::PageTable::row`].
    fn decode_attention_paged<T: Element>(
        &self,
        meta: &PagedDecodeMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
        ev: &mut DecodeEvidence<'_, Self>,
    ) -> Result<()> {
        let pages = meta.pages;
        decode(&meta.decode, &|s, j| pages.row(s, j), q, k, v, out, ev)
    }

    fn prefill_attention<T: Element>(
        &self,
        meta: &PrefillMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
        ev: &mut PrefillEvidence<'_, Self>,
    ) -> Result<()> {
        let (geom, segs) = (&meta.geom, meta.segs);
        let (hq, d) = (geom.num_q_heads(), geom.head_dim());
        let ones = vec![1; segs.batch()];
        let col_blocks = match &ev.col_sums {
            Some((heads, _)) => Some(evidence_blocks(geom, segs, *heads, &ones)?),
            None => None,
        };
        let win_blocks = match &ev.window {
            Some((w, _)) => {
                let rows: Vec<usize> = meta.q_rows.lens().map(|n| w.rows_for(n)).collect();
                Some(evidence_blocks(geom, segs, w.heads, &rows)?)
            }
            None => None,
        };
        for b in 0..segs.batch() {
            let nq = meta.q_rows.len_of(b);
            let mut cols = Vec::with_capacity(hq);
            let mut wins = Vec::with_capacity(hq);
            for h in 0..hq {
                let s = segs.index(b, geom.kv_head(h));
                let (off, len) = (segs.offset(s), segs.len_of(s));
                let kv_row = |j: usize| off + j;
                let mut col = vec![0.0; len];
                let mut win = Vec::new();
                for i in 0..nq {
                    let pos = (len + i).checked_sub(nq);
                    let tokens: Vec<usize> = (0..len)
                        .filter(|&j| !meta.causal || pos.is_some_and(|p| j <= p))
                        .filter(|&j| {
                            meta.mask
                                .is_none_or(|m| m.get(m.scope().list_of(b, h, geom), i, j))
                        })
                        .collect();
                    let row = ((meta.q_rows.range(b).start + i) * hq + h) * d;
                    let (_, w) = attend(
                        &q[row..row + d],
                        k,
                        v,
                        d,
                        &kv_row,
                        &tokens,
                        f64::from(meta.scale),
                        meta.normalizer.alpha(h),
                        &mut out[row..row + d],
                    );
                    for (&j, &x) in tokens.iter().zip(&w) {
                        col[j] += x;
                    }
                    if let Some((wd, _)) = &ev.window
                        && wd.queries >= nq - i
                    {
                        let r = scatter_row(len, &tokens, &w, 0.0);
                        if wd.rows || win.is_empty() {
                            win.extend(r);
                        } else {
                            for (a, x) in win.iter_mut().zip(r) {
                                *a += x;
                            }
                        }
                    }
                }
                if let Some((wd, _)) = &ev.window
                    && win.is_empty()
                {
                    win = vec![0.0; wd.rows_for(nq) * len];
                }
                cols.push(col);
                wins.push(win);
            }
            if let (Some((heads, buf)), Some(blocks)) = (ev.col_sums.as_mut(), &col_blocks) {
                put_blocks(geom, *heads, blocks, b, &cols, buf);
            }
            if let (Some((wd, buf)), Some(blocks)) = (ev.window.as_mut(), &win_blocks) {
                put_blocks(geom, wd.heads, blocks, b, &wins, buf);
            }
        }
        Ok(())
    }
}
