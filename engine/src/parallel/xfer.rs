//! How the 2D step's buffers travel between the ranks of one communicator: all-to-all-v,
//! all-gather, reduce-scatter and all-reduce (sums) on backend buffers (`B::Buf`), which live
//! in host memory for the CPU backend and in device memory for CUDA.
//!
//! * [`Xfer::Host`] — through the host transport (`Comm`: in-process, shm, TCP, RDMA). Zero-copy
//!   where the backend keeps buffers in host memory; otherwise staged through the backend's
//!   staging memory (pinned host memory from a pool on CUDA: download, collective on it,
//!   upload): the universal path for device buffers.
//! * [`Xfer::Peers`] — ranks that are threads of one process and share one address space (host
//!   memory, or one GPU's CUDA context when several in-process ranks share a device) publish
//!   their send buffers' addresses over the host communicator and copy their blocks straight out
//!   of the peers' buffers (device to device on a GPU); a barrier closes each collective so no
//!   buffer is reused while a peer may still read it. Reductions add the ranks' blocks in rank
//!   order, as the host transport does, so both paths give bitwise the same result.
//! * [`Xfer::Direct`] — GPUDirect RDMA: the RDMA transport moves the buffers themselves, the NIC
//!   reading and writing device memory (registered with the NIC's driver), the CPU touching none
//!   of it; the own block is a device copy, and reductions are an all-to-all into a scratch
//!   buffer summed on the device in rank order, then an all-gather: bitwise the host path's
//!   result. Needs RDMA and a NIC driver that registers device memory (`nvidia-peermem`).
//! * [`Xfer::Native`] — the backend's own collectives on its buffers (NCCL on CUDA, one rank
//!   per GPU, across processes), ordered on the rank's stream; NCCL's reduction order is its own.
//!
//! `auto` for device buffers: peers for in-process ranks; across processes GPUDirect RDMA when
//! every rank registers device memory with its NIC, else NCCL, else staging through host memory.
//! Rank 0 logs the choice and why (`EMBER_LOG=info`).
use crate::backend::Backend;
use crate::{Error, Result};
use ember_transport::{Comm, ReduceOp};
use serde::{Deserialize, Serialize};

/// Which path a run asks for (`--xfer`); [`Xfer::resolve`] turns `Auto` into a path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XferKind {
    /// Peers for device buffers of in-process ranks; the backend's native collectives (NCCL)
    /// for device buffers of ranks in separate processes; else Host.
    #[default]
    Auto,
    Host,
    /// The host path, always copying through host vectors as it does for device buffers (so
    /// the staging path is exercised, and measured, on the CPU backend too).
    Staged,
    Peers,
    /// The backend's native collectives (NCCL).
    Nccl,
    /// GPUDirect RDMA: the RDMA transport on the buffers themselves.
    Direct,
}

impl std::str::FromStr for XferKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(XferKind::Auto),
            "host" => Ok(XferKind::Host),
            "staged" => Ok(XferKind::Staged),
            "peers" => Ok(XferKind::Peers),
            "nccl" => Ok(XferKind::Nccl),
            "direct" => Ok(XferKind::Direct),
            o => Err(Error::Config(format!("unknown buffer transport '{o}' (auto, host, staged, peers, nccl, direct)"))),
        }
    }
}

/// The resolved path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Xfer {
    /// Through `Comm`; `stage` forces the download/upload path even for host buffers (tests).
    Host { stage: bool },
    Peers,
    Native,
    Direct,
}

impl Xfer {
    /// Resolve `kind` on this world communicator (collective: every rank calls it; `Auto` and
    /// `Direct` probe the NIC together). Rank 0 logs the path and why. `Peers` across processes,
    /// `Nccl` without NCCL and `Direct` without GPUDirect RDMA are refused with the reason.
    pub fn resolve<B: Backend>(kind: XferKind, be: &B, comm: &Comm) -> Result<Xfer> {
        let (x, why) = Self::choose(kind, be, comm)?;
        match x {
            // Device buffers (and `staged` ones) travel through the staging pool's blocks.
            Xfer::Host { .. } => be.register_staging(comm),
            // The NIC reads and writes the device pool's chunks.
            Xfer::Direct => be.register_device(comm),
            Xfer::Peers | Xfer::Native => {}
        }
        if comm.rank() == 0 {
            tracing::info!("buffer transport: {} ({why})", x.name());
        }
        Ok(x)
    }

