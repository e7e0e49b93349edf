//! Progress, driven by whichever thread waits: one pass (poll, handle completions, post),
//! getting aborts out before a failing caller returns, and the waiting loop with its back-off
//! and timeout.
use super::state::State;
use super::RdmaFabric;
use crate::error::{Error, Result};
use crate::fabric::Wait;
use crate::rdma::verbs::Verbs;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The longest busy-poll phase of a wait (µs).
pub(super) const SPIN_US: u64 = 50;
/// A yield that took this long gave the core to another thread (measured here: a yield that
/// finds nobody else takes 0.2 µs; one that switches to another thread and back, 1.3 µs).
const GAVE_CORE: Duration = Duration::from_micros(1);
/// Waits without a spin phase before one tries spinning again.
const PROBE_EVERY: u32 = 64;
/// A yield that took this long gave the core away for a scheduler time slice.
const HOG_SLICE: Duration = Duration::from_micros(200);

impl<V: Verbs> RdmaFabric<V> {
    /// One progress pass: poll, handle completions, return credits, post pending chunks.
    /// Returns whether anything happened.
    pub(super) fn progress(&self, st: &mut State) -> bool {
        let mut wcs = std::mem::take(&mut st.wcs);
        wcs.clear();
        let got = self.v.poll(&mut wcs, 64);
        for wc in wcs.drain(..) {
            self.on_wc(st, wc);
        }
        st.wcs = wcs;
        let posted = self.post_pending(st);
        got > 0 || posted
    }

    /// Failing: get pending aborts out before the caller stops progressing (a full send queue
    /// kept them; the caller may never call in again).
    pub(super) fn flush_aborts(&self, st: &mut State) {
        let mut tries = 0;
        while tries < 1000 && st.peers.iter().any(|p| p.abort) {
            self.progress(st);
            tries += 1;
        }
    }

    /// Progress until `done` says so, with back-off; time out naming `peer`.
    pub(super) fn wait_for<T>(&self, peer: usize, w: &Wait, mut done: impl FnMut(&Self, &mut State) -> Option<Result<T>>) -> Result<T> {
        // Busy-poll for the fabric's current spin (at most 50 µs), yield until 250 µs, then
        // sleep 20 µs doubling to 1 ms. The clock is read every 32 passes while busy-polling (it
        // was a tenth of the time spent waiting). The spin adapts to what a yield shows:
        // * a yield that gave the core away (≥ 1 µs) and after which the wait moved handed it to
        //   the peer we wait for, sharing our core: spinning only delays it, so later waits
        //   yield at once (two ranks on one core: 57 → 5 µs per 1 KiB all-to-all);
        // * a yield that gave the core away for a time slice (≥ 200 µs) with nothing moved
        //   handed it to some other busy thread: spinning keeps our share of the core, so later
        //   waits spin again (a yield per pass cost 20× on 2 cores shared with 2 busy processes);
        // * every `PROBE_EVERY` waits without spinning, one spins again (the peer may have
        //   moved to another core; if not, its first yield turns spinning off again).
        // (Yielding up to 2 ms instead of sleeping measured no better on 2 shared cores, and
        // starved the working threads when ranks outnumber cores: yielding threads stay runnable.)
        let mut idle_since: Option<Instant> = None;
        let mut sleep = Duration::from_micros(20);
        let (mut pass, mut spin) = (0u32, true);
        let mut yielded: Option<Duration> = None;
        if self.spin_us.load(Ordering::Relaxed) == 0 && self.yield_waits.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| Some(w.saturating_sub(1))) == Ok(1) {
            self.spin_us.store(SPIN_US, Ordering::Relaxed); // probe: does spinning pay again?
        }
        loop {
            {
                let mut st = self.st.lock().unwrap();
                let moved = self.progress(&mut st);
                if let Some(y) = yielded.take() {
                    if moved && y >= GAVE_CORE {
                        self.spin_us.store(0, Ordering::Relaxed);
                        self.yield_waits.store(PROBE_EVERY, Ordering::Relaxed);
                    } else if y >= HOG_SLICE {
                        self.spin_us.store(SPIN_US, Ordering::Relaxed);
                    }
                }
                if let Some(r) = done(self, &mut st) {
                    if r.is_err() {
                        self.flush_aborts(&mut st);
                    }
                    return r;
                }
                if moved {
                    idle_since = None;
                    sleep = Duration::from_micros(20);
                    spin = true;
                }
            }
            pass = pass.wrapping_add(1);
            if spin && pass % 32 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now >= w.deadline {
                return Err(Error::Timeout { op: w.op, peer, timeout: w.timeout });
            }
            let idle = now - *idle_since.get_or_insert(now);
            if idle < Duration::from_micros(self.spin_us.load(Ordering::Relaxed)) {
                std::hint::spin_loop();
            } else if idle < Duration::from_micros(250) {
                std::thread::yield_now();
                yielded = Some(now.elapsed());
            } else {
                spin = false;
                std::thread::sleep(sleep);
                sleep = (sleep * 2).min(Duration::from_millis(1));
            }
        }
    }
}
