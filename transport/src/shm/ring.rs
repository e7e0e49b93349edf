//! The per-peer rings: the 64-byte record format (PAD, EAGER, RTS, FIN, CHUNK, ABORT), the
//! producer side (append a record, waiting for space; control records that do not fit are
//! queued), and the consumer that drains one source's ring, bounds-checking every header and
//! dispatching it.
use super::segment::{Ring, RING_CAP};
use super::{eager_max, stat, ShmFabric, CHUNK_BYTES};
use crate::error::{Error, Result};
use crate::fabric::{Tag, Wait};
use crate::mailbox::Dir;
use bytemuck::{Pod, Zeroable};
use crossbeam_utils::Backoff;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub(super) const HDR: usize = 64;

pub(super) const PAD: u32 = 1;
pub(super) const EAGER: u32 = 2;
pub(super) const RTS: u32 = 3;
pub(super) const FIN: u32 = 4;
/// A piece of a streamed (staged) message.
pub(super) const CHUNK: u32 = 5;
/// The sender withdrew a streamed message before its last chunk.
pub(super) const ABORT: u32 = 6;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub(super) struct Rec {
    pub(super) kind: u32,
    pub(super) round: u32,
    pub(super) ctx: u64,
    pub(super) seq: u64,
    /// Bytes of payload in the ring (EAGER, CHUNK), of the whole record (PAD), or of the
    /// message (RTS).
    pub(super) len: u64,
    /// RTS: address of the data in the sender. CHUNK: offset of the payload in the message.
    pub(super) addr: u64,
    /// CHUNK: length of the whole message.
    pub(super) total: u64,
    /// RTS: the offer (`slot | gen << 8`). CHUNK, ABORT: the advertisement streamed into.
    pub(super) id: u64,
    pub(super) _pad: u64,
}
const _: () = assert!(std::mem::size_of::<Rec>() == HDR);

/// `slot | gen << 8` (slots < 256).
pub(super) fn slot_id(k: usize, gen: u64) -> u64 {
    k as u64 | gen << 8
}

pub(super) fn rec_len(payload: usize) -> usize {
    HDR + payload.div_ceil(HDR) * HDR
}

pub(super) struct Producer {
    pub(super) ring: Ring,
    pub(super) head: u64,
}

pub(super) struct Drain {
    pub(super) tails: Vec<u64>,
    pub(super) last_liveness: Instant,
}

