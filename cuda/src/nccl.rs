//! The NCCL fallback: all-to-all (grouped send/recv), all-reduce, reduce-scatter and all-gather on
//! device buffers, through libnccl loaded at run time by cudarc (feature `nccl`).
//!
//! NCCL has no put/notify primitive, so this module implements the collectives directly on
//! NCCL's own calls: the one documented exception to "collectives written once" (docs/cuda.md,
//! "NCCL fallback").
//!
//! * [`probe`] loads libnccl and reads its version, without panicking; every constructor calls it
//!   first, so a missing library is an error that says what to do. cudarc 0.19 opens
//!   `libnccl.so` (and `.so.1`, `.so.9`–`.so.13`), not the `libnccl.so.2` that the PyPI wheel
//!   (`nvidia-nccl-cu13`) and Debian's `libnccl2` install: the error names the symlink to make.
//! * [`NcclId`]: the 128-byte unique id that rank 0 creates and the caller moves to the other ranks
//!   (through the job's bootstrap communicator: [`NcclComm::init_with`] takes the broadcast).
//! * [`NcclComm`]: one rank of an NCCL communicator on a CUDA stream (the engine's
//!   [`Gpu`](crate::device::Gpu) stream, or an [`NcclDevice`]'s). Buffers are anything that is
//!   [`DeviceMem`]: the engine's [`DevBuf`], this module's [`NcclBuf`], or a bounds-checked
//!   [`DevView`] into either. Operations are enqueued on the stream (asynchronous, like NCCL);
//!   [`NcclComm::sync`] waits, polling the stream and NCCL's asynchronous error (a dead peer)
//!   instead of blocking in the driver, and aborts the communicator (`ncclCommAbort`) at that
//!   error or at the job's timeout; `Drop` waits the same way.
//! * [`NcclDevice`]: a CUDA context and a non-blocking stream without the engine's kernels (no
//!   NVRTC, no cuBLAS needed), for the benchmark and the tests.
use crate::device::{DevBuf, DevResult};
use cudarc::driver::{result as dr, CudaContext, CudaStream};
use cudarc::nccl::{result as nr, sys as ns};
use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

pub use cudarc::nccl::NcclType;

/// Bytes in an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// Oldest NCCL this module accepts: grouped `ncclSend`/`ncclRecv` appeared in 2.7.
pub const MIN_VERSION: (u32, u32) = (2, 7);

/// What [`probe`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NcclInfo {
    /// `ncclGetVersion`'s code (e.g. 22809).
    pub code: i32,
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for NcclInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Decode `ncclGetVersion`'s code: `X*1000+Y*100+Z` up to 2.8, `X*10000+Y*100+Z` after.
pub fn decode_version(code: i32) -> NcclInfo {
    let c = code.max(0) as u32;
    let (major, minor, patch) = if c >= 10000 {
        (c / 10000, (c % 10000) / 100, c % 100)
    } else {
        (c / 1000, (c % 1000) / 100, c % 100)
    };
    NcclInfo { code, major, minor, patch }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Folders searched for a `libnccl.so.2` when `libnccl.so` does not load: `LD_LIBRARY_PATH`, then
/// the usual system folders.
fn library_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/lib64",
        "/usr/local/lib",
        "/usr/lib",
    ] {
        v.push(PathBuf::from(d));
    }
    v
}

/// The error when cudarc cannot open libnccl, given the folders to look in for a `libnccl.so.2`
/// (public for the tests; [`probe`] passes `LD_LIBRARY_PATH` and the system folders). When one is
/// there, or `libnccl.so.2` loads by name, the message gives the symlink to make.
pub fn missing_library_message(dirs: &[PathBuf], so2_loads: bool) -> String {
    let found = dirs.iter().map(|d| d.join("libnccl.so.2")).find(|p| p.exists());
    let fix_dir = "$HOME/.local/lib/ember-nccl";
    match (found, so2_loads) {
        (Some(p), _) => format!(
            "NCCL is installed as {} but cudarc 0.19 only opens libnccl.so (or .so.1, .so.9-.so.13): \
             run `mkdir -p {fix_dir} && ln -sf {} {fix_dir}/libnccl.so` and add {fix_dir} to LD_LIBRARY_PATH (docs/cuda.md, NCCL fallback)",
            p.display(),
            p.display()
        ),
        (None, true) => format!(
            "libnccl.so.2 loads but cudarc 0.19 only opens libnccl.so (or .so.1, .so.9-.so.13): symlink it, e.g. \
             `mkdir -p {fix_dir} && ln -sf $(ldconfig -p | awk '/libnccl.so.2 /{{print $NF; exit}}') {fix_dir}/libnccl.so`, \
             and add {fix_dir} to LD_LIBRARY_PATH (docs/cuda.md, NCCL fallback)"
        ),
        (None, false) => "no NCCL library: libnccl.so could not be loaded. Install NCCL (`pip install nvidia-nccl-cu13`, or the \
             libnccl2 package), symlink its libnccl.so.2 as libnccl.so in a folder on LD_LIBRARY_PATH (docs/cuda.md, NCCL fallback)"
            .to_string(),
    }
}

