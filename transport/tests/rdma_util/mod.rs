//! Helpers shared by the RDMA protocol tests: run a closure on every rank of a world (threads),
//! a world of bare fabrics (no `Comm` on top), and message tags.
#![allow(dead_code)]
use ember_transport::fabric::Tag;
use ember_transport::rdma::emu::{self, EmuVerbs};
use ember_transport::rdma::{EmuConfig, RdmaConfig, RdmaFabric, RemoteSlots};
use ember_transport::Comm;
use std::sync::Arc;

/// `f(comm)` on every rank in its own thread; results in rank order. Every `Comm` stays alive
/// until all ranks finished (a dropped rank is a lost peer).
pub fn run<R: Send + 'static>(comms: Vec<Comm>, f: impl Fn(&Comm) -> R + Send + Sync + Clone + 'static) -> Vec<R> {
    let hs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || (f(&c), c))
        })
        .collect();
    let out: Vec<(R, Comm)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    out.into_iter().map(|(r, _)| r).collect()
}

/// A connected world of `n` fabrics over the emulation, without `Comm` on top.
pub fn fabrics(n: usize, e: EmuConfig, cfg: RdmaConfig) -> Vec<Arc<RdmaFabric<EmuVerbs>>> {
    let fabs: Vec<_> = emu::world(n, e).into_iter().map(|v| RdmaFabric::new(v, cfg, "rdma-emu").unwrap()).collect();
    for (r, f) in fabs.iter().enumerate() {
        let remote: Vec<Option<RemoteSlots>> = (0..n).map(|p| (p != r).then(|| fabs[p].slots_for(r))).collect();
        f.connect(&remote).unwrap();
    }
    fabs.into_iter().map(Arc::new).collect()
}

pub fn tag(seq: u64) -> Tag {
    Tag { ctx: 9, seq, round: 0 }
}
