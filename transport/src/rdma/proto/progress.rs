//! Progress, driven by whichever thread waits: one pass (poll until the queue is empty, handle
//! the completions, post), getting aborts out before a failing caller returns, and the waiting
//! loop with its back-off and timeout.
use super::state::State;
use super::RdmaFabric;
use crate::error::{Error, Result};
use crate::fabric::Wait;
use crate::rdma::verbs::Verbs;
use std::time::{Duration, Instant};

/// The longest busy-poll phase of a wait.
pub(super) const SPIN: Duration = Duration::from_micros(50);
/// Completions taken per poll.
const POLL_BATCH: usize = 64;
/// Polls per progress pass at most: a peer that keeps writing cannot hold a pass forever.
const POLLS_PER_PASS: usize = 16;

impl<V: Verbs> RdmaFabric<V> {
    /// One progress pass: poll until the completion queue is empty, handle the completions,
    /// return credits, post pending chunks. Returns whether anything happened.
    ///
    /// Every arrival is handled before anything is posted: an advertisement and the revoke
    /// behind it may come in different polls, and a zero-copy write posted in between would go
    /// into a buffer the receiver has deregistered already (it does so when the revoke is not
    /// acknowledged within `CANCEL_WAIT`), failing the connection. A pass that stops polling
    /// before the queue was empty posts no zero-copy write (`post_pending`).
    pub(super) fn progress(&self, st: &mut State) -> bool {
        let mut wcs = std::mem::take(&mut st.wcs);
        let (mut got, mut drained) = (0, false);
        for _ in 0..POLLS_PER_PASS {
            wcs.clear();
            let k = self.v.poll(&mut wcs, POLL_BATCH);
            for wc in wcs.drain(..) {
                self.on_wc(st, wc);
            }
            got += k;
            if k == 0 {
                drained = true;
                break;
            }
        }
        st.wcs = wcs;
        let posted = self.post_pending(st, drained);
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
        // Busy-poll for the fabric's current spin (at most 50 µs, adapted: `crate::spin`), yield
        // until 250 µs, then sleep 20 µs doubling to 1 ms. The clock is read every 32 passes
        // while busy-polling (it was a tenth of the time spent waiting). (Yielding up to 2 ms
        // instead of sleeping measured no better on 2 shared cores, and starved the working
        // threads when ranks outnumber cores: yielding threads stay runnable.)
        let mut idle_since: Option<Instant> = None;
        let mut sleep = Duration::from_micros(20);
        let (mut pass, mut spin) = (0u32, true);
        let mut yielded: Option<Duration> = None;
        let spin_for = self.spin.begin();
        loop {
            {
                let mut st = self.state(w.op)?;
                let moved = self.progress(&mut st);
                if let Some(took) = yielded.take() {
                    self.spin.after_yield(took, moved);
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
            if now >= w.deadline() {
                return Err(Error::Timeout { op: w.op, peer, timeout: w.timeout });
            }
            let idle = now - *idle_since.get_or_insert(now);
            if idle < spin_for {
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
