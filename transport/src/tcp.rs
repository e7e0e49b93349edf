//! TCP backend for ranks on several hosts: a full mesh of non-blocking connections and one
//! progress thread per rank that `poll`s all of them, lands each frame straight into the posted
//! buffer (or keeps it until posted) and finishes sends that did not fit into the socket at
//! once. Frames are length-checked against the posted buffer before any byte is read into it.
//!
//! Every mesh connection starts with the token proof of `auth` (the mesh is dialled by the
//! higher rank; incoming handshakes are served concurrently under the job's deadline). Only
//! this rank's own progress thread writes into a posted buffer, so withdrawing one
//! (`cancel_recv`) never waits for a peer: the rest of a frame in progress is read into scratch.
//! Connections use TCP keepalive and `TCP_USER_TIMEOUT` (the job's timeout), so a peer that
//! vanishes (power loss, partition, paused VM) fails every wait on it.
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use crate::mailbox::{Dir, Mailbox, RawBuf, Slot};
use bytemuck::{Pod, Zeroable};
use std::collections::VecDeque;
use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x454d_4252; // "EMBR"
/// What the mesh handshake's proofs cover.
const MESH_PURPOSE: &[u8] = b"ember tcp mesh v1";

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Frame {
    magic: u32,
    round: u32,
    ctx: u64,
    seq: u64,
    len: u64,
}

pub(crate) struct TcpFabric {
    rank: usize,
    size: usize,
    sh: Arc<Shared>,
    progress: Option<std::thread::JoinHandle<()>>,
}

/// The mesh hello: the dialling rank, the rank it dials, the job size.
fn hello(from: usize, to: usize, size: usize) -> Vec<u8> {
    [from, to, size].iter().flat_map(|&x| (x as u32).to_le_bytes()).collect()
}

fn parse_hello(h: &[u8]) -> Option<(usize, usize, usize)> {
    if h.len() != 12 {
        return None;
    }
    let at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]) as usize;
    Some((at(0), at(4), at(8)))
}

/// The mesh hello as rank `rank` of `size` accepts it: a higher rank of this job dialling this
/// rank. Returns the dialling rank.
pub fn check_mesh_hello(h: &[u8], rank: usize, size: usize) -> std::result::Result<usize, String> {
    match parse_hello(h) {
        Some((from, to, n)) if to == rank && n == size && from > rank && from < size => Ok(from),
        Some((from, to, n)) => Err(format!("rank {from} dialling rank {to} of {n} does not fit rank {rank} of {size}")),
        None => Err("malformed hello".into()),
    }
}

/// Bytes of a frame header: magic, round, communicator context, sequence number, payload length.
pub const FRAME_LEN: usize = std::mem::size_of::<Frame>();

/// The header of a frame that carries `len` payload bytes of message `tag`.
pub fn encode_frame(tag: Tag, len: usize) -> [u8; FRAME_LEN] {
    let f = Frame { magic: MAGIC, round: tag.round, ctx: tag.ctx, seq: tag.seq, len: len as u64 };
    let mut h = [0u8; FRAME_LEN];
    h.copy_from_slice(bytemuck::bytes_of(&f));
    h
}

/// A frame header as the receiving rank reads it, before any payload byte: the magic, and a
/// length this machine can address. Where the payload may go is checked next ([`admit`]).
pub fn decode_frame(h: &[u8; FRAME_LEN]) -> std::result::Result<(Tag, usize), String> {
    let f: Frame = bytemuck::pod_read_unaligned(h);
    if f.magic != MAGIC {
        return Err(format!("malformed frame (bad magic {:#x})", f.magic));
    }
    let len = usize::try_from(f.len).map_err(|_| format!("malformed frame: length {} exceeds the limit", f.len))?;
    Ok((Tag { ctx: f.ctx, seq: f.seq, round: f.round }, len))
}

/// A frame header from `peer`, decoded and admitted: its payload goes into the buffer posted
/// for it (`Some`; claimed, its capacity checked) or is kept until posted (`None`; its bytes
/// reserved within the limit on what peers may make this rank hold). `Err`: a protocol error
/// naming the peer (the stream can no longer be trusted).
fn admit(mb: &Mailbox, peer: usize, h: &[u8; FRAME_LEN]) -> Result<(Tag, usize, Option<RawBuf>)> {
    let (tag, len) = decode_frame(h).map_err(|detail| Error::Protocol { op: "tcp receive", peer, detail })?;
    let mut t = mb.lock();
    let claimed = match Mailbox::claim(&mut t, peer, tag, len, "tcp receive")? {
        Some(buf) => Some(buf),
        None => {
            Mailbox::reserve_early(&mut t, peer, len, "tcp receive")?;
            None
        }
    };
    Ok((tag, len, claimed))
}

