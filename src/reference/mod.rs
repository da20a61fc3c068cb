//! The reference backend: the specification of every op.
//!
//! Plain loops, `f64` accumulation, no `unsafe`, no threads, no caching.
//! Written from the equations in `docs/` and the papers, tested against
//! closed forms and worked examples — never against an optimised backend.
//! Every optimised backend is tested against this one.
#![forbid(unsafe_code)]

mod attn;
mod cache_ops;
mod entmax_attn;
mod norm;
mod score;
mod select;

pub use entmax_attn::{EntmaxHead, EntmaxHeadGrads};
pub use norm::{entmax_f64, softmax_f64};

use crate::backend::Backend;
use crate::dtype::Element;
use crate::error::Result;

/// The reference backend. Buffers are `Vec<T>` on the host.
#[derive(Clone, Copy, Debug, Default)]
pub struct Reference;

impl Backend for Reference {
    type Buffer<T: Element> = Vec<T>;

    fn name(&self) -> &'static str {
        "reference"
    }
    fn upload<T: Element>(&self, data: &[T]) -> Result<Vec<T>> {
        Ok(data.to_vec())
    }
    fn download<T: Element>(&self, buf: &Vec<T>) -> Result<Vec<T>> {
        Ok(buf.clone())
    }
    fn zeros<T: Element>(&self, len: usize) -> Result<Vec<T>> {
        crate::error::try_vec("Reference::zeros", "elements", len, T::default())
    }
    fn host_view<'a, T: Element>(&self, buf: &'a Vec<T>) -> Option<&'a [T]> {
        Some(buf)
    }
    fn buffer_len<T: Element>(&self, buf: &Vec<T>) -> usize {
        buf.len()
    }
}

/// Dot product of two rows in f64.
pub(crate) fn dot<T: Element>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum()
}

/// Normalises logits with the given α (`None` = softmax), in f64.
pub(crate) fn normalize(z: &[f64], alpha: Option<f32>) -> Vec<f64> {
    match alpha {
        None => softmax_f64(z),
        Some(a) => entmax_f64(z, f64::from(a)),
    }
}
