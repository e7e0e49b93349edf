//! A hand-managed device memory pool, generic over the allocator underneath.
//!
//! Device memory is taken from the driver in large chunks (the first one sized by
//! [`PoolConfig::initial`], later ones by [`PoolConfig::grow`] or the request, whichever is
//! larger) and only when no free block fits. Inside the chunks:
//!
//! * **long-lived blocks** (weights, optimizer state, buffers that outlive one operation) come
//!   from a best-fit free list that coalesces neighbours on free;
//! * a **per-step arena** (activations, scratch, communication buffers) is a bump allocator over
//!   one block, reset with [`Pool::arena_reset`]; when a step overflows it, the overflow is served
//!   from the long-lived list and the arena grows to the step's high-water mark at the next reset,
//!   so a steady-state step allocates nothing from the driver.
//!
//! **Stream-ordered reuse.** The pool has a home stream. A block freed by work on the home stream
//! is reusable at once by later home-stream work (the stream orders them). A block freed while
//! another stream may still use it is parked with an event id and only rejoins the free list when
//! [`Pool::reclaim`] is told that the event has completed; an allocation that finds no fit first
//! reclaims (a *retry*), then grows.
//!
//! The same code runs on the device (`DeviceAllocator`, feature `cuda`) and on the host against
//! [`SimAllocator`], which is how it is tested without a GPU.
use crate::registrar::{Registrar, Registration, Released};
use std::collections::{BTreeMap, BTreeSet};

/// Pool failures. Out-of-memory is an error, never a panic.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoolError {
    #[error("out of device memory: asked for {asked} bytes with {reserved} reserved, {allocated} allocated, largest free block {largest_free} ({why})")]
    OutOfMemory { asked: usize, reserved: usize, allocated: usize, largest_free: usize, why: String },
    #[error("pool: {0}")]
    Invalid(String),
}

/// The allocator under the pool: hands out whole chunks (device: `cuMemAlloc`/`cuMemFree`).
pub trait RawAllocator {
    /// A new chunk of `bytes` bytes at a 256-byte aligned address, or an error.
    fn alloc(&mut self, bytes: usize) -> Result<u64, String>;
    /// Return a chunk previously given by `alloc`.
    fn free(&mut self, addr: u64, bytes: usize);
}

/// A simulated device with `capacity` bytes, for host tests (and allocation-trace replays).
#[derive(Debug, Clone)]
pub struct SimAllocator {
    pub capacity: usize,
    pub used: usize,
    next: u64,
    /// Number of successful `alloc` calls (driver allocations).
    pub allocs: usize,
    pub frees: usize,
}

impl SimAllocator {
    pub fn new(capacity: usize) -> Self {
        SimAllocator { capacity, used: 0, next: 1 << 32, allocs: 0, frees: 0 }
    }
}

impl RawAllocator for SimAllocator {
    fn alloc(&mut self, bytes: usize) -> Result<u64, String> {
        if self.used + bytes > self.capacity {
            return Err(format!("simulated device full: {} + {} > {}", self.used, bytes, self.capacity));
        }
        let addr = self.next;
        // Leave a gap so that two chunks are never adjacent (the pool must not merge across them).
        self.next += (bytes as u64 + 4096).next_multiple_of(4096);
        self.used += bytes;
        self.allocs += 1;
        Ok(addr)
    }
    fn free(&mut self, _addr: u64, bytes: usize) {
        self.used -= bytes;
        self.frees += 1;
    }
}

/// Pool sizing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolConfig {
    /// First reservation (bytes). 0: reserve on first use.
    pub initial: usize,
    /// Minimum size of each later chunk (bytes).
    pub grow: usize,
    /// Initial per-step arena (bytes); it grows to the high-water mark of a step that overflowed.
    pub arena: usize,
    /// Alignment of every block (bytes, a power of two; 256 suits every CUDA access).
    pub align: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig { initial: 0, grow: 256 << 20, arena: 64 << 20, align: 256 }
    }
}

/// Where a block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Long,
    Arena,
}

/// A sub-allocation: `size` bytes (rounded up to the alignment) at device address `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub addr: u64,
    pub size: usize,
    pub kind: BlockKind,
    /// Arena generation (arena blocks are valid until the next reset).
    pub gen: u64,
}

