//! The all-to-all protocol, written once over [`Verbs`]: an implementation of [`Fabric`].
//!
//! * Each receiver preallocates and registers, once, `slots` receive slots of
//!   `HDR + chunk` bytes per peer; the sender learns `{addr, rkey}` at connect time.
//! * Small messages (eager, below the zero-copy threshold): a message is cut into chunks of at
//!   most `chunk` bytes (at least one chunk, so an empty message still arrives); each chunk is
//!   one RDMA WRITE WITH IMMEDIATE of `[header | payload]` (two sges: a registered header ring
//!   and the caller's registered buffer) into the next slot. The immediate (peer, slot,
//!   sequence) signals arrival; the header carries the tag, offset and total length, and is
//!   checked (magic, checksum, sequence, bounds) before a byte is copied out.
//! * Large messages (zero-copy rendezvous, at least `zc_min` bytes): the receiver registers the
//!   posted buffer (registration cache) and advertises `{addr, rkey, len, tag, index}` to the
//!   sender in a header-only slot write; the sender announces the message length (another
//!   header-only write) and RDMA-writes the payload straight into the advertised buffer in
//!   chunks of `zc_chunk` bytes, each a WRITE WITH IMMEDIATE whose immediate names the
//!   advertisement: the receiver knows every byte landed when the announced length has arrived,
//!   each chunk's length checked. A cancelled receive is revoked (deregistered before
//!   `cancel_recv` returns, so a late write fails at the NIC) and the sender told to stop.
//! * Credits: a sender holds `slots` credits per peer and spends one per write that raises an
//!   immediate (chunk, control message, zero-copy chunk); the receiver returns them in batches
//!   with a zero-length write whose immediate carries the count.
//! * Pipelining: pending chunks of all peers are posted round-robin (one per peer per pass,
//!   starting at a rank-dependent peer) as credits and send-queue room allow; a full send queue
//!   (`PostError::QueueFull`) only ends the pass. Control messages to a peer go before its data.
//! * Progress is driven by whichever thread waits (poll, process, post), with back-off.
use super::verbs::{Imm, Mr, PostError, Sge, Verbs, Wc, MAX_ADVERTS, MAX_CREDIT, MAX_RANKS, MAX_SLOTS};
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use std::collections::{HashMap as StdHashMap, HashSet as StdHashSet, VecDeque};
use crate::mailbox::KeyHasher;
use std::hash::BuildHasherDefault;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The state maps hash with the matching table's cheap hasher (keys are small integers and
/// tags; SipHash was a tenth of the time of a small-message all-to-all).
type HashMap<K, V> = StdHashMap<K, V, BuildHasherDefault<KeyHasher>>;
type HashSet<K> = StdHashSet<K, BuildHasherDefault<KeyHasher>>;

/// Bytes of the chunk header at the start of every slot.
pub const HDR: usize = 64;
const MAGIC: u32 = 0xE3B6_D7A1;
const CREDIT_WR: u64 = 1 << 63;
/// A credit return with this count tells the writer its stream was rejected (abort).
const ABORT: u32 = MAX_CREDIT;
/// Largest message stashed for a receive not yet posted (per message).
const STASH_MAX: usize = 1 << 31;
/// Zero-copy threshold: messages of at least `min(ZC_MIN, ZC_CHUNK_MULT * chunk)` bytes go
/// zero-copy (see [`RdmaFabric::with_zero_copy`]). Measured on the emulation: at 64 KiB the
/// rendezvous (advertisement, announcement, one more hand-off when the receiver posts late)
/// cost more than the copy it saves; at 256 KiB the two paths are even; above it zero-copy wins.
pub const ZC_MIN: usize = 256 << 10;
/// Zero-copy writes carry `ZC_CHUNK_MULT * chunk` bytes (at most 2^30).
pub const ZC_CHUNK_MULT: usize = 4;
/// How long `cancel_recv` of an advertised buffer waits for the sender's acknowledgement before
/// it revokes the registration (error paths only).
const CANCEL_WAIT: Duration = Duration::from_millis(100);
/// Registrations kept by the cache (least recently used idle ones are dropped beyond this).
const CACHE_MAX: usize = 256;

// Header kinds: a data chunk, or a header-only control message.
const K_DATA: u8 = 0;
/// Receiver → sender: `{addr (offset field), rkey (aux), cap (total), index}` for `tag`.
const K_ADVERT: u8 = 1;
/// Sender → receiver: `tag` goes zero-copy; `total` is its length.
const K_RTS: u8 = 2;
/// Receiver → sender: do not write into the advertisement of `tag` (reason in aux).
const K_REVOKE: u8 = 3;
/// Sender → receiver: no write for advertisement `index` will follow.
const K_ACK: u8 = 4;
/// Revoke reasons: the receive was cancelled; use the slots; forget an unused advertisement.
const R_CANCEL: u32 = 0;
const R_EAGER: u32 = 1;
const R_PURGE: u32 = 2;
const NO_ADV: u8 = 0xff;

/// Protocol geometry. Both sides of a connection must agree (checked at connect).
#[derive(Clone, Copy, Debug)]
pub struct RdmaConfig {
    /// Receive slots per peer (= the sender's credits), 1..=256.
    pub slots: usize,
    /// Payload bytes per slot (chunk size), 1..=2^30.
    pub chunk: usize,
}

impl Default for RdmaConfig {
    fn default() -> Self {
        RdmaConfig { slots: 8, chunk: 256 << 10 }
    }
}

/// What a sender must know about the receive slots a peer reserved for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteSlots {
    pub addr: u64,
    pub rkey: u32,
    pub slots: usize,
    pub slot_size: usize,
}

