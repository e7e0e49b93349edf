//! Ember transport: communicators, sub-communicators and collectives.
//!
//! * [`Comm`]: one per rank; `rank`, `size`, `split(color, key)`; blocking collectives
//!   (`all_to_all_v`, `all_reduce`, `reduce_scatter_v`, `all_gather_v`, `broadcast`, `barrier`)
//!   and non-blocking `start_*` forms returning a [`Request`].
//! * Constructors: [`local_world`] (threads), [`Comm::connect`] / [`Comm::from_env`] (processes,
//!   shared memory on one host or TCP across hosts).
//! * The algorithms (`coll`) are written once over the [`fabric::Fabric`] primitives that the
//!   backends (`local`, `shm`, `tcp`) implement. See docs/transport.md.
//! * [`bench`]: the nccl-tests-style microbenchmark of the collectives (`ember bench a2a`).
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
mod agree;
mod auth;
pub mod bench;
pub mod bootstrap;
// Not yet under the unsafe lints: some of its unsafe blocks lack SAFETY notes, and its unsafe
// functions' bodies are not yet explicit unsafe blocks.
#[allow(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
mod coll;
mod comm;
mod conn;
#[cfg(test)]
mod conformance;
mod error;
pub mod fabric;
mod limits;
mod local;
mod mailbox;
mod mem;
pub mod rdma;
mod reduce;
mod shm;
mod spin;
mod tcp;

pub use comm::{local_world, local_world_with_timeout, split_evenly, Comm, Regions, Request, DEFAULT_TIMEOUT};
pub use bootstrap::{JoinConfig, Rendezvous, Transport};
pub use error::{Error, Result};
pub use limits::alloc_limit;
pub use mem::{advise_huge_pages, huge_vec};
pub use reduce::{ReduceOp, Reducible};
