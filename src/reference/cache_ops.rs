use crate::backend::{CacheOps, CompactMeta, GatherMeta, MergeMeta, ScatterMeta};
use crate::dtype::Element;
use crate::error::Result;

use super::Reference;

impl CacheOps for Reference {
    fn gather_rows<T: Element>(
        &self,
        meta: &GatherMeta,
        src: &Vec<T>,
        dst: &mut Vec<T>,
    ) -> Result<()> {
        let w = meta.width;
        for (i, &s) in meta.indices.iter().enumerate() {
            let s = s as usize;
            dst[i * w..(i + 1) * w].copy_from_slice(&src[s * w..(s + 1) * w]);
        }
        Ok(())
    }

    fn compact_rows<T: Element>(&self, meta: &CompactMeta, buf: &mut Vec<T>) -> Result<()> {
        let w = meta.width;
        for &(dst, src) in &meta.moves {
            let (dst, src) = (dst as usize, src as usize);
            buf.copy_within(src * w..(src + 1) * w, dst * w);
        }
        Ok(())
    }

    fn merge_rows<T: Element>(
        &self,
        meta: &MergeMeta,
        src: &Vec<T>,
        dst: &mut Vec<T>,
    ) -> Result<()> {
        let w = meta.width;
        for g in 0..meta.groups.num_segments() {
            let mut acc = vec![0.0f64; w];
            for m in meta.groups.range(g) {
                let (row, wt) = (meta.members[m] as usize, f64::from(meta.weights[m]));
                for (a, x) in acc.iter_mut().zip(&src[row * w..(row + 1) * w]) {
                    *a += wt * x.to_f64();
                }
            }
            for (o, a) in dst[g * w..(g + 1) * w].iter_mut().zip(acc) {
                *o = T::from_f64(a);
            }
        }
        Ok(())
    }

    fn scatter_rows<T: Element>(
        &self,
        meta: &ScatterMeta,
        src: &Vec<T>,
        dst: &mut Vec<T>,
    ) -> Result<()> {
        let w = meta.width;
        for (i, &r) in meta.indices.iter().enumerate() {
            let r = r as usize;
            dst[r * w..(r + 1) * w].copy_from_slice(&src[i * w..(i + 1) * w]);
        }
        Ok(())
    }
}
