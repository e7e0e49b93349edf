//! Host tests of the pinned staging pool against page-aligned heap memory: size classes, reuse,
//! the idle cap, failures, and the network registration of its blocks (a recording registrar).
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]
mod common;
use common::Net;
use ember_cuda::pinned::*;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};
use std::alloc::Layout;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

const KB: usize = 1 << 10;

/// Page-aligned heap blocks; `out` counts those not yet freed; requests over `limit` fail.
struct Heap {
    out: Arc<AtomicUsize>,
    limit: usize,
}

// SAFETY: std::alloc blocks of `bytes` bytes at 4096-byte alignment, freed with the same layout.
unsafe impl HostAllocator for Heap {
    fn alloc(&mut self, bytes: usize) -> Result<NonNull<u8>, String> {
        if bytes > self.limit {
            return Err(format!("{bytes} bytes is over the test limit"));
        }
        // SAFETY: the layout has a non-zero size (every class is at least MIN_CLASS).
        let p = NonNull::new(unsafe { std::alloc::alloc(Layout::from_size_align(bytes, 4096).unwrap()) }).ok_or("heap full")?;
        self.out.fetch_add(1, SeqCst);
        Ok(p)
    }
    unsafe fn free(&mut self, p: NonNull<u8>, bytes: usize) {
        self.out.fetch_sub(1, SeqCst);
        // SAFETY: the pool passes a block from `alloc(bytes)` (the trait's contract), made with
        // this same layout, and never uses it again.
        unsafe { std::alloc::dealloc(p.as_ptr(), Layout::from_size_align(bytes, 4096).unwrap()) };
    }
}

fn pool(max_idle: usize) -> (Arc<Mutex<PinnedPool<Heap>>>, Arc<AtomicUsize>) {
    let out = Arc::new(AtomicUsize::new(0));
    (PinnedPool::shared(Heap { out: out.clone(), limit: 1 << 30 }, max_idle), out)
}

fn stats(p: &Arc<Mutex<PinnedPool<Heap>>>) -> PinnedStats {
    p.lock().unwrap().stats()
}

#[test]
fn size_classes_are_powers_of_two_from_64_kib() {
    assert_eq!(size_class(0), Some(64 * KB));
    assert_eq!(size_class(1), Some(64 * KB));
    assert_eq!(size_class(64 * KB), Some(64 * KB));
    assert_eq!(size_class(64 * KB + 1), Some(128 * KB));
    assert_eq!(size_class(3 << 20), Some(4 << 20));
    assert_eq!(size_class(1 << 30), Some(1 << 30));
    assert_eq!(size_class(usize::MAX), None);
}

#[test]
fn a_dropped_buffer_is_reused_by_its_class() {
    let (p, _) = pool(DEFAULT_MAX_IDLE);
    let mut a = PinnedBuf::new(&p, 1000).unwrap();
    assert_eq!((a.len(), a.class()), (1000, 64 * KB));
    assert!(a.iter().all(|&x| x == 0.0), "a fresh block is zeroed");
    a.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
    assert_eq!(a[999], 999.0);
    let addr = a.as_ptr();
    drop(a);
    let s = stats(&p);
    assert_eq!((s.driver_allocs, s.live, s.idle, s.pinned), (1, 0, 64 * KB, 64 * KB));
    // The whole class (16384 floats) fits the same block: no new allocation.
    let b = PinnedBuf::new(&p, 16 * KB).unwrap();
    assert_eq!(b.as_ptr(), addr);
    assert_eq!(b[999], 999.0, "a reused block keeps its contents");
    let s = stats(&p);
    assert_eq!((s.driver_allocs, s.reuses, s.live, s.idle), (1, 1, 1, 0));
    // While it is live, the same class takes a second block; one float more is the next class.
    let c = PinnedBuf::new(&p, 10).unwrap();
    assert_ne!(c.as_ptr(), b.as_ptr());
    let d = PinnedBuf::new(&p, 16 * KB + 1).unwrap();
    assert_eq!(d.class(), 128 * KB);
    let s = stats(&p);
    assert_eq!((s.driver_allocs, s.reuses, s.live, s.pinned), (3, 1, 3, 256 * KB));
    drop((b, c, d));
    // Each class's free list serves its own class only.
    let e = PinnedBuf::new(&p, 20 * KB).unwrap();
    assert_eq!(e.class(), 128 * KB);
    assert_eq!(stats(&p).driver_allocs, 3);
}

