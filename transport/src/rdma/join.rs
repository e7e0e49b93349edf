//! Joining the RDMA fabric: whether this process can run RDMA ([`rdma_port`]), the protocol
//! geometry from the environment ([`rdma_config_from_vars`]), and (feature `rdma`) building the
//! RDMA communicator over the job's shm/TCP one.
//!
//! Over that communicator each rank opens its port, creates one RC queue pair per peer and
//! registers its receive slots; the ranks agree that every one of them succeeded (an all-gather
//! of error texts), swap per-peer connection data ([`super::wire::RdmaPeerInfo`]: QP number,
//! PSN, LID, GID, MTU, slot address/rkey/geometry) with one all-to-all, connect their QPs (INIT
//! -> RTR -> RTS), agree again, and run a first barrier over RDMA before the shm/TCP
//! communicator is dropped. See docs/rdma.md.
use super::proto::RdmaConfig;
use super::verbs::MAX_SLOTS;
#[cfg(feature = "rdma")]
use super::wire::{decode_rdma_table, RdmaPeerInfo, RDMA_INFO_LEN};
#[cfg(feature = "rdma")]
use crate::{agree::agree, comm::Comm, error::Result};

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

/// Protocol geometry from `EMBER_RDMA_SLOTS` (1 to [`MAX_SLOTS`]) and `EMBER_RDMA_CHUNK`
/// (bytes, 1 to 2^30), else the defaults; another value is an error naming the variable.
/// Every rank must use the same values (checked when connecting).
pub fn rdma_config_from_vars(get: impl Fn(&str) -> Option<String>) -> std::result::Result<RdmaConfig, String> {
    let d = RdmaConfig::default();
    let num = |k: &str, dflt: usize, max: usize, unit: &str| match crate::env::number(k, get(k), dflt as u64, 1..=max as u64, unit) {
        Ok(n) => Ok(n as usize),
        Err(crate::error::Error::Bootstrap(why)) => Err(why),
        Err(e) => Err(e.to_string()),
    };
    Ok(RdmaConfig { slots: num("EMBER_RDMA_SLOTS", d.slots, MAX_SLOTS, "slots")?, chunk: num("EMBER_RDMA_CHUNK", d.chunk, 1 << 30, "bytes")? })
}

/// Build the RDMA communicator over the shm/TCP one (`Err(why)`: the same on every rank, nothing
/// left half-connected; the outer error: the shm/TCP communicator failed).
#[cfg(feature = "rdma")]
pub(crate) fn rdma_over(host: &Comm, local_rank: usize, timeout: std::time::Duration) -> Result<std::result::Result<Comm, String>> {
    use super::ib::{IbConfig, IbVerbs, Queues};
    use super::verbs::MAX_RANKS;
    use super::RdmaFabric;
    let (me, n) = (host.rank(), host.size());
    let setup = (|| -> std::result::Result<(RdmaFabric<IbVerbs>, RdmaConfig), String> {
        let rcfg = rdma_config_from_vars(|k| std::env::var(k).ok())?;
        if n > MAX_RANKS {
            return Err(format!("{n} ranks: the RDMA protocol supports at most {MAX_RANKS}"));
        }
        let ib = IbConfig::from_env(local_rank)?;
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
    let comm = Comm::from_fabric(std::sync::Arc::new(fab), timeout);
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
