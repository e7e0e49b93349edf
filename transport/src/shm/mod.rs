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
mod advert;
mod cma;
mod fabric_impl;
mod ring;
mod segment;
#[cfg(test)]
mod tests;

use crate::error::{Error, Result};
use crate::fabric::Tag;
use crate::mailbox::Mailbox;
use advert::AdvTable;
use memmap2::MmapMut;
use ring::{Drain, Producer, Rec};
use segment::{Ring, ADV_SLOTS, REGION, RING_CAP};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

pub(crate) use segment::Inbox;

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
        self.mb.peer_failed(e.clone());
        e
    }
}
