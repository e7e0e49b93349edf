//! The device: driver context and stream, compiled kernels (cached per device), cuBLAS, the
//! device pool and the pinned host pool.
//!
//! Everything is loaded at run time. [`probe`] checks, without panicking, that the driver library
//! loads and a device exists; [`Gpu::open`] then compiles the kernels for the device's
//! architecture with NVRTC (once per device per process) and reserves the pool.
use crate::kernels::MODULES;
use crate::nvrtc;
use crate::pinned::{HostAllocator, PinnedBuf, PinnedPool, PinnedStats, DEFAULT_MAX_IDLE};
use crate::pool::{Block, Pool, PoolConfig, PoolError, PoolStats, RawAllocator};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{result as dr, sys, CudaContext, CudaFunction, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};

/// Errors of the device layer, as text (the engine wraps them in `Error::Device`).
pub type DevResult<T> = Result<T, String>;

fn de<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}

/// Check that the CUDA driver library loads, initializes, and has device `ordinal`.
/// Returns the number of devices. Never panics.
pub fn probe(ordinal: usize) -> DevResult<usize> {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library by its candidate names
    // (no symbol is called); a panic inside is caught.
    let present = std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false);
    if !present {
        return Err("no CUDA driver: libcuda.so could not be loaded (no NVIDIA driver on this machine, or it is not on the library path)".into());
    }
    std::panic::catch_unwind(|| -> DevResult<usize> {
        dr::init().map_err(de("cuInit failed"))?;
        let n = dr::device::get_count().map_err(de("cuDeviceGetCount failed"))? as usize;
        if n == 0 {
            return Err("the CUDA driver loaded but reports no device".into());
        }
        if ordinal >= n {
            return Err(format!("CUDA device {ordinal} asked for, but only {n} present"));
        }
        Ok(n)
    })
    .unwrap_or_else(|_| Err("the CUDA driver panicked while being probed".into()))
}

/// Device memory from the driver, for the pool.
pub struct DeviceAllocator {
    ctx: Arc<CudaContext>,
    /// Driver allocations made (counts every `cuMemAlloc`).
    pub allocs: usize,
}

impl RawAllocator for DeviceAllocator {
    fn alloc(&mut self, bytes: usize) -> Result<u64, String> {
        self.ctx.bind_to_thread().map_err(de("bind context"))?;
        // Whole 2 MiB units (the driver's granularity anyway), so every page-aligned range inside
        // a chunk lies inside its allocation (dma-buf export needs page-aligned ranges).
        // SAFETY: a plain driver allocation in the context bound above, no pointer argument; the
        // pool frees it once, through `free`.
        let p = unsafe { dr::malloc_sync(bytes.next_multiple_of(2 << 20)) }.map_err(de("cuMemAlloc"))?;
        self.allocs += 1;
        Ok(p)
    }
    fn free(&mut self, addr: u64, _bytes: usize) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `addr` came from `alloc` (cuMemAlloc in this context); the pool frees each chunk
        // once, after the stream is idle, so no kernel or copy still uses it.
        let _ = unsafe { dr::free_sync(addr) };
    }
}

/// Page-locked host memory from the driver, for the pinned pool.
pub struct PinnedAllocator {
    ctx: Arc<CudaContext>,
}

// SAFETY: cuMemHostAlloc returns page-aligned host memory, valid until cuMemFreeHost.
unsafe impl HostAllocator for PinnedAllocator {
    fn alloc(&mut self, bytes: usize) -> Result<NonNull<u8>, String> {
        self.ctx.bind_to_thread().map_err(de("bind context"))?;
        // SAFETY: a plain driver allocation (portable: pinned for every context), no pointer
        // argument; `free` releases it with cuMemFreeHost.
        let p = unsafe { dr::malloc_host(bytes, sys::CU_MEMHOSTALLOC_PORTABLE) }.map_err(de("cuMemHostAlloc"))?;
        NonNull::new(p.cast()).ok_or_else(|| "cuMemHostAlloc returned null".into())
    }
    unsafe fn free(&mut self, p: NonNull<u8>, _bytes: usize) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the caller passes a block from `alloc` (cuMemHostAlloc) that nothing uses any
        // more (the trait's contract), so it is freed once, with the call that matches.
        let _ = unsafe { dr::free_host(p.as_ptr().cast()) };
    }
}

