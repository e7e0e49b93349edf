//! Shared-memory backend for processes on one host.
//!
//! Each rank owns an inbox file in /dev/shm holding one single-producer ring per source rank
//! (mapped by that source for writing). Small messages travel eagerly through the ring (64-byte
//! records: header + payload). Large ones are announced (RTS: address and length in the sender's
//! address space) and the receiver copies them *once*, straight from the sender's buffer into its
//! posted buffer, with process_vm_readv (cross-memory attach), then returns a FIN record.
//!
//! Advertised receives (one copy, no announce round trip): next to each ring the receiver keeps
//! `ADV_SLOTS` advertisement slots for that source. `post_recv` of a buffer larger than the eager
//! limit publishes `{tag, addr, cap}` in a free slot (state word `gen << 2 | POSTED`). A sender
//! that finds the advertisement for its message claims it with a compare-and-swap (POSTED ->
//! CLAIMED; the generation in the word defeats ABA), writes straight into the receiver's buffer
//! with process_vm_writev (the kernel validates the target range; the sender checked `len <= cap`
//! first), stores the length and sets WRITTEN. The receiver sees WRITTEN while polling, re-checks
//! the length against its own record of the posted capacity, and completes. Without an
//! advertisement (the receiver is behind) the sender falls back to RTS; the receiver then revokes
//! its advertisement (CAS POSTED -> FREE) before touching the buffer. `cancel_recv` revokes the
//! same way and, if a writer has claimed the slot, waits until it is WRITTEN (or the writer's
//! process is gone) before returning, so no writer touches a cancelled buffer.
//!
//! There is no progress thread: whichever thread of the process waits drains the rings. Every
//! header read from shared memory is bounds-checked; a bad one fails the peer, never an OOB access.
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use crate::mailbox::{Dir, Mailbox, Posted};
use bytemuck::{Pod, Zeroable};
use crossbeam_utils::{Backoff, CachePadded};
use memmap2::MmapMut;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Ring capacity per (source, destination) pair.
pub(crate) const RING_CAP: usize = 1 << 20;
const HDR: usize = 64;
const CTL: usize = std::mem::size_of::<RingCtl>();
/// Advertisement slots per (source, destination) pair (outstanding advertised receives).
pub(crate) const ADV_SLOTS: usize = 16;
const ADV_BYTES: usize = ADV_SLOTS * std::mem::size_of::<Adv>();
const REGION: usize = CTL + ADV_BYTES + RING_CAP;
/// Messages up to this many bytes go through the ring; larger ones are fetched by the receiver.
fn eager_max() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("EMBER_SHM_EAGER").ok().and_then(|s| s.parse().ok()).unwrap_or(8 << 10).min(RING_CAP / 4)
    })
}

/// `EMBER_SHM_DIRECT=0` disables advertised receives (every large message goes through RTS).
fn direct_enabled() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("EMBER_SHM_DIRECT").map_or(true, |v| v != "0"))
}

/// Path counters (`EMBER_SHM_STATS=1` prints them when the fabric is dropped): eager sends,
/// direct writes at send, direct writes after an RTS, RTS fetches, RTS superseded by a write.
static STATS: [AtomicU64; 5] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
fn stats_on() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var_os("EMBER_SHM_STATS").is_some())
}
fn stat(i: usize) {
    if stats_on() {
        STATS[i].fetch_add(1, Ordering::Relaxed);
    }
}

const PAD: u32 = 1;
const EAGER: u32 = 2;
const RTS: u32 = 3;
const FIN: u32 = 4;

#[repr(C)]
struct RingCtl {
    head: CachePadded<AtomicU64>,
    tail: CachePadded<AtomicU64>,
}

/// One advertised receive buffer, in the receiver's inbox (written by the receiver, claimed and
/// completed by the sender). `state` = `gen << 2 | A_*`; only the receiver changes `gen` and
/// only while the slot is not claimed.
#[repr(C, align(64))]
struct Adv {
    state: AtomicU64,
    ctx: AtomicU64,
    seq: AtomicU64,
    round: AtomicU64,
    addr: AtomicU64,
    cap: AtomicU64,
    len: AtomicU64,
}
const _: () = assert!(std::mem::size_of::<Adv>() == 64);
const A_FREE: u64 = 0;
const A_POSTED: u64 = 1;
const A_CLAIMED: u64 = 2;
const A_WRITTEN: u64 = 3;
/// `len` value a sender stores when its write failed.
const A_LEN_FAILED: u64 = u64::MAX;
/// Flag in `len`: the sender announced this message by RTS before it claimed the slot, so an
/// RTS record is (or was) on its way and must be dropped when it arrives.
const A_LEN_AFTER_RTS: u64 = 1 << 62;

/// The receiver's private record of one advertisement (the shared copy is not trusted).
#[derive(Clone, Copy)]
struct LocalAdv {
    tag: Tag,
    cap: usize,
    gen: u64,
    /// The sender's RTS for this message has been drained (or the receive was deferred on it).
    rts_seen: bool,
}

/// Receiver-side advertisement table: `slots[src][k]`, and the generation last used per slot.
struct AdvTable {
    slots: Vec<Vec<Option<LocalAdv>>>,
    gens: Vec<Vec<u64>>,
    /// RTS records still to come for messages a sender wrote directly after announcing them
    /// (dropped on arrival instead of being matched again).
    superseded: Vec<(usize, Tag)>,
    /// Receives posted after their RTS arrived (the sender is ahead, idle in its wait): instead
    /// of fetching while busy posting and sending, we advertise and let the sender write; when
    /// we wait ourselves (`run_deferred`) and it has not claimed yet, we revoke and fetch.
    deferred: Vec<Deferred>,
}

