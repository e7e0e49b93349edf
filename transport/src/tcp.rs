//! TCP backend for ranks on several hosts: a full mesh of connections, one reader thread per
//! peer that lands each frame straight into the posted buffer (or keeps it until posted).
//! Frames are length-checked against the posted buffer before any byte is read into it.
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use crate::mailbox::{Dir, Mailbox};
use bytemuck::{Pod, Zeroable};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
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
    mb: Arc<Mailbox>,
    writers: Vec<Option<Mutex<TcpStream>>>,
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
        let mut writers = Vec::with_capacity(size);
        for (p, s) in streams.into_iter().enumerate() {
            match s {
                None => writers.push(None),
                Some(s) => {
                    tune(&s);
                    let r = s.try_clone().map_err(|e| Error::Bootstrap(e.to_string()))?;
                    let mb = mb.clone();
                    std::thread::Builder::new()
                        .name(format!("ember-tcp-rx{p}"))
                        .spawn(move || reader(p, r, mb))
                        .map_err(|e| Error::Bootstrap(e.to_string()))?;
                    writers.push(Some(Mutex::new(s)));
                }
            }
        }
        Ok(TcpFabric { rank, size, mb, writers })
    }
}

/// Staging buffer of a reader: small frames (header and payload) arrive many per `read`.
const STAGE: usize = 256 << 10;
/// Payload remainders at least this long are read straight into their destination.
const DIRECT: usize = 32 << 10;

/// Fill `dst` from the staged bytes `st[*lo..*hi]` first, then from the socket (large
/// remainders straight into `dst`, small ones through the staging buffer).
fn fill(s: &mut TcpStream, st: &mut [u8], lo: &mut usize, hi: &mut usize, dst: &mut [u8]) -> std::io::Result<()> {
    let mut got = (*hi - *lo).min(dst.len());
    dst[..got].copy_from_slice(&st[*lo..*lo + got]);
    *lo += got;
    while got < dst.len() {
        let rem = dst.len() - got;
        let n = if rem >= DIRECT {
            let n = s.read(&mut dst[got..])?;
            got += n;
            n
        } else {
            let n = s.read(st)?;
            let take = n.min(rem);
            dst[got..got + take].copy_from_slice(&st[..take]);
            got += take;
            (*lo, *hi) = (take, n);
            n
        };
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

/// Per-peer receive loop; ends when the connection closes or sends a malformed frame.
fn reader(peer: usize, mut s: TcpStream, mb: Arc<Mailbox>) {
    let mut st = vec![0u8; STAGE];
    let (mut lo, mut hi) = (0usize, 0usize);
    let hdr = std::mem::size_of::<Frame>();
    let why = loop {
        let mut f = Frame::zeroed();
        if let Err(e) = fill(&mut s, &mut st, &mut lo, &mut hi, bytemuck::bytes_of_mut(&mut f)) {
            break format!("connection lost ({e})");
        }
        debug_assert!(hdr == 32);
        if f.magic != MAGIC {
            break format!("malformed frame (bad magic {:#x})", f.magic);
        }
        let tag = Tag { ctx: f.ctx, seq: f.seq, round: f.round };
        let claimed = {
            let mut t = mb.lock();
            Mailbox::claim(&mut t, peer, tag, f.len as usize, "tcp receive")
        };
        match claimed {
            Ok(Some(buf)) => {
                // SAFETY: claim checked len <= the posted capacity; the slot stays `Writing`
                // (so the buffer stays alive) until we complete or fail it.
                let dst = unsafe { std::slice::from_raw_parts_mut(buf.0, f.len as usize) };
                if let Err(e) = fill(&mut s, &mut st, &mut lo, &mut hi, dst) {
                    let reason = format!("connection lost mid-message ({e})");
                    mb.fail(peer, tag, Dir::Recv, Error::PeerFailed { op: "tcp receive", peer, reason: reason.clone() });
                    break reason;
                }
                mb.complete(peer, tag, Dir::Recv, f.len as usize);
            }
            Ok(None) if f.len <= MAX_EARLY => {
                let mut v = vec![0u8; f.len as usize];
                if let Err(e) = fill(&mut s, &mut st, &mut lo, &mut hi, &mut v) {
                    break format!("connection lost mid-message ({e})");
                }
                let _ = mb.deliver(peer, tag, v, "tcp receive");
            }
            Ok(None) => break format!("malformed frame: length {} exceeds the limit", f.len),
            Err(e) => {
                // The slot holds the error; the stream can no longer be trusted.
                mb.notify();
                break e.to_string();
            }
        }
    };
    let _ = s.shutdown(Shutdown::Both);
    mb.peer_died(peer, why);
}

/// Socket buffer size asked for on every mesh connection (loopback and LAN alike).
const SOCK_BUF: libc::c_int = 4 << 20;

fn tune(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    s.set_nodelay(true).ok();
    for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt with a c_int value on a socket we own.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &SOCK_BUF as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Header and payload in one `writev` (one segment for small messages), looping on short writes.
fn write_frame(s: &mut TcpStream, head: &[u8], data: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (mut h, mut d) = (head, data);
    while !h.is_empty() || !d.is_empty() {
        let iov = [
            libc::iovec { iov_base: h.as_ptr() as *mut libc::c_void, iov_len: h.len() },
            libc::iovec { iov_base: d.as_ptr() as *mut libc::c_void, iov_len: d.len() },
        ];
        // SAFETY: both iovecs describe live slices.
        let n = unsafe { libc::writev(s.as_raw_fd(), iov.as_ptr(), 2) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut n = n as usize;
        let a = n.min(h.len());
        h = &h[a..];
        n -= a;
        d = &d[n..];
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
        self.mb.post(src, tag, buf, len, w.op).map(|_| ())
    }

    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        if let Some(r) = self.mb.lock().dead.get(&dst) {
            return Err(Error::PeerFailed { op: w.op, peer: dst, reason: r.clone() });
        }
        let f = Frame { magic: MAGIC, round: tag.round, ctx: tag.ctx, seq: tag.seq, len: len as u64 };
        let mut s = self.writers[dst].as_ref().expect("never sends to self").lock().unwrap_or_else(|e| e.into_inner());
        s.set_write_timeout(Some(w.deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))).ok();
        let io = |e: std::io::Error| Error::Io { op: w.op, peer: dst, detail: e.to_string() };
        write_frame(&mut s, bytemuck::bytes_of(&f), std::slice::from_raw_parts(data, len)).map_err(io)?;
        Ok(())
    }

    fn wait_send(&self, _dst: usize, _tag: Tag, _w: &Wait) -> Result<()> {
        Ok(()) // the bytes are in the kernel once `send` returned
    }

    fn wait_recv(&self, src: usize, tag: Tag, w: &Wait) -> Result<usize> {
        self.mb.wait_done(src, tag, Dir::Recv, w, &|| Ok(()))
    }

    fn cancel_recv(&self, src: usize, tag: Tag) {
        self.mb.cancel(src, tag)
    }
}

impl Drop for TcpFabric {
    fn drop(&mut self) {
        for s in self.writers.iter().flatten() {
            let _ = s.lock().unwrap_or_else(|e| e.into_inner()).shutdown(Shutdown::Both);
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