fn probe_uncached() -> DevResult<NcclInfo> {
    // SAFETY: only dlopens candidate names.
    let present = catch_unwind(|| unsafe { ns::is_culib_present() }).unwrap_or(false);
    if !present {
        // SAFETY: loading NCCL runs no user code beyond its initialisers; dropped at once.
        let so2 = catch_unwind(|| unsafe { libloading::Library::new("libnccl.so.2") }.is_ok()).unwrap_or(false);
        return Err(missing_library_message(&library_dirs(), so2));
    }
    let code = match catch_unwind(nr::get_nccl_version) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("ncclGetVersion failed: {:?}", e.0)),
        Err(p) => return Err(format!("libnccl loaded but is not usable: {}", panic_text(p))),
    };
    let v = decode_version(code);
    if (v.major, v.minor) < MIN_VERSION {
        return Err(format!(
            "NCCL {v} is too old: the fallback needs NCCL >= {}.{} (grouped ncclSend/ncclRecv)",
            MIN_VERSION.0, MIN_VERSION.1
        ));
    }
    Ok(v)
}

/// Load libnccl (once per process) and read its version. Never panics.
pub fn probe() -> DevResult<NcclInfo> {
    static P: OnceLock<DevResult<NcclInfo>> = OnceLock::new();
    P.get_or_init(probe_uncached).clone()
}

/// `ncclGetLastError` exists from NCCL 2.13 on.
fn has_last_error() -> bool {
    matches!(probe(), Ok(v) if (v.major, v.minor) >= (2, 13))
}

/// A failed NCCL call: its result code, or the panic of a missing symbol.
enum Fail {
    Nccl(ns::ncclResult_t),
    Panic(String),
}

fn guard<R>(f: impl FnOnce() -> Result<R, nr::NcclError>) -> Result<R, Fail> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(Fail::Nccl(e.0)),
        Err(p) => Err(Fail::Panic(panic_text(p))),
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string that lives while we copy it.
unsafe fn cstr(p: *const std::ffi::c_char) -> Option<String> {
    (!p.is_null())
        // SAFETY: non-null here, so a NUL-terminated string alive while we copy it (this
        // function's contract).
        .then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

fn describe(what: &str, f: Fail, comm: ns::ncclComm_t) -> String {
    let code = match f {
        Fail::Panic(p) => return format!("NCCL {what}: libnccl is not usable ({p})"),
        Fail::Nccl(c) => c,
    };
    // SAFETY: NCCL returns static strings.
    let text = catch_unwind(|| unsafe { cstr(ns::ncclGetErrorString(code)) }).ok().flatten();
    let last = if has_last_error() {
        // SAFETY: `comm` is a live communicator or null (NCCL then reports the thread's last error).
        catch_unwind(AssertUnwindSafe(|| unsafe { cstr(ns::ncclGetLastError(comm)) })).ok().flatten()
    } else {
        None
    };
    let hint = match code {
        ns::ncclResult_t::ncclUnhandledCudaError => " (a CUDA call inside NCCL failed: wrong device, out of memory, or a bad device pointer)",
        ns::ncclResult_t::ncclSystemError => " (a system or network call failed: check NCCL_SOCKET_IFNAME and the network)",
        ns::ncclResult_t::ncclInvalidUsage => " (invalid usage: e.g. two ranks on one GPU, or mismatched calls across ranks)",
        ns::ncclResult_t::ncclRemoteError => " (a remote rank failed)",
        _ => "",
    };
    let mut s = format!("NCCL {what} failed: {code:?}");
    if let Some(t) = text {
        s += &format!(" ({t})");
    }
    s += hint;
    if let Some(l) = last {
        s += &format!(": {l}");
    }
    s + " [NCCL_DEBUG=WARN tells more]"
}

/// An NCCL unique id: created by rank 0, moved to every rank before [`NcclComm::new`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId(pub [u8; UNIQUE_ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NcclId({:02x?}..)", &self.0[..8])
    }
}

