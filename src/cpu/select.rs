//! Selection: per-row top-k and threshold counts.
//!
//! Top-k uses a partial selection (`select_nth_unstable_by`, expected
//! O(n)) under the total order "larger value first, NaN below `-inf` below
//! every finite value, ties to the lower index", then sorts the `k` kept
//! positions. Because the order is total (the index breaks every tie) the
//! kept set is exactly the reference's. Rows run in parallel.
#![forbid(unsafe_code)]

use std::cmp::Ordering;

use rayon::prelude::*;

use super::Cpu;
use super::simd;
use crate::backend::{RowsMeta, SelectOps, TopkMeta};
use crate::error::Result;
use crate::layout::{IndexList, IndexSet};

/// `Less` when position `a` ranks before (is kept before) position `b`.
fn rank_order(row: &[f32], a: u32, b: u32) -> Ordering {
    let (x, y) = (row[a as usize], row[b as usize]);
    let key = |v: f32| if v.is_nan() { (0u8, 0.0f32) } else { (1u8, v) };
    let ((cx, vx), (cy, vy)) = (key(x), key(y));
    cy.cmp(&cx)
        .then(vy.partial_cmp(&vx).unwrap_or(Ordering::Equal))
        .then(a.cmp(&b))
}

/// Positions of the `min(k, len)` top entries of `row`, sorted ascending.
pub(crate) fn topk(row: &[f32], k: usize) -> Vec<u32> {
    let n = row.len();
    let mut idx: Vec<u32> = (0..n as u32).collect();
    if k < n {
        idx.select_nth_unstable_by(k, |&a, &b| rank_order(row, a, b));
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

impl SelectOps for Cpu {
    fn topk_rows(&self, meta: &TopkMeta, x: &Vec<f32>) -> Result<IndexList> {
        let rows = &meta.rows;
        let sets: Vec<IndexSet> = self.install(|| {
            (0..rows.num_segments())
                .into_par_iter()
                .map(|r| IndexSet::from_unsorted(topk(&x[rows.range(r)], meta.k)))
                .collect()
        });
        IndexList::from_sets(meta.scope, &sets)
    }

    fn count_above(&self, meta: &RowsMeta, x: &Vec<f32>, threshold: f32) -> Result<Vec<u32>> {
        let isa = self.isa;
        let rows = &meta.rows;
        Ok(self.install(|| {
            (0..rows.num_segments())
                .into_par_iter()
                .map(|r| simd::count_above(isa, &x[rows.range(r)], threshold) as u32)
                .collect()
        }))
    }
}
