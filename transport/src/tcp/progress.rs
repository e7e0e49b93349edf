//! The progress thread of a TCP rank and the state it shares with the callers: one `poll` over
//! every peer connection lands each frame straight into the posted buffer (or holds a long one
//! in the stream until posted, for a moment, or keeps it until posted, or reads it into scratch
//! once withdrawn) and finishes sends that did not fit into the socket at once.
use super::wire::{admit, encode_frame, place, Place, FRAME_LEN};
use crate::error::{Error, Result};
use crate::fabric::Tag;
use crate::mailbox::{Dir, Mailbox};
use std::collections::VecDeque;
use std::io::Read;
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// State shared by the callers and the progress thread.
pub(super) struct Shared {
    pub(super) mb: Arc<Mailbox>,
    /// Non-blocking sockets, one per peer (`None` for self).
    pub(super) streams: Vec<Option<TcpStream>>,
    /// Sends that did not fit into the socket at once, in stream order; the progress thread
    /// finishes them when the socket is writable. A job is removed once fully written.
    pub(super) tx: Vec<Option<Mutex<VecDeque<Job>>>>,
    /// Receive state per peer (`None`: self, or the connection is gone). The progress thread
    /// holds it while it reads from that peer; `cancel_recv` takes it to divert a frame.
    pub(super) rx: Vec<Mutex<Option<Rx>>>,
    /// Whether the connection to each peer is still up (false for self).
    pub(super) live: Vec<AtomicBool>,
    /// Whether each peer's stream stops at a held frame ([`Dst::Held`]): its socket is polled
    /// without `POLLIN` (it stays readable, so every `poll` would return at once) and the hold
    /// is looked at again on every pass.
    pub(super) held: Vec<AtomicBool>,
    /// How long a frame of up to 1 MiB is held at most, µs ([`HOLD_MAX`]; tests lengthen it):
    /// the floor of [`hold_for`].
    pub(super) hold_max_us: std::sync::atomic::AtomicU64,
    /// Callers inside a wait: they drive the connections ([`Shared::pass`]) while it is
    /// nonzero, and the progress thread keeps out of their way.
    pub(super) drivers: AtomicUsize,
    /// When the last wait ended, µs after `epoch`: the progress thread stays out for
    /// [`QUIET`] after it too (the caller is between two operations of a burst).
    pub(super) last_drive_us: std::sync::atomic::AtomicU64,
    pub(super) epoch: std::time::Instant,
    /// Callers blocked (or about to block) in their `poll`, having found their operation not
    /// done: whoever moves a frame or a send while one is signals `cfd`. Both sides use SeqCst
    /// (a caller counts itself, then checks; a mover completes, then reads the count), so a
    /// completion is never missed, and a caller that never blocks costs no signal.
    pub(super) blocked: AtomicUsize,
    /// The busy-poll phase of the callers' waits.
    pub(super) spin: crate::spin::AdaptiveSpin,
    /// Wakes the progress thread (a send was queued, or shutdown).
    pub(super) efd: std::os::fd::OwnedFd,
    /// Wakes callers blocked in their `poll` ([`Runner::Caller`]): written when another thread
    /// moved a frame or a send while a caller is blocked. A caller's `poll` only hears sockets,
    /// and a frame that thread read (the progress thread, having begun before the caller came,
    /// or another caller) leaves the socket silent: without this the waiter slept its whole
    /// block.
    pub(super) cfd: std::os::fd::OwnedFd,
    pub(super) stop: AtomicBool,
    /// Tests: the progress thread reads nothing while set (a peer that stopped reading).
    #[cfg(test)]
    pub(super) pause_rx: AtomicBool,
}

