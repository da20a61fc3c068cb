//! `entmax_prefill`: one workgroup per (query row, head) with the τ search of
//! `common_norm.wgsl`; live key blocks are flagged on the device and the tile
//! statistics are reduced on the host.

use crate::backend::{BlockStats, EntmaxOps, EntmaxPrefillMeta};
use crate::dtype::Element;
use crate::error::Result;

use super::attn::{DENSE, Item, plan};
use super::device::{Rec, padded_bytes, u32c};
use super::shaders::ShaderId;
use super::{Wgpu, WgpuBuffer, alpha_mode, gaps, out_target, pack_into};

/// Visible key bound of query `i` of `nq` against `nk` keys.
fn limit(causal: bool, nq: usize, nk: usize, i: usize) -> usize {
    if causal {
        (nk + i + 1).saturating_sub(nq)
    } else {
        nk
    }
}

impl EntmaxOps for Wgpu {
    fn entmax_prefill<T: Element>(
        &self,
        meta: &EntmaxPrefillMeta<'_>,
        q: &WgpuBuffer<T>,
        k: &WgpuBuffer<T>,
        v: &WgpuBuffer<T>,
        out: &mut WgpuBuffer<T>,
        tau: &mut WgpuBuffer<f32>,
    ) -> Result<BlockStats> {
        const OP: &str = "entmax_prefill";
        let (geom, segs, q_rows) = (meta.geom(), meta.segments(), meta.q_rows());
        let (hq, d) = (geom.num_q_heads(), geom.head_dim());
        let (bq, bk) = (meta.block_q(), meta.block_k());
        let max_tk = segs
            .lens()
            .iter()
            .map(|&l| (l as usize).div_ceil(bk))
            .max()
            .unwrap_or(0);
        let live_words = max_tk.div_ceil(32).max(1);
        let total_rows = q_rows.total();
        // Item index = row * Hq + head, so τ lands at its place directly.
        let mut items = Vec::with_capacity(total_rows * hq);
        for b in 0..segs.batch() {
            let nq = q_rows.len_of(b);
            for i in 0..nq {
                let row = q_rows.range(b).start + i;
                for h in 0..hq {
                    let s = segs.index(b, geom.kv_head(h));
                    let len = segs.len_of(s);
                    items.push(Item {
                        q_off: (row * hq + h) * d,
                        kv_row0: segs.offset(s),
                        n_cand: len,
                        aux: 0,
                        out_off: (row * hq + h) * d,
                        alpha: meta.alphas()[h],
                        limit: limit(meta.causal(), nq, len, i),
                    });
                }
            }
        }
        let plan = plan(
            OP,
            d,
            meta.scale(),
            [u32c(OP, bk)?, u32c(OP, live_words)?],
            &items,
            &[],
        )?;
        let constants = [
            ("RESTRICT", DENSE),
            ("NORM", 1),
            ("ALPHA_MODE", alpha_mode(meta.alphas())),
        ];
        let live_len = items.len() * live_words;
        let mut rec = Rec::new(&self.ctx, OP);
        let m = rec.words(&plan.words);
        let lg = rec.scratch(padded_bytes(plan.lg_len, 4));
        let live = rec.zeroed(padded_bytes(live_len, 4));
        let target = out_target(&mut rec, out);
        let variant = self.ctx.variant(T::DTYPE);
        rec.dispatch(
            ShaderId::EntmaxPrefill,
            variant,
            &constants,
            &[&m, &q.raw, &k.raw, &v.raw, &lg, &target, &tau.raw, &live],
            plan.items,
        )?;
        pack_into(&mut rec, &target, out)?;
        let staging = rec.readback(&live, (live_len * 4) as u64);
        rec.submit()?;
        let live: Vec<u32> =
            bytemuck::pod_collect_to_vec(&self.ctx.map_read(&staging, (live_len * 4) as u64)?);

        // Tile statistics: visibility from the geometry, liveness from the bits.
        let mut stats = BlockStats::default();
        for b in 0..segs.batch() {
            let nq = q_rows.len_of(b);
            let row0 = q_rows.range(b).start;
            for h in 0..hq {
                let nk = segs.len_of(segs.index(b, geom.kv_head(h)));
                for qb in 0..nq.div_ceil(bq) {
                    let rows = qb * bq..((qb + 1) * bq).min(nq);
                    let last = rows.end - 1;
                    for kb in 0..nk.div_ceil(bk) {
                        if kb * bk < limit(meta.causal(), nq, nk, last) {
                            stats.visible_tiles += 1;
                        }
                        let is_live = rows.clone().any(|i| {
                            let item = (row0 + i) * hq + h;
                            (live[item * live_words + kb / 32] >> (kb % 32)) & 1 == 1
                        });
                        stats.live_tiles += usize::from(is_live);
                    }
                }
            }
        }
        Ok(stats)
    }