/// Pool statistics (bytes unless named otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolStats {
    /// Taken from the driver.
    pub reserved: usize,
    /// In live blocks (long-lived blocks plus the arena's used part plus parked blocks).
    pub allocated: usize,
    /// Largest `allocated` seen.
    pub peak: usize,
    /// Largest free block of the long-lived list.
    pub largest_free: usize,
    /// All free bytes of the long-lived list.
    pub total_free: usize,
    /// 1 − largest_free / total_free (0 when nothing is free).
    pub fragmentation: f64,
    /// Fragmentation at the moment of the last peak.
    pub fragmentation_at_peak: f64,
    /// Driver allocations (chunks taken) so far.
    pub driver_allocs: usize,
    /// Allocations that found no fit and reclaimed parked blocks before trying again.
    pub retries: usize,
    /// Allocations that failed (out of memory).
    pub failed: usize,
    /// Arena bytes and its high-water mark in the current generation.
    pub arena_size: usize,
    pub arena_used: usize,
    /// Arena requests served from the long-lived list because the arena was full.
    pub arena_overflows: usize,
    /// Live long-lived blocks.
    pub live_blocks: usize,
    /// Chunks registered with the network (see [`Pool::set_registrar`]).
    pub registered_chunks: usize,
}

#[derive(Debug)]
struct Chunk {
    addr: u64,
    size: usize,
    /// Where it stands with the pool's registrar.
    registered: Registration,
}

/// The pool. `A` provides chunks; everything else is bookkeeping on the host.
#[derive(Debug)]
pub struct Pool<A: RawAllocator> {
    alloc: A,
    cfg: PoolConfig,
    chunks: Vec<Chunk>,
    /// Free long-lived blocks: address → size, and (size, address) for best fit.
    free_by_addr: BTreeMap<u64, usize>,
    free_by_size: BTreeSet<(usize, u64)>,
    /// Which chunk a free block lies in (blocks only merge inside a chunk): chunk start → end.
    chunk_ends: BTreeMap<u64, u64>,
    /// Blocks freed on another stream, waiting for their event.
    parked: Vec<(Block, u64)>,
    parked_bytes: usize,
    live_long: usize,
    live_long_bytes: usize,
    // Arena.
    arena: Option<Block>,
    arena_off: usize,
    arena_gen: u64,
    arena_high: usize,
    /// Overflow blocks handed out this generation (freed at reset).
    arena_spill: Vec<Block>,
    arena_spill_bytes: usize,
    registrar: Option<Box<dyn Registrar>>,
    stats: PoolStats,
}

impl<A: RawAllocator> Pool<A> {
    pub fn new(alloc: A, cfg: PoolConfig) -> Result<Self, PoolError> {
        if !cfg.align.is_power_of_two() {
            return Err(PoolError::Invalid(format!("alignment {} is not a power of two", cfg.align)));
        }
        let mut p = Pool {
            alloc,
            cfg,
            chunks: Vec::new(),
            free_by_addr: BTreeMap::new(),
            free_by_size: BTreeSet::new(),
            chunk_ends: BTreeMap::new(),
            parked: Vec::new(),
            parked_bytes: 0,
            live_long: 0,
            live_long_bytes: 0,
            arena: None,
            arena_off: 0,
            arena_gen: 0,
            arena_high: 0,
            arena_spill: Vec::new(),
            arena_spill_bytes: 0,
            registrar: None,
            stats: PoolStats::default(),
        };
        if cfg.initial > 0 {
            p.grow(cfg.initial)?;
        }
        Ok(p)
    }

    pub fn allocator(&self) -> &A {
        &self.alloc
    }
    pub fn config(&self) -> PoolConfig {
        self.cfg
    }

    /// Register every chunk, now and when taken later, with `r` (GPUDirect RDMA: the transport's
    /// regions), after deregistering them from the registrar before, if any: a device buffer of
    /// this pool then needs no registration of its own. A chunk that fails to register works
    /// unregistered (logged); one a registrar will not let go stays registered there and is
    /// never freed, nor registered with `r`.
    pub fn set_registrar(&mut self, r: Box<dyn Registrar>) {
        for i in 0..self.chunks.len() {
            self.unregister(i);
        }
        self.registrar = Some(r);
        for i in 0..self.chunks.len() {
            self.register(i);
        }
    }

    fn register(&mut self, i: usize) {
        let Some(c) = self.chunks.get_mut(i) else { return };
        // SAFETY: the chunk stays allocated until `unregister` lets it go (`release`).
        if unsafe { c.registered.register(self.registrar.as_deref(), c.addr, c.size, "device pool") } {
            self.stats.registered_chunks += 1;
        }
    }

