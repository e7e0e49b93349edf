//! The all-to-all protocol, written once over [`Verbs`]: an implementation of [`Fabric`].
//!
//! * Each receiver preallocates and registers, once, `slots` receive slots of
//!   `HDR + chunk` bytes per peer; the sender learns `{addr, rkey}` at connect time.
//! * A message is cut into chunks of at most `chunk` bytes (at least one chunk, so an empty
//!   message still arrives); each chunk is one RDMA WRITE WITH IMMEDIATE of `[header | payload]`
//!   (two sges: a registered header ring and the caller's registered buffer) into the next slot.
//!   The immediate (peer, slot, sequence) signals arrival; the header carries the tag, offset and
//!   total length, and is checked (magic, checksum, sequence, bounds) before a byte is copied out.
//! * Credits: a sender holds `slots` credits per peer and spends one per chunk; the receiver
//!   returns them in batches with a zero-length write whose immediate carries the count.
//! * Pipelining: pending chunks of all peers are posted round-robin (one per peer per pass,
//!   starting at a rank-dependent peer) as credits and send-queue room allow; a full send queue
//!   (`PostError::QueueFull`) only ends the pass.
//! * Progress is driven by whichever thread waits (poll, process, post), with back-off.
use super::verbs::{Imm, Mr, PostError, Sge, Verbs, Wc, MAX_RANKS, MAX_SLOTS};
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Bytes of the chunk header at the start of every slot.
pub const HDR: usize = 64;
const MAGIC: u32 = 0xE3B6_D7A1;
const CREDIT_WR: u64 = 1 << 63;
/// A credit return with this count tells the writer its stream was rejected (abort).
const ABORT: u32 = 0x00ff_ffff;
/// Largest message stashed for a receive not yet posted (per message).
const STASH_MAX: usize = 1 << 31;

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
    chunk_len: u32,
    tag: Tag,
    total: u64,
    offset: u64,
    chunk_seq: u32,
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
        b[6..8].copy_from_slice(&0u16.to_le_bytes());
        b[8..16].copy_from_slice(&self.tag.ctx.to_le_bytes());
        b[16..24].copy_from_slice(&self.tag.seq.to_le_bytes());
        b[24..28].copy_from_slice(&self.tag.round.to_le_bytes());
        b[28..32].copy_from_slice(&self.chunk_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.total.to_le_bytes());
        b[40..48].copy_from_slice(&self.offset.to_le_bytes());
        b[48..52].copy_from_slice(&self.chunk_seq.to_le_bytes());
        b[52..56].copy_from_slice(&0u32.to_le_bytes());
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
            tag: Tag { ctx: u64_at(8), seq: u64_at(16), round: u32_at(24) },
            chunk_len: u32_at(28),
            total: u64_at(32),
            offset: u64_at(40),
            chunk_seq: u32_at(48),
        })
    }
}

/// A message being received (posted, stashed, or both in turn).
#[derive(Default)]
struct RecvEntry {
    /// Posted landing buffer.
    posted: Option<(usize, usize)>,
    /// Total length announced by the first chunk.
    total: Option<usize>,
    next_off: usize,
    /// Bytes that arrived before the buffer was posted.
    stash: Vec<u8>,
    done: bool,
    /// Remaining chunks are consumed and dropped (cancelled, or too long for the buffer).
    discard: bool,
    err: Option<Error>,
}

struct SendJob {
    dst: usize,
    tag: Tag,
    data: usize,
    len: usize,
    mr: Option<Mr>,
    next_off: usize,
    chunks_total: usize,
    chunks_posted: usize,
    chunks_done: usize,
    err: Option<Error>,
}

struct Peer {
    remote: Option<RemoteSlots>,
    credits: usize,
    tx_seq: u32,
    rx_seq: u32,
    /// Slots consumed and not yet returned.
    owed: u32,
    /// Credit writes in flight (their completions).
    tx_queue: VecDeque<u64>,
    /// Why the peer is unusable (`true`: it sent something malformed).
    failed: Option<(bool, String)>,
    /// An abort for this peer's writer is still to be posted.
    abort: bool,
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
}

