//! The CUDA backend: device buffers from the hand-managed pool, NVRTC-compiled kernels, cuBLAS.
//!
//! Everything runs in order on one stream. Per-operation scratch (sort keys, histograms, run
//! boundaries) comes from the pool's arena, which is rewound after each operation: stream order
//! makes the reuse safe, and a steady-state step makes no driver allocation. Host staging memory
//! (`Backend::staging`) is page-locked, recycled by the device's pinned pool (`ember_cuda::pinned`).
//! Semantics are those of the CPU reference (`backend::cpu`); the self-test (`crate::selftest`)
//! checks them.
use super::*;
use crate::{Error, Result};
use ember_cuda::cudarc;
use ember_cuda::device::{DevBuf, Gpu, Pinned};
use ember_cuda::kernels::{CHUNK, MAX_BWD_COLS, RADIX_TILE, SCAN_BLOCK, SHORT_RUN};
pub use ember_cuda::pinned::PinnedStats;
pub use ember_cuda::pool::{dlrm_step_trace, PoolConfig, PoolStats, TraceOp};
use std::sync::{Arc, Mutex};

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

/// The optimizer as the kernels take it (layout of `struct Opt` in embedding.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Opt {
    kind: i32,
    lr: f32,
    eps: f32,
    c: f32,
    eps_inside: i32,
    l2: f32,
    dim: f32,
}
// SAFETY: plain old data with the C layout the kernels expect.
unsafe impl cudarc::driver::DeviceRepr for Opt {}

impl Opt {
    fn new(u: &EmbUpdate, dim: usize) -> Opt {
        Opt {
            kind: match u.kind {
                EmbKind::Sgd => 0,
                EmbKind::RowWiseAdagrad => 1,
                EmbKind::Adagrad => 2,
            },
            lr: u.lr,
            eps: u.eps,
            c: u.c,
            eps_inside: u.eps_inside as i32,
            l2: u.l2,
            dim: dim as f32,
        }
    }
}

/// The CUDA backend on one device.
pub struct Cuda {
    gpu: Arc<Gpu>,
    /// Serialises operations that use the arena (Backend is Sync).
    op: Mutex<()>,
    /// Use the first-version backward (sort + RLE + warp per row) for every shard; set from
    /// `EMBER_CUDA_BWD=legacy` at open, or by `set_legacy_backward` (benchmarks compare both).
    legacy_bwd: std::sync::atomic::AtomicBool,
    /// NCCL communicators of this rank (created on first use).
    #[cfg(feature = "nccl")]
    nccl: super::nccl::Nccl,
}

