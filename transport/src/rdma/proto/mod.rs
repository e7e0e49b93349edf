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
//!   each chunk's length checked. A cancelled receive is revoked (the sender told to stop; unless
//!   it acknowledges within [`CANCEL_WAIT`], deregistered before `cancel_recv` returns, so a late
//!   write fails at the NIC).
//! * Credits: a sender holds `slots` credits per peer and spends one per write that raises an
//!   immediate (chunk, control message, zero-copy chunk); the receiver returns them in batches
//!   with a zero-length write whose immediate carries the count.
//! * Pipelining: pending chunks of all peers are posted round-robin (one per peer per pass,
//!   starting at a rank-dependent peer) as credits and send-queue room allow; a full send queue
//!   (`PostError::QueueFull`) only ends the pass. Control messages to a peer go before its data.
//! * Progress is driven by whichever thread waits (poll until the queue is empty, process, post),
//!   with back-off. Every arrival is handled before anything is posted: a revoke that arrived is
//!   never overtaken by a zero-copy write into the revoked buffer.
//!
//! Files: `header` (the wire format: chunk header, control messages), `mrcache` (memory
//! registrations), `state` (per-message and per-peer bookkeeping), `send` and `advert` (the
//! sending and the receiving side), `recv` (arrivals), `progress` (the driver and waiting).
mod advert;
pub(crate) mod header;
mod mrcache;
mod progress;
mod recv;
mod send;
mod state;

use super::verbs::{Mr, Verbs, MAX_ADVERTS, MAX_CREDIT, MAX_RANKS, MAX_SLOTS};
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use std::collections::{HashMap as StdHashMap, HashSet as StdHashSet, VecDeque};
use crate::mailbox::KeyHasher;
use std::hash::BuildHasherDefault;
use crate::spin::AdaptiveSpin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use mrcache::{MrCache, Owner};
use state::{AdvSlot, Peer, State};

/// The state maps hash with the matching table's cheap hasher (keys are small integers and
/// tags; SipHash was a tenth of the time of a small-message all-to-all).
type HashMap<K, V> = StdHashMap<K, V, BuildHasherDefault<KeyHasher>>;
type HashSet<K> = StdHashSet<K, BuildHasherDefault<KeyHasher>>;

/// Bytes of the chunk header at the start of every slot.
pub const HDR: usize = 64;
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
    /// The first failure that left the state unusable (a thread panicked holding it).
    first_failure: OnceLock<String>,
    /// Every peer has been disconnected after that failure.
    cut_all: AtomicBool,
    name: &'static str,
    /// The busy-poll phase of a wait, adapted by the waits (`progress::wait_for`).
    spin: AdaptiveSpin,
}

