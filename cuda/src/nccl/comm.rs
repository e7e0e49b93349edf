//! One rank of an NCCL communicator on a CUDA stream, and its collectives: all-to-all (grouped
//! send/recv), all-reduce, reduce-scatter and all-gather. Waits poll the stream and NCCL's
//! asynchronous error, and abort the communicator at that error or at the job's timeout.
use super::error::{de, describe, guard, Fail};
use super::id::{exchange_id, NcclId};
use super::library::{panic_text, probe};
use super::memory::{DeviceMem, NcclDevice};
use crate::device::DevResult;
use cudarc::driver::CudaStream;
use cudarc::nccl::{result as nr, sys as ns, NcclType};
use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Reduction operators.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NcclOp {
    Sum,
    Prod,
    Max,
    Min,
    /// NCCL >= 2.10.
    Avg,
}

impl NcclOp {
    fn sys(self) -> ns::ncclRedOp_t {
        match self {
            NcclOp::Sum => ns::ncclRedOp_t::ncclSum,
            NcclOp::Prod => ns::ncclRedOp_t::ncclProd,
            NcclOp::Max => ns::ncclRedOp_t::ncclMax,
            NcclOp::Min => ns::ncclRedOp_t::ncclMin,
            NcclOp::Avg => ns::ncclRedOp_t::ncclAvg,
        }
    }
}

/// The longest timeout `EMBER_TIMEOUT_MS` may ask for: 7 days (the transport's limit,
/// `ember_transport::MAX_TIMEOUT`; this crate does not depend on the transport).
const MAX_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;

/// The job's timeout for waits on NCCL work: `EMBER_TIMEOUT_MS` (whole milliseconds, 1 to 7
/// days), else 60 s (the transport's default). Another value is an error naming the variable.
pub fn default_timeout() -> DevResult<Duration> {
    timeout_from(std::env::var_os("EMBER_TIMEOUT_MS"))
}

/// [`default_timeout`] for the value `v` of `EMBER_TIMEOUT_MS` (`None`: unset).
fn timeout_from(v: Option<std::ffi::OsString>) -> DevResult<Duration> {
    let Some(v) = v else { return Ok(Duration::from_secs(60)) };
    let digits = v.to_str().map(str::trim).filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
    match digits.and_then(|s| s.parse::<u64>().ok()) {
        Some(ms) if (1..=MAX_TIMEOUT_MS).contains(&ms) => Ok(Duration::from_millis(ms)),
        _ => Err(format!("EMBER_TIMEOUT_MS={v:?}: not a whole number of milliseconds from 1 to {MAX_TIMEOUT_MS}")),
    }
}

/// One rank of an NCCL communicator, bound to a CUDA stream. Every operation is enqueued on that
/// stream and returns at once (as NCCL does); [`sync`](Self::sync) waits. Buffers must stay alive
/// until the stream has run the operation.
pub struct NcclComm {
    /// Null once aborted.
    comm: Cell<ns::ncclComm_t>,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    /// How long `sync` and `Drop` wait before aborting.
    timeout: Duration,
    /// Why the communicator was aborted (every later call fails with it).
    aborted: RefCell<Option<String>>,
}

