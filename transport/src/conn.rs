//! Bootstrap connections (the rendezvous and the TCP mesh handshake): blocking socket I/O under
//! one deadline per connection, and serving incoming connections concurrently, each handshake on
//! its own thread under the caller's overall deadline, so that a slow or silent client holds
//! nothing but its own thread and is cut off when the others are done.
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Handshakes served at once; a connection beyond this is closed at once.
pub(crate) const MAX_PENDING: usize = 128;
/// The longest one incoming connection may take for its handshake.
pub(crate) const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// Largest length-prefixed field read from a peer.
pub const MAX_FIELD: usize = 1 << 16;

/// A blocking connection whose every read and write ends by `deadline`.
pub(crate) struct Conn {
    pub s: TcpStream,
    pub deadline: Instant,
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "deadline passed")
}

impl Conn {
    pub fn new(s: TcpStream, deadline: Instant) -> std::io::Result<Conn> {
        s.set_nonblocking(false)?;
        s.set_nodelay(true)?;
        Ok(Conn { s, deadline })
    }

    fn left(&self) -> std::io::Result<Duration> {
        let d = self.deadline.saturating_duration_since(Instant::now());
        if d.is_zero() {
            return Err(timed_out());
        }
        Ok(d)
    }

    pub fn read_exact(&mut self, mut buf: &mut [u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            self.s.set_read_timeout(Some(self.left()?))?;
            match self.s.read(buf) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    self.left()?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            self.s.set_write_timeout(Some(self.left()?))?;
            match self.s.write(buf) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    self.left()?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A field: 4-byte little-endian length, then the bytes.
    pub fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        let mut v = Vec::with_capacity(4 + b.len());
        v.extend_from_slice(&(b.len() as u32).to_le_bytes());
        v.extend_from_slice(b);
        self.write_all(&v)
    }

    /// A field of at most [`MAX_FIELD`] bytes (checked before anything is allocated).
    pub fn get(&mut self) -> std::io::Result<Vec<u8>> {
        let mut l = [0u8; 4];
        self.read_exact(&mut l)?;
        let l = field_len(l)?;
        let mut v = vec![0u8; l];
        self.read_exact(&mut v)?;
        Ok(v)
    }
}

/// A field's length prefix, checked against [`MAX_FIELD`] before anything is allocated.
pub fn field_len(l: [u8; 4]) -> std::io::Result<usize> {
    let l = u32::from_le_bytes(l) as usize;
    if l > MAX_FIELD {
        return Err(std::io::Error::other(format!("field of {l} bytes exceeds the {MAX_FIELD}-byte limit")));
    }
    Ok(l)
}

/// Accept connections on `l` until `take` says the caller has all it needs, until `deadline`
/// (`Err` of kind `TimedOut`), or until `stop` is set (`Err` of kind `Interrupted`). Each connection runs `handshake` on its own thread (at most [`MAX_PENDING`] at
/// once), under its own deadline of at most [`HANDSHAKE_LIMIT`]; `take` gets the successful
/// ones in the order they finish and returns true when done. Failed handshakes are logged and
/// dropped. Handshakes still running at the end are cut off (their sockets shut down).
pub(crate) fn serve<T: Send>(
    l: &TcpListener,
    deadline: Instant,
    what: &str,
    stop: &std::sync::atomic::AtomicBool,
    handshake: impl Fn(Conn) -> Result<T, String> + Sync,
    mut take: impl FnMut(T) -> bool,
) -> Result<(), std::io::Error> {
    l.set_nonblocking(true)?;
    std::thread::scope(|sc| {
        let (tx, rx) = mpsc::channel::<(u64, Result<T, String>)>();
        let mut pending: Vec<(u64, TcpStream)> = Vec::new();
        let mut next = 0u64;
        let handshake = &handshake;
        let result = loop {
            loop {
                match l.accept() {
                    Ok((s, from)) => {
                        if pending.len() >= MAX_PENDING {
                            tracing::warn!("{what}: {MAX_PENDING} handshakes in progress, closing the connection from {from}");
                            continue;
                        }
                        let Ok(keep) = s.try_clone() else { continue };
                        let id = next;
                        next += 1;
                        pending.push((id, keep));
                        let tx = tx.clone();
                        let d = deadline.min(Instant::now() + HANDSHAKE_LIMIT);
                        sc.spawn(move || {
                            let r = Conn::new(s, d).map_err(|e| e.to_string()).and_then(handshake);
                            let _ = tx.send((id, r.map_err(|e| format!("{e} (connection from {from})"))));
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok((id, r)) => {
                    pending.retain(|(i, _)| *i != id);
                    match r {
                        Ok(t) => {
                            if take(t) {
                                break Ok(());
                            }
                        }
                        Err(e) => tracing::warn!("{what}: refused a connection: {e}"),
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => unreachable!("the loop holds a sender"),
            }
            if Instant::now() >= deadline {
                break Err(timed_out());
            }
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break Err(std::io::ErrorKind::Interrupted.into());
            }
        };
        for (_, s) in &pending {
            let _ = s.shutdown(Shutdown::Both);
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_sending_one_byte_at_a_time_does_not_hold_the_others() {
        // A slow client connects first and trickles bytes; two honest clients follow. All are
        // served at once: the honest ones finish long before the slow one's handshake limit.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let slow = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            for _ in 0..40 {
                if s.write_all(&[0]).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        std::thread::sleep(Duration::from_millis(50));
        let honest: Vec<_> = (0..2u8)
            .map(|i| {
                std::thread::spawn(move || {
                    let mut c = Conn::new(TcpStream::connect(addr).unwrap(), Instant::now() + Duration::from_secs(5)).unwrap();
                    c.put(&[i; 8]).unwrap();
                })
            })
            .collect();
        let t0 = Instant::now();
        let mut got = Vec::new();
        serve(&l, Instant::now() + Duration::from_secs(5), "test", &Default::default(), |mut c| c.get().map_err(|e| e.to_string()), |v| {
            got.push(v);
            got.len() == 2
        })
        .unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "served after {:?}", t0.elapsed());
        got.sort();
        assert_eq!(got, vec![vec![0u8; 8], vec![1u8; 8]]);
        for h in honest {
            h.join().unwrap();
        }
        slow.join().unwrap();
    }

    #[test]
    fn the_deadline_bounds_a_silent_client() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let _silent = TcpStream::connect(addr).unwrap();
        let t0 = Instant::now();
        let r = serve(&l, Instant::now() + Duration::from_millis(300), "test", &Default::default(), |mut c| c.get().map_err(|e| e.to_string()), |_| true);
        assert!(r.is_err());
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    }
}
