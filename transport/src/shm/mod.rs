//! Shared-memory backend for processes on one host.
//!
//! Each rank owns an inbox file in /dev/shm (mode 0600; a peer's is mapped only after checking
//! that it is a file of this user with that mode) holding one single-producer ring per source
//! rank. Small messages travel eagerly through the ring (64-byte records: header + payload; up
//! to 32 bytes inside the header's line).
//! Large ones take one of two paths, chosen once per job at start-up:
//!
//! * **Cross-memory attach** (CMA, `process_vm_readv/writev`: one copy), when every rank may
//!   attach to every other (probed once; ptrace rules, e.g. `kernel.yama.ptrace_scope = 1`, may
//!   forbid it). The receiver advertises its posted buffer in a slot next to the ring; a sender
//!   that finds the advertisement claims it (CAS `POSTED -> CLAIMED`) and writes straight into
//!   it. Otherwise the sender announces the message (RTS) with an *offer* slot, and the receiver
//!   copies from the sender's buffer after taking the offer (`OFFERED -> READING`), then returns
//!   a FIN. A withdrawn offer (`cancel_send`) makes a late reader discard what it read, so a
//!   cancelled send is never delivered from memory its owner has reused.
//! * **Copy through shared memory** (the fallback, or `EMBER_SHM_COPY=staged`): the sender
//!   claims the receiver's advertisement the same way and streams the message through the ring
//!   in chunks of [`CHUNK_BYTES`] bytes; the receiver copies each chunk into its buffer as it arrives
//!   (two copies, pipelined). Neither side ever touches the other's memory.
//!
//! **Deadlines.** Only a CMA write into an advertised buffer is done by a peer into this rank's
//! memory. `cancel_recv` (and `Drop`) revoke the advertisement; while a writer holds the claim
//! they wait for the write to finish, but at most the job's timeout: a writer that holds a claim
//! longer (stopped, or hung) is killed (`SIGKILL` through a pidfd taken at start-up) and waited
//! for, and this fabric is failed for good. So no deadline hands back a buffer a peer can still
//! write into, and none waits forever. Streamed (staged) receives never wait: the rest of a
//! withdrawn message is read from the ring and dropped.
//!
//! There is no progress thread: whichever thread of the process waits drains the rings and
//! pushes streamed chunks. Every header read from shared memory is bounds-checked; a bad one
//! fails the peer, never an OOB access.
mod advert;
mod cma;
mod fabric_impl;
mod ring;
mod segment;
mod stage;
#[cfg(test)]
mod tests;

use crate::bell::BellRef;
use crate::error::{Error, Result};
use crate::fabric::Tag;
use crate::mailbox::Mailbox;
use advert::AdvTable;
use memmap2::MmapMut;
use ring::{Drain, Producer, Rec};
use segment::{Ring, OFFER_SLOTS};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub(crate) use segment::Inbox;

/// The checks this backend runs on what a peer wrote into shared memory (ring records, the
/// receiver's advertisement slots, the sender's offer ids), re-exported for the fuzz targets.
pub mod wire {
    pub use super::advert::{check_chunk, settled, written, Written};
    pub use super::cma::{offer_slot, usable, AdvRead};
    pub use super::ring::{check_position, check_record, check_ring, rec_len, slot_id, split_id, Checked, Rec, ABORT, CHUNK, EAGER, FIN, HDR, INLINE_AT, INLINE_MAX, PAD, RTS};
    pub use super::segment::{ADV_SLOTS, A_CLAIMED, A_FREE, A_LEN_AFTER_RTS, A_LEN_FAILED, A_POSTED, A_WRITTEN, OFFER_SLOTS, RING_CAP};
    pub use super::CHUNK_BYTES;
}

/// Payload bytes of one streamed chunk (the staged path).
pub const CHUNK_BYTES: usize = 128 << 10;

/// The largest eager message `EMBER_SHM_EAGER` may ask for: a quarter of a ring.
pub const MAX_EAGER: usize = segment::RING_CAP / 4;

/// What the environment asks of the shared-memory fabric, read and checked when it is built
/// ([`Options::from_vars`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Options {
    /// Messages up to this many bytes go through the ring; larger ones take the CMA or staged
    /// path (`EMBER_SHM_EAGER`: 0 to [`MAX_EAGER`], default 8 KiB).
    pub eager_max: usize,
    /// Advertised receives on the CMA path (`EMBER_SHM_DIRECT`: `1`, the default, or `0`: every
    /// large message goes through RTS). The staged path always advertises.
    pub direct: bool,
    /// Large messages are copied through shared memory (tests, benchmarks), whatever the CMA
    /// probe finds (`EMBER_SHM_COPY`: `auto`, the default, probes cross-memory attach;
    /// `staged` forces the copy).
    pub staged: bool,
}

impl Options {
    /// From this process's environment.
    pub(crate) fn from_env() -> Result<Options> {
        Self::from_vars(|k| std::env::var_os(k))
    }

