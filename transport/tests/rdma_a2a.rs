//! The RDMA protocol over emulated verbs: all-to-all(v) against a reference for 2..=8 ranks,
//! many sizes (zero included) and skewed size matrices, under the adversarial emulation (bytes
//! placed in shuffled pieces, completions reordered across QPs, random full queues), and each
//! injected fault (lost peer, short write, corrupted write): a clear error naming the peer,
//! within the timeout, never a hang.
use ember_transport::rdma::{emu_world, EmuConfig, Fault, RdmaConfig};
use ember_transport::{Comm, Error};
use std::time::{Duration, Instant};

fn run<R: Send + 'static>(comms: Vec<Comm>, f: impl Fn(&Comm) -> R + Send + Sync + Clone + 'static) -> Vec<R> {
    // Keep every Comm alive until all ranks finished (a dropped rank is a lost peer).
    let hs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || {
                let r = f(&c);
                (r, c)
            })
        })
        .collect();
    let out: Vec<(R, Comm)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
    out.into_iter().map(|(r, _)| r).collect()
}

/// Elements rank `s` sends to rank `d` under matrix `kind`.
fn count(kind: u32, s: usize, d: usize, base: usize) -> usize {
    match kind {
        0 => base,                                   // uniform
        1 => (s * 7 + d * 3) % 5 * base / 2,         // some zeros
        2 => if s == 0 { base * 8 } else { base / 4 }, // one heavy sender
        3 => if d == 1 { base * 8 } else { 1 },      // incast on rank 1
        _ => ((s * 131 + d * 71 + base) * 2654435761usize) % (2 * base + 1), // pseudo-random
    }
}

fn val(s: usize, d: usize, i: usize) -> u32 {
    (s as u32) << 28 ^ (d as u32) << 22 ^ (i as u32).wrapping_mul(2654435761)
}

fn a2a_check(comms: Vec<Comm>, kind: u32, base: usize, iters: usize) {
    let n = comms.len();
    let out = run(comms, move |c| {
        let r = c.rank();
        let sc: Vec<usize> = (0..n).map(|d| count(kind, r, d, base)).collect();
        let rc: Vec<usize> = (0..n).map(|s| count(kind, s, r, base)).collect();
        let send: Vec<u32> = (0..n).flat_map(|d| (0..sc[d]).map(move |i| val(r, d, i))).collect();
        let mut got = Vec::new();
        for _ in 0..iters {
            let mut recv = vec![0xdead_beefu32; rc.iter().sum()];
            c.all_to_all_v(&send, &sc, &mut recv, &rc).map_err(|e| format!("rank {r}: {e}"))?;
            got = recv;
        }
        Ok::<_, String>((r, got))
    });
    for o in out {
        let (r, recv) = o.unwrap_or_else(|e| panic!("kind {kind} base {base} n {n}: {e}"));
        let want: Vec<u32> = (0..n).flat_map(|s| (0..count(kind, s, r, base)).map(move |i| val(s, r, i))).collect();
        assert!(recv == want, "kind {kind} base {base} n {n} rank {r}: wrong data");
    }
}

const T: Duration = Duration::from_secs(30);

#[test]
fn fast_emulation_all_sizes() {
    let cfg = RdmaConfig { slots: 4, chunk: 4096 };
    for n in 2..=8 {
        for base in [0usize, 1, 3, 255, 1024, 1025, 20_000] {
            for kind in 0..5 {
                a2a_check(emu_world(n, EmuConfig::fast(), cfg, T).unwrap(), kind, base, 2);
            }
        }
    }
}

#[test]
fn adversarial_emulation_all_sizes() {
    for n in 2..=8 {
        for (i, base) in [0usize, 1, 17, 1000, 5000].into_iter().enumerate() {
            for kind in 0..5 {
                let seed = (n * 100 + i * 10 + kind as usize) as u64;
                // Tiny slots (many chunks, constant credit starvation) and odd chunk sizes.
                let cfg = RdmaConfig { slots: 1 + seed as usize % 3, chunk: 61 + (seed as usize % 5) * 500 };
                a2a_check(emu_world(n, EmuConfig::adversarial(seed), cfg, T).unwrap(), kind, base, 2);
            }
        }
    }
}