// SAFETY: raw addresses in the state are only dereferenced under the state lock, within the
// lifetime the Fabric contract guarantees.
unsafe impl<V: Verbs> Send for RdmaFabric<V> {}
// SAFETY: as for Send: shared access goes through the state lock or atomics.
unsafe impl<V: Verbs> Sync for RdmaFabric<V> {}

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
        let cache = MrCache::new(v.cache_registrations());
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
                    data_in_flight: 0,
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
        // SAFETY: the header ring is owned by the protocol state, which outlives its registration.
        let hdr_mr = unsafe { v.register(st.hdrs.as_mut_ptr() as *mut u8, n * cfg.slots * HDR) }.map_err(io)?;
        let zc_chunk = cfg.chunk.saturating_mul(ZC_CHUNK_MULT).min(1 << 30);
        let zc_min = ZC_MIN.min(zc_chunk);
        Ok(RdmaFabric {
            v,
            cfg,
            rank,
            n,
            slot_size,
            zc_min,
            zc_chunk,
            rx,
            rx_mr,
            hdr_mr,
            st: Mutex::new(st),
            first_failure: OnceLock::new(),
            cut_all: AtomicBool::new(false),
            name,
            spin: AdaptiveSpin::new(progress::SPIN),
        })
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

    /// The state, locked for `op`. After a thread panicked while holding it (the state may be
    /// half-updated), every call fails with an error naming that first failure, and every peer
    /// is disconnected (once), so no write of theirs lands in this rank's memory any more.
    fn state(&self, op: &'static str) -> Result<StGuard<'_>> {
        match self.st.lock() {
            Ok(g) => Ok(StGuard { g, first: &self.first_failure, op }),
            Err(_) => {
                if !self.cut_all.swap(true, Ordering::AcqRel) {
                    for p in (0..self.n).filter(|&p| p != self.rank) {
                        if let Err(e) = self.v.disconnect(p) {
                            tracing::error!("rdma: disconnecting rank {p} after a failure: {e}");
                        }
                    }
                }
                let first = self.first_failure.get().map_or("a thread panicked while it held the endpoint's state", |s| s.as_str());
                Err(Error::Io { op, peer: self.rank, detail: format!("the RDMA endpoint is unusable: {first}") })
            }
        }
    }

    /// Install what every peer reserved for us (`remote[p]` = peer p's `slots_for(self.rank)`).
    pub fn connect(&self, remote: &[Option<RemoteSlots>]) -> Result<()> {
        let mut st = self.state("rdma connect")?;
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

    /// Disconnect peer `p` for good and fail it (`why`): what revoking the registration of
    /// region `region`, shared with other messages, comes to. Should the disconnect itself fail,
    /// the region is deregistered under everyone (its other messages fail too).
    fn cut_off(&self, st: &mut State, p: usize, region: u64, why: &str) {
        state::fail_peer(st, p, format!("disconnected: {why}"));
        // Once the queue pair is in the error state, every write posted to `p` completes (with a
        // flush error); a write the NIC is reading out is over only then, so wait for them all.
        let flushed = self.v.disconnect(p).and_then(|()| self.await_flush(st, p));
        if let Err(e) = flushed {
            tracing::error!("rdma: cutting rank {p} off failed ({e}); deregistering the shared region instead");
            st.cache.drop_region(&self.v, region);
        }
    }

    /// Progress until every data write posted to `p` has completed, for at most [`CANCEL_WAIT`].
    fn await_flush(&self, st: &mut State, p: usize) -> std::result::Result<(), String> {
        let t0 = std::time::Instant::now();
        while st.peers[p].data_in_flight > 0 {
            if t0.elapsed() >= CANCEL_WAIT {
                return Err(format!("{} writes to rank {p} not flushed after {CANCEL_WAIT:?}", st.peers[p].data_in_flight));
            }
            if !self.progress(st) {
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    fn peer_err(&self, st: &State, p: usize, op: &'static str) -> Option<Error> {
        st.peers[p].failed.as_ref().map(|(proto, r)| match proto {
            true => Error::Protocol { op, peer: p, detail: r.clone() },
            false => Error::PeerFailed { op, peer: p, reason: r.clone() },
        })
    }
}

/// The locked state: records, when its holder panics, that this was the first failure.
struct StGuard<'a> {
    g: MutexGuard<'a, State>,
    first: &'a OnceLock<String>,
    op: &'static str,
}

impl std::ops::Deref for StGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.g
    }
}

impl std::ops::DerefMut for StGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.g
    }
}

impl Drop for StGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let t = std::thread::current();
            let name = t.name().unwrap_or("unnamed");
            let op = self.op;
            self.first.get_or_init(|| format!("thread '{name}' panicked in {op} while it held the endpoint's state"));
        }
    }
}

impl<V: Verbs> Drop for RdmaFabric<V> {
    fn drop(&mut self) {
        // After a panic the state may be half-updated; its registrations are released anyway.
        let st = self.st.get_mut().unwrap_or_else(|e| e.into_inner());
        let private = st.jobs.values().filter_map(|j| j.mr).chain(st.recvs.values().filter_map(|e| e.mr)).filter(|r| r.owner == Owner::Private);
        for r in private {
            self.v.deregister(&r.mr);
        }
        for e in st.cache.map.values() {
            self.v.deregister(&e.mr);
        }
        for mr in st.cache.regions.values().map(|r| r.mr) {
            self.v.deregister(&mr);
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
        // SAFETY: this function's contract is the one `post_recv_as` needs.
        unsafe { self.post_recv_as(src, tag, buf, len, w, false) }
    }

    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        // SAFETY: this function's contract is the one `send_as` needs.
        unsafe { self.send_as(dst, tag, data, len, w, false) }
    }

