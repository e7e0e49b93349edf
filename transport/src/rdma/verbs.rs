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
    /// Put the queue pair to `peer` into the error state, for good (error paths: a peer that
    /// must not touch this rank's memory any more while the memory stays registered). Once this
    /// returns `Ok` no write from `peer` lands here and no new write to it starts; its
    /// outstanding work completes with flush errors (on hardware a write already being read
    /// out is over only when its flush completion is polled). The peer learns it only when it
    /// next writes to us (a retry timeout on InfiniBand, about half a second), since nothing
    /// can be sent on a queue pair in the error state.
    fn disconnect(&self, peer: usize) -> Result<(), String>;
    /// Whether a registration stays valid for its virtual address range for as long as it is
    /// kept (the emulation; on hardware: on-demand-paging MRs), so the protocol may cache
    /// registrations across messages. `false` (the default): the protocol registers a buffer per
    /// message and deregisters it when the message is done, since a cached pinned MR would keep
    /// pointing at the old pages of a freed and re-mapped buffer.
    fn cache_registrations(&self) -> bool {
        false
    }
}

/// Immediate data layout (32 bits, the only thing the receiver trusts for arrival):
/// * slot write (data chunk or control message): bit 31 = 0, bits 24..=30 source rank (< 128),
///   bits 16..=23 slot index, bits 0..=15 the low 16 bits of the per-peer write sequence number;
/// * credit return: bit 31 = 1, bit 23 = 0, bits 24..=30 source rank, bits 0..=22 number of
///   slots freed;
/// * zero-copy write (payload straight into a buffer the receiver advertised): bit 31 = 1,
///   bit 23 = 1, bits 24..=30 source rank, bits 16..=22 advertisement index (< 128), bits
///   0..=15 the low 16 bits of the per-peer write sequence number (shared with slot writes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Imm {
    Data { src: usize, slot: usize, seq16: u16 },
    Credit { src: usize, count: u32 },
    Zc { src: usize, adv: usize, seq16: u16 },
}

pub const MAX_RANKS: usize = 128;
pub const MAX_SLOTS: usize = 256;
/// Advertisements (zero-copy receive buffers) outstanding per peer.
pub const MAX_ADVERTS: usize = 128;
/// Largest credit count an immediate can carry.
pub const MAX_CREDIT: u32 = (1 << 23) - 1;

impl Imm {
    pub fn encode(self) -> u32 {
        match self {
            Imm::Data { src, slot, seq16 } => {
                debug_assert!(src < MAX_RANKS && slot < MAX_SLOTS);
                ((src as u32) << 24) | ((slot as u32) << 16) | seq16 as u32
            }
            Imm::Credit { src, count } => {
                debug_assert!(src < MAX_RANKS && count <= MAX_CREDIT);
                (1 << 31) | ((src as u32) << 24) | (count & MAX_CREDIT)
            }
            Imm::Zc { src, adv, seq16 } => {
                debug_assert!(src < MAX_RANKS && adv < MAX_ADVERTS);
                (1 << 31) | ((src as u32) << 24) | (1 << 23) | ((adv as u32) << 16) | seq16 as u32
            }
        }
    }
    pub fn decode(v: u32) -> Imm {
        let src = ((v >> 24) & 0x7f) as usize;
        if v >> 31 == 0 {
            Imm::Data { src, slot: ((v >> 16) & 0xff) as usize, seq16: v as u16 }
        } else if v & (1 << 23) == 0 {
            Imm::Credit { src, count: v & MAX_CREDIT }
        } else {
            Imm::Zc { src, adv: ((v >> 16) & 0x7f) as usize, seq16: v as u16 }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn imm_kinds_are_distinct() {
        let a = Imm::Data { src: 127, slot: 255, seq16: 0xffff }.encode();
        let b = Imm::Credit { src: 127, count: MAX_CREDIT }.encode();
        let c = Imm::Zc { src: 127, adv: MAX_ADVERTS - 1, seq16: 0xffff }.encode();
        assert!(a != b && b != c && a != c);
        assert!(matches!(Imm::decode(b), Imm::Credit { .. }) && matches!(Imm::decode(c), Imm::Zc { .. }));
    }
    #[test]
    fn imm_roundtrip() {
        for src in [0, 1, 77, 127] {
            for slot in [0, 5, 255] {
                for seq16 in [0u16, 1, 0xffff] {
                    let i = Imm::Data { src, slot, seq16 };
                    assert_eq!(Imm::decode(i.encode()), i);
                }
            }
            for count in [0, 1, 256, MAX_CREDIT] {
                let i = Imm::Credit { src, count };
                assert_eq!(Imm::decode(i.encode()), i);
            }
            for adv in [0, 1, 64, MAX_ADVERTS - 1] {
                for seq16 in [0u16, 1, 0x8000, 0xffff] {
                    let i = Imm::Zc { src, adv, seq16 };
                    assert_eq!(Imm::decode(i.encode()), i);
                }
            }
        }
    }
}
