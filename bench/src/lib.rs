//! Bench helpers.

pub mod gate;
