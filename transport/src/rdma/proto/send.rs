//! The sending side: issuing a send (`send_as`: eager through the slots, or announced for
//! zero-copy), choosing a job's delivery once the receiver's answer is known (`start`), and
//! posting (`post_pending`): aborts, credit returns, control messages, then data chunks
//! round-robin over peers as credits and send-queue room allow (zero-copy ones only right after
//! every arrival was handled).
use super::header::{Ctl, Header, K_DATA, NO_ADV};
use super::state::{fail_peer, Mode, RemoteBuf, SendJob, State};
use super::{RdmaFabric, ABORT, CREDIT_WR, HDR};
use crate::error::{Error, Result};
use crate::fabric::{Tag, Wait};
use crate::rdma::verbs::{Imm, PostError, Sge, Verbs};

impl<V: Verbs> RdmaFabric<V> {
    /// `send`; `direct`: the data is device memory, so a non-empty message waits for the
    /// receiver's advertisement whatever its length (the NIC reads the data either way).
    ///
    /// # Safety
    /// As `Fabric::send`.
    pub(super) unsafe fn send_as(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait, direct: bool) -> Result<()> {
        if dst >= self.n || dst == self.rank {
            return Err(Error::usage(w.op, format!("send to rank {dst} on rank {} of {}", self.rank, self.n)));
        }
        let mut st = self.state(w.op)?;
        if let Some(e) = self.peer_err(&st, dst, w.op) {
            self.flush_aborts(&mut st);
            return Err(e);
        }
        if st.job_of.contains_key(&(dst, tag)) {
            return Err(Error::usage(w.op, format!("send to rank {dst} for {tag:?} issued twice")));
        }
        let mr = if len > 0 {
            Some(st.cache.acquire(&self.v, data as usize, len, false).map_err(|e| Error::Io { op: w.op, peer: dst, detail: format!("registering the send buffer: {e}") })?)
        } else {
            None
        };
        let jid = st.next_job;
        st.next_job += 1;
        let mut j = SendJob { dst, tag, data: data as usize, len, mr, mode: Mode::Wait, next_off: 0, chunks_total: usize::MAX, chunks_posted: 0, chunks_done: 0, err: None };
        let peer = &mut st.peers[dst];
        let stashed = peer.adverts.remove(&tag);
        let revoked = peer.revoked.remove(&tag);
        if len >= if direct { 1 } else { self.zc_min } {
            // Announce it (the receiver learns the length; if it did not advertise, it answers).
            peer.ctl.push_back(Ctl::Rts { tag, len: len as u64 });
            if revoked {
                j.mode = Mode::Dropped;
                j.chunks_total = 0;
            } else if let Some(rb) = stashed {
                self.start(&mut j, Some(rb));
                peer.tx_queue.push_back(jid);
            }
        } else {
            self.start(&mut j, None);
            peer.tx_queue.push_back(jid);
        }
        st.jobs.insert(jid, j);
        st.job_of.insert((dst, tag), jid);
        self.progress(&mut st);
        Ok(())
    }

    /// Decide how job `j` is delivered once it is known whether the receiver advertised a
    /// buffer large enough for it.
    pub(super) fn start(&self, j: &mut SendJob, rb: Option<RemoteBuf>) {
        match rb {
            Some(rb) if j.len as u64 <= rb.cap && j.len > 0 => {
                j.mode = Mode::Zc { addr: rb.addr, rkey: rb.rkey, adv: rb.adv };
                j.chunks_total = j.len.div_ceil(self.zc_chunk);
            }
            _ => {
                j.mode = Mode::Eager;
                j.chunks_total = j.len.div_ceil(self.cfg.chunk).max(1);
            }
        }
    }

