//! TCP backend for ranks on several hosts: a full mesh of non-blocking connections and one
//! progress thread per rank that `poll`s all of them, lands each frame straight into the posted
//! buffer (or keeps it until posted) and finishes sends that did not fit into the socket at
//! once. Frames are length-checked against the posted buffer before any byte is read into it.
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use crate::mailbox::{Dir, Mailbox};
use bytemuck::{Pod, Zeroable};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x454d_4252; // "EMBR"
/// Largest message kept before its buffer is posted (anything longer is a protocol error).
const MAX_EARLY: u64 = 1 << 31;

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

fn hello(token: &str, rank: usize) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&MAGIC.to_le_bytes());
    v.extend_from_slice(&(rank as u32).to_le_bytes());
    v.extend_from_slice(&(token.len() as u32).to_le_bytes());
    v.extend_from_slice(token.as_bytes());
    v
}

fn read_hello(s: &mut TcpStream, token: &str, size: usize) -> Result<usize> {
    let mut h = [0u8; 12];
    let bad = |d: String| Error::Bootstrap(format!("tcp mesh handshake: {d}"));
    s.read_exact(&mut h).map_err(|e| bad(e.to_string()))?;
    let magic = u32::from_le_bytes(h[0..4].try_into().unwrap());
    let rank = u32::from_le_bytes(h[4..8].try_into().unwrap()) as usize;
    let tlen = u32::from_le_bytes(h[8..12].try_into().unwrap()) as usize;
    if magic != MAGIC || rank >= size || tlen > 4096 {
        return Err(bad("malformed hello".into()));
    }
    let mut t = vec![0u8; tlen];
    s.read_exact(&mut t).map_err(|e| bad(e.to_string()))?;
    if t != token.as_bytes() {
        return Err(Error::Refused(format!("tcp connection claiming rank {rank} has a wrong job token")));
    }
    Ok(rank)
}

impl TcpFabric {
    /// Connect the mesh: dial every lower rank, accept every higher one.
    pub fn new(rank: usize, listener: TcpListener, addrs: &[String], token: &str, timeout: Duration) -> Result<TcpFabric> {
        let size = addrs.len();
        let deadline = Instant::now() + timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..size).map(|_| None).collect();
        for (d, a) in addrs.iter().enumerate().take(rank) {
            let mut s = loop {
                match TcpStream::connect(a) {
                    Ok(s) => break s,
                    Err(e) if Instant::now() > deadline => return Err(Error::Bootstrap(format!("connect to rank {d} at {a}: {e}"))),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            };
            s.write_all(&hello(token, rank)).map_err(|e| Error::Bootstrap(format!("hello to rank {d}: {e}")))?;
            streams[d] = Some(s);
        }
        listener.set_nonblocking(true).map_err(|e| Error::Bootstrap(e.to_string()))?;
        let mut missing = size - rank - 1;
        while missing > 0 {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).ok();
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    match read_hello(&mut s, token, size) {
                        Ok(r) if r > rank && streams[r].is_none() => {
                            s.set_read_timeout(None).ok();
                            streams[r] = Some(s);
                            missing -= 1;
                        }
                        Ok(r) => tracing::warn!("tcp mesh: unexpected connection from rank {r}"),
                        Err(e) => tracing::warn!("tcp mesh: refused a connection: {e}"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(Error::Bootstrap(format!("tcp mesh: {missing} higher ranks never connected")));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => return Err(Error::Bootstrap(format!("accept: {e}"))),
            }
        }
        let mb = Arc::new(Mailbox::new());
        // SAFETY: plain eventfd creation; the fd is owned by `Shared` and closed on drop.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(Error::Bootstrap(format!("eventfd: {}", std::io::Error::last_os_error())));
        }
        let mut tx = Vec::with_capacity(size);
        for s in &streams {
            if let Some(s) = s {
                tune(s);
                s.set_nonblocking(true).map_err(|e| Error::Bootstrap(e.to_string()))?;
            }
            tx.push(s.as_ref().map(|_| Mutex::new(VecDeque::new())));
        }
        let sh = Arc::new(Shared { mb, streams, tx, efd, stop: AtomicBool::new(false) });
        let sh2 = sh.clone();
        let progress = std::thread::Builder::new()
            .name(format!("ember-tcp-progress{rank}"))
            .spawn(move || progress(sh2))
            .map_err(|e| Error::Bootstrap(e.to_string()))?;
        Ok(TcpFabric { rank, size, sh, progress: Some(progress) })
    }
}

