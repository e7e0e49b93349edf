//! Host tests of the device memory pool against a simulated device allocator.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
mod common;
use common::Net;
use ember_cuda::pool::*;

const MB: usize = 1 << 20;

fn pool(cap: usize, cfg: PoolConfig) -> Pool<SimAllocator> {
    Pool::new(SimAllocator::new(cap), cfg).unwrap()
}

#[test]
fn reuse_without_growth() {
    let mut p = pool(1 << 30, PoolConfig { initial: 64 * MB, grow: 64 * MB, arena: 0, align: 256 });
    assert_eq!(p.stats().driver_allocs, 1);
    let a = p.alloc(10 * MB).unwrap();
    let b = p.alloc(10 * MB).unwrap();
    p.free(a);
    let c = p.alloc(10 * MB).unwrap();
    assert_eq!(c.addr, a.addr, "a freed block of the same size is reused");
    p.free(b);
    p.free(c);
    let s = p.stats();
    assert_eq!(s.allocated, 0);
    assert_eq!(s.largest_free, 64 * MB, "frees coalesce back into one block");
    assert_eq!(s.fragmentation, 0.0);
    assert_eq!(s.driver_allocs, 1);
    assert_eq!(p.allocator().allocs, 1);
}

#[test]
fn fragmentation_is_measured_and_coalesced() {
    let mut p = pool(1 << 30, PoolConfig { initial: 16 * MB, grow: 16 * MB, arena: 0, align: 256 });
    let blocks: Vec<_> = (0..16).map(|_| p.alloc(MB).unwrap()).collect();
    // Free every other block: 8 free holes of 1 MB, none adjacent.
    for b in blocks.iter().step_by(2) {
        p.free(*b);
    }
    let s = p.stats();
    assert_eq!(s.total_free, 8 * MB);
    assert_eq!(s.largest_free, MB);
    assert!((s.fragmentation - 0.875).abs() < 1e-12, "{}", s.fragmentation);
    // A 2 MB request cannot use the holes: the pool grows.
    let big = p.alloc(2 * MB).unwrap();
    assert_eq!(p.stats().driver_allocs, 2);
    // Free the rest: everything coalesces per chunk.
    for b in blocks.iter().skip(1).step_by(2) {
        p.free(*b);
    }
    p.free(big);
    let s = p.stats();
    assert_eq!(s.allocated, 0);
    assert_eq!(s.largest_free, 16 * MB);
    assert_eq!(s.total_free, 32 * MB);
    // Two chunks never merge across their boundary (they are not contiguous).
    assert!((s.fragmentation - 0.5).abs() < 1e-12);
}

#[test]
fn best_fit_keeps_large_blocks() {
    let mut p = pool(1 << 30, PoolConfig { initial: 8 * MB, grow: 8 * MB, arena: 0, align: 256 });
    let a = p.alloc(MB).unwrap();
    let _b = p.alloc(MB).unwrap();
    let c = p.alloc(4 * MB).unwrap();
    let _d = p.alloc(MB).unwrap();
    p.free(a); // 1 MB hole
    p.free(c); // 4 MB hole
    let e = p.alloc(MB).unwrap();
    assert_eq!(e.addr, a.addr, "best fit takes the 1 MB hole, not the 4 MB one");
    assert_eq!(p.stats().largest_free, 4 * MB);
}

#[test]
fn no_growth_over_many_steps() {
    let mut p = pool(8 << 30, PoolConfig { initial: 0, grow: 64 * MB, arena: 8 * MB, align: 256 });
    // Long-lived weights.
    let w: Vec<_> = (0..8).map(|i| p.alloc((i + 1) * 3 * MB + 17).unwrap()).collect();
    let trace = dlrm_step_trace(2048, 4, 8, 64, &[512, 256, 64]);
    // First steps may grow the arena to its high-water mark; after that nothing changes.
    replay(&mut p, &trace, 3).unwrap();
    let warm = p.stats();
    assert!(warm.arena_overflows > 0, "the trace is larger than the initial arena");
    replay(&mut p, &trace, 200).unwrap();
    let s = p.stats();
    assert_eq!(s.driver_allocs, warm.driver_allocs, "no driver allocation in steady state");
    assert_eq!(s.reserved, warm.reserved);
    assert_eq!(s.arena_overflows, warm.arena_overflows, "the grown arena holds a whole step");
    assert_eq!(s.allocated, w.iter().map(|b| b.size).sum::<usize>());
}

