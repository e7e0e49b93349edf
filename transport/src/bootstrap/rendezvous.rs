//! The rendezvous: how the ranks of a job find each other. Rank 0 listens (on the address, or
//! writing its address to a file: [`Rendezvous`]); every other rank connects, proves the job
//! token ([`crate::auth`]) over a hello of its rank and size ([`check_hello`]), and sends its
//! [`Entry`] (host, pid, TCP address, shm inbox). A wrong token, rank or size is refused with a
//! message. Once all have joined, rank 0 sends everyone the full table of entries.
use super::config::{euid, parse, JoinConfig, Rendezvous};
use crate::conn::Conn;
use crate::error::{Error, Result};
use std::io::Write;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// What the rendezvous proofs cover (docs/security.md).
const RDV_PURPOSE: &[u8] = b"ember rendezvous v1";

/// The address to listen on: loopback when the rendezvous is a loopback address (every rank is
/// on this host: `ember launch`), else every interface.
pub(crate) fn listen_ip(rv: &Rendezvous) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv4Addr};
    let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let Rendezvous::Addr(a) = rv else { return any };
    let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return IpAddr::V4(Ipv4Addr::LOCALHOST);
    }
    match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => ip,
        _ => any,
    }
}

/// This host's name (the entries of ranks on one host carry the same one).
pub(crate) fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: gethostname writes at most b.len() bytes.
    unsafe { libc::gethostname(b.as_mut_ptr() as *mut libc::c_char, b.len()) };
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// One rank's entry in the table: host, pid, TCP address, shm inbox path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    pub host: String,
    pub pid: u32,
    /// `ip:port` of its TCP listener (empty: none).
    pub tcp: String,
    /// Path of its shm inbox (empty: none).
    pub shm: String,
}

impl Entry {
    /// The four fields, newline-separated.
    pub fn encode(&self) -> Vec<u8> {
        format!("{}\n{}\n{}\n{}", self.host, self.pid, self.tcp, self.shm).into_bytes()
    }
    /// Decode an entry a peer sent (rank 0's table, or a joining rank's own): anything but four
    /// newline-separated fields with a numeric pid is an error.
    pub fn decode(b: &[u8]) -> Result<Entry> {
        let s = String::from_utf8_lossy(b);
        let f: Vec<&str> = s.split('\n').collect();
        if f.len() != 4 {
            return Err(Error::Bootstrap("malformed rendezvous entry".into()));
        }
        Ok(Entry { host: f[0].into(), pid: parse("pid", f[1])?, tcp: f[2].into(), shm: f[3].into() })
    }
}

/// The rendezvous address, and (job file) the token rank 0 wrote next to it. `Ok(None)`: not
/// there yet. A job file that exists but is not ours alone is an error naming it.
fn resolve_rendezvous(rv: &Rendezvous) -> Result<Option<(String, Option<String>)>> {
    Ok(match rv {
        Rendezvous::Addr(a) => Some((a.clone(), None)),
        Rendezvous::File(p) => std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).map(|a| (a, None)),
        Rendezvous::JobFile(p) => {
            use std::os::unix::fs::MetadataExt;
            let Ok(m) = std::fs::symlink_metadata(p) else { return Ok(None) };
            // Only a regular file of ours, readable by us alone, is trusted to carry the token.
            if !m.file_type().is_file() || m.uid() != euid() || m.mode() & 0o077 != 0 {
                return Err(Error::Bootstrap(format!(
                    "job file {} is held by someone else (owner uid {}, mode {:o}; expected a file of uid {} with mode 0600): remove it or set EMBER_RENDEZVOUS_DIR",
                    p.display(),
                    m.uid(),
                    m.mode() & 0o7777,
                    euid()
                )));
            }
            let Ok(s) = std::fs::read_to_string(p) else { return Ok(None) };
            let mut l = s.lines();
            match (l.next().map(str::trim), l.next().map(str::trim)) {
                (Some(a), Some(t)) if !a.is_empty() && !t.is_empty() => Some((a.to_string(), Some(t.to_string()))),
                _ => None,
            }
        }
    })
}