#[test]
fn adversarial_large_messages_pipelined() {
    let cfg = RdmaConfig { slots: 4, chunk: 64 << 10 };
    for n in [2, 3, 5] {
        let mut e = EmuConfig::adversarial(n as u64);
        e.queue_full_permille = 300;
        e.sq_depth = 2;
        a2a_check(emu_world(n, e, cfg, T).unwrap(), 0, 300_000, 2);
        a2a_check(emu_world(n, EmuConfig::adversarial(7 + n as u64), cfg, T).unwrap(), 4, 200_000, 1);
    }
}

#[test]
fn other_collectives_run_over_the_protocol() {
    let comms = emu_world(4, EmuConfig::adversarial(99), RdmaConfig { slots: 2, chunk: 100 }, T).unwrap();
    let out = run(comms, |c| {
        let mut v: Vec<f64> = (0..1000).map(|i| (i * (c.rank() + 1)) as f64).collect();
        c.all_reduce(&mut v, ember_transport::ReduceOp::Sum).unwrap();
        c.barrier().unwrap();
        let mut b = vec![c.rank() as u32; 333];
        c.broadcast(&mut b, 2).unwrap();
        (v, b)
    });
    for (v, b) in out {
        assert!(v.iter().enumerate().all(|(i, &x)| x == (i * 10) as f64));
        assert!(b.iter().all(|&x| x == 2));
    }
}

#[test]
fn mismatched_counts_are_a_protocol_error_naming_the_sender() {
    let comms = emu_world(2, EmuConfig::adversarial(5), RdmaConfig { slots: 2, chunk: 64 }, Duration::from_secs(5)).unwrap();
    let out = run(comms, |c| {
        let r = c.rank();
        // Rank 0 sends 500 elements to rank 1, which expects 10.
        let sc = if r == 0 { vec![1, 500] } else { vec![1, 1] };
        let rc = if r == 1 { vec![10, 1] } else { vec![1, 1] };
        let send = vec![7u32; sc.iter().sum()];
        let mut recv = vec![0u32; rc.iter().sum()];
        c.all_to_all_v(&send, &sc, &mut recv, &rc).err()
    });
    let e1 = out[1].clone().expect("rank 1 must fail");
    assert!(matches!(e1, Error::Protocol { peer: 0, .. }), "{e1}");
}

/// Run one a2a (several iterations) with `fault`; every rank must finish within the timeout
/// plus slack; each error names a real peer; `blamed` must be named by at least one rank.
fn fault_case(n: usize, fault: Fault, blamed: usize, want_protocol: bool) -> Vec<Option<Error>> {
    let t = Duration::from_millis(1500);
    let mut e = EmuConfig::adversarial(42 + n as u64);
    e.faults = vec![fault];
    let comms = emu_world(n, e, RdmaConfig { slots: 2, chunk: 512 }, t).unwrap();
    let t0 = Instant::now();
    let out = run(comms, move |c| {
        let r = c.rank();
        let sc = vec![700usize; n];
        let send: Vec<u32> = (0..n * 700).map(|i| i as u32).collect();
        let mut recv = vec![0u32; n * 700];
        for _ in 0..4 {
            if let Err(e) = c.all_to_all_v(&send, &sc, &mut recv, &sc) {
                return Some(e);
            }
        }
        let _ = r;
        None
    });
    assert!(t0.elapsed() < t * 4 + Duration::from_secs(5), "{fault:?}: took {:?}", t0.elapsed());
    let errs: Vec<&Error> = out.iter().flatten().collect();
    assert!(!errs.is_empty(), "{fault:?}: no rank noticed");
    for e in &errs {
        assert!(e.peer().is_some_and(|p| p < n), "{fault:?}: error without a peer: {e}");
    }
    assert!(errs.iter().any(|e| e.peer() == Some(blamed)), "{fault:?}: nobody blames rank {blamed}: {errs:?}");
    if want_protocol {
        assert!(errs.iter().any(|e| matches!(e, Error::Protocol { peer, .. } if *peer == blamed)), "{fault:?}: {errs:?}");
        if n == 2 {
            // The receiver's abort reaches the writer: no timeout there.
            let w = out[blamed].as_ref().expect("the writer fails too");
            assert!(matches!(w, Error::PeerFailed { peer, .. } if *peer == 1 - blamed), "{fault:?}: writer got {w}");
        }
    }
    out
}