#[test]
fn plan_sized_reservation_has_no_fragmentation_at_peak() {
    // The reservation sized from the plan (one chunk): weights, then the arena, then the tail.
    let mut p = pool(8 << 30, PoolConfig { initial: 256 * MB, grow: 64 * MB, arena: 8 * MB, align: 256 });
    let _w: Vec<_> = (0..8).map(|i| p.alloc((i + 1) * 3 * MB + 17).unwrap()).collect();
    let trace = dlrm_step_trace(2048, 4, 8, 64, &[512, 256, 64]);
    replay(&mut p, &trace, 3).unwrap();
    p.reset_peak();
    replay(&mut p, &trace, 100).unwrap();
    let s = p.stats();
    assert_eq!(s.driver_allocs, 1, "{s:?}");
    assert!(s.fragmentation_at_peak <= 0.05, "fragmentation at peak: {s:?}");
    assert!(s.peak > s.allocated, "the step's arena use shows in the peak");
}

#[test]
fn varying_long_lived_sizes_reach_a_fixed_point() {
    // Per-tensor long-lived allocations of varying sizes, freed each step (the pattern of a
    // caching allocator): after warm-up the pool stops growing.
    let mut p = pool(8 << 30, PoolConfig { initial: 0, grow: 32 * MB, arena: 0, align: 256 });
    let mut rng = 12345u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let sizes: Vec<usize> = (0..64).map(|_| (next() % (4 * MB as u64)) as usize + 1).collect();
    let mut reserved_after = Vec::new();
    for step in 0..100 {
        let live: Vec<_> = sizes.iter().map(|&s| p.alloc(s).unwrap()).collect();
        // free in a step-dependent order
        let mut order: Vec<usize> = (0..live.len()).collect();
        order.rotate_left(step % live.len());
        for i in order {
            p.free(live[i]);
        }
        reserved_after.push(p.stats().reserved);
    }
    assert_eq!(reserved_after[10], reserved_after[99], "pool keeps growing: {:?}", &reserved_after[..12]);
    assert_eq!(p.stats().allocated, 0);
}

#[test]
fn out_of_memory_is_an_error() {
    let mut p = pool(100 * MB, PoolConfig { initial: 0, grow: 64 * MB, arena: 0, align: 256 });
    let a = p.alloc(60 * MB).unwrap();
    // 64 MB chunk taken; a 50 MB request needs a new chunk; the 64 MB growth fails and the exact
    // 50 MB fallback does not fit the simulated device's remaining 36 MB either.
    let e = p.alloc(50 * MB).unwrap_err();
    assert!(matches!(e, PoolError::OutOfMemory { .. }), "{e}");
    assert!(e.to_string().contains("out of device memory"));
    assert_eq!(p.stats().failed, 1);
    // 30 MB still fits (fallback to an exact-size chunk).
    let b = p.alloc(30 * MB).unwrap();
    p.free(a);
    p.free(b);
    assert_eq!(p.stats().allocated, 0);
}

#[test]
fn stream_ordered_reuse_waits_for_events() {
    let mut p = pool(1 << 30, PoolConfig { initial: 4 * MB, grow: 4 * MB, arena: 0, align: 256 });
    let a = p.alloc(4 * MB).unwrap();
    // Freed while another stream may still read it: parked on event 7.
    p.free_after(a, 7);
    assert_eq!(p.stats().allocated, 4 * MB);
    let mut done_events = vec![];
    let mut done = |e: u64| done_events.contains(&e);
    // Event not complete: the allocation must not get the parked block (it grows instead).
    let b = p.alloc_with(4 * MB, &mut done).unwrap();
    assert_ne!(b.addr, a.addr);
    assert_eq!(p.stats().retries, 1);
    p.free(b);
    done_events.push(7);
    let mut done = |e: u64| done_events.contains(&e);
    assert_eq!(p.reclaim(&mut done), 1);
    let s = p.stats();
    assert_eq!(s.allocated, 0);
    assert_eq!(s.total_free, 8 * MB);
}

