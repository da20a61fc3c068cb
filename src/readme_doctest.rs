//! The README's usage example, compiled and run as a doctest.
#![doc = include_str!("../README.md")]
