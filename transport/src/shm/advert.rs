//! Advertised receives, the receiver's side: its private table of advertisements per source
//! (and of deferred receives, superseded RTS records and, on the staged path, receives waiting
//! for a free slot), publishing a posted buffer in a shared slot, revoking it (CAS
//! `POSTED -> FREE`; while a CMA writer holds the claim, waiting at most the job's timeout before
//! fencing that writer), completing the receives whose slot a sender has written, and landing
//! the chunks of streamed (staged) messages.
use super::cma::alive;
use super::ring::{split_id, Rec};
use super::segment::{ADV_SLOTS, A_CLAIMED, A_FREE, A_LEN_AFTER_RTS, A_LEN_FAILED, A_POSTED, A_WRITTEN};
use super::{stat, ShmFabric};
use crate::error::{Error, Result};
use crate::fabric::Tag;
use crate::mailbox::{Dir, Slot};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The receiver's private record of one advertisement (the shared copy is not trusted).
#[derive(Clone, Copy)]
pub(super) struct LocalAdv {
    pub(super) tag: Tag,
    pub(super) cap: usize,
    pub(super) gen: u64,
    /// The sender's RTS for this message has been drained (or the receive was deferred on it).
    pub(super) rts_seen: bool,
    /// Staged: the posted buffer (0 once withdrawn, or when the message does not fit), the
    /// bytes streamed so far, and the message length its first chunk announced.
    pub(super) buf: usize,
    pub(super) got: usize,
    pub(super) total: u64,
}

/// Receiver-side advertisement table: `slots[src][k]`, and the generation last used per slot.
pub(super) struct AdvTable {
    pub(super) slots: Vec<Vec<Option<LocalAdv>>>,
    pub(super) gens: Vec<Vec<u64>>,
    /// RTS records still to come for messages a sender wrote directly after announcing them
    /// (dropped on arrival instead of being matched again).
    pub(super) superseded: Vec<(usize, Tag)>,
    /// Receives posted after their RTS arrived (the sender is ahead, idle in its wait): instead
    /// of fetching while busy posting and sending, we advertise and let the sender write; when
    /// we wait ourselves (`run_deferred`) and it has not claimed yet, we revoke and fetch.
    pub(super) deferred: Vec<Deferred>,
    /// Staged: large receives posted while every slot for their source was taken; advertised
    /// by `poll` as slots free up (the sender waits for the advertisement).
    pub(super) waiting: Vec<(usize, Tag, usize, usize)>,
}

impl AdvTable {
    pub(super) fn new(n: usize) -> Self {
        AdvTable { slots: vec![vec![None; ADV_SLOTS]; n], gens: vec![vec![0; ADV_SLOTS]; n], superseded: Vec::new(), deferred: Vec::new(), waiting: Vec::new() }
    }
}

#[derive(Clone, Copy)]
pub(super) struct Deferred {
    pub(super) src: usize,
    pub(super) tag: Tag,
    pub(super) addr: u64,
    pub(super) buf: usize,
    pub(super) len: usize,
    /// The sender's offer.
    pub(super) id: u64,
}

/// What the receiver makes of advertisement slot `k`'s state word `w`, on which it posted
/// generation `gen`: `None` while the sender has not finished with it (posted, or claimed);
/// `Some(Ok)` once written; `Some(Err)` for any other state (another generation, or garbage).
pub fn settled(w: u64, gen: u64, k: usize) -> Option<std::result::Result<(), String>> {
    if w == gen << 2 | A_POSTED || w == gen << 2 | A_CLAIMED {
        return None;
    }
    Some(match w == gen << 2 | A_WRITTEN {
        true => Ok(()),
        false => Err(format!("advertisement slot {k} in state {w:#x}, expected generation {gen}")),
    })
}

/// The length word a sender stored in a written advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Written {
    /// `len` bytes landed (at most the advertised capacity); `after_rts`: the sender had
    /// announced the message first, so an RTS record for it is (or was) on its way.
    Landed { len: usize, after_rts: bool },
    /// The sender's write failed.
    Failed,
    /// More than the advertised capacity: a protocol error (`after_rts` as above).
    Bad { detail: String, after_rts: bool },
}

/// The length word `len` of a written advertisement of `cap` bytes, checked.
pub fn written(len: u64, cap: usize) -> Written {
    if len == A_LEN_FAILED {
        return Written::Failed;
    }
    let (len, after_rts) = (len & !A_LEN_AFTER_RTS, len & A_LEN_AFTER_RTS != 0);
    match usize::try_from(len) {
        Ok(l) if l <= cap => Written::Landed { len: l, after_rts },
        _ => Written::Bad { detail: format!("wrote {len} bytes into a {cap}-byte advertised buffer"), after_rts },
    }
}

