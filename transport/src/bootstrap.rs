//! Joining a multi-process job: rank and size from the launcher's variables, the rendezvous
//! point, the job token, and the choice of backend (`auto`: RDMA where every rank has a usable
//! port and the binary has the `rdma` feature, else shm on one host, TCP across hosts).
//!
//! Rendezvous protocol: rank 0 listens; every other rank connects and sends its token, rank,
//! size and a small description (host, pid, TCP address, shm inbox). A wrong token, rank or size
//! is refused with a message. Once all have joined, rank 0 sends everyone the full table.
//!
//! RDMA (feature `rdma`) is set up over that shm/TCP communicator: each rank opens its port,
//! creates one RC queue pair per peer and registers its receive slots; the ranks agree that every
//! one of them succeeded (an all-gather of error texts), swap per-peer connection data
//! ([`RdmaPeerInfo`]: QP number, PSN, LID, GID, MTU, slot address/rkey/geometry) with one
//! all-to-all, connect their QPs (INIT -> RTR -> RTS), agree again, and run a first barrier over
//! RDMA before the shm/TCP communicator is dropped. See docs/rdma.md.
use crate::comm::{Comm, DEFAULT_TIMEOUT};
use crate::error::{Error, Result};
use crate::fabric::Fabric;
use crate::rdma::verbs::{MAX_RANKS, MAX_SLOTS};
use crate::rdma::{RdmaConfig, RemoteSlots};
use crate::conn::Conn;
use std::io::Write;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Which backend a job uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// rdma when the binary has the `rdma` feature and every rank has a usable (active) port,
    /// else shm when every rank is on one host, else tcp (in-process when size is 1).
    Auto,
    /// Ranks are threads of one process (`local_world`).
    Local,
    Shm,
    Tcp,
    /// RDMA verbs (cargo feature `rdma`; without it, requesting it is a clear error).
    Rdma,
    /// NCCL on device buffers: `ember bench a2a|allreduce --transport nccl` (feature `nccl` of
    /// ember-tools, ember_cuda::nccl); host communicators refuse it.
    Nccl,
}

impl FromStr for Transport {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Transport::Auto,
            "local" => Transport::Local,
            "shm" => Transport::Shm,
            "tcp" => Transport::Tcp,
            "rdma" => Transport::Rdma,
            "nccl" => Transport::Nccl,
            o => return Err(Error::Bootstrap(format!("unknown transport '{o}' (auto, local, shm, tcp, rdma, nccl)"))),
        })
    }
}

/// Where rank 0 listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// host:port
    Addr(String),
    /// A file on a shared filesystem into which rank 0 writes its host:port.
    File(PathBuf),
    /// Like `File`, and the file (mode 0600, owned by this user, in a directory only this user
    /// can write) also carries the job token, which rank 0 creates when EMBER_JOB_TOKEN is not
    /// set: the default under a bare `mpirun` (`<dir>/ember-<Open MPI job id>.rdv`, `<dir>` =
    /// `<EMBER_RENDEZVOUS_DIR>/ember-<uid>`, else `$XDG_RUNTIME_DIR`, else
    /// `<TMPDIR or /tmp>/ember-<uid>`).
    JobFile(PathBuf),
}

/// Everything a process needs to join a job.
#[derive(Clone, Debug)]
pub struct JoinConfig {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub rendezvous: Rendezvous,
    pub token: String,
    pub transport: Transport,
    /// Collective timeout (also bounds the rendezvous).
    pub timeout: Duration,
}

fn parse<T: FromStr>(name: &str, v: &str) -> Result<T> {
    v.trim().parse().map_err(|_| Error::Bootstrap(format!("{name}={v:?} is not a number")))
}

/// First host of a Slurm node list: "node[03-05,7],gpu1" -> "node03".
pub fn slurm_first_host(list: &str) -> Option<String> {
    let first = list.split(',').next()?.trim();
    match first.find('[') {
        None => (!first.is_empty()).then(|| first.to_string()),
        Some(i) => {
            let inner = &list[list.find('[')? + 1..];
            let range = inner.split([',', ']']).next()?;
            let lo = range.split('-').next()?;
            Some(format!("{}{}", &first[..i], lo))
        }
    }
}

