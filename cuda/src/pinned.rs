//! A pool of page-locked (pinned) host memory for staging device buffers through the host.
//!
//! Pinning costs milliseconds (the driver maps and locks every page), so blocks are recycled:
//! a request is rounded up to a power-of-two **size class** (at least [`MIN_CLASS`]), served from
//! that class's free list when it holds a block, else taken from the allocator underneath. A
//! [`PinnedBuf`] returns its block to the free list when dropped (it holds an `Arc` to the pool);
//! past the pool's cap on idle bytes ([`DEFAULT_MAX_IDLE`] on a device), a returned block goes
//! back to the allocator instead.
//!
//! The allocator is a [`HostAllocator`]: `cuMemHostAlloc` on a device (`device::PinnedAllocator`,
//! feature `cuda`), plain heap memory in the host tests below.
//!
//! A [`Registrar`] (the rank's network endpoint: the RDMA transport's registered regions) learns
//! every block the pool pins, once, and forgets it before the block is freed: staged messages
//! then never register memory with the NIC one by one.
pub use crate::registrar::{Registrar, Registration};
use crate::registrar::Released;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Smallest size class (bytes).
pub const MIN_CLASS: usize = 64 << 10;
/// Default cap on the idle bytes a pool keeps (1 GiB).
pub const DEFAULT_MAX_IDLE: usize = 1 << 30;

/// The size class of a request of `bytes` bytes: the next power of two, at least [`MIN_CLASS`]
/// (None when it would overflow).
pub fn size_class(bytes: usize) -> Option<usize> {
    bytes.max(MIN_CLASS).checked_next_power_of_two()
}

/// The memory under the pool (device: `cuMemHostAlloc`/`cuMemFreeHost`).
///
/// # Safety
/// A block from `alloc` must be valid for reads and writes of `bytes` bytes, aligned to at least
/// 4 bytes, and stay so until it is passed to `free`.
pub unsafe trait HostAllocator: Send {
    fn alloc(&mut self, bytes: usize) -> Result<NonNull<u8>, String>;
    /// # Safety
    /// `ptr` came from `alloc(bytes)` of this allocator and is not used afterwards.
    unsafe fn free(&mut self, ptr: NonNull<u8>, bytes: usize);
}

/// Pool statistics (bytes unless named otherwise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PinnedStats {
    /// Blocks taken from the allocator (driver allocations).
    pub driver_allocs: usize,
    /// Blocks given back to it (idle cap exceeded).
    pub driver_frees: usize,
    /// Pinned now: live and idle blocks.
    pub pinned: usize,
    /// Largest `pinned` seen.
    pub peak: usize,
    /// In blocks on the free lists.
    pub idle: usize,
    /// Blocks handed out and not yet returned.
    pub live: usize,
    /// Requests served from a free list.
    pub reuses: usize,
    /// Blocks registered now (with the registrar, or held by an earlier one that refused to
    /// let them go).
    pub registered: usize,
}

/// The pool: free lists per size class over a [`HostAllocator`].
pub struct PinnedPool<A: HostAllocator> {
    alloc: A,
    max_idle: usize,
    /// Size class → idle blocks of that class.
    free: BTreeMap<usize, Vec<NonNull<u8>>>,
    /// Every block pinned now (live or idle): address → (class, registration).
    blocks: BTreeMap<usize, (usize, Registration)>,
    registrar: Option<Box<dyn Registrar>>,
    stats: PinnedStats,
}

// SAFETY: the raw pointers are the pool's idle blocks, which it owns exclusively (nothing else
// points into them), and the allocator and registrar are `Send`; so the pool may move threads.
unsafe impl<A: HostAllocator> Send for PinnedPool<A> {}

impl<A: HostAllocator> PinnedPool<A> {
    /// A pool keeping at most `max_idle` bytes in idle blocks.
    pub fn new(alloc: A, max_idle: usize) -> Self {
        PinnedPool { alloc, max_idle, free: BTreeMap::new(), blocks: BTreeMap::new(), registrar: None, stats: PinnedStats::default() }
    }

    /// Register every block, now and when pinned later, with `r` (after deregistering them from
    /// the registrar before, if any). A block that fails to register works unregistered (its
    /// messages register one by one); the failure is logged. A block the registrar before will
    /// not let go stays registered there: it is never freed, nor registered with `r`.
    pub fn set_registrar(&mut self, r: Box<dyn Registrar>) {
        let addrs: Vec<usize> = self.blocks.keys().copied().collect();
        for &a in &addrs {
            self.unregister(a);
        }
        // Idle blocks the old registrar keeps are quarantined: never handed out again.
        let blocks = &self.blocks;
        for (&class, list) in self.free.iter_mut() {
            let before = list.len();
            list.retain(|p| blocks.get(&(p.as_ptr() as usize)).is_none_or(|b| b.1 != Registration::Held));
            self.stats.idle -= (before - list.len()) * class;
        }
        self.registrar = Some(r);
        for a in addrs {
            self.register(a);
        }
    }

    fn register(&mut self, a: usize) {
        let Some((class, reg)) = self.blocks.get_mut(&a) else { return };
        // SAFETY: the block stays pinned until `unregister` lets it go (before `free`, in `give`
        // and Drop).
        if unsafe { reg.register(self.registrar.as_deref(), a as u64, *class, "pinned pool") } {
            self.stats.registered += 1;
        }
    }

