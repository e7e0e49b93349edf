//! The per-peer rings: the 64-byte record format (PAD, EAGER, RTS, FIN, CHUNK, ABORT; a small
//! EAGER payload inline in its header), the producer side (append a record, waiting for space;
//! control records that do not fit are queued),
//! and the consumer that drains one source's ring, bounds-checking every header
//! ([`check_ring`], [`check_record`]) and dispatching it.
use super::segment::{Ring, RING_CAP};
use super::{stat, ShmFabric, CHUNK_BYTES};
use crate::error::{Error, Result};
use crate::fabric::{Tag, Wait};
use crate::mailbox::Dir;
use bytemuck::{Pod, Zeroable};
use crossbeam_utils::Backoff;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub const HDR: usize = 64;

pub const PAD: u32 = 1;
pub const EAGER: u32 = 2;
pub const RTS: u32 = 3;
pub const FIN: u32 = 4;
/// A piece of a streamed (staged) message.
pub const CHUNK: u32 = 5;
/// The sender withdrew a streamed message before its last chunk.
pub const ABORT: u32 = 6;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug, PartialEq, Eq)]
pub struct Rec {
    pub kind: u32,
    pub round: u32,
    pub ctx: u64,
    pub seq: u64,
    /// Bytes of payload in the ring (EAGER, CHUNK), of the whole record (PAD), or of the
    /// message (RTS).
    pub len: u64,
    /// RTS: address of the data in the sender. CHUNK: offset of the payload in the message.
    pub addr: u64,
    /// CHUNK: length of the whole message.
    pub total: u64,
    /// RTS: the offer (`slot | gen << 8`). CHUNK, ABORT: the advertisement streamed into.
    pub id: u64,
    pub _pad: u64,
}
const _: () = assert!(std::mem::size_of::<Rec>() == HDR);

/// `slot | gen << 8` (slots < 256).
pub fn slot_id(k: usize, gen: u64) -> u64 {
    k as u64 | gen << 8
}

/// The slot and generation of an id made by [`slot_id`] (the slot is not checked here).
pub fn split_id(id: u64) -> (usize, u64) {
    ((id & 0xff) as usize, id >> 8)
}

/// Where an EAGER record of at most [`INLINE_MAX`] bytes carries its payload: in its own
/// header's last 32 bytes (the fields an EAGER record does not use), so a small message is
/// one cache line for the consumer to fetch instead of two.
pub const INLINE_AT: usize = 32;
pub const INLINE_MAX: usize = HDR - INLINE_AT;

/// Whether a record of `kind` with `payload` bytes carries them inline (in its header line).
fn inline(kind: u32, payload: usize) -> bool {
    kind == EAGER && payload <= INLINE_MAX
}

/// The ring bytes a record of `kind` with `payload` bytes takes: its header, then the payload
/// rounded up to whole records (nothing more when inline).
pub fn rec_len(kind: u32, payload: usize) -> usize {
    match inline(kind, payload) {
        true => HDR,
        false => HDR + payload.div_ceil(HDR) * HDR,
    }
}

/// The ring's published `head` against the consumer's `tail` (both count bytes since the
/// start): the bytes to drain, at most the ring's capacity.
pub fn check_ring(head: u64, tail: u64) -> std::result::Result<usize, String> {
    match head.checked_sub(tail) {
        Some(n) if n <= RING_CAP as u64 => Ok(n as usize),
        _ => Err(format!("ring head {head} inconsistent with tail {tail}")),
    }
}

/// A checked record: its kind, its bytes of payload and where they start (from the record's
/// start: [`HDR`], or [`INLINE_AT`] inside the header), and the ring bytes it takes (header,
/// payload rounded up to whole records; a pad, the rest of the ring).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    pub kind: u32,
    pub payload: usize,
    pub at: usize,
    pub used: usize,
}

/// Where the consumer may read a record: at a record boundary `idx` of the ring, with a whole
/// header among the `avail` bytes published from there.
pub fn check_position(idx: usize, avail: usize) -> std::result::Result<(), String> {
    if !idx.is_multiple_of(HDR) || idx >= RING_CAP || avail < HDR {
        return Err("misaligned ring record".into());
    }
    Ok(())
}

/// The record `rec` read at `idx` (with `avail` bytes published from there), as the consumer
/// checks it before using any of it: a known kind; a payload (EAGER: at most `eager_max`
/// bytes, CHUNK: at most [`CHUNK_BYTES`]) inside both the ring and the published bytes; a pad
/// that runs exactly to the ring's end.
pub fn check_record(rec: &Rec, idx: usize, avail: usize, eager_max: usize) -> std::result::Result<Checked, String> {
    check_position(idx, avail)?;
    let payload = |max: usize, what: &str| {
        let fits = |n: u64| n <= max as u64 && rec_len(rec.kind, n as usize) <= (RING_CAP - idx).min(avail);
        match fits(rec.len) {
            true => {
                let (payload, used) = (rec.len as usize, rec_len(rec.kind, rec.len as usize));
                Ok(Checked { kind: rec.kind, payload, at: if inline(rec.kind, payload) { INLINE_AT } else { HDR }, used })
            }
            false => Err(format!("{what} record claims {} bytes", rec.len)),
        }
    };
    let header_only = Ok(Checked { kind: rec.kind, payload: 0, at: HDR, used: HDR });
    match rec.kind {
        PAD => match rec.len == (RING_CAP - idx) as u64 && rec.len <= avail as u64 {
            true => Ok(Checked { kind: PAD, payload: 0, at: HDR, used: rec.len as usize }),
            false => Err(format!("bad padding record of {} bytes", rec.len)),
        },
        EAGER => payload(eager_max, "eager"),
        CHUNK => payload(CHUNK_BYTES, "chunk"),
        RTS | FIN | ABORT => header_only,
        k => Err(format!("unknown record kind {k}")),
    }
}