#[derive(Clone, Copy)]
struct Deferred {
    src: usize,
    tag: Tag,
    addr: u64,
    buf: usize,
    len: usize,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct Rec {
    kind: u32,
    round: u32,
    ctx: u64,
    seq: u64,
    /// Bytes of payload in the ring (EAGER), of the whole record (PAD), or of the message (RTS).
    len: u64,
    /// RTS: address of the data in the sender.
    addr: u64,
    _pad: [u64; 3],
}
const _: () = assert!(std::mem::size_of::<Rec>() == HDR);

fn rec_len(payload: usize) -> usize {
    HDR + payload.div_ceil(HDR) * HDR
}

/// A rank's inbox file, created before the rendezvous so peers can map it.
pub(crate) struct Inbox {
    pub path: PathBuf,
    file: File,
    map: MmapMut,
}

impl Inbox {
    pub fn create(size: usize, rank: usize, token: &str) -> Result<Inbox> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in token.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = PathBuf::from(format!("/dev/shm/ember-{h:016x}-{}-{rank}-{nonce:08x}", std::process::id()));
        let err = |e: std::io::Error| Error::Bootstrap(format!("shared-memory inbox {}: {e}", path.display()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(err)?;
        file.set_len((size * REGION) as u64).map_err(err)?;
        // SAFETY: a fresh file of ours; other processes only touch it through the ring protocol.
        let mut map = unsafe { memmap2::MmapOptions::new().populate().map_mut(&file) }.map_err(err)?;
        // Touch every page now, so the rings never page-fault on the data path.
        map.fill(0);
        Ok(Inbox { path, file, map })
    }
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Ring(*mut u8);
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}
impl Ring {
    fn ctl(&self) -> &RingCtl {
        // SAFETY: the region starts with a RingCtl (zero-initialised file, atomics valid for any bits).
        unsafe { &*(self.0 as *const RingCtl) }
    }
    fn data(&self) -> *mut u8 {
        // SAFETY: the data area follows the control block and the adverts inside the same mapping.
        unsafe { self.0.add(CTL + ADV_BYTES) }
    }
    fn adv(&self, k: usize) -> &Adv {
        debug_assert!(k < ADV_SLOTS);
        // SAFETY: ADV_SLOTS slots of 64 bytes follow the control block (zeroed file: valid atomics).
        unsafe { &*(self.0.add(CTL + k * std::mem::size_of::<Adv>()) as *const Adv) }
    }
}

struct Producer {
    ring: Ring,
    head: u64,
}

struct Drain {
    tails: Vec<u64>,
    last_liveness: Instant,
}

pub(crate) struct ShmFabric {
    rank: usize,
    pids: Vec<u32>,
    mb: Mailbox,
    inbox: Inbox,
    _peer_maps: Vec<Option<MmapMut>>,
    /// `rx[s]`: the ring from s in our inbox.
    rx: Vec<Ring>,
    /// `tx[d]`: our ring in d's inbox.
    tx: Vec<Option<Mutex<Producer>>>,
    drain: Mutex<Drain>,
    /// FIN records that found their ring full; flushed by `poll`.
    pending: Mutex<Vec<(usize, Rec)>>,
    /// `txa[d]`: the advertisement slots d keeps for us (in d's inbox).
    txa: Vec<Option<Ring>>,
    /// Our advertisements, per source.
    adv: Mutex<AdvTable>,
    /// Advertisements outstanding (poll skips the scan when zero).
    adv_live: AtomicUsize,
    /// Sends announced by RTS and not released yet: `poll` keeps looking for the receiver's
    /// advertisement, and whoever claims it first (we by CAS POSTED -> CLAIMED, the receiver by
    /// revoking it when the RTS arrives) makes the one copy. Removed by `wait_send`.
    rts_out: Mutex<Vec<(usize, Tag, usize, usize)>>,
    /// `rts_out.len()`, read without the lock by `poll` and `wait_send` to skip it when empty.
    rts_n: AtomicUsize,
}

impl ShmFabric {
    /// Map every peer's inbox. `paths[r]`/`pids[r]` come from the rendezvous.
    pub fn new(rank: usize, inbox: Inbox, paths: &[String], pids: Vec<u32>) -> Result<ShmFabric> {
        let n = paths.len();
        let mut maps = Vec::with_capacity(n);
        let mut tx = Vec::with_capacity(n);
        let mut txa = Vec::with_capacity(n);
        for (d, p) in paths.iter().enumerate() {
            if d == rank {
                maps.push(None);
                tx.push(None);
                txa.push(None);
                continue;
            }
            let err = |e: std::io::Error| Error::Bootstrap(format!("map rank {d}'s inbox {p}: {e}"));
            let f = std::fs::OpenOptions::new().read(true).write(true).open(p).map_err(err)?;
            if f.metadata().map_err(err)?.len() != (n * REGION) as u64 {
                return Err(Error::Bootstrap(format!("rank {d}'s inbox {p} has the wrong size")));
            }
            // SAFETY: shared mapping of a peer's inbox; accessed only through the ring protocol.
            let mut m = unsafe { memmap2::MmapOptions::new().populate().map_mut(&f) }.map_err(err)?;
            let ring = Ring(unsafe { m.as_mut_ptr().add(rank * REGION) });
            txa.push(Some(Ring(ring.0)));
            tx.push(Some(Mutex::new(Producer { ring, head: 0 })));
            maps.push(Some(m));
        }
        let base = inbox.map.as_ptr() as *mut u8;
        let rx = (0..n).map(|s| Ring(unsafe { base.add(s * REGION) })).collect();
        let _ = &inbox.file;
        Ok(ShmFabric {
            rank,
            pids,
            mb: Mailbox::new_polling(),
            inbox,
            _peer_maps: maps,
            rx,
            tx,
            drain: Mutex::new(Drain { tails: vec![0; n], last_liveness: Instant::now() }),
            pending: Mutex::new(Vec::new()),
            txa,
            adv: Mutex::new(AdvTable { slots: vec![vec![None; ADV_SLOTS]; n], gens: vec![vec![0; ADV_SLOTS]; n], deferred: Vec::new(), superseded: Vec::new() }),
            adv_live: AtomicUsize::new(0),
            rts_out: Mutex::new(Vec::new()),
            rts_n: AtomicUsize::new(0),
        })
    }

    pub fn unlink_inbox(&self) {
        self.inbox.unlink();
    }

    fn proto(&self, peer: usize, detail: String) -> Error {
        let e = Error::Protocol { op: "shm", peer, detail };
        self.mb.peer_died(peer, e.to_string());
        e
    }

