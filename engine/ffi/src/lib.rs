//! The C ABI of the Ember engine: `libember.so` / `libember.a` and the generated header
//! `engine/include/ember.h` (docs/capi.md).
//!
//! Rules every entry point follows:
//! - the body runs inside `catch_unwind`: no Rust panic ever crosses the boundary (it becomes
//!   `EMBER_STATUS_ERR_PANIC`);
//! - null pointers and sizes that do not match the model are errors, never crashes;
//! - engine handles are opaque tokens (slot and generation, not addresses) checked against a
//!   registry of live handles, so a handle used after `ember_engine_destroy` (or a value that
//!   never was a handle) is always reported as `EMBER_STATUS_ERR_INVALID_HANDLE`;
//! - sizes from the caller are checked (checked arithmetic, limits) before anything is
//!   allocated from them, and allocations sized by the caller report failure instead of
//!   aborting: no call aborts the calling process;
//! - on failure a message is kept for the calling thread (`ember_last_error`).
//!
//! An engine is either a whole model in this process (a 1x1 grid: `engine::model::Dlrm`) or one
//! rank of 2D training (`engine::parallel::Rank2D`): one rank per process under a launcher, or
//! several in-process ranks with one handle each (`ember_engine_create_local_ranks`). Calls on
//! a rank that communicate are collective: every rank of the job makes the same call, and the
//! ranks first agree that every rank's arguments were accepted (so that a bad argument on one
//! rank fails every rank's call cleanly instead of leaving the others waiting).
//!
//! Layout: `status` (status codes, failures, last error, panic guard), `handle` (the opaque
//! handle, its state and the registry of live handles), `args` (checked reading of the caller's
//! pointers and batches), `config` (TOML configs, grids and plans), `collective` (argument
//! agreement across ranks), `lifecycle` (create and destroy), `info`, `steps` (train and eval),
//! `checkpoint`, `bench` (transport microbenchmark), `version` and `test_hooks`.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

// cbindgen (tests/header.rs) writes engine/include/ember.h in the order it parses items: this
// file, then these modules in declaration order. The order below keeps the header's order (the
// ABI version, then the functions from `ember_version` to `ember_test_panic`); keep it so.
mod version;
mod status;
mod handle;
mod args;
mod config;
mod collective;
mod lifecycle;
mod info;
mod steps;
mod checkpoint;
mod bench;
mod test_hooks;

pub use bench::{ember_bench_collective, EmberBenchRow, EMBER_BENCH_ALL_REDUCE, EMBER_BENCH_ALL_TO_ALL, EMBER_BENCH_MAX_BYTES, EMBER_BENCH_PING_PONG};
pub use checkpoint::{ember_load_checkpoint, ember_save_checkpoint};
pub use handle::EmberEngine;
pub use info::{ember_engine_info, ember_engine_table_rows, EmberInfo};
pub use lifecycle::{
    ember_engine_create_from_file, ember_engine_create_from_preset, ember_engine_create_from_toml, ember_engine_create_local_ranks,
    ember_engine_destroy,
};
pub use status::{ember_last_error, ember_status_name, EmberStatus};
pub use steps::{ember_eval, ember_train_step, EmberMetrics, EMBER_MAX_BATCH};
pub use test_hooks::ember_test_panic;
pub use version::{ember_abi_version, ember_version, EMBER_ABI_VERSION};

#[cfg(test)]
mod abi_tests;
