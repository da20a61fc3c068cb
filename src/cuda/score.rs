//! Scoring on the GPU: Q·K logits (`qk_logits.cu`, through the attention work units) and
//! `value_distances` (`value_distances.cu`, one block per KV segment and chunk of up to 8
//! of the blocks over it).

use super::attn::{logits, prefill_plan};
use super::device::CudaBackend;
use super::kernels::{self, KernelId, entry};
use super::launch::{Arg, launch};
use super::{CudaBuffer, u32_of};
use crate::backend::{DistMeta, Heads, QkMeta, ScoreOps};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// Threads per `value_distances` block (`VD_THREADS`).
const VD_THREADS: u32 = 256;
/// Blocks (query heads) served by one `value_distances` CTA (`VD_HEADS`).
const VD_HEADS: usize = 8;

impl ScoreOps for CudaBackend {
    fn value_distances<T: Element>(
        &self,
        meta: &DistMeta,
        weights: &CudaBuffer<f32>,
        v: &CudaBuffer<T>,
        out: &mut CudaBuffer<f32>,
        centers: Option<&mut CudaBuffer<f32>>,
    ) -> Result<()> {
        let (geom, segs) = (meta.geom(), meta.segments());
        let (hq, hkv, g, d) = (
            geom.num_q_heads(),
            geom.num_kv_heads(),
            geom.group(),
            geom.head_dim(),
        );
        if d > 256 {
            return Err(Error::Unsupported {
                backend: "cuda",
                op: "value_distances",
                dtype: T::DTYPE,
            });
        }
        // Blocks over one segment: the group's query heads (per head), else one.
        let nh = if meta.heads() == Heads::PerHead { g } else { 1 };
        let mut seg = Vec::with_capacity(segs.batch() * hkv * 4);
        for b in 0..segs.batch() {
            for kv in 0..hkv {
                let s = segs.index(b, kv);
                let blk0 = match meta.heads() {
                    Heads::PerHead => b * hq + kv * g,
                    _ => b * hkv + kv,
                };
                seg.extend([
                    u32_of(segs.offset(s)),
                    u32_of(segs.len_of(s)),
                    u32_of(blk0),
                    u32_of(meta.blocks().range(blk0).start),
                ]);
            }
        }
        let seg_dev = self.upload_u32(&seg)?;
        let lanes = d.div_ceil(8).next_power_of_two().max(4);
        launch(
            self,
            KernelId::ValueDistances,
            entry(&kernels::VALUE_DISTANCES, T::DTYPE),
            (u32_of(seg.len() / 4), u32_of(nh.div_ceil(VD_HEADS)), 1),
            VD_THREADS,
            &mut [
                Arg::In(&v.data),
                Arg::In(&weights.data),
                Arg::In(&seg_dev),
                Arg::U32(u32_of(nh)),
                Arg::U32(u32::from(meta.fast())),
                Arg::U32(u32_of(d)),
                Arg::U32(u32_of(lanes)),
                Arg::Out(&mut out.data),
                centers.map_or(Arg::Null, |c| Arg::Out(&mut c.data)),
            ],
        )
    }

    fn qk_logits<T: Element>(
        &self,
        meta: &QkMeta,
        q: &CudaBuffer<T>,
        k: &CudaBuffer<T>,
        out: &mut CudaBuffer<f32>,
    ) -> Result<()> {
        let (geom, segs) = (&meta.geom, &meta.segs);
        let hq = geom.num_q_heads();
        let plan = prefill_plan(geom, &meta.q_rows, segs, meta.causal, None);
        let n_out = meta.q_rows.total() * hq;
        let (mut o_base, mut o_cols) = (vec![0u32; n_out], vec![0u32; n_out]);
        for b in 0..segs.batch() {
            for i in 0..meta.q_rows.len_of(b) {
                let row = meta.q_rows.range(b).start + i;
                for h in 0..hq {
                    let kv = segs.len_of(segs.index(b, geom.kv_head(h)));
                    let block = meta.blocks.range(b * hq + h).start;
                    o_base[row * hq + h] = (block + i * kv) as u32;
                    o_cols[row * hq + h] = kv as u32;
                }
            }
        }
        logits::<T>(
            self,
            &plan,
            geom,
            meta.scale,
            &q.data,
            &k.data,
            &mut out.data,
            &o_base,
            &o_cols,
            "qk_logits",
        )
    }
}