    /// Deregister chunk `i` if registered; false if it must not be freed (held: a registrar
    /// refused, now or before).
    fn unregister(&mut self, i: usize) -> bool {
        let Some(c) = self.chunks.get_mut(i) else { return true };
        match c.registered.deregister(self.registrar.as_deref(), c.addr, "device pool") {
            Released::NotRegistered => true,
            Released::Deregistered => {
                self.stats.registered_chunks -= 1;
                true
            }
            Released::Held => false,
        }
    }

    fn round(&self, bytes: usize) -> usize {
        bytes.max(1).next_multiple_of(self.cfg.align)
    }

    fn insert_free(&mut self, addr: u64, size: usize) {
        // Coalesce with the neighbours inside the same chunk.
        let (cstart, cend) = {
            let (s, e) = self.chunk_ends.range(..=addr).next_back().expect("block inside a chunk");
            (*s, *e)
        };
        let (mut addr, mut size) = (addr, size);
        if let Some((&paddr, &psize)) = self.free_by_addr.range(..addr).next_back() {
            if paddr >= cstart && paddr + psize as u64 == addr {
                self.free_by_addr.remove(&paddr);
                self.free_by_size.remove(&(psize, paddr));
                addr = paddr;
                size += psize;
            }
        }
        let end = addr + size as u64;
        if end < cend {
            if let Some(&nsize) = self.free_by_addr.get(&end) {
                self.free_by_addr.remove(&end);
                self.free_by_size.remove(&(nsize, end));
                size += nsize;
            }
        }
        self.free_by_addr.insert(addr, size);
        self.free_by_size.insert((size, addr));
    }

    fn grow(&mut self, need: usize) -> Result<(), PoolError> {
        let need = need.next_multiple_of(self.cfg.align);
        let bytes = need.max(self.cfg.grow).next_multiple_of(self.cfg.align);
        let (addr, size) = match self.alloc.alloc(bytes) {
            Ok(a) => (a, bytes),
            // Try exactly what is needed before giving up.
            Err(_) if bytes > need => match self.alloc.alloc(need) {
                Ok(a) => (a, need),
                Err(e) => return Err(self.oom(need, e)),
            },
            Err(e) => return Err(self.oom(need, e)),
        };
        self.chunks.push(Chunk { addr, size, registered: Registration::None });
        self.chunk_ends.insert(addr, addr + size as u64);
        self.stats.reserved += size;
        self.stats.driver_allocs += 1;
        self.insert_free(addr, size);
        self.register(self.chunks.len() - 1);
        Ok(())
    }

    fn oom(&mut self, asked: usize, why: String) -> PoolError {
        self.stats.failed += 1;
        self.refresh();
        PoolError::OutOfMemory {
            asked,
            reserved: self.stats.reserved,
            allocated: self.stats.allocated,
            largest_free: self.stats.largest_free,
            why,
        }
    }

    fn take_fit(&mut self, size: usize) -> Option<u64> {
        let &(fsize, faddr) = self.free_by_size.range((size, 0)..).next()?;
        self.free_by_size.remove(&(fsize, faddr));
        self.free_by_addr.remove(&faddr);
        if fsize > size {
            let raddr = faddr + size as u64;
            self.free_by_addr.insert(raddr, fsize - size);
            self.free_by_size.insert((fsize - size, raddr));
        }
        Some(faddr)
    }

    /// A long-lived block of at least `bytes` bytes.
    pub fn alloc(&mut self, bytes: usize) -> Result<Block, PoolError> {
        let size = self.round(bytes);
        let addr = match self.take_fit(size) {
            Some(a) => a,
            None => {
                self.grow(size)?;
                self.take_fit(size).ok_or_else(|| PoolError::Invalid("grown chunk does not fit the request".into()))?
            }
        };
        self.live_long += 1;
        self.live_long_bytes += size;
        self.after_alloc();
        Ok(Block { addr, size, kind: BlockKind::Long, gen: 0 })
    }

    /// Like [`alloc`](Self::alloc), but first reclaims parked blocks whose event `done` reports
    /// complete when nothing fits (counted as a retry).
    pub fn alloc_with(&mut self, bytes: usize, done: &mut dyn FnMut(u64) -> bool) -> Result<Block, PoolError> {
        let size = self.round(bytes);
        if self.free_by_size.range((size, 0)..).next().is_none() && !self.parked.is_empty() {
            self.stats.retries += 1;
            self.reclaim(done);
        }
        self.alloc(bytes)
    }