#[derive(Clone, Copy)]
struct Header {
    src: u16,
    kind: u8,
    adv: u8,
    chunk_len: u32,
    tag: Tag,
    total: u64,
    offset: u64,
    chunk_seq: u32,
    aux: u32,
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
    fn write(&self, b: &mut [u8; HDR]) {
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
    fn read(b: &[u8]) -> std::result::Result<Header, String> {
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
enum Ctl {
    Advert { tag: Tag, adv: u8, addr: u64, rkey: u32, cap: u64 },
    Rts { tag: Tag, len: u64 },
    Revoke { tag: Tag, adv: u8, why: u32 },
    Ack { adv: u8 },
}

impl Ctl {
    fn header(self, src: u16, seq: u32) -> Header {
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

type MrKey = (u64, usize, bool);

/// A registration in use: `key` names its cache entry (`None`: a private one, deregistered at release).
#[derive(Clone, Copy, Debug)]
struct MrRef {
    mr: Mr,
    key: Option<MrKey>,
}

struct CacheEnt {
    mr: Mr,
    users: u32,
    last: u64,
}

/// Registration cache keyed by address range (and purpose: a receive buffer is registered for
/// exactly its range and used by one receive at a time, so revoking it touches nothing else;
/// a send may use any send registration containing its range).
struct MrCache {
    on: bool,
    map: HashMap<MrKey, CacheEnt>,
    clock: u64,
}

impl MrCache {
    fn acquire<V: Verbs>(&mut self, v: &V, addr: usize, len: usize, recv: bool) -> std::result::Result<MrRef, String> {
        // SAFETY (of the registrations below): the Fabric contract keeps the buffer valid while
        // in use; a cached registration outliving it is harmless where caching is enabled
        // (`Verbs::cache_registrations`: registrations follow the virtual range).
        let reg = |v: &V| unsafe { v.register(addr as *mut u8, len) };
        if !self.on {
            return Ok(MrRef { mr: reg(v)?, key: None });
        }
        self.clock += 1;
        let clock = self.clock;
        let key = (addr as u64, len, recv);
        if let Some(e) = self.map.get_mut(&key) {
            if !recv || e.users == 0 {
                e.users += 1;
                e.last = clock;
                return Ok(MrRef { mr: e.mr, key: Some(key) });
            }
            return Ok(MrRef { mr: reg(v)?, key: None }); // the range is posted twice at once
        }
        if !recv {
            let (a, end) = (addr as u64, addr as u64 + len as u64);
            if let Some((k, e)) = self.map.iter_mut().find(|(k, _)| !k.2 && k.0 <= a && k.0 + k.1 as u64 >= end) {
                e.users += 1;
                e.last = clock;
                return Ok(MrRef { mr: e.mr, key: Some(*k) });
            }
        }
        if self.map.len() >= CACHE_MAX {
            let victim = self.map.iter().filter(|(_, e)| e.users == 0).min_by_key(|(_, e)| e.last).map(|(k, _)| *k);
            match victim {
                Some(k) => v.deregister(&self.map.remove(&k).unwrap().mr),
                None => return Ok(MrRef { mr: reg(v)?, key: None }),
            }
        }
        let mr = reg(v)?;
        self.map.insert(key, CacheEnt { mr, users: 1, last: clock });
        Ok(MrRef { mr, key: Some(key) })
    }

    /// Done with `r`. `revoke`: deregister it now (no peer may write into it, and no posted
    /// read of it may happen, once this returns), and drop it from the cache.
    fn release<V: Verbs>(&mut self, v: &V, r: &MrRef, revoke: bool) {
        match r.key {
            None => v.deregister(&r.mr),
            Some(k) => {
                let Some(e) = self.map.get_mut(&k) else { return }; // revoked already
                if e.mr.lkey != r.mr.lkey {
                    return;
                }
                e.users = e.users.saturating_sub(1);
                if revoke {
                    v.deregister(&self.map.remove(&k).unwrap().mr);
                }
            }
        }
    }
}

/// A message being received (posted, stashed, or both in turn).
#[derive(Default)]
struct RecvEntry {
    /// Posted landing buffer.
    posted: Option<(usize, usize)>,
    /// Total length announced by the first chunk (eager) or by the sender's announcement.
    total: Option<usize>,
    next_off: usize,
    /// Bytes that arrived before the buffer was posted.
    stash: Vec<u8>,
    done: bool,
    /// Remaining chunks are consumed and dropped (cancelled, or too long for the buffer).
    discard: bool,
    err: Option<Error>,
    /// The sender announced this message as zero-copy (`total` is its length).
    announced: bool,
    /// The sender delivers it through the slots.
    eager: bool,
    /// Registration of the posted buffer (zero-copy receive).
    mr: Option<MrRef>,
    /// Advertisement index while the buffer is advertised.
    adv: Option<u8>,
    /// Posted for zero-copy, waiting for a free advertisement index.
    adv_wait: bool,
    /// Withdrawn (cancel_recv, or a failed wait_recv).
    withdrawn: bool,
    /// The sender was told (revoke) not to write this message zero-copy.
    revoked: bool,
    /// The posted buffer is memory the CPU must not touch (device memory): only the NIC writes
    /// it, so the message must arrive zero-copy; one that comes through the slots is an error.
    direct: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Through the slots.
    Eager,
    /// Zero-copy, waiting for the receiver's advertisement.
    Wait,
    /// Zero-copy into the advertised buffer.
    Zc { addr: u64, rkey: u32, adv: u8 },
    /// The receiver withdrew it: nothing more is written.
    Dropped,
}

struct SendJob {
    dst: usize,
    tag: Tag,
    data: usize,
    len: usize,
    mr: Option<MrRef>,
    mode: Mode,
    next_off: usize,
    chunks_total: usize,
    chunks_posted: usize,
    chunks_done: usize,
    err: Option<Error>,
}

/// An advertisement received from a peer.
#[derive(Clone, Copy, Debug)]
struct RemoteBuf {
    addr: u64,
    rkey: u32,
    cap: u64,
    adv: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AdvSlot {
    Free,
    Active(Tag),
    /// Revoked; free again once the sender acknowledges.
    Revoked,
}

struct Peer {
    remote: Option<RemoteSlots>,
    credits: usize,
    tx_seq: u32,
    rx_seq: u32,
    /// Slots consumed and not yet returned.
    owed: u32,
    /// Jobs with chunks to post, in order (eager ones at once, zero-copy ones once advertised).
    tx_queue: VecDeque<u64>,
    /// Why the peer is unusable (`true`: it sent something malformed).
    failed: Option<(bool, String)>,
    /// An abort for this peer's writer is still to be posted.
    abort: bool,
    /// Control messages to post, in order, before any data.
    ctl: VecDeque<Ctl>,
    /// Advertisements from this peer whose send has not been issued yet.
    adverts: HashMap<Tag, RemoteBuf>,
    /// Messages whose advertisement the peer revoked before the send was issued.
    revoked: HashSet<Tag>,
    /// Our advertisements to this peer, by index.
    advs: Vec<AdvSlot>,
    adv_next: usize,
    /// Receives waiting for a free advertisement index.
    adv_wait: VecDeque<Tag>,
}

struct State {
    peers: Vec<Peer>,
    recvs: HashMap<(usize, Tag), RecvEntry>,
    jobs: HashMap<u64, SendJob>,
    job_of: HashMap<(usize, Tag), u64>,
    next_job: u64,
    /// Header ring: `slots` headers per peer.
    hdrs: Vec<[u8; HDR]>,
    wcs: Vec<Wc>,
    rotate: usize,
    cache: MrCache,
}

/// The RDMA protocol over any [`Verbs`] endpoint.
pub struct RdmaFabric<V: Verbs> {
    v: V,
    cfg: RdmaConfig,
    rank: usize,
    n: usize,
    slot_size: usize,
    /// Messages of at least this many bytes go zero-copy.
    zc_min: usize,
    /// Bytes per zero-copy write.
    zc_chunk: usize,
    /// Receive slots: peer p's slots at `p * slots * slot_size`.
    rx: Box<[u8]>,
    rx_mr: Mr,
    hdr_mr: Mr,
    st: Mutex<State>,
    name: &'static str,
}

// SAFETY: raw addresses in the state are only dereferenced under the state lock, within the
// lifetime the Fabric contract guarantees.
unsafe impl<V: Verbs> Send for RdmaFabric<V> {}
unsafe impl<V: Verbs> Sync for RdmaFabric<V> {}

fn fail_peer(st: &mut State, p: usize, why: String) {
    fail_peer_as(st, p, false, why)
}

fn fail_peer_as(st: &mut State, p: usize, protocol: bool, why: String) {
    if st.peers[p].failed.is_none() {
        tracing::debug!(peer = p, "rdma: peer failed: {why}");
        st.peers[p].failed = Some((protocol, why));
    }
}

impl<V: Verbs> RdmaFabric<V> {
    /// Allocate and register the receive slots and the header ring. Call [`Self::slots_for`]
    /// for every peer, exchange the results (bootstrap), then [`Self::connect`].
    pub fn new(v: V, cfg: RdmaConfig, name: &'static str) -> Result<Self> {
        const OP: &str = "rdma setup";
        let (rank, n) = (v.rank(), v.size());
        if n > MAX_RANKS || rank >= n {
            return Err(Error::usage(OP, format!("rank {rank} of {n}: at most {MAX_RANKS} ranks")));
        }
        if cfg.slots == 0 || cfg.slots > MAX_SLOTS || cfg.chunk == 0 || cfg.chunk > (1 << 30) {
            return Err(Error::usage(OP, format!("slots {} (1..=256), chunk {} (1..=2^30)", cfg.slots, cfg.chunk)));
        }
        let slot_size = HDR + cfg.chunk;
        let bytes = n.checked_mul(cfg.slots).and_then(|x| x.checked_mul(slot_size)).ok_or_else(|| Error::usage(OP, "slot region overflows"))?;
        let mut rx = vec![0u8; bytes.max(1)].into_boxed_slice();
        let hdrs = vec![[0u8; HDR]; n * cfg.slots];
        let io = |e: String| Error::Io { op: OP, peer: rank, detail: e };
        // SAFETY: both allocations live in `self` until Drop deregisters them (a Box/Vec never moves its heap buffer).
        let rx_mr = unsafe { v.register(rx.as_mut_ptr(), bytes) }.map_err(io)?;
        let cache = MrCache { on: v.cache_registrations(), map: HashMap::default(), clock: 0 };
        let mut st = State {
            peers: (0..n)
                .map(|_| Peer {
                    remote: None,
                    credits: 0,
                    tx_seq: 0,
                    rx_seq: 0,
                    owed: 0,
                    tx_queue: VecDeque::new(),
                    failed: None,
                    abort: false,
                    ctl: VecDeque::new(),
                    adverts: HashMap::default(),
                    revoked: HashSet::default(),
                    advs: vec![AdvSlot::Free; MAX_ADVERTS],
                    adv_next: 0,
                    adv_wait: VecDeque::new(),
                })
                .collect(),
            recvs: HashMap::default(),
            jobs: HashMap::default(),
            job_of: HashMap::default(),
            next_job: 1,
            hdrs,
            wcs: Vec::with_capacity(64),
            rotate: 0,
            cache,
        };
        let hdr_mr = unsafe { v.register(st.hdrs.as_mut_ptr() as *mut u8, n * cfg.slots * HDR) }.map_err(io)?;
        let zc_chunk = cfg.chunk.saturating_mul(ZC_CHUNK_MULT).min(1 << 30);
        let zc_min = ZC_MIN.min(zc_chunk);
        Ok(RdmaFabric { v, cfg, rank, n, slot_size, zc_min, zc_chunk, rx, rx_mr, hdr_mr, st: Mutex::new(st), name })
    }

    /// Messages of at least `min` bytes go zero-copy (`usize::MAX`: never), in writes of
    /// `chunk` bytes (1..=2^30). Both sides should agree (a disagreement only costs a fallback
    /// to the slots). Defaults: `min(256 KiB, 4 × chunk)` and `4 × chunk`.
    pub fn with_zero_copy(mut self, min: usize, chunk: usize) -> Self {
        self.zc_min = min.max(1);
        self.zc_chunk = chunk.clamp(1, 1 << 30);
        self
    }

    /// The zero-copy threshold in bytes.
    pub fn zero_copy_min(&self) -> usize {
        self.zc_min
    }

    /// The slots this rank reserved for messages from `src` (sent to `src` through the bootstrap).
    pub fn slots_for(&self, src: usize) -> RemoteSlots {
        RemoteSlots {
            addr: self.rx_mr.addr + (src * self.cfg.slots * self.slot_size) as u64,
            rkey: self.rx_mr.rkey,
            slots: self.cfg.slots,
            slot_size: self.slot_size,
        }
    }

    /// Install what every peer reserved for us (`remote[p]` = peer p's `slots_for(self.rank)`).
    pub fn connect(&self, remote: &[Option<RemoteSlots>]) -> Result<()> {
        let mut st = self.st.lock().unwrap();
        for p in 0..self.n {
            if p == self.rank {
                continue;
            }
            let r = remote.get(p).copied().flatten().ok_or_else(|| Error::Bootstrap(format!("rdma: no slot address from rank {p}")))?;
            if r.slots != self.cfg.slots || r.slot_size != self.slot_size {
                return Err(Error::Protocol {
                    op: "rdma connect",
                    peer: p,
                    detail: format!("slot geometry {}x{} B differs from ours {}x{} B", r.slots, r.slot_size, self.cfg.slots, self.slot_size),
                });
            }
            st.peers[p].remote = Some(r);
            st.peers[p].credits = self.cfg.slots;
        }
        Ok(())
    }

    pub fn verbs(&self) -> &V {
        &self.v
    }

    fn peer_err(&self, st: &State, p: usize, op: &'static str) -> Option<Error> {
        st.peers[p].failed.as_ref().map(|(proto, r)| match proto {
            true => Error::Protocol { op, peer: p, detail: r.clone() },
            false => Error::PeerFailed { op, peer: p, reason: r.clone() },
        })
    }

    /// One progress pass: poll, handle completions, return credits, post pending chunks.
    /// Returns whether anything happened.
    fn progress(&self, st: &mut State) -> bool {
        let mut wcs = std::mem::take(&mut st.wcs);
        wcs.clear();
        let got = self.v.poll(&mut wcs, 64);
        for wc in wcs.drain(..) {
            self.on_wc(st, wc);
        }
        st.wcs = wcs;
        let posted = self.post_pending(st);
        got > 0 || posted
    }

    fn on_wc(&self, st: &mut State, wc: Wc) {
        match wc {
            Wc::Send { peer, wr_id, status } => {
                if peer >= self.n {
                    return;
                }
                if let Err(e) = &status {
                    fail_peer(st, peer, format!("RDMA write failed: {e}"));
                }
                if wr_id & CREDIT_WR != 0 {
                    return;
                }
                if let Some(j) = st.jobs.get_mut(&wr_id) {
                    j.chunks_done += 1;
                    if let Err(e) = status {
                        j.err.get_or_insert(Error::PeerFailed { op: "rdma send", peer, reason: format!("RDMA write failed: {e}") });
                    }
                }
            }
            Wc::Recv { peer, imm, byte_len } => {
                if peer >= self.n || peer == self.rank || st.peers[peer].failed.is_some() {
                    return; // a failed peer's stream is out of sync: ignore the rest
                }
                if let Err(why) = self.on_recv(st, peer, imm, byte_len as usize) {
                    fail_peer_as(st, peer, true, why.clone());
                    // Tell the writer at once instead of letting it time out (posted by post_pending).
                    st.peers[peer].abort = true;
                    // Every message from that peer still pending now fails with a protocol error.
                    for ((src, _), e) in st.recvs.iter_mut() {
                        if *src == peer && !e.done && e.err.is_none() {
                            e.err = Some(Error::Protocol { op: "rdma recv", peer, detail: why.clone() });
                        }
                    }
                }
            }
        }
    }

    /// Decide how job `j` is delivered once it is known whether the receiver advertised a
    /// buffer large enough for it.
    fn start(&self, j: &mut SendJob, rb: Option<RemoteBuf>) {
        match rb {
            Some(rb) if j.len as u64 <= rb.cap && j.len > 0 => {
                j.mode = Mode::Zc { addr: rb.addr, rkey: rb.rkey, adv: rb.adv };
                j.chunks_total = j.len.div_ceil(self.zc_chunk);
            }
            _ => {
                j.mode = Mode::Eager;
                j.chunks_total = j.len.div_ceil(self.cfg.chunk).max(1);
            }
        }
    }

    /// Advertisement index `a` to peer `p` is free: hand it to a receive waiting for one.
    fn free_adv(st: &mut State, p: usize, a: usize) {
        st.peers[p].advs[a] = AdvSlot::Free;
        while let Some(tag) = st.peers[p].adv_wait.pop_front() {
            let Some(e) = st.recvs.get_mut(&(p, tag)) else { continue };
            if !e.adv_wait {
                continue;
            }
            let (Some((buf, cap)), Some(mr)) = (e.posted, e.mr) else { continue };
            e.adv_wait = false;
            e.adv = Some(a as u8);
            st.peers[p].advs[a] = AdvSlot::Active(tag);
            st.peers[p].ctl.push_back(Ctl::Advert { tag, adv: a as u8, addr: buf as u64, rkey: mr.mr.rkey, cap: cap as u64 });
            break;
        }
    }

    /// Register the posted buffer of `(p, tag)` and advertise it (or queue it for an index).
    /// On a registration failure the message simply goes through the slots.
    fn advertise(&self, st: &mut State, p: usize, tag: Tag, buf: usize, len: usize) {
        let mr = match st.cache.acquire(&self.v, buf, len, true) {
            Ok(mr) => mr,
            Err(e) => {
                let e2 = st.recvs.get_mut(&(p, tag)).expect("posted entry");
                if e2.direct {
                    // No slot fallback for device memory: the receive fails (the sender is told
                    // when the receive is withdrawn).
                    e2.discard = true;
                    e2.err = Some(Error::Io { op: "rdma recv", peer: p, detail: format!("registering a {len}-byte device buffer for GPUDirect RDMA: {e}") });
                } else {
                    tracing::debug!(peer = p, "rdma: registering a receive buffer failed ({e}); using the slots");
                }
                return;
            }
        };
        let State { peers, recvs, .. } = st;
        let peer = &mut peers[p];
        let e = recvs.get_mut(&(p, tag)).expect("posted entry");
        e.mr = Some(mr);
        match (0..MAX_ADVERTS).map(|i| (peer.adv_next + i) % MAX_ADVERTS).find(|&i| peer.advs[i] == AdvSlot::Free) {
            Some(a) => {
                peer.adv_next = a + 1;
                peer.advs[a] = AdvSlot::Active(tag);
                e.adv = Some(a as u8);
                peer.ctl.push_back(Ctl::Advert { tag, adv: a as u8, addr: buf as u64, rkey: mr.mr.rkey, cap: len as u64 });
            }
            None => {
                e.adv_wait = true;
                peer.adv_wait.push_back(tag);
            }
        }
    }

    /// The message `(p, tag)` will not be written zero-copy: release its registration and its
    /// advertisement (or its place in the queue for one). Returns whether it was advertised.
    fn unadvertise(&self, st: &mut State, p: usize, tag: Tag) -> bool {
        let Some(e) = st.recvs.get_mut(&(p, tag)) else { return false };
        let (mr, adv, waited) = (e.mr.take(), e.adv.take(), std::mem::take(&mut e.adv_wait));
        if let Some(mr) = mr {
            st.cache.release(&self.v, &mr, false);
        }
        if waited {
            st.peers[p].adv_wait.retain(|t| *t != tag);
        }
        if let Some(a) = adv {
            Self::free_adv(st, p, a as usize);
        }
        adv.is_some()
    }

    fn on_recv(&self, st: &mut State, p: usize, imm: u32, byte_len: usize) -> std::result::Result<(), String> {
        let s = self.cfg.slots;
        match Imm::decode(imm) {
            Imm::Credit { src, count } => {
                if src != p {
                    return Err(format!("credit immediate names rank {src} on rank {p}'s queue pair"));
                }
                if byte_len != 0 {
                    return Err(format!("credit write carries {byte_len} bytes"));
                }
                if count == ABORT {
                    fail_peer(st, p, format!("rank {p} rejected a malformed chunk from this rank and closed the stream"));
                    return Ok(());
                }
                let c = st.peers[p].credits + count as usize;
                if c > s {
                    return Err(format!("returned {count} credits, which would make {c} > {s} slots"));
                }
                st.peers[p].credits = c;
                Ok(())
            }
            Imm::Zc { src, adv, seq16 } => {
                let want = st.peers[p].rx_seq;
                if src != p {
                    return Err(format!("zero-copy immediate names rank {src} on rank {p}'s queue pair"));
                }
                if seq16 != want as u16 {
                    return Err(format!("zero-copy write out of sequence: seq {seq16}, expected {}", want as u16));
                }
                match st.peers[p].advs[adv] {
                    AdvSlot::Free => return Err(format!("zero-copy write of {byte_len} bytes for advertisement {adv}, which is not outstanding")),
                    AdvSlot::Revoked => {} // landed before the revocation; nobody waits for it
                    AdvSlot::Active(tag) => {
                        let e = st.recvs.get_mut(&(p, tag)).ok_or_else(|| format!("zero-copy write for {tag:?}, which is not posted"))?;
                        let Some(total) = e.total.filter(|_| e.announced) else {
                            return Err(format!("zero-copy write for {tag:?} before its announcement"));
                        };
                        let exp = (total - e.next_off).min(self.zc_chunk);
                        if byte_len != exp {
                            return Err(format!(
                                "short write: zero-copy chunk at offset {} of a {total}-byte message carries {byte_len} bytes, expected {exp}",
                                e.next_off
                            ));
                        }
                        e.next_off += byte_len;
                        if e.next_off == total {
                            e.done = true;
                            self.unadvertise(st, p, tag);
                        }
                    }
                }
                st.peers[p].rx_seq = want.wrapping_add(1);
                st.peers[p].owed += 1;
                Ok(())
            }
            Imm::Data { src, slot, seq16 } => {
                let want = st.peers[p].rx_seq;
                if src != p {
                    return Err(format!("data immediate names rank {src} on rank {p}'s queue pair"));
                }
                if slot != want as usize % s || seq16 != want as u16 {
                    return Err(format!("chunk out of sequence: slot {slot} seq {seq16}, expected slot {} seq {}", want as usize % s, want as u16));
                }
                if byte_len < HDR || byte_len > self.slot_size {
                    return Err(format!("write of {byte_len} bytes (slot holds {} + {} header)", self.cfg.chunk, HDR));
                }
                let base = (p * s + slot) * self.slot_size;
                let sl = &self.rx[base..base + self.slot_size];
                let h = Header::read(&sl[..HDR])?;
                let clen = h.chunk_len as usize;
                if h.src as usize != p || h.chunk_seq != want {
                    return Err(format!("header says rank {} chunk {}, expected rank {p} chunk {want}", h.src, h.chunk_seq));
                }
                if clen != byte_len - HDR {
                    return Err(format!("short write: header announces {clen} payload bytes, {} arrived", byte_len - HDR));
                }
                if h.kind != K_DATA {
                    if clen != 0 {
                        return Err(format!("control message of kind {} carries {clen} payload bytes", h.kind));
                    }
                    self.on_ctl(st, p, &h)?;
                    st.peers[p].rx_seq = want.wrapping_add(1);
                    st.peers[p].owed += 1;
                    return Ok(());
                }
                if clen > self.cfg.chunk || h.offset.checked_add(clen as u64).is_none_or(|e| e > h.total) {
                    return Err(format!("chunk [{}, +{clen}) outside the message of {} bytes", h.offset, h.total));
                }
                let total = usize::try_from(h.total).map_err(|_| "message too long".to_string())?;
                let off = h.offset as usize;
                let e = st.recvs.entry((p, h.tag)).or_default();
                if e.done || *e.total.get_or_insert(total) != total || off != e.next_off {
                    return Err(format!("chunk at offset {off} of {total} bytes does not continue message {:?} (at {}, done {})", h.tag, e.next_off, e.done));
                }
                if !e.eager {
                    // The sender uses the slots: an advertisement for this message is unused.
                    e.eager = true;
                    let announced = e.announced;
                    if self.unadvertise(st, p, h.tag) && !announced {
                        st.peers[p].ctl.push_back(Ctl::Revoke { tag: h.tag, adv: NO_ADV, why: R_PURGE });
                    }
                }
                let e = st.recvs.get_mut(&(p, h.tag)).unwrap();
                let payload = &sl[HDR..HDR + clen];
                if e.discard || e.err.is_some() {
                } else if let Some((buf, cap)) = e.posted {
                    if e.direct && total > 0 {
                        e.discard = true;
                        e.err = Some(Error::Protocol { op: "rdma recv", peer: p, detail: format!("a {total}-byte message for a device buffer came through the receive slots (the sender did not send it from device memory)") });
                    } else if total > cap {
                        e.discard = true;
                        e.err = Some(Error::Protocol { op: "rdma recv", peer: p, detail: format!("message of {total} bytes for a {cap}-byte buffer") });
                    } else {
                        // SAFETY: off + clen <= total <= cap: inside the posted buffer, valid until wait/cancel.
                        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), (buf as *mut u8).add(off), clen) };
                    }
                } else {
                    if total > STASH_MAX {
                        return Err(format!("unposted message of {total} bytes exceeds the stash limit"));
                    }
                    e.stash.extend_from_slice(payload);
                }
                e.next_off += clen;
                if e.next_off == total {
                    e.done = true;
                    if e.discard && e.posted.is_none() {
                        st.recvs.remove(&(p, h.tag)); // withdrawn: nobody waits for it
                    }
                }
                st.peers[p].rx_seq = want.wrapping_add(1);
                st.peers[p].owed += 1;
                Ok(())
            }
        }
    }

    /// A header-only control message from `p` (already checked: magic, checksum, sequence).
    fn on_ctl(&self, st: &mut State, p: usize, h: &Header) -> std::result::Result<(), String> {
        let tag = h.tag;
        match h.kind {
            K_ADVERT => {
                // We are the sender of `tag`.
                if h.adv as usize >= MAX_ADVERTS || h.total == 0 {
                    return Err(format!("advertisement {} of {} bytes for {tag:?}", h.adv, h.total));
                }
                let rb = RemoteBuf { addr: h.offset, rkey: h.aux, cap: h.total, adv: h.adv };
                if let Some(&jid) = st.job_of.get(&(p, tag)) {
                    let j = st.jobs.get_mut(&jid).unwrap();
                    match j.mode {
                        Mode::Wait => {
                            self.start(j, Some(rb));
                            st.peers[p].tx_queue.push_back(jid);
                        }
                        Mode::Eager => {} // below the threshold here: unused (the receiver sees the slots used)
                        Mode::Zc { .. } | Mode::Dropped => return Err(format!("second advertisement for {tag:?}")),
                    }
                } else if st.peers[p].adverts.insert(tag, rb).is_some() {
                    return Err(format!("second advertisement for {tag:?}"));
                }
            }
            K_RTS => {
                // We are the receiver of `tag`.
                let total = usize::try_from(h.total).ok().filter(|&t| t > 0 && t <= isize::MAX as usize);
                let Some(total) = total else { return Err(format!("announcement of a {}-byte message", h.total)) };
                let e = st.recvs.entry((p, tag)).or_default();
                if e.announced || e.total.is_some() || e.done {
                    return Err(format!("announcement of {tag:?}, which is already under way"));
                }
                e.announced = true;
                e.total = Some(total);
                if e.withdrawn {
                    // Cancelled here: the sender must not wait for an advertisement.
                    let tell = !e.revoked;
                    st.recvs.remove(&(p, tag));
                    if tell {
                        st.peers[p].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_CANCEL });
                    }
                    return Ok(());
                }
                let Some((_, cap)) = e.posted else { return Ok(()) }; // decided at post_recv
                let too_long = total > cap;
                if too_long {
                    e.discard = true;
                    e.err = Some(Error::Protocol { op: "rdma recv", peer: p, detail: format!("message of {total} bytes for a {cap}-byte buffer") });
                }
                if e.adv.is_some() {
                    if too_long {
                        // The sender sees the advertised length too and uses the slots (discarded here).
                        e.eager = true;
                        self.unadvertise(st, p, tag);
                    }
                } else if !e.adv_wait || too_long {
                    // Not advertised (below our threshold, registration failed) or never will be.
                    e.eager = true;
                    self.unadvertise(st, p, tag);
                    st.peers[p].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_EAGER });
                }
            }
            K_REVOKE => {
                // We are the sender of `tag`.
                if h.adv != NO_ADV {
                    if h.adv as usize >= MAX_ADVERTS {
                        return Err(format!("revoke of advertisement {}", h.adv));
                    }
                    // Posted after every write already posted for it: the receiver frees the index on it.
                    st.peers[p].ctl.push_back(Ctl::Ack { adv: h.adv });
                }
                let job = st.job_of.get(&(p, tag)).copied();
                match h.aux {
                    R_CANCEL => {
                        if let Some(jid) = job {
                            let j = st.jobs.get_mut(&jid).unwrap();
                            if matches!(j.mode, Mode::Wait | Mode::Zc { .. }) {
                                j.mode = Mode::Dropped;
                                j.chunks_total = j.chunks_posted;
                                st.peers[p].tx_queue.retain(|&x| x != jid);
                            }
                        } else if st.peers[p].adverts.remove(&tag).is_some() {
                            st.peers[p].revoked.insert(tag);
                        }
                    }
                    R_EAGER => {
                        if let Some(jid) = job {
                            let j = st.jobs.get_mut(&jid).unwrap();
                            match j.mode {
                                Mode::Wait => {
                                    self.start(j, None);
                                    st.peers[p].tx_queue.push_back(jid);
                                }
                                Mode::Zc { .. } => return Err(format!("told to use the slots for {tag:?}, advertised before")),
                                Mode::Eager | Mode::Dropped => {}
                            }
                        }
                    }
                    R_PURGE => {
                        st.peers[p].adverts.remove(&tag);
                    }
                    r => return Err(format!("revoke with unknown reason {r}")),
                }
            }
            K_ACK => {
                let a = h.adv as usize;
                if a >= MAX_ADVERTS || st.peers[p].advs[a] != AdvSlot::Revoked {
                    return Err(format!("acknowledgement of advertisement {a}, which is not revoked"));
                }
                Self::free_adv(st, p, a);
            }
            k => return Err(format!("unknown message kind {k}")),
        }
        Ok(())
    }

    /// Return owed credits, post control messages, then post chunks round-robin over peers.
    /// Returns whether anything was posted.
    fn post_pending(&self, st: &mut State) -> bool {
        let (n, s) = (self.n, self.cfg.slots);
        let mut any = false;
        // Aborts first (a full queue keeps them pending).
        for p in 0..n {
            if !st.peers[p].abort {
                continue;
            }
            let Some(r) = st.peers[p].remote else { continue };
            let imm = Imm::Credit { src: self.rank, count: ABORT }.encode();
            // SAFETY: zero-length write, no local memory.
            match unsafe { self.v.post_write_imm(p, CREDIT_WR | p as u64, &[], r.addr, r.rkey, imm) } {
                Err(PostError::QueueFull) => {}
                _ => st.peers[p].abort = false,
            }
        }
        for p in 0..n {
            if st.peers[p].failed.is_some() {
                st.peers[p].ctl.clear();
                continue;
            }
            let Some(r) = st.peers[p].remote else { continue };
            // Credits: a batch as soon as any slot was freed (latency); a full queue keeps them owed.
            let owed = st.peers[p].owed;
            if owed > 0 {
                let imm = Imm::Credit { src: self.rank, count: owed }.encode();
                // SAFETY: zero-length write, no local memory.
                match unsafe { self.v.post_write_imm(p, CREDIT_WR | p as u64, &[], r.addr, r.rkey, imm) } {
                    Ok(()) => {
                        st.peers[p].owed = 0;
                        any = true;
                    }
                    Err(PostError::QueueFull) => {}
                    Err(PostError::Fatal(e)) => {
                        fail_peer(st, p, format!("posting a credit return: {e}"));
                        continue;
                    }
                }
            }
            // Control messages, in order, each a header-only write into the next slot.
            while let Some(&c) = st.peers[p].ctl.front() {
                if st.peers[p].credits == 0 {
                    break;
                }
                let seq = st.peers[p].tx_seq;
                let slot = seq as usize % s;
                let hi = p * s + slot;
                c.header(self.rank as u16, seq).write(&mut st.hdrs[hi]);
                let sge = Sge { addr: self.hdr_mr.addr + (hi * HDR) as u64, len: HDR as u32, lkey: self.hdr_mr.lkey };
                let imm = Imm::Data { src: self.rank, slot, seq16: seq as u16 }.encode();
                // SAFETY: the header slot is not rewritten before this slot's credit returns.
                match unsafe { self.v.post_write_imm(p, CREDIT_WR | p as u64, &[sge], r.addr + (slot * r.slot_size) as u64, r.rkey, imm) } {
                    Ok(()) => {
                        let peer = &mut st.peers[p];
                        peer.ctl.pop_front();
                        peer.credits -= 1;
                        peer.tx_seq = seq.wrapping_add(1);
                        any = true;
                    }
                    Err(PostError::QueueFull) => break,
                    Err(PostError::Fatal(e)) => {
                        fail_peer(st, p, format!("posting a control message: {e}"));
                        break;
                    }
                }
            }
        }
        // Data: one chunk per peer per pass, starting at a rank-dependent peer (no incast).
        st.rotate = st.rotate.wrapping_add(1);
        loop {
            let mut progressed = false;
            for i in 1..n {
                let p = (self.rank + i + st.rotate) % n;
                if p == self.rank {
                    continue;
                }
                let peer = &st.peers[p];
                if peer.credits == 0 || peer.failed.is_some() || !peer.ctl.is_empty() {
                    continue;
                }
                let Some(&jid) = peer.tx_queue.front() else { continue };
                let r = peer.remote.expect("connected");
                let seq = peer.tx_seq;
                let slot = seq as usize % s;
                let j = st.jobs.get(&jid).expect("queued job exists");
                let off = j.next_off;
                let mut sges = [Sge { addr: 0, len: 0, lkey: 0 }; 2];
                let (clen, nsge, raddr, rkey, imm);
                if let Mode::Zc { addr, rkey: rk, adv } = j.mode {
                    // Straight into the advertised buffer: [addr + off, +clen) <= its length (checked at start).
                    clen = (j.len - off).min(self.zc_chunk);
                    let mr = j.mr.expect("non-empty send is registered").mr;
                    sges[0] = Sge { addr: (j.data + off) as u64, len: clen as u32, lkey: mr.lkey };
                    nsge = 1;
                    raddr = addr + off as u64;
                    rkey = rk;
                    imm = Imm::Zc { src: self.rank, adv: adv as usize, seq16: seq as u16 }.encode();
                } else {
                    clen = (j.len - off).min(self.cfg.chunk);
                    let h = Header { src: self.rank as u16, kind: K_DATA, adv: NO_ADV, chunk_len: clen as u32, tag: j.tag, total: j.len as u64, offset: off as u64, chunk_seq: seq, aux: 0 };
                    let hi = p * s + slot;
                    let hdr_addr = self.hdr_mr.addr + (hi * HDR) as u64;
                    let data = j.data;
                    let mr = j.mr;
                    h.write(&mut st.hdrs[hi]);
                    sges[0] = Sge { addr: hdr_addr, len: HDR as u32, lkey: self.hdr_mr.lkey };
                    nsge = if clen > 0 {
                        let mr = mr.expect("non-empty send is registered").mr;
                        sges[1] = Sge { addr: (data + off) as u64, len: clen as u32, lkey: mr.lkey };
                        2
                    } else {
                        1
                    };
                    raddr = r.addr + (slot * r.slot_size) as u64;
                    rkey = r.rkey;
                    imm = Imm::Data { src: self.rank, slot, seq16: seq as u16 }.encode();
                }
                // SAFETY: the header slot is not rewritten before the peer returns this slot's
                // credit (it has then read the write); the data stays valid until wait_send.
                match unsafe { self.v.post_write_imm(p, jid, &sges[..nsge], raddr, rkey, imm) } {
                    Ok(()) => {
                        progressed = true;
                        let j = st.jobs.get_mut(&jid).unwrap();
                        j.next_off += clen;
                        j.chunks_posted += 1;
                        let all = j.chunks_posted == j.chunks_total;
                        let peer = &mut st.peers[p];
                        peer.credits -= 1;
                        peer.tx_seq = seq.wrapping_add(1);
                        if all {
                            peer.tx_queue.pop_front();
                        }
                    }
                    Err(PostError::QueueFull) => {}
                    Err(PostError::Fatal(e)) => {
                        fail_peer(st, p, format!("posting an RDMA write: {e}"));
                    }
                }
            }
            if !progressed {
                break;
            }
            any = true;
        }
        any
    }

    /// Failing: get pending aborts out before the caller stops progressing (a full send queue
    /// kept them; the caller may never call in again).
    fn flush_aborts(&self, st: &mut State) {
        let mut tries = 0;
        while tries < 1000 && st.peers.iter().any(|p| p.abort) {
            self.progress(st);
            tries += 1;
        }
    }

    /// Progress until `done` says so, with back-off; time out naming `peer`.
    fn wait_for<T>(&self, peer: usize, w: &Wait, mut done: impl FnMut(&Self, &mut State) -> Option<Result<T>>) -> Result<T> {
        // Busy-poll 50 µs, yield until 250 µs, then sleep 20 µs doubling to 1 ms. The clock is
        // read every 32 passes while busy-polling (it was a tenth of the time spent waiting).
        // (Yielding up to 2 ms instead measured no better on 2 shared cores, and starved the
        // working threads when ranks outnumber cores: yielding threads stay runnable.)
        let mut idle_since: Option<Instant> = None;
        let mut sleep = Duration::from_micros(20);
        let (mut pass, mut spin) = (0u32, true);
        loop {
            {
                let mut st = self.st.lock().unwrap();
                let moved = self.progress(&mut st);
                if let Some(r) = done(self, &mut st) {
                    if r.is_err() {
                        self.flush_aborts(&mut st);
                    }
                    return r;
                }
                if moved {
                    idle_since = None;
                    sleep = Duration::from_micros(20);
                    spin = true;
                }
            }
            pass = pass.wrapping_add(1);
            if spin && pass % 32 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now >= w.deadline {
                return Err(Error::Timeout { op: w.op, peer, timeout: w.timeout });
            }
            let idle = now - *idle_since.get_or_insert(now);
            if idle < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else if idle < Duration::from_micros(250) {
                spin = false;
                std::thread::yield_now();
            } else {
                spin = false;
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(Duration::from_millis(1));
            }
        }
    }

    /// Forget the posted buffer (cancel, or a failed wait). The sender of an advertised buffer
    /// is told to stop; unless it acknowledges within [`CANCEL_WAIT`], the buffer is revoked:
    /// deregistered before this returns, so a write still on its way fails at the (emulated)
    /// NIC instead of landing. Chunks still to come through the slots are consumed and dropped.
    fn withdraw(&self, st: &mut State, src: usize, tag: Tag) {
        let Some(e) = st.recvs.get_mut(&(src, tag)) else { return };
        if e.done {
            let mr = e.mr.take();
            st.recvs.remove(&(src, tag));
            if let Some(mr) = mr {
                st.cache.release(&self.v, &mr, false);
            }
            return;
        }
        e.posted = None;
        e.discard = true;
        e.stash = Vec::new();
        e.withdrawn = true;
        e.err.get_or_insert(Error::PeerFailed { op: "rdma recv", peer: src, reason: "receive cancelled".into() });
        let (mr, mut adv, waited) = (e.mr.take(), e.adv.take(), std::mem::take(&mut e.adv_wait));
        let (announced, eager) = (e.announced, e.eager);
        if waited {
            st.peers[src].adv_wait.retain(|t| *t != tag);
        }
        if let Some(a) = adv {
            // Still queued here: the sender never saw it; nothing to revoke.
            let ctl = &mut st.peers[src].ctl;
            if let Some(i) = ctl.iter().position(|c| matches!(c, Ctl::Advert { tag: t, .. } if *t == tag)) {
                ctl.remove(i);
                Self::free_adv(st, src, a as usize);
                adv = None;
            }
        }
        let mut revoke = false;
        let mut remove = false;
        if let Some(a) = adv {
            st.peers[src].advs[a as usize] = AdvSlot::Revoked;
            st.peers[src].ctl.push_back(Ctl::Revoke { tag, adv: a, why: R_CANCEL });
            st.recvs.get_mut(&(src, tag)).unwrap().revoked = true;
            // Announced: the sender writes zero-copy or nothing, so nothing more comes for the entry.
            remove = announced;
            // A write already on its way would be rejected by the revoked registration, which
            // fails the connection at the sender (on RC: the QP goes to error). So first give
            // the sender a moment to acknowledge (every write it posted before lands first, into
            // a buffer still ours until we return); revoke only if it does not.
            revoke = !self.await_ack(st, src, a as usize);
        } else if announced && !eager {
            // The sender waits for an advertisement that will not come.
            st.peers[src].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_CANCEL });
            remove = true;
        }
        if let Some(mr) = mr {
            st.cache.release(&self.v, &mr, revoke);
        }
        if remove {
            st.recvs.remove(&(src, tag));
        }
    }

    /// Progress until peer `p` acknowledged the revoke of advertisement `a` (true), for at most
    /// [`CANCEL_WAIT`], or until the peer failed (false).
    fn await_ack(&self, st: &mut State, p: usize, a: usize) -> bool {
        let t0 = Instant::now();
        loop {
            if st.peers[p].advs[a] != AdvSlot::Revoked {
                return true; // acknowledged (the index may be in use again already)
            }
            if st.peers[p].failed.is_some() || t0.elapsed() >= CANCEL_WAIT {
                return false;
            }
            if !self.progress(st) {
                std::thread::yield_now();
            }
        }
    }
}

