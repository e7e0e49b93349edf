//! A doorbell: a futex word, shared between processes, on which a rank's waiting threads sleep
//! and which a peer process rings after it changed something they may wait for (shm: a record
//! in their ring, a write into an advertised buffer, an advertisement). Without it, nothing can
//! wake a sleeper when another process's copy into its memory ends, and it sees the end only at
//! its next timed wake-up. A missed ring costs no correctness: every sleep is bounded.
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::Duration;

/// The word and its sleepers' count, in memory every process of the job maps (a peer may write
/// any bits here: they only move wake-ups).
#[repr(C, align(64))]
pub(crate) struct Bell {
    word: AtomicU32,
    sleepers: AtomicU32,
}

impl Bell {
    /// The owner's thread is about to sleep: counted (so peers ring), and the word to wait on.
    /// The caller then looks once more for what it waits for, and calls [`Self::wait`] only if
    /// it is still missing; [`Self::disarm`] afterwards in either case.
    pub fn arm(&self) -> u32 {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // Pairs with the ringer's fence: either it sees this sleeper, or the caller's next look
        // sees what it wrote before ringing.
        fence(Ordering::SeqCst);
        self.word.load(Ordering::SeqCst)
    }

    pub fn disarm(&self) {
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sleep until the word moves from `seen` (a ring) or `d` passes. Whether a ring (or an
    /// earlier one) ended it, rather than the time.
    pub fn wait(&self, seen: u32, d: Duration) -> bool {
        let ts = libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long };
        // SAFETY: `word` is a live, aligned u32 for the duration of the call; FUTEX_WAIT reads it
        // and compares with `seen`; `ts` is a valid relative timeout. Not private: the word is
        // in a mapping shared with other processes.
        let r = unsafe { libc::syscall(libc::SYS_futex, self.word.as_ptr(), libc::FUTEX_WAIT, seen, &ts as *const libc::timespec, 0usize, 0u32) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN)
    }

    /// Wake the owner's sleepers, if any. `fenced`: order the caller's earlier stores before the
    /// check of the sleepers' count (without it a sleeper arming at this instant may sleep its
    /// full time: cheaper for the many short messages, where a sleeper is rare).
    pub fn ring(&self, fenced: bool) {
        if fenced {
            fence(Ordering::SeqCst);
        }
        if self.sleepers.load(Ordering::Relaxed) != 0 {
            self.word.fetch_add(1, Ordering::SeqCst);
            // SAFETY: `word` is a live, aligned u32; FUTEX_WAKE only wakes threads waiting on
            // it (none is also fine). Not private, as in `wait`.
            unsafe { libc::syscall(libc::SYS_futex, self.word.as_ptr(), libc::FUTEX_WAKE, i32::MAX, 0usize, 0usize, 0u32) };
        }
    }
}

/// A bell in a mapping its holder outlives (the inbox of a shared-memory fabric, which owns the
/// mailbox holding this).
#[derive(Clone, Copy)]
pub(crate) struct BellRef(*const Bell);
// SAFETY: points into a shared mapping that outlives every holder (see `BellRef::new`); a
// `Bell` is only atomics.
unsafe impl Send for BellRef {}
// SAFETY: as for Send: only atomic accesses through it.
unsafe impl Sync for BellRef {}

impl BellRef {
    /// # Safety
    /// `at` is 64-byte aligned, inside a writable mapping of at least 64 bytes from `at` that
    /// outlives every copy of the returned value.
    pub unsafe fn new(at: *mut u8) -> BellRef {
        BellRef(at as *const Bell)
    }
    pub fn get(&self) -> &Bell {
        // SAFETY: `new`'s contract: aligned, mapped and alive; any bits are valid atomics.
        unsafe { &*self.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn bell() -> (Arc<Vec<u64>>, BellRef) {
        let mem = Arc::new(vec![0u64; 16]); // 128 bytes: an aligned 64-byte line inside
        let p = mem.as_ptr() as usize;
        let at = (p + 63) & !63;
        // SAFETY: `at` is 64-byte aligned with at least 64 bytes of `mem` after it; `mem` is
        // returned beside it and outlives its use in each test.
        (mem, unsafe { BellRef::new(at as *mut u8) })
    }

    #[test]
    fn a_ring_ends_a_long_wait_and_its_absence_lets_it_time_out() {
        let (_mem, b) = bell();
        // Nobody rings: the wait ends by its time.
        let seen = b.get().arm();
        assert!(!b.get().wait(seen, Duration::from_millis(5)), "no ring, yet the wait reports one");
        b.get().disarm();
        // A peer rings while we sleep (up to 60 s): the wait reports the ring, not the time.
        let seen = b.get().arm();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            b.get().ring(true);
        });
        assert!(b.get().wait(seen, Duration::from_secs(60)), "the ring did not end the wait");
        b.get().disarm();
        t.join().unwrap();
    }

    #[test]
    fn a_ring_before_the_wait_is_not_lost_and_nobody_asleep_means_no_ring() {
        let (_mem, b) = bell();
        // No sleeper armed: the word stays (no syscall either).
        b.get().ring(true);
        let w0 = b.get().word.load(Ordering::SeqCst);
        assert_eq!(w0, 0);
        // Armed, then rung before waiting: the wait returns at once with the ring.
        let seen = b.get().arm();
        b.get().ring(false);
        assert!(b.get().wait(seen, Duration::from_secs(60)));
        b.get().disarm();
        assert_eq!(b.get().sleepers.load(Ordering::SeqCst), 0);
    }
}