impl JoinConfig {
    /// From this process's environment (see `from_vars`).
    pub fn from_env() -> Result<JoinConfig> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// From launcher variables: rank/size from OMPI_COMM_WORLD_*, SLURM_*, PMI_*, or torchrun's
    /// RANK/WORLD_SIZE/LOCAL_RANK (first found); rendezvous from EMBER_RENDEZVOUS,
    /// MASTER_ADDR+MASTER_PORT, the first Slurm node (port 20000 + job id mod 20000), or
    /// EMBER_RENDEZVOUS_FILE; token from EMBER_JOB_TOKEN; EMBER_TRANSPORT, EMBER_TIMEOUT_MS.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<JoinConfig> {
        let sources = [
            ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
            ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
            ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ];
        let (mut rank, mut size, mut local_rank) = (0, 1, 0);
        for (r, s, l) in sources {
            if let (Some(rv), Some(sv)) = (get(r), get(s)) {
                rank = parse(r, &rv)?;
                size = parse(s, &sv)?;
                local_rank = get(l).map(|v| parse(l, &v)).transpose()?.unwrap_or(0);
                break;
            }
        }
        if size == 0 || rank >= size {
            return Err(Error::Bootstrap(format!("rank {rank} out of range for size {size}")));
        }
        let rendezvous = if let Some(a) = get("EMBER_RENDEZVOUS") {
            Rendezvous::Addr(a)
        } else if let (Some(h), Some(p)) = (get("MASTER_ADDR"), get("MASTER_PORT")) {
            Rendezvous::Addr(format!("{h}:{p}"))
        } else if let (Some(list), Some(job)) = (get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST")), get("SLURM_JOB_ID")) {
            let host = slurm_first_host(&list).ok_or_else(|| Error::Bootstrap(format!("cannot parse SLURM_JOB_NODELIST={list:?}")))?;
            let job: u64 = parse("SLURM_JOB_ID", &job)?;
            Rendezvous::Addr(format!("{host}:{}", 20000 + job % 20000))
        } else if let Some(f) = get("EMBER_RENDEZVOUS_FILE") {
            Rendezvous::File(PathBuf::from(f))
        } else if let Some(job) = get("OMPI_COMM_WORLD_RANK").and(get("OMPI_MCA_ess_base_jobid").or_else(|| get("PMIX_NAMESPACE"))) {
            // Bare mpirun: a per-job file in a directory only this user can write, which every
            // rank sees (one host: the runtime or temp directory; several: EMBER_RENDEZVOUS_DIR).
            let dir = job_dir(&get);
            let job: String = job.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' }).collect();
            Rendezvous::JobFile(PathBuf::from(dir).join(format!("ember-{job}.rdv")))
        } else if size == 1 {
            Rendezvous::Addr("127.0.0.1:0".into())
        } else {
            return Err(Error::Bootstrap(
                "no rendezvous: set EMBER_RENDEZVOUS=host:port, MASTER_ADDR/MASTER_PORT or EMBER_RENDEZVOUS_FILE".into(),
            ));
        };
        let token = get("EMBER_JOB_TOKEN").unwrap_or_default();
        if token.is_empty() && size > 1 && !matches!(rendezvous, Rendezvous::JobFile(_)) {
            return Err(Error::Refused("EMBER_JOB_TOKEN is not set (ember launch sets it; export the same value to every rank)".into()));
        }
        let transport = get("EMBER_TRANSPORT").map(|t| t.parse()).transpose()?.unwrap_or(Transport::Auto);
        let timeout = match get("EMBER_TIMEOUT_MS") {
            Some(v) => Duration::from_millis(parse("EMBER_TIMEOUT_MS", &v)?),
            None => DEFAULT_TIMEOUT,
        };
        Ok(JoinConfig { rank, size, local_rank, rendezvous, token, transport, timeout })
    }
}

// ------------------------------------------------------------------ rendezvous

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