impl<V: Verbs> Drop for RdmaFabric<V> {
    fn drop(&mut self) {
        let st = self.st.get_mut().unwrap();
        let private = st.jobs.values().filter_map(|j| j.mr).chain(st.recvs.values().filter_map(|e| e.mr)).filter(|r| r.key.is_none());
        for r in private {
            self.v.deregister(&r.mr);
        }
        for e in st.cache.map.values() {
            self.v.deregister(&e.mr);
        }
        self.v.deregister(&self.hdr_mr);
        self.v.deregister(&self.rx_mr);
    }
}

impl<V: Verbs> RdmaFabric<V> {
    /// `post_recv`; `direct`: the buffer is device memory, every byte of it placed by the NIC
    /// (any non-empty message is advertised, whatever the zero-copy threshold).
    unsafe fn post_recv_as(&self, src: usize, tag: Tag, buf: *mut u8, len: usize, w: &Wait, direct: bool) -> Result<()> {
        if src >= self.n || src == self.rank {
            return Err(Error::usage(w.op, format!("post_recv from rank {src} on rank {} of {}", self.rank, self.n)));
        }
        let mut st = self.st.lock().unwrap();
        if let Some(e) = self.peer_err(&st, src, w.op) {
            self.flush_aborts(&mut st);
            return Err(e);
        }
        let zc_min = if direct { 1 } else { self.zc_min };
        let e = st.recvs.entry((src, tag)).or_default();
        if e.posted.is_some() || e.withdrawn {
            return Err(Error::usage(w.op, format!("receive from rank {src} for {tag:?} posted twice")));
        }
        e.posted = Some((buf as usize, len));
        e.direct = direct;
        let (mut advertise, mut eager_please) = (false, false);
        match e.total {
            Some(total) if total > len => {
                e.discard = true;
                e.stash = Vec::new();
                e.err = Some(Error::Protocol { op: w.op, peer: src, detail: format!("message of {total} bytes for a {len}-byte buffer") });
                if e.announced {
                    e.eager = true;
                    eager_please = true;
                }
            }
            Some(_) if e.announced => {
                // Announced zero-copy before we posted.
                if len >= zc_min {
                    advertise = true;
                } else {
                    e.eager = true;
                    eager_please = true;
                }
            }
            Some(total) if direct && total > 0 => {
                e.discard = true;
                e.stash = Vec::new();
                e.err = Some(Error::Protocol { op: w.op, peer: src, detail: format!("a {total}-byte message for a device buffer came through the receive slots (the sender did not send it from device memory)") });
            }
            Some(_) => {
                if !e.stash.is_empty() {
                    // SAFETY: stash.len() <= total <= len.
                    std::ptr::copy_nonoverlapping(e.stash.as_ptr(), buf, e.stash.len());
                    e.stash = Vec::new();
                }
            }
            None => advertise = len >= zc_min,
        }
        if eager_please {
            st.peers[src].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_EAGER });
        }
        if advertise {
            self.advertise(&mut st, src, tag, buf as usize, len);
        }
        if !st.peers[src].ctl.is_empty() {
            self.post_pending(&mut st); // the advertisement goes out now
        }
        Ok(())
    }

    /// `send`; `direct`: the data is device memory, so a non-empty message waits for the
    /// receiver's advertisement whatever its length (the NIC reads the data either way).
    unsafe fn send_as(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait, direct: bool) -> Result<()> {
        if dst >= self.n || dst == self.rank {
            return Err(Error::usage(w.op, format!("send to rank {dst} on rank {} of {}", self.rank, self.n)));
        }
        let mut st = self.st.lock().unwrap();
        if let Some(e) = self.peer_err(&st, dst, w.op) {
            self.flush_aborts(&mut st);
            return Err(e);
        }
        if st.job_of.contains_key(&(dst, tag)) {
            return Err(Error::usage(w.op, format!("send to rank {dst} for {tag:?} issued twice")));
        }
        let mr = if len > 0 {
            Some(st.cache.acquire(&self.v, data as usize, len, false).map_err(|e| Error::Io { op: w.op, peer: dst, detail: format!("registering the send buffer: {e}") })?)
        } else {
            None
        };
        let jid = st.next_job;
        st.next_job += 1;
        let mut j = SendJob { dst, tag, data: data as usize, len, mr, mode: Mode::Wait, next_off: 0, chunks_total: usize::MAX, chunks_posted: 0, chunks_done: 0, err: None };
        let peer = &mut st.peers[dst];
        let stashed = peer.adverts.remove(&tag);
        let revoked = peer.revoked.remove(&tag);
        if len >= if direct { 1 } else { self.zc_min } {
            // Announce it (the receiver learns the length; if it did not advertise, it answers).
            peer.ctl.push_back(Ctl::Rts { tag, len: len as u64 });
            if revoked {
                j.mode = Mode::Dropped;
                j.chunks_total = 0;
            } else if let Some(rb) = stashed {
                self.start(&mut j, Some(rb));
                peer.tx_queue.push_back(jid);
            }
        } else {
            self.start(&mut j, None);
            peer.tx_queue.push_back(jid);
        }
        st.jobs.insert(jid, j);
        st.job_of.insert((dst, tag), jid);
        self.progress(&mut st);
        Ok(())
    }
}