    fn choose<B: Backend>(kind: XferKind, be: &B, comm: &Comm) -> Result<(Xfer, String)> {
        let in_process = comm.transport() == "local";
        let on_host = be.host(&be.zeros(0)?).is_some();
        let asked = |x| Ok((x, "asked for".to_string()));
        let x = match kind {
            XferKind::Host => Ok(Xfer::Host { stage: false }),
            XferKind::Staged => Ok(Xfer::Host { stage: true }),
            XferKind::Peers if !in_process => {
                Err(Error::Config(format!("peer-to-peer buffer transport needs in-process ranks; this job's transport is {}", comm.transport())))
            }
            XferKind::Peers => Ok(Xfer::Peers),
            XferKind::Nccl if be.native().is_none() => Err(Error::Config(
                "the NCCL buffer transport needs a CUDA build with `--features nccl` and libnccl.so loadable (docs/cuda.md)".into(),
            )),
            XferKind::Nccl if in_process => Err(Error::Config("NCCL takes one rank per GPU, one per process; in-process ranks use peers".into())),
            XferKind::Nccl => Ok(Xfer::Native),
            XferKind::Direct => match direct_probe(be, comm)? {
                Ok(()) => Ok(Xfer::Direct),
                Err(why) => Err(Error::Config(format!("GPUDirect RDMA buffer transport: {why}"))),
            },
            XferKind::Auto if on_host => return Ok((Xfer::Host { stage: false }, "host buffers".into())),
            XferKind::Auto if in_process => return Ok((Xfer::Peers, "device buffers of in-process ranks".into())),
            XferKind::Auto => return Ok(device_auto(direct_probe(be, comm)?, be.native().is_some())),
        };
        x.and_then(asked)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Xfer::Host { .. } => "host",
            Xfer::Peers => "peers",
            Xfer::Native => "native",
            Xfer::Direct => "direct",
        }
    }

    /// All-to-all-v: `send` holds `scounts[p]` floats for each group rank `p` in order; `recv`
    /// (exactly Σ rcounts floats) gets `rcounts[p]` from each.
    pub fn all_to_all_v<B: Backend>(&self, be: &B, comm: &Comm, send: &B::Buf, scounts: &[usize], recv: &mut B::Buf, rcounts: &[usize]) -> Result<()> {
        let n = comm.size();
        if scounts.len() != n || rcounts.len() != n || scounts.iter().sum::<usize>() > be.len(send) || rcounts.iter().sum::<usize>() != be.len(recv) {
            return Err(Error::Config(format!(
                "all_to_all_v: counts for {} / {} ranks (group of {n}) do not fit buffers of {} / {} floats",
                scounts.len(),
                rcounts.len(),
                be.len(send),
                be.len(recv)
            )));
        }
        match *self {
            Xfer::Host { stage } => {
                if !stage {
                    if let (Some(s), Some(r)) = (be.host(send), be.host_mut(recv)) {
                        return Ok(comm.all_to_all_v(s, scounts, r, rcounts)?);
                    }
                }
                let (s, mut r) = (stage_out(be, send)?, be.staging(be.len(recv))?);
                comm.all_to_all_v(&s, scounts, &mut r, rcounts)?;
                be.upload_into(&r, recv)
            }
            Xfer::Peers => {
                let me = comm.rank();
                let table = publish(be, comm, send, scounts)?;
                let mut dst = 0;
                for (p, (addr, offs, counts)) in table.iter().enumerate() {
                    if counts[me] != rcounts[p] {
                        return Err(Error::Transport(format!("all_to_all_v: group rank {p} sends {} floats here, {} expected", counts[me], rcounts[p])));
                    }
                    // SAFETY: the peer's buffer holds `counts` floats at `offs` (checked against
                    // its length when it published) and stays unchanged until the barrier below.
                    unsafe { be.copy_from_addr(addr + 4 * offs[me] as u64, recv, dst, counts[me])? };
                    dst += counts[me];
                }
                comm.barrier()?;
                Ok(())
            }
            Xfer::Native => native(be)?.all_to_all_v(comm, send, scounts, recv, rcounts),
            Xfer::Direct => direct_a2a(be, comm, send, scounts, recv, rcounts),
        }
    }

    /// All-gather of equal blocks: `recv` (n × len(send)) gets rank p's `send` at block p.
    pub fn all_gather<B: Backend>(&self, be: &B, comm: &Comm, send: &B::Buf, recv: &mut B::Buf) -> Result<()> {
        let (n, len) = (comm.size(), be.len(send));
        if be.len(recv) != n * len {
            return Err(Error::Config(format!("all_gather: {n} blocks of {len} floats into a buffer of {}", be.len(recv))));
        }
        match *self {
            Xfer::Host { stage } => {
                if !stage {
                    if let (Some(s), Some(r)) = (be.host(send), be.host_mut(recv)) {
                        return Ok(comm.all_gather(s, r)?);
                    }
                }
                let (s, mut r) = (stage_out(be, send)?, be.staging(n * len)?);
                comm.all_gather(&s, &mut r)?;
                be.upload_into(&r, recv)
            }
            Xfer::Peers => {
                let table = publish(be, comm, send, &[len])?;
                for (p, (addr, _, counts)) in table.iter().enumerate() {
                    if counts[0] != len {
                        return Err(Error::Transport(format!("all_gather: group rank {p} has {} floats, {len} here", counts[0])));
                    }
                    // SAFETY: as in all_to_all_v.
                    unsafe { be.copy_from_addr(*addr, recv, p * len, len)? };
                }
                comm.barrier()?;
                Ok(())
            }
            Xfer::Native => native(be)?.all_gather(comm, send, recv),
            Xfer::Direct => direct_gather(be, comm, send, &vec![len; n], recv),
        }
    }

    /// Reduce-scatter of sums: `send` is n equal blocks; `recv` gets Σ_p (rank p's block me),
    /// added in rank order.
    pub fn reduce_scatter_sum<B: Backend>(&self, be: &B, comm: &Comm, send: &B::Buf, recv: &mut B::Buf) -> Result<()> {
        let (n, blk) = (comm.size(), be.len(recv));
        if be.len(send) != n * blk {
            return Err(Error::Config(format!("reduce_scatter: {} floats is not {n} blocks of {blk}", be.len(send))));
        }
        match *self {
            Xfer::Host { stage } => {
                if !stage {
                    if let (Some(s), Some(r)) = (be.host(send), be.host_mut(recv)) {
                        return Ok(comm.reduce_scatter(s, r, ReduceOp::Sum)?);
                    }
                }
                let (s, mut r) = (stage_out(be, send)?, be.staging(blk)?);
                comm.reduce_scatter(&s, &mut r, ReduceOp::Sum)?;
                be.upload_into(&r, recv)
            }
            Xfer::Peers => {
                let me = comm.rank();
                let table = publish(be, comm, send, &[n * blk])?;
                let at = |p: usize| table[p].0 + 4 * (me * blk) as u64;
                let mut tmp = be.zeros(blk)?;
                // SAFETY: as in all_to_all_v (every peer published n × blk floats).
                unsafe {
                    be.copy_from_addr(at(0), recv, 0, blk)?;
                    for p in 1..n {
                        be.copy_from_addr(at(p), &mut tmp, 0, blk)?;
                        be.axpy(1.0, &tmp, recv)?;
                    }
                }
                comm.barrier()?;
                Ok(())
            }
            Xfer::Native => native(be)?.reduce_scatter_sum(comm, send, recv),
            Xfer::Direct => direct_reduce_scatter(be, comm, send, &vec![blk; n], recv),
        }
    }

    /// All-reduce of sums in place (rank order). Peers: every rank adds the whole buffers.
    pub fn all_reduce_sum<B: Backend>(&self, be: &B, comm: &Comm, buf: &mut B::Buf) -> Result<()> {
        let n = comm.size();
        match *self {
            Xfer::Host { stage } => {
                if !stage {
                    if let Some(h) = be.host_mut(buf) {
                        return Ok(comm.all_reduce(h, ReduceOp::Sum)?);
                    }
                }
                let mut h = stage_out(be, buf)?;
                comm.all_reduce(&mut h, ReduceOp::Sum)?;
                be.upload_into(&h, buf)
            }
            Xfer::Peers => {
                let len = be.len(buf);
                let table = publish(be, comm, buf, &[len])?;
                if let Some(p) = table.iter().position(|t| t.2[0] != len) {
                    return Err(Error::Transport(format!("all_reduce: group rank {p} has {} floats, {len} here", table[p].2[0])));
                }
                let mut acc = be.zeros(len)?;
                let mut tmp = be.zeros(len)?;
                // SAFETY: as in all_to_all_v.
                unsafe {
                    be.copy_from_addr(table[0].0, &mut acc, 0, len)?;
                    for t in &table[1..n] {
                        be.copy_from_addr(t.0, &mut tmp, 0, len)?;
                        be.axpy(1.0, &tmp, &mut acc)?;
                    }
                }
                comm.barrier()?;
                *buf = acc;
                Ok(())
            }
            Xfer::Native => native(be)?.all_reduce_sum(comm, buf),
            Xfer::Direct => {
                // As the host transport: reduce-scatter of even chunks, then all-gather.
                if n == 1 {
                    return Ok(());
                }
                let counts = ember_transport::split_evenly(be.len(buf), n);
                let mut mine = be.zeros(counts[comm.rank()])?;
                direct_reduce_scatter(be, comm, buf, &counts, &mut mine)?;
                direct_gather(be, comm, &mine, &counts, buf)
            }
        }
    }
}

