//! Entmax prefill on the GPU: the entmax attention path of `attn.rs` with causal rows, the
//! thresholds returned in the scaled space, and tile statistics.
//!
//! Block skipping happens at token granularity: the output pass loads a V row only when
//! some query head of the CTA gives it a non-zero weight, so dead tiles cost no V traffic
//! (the logits pass still reads every visible K row). `live_tiles` is counted on the device
//! from the same thresholds; `visible_tiles` follows from the causal geometry.
//! The backward runs in two kernels without atomics (see `cuda/entmax_prefill.cu`): one block
//! per query row (δ, dQ, the row's ∂L/∂α) and one per key row (dK, dV, GQA heads summed);
//! ∂L/∂α is summed per head on the host.

use super::attn::{SideOut, prefill_plan, run, variant};
use super::device::CudaBackend;
use super::kernels::{self, ENTMAX_TILES, KernelId, PerDtype, entry};
use super::launch::{Arg, launch};
use super::{CudaBuffer, u32_of};
use crate::backend::{BlockStats, EntmaxOps, EntmaxPrefillMeta};
use crate::dtype::Element;
use crate::error::Result;

impl EntmaxOps for CudaBackend {
    fn entmax_prefill<T: Element>(
        &self,
        meta: &EntmaxPrefillMeta<'_>,
        q: &CudaBuffer<T>,
        k: &CudaBuffer<T>,
        v: &CudaBuffer<T>,
        out: &mut CudaBuffer<T>,
        tau: &mut CudaBuffer<f32>,
    ) -> Result<BlockStats> {
        let (geom, segs) = (&meta.geom, meta.segs);
        let hq = geom.num_q_heads();
        let plan = prefill_plan(geom, meta.q_rows, segs, meta.causal, None);
        let Some(state) = run(
            self,
            &plan,
            geom,
            meta.scale,
            Some(&meta.alphas),
            q,
            k,
            v,
            out,
            SideOut::default(),
            "entmax_prefill",
        )?
        .and_then(|side| side.state) else {
            return Ok(BlockStats::default());
        };
        let n_out = state.items.len();
        // τ in the scaled space of the unshifted logits: τ_shifted + (α − 1) · zmax.
        let pairs = self.download_f32(&state.tau, 2 * n_out)?;
        let tau_host: Vec<f32> = (0..n_out)
            .map(|o| {
                let (zmax, t) = (pairs[2 * o], pairs[2 * o + 1]);
                if state.items[o] == 0 || zmax == f32::NEG_INFINITY {
                    f32::INFINITY
                } else {
                    (f64::from(t) + f64::from(meta.alphas[o % hq] - 1.0) * f64::from(zmax)) as f32
                }
            })
            .collect();
        self.write_bytes(&mut tau.data, bytemuck::cast_slice(&tau_host))?;

        // Tiles: per (sequence, head) a tq × tk grid; visible ones from the geometry.
        let (bq, bk) = (meta.block_q, meta.block_k);
        let mut flag_base = vec![0u32; n_out];
        let mut stats = BlockStats::default();
        let mut n_flags = 0usize;
        for b in 0..segs.batch() {
            let nq = meta.q_rows.len_of(b);
            for h in 0..hq {
                let nk = segs.len_of(segs.index(b, geom.kv_head(h)));
                let (tq, tk) = (nq.div_ceil(bq), nk.div_ceil(bk));
                for qb in 0..tq {
                    let last = ((qb + 1) * bq).min(nq) - 1;
                    let visible_keys = if meta.causal {
                        (nk + last + 1).saturating_sub(nq).min(nk)
                    } else {
                        nk
                    };
                    stats.visible_tiles += visible_keys.div_ceil(bk);
                }
                for i in 0..nq {
                    let o = (meta.q_rows.range(b).start + i) * hq + h;
                    flag_base[o] = u32_of(n_flags + (i / bq) * tk);
                }
                n_flags += tq * tk;
            }
        }
        let mut flags = self.scratch(n_flags * 4)?;
        let fb = self.upload_u32(&flag_base)?;
        launch(
            self,
            KernelId::EntmaxPrefill,
            ENTMAX_TILES,
            (u32_of(n_out), 1, 1),
            256,
            &mut [
                Arg::In(&state.ws),
                Arg::In(&state.o_base),
                Arg::In(&self.upload_u32(&state.items)?),
                Arg::In(&state.tau),
                Arg::In(&state.alpha_rows),
                Arg::In(&fb),
                Arg::U32(u32_of(bk)),
                Arg::Out(&mut flags),
            ],
        )?;
        let flags = self.download_u32(&flags, n_flags)?;
        stats.live_tiles = flags.iter().filter(|&&f| f != 0).count();
        Ok(stats)
    }