    /// Append one record to `dst`'s ring; `Ok(false)` when it does not fit now.
    fn try_push(&self, dst: usize, rec: &Rec, payload: &[u8]) -> Result<bool> {
        let mut p = self.tx[dst].as_ref().expect("never sends to self").lock().unwrap_or_else(|e| e.into_inner());
        let tail = p.ring.ctl().tail.load(Ordering::Acquire);
        if p.head < tail || p.head - tail > RING_CAP as u64 {
            return Err(self.proto(dst, format!("ring tail {tail} inconsistent with head {}", p.head)));
        }
        let len = rec_len(payload.len());
        let idx = (p.head % RING_CAP as u64) as usize;
        let to_end = RING_CAP - idx;
        let need = if len <= to_end { len } else { to_end + len };
        if RING_CAP - ((p.head - tail) as usize) < need {
            return Ok(false);
        }
        let data = p.ring.data();
        // SAFETY: idx + len <= RING_CAP (or we pad to the end first); the consumer does not read
        // beyond `head`, which we publish after writing.
        unsafe {
            let mut at = idx;
            if len > to_end {
                let pad = Rec { kind: PAD, len: to_end as u64, ..Rec::zeroed() };
                std::ptr::copy_nonoverlapping(bytemuck::bytes_of(&pad).as_ptr(), data.add(idx), HDR);
                p.head += to_end as u64;
                at = 0;
            }
            std::ptr::copy_nonoverlapping(bytemuck::bytes_of(rec).as_ptr(), data.add(at), HDR);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), data.add(at + HDR), payload.len());
        }
        p.head += len as u64;
        p.ring.ctl().head.store(p.head, Ordering::Release);
        Ok(true)
    }

    fn push_wait(&self, dst: usize, rec: &Rec, payload: &[u8], w: &Wait) -> Result<()> {
        let backoff = Backoff::new();
        loop {
            if self.try_push(dst, rec, payload)? {
                return Ok(());
            }
            self.poll()?;
            if let Some(r) = self.mb.lock().dead.get(&dst) {
                return Err(Error::PeerFailed { op: w.op, peer: dst, reason: r.clone() });
            }
            if Instant::now() >= w.deadline {
                return Err(Error::Timeout { op: w.op, peer: dst, timeout: w.timeout });
            }
            if backoff.is_completed() {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                backoff.snooze();
            }
        }
    }

