//! Advertised receives, the receiver's side: its private table of advertisements per source
//! (and of deferred receives and superseded RTS records), publishing a posted buffer in a
//! shared slot, revoking it (CAS POSTED -> FREE, or waiting while a writer holds the claim),
//! and completing the receives whose slot a sender has written.
use super::cma::alive;
use super::segment::{ADV_SLOTS, A_CLAIMED, A_FREE, A_LEN_AFTER_RTS, A_LEN_FAILED, A_POSTED, A_WRITTEN};
use super::{stat, ShmFabric};
use crate::error::Error;
use crate::fabric::Tag;
use crate::mailbox::Dir;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The receiver's private record of one advertisement (the shared copy is not trusted).
#[derive(Clone, Copy)]
pub(super) struct LocalAdv {
    pub(super) tag: Tag,
    pub(super) cap: usize,
    pub(super) gen: u64,
    /// The sender's RTS for this message has been drained (or the receive was deferred on it).
    pub(super) rts_seen: bool,
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
}

#[derive(Clone, Copy)]
pub(super) struct Deferred {
    pub(super) src: usize,
    pub(super) tag: Tag,
    pub(super) addr: u64,
    pub(super) buf: usize,
    pub(super) len: usize,
}

impl ShmFabric {
    pub(super) fn adv_lock(&self) -> std::sync::MutexGuard<'_, AdvTable> {
        self.adv.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Publish the buffer posted for `(src, tag)` so `src` can write into it directly; false
    /// when every slot for `src` is in use (the message then comes through RTS).
    pub(super) fn advertise(&self, src: usize, tag: Tag, buf: *mut u8, cap: usize) -> bool {
        let mut t = self.adv_lock();
        // Under the table lock (which the ring drain holds from revoking to claiming): if another
        // thread already claimed the buffer for a ring or RTS delivery, do not advertise it.
        if !matches!(self.mb.lock().map.get(&(src, tag, Dir::Recv)), Some(crate::mailbox::Slot::Posted { .. })) {
            return false;
        }
        self.advertise_in(&mut t, src, tag, buf, cap)
    }

    pub(super) fn advertise_in(&self, t: &mut AdvTable, src: usize, tag: Tag, buf: *mut u8, cap: usize) -> bool {
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

    pub(super) fn revoke_locked(&self, t: &mut AdvTable, src: usize, tag: Tag, force: bool) -> std::result::Result<(), u64> {
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
    pub(super) fn revoke_wait(&self, src: usize, tag: Tag) {
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
    pub(super) fn scan_adverts(&self) {
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
            if let Err(e) = self.fetch(d.src, d.tag, d.addr, d.buf as *mut u8, d.len) {
                tracing::warn!("{e}");
            }
        }
    }

    /// `cancel_recv` of a deferred receive: withdraw it (waiting while the sender writes into
    /// the buffer) and release the sender's announced buffer.
    pub(super) fn cancel_deferred(&self, src: usize, tag: Tag) {
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
}