/// A streamed chunk of `len` bytes at offset `off` of a `total`-byte message, checked against
/// the receiver's own record of the stream: `got` bytes landed so far, of the length the first
/// chunk announced (`announced`). It must continue the stream, carry bytes, stay inside the
/// message, and (after the first) repeat its length.
pub fn check_chunk(off: u64, len: usize, total: u64, got: usize, announced: u64) -> std::result::Result<(), String> {
    if off != got as u64 || off.checked_add(len as u64).is_none_or(|e| e > total) || len == 0 || (off > 0 && total != announced) {
        return Err(format!("chunk of {len} bytes at offset {off} of a {total}-byte message (expected offset {got} of {announced})"));
    }
    Ok(())
}

impl ShmFabric {
    pub(super) fn adv_lock(&self) -> std::sync::MutexGuard<'_, AdvTable> {
        self.adv.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish the buffer posted for `(src, tag)` so `src` can write into it directly; false
    /// when every slot for `src` is in use (the message then comes through RTS on the CMA path;
    /// the staged path queues it, see `AdvTable::waiting`).
    pub(super) fn advertise(&self, src: usize, tag: Tag, buf: *mut u8, cap: usize) -> bool {
        let mut t = self.adv_lock();
        // Under the table lock (which the ring drain holds from revoking to claiming): if another
        // thread already claimed the buffer for a ring or RTS delivery, do not advertise it.
        if !matches!(self.mb.lock().map.get(&(src, tag, Dir::Recv)), Some(Slot::Posted { .. })) {
            return false;
        }
        if self.advertise_in(&mut t, src, tag, buf, cap) {
            return true;
        }
        if self.is_staged() {
            t.waiting.push((src, tag, buf as usize, cap));
            self.adv_live.fetch_add(1, Ordering::Relaxed);
        }
        false
    }

    pub(super) fn advertise_in(&self, t: &mut super::advert::AdvTable, src: usize, tag: Tag, buf: *mut u8, cap: usize) -> bool {
        let Some(k) = t.slots[src].iter().position(|a| a.is_none()) else { return false };
        let gen = t.gens[src][k] + 1;
        t.gens[src][k] = gen;
        // Counted before it is published: a ring drain that finds nothing advertised skips
        // the advertisement lock (`drain_ring`).
        self.adv_live.fetch_add(1, Ordering::Release);
        let a = self.rx[src].adv(k);
        a.ctx.store(tag.ctx, Ordering::Relaxed);
        a.seq.store(tag.seq, Ordering::Relaxed);
        a.round.store(tag.round as u64, Ordering::Relaxed);
        a.addr.store(buf as u64, Ordering::Relaxed);
        a.cap.store(cap as u64, Ordering::Relaxed);
        a.len.store(0, Ordering::Relaxed);
        a.state.store(gen << 2 | A_POSTED, Ordering::Release);
        t.slots[src][k] = Some(LocalAdv { tag, cap, gen, rts_seen: false, buf: buf as usize, got: 0, total: 0 });
        self.ring_bell(src, false);
        true
    }

