//! What travels on a TCP mesh connection: the mesh hello (the dialling rank's claim, checked
//! by the rank it dials) and the frame header before every message's payload, with the
//! receiving rank's admission of a header (the payload's destination, or bytes kept until
//! posted, within limits) before any payload byte is read.
use crate::error::{Error, Result};
use crate::fabric::Tag;
use crate::mailbox::{Dir, Mailbox, RawBuf, Slot};
use bytemuck::{Pod, Zeroable};

pub(super) const MAGIC: u32 = 0x454d_4252; // "EMBR"

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(super) struct Frame {
    pub(super) magic: u32,
    pub(super) round: u32,
    pub(super) ctx: u64,
    pub(super) seq: u64,
    pub(super) len: u64,
}

/// The mesh hello: the dialling rank, the rank it dials, the job size.
pub(super) fn hello(from: usize, to: usize, size: usize) -> Vec<u8> {
    [from, to, size].iter().flat_map(|&x| (x as u32).to_le_bytes()).collect()
}

pub(super) fn parse_hello(h: &[u8]) -> Option<(usize, usize, usize)> {
    if h.len() != 12 {
        return None;
    }
    let at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]) as usize;
    Some((at(0), at(4), at(8)))
}

/// The mesh hello as rank `rank` of `size` accepts it: a higher rank of this job dialling this
/// rank. Returns the dialling rank.
pub fn check_mesh_hello(h: &[u8], rank: usize, size: usize) -> std::result::Result<usize, String> {
    match parse_hello(h) {
        Some((from, to, n)) if to == rank && n == size && from > rank && from < size => Ok(from),
        Some((from, to, n)) => Err(format!("rank {from} dialling rank {to} of {n} does not fit rank {rank} of {size}")),
        None => Err("malformed hello".into()),
    }
}

/// Bytes of a frame header: magic, round, communicator context, sequence number, payload length.
pub const FRAME_LEN: usize = std::mem::size_of::<Frame>();

/// The header of a frame that carries `len` payload bytes of message `tag`.
pub fn encode_frame(tag: Tag, len: usize) -> [u8; FRAME_LEN] {
    let f = Frame { magic: MAGIC, round: tag.round, ctx: tag.ctx, seq: tag.seq, len: len as u64 };
    let mut h = [0u8; FRAME_LEN];
    h.copy_from_slice(bytemuck::bytes_of(&f));
    h
}

/// A frame header as the receiving rank reads it, before any payload byte: the magic, and a
/// length this machine can address. Where the payload may go is checked next ([`admit`]).
pub fn decode_frame(h: &[u8; FRAME_LEN]) -> std::result::Result<(Tag, usize), String> {
    let f: Frame = bytemuck::pod_read_unaligned(h);
    if f.magic != MAGIC {
        return Err(format!("malformed frame (bad magic {:#x})", f.magic));
    }
    let len = usize::try_from(f.len).map_err(|_| format!("malformed frame: length {} exceeds the limit", f.len))?;
    Ok((Tag { ctx: f.ctx, seq: f.seq, round: f.round }, len))
}

/// Where a frame's payload goes.
pub(super) enum Place {
    /// Into the buffer posted for it (claimed, its capacity checked).
    Posted(RawBuf),
    /// Kept until posted (its bytes reserved within the limit on what peers may make this rank
    /// hold).
    Early,
    /// Left in the stream until posted ([`place`]'s `hold`).
    Held,
}

/// Where the payload of the frame `tag` of `len` bytes from `peer` goes: the buffer posted for
/// it; else, with `hold` and while no other receive from `peer` is posted (which may be behind
/// this frame in the stream), nowhere yet; else kept until posted. `Err`: a protocol error
/// naming the peer (the stream can no longer be trusted).
pub(super) fn place(mb: &Mailbox, peer: usize, tag: Tag, len: usize, hold: bool) -> Result<Place> {
    let mut t = mb.lock();
    if let Some(buf) = Mailbox::claim(&mut t, peer, tag, len, "tcp receive")? {
        return Ok(Place::Posted(buf));
    }
    let behind = |t: &crate::mailbox::Table| t.map.iter().any(|(&(s, g, d), slot)| s == peer && d == Dir::Recv && g != tag && matches!(slot, Slot::Posted { .. }));
    if hold && !behind(&t) {
        return Ok(Place::Held);
    }
    Mailbox::reserve_early(&mut t, peer, len, "tcp receive")?;
    Ok(Place::Early)
}

/// A frame header from `peer`, decoded and admitted ([`place`]).
pub(super) fn admit(mb: &Mailbox, peer: usize, h: &[u8; FRAME_LEN], hold: impl FnOnce(usize) -> bool) -> Result<(Tag, usize, Place)> {
    let (tag, len) = decode_frame(h).map_err(|detail| Error::Protocol { op: "tcp receive", peer, detail })?;
    Ok((tag, len, place(mb, peer, tag, len, hold(len))?))
}

/// A receiving rank's admission of frame headers without a socket (the fuzz target
/// `tcp_frame`): receives posted into buffers held here, and each header put through the
/// progress thread's own [`admit`], its payload then delivered as zeros.
#[doc(hidden)]
pub struct FrameSink {
    mb: Mailbox,
    bufs: Vec<Box<[u8]>>,
}

impl Default for FrameSink {
    fn default() -> Self {
        FrameSink { mb: Mailbox::new(), bufs: Vec::new() }
    }
}

impl FrameSink {
    /// Post a receive of at most `cap` bytes from `peer` for `tag`.
    pub fn post(&mut self, peer: usize, tag: Tag, cap: usize) -> Result<()> {
        let mut b = vec![0u8; cap].into_boxed_slice();
        self.mb.post(peer, tag, b.as_mut_ptr(), cap, "tcp receive")?;
        self.bufs.push(b);
        Ok(())
    }
    /// One frame header from `peer`: `Ok((tag, len, posted))` once its payload landed in the
    /// posted buffer (`posted`) or was kept until posted.
    pub fn frame(&mut self, peer: usize, h: &[u8; FRAME_LEN]) -> Result<(Tag, usize, bool)> {
        let (tag, len, dst) = admit(&self.mb, peer, h, |_| false)?;
        let posted = matches!(dst, Place::Posted(_));
        if posted {
            self.mb.complete(peer, tag, Dir::Recv, len);
        } else {
            self.mb.deliver(peer, tag, vec![0u8; len], true, "tcp receive")?;
        }
        Ok((tag, len, posted))
    }
    /// Bytes held for receives not posted yet.
    pub fn early_bytes(&self) -> usize {
        self.mb.lock().early_bytes
    }
}