/// `buf` copied into the backend's staging memory (pinned host memory on CUDA, from its pool).
fn stage_out<B: Backend>(be: &B, buf: &B::Buf) -> Result<B::Staging> {
    let mut s = be.staging(be.len(buf))?;
    be.download_into(buf, &mut s)?;
    Ok(s)
}

/// `auto` for device buffers of ranks in separate processes, given whether GPUDirect RDMA is
/// usable on every rank and whether the backend has native (NCCL) collectives.
fn device_auto(direct: std::result::Result<(), String>, native: bool) -> (Xfer, String) {
    match direct {
        Ok(()) => (Xfer::Direct, "device buffers; every rank registers device memory with its NIC (GPUDirect RDMA)".into()),
        Err(why) if native => (Xfer::Native, format!("device buffers; no GPUDirect RDMA: {why}")),
        Err(why) => (Xfer::Host { stage: false }, format!("device buffers staged through host memory; no GPUDirect RDMA ({why}), no NCCL")),
    }
}

/// Whether every rank of `comm` can hand its device memory to the NIC (GPUDirect RDMA): each
/// registers a small buffer of this backend, then all agree. `Ok(Err(why))`: not usable, with
/// the first failing rank's reason.
fn direct_probe<B: Backend>(be: &B, comm: &Comm) -> Result<std::result::Result<(), String>> {
    let b = be.zeros(1024)?;
    let mine = comm.probe_direct(be.addr(&b), 4 * be.len(&b)).err().unwrap_or_default();
    let (all, counts) = comm.all_gather_alloc(mine.as_bytes())?;
    let mut off = 0;
    for (r, &c) in counts.iter().enumerate() {
        if c > 0 {
            return Ok(Err(format!("rank {r}: {}", String::from_utf8_lossy(&all[off..off + c]))));
        }
        off += c;
    }
    Ok(Ok(()))
}