    fn probe_direct(&self, addr: u64, len: usize) -> std::result::Result<(), String> {
        // SAFETY: registered and released at once; nothing is posted on it.
        let mr = unsafe { self.v.register(addr as *mut u8, len) }?;
        self.v.deregister(&mr);
        Ok(())
    }

    unsafe fn register_region(&self, addr: u64, len: usize) -> Result<()> {
        const OP: &str = "register region";
        self.state(OP)?.cache.check_region(addr, len).map_err(|e| Error::usage(OP, e))?;
        // Registering pins the memory (milliseconds for large regions): outside the state lock,
        // so progress on every communicator goes on meanwhile.
        // SAFETY: the memory stays allocated until `unregister_region` or the fabric's drop,
        // both of which deregister it (this function's contract).
        let mr = unsafe { self.v.register(addr as *mut u8, len) }.map_err(|e| Error::Io { op: OP, peer: self.rank, detail: e })?;
        let mut st = self.state(OP)?;
        if let Err(e) = st.cache.check_region(addr, len) {
            drop(st);
            self.v.deregister(&mr); // another thread registered an overlapping region meanwhile
            return Err(Error::usage(OP, e));
        }
        st.cache.insert_region(addr, len, mr);
        Ok(())
    }

    fn unregister_region(&self, addr: u64) -> Result<()> {
        let mut st = self.state("unregister region")?;
        st.cache.unregister_region(&self.v, addr).map_err(|e| Error::usage("unregister region", e))
    }

    unsafe fn post_recv_direct(&self, src: usize, tag: Tag, buf: *mut u8, len: usize, w: &Wait) -> Result<()> {
        // SAFETY: this function's contract is the one `post_recv_as` needs.
        unsafe { self.post_recv_as(src, tag, buf, len, w, true) }
    }

    unsafe fn send_direct(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        // SAFETY: this function's contract is the one `send_as` needs.
        unsafe { self.send_as(dst, tag, data, len, w, true) }
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
        self.cancel_send(dst, tag);
        r
    }

    /// Forget the send job: no chunk of it is posted any more, and its registration goes.
    fn cancel_send(&self, dst: usize, tag: Tag) {
        // An unusable endpoint has disconnected every peer: nothing reads the buffer any more.
        let Ok(mut st) = self.state("cancel_send") else { return };
        if let Some(jid) = st.job_of.remove(&(dst, tag)) {
            st.peers[dst].tx_queue.retain(|&x| x != jid);
            if st.jobs[&jid].chunks_done < st.jobs[&jid].chunks_posted {
                self.progress(&mut st); // completions already queued count (nothing more is posted)
            }
            let j = st.jobs.remove(&jid).unwrap();
            if let Some(mr) = &j.mr {
                // With chunks still in flight (error path) a real NIC could still read the buffer;
                // deregistration makes such reads fail instead of touching freed memory. A
                // region's registration stays (other messages use it): the peer is cut off.
                if let Some(region) = st.cache.release(&self.v, mr, j.chunks_done < j.chunks_posted) {
                    self.cut_off(&mut st, j.dst, region, "a send from a registered region was abandoned with writes in flight");
                }
            }
        }
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
        let mut st = self.state(w.op)?;
        match &r {
            Ok(_) => {
                if let Some(mr) = st.recvs.remove(&(src, tag)).and_then(|e| e.mr) {
                    let _ = st.cache.release(&self.v, &mr, false);
                }
            }
            Err(_) => self.withdraw(&mut st, src, tag),
        }
        r
    }

    fn cancel_recv(&self, src: usize, tag: Tag) {
        // An unusable endpoint has disconnected every peer: nothing writes the buffer any more.
        let Ok(mut st) = self.state("cancel_recv") else { return };
        self.withdraw(&mut st, src, tag);
    }
}