    fn send_fin(&self, dst: usize, tag: Tag) -> Result<()> {
        let rec = Rec { kind: FIN, round: tag.round, ctx: tag.ctx, seq: tag.seq, ..Rec::zeroed() };
        if !self.try_push(dst, &rec, &[])? {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).push((dst, rec));
        }
        Ok(())
    }

    /// Copy `len` bytes at `addr` in rank `src` into `buf` (one copy), then release the sender.
    fn fetch(&self, src: usize, tag: Tag, addr: u64, buf: *mut u8, len: usize) -> Result<()> {
        let pid = self.pids[src];
        let r = if pid == std::process::id() {
            // Same process (ranks as threads): the sender's buffer is in our address space.
            // SAFETY: the sender keeps it alive until our FIN; len was checked against the post.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf, len) };
            Ok(())
        } else {
            cma(pid, buf, addr, len, false)
        };
        match r {
            Ok(()) => self.mb.complete(src, tag, Dir::Recv, len),
            Err(e) => self.mb.fail(src, tag, Dir::Recv, Error::Io { op: "shm fetch", peer: src, detail: e.to_string() }),
        }
        self.send_fin(src, tag)
    }

    fn forget_rts(&self, dst: usize, tag: Tag) {
        if self.rts_n.load(Ordering::Acquire) == 0 {
            return; // nothing queued (entries are only added by this thread's `send`, or gone)
        }
        let mut out = self.rts_out.lock().unwrap_or_else(|e| e.into_inner());
        out.retain(|&(d, t, _, _)| (d, t) != (dst, tag));
        self.rts_n.store(out.len(), Ordering::Release);
    }

    fn adv_lock(&self) -> std::sync::MutexGuard<'_, AdvTable> {
        self.adv.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish the buffer posted for `(src, tag)` so `src` can write into it directly; false
    /// when every slot for `src` is in use (the message then comes through RTS).
    fn advertise(&self, src: usize, tag: Tag, buf: *mut u8, cap: usize) -> bool {
        let mut t = self.adv_lock();
        // Under the table lock (which the ring drain holds from revoking to claiming): if another
        // thread already claimed the buffer for a ring or RTS delivery, do not advertise it.
        if !matches!(self.mb.lock().map.get(&(src, tag, Dir::Recv)), Some(crate::mailbox::Slot::Posted { .. })) {
            return false;
        }
        self.advertise_in(&mut t, src, tag, buf, cap)
    }

    fn advertise_in(&self, t: &mut AdvTable, src: usize, tag: Tag, buf: *mut u8, cap: usize) -> bool {
        let Some(k) = t.slots[src].iter().position(|a| a.is_none()) else { return false };
        let gen = t.gens[src][k] + 1;
        t.gens[src][k] = gen;
        let a = self.rx[src].adv(k);
        a.ctx.store(tag.ctx, Ordering::Relaxed);
        a.seq.store(tag.seq, Ordering::Relaxed);
        a.round.store(tag.round as u64, Ordering::Relaxed);
        a.addr.store(buf as u64, Ordering::Relaxed);
        a.cap.store(cap as u64, Ordering::Relaxed);
        a.len.store(0, Ordering::Relaxed);
        a.state.store(gen << 2 | A_POSTED, Ordering::Release);
        t.slots[src][k] = Some(LocalAdv { tag, cap, gen, rts_seen: false });
        self.adv_live.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Withdraw our advertisement for `(src, tag)`, if any. `Ok(())`: there is none (any more),
    /// no writer can claim it now. `Err(state)`: a writer claimed it (the slot stays recorded);
    /// with `force`, a slot that is no longer claimed (written, or a corrupt state) is dropped.
    fn revoke(&self, src: usize, tag: Tag, force: bool) -> std::result::Result<(), u64> {
        if self.adv_live.load(Ordering::Relaxed) == 0 {
            return Ok(()); // nothing advertised, and (src, tag) is past post_recv here
        }
        self.revoke_locked(&mut self.adv_lock(), src, tag, force)
    }

    fn revoke_locked(&self, t: &mut AdvTable, src: usize, tag: Tag, force: bool) -> std::result::Result<(), u64> {
        if self.adv_live.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let Some(k) = t.slots[src].iter().position(|a| a.is_some_and(|a| a.tag == tag)) else { return Ok(()) };
        let la = t.slots[src][k].expect("found above");
        let a = self.rx[src].adv(k);
        let posted = la.gen << 2 | A_POSTED;
        match a.state.compare_exchange(posted, la.gen << 2 | A_FREE, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {}
            Err(w) if w == la.gen << 2 | A_CLAIMED || !force => return Err(w),
            Err(_) => {} // written (landed, but nobody waits for it any more) or garbage
        }
        t.slots[src][k] = None;
        self.adv_live.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// `cancel_recv`'s half: revoke, waiting while a writer is copying into the buffer (it
    /// finishes within one `process_vm_writev`) unless the writer's process is gone.
    fn revoke_wait(&self, src: usize, tag: Tag) {
        let pid = self.pids[src];
        while let Err(w) = self.revoke(src, tag, true) {
            if pid != std::process::id() && !alive(pid) {
                // A dead process writes nothing more: drop the record.
                let mut t = self.adv_lock();
                if let Some(k) = t.slots[src].iter().position(|a| a.is_some_and(|a| a.tag == tag)) {
                    t.slots[src][k] = None;
                    self.adv_live.fetch_sub(1, Ordering::Relaxed);
                }
                return;
            }
            tracing::trace!("cancel waits for rank {src}'s write into the advertised buffer (state {w:#x})");
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Complete receives whose advertised buffer a sender has written (called by `poll`).
    fn scan_adverts(&self) {
        if self.adv_live.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut t = self.adv_lock();
        for src in 0..t.slots.len() {
            for k in 0..ADV_SLOTS {
                let Some(la) = t.slots[src][k] else { continue };
                let a = self.rx[src].adv(k);
                let w = a.state.load(Ordering::Acquire);
                if w == la.gen << 2 | A_POSTED || w == la.gen << 2 | A_CLAIMED {
                    continue;
                }
                t.slots[src][k] = None;
                self.adv_live.fetch_sub(1, Ordering::Relaxed);
                if !t.deferred.is_empty() {
                    t.deferred.retain(|d| (d.src, d.tag) != (src, la.tag));
                }
                if w != la.gen << 2 | A_WRITTEN {
                    let e = self.proto(src, format!("advertisement slot {k} in state {w:#x}, expected generation {}", la.gen));
                    self.mb.fail(src, la.tag, Dir::Recv, e);
                    continue;
                }
                let mut len = a.len.load(Ordering::Relaxed);
                if len != A_LEN_FAILED && len & A_LEN_AFTER_RTS != 0 {
                    len &= !A_LEN_AFTER_RTS;
                    if !la.rts_seen {
                        t.superseded.push((src, la.tag));
                    }
                }
                if len == A_LEN_FAILED {
                    let e = Error::PeerFailed { op: "shm receive", peer: src, reason: "its write into our buffer failed".into() };
                    self.mb.fail(src, la.tag, Dir::Recv, e);
                } else if len > la.cap as u64 {
                    let e = self.proto(src, format!("wrote {len} bytes into a {}-byte advertised buffer", la.cap));
                    self.mb.fail(src, la.tag, Dir::Recv, e);
                } else {
                    self.mb.complete(src, la.tag, Dir::Recv, len as usize);
                }
            }
        }
    }

    /// Sender: write straight into the buffer `dst` advertised for `tag`. `Ok(false)`: no usable
    /// advertisement (not posted yet, or too small: the RTS path reports the overflow).
    fn try_direct(&self, dst: usize, tag: Tag, data: *const u8, len: usize, after_rts: bool) -> Result<bool> {
        let ring = self.txa[dst].as_ref().expect("never sends to self");
        for k in 0..ADV_SLOTS {
            let a = ring.adv(k);
            let w = a.state.load(Ordering::Acquire);
            if w & 3 != A_POSTED
                || a.ctx.load(Ordering::Relaxed) != tag.ctx
                || a.seq.load(Ordering::Relaxed) != tag.seq
                || a.round.load(Ordering::Relaxed) != tag.round as u64
            {
                continue;
            }
            let (addr, cap) = (a.addr.load(Ordering::Relaxed), a.cap.load(Ordering::Relaxed));
            if len as u64 > cap {
                return Ok(false);
            }
            // Claim: fails if the receiver revoked (or re-used) the slot since we read it, in
            // which case the fields read above may be stale and are not used.
            if a.state.compare_exchange(w, (w & !3) | A_CLAIMED, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                return Ok(false);
            }
            let r = cma(self.pids[dst], data as *mut u8, addr, len, true);
            let flag = if after_rts { A_LEN_AFTER_RTS } else { 0 };
            a.len.store(if r.is_ok() { len as u64 | flag } else { A_LEN_FAILED }, Ordering::Relaxed);
            a.state.store((w & !3) | A_WRITTEN, Ordering::Release);
            return match r {
                Ok(()) => {
                    self.mb.complete(dst, tag, Dir::Send, 0);
                    Ok(true)
                }
                Err(e) => Err(Error::Io { op: "shm write", peer: dst, detail: e.to_string() }),
            };
        }
        Ok(false)
    }

    /// Announced sends whose receiver has advertised its buffer meanwhile: write them now (the
    /// waiting sender's core is idle; the receiver would copy only once it polls).
    fn retry_rts_out(&self) {
        if self.rts_n.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut out = self.rts_out.lock().unwrap_or_else(|e| e.into_inner());
        out.retain(|&(dst, tag, data, len)| match self.try_direct(dst, tag, data as *const u8, len, true) {
            Ok(true) => {
                stat(2);
                false
            }
            Ok(false) => true,
            Err(e) => {
                self.mb.fail(dst, tag, Dir::Send, e);
                false
            }
        });
        self.rts_n.store(out.len(), Ordering::Release);
    }

    /// Deferred receives (see `AdvTable::deferred`) the sender has not claimed: revoke the
    /// advertisement and fetch them ourselves now that we wait.
    fn run_deferred(&self) {
        if self.adv_live.load(Ordering::Relaxed) == 0 {
            return; // a deferred receive always has a live advertisement
        }
        let mut todo = Vec::new();
        {
            let mut t = self.adv_lock();
            if t.deferred.is_empty() {
                return;
            }
            let mut i = 0;
            while i < t.deferred.len() {
                let d = t.deferred[i];
                let Some(k) = t.slots[d.src].iter().position(|a| a.is_some_and(|a| a.tag == d.tag)) else {
                    t.deferred.swap_remove(i); // cannot happen: entries and records go together
                    continue;
                };
                let gen = t.slots[d.src][k].expect("found").gen;
                let a = self.rx[d.src].adv(k);
                if a.state.compare_exchange(gen << 2 | A_POSTED, gen << 2 | A_FREE, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                    t.slots[d.src][k] = None;
                    self.adv_live.fetch_sub(1, Ordering::Relaxed);
                    t.deferred.swap_remove(i);
                    todo.push(d);
                } else {
                    i += 1; // claimed: the sender writes, `scan_adverts` completes it
                }
            }
        }
        for d in todo {
            stat(3);
            if let Err(e) = self.fetch(d.src, d.tag, d.addr, d.buf as *mut u8, d.len) {
                tracing::warn!("{e}");
            }
        }
    }

    /// `cancel_recv` of a deferred receive: withdraw it (waiting while the sender writes into
    /// the buffer) and release the sender's announced buffer.
    fn cancel_deferred(&self, src: usize, tag: Tag) {
        loop {
            let mut t = self.adv_lock();
            let Some(i) = t.deferred.iter().position(|d| (d.src, d.tag) == (src, tag)) else { return };
            let k = t.slots[src].iter().position(|a| a.is_some_and(|a| a.tag == tag));
            let (mut gone, mut fin) = (true, true);
            if let Some(k) = k {
                let gen = t.slots[src][k].expect("found").gen;
                match self.rx[src].adv(k).state.compare_exchange(gen << 2 | A_POSTED, gen << 2 | A_FREE, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {}
                    Err(w) if w == gen << 2 | A_CLAIMED => {
                        let pid = self.pids[src];
                        gone = pid != std::process::id() && !alive(pid);
                        fin = false;
                    }
                    Err(_) => fin = false, // written: the sender released itself
                }
                if gone {
                    t.slots[src][k] = None;
                    self.adv_live.fetch_sub(1, Ordering::Relaxed);
                }
            }
            if gone {
                t.deferred.swap_remove(i);
                drop(t);
                // The mailbox slot is `Writing` (ours): make it cancellable.
                self.mb.fail(src, tag, Dir::Recv, Error::usage("cancel_recv", "cancelled"));
                if fin {
                    let _ = self.send_fin(src, tag);
                }
                return;
            }
            drop(t);
            std::thread::sleep(Duration::from_micros(20));
        }
    }

    /// Progress: flush pending FINs and drain every inbox ring. Only one thread drains at a time.
    pub fn poll(&self) -> Result<()> {
        let Ok(mut d) = self.drain.try_lock() else { return Ok(()) };
        {
            let mut pend = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let mut keep = Vec::new();
            for (dst, rec) in pend.drain(..) {
                if !self.try_push(dst, &rec, &[])? {
                    keep.push((dst, rec));
                }
            }
            *pend = keep;
        }
        // Liveness first: whatever a peer wrote before it exited (ring records, direct writes)
        // is drained below, before it is declared dead, so a peer that finished its part of a
        // collective and exited is not reported as failed.
        let mut died = Vec::new();
        if d.last_liveness.elapsed() > Duration::from_millis(5) {
            d.last_liveness = Instant::now();
            for (r, &pid) in self.pids.iter().enumerate() {
                if r != self.rank && pid != std::process::id() && !alive(pid) {
                    died.push((r, pid));
                }
            }
        }
        for s in 0..self.rx.len() {
            if s != self.rank {
                if let Err(e) = self.drain_ring(s, &mut d.tails[s]) {
                    tracing::warn!("{e}");
                }
            }
        }
        self.scan_adverts();
        self.retry_rts_out();
        self.run_deferred();
        for (r, pid) in died {
            self.mb.peer_died(r, format!("process {pid} exited"));
        }
        Ok(())
    }

    fn drain_ring(&self, s: usize, tail: &mut u64) -> Result<()> {
        let ring = &self.rx[s];
        let head = ring.ctl().head.load(Ordering::Acquire);
        if head < *tail || head - *tail > RING_CAP as u64 {
            return Err(self.proto(s, format!("ring head {head} inconsistent with tail {tail}")));
        }
        while *tail < head {
            let idx = (*tail % RING_CAP as u64) as usize;
            let avail = (head - *tail) as usize;
            if idx % HDR != 0 || avail < HDR {
                return Err(self.proto(s, "misaligned ring record".into()));
            }
            let mut rec = Rec::zeroed();
            // SAFETY: idx + HDR <= RING_CAP (idx is 64-aligned, RING_CAP a multiple of 64).
            unsafe { std::ptr::copy_nonoverlapping(ring.data().add(idx), bytemuck::bytes_of_mut(&mut rec).as_mut_ptr(), HDR) };
            let tag = Tag { ctx: rec.ctx, seq: rec.seq, round: rec.round };
            let used = match rec.kind {
                PAD => {
                    if rec.len as usize != RING_CAP - idx || rec.len as usize > avail {
                        return Err(self.proto(s, format!("bad padding record of {} bytes", rec.len)));
                    }
                    rec.len as usize
                }
                EAGER => {
                    let len = rec.len as usize;
                    if rec.len > eager_max() as u64 || rec_len(len) > RING_CAP - idx || rec_len(len) > avail {
                        return Err(self.proto(s, format!("eager record claims {} bytes", rec.len)));
                    }
                    // SAFETY: bounds checked just above.
                    let payload = unsafe { std::slice::from_raw_parts(ring.data().add(idx + HDR), len) };
                    let claimed = {
                        // Revoke and claim under the advertisement lock (see `advertise`).
                        let mut at = self.adv_lock();
                        if self.revoke_locked(&mut at, s, tag, false).is_err() {
                            return Err(self.proto(s, format!("message {tag:?} both sent and written into the advertised buffer")));
                        }
                        let mut t = self.mb.lock();
                        crate::mailbox::Mailbox::claim(&mut t, s, tag, len, "shm receive")
                    };
                    match claimed {
                        // SAFETY: claim checked len against the posted capacity.
                        Ok(Some(buf)) => {
                            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), buf.0, len) };
                            self.mb.complete(s, tag, Dir::Recv, len);
                        }
                        Ok(None) => {
                            let _ = self.mb.deliver(s, tag, payload.to_vec(), "shm receive");
                        }
                        Err(_) => self.mb.notify(), // the slot now holds the error
                    }
                    rec_len(len)
                }
                RTS => {
                    let announced = {
                        // Revoke and claim under the advertisement lock (see `advertise`).
                        let mut at = self.adv_lock();
                        if let Some(i) = at.superseded.iter().position(|&x| x == (s, tag)) {
                            // Already written directly and completed: drop this late RTS.
                            at.superseded.swap_remove(i);
                            stat(4);
                            None
                        } else {
                            match self.revoke_locked(&mut at, s, tag, false) {
                                Ok(()) => Some(self.mb.announce(s, tag, rec.addr, rec.len as usize, "shm receive")),
                                // The sender claimed our advertisement after announcing: it writes
                                // the message itself and needs no FIN (`scan_adverts` completes it).
                                Err(_) => {
                                    if let Some(a) = at.slots[s].iter_mut().flatten().find(|a| a.tag == tag) {
                                        a.rts_seen = true;
                                    }
                                    stat(4);
                                    None
                                }
                            }
                            }
                    };
                    match announced {
                        Some(Ok(Some(buf))) => {
                            stat(3);
                            self.fetch(s, tag, rec.addr, buf.0, rec.len as usize)?
                        }
                        Some(Ok(None)) | None => {}
                        Some(Err(_)) => {
                            self.mb.notify();
                            self.send_fin(s, tag)?;
                        }
                    }
                    HDR
                }
                FIN => {
                    self.mb.complete(s, tag, Dir::Send, 0);
                    HDR
                }
                k => return Err(self.proto(s, format!("unknown record kind {k}"))),
            };
            *tail += used as u64;
            ring.ctl().tail.store(*tail, Ordering::Release);
        }
        Ok(())
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // A zombie (exited, not yet reaped) is dead too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => r == 0,
    }
}

