//! Arrivals: completions polled from the verbs endpoint (`on_wc`), each incoming write checked
//! against its immediate and header (`on_recv`: credit returns, eager chunks copied out or
//! stashed, zero-copy chunks counted), and the control messages of the rendezvous (`on_ctl`).
//! A malformed write fails the peer and aborts its stream.
use super::header::{Ctl, Header, K_ACK, K_ADVERT, K_DATA, K_REVOKE, K_RTS, NO_ADV, R_CANCEL, R_EAGER, R_PURGE};
use super::state::{fail_peer, fail_peer_as, AdvSlot, Mode, RemoteBuf, State};
use super::{RdmaFabric, ABORT, CREDIT_WR, HDR, STASH_MAX};
use crate::error::Error;
use crate::rdma::verbs::{Imm, Verbs, Wc, MAX_ADVERTS};

impl<V: Verbs> RdmaFabric<V> {
    pub(super) fn on_wc(&self, st: &mut State, wc: Wc) {
        match wc {
            Wc::Send { peer, wr_id, status } => {
                if peer >= self.n {
                    return;
                }
                if let Err(e) = &status {
                    fail_peer(st, peer, format!("RDMA write failed: {e}"));
                }
                if wr_id & CREDIT_WR != 0 {
                    return;
                }
                let f = &mut st.peers[peer].data_in_flight;
                *f = f.saturating_sub(1);
                if let Some(j) = st.jobs.get_mut(&wr_id) {
                    j.chunks_done += 1;
                    if let Err(e) = status {
                        j.err.get_or_insert(Error::PeerFailed { op: "rdma send", peer, reason: format!("RDMA write failed: {e}") });
                    }
                }
            }
            Wc::Recv { peer, imm, byte_len } => {
                if peer >= self.n || peer == self.rank || st.peers[peer].failed.is_some() {
                    return; // a failed peer's stream is out of sync: ignore the rest
                }
                if let Err(why) = self.on_recv(st, peer, imm, byte_len as usize) {
                    fail_peer_as(st, peer, true, why.clone());
                    // Tell the writer at once instead of letting it time out (posted by post_pending).
                    st.peers[peer].abort = true;
                    // Every message from that peer still pending now fails with a protocol error.
                    for ((src, _), e) in st.recvs.iter_mut() {
                        if *src == peer && !e.done && e.err.is_none() {
                            e.err = Some(Error::Protocol { op: "rdma recv", peer, detail: why.clone() });
                        }
                    }
                }
            }
        }
    }

