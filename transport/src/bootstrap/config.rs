//! The job a process joins, read from its launcher's environment: rank, size and local rank
//! (Open MPI, Slurm, PMI or torchrun variables), the rendezvous point, the job token, the
//! transport to use and the collective timeout ([`JoinConfig::from_vars`]), and where per-job
//! rendezvous files live under a bare `mpirun` ([`job_dir`]).
use crate::comm::{DEFAULT_TIMEOUT, MAX_TIMEOUT};
use crate::error::{Error, Result};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

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
}

/// Why "nccl" is not a transport: NCCL moves device buffers, not a communicator's host bytes.
const NCCL_IS_NOT_A_TRANSPORT: &str = "NCCL is not a host transport: it moves device buffers \
     (`ember train --xfer nccl`, `ember bench a2a|allreduce --transport nccl`, in a binary built with --features nccl)";

impl FromStr for Transport {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Transport::Auto,
            "local" => Transport::Local,
            "shm" => Transport::Shm,
            "tcp" => Transport::Tcp,
            "rdma" => Transport::Rdma,
            "nccl" => return Err(Error::Bootstrap(format!("transport 'nccl' (auto, local, shm, tcp, rdma): {NCCL_IS_NOT_A_TRANSPORT}"))),
            o => return Err(Error::Bootstrap(format!("unknown transport '{o}' (auto, local, shm, tcp, rdma)"))),
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

/// The collective timeout `EMBER_TIMEOUT_MS` asks for (`v`, the variable's value; `None`: unset,
/// then [`DEFAULT_TIMEOUT`]): whole milliseconds from 1 to [`MAX_TIMEOUT`] (7 days); another
/// value is an error naming the variable.
pub fn timeout_from(v: Option<impl AsRef<std::ffi::OsStr>>) -> Result<Duration> {
    let max = MAX_TIMEOUT.as_millis() as u64;
    crate::env::number("EMBER_TIMEOUT_MS", v, DEFAULT_TIMEOUT.as_millis() as u64, 1..=max, "milliseconds").map(Duration::from_millis)
}

/// [`timeout_from`] this process's `EMBER_TIMEOUT_MS` (the timeout of in-process ranks, which
/// join no job).
pub fn timeout_from_env() -> Result<Duration> {
    timeout_from(std::env::var_os("EMBER_TIMEOUT_MS"))
}

pub(crate) fn parse<T: FromStr>(name: &str, v: &str) -> Result<T> {
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
            Rendezvous::JobFile(dir.join(format!("ember-{job}.rdv")))
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
        let timeout = timeout_from(get("EMBER_TIMEOUT_MS"))?;
        Ok(JoinConfig { rank, size, local_rank, rendezvous, token, transport, timeout })
    }
}

pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

/// The directory for job files, one only this user can write: `<EMBER_RENDEZVOUS_DIR>/ember-<uid>`
/// (a shared filesystem, for ranks on several hosts), else `$XDG_RUNTIME_DIR`, else
/// `<TMPDIR or /tmp>/ember-<uid>`. Created 0700 and checked when used (`rendezvous::private_dir`).
pub(crate) fn job_dir(get: &impl Fn(&str) -> Option<String>) -> PathBuf {
    let per_user = |d: String| PathBuf::from(d).join(format!("ember-{}", euid()));
    if let Some(d) = get("EMBER_RENDEZVOUS_DIR").filter(|d| !d.is_empty()) {
        return per_user(d);
    }
    if let Some(x) = get("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(x);
    }
    per_user(get("TMPDIR").filter(|d| !d.is_empty()).unwrap_or_else(|| "/tmp".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse_and_nccl_is_refused_naming_its_paths() {
        for (s, t) in [("auto", Transport::Auto), ("", Transport::Auto), ("LOCAL", Transport::Local), ("shm", Transport::Shm), ("tcp", Transport::Tcp), ("rdma", Transport::Rdma)] {
            assert_eq!(s.parse::<Transport>().unwrap(), t, "{s}");
        }
        let e = "nccl".parse::<Transport>().unwrap_err().to_string();
        assert!(e.contains("--xfer nccl") && e.contains("--transport nccl") && e.contains("auto, local, shm, tcp, rdma"), "{e}");
        let e = "ib".parse::<Transport>().unwrap_err().to_string();
        assert!(e.contains("unknown transport 'ib'"), "{e}");
        let vars = |k: &str| match k {
            "EMBER_TRANSPORT" => Some("nccl".to_string()),
            _ => None,
        };
        let e = JoinConfig::from_vars(vars).unwrap_err().to_string();
        assert!(e.contains("NCCL is not a host transport"), "{e}");
    }

    #[test]
    fn the_timeout_variable_is_checked() {
        assert_eq!(timeout_from(None::<&str>).unwrap(), DEFAULT_TIMEOUT);
        assert_eq!(timeout_from(Some("1")).unwrap(), Duration::from_millis(1));
        assert_eq!(timeout_from(Some(" 1500 ")).unwrap(), Duration::from_millis(1500));
        assert_eq!(timeout_from(Some("604800000")).unwrap(), MAX_TIMEOUT);
        for bad in ["0", "604800001", "18446744073709551615", "-1", "60s", "1e3", ""] {
            let e = timeout_from(Some(bad)).unwrap_err().to_string();
            assert!(e.contains("EMBER_TIMEOUT_MS") && e.contains("milliseconds from 1 to 604800000"), "{bad:?}: {e}");
        }
        // Through the launcher variables too.
        let vars = |k: &str| match k {
            "EMBER_TIMEOUT_MS" => Some("10s".to_string()),
            _ => None,
        };
        let e = JoinConfig::from_vars(vars).unwrap_err().to_string();
        assert!(e.contains("EMBER_TIMEOUT_MS=\"10s\""), "{e}");
    }
}
