//! Measurements for `ember bench` and the self-test: the fast backward's sort phase alone,
//! device copy bandwidth, and an allocation-trace replay against the pool and plain
//! `cuMemAlloc` (`AllocReplayRow`).
use super::*;

impl Cuda {
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
                // SAFETY: launch contract (`Launch::go`): as in `backward_fast`: the caller's bags
                // meet the bag invariant, k0/v0 hold n u32 and lc the 4 u32 the kernel zeroes.
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
                        // SAFETY: a plain driver allocation in the bound context (no pointer argument);
                        // it is freed once, by the trace's `Free` below.
                        let p = unsafe { cudarc::driver::result::malloc_sync(bytes.max(1)) }.map_err(|e| dev(format!("cuMemAlloc: {e:?}")))?;
                        driver_allocs += 1;
                        live += bytes;
                        peak = peak.max(live);
                        slots[id] = Some((p, bytes));
                    }
                    TraceOp::Free { id } => {
                        if let Some((p, b)) = slots.get_mut(id).and_then(|s| s.take()) {
                            // SAFETY: `p` came from malloc_sync above and `take` removed it from its
                            // slot, so it is freed once; nothing was launched on it.
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
        // SAFETY: a plain driver allocation in the context current on this thread (no pointer
        // argument); the replay pool frees it once, through `free`.
        unsafe { cudarc::driver::result::malloc_sync(bytes) }.map_err(|e| format!("{e:?}"))
    }
    fn free(&mut self, addr: u64, _bytes: usize) {
        // SAFETY: `addr` came from `alloc` and the pool frees each chunk once; the replay only
        // does bookkeeping, so no device work uses the memory.
        let _ = unsafe { cudarc::driver::result::free_sync(addr) };
    }
}