pub(super) struct Producer {
    pub(super) ring: Ring,
    pub(super) head: u64,
    /// The consumer's tail as last read (checked): the ring's free space is judged from it,
    /// and the shared tail, a line the consumer writes after every record, is read again only
    /// when that space does not hold the record (one cross-core transfer less per message).
    pub(super) tail: u64,
}

pub(super) struct Drain {
    pub(super) tails: Vec<u64>,
    pub(super) last_liveness: Instant,
    /// Polls so far (the liveness check reads the clock every 64th).
    pub(super) polls: u32,
}

impl ShmFabric {
    /// Append one record to `dst`'s ring; `Ok(false)` when it does not fit now.
    pub(super) fn try_push(&self, dst: usize, rec: &Rec, payload: &[u8]) -> Result<bool> {
        let mut p = self.tx[dst].as_ref().expect("never sends to self").lock().unwrap_or_else(|e| e.into_inner());
        let len = rec_len(rec.kind, payload.len());
        let idx = (p.head % RING_CAP as u64) as usize;
        let to_end = RING_CAP - idx;
        let need = if len <= to_end { len } else { to_end + len };
        if RING_CAP - ((p.head - p.tail) as usize) < need {
            let tail = p.ring.ctl().tail.load(Ordering::Acquire);
            check_ring(p.head, tail).map_err(|e| self.proto(dst, e))?;
            p.tail = tail;
            if RING_CAP - ((p.head - tail) as usize) < need {
                return Ok(false);
            }
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
            if inline(rec.kind, payload.len()) {
                let mut line = [0u8; HDR];
                line.copy_from_slice(bytemuck::bytes_of(rec));
                line[INLINE_AT..INLINE_AT + payload.len()].copy_from_slice(payload);
                std::ptr::copy_nonoverlapping(line.as_ptr(), data.add(at), HDR);
            } else {
                std::ptr::copy_nonoverlapping(bytemuck::bytes_of(rec).as_ptr(), data.add(at), HDR);
                std::ptr::copy_nonoverlapping(payload.as_ptr(), data.add(at + HDR), payload.len());
            }
        }
        p.head += len as u64;
        p.ring.ctl().head.store(p.head, Ordering::Release);
        drop(p);
        self.ring_bell(dst, false);
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
            if Instant::now() >= w.deadline() {
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
            let mut pend = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pend.push((dst, rec));
            self.pending_n.store(pend.len(), Ordering::Release);
        }
        Ok(())
    }

    pub(super) fn send_fin(&self, dst: usize, tag: Tag) -> Result<()> {
        self.push_control(dst, Rec { kind: FIN, round: tag.round, ctx: tag.ctx, seq: tag.seq, ..Rec::zeroed() })
    }

    pub(super) fn drain_ring(&self, s: usize, tail: &mut u64) -> Result<()> {
        let ring = &self.rx[s];
        let head = ring.ctl().head.load(Ordering::Acquire);
        check_ring(head, *tail).map_err(|e| self.proto(s, e))?;
        while *tail < head {
            let idx = (*tail % RING_CAP as u64) as usize;
            let avail = (head - *tail) as usize;
            check_position(idx, avail).map_err(|e| self.proto(s, e))?;
            let mut rec = Rec::zeroed();
            // SAFETY: idx + HDR <= RING_CAP (idx is 64-aligned, RING_CAP a multiple of 64).
            unsafe { std::ptr::copy_nonoverlapping(ring.data().add(idx), bytemuck::bytes_of_mut(&mut rec).as_mut_ptr(), HDR) };
            let tag = Tag { ctx: rec.ctx, seq: rec.seq, round: rec.round };
            let c = check_record(&rec, idx, avail, self.opts.eager_max).map_err(|e| self.proto(s, e))?;
            // SAFETY: check_record bounded the payload by the ring and the published bytes.
            let payload = unsafe { std::slice::from_raw_parts(ring.data().add(idx + c.at), c.payload) };
            match rec.kind {
                PAD => {}
                EAGER => {
                    // Revoke and deliver under the advertisement lock (see `advertise`), when
                    // anything is advertised at all.
                    let mut at = (self.adv_live.load(Ordering::Acquire) > 0).then(|| self.adv_lock());
                    if let Some(at) = at.as_mut() {
                        if self.revoke_locked(at, s, tag, false).is_err() {
                            return Err(self.proto(s, format!("message {tag:?} both sent and written into the advertised buffer")));
                        }
                    }
                    // A failed delivery leaves the error in the receive's slot.
                    let _ = self.mb.deliver_slice(s, tag, payload, "shm receive");
                    drop(at);
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
                }
                FIN => self.mb.complete(s, tag, Dir::Send, 0),
                CHUNK => self.on_chunk(s, tag, &rec, payload)?,
                ABORT => self.on_abort(s, tag, rec.id),
                _ => unreachable!("check_record passes known kinds only"),
            }
            *tail += c.used as u64;
            ring.ctl().tail.store(*tail, Ordering::Release);
        }
        Ok(())
    }
}