/// Make sure `dir` is a directory only this user can write: create it 0700 when missing, then
/// check owner and mode (no symlink, owned by this user, no group or other access).
pub(crate) fn private_dir(dir: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::Bootstrap(format!("job file directory {}: {e}", dir.display()))),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| Error::Bootstrap(format!("job file directory {}: {e}", dir.display())))?;
    if !m.file_type().is_dir() || m.uid() != euid() || m.mode() & 0o077 != 0 {
        return Err(Error::Bootstrap(format!(
            "job file directory {} is not private to this user (owner uid {}, mode {:o}; expected a directory of uid {} with mode 0700): remove it, or set EMBER_RENDEZVOUS_DIR",
            dir.display(),
            m.uid(),
            m.mode() & 0o7777,
            euid()
        )));
    }
    Ok(())
}

/// A joining rank's hello: its rank and the job size, little-endian u32 each (covered by its
/// token proof).
pub fn hello(rank: usize, size: usize) -> Vec<u8> {
    let mut v = (rank as u32).to_le_bytes().to_vec();
    v.extend_from_slice(&(size as u32).to_le_bytes());
    v
}

/// Rank 0's check of a hello: `Ok(rank)` when it is 8 bytes naming a rank `1..size` of a job of
/// `size` ranks, else why not.
pub fn check_hello(h: &[u8], size: usize) -> std::result::Result<usize, String> {
    match h {
        [a, b, c, d, e, f, g, i] => {
            let (r, n) = (u32::from_le_bytes([*a, *b, *c, *d]) as usize, u32::from_le_bytes([*e, *f, *g, *i]) as usize);
            match n == size && r != 0 && r < n {
                true => Ok(r),
                false => Err(format!("rank {r} of {n} does not fit this job of {size} ranks")),
            }
        }
        _ => Err("malformed hello".to_string()),
    }
}

