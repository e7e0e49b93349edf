//! How the 2D step's buffers travel between the ranks of one communicator: all-to-all-v,
//! all-gather, reduce-scatter and all-reduce (sums) on backend buffers (`B::Buf`), which live
//! in host memory for the CPU backend and in device memory for CUDA.
//!
//! The collectives themselves are the transport's, written once (`ember_transport::Memory`);
//! a path only says where the bytes are and which fabric moves them:
//!
//! * [`Xfer::Host`] — host memory through the host transport (`Comm`: in-process, shm, TCP,
//!   RDMA). Zero-copy where the backend keeps buffers in host memory; otherwise staged through
//!   the backend's staging memory (pinned host memory from a pool on CUDA: download, collective
//!   on it, upload): the universal path for device buffers.
//! * [`Xfer::Peers`] — the buffers themselves ([`BufMem`]: the backend's copy and reduce hooks)
//!   moved by the in-process fabric, which copies each block straight into the receiver's buffer
//!   with the backend's device copy (ranks that are threads of one process sharing one address
//!   space: host memory, or one GPU's CUDA context).
//! * [`Xfer::Direct`] — the buffers themselves moved by the RDMA transport (GPUDirect RDMA: the
//!   NIC reads and writes device memory registered with its driver, the CPU touching none of
//!   it). Needs a NIC driver that registers device memory (`nvidia-peermem`).
//! * [`Xfer::Native`] — the backend's own collectives on its buffers (NCCL on CUDA, one rank
//!   per GPU, across processes), ordered on the rank's stream; NCCL's reduction order is its own.
//!
//! Every path but Native reduces in rank order in f32, so they agree bitwise. Replica sync's
//! all-reduce ([`Xfer::all_reduce_mean_f64`]) sums f32 payloads in f64 in rank order on every
//! path (Native stages it through host memory).
//!
//! `auto` for device buffers: peers for in-process ranks; across processes GPUDirect RDMA when
//! every rank registers device memory with its NIC, else NCCL, else staging through host memory.
//! Rank 0 logs the choice and why (`EMBER_LOG=info`).
use crate::backend::{Accumulate, Backend};
use crate::{Error, Result};
use ember_transport::{Comm, Memory, ReduceOp};
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
            // The in-process fabric copies this backend's buffers with its device copy.
            Xfer::Peers => comm.set_direct_copy(be.direct_copy())?,
            Xfer::Native => {}
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
        match self {
            Xfer::Native => native(be)?.all_to_all_v(comm, send, scounts, recv, rcounts),
            _ => self.run(be, comm, &Op::AllToAllV { send: bytes(scounts), recv: bytes(rcounts) }, Some(send), recv),
        }
    }

    /// All-gather of equal blocks: `recv` (n × len(send)) gets rank p's `send` at block p.
    pub fn all_gather<B: Backend>(&self, be: &B, comm: &Comm, send: &B::Buf, recv: &mut B::Buf) -> Result<()> {
        let (n, len) = (comm.size(), be.len(send));
        if be.len(recv) != n * len {
            return Err(Error::Config(format!("all_gather: {n} blocks of {len} floats into a buffer of {}", be.len(recv))));
        }
        match self {
            Xfer::Native => native(be)?.all_gather(comm, send, recv),
            _ => self.run(be, comm, &Op::AllGather(bytes(&vec![len; n])), Some(send), recv),
        }
    }

    /// Reduce-scatter of sums: `send` is n equal blocks; `recv` gets Σ_p (rank p's block me),
    /// added in rank order.
    pub fn reduce_scatter_sum<B: Backend>(&self, be: &B, comm: &Comm, send: &B::Buf, recv: &mut B::Buf) -> Result<()> {
        let (n, blk) = (comm.size(), be.len(recv));
        if be.len(send) != n * blk {
            return Err(Error::Config(format!("reduce_scatter: {} floats is not {n} blocks of {blk}", be.len(send))));
        }
        match self {
            Xfer::Native => native(be)?.reduce_scatter_sum(comm, send, recv),
            _ => self.run(be, comm, &Op::ReduceScatter(bytes(&vec![blk; n])), Some(send), recv),
        }
    }

    /// All-reduce of sums in place, added in rank order.
    pub fn all_reduce_sum<B: Backend>(&self, be: &B, comm: &Comm, buf: &mut B::Buf) -> Result<()> {
        match self {
            Xfer::Native => native(be)?.all_reduce_sum(comm, buf),
            _ => self.run(be, comm, &Op::AllReduce, None, buf),
        }
    }

    /// All-reduce the first `len` floats of `buf` in place as the mean summed in f64 (each f32
    /// widened, added in rank order, divided, rounded once: bitwise the f64 mean of the same
    /// values) — replica sync's collective. 4 bytes a value travel. The native collectives
    /// cannot sum in f64, so their path stages through host memory here.
    pub fn all_reduce_mean_f64<B: Backend>(&self, be: &B, comm: &Comm, buf: &mut B::Buf, len: usize) -> Result<()> {
        if len > be.len(buf) {
            return Err(Error::Config(format!("all_reduce_mean_f64: {len} floats of a buffer of {}", be.len(buf))));
        }
        let path = match self {
            Xfer::Native => Xfer::Host { stage: false },
            x => *x,
        };
        path.run_as(be, comm, &Op::AllReduce, None, buf, len, Accumulate::F64Mean)
    }

    /// Run `op` from `send` (None: in place) into `recv` on the memory this path moves, summing
    /// in f32 (the step's collectives).
    fn run<B: Backend>(&self, be: &B, comm: &Comm, op: &Op, send: Option<&B::Buf>, recv: &mut B::Buf) -> Result<()> {
        self.run_as(be, comm, op, send, recv, be.len(recv), Accumulate::F32Sum)
    }

    /// Run `op` from `send` (None: in place) into `recv` on the memory this path moves: host
    /// memory (the buffers themselves, or staging copies of them) or the buffers as the
    /// backend's memory ([`BufMem`]), reducing as `acc` says. An all-reduce covers the first
    /// `len` floats of `recv` (at most its length). The collective is the transport's either way.
    #[allow(clippy::too_many_arguments)]
    fn run_as<B: Backend>(&self, be: &B, comm: &Comm, op: &Op, send: Option<&B::Buf>, recv: &mut B::Buf, len: usize, acc: Accumulate) -> Result<()> {
        let host = match acc {
            Accumulate::F32Sum => ember_transport::Host::<f32>::reducing(ReduceOp::Sum),
            Accumulate::F64Mean => ember_transport::Host::<f32>::mean_in_f64(),
        };
        match *self {
            Xfer::Host { stage } => {
                if !stage {
                    // Zero-copy where the backend keeps the buffers in host memory.
                    let s = match send {
                        Some(s) => be.host(s).map(|h| Some(h.as_ptr() as u64)),
                        None => Some(None),
                    };
                    if let (Some(s), Some(r)) = (s, be.host_mut(recv)) {
                        let r = r.as_mut_ptr() as u64;
                        // SAFETY: host views of `send` and `recv`, borrowed for the call, sized by
                        // the caller's checks.
                        return Ok(unsafe { op.run(comm, &host, s.unwrap_or(r), r, len) }?);
                    }
                }
                // Only the `len` floats the collective covers travel (an all-reduce may cover
                // a prefix of `recv`; the other collectives cover all of it).
                let s = send.map(|s| stage_out(be, s)).transpose()?;
                let mut r = be.staging(len)?;
                if send.is_none() {
                    be.download_prefix_into(recv, &mut r)?;
                }
                let rp = r.as_mut_ptr() as u64;
                // SAFETY: staging copies of `send` and `recv`, owned here, sized as the buffers
                // (`len` at most `recv`'s length).
                unsafe { op.run(comm, &host, s.as_ref().map_or(rp, |s| s.as_ptr() as u64), rp, len) }?;
                be.upload_prefix_into(&r, recv)
            }
            Xfer::Peers | Xfer::Direct => {
                be.synchronize()?;
                let r = be.addr(recv);
                // SAFETY: `send` and `recv`, borrowed for the call, sized by the caller's checks
                // and finished with by the device (synchronized above).
                unsafe { op.run(comm, &BufMem::with(be, acc), send.map_or(r, |s| be.addr(s)), r, len) }?;
                be.flush_remote_writes()
            }
            Xfer::Native => Err(Error::Device("the native collectives are the backend's own".into())),
        }
    }
}

