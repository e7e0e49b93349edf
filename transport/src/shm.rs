//! Shared-memory backend for processes on one host.
//!
//! Each rank owns an inbox file in /dev/shm holding one single-producer ring per source rank
//! (mapped by that source for writing). Small messages travel eagerly through the ring (64-byte
//! records: header + payload). Large ones are announced (RTS: address and length in the sender's
//! address space) and the receiver copies them *once*, straight from the sender's buffer into its
//! posted buffer, with process_vm_readv (cross-memory attach), then returns a FIN record. There is
//! no progress thread: whichever thread of the process waits drains the rings. Every header
//! read from shared memory is bounds-checked; a bad one fails the peer, never an OOB access.
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use crate::mailbox::{Dir, Mailbox, Posted};
use bytemuck::{Pod, Zeroable};
use crossbeam_utils::{Backoff, CachePadded};
use memmap2::MmapMut;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Ring capacity per (source, destination) pair.
pub(crate) const RING_CAP: usize = 1 << 20;
const HDR: usize = 64;
const CTL: usize = std::mem::size_of::<RingCtl>();
const REGION: usize = CTL + RING_CAP;
/// Messages up to this many bytes go through the ring; larger ones are fetched by the receiver.
fn eager_max() -> usize {
    static V: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::env::var("EMBER_SHM_EAGER").ok().and_then(|s| s.parse().ok()).unwrap_or(8 << 10).min(RING_CAP / 4)
    })
}

const PAD: u32 = 1;
const EAGER: u32 = 2;
const RTS: u32 = 3;
const FIN: u32 = 4;

#[repr(C)]
struct RingCtl {
    head: CachePadded<AtomicU64>,
    tail: CachePadded<AtomicU64>,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
struct Rec {
    kind: u32,
    round: u32,
    ctx: u64,
    seq: u64,
    /// Bytes of payload in the ring (EAGER), of the whole record (PAD), or of the message (RTS).
    len: u64,
    /// RTS: address of the data in the sender.
    addr: u64,
    _pad: [u64; 3],
}
const _: () = assert!(std::mem::size_of::<Rec>() == HDR);

fn rec_len(payload: usize) -> usize {
    HDR + payload.div_ceil(HDR) * HDR
}

/// A rank's inbox file, created before the rendezvous so peers can map it.
pub(crate) struct Inbox {
    pub path: PathBuf,
    file: File,
    map: MmapMut,
}

impl Inbox {
    pub fn create(size: usize, rank: usize, token: &str) -> Result<Inbox> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in token.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = PathBuf::from(format!("/dev/shm/ember-{h:016x}-{}-{rank}-{nonce:08x}", std::process::id()));
        let err = |e: std::io::Error| Error::Bootstrap(format!("shared-memory inbox {}: {e}", path.display()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(err)?;
        file.set_len((size * REGION) as u64).map_err(err)?;
        // SAFETY: a fresh file of ours; other processes only touch it through the ring protocol.
        let mut map = unsafe { memmap2::MmapOptions::new().populate().map_mut(&file) }.map_err(err)?;
        // Touch every page now, so the rings never page-fault on the data path.
        map.fill(0);
        Ok(Inbox { path, file, map })
    }
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Ring(*mut u8);
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}
impl Ring {
    fn ctl(&self) -> &RingCtl {
        // SAFETY: the region starts with a RingCtl (zero-initialised file, atomics valid for any bits).
        unsafe { &*(self.0 as *const RingCtl) }
    }
    fn data(&self) -> *mut u8 {
        // SAFETY: the data area follows the control block inside the same mapping.
        unsafe { self.0.add(CTL) }
    }
}

struct Producer {
    ring: Ring,
    head: u64,
}

struct Drain {
    tails: Vec<u64>,
    last_liveness: Instant,
}

pub(crate) struct ShmFabric {
    rank: usize,
    pids: Vec<u32>,
    mb: Mailbox,
    inbox: Inbox,
    _peer_maps: Vec<Option<MmapMut>>,
    /// `rx[s]`: the ring from s in our inbox.
    rx: Vec<Ring>,
    /// `tx[d]`: our ring in d's inbox.
    tx: Vec<Option<Mutex<Producer>>>,
    drain: Mutex<Drain>,
    /// FIN records that found their ring full; flushed by `poll`.
    pending: Mutex<Vec<(usize, Rec)>>,
}

impl ShmFabric {
    /// Map every peer's inbox. `paths[r]`/`pids[r]` come from the rendezvous.
    pub fn new(rank: usize, inbox: Inbox, paths: &[String], pids: Vec<u32>) -> Result<ShmFabric> {
        let n = paths.len();
        let mut maps = Vec::with_capacity(n);
        let mut tx = Vec::with_capacity(n);
        for (d, p) in paths.iter().enumerate() {
            if d == rank {
                maps.push(None);
                tx.push(None);
                continue;
            }
            let err = |e: std::io::Error| Error::Bootstrap(format!("map rank {d}'s inbox {p}: {e}"));
            let f = std::fs::OpenOptions::new().read(true).write(true).open(p).map_err(err)?;
            if f.metadata().map_err(err)?.len() != (n * REGION) as u64 {
                return Err(Error::Bootstrap(format!("rank {d}'s inbox {p} has the wrong size")));
            }
            // SAFETY: shared mapping of a peer's inbox; accessed only through the ring protocol.
            let mut m = unsafe { memmap2::MmapOptions::new().populate().map_mut(&f) }.map_err(err)?;
            let ring = Ring(unsafe { m.as_mut_ptr().add(rank * REGION) });
            tx.push(Some(Mutex::new(Producer { ring, head: 0 })));
            maps.push(Some(m));
        }
        let base = inbox.map.as_ptr() as *mut u8;
        let rx = (0..n).map(|s| Ring(unsafe { base.add(s * REGION) })).collect();
        let _ = &inbox.file;
        Ok(ShmFabric {
            rank,
            pids,
            mb: Mailbox::new_polling(),
            inbox,
            _peer_maps: maps,
            rx,
            tx,
            drain: Mutex::new(Drain { tails: vec![0; n], last_liveness: Instant::now() }),
            pending: Mutex::new(Vec::new()),
        })
    }

