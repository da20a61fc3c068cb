//! The shared test harness: one generic test body, every backend.
//!
//! - [`inputs`]: seeded generator and named input distributions;
//! - [`tolerance`]: tolerance presets and the low-precision error budget;
//! - [`compare`]: closeness, simplex and selection comparisons;
//! - [`backends`]: the `backend_suite!` macro and loud skips.
#![allow(dead_code, unused_imports, unused_macros)]

pub mod backends;
pub mod compare;
pub mod inputs;
pub mod tolerance;

pub use backends::{on_simulator, sim_runs};
pub use compare::*;
pub use inputs::*;
pub use tolerance::*;