/// A receiving rank's admission of frame headers without a socket (the fuzz target
/// `tcp_frame`): receives posted into buffers held here, and each header put through the
/// progress thread's own [`admit`], its payload then delivered as zeros.
#[doc(hidden)]
pub struct FrameSink {
    mb: Mailbox,
    bufs: Vec<Box<[u8]>>,
}

impl Default for FrameSink {
    fn default() -> Self {
        FrameSink { mb: Mailbox::new(), bufs: Vec::new() }
    }
}

impl FrameSink {
    /// Post a receive of at most `cap` bytes from `peer` for `tag`.
    pub fn post(&mut self, peer: usize, tag: Tag, cap: usize) -> Result<()> {
        let mut b = vec![0u8; cap].into_boxed_slice();
        self.mb.post(peer, tag, b.as_mut_ptr(), cap, "tcp receive")?;
        self.bufs.push(b);
        Ok(())
    }
    /// One frame header from `peer`: `Ok((tag, len, posted))` once its payload landed in the
    /// posted buffer (`posted`) or was kept until posted.
    pub fn frame(&mut self, peer: usize, h: &[u8; FRAME_LEN]) -> Result<(Tag, usize, bool)> {
        let (tag, len, dst) = admit(&self.mb, peer, h)?;
        match dst {
            Some(_) => self.mb.complete(peer, tag, Dir::Recv, len),
            None => self.mb.deliver(peer, tag, vec![0u8; len], true, "tcp receive")?,
        }
        Ok((tag, len, dst.is_some()))
    }
    /// Bytes held for receives not posted yet.
    pub fn early_bytes(&self) -> usize {
        self.mb.lock().early_bytes
    }
}

