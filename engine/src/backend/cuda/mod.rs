//! The CUDA backend: device buffers from the hand-managed pool, NVRTC-compiled kernels, cuBLAS.
//!
//! Everything runs in order on one stream. Per-operation scratch (sort keys, histograms, run
//! boundaries) comes from the pool's arena, which is rewound after each operation: stream order
//! makes the reuse safe, and a steady-state step makes no driver allocation. Host staging memory
//! (`Backend::staging`) is page-locked, recycled by the device's pinned pool (`ember_cuda::pinned`).
//! Semantics are those of the CPU reference (`backend::cpu`); the self-test (`crate::selftest`)
//! checks them.
//!
//! This module owns the `Cuda` type: its constructors, the locking and launch helpers, and the
//! `impl Buffers for Cuda` and `impl Numerics for Cuda` (in the traits' order, as the CPU
//! backend). Trait methods with long bodies delegate to `*_impl` methods in
//! the submodules, by concern: `dense` (GEMM, dense optimizer), `interaction` (cross layer,
//! loss), `embedding` (embedding operations), `backward` (fused backward kernels), `sort`
//! (device sort and run-length encoding), `bench` (measurements).
use super::*;
use crate::{Error, Result};
use ember_cuda::cudarc;
use ember_cuda::device::{DevBuf, Gpu, Pinned};
use ember_cuda::kernels::{CHUNK, MAX_BWD_COLS, RADIX_TILE, SCAN_BLOCK, SHORT_RUN};
pub use ember_cuda::pinned::PinnedStats;
pub use ember_cuda::pool::{dlrm_step_trace, PoolConfig, PoolStats, TraceOp};
use std::sync::{Arc, Mutex};

mod backward;
mod bench;
mod dense;
mod embedding;
mod interaction;
#[cfg(feature = "nccl")]
mod nccl;
mod sort;
#[cfg(test)]
mod tests;

pub use bench::AllocReplayRow;

fn dev(e: String) -> Error {
    Error::Device(e)
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Input(what()))
    }
}

/// The CUDA backend on one device.
pub struct Cuda {
    gpu: Arc<Gpu>,
    /// Serialises operations that use the arena (Backend is Sync).
    op: Mutex<()>,
    /// Use the general backward (sort + RLE + warp per row) for every shard; set from
    /// `EMBER_CUDA_BWD=legacy` at open, or by `set_legacy_backward` (benchmarks compare both).
    legacy_bwd: std::sync::atomic::AtomicBool,
    /// NCCL communicators of this rank (created on first use).
    #[cfg(feature = "nccl")]
    nccl: nccl::Nccl,
}

const NULL: u64 = 0;

impl Cuda {
    /// Open device `ordinal` with the default pool configuration.
    pub fn new(ordinal: usize) -> Result<Cuda> {
        Self::with_pool(ordinal, PoolConfig::default())
    }

    /// Open device `ordinal`; `cfg` sizes the pool (the first call for a device decides).
    pub fn with_pool(ordinal: usize, cfg: PoolConfig) -> Result<Cuda> {
        let gpu = Gpu::open(ordinal, cfg).map_err(dev)?;
        let legacy = std::env::var("EMBER_CUDA_BWD").is_ok_and(|v| v == "legacy");
        Ok(Self::from_gpu(gpu, legacy))
    }

    /// A backend for one of several in-process ranks sharing device `ordinal`: its own stream,
    /// cuBLAS handle and pool arena in the device's one context (so peer-to-peer buffer
    /// transports can copy between ranks' buffers).
    pub fn for_rank(ordinal: usize, cfg: PoolConfig) -> Result<Cuda> {
        let gpu = Gpu::open_private(ordinal, cfg).map_err(dev)?;
        let legacy = std::env::var("EMBER_CUDA_BWD").is_ok_and(|v| v == "legacy");
        Ok(Self::from_gpu(gpu, legacy))
    }

