//! Heap accounting: a counting global allocator that a binary may install, and the live and peak
//! byte counters it keeps. Counting is off until [`enable`] is called, so an installed allocator
//! costs one relaxed load per allocation when unused.
//!
//! The counters are per process: they measure one rank's memory when each rank is its own
//! process (`ember launch`, mpirun). The 2D driver reads them around a rank's training
//! ([`crate::parallel::driver`]) to report its measured peak next to the planner's figure.
//!
//! ```ignore
//! #[global_allocator]
//! static HEAP: ember_engine::heap::Counting = ember_engine::heap::Counting;
//! ```
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering::Relaxed};

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Bytes allocated minus bytes freed since counting was enabled (frees of blocks allocated
/// before can make it negative; differences between two readings are exact).
static LIVE: AtomicI64 = AtomicI64::new(0);
static PEAK: AtomicI64 = AtomicI64::new(0);

/// The system allocator, counting the bytes it hands out while counting is enabled.
pub struct Counting;

fn grow(by: usize) {
    let live = LIVE.fetch_add(by as i64, Relaxed) + by as i64;
    if live > PEAK.load(Relaxed) {
        PEAK.fetch_max(live, Relaxed);
    }
}

fn shrink(by: usize) {
    LIVE.fetch_sub(by as i64, Relaxed);
}

// SAFETY: every call forwards to `System` with the caller's layout; the counters are atomics and
// never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` (a non-zero-size layout) is passed on unchanged.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() && ENABLED.load(Relaxed) {
            grow(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`: the caller's layout is passed on unchanged.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && ENABLED.load(Relaxed) {
            grow(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, i.e. from `System`, with this layout (the
        // caller's contract for `dealloc`).
        unsafe { System.dealloc(ptr, layout) };
        if ENABLED.load(Relaxed) {
            shrink(layout.size());
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from `System` with `layout`, and `new_size` is valid for it (the
        // caller's contract for `realloc`, passed on unchanged).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() && ENABLED.load(Relaxed) {
            if new_size >= layout.size() {
                grow(new_size - layout.size());
            } else {
                shrink(layout.size() - new_size);
            }
        }
        p
    }
}

/// Start counting. Only a process whose global allocator is [`Counting`] may call this (the
/// counters stay at zero otherwise, and [`enabled`] would claim a measurement there is none).
pub fn enable() {
    ENABLED.store(true, Relaxed);
}

/// Whether counting is on.
pub fn enabled() -> bool {
    ENABLED.load(Relaxed)
}

/// Make the peak the current live count and return it: the baseline of a measurement.
pub fn reset_peak() -> i64 {
    let l = LIVE.load(Relaxed);
    PEAK.store(l, Relaxed);
    l
}

/// Highest live count since the last [`reset_peak`] (same origin as its return value).
pub fn peak() -> i64 {
    PEAK.load(Relaxed)
}
