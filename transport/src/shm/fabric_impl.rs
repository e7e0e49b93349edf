//! `ShmFabric` as a `Fabric`: progress (`poll`: pending control records, peer liveness, draining
//! every ring, then advertisements, unfinished sends and deferred receives), the trait's post,
//! send, wait and cancel operations choosing between the eager, CMA (direct or announced) and
//! staged paths, and teardown.
use super::advert::Deferred;
use super::cma::alive;
use super::ring::{Rec, EAGER};
use super::{stat, stats_on, ShmFabric, STATS};
use crate::error::Result;
use crate::fabric::{Fabric, Sent, Tag, Wait};
use crate::mailbox::{Dir, Posted};
use bytemuck::Zeroable;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl ShmFabric {
    /// Progress: flush pending control records and drain every inbox ring. Only one thread
    /// drains at a time. Returns whether a record was drained or a streamed chunk pushed.
    pub fn poll(&self) -> Result<bool> {
        let Ok(mut d) = self.drain.try_lock() else { return Ok(false) };
        let mut moved = false;
        if self.pending_n.load(Ordering::Acquire) > 0 {
            let mut pend = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            let mut keep = Vec::new();
            for (dst, rec) in pend.drain(..) {
                if !self.try_push(dst, &rec, &[])? {
                    keep.push((dst, rec));
                }
            }
            *pend = keep;
            self.pending_n.store(pend.len(), Ordering::Release);
        }
        // Liveness first: whatever a peer wrote before it exited (ring records, direct writes)
        // is drained below, before it is declared dead, so a peer that finished its part of a
        // collective and exited is not reported as failed.
        let mut died = Vec::new();
        // The clock is read every 64th poll only (a poll without news costs about one read).
        d.polls = d.polls.wrapping_add(1);
        if d.polls.is_multiple_of(64) && d.last_liveness.elapsed() > Duration::from_millis(5) {
            d.last_liveness = Instant::now();
            for (r, &pid) in self.pids.iter().enumerate() {
                if r != self.rank && pid != std::process::id() && !alive(pid) {
                    died.push((r, pid));
                }
            }
        }
        for s in 0..self.rx.len() {
            if s != self.rank {
                let tail = d.tails[s];
                if let Err(e) = self.drain_ring(s, &mut d.tails[s]) {
                    tracing::warn!("{e}");
                }
                moved |= d.tails[s] != tail;
            }
        }
        self.scan_adverts();
        self.advertise_waiting();
        moved |= self.retry_sends();
        self.run_deferred();
        for (r, pid) in died {
            self.mb.peer_died(r, format!("process {pid} exited"));
        }
        Ok(moved)
    }

    /// An eager message of `len` bytes at `data` into `dst`'s ring: copied out, no byte of
    /// `data` read, once this returns.
    ///
    /// # Safety
    /// `data` holds `len` readable bytes until this returns.
    unsafe fn push_eager(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        let rec = Rec { kind: EAGER, round: tag.round, ctx: tag.ctx, seq: tag.seq, len: len as u64, ..Rec::zeroed() };
        // SAFETY: `data` holds `len` readable bytes until this returns (this function's contract).
        self.push_wait(dst, &rec, unsafe { std::slice::from_raw_parts(data, len) }, w)?;
        stat(0);
        Ok(())
    }
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
        self.check_failed(w.op)?;
        match self.mb.post(src, tag, buf, len, w.op)? {
            Posted::Waiting => {
                // Staged: every large receive is advertised (the sender waits for it).
                if len > self.opts.eager_max && (self.opts.direct || self.is_staged()) {
                    self.advertise(src, tag, buf, len);
                }
                Ok(())
            }
            Posted::Landed => Ok(()),
            Posted::Fetch { addr, len: mlen, id } => {
                if self.opts.direct {
                    let mut t = self.adv_lock();
                    if self.advertise_in(&mut t, src, tag, buf, len) {
                        if let Some(a) = t.slots[src].iter_mut().flatten().find(|a| a.tag == tag) {
                            a.rts_seen = true;
                        }
                        t.deferred.push(Deferred { src, tag, addr, buf: buf as usize, len: mlen, id });
                        return Ok(());
                    }
                }
                stat(3);
                self.fetch(src, tag, addr, buf, mlen, id)
            }
        }
    }

    unsafe fn send_now(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<Sent> {
        if len > self.opts.eager_max {
            // SAFETY: the caller holds `send`'s contract (this function's).
            return unsafe { self.send(dst, tag, data, len, w) }.map(|()| Sent::Pending);
        }
        self.check_failed(w.op)?;
        // SAFETY: the caller holds `send`'s contract (this function's).
        unsafe { self.push_eager(dst, tag, data, len, w) }?;
        Ok(Sent::Done)
    }

    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        self.check_failed(w.op)?;
        if len <= self.opts.eager_max {
            // SAFETY: the caller holds `send`'s contract.
            unsafe { self.push_eager(dst, tag, data, len, w) }?;
            // Recorded for the `wait_send` that follows a plain `send`.
            self.mb.complete(dst, tag, Dir::Send, 0);
        } else if self.is_staged() {
            self.stream(dst, tag, data, len)?;
        } else if self.try_direct(dst, tag, data, len, false)? {
            stat(1);
        } else {
            self.announce(dst, tag, data, len, w)?;
        }
        Ok(())
    }

    fn wait_send(&self, dst: usize, tag: Tag, w: &Wait) -> Result<()> {
        let r = self.mb.wait_done(dst, tag, Dir::Send, w, &|| self.poll()).map(|_| ());
        // Whatever the outcome, the caller may reuse the buffer now: no later read from it.
        self.finish_send(dst, tag);
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

    fn cancel_send(&self, dst: usize, tag: Tag) {
        self.finish_send(dst, tag);
    }
}

impl Drop for ShmFabric {
    fn drop(&mut self) {
        // No writer may claim an advertisement of a buffer that outlives us (a stalled one is
        // fenced after the timeout), and no reader may take an offer of ours.
        let live: Vec<(usize, Tag)> = {
            let t = self.adv_lock();
            t.slots.iter().enumerate().flat_map(|(s, v)| v.iter().flatten().map(move |a| (s, a.tag))).collect()
        };
        for (s, tag) in live {
            self.revoke_wait(s, tag);
        }
        self.withdraw_all();
        if stats_on() {
            let v: Vec<u64> = STATS.iter().map(|c| c.load(Ordering::Relaxed)).collect();
            eprintln!(
                "shm rank {}: eager {} direct {} direct-after-rts {} rts-fetch {} rts-superseded {} staged {}",
                self.rank, v[0], v[1], v[2], v[3], v[4], v[5]
            );
        }
        self.inbox.unlink();
    }
}