#[test]
fn arena_resets_and_grows_once() {
    let mut p = pool(1 << 30, PoolConfig { initial: 0, grow: 16 * MB, arena: MB, align: 256 });
    let x = p.arena_alloc(1000).unwrap();
    let y = p.arena_alloc(1000).unwrap();
    assert_eq!(y.addr, x.addr + 1024, "bump allocation, aligned");
    p.arena_reset().unwrap();
    let z = p.arena_alloc(10).unwrap();
    assert_eq!(z.addr, x.addr, "reset rewinds the arena");
    // Overflow: 3 MB in a 1 MB arena.
    for _ in 0..3 {
        p.arena_alloc(MB).unwrap();
    }
    assert!(p.stats().arena_overflows > 0);
    p.arena_reset().unwrap();
    assert!(p.stats().arena_size >= 3 * MB, "arena grew to the high-water mark");
    let before = p.stats();
    for _ in 0..10 {
        for _ in 0..3 {
            p.arena_alloc(MB).unwrap();
        }
        p.arena_reset().unwrap();
    }
    let after = p.stats();
    assert_eq!(after.arena_overflows, before.arena_overflows);
    assert_eq!(after.driver_allocs, before.driver_allocs);
    assert_eq!(after.allocated, 0);
}

#[test]
fn chunks_are_registered_once_and_deregistered_before_release() {
    let mut p = pool(1 << 30, PoolConfig { initial: 8 * MB, grow: 8 * MB, arena: 0, align: 256 });
    let net = Net::default();
    p.set_registrar(Box::new(net.clone()));
    // The initial chunk, registered whole: every block inside it lies in the region.
    let a = p.alloc(3 * MB).unwrap();
    let regs = net.regs.lock().unwrap().clone();
    assert_eq!(regs.len(), 1);
    let (&c0, &l0) = regs.iter().next().unwrap();
    assert!(a.addr >= c0 && a.addr + a.size as u64 <= c0 + l0 as u64);
    // Growing registers the new chunk only; blocks never straddle two.
    let b = p.alloc(7 * MB).unwrap();
    assert_eq!(net.regs.lock().unwrap().len(), 2);
    assert!(net.regs.lock().unwrap().iter().any(|(&c, &l)| b.addr >= c && b.addr + b.size as u64 <= c + l as u64));
    assert_eq!(p.stats().registered_chunks, 2);
    // A new registrar takes over every chunk.
    let other = Net::default();
    p.set_registrar(Box::new(other.clone()));
    assert!(net.regs.lock().unwrap().is_empty());
    assert_eq!(other.regs.lock().unwrap().len(), 2);
    p.free(a);
    p.free(b);
    p.release();
    assert!(other.regs.lock().unwrap().is_empty(), "released chunks still registered");
    assert_eq!(p.allocator().frees, 2);
}

#[test]
fn a_chunk_the_network_keeps_is_never_freed() {
    let mut p = pool(1 << 30, PoolConfig { initial: 8 * MB, grow: 8 * MB, arena: 0, align: 256 });
    p.set_registrar(Box::new(Net { keep: true, ..Net::default() }));
    p.release();
    assert_eq!(p.allocator().frees, 0, "freed a chunk still registered with the NIC");
}

#[test]
fn a_chunk_an_old_registrar_keeps_is_never_freed_nor_registered_twice() {
    let mut p = pool(1 << 30, PoolConfig { initial: 8 * MB, grow: 8 * MB, arena: 0, align: 256 });
    let (old, new) = (Net { keep: true, ..Net::default() }, Net::default());
    p.set_registrar(Box::new(old.clone()));
    p.set_registrar(Box::new(new.clone()));
    assert!(new.regs.lock().unwrap().is_empty(), "a held chunk was registered twice");
    let b = p.alloc(9 * MB).unwrap(); // a second chunk: registered with the new registrar
    assert_eq!(new.regs.lock().unwrap().len(), 1);
    assert_eq!(p.stats().registered_chunks, 2);
    p.free(b);
    p.release();
    assert_eq!(p.allocator().frees, 1, "the held chunk was freed");
    assert!(new.regs.lock().unwrap().is_empty());
}