/// State shared by the callers and the progress thread.
struct Shared {
    mb: Arc<Mailbox>,
    /// Non-blocking sockets, one per peer (`None` for self).
    streams: Vec<Option<TcpStream>>,
    /// Sends that did not fit into the socket at once, in stream order; the progress thread
    /// finishes them when the socket is writable. A job is removed once fully written.
    tx: Vec<Option<Mutex<VecDeque<Job>>>>,
    /// Wakes the progress thread (a send was queued, or shutdown).
    efd: libc::c_int,
    stop: AtomicBool,
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
    fn queue(&self, p: usize) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        self.tx[p].as_ref().expect("never sends to self").lock().unwrap_or_else(|e| e.into_inner())
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

enum Dst {
    /// The posted buffer (claimed: its slot is `Writing` until we complete or fail it).
    Posted(*mut u8),
    /// Not posted yet: kept until `post`.
    Early(Vec<u8>),
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

enum Got {
    Data(usize),
    Later,
}

fn read_some(s: &TcpStream, buf: &mut [u8]) -> std::result::Result<Got, String> {
    loop {
        match (&*s).read(buf) {
            Ok(0) => return Err("connection lost (end of stream)".into()),
            Ok(n) => return Ok(Got::Data(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(Got::Later),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("connection lost ({e})")),
        }
    }
}

impl Rx {
    /// Consume everything readable on `s` now. `Err`: the connection is lost or malformed.
    fn drain(&mut self, peer: usize, s: &TcpStream, mb: &Mailbox) -> std::result::Result<(), String> {
        const HDR: usize = std::mem::size_of::<Frame>();
        loop {
            if let Some(b) = &mut self.body {
                let dst: &mut [u8] = match &mut b.dst {
                    // SAFETY: claim checked len <= the posted capacity; the slot stays `Writing`.
                    Dst::Posted(p) => unsafe { std::slice::from_raw_parts_mut(*p, b.len) },
                    Dst::Early(v) => v,
                };
                let take = (self.hi - self.lo).min(b.len - b.got);
                dst[b.got..b.got + take].copy_from_slice(&self.st[self.lo..self.lo + take]);
                self.lo += take;
                b.got += take;
                if b.got == b.len {
                    let b = self.body.take().unwrap();
                    match b.dst {
                        Dst::Posted(_) => mb.complete(peer, b.tag, Dir::Recv, b.len),
                        Dst::Early(v) => {
                            let _ = mb.deliver(peer, b.tag, v, "tcp receive");
                        }
                    }
                    continue;
                }
                if b.len - b.got >= DIRECT {
                    match read_some(s, &mut dst[b.got..])? {
                        Got::Data(n) => b.got += n,
                        Got::Later => return Ok(()),
                    }
                } else {
                    (self.lo, self.hi) = (0, 0);
                    match read_some(s, &mut self.st)? {
                        Got::Data(n) => self.hi = n,
                        Got::Later => return Ok(()),
                    }
                }
                continue;
            }
            if self.hi - self.lo < HDR {
                self.st.copy_within(self.lo..self.hi, 0);
                (self.lo, self.hi) = (0, self.hi - self.lo);
                match read_some(s, &mut self.st[self.hi..])? {
                    Got::Data(n) => self.hi += n,
                    Got::Later => return Ok(()),
                }
                continue;
            }
            let mut f = Frame::zeroed();
            bytemuck::bytes_of_mut(&mut f).copy_from_slice(&self.st[self.lo..self.lo + HDR]);
            self.lo += HDR;
            if f.magic != MAGIC {
                return Err(format!("malformed frame (bad magic {:#x})", f.magic));
            }
            let tag = Tag { ctx: f.ctx, seq: f.seq, round: f.round };
            let claimed = {
                let mut t = mb.lock();
                Mailbox::claim(&mut t, peer, tag, f.len as usize, "tcp receive")
            };
            let dst = match claimed {
                Ok(Some(buf)) => Dst::Posted(buf.0),
                Ok(None) if f.len <= MAX_EARLY => Dst::Early(vec![0u8; f.len as usize]),
                Ok(None) => return Err(format!("malformed frame: length {} exceeds the limit", f.len)),
                Err(e) => {
                    // The slot holds the error; the stream can no longer be trusted.
                    mb.notify();
                    return Err(e.to_string());
                }
            };
            self.body = Some(Body { tag, len: f.len as usize, got: 0, dst });
        }
    }

    /// The connection ended: a claimed posted buffer is released with an error.
    fn abandon(&mut self, peer: usize, mb: &Mailbox, why: &str) {
        if let Some(Body { tag, dst: Dst::Posted(_), .. }) = self.body.take() {
            mb.fail(peer, tag, Dir::Recv, Error::PeerFailed { op: "tcp receive", peer, reason: format!("{why} (mid-message)") });
        }
    }
}

/// The progress thread of a rank: one `poll` over every peer connection (and the wake-up
/// eventfd); reads land frames in posted buffers, writes finish the sends that did not fit
/// into the socket at once.
fn progress(sh: Arc<Shared>) {
    use std::os::fd::AsRawFd;
    let n = sh.streams.len();
    let mut rx: Vec<Option<Rx>> =
        sh.streams.iter().map(|s| s.as_ref().map(|_| Rx { st: vec![0u8; STAGE], lo: 0, hi: 0, body: None })).collect();
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(n + 1);
    let mut who: Vec<usize> = Vec::with_capacity(n);
    let kill = |p: usize, rx: &mut Vec<Option<Rx>>, why: String| {
        if let Some(mut r) = rx[p].take() {
            r.abandon(p, &sh.mb, &why);
        }
        if let Some(s) = &sh.streams[p] {
            let _ = s.shutdown(Shutdown::Both);
        }
        sh.queue(p).clear();
        sh.mb.peer_died(p, why);
    };
    while !sh.stop.load(Ordering::Acquire) {
        fds.clear();
        who.clear();
        fds.push(libc::pollfd { fd: sh.efd, events: libc::POLLIN, revents: 0 });
        for (p, _) in rx.iter().enumerate().filter(|(_, r)| r.is_some()) {
            {
                let s = sh.streams[p].as_ref().unwrap();
                let out = if sh.queue(p).is_empty() { 0 } else { libc::POLLOUT };
                fds.push(libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN | out, revents: 0 });
                who.push(p);
            }
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
                            err = Some(format!("connection lost while sending ({e})"));
                            break;
                        }
                    }
                }
                drop(q);
                if let Some(why) = err {
                    kill(p, &mut rx, why);
                    continue;
                }
            }
            if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                let r = rx[p].as_mut().unwrap().drain(p, s, &sh.mb);
                if let Err(why) = r {
                    kill(p, &mut rx, why);
                }
            }
        }
        if sent {
            // Under the table lock, so a waiter between its check and its sleep is not missed.
            drop(sh.mb.lock());
            sh.mb.notify();
        }
    }
    for (p, r) in rx.iter_mut().enumerate() {
        if let Some(r) = r {
            r.abandon(p, &sh.mb, "communicator closed");
        }
    }
}