    /// From the variables `get` returns (`None`: unset): a malformed or out-of-range value is
    /// an error naming the variable and what it accepts.
    pub(crate) fn from_vars(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Options> {
        let eager = crate::env::number("EMBER_SHM_EAGER", get("EMBER_SHM_EAGER"), 8 << 10, 0..=MAX_EAGER as u64, "bytes")?;
        Ok(Options {
            eager_max: eager as usize,
            direct: crate::env::flag("EMBER_SHM_DIRECT", get("EMBER_SHM_DIRECT"), true)?,
            staged: crate::env::choice("EMBER_SHM_COPY", get("EMBER_SHM_COPY"), false, &[("auto", false), ("staged", true)])?,
        })
    }
}

/// Path counters (`EMBER_SHM_STATS=1` prints them when the fabric is dropped): eager sends,
/// direct writes at send, direct writes after an RTS, RTS fetches, RTS superseded by a write,
/// streamed (staged) messages.
static STATS: [AtomicU64; 6] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
fn stats_on() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| std::env::var_os("EMBER_SHM_STATS").is_some())
}
fn stat(i: usize) {
    if stats_on() {
        STATS[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// A large send not finished when `send` returned.
#[derive(Clone, Copy)]
pub(super) struct SendJob {
    pub(super) dst: usize,
    pub(super) tag: Tag,
    pub(super) data: usize,
    pub(super) len: usize,
    pub(super) state: JobState,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum JobState {
    /// CMA: announced by RTS with offer slot `k` (generation `gen`); the receiver copies, or we
    /// write once it advertises.
    Announced { k: usize, gen: u64 },
    /// Staged: waiting for the receiver's advertisement.
    Waiting,
    /// Staged: streaming into advertisement `k` (generation `gen`), `off` bytes pushed.
    Streaming { k: usize, gen: u64, off: usize },
}

/// Sender-side bookkeeping: unfinished large sends, and the offer slots in use per destination.
pub(super) struct Sends {
    pub(super) jobs: Vec<SendJob>,
    /// `offers[d][k]`: slot k of our offers to d is in use.
    pub(super) offers: Vec<Vec<bool>>,
    pub(super) offer_gens: Vec<Vec<u64>>,
}

pub(crate) struct ShmFabric {
    rank: usize,
    /// What the environment asked for (eager limit, advertised receives, forced staging).
    opts: Options,
    pids: Vec<u32>,
    mb: Mailbox,
    inbox: Inbox,
    _peer_maps: Vec<Option<MmapMut>>,
    /// `probes[d]`: the word (address, value) rank d published for the CMA probe.
    probes: Vec<(u64, u64)>,
    /// `rx[s]`: the region of source s in our inbox.
    rx: Vec<Ring>,
    /// `tx[d]`: our ring in d's inbox.
    tx: Vec<Option<Mutex<Producer>>>,
    drain: Mutex<Drain>,
    /// Control records (FIN, ABORT) that found their ring full; flushed by `poll`.
    pending: Mutex<Vec<(usize, Rec)>>,
    /// `pending.len()`, read without the lock by `poll` to skip it when empty.
    pending_n: AtomicUsize,
    /// `txa[d]`: our region in d's inbox (the advertisements d keeps for us, our offers to d).
    txa: Vec<Option<Ring>>,
    /// `bells[d]`: d's doorbell, rung after we change what its waiters may wait for. None for
    /// every peer, and our waiters sleep on the mailbox's condvar instead, when the job's ranks
    /// outnumber this host's CPUs: a woken waiter would take the core from a rank with work (4 ranks on 2
    /// cores ran 2–4 MiB all-reduces 1.08 times as long with the bells).
    bells: Vec<Option<BellRef>>,
    /// Our advertisements, per source.
    adv: Mutex<AdvTable>,
    /// Advertisements outstanding or waiting for a slot (poll skips the scan when zero).
    adv_live: AtomicUsize,
    sends: Mutex<Sends>,
    /// `sends.jobs.len()`, read without the lock by `poll` to skip it when empty.
    sends_n: AtomicUsize,
    /// Large messages are copied through shared memory (no cross-memory attach).
    staged: AtomicBool,
    /// How long a cancel waits for a peer's claimed write before fencing that peer.
    timeout: Duration,
    /// `pidfds[p]`: process p (other processes only), for the fence.
    pidfds: Vec<Option<OwnedFd>>,
    /// Why this fabric failed for good (a peer was fenced).
    failed: OnceLock<String>,
}

impl ShmFabric {
    /// Map every peer's inbox. `paths[r]`/`pids[r]` come from the rendezvous. Large messages
    /// are staged until [`Self::use_cma`] says otherwise; `timeout` bounds a cancel's wait. The
    /// environment's settings ([`Options`], `EMBER_SPIN_US`, `EMBER_MAX_ALLOC_BYTES`) are
    /// checked first: a bad one is an error naming it (and `inbox` is unlinked).
    pub fn new(rank: usize, inbox: Inbox, paths: &[String], pids: Vec<u32>, timeout: Duration) -> Result<ShmFabric> {
        let settings = (|| -> Result<_> { Ok((Options::from_env()?, crate::spin::max_from_env("EMBER_SPIN_US", 50)?, crate::limits::alloc_limit()?)) })();
        let (opts, spin, _) = settings.inspect_err(|_| inbox.unlink())?;
        let n = paths.len();
        let mut maps = Vec::with_capacity(n);
        let (mut tx, mut txa, mut probes, mut pidfds) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let mut bells = Vec::with_capacity(n);
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let wake = cpus >= 1 && n <= cpus as usize;
        for (d, p) in paths.iter().enumerate() {
            if d == rank {
                maps.push(None);
                tx.push(None);
                txa.push(None);
                probes.push((0, 0));
                pidfds.push(None);
                bells.push(None);
                continue;
            }
            let (mut m, probe) = segment::open_peer(std::path::Path::new(p), d, n)?;
            bells.push(wake.then(|| segment::peer_bell(&mut m)));
            // SAFETY: our region in d's inbox (the mapping holds HEADER + n * REGION bytes).
            let region = unsafe { m.as_mut_ptr().add(segment::HEADER + rank * segment::REGION) };
            txa.push(Some(Ring(region)));
            tx.push(Some(Mutex::new(Producer { ring: Ring(region), head: 0, tail: 0 })));
            maps.push(Some(m));
            probes.push(probe);
            pidfds.push(if pids[d] != std::process::id() { cma::pidfd(pids[d]) } else { None });
        }
        let rx = (0..n).map(|s| inbox.region(s)).collect();
        Ok(ShmFabric {
            rank,
            opts,
            pids,
            mb: Mailbox::new_polling(spin, wake.then(|| inbox.bell())),
            inbox,
            _peer_maps: maps,
            probes,
            rx,
            tx,
            drain: Mutex::new(Drain { tails: vec![0; n], last_liveness: Instant::now(), polls: 0 }),
            pending: Mutex::new(Vec::new()),
            pending_n: AtomicUsize::new(0),
            txa,
            bells,
            adv: Mutex::new(AdvTable::new(n)),
            adv_live: AtomicUsize::new(0),
            sends: Mutex::new(Sends { jobs: Vec::new(), offers: vec![vec![false; OFFER_SLOTS]; n], offer_gens: vec![vec![0; OFFER_SLOTS]; n] }),
            sends_n: AtomicUsize::new(0),
            staged: AtomicBool::new(true),
            timeout,
            pidfds,
            failed: OnceLock::new(),
        })
    }

    /// Whether this rank may attach to every peer's memory: `Err(why not)` naming the peer.
    /// Reads each peer's probe word with `process_vm_readv` (once, at start-up).
    pub fn probe_cma(&self) -> std::result::Result<(), String> {
        for (d, &(addr, value)) in self.probes.iter().enumerate() {
            if d == self.rank || self.pids[d] == std::process::id() {
                continue;
            }
            cma::probe(self.pids[d], addr, value).map_err(|e| format!("rank {} -> rank {d} (pid {}): {e}", self.rank, self.pids[d]))?;
        }
        Ok(())
    }

    /// Send large messages by cross-memory attach (`true`, every rank agreed that every rank may)
    /// or through shared memory. Set once, before any large message.
    pub fn use_cma(&self, on: bool) {
        self.staged.store(!on, Ordering::Release);
    }

    /// Whether `EMBER_SHM_COPY=staged` asked for the copy through shared memory.
    pub fn staged_forced(&self) -> bool {
        self.opts.staged
    }

    fn is_staged(&self) -> bool {
        self.staged.load(Ordering::Acquire)
    }

    /// Wake rank `d`'s sleeping waiters, if any, after a change they may wait for (`fenced`:
    /// see `Bell::ring`).
    fn ring_bell(&self, d: usize, fenced: bool) {
        if let Some(b) = &self.bells[d] {
            b.get().ring(fenced);
        }
    }

    pub fn unlink_inbox(&self) {
        self.inbox.unlink();
    }

    fn proto(&self, peer: usize, detail: String) -> Error {
        let e = Error::Protocol { op: "shm", peer, detail };
        self.mb.peer_failed(e.clone());
        e
    }

    /// The error of a fabric failed for good, if it is.
    fn check_failed(&self, op: &'static str) -> Result<()> {
        match self.failed.get() {
            None => Ok(()),
            Some(why) => Err(Error::PeerFailed { op, peer: self.rank, reason: format!("the shared-memory transport failed for good: {why}") }),
        }
    }

    /// Fail this fabric for good: every wait on every peer fails from now on.
    fn fail_for_good(&self, why: String) {
        let why = self.failed.get_or_init(|| why).clone();
        tracing::error!("shm rank {}: {why}", self.rank);
        for p in (0..self.rx.len()).filter(|&p| p != self.rank) {
            self.mb.peer_died(p, why.clone());
        }
    }
}
