//! Joining a multi-process job. The parts, each in its module:
//!
//! * [`config`]: the job from the launcher's environment ([`JoinConfig`], [`Transport`],
//!   [`Rendezvous`]);
//! * [`rendezvous`]: how the ranks find each other (rank 0 serves the table of entries);
//! * `connect`: the choice of backend and [`Comm::connect`](crate::Comm::connect) (RDMA over
//!   the shm/TCP communicator is built by [`crate::rdma::join`]; its wire format is
//!   [`crate::rdma::wire`]);
//! * `port` and `process`: what launchers need (a free port, CPU affinity, dying with the
//!   launcher).
//!
//! The paths below are the crate's public bootstrap API; the RDMA connection entry and its
//! checks are re-exported here from [`crate::rdma::wire`] and [`crate::rdma::join`].
pub mod config;
mod connect;
mod port;
mod process;
pub mod rendezvous;

pub use crate::auth::new_token;
pub use crate::rdma::join::{rdma_available, rdma_config_from_vars, rdma_port};
pub use crate::rdma::wire::{decode_rdma_table, QpInfo, RdmaPeerInfo, RDMA_INFO_LEN};
pub use config::{slurm_first_host, timeout_from, timeout_from_env, JoinConfig, Rendezvous, Transport};
pub use connect::threads_world;
pub use port::free_port;
pub use process::{allowed_cores, die_with_parent, pin_to_core};