#[test]
fn idle_bytes_are_capped() {
    let (p, out) = pool(128 * KB);
    let bufs: Vec<_> = (0..3).map(|_| PinnedBuf::new(&p, 1).unwrap()).collect();
    assert_eq!(out.load(SeqCst), 3);
    drop(bufs);
    // Two blocks fit under the cap; the third goes back to the allocator.
    let s = stats(&p);
    assert_eq!((s.idle, s.pinned, s.peak, s.driver_frees), (128 * KB, 128 * KB, 192 * KB, 1));
    assert_eq!(out.load(SeqCst), 2);
    // A block larger than the cap is never kept.
    drop(PinnedBuf::new(&p, 64 * KB).unwrap());
    assert_eq!(stats(&p).driver_frees, 2);
    assert_eq!(out.load(SeqCst), 2);
}

#[test]
fn the_pool_frees_its_blocks_when_the_last_user_goes() {
    let (p, out) = pool(DEFAULT_MAX_IDLE);
    drop(PinnedBuf::new(&p, 1).unwrap());
    let live = PinnedBuf::new(&p, 100 * KB).unwrap();
    assert_eq!(out.load(SeqCst), 2);
    drop(p);
    // The live buffer keeps the pool (and its block) alive.
    assert_eq!(out.load(SeqCst), 2);
    drop(live);
    assert_eq!(out.load(SeqCst), 0);
}

#[test]
fn failed_pinning_is_an_error_naming_the_size() {
    let out = Arc::new(AtomicUsize::new(0));
    let p = PinnedPool::shared(Heap { out, limit: 1 << 20 }, DEFAULT_MAX_IDLE);
    let e = PinnedBuf::new(&p, (1 << 20) / 4 + 1).err().unwrap();
    assert!(e.contains("2097152 bytes") && e.contains("over the test limit"), "{e}");
    let e = PinnedBuf::new(&p, usize::MAX / 2).err().unwrap();
    assert!(e.contains("too large"), "{e}");
    let s = stats(&p);
    assert_eq!((s.driver_allocs, s.live, s.pinned), (0, 0, 0));
    assert!(PinnedBuf::new(&p, 1).is_ok(), "the pool still works after a failure");
}

#[test]
fn blocks_are_registered_once_and_deregistered_before_they_are_freed() {
    let (p, out) = pool(128 * KB);
    let net = Net::default();
    p.lock().unwrap().set_registrar(Box::new(net.clone()));
    let a = PinnedBuf::new(&p, 1).unwrap();
    let a_at = a.as_ptr() as u64;
    assert_eq!(*net.regs.lock().unwrap(), BTreeMap::from([(a_at, 64 * KB)]));
    drop(a);
    // Reused from the free list: no second registration.
    let a = PinnedBuf::new(&p, 1).unwrap();
    assert_eq!(a.as_ptr() as u64, a_at);
    let b = PinnedBuf::new(&p, 64 * KB + 1).unwrap();
    let c = PinnedBuf::new(&p, 1).unwrap();
    assert_eq!(net.calls.load(SeqCst), 3);
    assert_eq!(stats(&p).registered, 3);
    let b_at = b.as_ptr() as u64;
    drop((a, c, b));
    // The cap keeps the two 64 KiB blocks; the 128 KiB one is deregistered, then freed.
    assert_eq!(out.load(SeqCst), 2);
    assert!(!net.regs.lock().unwrap().contains_key(&b_at));
    assert_eq!(net.regs.lock().unwrap().len(), 2);
    drop(p);
    assert_eq!(out.load(SeqCst), 0);
    assert!(net.regs.lock().unwrap().is_empty(), "freed blocks still registered");
}