    /// Staged: advertise the receives that waited for a slot (called by `poll`).
    pub(super) fn advertise_waiting(&self) {
        if !self.is_staged() || self.adv_live.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut t = self.adv_lock();
        let mut i = 0;
        while i < t.waiting.len() {
            let (src, tag, buf, cap) = t.waiting[i];
            if t.slots[src].iter().all(|a| a.is_some()) {
                i += 1;
                continue;
            }
            t.waiting.swap_remove(i);
            self.adv_live.fetch_sub(1, Ordering::Relaxed);
            if matches!(self.mb.lock().map.get(&(src, tag, Dir::Recv)), Some(Slot::Posted { .. })) {
                self.advertise_in(&mut t, src, tag, buf as *mut u8, cap);
            }
        }
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

    pub(super) fn revoke_locked(&self, t: &mut AdvTable, src: usize, tag: Tag, force: bool) -> std::result::Result<(), u64> {
        if self.adv_live.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        if let Some(i) = t.waiting.iter().position(|w| (w.0, w.1) == (src, tag)) {
            t.waiting.swap_remove(i);
            self.adv_live.fetch_sub(1, Ordering::Relaxed);
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

    /// Forget the record of `(src, tag)`'s advertisement (its writer can no longer write).
    fn drop_record(&self, src: usize, tag: Tag) {
        let mut t = self.adv_lock();
        if let Some(k) = t.slots[src].iter().position(|a| a.is_some_and(|a| a.tag == tag)) {
            t.slots[src][k] = None;
            self.adv_live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Wait (20 µs doubling to 1 ms between looks) until `done` says so, the writer `src` is
    /// gone, or — for another process — the job's timeout has passed, then fence it. Writers in
    /// this process (ranks as threads) finish within one copy, so they are waited for.
    fn wait_for_writer(&self, src: usize, what: &str, mut done: impl FnMut() -> bool) {
        let pid = self.pids[src];
        let other = pid != std::process::id();
        let t0 = Instant::now();
        let mut sleep = Duration::from_micros(20);
        while !done() {
            if other && !alive(pid) {
                return;
            }
            if other && t0.elapsed() >= self.timeout {
                self.fence(src, what);
                return;
            }
            tracing::trace!("{what} waits for rank {src}'s write into the advertised buffer");
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(1));
        }
    }

    /// `cancel_recv`'s half: revoke the advertisement. A CMA writer holding the claim is waited
    /// for (it finishes within one `process_vm_writev`), at most the job's timeout, then fenced.
    /// A stream (staged) is not waited for: what still arrives of it is dropped.
    pub(super) fn revoke_wait(&self, src: usize, tag: Tag) {
        if self.revoke(src, tag, true).is_ok() {
            return;
        }
        if self.is_staged() {
            let mut t = self.adv_lock();
            if let Some(a) = t.slots[src].iter_mut().flatten().find(|a| a.tag == tag) {
                a.buf = 0;
            }
            return;
        }
        let mut gone = true;
        self.wait_for_writer(src, "cancel_recv", || {
            gone = self.revoke(src, tag, true).is_ok();
            gone
        });
        if !gone {
            // The writer is dead (or was fenced): it writes nothing more.
            self.drop_record(src, tag);
        }
    }

    /// Complete receives whose advertised buffer a sender has written (called by `poll`).
    pub(super) fn scan_adverts(&self) {
        if self.adv_live.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut t = self.adv_lock();
        for src in 0..t.slots.len() {
            for k in 0..ADV_SLOTS {
                let Some(la) = t.slots[src][k] else { continue };
                let a = self.rx[src].adv(k);
                let Some(settled) = settled(a.state.load(Ordering::Acquire), la.gen, k) else { continue };
                t.slots[src][k] = None;
                self.adv_live.fetch_sub(1, Ordering::Relaxed);
                if !t.deferred.is_empty() {
                    t.deferred.retain(|d| (d.src, d.tag) != (src, la.tag));
                }
                if let Err(detail) = settled {
                    let e = self.proto(src, detail);
                    self.mb.fail(src, la.tag, Dir::Recv, e);
                    continue;
                }
                let w = written(a.len.load(Ordering::Relaxed), la.cap);
                if matches!(w, Written::Landed { after_rts: true, .. } | Written::Bad { after_rts: true, .. }) && !la.rts_seen {
                    t.superseded.push((src, la.tag));
                }
                match w {
                    Written::Failed => {
                        let e = Error::PeerFailed { op: "shm receive", peer: src, reason: "its write into our buffer failed".into() };
                        self.mb.fail(src, la.tag, Dir::Recv, e);
                    }
                    Written::Bad { detail, .. } => {
                        let e = self.proto(src, detail);
                        self.mb.fail(src, la.tag, Dir::Recv, e);
                    }
                    Written::Landed { len, .. } => self.mb.complete(src, la.tag, Dir::Recv, len),
                }
            }
        }
    }

    /// Deferred receives (see `AdvTable::deferred`) the sender has not claimed: revoke the
    /// advertisement and fetch them ourselves now that we wait.
    pub(super) fn run_deferred(&self) {
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
            if let Err(e) = self.fetch(d.src, d.tag, d.addr, d.buf as *mut u8, d.len, d.id) {
                tracing::warn!("{e}");
            }
        }
    }

    /// `cancel_recv` of a deferred receive: withdraw it (a sender writing into the buffer is
    /// waited for as in `revoke_wait`) and release the sender's announced buffer.
    pub(super) fn cancel_deferred(&self, src: usize, tag: Tag) {
        // Some((released, finished)): the deferred entry is gone; whether the sender needs a FIN.
        let step = || -> Option<bool> {
            let mut t = self.adv_lock();
            let i = t.deferred.iter().position(|d| (d.src, d.tag) == (src, tag))?;
            let mut fin = true;
            if let Some(k) = t.slots[src].iter().position(|a| a.is_some_and(|a| a.tag == tag)) {
                let gen = t.slots[src][k].expect("found").gen;
                match self.rx[src].adv(k).state.compare_exchange(gen << 2 | A_POSTED, gen << 2 | A_FREE, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {}
                    Err(w) if w == gen << 2 | A_CLAIMED => return None, // the sender is writing
                    Err(_) => fin = false,                               // written: the sender released itself
                }
                t.slots[src][k] = None;
                self.adv_live.fetch_sub(1, Ordering::Relaxed);
            }
            t.deferred.swap_remove(i);
            Some(fin)
        };
        let mut fin = None;
        if !self.adv_lock().deferred.iter().any(|d| (d.src, d.tag) == (src, tag)) {
            return;
        }
        self.wait_for_writer(src, "cancel_recv", || {
            fin = step();
            fin.is_some()
        });
        if fin.is_none() {
            // The writer is dead or fenced: drop the entry and its record.
            let mut t = self.adv_lock();
            t.deferred.retain(|d| (d.src, d.tag) != (src, tag));
            drop(t);
            self.drop_record(src, tag);
        }
        // The mailbox slot is `Writing` (ours): make it cancellable.
        self.mb.fail(src, tag, Dir::Recv, Error::usage("cancel_recv", "cancelled"));
        if fin == Some(true) {
            let _ = self.send_fin(src, tag);
        }
    }

    /// Staged: one chunk of the message `src` streams into advertisement `rec.id`: checked
    /// against our own record (generation, tag, capacity, offset), copied into the posted buffer
    /// (under the table lock, so a `cancel_recv` never returns while we copy), and the receive
    /// completed with the last one.
    pub(super) fn on_chunk(&self, src: usize, tag: Tag, rec: &Rec, data: &[u8]) -> Result<()> {
        let (k, gen) = split_id(rec.id);
        let mut t = self.adv_lock();
        let Some(la) = t.slots[src].get_mut(k).and_then(|a| a.as_mut()).filter(|a| a.gen == gen && a.tag == tag) else {
            return Err(self.proto(src, format!("chunk of {tag:?} for advertisement {k} (generation {gen}) we did not make")));
        };
        let (off, total) = (rec.addr, rec.total);
        check_chunk(off, data.len(), total, la.got, la.total).map_err(|e| self.proto(src, e))?;
        la.total = total;
        if off == 0 && total > la.cap as u64 && la.buf != 0 {
            // The message does not fit: fail the receive (naming the sender) and drop the stream.
            la.buf = 0;
            self.mb.fail(src, tag, Dir::Recv, crate::mailbox::too_long("shm receive", src, total as usize, la.cap));
        }
        if la.buf != 0 {
            // SAFETY: off + len <= total <= cap, inside the posted buffer, which stays valid
            // until `cancel_recv` (which takes this lock first) or completion.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (la.buf as *mut u8).add(off as usize), data.len()) };
        }
        la.got += data.len();
        if la.got as u64 == total {
            let live = la.buf != 0;
            t.slots[src][k] = None;
            self.adv_live.fetch_sub(1, Ordering::Relaxed);
            self.rx[src].adv(k).state.store(gen << 2 | A_FREE, Ordering::Release);
            drop(t);
            if live {
                self.mb.complete(src, tag, Dir::Recv, total as usize);
            }
        }
        Ok(())
    }

    /// Staged: the sender withdrew the message it was streaming into advertisement `id`.
    pub(super) fn on_abort(&self, src: usize, tag: Tag, id: u64) {
        let (k, gen) = split_id(id);
        let mut t = self.adv_lock();
        let Some(la) = t.slots[src].get(k).copied().flatten().filter(|a| a.gen == gen && a.tag == tag) else { return };
        t.slots[src][k] = None;
        self.adv_live.fetch_sub(1, Ordering::Relaxed);
        self.rx[src].adv(k).state.store(gen << 2 | A_FREE, Ordering::Release);
        drop(t);
        if la.buf != 0 {
            let e = Error::PeerFailed { op: "shm receive", peer: src, reason: "the sender withdrew the message while streaming it".into() };
            self.mb.fail(src, tag, Dir::Recv, e);
        }
    }
}
