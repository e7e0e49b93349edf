//! Choosing and building a job's transport: [`Comm::connect`] runs the rendezvous, then builds
//! the backend the [`Transport`] names (`auto`: RDMA where every rank has a usable port and the
//! binary has the `rdma` feature, else shm on one host, TCP across hosts), and
//! [`threads_world`] joins a world of threads through a real rendezvous on loopback.
use super::config::{JoinConfig, Rendezvous, Transport};
use super::port::free_port;
use super::rendezvous::{hostname, join, listen_ip, serve, Entry};
use crate::agree::agree;
use crate::auth::new_token;
use crate::comm::Comm;
use crate::error::{Error, Result};
use crate::fabric::Fabric;
#[cfg(feature = "rdma")]
use crate::rdma::join::rdma_over;
use crate::rdma::join::rdma_port;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

impl Comm {
    /// Join the job described by the launcher's environment (`JoinConfig::from_env`).
    pub fn from_env() -> Result<Comm> {
        Comm::connect(&JoinConfig::from_env()?)
    }

    /// Join a multi-process job: rendezvous, then build the chosen backend (see [`Transport`]).
    pub fn connect(cfg: &JoinConfig) -> Result<Comm> {
        match cfg.transport {
            Transport::Rdma if !cfg!(feature = "rdma") => return Err(Error::NotBuilt("rdma".into())),
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
            Transport::Rdma => match rdma_over(&host, cfg.local_rank, cfg.timeout)? {
                Ok(c) => Ok(c),
                Err(why) => Err(Error::Bootstrap(format!("transport 'rdma': {why}"))),
            },
            Transport::Auto => {
                #[cfg(feature = "rdma")]
                {
                    let here = rdma_port(cfg.local_rank).map(|_| ());
                    let why = match agree(&host, here)? {
                        Ok(()) => match rdma_over(&host, cfg.local_rank, cfg.timeout)? {
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
            let mine = if f.staged_forced() { Err("EMBER_SHM_COPY=staged".to_string()) } else { f.probe_cma() };
            let verdict = agree(&c, mine)?;
            f.use_cma(verdict.is_ok());
            f.unlink_inbox();
            let unasked = verdict.is_err() && !f.staged_forced();
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