/// Sorted and run-length encoded occurrences of one backward call (arena scratch).
struct Prep {
    n: usize,
    vals: u64,
    bag_of: u64,
    uniq: u64,
    seg: u64,
    counters: u64,
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
            nccl: super::nccl::Nccl::new(gpu.stream.clone()),
            gpu,
            op: Mutex::new(()),
            legacy_bwd: std::sync::atomic::AtomicBool::new(legacy),
        }
    }

    /// Whether a CUDA device can be opened here (never panics). Err says why not.
    pub fn probe() -> Result<usize> {
        ember_cuda::device::probe(0).map_err(dev)
    }

    /// Select the first-version fused backward (true) or the fast one (false, the default).
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

    fn blocks(n: usize, per: usize) -> Result<u32> {
        let b = n.div_ceil(per).max(1);
        u32::try_from(b).map_err(|_| Error::Input(format!("launch of {n} threads is too large")))
    }

    /// In-place exclusive scan of `n` u32 at `ptr`.
    fn scan(&self, ptr: u64, n: usize) -> Result<()> {
        let nb = n.div_ceil(SCAN_BLOCK).max(1);
        let ni = n as i64;
        if nb == 1 {
            unsafe { self.gpu.launch("scan_blocks", 1, 256).map_err(dev)?.arg(&ptr).arg(&ptr).arg(&ni).arg(&NULL).go() }.map_err(dev)?;
            return Ok(());
        }
        let sums = self.scratch(nb * 4)?;
        let g = Self::blocks(n, SCAN_BLOCK)?;
        unsafe { self.gpu.launch("scan_blocks", g, 256).map_err(dev)?.arg(&ptr).arg(&ptr).arg(&ni).arg(&sums).go() }.map_err(dev)?;
        self.scan(sums, nb)?;
        let g = Self::blocks(n, 256)?;
        unsafe { self.gpu.launch("scan_add", g, 256).map_err(dev)?.arg(&ptr).arg(&ni).arg(&sums).go() }.map_err(dev)
    }

    fn check_bags(&self, rows: usize, cols: usize, bags: &Bags<Cuda>, buf_len: usize, layout: Layout, what: &str) -> Result<()> {
        let n = bags.num_bags;
        check(bags.offsets.len() == n + 1, || format!("{what}: {} offsets for {n} bags", bags.offsets.len()))?;
        if let Some(s) = &bags.scale {
            check(s.len() == n, || format!("{what}: {} scales for {n} bags", s.len()))?;
        }
        check(layout.col + cols <= layout.stride, || format!("{what}: columns {}..{} exceed stride {}", layout.col, layout.col + cols, layout.stride))?;
        check(n == 0 || (n - 1) * layout.stride + layout.col + cols <= buf_len, || {
            format!("{what}: buffer of {buf_len} floats too small for {n} rows of stride {}", layout.stride)
        })?;
        check(rows <= u32::MAX as usize && bags.ids.len() < u32::MAX as usize && n < u32::MAX as usize, || {
            format!("{what}: shard rows, ids and bags must each be < 2^32 on the GPU")
        })?;
        Ok(())
    }

    /// Sort the occurrences by (row, position) and run-length encode the rows.
    fn prepare(&self, bags: &Bags<Cuda>, rows: usize) -> Result<Prep> {
        let n = bags.ids.len();
        let nb = bags.num_bags as i64;
        let ni = n as i64;
        let bag_of = self.scratch(n * 4)?;
        let (mut k0, mut v0) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
        let (mut k1, mut v1) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
        let offs = bags.offsets.ptr();
        let ids = bags.ids.ptr();
        unsafe { self.gpu.launch("emb_bag_of", Self::blocks(bags.num_bags, 256)?, 256).map_err(dev)?.arg(&offs).arg(&nb).arg(&bag_of).go() }.map_err(dev)?;
        unsafe { self.gpu.launch("emb_keys", Self::blocks(n, 256)?, 256).map_err(dev)?.arg(&ids).arg(&ni).arg(&k0).arg(&v0).go() }.map_err(dev)?;
        let (k, v, k_alt, v_alt) = self.sort_pairs(k0, v0, k1, v1, n, rows)?;
        (k0, v0, k1, v1) = (k, v, k_alt, v_alt);
        // Run-length encode (reuse k1/v1 as flags and their scan).
        let (flags, idx) = (k1, v1);
        let uniq = self.scratch(n * 4)?;
        let seg = self.scratch((n + 1) * 4)?;
        let counters = self.scratch(16)?;
        let g = Self::blocks(n, 256)?;
        unsafe { self.gpu.launch("rle_flags", g, 256).map_err(dev)?.arg(&k0).arg(&ni).arg(&flags).go() }.map_err(dev)?;
        self.gpu.dtod(idx, flags, n * 4).map_err(dev)?;
        self.scan(idx, n)?;
        unsafe {
            self.gpu.launch("rle_compact", g, 256).map_err(dev)?.arg(&k0).arg(&flags).arg(&idx).arg(&ni).arg(&uniq).arg(&seg).arg(&counters).go()
        }
        .map_err(dev)?;
        Ok(Prep { n, vals: v0, bag_of, uniq, seg, counters })
    }

    /// Stable LSD radix sort of `n` (u32 key, u32 value) pairs in (k0, v0), keys < `rows`:
    /// ceil(log2(rows)/8) passes of 8 bits. Returns (keys, values, spare keys, spare values).
    #[allow(clippy::too_many_arguments)]
    fn sort_pairs(&self, mut k0: u64, mut v0: u64, mut k1: u64, mut v1: u64, n: usize, rows: usize) -> Result<(u64, u64, u64, u64)> {
        let ni = n as i64;
        let bits = if rows <= 1 { 0 } else { 64 - ((rows - 1) as u64).leading_zeros() };
        let tiles = n.div_ceil(RADIX_TILE).max(1);
        let ti = tiles as i32;
        let hist = self.scratch(256 * tiles * 4)?;
        let mut shift = 0i32;
        while (shift as u32) < bits {
            unsafe { self.gpu.launch("radix_hist", tiles as u32, 256).map_err(dev)?.arg(&k0).arg(&ni).arg(&shift).arg(&hist).arg(&ti).go() }.map_err(dev)?;
            self.scan(hist, 256 * tiles)?;
            unsafe {
                self.gpu
                    .launch("radix_scatter", tiles as u32, 256)
                    .map_err(dev)?
                    .arg(&k0)
                    .arg(&v0)
                    .arg(&ni)
                    .arg(&shift)
                    .arg(&hist)
                    .arg(&ti)
                    .arg(&k1)
                    .arg(&v1)
                    .go()
            }
            .map_err(dev)?;
            std::mem::swap(&mut k0, &mut k1);
            std::mem::swap(&mut v0, &mut v1);
            shift += 8;
        }
        Ok((k0, v0, k1, v1))
    }

    /// Whether the fast fused backward applies (float4 rows and gradient columns).
    fn fast_bwd_ok(&self, cols: usize, layout: Layout) -> bool {
        cols % 4 == 0 && cols <= MAX_BWD_COLS && layout.stride % 4 == 0 && layout.col % 4 == 0 && !self.legacy_bwd.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The fast fused backward + optimizer (see embedding.cu): keys/bags, radix sort, one
    /// fused kernel over sorted positions, two kernels for runs > SHORT_RUN. No host sync.
    #[allow(clippy::too_many_arguments)]
    fn backward_fast(&self, bags: &Bags<Cuda>, rows: usize, w: u64, state: u64, cols: usize, grad: u64, layout: Layout, scale: u64, o: Opt) -> Result<()> {
        let n = bags.ids.len();
        let ni = n as i64;
        let nb = bags.num_bags as i64;
        let (k0, v0) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
        let (k1, v1) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
        let long_counters = self.scratch(16)?;
        let max_long = n / (SHORT_RUN + 1) + 1;
        let max_items = n / CHUNK + max_long + 1;
        let long_info = self.scratch(max_long * 12)?;
        let items = self.scratch(max_items * 8)?;
        let acc = self.scratch(max_long * cols * 4)?;
        let (offs, ids) = (bags.offsets.ptr(), bags.ids.ptr());
        unsafe {
            self.gpu
                .launch("emb_keys_bags", Self::blocks(bags.num_bags.max(1) * 32, 256)?, 256)
                .map_err(dev)?
                .arg(&offs)
                .arg(&ids)
                .arg(&nb)
                .arg(&k0)
                .arg(&v0)
                .arg(&long_counters)
                .go()
        }
        .map_err(dev)?;
        let (keys, vals, _, _) = self.sort_pairs(k0, v0, k1, v1, n, rows)?;
        let nv = cols / 4;
        let (kernel, t) = if nv <= 32 { ("emb_bwd_fused1", nv.next_power_of_two().max(1)) } else { ("emb_bwd_fused4", 32) };
        let tlog = t.trailing_zeros() as i32;
        let (ci, stride, col) = (cols as i64, layout.stride as i64, layout.col as i64);
        let threads = n * t;
        let grid = Self::blocks(threads, 256)?.min(self.gpu.sm_count * 64).max(1);
        unsafe {
            self.gpu
                .launch(kernel, grid, 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&state)
                .arg(&ci)
                .arg(&keys)
                .arg(&vals)
                .arg(&ni)
                .arg(&grad)
                .arg(&stride)
                .arg(&col)
                .arg(&scale)
                .arg(&o)
                .arg(&tlog)
                .arg(&long_counters)
                .arg(&long_info)
                .arg(&items)
                .arg(&acc)
                .go()
        }
        .map_err(dev)?;
        let g = (max_items as u32).min(self.gpu.sm_count * 8).max(1);
        let accum = if nv <= 32 { "emb_bwd_long_accum_v4_1" } else { "emb_bwd_long_accum_v4_4" };
        unsafe {
            self.gpu
                .launch(accum, g, 256)
                .map_err(dev)?
                .arg(&ci)
                .arg(&vals)
                .arg(&grad)
                .arg(&stride)
                .arg(&col)
                .arg(&scale)
                .arg(&long_counters)
                .arg(&long_info)
                .arg(&items)
                .arg(&acc)
                .arg(&tlog)
                .go()
        }
        .map_err(dev)?;
        let g = Self::blocks(max_long * 32, 256)?.min(self.gpu.sm_count * 8).max(1);
        unsafe {
            self.gpu
                .launch("emb_bwd_long_apply2", g, 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&state)
                .arg(&ci)
                .arg(&long_counters)
                .arg(&long_info)
                .arg(&acc)
                .arg(&o)
                .go()
        }
        .map_err(dev)
    }

    /// The three update kernels (short runs, long-run chunks, long-run finish).
    #[allow(clippy::too_many_arguments)]
    fn run_update(&self, p: &Prep, w: u64, state: u64, cols: usize, grad: u64, layout: Layout, scale: u64, o: Opt, mode: i32, rg_grads: u64, rg_sq: u64) -> Result<()> {
        let n = p.n;
        let max_long = n / (SHORT_RUN + 1) + 1;
        let max_items = n / CHUNK + max_long + 1;
        let long_counters = self.scratch(8)?;
        self.gpu.memset0(long_counters, 8).map_err(dev)?;
        let long_rows = self.scratch(max_long * 4)?;
        let items = self.scratch(max_items * 8)?;
        let acc = self.scratch(max_long * cols * 4)?;
        self.gpu.memset0(acc, max_long * cols * 4).map_err(dev)?;
        let (ci, stride, col) = (cols as i64, layout.stride as i64, layout.col as i64);
        unsafe {
            self.gpu
                .launch("emb_bwd_short", self.grid(n * 32), 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&state)
                .arg(&ci)
                .arg(&p.uniq)
                .arg(&p.seg)
                .arg(&p.counters)
                .arg(&p.vals)
                .arg(&p.bag_of)
                .arg(&grad)
                .arg(&stride)
                .arg(&col)
                .arg(&scale)
                .arg(&o)
                .arg(&mode)
                .arg(&rg_grads)
                .arg(&rg_sq)
                .arg(&long_counters)
                .arg(&long_rows)
                .arg(&items)
                .go()
        }
        .map_err(dev)?;
        let g = (max_items as u32).min(self.gpu.sm_count * 8);
        unsafe {
            self.gpu
                .launch("emb_bwd_long_accum", g, 256)
                .map_err(dev)?
                .arg(&ci)
                .arg(&p.seg)
                .arg(&p.vals)
                .arg(&p.bag_of)
                .arg(&grad)
                .arg(&stride)
                .arg(&col)
                .arg(&scale)
                .arg(&long_counters)
                .arg(&long_rows)
                .arg(&items)
                .arg(&acc)
                .go()
        }
        .map_err(dev)?;
        unsafe {
            self.gpu
                .launch("emb_bwd_long_apply", self.grid(max_long * 32), 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&state)
                .arg(&ci)
                .arg(&p.uniq)
                .arg(&long_counters)
                .arg(&long_rows)
                .arg(&acc)
                .arg(&o)
                .arg(&mode)
                .arg(&rg_grads)
                .arg(&rg_sq)
                .go()
        }
        .map_err(dev)
    }

    /// Milliseconds per call of the fast backward's first phase alone (keys/bags + radix sort
    /// of `bags` for a shard of `rows` rows), CUDA-event mean of `iters`: the per-phase breakdown
    /// of `embedding_backward_update` for benchmarks.
    pub fn time_backward_sort(&self, bags: &Bags<Cuda>, rows: usize, iters: usize) -> Result<f64> {
        let _g = self.lock()?;
        let n = bags.ids.len();
        let nb = bags.num_bags as i64;
        let (offs, ids) = (bags.offsets.ptr(), bags.ids.ptr());
        let r = self.gpu.time_ms(iters, || {
            let f = || -> Result<()> {
                let (k0, v0) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
                let (k1, v1) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
                let lc = self.scratch(16)?;
                unsafe {
                    self.gpu.launch("emb_keys_bags", Self::blocks(bags.num_bags.max(1) * 32, 256)?, 256).map_err(dev)?.arg(&offs).arg(&ids).arg(&nb).arg(&k0).arg(&v0).arg(&lc).go()
                }
                .map_err(dev)?;
                self.sort_pairs(k0, v0, k1, v1, n, rows)?;
                self.done()
            };
            f().map_err(|e| e.to_string())
        });
        let d = self.done();
        let r = r.map_err(dev)?;
        d?;
        Ok(r)
    }

    /// Device copy bandwidth (bytes read + written per second) over `bytes`-sized buffers.
    pub fn copy_bandwidth(&self, bytes: usize, iters: usize) -> Result<f64> {
        let _g = self.lock()?;
        let a: DevBuf<u8> = self.gpu.alloc(bytes).map_err(dev)?;
        let b: DevBuf<u8> = self.gpu.alloc(bytes).map_err(dev)?;
        self.gpu.memset0(a.ptr(), bytes).map_err(dev)?;
        self.gpu.dtod(b.ptr(), a.ptr(), bytes).map_err(dev)?;
        let ms = self.gpu.time_ms(iters, || self.gpu.dtod(b.ptr(), a.ptr(), bytes)).map_err(dev)?;
        Ok(2.0 * bytes as f64 / (ms * 1e-3))
    }

    /// Replay a training step's allocation trace `steps` times against this device's pool and
    /// against plain per-tensor `cuMemAlloc`/`cuMemFree`; returns rows for `ember bench mem`.
    pub fn bench_alloc_replay(&self, trace: &[ember_cuda::pool::TraceOp], steps: usize) -> Result<Vec<AllocReplayRow>> {
        use ember_cuda::pool::{replay, Pool, TraceOp};
        let _g = self.lock()?;
        let mut rows = Vec::new();
        // Pool: a fresh pool on this device (its own reservation).
        let t0 = std::time::Instant::now();
        let stats = {
            let alloc = DriverAlloc::default();
            let mut pool = Pool::new(alloc, PoolConfig::default()).map_err(|e| dev(e.to_string()))?;
            let s = replay(&mut pool, trace, steps).map_err(|e| dev(e.to_string()))?;
            let allocs = pool.allocator().allocs;
            (s, allocs)
        };
        let dt = t0.elapsed().as_secs_f64();
        rows.push(AllocReplayRow {
            allocator: "ember pool".into(),
            steps,
            seconds: dt,
            driver_allocs: stats.1,
            reserved: stats.0.reserved,
            peak: stats.0.peak,
            fragmentation_at_peak: stats.0.fragmentation_at_peak,
        });
        // Plain per-tensor allocation.
        let t0 = std::time::Instant::now();
        let mut slots: Vec<Option<(u64, usize)>> = Vec::new();
        let mut driver_allocs = 0;
        let (mut live, mut peak) = (0usize, 0usize);
        for _ in 0..steps {
            for op in trace {
                match *op {
                    TraceOp::Alloc { id, bytes, .. } => {
                        if id >= slots.len() {
                            slots.resize(id + 1, None);
                        }
                        // SAFETY: plain allocation, freed below.
                        let p = unsafe { cudarc::driver::result::malloc_sync(bytes.max(1)) }.map_err(|e| dev(format!("cuMemAlloc: {e:?}")))?;
                        driver_allocs += 1;
                        live += bytes;
                        peak = peak.max(live);
                        slots[id] = Some((p, bytes));
                    }
                    TraceOp::Free { id } => {
                        if let Some((p, b)) = slots.get_mut(id).and_then(|s| s.take()) {
                            // SAFETY: p came from malloc_sync above.
                            unsafe { cudarc::driver::result::free_sync(p) }.map_err(|e| dev(format!("cuMemFree: {e:?}")))?;
                            live -= b;
                        }
                    }
                    TraceOp::Step => {}
                }
            }
        }
        rows.push(AllocReplayRow {
            allocator: "cuMemAlloc per tensor".into(),
            steps,
            seconds: t0.elapsed().as_secs_f64(),
            driver_allocs,
            reserved: peak,
            peak,
            fragmentation_at_peak: 0.0,
        });
        Ok(rows)
    }
}

