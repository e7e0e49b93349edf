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

/// The system allocator, counting the bytes it hands out while counting is enabled. Blocks of
/// at least [`LINE_ALIGNED_FROM`] bytes start on a cache line ([`system_layout`]).
pub struct Counting;

/// Size from which [`Counting`] aligns blocks to 64 bytes. The system allocator returns large
/// blocks 16 bytes past a page boundary, so a 256-byte embedding row would span five cache
/// lines instead of four: a fifth more lines fetched for every random row read or written.
pub const LINE_ALIGNED_FROM: usize = 1 << 20;

/// The layout [`Counting`] asks `System` for when given `layout`: the same, aligned to a cache
/// line from [`LINE_ALIGNED_FROM`] bytes on (a function of the layout alone, so a block is
/// always freed with the layout it was allocated with).
pub fn system_layout(layout: Layout) -> Layout {
    if layout.size() >= LINE_ALIGNED_FROM && layout.align() < 64 {
        // 64 is a power of two and the size, already valid for a smaller alignment, stays far
        // below isize::MAX once rounded up to 64 (it is at least 1 MiB and a valid layout).
        Layout::from_size_align(layout.size(), 64).unwrap_or(layout)
    } else {
        layout
    }
}

fn grow(by: usize) {
    let live = LIVE.fetch_add(by as i64, Relaxed) + by as i64;
    if live > PEAK.load(Relaxed) {
        PEAK.fetch_max(live, Relaxed);
    }
}

fn shrink(by: usize) {
    LIVE.fetch_sub(by as i64, Relaxed);
}

// SAFETY: every call forwards to `System` with `system_layout` of the caller's layout (the same
// size, an alignment at least the caller's, a function of the layout alone so that a block is
// freed and resized with the layout it was allocated with); the counters are atomics and never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` (a non-zero-size layout) holds for the
        // same size at a larger alignment.
        let p = unsafe { System.alloc(system_layout(layout)) };
        if !p.is_null() && ENABLED.load(Relaxed) {
            grow(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(system_layout(layout)) };
        if !p.is_null() && ENABLED.load(Relaxed) {
            grow(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract for
        // `dealloc`), i.e. from `System` with `system_layout(layout)`.
        unsafe { System.dealloc(ptr, system_layout(layout)) };
        if ENABLED.load(Relaxed) {
            shrink(layout.size());
        }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old_sys, new_sys) = (system_layout(layout), Layout::from_size_align(new_size, layout.align()).map(system_layout));
        let p = match new_sys {
            // SAFETY: `ptr` came from `System` with `old_sys` (see `dealloc`), and `new_size` is
            // valid for it (the caller's contract); the block keeps its alignment.
            Ok(n) if n.align() == old_sys.align() => unsafe { System.realloc(ptr, old_sys, new_size) },
            Ok(n) => {
                // Crossing LINE_ALIGNED_FROM changes the alignment: move the block.
                // SAFETY: `n` is a valid non-zero layout (new_size > 0 by the caller's contract);
                // the copy covers the smaller of the two live blocks, which do not overlap, and
                // the old block is freed with the layout it was allocated with.
                unsafe {
                    let q = System.alloc(n);
                    if !q.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size));
                        System.dealloc(ptr, old_sys);
                    }
                    q
                }
            }
            Err(_) => std::ptr::null_mut(),
        };
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
