//! The wire format: the [`HDR`]-byte chunk header at the start of every slot write (layout,
//! magic, checksum; checked before a byte is used) and the header-only control messages of the
//! zero-copy rendezvous ([`Ctl`]: advertisement, announcement, revoke, acknowledgement), with
//! their header kinds (`K_*`) and revoke reasons (`R_*`).
use super::HDR;
use crate::fabric::Tag;

const MAGIC: u32 = 0xE3B6_D7A1;

// Header kinds: a data chunk, or a header-only control message.
pub const K_DATA: u8 = 0;
/// Receiver → sender: `{addr (offset field), rkey (aux), cap (total), index}` for `tag`.
pub const K_ADVERT: u8 = 1;
/// Sender → receiver: `tag` goes zero-copy; `total` is its length.
pub const K_RTS: u8 = 2;
/// Receiver → sender: do not write into the advertisement of `tag` (reason in aux).
pub const K_REVOKE: u8 = 3;
/// Sender → receiver: no write for advertisement `index` will follow.
pub const K_ACK: u8 = 4;
/// Revoke reasons: the receive was cancelled; use the slots; forget an unused advertisement.
pub const R_CANCEL: u32 = 0;
pub const R_EAGER: u32 = 1;
pub const R_PURGE: u32 = 2;
pub const NO_ADV: u8 = 0xff;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub src: u16,
    pub kind: u8,
    pub adv: u8,
    pub chunk_len: u32,
    pub tag: Tag,
    pub total: u64,
    pub offset: u64,
    pub chunk_seq: u32,
    pub aux: u32,
}

fn checksum(b: &[u8]) -> u32 {
    // FNV-1a over the header's first 56 bytes.
    let mut h: u32 = 0x811c_9dc5;
    for &x in b {
        h = (h ^ x as u32).wrapping_mul(0x0100_0193);
    }
    h
}

impl Header {
    pub fn write(&self, b: &mut [u8; HDR]) {
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&self.src.to_le_bytes());
        b[6] = self.kind;
        b[7] = self.adv;
        b[8..16].copy_from_slice(&self.tag.ctx.to_le_bytes());
        b[16..24].copy_from_slice(&self.tag.seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.tag.round.to_le_bytes());
        b[28..32].copy_from_slice(&self.chunk_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.total.to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b[48..52].copy_from_slice(&self.chunk_seq.to_le_bytes());
        b[52..56].copy_from_slice(&self.aux.to_le_bytes());
        let c = checksum(&b[0..56]);
        b[56..60].copy_from_slice(&c.to_le_bytes());
        b[60..64].copy_from_slice(&0u32.to_le_bytes());
    }
    /// The header at the start of `b` (at least [`HDR`] bytes), checked: magic and checksum.
    /// Its fields are checked by the receiver against its own state (`recv`).
    pub fn read(b: &[u8]) -> std::result::Result<Header, String> {
        if b.len() < HDR {
            return Err(format!("chunk header of {} bytes (expected {HDR})", b.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if u32_at(0) != MAGIC {
            return Err(format!("bad chunk header magic {:#x}", u32_at(0)));
        }
        if u32_at(56) != checksum(&b[0..56]) {
            return Err("chunk header checksum mismatch (corrupted write)".into());
        }
        Ok(Header {
            src: u16::from_le_bytes([b[4], b[5]]),
            kind: b[6],
            adv: b[7],
            tag: Tag { ctx: u64_at(8), seq: u64_at(16), round: u32_at(24) },
            chunk_len: u32_at(28),
            total: u64_at(32),
            offset: u64_at(40),
            chunk_seq: u32_at(48),
            aux: u32_at(52),
        })
    }
}

/// A header-only control message, queued per peer and posted before that peer's data.
#[derive(Clone, Copy, Debug)]
pub(super) enum Ctl {
    Advert { tag: Tag, adv: u8, addr: u64, rkey: u32, cap: u64 },
    Rts { tag: Tag, len: u64 },
    Revoke { tag: Tag, adv: u8, why: u32 },
    Ack { adv: u8 },
}

impl Ctl {
    pub(super) fn header(self, src: u16, seq: u32) -> Header {
        let z = Tag { ctx: 0, seq: 0, round: 0 };
        let h = |kind, adv, tag, total, offset, aux| Header { src, kind, adv, chunk_len: 0, tag, total, offset, chunk_seq: seq, aux };
        match self {
            Ctl::Advert { tag, adv, addr, rkey, cap } => h(K_ADVERT, adv, tag, cap, addr, rkey),
            Ctl::Rts { tag, len } => h(K_RTS, NO_ADV, tag, len, 0, 0),
            Ctl::Revoke { tag, adv, why } => h(K_REVOKE, adv, tag, 0, 0, why),
            Ctl::Ack { adv } => h(K_ACK, adv, z, 0, 0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_a_short_or_corrupted_one_is_an_error() {
        let h = Header { src: 3, kind: K_DATA, adv: NO_ADV, chunk_len: 100, tag: Tag { ctx: 1, seq: 2, round: 3 }, total: 1000, offset: 200, chunk_seq: 9, aux: 0 };
        let mut b = [0u8; HDR];
        h.write(&mut b);
        assert_eq!(Header::read(&b), Ok(h));
        assert!(Header::read(&b[..HDR - 1]).is_err(), "short");
        for i in 0..60 {
            let mut c = b;
            c[i] ^= 0x10;
            assert!(Header::read(&c).is_err(), "flip in byte {i}");
        }
    }
}