    pub fn unlink_inbox(&self) {
        self.inbox.unlink();
    }

    fn proto(&self, peer: usize, detail: String) -> Error {
        let e = Error::Protocol { op: "shm", peer, detail };
        self.mb.peer_died(peer, e.to_string());
        e
    }

    /// Append one record to `dst`'s ring; `Ok(false)` when it does not fit now.
    fn try_push(&self, dst: usize, rec: &Rec, payload: &[u8]) -> Result<bool> {
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

    fn push_wait(&self, dst: usize, rec: &Rec, payload: &[u8], w: &Wait) -> Result<()> {
        let backoff = Backoff::new();
        loop {
            if self.try_push(dst, rec, payload)? {
                return Ok(());
            }
            self.poll()?;
            if let Some(r) = self.mb.lock().dead.get(&dst) {
                return Err(Error::PeerFailed { op: w.op, peer: dst, reason: r.clone() });
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

    fn send_fin(&self, dst: usize, tag: Tag) -> Result<()> {
        let rec = Rec { kind: FIN, round: tag.round, ctx: tag.ctx, seq: tag.seq, ..Rec::zeroed() };
        if !self.try_push(dst, &rec, &[])? {
            self.pending.lock().unwrap_or_else(|e| e.into_inner()).push((dst, rec));
        }
        Ok(())
    }

    /// Copy `len` bytes at `addr` in rank `src` into `buf` (one copy), then release the sender.
    fn fetch(&self, src: usize, tag: Tag, addr: u64, buf: *mut u8, len: usize) -> Result<()> {
        let pid = self.pids[src];
        let r = if pid == std::process::id() {
            // Same process (ranks as threads): the sender's buffer is in our address space.
            // SAFETY: the sender keeps it alive until our FIN; len was checked against the post.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf, len) };
            Ok(())
        } else {
            cma_read(pid, addr, buf, len)
        };
        match r {
            Ok(()) => self.mb.complete(src, tag, Dir::Recv, len),
            Err(e) => self.mb.fail(src, tag, Dir::Recv, Error::Io { op: "shm fetch", peer: src, detail: e.to_string() }),
        }
        self.send_fin(src, tag)
    }

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
        for s in 0..self.rx.len() {
            if s != self.rank {
                if let Err(e) = self.drain_ring(s, &mut d.tails[s]) {
                    tracing::warn!("{e}");
                }
            }
        }
        if d.last_liveness.elapsed() > Duration::from_millis(5) {
            d.last_liveness = Instant::now();
            for (r, &pid) in self.pids.iter().enumerate() {
                if r != self.rank && pid != std::process::id() && !alive(pid) {
                    self.mb.peer_died(r, format!("process {pid} exited"));
                }
            }
        }
        Ok(())
    }

    fn drain_ring(&self, s: usize, tail: &mut u64) -> Result<()> {
        let ring = &self.rx[s];
        let head = ring.ctl().head.load(Ordering::Acquire);
        if head < *tail || head - *tail > RING_CAP as u64 {
            return Err(self.proto(s, format!("ring head {head} inconsistent with tail {tail}")));
        }
        while *tail < head {
            let idx = (*tail % RING_CAP as u64) as usize;
            let avail = (head - *tail) as usize;
            if idx % HDR != 0 || avail < HDR {
                return Err(self.proto(s, "misaligned ring record".into()));
            }
            let mut rec = Rec::zeroed();
            // SAFETY: idx + HDR <= RING_CAP (idx is 64-aligned, RING_CAP a multiple of 64).
            unsafe { std::ptr::copy_nonoverlapping(ring.data().add(idx), bytemuck::bytes_of_mut(&mut rec).as_mut_ptr(), HDR) };
            let tag = Tag { ctx: rec.ctx, seq: rec.seq, round: rec.round };
            let used = match rec.kind {
                PAD => {
                    if rec.len as usize != RING_CAP - idx || rec.len as usize > avail {
                        return Err(self.proto(s, format!("bad padding record of {} bytes", rec.len)));
                    }
                    rec.len as usize
                }
                EAGER => {
                    let len = rec.len as usize;
                    if rec.len > eager_max() as u64 || rec_len(len) > RING_CAP - idx || rec_len(len) > avail {
                        return Err(self.proto(s, format!("eager record claims {} bytes", rec.len)));
                    }
                    // SAFETY: bounds checked just above.
                    let payload = unsafe { std::slice::from_raw_parts(ring.data().add(idx + HDR), len) };
                    let claimed = {
                        let mut t = self.mb.lock();
                        crate::mailbox::Mailbox::claim(&mut t, s, tag, len, "shm receive")
                    };
                    match claimed {
                        // SAFETY: claim checked len against the posted capacity.
                        Ok(Some(buf)) => {
                            unsafe { std::ptr::copy_nonoverlapping(payload.as_ptr(), buf.0, len) };
                            self.mb.complete(s, tag, Dir::Recv, len);
                        }
                        Ok(None) => {
                            let _ = self.mb.deliver(s, tag, payload.to_vec(), "shm receive");
                        }
                        Err(_) => self.mb.notify(), // the slot now holds the error
                    }
                    rec_len(len)
                }
                RTS => {
                    match self.mb.announce(s, tag, rec.addr, rec.len as usize, "shm receive") {
                        Ok(Some(buf)) => self.fetch(s, tag, rec.addr, buf.0, rec.len as usize)?,
                        Ok(None) => {}
                        Err(_) => {
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
                k => return Err(self.proto(s, format!("unknown record kind {k}"))),
            };
            *tail += used as u64;
            ring.ctl().tail.store(*tail, Ordering::Release);
        }
        Ok(())
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // A zombie (exited, not yet reaped) is dead too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => r == 0,
    }
}

fn cma_read(pid: u32, addr: u64, buf: *mut u8, len: usize) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let local = libc::iovec { iov_base: unsafe { buf.add(done) } as *mut libc::c_void, iov_len: len - done };
        let remote = libc::iovec { iov_base: (addr as usize + done) as *mut libc::c_void, iov_len: len - done };
        // SAFETY: `local` is inside the posted buffer (length checked by the caller); the kernel
        // validates `remote` against the peer's address space.
        let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            return Err(std::io::Error::other("process_vm_readv made no progress"));
        }
        done += n as usize;
    }
    Ok(())
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
            Posted::Waiting | Posted::Landed => Ok(()),
            Posted::Fetch { addr, len } => self.fetch(src, tag, addr, buf, len),
        }
    }

    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        let mut rec = Rec { round: tag.round, ctx: tag.ctx, seq: tag.seq, len: len as u64, ..Rec::zeroed() };
        if len <= eager_max() {
            rec.kind = EAGER;
            self.push_wait(dst, &rec, std::slice::from_raw_parts(data, len), w)?;
            self.mb.complete(dst, tag, Dir::Send, 0);
        } else {
            rec.kind = RTS;
            rec.addr = data as u64;
            self.push_wait(dst, &rec, &[], w)?;
        }
        Ok(())
    }

