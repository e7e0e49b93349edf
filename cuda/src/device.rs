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
    // SAFETY: only dlopens candidate names.
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
        // SAFETY: plain allocation; the pool frees it with the same size.
        let p = unsafe { dr::malloc_sync(bytes.next_multiple_of(2 << 20)) }.map_err(de("cuMemAlloc"))?;
        self.allocs += 1;
        Ok(p)
    }
    fn free(&mut self, addr: u64, _bytes: usize) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: `addr` came from `alloc`; the pool frees each chunk once, after the stream is idle.
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
        // SAFETY: plain allocation (portable: pinned for every context); `free` releases it.
        let p = unsafe { dr::malloc_host(bytes, sys::CU_MEMHOSTALLOC_PORTABLE) }.map_err(de("cuMemHostAlloc"))?;
        NonNull::new(p.cast()).ok_or_else(|| "cuMemHostAlloc returned null".into())
    }
    unsafe fn free(&mut self, p: NonNull<u8>, _bytes: usize) {
        let _ = self.ctx.bind_to_thread();
        let _ = dr::free_host(p.as_ptr().cast());
    }
}

/// Staging memory of one device: `len` page-locked floats from its pinned pool.
pub type Pinned = PinnedBuf<PinnedAllocator>;

/// Whether `p` lies in page-locked memory from `cuMemHostAlloc` (needs a bound context).
pub fn page_locked<T>(p: *const T) -> bool {
    let mut flags = 0;
    // SAFETY: only looks the address up.
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

/// Compiled PTX per architecture, shared by every device of that architecture in the process.
fn ptx_cache() -> &'static Mutex<HashMap<&'static str, Arc<Vec<cudarc::nvrtc::Ptx>>>> {
    static C: OnceLock<Mutex<HashMap<&'static str, Arc<Vec<cudarc::nvrtc::Ptx>>>>> = OnceLock::new();
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
        // SAFETY: no CudaSlice is used with this context.
        unsafe { ctx.disable_event_tracking() };
        let stream = if own_stream { ctx.new_stream().map_err(de("creating a stream"))? } else { ctx.default_stream() };
        let (maj, min) = ctx.compute_capability().map_err(de("compute capability"))?;
        let arch = nvrtc::arch_name(maj, min);
        let name = ctx.name().unwrap_or_else(|_| "?".into());
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(de("SM count"))? as u32;
        let total_mem = ctx.total_mem().unwrap_or(0);
        // SAFETY: only dlopens candidate names.
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
        // SAFETY: no arguments but the enums.
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
        // SAFETY: dst holds at least src.len() elements; the callers keep src alive until the
        // driver no longer reads it.
        unsafe { dr::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(de("host-to-device copy"))
    }

    pub fn dtoh<T: DeviceRepr>(&self, dst: &mut [T], src: u64) -> DevResult<()> {
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: src holds at least dst.len() elements; we wait for the copy before returning.
        unsafe { dr::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }.map_err(de("device-to-host copy"))?;
        self.sync()
    }

    pub fn dtod(&self, dst: u64, src: u64, bytes: usize) -> DevResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges are valid for `bytes`.
        unsafe { dr::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }.map_err(de("device copy"))
    }

    pub fn memset0(&self, dst: u64, bytes: usize) -> DevResult<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst valid for `bytes`.
        unsafe { dr::memset_d8_async(dst, 0, bytes, self.stream.cu_stream()) }.map_err(de("memset"))
    }

    pub fn sync(&self) -> DevResult<()> {
        self.stream.synchronize().map_err(de("stream synchronize (a kernel failed?)"))
    }

    /// Start a launch: `gpu.launch("k", grid, block)?.arg(&x)...; unsafe { l.go() }`.
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

/// A kernel launch being built.
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
    /// # Safety
    /// The arguments must match the kernel's signature and every pointer must be valid.
    pub unsafe fn go(&mut self) -> DevResult<()> {
        self.args.launch(self.cfg).map(|_| ()).map_err(|e| format!("launching {}: {e:?}", self.name))
    }
}
