use crate::backend::{AttnOps, DecodeMeta, PrefillMeta, Restrict};
use crate::dtype::Element;
use crate::error::Result;

use super::{Reference, dot, normalize};

/// `Σ_j w_j v_j` over `tokens` (rows relative to `off`), written to `out`.
fn weighted_sum<T: Element>(
    v: &[T],
    d: usize,
    off: usize,
    tokens: &[usize],
    w: &[f64],
    out: &mut [T],
) {
    let mut acc = vec![0.0f64; d];
    for (&j, &wj) in tokens.iter().zip(w) {
        if wj != 0.0 {
            for (a, x) in acc.iter_mut().zip(&v[(off + j) * d..][..d]) {
                *a += wj * x.to_f64();
            }
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = T::from_f64(a);
    }
}

/// One query row against `tokens` of a segment: logits, normaliser, `P·V`.
#[allow(clippy::too_many_arguments)]
fn attend<T: Element>(
    qv: &[T],
    k: &[T],
    v: &[T],
    d: usize,
    off: usize,
    tokens: &[usize],
    scale: f64,
    alpha: Option<f32>,
    out: &mut [T],
) {
    let z: Vec<f64> = tokens
        .iter()
        .map(|&j| scale * dot(qv, &k[(off + j) * d..][..d]))
        .collect();
    let w = normalize(&z, alpha);
    weighted_sum(v, d, off, tokens, &w, out);
}

impl AttnOps for Reference {
    fn decode_attention<T: Element>(
        &self,
        meta: &DecodeMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
    ) -> Result<()> {
        let (geom, segs) = (&meta.geom, meta.segs);
        let (hq, d) = (geom.num_q_heads(), geom.head_dim());
        for b in 0..segs.batch() {
            for h in 0..hq {
                let s = segs.index(b, geom.kv_head(h));
                let (off, len) = (segs.offset(s), segs.len_of(s));
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
                let row = (b * hq + h) * d;
                attend(
                    &q[row..row + d],
                    k,
                    v,
                    d,
                    off,
                    &tokens,
                    f64::from(meta.scale),
                    meta.normalizer.alpha(h),
                    &mut out[row..row + d],
                );
            }
        }
        Ok(())
    }

    fn prefill_attention<T: Element>(
        &self,
        meta: &PrefillMeta<'_>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        out: &mut Vec<T>,
    ) -> Result<()> {
        let (geom, segs) = (&meta.geom, meta.segs);
        let (hq, d) = (geom.num_q_heads(), geom.head_dim());
        for b in 0..segs.batch() {
            let nq = meta.q_rows.len_of(b);
            for h in 0..hq {
                let s = segs.index(b, geom.kv_head(h));
                let (off, len) = (segs.offset(s), segs.len_of(s));
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
                    attend(
                        &q[row..row + d],
                        k,
                        v,
                        d,
                        off,
                        &tokens,
                        f64::from(meta.scale),
                        meta.normalizer.alpha(h),
                        &mut out[row..row + d],
                    );
                }
            }
        }
        Ok(())
    }
}