/// Staging memory of one device: `len` page-locked floats from its pinned pool.
pub type Pinned = PinnedBuf<PinnedAllocator>;

/// Whether `p` lies in page-locked memory from `cuMemHostAlloc` (needs a bound context).
pub fn page_locked<T>(p: *const T) -> bool {
    let mut flags = 0;
    // SAFETY: the driver only looks `p` up in its table of page-locked ranges (it never
    // dereferences it, any value is allowed) and writes `flags`, a live local.
    unsafe { sys::cuMemHostGetFlags(&mut flags, p as *mut _) == sys::CUresult::CUDA_SUCCESS }
}

/// A typed device buffer: a pool block that returns to the pool when dropped.
pub struct DevBuf<T> {
    ptr: u64,
    len: usize,
    block: Option<Block>,
    pool: Arc<Mutex<Pool<DeviceAllocator>>>,
    _t: PhantomData<T>,
}

impl<T> DevBuf<T> {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }
}

impl<T> Drop for DevBuf<T> {
    fn drop(&mut self) {
        if let Some(b) = self.block.take() {
            // Every user of the buffer ran on the home stream, so the block is reusable at once.
            if let Ok(mut p) = self.pool.lock() {
                p.free(b);
            }
        }
    }
}

/// Compiled PTX of every module, per architecture name.
type PtxCache = Mutex<HashMap<&'static str, Arc<Vec<cudarc::nvrtc::Ptx>>>>;

/// Compiled PTX per architecture, shared by every device of that architecture in the process.
fn ptx_cache() -> &'static PtxCache {
    static C: OnceLock<PtxCache> = OnceLock::new();
    C.get_or_init(Default::default)
}

fn compiled(arch: &'static str) -> DevResult<Arc<Vec<cudarc::nvrtc::Ptx>>> {
    let mut c = ptx_cache().lock().map_err(|_| "ptx cache poisoned".to_string())?;
    if let Some(p) = c.get(arch) {
        return Ok(p.clone());
    }
    let mut v = Vec::new();
    for m in MODULES {
        v.push(nvrtc::compile(m, arch)?);
    }
    let v = Arc::new(v);
    c.insert(arch, v.clone());
    Ok(v)
}

/// One open device.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: CudaBlas,
    funcs: HashMap<&'static str, CudaFunction>,
    pub pool: Arc<Mutex<Pool<DeviceAllocator>>>,
    /// Staging memory for host transfers (see [`staging`](Self::staging)).
    pub pinned: Arc<Mutex<PinnedPool<PinnedAllocator>>>,
    pub name: String,
    pub arch: &'static str,
    pub sm_count: u32,
    pub total_mem: usize,
    pub ordinal: usize,
}

/// Devices opened so far in this process (kernels compiled and loaded once per device).
fn gpus() -> &'static Mutex<HashMap<usize, Arc<Gpu>>> {
    static G: OnceLock<Mutex<HashMap<usize, Arc<Gpu>>>> = OnceLock::new();
    G.get_or_init(Default::default)
}

impl Gpu {
    /// Open device `ordinal` (cached: a second call returns the same device).
    pub fn open(ordinal: usize, cfg: PoolConfig) -> DevResult<Arc<Gpu>> {
        let mut g = gpus().lock().map_err(|_| "device cache poisoned".to_string())?;
        if let Some(d) = g.get(&ordinal) {
            return Ok(d.clone());
        }
        probe(ordinal)?;
        let d = std::panic::catch_unwind(|| Gpu::open_uncached(ordinal, cfg))
            .unwrap_or_else(|_| Err("CUDA initialisation panicked (a library failed to load?)".into()))?;
        let d = Arc::new(d);
        g.insert(ordinal, d.clone());
        Ok(d)
    }

    /// A private handle on device `ordinal` for one of several in-process ranks that share it:
    /// the same (primary) CUDA context, so device addresses are valid in every rank, but its own
    /// stream, cuBLAS handle, pool (with its own per-step arena) and pinned pool. Not cached.
    pub fn open_private(ordinal: usize, cfg: PoolConfig) -> DevResult<Arc<Gpu>> {
        probe(ordinal)?;
        std::panic::catch_unwind(|| Gpu::open_uncached_on(ordinal, cfg, true))
            .unwrap_or_else(|_| Err("CUDA initialisation panicked (a library failed to load?)".into()))
            .map(Arc::new)
    }

