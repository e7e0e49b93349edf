//! How long a waiting thread busy-polls before it yields its core, adapted to what its yields
//! show. Shared by the waits that drive progress themselves (the RDMA protocol, shared memory,
//! TCP).
//!
//! * A yield that gave the core away briefly (1–200 µs: it switched to another thread and
//!   back) and after which the wait moved handed the core to the peer we wait for, sharing our
//!   core: spinning only delays it, so later waits skip the busy-poll (two ranks on one core:
//!   57 → 5 µs per 1 KiB all-to-all on the RDMA emulation, 56 → 3 µs on shared memory).
//! * A yield that lost a whole time slice (≥ 200 µs) handed the core to some other busy
//!   thread, whatever moved meanwhile: spinning keeps our share of the core, so later waits
//!   spin again. (Counting a long yield followed by progress as a shared core instead turned
//!   spinning off next to a busy process: 1.8 µs → 2 ms per 1 KiB shared-memory all-to-all,
//!   each yield handing the process a time slice.)
//! * Every [`PROBE_EVERY`] waits without a busy-poll, one spins again (the peer may have moved
//!   to another core; if not, its first yield turns spinning off again).
//!
//! (Measured here: a yield that finds nobody else takes 0.2 µs, one that switches to another
//! thread and back 1.3 µs.)
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// A yield that took this long gave the core to another thread.
const GAVE_CORE: Duration = Duration::from_micros(1);
/// A yield that took this long gave the core away for a scheduler time slice.
const HOG_SLICE: Duration = Duration::from_micros(200);
/// Waits without a busy-poll before one spins again.
pub const PROBE_EVERY: u32 = 64;

/// The longest busy-poll `var` may ask for.
const MAX_SPIN_US: u64 = 1_000_000;

/// The busy-poll maximum the environment variable `var` names in µs (`default_us` when unset),
/// at most 1 s; another value is an error naming the variable.
pub fn max_from_env(var: &str, default_us: u64) -> crate::error::Result<Duration> {
    crate::env::number(var, std::env::var_os(var), default_us, 0..=MAX_SPIN_US, "microseconds").map(Duration::from_micros)
}

/// The busy-poll phase of one endpoint's waits.
#[derive(Debug)]
pub struct AdaptiveSpin {
    max_us: u64,
    spin_us: AtomicU64,
    waits_left: AtomicU32,
}

impl AdaptiveSpin {
    /// Spin up to `max` at the start of a wait until yields show a shared core.
    pub fn new(max: Duration) -> Self {
        let max_us = max.as_micros() as u64;
        AdaptiveSpin { max_us, spin_us: AtomicU64::new(max_us), waits_left: AtomicU32::new(0) }
    }

    /// Whether waits busy-poll at all (a zero maximum: never).
    pub fn spins(&self) -> bool {
        self.max_us > 0
    }

    /// At the start of a wait: how long it busy-polls (probing again when due).
    pub fn begin(&self) -> Duration {
        if self.max_us == 0 {
            return Duration::ZERO;
        }
        let us = self.spin_us.load(Ordering::Relaxed);
        if us == 0 && self.waits_left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| Some(w.saturating_sub(1))) == Ok(1) {
            self.spin_us.store(self.max_us, Ordering::Relaxed);
        }
        Duration::from_micros(us)
    }

    /// After a yield that took `took`: whether the wait's next look found progress.
    pub fn after_yield(&self, took: Duration, moved: bool) {
        if self.max_us == 0 {
            return;
        }
        if took >= HOG_SLICE {
            self.spin_us.store(self.max_us, Ordering::Relaxed);
        } else if moved && took >= GAVE_CORE {
            self.spin_us.store(0, Ordering::Relaxed);
            self.waits_left.store(PROBE_EVERY, Ordering::Relaxed);
        }
    }

    #[cfg(test)]
    fn current(&self) -> Duration {
        Duration::from_micros(self.spin_us.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spin_variable_is_checked() {
        // Variables of this test only (the environment is the process's).
        let var = "EMBER_TEST_SPIN_US_CHECKED";
        assert_eq!(max_from_env(var, 7).unwrap(), Duration::from_micros(7));
        std::env::set_var(var, "1000000");
        assert_eq!(max_from_env(var, 7).unwrap(), Duration::from_secs(1));
        for bad in ["1000001", "-1", "5us", ""] {
            std::env::set_var(var, bad);
            let e = max_from_env(var, 7).unwrap_err().to_string();
            assert!(e.contains(var) && e.contains("microseconds"), "{bad:?}: {e}");
        }
        std::env::remove_var(var);
    }

    #[test]
    fn a_shared_core_stops_spinning_until_a_probe_or_a_hog() {
        let s = AdaptiveSpin::new(Duration::from_micros(50));
        assert_eq!(s.begin(), Duration::from_micros(50));
        // A quick yield (nobody else ran) says nothing.
        s.after_yield(Duration::from_nanos(200), true);
        assert_eq!(s.current(), Duration::from_micros(50));
        // A yield to the peer, after which the wait moved: stop spinning.
        s.after_yield(Duration::from_micros(3), true);
        assert_eq!(s.current(), Duration::ZERO);
        for _ in 0..PROBE_EVERY - 1 {
            assert_eq!(s.begin(), Duration::ZERO);
        }
        // The probe: this wait still runs without spinning, the next spins again.
        assert_eq!(s.begin(), Duration::ZERO);
        assert_eq!(s.begin(), Duration::from_micros(50));
        // A time slice lost with nothing moved (another busy thread): spin again at once.
        s.after_yield(Duration::from_micros(3), true);
        assert_eq!(s.current(), Duration::ZERO);
        s.after_yield(Duration::from_micros(500), false);
        assert_eq!(s.current(), Duration::from_micros(50));
        // A long yield is another busy thread, even if the wait moved meanwhile.
        s.after_yield(Duration::from_micros(3), true);
        s.after_yield(Duration::from_micros(500), true);
        assert_eq!(s.current(), Duration::from_micros(50));
    }
}