/// Rank 0: accept every other rank (concurrently, under the job's deadline), check its proof of
/// the token, answer with the table.
pub(crate) fn serve(cfg: &JoinConfig, me: &mut Entry, adv_ip: &mut Option<String>) -> Result<Vec<Entry>> {
    let port = match &cfg.rendezvous {
        Rendezvous::Addr(a) => {
            let p = a.rsplit(':').next().unwrap_or("");
            p.parse::<u16>().map_err(|_| Error::Bootstrap(format!("rendezvous address {a:?} has no valid port")))?
        }
        Rendezvous::File(_) | Rendezvous::JobFile(_) => 0,
    };
    let bind = std::net::SocketAddr::new(listen_ip(&cfg.rendezvous), port);
    let l = TcpListener::bind(bind).map_err(|e| Error::Bootstrap(format!("rendezvous: bind {bind}: {e}")))?;
    if let Rendezvous::File(p) | Rendezvous::JobFile(p) = &cfg.rendezvous {
        use std::os::unix::fs::OpenOptionsExt;
        if matches!(cfg.rendezvous, Rendezvous::JobFile(_)) {
            if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                private_dir(d)?;
            }
            resolve_rendezvous(&cfg.rendezvous)?; // a file there that is not ours: fail naming it
        }
        let port = l.local_addr().map_err(|e| Error::Bootstrap(e.to_string()))?.port();
        let mut text = format!("{}:{port}\n", hostname());
        if matches!(cfg.rendezvous, Rendezvous::JobFile(_)) {
            text += &cfg.token;
            text += "\n";
        }
        let tmp = p.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .and_then(|_| std::fs::rename(&tmp, p))
            .map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Error::Bootstrap(format!("rendezvous file {}: {e}", p.display()))
            })?;
    }
    let deadline = Instant::now() + cfg.timeout;
    let mut joined: Vec<Option<(Conn, Entry)>> = (0..cfg.size).map(|_| None).collect();
    let mut missing = cfg.size - 1;
    let handshake = |mut c: Conn| -> std::result::Result<(Conn, usize, Entry), String> {
        let fits = |h: &[u8]| check_hello(h, cfg.size).map(|_| ());
        let hello = crate::auth::server(&mut c, &cfg.token, RDV_PURPOSE, fits).map_err(|e| e.to_string())?;
        let r = check_hello(&hello, cfg.size)?;
        let entry = c.get().map_err(|e| e.to_string())?;
        match Entry::decode(&entry) {
            Ok(e) => Ok((c, r, e)),
            Err(_) => {
                let _ = c.write_all(&[1]).and_then(|_| c.put(b"malformed entry"));
                Err("malformed entry".into())
            }
        }
    };
    let served = crate::conn::serve(&l, deadline, "rendezvous", &Default::default(), handshake, |(mut c, r, e)| {
        if joined[r].is_some() {
            tracing::warn!("rendezvous refused a second process claiming rank {r}");
            let _ = c.write_all(&[1]).and_then(|_| c.put(format!("rank {r} has joined already").as_bytes()));
            return false;
        }
        if adv_ip.is_none() {
            *adv_ip = c.s.local_addr().ok().map(|a| a.ip().to_string());
        }
        joined[r] = Some((c, e));
        missing -= 1;
        missing == 0
    });
    if let Err(e) = served {
        let who: Vec<usize> = (1..cfg.size).filter(|&r| joined[r].is_none()).collect();
        return Err(Error::Bootstrap(match e.kind() {
            std::io::ErrorKind::TimedOut => format!("rendezvous: ranks {who:?} never joined within {:?}", cfg.timeout),
            _ => format!("rendezvous accept: {e}"),
        }));
    }
    if let Some(ip) = adv_ip.as_ref() {
        me.tcp = me.tcp.replace("0.0.0.0", ip);
    }
    let mut table = vec![me.clone()];
    table.extend(joined.iter().skip(1).map(|j| j.as_ref().unwrap().1.clone()));
    for (c, _) in joined.iter_mut().skip(1).flatten() {
        c.deadline = deadline.max(Instant::now() + crate::conn::HANDSHAKE_LIMIT);
        let r = c.write_all(&[0]).and_then(|_| table.iter().try_for_each(|e| c.put(&e.encode())));
        r.map_err(|e| Error::Bootstrap(format!("rendezvous reply: {e}")))?;
    }
    if let Rendezvous::File(p) | Rendezvous::JobFile(p) = &cfg.rendezvous {
        let _ = std::fs::remove_file(p);
    }
    Ok(table)
}

