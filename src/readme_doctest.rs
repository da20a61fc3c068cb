//! The README's usage example, compiled and run as a doctest.
#![doc = include_str!("../README.md")]

/// `docs/policies/entmax.md`, run as a doctest.
#[doc = include_str!("../docs/policies/entmax.md")]
mod entmax_doc {}