impl<V: Verbs> Fabric for RdmaFabric<V> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.n
    }
    fn name(&self) -> &'static str {
        self.name
    }

    unsafe fn post_recv(&self, src: usize, tag: Tag, buf: *mut u8, len: usize, w: &Wait) -> Result<()> {
        self.post_recv_as(src, tag, buf, len, w, false)
    }

    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        self.send_as(dst, tag, data, len, w, false)
    }

    fn probe_direct(&self, addr: u64, len: usize) -> std::result::Result<(), String> {
        // SAFETY: registered and released at once; nothing is posted on it.
        let mr = unsafe { self.v.register(addr as *mut u8, len) }?;
        self.v.deregister(&mr);
        Ok(())
    }

    unsafe fn post_recv_direct(&self, src: usize, tag: Tag, buf: *mut u8, len: usize, w: &Wait) -> Result<()> {
        self.post_recv_as(src, tag, buf, len, w, true)
    }

    unsafe fn send_direct(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        self.send_as(dst, tag, data, len, w, true)
    }
    fn wait_send(&self, dst: usize, tag: Tag, w: &Wait) -> Result<()> {
        let r = self.wait_for(dst, w, |me, st| {
            let Some(&jid) = st.job_of.get(&(dst, tag)) else {
                return Some(Err(Error::usage(w.op, format!("wait_send for {tag:?} to rank {dst} without a send"))));
            };
            let j = &st.jobs[&jid];
            if let Some(e) = &j.err {
                return Some(Err(e.clone().with_op(w.op)));
            }
            if j.chunks_done == j.chunks_total {
                return Some(Ok(()));
            }
            // All posted chunks flushed with errors, or the peer failed before we could post.
            me.peer_err(st, dst, w.op).map(Err)
        });
        // Done or failed: withdraw the job (a failed one is not posted further).
        let mut st = self.st.lock().unwrap();
        if let Some(jid) = st.job_of.remove(&(dst, tag)) {
            let j = st.jobs.remove(&jid).unwrap();
            st.peers[j.dst].tx_queue.retain(|&x| x != jid);
            if let Some(mr) = &j.mr {
                // With chunks still in flight (error path) a real NIC could still read the buffer;
                // deregistration makes such reads fail instead of touching freed memory.
                st.cache.release(&self.v, mr, j.chunks_done < j.chunks_posted);
            }
        }
        r
    }

    fn wait_recv(&self, src: usize, tag: Tag, w: &Wait) -> Result<usize> {
        let r = self.wait_for(src, w, |me, st| {
            let Some(e) = st.recvs.get(&(src, tag)) else {
                return Some(Err(Error::usage(w.op, format!("wait_recv for {tag:?} from rank {src} without a post"))));
            };
            if let Some(err) = &e.err {
                return Some(Err(err.clone().with_op(w.op)));
            }
            if e.done {
                return Some(Ok(e.total.unwrap_or(0)));
            }
            me.peer_err(st, src, w.op).map(Err)
        });
        let mut st = self.st.lock().unwrap();
        match &r {
            Ok(_) => {
                if let Some(mr) = st.recvs.remove(&(src, tag)).and_then(|e| e.mr) {
                    st.cache.release(&self.v, &mr, false);
                }
            }
            Err(_) => self.withdraw(&mut st, src, tag),
        }
        r
    }

    fn cancel_recv(&self, src: usize, tag: Tag) {
        let mut st = self.st.lock().unwrap();
        self.withdraw(&mut st, src, tag);
    }
}