impl NcclId {
    /// A fresh id (`ncclGetUniqueId`: also opens rank 0's bootstrap socket). Rank 0 only.
    pub fn new() -> DevResult<NcclId> {
        probe()?;
        let id = guard(nr::get_uniqueid).map_err(|f| describe("ncclGetUniqueId", f, std::ptr::null_mut()))?;
        let mut b = [0u8; UNIQUE_ID_BYTES];
        for (d, s) in b.iter_mut().zip(id.internal.iter()) {
            *d = *s as u8;
        }
        Ok(NcclId(b))
    }

    /// The id from the bytes rank 0 sent.
    pub fn from_bytes(b: &[u8]) -> DevResult<NcclId> {
        let a: [u8; UNIQUE_ID_BYTES] = b
            .try_into()
            .map_err(|_| format!("an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}", b.len()))?;
        Ok(NcclId(a))
    }

    pub fn as_bytes(&self) -> &[u8; UNIQUE_ID_BYTES] {
        &self.0
    }

    fn to_sys(self) -> ns::ncclUniqueId {
        let mut internal = [0 as std::ffi::c_char; UNIQUE_ID_BYTES];
        for (d, s) in internal.iter_mut().zip(self.0.iter()) {
            *d = *s as std::ffi::c_char;
        }
        ns::ncclUniqueId { internal }
    }
}

/// Move rank 0's fresh unique id to every rank with `broadcast` (from rank 0, in place, over
/// `1 + UNIQUE_ID_BYTES` bytes; every rank calls it once). The first byte is a status: when rank 0
/// cannot create the id (no libnccl), every rank returns an error instead of waiting in
/// `ncclCommInitRank`.
pub fn exchange_id(rank: usize, broadcast: impl FnOnce(&mut [u8]) -> Result<(), String>) -> DevResult<NcclId> {
    let mut buf = [0u8; 1 + UNIQUE_ID_BYTES];
    let mut mine = None;
    if rank == 0 {
        match NcclId::new() {
            Ok(id) => {
                buf[0] = 1;
                buf[1..].copy_from_slice(id.as_bytes());
            }
            Err(e) => mine = Some(e),
        }
    }
    broadcast(&mut buf).map_err(|e| format!("moving the NCCL unique id from rank 0: {e}"))?;
    if let Some(e) = mine {
        return Err(e);
    }
    if buf[0] != 1 {
        return Err("rank 0 could not create the NCCL unique id (see its error)".into());
    }
    NcclId::from_bytes(&buf[1..])
}

/// Device memory an NCCL call may read or write: a device address and a length in elements.
pub trait DeviceMem<T> {
    fn dev_ptr(&self) -> u64;
    fn dev_len(&self) -> usize;
}

impl<T> DeviceMem<T> for DevBuf<T> {
    fn dev_ptr(&self) -> u64 {
        self.ptr()
    }
    fn dev_len(&self) -> usize {
        self.len()
    }
}

/// A bounds-checked window into a device buffer, borrowed from it.
pub struct DevView<'a, T> {
    ptr: u64,
    len: usize,
    _b: PhantomData<&'a T>,
}

impl<'a, T> DevView<'a, T> {
    /// Elements `offset .. offset + len` of `buf`.
    pub fn of(buf: &'a impl DeviceMem<T>, offset: usize, len: usize) -> DevResult<DevView<'a, T>> {
        let end = offset.saturating_add(len);
        if end > buf.dev_len() {
            return Err(format!(
                "device view {offset}..{} out of a buffer of {}",
                offset.saturating_add(len),
                buf.dev_len()
            ));
        }
        Ok(DevView {
            ptr: buf.dev_ptr() + (offset * std::mem::size_of::<T>()) as u64,
            len,
            _b: PhantomData,
        })
    }

    /// # Safety
    /// `ptr` must address `len` elements of device memory that outlive the view.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> DevView<'a, T> {
        DevView { ptr, len, _b: PhantomData }
    }
}

impl<T> DeviceMem<T> for DevView<'_, T> {
    fn dev_ptr(&self) -> u64 {
        self.ptr
    }
    fn dev_len(&self) -> usize {
        self.len
    }
}

/// A CUDA context and its own non-blocking stream, without the engine's kernels: what the NCCL
/// benchmark and tests need (the driver only; no NVRTC or cuBLAS).
pub struct NcclDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
}

fn de<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

impl NcclDevice {
    /// Open device `ordinal` (probes the driver first: no GPU is an error, never a panic).
    pub fn open(ordinal: usize) -> DevResult<NcclDevice> {
        crate::device::probe(ordinal)?;
        catch_unwind(|| -> DevResult<NcclDevice> {
            let ctx = CudaContext::new(ordinal).map_err(de("creating the CUDA context"))?;
            // SAFETY: no CudaSlice is used with this context; streams order everything.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().map_err(de("creating a CUDA stream"))?;
            let name = ctx.name().unwrap_or_else(|_| "?".into());
            Ok(NcclDevice { ctx, stream, ordinal, name })
        })
        .unwrap_or_else(|_| Err("CUDA initialisation panicked (a library failed to load?)".into()))
    }