impl ShmFabric {
    /// Append one record to `dst`'s ring; `Ok(false)` when it does not fit now.
    pub(super) fn try_push(&self, dst: usize, rec: &Rec, payload: &[u8]) -> Result<bool> {
        let mut p = self.tx[dst].as_ref().expect("never sends to self").lock().unwrap_or_else(|e| e.into_inner());
        let tail = p.ring.ctl().tail.load(Ordering::Acquire);
        if p.head < tail || p.head - tail > RING_CAP as u64 {
            return Err(self.proto(dst, format!("ring tail {tail} inconsistent with head {}", p.head)));
        }
        let len = rec_len(payload.len());
        let idx = (p.head % RING_CAP as u64) as usize;
        let to_end = RING_CAP - idx;
        let need = if len <= to_end { len } else { to_end + len };
        if RING_CAP - ((p.head - tail) as usize) < need {
            return Ok(false);
        }
        let data = p.ring.data();
        // SAFETY: idx + len <= RING_CAP (or we pad to the end first); the consumer does not read
        // beyond `head`, which we publish after writing.
        unsafe {
            let mut at = idx;
            if len > to_end {
                let pad = Rec { kind: PAD, len: to_end as u64, ..Rec::zeroed() };
                std::ptr::copy_nonoverlapping(bytemuck::bytes_of(&pad).as_ptr(), data.add(idx), HDR);
                p.head += to_end as u64;
                at = 0;
            }
            std::ptr::copy_nonoverlapping(bytemuck::bytes_of(rec).as_ptr(), data.add(at), HDR);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), data.add(at + HDR), payload.len());
        }
        p.head += len as u64;
        p.ring.ctl().head.store(p.head, Ordering::Release);
        Ok(true)
    }

    pub(super) fn push_wait(&self, dst: usize, rec: &Rec, payload: &[u8], w: &Wait) -> Result<()> {
        let backoff = Backoff::new();
        loop {
            if self.try_push(dst, rec, payload)? {
                return Ok(());
            }
            self.poll()?;
            if let Some(e) = self.mb.lock().dead.get(&dst) {
                return Err(e.clone().with_op(w.op));
            }
            if Instant::now() >= w.deadline {
                return Err(Error::Timeout { op: w.op, peer: dst, timeout: w.timeout });
            }
            if backoff.is_completed() {
                std::thread::sleep(Duration::from_micros(50));
            } else {
                backoff.snooze();
            }
        }
    }

    /// A payload-free control record (FIN, ABORT): pushed now, or queued until it fits.
    pub(super) fn push_control(&self, dst: usize, rec: Rec) -> Result<()> {
        if !self.try_push(dst, &rec, &[])? {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).push((dst, rec));
        }
        Ok(())
    }

    pub(super) fn send_fin(&self, dst: usize, tag: Tag) -> Result<()> {
        self.push_control(dst, Rec { kind: FIN, round: tag.round, ctx: tag.ctx, seq: tag.seq, ..Rec::zeroed() })
    }

    pub(super) fn drain_ring(&self, s: usize, tail: &mut u64) -> Result<()> {
        let ring = &self.rx[s];
        let head = ring.ctl().head.load(Ordering::Acquire);
        if head < *tail || head - *tail > RING_CAP as u64 {
            return Err(self.proto(s, format!("ring head {head} inconsistent with tail {tail}")));
        }
        while *tail < head {
            let idx = (*tail % RING_CAP as u64) as usize;
            let avail = (head - *tail) as usize;
            if !idx.is_multiple_of(HDR) || avail < HDR {
                return Err(self.proto(s, "misaligned ring record".into()));
            }
            let mut rec = Rec::zeroed();
            // SAFETY: idx + HDR <= RING_CAP (idx is 64-aligned, RING_CAP a multiple of 64).
            unsafe { std::ptr::copy_nonoverlapping(ring.data().add(idx), bytemuck::bytes_of_mut(&mut rec).as_mut_ptr(), HDR) };
            let tag = Tag { ctx: rec.ctx, seq: rec.seq, round: rec.round };
            // A record with a payload: its bytes, bounds-checked against the ring and `max`.
            let payload = |max: usize, what: &str| -> Result<&[u8]> {
                let len = rec.len as usize;
                if rec.len > max as u64 || rec_len(len) > RING_CAP - idx || rec_len(len) > avail {
                    return Err(self.proto(s, format!("{what} record claims {} bytes", rec.len)));
                }
                // SAFETY: bounds checked just above.
                Ok(unsafe { std::slice::from_raw_parts(ring.data().add(idx + HDR), len) })
            };
            let used = match rec.kind {
                PAD => {
                    if rec.len as usize != RING_CAP - idx || rec.len as usize > avail {
                        return Err(self.proto(s, format!("bad padding record of {} bytes", rec.len)));
                    }
                    rec.len as usize
                }
                EAGER => {
                    let payload = payload(eager_max(), "eager")?;
                    let len = payload.len();
                    let claimed = {
                        // Revoke and claim under the advertisement lock (see `advertise`).
                        let mut at = self.adv_lock();
                        if self.revoke_locked(&mut at, s, tag, false).is_err() {
                            return Err(self.proto(s, format!("message {tag:?} both sent and written into the advertised buffer")));
                        }
                        let mut t = self.mb.lock();
                        crate::mailbox::Mailbox::claim(&mut t, s, tag, len, "shm receive")
                    };
                    match claimed {
                        Ok(Some(buf)) => {
                            // SAFETY: claim checked len against the posted capacity, and the
                            // receiver keeps the buffer valid until the message completes; the
                            // payload is this ring's record, not the receiver's buffer.
                            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), buf.0, len) };
                            self.mb.complete(s, tag, Dir::Recv, len);
                        }
                        Ok(None) => {
                            let _ = self.mb.deliver(s, tag, payload.to_vec(), false, "shm receive");
                        }
                        Err(_) => self.mb.notify(), // the slot now holds the error
                    }
                    rec_len(len)
                }
                RTS => {
                    let announced = {
                        // Revoke and claim under the advertisement lock (see `advertise`).
                        let mut at = self.adv_lock();
                        if let Some(i) = at.superseded.iter().position(|&x| x == (s, tag)) {
                            // Already written directly and completed: drop this late RTS.
                            at.superseded.swap_remove(i);
                            stat(4);
                            None
                        } else {
                            match self.revoke_locked(&mut at, s, tag, false) {
                                Ok(()) => Some(self.mb.announce(s, tag, rec.addr, rec.len as usize, rec.id, "shm receive")),
                                // The sender claimed our advertisement after announcing: it writes
                                // the message itself and needs no FIN (`scan_adverts` completes it).
                                Err(_) => {
                                    if let Some(a) = at.slots[s].iter_mut().flatten().find(|a| a.tag == tag) {
                                        a.rts_seen = true;
                                    }
                                    stat(4);
                                    None
                                }
                            }
                        }
                    };
                    match announced {
                        Some(Ok(Some(buf))) => {
                            stat(3);
                            self.fetch(s, tag, rec.addr, buf.0, rec.len as usize, rec.id)?
                        }
                        Some(Ok(None)) | None => {}
                        Some(Err(_)) => {
                            self.mb.notify();
                            self.send_fin(s, tag)?;
                        }
                    }
                    HDR
                }
                FIN => {
                    self.mb.complete(s, tag, Dir::Send, 0);
                    HDR
                }
                CHUNK => {
                    let data = payload(CHUNK_BYTES, "chunk")?;
                    self.on_chunk(s, tag, &rec, data)?;
                    rec_len(data.len())
                }
                ABORT => {
                    self.on_abort(s, tag, rec.id);
                    HDR
                }
                k => return Err(self.proto(s, format!("unknown record kind {k}"))),
            };
            *tail += used as u64;
            ring.ctl().tail.store(*tail, Ordering::Release);
        }
        Ok(())
    }
}
