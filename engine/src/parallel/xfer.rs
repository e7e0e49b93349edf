//! How the 2D step's buffers travel between the ranks of one communicator: all-to-all-v,
//! all-gather, reduce-scatter and all-reduce (sums) on backend buffers (`B::Buf`), which live
//! in host memory for the CPU backend and in device memory for CUDA.
//!
//! * [`Xfer::Host`] — through the host transport (`Comm`: in-process, shm, TCP, RDMA). Zero-copy
//!   where the backend keeps buffers in host memory; otherwise staged through host memory
//!   (download, collective, upload): the universal path for device buffers.
//! * [`Xfer::Peers`] — ranks that are threads of one process and share one address space (host
//!   memory, or one GPU's CUDA context when several in-process ranks share a device) publish
//!   their send buffers' addresses over the host communicator and copy their blocks straight out
//!   of the peers' buffers (device to device on a GPU); a barrier closes each collective so no
//!   buffer is reused while a peer may still read it. Reductions add the ranks' blocks in rank
//!   order, as the host transport does, so both paths give bitwise the same result.
//! * [`Xfer::Native`] — the backend's own collectives on its buffers (NCCL on CUDA, one rank
//!   per GPU, across processes), ordered on the rank's stream; NCCL's reduction order is its own.
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
            o => Err(Error::Config(format!("unknown buffer transport '{o}' (auto, host, staged, peers, nccl)"))),
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
}

impl Xfer {
    /// `Auto`: device buffers of ranks that are threads of one process go peer to peer; all
    /// else goes through the host transport. `Peers` across processes is refused.
    pub fn resolve<B: Backend>(kind: XferKind, be: &B, comm: &Comm) -> Result<Xfer> {
        let in_process = comm.transport() == "local";
        let on_host = be.host(&be.zeros(0)?).is_some();
        match kind {
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
            XferKind::Auto if in_process && !on_host => Ok(Xfer::Peers),
            XferKind::Auto if !on_host && be.native().is_some() => Ok(Xfer::Native),
            XferKind::Auto => Ok(Xfer::Host { stage: false }),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Xfer::Host { .. } => "host",
            Xfer::Peers => "peers",
            Xfer::Native => "native",
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
                let s = be.download(send)?;
                let mut r = vec![0.0f32; be.len(recv)];
                comm.all_to_all_v(&s, scounts, &mut r, rcounts)?;
                *recv = be.upload(&r)?;
                Ok(())
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
                let s = be.download(send)?;
                let mut r = vec![0.0f32; n * len];
                comm.all_gather(&s, &mut r)?;
                *recv = be.upload(&r)?;
                Ok(())
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
                let s = be.download(send)?;
                let mut r = vec![0.0f32; blk];
                comm.reduce_scatter(&s, &mut r, ReduceOp::Sum)?;
                *recv = be.upload(&r)?;
                Ok(())
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
                let mut h = be.download(buf)?;
                comm.all_reduce(&mut h, ReduceOp::Sum)?;
                *buf = be.upload(&h)?;
                Ok(())
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
        }
    }
}

fn native<B: Backend>(be: &B) -> Result<&dyn crate::backend::NativeColl<B>> {
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