    /// Number of CUDA devices visible to this process (0 without a driver).
    pub fn count() -> usize {
        crate::device::probe(0).unwrap_or(0)
    }

    fn bind(&self) -> DevResult<()> {
        self.ctx.bind_to_thread().map_err(de("binding the CUDA context"))
    }

    /// `len` elements of device memory (contents undefined), freed on drop.
    pub fn alloc<T>(&self, len: usize) -> DevResult<NcclBuf<T>> {
        self.bind()?;
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        // SAFETY: plain allocation, freed once by NcclBuf::drop.
        let ptr = unsafe { dr::malloc_sync(bytes) }.map_err(|e| format!("cuMemAlloc of {bytes} bytes: {e:?}"))?;
        Ok(NcclBuf {
            ptr,
            len,
            ctx: self.ctx.clone(),
            _t: PhantomData,
        })
    }

    /// Copy `src` into the start of `dst` (ordered on the stream).
    pub fn htod<T: Copy>(&self, dst: &mut impl DeviceMem<T>, src: &[T]) -> DevResult<()> {
        if src.len() > dst.dev_len() {
            return Err(format!("host-to-device copy of {} elements into a buffer of {}", src.len(), dst.dev_len()));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst holds at least src.len() elements; the copy from pageable memory is staged
        // before the call returns.
        unsafe { dr::memcpy_htod_async(dst.dev_ptr(), src, self.stream.cu_stream()) }.map_err(de("host-to-device copy"))
    }

    /// Copy the start of `src` into `dst` and wait for it.
    pub fn dtoh<T: Copy>(&self, dst: &mut [T], src: &impl DeviceMem<T>) -> DevResult<()> {
        if dst.len() > src.dev_len() {
            return Err(format!("device-to-host copy of {} elements from a buffer of {}", dst.len(), src.dev_len()));
        }
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: src holds at least dst.len() elements; we wait before returning.
        unsafe { dr::memcpy_dtoh_async(dst, src.dev_ptr(), self.stream.cu_stream()) }.map_err(de("device-to-host copy"))?;
        self.sync()
    }

    pub fn sync(&self) -> DevResult<()> {
        self.stream.synchronize().map_err(de("stream synchronize"))
    }
}

/// Device memory of an [`NcclDevice`].
pub struct NcclBuf<T> {
    ptr: u64,
    len: usize,
    ctx: Arc<CudaContext>,
    _t: PhantomData<T>,
}

impl<T> NcclBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> DeviceMem<T> for NcclBuf<T> {
    fn dev_ptr(&self) -> u64 {
        self.ptr
    }
    fn dev_len(&self) -> usize {
        self.len
    }
}

impl<T> Drop for NcclBuf<T> {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // Work still queued on any stream may use the buffer.
        let _ = self.ctx.synchronize();
        // SAFETY: allocated by NcclDevice::alloc, freed once.
        let _ = unsafe { dr::free_sync(self.ptr) };
    }
}

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

/// The job's timeout for waits on NCCL work: `EMBER_TIMEOUT_MS`, else 60 s (the transport's
/// default).
pub fn default_timeout() -> Duration {
    std::env::var("EMBER_TIMEOUT_MS").ok().and_then(|v| v.trim().parse().ok()).map_or(Duration::from_secs(60), Duration::from_millis)
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
        Ok(NcclComm { comm: Cell::new(comm), stream, rank, size, timeout: default_timeout(), aborted: RefCell::new(None) })
    }

    /// Rank 0 creates the id, `broadcast` moves the bytes from rank 0 to every rank (e.g.
    /// `|b| comm.broadcast(b, 0).map_err(|e| e.to_string())` with an `ember_transport::Comm`),
    /// then every rank joins ([`exchange_id`] + [`new`](Self::new)).
    pub fn init_with(stream: Arc<CudaStream>, rank: usize, size: usize, broadcast: impl FnOnce(&mut [u8]) -> Result<(), String>) -> DevResult<NcclComm> {
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

/// The folder of the libnccl that the dynamic loader would pick, when it can be told (the first
/// `libnccl.so` in `LD_LIBRARY_PATH` or the system folders): for messages.
pub fn library_path() -> Option<PathBuf> {
    library_dirs().into_iter().map(|d| d.join("libnccl.so")).find(|p| Path::new(p).exists())
}