/// Direct all-to-all-v (float counts): the NIC moves the peers' blocks, the backend copies the
/// own block. Queued device work that writes `send` finishes first; afterwards the NIC's writes
/// are flushed to the device, so the work queued next reads them.
fn direct_a2a<B: Backend>(be: &B, comm: &Comm, send: &B::Buf, scounts: &[usize], recv: &mut B::Buf, rcounts: &[usize]) -> Result<()> {
    be.synchronize()?;
    let (sb, rb): (Vec<usize>, Vec<usize>) = (scounts.iter().map(|c| 4 * c).collect(), rcounts.iter().map(|c| 4 * c).collect());
    let raddr = be.addr(recv);
    let own = |s: u64, d: u64, len: usize| unsafe { be.copy_from_addr(s, recv, ((d - raddr) / 4) as usize, len / 4) }.map_err(|e| ember_transport::Error::Bootstrap(e.to_string()));
    // SAFETY: `send` and `recv` hold the counts (checked by the callers) and outlive the call;
    // the own block is copied inside `recv` by the backend.
    unsafe { comm.all_to_all_v_direct(be.addr(send), &sb, raddr, &rb, own) }?;
    be.flush_remote_writes()
}

/// Direct all-gather-v: rank p's `counts[p]` floats (all of its `send`) at offset Σ counts[..p].
fn direct_gather<B: Backend>(be: &B, comm: &Comm, send: &B::Buf, counts: &[usize], recv: &mut B::Buf) -> Result<()> {
    if be.len(send) != counts[comm.rank()] || be.len(recv) != counts.iter().sum::<usize>() {
        return Err(Error::Config(format!("all_gather: {} floats here for counts {counts:?} into {}", be.len(send), be.len(recv))));
    }
    be.synchronize()?;
    let cb: Vec<usize> = counts.iter().map(|c| 4 * c).collect();
    let raddr = be.addr(recv);
    let own = |s: u64, d: u64, len: usize| unsafe { be.copy_from_addr(s, recv, ((d - raddr) / 4) as usize, len / 4) }.map_err(|e| ember_transport::Error::Bootstrap(e.to_string()));
    // SAFETY: as in direct_a2a (lengths checked above).
    unsafe { comm.all_gather_v_direct(be.addr(send), &cb, raddr, own) }?;
    be.flush_remote_writes()
}