/// The RDMA protocol over any [`Verbs`] endpoint.
pub struct RdmaFabric<V: Verbs> {
    v: V,
    cfg: RdmaConfig,
    rank: usize,
    n: usize,
    slot_size: usize,
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
        let mut st = State {
            peers: (0..n)
                .map(|_| Peer { remote: None, credits: 0, tx_seq: 0, rx_seq: 0, owed: 0, tx_queue: VecDeque::new(), failed: None, abort: false })
                .collect(),
            recvs: HashMap::new(),
            jobs: HashMap::new(),
            job_of: HashMap::new(),
            next_job: 1,
            hdrs,
            wcs: Vec::with_capacity(64),
            rotate: 0,
        };
        let hdr_mr = unsafe { v.register(st.hdrs.as_mut_ptr() as *mut u8, n * cfg.slots * HDR) }.map_err(io)?;
        Ok(RdmaFabric { v, cfg, rank, n, slot_size, rx, rx_mr, hdr_mr, st: Mutex::new(st), name })
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
                if clen > self.cfg.chunk || h.offset.checked_add(clen as u64).is_none_or(|e| e > h.total) {
                    return Err(format!("chunk [{}, +{clen}) outside the message of {} bytes", h.offset, h.total));
                }
                let total = usize::try_from(h.total).map_err(|_| "message too long".to_string())?;
                let off = h.offset as usize;
                let e = st.recvs.entry((p, h.tag)).or_default();
                if e.done || *e.total.get_or_insert(total) != total || off != e.next_off {
                    return Err(format!("chunk at offset {off} of {total} bytes does not continue message {:?} (at {}, done {})", h.tag, e.next_off, e.done));
                }
                let payload = &sl[HDR..HDR + clen];
                if e.discard || e.err.is_some() {
                } else if let Some((buf, cap)) = e.posted {
                    if total > cap {
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

    /// Return owed credits, then post chunks round-robin over peers. Returns whether anything was posted.
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
        // Credits: a batch as soon as any slot was freed (latency); a full queue keeps them owed.
        for p in 0..n {
            let owed = st.peers[p].owed;
            if owed == 0 || st.peers[p].failed.is_some() {
                continue;
            }
            let Some(r) = st.peers[p].remote else { continue };
            let imm = Imm::Credit { src: self.rank, count: owed }.encode();
            // SAFETY: zero-length write, no local memory.
            match unsafe { self.v.post_write_imm(p, CREDIT_WR | p as u64, &[], r.addr, r.rkey, imm) } {
                Ok(()) => {
                    st.peers[p].owed = 0;
                    any = true;
                }
                Err(PostError::QueueFull) => {}
                Err(PostError::Fatal(e)) => fail_peer(st, p, format!("posting a credit return: {e}")),
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
                if peer.credits == 0 || peer.failed.is_some() {
                    continue;
                }
                let Some(&jid) = peer.tx_queue.front() else { continue };
                let r = peer.remote.expect("connected");
                let seq = peer.tx_seq;
                let slot = seq as usize % s;
                let j = st.jobs.get(&jid).expect("queued job exists");
                let off = j.next_off;
                let clen = (j.len - off).min(self.cfg.chunk);
                let h = Header { src: self.rank as u16, chunk_len: clen as u32, tag: j.tag, total: j.len as u64, offset: off as u64, chunk_seq: seq };
                let hi = p * s + slot;
                h.write(&mut st.hdrs[hi]);
                let hdr_addr = self.hdr_mr.addr + (hi * HDR) as u64;
                let mut sges = [Sge { addr: hdr_addr, len: HDR as u32, lkey: self.hdr_mr.lkey }, Sge { addr: 0, len: 0, lkey: 0 }];
                let nsge = if clen > 0 {
                    let mr = j.mr.expect("non-empty send is registered");
                    sges[1] = Sge { addr: (j.data + off) as u64, len: clen as u32, lkey: mr.lkey };
                    2
                } else {
                    1
                };
                let raddr = r.addr + (slot * r.slot_size) as u64;
                let imm = Imm::Data { src: self.rank, slot, seq16: seq as u16 }.encode();
                // SAFETY: the header slot is not rewritten before the peer returns this slot's
                // credit (it has then read the write); the data stays valid until wait_send.
                match unsafe { self.v.post_write_imm(p, jid, &sges[..nsge], raddr, r.rkey, imm) } {
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

    /// Progress until `done` says so, with back-off; time out naming `peer`.
    fn wait_for<T>(&self, peer: usize, w: &Wait, mut done: impl FnMut(&Self, &mut State) -> Option<Result<T>>) -> Result<T> {
        // Busy-poll 50 µs, yield until 250 µs, then sleep 20 µs doubling to 1 ms.
        let mut idle_since = Instant::now();
        let mut sleep = Duration::from_micros(20);
        loop {
            {
                let mut st = self.st.lock().unwrap();
                let moved = self.progress(&mut st);
                if let Some(r) = done(self, &mut st) {
                    // Failing: get pending aborts out before the caller stops progressing.
                    let mut tries = 0;
                    while r.is_err() && tries < 1000 && st.peers.iter().any(|p| p.abort) {
                        self.progress(&mut st);
                        tries += 1;
                    }
                    return r;
                }
                if moved {
                    idle_since = Instant::now();
                    sleep = Duration::from_micros(20);
                }
            }
            if Instant::now() >= w.deadline {
                return Err(Error::Timeout { op: w.op, peer, timeout: w.timeout });
            }
            let idle = idle_since.elapsed();
            if idle < Duration::from_micros(50) {
                std::hint::spin_loop();
            } else if idle < Duration::from_micros(250) {
                std::thread::yield_now();
            } else {
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(Duration::from_millis(1));
            }
        }
    }
}

impl<V: Verbs> Drop for RdmaFabric<V> {
    fn drop(&mut self) {
        let st = self.st.get_mut().unwrap();
        for j in st.jobs.values() {
            if let Some(mr) = &j.mr {
                self.v.deregister(mr);
            }
        }
        self.v.deregister(&self.hdr_mr);
        self.v.deregister(&self.rx_mr);
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
        if src >= self.n || src == self.rank {
            return Err(Error::usage(w.op, format!("post_recv from rank {src} on rank {} of {}", self.rank, self.n)));
        }
        let mut st = self.st.lock().unwrap();
        if let Some(e) = self.peer_err(&st, src, w.op) {
            return Err(e);
        }
        let e = st.recvs.entry((src, tag)).or_default();
        if e.posted.is_some() {
            return Err(Error::usage(w.op, format!("receive from rank {src} for {tag:?} posted twice")));
        }
        e.posted = Some((buf as usize, len));
        if let Some(total) = e.total {
            if total > len {
                e.discard = true;
                e.stash = Vec::new();
                e.err = Some(Error::Protocol { op: w.op, peer: src, detail: format!("message of {total} bytes for a {len}-byte buffer") });
            } else if !e.stash.is_empty() {
                // SAFETY: stash.len() <= total <= len.
                std::ptr::copy_nonoverlapping(e.stash.as_ptr(), buf, e.stash.len());
                e.stash = Vec::new();
            }
        }
        Ok(())
    }

    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        if dst >= self.n || dst == self.rank {
            return Err(Error::usage(w.op, format!("send to rank {dst} on rank {} of {}", self.rank, self.n)));
        }
        let mut st = self.st.lock().unwrap();
        if let Some(e) = self.peer_err(&st, dst, w.op) {
            return Err(e);
        }
        if st.job_of.contains_key(&(dst, tag)) {
            return Err(Error::usage(w.op, format!("send to rank {dst} for {tag:?} issued twice")));
        }
        let mr = if len > 0 {
            Some(self.v.register(data as *mut u8, len).map_err(|e| Error::Io { op: w.op, peer: dst, detail: format!("registering the send buffer: {e}") })?)
        } else {
            None
        };
        let jid = st.next_job;
        st.next_job += 1;
        let chunks_total = len.div_ceil(self.cfg.chunk).max(1);
        st.jobs.insert(jid, SendJob { dst, tag, data: data as usize, len, mr, next_off: 0, chunks_total, chunks_posted: 0, chunks_done: 0, err: None });
        st.job_of.insert((dst, tag), jid);
        st.peers[dst].tx_queue.push_back(jid);
        self.progress(&mut st);
        Ok(())
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
                self.v.deregister(mr);
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
                st.recvs.remove(&(src, tag));
            }
            Err(_) => Self::withdraw(&mut st, src, tag),
        }
        r
    }

    fn cancel_recv(&self, src: usize, tag: Tag) {
        let mut st = self.st.lock().unwrap();
        Self::withdraw(&mut st, src, tag);
    }
}

impl<V: Verbs> RdmaFabric<V> {
    /// Forget the posted buffer; chunks still to come for it are consumed and dropped.
    fn withdraw(st: &mut State, src: usize, tag: Tag) {
        if let Some(e) = st.recvs.get_mut(&(src, tag)) {
            if e.done {
                st.recvs.remove(&(src, tag));
            } else {
                e.posted = None;
                e.discard = true;
                e.stash = Vec::new();
                e.err.get_or_insert(Error::PeerFailed { op: "rdma recv", peer: src, reason: "receive cancelled".into() });
            }
        }
    }
}