/// One row of the allocation-trace replay.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AllocReplayRow {
    pub allocator: String,
    pub steps: usize,
    pub seconds: f64,
    pub driver_allocs: usize,
    pub reserved: usize,
    pub peak: usize,
    pub fragmentation_at_peak: f64,
}

/// Plain driver allocations for a replay pool (the context is current on this thread).
#[derive(Default)]
struct DriverAlloc {
    allocs: usize,
}

impl ember_cuda::pool::RawAllocator for DriverAlloc {
    fn alloc(&mut self, bytes: usize) -> std::result::Result<u64, String> {
        self.allocs += 1;
        // SAFETY: plain allocation, freed by `free`.
        unsafe { cudarc::driver::result::malloc_sync(bytes) }.map_err(|e| format!("{e:?}"))
    }
    fn free(&mut self, addr: u64, _bytes: usize) {
        // SAFETY: addr came from `alloc`.
        let _ = unsafe { cudarc::driver::result::free_sync(addr) };
    }
}

impl Backend for Cuda {
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
    fn staging(&self, n: usize) -> Result<Pinned> {
        self.gpu.staging(n).map_err(dev)
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
    fn native(&self) -> Option<&dyn NativeColl<Cuda>> {
        #[cfg(feature = "nccl")]
        if ember_cuda::nccl::probe().is_ok() {
            return Some(&self.nccl);
        }
        None
    }
    fn synchronize(&self) -> Result<()> {
        self.gpu.bind().map_err(dev)?;
        self.gpu.sync().map_err(dev)
    }
    fn flush_remote_writes(&self) -> Result<()> {
        self.gpu.flush_remote_writes().map_err(dev)
    }

    fn gemm(&self, g: Gemm, a: &DevBuf<f32>, b: &DevBuf<f32>, c: &mut DevBuf<f32>) -> Result<()> {
        use cudarc::cublas::{result as br, sys as bs};
        let Gemm { m, n, k, trans_a, trans_b, alpha, beta } = g;
        check(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, || {
            format!("gemm {m}x{n}x{k}: buffers of {}, {}, {} floats too small", a.len(), b.len(), c.len())
        })?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        check(m.max(n).max(k) < i32::MAX as usize, || "gemm: dimension too large for cuBLAS".into())?;
        let _g = self.lock()?;
        // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
        let opb = if trans_b { bs::cublasOperation_t::CUBLAS_OP_T } else { bs::cublasOperation_t::CUBLAS_OP_N };
        let opa = if trans_a { bs::cublasOperation_t::CUBLAS_OP_T } else { bs::cublasOperation_t::CUBLAS_OP_N };
        let ldb = if trans_b { k } else { n } as i32;
        let lda = if trans_a { m } else { k } as i32;
        // SAFETY: sizes checked above; pointers are live device buffers; alpha/beta are host values.
        unsafe {
            br::sgemm(
                *self.gpu.blas.handle(),
                opb,
                opa,
                n as i32,
                m as i32,
                k as i32,
                &alpha,
                b.ptr() as *const f32,
                ldb.max(1),
                a.ptr() as *const f32,
                lda.max(1),
                &beta,
                c.ptr() as *mut f32,
                n as i32,
            )
        }
        .map_err(|e| Error::Device(format!("cublasSgemm {m}x{n}x{k}: {e:?}")))
    }

    fn bias_act(&self, x: &mut DevBuf<f32>, bias: &DevBuf<f32>, rows: usize, cols: usize, act: Act) -> Result<()> {
        check(x.len() >= rows * cols && bias.len() == cols, || format!("bias_act: {rows}x{cols} with bias {}", bias.len()))?;
        let _g = self.lock()?;
        let (xp, bp, r, c, a) = (x.ptr(), bias.ptr(), rows as i64, cols as i64, (act == Act::Relu) as i32);
        unsafe { self.gpu.launch("bias_act", self.grid(rows * cols), 256).map_err(dev)?.arg(&xp).arg(&bp).arg(&r).arg(&c).arg(&a).go() }.map_err(dev)
    }

    fn act_backward(&self, y: &DevBuf<f32>, dy: &mut DevBuf<f32>, act: Act) -> Result<()> {
        check(y.len() == dy.len(), || format!("act_backward: {} vs {}", y.len(), dy.len()))?;
        if act == Act::None {
            return Ok(());
        }
        let _g = self.lock()?;
        let (yp, dp, n, a) = (y.ptr(), dy.ptr(), y.len() as i64, 1i32);
        unsafe { self.gpu.launch("act_backward", self.grid(y.len()), 256).map_err(dev)?.arg(&yp).arg(&dp).arg(&n).arg(&a).go() }.map_err(dev)
    }

    fn col_sum(&self, x: &DevBuf<f32>, rows: usize, cols: usize, beta: f32, out: &mut DevBuf<f32>) -> Result<()> {
        check(x.len() >= rows * cols && out.len() == cols, || format!("col_sum: {rows}x{cols} into {}", out.len()))?;
        let _g = self.lock()?;
        let (xp, r, c, op) = (x.ptr(), rows as i64, cols as i64, out.ptr());
        unsafe { self.gpu.launch("col_sum", Self::blocks(cols, 32)?, 256).map_err(dev)?.arg(&xp).arg(&r).arg(&c).arg(&beta).arg(&op).go() }.map_err(dev)
    }

    fn copy_block(&self, narrow: &mut DevBuf<f32>, wide: &mut DevBuf<f32>, rows: usize, cols: usize, dst: Layout, to_wide: bool) -> Result<()> {
        check(narrow.len() >= rows * cols && dst.col + cols <= dst.stride && wide.len() >= rows * dst.stride, || {
            format!("copy_block: {rows}x{cols} at col {} of stride {}", dst.col, dst.stride)
        })?;
        if cols == 0 || rows == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        let (np, wp, r, c, s, col, t) = (narrow.ptr(), wide.ptr(), rows as i64, cols as i64, dst.stride as i64, dst.col as i64, to_wide as i32);
        unsafe {
            self.gpu.launch("copy_block", self.grid(rows * cols), 256).map_err(dev)?.arg(&np).arg(&wp).arg(&r).arg(&c).arg(&s).arg(&col).arg(&t).go()
        }
        .map_err(dev)
    }

    fn copy_2d(&self, src: &DevBuf<f32>, src_off: usize, src_stride: usize, dst: &mut DevBuf<f32>, dst_off: usize, dst_stride: usize, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        super::check_copy_2d(src.len(), src_off, src_stride, dst.len(), dst_off, dst_stride, rows, cols)?;
        let _g = self.lock()?;
        if rows == 1 || (src_stride == cols && dst_stride == cols) {
            return self.gpu.dtod(dst.ptr() + dst_off as u64 * 4, src.ptr() + src_off as u64 * 4, rows * cols * 4).map_err(dev);
        }
        let (sp, so, ss, dp, doff, ds, r, c) =
            (src.ptr(), src_off as i64, src_stride as i64, dst.ptr(), dst_off as i64, dst_stride as i64, rows as i64, cols as i64);
        unsafe {
            self.gpu.launch("copy_2d", self.grid(rows * cols), 256).map_err(dev)?.arg(&sp).arg(&so).arg(&ss).arg(&dp).arg(&doff).arg(&ds).arg(&r).arg(&c).go()
        }
        .map_err(dev)
    }

    fn scale_rows(&self, x: &mut DevBuf<f32>, off: usize, stride: usize, rows: usize, cols: usize, s: &DevBuf<f32>) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        super::check_scale_rows(x.len(), off, stride, rows, cols, s.len())?;

        let _g = self.lock()?;
        let (xp, o, st, r, c, sp) = (x.ptr(), off as i64, stride as i64, rows as i64, cols as i64, s.ptr());
        unsafe { self.gpu.launch("scale_rows", self.grid(rows * cols), 256).map_err(dev)?.arg(&xp).arg(&o).arg(&st).arg(&r).arg(&c).arg(&sp).go() }
            .map_err(dev)
    }