impl TcpFabric {
    /// Connect the mesh: dial every lower rank, accept every higher one (concurrently); both
    /// sides of every connection prove the job token. All of it within `timeout`.
    pub fn new(rank: usize, listener: TcpListener, addrs: &[String], token: &str, timeout: Duration) -> Result<TcpFabric> {
        let size = addrs.len();
        let deadline = Instant::now() + timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        let stop = AtomicBool::new(false);
        let accept = std::thread::scope(|sc| {
            let acceptor = sc.spawn(|| {
                let mut got: Vec<(usize, TcpStream)> = Vec::new();
                let mut missing = size - rank - 1;
                if missing == 0 {
                    return Ok(got);
                }
                let handshake = |mut c: Conn| -> std::result::Result<(usize, TcpStream), String> {
                    let fits = |h: &[u8]| check_mesh_hello(h, rank, size).map(|_| ());
                    let h = crate::auth::server(&mut c, token, MESH_PURPOSE, fits).map_err(|e| e.to_string())?;
                    Ok((check_mesh_hello(&h, rank, size).expect("checked"), c.s))
                };
                let r = crate::conn::serve(&listener, deadline, "tcp mesh", &stop, handshake, |(from, s)| {
                    if got.iter().any(|(r, _)| *r == from) {
                        tracing::warn!("tcp mesh: a second connection from rank {from}, dropped");
                        return false;
                    }
                    got.push((from, s));
                    missing -= 1;
                    missing == 0
                });
                match r {
                    Ok(()) => Ok(got),
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                        let who: Vec<usize> = (rank + 1..size).filter(|r| !got.iter().any(|(g, _)| g == r)).collect();
                        Err(Error::Bootstrap(format!("tcp mesh: ranks {who:?} never connected within {timeout:?}")))
                    }
                    Err(e) => Err(Error::Bootstrap(format!("tcp mesh: accept: {e}"))),
                }
            });
            for (d, a) in addrs.iter().enumerate().take(rank) {
                match dial(rank, d, size, a, token, deadline) {
                    Ok(s) => streams[d] = Some(s),
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
            }
            acceptor.join().map_err(|_| Error::Bootstrap("tcp mesh: the accepting thread panicked".into()))?
        });
        for (r, s) in accept? {
            streams[r] = Some(s);
        }
        let mb = Arc::new(Mailbox::new());
        // SAFETY: plain eventfd creation; the fd is owned by `Shared` and closed on drop.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::Bootstrap(format!("eventfd: {}", std::io::Error::last_os_error())));
        }
        let mut tx = Vec::with_capacity(size);
        let mut rx = Vec::with_capacity(size);
        for s in &streams {
            if let Some(s) = s {
                tune(s, timeout);
                s.set_nonblocking(true).map_err(|e| Error::Bootstrap(e.to_string()))?;
            }
            tx.push(s.as_ref().map(|_| Mutex::new(VecDeque::new())));
            rx.push(Mutex::new(s.as_ref().map(|_| Rx { st: vec![0u8; STAGE], lo: 0, hi: 0, body: None })));
        }
        let sh = Arc::new(Shared { mb, streams, tx, rx, efd, stop: AtomicBool::new(false), #[cfg(test)] pause_rx: AtomicBool::new(false) });
        let sh2 = sh.clone();
        let progress = std::thread::Builder::new()
            .name(format!("ember-tcp-progress{rank}"))
            .spawn(move || progress(sh2))
            .map_err(|e| Error::Bootstrap(e.to_string()))?;
        Ok(TcpFabric { rank, size, sh, progress: Some(progress) })
    }
}

#[cfg(test)]
impl TcpFabric {
    /// Tests: stop (`true`) or resume reading from every peer (a rank that stopped reading).
    pub(crate) fn pause_rx(&self, on: bool) {
        self.sh.pause_rx.store(on, Ordering::Release);
        self.sh.wake();
    }
}

/// Dial rank `d` at `a` (retrying until the deadline) and prove the token.
fn dial(rank: usize, d: usize, size: usize, a: &str, token: &str, deadline: Instant) -> Result<TcpStream> {
    let s = loop {
        match TcpStream::connect(a) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(Error::Bootstrap(format!("connect to rank {d} at {a}: {e}"))),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let mut c = Conn::new(s, deadline).map_err(|e| Error::Bootstrap(format!("connect to rank {d} at {a}: {e}")))?;
    crate::auth::client(&mut c, token, MESH_PURPOSE, &hello(rank, d, size)).map_err(|e| match e {
        crate::auth::AuthError::Refused(why) => Error::Refused(format!("tcp mesh, rank {d} at {a}: {why}")),
        crate::auth::AuthError::Io(e) => Error::Bootstrap(format!("tcp mesh handshake with rank {d} at {a}: {e}")),
    })?;
    Ok(c.s)
}

/// State shared by the callers and the progress thread.
struct Shared {
    mb: Arc<Mailbox>,
    /// Non-blocking sockets, one per peer (`None` for self).
    streams: Vec<Option<TcpStream>>,
    /// Sends that did not fit into the socket at once, in stream order; the progress thread
    /// finishes them when the socket is writable. A job is removed once fully written.
    tx: Vec<Option<Mutex<VecDeque<Job>>>>,
    /// Receive state per peer (`None`: self, or the connection is gone). The progress thread
    /// holds it while it reads from that peer; `cancel_recv` takes it to divert a frame.
    rx: Vec<Mutex<Option<Rx>>>,
    /// Wakes the progress thread (a send was queued, or shutdown).
    efd: libc::c_int,
    stop: AtomicBool,
    /// Tests: the progress thread reads nothing while set (a peer that stopped reading).
    #[cfg(test)]
    pause_rx: AtomicBool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: our eventfd, closed once.
        unsafe { libc::close(self.efd) };
    }
}

impl Shared {
    fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: 8-byte write to our eventfd.
        unsafe { libc::write(self.efd, &one as *const u64 as *const libc::c_void, 8) };
    }
    fn queue(&self, p: usize) -> MutexGuard<'_, VecDeque<Job>> {
        self.tx[p].as_ref().expect("never sends to self").lock().unwrap_or_else(|e| e.into_inner())
    }
    fn rx(&self, p: usize) -> MutexGuard<'_, Option<Rx>> {
        self.rx[p].lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Withdraw the send of `tag` to `p`: once this returns, no byte of its buffer is read. A
    /// frame already partly on the wire leaves the stream unusable: that connection is closed.
    fn withdraw(&self, p: usize, tag: Tag) {
        let mut q = self.queue(p);
        if let Some(i) = q.iter().position(|j| j.tag == tag) {
            let started = q[i].hoff > 0;
            q.remove(i);
            if started {
                if let Some(s) = &self.streams[p] {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

/// A send in flight: the frame header (ours) and the caller's payload (valid until `wait_send`).
struct Job {
    tag: Tag,
    hdr: [u8; 32],
    hoff: usize,
    data: *const u8,
    len: usize,
    doff: usize,
}
// SAFETY: `data` is only read, and only while the job is queued (the `Fabric::send` contract).
unsafe impl Send for Job {}

impl Job {
    /// Write as much as the socket takes now; `Ok(true)` when the whole frame is out.
    fn push(&mut self, fd: libc::c_int) -> std::io::Result<bool> {
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
/// Reads from one peer per progress pass (then the others get their turn, and a `cancel_recv`
/// waiting for this peer's receive state gets it).
const READS_PER_PASS: u32 = 32;

enum Dst {
    /// The posted buffer (claimed: its slot is `Writing` until we complete or fail it).
    Posted(*mut u8),
    /// Not posted yet: kept until `post` (its bytes reserved against the limit).
    Early(Vec<u8>),
    /// Withdrawn by `cancel_recv` while arriving: the rest of the frame is read and dropped.
    Discard,
}

struct Body {
    tag: Tag,
    len: usize,
    got: usize,
    dst: Dst,
}

/// Receive state of one connection.
struct Rx {
    st: Vec<u8>,
    lo: usize,
    hi: usize,
    body: Option<Body>,
}
// SAFETY: the raw pointer in `Dst::Posted` is only written through by the thread holding the
// `Rx` lock, within the `Fabric::post_recv` contract.
unsafe impl Send for Rx {}

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
    /// Consume what is readable on `s` now, at most [`READS_PER_PASS`] reads. `Err`: the
    /// connection is lost (`PeerFailed`) or malformed (`Protocol`).
    fn drain(&mut self, peer: usize, s: &TcpStream, mb: &Mailbox) -> Result<()> {
        const HDR: usize = FRAME_LEN;
        let mut reads = 0u32;
        loop {
            if let Some(b) = &mut self.body {
                let take = (self.hi - self.lo).min(b.len - b.got);
                match &mut b.dst {
                    // SAFETY: claim checked len <= the posted capacity; the slot stays `Writing`
                    // (and `cancel_recv` diverts it only under our lock).
                    Dst::Posted(p) => unsafe { std::ptr::copy_nonoverlapping(self.st.as_ptr().add(self.lo), p.add(b.got), take) },
                    Dst::Early(v) => v[b.got..b.got + take].copy_from_slice(&self.st[self.lo..self.lo + take]),
                    Dst::Discard => {}
                }
                self.lo += take;
                b.got += take;
                if b.got == b.len {
                    let b = self.body.take().unwrap();
                    match b.dst {
                        Dst::Posted(_) => mb.complete(peer, b.tag, Dir::Recv, b.len),
                        Dst::Early(v) => {
                            let _ = mb.deliver(peer, b.tag, v, true, "tcp receive");
                        }
                        Dst::Discard => {}
                    }
                    continue;
                }
                if reads == READS_PER_PASS {
                    return Ok(());
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
                        Got::Later => return Ok(()),
                    },
                    None => {
                        (self.lo, self.hi) = (0, 0);
                        match read_some(peer, s, &mut self.st)? {
                            Got::Data(n) => self.hi = n,
                            Got::Later => return Ok(()),
                        }
                    }
                }
                continue;
            }
            if self.hi - self.lo < HDR {
                if reads == READS_PER_PASS {
                    return Ok(());
                }
                reads += 1;
                self.st.copy_within(self.lo..self.hi, 0);
                (self.lo, self.hi) = (0, self.hi - self.lo);
                match read_some(peer, s, &mut self.st[self.hi..])? {
                    Got::Data(n) => self.hi += n,
                    Got::Later => return Ok(()),
                }
                continue;
            }
            let hdr: &[u8; FRAME_LEN] = self.st[self.lo..self.lo + HDR].try_into().expect("HDR bytes");
            self.lo += HDR;
            let (tag, len, dst) = match admit(mb, peer, hdr) {
                Ok((tag, len, Some(buf))) => (tag, len, Dst::Posted(buf.0)),
                // Not posted yet: kept (its bytes reserved within the limit).
                Ok((tag, len, None)) => (tag, len, Dst::Early(vec![0u8; len])),
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

/// The progress thread of a rank: one `poll` over every peer connection (and the wake-up
/// eventfd); reads land frames in posted buffers, writes finish the sends that did not fit
/// into the socket at once.
fn progress(sh: Arc<Shared>) {
    use std::os::fd::AsRawFd;
    let n = sh.streams.len();
    let mut live: Vec<bool> = sh.streams.iter().map(|s| s.is_some()).collect();
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(n + 1);
    let mut who: Vec<usize> = Vec::with_capacity(n);
    let kill = |p: usize, live: &mut Vec<bool>, why: Error| {
        live[p] = false;
        if let Some(mut r) = sh.rx(p).take() {
            r.abandon(p, &sh.mb, &why);
        }
        if let Some(s) = &sh.streams[p] {
            let _ = s.shutdown(Shutdown::Both);
        }
        sh.queue(p).clear();
        sh.mb.peer_failed(why);
    };
    while !sh.stop.load(Ordering::Acquire) {
        fds.clear();
        who.clear();
        fds.push(libc::pollfd { fd: sh.efd, events: libc::POLLIN, revents: 0 });
        #[cfg(test)]
        let inn = if sh.pause_rx.load(Ordering::Acquire) { 0 } else { libc::POLLIN };
        #[cfg(not(test))]
        let inn = libc::POLLIN;
        for p in (0..n).filter(|&p| live[p]) {
            let s = sh.streams[p].as_ref().unwrap();
            let out = if sh.queue(p).is_empty() { 0 } else { libc::POLLOUT };
            fds.push(libc::pollfd { fd: s.as_raw_fd(), events: inn | out, revents: 0 });
            who.push(p);
        }
        // SAFETY: `fds` is a live array of pollfd.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if r <= 0 {
            continue;
        }
        if fds[0].revents != 0 {
            let mut v = 0u64;
            // SAFETY: 8-byte read from our eventfd (non-blocking).
            unsafe { libc::read(sh.efd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        }
        let mut sent = false;
        for (i, &p) in who.iter().enumerate() {
            let ev = fds[i + 1].revents;
            if ev == 0 {
                continue;
            }
            let s = sh.streams[p].as_ref().unwrap();
            if ev & libc::POLLOUT != 0 {
                let mut q = sh.queue(p);
                let mut err = None;
                while let Some(j) = q.front_mut() {
                    match j.push(s.as_raw_fd()) {
                        Ok(true) => {
                            q.pop_front();
                            sent = true;
                        }
                        Ok(false) => break,
                        Err(e) => {
                            err = Some(Error::PeerFailed { op: "tcp send", peer: p, reason: format!("connection lost while sending ({e})") });
                            break;
                        }
                    }
                }
                drop(q);
                if let Some(why) = err {
                    kill(p, &mut live, why);
                    continue;
                }
            }
            if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                let r = match sh.rx(p).as_mut() {
                    Some(rx) => rx.drain(p, s, &sh.mb),
                    None => Ok(()),
                };
                if let Err(why) = r {
                    kill(p, &mut live, why);
                }
            }
        }
        if sent {
            // Under the table lock, so a waiter between its check and its sleep is not missed.
            drop(sh.mb.lock());
            sh.mb.notify();
        }
    }
    for p in 0..n {
        if let Some(r) = sh.rx(p).as_mut() {
            r.abandon(p, &sh.mb, &lost(p, "communicator closed".into()));
        }
    }
}

/// Socket buffer size asked for on every mesh connection (loopback and LAN alike):
/// `EMBER_TCP_SOCKBUF` bytes, 0 = leave it to the kernel's autotuning. Default 4 MiB.
fn sock_buf() -> libc::c_int {
    static V: std::sync::OnceLock<libc::c_int> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("EMBER_TCP_SOCKBUF").ok().and_then(|s| s.parse().ok()).unwrap_or(4 << 20))
}

/// Per-connection options: no Nagle, socket buffers (`EMBER_TCP_SOCKBUF`), and the dead-peer
/// detection: keepalive probes after `timeout / 2` idle (1..=60 s), every `timeout / 6`
/// (1..=10 s), and `TCP_USER_TIMEOUT` = `timeout` (data unacknowledged that long, or probes
/// unanswered, end the connection).
fn tune(s: &TcpStream, timeout: Duration) {
    use std::os::fd::AsRawFd;
    s.set_nodelay(true).ok();
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| {
        // SAFETY: setsockopt with a c_int value on a socket we own.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                level,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    };
    let secs = timeout.as_secs().clamp(1, 3600) as libc::c_int;
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, (secs / 2).clamp(1, 60));
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, (secs / 6).clamp(1, 10));
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int);
    let v = sock_buf();
    if v > 0 {
        set(libc::SOL_SOCKET, libc::SO_SNDBUF, v);
        set(libc::SOL_SOCKET, libc::SO_RCVBUF, v);
    }
}

impl Fabric for TcpFabric {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn name(&self) -> &'static str {
        "tcp"
    }

    unsafe fn post_recv(&self, src: usize, tag: Tag, buf: *mut u8, len: usize, w: &Wait) -> Result<()> {
        self.sh.mb.post(src, tag, buf, len, w.op).map(|_| ())
    }

    /// Writes the frame from the caller's thread as far as the socket takes it (header and
    /// payload in one `sendmsg`); the rest is queued for the progress thread.
    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        use std::os::fd::AsRawFd;
        if let Some(e) = self.sh.mb.lock().dead.get(&dst) {
            return Err(e.clone().with_op(w.op));
        }
        let hdr = encode_frame(tag, len);
        let mut job = Job { tag, hdr, hoff: 0, data, len, doff: 0 };
        let mut q = self.sh.queue(dst);
        if q.is_empty() {
            let fd = self.sh.streams[dst].as_ref().unwrap().as_raw_fd();
            match job.push(fd) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(Error::Io { op: w.op, peer: dst, detail: e.to_string() }),
            }
        }
        q.push_back(job);
        drop(q);
        self.sh.wake();
        Ok(())
    }

    fn wait_send(&self, dst: usize, tag: Tag, w: &Wait) -> Result<()> {
        let queued = |q: &VecDeque<Job>| q.iter().any(|j| j.tag == tag);
        if !queued(&self.sh.queue(dst)) {
            return Ok(());
        }
        let r = self.sh.mb.wait_until(dst, w, &|| Ok(false), |_| if queued(&self.sh.queue(dst)) { None } else { Some(Ok(())) });
        if r.is_err() {
            // The caller may free the buffer now.
            self.sh.withdraw(dst, tag);
        }
        r
    }

    fn wait_recv(&self, src: usize, tag: Tag, w: &Wait) -> Result<usize> {
        self.sh.mb.wait_done(src, tag, Dir::Recv, w, &|| Ok(false))
    }

    /// Never waits for the peer: under the receive lock of `src` (held by the progress thread
    /// only for one bounded pass of non-blocking reads) a frame arriving into the buffer is
    /// diverted to scratch.
    fn cancel_recv(&self, src: usize, tag: Tag) {
        let mut rx = self.sh.rx(src);
        let mut t = self.sh.mb.lock();
        if matches!(t.map.get(&(src, tag, Dir::Recv)), Some(Slot::Writing)) {
            if let Some(b) = rx.as_mut().and_then(|r| r.body.as_mut()).filter(|b| b.tag == tag) {
                b.dst = Dst::Discard;
            }
        }
        t.map.remove(&(src, tag, Dir::Recv));
    }

    fn cancel_send(&self, dst: usize, tag: Tag) {
        self.sh.withdraw(dst, tag);
    }
}

impl Drop for TcpFabric {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::Release);
        self.sh.wake();
        if let Some(h) = self.progress.take() {
            let _ = h.join();
        }
        for s in self.sh.streams.iter().flatten() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Rank 1 as a real fabric, rank 0 a raw socket that completed the mesh handshake.
    fn fake_rank0(token: &'static str, timeout: Duration) -> (TcpStream, TcpFabric) {
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![fake.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
        let h = std::thread::spawn(move || TcpFabric::new(1, l1, &addrs, token, timeout).unwrap());
        let (s, _) = fake.accept().unwrap();
        let mut c = Conn::new(s, Instant::now() + Duration::from_secs(5)).unwrap();
        let h1 = crate::auth::server(&mut c, token, MESH_PURPOSE, |_| Ok(())).unwrap();
        assert_eq!(parse_hello(&h1), Some((1, 0, 2)));
        (c.s, h.join().unwrap())
    }

    #[test]
    fn frame_headers_round_trip_and_are_admitted_within_their_limits() {
        let tag = Tag { ctx: 3, seq: 4, round: 5 };
        assert_eq!(decode_frame(&encode_frame(tag, 77)), Ok((tag, 77)));
        let mut bad = encode_frame(tag, 1);
        bad[0] ^= 1;
        assert!(decode_frame(&bad).unwrap_err().contains("magic"));
        let mut s = FrameSink::default();
        s.post(0, tag, 8).unwrap();
        // Longer than the posted buffer: refused, naming the peer.
        let e = s.frame(0, &encode_frame(tag, 9)).unwrap_err();
        assert!(matches!(&e, Error::Protocol { peer: 0, detail, .. } if detail.contains("exceeds")), "{e}");
        let t2 = Tag { seq: 5, ..tag };
        s.post(0, t2, 8).unwrap();
        assert_eq!(s.frame(0, &encode_frame(t2, 8)).unwrap(), (t2, 8, true));
        // Not posted: kept within the limit on early bytes, refused past it.
        let t3 = Tag { seq: 6, ..tag };
        assert_eq!(s.frame(0, &encode_frame(t3, 100)).unwrap(), (t3, 100, false));
        assert_eq!(s.early_bytes(), 100);
        let e = s.frame(1, &encode_frame(Tag { seq: 7, ..tag }, crate::alloc_limit())).unwrap_err();
        assert!(matches!(&e, Error::Protocol { peer: 1, detail, .. } if detail.contains("limit")), "{e}");
        assert_eq!(s.early_bytes(), 100);
        // A second frame for the same message is a protocol error.
        assert!(s.frame(0, &encode_frame(t3, 1)).is_err());
    }

    #[test]
    fn the_mesh_hello_must_come_from_a_higher_rank_of_this_job() {
        assert_eq!(check_mesh_hello(&hello(3, 1, 4), 1, 4), Ok(3));
        assert!(check_mesh_hello(&hello(0, 1, 4), 1, 4).is_err(), "a lower rank never dials");
        assert!(check_mesh_hello(&hello(3, 2, 4), 1, 4).is_err(), "dialled another rank");
        assert!(check_mesh_hello(&hello(3, 1, 5), 1, 4).is_err(), "another job size");
        assert!(check_mesh_hello(&hello(4, 1, 4), 1, 4).is_err(), "rank past the job");
        assert!(check_mesh_hello(&hello(3, 1, 4)[..11], 1, 4).is_err());
    }

    #[test]
    fn corrupted_length_field_is_rejected() {
        // A fake rank 0 completes the handshake, then sends a frame claiming 1 TiB.
        let (mut s, f1) = fake_rank0("tok", Duration::from_secs(2));
        let tag = Tag { ctx: 1, seq: 0, round: 0 };
        let w = Wait::new("test", Duration::from_secs(1));
        let mut buf = [0u8; 8];
        // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
        unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), 8, &w).unwrap() };
        let f = Frame { magic: MAGIC, round: 0, ctx: 1, seq: 0, len: 1 << 40 };
        s.write_all(bytemuck::bytes_of(&f)).unwrap();
        s.write_all(&[0xAB; 64]).unwrap();
        let e = f1.wait_recv(0, tag, &w).unwrap_err();
        assert_eq!(e.peer(), Some(0));
        assert!(e.to_string().contains("exceeds"), "{e}");
        assert_eq!(buf, [0u8; 8]);
    }

    #[test]
    fn an_unposted_message_beyond_the_allocation_limit_fails_the_peer() {
        // Nothing posted: a frame of more than the limit is refused before any allocation.
        let (mut s, f1) = fake_rank0("tok", Duration::from_secs(2));
        let f = Frame { magic: MAGIC, round: 0, ctx: 1, seq: 0, len: crate::alloc_limit() as u64 + 1 };
        s.write_all(bytemuck::bytes_of(&f)).unwrap();
        let w = Wait::new("test", Duration::from_secs(2));
        let e = f1.wait_recv(0, Tag { ctx: 1, seq: 9, round: 0 }, &w).unwrap_err();
        assert!(matches!(&e, Error::Protocol { peer: 0, detail, .. } if detail.contains("limit")), "{e}");
    }

    #[test]
    fn wrong_token_on_the_mesh_is_refused_and_the_mesh_still_forms() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![l0.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
        let a0 = addrs[0].clone();
        let addrs0 = addrs.clone();
        let h0 = std::thread::spawn(move || TcpFabric::new(0, l0, &addrs0, "tok", Duration::from_secs(5)).unwrap());
        // An intruder with the wrong token dials rank 0 first, claiming rank 1.
        let mut c = Conn::new(TcpStream::connect(&a0).unwrap(), Instant::now() + Duration::from_secs(5)).unwrap();
        let e = crate::auth::client(&mut c, "wrong", MESH_PURPOSE, &hello(1, 0, 2)).unwrap_err();
        assert!(e.to_string().contains("does not know the job token"), "{e}");
        let f1 = TcpFabric::new(1, l1, &addrs, "tok", Duration::from_secs(5)).unwrap();
        let f0 = h0.join().unwrap();
        let w = Wait::new("test", Duration::from_secs(2));
        let tag = Tag { ctx: 1, seq: 0, round: 0 };
        let mut got = [0u8; 4];
        // SAFETY: `got` (4 bytes) and the 4-byte literal outlive both messages, waited for below.
        unsafe {
            f1.post_recv(0, tag, got.as_mut_ptr(), 4, &w).unwrap();
            f0.send(1, tag, [1u8, 2, 3, 4].as_ptr(), 4, &w).unwrap();
        }
        f0.wait_send(1, tag, &w).unwrap();
        assert_eq!(f1.wait_recv(0, tag, &w).unwrap(), 4);
        assert_eq!(got, [1, 2, 3, 4]);
    }

    #[test]
    fn a_slow_client_does_not_hold_up_the_mesh() {
        let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![l0.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
        let (a0, addrs0) = (addrs[0].clone(), addrs.clone());
        let h0 = std::thread::spawn(move || TcpFabric::new(0, l0, &addrs0, "tok", Duration::from_secs(8)).map(|_| ()));
        let slow = std::thread::spawn(move || {
            // A plausible start of a hello (magic, a short length, nonce bytes), a byte every
            // 250 ms: 4 s in all, each byte well within any per-read limit.
            let mut s = TcpStream::connect(&a0).unwrap();
            for b in b"EMBRAUT1".iter().copied().chain([4, 0, 0, 0, 1, 0, 0, 0]) {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        let f1 = TcpFabric::new(1, l1, &addrs, "tok", Duration::from_secs(8)).unwrap();
        h0.join().unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "the mesh formed after {:?}", t0.elapsed());
        drop(f1);
        slow.join().unwrap();
    }

    #[test]
    fn connections_detect_dead_peers_by_keepalive_and_user_timeout() {
        use std::os::fd::AsRawFd;
        let (_s, f1) = fake_rank0("tok", Duration::from_millis(4500));
        let s = f1.sh.streams[0].as_ref().unwrap();
        let get = |level, opt| {
            let mut v: libc::c_int = -1;
            let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt of a c_int into our variable.
            assert_eq!(unsafe { libc::getsockopt(s.as_raw_fd(), level, opt, &mut v as *mut _ as *mut libc::c_void, &mut l) }, 0);
            v
        };
        assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 4500);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 2);
        assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 1);
    }

    #[test]
    fn a_peer_stalled_mid_frame_times_out_and_cancel_returns_at_once() {
        // Rank 0 sends a header and half the payload, then stalls (SIGSTOP, paused VM). The
        // receive times out; the cancel returns without waiting for rank 0; the rest of the
        // frame, sent later, never reaches the withdrawn buffer.
        let (mut s, f1) = fake_rank0("tok", Duration::from_secs(5));
        let tag = Tag { ctx: 1, seq: 0, round: 0 };
        let w = Wait::new("test", Duration::from_millis(300));
        let len = 200_000;
        let mut buf = vec![0u8; len];
        // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
        unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), len, &w).unwrap() };
        let f = Frame { magic: MAGIC, round: 0, ctx: 1, seq: 0, len: len as u64 };
        s.write_all(bytemuck::bytes_of(&f)).unwrap();
        s.write_all(&vec![0x11u8; len / 2]).unwrap();
        let e = f1.wait_recv(0, tag, &w).unwrap_err();
        assert!(matches!(e, Error::Timeout { peer: 0, .. }), "{e}");
        let (tx, rx) = std::sync::mpsc::channel();
        let f1 = Arc::new(f1);
        let f1c = f1.clone();
        let t0 = Instant::now();
        std::thread::spawn(move || {
            f1c.cancel_recv(0, tag);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(2)).expect("cancel_recv waited for the stalled peer");
        assert!(t0.elapsed() < Duration::from_secs(1));
        let snapshot = buf.clone();
        // The peer wakes up: the rest of the frame, then a small frame for a live receive.
        s.write_all(&vec![0x22u8; len - len / 2]).unwrap();
        let tag2 = Tag { ctx: 1, seq: 1, round: 0 };
        let mut small = [0u8; 3];
        let w = Wait::new("test", Duration::from_secs(2));
        // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
        unsafe { f1.post_recv(0, tag2, small.as_mut_ptr(), 3, &w).unwrap() };
        s.write_all(bytemuck::bytes_of(&Frame { magic: MAGIC, round: 0, ctx: 1, seq: 1, len: 3 })).unwrap();
        s.write_all(&[7, 8, 9]).unwrap();
        assert_eq!(f1.wait_recv(0, tag2, &w).unwrap(), 3);
        assert_eq!(small, [7, 8, 9]);
        assert!(buf == snapshot, "bytes landed in the withdrawn buffer");
    }
}