#[test]
fn a_new_registrar_takes_over_every_block() {
    let (p, _out) = pool(DEFAULT_MAX_IDLE);
    drop(PinnedBuf::new(&p, 1).unwrap()); // idle
    let live = PinnedBuf::new(&p, 200 * KB).unwrap();
    let (first, second) = (Net::default(), Net::default());
    p.lock().unwrap().set_registrar(Box::new(first.clone()));
    assert_eq!(first.regs.lock().unwrap().len(), 2, "idle and live blocks");
    p.lock().unwrap().set_registrar(Box::new(second.clone()));
    assert!(first.regs.lock().unwrap().is_empty());
    assert_eq!(second.regs.lock().unwrap().len(), 2);
    assert_eq!(stats(&p).registered, 2);
    drop((live, p));
    assert!(second.regs.lock().unwrap().is_empty());
}

#[test]
fn registration_failures_never_free_a_registered_block() {
    // Registration refused: the block works unregistered.
    let (p, out) = pool(0);
    p.lock().unwrap().set_registrar(Box::new(Net { refuse: true, ..Net::default() }));
    let mut a = PinnedBuf::new(&p, 10).unwrap();
    a[9] = 1.0;
    assert_eq!(stats(&p).registered, 0);
    drop(a);
    assert_eq!(out.load(SeqCst), 0);
    // Deregistration refused: over the cap, the block is quarantined (neither idle nor freed),
    // and stays so when the pool drops: leaked rather than freed under the network.
    let (p, out) = pool(0);
    p.lock().unwrap().set_registrar(Box::new(Net { keep: true, ..Net::default() }));
    drop(PinnedBuf::new(&p, 1).unwrap());
    let s = stats(&p);
    assert_eq!((s.idle, s.driver_frees, s.registered, s.pinned), (0, 0, 1, 64 * KB));
    // Not handed out again: a new request pins a new block (quarantined in turn when dropped,
    // since this registrar refuses every deregistration).
    drop(PinnedBuf::new(&p, 1).unwrap());
    assert_eq!(stats(&p).driver_allocs, 2);
    drop(p);
    assert_eq!(out.load(SeqCst), 2, "a quarantined block was freed");
}

#[test]
fn a_block_an_old_registrar_keeps_is_never_freed_nor_registered_twice() {
    let (p, out) = pool(0);
    let (old, new) = (Net { keep: true, ..Net::default() }, Net::default());
    p.lock().unwrap().set_registrar(Box::new(old.clone()));
    let live = PinnedBuf::new(&p, 1).unwrap();
    p.lock().unwrap().set_registrar(Box::new(new.clone()));
    // Still registered with the old endpoint: held, not registered with the new one.
    assert_eq!(old.regs.lock().unwrap().len(), 1);
    assert!(new.regs.lock().unwrap().is_empty());
    assert_eq!(stats(&p).registered, 1);
    // A block pinned now registers with the new registrar.
    let fresh = PinnedBuf::new(&p, 1).unwrap();
    assert_eq!(new.regs.lock().unwrap().len(), 1);
    drop((live, fresh));
    // Over the cap (0): the fresh block is deregistered and freed, the held one kept.
    assert_eq!(out.load(SeqCst), 1);
    assert!(new.regs.lock().unwrap().is_empty());
    drop(p);
    assert_eq!(out.load(SeqCst), 1, "the held block was freed");
}

#[test]
fn idle_blocks_an_old_registrar_keeps_are_never_handed_out_again() {
    let (p, out) = pool(DEFAULT_MAX_IDLE);
    p.lock().unwrap().set_registrar(Box::new(Net { keep: true, ..Net::default() }));
    let first = PinnedBuf::new(&p, 1).unwrap();
    let at = first.as_ptr();
    drop(first); // idle, registered with the first registrar
    p.lock().unwrap().set_registrar(Box::new(Net::default()));
    assert_eq!(stats(&p).idle, 0, "the held idle block is still on a free list");
    let next = PinnedBuf::new(&p, 1).unwrap();
    assert_ne!(next.as_ptr(), at, "a held block was handed out again");
    drop((next, p));
    assert_eq!(out.load(SeqCst), 1);
}