/// Socket buffer size asked for on every mesh connection (loopback and LAN alike):
/// `EMBER_TCP_SOCKBUF` bytes, 0 = leave it to the kernel's autotuning. Default 4 MiB.
fn sock_buf() -> libc::c_int {
    static V: std::sync::OnceLock<libc::c_int> = std::sync::OnceLock::new();
    *V.get_or_init(|| std::env::var("EMBER_TCP_SOCKBUF").ok().and_then(|s| s.parse().ok()).unwrap_or(4 << 20))
}

fn tune(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    s.set_nodelay(true).ok();
    let v = sock_buf();
    if v <= 0 {
        return;
    }
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a c_int value on a socket we own.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &v as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
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
        if let Some(r) = self.sh.mb.lock().dead.get(&dst) {
            return Err(Error::PeerFailed { op: w.op, peer: dst, reason: r.clone() });
        }
        let f = Frame { magic: MAGIC, round: tag.round, ctx: tag.ctx, seq: tag.seq, len: len as u64 };
        let mut hdr = [0u8; 32];
        hdr.copy_from_slice(bytemuck::bytes_of(&f));
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
        let r = self.sh.mb.wait_until(dst, w, &|| Ok(()), |_| if queued(&self.sh.queue(dst)) { None } else { Some(Ok(())) });
        if r.is_err() {
            // The caller may free the buffer now: withdraw the job; a half-written frame
            // leaves the stream unusable, so that connection is closed.
            let mut q = self.sh.queue(dst);
            if let Some(i) = q.iter().position(|j| j.tag == tag) {
                let started = q[i].hoff > 0;
                q.remove(i);
                if started {
                    if let Some(s) = &self.sh.streams[dst] {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                }
            }
        }
        r
    }

    fn wait_recv(&self, src: usize, tag: Tag, w: &Wait) -> Result<usize> {
        self.sh.mb.wait_done(src, tag, Dir::Recv, w, &|| Ok(()))
    }

    fn cancel_recv(&self, src: usize, tag: Tag) {
        self.sh.mb.cancel(src, tag)
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

    #[test]
    fn corrupted_length_field_is_rejected() {
        // A fake rank 0 (raw socket) completes the handshake, then sends a frame claiming 1 TiB.
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let addrs = vec![fake.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
        let h = std::thread::spawn(move || TcpFabric::new(1, l1, &addrs, "tok", Duration::from_secs(2)).unwrap());
        let (mut s, _) = fake.accept().unwrap();
        assert_eq!(read_hello(&mut s, "tok", 2).unwrap(), 1);
        let f1 = h.join().unwrap();
        let tag = Tag { ctx: 1, seq: 0, round: 0 };
        let w = Wait::new("test", Duration::from_secs(1));
        let mut buf = [0u8; 8];
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
    fn wrong_token_on_the_mesh_is_refused() {
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = fake.local_addr().unwrap().to_string();
        let h = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&hello("wrong", 1)).unwrap();
        });
        let (mut s, _) = fake.accept().unwrap();
        h.join().unwrap();
        assert!(matches!(read_hello(&mut s, "tok", 2), Err(Error::Refused(_))));
    }
}