    fn from_gpu(gpu: Arc<Gpu>, legacy: bool) -> Cuda {
        // The RDMA transport may register this device's buffers through dma-buf (docs/rdma.md).
        ember_transport::rdma::set_dmabuf_exporter(ember_cuda::dmabuf::export);
        Cuda {
            #[cfg(feature = "nccl")]
            nccl: nccl::Nccl::new(gpu.stream.clone()),
            gpu,
            op: Mutex::new(()),
            legacy_bwd: std::sync::atomic::AtomicBool::new(legacy),
        }
    }

    /// Whether a CUDA device can be opened here (never panics). Err says why not.
    pub fn probe() -> Result<usize> {
        ember_cuda::device::probe(0).map_err(dev)
    }

    /// Select the general fused backward (true: sort + RLE, any layout) or the fast one (false, the default).
    pub fn set_legacy_backward(&self, on: bool) {
        self.legacy_bwd.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }
    pub fn device_name(&self) -> String {
        format!("{} ({}, {} SMs, {:.1} GiB)", self.gpu.name, self.gpu.arch, self.gpu.sm_count, self.gpu.total_mem as f64 / (1u64 << 30) as f64)
    }
    pub fn pool_stats(&self) -> PoolStats {
        self.gpu.pool_stats()
    }
    /// The pinned staging pool's statistics (driver allocations, bytes pinned).
    pub fn pinned_stats(&self) -> PinnedStats {
        self.gpu.pinned_stats()
    }
    /// Driver allocations (`cuMemAlloc`) made by the pool so far.
    pub fn driver_allocs(&self) -> usize {
        self.gpu.driver_allocs()
    }
    /// Start a new peak window for the pool statistics.
    pub fn reset_peak(&self) {
        if let Ok(mut p) = self.gpu.pool.lock() {
            p.reset_peak();
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, ()>> {
        self.gpu.bind().map_err(dev)?;
        self.op.lock().map_err(|_| Error::Device("backend lock poisoned".into()))
    }

    fn scratch(&self, bytes: usize) -> Result<u64> {
        self.gpu.scratch(bytes).map_err(dev)
    }

    fn done(&self) -> Result<()> {
        self.gpu.arena_reset().map_err(dev)
    }

    fn grid(&self, n: usize) -> u32 {
        self.gpu.grid_for(n, 256)
    }

    /// The product of `dims` (a launch or buffer size), an error on overflow.
    fn size(what: &str, dims: &[usize]) -> Result<usize> {
        crate::backend::product(dims).ok_or_else(|| Error::Input(format!("{what}: size {dims:?} overflows")))
    }

    /// Floats of a dot interaction's input (batch × (f+1) × d) and output (batch × (d + (f+1)f/2)).
    fn interaction_sizes(what: &str, batch: usize, f: usize, d: usize) -> Result<(usize, usize)> {
        let f1 = f.checked_add(1).ok_or_else(|| Error::Input(format!("{what}: f = {f} overflows")))?;
        let pairs = Self::size(what, &[f1, f])? / 2;
        let w = d.checked_add(pairs).ok_or_else(|| Error::Input(format!("{what}: width overflows")))?;
        Ok((Self::size(what, &[batch, f1, d])?, Self::size(what, &[batch, w])?))
    }

    fn blocks(n: usize, per: usize) -> Result<u32> {
        let b = n.div_ceil(per).max(1);
        u32::try_from(b).map_err(|_| Error::Input(format!("launch of {n} threads is too large")))
    }
}

/// The pools' memory (pinned staging blocks, device chunks), registered as regions of the
/// rank's network endpoint.
struct NetRegions(ember_transport::Regions);

impl ember_cuda::registrar::Registrar for NetRegions {
    unsafe fn register(&self, addr: u64, len: usize) -> std::result::Result<(), String> {
        // SAFETY: the pools keep the memory allocated until `unregister` succeeded (the
        // `Registrar` contract our caller meets), which is what `Regions::register` asks.
        unsafe { self.0.register(addr, len) }.map_err(|e| e.to_string())
    }
    fn unregister(&self, addr: u64) -> std::result::Result<(), String> {
        self.0.unregister(addr).map_err(|e| e.to_string())
    }
}

impl Buffers for Cuda {
    type Buf = DevBuf<f32>;
    type Ids = DevBuf<u64>;
    type Staging = Pinned;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn zeros(&self, n: usize) -> Result<DevBuf<f32>> {
        let _g = self.lock()?;
        let b = self.gpu.alloc::<f32>(n).map_err(dev)?;
        self.gpu.memset0(b.ptr(), n * 4).map_err(dev)?;
        Ok(b)
    }

    fn upload(&self, host: &[f32]) -> Result<DevBuf<f32>> {
        let _g = self.lock()?;
        let b = self.gpu.alloc::<f32>(host.len()).map_err(dev)?;
        self.gpu.htod(b.ptr(), host).map_err(dev)?;
        Ok(b)
    }

    fn download(&self, buf: &DevBuf<f32>) -> Result<Vec<f32>> {
        let _g = self.lock()?;
        let mut v = vec![0f32; buf.len()];
        self.gpu.dtoh(&mut v, buf.ptr()).map_err(dev)?;
        Ok(v)
    }

    fn upload_ids(&self, host: &[u64]) -> Result<DevBuf<u64>> {
        let _g = self.lock()?;
        let b = self.gpu.alloc::<u64>(host.len()).map_err(dev)?;
        self.gpu.htod(b.ptr(), host).map_err(dev)?;
        Ok(b)
    }

    fn download_ids(&self, ids: &DevBuf<u64>) -> Result<Vec<u64>> {
        let _g = self.lock()?;
        let mut v = vec![0u64; ids.len()];
        self.gpu.dtoh(&mut v, ids.ptr()).map_err(dev)?;
        Ok(v)
    }

    fn len(&self, buf: &DevBuf<f32>) -> usize {
        buf.len()
    }

    fn download_into(&self, buf: &DevBuf<f32>, out: &mut [f32]) -> Result<()> {
        super::check_same_len("download_into", buf.len(), out.len())?;
        let _g = self.lock()?;
        self.gpu.dtoh(out, buf.ptr()).map_err(dev)
    }

    fn upload_into(&self, src: &[f32], buf: &mut DevBuf<f32>) -> Result<()> {
        super::check_same_len("upload_into", buf.len(), src.len())?;
        let _g = self.lock()?;
        // Waits: the driver reads a pinned source during the copy, and the caller may reuse it.
        self.gpu.htod_sync(buf.ptr(), src).map_err(dev)
    }

    fn synchronize(&self) -> Result<()> {
        self.gpu.bind().map_err(dev)?;
        self.gpu.sync().map_err(dev)
    }

    fn copy_2d(&self, src: &DevBuf<f32>, src_off: usize, src_stride: usize, dst: &mut DevBuf<f32>, dst_off: usize, dst_stride: usize, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        super::check_copy_2d(src.len(), src_off, src_stride, dst.len(), dst_off, dst_stride, rows, cols)?;
        let n = Self::size("copy_2d", &[rows, cols])?;
        let _g = self.lock()?;
        if rows == 1 || (src_stride == cols && dst_stride == cols) {
            return self.gpu.dtod(dst.ptr() + dst_off as u64 * 4, src.ptr() + src_off as u64 * 4, n * 4).map_err(dev);
        }
        let (sp, so, ss, dp, doff, ds, r, c) =
            (src.ptr(), src_off as i64, src_stride as i64, dst.ptr(), dst_off as i64, dst_stride as i64, rows as i64, cols as i64);
        // SAFETY: launch contract: `copy_2d(const float*, i64, i64, float*, i64, i64, i64, i64)`
        // gets (u64, i64, i64, u64, i64 x4); `check_copy_2d` bounded both strided ranges by their
        // buffers' lengths; src and dst are distinct buffers (a shared and a mutable borrow);
        // grid-stride.
        unsafe {
            self.gpu.launch("copy_2d", self.grid(n), 256).map_err(dev)?.arg(&sp).arg(&so).arg(&ss).arg(&dp).arg(&doff).arg(&ds).arg(&r).arg(&c).go()
        }
        .map_err(dev)
    }

    fn gather_rows(&self, src: &DevBuf<f32>, rows: &DevBuf<u64>, num_rows: usize, cols: usize, dst: &mut DevBuf<f32>, dst_off: usize) -> Result<()> {
        let total = crate::backend::check_packed_rows("gather_rows", rows.len(), num_rows, cols, dst_off, dst.len())?;
        if total == 0 {
            return Ok(());
        }
        let src_rows = src.len() / cols;
        let _g = self.lock()?;
        let gathered = (|| {
            let flag = self.scratch(8)?;
            self.gpu.memset0(flag, 8).map_err(dev)?;
            let (sp, sr, rp, n, c, dp) = (src.ptr(), src_rows as u64, rows.ptr(), num_rows as i64, cols as i64, dst.ptr() + 4 * dst_off as u64);
            // SAFETY: launch contract: `gather_rows(const float*, u64, const u64*, i64, i64, float*,
            // u64*)` gets (u64, u64, u64, i64, i64, u64, u64); rows holds num_rows indices, dst
            // num_rows·cols floats from dst_off (`check_packed_rows`); the kernel reads only rows
            // below src_rows = len(src) / cols, so inside src, and flags the others in `flag`, 8
            // zeroed bytes of arena; src and dst are distinct buffers (a shared and a mutable
            // borrow); grid-stride.
            unsafe { self.gpu.launch("gather_rows", self.grid(total), 256).map_err(dev)?.arg(&sp).arg(&sr).arg(&rp).arg(&n).arg(&c).arg(&dp).arg(&flag).go() }.map_err(dev)?;
            let mut bad = [0u64; 1];
            self.gpu.dtoh(&mut bad, flag).map_err(dev)?;
            match bad[0] {
                0 => Ok(()),
                i => Err(Error::Input(format!("gather_rows: row index {} of {num_rows} lies outside a buffer of {src_rows} rows of {cols}", i - 1))),
            }
        })();
        let d = self.done();
        gathered?;
        d
    }

    fn put_rows(&self, src: &DevBuf<f32>, src_off: usize, rows: &DevBuf<u64>, num_rows: usize, cols: usize, dst: &mut DevBuf<f32>) -> Result<()> {
        let total = crate::backend::check_packed_rows("put_rows", rows.len(), num_rows, cols, src_off, src.len())?;
        if total == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        // The rows are on the device: one pass checks them there (strictly ascending, inside
        // dst) before any is written, as the CPU backend checks them on the host.
        let checked = self.check_rows("put_rows", rows, num_rows, dst.len() / cols);
        let d = self.done();
        checked?;
        d?;
        let (sp, rp, n, c, dp) = (src.ptr() + 4 * src_off as u64, rows.ptr(), num_rows as i64, cols as i64, dst.ptr());
        // SAFETY: launch contract: `put_rows(const float*, const u64*, i64, i64, float*)` gets
        // (u64, u64, i64, i64, u64); src holds num_rows·cols floats from src_off and rows num_rows
        // indices (`check_packed_rows`), just checked on the device to be strictly ascending and
        // below len(dst) / cols, so every written row lies inside dst; src and dst are distinct
        // buffers (a shared and a mutable borrow); grid-stride.
        unsafe { self.gpu.launch("put_rows", self.grid(total), 256).map_err(dev)?.arg(&sp).arg(&rp).arg(&n).arg(&c).arg(&dp).go() }.map_err(dev)
    }

    fn staging(&self, n: usize) -> Result<Pinned> {
        self.gpu.staging(n).map_err(dev)
    }

    fn register_staging(&self, comm: &ember_transport::Comm) {
        if let Ok(mut pool) = self.gpu.pinned.lock() {
            pool.set_registrar(Box::new(NetRegions(comm.regions())));
        }
    }

    fn register_device(&self, comm: &ember_transport::Comm) {
        if let Ok(mut pool) = self.gpu.pool.lock() {
            pool.set_registrar(Box::new(NetRegions(comm.regions())));
        }
    }

    fn flush_remote_writes(&self) -> Result<()> {
        self.gpu.flush_remote_writes().map_err(dev)
    }

    fn addr(&self, buf: &DevBuf<f32>) -> u64 {
        buf.ptr()
    }

    unsafe fn copy_addr(&self, src: u64, dst: u64, len: usize) -> Result<()> {
        let bytes = Self::size("copy_addr", &[len, 4])?;
        let _g = self.lock()?;
        // Same context (in-process ranks share the device's primary context): a device copy on
        // this rank's stream, complete before returning so the peer may reuse its buffer.
        self.gpu.dtod(dst, src, bytes).map_err(dev)?;
        self.gpu.sync().map_err(dev)
    }

    unsafe fn sum_from(&self, parts: u64, n: usize, len: usize, out: u64, acc: Accumulate) -> Result<()> {
        let total = Self::size("sum_from", &[n, len, 4])?;
        check(n > 0 && n < i32::MAX as usize && parts.checked_add(total as u64).is_some(), || format!("sum_from: {n} contributions of {len} floats"))?;
        if len == 0 {
            return Ok(());
        }
        let block = |p: usize| parts + (p * len * 4) as u64;
        match acc {
            Accumulate::F32Sum => {
                let _g = self.lock()?;
                self.gpu.dtod(out, parts, len * 4).map_err(dev)?;
                let (one, k) = (1.0f32, len as i64);
                for p in 1..n {
                    let xp = block(p);
                    // SAFETY: launch contract: `axpy_f32(float, const float*, float*, i64)` gets
                    // (f32, u64, u64, i64); block p of `parts` and `out` hold len floats each and do
                    // not overlap (this function's contract); grid-stride.
                    unsafe { self.gpu.launch("axpy_f32", self.grid(len), 256).map_err(dev)?.arg(&one).arg(&xp).arg(&out).arg(&k).go() }.map_err(dev)?;
                }
                self.gpu.sync().map_err(dev)
            }
            Accumulate::F64Mean => {
                let _g = self.lock()?;
                let (m, k) = (n as i32, len as i64);
                // SAFETY: launch contract: `mean_f64_parts(const float*, int, i64, float*)` gets
                // (u64, i32, i64, u64); `parts` holds n·len floats and `out` len, live and not
                // overlapping (this function's contract); n < i32::MAX (checked); grid-stride.
                unsafe { self.gpu.launch("mean_f64_parts", self.grid(len), 256).map_err(dev)?.arg(&parts).arg(&m).arg(&k).arg(&out).go() }.map_err(dev)?;
                self.gpu.sync().map_err(dev)
            }
        }
    }

    fn direct_copy(&self) -> ember_transport::fabric::DirectCopy {
        let gpu = self.gpu.clone();
        Arc::new(move |src, dst, len| {
            let copy = || -> std::result::Result<(), String> {
                gpu.bind()?;
                gpu.dtod(dst, src, len)?;
                gpu.sync()
            };
            copy().map_err(|e| ember_transport::Error::Bootstrap(format!("device copy: {e}")))
        })
    }

    fn native(&self) -> Option<&dyn NativeColl<DevBuf<f32>>> {
        #[cfg(feature = "nccl")]
        if ember_cuda::nccl::probe().is_ok() {
            return Some(&self.nccl);
        }
        None
    }
}

impl Numerics for Cuda {
    fn gemm(&self, g: Gemm, a: &DevBuf<f32>, b: &DevBuf<f32>, c: &mut DevBuf<f32>) -> Result<()> {
        self.gemm_impl(g, a, b, c)
    }

    fn bias_act(&self, x: &mut DevBuf<f32>, bias: &DevBuf<f32>, rows: usize, cols: usize, act: Act) -> Result<()> {
        let n = Self::size("bias_act", &[rows, cols])?;
        check(x.len() >= n && bias.len() == cols, || format!("bias_act: {rows}x{cols} with bias {}", bias.len()))?;
        let _g = self.lock()?;
        let (xp, bp, r, c, a) = (x.ptr(), bias.ptr(), rows as i64, cols as i64, (act == Act::Relu) as i32);
        // SAFETY: launch contract (`Launch::go`): `bias_act(float*, const float*, i64, i64, int)`
        // gets (u64, u64, i64, i64, i32); x holds rows·cols floats and bias cols (checked above);
        // grid-stride.
        unsafe { self.gpu.launch("bias_act", self.grid(n), 256).map_err(dev)?.arg(&xp).arg(&bp).arg(&r).arg(&c).arg(&a).go() }.map_err(dev)
    }

    fn act_backward(&self, y: &DevBuf<f32>, dy: &mut DevBuf<f32>, act: Act) -> Result<()> {
        check(y.len() == dy.len(), || format!("act_backward: {} vs {}", y.len(), dy.len()))?;
        if act == Act::None {
            return Ok(());
        }
        let _g = self.lock()?;
        let (yp, dp, n, a) = (y.ptr(), dy.ptr(), y.len() as i64, 1i32);
        // SAFETY: launch contract: `act_backward(const float*, float*, i64, int)` gets (u64, u64,
        // i64, i32); y and dy both hold n floats (checked equal above); grid-stride.
        unsafe { self.gpu.launch("act_backward", self.grid(y.len()), 256).map_err(dev)?.arg(&yp).arg(&dp).arg(&n).arg(&a).go() }.map_err(dev)
    }

    fn col_sum(&self, x: &DevBuf<f32>, rows: usize, cols: usize, beta: f32, out: &mut DevBuf<f32>) -> Result<()> {
        check(x.len() >= Self::size("col_sum", &[rows, cols])? && out.len() == cols, || format!("col_sum: {rows}x{cols} into {}", out.len()))?;
        let _g = self.lock()?;
        let (xp, r, c, op) = (x.ptr(), rows as i64, cols as i64, out.ptr());
        // SAFETY: launch contract: `col_sum(const float*, i64, i64, float, float*)` gets (u64, i64,
        // i64, f32, u64); x holds rows·cols floats and out cols (checked above); 256 threads are
        // the kernel's 32 columns x 8 row lanes, and the grid has a block per 32 columns.
        unsafe { self.gpu.launch("col_sum", Self::blocks(cols, 32)?, 256).map_err(dev)?.arg(&xp).arg(&r).arg(&c).arg(&beta).arg(&op).go() }.map_err(dev)
    }

    fn copy_block(&self, narrow: &mut DevBuf<f32>, wide: &mut DevBuf<f32>, rows: usize, cols: usize, dst: Layout, to_wide: bool) -> Result<()> {
        let n = Self::size("copy_block", &[rows, cols])?;
        let w = Self::size("copy_block", &[rows, dst.stride])?;
        check(narrow.len() >= n && dst.col.checked_add(cols).is_some_and(|e| e <= dst.stride) && wide.len() >= w, || {
            format!("copy_block: {rows}x{cols} at col {} of stride {}", dst.col, dst.stride)
        })?;
        if cols == 0 || rows == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        let (np, wp, r, c, s, col, t) = (narrow.ptr(), wide.ptr(), rows as i64, cols as i64, dst.stride as i64, dst.col as i64, to_wide as i32);
        // SAFETY: launch contract: `copy_block(float*, float*, i64 x5, int)` gets (u64, u64, i64
        // x5, i32); narrow holds rows·cols floats, wide rows·stride with col + cols <= stride
        // (checked above); grid-stride.
        unsafe {
            self.gpu.launch("copy_block", self.grid(n), 256).map_err(dev)?.arg(&np).arg(&wp).arg(&r).arg(&c).arg(&s).arg(&col).arg(&t).go()
        }
        .map_err(dev)
    }

    fn scale_rows(&self, x: &mut DevBuf<f32>, off: usize, stride: usize, rows: usize, cols: usize, s: &DevBuf<f32>) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        super::check_scale_rows(x.len(), off, stride, rows, cols, s.len())?;
        let n = Self::size("scale_rows", &[rows, cols])?;
        let _g = self.lock()?;
        let (xp, o, st, r, c, sp) = (x.ptr(), off as i64, stride as i64, rows as i64, cols as i64, s.ptr());
        // SAFETY: launch contract: `scale_rows(float*, i64, i64, i64, i64, const float*)` gets
        // (u64, i64 x4, u64); `check_scale_rows` bounded x's strided range and s's rows;
        // grid-stride.
        unsafe { self.gpu.launch("scale_rows", self.grid(n), 256).map_err(dev)?.arg(&xp).arg(&o).arg(&st).arg(&r).arg(&c).arg(&sp).go() }
            .map_err(dev)
    }

    fn axpy(&self, a: f32, x: &DevBuf<f32>, y: &mut DevBuf<f32>) -> Result<()> {
        check(x.len() == y.len(), || format!("axpy: {} vs {}", x.len(), y.len()))?;
        let _g = self.lock()?;
        let (xp, yp, n) = (x.ptr(), y.ptr(), x.len() as i64);
        // SAFETY: launch contract: `axpy_f32(float, const float*, float*, i64)` gets (f32, u64,
        // u64, i64); x and y hold n floats (checked equal above) and are distinct buffers;
        // grid-stride.
        unsafe { self.gpu.launch("axpy_f32", self.grid(x.len()), 256).map_err(dev)?.arg(&a).arg(&xp).arg(&yp).arg(&n).go() }.map_err(dev)
    }

    fn scale(&self, x: &mut DevBuf<f32>, a: f32) -> Result<()> {
        let _g = self.lock()?;
        let (xp, n) = (x.ptr(), x.len() as i64);
        // SAFETY: launch contract: `scale_f32(float*, float, i64)` gets (u64, f32, i64); x holds n
        // floats; grid-stride.
        unsafe { self.gpu.launch("scale_f32", self.grid(x.len()), 256).map_err(dev)?.arg(&xp).arg(&a).arg(&n).go() }.map_err(dev)
    }

    fn dot_interaction(&self, x: &DevBuf<f32>, batch: usize, f: usize, d: usize, out: &mut DevBuf<f32>) -> Result<()> {
        let (v, w) = Self::interaction_sizes("dot_interaction", batch, f, d)?;
        check(x.len() >= v && out.len() >= w, || format!("dot_interaction: batch {batch}, f {f}, d {d}: buffers too small"))?;
        let _g = self.lock()?;
        let (xp, b, fi, di, op) = (x.ptr(), batch as i64, f as i64, d as i64, out.ptr());
        // SAFETY: launch contract: `dot_interaction(const float*, i64, i64, i64, float*)` gets
        // (u64, i64 x3, u64); x holds batch·(f+1)·d floats and out batch·(d + (f+1)f/2) (checked
        // above, sizes overflow-checked); grid-stride.
        unsafe { self.gpu.launch("dot_interaction", self.grid(w), 256).map_err(dev)?.arg(&xp).arg(&b).arg(&fi).arg(&di).arg(&op).go() }.map_err(dev)
    }

    fn dot_interaction_backward(&self, x: &DevBuf<f32>, dout: &DevBuf<f32>, batch: usize, f: usize, d: usize, dx: &mut DevBuf<f32>) -> Result<()> {
        let (v, w) = Self::interaction_sizes("dot_interaction_backward", batch, f, d)?;
        check(x.len() >= v && dout.len() >= w && dx.len() >= v, || {
            format!("dot_interaction_backward: batch {batch}, f {f}, d {d}: buffers too small")
        })?;
        let _g = self.lock()?;
        let (xp, dp, b, fi, di, gp) = (x.ptr(), dout.ptr(), batch as i64, f as i64, d as i64, dx.ptr());
        // SAFETY: launch contract: `dot_interaction_backward(const float*, const float*, i64 x3,
        // float*)` gets (u64, u64, i64 x3, u64); x and dx hold batch·(f+1)·d floats and dout the
        // interaction's width per sample (checked above); grid-stride.
        unsafe {
            self.gpu.launch("dot_interaction_backward", self.grid(v), 256).map_err(dev)?.arg(&xp).arg(&dp).arg(&b).arg(&fi).arg(&di).arg(&gp).go()
        }
        .map_err(dev)
    }

    fn cross_combine(&self, x0: &DevBuf<f32>, uv: &DevBuf<f32>, bias: &DevBuf<f32>, xl: &DevBuf<f32>, rows: usize, cols: usize, out: &mut DevBuf<f32>) -> Result<()> {
        let n = Self::size("cross_combine", &[rows, cols])?;
        check(x0.len() >= n && uv.len() >= n && xl.len() >= n && out.len() >= n && bias.len() == cols, || format!("cross_combine: {rows}x{cols}"))?;
        let _g = self.lock()?;
        let (a, b, c, d, r, co, o) = (x0.ptr(), uv.ptr(), bias.ptr(), xl.ptr(), rows as i64, cols as i64, out.ptr());
        // SAFETY: launch contract: `cross_combine(const float* x4, i64, i64, float*)` gets (u64 x4,
        // i64, i64, u64); x0, uv, xl and out hold rows·cols floats, bias cols (checked above); out
        // is the one mutable borrow, distinct from the inputs; grid-stride.
        unsafe {
            self.gpu.launch("cross_combine", self.grid(n), 256).map_err(dev)?.arg(&a).arg(&b).arg(&c).arg(&d).arg(&r).arg(&co).arg(&o).go()
        }
        .map_err(dev)
    }

    fn cross_combine_backward(&self, x0: &DevBuf<f32>, uv: &DevBuf<f32>, bias: &DevBuf<f32>, dout: &DevBuf<f32>, rows: usize, cols: usize, duv: &mut DevBuf<f32>, dx0: &mut DevBuf<f32>) -> Result<()> {
        self.cross_combine_backward_impl(x0, uv, bias, dout, rows, cols, duv, dx0)
    }

    fn bce_with_logits(&self, logits: &DevBuf<f32>, labels: &DevBuf<f32>, scale: f32, dlogits: &mut DevBuf<f32>) -> Result<f64> {
        self.bce_with_logits_impl(logits, labels, scale, dlogits)
    }

    fn dense_update(&self, param: &mut DevBuf<f32>, grad: &DevBuf<f32>, state: &mut DevBuf<f32>, upd: &DenseUpdate) -> Result<()> {
        self.dense_update_impl(param, grad, state, upd)
    }

    fn embedding_forward(&self, shard: &Shard<Cuda>, bags: &Bags<Cuda>, out: &mut DevBuf<f32>, layout: Layout, accumulate: bool) -> Result<()> {
        self.embedding_forward_impl(shard, bags, out, layout, accumulate)
    }

    fn embedding_backward_update(&self, shard: &mut Shard<Cuda>, bags: &Bags<Cuda>, grad: &DevBuf<f32>, layout: Layout, upd: &EmbUpdate) -> Result<()> {
        self.embedding_backward_update_impl(shard, bags, grad, layout, upd)
    }

    fn embedding_row_grads(&self, shard: &Shard<Cuda>, bags: &Bags<Cuda>, grad: &DevBuf<f32>, layout: Layout, upd: &EmbUpdate) -> Result<RowGrads<Cuda>> {
        self.embedding_row_grads_impl(shard, bags, grad, layout, upd)
    }

    fn embedding_apply(&self, shard: &mut Shard<Cuda>, rg: &RowGrads<Cuda>, row_sq: Option<&DevBuf<f32>>, upd: &EmbUpdate) -> Result<()> {
        self.embedding_apply_impl(shard, rg, row_sq, upd)
    }
}
