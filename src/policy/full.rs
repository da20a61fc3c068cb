//! `Full`: the identity policy (keep everything, attend densely).
//!
//! Used as the ground truth of metamorphic tests: any policy whose budget is
//! at least the sequence length must produce the same attention output.
#![forbid(unsafe_code)]

use super::{Capabilities, KvPolicy};
use crate::backend::Backend;
use crate::dtype::Element;

/// Keeps every token; every hook returns `Plan::KeepAll`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Full;

impl<B: Backend, T: Element> KvPolicy<B, T> for Full {
    fn name(&self) -> &'static str {
        "full"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}