    fn addr(&self, buf: &DevBuf<f32>) -> u64 {
        buf.ptr()
    }

    unsafe fn copy_from_addr(&self, src: u64, dst: &mut DevBuf<f32>, dst_off: usize, len: usize) -> Result<()> {
        check(dst_off.checked_add(len).is_some_and(|e| e <= dst.len()), || format!("copy_from_addr: {len} floats at {dst_off} of {}", dst.len()))?;
        let _g = self.lock()?;
        // Same context (in-process ranks share the device's primary context): a device copy on
        // this rank's stream, complete before returning so the peer may reuse its buffer.
        self.gpu.dtod(dst.ptr() + dst_off as u64 * 4, src, len * 4).map_err(dev)?;
        self.gpu.sync().map_err(dev)
    }

    unsafe fn mean_rows_from(&self, srcs: &[u64], rows: &DevBuf<u64>, num_rows: usize, cols: usize, out: &mut DevBuf<f32>) -> Result<()> {
        check(rows.len() == num_rows && out.len() == num_rows * cols && !srcs.is_empty() && srcs.len() < i32::MAX as usize, || {
            format!("mean_rows_from: {} rows ({num_rows} said) of {cols} into {} floats from {} replicas", rows.len(), out.len(), srcs.len())
        })?;
        if num_rows == 0 || cols == 0 {
            return Ok(());
        }
        let table = self.upload_ids(srcs)?;
        let _g = self.lock()?;
        let (op, sp, m, rp, n, c) = (out.ptr(), table.ptr(), srcs.len() as i32, rows.ptr(), num_rows as i64, cols as i64);
        self.gpu.launch("mean_rows_from", self.grid(num_rows * cols), 256).map_err(dev)?.arg(&op).arg(&sp).arg(&m).arg(&rp).arg(&n).arg(&c).go().map_err(dev)?;
        // `table` returns to the pool when dropped; the kernel must have read it by then.
        self.gpu.sync().map_err(dev)
    }

