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
mod bell;
pub mod bench;
pub mod bootstrap;
mod coll;
mod comm;
mod conn;
#[cfg(test)]
mod conformance;
mod env;
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

/// The checks a rank runs on what a peer sends, before using any of it, re-exported for the
/// fuzz targets (fuzz/): TCP frame headers and the mesh hello, shared-memory ring records and
/// slots, RDMA chunk headers and immediates, the rendezvous hello, rendezvous and RDMA
/// connection entries.
#[doc(hidden)]
pub mod wire {
    pub mod tcp {
        pub use crate::tcp::wire::{check_mesh_hello, decode_frame, encode_frame, FrameSink, FRAME_LEN};
    }
    pub use crate::shm::wire as shm;
    pub mod rdma {
        pub use crate::rdma::proto::header::{Header, K_ACK, K_ADVERT, K_DATA, K_REVOKE, K_RTS, NO_ADV, R_CANCEL, R_EAGER, R_PURGE};
        pub use crate::rdma::proto::HDR;
        pub use crate::rdma::verbs::{Imm, MAX_ADVERTS, MAX_CREDIT, MAX_RANKS, MAX_SLOTS};
    }
    pub mod rendezvous {
        pub use crate::auth::{hello_len, HELLO_HEADER, MAX_HELLO};
        pub use crate::bootstrap::rendezvous::{check_hello, hello, Entry};
        pub use crate::rdma::wire::{decode_rdma_table, QpInfo, RdmaPeerInfo, RDMA_INFO_LEN};
        pub use crate::conn::{field_len, MAX_FIELD};
    }
}

pub use coll::{all_reduce_scratch_bytes, Host, Memory};
pub use comm::{local_world, local_world_with_timeout, split_evenly, Comm, Regions, Request, DEFAULT_TIMEOUT, MAX_TIMEOUT};
pub use bootstrap::{JoinConfig, Rendezvous, Transport};
pub use error::{Error, Result};
pub use limits::alloc_limit;
pub use mem::{advise_huge_pages, huge_vec};
pub use reduce::{mean_f32_in_f64, ReduceOp, Reducible};