/// Copy `len` bytes between `local` in this process and `remote` in process `pid` with cross-memory
/// attach: `process_vm_writev` (local → remote) when `write`, else `process_vm_readv`.
///
/// Safety (of the callers): `local` is valid for `len` bytes (reads when writing: the caller's
/// send buffer, Fabric::send; writes when reading: inside the posted buffer, length checked);
/// the kernel validates `remote` against the peer's address space (len <= what it advertised).
fn cma(pid: u32, local: *mut u8, remote: u64, len: usize, write: bool) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let l = libc::iovec { iov_base: unsafe { local.add(done) } as *mut libc::c_void, iov_len: len - done };
        let r = libc::iovec { iov_base: (remote as usize + done) as *mut libc::c_void, iov_len: len - done };
        // SAFETY: see above.
        let n = unsafe {
            if write {
                libc::process_vm_writev(pid as libc::pid_t, &l, 1, &r, 1, 0)
            } else {
                libc::process_vm_readv(pid as libc::pid_t, &l, 1, &r, 1, 0)
            }
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            let call = if write { "process_vm_writev" } else { "process_vm_readv" };
            return Err(std::io::Error::other(format!("{call} made no progress")));
        }
        done += n as usize;
    }
    Ok(())
}

impl Fabric for ShmFabric {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.rx.len()
    }
    fn name(&self) -> &'static str {
        "shm"
    }

    unsafe fn post_recv(&self, src: usize, tag: Tag, buf: *mut u8, len: usize, w: &Wait) -> Result<()> {
        match self.mb.post(src, tag, buf, len, w.op)? {
            Posted::Waiting => {
                if len > eager_max() && direct_enabled() {
                    self.advertise(src, tag, buf, len);
                }
                Ok(())
            }
            Posted::Landed => Ok(()),
            Posted::Fetch { addr, len: mlen } => {
                if direct_enabled() {
                    let mut t = self.adv_lock();
                    if self.advertise_in(&mut t, src, tag, buf, len) {
                        if let Some(a) = t.slots[src].iter_mut().flatten().find(|a| a.tag == tag) {
                            a.rts_seen = true;
                        }
                        t.deferred.push(Deferred { src, tag, addr, buf: buf as usize, len: mlen });
                        return Ok(());
                    }
                }
                stat(3);
                self.fetch(src, tag, addr, buf, mlen)
            }
        }
    }

    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        let mut rec = Rec { round: tag.round, ctx: tag.ctx, seq: tag.seq, len: len as u64, ..Rec::zeroed() };
        if len <= eager_max() {
            rec.kind = EAGER;
            self.push_wait(dst, &rec, std::slice::from_raw_parts(data, len), w)?;
            self.mb.complete(dst, tag, Dir::Send, 0);
            stat(0);
        } else if self.try_direct(dst, tag, data, len, false)? {
            stat(1);
        } else {
            rec.kind = RTS;
            rec.addr = data as u64;
            if direct_enabled() {
                let mut out = self.rts_out.lock().unwrap_or_else(|e| e.into_inner());
                out.push((dst, tag, data as usize, len));
                self.rts_n.store(out.len(), Ordering::Release);
            }
            if let Err(e) = self.push_wait(dst, &rec, &[], w) {
                self.forget_rts(dst, tag);
                return Err(e);
            }
        }
        Ok(())
    }

    fn wait_send(&self, dst: usize, tag: Tag, w: &Wait) -> Result<()> {
        let r = self.mb.wait_done(dst, tag, Dir::Send, w, &|| self.poll()).map(|_| ());
        // Whatever the outcome, the caller may reuse the buffer now: no later write from it.
        self.forget_rts(dst, tag);
        r
    }

    fn wait_recv(&self, src: usize, tag: Tag, w: &Wait) -> Result<usize> {
        let r = self.mb.wait_done(src, tag, Dir::Recv, w, &|| self.poll());
        if r.is_ok() {
            // Landed through the ring or RTS while an advertisement was being published: drop it.
            self.revoke_wait(src, tag);
        }
        r
    }

    fn cancel_recv(&self, src: usize, tag: Tag) {
        self.cancel_deferred(src, tag);
        self.revoke_wait(src, tag);
        self.mb.cancel(src, tag)
    }
}