    /// Deregister block `a` if registered; false if it must not be freed (held: a registrar
    /// refused, now or before).
    fn unregister(&mut self, a: usize) -> bool {
        let Some((_, reg)) = self.blocks.get_mut(&a) else { return true };
        match reg.deregister(self.registrar.as_deref(), a as u64, "pinned pool") {
            Released::NotRegistered => true,
            Released::Deregistered => {
                self.stats.registered -= 1;
                true
            }
            Released::Held => false,
        }
    }

    /// A pool shared by the buffers it hands out (see [`PinnedBuf::new`]).
    pub fn shared(alloc: A, max_idle: usize) -> Arc<Mutex<Self>> {
        Arc::new(Mutex::new(Self::new(alloc, max_idle)))
    }

    pub fn stats(&self) -> PinnedStats {
        self.stats
    }

    /// A block of at least `bytes` bytes and its size class.
    fn take(&mut self, bytes: usize) -> Result<(NonNull<u8>, usize), String> {
        let class = size_class(bytes).ok_or_else(|| format!("pinned host memory: {bytes} bytes is too large"))?;
        let s = &mut self.stats;
        if let Some(p) = self.free.get_mut(&class).and_then(Vec::pop) {
            s.idle -= class;
            s.reuses += 1;
            s.live += 1;
            return Ok((p, class));
        }
        let p = self.alloc.alloc(class).map_err(|e| format!("pinning {class} bytes of host memory (for {bytes}) failed: {e}"))?;
        // Zeroed once, so that every block on the free lists holds initialised floats.
        // SAFETY: the allocator guarantees `class` writable bytes.
        unsafe { p.as_ptr().write_bytes(0, class) };
        s.driver_allocs += 1;
        s.pinned += class;
        s.peak = s.peak.max(s.pinned);
        s.live += 1;
        self.blocks.insert(p.as_ptr() as usize, (class, Registration::None));
        self.register(p.as_ptr() as usize);
        Ok((p, class))
    }

    /// Return a block from [`take`](Self::take): to its free list, or to the allocator when the
    /// idle bytes would exceed the cap.
    fn give(&mut self, p: NonNull<u8>, class: usize) {
        self.stats.live -= 1;
        let a = p.as_ptr() as usize;
        if self.blocks.get(&a).is_some_and(|b| b.1 == Registration::Held) {
            return; // quarantined: a registrar may still use it; never handed out or freed again
        }
        if self.stats.idle + class <= self.max_idle {
            self.stats.idle += class;
            self.free.entry(class).or_default().push(p);
        } else if !self.unregister(a) {
            // The registrar will not let go (a message may still use it): quarantined (leaked).
        } else {
            self.stats.pinned -= class;
            self.stats.driver_frees += 1;
            self.blocks.remove(&(p.as_ptr() as usize));
            // SAFETY: the block came from `alloc(class)`, its buffer is gone, it is deregistered.
            unsafe { self.alloc.free(p, class) };
        }
    }
}

impl<A: HostAllocator> Drop for PinnedPool<A> {
    fn drop(&mut self) {
        // Live buffers hold the pool alive, so only idle blocks are left.
        for (class, blocks) in std::mem::take(&mut self.free) {
            for p in blocks {
                if !self.unregister(p.as_ptr() as usize) {
                    continue; // still registered: leaked rather than freed under the NIC
                }
                // SAFETY: idle blocks came from `alloc(class)`, nothing points into them, and
                // they are deregistered.
                unsafe { self.alloc.free(p, class) };
            }
        }
    }
}

/// `len` floats of pooled host memory; the block returns to its pool when this drops.
pub struct PinnedBuf<A: HostAllocator> {
    ptr: NonNull<f32>,
    len: usize,
    class: usize,
    pool: Arc<Mutex<PinnedPool<A>>>,
}

// SAFETY: the buffer owns its block exclusively (no other handle points into it), so moving it
// to another thread moves sole access; the pool it returns to sits behind a `Mutex`.
unsafe impl<A: HostAllocator> Send for PinnedBuf<A> {}
// SAFETY: shared access is read-only (`Deref` gives `&[f32]`; writing needs `&mut self`).
unsafe impl<A: HostAllocator> Sync for PinnedBuf<A> {}

impl<A: HostAllocator> PinnedBuf<A> {
    /// `len` floats from `pool` (contents unspecified: a reused block keeps its old data).
    pub fn new(pool: &Arc<Mutex<PinnedPool<A>>>, len: usize) -> Result<Self, String> {
        let bytes = len.checked_mul(4).ok_or_else(|| format!("pinned host memory: {len} floats is too large"))?;
        let (p, class) = pool.lock().map_err(|_| "pinned pool poisoned".to_string())?.take(bytes)?;
        Ok(PinnedBuf { ptr: p.cast(), len, class, pool: pool.clone() })
    }

    /// Bytes of the block under this buffer (its size class).
    pub fn class(&self) -> usize {
        self.class
    }
}

impl<A: HostAllocator> std::ops::Deref for PinnedBuf<A> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        // SAFETY: `len` floats of our block (`class >= 4 len` bytes, zeroed when first taken).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl<A: HostAllocator> std::ops::DerefMut for PinnedBuf<A> {
    fn deref_mut(&mut self) -> &mut [f32] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl<A: HostAllocator> Drop for PinnedBuf<A> {
    fn drop(&mut self) {
        // A poisoned pool leaks the block rather than panicking in drop.
        if let Ok(mut p) = self.pool.lock() {
            p.give(self.ptr.cast(), self.class);
        }
    }
}