/// One of the step's collectives, counts in bytes, on any memory the transport moves.
enum Op {
    AllToAllV { send: Vec<usize>, recv: Vec<usize> },
    AllGather(Vec<usize>),
    ReduceScatter(Vec<usize>),
    /// In place on the receive buffer.
    AllReduce,
}

impl Op {
    /// Run on `mem` from address `send` into `recv` (`recv_len` floats).
    ///
    /// # Safety
    /// `send` and `recv` hold what the counts say (an all-reduce: `recv_len` floats at `recv`),
    /// memory of `mem`'s kind, valid and untouched by others until this returns.
    unsafe fn run<M: Memory>(&self, comm: &Comm, mem: &M, send: u64, recv: u64, recv_len: usize) -> ember_transport::Result<()> {
        // SAFETY: this function's contract.
        unsafe {
            match self {
                Op::AllToAllV { send: sc, recv: rc } => comm.all_to_all_v_in(mem, send, sc, recv, rc),
                Op::AllGather(counts) => comm.all_gather_v_in(mem, send, counts, recv),
                Op::ReduceScatter(counts) => comm.reduce_scatter_v_in(mem, send, counts, recv),
                Op::AllReduce => comm.all_reduce_in(mem, recv, recv_len, 4),
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

/// Float counts as byte counts.
fn bytes(counts: &[usize]) -> Vec<usize> {
    counts.iter().map(|c| 4 * c).collect()
}

/// A backend's buffers as the transport sees them: memory the CPU must not touch (whatever the
/// backend), copied and reduced by the backend's hooks (`copy_addr`; `sum_from` in rank order,
/// in f32 — bitwise the host transport's f32 sum — or in f64 for replica sync), with scratch from the backend's allocator (on
/// CUDA the device pool, whose chunks the NIC has registered for GPUDirect RDMA).
pub struct BufMem<'a, B: Backend> {
    be: &'a B,
    acc: Accumulate,
}

impl<'a, B: Backend> BufMem<'a, B> {
    /// Reduced as `acc` says (the step's collectives: f32 sums; replica sync: f64 mean).
    pub fn with(be: &'a B, acc: Accumulate) -> Self {
        BufMem { be, acc }
    }
}

fn transport_err(e: Error) -> ember_transport::Error {
    ember_transport::Error::Bootstrap(e.to_string())
}

impl<B: Backend> Memory for BufMem<'_, B> {
    type Scratch = B::Buf;
    fn direct(&self) -> bool {
        true
    }
    fn scratch(&self, len: usize) -> ember_transport::Result<B::Buf> {
        self.be.zeros(len / 4).map_err(transport_err)
    }
    fn base(&self, s: &mut B::Buf) -> *mut u8 {
        self.be.addr(s) as *mut u8
    }
    unsafe fn copy(&self, src: *const u8, dst: *mut u8, len: usize) -> ember_transport::Result<()> {
        // SAFETY: `Memory::copy`'s contract is `copy_addr`'s (whole floats of this backend's buffers).
        unsafe { self.be.copy_addr(src as u64, dst as u64, len / 4) }.map_err(transport_err)
    }
    unsafe fn reduce(&self, parts: *const u8, n: usize, len: usize, out: *mut u8) -> ember_transport::Result<()> {
        // What the NIC wrote into `parts` (GPUDirect RDMA) must be visible to the summation.
        self.be.flush_remote_writes().map_err(transport_err)?;
        // SAFETY: `Memory::reduce`'s contract is `sum_from`'s (whole floats of this backend's buffers).
        unsafe { self.be.sum_from(parts as u64, n, len / 4, out as u64, self.acc) }.map_err(transport_err)
    }
}

fn native<B: Backend>(be: &B) -> Result<&dyn crate::backend::NativeColl<B::Buf>> {
    be.native().ok_or_else(|| Error::Device(format!("backend {} has no native collectives", be.name())))
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
