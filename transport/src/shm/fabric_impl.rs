//! `ShmFabric` as a `Fabric`: progress (`poll`: pending FINs, peer liveness, draining every
//! ring, then advertisements, announced sends and deferred receives), the trait's post, send,
//! wait and cancel operations choosing between the eager, direct and RTS paths, and teardown.
use super::advert::Deferred;
use super::cma::alive;
use super::ring::{Rec, EAGER, RTS};
use super::{direct_enabled, eager_max, stat, stats_on, ShmFabric, STATS};
use crate::error::Result;
use crate::fabric::{Fabric, Tag, Wait};
use crate::mailbox::{Dir, Posted};
use bytemuck::Zeroable;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl ShmFabric {
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
