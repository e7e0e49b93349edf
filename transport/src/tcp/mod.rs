//! TCP backend for ranks on several hosts: a full mesh of non-blocking connections and one
//! progress thread per rank that `poll`s all of them, lands each frame straight into the posted
//! buffer (or, not posted yet, holds a long one in the stream for a moment and keeps it
//! afterwards, or a short one at once) and finishes sends that did not fit into the socket at
//! once. Frames are length-checked against the posted buffer before any byte is read into it.
//!
//! Every mesh connection starts with the token proof of `auth` (the mesh is dialled by the
//! higher rank; incoming handshakes are served concurrently under the job's deadline). Only
//! a thread of this rank holding the connection's receive state (the progress thread, or a
//! caller whose write failed and reads what the peer sent first) writes into a posted buffer,
//! so withdrawing one (`cancel_recv`) never waits for a peer: the rest of a frame in progress
//! is read into scratch.
//! Connections use TCP keepalive and `TCP_USER_TIMEOUT` (the job's timeout), so a peer that
//! vanishes (power loss, partition, paused VM) fails every wait on it.
//!
//! This module connects the mesh and implements `Fabric`; what travels on a connection (the
//! mesh hello, frame headers and their admission) is [`wire`], the progress thread
//! [`progress`](mod@progress).
mod progress;
#[cfg(test)]
mod tests;
pub(crate) mod wire;

use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use crate::mailbox::{Dir, Mailbox, Slot};
use crate::spin::AdaptiveSpin;
use progress::{progress, Dst, Job, Runner, Rx, Shared};
use std::collections::VecDeque;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wire::{check_mesh_hello, hello};

/// What the mesh handshake's proofs cover.
const MESH_PURPOSE: &[u8] = b"ember tcp mesh v1";

pub(crate) struct TcpFabric {
    rank: usize,
    size: usize,
    sh: Arc<Shared>,
    progress: Option<std::thread::JoinHandle<()>>,
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
        // The environment's settings, checked before the mesh is used (a bad one fails here,
        // naming the variable; the peers see this rank leave the mesh).
        let cc = parse_congestion(std::env::var_os("EMBER_TCP_CONGESTION"))?;
        let sockbuf = parse_sockbuf(std::env::var_os("EMBER_TCP_SOCKBUF"))?;
        let spin = crate::spin::max_from_env("EMBER_TCP_SPIN_US", SPIN_US)?;
        crate::limits::alloc_limit()?;
        let mb = Arc::new(Mailbox::new());
        let (efd, cfd) = (event_fd()?, event_fd()?);
        let mut tx = Vec::with_capacity(size);
        let mut rx = Vec::with_capacity(size);
        for s in &streams {
            if let Some(s) = s {
                tune(s, timeout, cc.as_deref(), sockbuf)?;
                s.set_nonblocking(true).map_err(|e| Error::Bootstrap(e.to_string()))?;
            }
            tx.push(s.as_ref().map(|_| Mutex::new(VecDeque::new())));
            rx.push(Mutex::new(s.as_ref().map(|_| Rx::new())));
        }
        let live = streams.iter().map(|s| AtomicBool::new(s.is_some())).collect();
        let held = streams.iter().map(|_| AtomicBool::new(false)).collect();
        let sh = Arc::new(Shared {
            mb,
            streams,
            tx,
            rx,
            live,
            held,
            hold_max_us: (progress::HOLD_MAX.as_micros() as u64).into(),
            drivers: AtomicUsize::new(0),
            last_drive_us: 0.into(),
            epoch: Instant::now(),
            blocked: AtomicUsize::new(0),
            spin: AdaptiveSpin::new(spin),
            efd,
            cfd,
            stop: AtomicBool::new(false),
            #[cfg(test)]
            pause_rx: AtomicBool::new(false),
        });
        let sh2 = sh.clone();
        let progress = std::thread::Builder::new()
            .name(format!("ember-tcp-progress{rank}"))
            .spawn(move || progress(sh2))
            .map_err(|e| Error::Bootstrap(e.to_string()))?;
        Ok(TcpFabric { rank, size, sh, progress: Some(progress) })
    }
}