    fn entmax_prefill_backward<T: Element>(
        &self,
        meta: &EntmaxPrefillMeta<'_>,
        q: &CudaBuffer<T>,
        k: &CudaBuffer<T>,
        v: &CudaBuffer<T>,
        tau: &CudaBuffer<f32>,
        d_out: &CudaBuffer<T>,
        dq: &mut CudaBuffer<f32>,
        dk: &mut CudaBuffer<f32>,
        dv: &mut CudaBuffer<f32>,
        dalpha: &mut CudaBuffer<f32>,
    ) -> Result<()> {
        const OP: &str = "entmax_prefill_backward";
        let (geom, segs) = (&meta.geom, meta.segs);
        let (hq, d, group) = (geom.num_q_heads(), geom.head_dim(), geom.group());
        let (vec, lanes) = variant(d, T::DTYPE, OP)?;
        let n_out = meta.q_rows.total() * hq;
        // Per query row o: its segment's first row and visible key count.
        let (mut o_kv, mut o_n) = (vec![0u32; n_out], vec![0u32; n_out]);
        let mut keys = Vec::new();
        for b in 0..segs.batch() {
            let (nq, q0) = (meta.q_rows.len_of(b), meta.q_rows.range(b).start);
            for h in 0..hq {
                let s = segs.index(b, geom.kv_head(h));
                let (off, len) = (segs.offset(s), segs.len_of(s));
                for i in 0..nq {
                    let n = if meta.causal {
                        (len + i + 1).saturating_sub(nq).min(len)
                    } else {
                        len
                    };
                    o_kv[(q0 + i) * hq + h] = u32_of(off);
                    o_n[(q0 + i) * hq + h] = u32_of(n);
                }
            }
            for g in 0..geom.num_kv_heads() {
                let s = segs.index(b, g);
                let (off, len) = (segs.offset(s), segs.len_of(s));
                for j in 0..len {
                    keys.extend_from_slice(&[
                        u32_of(off + j),
                        u32_of(j),
                        u32_of(len),
                        u32_of(q0),
                        u32_of(nq),
                        u32_of(g),
                    ]);
                }
            }
        }
        let (o_kv, o_n) = (self.upload_u32(&o_kv)?, self.upload_u32(&o_n)?);
        let alphas = self.upload_f32(&meta.alphas)?;
        let mut delta = self.scratch(n_out * 4)?;
        let mut dalpha_rows = self.scratch(n_out * 4)?;
        let pick =
            |v: &'static PerDtype, s: &'static PerDtype| entry(if vec { v } else { s }, T::DTYPE);
        launch(
            self,
            KernelId::EntmaxPrefill,
            pick(&kernels::BWD_ROWS_VEC, &kernels::BWD_ROWS_SCALAR),
            (u32_of(n_out), 1, 1),
            128,
            &mut [
                Arg::In(&q.data),
                Arg::In(&k.data),
                Arg::In(&v.data),
                Arg::In(&d_out.data),
                Arg::In(&o_kv),
                Arg::In(&o_n),
                Arg::In(&tau.data),
                Arg::In(&alphas),
                Arg::U32(u32_of(hq)),
                Arg::U32(u32_of(d)),
                Arg::U32(lanes),
                Arg::F32(meta.scale),
                Arg::Out(&mut dq.data),
                Arg::Out(&mut delta),
                Arg::Out(&mut dalpha_rows),
            ],
        )?;
        // dK, dV: rows outside every segment stay zero.
        self.zero(&mut dk.data)?;
        self.zero(&mut dv.data)?;
        let n_keys = keys.len() / 6;
        let keys = self.upload_u32(&keys)?;
        launch(
            self,
            KernelId::EntmaxPrefill,
            pick(&kernels::BWD_KEYS_VEC, &kernels::BWD_KEYS_SCALAR),
            (u32_of(n_keys), 1, 1),
            128,
            &mut [
                Arg::In(&q.data),
                Arg::In(&k.data),
                Arg::In(&v.data),
                Arg::In(&d_out.data),
                Arg::In(&keys),
                Arg::U32(u32::from(meta.causal)),
                Arg::In(&tau.data),
                Arg::In(&alphas),
                Arg::In(&delta),
                Arg::U32(u32_of(hq)),
                Arg::U32(u32_of(group)),
                Arg::U32(u32_of(d)),
                Arg::U32(lanes),
                Arg::F32(meta.scale),
                Arg::Out(&mut dk.data),
                Arg::Out(&mut dv.data),
            ],
        )?;
        // ∂L/∂α per head: row contributions summed on the host in f64, in row order.
        let rows = self.download_f32(&dalpha_rows, n_out)?;
        let mut per_head = vec![0.0f64; hq];
        for (o, r) in rows.iter().enumerate() {
            per_head[o % hq] += f64::from(*r);
        }
        let per_head: Vec<f32> = per_head.iter().map(|&x| x as f32).collect();
        self.write_bytes(&mut dalpha.data, bytemuck::cast_slice(&per_head))
    }
}
