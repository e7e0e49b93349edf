//! RDMA transport, protocol half: the all-to-all protocol written once against a small
//! verbs-like interface ([`verbs::Verbs`]), and an adversarial in-process emulation of that
//! interface ([`emu`]) on which it is tested. The libibverbs binding is [`ib`] (cargo feature
//! `rdma`); [`join`] builds the RDMA communicator over the job's shm/TCP one, exchanging the
//! connection entries of [`wire`]. See docs/transport.md, section "RDMA", and docs/rdma.md.
pub mod emu;
#[cfg(feature = "rdma")]
pub mod ib;
pub mod join;
pub mod proto;
pub mod verbs;
pub mod wire;

pub use emu::{DeviceMem, EmuConfig, EmuVerbs, Fault};
#[cfg(feature = "rdma")]
pub use ib::{IbConfig, IbVerbs, PortInfo};
pub use proto::{RdmaConfig, RdmaFabric, RemoteSlots};

use crate::comm::Comm;
use crate::error::Result;
use std::sync::Arc;
use std::time::Duration;

/// Exports device memory as a dma-buf, for NICs that register GPU memory through dma-buf
/// (`ibv_reg_dmabuf_mr`) rather than `nvidia-peermem`: `Some(Ok((fd, offset)))` is a new file
/// descriptor (the caller closes it) for a range that holds `[addr, +len)` at `offset`; `None`:
/// `addr` is not device memory (or no GPU library is loaded). Set once by the CUDA backend.
pub type DmabufExporter = fn(addr: u64, len: usize) -> Option<std::result::Result<(i32, u64), String>>;

static DMABUF_EXPORTER: std::sync::OnceLock<DmabufExporter> = std::sync::OnceLock::new();

/// Install the dma-buf exporter (the first call wins; later calls are ignored).
pub fn set_dmabuf_exporter(f: DmabufExporter) {
    let _ = DMABUF_EXPORTER.set(f);
}

#[cfg_attr(not(feature = "rdma"), allow(dead_code))]
pub(crate) fn dmabuf_exporter() -> Option<DmabufExporter> {
    DMABUF_EXPORTER.get().copied()
}

/// `n` ranks (threads of this process) running the RDMA protocol over emulated verbs.
/// Transport name: "rdma-emu".
pub fn emu_world(n: usize, emu: EmuConfig, cfg: RdmaConfig, timeout: Duration) -> Result<Vec<Comm>> {
    let fabs = emu::world(n, emu)
        .into_iter()
        .map(|v| RdmaFabric::new(v, cfg, "rdma-emu"))
        .collect::<Result<Vec<_>>>()?;
    // The "bootstrap": every rank learns the slots each peer reserved for it.
    for (r, f) in fabs.iter().enumerate() {
        let remote: Vec<Option<RemoteSlots>> = (0..n).map(|p| (p != r).then(|| fabs[p].slots_for(r))).collect();
        f.connect(&remote)?;
    }
    Ok(fabs.into_iter().map(|f| Comm::from_fabric(Arc::new(f), timeout)).collect())
}