/// Direct reduce-scatter of sums: chunk p (`counts[p]` floats of `send`) goes to rank p, which
/// adds the n contributions in rank order on the device.
fn direct_reduce_scatter<B: Backend>(be: &B, comm: &Comm, send: &B::Buf, counts: &[usize], recv: &mut B::Buf) -> Result<()> {
    let (n, mine) = (comm.size(), be.len(recv));
    if counts[comm.rank()] != mine || counts.iter().sum::<usize>() != be.len(send) {
        return Err(Error::Config(format!("reduce_scatter: counts {counts:?} for {} floats into {mine}", be.len(send))));
    }
    let mut parts = be.zeros(n * mine)?;
    direct_a2a(be, comm, send, counts, &mut parts, &vec![mine; n])?;
    be.copy_2d(&parts, 0, mine, recv, 0, mine, 1, mine)?;
    let mut t = be.zeros(mine)?;
    for p in 1..n {
        be.copy_2d(&parts, p * mine, mine, &mut t, 0, mine, 1, mine)?;
        be.axpy(1.0, &t, recv)?;
    }
    Ok(())
}

fn native<B: Backend>(be: &B) -> Result<&dyn crate::backend::NativeColl<B::Buf>> {
    be.native().ok_or_else(|| Error::Device(format!("backend {} has no native collectives", be.name())))
}

/// Peers: wait for this rank's queued work, then swap (address, block offsets, block counts)
/// of `buf` with every group rank. Each rank's counts are checked against its own buffer.
fn publish<B: Backend>(be: &B, comm: &Comm, buf: &B::Buf, counts: &[usize]) -> Result<Vec<(u64, Vec<usize>, Vec<usize>)>> {
    let k = counts.len();
    if counts.iter().sum::<usize>() > be.len(buf) {
        return Err(Error::Config(format!("{} floats published from a buffer of {}", counts.iter().sum::<usize>(), be.len(buf))));
    }
    be.synchronize()?;
    let mut msg = Vec::with_capacity(1 + 2 * k);
    msg.push(be.addr(buf));
    let mut off = 0u64;
    for &c in counts {
        msg.push(off);
        off += c as u64;
    }
    msg.extend(counts.iter().map(|&c| c as u64));
    let mut all = vec![0u64; msg.len() * comm.size()];
    comm.all_gather(&msg, &mut all)?;
    Ok(all
        .chunks(msg.len())
        .map(|m| (m[0], m[1..1 + k].iter().map(|&x| x as usize).collect(), m[1 + k..].iter().map(|&x| x as usize).collect()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_for_device_buffers_prefers_gpudirect_then_nccl_then_staging() {
        assert_eq!(device_auto(Ok(()), true).0, Xfer::Direct);
        assert_eq!(device_auto(Ok(()), false).0, Xfer::Direct);
        let (x, why) = device_auto(Err("rank 3: no RDMA device".into()), true);
        assert_eq!(x, Xfer::Native);
        assert!(why.contains("rank 3: no RDMA device"), "{why}");
        let (x, why) = device_auto(Err("rank 1: ibv_reg_mr: EFAULT".into()), false);
        assert_eq!(x, Xfer::Host { stage: false });
        assert!(why.contains("staged") && why.contains("EFAULT"), "{why}");
    }
}
