//! The job token: drawing a fresh one ([`new_token`]), and proving knowledge of it without
//! sending it: a mutual HMAC-SHA256
//! challenge-response at the start of every bootstrap connection (the rendezvous and each TCP
//! mesh connection). Each side draws a fresh 32-byte nonce; the server proves first (so a process
//! that merely answers the port learns nothing but the client's nonce), then the client. The
//! proofs cover the purpose of the connection and the client's hello (its claimed rank), under
//! different labels for the two directions, so no proof can be replayed, reflected or moved to
//! another rank. Proofs are compared in constant time (`Mac::verify_slice`).
use crate::conn::Conn;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 8] = b"EMBRAUT1";
const NONCE: usize = 32;
const PROOF: usize = 32;
/// Longest hello a client may attach.
pub const MAX_HELLO: usize = 256;

/// Why a handshake failed.
#[derive(Debug)]
pub(crate) enum AuthError {
    /// The other side does not know the token (or sent a malformed handshake).
    Refused(String),
    /// The connection failed (closed, timed out).
    Io(std::io::Error),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Refused(s) => f.write_str(s),
            AuthError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl From<std::io::Error> for AuthError {
    fn from(e: std::io::Error) -> Self {
        AuthError::Io(e)
    }
}

/// A random job token (for launchers and tests): 128 bits from the OS.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    if let Err(e) = random(&mut b) {
        tracing::warn!("no random source ({e}): the job token is derived from the clock and the process id");
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b.copy_from_slice(&(t ^ std::process::id() as u128).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Fill `buf` from the kernel's random source (getrandom, else /dev/urandom).
pub(crate) fn random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: writes at most `buf.len() - done` bytes into our buffer.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr() as *mut libc::c_void, buf.len() - done, 0) };
        if n > 0 {
            done += n as usize;
            continue;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        use std::io::Read;
        return std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf[done..]));
    }
    Ok(())
}

fn proof(token: &str, label: &[u8], purpose: &[u8], hello: &[u8], nc: &[u8], ns: &[u8]) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes a key of any length");
    for part in [label, purpose, hello, nc, ns] {
        m.update(&(part.len() as u32).to_le_bytes());
        m.update(part);
    }
    m
}

/// Bytes of the start of a client's first message: the magic and the hello's length.
pub const HELLO_HEADER: usize = 10;

/// The start of a client's first message, as the server checks it before reading on: Ember's
/// magic, and the length of the hello that follows (at most [`MAX_HELLO`]).
pub fn hello_len(h: &[u8; HELLO_HEADER]) -> Result<usize, String> {
    if &h[..8] != MAGIC {
        return Err("not Ember's handshake".into());
    }
    let hl = u16::from_le_bytes([h[8], h[9]]) as usize;
    if hl > MAX_HELLO {
        return Err(format!("hello of {hl} bytes (at most {MAX_HELLO})"));
    }
    Ok(hl)
}

/// Client side: send `hello` (at most [`MAX_HELLO`] bytes), check the server's proof, prove
/// ours, and read the server's verdict.
pub(crate) fn client(c: &mut Conn, token: &str, purpose: &[u8], hello: &[u8]) -> Result<(), AuthError> {
    assert!(hello.len() <= MAX_HELLO, "hello of {} bytes", hello.len());
    let mut nc = [0u8; NONCE];
    random(&mut nc)?;
    let mut m = MAGIC.to_vec();
    m.extend_from_slice(&(hello.len() as u16).to_le_bytes());
    m.extend_from_slice(hello);
    m.extend_from_slice(&nc);
    c.write_all(&m)?;
    let mut r = [0u8; 8 + NONCE + PROOF];
    c.read_exact(&mut r)?;
    if &r[..8] != MAGIC {
        return Err(AuthError::Refused("the other side does not speak Ember's handshake".into()));
    }
    let ns = &r[8..8 + NONCE];
    if proof(token, b"server", purpose, hello, &nc, ns).verify_slice(&r[8 + NONCE..]).is_err() {
        return Err(AuthError::Refused("the process that answered does not know the job token".into()));
    }
    c.write_all(&proof(token, b"client", purpose, hello, &nc, ns).finalize().into_bytes())?;
    let mut verdict = [0u8; 1];
    c.read_exact(&mut verdict)?;
    match verdict[0] {
        0 => Ok(()),
        1 => Err(AuthError::Refused("wrong job token (the other side refused our proof)".into())),
        _ => Err(AuthError::Refused(String::from_utf8_lossy(&c.get()?).into_owned())),
    }
}

