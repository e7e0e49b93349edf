//! The receiving side of a message: posting a receive (`post_recv_as`: copy out what was
//! stashed, or go zero-copy), registering and advertising its buffer to the sender, handing out
//! advertisement indices, and withdrawing a receive (cancel, failed wait) with the
//! revoke/acknowledge handshake.
use super::header::{Ctl, NO_ADV, R_CANCEL, R_EAGER};
use super::state::{AdvSlot, State};
use super::{RdmaFabric, CANCEL_WAIT};
use crate::error::{Error, Result};
use crate::fabric::{Tag, Wait};
use crate::rdma::verbs::{Verbs, MAX_ADVERTS};
use std::time::Instant;

impl<V: Verbs> RdmaFabric<V> {
    /// `post_recv`; `direct`: the buffer is device memory, every byte of it placed by the NIC
    /// (any non-empty message is advertised, whatever the zero-copy threshold).
    ///
    /// # Safety
    /// As `Fabric::post_recv`.
    pub(super) unsafe fn post_recv_as(&self, src: usize, tag: Tag, buf: *mut u8, len: usize, w: &Wait, direct: bool) -> Result<()> {
        if src >= self.n || src == self.rank {
            return Err(Error::usage(w.op, format!("post_recv from rank {src} on rank {} of {}", self.rank, self.n)));
        }
        let mut st = self.state(w.op)?;
        if let Some(e) = self.peer_err(&st, src, w.op) {
            self.flush_aborts(&mut st);
            return Err(e);
        }
        let zc_min = if direct { 1 } else { self.zc_min };
        let e = st.recvs.entry((src, tag)).or_default();
        if e.posted.is_some() || e.withdrawn {
            return Err(Error::usage(w.op, format!("receive from rank {src} for {tag:?} posted twice")));
        }
        e.posted = Some((buf as usize, len));
        e.direct = direct;
        let (mut advertise, mut eager_please) = (false, false);
        match e.total {
            Some(total) if total > len => {
                e.discard = true;
                e.stash = Vec::new();
                e.err = Some(Error::Protocol { op: w.op, peer: src, detail: format!("message of {total} bytes for a {len}-byte buffer") });
                if e.announced {
                    e.eager = true;
                    eager_please = true;
                }
            }
            Some(_) if e.announced => {
                // Announced zero-copy before we posted.
                if len >= zc_min {
                    advertise = true;
                } else {
                    e.eager = true;
                    eager_please = true;
                }
            }
            Some(total) if direct && total > 0 => {
                e.discard = true;
                e.stash = Vec::new();
                e.err = Some(Error::Protocol { op: w.op, peer: src, detail: format!("a {total}-byte message for a device buffer came through the receive slots (the sender did not send it from device memory)") });
            }
            Some(_) => {
                if !e.stash.is_empty() {
                    // SAFETY: stash.len() <= total <= len, and `buf` holds `len` writable bytes
                    // (the `post_recv` contract); the stash is our own vector.
                    unsafe { std::ptr::copy_nonoverlapping(e.stash.as_ptr(), buf, e.stash.len()) };
                    e.stash = Vec::new();
                }
            }
            None => advertise = len >= zc_min,
        }
        if eager_please {
            st.peers[src].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_EAGER });
        }
        if advertise {
            self.advertise(&mut st, src, tag, buf as usize, len);
        }
        if !st.peers[src].ctl.is_empty() {
            self.progress(&mut st); // the advertisement goes out now
        }
        Ok(())
    }

    /// Advertisement index `a` to peer `p` is free: hand it to a receive waiting for one.
    pub(super) fn free_adv(st: &mut State, p: usize, a: usize) {
        st.peers[p].advs[a] = AdvSlot::Free;
        while let Some(tag) = st.peers[p].adv_wait.pop_front() {
            let Some(e) = st.recvs.get_mut(&(p, tag)) else { continue };
            if !e.adv_wait {
                continue;
            }
            let (Some((buf, cap)), Some(mr)) = (e.posted, e.mr) else { continue };
            e.adv_wait = false;
            e.adv = Some(a as u8);
            st.peers[p].advs[a] = AdvSlot::Active(tag);
            st.peers[p].ctl.push_back(Ctl::Advert { tag, adv: a as u8, addr: buf as u64, rkey: mr.mr.rkey, cap: cap as u64 });
            break;
        }
    }

    /// Register the posted buffer of `(p, tag)` and advertise it (or queue it for an index).
    /// On a registration failure the message simply goes through the slots.
    pub(super) fn advertise(&self, st: &mut State, p: usize, tag: Tag, buf: usize, len: usize) {
        let mr = match st.cache.acquire(&self.v, buf, len, true) {
            Ok(mr) => mr,
            Err(e) => {
                let e2 = st.recvs.get_mut(&(p, tag)).expect("posted entry");
                if e2.direct {
                    // No slot fallback for device memory: the receive fails, and a sender that
                    // announced the message already is told at once not to wait for it (else
                    // when its announcement arrives).
                    e2.discard = true;
                    e2.err = Some(Error::Io { op: "rdma recv", peer: p, detail: format!("registering a {len}-byte device buffer for GPUDirect RDMA: {e}") });
                    if e2.announced {
                        e2.revoked = true;
                        st.peers[p].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_CANCEL });
                    }
                } else {
                    tracing::debug!(peer = p, "rdma: registering a receive buffer failed ({e}); using the slots");
                }
                return;
            }
        };
        let State { peers, recvs, .. } = st;
        let peer = &mut peers[p];
        let e = recvs.get_mut(&(p, tag)).expect("posted entry");
        e.mr = Some(mr);
        match (0..MAX_ADVERTS).map(|i| (peer.adv_next + i) % MAX_ADVERTS).find(|&i| peer.advs[i] == AdvSlot::Free) {
            Some(a) => {
                peer.adv_next = a + 1;
                peer.advs[a] = AdvSlot::Active(tag);
                e.adv = Some(a as u8);
                peer.ctl.push_back(Ctl::Advert { tag, adv: a as u8, addr: buf as u64, rkey: mr.mr.rkey, cap: len as u64 });
            }
            None => {
                e.adv_wait = true;
                peer.adv_wait.push_back(tag);
            }
        }
    }

    /// The message `(p, tag)` will not be written zero-copy: release its registration and its
    /// advertisement (or its place in the queue for one). Returns whether it was advertised.
    pub(super) fn unadvertise(&self, st: &mut State, p: usize, tag: Tag) -> bool {
        let Some(e) = st.recvs.get_mut(&(p, tag)) else { return false };
        let (mr, adv, waited) = (e.mr.take(), e.adv.take(), std::mem::take(&mut e.adv_wait));
        if let Some(mr) = mr {
            let _ = st.cache.release(&self.v, &mr, false);
        }
        if waited {
            st.peers[p].adv_wait.retain(|t| *t != tag);
        }
        if let Some(a) = adv {
            Self::free_adv(st, p, a as usize);
        }
        adv.is_some()
    }

    /// Forget the posted buffer (cancel, or a failed wait). The sender of an advertised buffer
    /// is told to stop; unless it acknowledges within [`CANCEL_WAIT`], the buffer is revoked:
    /// deregistered before this returns, so a write still on its way fails at the (emulated)
    /// NIC instead of landing. Chunks still to come through the slots are consumed and dropped.
    pub(super) fn withdraw(&self, st: &mut State, src: usize, tag: Tag) {
        let Some(e) = st.recvs.get_mut(&(src, tag)) else { return };
        if e.done {
            let mr = e.mr.take();
            st.recvs.remove(&(src, tag));
            if let Some(mr) = mr {
                let _ = st.cache.release(&self.v, &mr, false);
            }
            return;
        }
        e.posted = None;
        e.discard = true;
        e.stash = Vec::new();
        e.withdrawn = true;
        e.err.get_or_insert(Error::PeerFailed { op: "rdma recv", peer: src, reason: "receive cancelled".into() });
        let (mr, mut adv, waited) = (e.mr.take(), e.adv.take(), std::mem::take(&mut e.adv_wait));
        let (announced, eager, revoked) = (e.announced, e.eager, e.revoked);
        if waited {
            st.peers[src].adv_wait.retain(|t| *t != tag);
        }
        if let Some(a) = adv {
            // Still queued here: the sender never saw it; nothing to revoke.
            let ctl = &mut st.peers[src].ctl;
            if let Some(i) = ctl.iter().position(|c| matches!(c, Ctl::Advert { tag: t, .. } if *t == tag)) {
                ctl.remove(i);
                Self::free_adv(st, src, a as usize);
                adv = None;
            }
        }
        let mut revoke = false;
        let mut remove = false;
        if let Some(a) = adv {
            st.peers[src].advs[a as usize] = AdvSlot::Revoked { tag, deregistered: false };
            st.peers[src].ctl.push_back(Ctl::Revoke { tag, adv: a, why: R_CANCEL });
            st.recvs.get_mut(&(src, tag)).unwrap().revoked = true;
            // Announced: the sender writes zero-copy or nothing, so nothing more comes for the entry.
            remove = announced;
            // A write already on its way would be rejected by the revoked registration, which
            // fails the connection at the sender (on RC: the QP goes to error). So first give
            // the sender a moment to acknowledge (every write it posted before lands first, into
            // a buffer still ours until we return); revoke only if it does not.
            revoke = !self.await_ack(st, src, a as usize);
            if revoke {
                if let AdvSlot::Revoked { deregistered, .. } = &mut st.peers[src].advs[a as usize] {
                    *deregistered = true; // below (or the sender is cut off)
                }
            }
        } else if announced && !eager {
            // The sender waits for an advertisement that will not come (unless told already).
            if !revoked {
                st.peers[src].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_CANCEL });
            }
            remove = true;
        }
        if let Some(mr) = mr {
            if let Some(region) = st.cache.release(&self.v, &mr, revoke) {
                self.cut_off(st, src, region, "it did not acknowledge the cancel of a receive inside a registered region");
            }
        }
        if remove {
            st.recvs.remove(&(src, tag));
        }
    }

    /// Progress until peer `p` acknowledged the revoke of advertisement `a` (true), for at most
    /// [`CANCEL_WAIT`], or until the peer failed (false).
    pub(super) fn await_ack(&self, st: &mut State, p: usize, a: usize) -> bool {
        let t0 = Instant::now();
        loop {
            if !matches!(st.peers[p].advs[a], AdvSlot::Revoked { .. }) {
                return true; // acknowledged (the index may be in use again already)
            }
            if st.peers[p].failed.is_some() || t0.elapsed() >= CANCEL_WAIT {
                return false;
            }
            if !self.progress(st) {
                std::thread::yield_now();
            }
        }
    }
}