    /// Return owed credits, post control messages, then post chunks round-robin over peers.
    /// `drained`: every completion that had arrived was handled just before (`progress`);
    /// otherwise no zero-copy write is posted, since a revoke of its buffer may be among the
    /// completions not yet handled. Returns whether anything was posted.
    pub(super) fn post_pending(&self, st: &mut State, drained: bool) -> bool {
        let (n, s) = (self.n, self.cfg.slots);
        let mut any = false;
        // Aborts first (a full queue keeps them pending).
        for p in 0..n {
            if !st.peers[p].abort {
                continue;
            }
            let Some(r) = st.peers[p].remote else { continue };
            let imm = Imm::Credit { src: self.rank, count: ABORT }.encode();
            // SAFETY: zero-length write, no local memory.
            match unsafe { self.v.post_write_imm(p, CREDIT_WR | p as u64, &[], r.addr, r.rkey, imm) } {
                Err(PostError::QueueFull) => {}
                _ => st.peers[p].abort = false,
            }
        }
        for p in 0..n {
            if st.peers[p].failed.is_some() {
                st.peers[p].ctl.clear();
                continue;
            }
            let Some(r) = st.peers[p].remote else { continue };
            // Credits: a batch as soon as any slot was freed (latency); a full queue keeps them owed.
            let owed = st.peers[p].owed;
            if owed > 0 {
                let imm = Imm::Credit { src: self.rank, count: owed }.encode();
                // SAFETY: zero-length write, no local memory.
                match unsafe { self.v.post_write_imm(p, CREDIT_WR | p as u64, &[], r.addr, r.rkey, imm) } {
                    Ok(()) => {
                        st.peers[p].owed = 0;
                        any = true;
                    }
                    Err(PostError::QueueFull) => {}
                    Err(PostError::Fatal(e)) => {
                        fail_peer(st, p, format!("posting a credit return: {e}"));
                        continue;
                    }
                }
            }
            // Control messages, in order, each a header-only write into the next slot.
            while let Some(&c) = st.peers[p].ctl.front() {
                if st.peers[p].credits == 0 {
                    break;
                }
                let seq = st.peers[p].tx_seq;
                let slot = seq as usize % s;
                let hi = p * s + slot;
                c.header(self.rank as u16, seq).write(&mut st.hdrs[hi]);
                let sge = Sge { addr: self.hdr_mr.addr + (hi * HDR) as u64, len: HDR as u32, lkey: self.hdr_mr.lkey };
                let imm = Imm::Data { src: self.rank, slot, seq16: seq as u16 }.encode();
                // SAFETY: the header slot is not rewritten before this slot's credit returns.
                match unsafe { self.v.post_write_imm(p, CREDIT_WR | p as u64, &[sge], r.addr + (slot * r.slot_size) as u64, r.rkey, imm) } {
                    Ok(()) => {
                        let peer = &mut st.peers[p];
                        peer.ctl.pop_front();
                        peer.credits -= 1;
                        peer.tx_seq = seq.wrapping_add(1);
                        any = true;
                    }
                    Err(PostError::QueueFull) => break,
                    Err(PostError::Fatal(e)) => {
                        fail_peer(st, p, format!("posting a control message: {e}"));
                        break;
                    }
                }
            }
        }
        // Data: one chunk per peer per pass, starting at a rank-dependent peer (no incast).
        st.rotate = st.rotate.wrapping_add(1);
        loop {
            let mut progressed = false;
            // Every peer once, from a pass-dependent one on. (Was `(rank + i + rotate) % n` for
            // i in 1..n, which skipped peer `(rank + rotate) % n` whenever that was not us.)
            for i in 0..n - 1 {
                let p = (self.rank + 1 + (i + st.rotate % (n - 1)) % (n - 1)) % n;
                let peer = &st.peers[p];
                if peer.credits == 0 || peer.failed.is_some() || !peer.ctl.is_empty() {
                    continue;
                }
                let Some(&jid) = peer.tx_queue.front() else { continue };
                let r = peer.remote.expect("connected");
                let seq = peer.tx_seq;
                let slot = seq as usize % s;
                let j = st.jobs.get(&jid).expect("queued job exists");
                if !drained && matches!(j.mode, Mode::Zc { .. }) {
                    continue;
                }
                let off = j.next_off;
                let mut sges = [Sge { addr: 0, len: 0, lkey: 0 }; 2];
                let (clen, nsge, raddr, rkey, imm);
                if let Mode::Zc { addr, rkey: rk, adv } = j.mode {
                    // Straight into the advertised buffer: [addr + off, +clen) <= its length (checked at start).
                    clen = (j.len - off).min(self.zc_chunk);
                    let mr = j.mr.expect("non-empty send is registered").mr;
                    sges[0] = Sge { addr: (j.data + off) as u64, len: clen as u32, lkey: mr.lkey };
                    nsge = 1;
                    raddr = addr + off as u64;
                    rkey = rk;
                    imm = Imm::Zc { src: self.rank, adv: adv as usize, seq16: seq as u16 }.encode();
                } else {
                    clen = (j.len - off).min(self.cfg.chunk);
                    let h = Header { src: self.rank as u16, kind: K_DATA, adv: NO_ADV, chunk_len: clen as u32, tag: j.tag, total: j.len as u64, offset: off as u64, chunk_seq: seq, aux: 0 };
                    let hi = p * s + slot;
                    let hdr_addr = self.hdr_mr.addr + (hi * HDR) as u64;
                    let data = j.data;
                    let mr = j.mr;
                    h.write(&mut st.hdrs[hi]);
                    sges[0] = Sge { addr: hdr_addr, len: HDR as u32, lkey: self.hdr_mr.lkey };
                    nsge = if clen > 0 {
                        let mr = mr.expect("non-empty send is registered").mr;
                        sges[1] = Sge { addr: (data + off) as u64, len: clen as u32, lkey: mr.lkey };
                        2
                    } else {
                        1
                    };
                    raddr = r.addr + (slot * r.slot_size) as u64;
                    rkey = r.rkey;
                    imm = Imm::Data { src: self.rank, slot, seq16: seq as u16 }.encode();
                }
                // SAFETY: the header slot is not rewritten before the peer returns this slot's
                // credit (it has then read the write); the data stays valid until wait_send.
                match unsafe { self.v.post_write_imm(p, jid, &sges[..nsge], raddr, rkey, imm) } {
                    Ok(()) => {
                        progressed = true;
                        let j = st.jobs.get_mut(&jid).unwrap();
                        j.next_off += clen;
                        j.chunks_posted += 1;
                        let all = j.chunks_posted == j.chunks_total;
                        let peer = &mut st.peers[p];
                        peer.credits -= 1;
                        peer.tx_seq = seq.wrapping_add(1);
                        peer.data_in_flight += 1;
                        if all {
                            peer.tx_queue.pop_front();
                        }
                    }
                    Err(PostError::QueueFull) => {}
                    Err(PostError::Fatal(e)) => {
                        fail_peer(st, p, format!("posting an RDMA write: {e}"));
                    }
                }
            }
            if !progressed {
                break;
            }
            any = true;
        }
        any
    }
}