fn hostname() -> String {
    let mut b = [0u8; 256];
    // SAFETY: gethostname writes at most b.len() bytes.
    unsafe { libc::gethostname(b.as_mut_ptr() as *mut libc::c_char, b.len()) };
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// One rank's entry in the table: host, pid, TCP address, shm inbox path.
#[derive(Clone, Debug, Default)]
pub struct Entry {
    pub host: String,
    pub pid: u32,
    pub tcp: String,
    pub shm: String,
}

impl Entry {
    pub fn encode(&self) -> Vec<u8> {
        format!("{}\n{}\n{}\n{}", self.host, self.pid, self.tcp, self.shm).into_bytes()
    }
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

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The directory for job files, one only this user can write: `<EMBER_RENDEZVOUS_DIR>/ember-<uid>`
/// (a shared filesystem, for ranks on several hosts), else `$XDG_RUNTIME_DIR`, else
/// `<TMPDIR or /tmp>/ember-<uid>`. Created 0700 and checked when used ([`private_dir`]).
fn job_dir(get: &impl Fn(&str) -> Option<String>) -> PathBuf {
    let per_user = |d: String| PathBuf::from(d).join(format!("ember-{}", euid()));
    if let Some(d) = get("EMBER_RENDEZVOUS_DIR").filter(|d| !d.is_empty()) {
        return per_user(d);
    }
    if let Some(x) = get("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(x);
    }
    per_user(get("TMPDIR").filter(|d| !d.is_empty()).unwrap_or_else(|| "/tmp".into()))
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

/// The parts of a joining rank's hello: rank and size (covered by its token proof).
fn ids(rank: usize, size: usize) -> Vec<u8> {
    let mut v = (rank as u32).to_le_bytes().to_vec();
    v.extend_from_slice(&(size as u32).to_le_bytes());
    v
}

/// Rank 0: accept every other rank (concurrently, under the job's deadline), check its proof of
/// the token, answer with the table.
fn serve(cfg: &JoinConfig, me: &mut Entry, adv_ip: &mut Option<String>) -> Result<Vec<Entry>> {
    let port = match &cfg.rendezvous {
        Rendezvous::Addr(a) => {
            let p = a.rsplit(':').next().unwrap_or("");
            p.parse::<u16>().map_err(|_| Error::Bootstrap(format!("rendezvous address {a:?} has no valid port")))?
        }
        Rendezvous::File(_) | Rendezvous::JobFile(_) => 0,
    };
    let bind = std::net::SocketAddr::new(listen_ip(&cfg.rendezvous), port);
    let l = TcpListener::bind(&bind).map_err(|e| Error::Bootstrap(format!("rendezvous: bind {bind}: {e}")))?;
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
        let fits = |h: &[u8]| match h {
            [a, b, c, d, e, f, g, i] => {
                let (r, n) = (u32::from_le_bytes([*a, *b, *c, *d]) as usize, u32::from_le_bytes([*e, *f, *g, *i]) as usize);
                match n == cfg.size && r != 0 && r < n {
                    true => Ok(()),
                    false => Err(format!("rank {r} of {n} does not fit this job of {} ranks", cfg.size)),
                }
            }
            _ => Err("malformed hello".to_string()),
        };
        let hello = crate::auth::server(&mut c, &cfg.token, RDV_PURPOSE, fits).map_err(|e| e.to_string())?;
        let r = u32::from_le_bytes(hello[0..4].try_into().expect("checked")) as usize;
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
fn join(cfg: &mut JoinConfig, me: &mut Entry) -> Result<Vec<Entry>> {
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
    crate::auth::client(&mut c, &cfg.token, RDV_PURPOSE, &ids(cfg.rank, cfg.size)).map_err(|e| match e {
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

impl Comm {
    /// Join the job described by the launcher's environment (`JoinConfig::from_env`).
    pub fn from_env() -> Result<Comm> {
        Comm::connect(&JoinConfig::from_env()?)
    }

    /// Join a multi-process job: rendezvous, then build the chosen backend (see [`Transport`]).
    pub fn connect(cfg: &JoinConfig) -> Result<Comm> {
        match cfg.transport {
            Transport::Rdma if !cfg!(feature = "rdma") => return Err(Error::NotBuilt("rdma".into())),
            Transport::Nccl => return Err(Error::NotBuilt("nccl".into())),
            Transport::Local if cfg.size > 1 => {
                return Err(Error::Bootstrap("transport 'local' runs ranks as threads of one process: use local_world, or shm/tcp across processes".into()))
            }
            _ => {}
        }
        if cfg.transport == Transport::Rdma {
            // Fail before the rendezvous when this process has nothing to run RDMA on.
            let port = rdma_port(cfg.local_rank).map_err(|why| Error::Bootstrap(format!("transport 'rdma': {why}")))?;
            tracing::debug!(rank = cfg.rank, "rdma: will use {port}");
        }
        if cfg.size == 1 {
            if cfg.transport == Transport::Auto {
                tracing::info!("transport auto: local (1 rank)");
            }
            return Ok(crate::comm::local_world_with_timeout(1, cfg.timeout).pop().unwrap());
        }
        let host = Self::connect_host(cfg)?;
        match cfg.transport {
            #[cfg(feature = "rdma")]
            Transport::Rdma => match rdma_over(&host, cfg)? {
                Ok(c) => Ok(c),
                Err(why) => Err(Error::Bootstrap(format!("transport 'rdma': {why}"))),
            },
            Transport::Auto => {
                #[cfg(feature = "rdma")]
                {
                    let here = rdma_port(cfg.local_rank).map(|_| ());
                    let why = match agree(&host, here)? {
                        Ok(()) => match rdma_over(&host, cfg)? {
                            Ok(c) => return Ok(c),
                            Err(why) => format!("RDMA setup failed ({why})"),
                        },
                        Err(why) => format!("no usable RDMA port on {why}"),
                    };
                    log_auto(cfg.rank, &format!("{} ({why})", describe_host(&host)));
                }
                #[cfg(not(feature = "rdma"))]
                log_auto(cfg.rank, &format!("{} (RDMA: not built into this binary)", describe_host(&host)));
                Ok(host)
            }
            _ => Ok(host),
        }
    }

    /// The shm or TCP communicator (`Auto` and `Rdma`: shm on one host, else TCP).
    fn connect_host(cfg: &JoinConfig) -> Result<Comm> {
        let mut cfg = cfg.clone();
        if !matches!(cfg.transport, Transport::Shm | Transport::Tcp) {
            cfg.transport = Transport::Auto;
        }
        if cfg.token.is_empty() {
            if !matches!(cfg.rendezvous, Rendezvous::JobFile(_)) {
                return Err(Error::Refused("EMBER_JOB_TOKEN is not set (ember launch sets it; export the same value to every rank)".into()));
            }
            if cfg.rank == 0 {
                cfg.token = new_token(); // handed to the others through the 0600 job file
            }
        }
        let want_tcp = matches!(cfg.transport, Transport::Tcp | Transport::Auto);
        let want_shm = matches!(cfg.transport, Transport::Shm | Transport::Auto);
        let listener = if want_tcp {
            let ip = listen_ip(&cfg.rendezvous);
            Some(TcpListener::bind((ip, 0)).map_err(|e| Error::Bootstrap(format!("tcp listen on {ip}: {e}")))?)
        } else {
            None
        };
        let inbox = if want_shm { Some(crate::shm::Inbox::create(cfg.size, cfg.rank, &cfg.token)?) } else { None };
        let mut me = Entry {
            host: hostname(),
            pid: std::process::id(),
            tcp: listener.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
            shm: inbox.as_ref().map(|i| i.path.display().to_string()).unwrap_or_default(),
        };
        let table = if cfg.rank == 0 { serve(&cfg, &mut me, &mut None) } else { join(&mut cfg, &mut me) };
        let table = match table {
            Ok(t) => t,
            Err(e) => {
                if let Some(i) = &inbox {
                    i.unlink();
                }
                return Err(e);
            }
        };
        let one_host = table.iter().all(|e| e.host == table[0].host);
        let use_shm = cfg.transport == Transport::Shm || (cfg.transport == Transport::Auto && one_host);
        if cfg.transport == Transport::Shm && !one_host {
            return Err(Error::Bootstrap("transport 'shm' needs every rank on one host".into()));
        }
        let fabric: Arc<dyn Fabric> = if use_shm {
            let inbox = inbox.expect("created for shm");
            let paths: Vec<String> = table.iter().map(|e| e.shm.clone()).collect();
            let pids = table.iter().map(|e| e.pid).collect();
            let f = Arc::new(crate::shm::ShmFabric::new(cfg.rank, inbox, &paths, pids, cfg.timeout)?);
            let c = Comm::from_fabric(f.clone(), cfg.timeout);
            // Cross-memory attach: probed once by every rank, used only if every rank may attach
            // to every other (else large messages are copied through shared memory). The
            // agreement is also the barrier after which every inbox is mapped: the names can go.
            let mine = if crate::shm::staged_forced() { Err("EMBER_SHM_COPY=staged".to_string()) } else { f.probe_cma() };
            let verdict = agree(&c, mine)?;
            f.use_cma(verdict.is_ok());
            f.unlink_inbox();
            let unasked = verdict.is_err() && !crate::shm::staged_forced();
            let what = match verdict {
                Ok(()) => "shm: large messages by cross-memory attach (process_vm_readv/writev, one copy)".to_string(),
                Err(why) => format!("shm: cross-memory attach not used ({why}): large messages are copied through shared memory"),
            };
            if cfg.rank == 0 {
                // A fallback the user did not ask for costs bandwidth: say so at the default level.
                match unasked {
                    true => tracing::warn!("{what}"),
                    false => tracing::info!("{what}"),
                }
            } else {
                tracing::debug!(rank = cfg.rank, "{what}");
            }
            return Ok(c);
        } else {
            if let Some(i) = &inbox {
                i.unlink();
            }
            let addrs: Vec<String> = table.iter().map(|e| e.tcp.clone()).collect();
            Arc::new(crate::tcp::TcpFabric::new(cfg.rank, listener.expect("bound for tcp"), &addrs, &cfg.token, cfg.timeout)?)
        };
        Ok(Comm::from_fabric(fabric, cfg.timeout))
    }
}

fn describe_host(c: &Comm) -> String {
    match c.transport() {
        "shm" => format!("shm: all {} ranks on one host", c.size()),
        t => format!("{t}: {} ranks across hosts", c.size()),
    }
}

/// Log the choice `auto` made (rank 0 at info level, the others at debug level).
fn log_auto(rank: usize, what: &str) {
    if rank == 0 {
        tracing::info!("transport auto: {what}");
    } else {
        tracing::debug!(rank, "transport auto: {what}");
    }
}

// ------------------------------------------------------------------ RDMA

/// Whether this process can run RDMA: `Ok(the port it would use)` or `Err(why not)` (not
/// built, no device, no active port, bad `EMBER_IB_*` variable). Opens and closes the device.
pub fn rdma_available() -> std::result::Result<String, String> {
    rdma_port(0)
}

/// [`rdma_available`] for the process with this local rank (`EMBER_IB_DEVICE` may list one
/// device per local rank).
pub fn rdma_port(local_rank: usize) -> std::result::Result<String, String> {
    #[cfg(feature = "rdma")]
    {
        let c = crate::rdma::ib::IbConfig::from_env(local_rank)?;
        crate::rdma::ib::probe(&c).map(|p| p.to_string())
    }
    #[cfg(not(feature = "rdma"))]
    {
        let _ = local_rank;
        Err("not built into this binary (rebuild with --features rdma; see docs/rdma.md)".into())
    }
}

/// Protocol geometry from `EMBER_RDMA_SLOTS` and `EMBER_RDMA_CHUNK` (bytes), else the defaults.
/// Every rank must use the same values (checked when connecting).
pub fn rdma_config_from_vars(get: impl Fn(&str) -> Option<String>) -> std::result::Result<RdmaConfig, String> {
    let d = RdmaConfig::default();
    let num = |k: &str, dflt: usize| -> std::result::Result<usize, String> {
        match get(k).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) {
            None => Ok(dflt),
            Some(v) => v.parse().map_err(|_| format!("{k}={v:?} is not a number")),
        }
    };
    let c = RdmaConfig { slots: num("EMBER_RDMA_SLOTS", d.slots)?, chunk: num("EMBER_RDMA_CHUNK", d.chunk)? };
    if c.slots == 0 || c.slots > MAX_SLOTS || c.chunk == 0 || c.chunk > 1 << 30 {
        return Err(format!("EMBER_RDMA_SLOTS={} (1..={MAX_SLOTS}), EMBER_RDMA_CHUNK={} (1..=2^30)", c.slots, c.chunk));
    }
    Ok(c)
}

/// What the peer of one reliable-connected queue pair needs to connect to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QpInfo {
    /// Queue pair number (24 bits).
    pub qpn: u32,
    /// Initial packet sequence number (24 bits).
    pub psn: u32,
    /// Port LID (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// Port GID at the chosen GID index (RoCE, or InfiniBand with a GRH).
    pub gid: [u8; 16],
    /// Active MTU as the `ibv_mtu` enum (1 = 256 B ... 5 = 4096 B).
    pub mtu: u8,
}

/// One rank's connection data for one peer, sent through the bootstrap: the QP that rank `src`
/// created for `dst`, and the receive slots `src` reserved for messages from `dst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RdmaPeerInfo {
    pub src: usize,
    pub dst: usize,
    pub qp: QpInfo,
    pub slots: RemoteSlots,
}

/// Encoded size of one [`RdmaPeerInfo`].
pub const RDMA_INFO_LEN: usize = 72;
const RDMA_MAGIC: u32 = 0x4d52_4245; // "EBRM"
const RDMA_VERSION: u16 = 1;

fn fnv32(b: &[u8]) -> u32 {
    b.iter().fold(0x811c_9dc5u32, |h, &x| (h ^ x as u32).wrapping_mul(0x0100_0193))
}

impl RdmaPeerInfo {
    /// Fixed little-endian layout: magic, version, src, dst, lid, qpn, psn, mtu, gid, slot
    /// address, rkey, slot count, slot size, checksum.
    pub fn encode(&self) -> [u8; RDMA_INFO_LEN] {
        let mut b = [0u8; RDMA_INFO_LEN];
        b[0..4].copy_from_slice(&RDMA_MAGIC.to_le_bytes());
        b[4..6].copy_from_slice(&RDMA_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(self.src as u16).to_le_bytes());
        b[8..10].copy_from_slice(&(self.dst as u16).to_le_bytes());
        b[10..12].copy_from_slice(&self.qp.lid.to_le_bytes());
        b[12..16].copy_from_slice(&self.qp.qpn.to_le_bytes());
        b[16..20].copy_from_slice(&self.qp.psn.to_le_bytes());
        b[20] = self.qp.mtu;
        b[24..40].copy_from_slice(&self.qp.gid);
        b[40..48].copy_from_slice(&self.slots.addr.to_le_bytes());
        b[48..52].copy_from_slice(&self.slots.rkey.to_le_bytes());
        b[52..56].copy_from_slice(&(self.slots.slots as u32).to_le_bytes());
        b[56..64].copy_from_slice(&(self.slots.slot_size as u64).to_le_bytes());
        let c = fnv32(&b[0..64]);
        b[64..68].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Bounds-checked decode: a truncated, corrupted or out-of-range entry is an error.
    pub fn decode(b: &[u8]) -> std::result::Result<RdmaPeerInfo, String> {
        if b.len() != RDMA_INFO_LEN {
            return Err(format!("RDMA connection entry of {} bytes (expected {RDMA_INFO_LEN})", b.len()));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        if u32_at(0) != RDMA_MAGIC {
            return Err(format!("RDMA connection entry: bad magic {:#x}", u32_at(0)));
        }
        if u16_at(4) != RDMA_VERSION {
            return Err(format!("RDMA connection entry version {} (this binary speaks {RDMA_VERSION})", u16_at(4)));
        }
        if u32_at(64) != fnv32(&b[0..64]) {
            return Err("RDMA connection entry: checksum mismatch".into());
        }
        if b[21..24].iter().chain(&b[68..72]).any(|&x| x != 0) {
            return Err("RDMA connection entry: reserved bytes set".into());
        }
        let (src, dst) = (u16_at(6) as usize, u16_at(8) as usize);
        let (qpn, psn, mtu) = (u32_at(12), u32_at(16), b[20]);
        let (slots, slot_size) = (u32_at(52) as usize, u64_at(56));
        let addr = u64_at(40);
        if src >= MAX_RANKS || dst >= MAX_RANKS {
            return Err(format!("RDMA connection entry for ranks {src} -> {dst} (at most {MAX_RANKS} ranks)"));
        }
        if qpn >= 1 << 24 || psn >= 1 << 24 {
            return Err(format!("RDMA connection entry: QPN {qpn:#x} / PSN {psn:#x} exceed 24 bits"));
        }
        if !(1..=5).contains(&mtu) {
            return Err(format!("RDMA connection entry: MTU code {mtu} (1..=5)"));
        }
        if slots == 0 || slots > MAX_SLOTS || slot_size <= crate::rdma::proto::HDR as u64 || slot_size > (1 << 30) + crate::rdma::proto::HDR as u64 {
            return Err(format!("RDMA connection entry: {slots} slots of {slot_size} bytes"));
        }
        if (slots as u64).checked_mul(slot_size).and_then(|l| addr.checked_add(l)).is_none() {
            return Err(format!("RDMA connection entry: slot region at {addr:#x} wraps the address space"));
        }
        let mut gid = [0u8; 16];
        gid.copy_from_slice(&b[24..40]);
        Ok(RdmaPeerInfo {
            src,
            dst,
            qp: QpInfo { qpn, psn, lid: u16_at(10), gid, mtu },
            slots: RemoteSlots { addr, rkey: u32_at(48), slots, slot_size: slot_size as usize },
        })
    }
}

/// Decode what rank `me` of `n` received from every peer in the all-to-all of connection
/// entries (`n * RDMA_INFO_LEN` bytes; entry `p` from rank `p`, its own entry ignored).
pub fn decode_rdma_table(b: &[u8], me: usize, n: usize) -> Result<Vec<Option<RdmaPeerInfo>>> {
    const OP: &str = "rdma connect";
    if n.checked_mul(RDMA_INFO_LEN) != Some(b.len()) || me >= n {
        return Err(Error::usage(OP, format!("{} bytes of connection data for rank {me} of {n}", b.len())));
    }
    (0..n)
        .map(|p| {
            if p == me {
                return Ok(None);
            }
            let e = RdmaPeerInfo::decode(&b[p * RDMA_INFO_LEN..(p + 1) * RDMA_INFO_LEN]).map_err(|detail| Error::Protocol { op: OP, peer: p, detail })?;
            if e.src != p || e.dst != me {
                return Err(Error::Protocol { op: OP, peer: p, detail: format!("entry for {} -> {} where {p} -> {me} was expected", e.src, e.dst) });
            }
            Ok(Some(e))
        })
        .collect()
}

/// Every rank reports whether its step succeeded; the answer is the same on every rank:
/// `Ok(())`, or `Err("rank r: why")` naming the first rank that failed. (The outer error: the
/// shm/TCP communicator itself failed.)
fn agree(host: &Comm, mine: std::result::Result<(), String>) -> Result<std::result::Result<(), String>> {
    let text = match &mine {
        Ok(()) => Vec::new(),
        Err(e) => {
            let mut b = if e.is_empty() { b"failed".to_vec() } else { e.as_bytes().to_vec() };
            b.truncate(1000);
            b
        }
    };
    let (all, counts) = host.all_gather_alloc(&text)?;
    let mut fails = Vec::new();
    let mut off = 0;
    for (r, &c) in counts.iter().enumerate() {
        if c > 0 {
            fails.push(format!("rank {r}: {}", String::from_utf8_lossy(&all[off..off + c])));
        }
        off += c;
    }
    Ok(match fails.len() {
        0 => Ok(()),
        1 => Err(fails.remove(0)),
        k => Err(format!("{} (and {} more rank(s))", fails[0], k - 1)),
    })
}

/// Build the RDMA communicator over the shm/TCP one (`Err(why)`: the same on every rank, nothing
/// left half-connected; the outer error: the shm/TCP communicator failed).
#[cfg(feature = "rdma")]
fn rdma_over(host: &Comm, cfg: &JoinConfig) -> Result<std::result::Result<Comm, String>> {
    use crate::rdma::ib::{IbConfig, IbVerbs, Queues};
    use crate::rdma::RdmaFabric;
    let (me, n) = (host.rank(), host.size());
    let setup = (|| -> std::result::Result<(RdmaFabric<IbVerbs>, RdmaConfig), String> {
        let rcfg = rdma_config_from_vars(|k| std::env::var(k).ok())?;
        if n > MAX_RANKS {
            return Err(format!("{n} ranks: the RDMA protocol supports at most {MAX_RANKS}"));
        }
        let ib = IbConfig::from_env(cfg.local_rank)?;
        let v = IbVerbs::open(me, n, &ib, Queues::for_slots(rcfg.slots))?;
        Ok((RdmaFabric::new(v, rcfg, "rdma").map_err(|e| e.to_string())?, rcfg))
    })();
    if let Err(why) = agree(host, setup.as_ref().map(|_| ()).map_err(|e| e.clone()))? {
        return Ok(Err(why));
    }
    let (fab, rcfg) = setup.expect("checked by agree");
    let mut send = vec![0u8; n * RDMA_INFO_LEN];
    for p in (0..n).filter(|&p| p != me) {
        let qp = fab.verbs().local_info(p).expect("one QP per peer");
        let e = RdmaPeerInfo { src: me, dst: p, qp, slots: fab.slots_for(p) };
        send[p * RDMA_INFO_LEN..(p + 1) * RDMA_INFO_LEN].copy_from_slice(&e.encode());
    }
    let mut recv = vec![0u8; n * RDMA_INFO_LEN];
    host.all_to_all(&send, &mut recv)?;
    let connected = (|| -> std::result::Result<(), String> {
        let table = decode_rdma_table(&recv, me, n).map_err(|e| e.to_string())?;
        let mut remote = vec![None; n];
        for (p, e) in table.iter().enumerate() {
            if let Some(e) = e {
                fab.verbs().connect_peer(p, &e.qp)?;
                remote[p] = Some(e.slots);
            }
        }
        fab.connect(&remote).map_err(|e| e.to_string())
    })();
    // Every QP of every rank is ready to receive before anyone writes.
    if let Err(why) = agree(host, connected)? {
        return Ok(Err(why));
    }
    let port = fab.verbs().port().to_string();
    let ro = if fab.verbs().relaxed_ordering() { "relaxed-ordering MRs" } else { "MRs without relaxed ordering (library refused the flag)" };
    let comm = Comm::from_fabric(Arc::new(fab), cfg.timeout);
    let first = comm.barrier().map_err(|e| format!("first barrier over RDMA failed: {e}"));
    if let Err(why) = agree(host, first)? {
        return Ok(Err(why));
    }
    let what = format!("rdma on {port}, {n} ranks, {} slots x {} B per peer, {ro}", rcfg.slots, rcfg.chunk);
    if me == 0 {
        tracing::info!("transport: {what}");
    } else {
        tracing::debug!(rank = me, "transport: {what}");
    }
    Ok(Ok(comm))
}

/// A random job token (for launchers and tests): 128 bits from the OS.
pub fn new_token() -> String {
    let mut b = [0u8; 16];
    if let Err(e) = crate::auth::random(&mut b) {
        tracing::warn!("no random source ({e}): the job token is derived from the clock and the process id");
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        b.copy_from_slice(&(t ^ std::process::id() as u128).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A free TCP port for a rendezvous (launchers and tests). Racy by nature: the port is free
/// now, and rank 0 binds it a moment later. To keep that window safe from the many outgoing
/// connections a job opens (their local ports come from the kernel's ephemeral range, where
/// `bind(0)` would pick too), it is drawn at random from below that range (or above it, when
/// the range starts low) and checked bindable on every interface.
pub fn free_port() -> Result<u16> {
    let (lo, hi) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|x| x.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    let (from, to) = if lo >= 12_000 { (lo - 10_000, lo) } else { (hi + 1, 65_536) };
    let mut seed = u32::from_str_radix(&new_token()[..8], 16).unwrap_or(1);
    for _ in 0..if to > from { 64 } else { 0 } {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let port = (from + seed % (to - from)) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| Error::Bootstrap(e.to_string()))?;
    Ok(l.local_addr().map_err(|e| Error::Bootstrap(e.to_string()))?.port())
}

/// `n` ranks of a shm, tcp or rdma world as threads of this process, joined through a real
/// rendezvous on loopback (tests and in-process benchmarks of the multi-process backends).
pub fn threads_world(n: usize, transport: Transport, timeout: Duration) -> Result<Vec<Comm>> {
    if transport == Transport::Local {
        return Ok(crate::comm::local_world_with_timeout(n, timeout));
    }
    let port = free_port()?;
    let token = new_token();
    let hs: Vec<_> = (0..n)
        .map(|rank| {
            let cfg = JoinConfig {
                rank,
                size: n,
                local_rank: rank,
                rendezvous: Rendezvous::Addr(format!("127.0.0.1:{port}")),
                token: token.clone(),
                transport,
                timeout,
            };
            std::thread::spawn(move || Comm::connect(&cfg))
        })
        .collect();
    hs.into_iter().map(|h| h.join().map_err(|_| Error::Bootstrap("join thread panicked".into()))?).collect()
}

/// Cores this process may run on (for launchers that pin ranks round-robin).
pub fn allowed_cores() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![];
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Pin the calling thread (or, between fork and exec, the new process) to one core.
/// Async-signal-safe: usable in `CommandExt::pre_exec`.
/// Ask the kernel to SIGKILL this process when its parent dies (Linux), so the ranks of a
/// launcher that is itself killed do not run on. Async-signal-safe: callable between fork and exec.
pub fn die_with_parent() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain prctl on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

pub fn pin_to_core(core: usize) -> bool {
    // SAFETY: plain syscalls on a set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let bytes = [8u8, 0, 0, 0].into_iter().chain(std::iter::repeat(b'E').take(16));
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