/// Ranks > 0: connect (retrying until the deadline), prove the token, introduce ourselves, read
/// the table.
pub(crate) fn join(cfg: &mut JoinConfig, me: &mut Entry) -> Result<Vec<Entry>> {
    let deadline = Instant::now() + cfg.timeout;
    let mut token = cfg.token.clone();
    if let Rendezvous::JobFile(p) = &cfg.rendezvous {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            private_dir(d)?;
        }
    }
    let s = loop {
        let addr = resolve_rendezvous(&cfg.rendezvous)?;
        let conn = addr.as_ref().and_then(|(a, _)| a.to_socket_addrs().ok()).and_then(|mut it| it.find_map(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(1)).ok()));
        if let Some(s) = conn {
            if token.is_empty() {
                token = addr.and_then(|(_, t)| t).unwrap_or_default();
            }
            break s;
        }
        if Instant::now() > deadline {
            return Err(Error::Bootstrap(format!("rendezvous {:?} unreachable within {:?}", cfg.rendezvous, cfg.timeout)));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Ok(a) = s.local_addr() {
        me.tcp = me.tcp.replace("0.0.0.0", &a.ip().to_string());
    }
    let io = |e: std::io::Error| Error::Bootstrap(format!("rendezvous: {e}"));
    cfg.token = token;
    let mut c = Conn::new(s, deadline).map_err(io)?;
    crate::auth::client(&mut c, &cfg.token, RDV_PURPOSE, &hello(cfg.rank, cfg.size)).map_err(|e| match e {
        crate::auth::AuthError::Refused(why) => Error::Refused(why),
        crate::auth::AuthError::Io(e) => io(e),
    })?;
    c.put(&me.encode()).map_err(io)?;
    let mut status = [0u8; 1];
    c.read_exact(&mut status).map_err(io)?;
    if status[0] != 0 {
        let why = c.get().map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
        return Err(Error::Refused(why));
    }
    (0..cfg.size).map(|_| c.get().map_err(io).and_then(|b| Entry::decode(&b))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootstrap::{free_port, new_token, Transport};
    use crate::Comm;

    /// Local addresses of the TCP sockets listening on `port` (from /proc/net/tcp and tcp6).
    fn listeners(port: u16) -> Vec<String> {
        let mut v = Vec::new();
        for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
            for line in std::fs::read_to_string(f).unwrap_or_default().lines().skip(1) {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if cols.len() > 3 && cols[3] == "0A" && cols[1].ends_with(&format!(":{port:04X}")) {
                    v.push(cols[1].to_string());
                }
            }
        }
        v
    }

    #[test]
    fn entries_and_hellos_round_trip_and_malformed_ones_are_refused() {
        let e = Entry { host: "node3".into(), pid: 4242, tcp: "10.0.0.3:5000".into(), shm: "/dev/shm/x".into() };
        assert_eq!(Entry::decode(&e.encode()).unwrap(), e);
        for bad in [&b"node3\n4242\n10.0.0.3:5000"[..], b"node3\nx\n\n", b"a\n1\nb\nc\nd", b""] {
            assert!(Entry::decode(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_hello(&hello(3, 4), 4), Ok(3));
        for (h, why) in [(hello(0, 4), "rank 0 of 4"), (hello(4, 4), "rank 4 of 4"), (hello(1, 5), "rank 1 of 5"), (hello(1, 4)[..7].to_vec(), "malformed")] {
            let e = check_hello(&h, 4).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn listen_address_follows_the_rendezvous() {
        for (a, lo) in [("127.0.0.1:5", true), ("127.1.2.3:5", true), ("localhost:5", true), ("[::1]:5", true), ("10.0.0.1:5", false), ("node3:5", false)] {
            assert_eq!(listen_ip(&Rendezvous::Addr(a.into())).is_loopback(), lo, "{a}");
        }
        assert!(listen_ip(&Rendezvous::File("/x".into())).is_unspecified());
    }

    #[test]
    fn a_loopback_rendezvous_listens_on_loopback_and_serves_a_slow_client_alongside() {
        let port = free_port().unwrap();
        let token = new_token();
        let cfg = |rank| JoinConfig {
            rank,
            size: 2,
            local_rank: rank,
            rendezvous: Rendezvous::Addr(format!("127.0.0.1:{port}")),
            token: token.clone(),
            transport: Transport::Tcp,
            timeout: Duration::from_secs(8),
        };
        let c0 = cfg(0);
        let r0 = std::thread::spawn(move || Comm::connect(&c0).map(|c| c.size()));
        let t0 = Instant::now();
        let seen = loop {
            let l = listeners(port);
            if !l.is_empty() || t0.elapsed() > Duration::from_secs(5) {
                break l;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        // Only 127.0.0.1 (0100007F), never every interface (00000000).
        assert_eq!(seen, vec![format!("0100007F:{port:04X}")]);
        // A client that trickles one byte every 200 ms connects first; rank 1 still joins at once.
        let slow = std::thread::spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            // A plausible field length, then the bytes one by one.
            let bytes = [8u8, 0, 0, 0].into_iter().chain(std::iter::repeat_n(b'E', 16));
            for b in bytes {
                if s.write_all(&[b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        std::thread::sleep(Duration::from_millis(100));
        let t1 = Instant::now();
        let c1 = Comm::connect(&cfg(1)).unwrap();
        assert!(t1.elapsed() < Duration::from_secs(2), "rank 1 joined after {:?}", t1.elapsed());
        assert_eq!(r0.join().unwrap().unwrap(), 2);
        drop(c1);
        slow.join().unwrap();
    }
}
