//! NCCL as the CUDA backend's native collectives (feature `nccl`): one NCCL communicator per
//! host communicator (keyed by its members' world ranks), created on first use — rank 0 makes
//! the unique id and the host communicator broadcasts it — and run on the rank's compute
//! stream, so each collective is ordered after the kernels that produced its input without a
//! host synchronisation. NCCL allows one rank per GPU: in-process ranks sharing a device use
//! the peer-to-peer path instead (`parallel::xfer`). It knows the device buffer type and the
//! stream, not the backend that owns it.
use crate::backend::NativeColl;
use crate::{Error, Result};
use ember_cuda::cudarc::driver::CudaStream;
use ember_cuda::device::DevBuf;
use ember_cuda::nccl::{NcclComm, NcclOp};
use ember_transport::Comm;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The NCCL communicators of one rank.
pub struct Nccl {
    stream: Arc<CudaStream>,
    comms: Mutex<HashMap<Vec<usize>, NcclComm>>,
}

impl Nccl {
    pub fn new(stream: Arc<CudaStream>) -> Nccl {
        Nccl { stream, comms: Mutex::new(HashMap::new()) }
    }

    /// Run `f` on the NCCL communicator of `comm`'s group, creating it on first use (every
    /// member reaches its first collective on a group at the same point of the step).
    fn with<R>(&self, comm: &Comm, f: impl FnOnce(&NcclComm) -> std::result::Result<R, String>) -> Result<R> {
        let mut map = self.comms.lock().map_err(|_| Error::Device("NCCL communicator table poisoned".into()))?;
        let key = comm.world_ranks().to_vec();
        if !map.contains_key(&key) {
            let c = NcclComm::init_with(self.stream.clone(), comm.rank(), comm.size(), |b| comm.broadcast(b, 0).map_err(|e| e.to_string()))
                .map_err(|e| Error::Device(format!("NCCL communicator for ranks {key:?}: {e}")))?;
            map.insert(key.clone(), c);
        }
        f(&map[&key]).map_err(Error::Device)
    }
}

impl NativeColl<DevBuf<f32>> for Nccl {
    fn name(&self) -> &'static str {
        "nccl"
    }
    fn all_to_all_v(&self, comm: &Comm, send: &DevBuf<f32>, scounts: &[usize], recv: &mut DevBuf<f32>, rcounts: &[usize]) -> Result<()> {
        self.with(comm, |c| c.all_to_all_v(send, scounts, recv, rcounts))
    }
    fn all_gather(&self, comm: &Comm, send: &DevBuf<f32>, recv: &mut DevBuf<f32>) -> Result<()> {
        self.with(comm, |c| c.all_gather(send, recv))
    }
    fn reduce_scatter_sum(&self, comm: &Comm, send: &DevBuf<f32>, recv: &mut DevBuf<f32>) -> Result<()> {
        self.with(comm, |c| c.reduce_scatter(send, recv, NcclOp::Sum))
    }
    fn all_reduce_sum(&self, comm: &Comm, buf: &mut DevBuf<f32>) -> Result<()> {
        self.with(comm, |c| c.all_reduce_in_place(buf, NcclOp::Sum))
    }
}