    /// Free a long-lived block whose last use is on the home stream: reusable at once.
    pub fn free(&mut self, b: Block) {
        match b.kind {
            BlockKind::Arena => {} // arena blocks die at reset
            BlockKind::Long => {
                if let Some(i) = self.arena_spill.iter().position(|s| s.addr == b.addr) {
                    // A spilled arena block freed early: fine, forget it.
                    self.arena_spill.swap_remove(i);
                    self.arena_spill_bytes -= b.size;
                }
                self.live_long -= 1;
                self.live_long_bytes -= b.size;
                self.insert_free(b.addr, b.size);
                self.refresh();
            }
        }
    }

    /// Free a block that another stream may still use: it rejoins the free list once `event`
    /// is reported complete to [`reclaim`](Self::reclaim).
    pub fn free_after(&mut self, b: Block, event: u64) {
        if b.kind == BlockKind::Arena {
            return;
        }
        self.live_long -= 1;
        self.live_long_bytes -= b.size;
        self.parked_bytes += b.size;
        self.parked.push((b, event));
        self.refresh();
    }

    /// Move parked blocks whose event is complete back to the free list; returns how many.
    pub fn reclaim(&mut self, done: &mut dyn FnMut(u64) -> bool) -> usize {
        let parked = std::mem::take(&mut self.parked);
        let mut n = 0;
        for (b, ev) in parked {
            if done(ev) {
                self.parked_bytes -= b.size;
                self.insert_free(b.addr, b.size);
                n += 1;
            } else {
                self.parked.push((b, ev));
            }
        }
        self.refresh();
        n
    }

    /// A block from the per-step arena (valid until the next [`arena_reset`](Self::arena_reset)).
    pub fn arena_alloc(&mut self, bytes: usize) -> Result<Block, PoolError> {
        let size = self.round(bytes);
        if self.arena.is_none() && self.cfg.arena > 0 {
            let b = self.alloc(self.cfg.arena)?;
            // the arena itself is not a user block: only its used part counts as allocated
            self.live_long -= 1;
            self.live_long_bytes -= b.size;
            self.arena = Some(b);
        }
        if let Some(a) = self.arena {
            if self.arena_off + size <= a.size {
                let addr = a.addr + self.arena_off as u64;
                self.arena_off += size;
                self.arena_high = self.arena_high.max(self.arena_off + self.arena_spill_bytes);
                self.after_alloc();
                return Ok(Block { addr, size, kind: BlockKind::Arena, gen: self.arena_gen });
            }
        }
        // Overflow: serve from the long-lived list, free at reset, grow the arena then.
        self.stats.arena_overflows += 1;
        let mut b = self.alloc(size)?;
        b.gen = self.arena_gen;
        self.arena_spill.push(b);
        self.arena_spill_bytes += size;
        self.arena_high = self.arena_high.max(self.arena_off + self.arena_spill_bytes);
        Ok(b)
    }

    /// End of a step: every arena block is dead (stream order makes this safe for home-stream
    /// users). If the step overflowed, the arena is replaced by one of the high-water size.
    pub fn arena_reset(&mut self) -> Result<(), PoolError> {
        for b in std::mem::take(&mut self.arena_spill) {
            self.free(b);
        }
        self.arena_spill_bytes = 0;
        let high = self.arena_high;
        if let Some(a) = self.arena {
            if high > a.size {
                // Grow: free the old arena and take one of the high-water size (rounded up 1/8).
                self.live_long += 1;
                self.live_long_bytes += a.size;
                self.free(a);
                let want = self.round(high + high / 8);
                let b = self.alloc(want)?;
                self.live_long -= 1;
                self.live_long_bytes -= b.size;
                self.arena = Some(b);
            }
        }
        self.arena_off = 0;
        self.arena_high = 0;
        self.arena_gen += 1;
        self.refresh();
        Ok(())
    }

    pub fn arena_generation(&self) -> u64 {
        self.arena_gen
    }

    fn after_alloc(&mut self) {
        self.refresh();
        if self.stats.allocated > self.stats.peak {
            self.stats.peak = self.stats.allocated;
            self.stats.fragmentation_at_peak = self.stats.fragmentation;
        }
    }

