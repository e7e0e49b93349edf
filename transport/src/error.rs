//! The transport's error type: every variant names the operation and, where there is one, the peer.
use std::time::Duration;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A transport failure. `peer` is always a *world* rank (the rank in the job), so that messages
/// read the same from any sub-communicator.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{op}: timed out after {timeout:?} waiting for rank {peer}")]
    Timeout { op: &'static str, peer: usize, timeout: Duration },
    #[error("{op}: rank {peer} failed: {reason}")]
    PeerFailed { op: &'static str, peer: usize, reason: String },
    #[error("{op}: malformed message from rank {peer}: {detail}")]
    Protocol { op: &'static str, peer: usize, detail: String },
    #[error("{op}: invalid arguments: {detail}")]
    Usage { op: &'static str, detail: String },
    #[error("{op}: I/O error with rank {peer}: {detail}")]
    Io { op: &'static str, peer: usize, detail: String },
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    #[error("bootstrap: refused by the rendezvous: {0}")]
    Refused(String),
    #[error("transport '{0}' is not built into this binary: rebuild with `--features {0}` (docs/rdma.md, docs/cuda.md), or use auto, local, shm or tcp")]
    NotBuilt(String),
}

impl Error {
    pub(crate) fn usage(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Usage { op, detail: detail.into() }
    }
    /// The world rank this error blames, if any.
    pub fn peer(&self) -> Option<usize> {
        match self {
            Error::Timeout { peer, .. }
            | Error::PeerFailed { peer, .. }
            | Error::Protocol { peer, .. }
            | Error::Io { peer, .. } => Some(*peer),
            _ => None,
        }
    }
    /// Same error with another operation name (the fabric knows the peer, the collective its name).
    pub(crate) fn with_op(self, name: &'static str) -> Self {
        match self {
            Error::Timeout { peer, timeout, .. } => Error::Timeout { op: name, peer, timeout },
            Error::PeerFailed { peer, reason, .. } => Error::PeerFailed { op: name, peer, reason },
            Error::Protocol { peer, detail, .. } => Error::Protocol { op: name, peer, detail },
            Error::Io { peer, detail, .. } => Error::Io { op: name, peer, detail },
            e => e,
        }
    }
}