impl Shared {
    pub(super) fn wake(&self) {
        signal(self.efd.as_raw_fd());
    }
    pub(super) fn queue(&self, p: usize) -> MutexGuard<'_, VecDeque<Job>> {
        self.tx[p].as_ref().expect("never sends to self").lock().unwrap_or_else(|e| e.into_inner())
    }
    pub(super) fn rx(&self, p: usize) -> MutexGuard<'_, Option<Rx>> {
        self.rx[p].lock().unwrap_or_else(|e| e.into_inner())
    }
    /// End the connection to `p` for `why`: every wait on `p` fails from now on. The reason is
    /// recorded before the socket is shut down, so that a caller whose write then fails on it
    /// ([`Self::send_failed`]) reports this first cause, not the broken pipe it left behind.
    pub(super) fn kill(&self, p: usize, why: Error) {
        self.mb.peer_failed(why.clone());
        self.live[p].store(false, Ordering::Release);
        if let Some(mut r) = self.rx(p).take() {
            r.abandon(p, &self.mb, &why);
        }
        if let Some(s) = &self.streams[p] {
            let _ = s.shutdown(Shutdown::Both);
        }
        self.queue(p).clear();
    }

    /// A write to `p` failed with `e` (the caller holds no queue lock): returns the first
    /// cause. A broken pipe is rarely one: either this rank already ended the connection for a
    /// reason it recorded (its progress thread found a malformed or oversized frame and shut
    /// the socket between this caller's check and its write), or `p` closed it after sending
    /// frames this rank has not read yet, which may break the protocol (`p`'s send overflowed
    /// the buffer posted for it, and `p` failed over that). So what `p` sent is read first, up
    /// to the end of the stream; a protocol error found there is the cause; else the recorded
    /// reason; else the lost connection.
    pub(super) fn send_failed(&self, p: usize, e: std::io::Error) -> Error {
        let found = match (self.rx(p).as_mut(), &self.streams[p]) {
            (Some(rx), Some(s)) => rx.drain_to_end(p, s, &self.mb).err(),
            _ => None,
        };
        let lost = Error::PeerFailed { op: "tcp send", peer: p, reason: format!("connection lost while sending ({e})") };
        self.kill(p, found.unwrap_or_else(|| lost.clone()));
        self.mb.lock().dead.get(&p).cloned().unwrap_or(lost)
    }

    /// Withdraw the send of `tag` to `p`: once this returns, no byte of its buffer is read. A
    /// frame already partly on the wire leaves the stream unusable: that connection is closed
    /// (and later operations with `p` say why).
    pub(super) fn withdraw(&self, p: usize, tag: Tag) {
        let mut q = self.queue(p);
        if let Some(i) = q.iter().position(|j| j.tag == tag) {
            let started = q[i].hoff > 0;
            q.remove(i);
            drop(q);
            if started {
                let why = "this rank closed the connection: a send it withdrew (its operation failed) was partly sent";
                self.kill(p, Error::Io { op: "tcp send", peer: p, detail: why.into() });
            }
        }
    }
}

/// A send in flight: the frame header (ours) and the caller's payload (valid until `wait_send`).
pub(super) struct Job {
    pub(super) tag: Tag,
    hdr: [u8; 32],
    hoff: usize,
    data: *const u8,
    len: usize,
    doff: usize,
}
// SAFETY: `data` is only read, and only while the job is queued (the `Fabric::send` contract).
unsafe impl Send for Job {}

impl Job {
    /// The send of `len` bytes at `data` as message `tag`, nothing written yet.
    pub(super) fn new(tag: Tag, data: *const u8, len: usize) -> Job {
        Job { tag, hdr: encode_frame(tag, len), hoff: 0, data, len, doff: 0 }
    }
    /// Write as much as the socket takes now; `Ok(true)` when the whole frame is out.
    pub(super) fn push(&mut self, fd: libc::c_int) -> std::io::Result<bool> {
        while self.hoff < self.hdr.len() || self.doff < self.len {
            let iov = [
                libc::iovec { iov_base: self.hdr[self.hoff..].as_ptr() as *mut libc::c_void, iov_len: self.hdr.len() - self.hoff },
                // SAFETY: doff <= len, inside the caller's buffer.
                libc::iovec { iov_base: unsafe { self.data.add(self.doff) } as *mut libc::c_void, iov_len: self.len - self.doff },
            ];
            // SAFETY: a msghdr over the two live iovecs; MSG_NOSIGNAL: EPIPE instead of SIGPIPE.
            let n = unsafe {
                let mut m: libc::msghdr = std::mem::zeroed();
                m.msg_iov = iov.as_ptr() as *mut libc::iovec;
                m.msg_iovlen = 2;
                libc::sendmsg(fd, &m, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => return Ok(false),
                    _ => return Err(e),
                }
            }
            let mut n = n as usize;
            let a = n.min(self.hdr.len() - self.hoff);
            self.hoff += a;
            n -= a;
            self.doff += n;
        }
        Ok(true)
    }
}

