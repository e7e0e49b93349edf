//! The sender's unfinished large sends: progress on all of them from `poll` (an announced CMA
//! send writes directly once the receiver advertises; a staged send claims the receiver's
//! advertisement and streams the message through the ring in chunks), and finishing or
//! withdrawing one (`wait_send`, `cancel_send`): after a withdrawal no byte of its buffer is
//! read by this rank, and a receiver copying it by CMA discards what it read.
use super::ring::{slot_id, Rec, ABORT, CHUNK};
use super::{stat, JobState, SendJob, Sends, ShmFabric, CHUNK_BYTES};
use crate::error::Result;
use crate::fabric::Tag;
use crate::mailbox::Dir;
use bytemuck::Zeroable;
use std::sync::atomic::Ordering;
use std::sync::MutexGuard;

impl ShmFabric {
    pub(super) fn sends_lock(&self) -> MutexGuard<'_, Sends> {
        self.sends.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Staged `send`: claim the receiver's advertisement and push what fits now; the rest (or
    /// the whole message, when the receiver has not advertised yet) is left to `poll`.
    pub(super) fn stream(&self, dst: usize, tag: Tag, data: *const u8, len: usize) -> Result<()> {
        let mut s = self.sends_lock();
        let mut job = SendJob { dst, tag, data: data as usize, len, state: JobState::Waiting };
        if !self.advance(&mut job)? {
            s.jobs.push(job);
            self.sends_n.store(s.jobs.len(), Ordering::Release);
        }
        Ok(())
    }

    /// Move one job on; `Ok(true)`: it is finished (the send is complete).
    fn advance(&self, j: &mut SendJob) -> Result<bool> {
        match j.state {
            JobState::Announced { .. } => {
                // The receiver advertised meanwhile: write it ourselves (the waiting sender's
                // core is idle; the receiver would copy only once it polls).
                if !self.opts.direct || !self.try_direct(j.dst, j.tag, j.data as *const u8, j.len, true)? {
                    return Ok(false);
                }
                stat(2);
                Ok(true)
            }
            JobState::Waiting => {
                // A buffer too small is claimed too: the receiver reports the overflow.
                let Some((k, _, w, _)) = self.claim_advert(j.dst, j.tag, j.len, true) else { return Ok(false) };
                j.state = JobState::Streaming { k, gen: w >> 2, off: 0 };
                stat(5);
                self.advance(j)
            }
            JobState::Streaming { k, gen, mut off } => {
                while off < j.len {
                    let n = (j.len - off).min(CHUNK_BYTES);
                    let rec = Rec {
                        kind: CHUNK,
                        round: j.tag.round,
                        ctx: j.tag.ctx,
                        seq: j.tag.seq,
                        len: n as u64,
                        addr: off as u64,
                        total: j.len as u64,
                        id: slot_id(k, gen),
                        ..Rec::zeroed()
                    };
                    // SAFETY: off + n <= len, inside the caller's buffer (valid until
                    // wait_send or cancel_send, which take the job away under our lock).
                    let chunk = unsafe { std::slice::from_raw_parts((j.data as *const u8).add(off), n) };
                    if !self.try_push(j.dst, &rec, chunk)? {
                        break;
                    }
                    off += n;
                }
                j.state = JobState::Streaming { k, gen, off };
                if off < j.len {
                    return Ok(false);
                }
                self.mb.complete(j.dst, j.tag, Dir::Send, 0);
                Ok(true)
            }
        }
    }

    /// Progress on every unfinished large send (called by `poll`). A send whose receiver is gone
    /// fails. Returns whether any send moved (claimed, streamed a chunk, finished, failed).
    pub(super) fn retry_sends(&self) -> bool {
        if self.sends_n.load(Ordering::Acquire) == 0 {
            return false;
        }
        let mut moved = false;
        let mut s = self.sends_lock();
        let mut i = 0;
        while i < s.jobs.len() {
            let mut j = s.jobs[i];
            let before = j.state;
            match self.advance(&mut j) {
                Ok(false) => {
                    moved |= j.state != before;
                    s.jobs[i] = j;
                    i += 1;
                }
                Ok(true) => {
                    moved = true;
                    if let JobState::Announced { k, .. } = j.state {
                        s.offers[j.dst][k] = false;
                    }
                    s.jobs.swap_remove(i);
                }
                Err(e) => {
                    moved = true;
                    self.mb.fail(j.dst, j.tag, Dir::Send, e);
                    s.jobs[i] = j;
                    self.withdraw(&mut s, i);
                }
            }
        }
        self.sends_n.store(s.jobs.len(), Ordering::Release);
        moved
    }

    /// Remove job `i`: withdraw its offer, or end its stream with an ABORT record.
    fn withdraw(&self, s: &mut Sends, i: usize) {
        let j = s.jobs.swap_remove(i);
        match j.state {
            JobState::Announced { k, gen } => {
                self.withdraw_offer(j.dst, k, gen);
                s.offers[j.dst][k] = false;
            }
            JobState::Waiting => {}
            JobState::Streaming { k, gen, off } => {
                if off < j.len {
                    let rec = Rec { kind: ABORT, round: j.tag.round, ctx: j.tag.ctx, seq: j.tag.seq, id: slot_id(k, gen), ..Rec::zeroed() };
                    let _ = self.push_control(j.dst, rec);
                }
            }
        }
    }

    /// `wait_send` is over (completed or not) or `cancel_send`: the caller may reuse the buffer.
    /// A job still here is withdrawn (for one the receiver finished, a no-op on its offer).
    pub(super) fn finish_send(&self, dst: usize, tag: Tag) {
        if self.sends_n.load(Ordering::Acquire) == 0 {
            return; // nothing in flight (jobs are only added by `send`, or gone)
        }
        let mut s = self.sends_lock();
        if let Some(i) = s.jobs.iter().position(|j| (j.dst, j.tag) == (dst, tag)) {
            self.withdraw(&mut s, i);
        }
        self.sends_n.store(s.jobs.len(), Ordering::Release);
    }

    /// Every unfinished send withdrawn (the fabric goes away).
    pub(super) fn withdraw_all(&self) {
        let mut s = self.sends_lock();
        while !s.jobs.is_empty() {
            self.withdraw(&mut s, 0);
        }
        self.sends_n.store(0, Ordering::Release);
    }
}
