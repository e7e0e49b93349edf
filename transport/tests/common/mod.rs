//! Test helpers: run a closure on every rank of a world built with a given backend, and
//! independent references (plain loops over all ranks' seeded inputs).
#![allow(dead_code)]
use ember_transport::{local_world_with_timeout, Comm, Transport};
use std::time::Duration;

pub const BACKENDS: [&str; 3] = ["local", "shm", "tcp"];

/// A world of `n` ranks on `backend`, each rank a thread of this process.
pub fn world(backend: &str, n: usize, timeout: Duration) -> Vec<Comm> {
    match backend {
        "local" => local_world_with_timeout(n, timeout),
        other => {
            let t: Transport = other.parse().unwrap();
            ember_transport::bootstrap::threads_world(n, t, timeout).unwrap()
        }
    }
}

/// Run `f(comm)` on every rank in its own thread; results in rank order.
pub fn run<R: Send + 'static>(backend: &str, n: usize, f: impl Fn(Comm) -> R + Send + Sync + 'static) -> Vec<R> {
    let comms = world(backend, n, Duration::from_secs(20));
    let f = std::sync::Arc::new(f);
    let hs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || f(c))
        })
        .collect();
    hs.into_iter().map(|h| h.join().expect("rank panicked")).collect()
}

/// Deterministic integer-valued input for (rank, item, salt), exact under any summation order.
pub fn val(rank: usize, i: usize, salt: usize) -> f64 {
    (((rank * 7919 + i * 31 + salt * 17) % 1001) as f64) - 500.0
}

/// Send count from rank `r` to rank `p` in an n-rank world (odd, unequal, sometimes zero).
pub fn count(r: usize, p: usize, salt: usize) -> usize {
    let c = (r * 5 + p * 3 + salt) % 7;
    if c == 0 { 0 } else { c * 3 + 1 }
}
