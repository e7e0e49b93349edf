//! The small verbs-like interface the RDMA protocol is written against (one endpoint per rank,
//! one reliable-connected queue pair per peer, one completion queue), and the immediate-data
//! encoding. Implemented by the adversarial emulation (`emu`) and, later, by the `ibverbs` crate.

/// A registered memory region. `lkey` is used in local scatter/gather entries, `rkey` by a peer
/// that writes into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mr {
    pub addr: u64,
    pub len: usize,
    pub lkey: u32,
    pub rkey: u32,
}

/// One local scatter/gather entry of a work request (must lie inside the region of `lkey`).
#[derive(Clone, Copy, Debug)]
pub struct Sge {
    pub addr: u64,
    pub len: u32,
    pub lkey: u32,
}

/// Why a post was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostError {
    /// The send queue of this QP is full (verbs: `ENOMEM` from `ibv_post_send`). Back-pressure:
    /// poll completions and post again. Never a failure.
    QueueFull,
    /// The QP is in an error state, the peer is gone, or the request is malformed.
    Fatal(String),
}

/// A work completion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wc {
    /// A posted RDMA WRITE WITH IMMEDIATE to `peer` finished (the local buffers may be reused).
    Send { peer: usize, wr_id: u64, status: Result<(), String> },
    /// A peer's RDMA WRITE WITH IMMEDIATE landed in our memory: every byte of it is placed
    /// before this completion is seen. `byte_len` is the length of the write.
    Recv { peer: usize, imm: u32, byte_len: u32 },
}

/// One rank's endpoint. Completions on one QP come in posting order; across QPs in any order.
pub trait Verbs: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Maximum scatter/gather entries per work request.
    fn max_sge(&self) -> usize {
        2
    }
    /// Register `len` bytes at `addr` for local reads and remote writes.
    ///
    /// # Safety
    /// The memory must stay valid until `deregister`.
    unsafe fn register(&self, addr: *mut u8, len: usize) -> Result<Mr, String>;
    fn deregister(&self, mr: &Mr);
    /// Post RDMA WRITE WITH IMMEDIATE of the concatenation of `sges` to `raddr` in `peer`'s
    /// region `rkey`. A zero-length write (no sges) only delivers the immediate.
    ///
    /// # Safety
    /// The sges' memory must stay valid and unchanged until the `Wc::Send` for `wr_id`.
    unsafe fn post_write_imm(&self, peer: usize, wr_id: u64, sges: &[Sge], raddr: u64, rkey: u32, imm: u32) -> Result<(), PostError>;
    /// Move up to `max` completions into `out`; returns how many.
    fn poll(&self, out: &mut Vec<Wc>, max: usize) -> usize;
}

/// Immediate data layout (32 bits, the only thing the receiver trusts for arrival):
/// * data chunk: bit 31 = 0, bits 24..=30 source rank (< 128), bits 16..=23 slot index,
///   bits 0..=15 the low 16 bits of the per-peer chunk sequence number;
/// * credit return: bit 31 = 1, bits 24..=30 source rank, bits 0..=23 number of slots freed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imm {
    Data { src: usize, slot: usize, seq16: u16 },
    Credit { src: usize, count: u32 },
}

pub const MAX_RANKS: usize = 128;
pub const MAX_SLOTS: usize = 256;

impl Imm {
    pub fn encode(self) -> u32 {
        match self {
            Imm::Data { src, slot, seq16 } => {
                debug_assert!(src < MAX_RANKS && slot < MAX_SLOTS);
                ((src as u32) << 24) | ((slot as u32) << 16) | seq16 as u32
            }
            Imm::Credit { src, count } => {
                debug_assert!(src < MAX_RANKS && count < (1 << 24));
                (1 << 31) | ((src as u32) << 24) | count
            }
        }
    }
    pub fn decode(v: u32) -> Imm {
        let src = ((v >> 24) & 0x7f) as usize;
        if v >> 31 == 1 {
            Imm::Credit { src, count: v & 0x00ff_ffff }
        } else {
            Imm::Data { src, slot: ((v >> 16) & 0xff) as usize, seq16: v as u16 }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn imm_roundtrip() {
        for src in [0, 1, 77, 127] {
            for slot in [0, 5, 255] {
                for seq16 in [0u16, 1, 0xffff] {
                    let i = Imm::Data { src, slot, seq16 };
                    assert_eq!(Imm::decode(i.encode()), i);
                }
            }
            for count in [0, 1, (1 << 24) - 1] {
                let i = Imm::Credit { src, count };
                assert_eq!(Imm::decode(i.encode()), i);
            }
        }
    }
}