/// Server side: read the client's hello, prove the token, check the client's proof, then the
/// hello itself (`check`: `Err(why)` refuses it, and the client is told why); returns the hello,
/// authenticated (covered by the client's proof).
pub(crate) fn server(c: &mut Conn, token: &str, purpose: &[u8], check: impl FnOnce(&[u8]) -> Result<(), String>) -> Result<Vec<u8>, AuthError> {
    let mut h = [0u8; HELLO_HEADER];
    c.read_exact(&mut h)?;
    let hl = hello_len(&h).map_err(AuthError::Refused)?;
    let mut hello = vec![0u8; hl + NONCE];
    c.read_exact(&mut hello)?;
    let nc = hello.split_off(hl);
    let mut ns = [0u8; NONCE];
    random(&mut ns)?;
    let mut m = MAGIC.to_vec();
    m.extend_from_slice(&ns);
    m.extend_from_slice(&proof(token, b"server", purpose, &hello, &nc, &ns).finalize().into_bytes());
    c.write_all(&m)?;
    let mut pc = [0u8; PROOF];
    c.read_exact(&mut pc)?;
    if proof(token, b"client", purpose, &hello, &nc, &ns).verify_slice(&pc).is_err() {
        let _ = c.write_all(&[1]);
        return Err(AuthError::Refused("wrong job token".into()));
    }
    if let Err(why) = check(&hello) {
        let _ = c.write_all(&[2]).and_then(|_| c.put(why.as_bytes()));
        return Err(AuthError::Refused(why));
    }
    c.write_all(&[0])?;
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    fn pair() -> (Conn, Conn) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let d = Instant::now() + Duration::from_secs(5);
        (Conn::new(a, d).unwrap(), Conn::new(b, d).unwrap())
    }

    #[test]
    fn both_sides_prove_the_token_and_the_token_never_travels() {
        let (mut a, mut b) = pair();
        let tok = "s3cr3t-job-token-0123456789abcdef";
        let h = std::thread::spawn(move || server(&mut b, tok, b"test", |_| Ok(())).map(|hello| (hello, b)));
        client(&mut a, tok, b"test", b"rank 3").unwrap();
        let (hello, _b) = h.join().unwrap().unwrap();
        assert_eq!(hello, b"rank 3");
    }

    #[test]
    fn a_wrong_token_is_refused_on_both_sides() {
        let (mut a, mut b) = pair();
        let h = std::thread::spawn(move || server(&mut b, "right", b"test", |_| Ok(())));
        let e = client(&mut a, "wrong", b"test", b"").unwrap_err();
        assert!(matches!(&e, AuthError::Refused(s) if s.contains("does not know")), "{e}");
        drop(a);
        assert!(h.join().unwrap().is_err());
        // A client with the right token and a server with a wrong one: the client refuses.
        let (mut a, mut b) = pair();
        let h = std::thread::spawn(move || server(&mut b, "wrong", b"test", |_| Ok(())));
        assert!(matches!(client(&mut a, "right", b"test", b""), Err(AuthError::Refused(_))));
        drop(a);
        assert!(h.join().unwrap().is_err());
        // Another purpose is another proof.
        let (mut a, mut b) = pair();
        let h = std::thread::spawn(move || server(&mut b, "tok", b"mesh", |_| Ok(())));
        assert!(matches!(client(&mut a, "tok", b"rendezvous", b""), Err(AuthError::Refused(_))));
        drop(a);
        assert!(h.join().unwrap().is_err());
    }

    #[test]
    fn the_token_is_not_on_the_wire() {
        // A raw client that records what the server sends: neither the token nor anything
        // containing it comes back; the server's first answer is a fixed-size proof.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let tok = "the-token-itself";
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut c = Conn::new(s, Instant::now() + Duration::from_secs(5)).unwrap();
            server(&mut c, tok, b"test", |_| Ok(()))
        });
        let mut s = TcpStream::connect(addr).unwrap();
        let mut hello = MAGIC.to_vec();
        hello.extend_from_slice(&0u16.to_le_bytes());
        hello.extend_from_slice(&[7u8; NONCE]);
        s.write_all(&hello).unwrap();
        let mut got = vec![0u8; 8 + NONCE + PROOF];
        s.read_exact(&mut got).unwrap();
        assert!(!got.windows(tok.len()).any(|w| w == tok.as_bytes()));
        s.write_all(&[0u8; PROOF]).unwrap(); // a forged proof
        let mut verdict = [9u8; 1];
        s.read_exact(&mut verdict).unwrap();
        assert_eq!(verdict, [1]);
        assert!(matches!(h.join().unwrap(), Err(AuthError::Refused(_))));
    }

    #[test]
    fn a_refused_hello_tells_the_client_why() {
        let (mut a, mut b) = pair();
        let h = std::thread::spawn(move || server(&mut b, "tok", b"test", |h| if h == b"rank 9" { Err("no rank 9 here".into()) } else { Ok(()) }));
        let e = client(&mut a, "tok", b"test", b"rank 9").unwrap_err();
        assert!(matches!(&e, AuthError::Refused(s) if s == "no rank 9 here"), "{e}");
        assert!(h.join().unwrap().is_err());
    }

    #[test]
    fn an_oversized_hello_is_refused_before_allocating() {
        let (mut a, mut b) = pair();
        let mut m = MAGIC.to_vec();
        m.extend_from_slice(&u16::MAX.to_le_bytes());
        a.write_all(&m).unwrap();
        assert!(matches!(server(&mut b, "t", b"test", |_| Ok(())), Err(AuthError::Refused(s)) if s.contains("hello")));
    }
}