// SAFETY: an NCCL communicator may be used from any thread, one at a time (&mut-free API, but
// NcclComm is not Sync, so two threads never call it at once).
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Join communicator `id` as `rank` of `size` (`ncclCommInitRank`: blocks until every rank has
    /// joined). Operations run on `stream` (e.g. `gpu.stream.clone()` or `dev.stream.clone()`).
    /// One rank per GPU: NCCL refuses two ranks on one device.
    pub fn new(stream: Arc<CudaStream>, rank: usize, size: usize, id: &NcclId) -> DevResult<NcclComm> {
        probe()?;
        let timeout = default_timeout()?;
        if size == 0 || rank >= size || size > i32::MAX as usize {
            return Err(format!("NCCL communicator: rank {rank} of {size} is not a valid rank"));
        }
        stream.context().bind_to_thread().map_err(de("binding the CUDA context"))?;
        let mut comm: ns::ncclComm_t = std::ptr::null_mut();
        let sys_id = id.to_sys();
        // SAFETY: `comm` is written by NCCL; the id is a value.
        guard(|| unsafe { nr::comm_init_rank(&mut comm, size as i32, sys_id, rank as i32) }).map_err(|f| {
            describe(
                &format!("ncclCommInitRank (rank {rank} of {size}, device {})", stream.context().ordinal()),
                f,
                std::ptr::null_mut(),
            )
        })?;
        Ok(NcclComm { comm: Cell::new(comm), stream, rank, size, timeout, aborted: RefCell::new(None) })
    }

    /// Rank 0 creates the id, `broadcast` moves the bytes from rank 0 to every rank (e.g.
    /// `|b| comm.broadcast(b, 0).map_err(|e| e.to_string())` with an `ember_transport::Comm`),
    /// then every rank joins ([`exchange_id`] + [`new`](Self::new)).
    pub fn init_with(stream: Arc<CudaStream>, rank: usize, size: usize, broadcast: impl FnOnce(&mut [u8]) -> Result<(), String>) -> DevResult<NcclComm> {
        // A bad EMBER_TIMEOUT_MS fails this rank before it takes part in the exchange.
        default_timeout()?;
        let id = exchange_id(rank, broadcast)?;
        NcclComm::new(stream, rank, size, &id)
    }

    /// The 1-rank communicator on device `ordinal`, with its device: the smoke test's setup.
    /// Probes NCCL before the device, so a machine without libnccl hears about libnccl.
    pub fn single(ordinal: usize) -> DevResult<(NcclDevice, NcclComm)> {
        probe()?;
        let dev = NcclDevice::open(ordinal)?;
        let id = NcclId::new()?;
        let c = NcclComm::new(dev.stream.clone(), 0, 1, &id)?;
        Ok((dev, c))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn size(&self) -> usize {
        self.size
    }
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// How long [`sync`](Self::sync) and `Drop` wait for the stream before they abort (default:
    /// [`default_timeout`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Wait until every operation enqueued so far has run. Polls the stream and NCCL's
    /// asynchronous error meanwhile (no blocking driver call): at an asynchronous error (a peer
    /// died, the network failed) or after the timeout, the communicator is aborted
    /// (`ncclCommAbort`: its kernels return, so the stream drains) and this and every later
    /// call is an error saying why.
    pub fn sync(&self) -> DevResult<()> {
        self.wait("sync")
    }

    /// The live communicator, or why it was aborted.
    fn live(&self, what: &str) -> DevResult<ns::ncclComm_t> {
        if let Some(why) = self.aborted.borrow().as_ref() {
            return Err(format!("NCCL {what}: the communicator was aborted: {why}"));
        }
        Ok(self.comm.get())
    }

    /// NCCL's asynchronous error of `c`, if there is one (a failed query counts as one).
    fn async_error(c: ns::ncclComm_t) -> Option<Fail> {
        let mut e = ns::ncclResult_t::ncclSuccess;
        // SAFETY: `c` is a live communicator; NCCL writes the result into `e`.
        let r = catch_unwind(AssertUnwindSafe(|| unsafe { ns::ncclCommGetAsyncError(c, &mut e) }));
        match r {
            Err(p) => Some(Fail::Panic(panic_text(p))),
            Ok(ns::ncclResult_t::ncclSuccess) => match e {
                ns::ncclResult_t::ncclSuccess | ns::ncclResult_t::ncclInProgress => None,
                other => Some(Fail::Nccl(other)),
            },
            Ok(other) => Some(Fail::Nccl(other)),
        }
    }

    /// Abort the communicator for good (`why` is what every later call reports).
    fn abort_with(&self, why: String) {
        let c = self.comm.replace(std::ptr::null_mut());
        *self.aborted.borrow_mut() = Some(why);
        if !c.is_null() {
            let _ = self.bind();
            // SAFETY: `c` is a live communicator, aborted once.
            let _ = catch_unwind(AssertUnwindSafe(|| unsafe { nr::comm_abort(c) }));
        }
    }

    /// Poll until the stream has run everything enqueued (see [`sync`](Self::sync)): yielding
    /// between looks for 2 ms, then sleeping 50 µs doubling to 1 ms.
    fn wait(&self, what: &str) -> DevResult<()> {
        use cudarc::driver::sys::{cuStreamQuery, cudaError_enum};
        let c = self.live(what)?;
        self.bind()?;
        let start = Instant::now();
        let mut pause = Duration::from_micros(50);
        loop {
            // SAFETY: a query of our own stream.
            let q = catch_unwind(AssertUnwindSafe(|| unsafe { cuStreamQuery(self.stream.cu_stream()) }));
            let failed = match q {
                Ok(cudaError_enum::CUDA_SUCCESS) => match Self::async_error(c) {
                    None => return Ok(()),
                    Some(f) => describe(&format!("{what}: asynchronous error"), f, c),
                },
                Ok(cudaError_enum::CUDA_ERROR_NOT_READY) => match Self::async_error(c) {
                    None if start.elapsed() < self.timeout => {
                        if start.elapsed() < Duration::from_millis(2) {
                            std::thread::yield_now();
                        } else {
                            std::thread::sleep(pause);
                            pause = (pause * 2).min(Duration::from_millis(1));
                        }
                        continue;
                    }
                    None => format!(
                        "NCCL {what}: the stream did not finish within the timeout of {:?} (a rank died or stalled; EMBER_TIMEOUT_MS)",
                        self.timeout
                    ),
                    Some(f) => describe(&format!("{what}: asynchronous error"), f, c),
                },
                Ok(e) => format!("NCCL {what}: the stream failed: {e:?}"),
                Err(p) => format!("NCCL {what}: the CUDA driver is not usable ({})", panic_text(p)),
            };
            self.abort_with(failed.clone());
            return Err(failed + " [the communicator was aborted]");
        }
    }

    fn bind(&self) -> DevResult<()> {
        self.stream.context().bind_to_thread().map_err(de("binding the CUDA context"))
    }

    fn cu_stream(&self) -> ns::cudaStream_t {
        self.stream.cu_stream() as ns::cudaStream_t
    }

    fn err(&self, what: &str, f: Fail) -> String {
        describe(what, f, self.comm.get())
    }

    /// All-to-all with per-peer counts (elements): block `p` of `send` (blocks in rank order, at
    /// the prefix sum of `send_counts`) goes to rank `p`, and block `p` of `recv` comes from rank
    /// `p`. One NCCL group of `ncclSend`/`ncclRecv`, peers in the order `rank + s` / `rank - s`
    /// (s = 0..size, so each rank starts with itself and then walks the ring in its own order).
    /// `send_counts[p]` here must equal `recv_counts[rank]` on rank `p`; zero blocks are skipped.
    pub fn all_to_all_v<T: NcclType>(
        &self,
        send: &impl DeviceMem<T>,
        send_counts: &[usize],
        recv: &mut impl DeviceMem<T>,
        recv_counts: &[usize],
    ) -> DevResult<()> {
        const OP: &str = "all_to_all_v";
        let (n, me) = (self.size, self.rank);
        if send_counts.len() != n || recv_counts.len() != n {
            return Err(format!(
                "NCCL {OP}: {} send and {} receive counts for {n} ranks",
                send_counts.len(),
                recv_counts.len()
            ));
        }
        let (st, rt) = (send_counts.iter().sum::<usize>(), recv_counts.iter().sum::<usize>());
        if st > send.dev_len() || rt > recv.dev_len() {
            return Err(format!(
                "NCCL {OP}: counts need {st} send / {rt} receive elements, buffers hold {} / {}",
                send.dev_len(),
                recv.dev_len()
            ));
        }
        if send_counts[me] != recv_counts[me] {
            return Err(format!(
                "NCCL {OP}: rank {me} sends {} elements to itself but expects {}",
                send_counts[me], recv_counts[me]
            ));
        }
        let offsets = |c: &[usize]| -> Vec<usize> {
            c.iter()
                .scan(0usize, |acc, &x| {
                    let o = *acc;
                    *acc += x;
                    Some(o)
                })
                .collect()
        };
        let (so, ro) = (offsets(send_counts), offsets(recv_counts));
        let es = std::mem::size_of::<T>() as u64;
        let (sb, rb) = (send.dev_ptr(), recv.dev_ptr());
        let ty = T::as_nccl_type();
        let stream = self.cu_stream();
        let comm = self.live(OP)?;
        self.bind()?;
        guard(nr::group_start).map_err(|f| self.err(&format!("{OP} (ncclGroupStart)"), f))?;
        let mut first: Option<String> = None;
        for s in 0..n {
            let (to, from) = ((me + s) % n, (me + n - s) % n);
            if send_counts[to] > 0 {
                let p = (sb + so[to] as u64 * es) as *const std::ffi::c_void;
                // SAFETY: the block lies inside `send` (checked above).
                if let Err(f) = guard(|| unsafe { nr::send(p, send_counts[to], ty, to as i32, comm, stream) }) {
                    first = Some(self.err(&format!("{OP} (ncclSend of {} elements to rank {to})", send_counts[to]), f));
                    break;
                }
            }
            if recv_counts[from] > 0 {
                let p = (rb + ro[from] as u64 * es) as *mut std::ffi::c_void;
                // SAFETY: the block lies inside `recv` (checked above), which we borrow mutably.
                if let Err(f) = guard(|| unsafe { nr::recv(p, recv_counts[from], ty, from as i32, comm, stream) }) {
                    first = Some(self.err(&format!("{OP} (ncclRecv of {} elements from rank {from})", recv_counts[from]), f));
                    break;
                }
            }
        }
        // The group must be closed even after a failed call.
        let end = guard(nr::group_end).map_err(|f| self.err(&format!("{OP} (ncclGroupEnd)"), f));
        match first {
            Some(e) => Err(e),
            None => end.map(|_| ()),
        }
    }

    /// All-to-all with `count` elements per peer (`send` and `recv` hold `size * count`).
    pub fn all_to_all<T: NcclType>(&self, send: &impl DeviceMem<T>, recv: &mut impl DeviceMem<T>, count: usize) -> DevResult<()> {
        let c = vec![count; self.size];
        self.all_to_all_v(send, &c, recv, &c)
    }

    /// Element-wise reduction of every rank's `send` into every rank's `recv` (same length).
    pub fn all_reduce<T: NcclType>(&self, send: &impl DeviceMem<T>, recv: &mut impl DeviceMem<T>, op: NcclOp) -> DevResult<()> {
        if send.dev_len() != recv.dev_len() {
            return Err(format!("NCCL all_reduce: send has {} elements, recv {}", send.dev_len(), recv.dev_len()));
        }
        self.all_reduce_raw::<T>(send.dev_ptr(), recv.dev_ptr(), send.dev_len(), op, "all_reduce")
    }

    /// In-place all-reduce.
    pub fn all_reduce_in_place<T: NcclType>(&self, buf: &mut impl DeviceMem<T>, op: NcclOp) -> DevResult<()> {
        self.all_reduce_raw::<T>(buf.dev_ptr(), buf.dev_ptr(), buf.dev_len(), op, "all_reduce_in_place")
    }

    fn all_reduce_raw<T: NcclType>(&self, s: u64, r: u64, count: usize, op: NcclOp, what: &str) -> DevResult<()> {
        if count == 0 {
            return Ok(());
        }
        let comm = self.live(what)?;
        self.bind()?;
        let stream = self.cu_stream();
        // SAFETY: both ranges hold `count` elements (checked by the callers).
        guard(|| unsafe { nr::all_reduce(s as *const _, r as *mut _, count, T::as_nccl_type(), op.sys(), comm, stream) })
            .map(|_| ())
            .map_err(|f| self.err(&format!("{what} ({count} elements, {op:?})"), f))
    }

    /// Reduce every rank's `send` (`size` blocks of `recv.len()` elements) and leave block `rank`
    /// of the result in `recv`.
    pub fn reduce_scatter<T: NcclType>(&self, send: &impl DeviceMem<T>, recv: &mut impl DeviceMem<T>, op: NcclOp) -> DevResult<()> {
        let count = recv.dev_len();
        if send.dev_len() != count * self.size {
            return Err(format!(
                "NCCL reduce_scatter: send has {} elements, expected {} ranks x {count}",
                send.dev_len(),
                self.size
            ));
        }
        if count == 0 {
            return Ok(());
        }
        let comm = self.live("reduce_scatter")?;
        self.bind()?;
        let (s, r, stream) = (send.dev_ptr(), recv.dev_ptr(), self.cu_stream());
        // SAFETY: sizes checked above.
        guard(|| unsafe { nr::reduce_scatter(s as *const _, r as *mut _, count, T::as_nccl_type(), op.sys(), comm, stream) })
            .map(|_| ())
            .map_err(|f| self.err(&format!("reduce_scatter ({count} elements per rank, {op:?})"), f))
    }

    /// Concatenate every rank's `send` (in rank order) into every rank's `recv`.
    pub fn all_gather<T: NcclType>(&self, send: &impl DeviceMem<T>, recv: &mut impl DeviceMem<T>) -> DevResult<()> {
        let count = send.dev_len();
        if recv.dev_len() != count * self.size {
            return Err(format!(
                "NCCL all_gather: recv has {} elements, expected {} ranks x {count}",
                recv.dev_len(),
                self.size
            ));
        }
        if count == 0 {
            return Ok(());
        }
        let comm = self.live("all_gather")?;
        self.bind()?;
        let (s, r, stream) = (send.dev_ptr(), recv.dev_ptr(), self.cu_stream());
        // SAFETY: sizes checked above.
        guard(|| unsafe { nr::all_gather(s as *const _, r as *mut _, count, T::as_nccl_type(), comm, stream) })
            .map(|_| ())
            .map_err(|f| self.err(&format!("all_gather ({count} elements per rank)"), f))
    }

    /// Tear the communicator down without waiting for peers (after an error).
    pub fn abort(self) {
        self.abort_with("aborted by the caller".into());
    }
}

impl Drop for NcclComm {
    /// Waits for the enqueued work as [`sync`](NcclComm::sync) does (aborting at an asynchronous
    /// error or the timeout), then destroys the communicator.
    fn drop(&mut self) {
        if self.comm.get().is_null() || self.wait("drop").is_err() {
            return; // aborted
        }
        let c = self.comm.replace(std::ptr::null_mut());
        // SAFETY: a live communicator, destroyed once, its work finished.
        let _ = catch_unwind(AssertUnwindSafe(|| unsafe { nr::comm_destroy(c) }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_variable_is_checked() {
        assert_eq!(timeout_from(None).unwrap(), Duration::from_secs(60));
        assert_eq!(timeout_from(Some("1500".into())).unwrap(), Duration::from_millis(1500));
        assert_eq!(timeout_from(Some("604800000".into())).unwrap(), Duration::from_secs(7 * 24 * 3600));
        for bad in ["0", "604800001", "18446744073709551615", "-1", "60s", ""] {
            let e = timeout_from(Some(bad.into())).unwrap_err();
            assert!(e.contains("EMBER_TIMEOUT_MS") && e.contains("milliseconds from 1 to 604800000"), "{bad:?}: {e}");
        }
    }
}