#[test]
fn lost_peer_is_named() {
    for n in [2, 3, 6] {
        for after in [0u64, 3, 20] {
            let blamed = n - 1;
            let out = fault_case(n, Fault::Lose { rank: blamed, after }, blamed, false);
            // Survivors that talked to the lost rank name it.
            if n == 2 {
                let e = out[0].as_ref().expect("survivor fails");
                assert_eq!(e.peer(), Some(1), "{e}");
            }
        }
    }
}

#[test]
fn short_write_is_a_protocol_error_naming_the_writer() {
    for n in [2, 4] {
        for nth in [0u64, 5] {
            fault_case(n, Fault::Short { rank: 1, nth }, 1, true);
        }
    }
}

#[test]
fn corrupted_write_is_a_protocol_error_naming_the_writer() {
    for n in [2, 5] {
        for (nth, at) in [(0u64, 3usize), (2, 30), (7, 50)] {
            fault_case(n, Fault::Corrupt { rank: 0, nth, at }, 0, true);
        }
    }
}

#[test]
fn full_queue_is_back_pressure_not_failure() {
    let mut e = EmuConfig::adversarial(3);
    e.sq_depth = 1;
    e.queue_full_permille = 800;
    a2a_check(emu_world(4, e, RdmaConfig { slots: 3, chunk: 256 }, T).unwrap(), 4, 3000, 3);
}

#[test]
fn emulation_refuses_out_of_bounds_writes() {
    use ember_transport::rdma::emu;
    use ember_transport::rdma::verbs::{PostError, Sge, Verbs, Wc};
    let eps = emu::world(2, EmuConfig::fast());
    let mut src = vec![1u8; 64];
    let mut dst = vec![0u8; 32];
    unsafe {
        let smr = eps[0].register(src.as_mut_ptr(), 64).unwrap();
        let dmr = eps[1].register(dst.as_mut_ptr(), 32).unwrap();
        // Local sge outside its region: refused at post.
        let bad = Sge { addr: smr.addr + 60, len: 8, lkey: smr.lkey };
        assert!(matches!(eps[0].post_write_imm(1, 1, &[bad], dmr.addr, dmr.rkey, 0), Err(PostError::Fatal(_))));
        // Remote range past the end of the region: error completion, nothing written.
        let ok = Sge { addr: smr.addr, len: 64, lkey: smr.lkey };
        eps[0].post_write_imm(1, 2, &[ok], dmr.addr, dmr.rkey, 0).unwrap();
        let mut wcs = Vec::new();
        eps[0].poll(&mut wcs, 8);
        assert!(matches!(&wcs[..], [Wc::Send { peer: 1, wr_id: 2, status: Err(_) }]), "{wcs:?}");
        wcs.clear();
        assert_eq!(eps[1].poll(&mut wcs, 8), 0);
        assert!(dst.iter().all(|&b| b == 0));
        // In bounds: lands, with the immediate.
        let ok = Sge { addr: smr.addr, len: 32, lkey: smr.lkey };
        eps[0].post_write_imm(1, 3, &[ok], dmr.addr, dmr.rkey, 77).unwrap();
        eps[1].poll(&mut wcs, 8);
        assert_eq!(wcs, vec![Wc::Recv { peer: 0, imm: 77, byte_len: 32 }]);
        assert!(dst.iter().all(|&b| b == 1));
    }
}