    fn put_rows(&self, dst: &mut DevBuf<f32>, rows: &DevBuf<u64>, num_rows: usize, src: &DevBuf<f32>, cols: usize) -> Result<()> {
        // Row indices were range-checked on the host before upload (replica sync's union).
        check(rows.len() == num_rows && src.len() == num_rows * cols, || format!("put_rows: {} rows of {cols} ({} floats)", rows.len(), src.len()))?;
        if num_rows == 0 || cols == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        let (dp, rp, sp, n, c) = (dst.ptr(), rows.ptr(), src.ptr(), num_rows as i64, cols as i64);
        unsafe { self.gpu.launch("put_rows", self.grid(num_rows * cols), 256).map_err(dev)?.arg(&dp).arg(&rp).arg(&sp).arg(&n).arg(&c).go() }.map_err(dev)
    }

    fn axpy(&self, a: f32, x: &DevBuf<f32>, y: &mut DevBuf<f32>) -> Result<()> {
        check(x.len() == y.len(), || format!("axpy: {} vs {}", x.len(), y.len()))?;
        let _g = self.lock()?;
        let (xp, yp, n) = (x.ptr(), y.ptr(), x.len() as i64);
        unsafe { self.gpu.launch("axpy_f32", self.grid(x.len()), 256).map_err(dev)?.arg(&a).arg(&xp).arg(&yp).arg(&n).go() }.map_err(dev)
    }