/// A non-blocking eventfd, closed when dropped.
fn event_fd() -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain eventfd creation; a valid descriptor is owned by the `OwnedFd` alone.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::Bootstrap(format!("eventfd: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// How long a wait busy-polls the connections before it yields, at most (`EMBER_TCP_SPIN_US`):
/// [`AdaptiveSpin`] stops it where the peer shares this core. Short: waits that went on
/// busy-polling for 50 µs made a back-to-back 8-byte all-to-all between two cores 1.9× slower
/// (16.5 µs against 8.8) and an 8 KiB one 2.1× (25.7 against 12.3), than waits that yield
/// after 5 µs or at once (each look is a `ppoll` either way; per-operation timings and large
/// messages did not change). Why the busy-poll costs here was not pinned down: slowing this rank's progress
/// thread's wake-ups fifty-fold did not change it, and no softirq work moved to ksoftirqd.
const SPIN_US: u64 = 5;

/// After the busy-poll, how long a wait yields between looks before it blocks in `poll`.
const YIELD_FOR: Duration = Duration::from_micros(50);
/// The longest single block in `poll` (another thread's progress wakes it through `cfd`).
const MAX_BLOCK: Duration = Duration::from_millis(1);

/// Keeps the progress thread parked while a caller drives the connections, and for
/// [`progress::QUIET`] after.
struct Driving<'a>(&'a Shared);
impl Drop for Driving<'_> {
    fn drop(&mut self) {
        self.0.last_drive_us.store(self.0.epoch.elapsed().as_micros() as u64, Ordering::Release);
        self.0.drivers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl TcpFabric {
    /// Wait until `check` has a result, driving every connection from this thread meanwhile
    /// (as MPI's progress engine does): a frame lands in its posted buffer right when this
    /// thread reads it, with no hop through the progress thread (a wake-up on each side per
    /// message). Busy-polls first (adaptive, [`spin_max`]), then yields, then blocks in
    /// `poll` on the connections (woken by the next byte), at most [`MAX_BLOCK`] at a time.
    fn wait_driving<T>(&self, peer: usize, w: &Wait, mut check: impl FnMut() -> Option<Result<T>>) -> Result<T> {
        self.sh.drivers.fetch_add(1, Ordering::AcqRel);
        let _driving = Driving(&self.sh);
        let spin_for = self.sh.spin.begin();
        let mut start = Instant::now();
        let mut block = Duration::from_micros(20);
        let mut yielded: Option<Duration> = None;
        loop {
            let moved = self.sh.pass(Runner::Caller, Duration::ZERO);
            let done = check();
            if let Some(took) = yielded.take() {
                self.sh.spin.after_yield(took, done.is_some() || moved);
            }
            if let Some(r) = done {
                return r;
            }
            if let Some(e) = self.sh.mb.lock().dead.get(&peer) {
                return Err(e.clone().with_op(w.op));
            }
            let now = Instant::now();
            if now >= w.deadline() {
                return Err(Error::Timeout { op: w.op, peer, timeout: w.timeout });
            }
            if moved {
                start = now;
                block = Duration::from_micros(20);
                continue;
            }
            let waited = now - start;
            if waited < spin_for {
                std::hint::spin_loop();
            } else if waited < spin_for + YIELD_FOR {
                let t0 = Instant::now();
                std::thread::yield_now();
                yielded = Some(t0.elapsed());
            } else {
                // Counted as blocked before the last look (see `Shared::blocked`).
                self.sh.blocked.fetch_add(1, Ordering::SeqCst);
                let done = check();
                if done.is_none() {
                    self.sh.pass(Runner::Caller, block.min(w.deadline() - now));
                }
                self.sh.blocked.fetch_sub(1, Ordering::SeqCst);
                if let Some(r) = done {
                    return r;
                }
                block = (block * 2).min(MAX_BLOCK);
            }
        }
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

/// The largest socket buffer `EMBER_TCP_SOCKBUF` may ask for (the kernel caps it further at
/// `net.core.wmem_max` / `rmem_max`).
const MAX_SOCKBUF: u64 = 1 << 30;

/// Socket buffer size asked for on every mesh connection (loopback and LAN alike), from
/// `EMBER_TCP_SOCKBUF` (`v`, the variable's value): bytes, 0 = leave it to the kernel's
/// autotuning, at most [`MAX_SOCKBUF`]; default 4 MiB. Another value is an error naming the
/// variable.
fn parse_sockbuf(v: Option<std::ffi::OsString>) -> Result<libc::c_int> {
    Ok(crate::env::number("EMBER_TCP_SOCKBUF", v, 4 << 20, 0..=MAX_SOCKBUF, "bytes")? as libc::c_int)
}

/// The congestion control asked for by `EMBER_TCP_CONGESTION` (`v`, the variable's value):
/// `None` when unset (then [`congestion_for`] chooses), `Some("")` for `system` (every
/// connection keeps the system's), else the name, checked against the kernel's limit
/// (`TCP_CA_NAME_MAX`, 16 bytes with its NUL).
fn parse_congestion(v: Option<std::ffi::OsString>) -> Result<Option<String>> {
    let Some(v) = v else { return Ok(None) };
    let Ok(v) = v.into_string() else { return Err(Error::Bootstrap("EMBER_TCP_CONGESTION is not valid UTF-8".into())) };
    match v {
        v if v == "system" => Ok(Some(String::new())),
        v if v.is_empty() || v.len() > 15 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') => Err(Error::Bootstrap(format!(
            "EMBER_TCP_CONGESTION={v:?}: not a congestion control name (1 to 15 letters, digits, '_' or '-'; or `system`)"
        ))),
        v => Ok(Some(v)),
    }
}

/// The congestion control a connection runs, `None` for the system's (`net.ipv4.tcp_congestion_control`):
/// the one `EMBER_TCP_CONGESTION` names, else Reno for a connection whose two ends are on this
/// host. A same-host connection crosses no network for congestion control to share fairly, and
/// a pacing one there hurts: BBR (a common default) paces from a kernel timer without the `fq`
/// qdisc, so on loopback a message longer than the congestion window leaves partly from the
/// timer's CPU and partly from the CPU taking the acknowledgements, the two arrive out of
/// order, and the receiver's reordering and duplicate segments cost a 1 MiB ping-pong on two
/// cores about twice its time (`ss -ti`: `reord_seen`, `dsack_dups`; `nstat`: `TcpExtTCPOFOQueue`).
fn congestion_for(s: &TcpStream, env: Option<&str>) -> Option<String> {
    match env {
        Some("") => None,
        Some(v) => Some(v.to_string()),
        None => {
            let (a, b) = (s.local_addr().ok()?.ip(), s.peer_addr().ok()?.ip());
            (b.is_loopback() || a == b).then(|| "reno".to_string())
        }
    }
}

/// Per-connection options: no Nagle, socket buffers (`sockbuf` bytes as [`parse_sockbuf`]
/// returned it, 0: the kernel's autotuning), the congestion
/// control ([`congestion_for`], `env` as [`parse_congestion`] returned it; a name the kernel
/// refuses is an error when the user named it, and leaves the system's otherwise), and the dead-peer detection: keepalive probes after
/// `timeout / 2` idle (1..=60 s), every `timeout / 6` (1..=10 s), and `TCP_USER_TIMEOUT` =
/// `timeout` (data unacknowledged that long, or probes unanswered, end the connection).
fn tune(s: &TcpStream, timeout: Duration, env: Option<&str>, sockbuf: libc::c_int) -> Result<()> {
    use std::os::fd::AsRawFd;
    s.set_nodelay(true).ok();
    let set_bytes = |level: libc::c_int, opt: libc::c_int, v: &[u8]| {
        // SAFETY: setsockopt reading `v.len()` bytes from a live slice, on a socket we own.
        let r = unsafe { libc::setsockopt(s.as_raw_fd(), level, opt, v.as_ptr() as *const libc::c_void, v.len() as libc::socklen_t) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let set = |level: libc::c_int, opt: libc::c_int, v: libc::c_int| {
        let _ = set_bytes(level, opt, &v.to_ne_bytes());
    };
    let secs = timeout.as_secs().clamp(1, 3600) as libc::c_int;
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, (secs / 2).clamp(1, 60));
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, (secs / 6).clamp(1, 10));
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
    set(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT, timeout.as_millis().clamp(1, i32::MAX as u128) as libc::c_int);
    if sockbuf > 0 {
        set(libc::SOL_SOCKET, libc::SO_SNDBUF, sockbuf);
        set(libc::SOL_SOCKET, libc::SO_RCVBUF, sockbuf);
    }
    if let Some(cc) = congestion_for(s, env) {
        if let Err(e) = set_bytes(libc::IPPROTO_TCP, libc::TCP_CONGESTION, cc.as_bytes()) {
            if env.is_some() {
                let hint = "see net.ipv4.tcp_allowed_congestion_control";
                return Err(Error::Bootstrap(format!("EMBER_TCP_CONGESTION={cc}: the kernel refused it on the tcp mesh ({e}; {hint})")));
            }
            tracing::debug!("tcp: congestion control {cc} refused ({e}); keeping the system's");
        }
    }
    Ok(())
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
        self.sh.mb.post(src, tag, buf, len, w.op)?;
        if self.sh.held[src].load(Ordering::Acquire) {
            // The held frame may be this one, or in front of it: whoever polls looks again.
            self.sh.wake();
            if self.sh.blocked.load(Ordering::SeqCst) > 0 {
                progress::signal(std::os::fd::AsRawFd::as_raw_fd(&self.sh.cfd));
            }
        }
        Ok(())
    }

    /// Writes the frame from the caller's thread as far as the socket takes it (header and
    /// payload in one `sendmsg`); the rest is queued for the progress thread.
    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        use std::os::fd::AsRawFd;
        if let Some(e) = self.sh.mb.lock().dead.get(&dst) {
            return Err(e.clone().with_op(w.op));
        }
        let mut job = Job::new(tag, data, len);
        let mut q = self.sh.queue(dst);
        if q.is_empty() {
            let fd = self.sh.streams[dst].as_ref().unwrap().as_raw_fd();
            match job.push(fd) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    // Not the broken pipe: what broke it (see `send_failed`).
                    drop(q);
                    return Err(self.sh.send_failed(dst, e).with_op(w.op));
                }
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
        let r = self.wait_driving(dst, w, || if queued(&self.sh.queue(dst)) { None } else { Some(Ok(())) });
        if r.is_err() {
            // The caller may free the buffer now.
            self.sh.withdraw(dst, tag);
        }
        r
    }

    fn wait_recv(&self, src: usize, tag: Tag, w: &Wait) -> Result<usize> {
        let key = (src, tag, Dir::Recv);
        self.wait_driving(src, w, || {
            let mut t = self.sh.mb.lock();
            match t.map.get(&key) {
                Some(Slot::Done(n)) => {
                    let n = *n;
                    t.map.remove(&key);
                    Some(Ok(n))
                }
                Some(Slot::Failed(e)) => {
                    let e = e.clone();
                    t.map.remove(&key);
                    Some(Err(e))
                }
                _ => None,
            }
        })
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