    fn open_uncached(ordinal: usize, cfg: PoolConfig) -> DevResult<Gpu> {
        Self::open_uncached_on(ordinal, cfg, false)
    }

    fn open_uncached_on(ordinal: usize, cfg: PoolConfig, own_stream: bool) -> DevResult<Gpu> {
        let ctx = CudaContext::new(ordinal).map_err(de("creating the CUDA context"))?;
        // We order all work on one stream and manage reuse ourselves.
        // SAFETY: cudarc's event tracking only orders `CudaSlice`s across streams; Ember never
        // makes one in this context (buffers are pool blocks, ordered by the one stream), so
        // turning it off drops no synchronisation that anything relies on.
        unsafe { ctx.disable_event_tracking() };
        let stream = if own_stream { ctx.new_stream().map_err(de("creating a stream"))? } else { ctx.default_stream() };
        let (maj, min) = ctx.compute_capability().map_err(de("compute capability"))?;
        let arch = nvrtc::arch_name(maj, min);
        let name = ctx.name().unwrap_or_else(|_| "?".into());
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(de("SM count"))? as u32;
        let total_mem = ctx.total_mem().unwrap_or(0);
        // SAFETY: `is_culib_present` only tries to dlopen cuBLAS by its candidate names (no symbol
        // is called); a panic inside is caught.
        if !std::panic::catch_unwind(|| unsafe { cudarc::cublas::sys::is_culib_present() }).unwrap_or(false) {
            return Err("libcublas not found: put the CUDA 13 cuBLAS library (libcublas.so.13) on LD_LIBRARY_PATH".into());
        }
        let blas = CudaBlas::new(stream.clone()).map_err(de("creating the cuBLAS handle"))?;
        let mut funcs = HashMap::new();
        for (m, ptx) in MODULES.iter().zip(compiled(arch)?.iter()) {
            let module = ctx.load_module(ptx.clone()).map_err(de("loading a compiled module"))?;
            for k in m.kernels {
                let f = module.load_function(k).map_err(|e| format!("kernel {k}: {e:?}"))?;
                funcs.insert(*k, f);
            }
        }
        let pool = Pool::new(DeviceAllocator { ctx: ctx.clone(), allocs: 0 }, cfg).map_err(|e| e.to_string())?;
        let pinned = PinnedPool::shared(PinnedAllocator { ctx: ctx.clone() }, DEFAULT_MAX_IDLE);
        Ok(Gpu { ctx, stream, blas, funcs, pool: Arc::new(Mutex::new(pool)), pinned, name, arch, sm_count, total_mem, ordinal })
    }

    pub fn func(&self, name: &str) -> DevResult<&CudaFunction> {
        self.funcs.get(name).ok_or_else(|| format!("no kernel named {name}"))
    }

    pub fn bind(&self) -> DevResult<()> {
        self.ctx.bind_to_thread().map_err(de("binding the CUDA context"))
    }

    /// A long-lived buffer of `len` elements (contents undefined).
    pub fn alloc<T>(&self, len: usize) -> DevResult<DevBuf<T>> {
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        let block = self.pool.lock().map_err(|_| "pool poisoned".to_string())?.alloc(bytes).map_err(|e: PoolError| e.to_string())?;
        Ok(DevBuf { ptr: block.addr, len, block: Some(block), pool: self.pool.clone(), _t: PhantomData })
    }

    /// Scratch from the per-step arena: valid until [`arena_reset`](Self::arena_reset).
    pub fn scratch(&self, bytes: usize) -> DevResult<u64> {
        let b = self.pool.lock().map_err(|_| "pool poisoned".to_string())?.arena_alloc(bytes.max(1)).map_err(|e| e.to_string())?;
        Ok(b.addr)
    }

    pub fn arena_reset(&self) -> DevResult<()> {
        self.pool.lock().map_err(|_| "pool poisoned".to_string())?.arena_reset().map_err(|e| e.to_string())
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.pool.lock().map(|p| p.stats()).unwrap_or_default()
    }

    pub fn driver_allocs(&self) -> usize {
        self.pool.lock().map(|p| p.allocator().allocs).unwrap_or(0)
    }