    fn wait_send(&self, dst: usize, tag: Tag, w: &Wait) -> Result<()> {
        self.mb.wait_done(dst, tag, Dir::Send, w, &|| self.poll()).map(|_| ())
    }

    fn wait_recv(&self, src: usize, tag: Tag, w: &Wait) -> Result<usize> {
        self.mb.wait_done(src, tag, Dir::Recv, w, &|| self.poll())
    }

    fn cancel_recv(&self, src: usize, tag: Tag) {
        self.mb.cancel(src, tag)
    }
}

impl Drop for ShmFabric {
    fn drop(&mut self) {
        self.inbox.unlink();
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupted_length_field_is_rejected() {
        let pid = std::process::id();
        let a = Inbox::create(2, 0, "t").unwrap();
        let b = Inbox::create(2, 1, "t").unwrap();
        let paths = vec![a.path.display().to_string(), b.path.display().to_string()];
        let f0 = ShmFabric::new(0, a, &paths, vec![pid, pid]).unwrap();
        let f1 = ShmFabric::new(1, b, &paths, vec![pid, pid]).unwrap();
        let tag = Tag { ctx: 1, seq: 0, round: 0 };
        let w = Wait::new("test", Duration::from_secs(1));
        let mut buf = [0u8; 8];
        unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), 8, &w).unwrap() };
        // Rank 0 writes a record whose length field claims 1 TiB.
        let rec = Rec { kind: EAGER, ctx: 1, len: 1 << 40, ..Rec::zeroed() };
        {
            let mut p = f0.tx[1].as_ref().unwrap().lock().unwrap();
            unsafe { std::ptr::copy_nonoverlapping(bytemuck::bytes_of(&rec).as_ptr(), p.ring.data(), HDR) };
            p.head += HDR as u64;
            p.ring.ctl().head.store(p.head, Ordering::Release);
        }
        let e = f1.wait_recv(0, tag, &w).unwrap_err();
        assert_eq!(e.peer(), Some(0));
        assert!(e.to_string().contains("eager record claims"), "{e}");
        assert_eq!(buf, [0u8; 8]);
        // A head pointer beyond the ring is rejected too.
        f0.tx[1].as_ref().unwrap().lock().unwrap().ring.ctl().head.store(u64::MAX, Ordering::Release);
        assert!(f1.drain_ring(0, &mut 0).is_err());
    }
}
