//! The protocol's bookkeeping, all behind the fabric's one lock ([`State`]): per message (a
//! receive's [`RecvEntry`], a send's [`SendJob`] and its delivery [`Mode`]), per peer ([`Peer`]:
//! credits, sequence numbers, control queue, advertisements both ways), and marking a peer failed.
use super::header::Ctl;
use super::mrcache::{MrCache, MrRef};
use super::{HashMap, HashSet, RemoteSlots, HDR};
use crate::error::Error;
use crate::fabric::Tag;
use crate::rdma::verbs::Wc;
use std::collections::VecDeque;

/// A message being received (posted, stashed, or both in turn).
#[derive(Default)]
pub(super) struct RecvEntry {
    /// Posted landing buffer.
    pub(super) posted: Option<(usize, usize)>,
    /// Total length announced by the first chunk (eager) or by the sender's announcement.
    pub(super) total: Option<usize>,
    pub(super) next_off: usize,
    /// Bytes that arrived before the buffer was posted.
    pub(super) stash: Vec<u8>,
    pub(super) done: bool,
    /// Remaining chunks are consumed and dropped (cancelled, or too long for the buffer).
    pub(super) discard: bool,
    pub(super) err: Option<Error>,
    /// The sender announced this message as zero-copy (`total` is its length).
    pub(super) announced: bool,
    /// The sender delivers it through the slots.
    pub(super) eager: bool,
    /// Registration of the posted buffer (zero-copy receive).
    pub(super) mr: Option<MrRef>,
    /// Advertisement index while the buffer is advertised.
    pub(super) adv: Option<u8>,
    /// Posted for zero-copy, waiting for a free advertisement index.
    pub(super) adv_wait: bool,
    /// Withdrawn (cancel_recv, or a failed wait_recv).
    pub(super) withdrawn: bool,
    /// The sender was told (revoke) not to write this message zero-copy.
    pub(super) revoked: bool,
    /// The posted buffer is memory the CPU must not touch (device memory): only the NIC writes
    /// it, so the message must arrive zero-copy; one that comes through the slots is an error.
    pub(super) direct: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// Through the slots.
    Eager,
    /// Zero-copy, waiting for the receiver's advertisement.
    Wait,
    /// Zero-copy into the advertised buffer.
    Zc { addr: u64, rkey: u32, adv: u8 },
    /// The receiver withdrew it: nothing more is written.
    Dropped,
}

pub(super) struct SendJob {
    pub(super) dst: usize,
    pub(super) tag: Tag,
    pub(super) data: usize,
    pub(super) len: usize,
    pub(super) mr: Option<MrRef>,
    pub(super) mode: Mode,
    pub(super) next_off: usize,
    pub(super) chunks_total: usize,
    pub(super) chunks_posted: usize,
    pub(super) chunks_done: usize,
    pub(super) err: Option<Error>,
}

/// An advertisement received from a peer.
#[derive(Clone, Copy, Debug)]
pub(super) struct RemoteBuf {
    pub(super) addr: u64,
    pub(super) rkey: u32,
    pub(super) cap: u64,
    pub(super) adv: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AdvSlot {
    Free,
    Active(Tag),
    /// The receive of `tag` was cancelled; the index is free again once the sender acknowledges.
    /// `deregistered`: the buffer was deregistered before that (no acknowledgement in time), so a
    /// write of the sender's into it is refused, and the stream from the sender breaks there.
    Revoked { tag: Tag, deregistered: bool },
}

pub(super) struct Peer {
    pub(super) remote: Option<RemoteSlots>,
    pub(super) credits: usize,
    pub(super) tx_seq: u32,
    pub(super) rx_seq: u32,
    /// Slots consumed and not yet returned.
    pub(super) owed: u32,
    /// Jobs with chunks to post, in order (eager ones at once, zero-copy ones once advertised).
    pub(super) tx_queue: VecDeque<u64>,
    /// Why the peer is unusable (`true`: it sent something malformed).
    pub(super) failed: Option<(bool, String)>,
    /// An abort for this peer's writer is still to be posted.
    pub(super) abort: bool,
    /// Control messages to post, in order, before any data.
    pub(super) ctl: VecDeque<Ctl>,
    /// Advertisements from this peer whose send has not been issued yet.
    pub(super) adverts: HashMap<Tag, RemoteBuf>,
    /// Messages whose advertisement the peer revoked before the send was issued.
    pub(super) revoked: HashSet<Tag>,
    /// Our advertisements to this peer, by index.
    pub(super) advs: Vec<AdvSlot>,
    pub(super) adv_next: usize,
    /// Receives waiting for a free advertisement index.
    pub(super) adv_wait: VecDeque<Tag>,
    /// Data writes (they read a caller's buffer) posted to this peer and not yet completed,
    /// whether or not their job is still known.
    pub(super) data_in_flight: u32,
}

pub(super) struct State {
    pub(super) peers: Vec<Peer>,
    pub(super) recvs: HashMap<(usize, Tag), RecvEntry>,
    pub(super) jobs: HashMap<u64, SendJob>,
    pub(super) job_of: HashMap<(usize, Tag), u64>,
    pub(super) next_job: u64,
    /// Header ring: `slots` headers per peer.
    pub(super) hdrs: Vec<[u8; HDR]>,
    pub(super) wcs: Vec<Wc>,
    pub(super) rotate: usize,
    pub(super) cache: MrCache,
}

pub(super) fn fail_peer(st: &mut State, p: usize, why: String) {
    fail_peer_as(st, p, false, why)
}

pub(super) fn fail_peer_as(st: &mut State, p: usize, protocol: bool, why: String) {
    if st.peers[p].failed.is_none() {
        tracing::debug!(peer = p, "rdma: peer failed: {why}");
        st.peers[p].failed = Some((protocol, why));
    }
}
