//! The NCCL unique id that names a communicator: created by rank 0 and moved to every rank.
use super::error::{describe, guard};
use super::library::probe;
use crate::device::DevResult;
use cudarc::nccl::{result as nr, sys as ns};

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// An NCCL unique id: created by rank 0, moved to every rank before [`NcclComm::new`](super::NcclComm::new).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; UNIQUE_ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:02x?}..)", &self.0[..8])
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`: also opens rank 0's bootstrap socket). Rank 0 only.
    pub fn new() -> DevResult<NcclId> {
        probe()?;
        let id = guard(nr::get_uniqueid).map_err(|f| describe("ncclGetUniqueId", f, std::ptr::null_mut()))?;
        let mut b = [0u8; UNIQUE_ID_BYTES];
        for (d, s) in b.iter_mut().zip(id.internal.iter()) {
            *d = *s as u8;
        }
        Ok(NcclId(b))
    }

    /// The id from the bytes rank 0 sent.
    pub fn from_bytes(b: &[u8]) -> DevResult<NcclId> {
        let a: [u8; UNIQUE_ID_BYTES] = b
            .try_into()
            .map_err(|_| format!("an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}", b.len()))?;
        Ok(NcclId(a))
    }

    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.0
    }

    pub(super) fn to_sys(self) -> ns::ncclUniqueId {
        let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
        for (d, s) in internal.iter_mut().zip(self.0.iter()) {
            *d = *s as std::ffi::c_char;
        }
        ns::ncclUniqueId { internal }
    }
}

/// Move rank 0's fresh unique id to every rank with `broadcast` (from rank 0, in place, over
/// `1 + UNIQUE_ID_BYTES` bytes; every rank calls it once). The first byte is a status: when rank 0
/// cannot create the id (no libnccl), every rank returns an error instead of waiting in
/// `ncclCommInitRank`.
pub fn exchange_id(rank: usize, broadcast: impl FnOnce(&mut [u8]) -> Result<(), String>) -> DevResult<NcclId> {
    let mut buf = [0u8; 1 + UNIQUE_ID_BYTES];
    let mut mine = None;
    if rank == 0 {
        match NcclId::new() {
            Ok(id) => {
                buf[0] = 1;
                buf[1..].copy_from_slice(id.as_bytes());
            }
            Err(e) => mine = Some(e),
        }
    }
    broadcast(&mut buf).map_err(|e| format!("moving the NCCL unique id from rank 0: {e}"))?;
    if let Some(e) = mine {
        return Err(e);
    }
    if buf[0] != 1 {
        return Err("rank 0 could not create the NCCL unique id (see its error)".into());
    }
    NcclId::from_bytes(&buf[1..])
}