    fn entmax_prefill_backward<T: Element>(
        &self,
        meta: &EntmaxPrefillMeta<'_>,
        q: &WgpuBuffer<T>,
        k: &WgpuBuffer<T>,
        v: &WgpuBuffer<T>,
        tau: &WgpuBuffer<f32>,
        d_out: &WgpuBuffer<T>,
        dq: &mut WgpuBuffer<f32>,
        dk: &mut WgpuBuffer<f32>,
        dv: &mut WgpuBuffer<f32>,
        dalpha: &mut WgpuBuffer<f32>,
    ) -> Result<()> {
        const OP: &str = "entmax_prefill_backward";
        if gaps::is_gap(OP, T::DTYPE) {
            return Err(gaps::unsupported(OP, T::DTYPE));
        }
        let (geom, segs, q_rows) = (meta.geom(), meta.segments(), meta.q_rows());
        let (hq, d, group) = (geom.num_q_heads(), geom.head_dim(), geom.group());
        let total_rows = q_rows.total();
        let n_items = total_rows * hq;

        // Row pass: items in (row, head) order, like the forward.
        let mut rows_tab = Vec::with_capacity(8 * n_items);
        let mut lg_total = 0usize;
        for b in 0..segs.batch() {
            let nq = q_rows.len_of(b);
            for i in 0..nq {
                let row = q_rows.range(b).start + i;
                for h in 0..hq {
                    let s = segs.index(b, geom.kv_head(h));
                    let len = segs.len_of(s);
                    rows_tab.extend([
                        u32c(OP, (row * hq + h) * d)?,
                        u32c(OP, segs.offset(s))?,
                        u32c(OP, len)?,
                        0,
                        u32c(OP, (row * hq + h) * d)?,
                        u32c(OP, lg_total)?,
                        meta.alphas()[h].to_bits(),
                        u32c(OP, limit(meta.causal(), nq, len, i))?,
                    ]);
                    lg_total += len;
                }
            }
        }
        // Key pass: one item per cached key of every segment.
        let mut keys_tab = Vec::new();
        let mut coef = 0usize;
        for b in 0..segs.batch() {
            let nq = q_rows.len_of(b);
            for g in 0..geom.num_kv_heads() {
                let s = segs.index(b, g);
                let len = segs.len_of(s);
                for j in 0..len {
                    keys_tab.extend([
                        u32c(OP, segs.offset(s) + j)?,
                        u32c(OP, j)?,
                        u32c(OP, len)?,
                        u32c(OP, q_rows.range(b).start)?,
                        u32c(OP, nq)?,
                        u32c(OP, g)?,
                        0,
                        0,
                    ]);
                    coef += 2 * group * nq;
                }
            }
        }
        let n_keys = keys_tab.len() / 8;
        let delta_off = 3 * lg_total;
        let coef_base = delta_off + n_items;
        let mut c = coef_base;
        for it in keys_tab.chunks_mut(8) {
            it[6] = u32c(OP, c)?;
            c += 2 * group * it[4] as usize;
        }
        let work_len = (coef_base + coef).max(1);
        let qn = total_rows * hq * d;
        let kn = dk.len;
        let drow_off = qn;
        let alpha_off = 16 + 8 * n_keys.max(n_items);
        let header = |items: usize| -> Result<Vec<u32>> {
            let mut h = vec![0u32; 16];
            h[0] = u32c(OP, items)?;
            h[1] = u32c(OP, d)?;
            h[2] = meta.scale().to_bits();
            h[3] = u32c(OP, lg_total)?;
            h[4] = u32c(OP, delta_off)?;
            h[5] = u32c(OP, drow_off)?;
            h[6] = u32c(OP, hq)?;
            h[7] = u32c(OP, group)?;
            h[8] = u32::from(meta.causal());
            h[9] = u32c(OP, alpha_off)?;
            h[10] = u32c(OP, kn)?;
            Ok(h)
        };
        let mut rows_words = header(n_items)?;
        rows_words.extend(rows_tab);
        let mut keys_words = header(n_keys)?;
        keys_words.extend(keys_tab);
        keys_words.resize(alpha_off, 0);
        keys_words.extend(meta.alphas().iter().map(|a| a.to_bits()));
        u32c(OP, work_len)?;

        let variant = self.ctx.variant(T::DTYPE);
        let mut rec = Rec::new(&self.ctx, OP);
        let rows_meta = rec.words(&rows_words);
        let keys_meta = rec.words(&keys_words);
        let work = rec.scratch(padded_bytes(work_len, 4));
        let grad_q = rec.scratch(padded_bytes(qn + n_items, 4));
        let grad_kv = rec.zeroed(padded_bytes(2 * kn, 4));
        let bind = |m: &wgpu::Buffer, out: &wgpu::Buffer| -> [wgpu::Buffer; 8] {
            [
                m.clone(),
                q.raw.clone(),
                k.raw.clone(),
                v.raw.clone(),
                d_out.raw.clone(),
                tau.raw.clone(),
                work.clone(),
                out.clone(),
            ]
        };
        let rows_b = bind(&rows_meta, &grad_q);
        rec.dispatch_entry(
            ShaderId::EntmaxPrefillBackward,
            "entmax_prefill_backward_rows",
            variant,
            &[],
            &rows_b.each_ref(),
            u32c(OP, n_items)?,
        )?;
        let keys_b = bind(&keys_meta, &grad_kv);
        rec.dispatch_entry(
            ShaderId::EntmaxPrefillBackward,
            "entmax_prefill_backward_keys",
            variant,
            &[],
            &keys_b.each_ref(),
            u32c(OP, n_keys)?,
        )?;
        if qn > 0 {
            rec.copy_range(&grad_q, 0, &dq.raw, (qn * 4) as u64);
        }
        if kn > 0 {
            rec.copy_range(&grad_kv, 0, &dk.raw, (kn * 4) as u64);
            rec.copy_range(&grad_kv, (kn * 4) as u64, &dv.raw, (kn * 4) as u64);
        }
        let staging = rec.readback_range(&grad_q, (drow_off * 4) as u64, (n_items * 4) as u64);
        rec.submit()?;
        // dα: per-row terms summed per head on the host (f64, fixed order).
        let rows: Vec<f32> =
            bytemuck::pod_collect_to_vec(&self.ctx.map_read(&staging, (n_items * 4) as u64)?);
        let mut da = vec![0.0f64; hq];
        for (i, x) in rows.iter().enumerate() {
            da[i % hq] += f64::from(*x);
        }
        let da: Vec<f32> = da.into_iter().map(|x| x as f32).collect();
        self.ctx
            .queue
            .write_buffer(&dalpha.raw, 0, bytemuck::cast_slice(&da));
        Ok(())
    }
}
