//! Ember engine: DLRM training with two-dimensional sparse parallelism.
//!
//! Layout: `config` (what to train), `data` (batches and sources), `backend` (the numeric
//! interface and its CPU implementation), `embedding` (shards), `model` (the DLRM and one
//! training step), `metrics`, `train` (the loop behind `ember train`), `memory` (the check of
//! a run's memory need against the memory available), `bench`.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod embedding;
pub mod dense;
pub mod error;
pub mod grid;
pub mod heap;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod plan;
pub mod rng;
pub mod selftest;
pub mod selftest_2d;
pub mod simulate;
pub mod train;

pub use error::{Error, Result};