    fn scale(&self, x: &mut DevBuf<f32>, a: f32) -> Result<()> {
        let _g = self.lock()?;
        let (xp, n) = (x.ptr(), x.len() as i64);
        unsafe { self.gpu.launch("scale_f32", self.grid(x.len()), 256).map_err(dev)?.arg(&xp).arg(&a).arg(&n).go() }.map_err(dev)
    }

    fn dot_interaction(&self, x: &DevBuf<f32>, batch: usize, f: usize, d: usize, out: &mut DevBuf<f32>) -> Result<()> {
        let w = d + (f + 1) * f / 2;
        check(x.len() >= batch * (f + 1) * d && out.len() >= batch * w, || format!("dot_interaction: batch {batch}, f {f}, d {d}: buffers too small"))?;
        let _g = self.lock()?;
        let (xp, b, fi, di, op) = (x.ptr(), batch as i64, f as i64, d as i64, out.ptr());
        unsafe { self.gpu.launch("dot_interaction", self.grid(batch * w), 256).map_err(dev)?.arg(&xp).arg(&b).arg(&fi).arg(&di).arg(&op).go() }.map_err(dev)
    }

    fn dot_interaction_backward(&self, x: &DevBuf<f32>, dout: &DevBuf<f32>, batch: usize, f: usize, d: usize, dx: &mut DevBuf<f32>) -> Result<()> {
        let w = d + (f + 1) * f / 2;
        let v = (f + 1) * d;
        check(x.len() >= batch * v && dout.len() >= batch * w && dx.len() >= batch * v, || {
            format!("dot_interaction_backward: batch {batch}, f {f}, d {d}: buffers too small")
        })?;
        let _g = self.lock()?;
        let (xp, dp, b, fi, di, gp) = (x.ptr(), dout.ptr(), batch as i64, f as i64, d as i64, dx.ptr());
        unsafe {
            self.gpu.launch("dot_interaction_backward", self.grid(batch * v), 256).map_err(dev)?.arg(&xp).arg(&dp).arg(&b).arg(&fi).arg(&di).arg(&gp).go()
        }
        .map_err(dev)
    }

    fn cross_combine(&self, x0: &DevBuf<f32>, uv: &DevBuf<f32>, bias: &DevBuf<f32>, xl: &DevBuf<f32>, rows: usize, cols: usize, out: &mut DevBuf<f32>) -> Result<()> {
        let n = rows * cols;
        check(x0.len() >= n && uv.len() >= n && xl.len() >= n && out.len() >= n && bias.len() == cols, || format!("cross_combine: {rows}x{cols}"))?;
        let _g = self.lock()?;
        let (a, b, c, d, r, co, o) = (x0.ptr(), uv.ptr(), bias.ptr(), xl.ptr(), rows as i64, cols as i64, out.ptr());
        unsafe {
            self.gpu.launch("cross_combine", self.grid(n), 256).map_err(dev)?.arg(&a).arg(&b).arg(&c).arg(&d).arg(&r).arg(&co).arg(&o).go()
        }
        .map_err(dev)
    }

    fn cross_combine_backward(&self, x0: &DevBuf<f32>, uv: &DevBuf<f32>, bias: &DevBuf<f32>, dout: &DevBuf<f32>, rows: usize, cols: usize, duv: &mut DevBuf<f32>, dx0: &mut DevBuf<f32>) -> Result<()> {
        let n = rows * cols;
        check(x0.len() >= n && uv.len() >= n && dout.len() >= n && duv.len() >= n && dx0.len() >= n && bias.len() == cols, || {
            format!("cross_combine_backward: {rows}x{cols}")
        })?;
        let _g = self.lock()?;
        let (a, b, c, d, r, co, e, f) = (x0.ptr(), uv.ptr(), bias.ptr(), dout.ptr(), rows as i64, cols as i64, duv.ptr(), dx0.ptr());
        unsafe {
            self.gpu
                .launch("cross_combine_backward", self.grid(n), 256)
                .map_err(dev)?
                .arg(&a)
                .arg(&b)
                .arg(&c)
                .arg(&d)
                .arg(&r)
                .arg(&co)
                .arg(&e)
                .arg(&f)
                .go()
        }
        .map_err(dev)
    }