    pub(super) fn on_recv(&self, st: &mut State, p: usize, imm: u32, byte_len: usize) -> std::result::Result<(), String> {
        let s = self.cfg.slots;
        match Imm::decode(imm) {
            Imm::Credit { src, count } => {
                if src != p {
                    return Err(format!("credit immediate names rank {src} on rank {p}'s queue pair"));
                }
                if byte_len != 0 {
                    return Err(format!("credit write carries {byte_len} bytes"));
                }
                if count == ABORT {
                    fail_peer(st, p, format!("rank {p} rejected a malformed chunk from this rank and closed the stream"));
                    return Ok(());
                }
                let c = st.peers[p].credits + count as usize;
                if c > s {
                    return Err(format!("returned {count} credits, which would make {c} > {s} slots"));
                }
                st.peers[p].credits = c;
                Ok(())
            }
            Imm::Zc { src, adv, seq16 } => {
                let want = st.peers[p].rx_seq;
                if src != p {
                    return Err(format!("zero-copy immediate names rank {src} on rank {p}'s queue pair"));
                }
                if seq16 != want as u16 {
                    return Err(format!("zero-copy write out of sequence: seq {seq16}, expected {}{}", want as u16, Self::gap_cause(st, p)));
                }
                match st.peers[p].advs[adv] {
                    AdvSlot::Free => return Err(format!("zero-copy write of {byte_len} bytes for advertisement {adv}, which is not outstanding")),
                    AdvSlot::Revoked { .. } => {} // landed before the revocation; nobody waits for it
                    AdvSlot::Active(tag) => {
                        let e = st.recvs.get_mut(&(p, tag)).ok_or_else(|| format!("zero-copy write for {tag:?}, which is not posted"))?;
                        let Some(total) = e.total.filter(|_| e.announced) else {
                            return Err(format!("zero-copy write for {tag:?} before its announcement"));
                        };
                        let exp = (total - e.next_off).min(self.zc_chunk);
                        if byte_len != exp {
                            return Err(format!(
                                "short write: zero-copy chunk at offset {} of a {total}-byte message carries {byte_len} bytes, expected {exp}",
                                e.next_off
                            ));
                        }
                        e.next_off += byte_len;
                        if e.next_off == total {
                            e.done = true;
                            self.unadvertise(st, p, tag);
                        }
                    }
                }
                st.peers[p].rx_seq = want.wrapping_add(1);
                st.peers[p].owed += 1;
                Ok(())
            }
            Imm::Data { src, slot, seq16 } => {
                let want = st.peers[p].rx_seq;
                if src != p {
                    return Err(format!("data immediate names rank {src} on rank {p}'s queue pair"));
                }
                if slot != want as usize % s || seq16 != want as u16 {
                    return Err(format!("chunk out of sequence: slot {slot} seq {seq16}, expected slot {} seq {}{}", want as usize % s, want as u16, Self::gap_cause(st, p)));
                }
                if byte_len < HDR || byte_len > self.slot_size {
                    return Err(format!("write of {byte_len} bytes (slot holds {} + {} header)", self.cfg.chunk, HDR));
                }
                let base = (p * s + slot) * self.slot_size;
                let sl = &self.rx[base..base + self.slot_size];
                let h = Header::read(&sl[..HDR])?;
                let clen = h.chunk_len as usize;
                if h.src as usize != p || h.chunk_seq != want {
                    return Err(format!("header says rank {} chunk {}, expected rank {p} chunk {want}", h.src, h.chunk_seq));
                }
                if clen != byte_len - HDR {
                    return Err(format!("short write: header announces {clen} payload bytes, {} arrived", byte_len - HDR));
                }
                if h.kind != K_DATA {
                    if clen != 0 {
                        return Err(format!("control message of kind {} carries {clen} payload bytes", h.kind));
                    }
                    self.on_ctl(st, p, &h)?;
                    st.peers[p].rx_seq = want.wrapping_add(1);
                    st.peers[p].owed += 1;
                    return Ok(());
                }
                if clen > self.cfg.chunk || h.offset.checked_add(clen as u64).is_none_or(|e| e > h.total) {
                    return Err(format!("chunk [{}, +{clen}) outside the message of {} bytes", h.offset, h.total));
                }
                let total = usize::try_from(h.total).map_err(|_| "message too long".to_string())?;
                let off = h.offset as usize;
                let e = st.recvs.entry((p, h.tag)).or_default();
                if e.done || *e.total.get_or_insert(total) != total || off != e.next_off {
                    return Err(format!("chunk at offset {off} of {total} bytes does not continue message {:?} (at {}, done {})", h.tag, e.next_off, e.done));
                }
                if !e.eager {
                    // The sender uses the slots: an advertisement for this message is unused.
                    e.eager = true;
                    let announced = e.announced;
                    if self.unadvertise(st, p, h.tag) && !announced {
                        st.peers[p].ctl.push_back(Ctl::Revoke { tag: h.tag, adv: NO_ADV, why: R_PURGE });
                    }
                }
                let e = st.recvs.get_mut(&(p, h.tag)).unwrap();
                let payload = &sl[HDR..HDR + clen];
                if e.discard || e.err.is_some() {
                } else if let Some((buf, cap)) = e.posted {
                    if e.direct && total > 0 {
                        e.discard = true;
                        e.err = Some(Error::Protocol { op: "rdma recv", peer: p, detail: format!("a {total}-byte message for a device buffer came through the receive slots (the sender did not send it from device memory)") });
                    } else if total > cap {
                        e.discard = true;
                        e.err = Some(Error::Protocol { op: "rdma recv", peer: p, detail: format!("message of {total} bytes for a {cap}-byte buffer") });
                    } else {
                        // SAFETY: off + clen <= total <= cap: inside the posted buffer, valid until wait/cancel.
                        unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), (buf as *mut u8).add(off), clen) };
                    }
                } else {
                    if total > STASH_MAX {
                        return Err(format!("unposted message of {total} bytes exceeds the stash limit"));
                    }
                    e.stash.extend_from_slice(payload);
                }
                e.next_off += clen;
                if e.next_off == total {
                    e.done = true;
                    if e.discard && e.posted.is_none() {
                        st.recvs.remove(&(p, h.tag)); // withdrawn: nobody waits for it
                    }
                }
                st.peers[p].rx_seq = want.wrapping_add(1);
                st.peers[p].owed += 1;
                Ok(())
            }
        }
    }

    /// What a write missing from `p`'s stream most likely was: one into a buffer deregistered
    /// when its receive was cancelled before `p` acknowledged the revoke (refused at the NIC).
    /// Empty when there is no such buffer.
    fn gap_cause(st: &State, p: usize) -> String {
        let revoked = st.peers[p].advs.iter().find_map(|a| match a {
            AdvSlot::Revoked { tag, deregistered: true } => Some(*tag),
            _ => None,
        });
        match revoked {
            None => String::new(),
            Some(tag) => format!(
                " (most likely a write into the buffer of {tag:?}, refused: that receive was cancelled and its buffer deregistered before rank {p} acknowledged the revoke)"
            ),
        }
    }

    /// A header-only control message from `p` (already checked: magic, checksum, sequence).
    pub(super) fn on_ctl(&self, st: &mut State, p: usize, h: &Header) -> std::result::Result<(), String> {
        let tag = h.tag;
        match h.kind {
            K_ADVERT => {
                // We are the sender of `tag`.
                if h.adv as usize >= MAX_ADVERTS || h.total == 0 {
                    return Err(format!("advertisement {} of {} bytes for {tag:?}", h.adv, h.total));
                }
                let rb = RemoteBuf { addr: h.offset, rkey: h.aux, cap: h.total, adv: h.adv };
                if let Some(&jid) = st.job_of.get(&(p, tag)) {
                    let j = st.jobs.get_mut(&jid).unwrap();
                    match j.mode {
                        Mode::Wait => {
                            self.start(j, Some(rb));
                            st.peers[p].tx_queue.push_back(jid);
                        }
                        Mode::Eager => {} // below the threshold here: unused (the receiver sees the slots used)
                        Mode::Zc { .. } | Mode::Dropped => return Err(format!("second advertisement for {tag:?}")),
                    }
                } else if st.peers[p].adverts.insert(tag, rb).is_some() {
                    return Err(format!("second advertisement for {tag:?}"));
                }
            }
            K_RTS => {
                // We are the receiver of `tag`.
                let total = usize::try_from(h.total).ok().filter(|&t| t > 0 && t <= isize::MAX as usize);
                let Some(total) = total else { return Err(format!("announcement of a {}-byte message", h.total)) };
                let e = st.recvs.entry((p, tag)).or_default();
                if e.announced || e.total.is_some() || e.done {
                    return Err(format!("announcement of {tag:?}, which is already under way"));
                }
                e.announced = true;
                e.total = Some(total);
                if e.withdrawn {
                    // Cancelled here: the sender must not wait for an advertisement.
                    let tell = !e.revoked;
                    st.recvs.remove(&(p, tag));
                    if tell {
                        st.peers[p].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_CANCEL });
                    }
                    return Ok(());
                }
                let Some((_, cap)) = e.posted else { return Ok(()) }; // decided at post_recv
                let too_long = total > cap;
                if too_long {
                    e.discard = true;
                    e.err = Some(Error::Protocol { op: "rdma recv", peer: p, detail: format!("message of {total} bytes for a {cap}-byte buffer") });
                }
                if e.adv.is_some() {
                    if too_long {
                        // The sender sees the advertised length too and uses the slots (discarded here).
                        e.eager = true;
                        self.unadvertise(st, p, tag);
                    }
                } else if e.direct && !e.adv_wait {
                    // A device buffer that could not be registered (the receive has failed): the
                    // sender drops the message instead of sending it through the slots.
                    e.revoked = true;
                    st.peers[p].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_CANCEL });
                } else if !e.adv_wait || too_long {
                    // Not advertised (below our threshold, registration failed) or never will be.
                    e.eager = true;
                    self.unadvertise(st, p, tag);
                    st.peers[p].ctl.push_back(Ctl::Revoke { tag, adv: NO_ADV, why: R_EAGER });
                }
            }
            K_REVOKE => {
                // We are the sender of `tag`.
                if h.adv != NO_ADV {
                    if h.adv as usize >= MAX_ADVERTS {
                        return Err(format!("revoke of advertisement {}", h.adv));
                    }
                    // Posted after every write already posted for it: the receiver frees the index on it.
                    st.peers[p].ctl.push_back(Ctl::Ack { adv: h.adv });
                }
                let job = st.job_of.get(&(p, tag)).copied();
                match h.aux {
                    R_CANCEL => {
                        if let Some(jid) = job {
                            let j = st.jobs.get_mut(&jid).unwrap();
                            if matches!(j.mode, Mode::Wait | Mode::Zc { .. }) {
                                j.mode = Mode::Dropped;
                                j.chunks_total = j.chunks_posted;
                                st.peers[p].tx_queue.retain(|&x| x != jid);
                            }
                        } else if st.peers[p].adverts.remove(&tag).is_some() {
                            st.peers[p].revoked.insert(tag);
                        }
                    }
                    R_EAGER => {
                        if let Some(jid) = job {
                            let j = st.jobs.get_mut(&jid).unwrap();
                            match j.mode {
                                Mode::Wait => {
                                    self.start(j, None);
                                    st.peers[p].tx_queue.push_back(jid);
                                }
                                Mode::Zc { .. } => return Err(format!("told to use the slots for {tag:?}, advertised before")),
                                Mode::Eager | Mode::Dropped => {}
                            }
                        }
                    }
                    R_PURGE => {
                        st.peers[p].adverts.remove(&tag);
                    }
                    r => return Err(format!("revoke with unknown reason {r}")),
                }
            }
            K_ACK => {
                let a = h.adv as usize;
                if a >= MAX_ADVERTS || !matches!(st.peers[p].advs[a], AdvSlot::Revoked { .. }) {
                    return Err(format!("acknowledgement of advertisement {a}, which is not revoked"));
                }
                Self::free_adv(st, p, a);
            }
            k => return Err(format!("unknown message kind {k}")),
        }
        Ok(())
    }
}