impl Drop for ShmFabric {
    fn drop(&mut self) {
        // No writer may claim an advertisement of a buffer that outlives us.
        let live: Vec<(usize, Tag)> = {
            let t = self.adv_lock();
            t.slots.iter().enumerate().flat_map(|(s, v)| v.iter().flatten().map(move |a| (s, a.tag))).collect()
        };
        for (s, tag) in live {
            self.revoke_wait(s, tag);
        }
        if stats_on() {
            let v: Vec<u64> = STATS.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            eprintln!("shm rank {}: eager {} direct {} direct-after-rts {} rts-fetch {} rts-superseded {}", self.rank, v[0], v[1], v[2], v[3], v[4]);
        }
        self.inbox.unlink();
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    /// Two fabrics (ranks 0 and 1) of this process over real inbox files.
    fn pair(token: &str) -> (Arc<ShmFabric>, Arc<ShmFabric>) {
        let pid = std::process::id();
        let a = Inbox::create(2, 0, token).unwrap();
        let b = Inbox::create(2, 1, token).unwrap();
        let paths = vec![a.path.display().to_string(), b.path.display().to_string()];
        let f0 = ShmFabric::new(0, a, &paths, vec![pid, pid]).unwrap();
        let f1 = ShmFabric::new(1, b, &paths, vec![pid, pid]).unwrap();
        (Arc::new(f0), Arc::new(f1))
    }

    fn tag(seq: u64) -> Tag {
        Tag { ctx: 7, seq, round: 0 }
    }

    /// The slot rank 1 advertised to rank 0 for `t`, seen from rank 0's side.
    fn adv_slot(f0: &ShmFabric, t: Tag) -> &Adv {
        let ring = f0.txa[1].as_ref().unwrap();
        (0..ADV_SLOTS)
            .map(|k| ring.adv(k))
            .find(|a| a.state.load(Ordering::Acquire) & 3 == A_POSTED && a.seq.load(Ordering::Relaxed) == t.seq)
            .expect("advertised")
    }

    #[test]
    fn advertised_receive_is_written_once_by_the_sender() {
        let (f0, f1) = pair("direct");
        let w = Wait::new("test", Duration::from_secs(5));
        let len = 100_000;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut buf = vec![0u8; len + 64];
        unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
        assert!(f0.try_direct(1, tag(1), data.as_ptr(), len, false).unwrap(), "advertisement not found");
        f0.wait_send(1, tag(1), &w).unwrap();
        assert_eq!(f1.wait_recv(0, tag(1), &w).unwrap(), len);
        assert_eq!(&buf[..len], &data[..]);
        assert!(buf[len..].iter().all(|&b| b == 0));
        assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
        // Too long for the advertised buffer: not written directly; RTS reports the overflow.
        buf.fill(0);
        unsafe { f1.post_recv(0, tag(2), buf.as_mut_ptr(), 1000 * 16, &w).unwrap() };
        unsafe { f0.send(1, tag(2), data.as_ptr(), len, &w).unwrap() };
        let e = f1.wait_recv(0, tag(2), &w).unwrap_err();
        assert!(matches!(e, Error::Protocol { peer: 0, .. }), "{e}");
        f0.wait_send(1, tag(2), &w).unwrap();
        assert!(buf[16_000..].iter().all(|&b| b == 0), "bytes landed past the posted buffer");
    }

    #[test]
    fn receive_posted_after_its_rts_is_written_by_the_idle_sender_or_fetched() {
        let (f0, f1) = pair("deferred");
        let w = Wait::new("test", Duration::from_secs(5));
        let len = 70_000;
        let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        // (a) The sender, waiting, claims the advertisement and writes.
        let mut buf = vec![0u8; len];
        unsafe { f0.send(1, tag(1), data.as_ptr(), len, &w).unwrap() }; // no advertisement yet: RTS
        f1.poll().unwrap(); // the RTS arrives before the receive is posted
        unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
        assert_eq!(f1.adv_lock().deferred.len(), 1);
        f0.wait_send(1, tag(1), &w).unwrap(); // polls: claims and writes
        assert_eq!(f1.wait_recv(0, tag(1), &w).unwrap(), len);
        assert_eq!(buf, data);
        assert!(f1.adv_lock().deferred.is_empty());
        // (b) The receiver waits first: it revokes and fetches, the FIN releases the sender.
        let mut buf = vec![0u8; len];
        unsafe { f0.send(1, tag(2), data.as_ptr(), len, &w).unwrap() };
        f1.poll().unwrap();
        unsafe { f1.post_recv(0, tag(2), buf.as_mut_ptr(), len, &w).unwrap() };
        assert_eq!(f1.wait_recv(0, tag(2), &w).unwrap(), len);
        assert_eq!(buf, data);
        f0.wait_send(1, tag(2), &w).unwrap();
        assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
        // (c) Cancelled before either copied: nothing lands, the sender is released.
        let mut buf = vec![0u8; len];
        unsafe { f0.send(1, tag(3), data.as_ptr(), len, &w).unwrap() };
        f1.poll().unwrap();
        unsafe { f1.post_recv(0, tag(3), buf.as_mut_ptr(), len, &w).unwrap() };
        f1.cancel_recv(0, tag(3));
        f0.wait_send(1, tag(3), &w).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert!(f1.adv_lock().deferred.is_empty());
        assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
        // (d) Cancelled while the sender holds the claim: cancel waits for the write.
        let mut buf = vec![0u8; len];
        unsafe { f0.send(1, tag(4), data.as_ptr(), len, &w).unwrap() };
        f1.poll().unwrap();
        unsafe { f1.post_recv(0, tag(4), buf.as_mut_ptr(), len, &w).unwrap() };
        let a = adv_slot(&f0, tag(4));
        let word = a.state.load(Ordering::Acquire);
        a.state.compare_exchange(word, (word & !3) | A_CLAIMED, Ordering::AcqRel, Ordering::Relaxed).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let canceller = {
            let (f1, done) = (f1.clone(), done.clone());
            std::thread::spawn(move || {
                f1.cancel_recv(0, tag(4));
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!done.load(Ordering::SeqCst), "cancel returned while a writer held the buffer");
        a.len.store(len as u64, Ordering::Relaxed);
        a.state.store((word & !3) | A_WRITTEN, Ordering::Release);
        canceller.join().unwrap();
        assert!(f1.adv_lock().deferred.is_empty());
    }

    #[test]
    fn more_receives_than_slots_fall_back_to_rts() {
        let (f0, f1) = pair("slots");
        let w = Wait::new("test", Duration::from_secs(5));
        let (n, len) = (ADV_SLOTS + 5, 20_000);
        let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; len]).collect();
        let datas: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8 + 1; len]).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            unsafe { f1.post_recv(0, tag(i as u64), b.as_mut_ptr(), len, &w).unwrap() };
        }
        assert_eq!(f1.adv_live.load(Ordering::Relaxed), ADV_SLOTS);
        for (i, d) in datas.iter().enumerate() {
            unsafe { f0.send(1, tag(i as u64), d.as_ptr(), len, &w).unwrap() };
        }
        for i in 0..n {
            assert_eq!(f1.wait_recv(0, tag(i as u64), &w).unwrap(), len);
        }
        for i in 0..n {
            f0.wait_send(1, tag(i as u64), &w).unwrap();
        }
        for (b, d) in bufs.iter().zip(&datas) {
            assert_eq!(b, d);
        }
        assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn cancel_waits_for_a_claimed_advertisement_and_revokes_the_rest() {
        let (f0, f1) = pair("claim");
        let w = Wait::new("test", Duration::from_secs(5));
        let mut buf = vec![0u8; 50_000];
        unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
        // Rank 0 claims the advertisement (as `try_direct` does) and is slow to write.
        let a = adv_slot(&f0, tag(1));
        let word = a.state.load(Ordering::Acquire);
        a.state.compare_exchange(word, (word & !3) | A_CLAIMED, Ordering::AcqRel, Ordering::Relaxed).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let canceller = {
            let (f1, done) = (f1.clone(), done.clone());
            std::thread::spawn(move || {
                f1.cancel_recv(0, tag(1));
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!done.load(Ordering::SeqCst), "cancel returned while a writer held the buffer");
        a.len.store(10, Ordering::Relaxed);
        a.state.store((word & !3) | A_WRITTEN, Ordering::Release);
        canceller.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        // A cancelled (unclaimed) advertisement can no longer be claimed.
        unsafe { f1.post_recv(0, tag(2), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
        f1.cancel_recv(0, tag(2));
        let data = vec![9u8; 40_000];
        assert!(!f0.try_direct(1, tag(2), data.as_ptr(), data.len(), false).unwrap());
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn no_write_lands_after_cancel_returns() {
        // A writer races the canceller many times: after cancel_recv returns, the buffer holds
        // either the whole message or nothing, and never changes again.
        let (f0, f1) = pair("race");
        let w = Wait::new("test", Duration::from_secs(5));
        let len = 64 << 10;
        let data = Arc::new(vec![0xabu8; len]);
        let (mut wrote, mut revoked) = (0, 0);
        for i in 0..400u64 {
            let mut buf = vec![0u8; len];
            unsafe { f1.post_recv(0, tag(i), buf.as_mut_ptr(), len, &w).unwrap() };
            let stop = Arc::new(AtomicBool::new(false));
            let writer = {
                let (f0, data, stop) = (f0.clone(), data.clone(), stop.clone());
                std::thread::spawn(move || loop {
                    if f0.try_direct(1, tag(i), data.as_ptr(), len, false).unwrap() {
                        return true;
                    }
                    if stop.load(Ordering::SeqCst) {
                        return false;
                    }
                    std::hint::spin_loop();
                })
            };
            for _ in 0..(i % 7) * 300 {
                std::hint::spin_loop();
            }
            f1.cancel_recv(0, tag(i));
            let snap = buf.clone();
            stop.store(true, Ordering::SeqCst);
            let did = writer.join().unwrap();
            assert_eq!(buf, snap, "a write landed after cancel_recv returned");
            if did {
                wrote += 1;
                assert!(buf.iter().all(|&b| b == 0xab));
            } else {
                revoked += 1;
                assert!(buf.iter().all(|&b| b == 0));
            }
        }
        assert_eq!(wrote + revoked, 400);
        assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn corrupted_advertisement_is_rejected() {
        let (f0, f1) = pair("corrupt-adv");
        let w = Wait::new("test", Duration::from_secs(1));
        let mut buf = vec![0u8; 20_000];
        unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
        // The writer claims 1 TiB written.
        let a = adv_slot(&f0, tag(1));
        let word = a.state.load(Ordering::Acquire);
        a.len.store(1 << 40, Ordering::Relaxed);
        a.state.store((word & !3) | A_WRITTEN, Ordering::Release);
        let e = f1.wait_recv(0, tag(1), &w).unwrap_err();
        assert!(matches!(e, Error::Protocol { peer: 0, .. }), "{e}");
        f1.cancel_recv(0, tag(1));
        // A state word of another generation.
        let (f0, f1) = pair("corrupt-adv2");
        unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
        adv_slot(&f0, tag(1)).state.store(99 << 2 | A_WRITTEN, Ordering::Release);
        let e = f1.wait_recv(0, tag(1), &w).unwrap_err();
        assert!(matches!(e, Error::Protocol { peer: 0, .. }), "{e}");
        f1.cancel_recv(0, tag(1));
    }

    #[test]
    fn corrupted_length_field_is_rejected() {
        let pid = std::process::id();
        let a = Inbox::create(2, 0, "t").unwrap();
        let b = Inbox::create(2, 1, "t").unwrap();
        let paths = vec![a.path.display().to_string(), b.path.display().to_string()];
        let f0 = ShmFabric::new(0, a, &paths, vec![pid, pid]).unwrap();
        let f1 = ShmFabric::new(1, b, &paths, vec![pid, pid]).unwrap();
        let tag = Tag { ctx: 1, seq: 0, round: 0 };
        let w = Wait::new("test", Duration::from_secs(1));
        let mut buf = [0u8; 8];
        unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), 8, &w).unwrap() };
        // Rank 0 writes a record whose length field claims 1 TiB.
        let rec = Rec { kind: EAGER, ctx: 1, len: 1 << 40, ..Rec::zeroed() };
        {
            let mut p = f0.tx[1].as_ref().unwrap().lock().unwrap();
            unsafe { std::ptr::copy_nonoverlapping(bytemuck::bytes_of(&rec).as_ptr(), p.ring.data(), HDR) };
            p.head += HDR as u64;
            p.ring.ctl().head.store(p.head, Ordering::Release);
        }
        let e = f1.wait_recv(0, tag, &w).unwrap_err();
        assert_eq!(e.peer(), Some(0));
        assert!(e.to_string().contains("eager record claims"), "{e}");
        assert_eq!(buf, [0u8; 8]);
        // A head pointer beyond the ring is rejected too.
        f0.tx[1].as_ref().unwrap().lock().unwrap().ring.ctl().head.store(u64::MAX, Ordering::Release);
        assert!(f1.drain_ring(0, &mut 0).is_err());
    }
}