    fn bce_with_logits(&self, logits: &DevBuf<f32>, labels: &DevBuf<f32>, scale: f32, dlogits: &mut DevBuf<f32>) -> Result<f64> {
        let n = labels.len();
        check(logits.len() >= n && dlogits.len() >= n, || format!("bce_with_logits: {} logits for {n} labels", logits.len()))?;
        if n == 0 {
            return Ok(0.0);
        }
        let _g = self.lock()?;
        let grid = self.grid(n).min(1024);
        let partial = self.scratch(grid as usize * 8)?;
        let (xp, yp, ni, dp) = (logits.ptr(), labels.ptr(), n as i64, dlogits.ptr());
        unsafe {
            self.gpu.launch("bce_with_logits", grid, 256).map_err(dev)?.arg(&xp).arg(&yp).arg(&ni).arg(&scale).arg(&dp).arg(&partial).go()
        }
        .map_err(dev)?;
        let mut host = vec![0f64; grid as usize];
        self.gpu.dtoh(&mut host, partial).map_err(dev)?;
        self.done()?;
        Ok(host.iter().sum())
    }

    fn dense_update(&self, param: &mut DevBuf<f32>, grad: &DevBuf<f32>, state: &mut DevBuf<f32>, upd: &DenseUpdate) -> Result<()> {
        check(param.len() == grad.len(), || format!("dense_update: param {} vs grad {}", param.len(), grad.len()))?;
        let (kind, lr, eps) = match upd.opt {
            DenseOptimizer::Sgd { lr } => (0i32, lr, 0.0f32),
            DenseOptimizer::Adagrad { lr, eps } => {
                check(state.len() == param.len(), || format!("dense_update: state {} vs param {}", state.len(), param.len()))?;
                (1, lr, eps)
            }
        };
        let _g = self.lock()?;
        let (p, g, s, n) = (param.ptr(), grad.ptr(), state.ptr(), param.len() as i64);
        unsafe {
            self.gpu
                .launch("dense_update", self.grid(param.len()), 256)
                .map_err(dev)?
                .arg(&p)
                .arg(&g)
                .arg(&s)
                .arg(&n)
                .arg(&kind)
                .arg(&lr)
                .arg(&eps)
                .arg(&upd.l2)
                .go()
        }
        .map_err(dev)
    }

    fn embedding_forward(&self, shard: &Shard<Cuda>, bags: &Bags<Cuda>, out: &mut DevBuf<f32>, layout: Layout, accumulate: bool) -> Result<()> {
        let cols = shard.spec.num_cols();
        self.check_bags(shard.spec.num_rows(), cols, bags, out.len(), layout, "embedding_forward")?;
        let n = bags.num_bags;
        if n == 0 || cols == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        let (w, ci, offs, ids) = (shard.weights.ptr(), cols as i64, bags.offsets.ptr(), bags.ids.ptr());
        let sc = bags.scale.as_ref().map_or(NULL, |s| s.ptr());
        let (op, stride, col, acc, nb) = (out.ptr(), layout.stride as i64, layout.col as i64, accumulate as i32, n as i64);
        if cols % 4 == 0 && layout.stride % 4 == 0 && layout.col % 4 == 0 {
            let tpb = (cols / 4).next_power_of_two().min(32) as i32;
            let g = Self::blocks(n * tpb as usize, 256)?;
            unsafe {
                self.gpu
                    .launch("emb_fwd_v4", g, 256)
                    .map_err(dev)?
                    .arg(&w)
                    .arg(&ci)
                    .arg(&offs)
                    .arg(&ids)
                    .arg(&sc)
                    .arg(&op)
                    .arg(&stride)
                    .arg(&col)
                    .arg(&acc)
                    .arg(&nb)
                    .arg(&tpb)
                    .go()
            }
            .map_err(dev)
        } else {
            let g = Self::blocks(n * cols, 256)?;
            unsafe {
                self.gpu
                    .launch("emb_fwd_scalar", g, 256)
                    .map_err(dev)?
                    .arg(&w)
                    .arg(&ci)
                    .arg(&offs)
                    .arg(&ids)
                    .arg(&sc)
                    .arg(&op)
                    .arg(&stride)
                    .arg(&col)
                    .arg(&acc)
                    .arg(&nb)
                    .go()
            }
            .map_err(dev)
        }
    }