    /// Order the writes a NIC made into this device's memory (GPUDirect RDMA) before work
    /// launched afterwards (`cuFlushGPUDirectRDMAWrites` to the context's owner: without it a
    /// kernel may read stale data where the device does not order such writes itself).
    pub fn flush_remote_writes(&self) -> DevResult<()> {
        use sys::{CUflushGPUDirectRDMAWritesScope as Scope, CUflushGPUDirectRDMAWritesTarget as Target};
        self.bind()?;
        // SAFETY: no pointer arguments, only the two enums; the context is bound above.
        let rc = unsafe { sys::cuFlushGPUDirectRDMAWrites(Target::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX, Scope::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER) };
        match rc {
            sys::CUresult::CUDA_SUCCESS => Ok(()),
            e => Err(format!("cuFlushGPUDirectRDMAWrites: {e:?}")),
        }
    }

    /// `len` floats of page-locked host memory from this device's pinned pool (contents
    /// unspecified); the block returns to the pool when the buffer drops.
    pub fn staging(&self, len: usize) -> DevResult<Pinned> {
        PinnedBuf::new(&self.pinned, len)
    }

    pub fn pinned_stats(&self) -> PinnedStats {
        self.pinned.lock().map(|p| p.stats()).unwrap_or_default()
    }

    /// Copy `src` to `dst` in stream order; returns once `src` may be reused. The driver stages
    /// a pageable source before returning, but reads a page-locked one (e.g. [`Pinned`]) later,
    /// so for those this waits for the copy.
    pub fn htod<T: DeviceRepr>(&self, dst: u64, src: &[T]) -> DevResult<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.htod_async(dst, src)?;
        if page_locked(src.as_ptr()) {
            self.sync()?;
        }
        Ok(())
    }

    /// Copy `src` to `dst` and wait until the copy has finished.
    pub fn htod_sync<T: DeviceRepr>(&self, dst: u64, src: &[T]) -> DevResult<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.htod_async(dst, src)?;
        self.sync()
    }

    fn htod_async<T: DeviceRepr>(&self, dst: u64, src: &[T]) -> DevResult<()> {
        self.bind()?;
        // SAFETY: the callers pass a `dst` holding at least `src.len()` elements of `T` (a pool
        // buffer of that length), and keep `src` alive and unchanged until the driver no longer
        // reads it (`htod` waits for page-locked sources, the driver stages pageable ones).
        unsafe { dr::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(de("host-to-device copy"))
    }

    pub fn dtoh<T: DeviceRepr>(&self, dst: &mut [T], src: u64) -> DevResult<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the callers pass a `src` holding at least `dst.len()` elements of `T` (a pool
        // buffer of that length); `dst` is borrowed mutably and we wait for the copy before
        // returning, so nothing else touches it meanwhile.
        unsafe { dr::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(de("device-to-host copy"))?;
        self.sync()
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> DevResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the callers pass device ranges of this context valid for `bytes` (pool buffers
        // whose lengths they checked); the copy is ordered on the stream before later use.
        unsafe { dr::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(de("device copy"))
    }

    pub fn memset0(&self, dst: u64, bytes: usize) -> DevResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: the callers pass a device range of this context valid for `bytes` (a pool
        // buffer of that size); stream order puts the memset before any later use.
        unsafe { dr::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }.map_err(de("memset"))
    }

    pub fn sync(&self) -> DevResult<()> {
        self.stream.synchronize().map_err(de("stream synchronize (a kernel failed?)"))
    }

    /// Start a launch of kernel `name` on this device's stream with `grid` blocks (at least 1) of
    /// `block` threads: `gpu.launch("k", grid, block)?.arg(&x)...go()`, where `go` is unsafe and
    /// its doc states the launch contract every call site must meet.
    pub fn launch<'a>(&'a self, name: &str, grid: u32, block: u32) -> DevResult<Launch<'a>> {
        let f = self.func(name)?;
        Ok(Launch {
            args: self.stream.launch_builder(f),
            cfg: LaunchConfig { grid_dim: (grid.max(1), 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 },
            name: name.to_string(),
        })
    }

    /// A grid of `block`-thread blocks covering `n` threads, capped for grid-stride kernels.
    pub fn grid_for(&self, n: usize, block: u32) -> u32 {
        let want = n.div_ceil(block as usize).max(1);
        want.min(self.sm_count as usize * 32).min(u32::MAX as usize) as u32
    }

    /// Device-event timing of `f` repeated `iters` times (milliseconds per iteration).
    pub fn time_ms(&self, iters: usize, mut f: impl FnMut() -> DevResult<()>) -> DevResult<f64> {
        self.bind()?;
        let a = self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(de("event"))?;
        let b = self.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT)).map_err(de("event"))?;
        a.record(&self.stream).map_err(de("event record"))?;
        for _ in 0..iters {
            f()?;
        }
        b.record(&self.stream).map_err(de("event record"))?;
        b.synchronize().map_err(de("event sync"))?;
        Ok(a.elapsed_ms(&b).map_err(de("elapsed"))? as f64 / iters.max(1) as f64)
    }
}