/// Staging buffer of a connection: small frames (header and payload) arrive many per `read`.
const STAGE: usize = 256 << 10;
/// Payload remainders at least this long are read straight into their destination.
const DIRECT: usize = 32 << 10;
/// Frames at least this long whose receive is not posted yet are held in the stream
/// ([`Dst::Held`]), at most [`hold_for`] their length.
const HOLD_MIN: usize = DIRECT;
/// The longest a frame of up to 1 MiB is held before it is read into a buffer of its own: a
/// sender whose send cannot complete until it is read (it outgrew the socket buffers) is held
/// up at most this long by a receiver that posts late or never. Longer frames are held longer
/// ([`hold_for`]).
pub(super) const HOLD_MAX: std::time::Duration = std::time::Duration::from_millis(1);

/// The longest hold of a long frame ([`hold_for`]): how long a receiver that posts late or
/// never (or a frame over the allocation limit, which can only be refused once the hold ends)
/// keeps a sender waiting.
const HOLD_CAP: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a frame of `len` bytes is held at most: `floor` ([`HOLD_MAX`] unless a test sets
/// another), or 1 ns per byte when that is longer, up to [`HOLD_CAP`]. Reading a frame into a
/// buffer of its own costs about that much (a fresh allocation, its copy, and a second copy
/// when its receive is posted), so waiting for the receive that long loses nothing against
/// keeping it. (With 1 ms for every frame, back-to-back 16 MiB all-to-alls over loopback, whose
/// ranks drift a few ms apart, kept most frames aside: 1.24x Open MPI's time, against 0.95x
/// with 10 ms.)
pub(super) fn hold_for(len: usize, floor: std::time::Duration) -> std::time::Duration {
    floor.max(std::time::Duration::from_nanos(len as u64).min(HOLD_CAP))
}
/// How long after a caller's last wait the progress thread keeps out of the connections (unless
/// a send is queued): between two operations of a burst the caller reads their frames itself.
/// (Taking the sockets back whenever no caller was inside a wait, the progress thread woke on
/// the next operation's frames and took the core and the frame from its caller: the first 50
/// back-to-back 1 KiB all-to-alls of a run took 30–140 µs each in 11 of 16 runs, against 6 of
/// 14 with this.)
pub(super) const QUIET: std::time::Duration = std::time::Duration::from_millis(1);
/// Reads from one peer per progress pass (then the others get their turn, and a `cancel_recv`
/// waiting for this peer's receive state gets it).
const READS_PER_PASS: u32 = 32;

pub(super) enum Dst {
    /// The posted buffer (claimed: its slot is `Writing` until we complete or fail it).
    Posted(*mut u8),
    /// Not posted yet: kept until `post` (its bytes reserved against the limit).
    Early(Vec<u8>),
    /// Withdrawn by `cancel_recv` while arriving: the rest of the frame is read and dropped.
    Discard,
    /// Not posted yet and long ([`HOLD_MIN`]): left in the socket (and what is already in the
    /// staging buffer, there) from this instant on, and the stream behind it too, until its
    /// receive is posted (then read straight into it), another receive from this peer is
    /// posted (which may be behind it: then kept as `Early`, as is a frame held
    /// [`hold_for`] its length). TCP's flow control holds the sender back meanwhile. Like Open
    /// MPI's rendezvous for its large messages, this spares a message that arrives a moment
    /// before its receive a fresh allocation and a second copy.
    Held(std::time::Instant),
}

pub(super) struct Body {
    pub(super) tag: Tag,
    len: usize,
    got: usize,
    pub(super) dst: Dst,
}

/// Receive state of one connection.
pub(super) struct Rx {
    st: Vec<u8>,
    lo: usize,
    hi: usize,
    pub(super) body: Option<Body>,
}
// SAFETY: the raw pointer in `Dst::Posted` is only written through by the thread holding the
// `Rx` lock, within the `Fabric::post_recv` contract.
unsafe impl Send for Rx {}

impl Rx {
    /// A connection's receive state before its first byte.
    pub(super) fn new() -> Rx {
        Rx { st: vec![0u8; STAGE], lo: 0, hi: 0, body: None }
    }
}

enum Got {
    Data(usize),
    Later,
}

fn lost(peer: usize, reason: String) -> Error {
    Error::PeerFailed { op: "tcp receive", peer, reason }
}

fn read_some(peer: usize, s: &TcpStream, buf: &mut [u8]) -> Result<Got> {
    loop {
        match (&*s).read(buf) {
            Ok(0) => return Err(lost(peer, "connection lost (end of stream)".into())),
            Ok(n) => return Ok(Got::Data(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Got::Later),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(lost(peer, format!("connection lost ({e})"))),
        }
    }
}

impl Rx {
    /// Consume what is readable on `s` now, up to the end of the stream: `Ok` only if the
    /// socket has nothing more to read now (bounded: a peer whose write failed sends no more).
    fn drain_to_end(&mut self, peer: usize, s: &TcpStream, mb: &Mailbox) -> Result<()> {
        for _ in 0..1 << 16 {
            if !self.drain(peer, s, mb, false, None)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Consume what is readable on `s` now, at most [`READS_PER_PASS`] reads: `Ok(true)` when
    /// it stopped at that limit (more may be readable). `Err`: the connection is lost
    /// (`PeerFailed`) or malformed (`Protocol`). `first`: no read after the first message that
    /// landed in its posted buffer (what is already staged is still consumed, since no `poll`
    /// would report it): a waiting caller returns to its operation, which may post the next
    /// receive before its frame is read, instead of reading that frame as an early arrival
    /// (kept in a fresh allocation, copied again at `post`). `hold`: a long frame not posted
    /// yet stops the reading for up to that long ([`Dst::Held`]; `Ok(false)`, [`Self::held`]
    /// says so), and a held one is looked at again; `None` (reading to the end of the stream):
    /// it is kept.
    fn drain(&mut self, peer: usize, s: &TcpStream, mb: &Mailbox, first: bool, hold: Option<std::time::Duration>) -> Result<bool> {
        const HDR: usize = FRAME_LEN;
        let mut reads = 0u32;
        loop {
            if let Some(b) = &mut self.body {
                if let Dst::Held(since) = b.dst {
                    let held = hold.is_some_and(|h| since.elapsed() < hold_for(b.len, h));
                    b.dst = match place(mb, peer, b.tag, b.len, held).inspect_err(|_| mb.notify())? {
                        Place::Posted(buf) => Dst::Posted(buf.0),
                        Place::Early => Dst::Early(vec![0u8; b.len]),
                        Place::Held => return Ok(false),
                    };
                }
                let take = (self.hi - self.lo).min(b.len - b.got);
                match &mut b.dst {
                    // SAFETY: claim checked len <= the posted capacity; the slot stays `Writing`
                    // (and `cancel_recv` diverts it only under our lock).
                    Dst::Posted(p) => unsafe { std::ptr::copy_nonoverlapping(self.st.as_ptr().add(self.lo), p.add(b.got), take) },
                    Dst::Early(v) => v[b.got..b.got + take].copy_from_slice(&self.st[self.lo..self.lo + take]),
                    // (Never held here: placed above.)
                    Dst::Discard | Dst::Held(_) => {}
                }
                self.lo += take;
                b.got += take;
                if b.got == b.len {
                    let b = self.body.take().unwrap();
                    match b.dst {
                        Dst::Posted(_) => {
                            mb.complete(peer, b.tag, Dir::Recv, b.len);
                            if first {
                                reads = READS_PER_PASS;
                            }
                        }
                        Dst::Early(v) => {
                            let _ = mb.deliver(peer, b.tag, v, true, "tcp receive");
                        }
                        Dst::Discard | Dst::Held(_) => {}
                    }
                    continue;
                }
                if reads == READS_PER_PASS {
                    return Ok(true);
                }
                reads += 1;
                let rest = b.len - b.got;
                let direct: Option<&mut [u8]> = match &mut b.dst {
                    // SAFETY: as above: `got + rest == len <= cap`.
                    Dst::Posted(p) if rest >= DIRECT => Some(unsafe { std::slice::from_raw_parts_mut(p.add(b.got), rest) }),
                    Dst::Early(v) if rest >= DIRECT => Some(&mut v[b.got..]),
                    _ => None,
                };
                match direct {
                    Some(d) => match read_some(peer, s, d)? {
                        Got::Data(n) => b.got += n,
                        Got::Later => return Ok(false),
                    },
                    None => {
                        (self.lo, self.hi) = (0, 0);
                        match read_some(peer, s, &mut self.st)? {
                            Got::Data(n) => self.hi = n,
                            Got::Later => return Ok(false),
                        }
                    }
                }
                continue;
            }
            if self.hi - self.lo < HDR {
                if reads == READS_PER_PASS {
                    return Ok(true);
                }
                reads += 1;
                self.st.copy_within(self.lo..self.hi, 0);
                (self.lo, self.hi) = (0, self.hi - self.lo);
                match read_some(peer, s, &mut self.st[self.hi..])? {
                    Got::Data(n) => self.hi += n,
                    Got::Later => return Ok(false),
                }
                continue;
            }
            let hdr: &[u8; FRAME_LEN] = self.st[self.lo..self.lo + HDR].try_into().expect("HDR bytes");
            self.lo += HDR;
            let (tag, len, dst) = match admit(mb, peer, hdr, |len| hold.is_some() && len >= HOLD_MIN) {
                Ok((tag, len, Place::Posted(buf))) => (tag, len, Dst::Posted(buf.0)),
                // Not posted yet: kept (its bytes reserved within the limit), or held.
                Ok((tag, len, Place::Early)) => (tag, len, Dst::Early(vec![0u8; len])),
                Ok((tag, len, Place::Held)) => {
                    // Placed just now: looked at again on the next pass, not here.
                    self.body = Some(Body { tag, len, got: 0, dst: Dst::Held(std::time::Instant::now()) });
                    return Ok(false);
                }
                Err(e) => {
                    // A malformed header, or the slot holds the error (or the limit is
                    // exceeded): the stream can no longer be trusted.
                    mb.notify();
                    return Err(e);
                }
            };
            self.body = Some(Body { tag, len, got: 0, dst });
        }
    }

    /// Whether the stream stops at a held frame.
    pub(super) fn held(&self) -> bool {
        matches!(self.body, Some(Body { dst: Dst::Held(_), .. }))
    }

    /// The connection ended: a claimed posted buffer is released with an error, a reservation
    /// returned.
    fn abandon(&mut self, peer: usize, mb: &Mailbox, why: &Error) {
        match self.body.take() {
            Some(Body { tag, dst: Dst::Posted(_), .. }) => {
                let reason = match why {
                    Error::PeerFailed { reason, .. } => format!("{reason} (mid-message)"),
                    e => format!("{e} (mid-message)"),
                };
                mb.fail(peer, tag, Dir::Recv, Error::PeerFailed { op: "tcp receive", peer, reason })
            }
            Some(Body { len, dst: Dst::Early(_), .. }) => mb.release_early(len),
            _ => {}
        }
    }
}

/// Who runs a [`Shared::pass`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Runner {
    /// The progress thread: also waits on the eventfd, and takes the locks it needs.
    Progress,
    /// A waiting caller: skips a connection another thread is reading or writing right now.
    Caller,
}

/// Lock `m`, or (`try_only`) give up at once when another thread holds it.
fn lock_or_skip<T>(m: &Mutex<T>, try_only: bool) -> Option<MutexGuard<'_, T>> {
    if !try_only {
        return Some(m.lock().unwrap_or_else(|e| e.into_inner()));
    }
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

/// Add one to eventfd `fd` (wakes whoever polls it).
pub(super) fn signal(fd: libc::c_int) {
    let one: u64 = 1;
    // SAFETY: an 8-byte write to an eventfd we own.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

/// Reset eventfd `fd` (non-blocking).
fn consume(fd: libc::c_int) {
    let mut v = 0u64;
    // SAFETY: an 8-byte read from a non-blocking eventfd we own.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// `who` of the eventfds in a pass's poll list.
const EFD: usize = usize::MAX;
const CFD: usize = usize::MAX - 1;

impl Shared {
    /// One `poll` over every live connection (and, for the progress thread, the eventfd) that
    /// waits at most `timeout` (zero: a look), then reads what is readable and writes what is
    /// queued and writable. Returns whether any connection was ready (something moved, or a
    /// connection ended).
    pub(super) fn pass(&self, runner: Runner, timeout: std::time::Duration) -> bool {
        let n = self.streams.len();
        let try_only = runner == Runner::Caller;
        let hold_max = std::time::Duration::from_micros(self.hold_max_us.load(Ordering::Relaxed));
        // Held streams first: a receive posted since, or the hold's end, lets them go on (what
        // is already staged would get no `POLLIN`).
        let mut moved = false;
        let mut holding = false;
        for p in (0..n).filter(|&p| self.held[p].load(Ordering::Acquire) && self.live[p].load(Ordering::Acquire)) {
            let Some(mut g) = lock_or_skip(&self.rx[p], try_only) else {
                holding = true;
                continue;
            };
            let Some(rx) = g.as_mut() else { continue };
            let r = rx.drain(p, self.streams[p].as_ref().unwrap(), &self.mb, try_only, Some(hold_max));
            let still = rx.held();
            drop(g);
            self.held[p].store(still, Ordering::Release);
            holding |= still;
            moved |= !still;
            if let Err(why) = r {
                self.kill(p, why);
            }
        }
        // The progress thread looks at its holds again before they end.
        let timeout = if holding && runner == Runner::Progress { timeout.min(hold_max) } else { timeout };
        // The pollfd of each entry and its peer (or `EFD`, `CFD`: an eventfd).
        let mut list: Vec<libc::pollfd> = Vec::with_capacity(n + 1);
        let mut who: Vec<usize> = Vec::with_capacity(n + 1);
        if runner == Runner::Progress {
            list.push(libc::pollfd { fd: self.efd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            who.push(EFD);
        } else if !timeout.is_zero() {
            list.push(libc::pollfd { fd: self.cfd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            who.push(CFD);
        }
        // Tests: a paused rank reads nothing, not even on a hang-up or an error.
        #[cfg(test)]
        let paused = self.pause_rx.load(Ordering::Acquire);
        #[cfg(not(test))]
        let paused = false;
        let inn = if paused { 0 } else { libc::POLLIN };
        for p in (0..n).filter(|&p| self.live[p].load(Ordering::Acquire)) {
            let s = self.streams[p].as_ref().unwrap();
            let out = if self.queue(p).is_empty() { 0 } else { libc::POLLOUT };
            let inn = if self.held[p].load(Ordering::Acquire) { 0 } else { inn };
            if inn | out == 0 {
                continue;
            }
            list.push(libc::pollfd { fd: s.as_raw_fd(), events: inn | out, revents: 0 });
            who.push(p);
        }
        let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos() as libc::c_long };
        // SAFETY: `list` is a live array of pollfd; a null signal mask keeps the thread's own.
        let r = unsafe { libc::ppoll(list.as_mut_ptr(), list.len() as libc::nfds_t, &ts, std::ptr::null()) };
        if r <= 0 {
            return moved;
        }
        if runner == Runner::Progress && self.drivers.load(Ordering::Acquire) > 0 {
            // A caller began to wait meanwhile and drives the connections: it reads what woke
            // this thread (were this thread to take it, the caller, asleep in its own `poll`,
            // would not learn of the completion until its timeout).
            return false;
        }
        let mut sent = false;
        // Woken by `cfd`: another thread moved something. Not movement of this pass: passing
        // it on would bounce one signal between blocked callers forever.
        let mut woken = false;
        for (pfd, &p) in list.iter().zip(who.iter()) {
            let ev = pfd.revents;
            if ev == 0 {
                continue;
            }
            if p == EFD || p == CFD {
                consume(if p == EFD { &self.efd } else { &self.cfd }.as_raw_fd());
                woken |= p == CFD; // the caller looks again
                continue;
            }
            let s = self.streams[p].as_ref().unwrap();
            if ev & libc::POLLOUT != 0 {
                if let Some(mut q) = lock_or_skip(self.tx[p].as_ref().expect("never sends to self"), try_only) {
                    let mut err = None;
                    while let Some(j) = q.front_mut() {
                        match j.push(s.as_raw_fd()) {
                            Ok(true) => {
                                q.pop_front();
                                sent = true;
                            }
                            Ok(false) => break,
                            Err(e) => {
                                err = Some(e);
                                break;
                            }
                        }
                    }
                    moved = true;
                    drop(q);
                    if let Some(e) = err {
                        self.send_failed(p, e);
                        continue;
                    }
                }
            }
            if !paused && ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                let Some(mut g) = lock_or_skip(&self.rx[p], try_only) else { continue };
                moved = true;
                let r = match g.as_mut() {
                    Some(rx) => {
                        let r = rx.drain(p, s, &self.mb, runner == Runner::Caller, Some(hold_max));
                        self.held[p].store(rx.held(), Ordering::Release);
                        r
                    }
                    // Ended meanwhile (`kill`).
                    None => continue,
                };
                drop(g);
                if let Err(why) = r {
                    self.kill(p, why);
                }
            }
        }
        if sent {
            // Under the table lock, so a waiter between its check and its sleep is not missed.
            drop(self.mb.lock());
            self.mb.notify();
        }
        // A caller other than this thread may be blocked in its `poll` for what moved here.
        if moved {
            let me = usize::from(runner == Runner::Caller && !timeout.is_zero());
            if self.blocked.load(Ordering::SeqCst) > me {
                signal(self.cfd.as_raw_fd());
            }
        }
        moved || woken
    }
}

/// The progress thread of a rank: [`Shared::pass`]es over every peer connection and the
/// wake-up eventfd, landing frames that arrive while no caller waits and finishing sends that
/// did not fit into the socket at once. While callers wait they drive the connections
/// themselves (no thread hop between the socket and the waiter); the progress thread then
/// only sleeps on the eventfd, so that it neither takes a core from them nor wakes with them.
pub(super) fn progress(sh: Arc<Shared>) {
    let n = sh.streams.len();
    while !sh.stop.load(Ordering::Acquire) {
        let since = sh.epoch.elapsed().saturating_sub(std::time::Duration::from_micros(sh.last_drive_us.load(Ordering::Acquire)));
        let queued = || (0..n).any(|p| sh.tx[p].as_ref().is_some_and(|_| !sh.queue(p).is_empty()));
        if sh.drivers.load(Ordering::Acquire) > 0 || (since < QUIET && !queued()) {
            let mut efd = [libc::pollfd { fd: sh.efd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            // SAFETY: one live pollfd.
            if unsafe { libc::poll(efd.as_mut_ptr(), 1, 1) } > 0 {
                consume(sh.efd.as_raw_fd());
            }
            continue;
        }
        sh.pass(Runner::Progress, std::time::Duration::from_millis(100));
    }
    for p in 0..n {
        if let Some(r) = sh.rx(p).as_mut() {
            r.abandon(p, &sh.mb, &lost(p, "communicator closed".into()));
        }
    }
}