    fn refresh(&mut self) {
        let s = &mut self.stats;
        s.allocated = self.live_long_bytes + self.arena_off + self.parked_bytes;
        s.largest_free = self.free_by_size.iter().next_back().map(|&(sz, _)| sz).unwrap_or(0);
        s.total_free = self.free_by_addr.values().sum();
        s.fragmentation = if s.total_free == 0 { 0.0 } else { 1.0 - s.largest_free as f64 / s.total_free as f64 };
        s.arena_size = self.arena.map(|a| a.size).unwrap_or(0);
        s.arena_used = self.arena_off;
        s.live_blocks = self.live_long;
    }

    /// Start a new peak window (e.g. after warm-up): peak and fragmentation-at-peak restart
    /// from the current state.
    pub fn reset_peak(&mut self) {
        self.refresh();
        self.stats.peak = self.stats.allocated;
        self.stats.fragmentation_at_peak = self.stats.fragmentation;
    }

    pub fn stats(&self) -> PoolStats {
        self.stats
    }

    /// Give every chunk back to the allocator (all blocks must be dead).
    pub fn release(&mut self) {
        for i in 0..self.chunks.len() {
            if self.unregister(i) {
                self.alloc.free(self.chunks[i].addr, self.chunks[i].size);
            }
        }
        self.chunks.clear();
        self.free_by_addr.clear();
        self.free_by_size.clear();
        self.chunk_ends.clear();
        self.arena = None;
        self.stats.reserved = 0;
    }
}

impl<A: RawAllocator> Drop for Pool<A> {
    fn drop(&mut self) {
        self.release();
    }
}

/// One event of an allocation trace (for replays: `ember bench mem`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceOp {
    /// Allocate `bytes` into slot `id` (long-lived when `long`, else from the arena).
    Alloc { id: usize, bytes: usize, long: bool },
    /// Free slot `id`.
    Free { id: usize },
    /// End of a step.
    Step,
}

/// A plausible training step's allocation trace for the given shapes: per-step inputs, pooled
/// outputs, MLP activations and gradients, and the sort/scan scratch of the fused backward.
pub fn dlrm_step_trace(batch: usize, lookups: usize, tables: usize, dim: usize, mlp: &[usize]) -> Vec<TraceOp> {
    let mut t = Vec::new();
    let mut id = 0;
    let mut push = |t: &mut Vec<TraceOp>, bytes: usize| {
        t.push(TraceOp::Alloc { id, bytes, long: false });
        id += 1;
        id - 1
    };
    let mut ids = Vec::new();
    for _ in 0..tables {
        ids.push(push(&mut t, (batch + 1) * 8)); // offsets
        ids.push(push(&mut t, batch * lookups * 8)); // ids
        ids.push(push(&mut t, batch * dim * 4)); // pooled
    }
    let mut prev = 13;
    for &w in mlp {
        ids.push(push(&mut t, batch * w * 4)); // activation
        ids.push(push(&mut t, batch * w * 4)); // its gradient
        ids.push(push(&mut t, prev * w * 4)); // weight gradient
        prev = w;
    }
    for _ in 0..tables {
        // sort keys/values twice (ping-pong), RLE, histograms
        for _ in 0..4 {
            ids.push(push(&mut t, batch * lookups * 4));
        }
        ids.push(push(&mut t, (batch * lookups / 1024 + 1) * 16 * 4));
        ids.push(push(&mut t, (batch * lookups + 1) * 4));
    }
    for i in ids {
        t.push(TraceOp::Free { id: i });
    }
    t.push(TraceOp::Step);
    t
}

/// Replay `trace` `steps` times against a pool; returns its statistics.
pub fn replay<A: RawAllocator>(pool: &mut Pool<A>, trace: &[TraceOp], steps: usize) -> Result<PoolStats, PoolError> {
    let n = trace.iter().filter(|o| matches!(o, TraceOp::Alloc { .. })).count();
    let mut slots: Vec<Option<Block>> = vec![None; n.max(1) * 2];
    for _ in 0..steps {
        for op in trace {
            match *op {
                TraceOp::Alloc { id, bytes, long } => {
                    if id >= slots.len() {
                        slots.resize(id + 1, None);
                    }
                    slots[id] = Some(if long { pool.alloc(bytes)? } else { pool.arena_alloc(bytes)? });
                }
                TraceOp::Free { id } => {
                    if let Some(b) = slots.get_mut(id).and_then(|s| s.take()) {
                        pool.free(b);
                    }
                }
                TraceOp::Step => pool.arena_reset()?,
            }
        }
    }
    Ok(pool.stats())
}