    fn embedding_backward_update(&self, shard: &mut Shard<Cuda>, bags: &Bags<Cuda>, grad: &DevBuf<f32>, layout: Layout, upd: &EmbUpdate) -> Result<()> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        self.check_bags(rows, cols, bags, grad.len(), layout, "embedding_backward_update")?;
        check(shard.state.len() == rows * upd.state_per_row(cols), || {
            format!("embedding_backward_update: state of {} floats for {rows} rows and {:?}", shard.state.len(), upd.kind)
        })?;
        check(upd.kind != EmbKind::RowWiseAdagrad || cols == shard.spec.dim, || {
            "embedding_backward_update: a column shard needs the two-phase update (row_grads, then apply with whole-row Σg²)".into()
        })?;
        check(cols <= MAX_BWD_COLS, || format!("embedding_backward_update: {cols} columns per shard; the GPU kernels take at most {MAX_BWD_COLS}"))?;
        if bags.ids.is_empty() || cols == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        let sc = bags.scale.as_ref().map_or(NULL, |s| s.ptr());
        let o = Opt::new(upd, shard.spec.dim);
        let r = if self.fast_bwd_ok(cols, layout) {
            self.backward_fast(bags, rows, shard.weights.ptr(), shard.state.ptr(), cols, grad.ptr(), layout, sc, o)
        } else {
            self.prepare(bags, rows).and_then(|p| self.run_update(&p, shard.weights.ptr(), shard.state.ptr(), cols, grad.ptr(), layout, sc, o, 0, NULL, NULL))
        };
        let d = self.done();
        r.and(d)
    }

    fn embedding_row_grads(&self, shard: &Shard<Cuda>, bags: &Bags<Cuda>, grad: &DevBuf<f32>, layout: Layout, upd: &EmbUpdate) -> Result<RowGrads<Cuda>> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        self.check_bags(rows, cols, bags, grad.len(), layout, "embedding_row_grads")?;
        check(cols <= MAX_BWD_COLS, || format!("embedding_row_grads: {cols} columns per shard; the GPU kernels take at most {MAX_BWD_COLS}"))?;
        let _g = self.lock()?;
        if bags.ids.is_empty() {
            let (r, g, s) = (self.gpu.alloc(0).map_err(dev)?, self.gpu.alloc(0).map_err(dev)?, self.gpu.alloc(0).map_err(dev)?);
            return Ok(RowGrads { rows: r, num_rows: 0, grads: g, sq: s });
        }
        let result: Result<RowGrads<Cuda>> = (|| {
            let p = self.prepare(bags, rows)?;
            let mut cnt = [0u32; 1];
            self.gpu.dtoh(&mut cnt, p.counters).map_err(dev)?;
            let nu = cnt[0] as usize;
            let out_rows: DevBuf<u64> = self.gpu.alloc(nu).map_err(dev)?;
            let grads: DevBuf<f32> = self.gpu.alloc(nu * cols).map_err(dev)?;
            let sq: DevBuf<f32> = self.gpu.alloc(nu).map_err(dev)?;
            let (u, c, o) = (p.uniq, p.counters, out_rows.ptr());
            unsafe { self.gpu.launch("widen_u32", Self::blocks(nu, 256)?, 256).map_err(dev)?.arg(&u).arg(&c).arg(&o).go() }.map_err(dev)?;
            let sc = bags.scale.as_ref().map_or(NULL, |s| s.ptr());
            if cols > 0 {
                self.run_update(&p, shard.weights.ptr(), shard.state.ptr(), cols, grad.ptr(), layout, sc, Opt::new(upd, shard.spec.dim), 1, grads.ptr(), sq.ptr())?;
            } else {
                self.gpu.memset0(sq.ptr(), nu * 4).map_err(dev)?;
            }
            Ok(RowGrads { rows: out_rows, num_rows: nu, grads, sq })
        })();
        let d = self.done();
        let r = result?;
        d?;
        Ok(r)
    }

    fn embedding_apply(&self, shard: &mut Shard<Cuda>, rg: &RowGrads<Cuda>, row_sq: Option<&DevBuf<f32>>, upd: &EmbUpdate) -> Result<()> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        check(rg.rows.len() == rg.num_rows && rg.grads.len() == rg.num_rows * cols && rg.sq.len() == rg.num_rows, || {
            format!("embedding_apply: row grads of inconsistent sizes ({} rows)", rg.num_rows)
        })?;
        check(shard.state.len() == rows * upd.state_per_row(cols), || "embedding_apply: state size does not match the optimizer".into())?;
        if let Some(s) = row_sq {
            check(s.len() == rg.num_rows, || format!("embedding_apply: {} row sums for {} rows", s.len(), rg.num_rows))?;
        }
        check(cols <= MAX_BWD_COLS, || format!("embedding_apply: {cols} columns per shard; the GPU kernels take at most {MAX_BWD_COLS}"))?;
        if rg.num_rows == 0 || cols == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        let o = Opt::new(upd, shard.spec.dim);
        let (w, s, ci, r, nr, g, sq) = (shard.weights.ptr(), shard.state.ptr(), cols as i64, rg.rows.ptr(), rg.num_rows as i64, rg.grads.ptr(), rg.sq.ptr());
        let rsq = row_sq.map_or(NULL, |b| b.ptr());
        unsafe {
            self.gpu
                .launch("emb_apply_rowgrads", self.grid(rg.num_rows * 32), 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&s)
                .arg(&ci)
                .arg(&r)
                .arg(&nr)
                .arg(&g)
                .arg(&sq)
                .arg(&rsq)
                .arg(&o)
                .go()
        }
        .map_err(dev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs a GPU (otherwise it says SKIPPED and passes): data through pinned staging memory
    /// to the device and back, and a second staging of the same size class reuses the block.
    #[test]
    fn staging_round_trips_through_pinned_memory() {
        if let Err(e) = Cuda::probe() {
            eprintln!("SKIPPED (no GPU): {e}");
            return;
        }
        let be = Cuda::for_rank(0, PoolConfig::default()).expect("a probed device opens");
        let n = 300_000; // 1.2 MB: the 2 MiB class
        let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1e4).collect();
        let mut st = be.staging(n).unwrap();
        assert!(ember_cuda::device::page_locked(st.as_ptr()), "staging memory is page-locked");
        st.copy_from_slice(&data);
        let mut buf = be.zeros(n).unwrap();
        be.upload_into(&st, &mut buf).unwrap();
        let addr = st.as_ptr();
        drop(st);
        let s = be.pinned_stats();
        assert_eq!((s.driver_allocs, s.pinned, s.idle, s.live), (1, 2 << 20, 2 << 20, 0));
        let mut back = be.staging(n).unwrap();
        assert_eq!(back.as_ptr(), addr, "the same class reuses the block");
        assert_eq!(be.pinned_stats().driver_allocs, 1, "no new driver allocation");
        back.fill(0.0);
        be.download_into(&buf, &mut back).unwrap();
        assert!(back[..] == data[..], "round trip through the device");
        assert_eq!(be.download(&buf).unwrap(), data);
        assert!(matches!(be.download_into(&buf, &mut back[1..]), Err(Error::Input(_))));
        assert!(matches!(be.upload_into(&data[1..], &mut buf), Err(Error::Input(_))));
    }
}
