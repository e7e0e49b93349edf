//! The RDMA connection wire format: what one rank sends each peer through the bootstrap
//! communicator to connect their queue pair ([`RdmaPeerInfo`], a fixed 72-byte checksummed
//! little-endian entry), and the bounds-checked decoding of the all-to-all of such entries
//! ([`decode_rdma_table`]).
use super::proto::{RemoteSlots, HDR};
use super::verbs::{MAX_RANKS, MAX_SLOTS};
use crate::error::{Error, Result};

/// What the peer of one reliable-connected queue pair needs to connect to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QpInfo {
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Port GID at the chosen GID index (RoCE, or InfiniBand with a GRH).
    pub gid: [u8; 16],
    /// Active MTU as the `ibv_mtu` enum (1 = 256 B ... 5 = 4096 B).
    pub mtu: u8,
}

/// One rank's connection data for one peer, sent through the bootstrap: the QP that rank `src`
/// created for `dst`, and the receive slots `src` reserved for messages from `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaPeerInfo {
    pub src: usize,
    pub dst: usize,
    pub qp: QpInfo,
    pub slots: RemoteSlots,
}

/// Encoded size of one [`RdmaPeerInfo`].
pub const RDMA_INFO_LEN: usize = 72;
const RDMA_MAGIC: u32 = 0x4d52_4245; // "EBRM"
const RDMA_VERSION: u16 = 1;

fn fnv32(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| (h ^ x as u32).wrapping_mul(0x0100_0193))
}

impl RdmaPeerInfo {
    /// Fixed little-endian layout: magic, version, src, dst, lid, qpn, psn, mtu, gid, slot
    /// address, rkey, slot count, slot size, checksum.
    pub fn encode(&self) -> [u8; RDMA_INFO_LEN] {
        let mut b = [0u8; RDMA_INFO_LEN];
        b[0..4].copy_from_slice(&RDMA_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&RDMA_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.src as u16).to_le_bytes());
        b[8..10].copy_from_slice(&(self.dst as u16).to_le_bytes());
        b[10..12].copy_from_slice(&self.qp.lid.to_le_bytes());
        b[12..16].copy_from_slice(&self.qp.qpn.to_le_bytes());
        b[16..20].copy_from_slice(&self.qp.psn.to_le_bytes());
        b[20] = self.qp.mtu;
        b[24..40].copy_from_slice(&self.qp.gid);
        b[40..48].copy_from_slice(&self.slots.addr.to_le_bytes());
        b[48..52].copy_from_slice(&self.slots.rkey.to_le_bytes());
        b[52..56].copy_from_slice(&(self.slots.slots as u32).to_le_bytes());
        b[56..64].copy_from_slice(&(self.slots.slot_size as u64).to_le_bytes());
        let c = fnv32(&b[0..64]);
        b[64..68].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Bounds-checked decode: a truncated, corrupted or out-of-range entry is an error.
    pub fn decode(b: &[u8]) -> std::result::Result<RdmaPeerInfo, String> {
        if b.len() != RDMA_INFO_LEN {
            return Err(format!("RDMA connection entry of {} bytes (expected {RDMA_INFO_LEN})", b.len()));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        if u32_at(0) != RDMA_MAGIC {
            return Err(format!("RDMA connection entry: bad magic {:#x}", u32_at(0)));
        }
        if u16_at(4) != RDMA_VERSION {
            return Err(format!("RDMA connection entry version {} (this binary speaks {RDMA_VERSION})", u16_at(4)));
        }
        if u32_at(64) != fnv32(&b[0..64]) {
            return Err("RDMA connection entry: checksum mismatch".into());
        }
        if b[21..24].iter().chain(&b[68..72]).any(|&x| x != 0) {
            return Err("RDMA connection entry: reserved bytes set".into());
        }
        let (src, dst) = (u16_at(6) as usize, u16_at(8) as usize);
        let (qpn, psn, mtu) = (u32_at(12), u32_at(16), b[20]);
        let (slots, slot_size) = (u32_at(52) as usize, u64_at(56));
        let addr = u64_at(40);
        if src >= MAX_RANKS || dst >= MAX_RANKS {
            return Err(format!("RDMA connection entry for ranks {src} -> {dst} (at most {MAX_RANKS} ranks)"));
        }
        if qpn >= 1 << 24 || psn >= 1 << 24 {
            return Err(format!("RDMA connection entry: QPN {qpn:#x} / PSN {psn:#x} exceed 24 bits"));
        }
        if !(1..=5).contains(&mtu) {
            return Err(format!("RDMA connection entry: MTU code {mtu} (1..=5)"));
        }
        if slots == 0 || slots > MAX_SLOTS || slot_size <= HDR as u64 || slot_size > (1 << 30) + HDR as u64 {
            return Err(format!("RDMA connection entry: {slots} slots of {slot_size} bytes"));
        }
        if (slots as u64).checked_mul(slot_size).and_then(|l| addr.checked_add(l)).is_none() {
            return Err(format!("RDMA connection entry: slot region at {addr:#x} wraps the address space"));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[24..40]);
        Ok(RdmaPeerInfo {
            src,
            dst,
            qp: QpInfo { qpn, psn, lid: u16_at(10), gid, mtu },
            slots: RemoteSlots { addr, rkey: u32_at(48), slots, slot_size: slot_size as usize },
        })
    }
}

/// Decode what rank `me` of `n` received from every peer in the all-to-all of connection
/// entries (`n * RDMA_INFO_LEN` bytes; entry `p` from rank `p`, its own entry ignored).
pub fn decode_rdma_table(b: &[u8], me: usize, n: usize) -> Result<Vec<Option<RdmaPeerInfo>>> {
    const OP: &str = "rdma connect";
    if n.checked_mul(RDMA_INFO_LEN) != Some(b.len()) || me >= n {
        return Err(Error::usage(OP, format!("{} bytes of connection data for rank {me} of {n}", b.len())));
    }
    (0..n)
        .map(|p| {
            if p == me {
                return Ok(None);
            }
            let e = RdmaPeerInfo::decode(&b[p * RDMA_INFO_LEN..(p + 1) * RDMA_INFO_LEN]).map_err(|detail| Error::Protocol { op: OP, peer: p, detail })?;
            if e.src != p || e.dst != me {
                return Err(Error::Protocol { op: OP, peer: p, detail: format!("entry for {} -> {} where {p} -> {me} was expected", e.src, e.dst) });
            }
            Ok(Some(e))
        })
        .collect()
}
