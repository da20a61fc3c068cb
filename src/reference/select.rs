use std::cmp::Ordering;

use crate::backend::{RowsMeta, SelectOps, TopkMeta};
use crate::error::Result;
use crate::layout::{IndexList, IndexSet};

use super::Reference;

/// Rank key: NaN below `-inf` below every finite value.
fn rank(x: f32) -> (u8, f32) {
    if x.is_nan() { (0, 0.0) } else { (1, x) }
}

/// Top `min(k, len)` positions of `row`, larger first, ties to the lower
/// index; returned sorted ascending.
pub(crate) fn topk(row: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<usize> = (0..row.len()).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (rank(row[a]), rank(row[b]));
        rb.0.cmp(&ra.0)
            .then(rb.1.partial_cmp(&ra.1).unwrap_or(Ordering::Equal))
            .then(a.cmp(&b))
    });
    let mut keep: Vec<u32> = order.into_iter().take(k).map(|i| i as u32).collect();
    keep.sort_unstable();
    keep
}

impl SelectOps for Reference {
    fn topk_rows(&self, meta: &TopkMeta, x: &Vec<f32>) -> Result<IndexList> {
        let sets: Vec<IndexSet> = (0..meta.rows.num_segments())
            .map(|r| IndexSet::from_unsorted(topk(&x[meta.rows.range(r)], meta.k)))
            .collect();
        IndexList::from_sets(meta.scope, &sets)
    }

    fn count_above(&self, meta: &RowsMeta, x: &Vec<f32>, threshold: f32) -> Result<Vec<u32>> {
        Ok((0..meta.rows.num_segments())
            .map(|r| {
                x[meta.rows.range(r)]
                    .iter()
                    .filter(|&&v| v > threshold)
                    .count() as u32
            })
            .collect())
    }
}