/// A kernel launch being built: [`Gpu::launch`] names the kernel and its grid, [`arg`](Self::arg)
/// pushes its arguments in order, [`go`](Self::go) enqueues it. Every kernel launch in Ember goes
/// through `go`, whose doc is the one statement of the launch contract (as cudarc's
/// `LaunchArgs::launch`); call sites say in their `SAFETY` note why their arguments meet it.
pub struct Launch<'a> {
    args: cudarc::driver::LaunchArgs<'a>,
    cfg: LaunchConfig,
    name: String,
}

impl<'a> Launch<'a> {
    pub fn arg<T: DeviceRepr>(&mut self, v: &'a T) -> &mut Self {
        self.args.arg(v);
        self
    }
    pub fn block(&mut self, threads: u32) -> &mut Self {
        self.cfg.block_dim = (threads, 1, 1);
        self
    }
    /// Enqueue the kernel on the device's stream (asynchronous: errors of the kernel itself show
    /// at the next synchronisation).
    ///
    /// # Safety
    /// The launch contract. Neither the driver nor cudarc checks it, and a breach is undefined
    /// behaviour on the device (memory corruption, or a fault that poisons the context):
    /// 1. **Signature.** The arguments pushed with [`arg`](Self::arg) match the kernel's
    ///    parameter list in `cuda/kernels/*.cu` in number, order and type: `u64` for a pointer,
    ///    `i64` for `i64`, `i32` for `int`, `u32` for `u32`, `f32` for `float`, and a
    ///    `#[repr(C)]` struct with the same fields for a struct parameter (`Opt`).
    /// 2. **Grid and block.** The block has the size the kernel is written for: 256 threads
    ///    for every kernel with per-block shared arrays or `__launch_bounds__(256)`, a multiple of
    ///    32 for the warp-per-item ones. The grid either covers every item the kernel must visit
    ///    or the kernel loops grid-stride. (A grid or block past the device's limits is refused
    ///    by the driver with an error, not undefined behaviour.)
    /// 3. **Buffers.** Every pointer argument is device memory of this context (or 0 where the
    ///    kernel takes null to mean "none"), valid for every element the kernel reads or writes
    ///    given its size arguments (lengths, rows × cols, offsets and strides); device-side
    ///    indices it follows (ids, bag offsets, row lists, counters) lie within the buffers they
    ///    index; and arguments the kernel declares `__restrict__` do not overlap where one is
    ///    written, except in place where each element is read and then written by one thread
    ///    only, with a barrier between (the exclusive scan).
    /// 4. **Stream order.** The buffers stay allocated, and are not written by anything else,
    ///    until the kernel has finished: pool buffers and arena scratch of this device are only
    ///    reused by work on this same stream, which runs after the kernel, so dropping them (or
    ///    rewinding the arena) after `go` is fine; memory of another stream or rank, or memory
    ///    that goes back to the driver, needs a [`Gpu::sync`] before it is released.
    ///
    /// The argument values are copied at this call, so the references passed to `arg` need only
    /// live until it returns.
    pub unsafe fn go(&mut self) -> DevResult<()> {
        // SAFETY: the caller meets the launch contract above, which is cudarc's
        // (`LaunchArgs::launch`: arguments valid for the function, memory accesses in bounds);
        // the stream and function belong to this device's context.
        unsafe { self.args.launch(self.cfg) }.map(|_| ()).map_err(|e| format!("launching {}: {e:?}", self.name))
    }
}
