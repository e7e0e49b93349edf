//! The RDMA protocol over emulated verbs: all-to-all(v) against a reference for 2..=8 ranks,
//! many sizes (zero included, on both sides of the zero-copy threshold) and skewed size
//! matrices, under the adversarial emulation (bytes placed in shuffled pieces, completions
//! reordered across QPs, random full queues), and each injected fault (lost peer, short write,
//! corrupted write) through the slots and zero-copy: a clear error naming the peer, within the
//! timeout, never a hang. Zero-copy specifics at the fabric level: registration cache hits, a
//! cancelled (revoked) buffer rejects late writes, a hostile zero-copy write, more outstanding
//! receives than advertisement indices, send before post, upper-bound posts.
//!
//! Thresholds (RdmaFabric defaults): zero-copy from min(256 KiB, 4 × chunk) bytes, in writes of
//! 4 × chunk bytes.
mod rdma_util;
use rdma_util::{run, fabrics, tag};
use ember_transport::fabric::{Fabric, Wait};
use ember_transport::rdma::{emu_world, EmuConfig, Fault, RdmaConfig};
use ember_transport::{Comm, Error};
use std::time::{Duration, Instant};

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
    // Zero-copy from 16 KiB = 4096 elements.
    let cfg = RdmaConfig { slots: 4, chunk: 4096 };
    for n in 2..=8 {
        for base in [0usize, 1, 3, 255, 1024, 1025, 4095, 4096, 4097, 20_000] {
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
                // Tiny slots (many chunks, constant credit starvation) and odd chunk sizes; the
                // zero-copy threshold (244..8244 bytes) falls between the sizes.
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

/// The two delivery paths the fault tests run on, for 700-element (2800-byte) messages:
/// through the slots (3 chunks of 1 KiB; zero-copy would start at 4 KiB), and zero-copy (threshold
/// 2 KiB: an advertisement, an announcement and two zero-copy writes of 2048 + 752 bytes).
const EAGER: RdmaConfig = RdmaConfig { slots: 2, chunk: 1024 };
const ZCOPY: RdmaConfig = RdmaConfig { slots: 2, chunk: 512 };

/// Run one a2a (several iterations) with `fault`; every rank must finish within the timeout
/// plus slack; each error names a real peer; `blamed` must be named by at least one rank.
fn fault_case(n: usize, cfg: RdmaConfig, fault: Fault, blamed: usize, want_protocol: bool) -> Vec<Option<Error>> {
    let t = Duration::from_millis(1500);
    let mut e = EmuConfig::adversarial(42 + n as u64);
    e.faults = vec![fault];
    let comms = emu_world(n, e, cfg, t).unwrap();
    let t0 = Instant::now();
    let out = run(comms, move |c| {
        let sc = vec![700usize; n];
        let send: Vec<u32> = (0..n * 700).map(|i| i as u32).collect();
        let mut recv = vec![0u32; n * 700];
        for _ in 0..4 {
            if let Err(e) = c.all_to_all_v(&send, &sc, &mut recv, &sc) {
                return Some(e);
            }
        }
        None
    });
    let what = format!("{fault:?} chunk {}", cfg.chunk);
    assert!(t0.elapsed() < t * 4 + Duration::from_secs(5), "{what}: took {:?}", t0.elapsed());
    let errs: Vec<&Error> = out.iter().flatten().collect();
    assert!(!errs.is_empty(), "{what}: no rank noticed");
    for e in &errs {
        assert!(e.peer().is_some_and(|p| p < n), "{what}: error without a peer: {e}");
    }
    assert!(errs.iter().any(|e| e.peer() == Some(blamed)), "{what}: nobody blames rank {blamed}: {errs:?}");
    if want_protocol {
        assert!(errs.iter().any(|e| matches!(e, Error::Protocol { peer, .. } if *peer == blamed)), "{what}: {errs:?}");
        if n == 2 {
            // The receiver's abort reaches the writer: no timeout there.
            let w = out[blamed].as_ref().expect("the writer fails too");
            assert!(matches!(w, Error::PeerFailed { peer, .. } if *peer == 1 - blamed), "{what}: writer got {w}");
        }
    }
    out
}

#[test]
fn lost_peer_is_named() {
    // Data writes per rank and a2a iteration with 2 ranks: 3 (slots) or 4 (zero-copy).
    for cfg in [EAGER, ZCOPY] {
        for n in [2, 3, 6] {
            for after in [0u64, 3, 10] {
                let blamed = n - 1;
                let out = fault_case(n, cfg, Fault::Lose { rank: blamed, after }, blamed, false);
                // Survivors that talked to the lost rank name it.
                if n == 2 {
                    let e = out[0].as_ref().expect("survivor fails");
                    assert_eq!(e.peer(), Some(1), "{e}");
                }
            }
        }
    }
}

#[test]
fn short_write_is_a_protocol_error_naming_the_writer() {
    // Zero-copy: the n-th write may be a control message (short header) or a zero-copy chunk
    // (length checked against the announced message).
    for cfg in [EAGER, ZCOPY] {
        for n in [2, 4] {
            for nth in [0u64, 2, 3, 5] {
                fault_case(n, cfg, Fault::Short { rank: 1, nth }, 1, true);
            }
        }
    }
}

#[test]
fn corrupted_write_is_a_protocol_error_naming_the_writer() {
    for n in [2, 5] {
        for (nth, at) in [(0u64, 3usize), (2, 30), (7, 50)] {
            fault_case(n, EAGER, Fault::Corrupt { rank: 0, nth, at }, 0, true);
        }
        // Zero-copy: a rank's first write is a control message (an advertisement: receives are
        // posted before sends), whose header is checked. A flipped payload byte of a zero-copy
        // write is not detected, as in the payload of a slot write: payload integrity is the
        // link's (ICRC), the protocol checks headers, immediates and lengths.
        for at in [3usize, 30, 50] {
            fault_case(n, ZCOPY, Fault::Corrupt { rank: 0, nth: 0, at }, 0, true);
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

#[test]
fn mismatched_counts_across_the_zero_copy_threshold() {
    // Zero-copy from 256 bytes (chunk 64). Rank 0 sends `s` elements to rank 1, which expects `r`.
    for (s, r) in [(500usize, 10usize), (500, 100), (500, 499), (10, 500), (100, 500)] {
        let comms = emu_world(2, EmuConfig::adversarial(5 + s as u64), RdmaConfig { slots: 2, chunk: 64 }, Duration::from_secs(5)).unwrap();
        let out = run(comms, move |c| {
            let me = c.rank();
            let sc = if me == 0 { vec![1, s] } else { vec![1, 1] };
            let rc = if me == 1 { vec![r, 1] } else { vec![1, 1] };
            let send = vec![7u32; sc.iter().sum()];
            let mut recv = vec![0u32; rc.iter().sum()];
            c.all_to_all_v(&send, &sc, &mut recv, &rc).err()
        });
        let e1 = out[1].clone().unwrap_or_else(|| panic!("{s} -> {r}: rank 1 must fail"));
        assert!(matches!(e1, Error::Protocol { peer: 0, .. }), "{s} -> {r}: {e1}");
    }
}

#[test]
fn zero_copy_large_messages_all_matrices() {
    // Default geometry (zero-copy from 256 KiB in 1 MiB writes): sizes around the threshold and
    // several writes per message; fast and adversarial.
    let cfg = RdmaConfig::default();
    for n in [2, 3, 4] {
        for base in [65_535usize, 65_536, 65_537, 300_000] {
            for kind in [0, 2, 4] {
                a2a_check(emu_world(n, EmuConfig::fast(), cfg, T).unwrap(), kind, base, 2);
            }
        }
    }
    for n in [2, 5] {
        a2a_check(emu_world(n, EmuConfig::adversarial(n as u64 + 70), RdmaConfig { slots: 3, chunk: 16 << 10 }, T).unwrap(), 4, 70_000, 2);
    }
}

#[test]
fn registration_cache_registers_repeated_buffers_once() {
    let e = EmuConfig::fast();
    let stats = e.stats.clone();
    let n = 4;
    let per = 100_000usize; // 400 KB per peer: zero-copy with the default geometry
    let comms = emu_world(n, e, RdmaConfig::default(), T).unwrap();
    let st = stats.clone();
    let out = run(comms, move |c| {
        let r = c.rank();
        let send: Vec<u32> = (0..n * per).map(|i| val(r, i / per, i % per)).collect();
        let mut recv = vec![0u32; n * per];
        let mut regs = Vec::new();
        for _ in 0..10 {
            recv.iter_mut().for_each(|x| *x = 0);
            c.all_to_all(&send, &mut recv).unwrap();
            c.barrier().unwrap();
            regs.push(st.registrations(r));
        }
        let ok = (0..n * per).all(|i| recv[i] == val(i / per, r, i % per));
        (regs, ok)
    });
    for (r, (regs, ok)) in out.into_iter().enumerate() {
        assert!(ok, "rank {r}: wrong data");
        // Slots + header ring at setup, then each peer's send and receive range once.
        assert!(regs[0] >= 2 + 2 * (n as u64 - 1), "rank {r}: {regs:?}");
        assert_eq!(regs[1], regs[9], "rank {r}: registrations keep growing: {regs:?}");
    }
}

#[test]
fn cancelled_zero_copy_buffer_rejects_late_writes() {
    let e = EmuConfig::fast();
    let stats = e.stats.clone();
    let f = fabrics(2, e, RdmaConfig { slots: 4, chunk: 4096 }); // zero-copy from 16 KiB
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 1 << 20;
    let data = vec![0xabu8; len];
    let mut buf = vec![0u8; len];
    unsafe {
        // Rank 1 advertises (the advertisement lands at once on the fast emulation), then its
        // queue to rank 0 stalls: the revoke cannot get out, nobody acknowledges, and the
        // cancel revokes the registration. Rank 0 writes into the revoked buffer.
        f[1].post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap();
        f[1].verbs().stall_queue(0, true);
        let deregs = stats.deregistrations(1);
        let t0 = Instant::now();
        f[1].cancel_recv(0, tag(1));
        assert!(t0.elapsed() >= Duration::from_millis(100), "revoked without waiting for the ack");
        assert_eq!(stats.deregistrations(1), deregs + 1, "the cancelled buffer was not deregistered");
        buf.fill(0x55); // ours again
        f[0].send(1, tag(1), data.as_ptr(), len, &w).unwrap();
    }
    let err = f[0].wait_send(1, tag(1), &w).unwrap_err();
    assert!(matches!(err, Error::PeerFailed { peer: 1, .. }), "{err}");
    assert!(stats.rejected_writes(1) >= 1, "no write was rejected");
    assert!(buf.iter().all(|&b| b == 0x55), "a late write landed in the cancelled buffer");
}

#[test]
fn cancel_while_the_sender_progresses_is_acknowledged() {
    // Rank 0 keeps progressing (waiting for a message that comes last); rank 1 cancels an
    // advertised receive: rank 0 acknowledges the revoke, so nothing is deregistered, nothing
    // rejected, and the connection carries on.
    for e in [EmuConfig::fast(), EmuConfig::adversarial(21)] {
        let stats = e.stats.clone();
        let f = fabrics(2, e, RdmaConfig { slots: 4, chunk: 4096 });
        let w = Wait::new("test", Duration::from_secs(5));
        let len = 100_000;
        let f0 = f[0].clone();
        let wc = w.clone();
        let h = std::thread::spawn(move || {
            let mut last = vec![0u8; 10];
            unsafe { f0.post_recv(1, tag(9), last.as_mut_ptr(), 10, &wc).unwrap() };
            f0.wait_recv(1, tag(9), &wc).unwrap()
        });
        let mut buf = vec![0u8; len];
        let deregs = stats.deregistrations(1);
        unsafe { f[1].post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
        f[1].cancel_recv(0, tag(1));
        assert_eq!(stats.deregistrations(1), deregs, "revoked although the sender acknowledged");
        let msg = [7u8; 10];
        unsafe { f[1].send(0, tag(9), msg.as_ptr(), 10, &w).unwrap() };
        f[1].wait_send(0, tag(9), &w).unwrap();
        assert_eq!(h.join().unwrap(), 10);
        assert_eq!(stats.rejected_writes(0) + stats.rejected_writes(1), 0);
    }
}

#[test]
fn cancel_before_the_send_keeps_the_connection() {
    for e in [EmuConfig::fast(), EmuConfig::adversarial(11)] {
        let stats = e.stats.clone();
        let f = fabrics(2, e, RdmaConfig { slots: 4, chunk: 4096 });
        let w = Wait::new("test", Duration::from_secs(5));
        let len = 100_000;
        let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let mut dead = vec![0u8; len];
        let mut live = vec![0u8; len];
        unsafe {
            f[1].post_recv(0, tag(1), dead.as_mut_ptr(), len, &w).unwrap();
            f[1].cancel_recv(0, tag(1));
            dead.fill(0x55);
            // The next post gets the revoke out before the advertisement of tag 2.
            f[1].post_recv(0, tag(2), live.as_mut_ptr(), len, &w).unwrap();
        }
        let f0 = f[0].clone();
        let d = data.clone();
        let wc = w.clone();
        let h = std::thread::spawn(move || unsafe {
            // The cancelled message is still sent (the sender knows nothing yet): dropped unwritten.
            f0.send(1, tag(1), d.as_ptr(), len, &wc).unwrap();
            f0.send(1, tag(2), d.as_ptr(), len, &wc).unwrap();
            f0.wait_send(1, tag(1), &wc).unwrap();
            f0.wait_send(1, tag(2), &wc).unwrap();
        });
        assert_eq!(f[1].wait_recv(0, tag(2), &w).unwrap(), len);
        h.join().unwrap();
        assert!(live == data);
        assert!(dead.iter().all(|&b| b == 0x55));
        assert_eq!(stats.rejected_writes(1), 0);
    }
}

/// The emulated endpoint, handing out at most one completion per `poll`: a completion queue
/// whose entries arrive one by one between polls (on hardware a poll also returns only what has
/// arrived, and `IbVerbs::poll` splits its budget between the two queues).
struct OnePerPoll(ember_transport::rdma::EmuVerbs);

impl ember_transport::rdma::verbs::Verbs for OnePerPoll {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn size(&self) -> usize {
        self.0.size()
    }
    unsafe fn register(&self, addr: *mut u8, len: usize) -> Result<ember_transport::rdma::verbs::Mr, String> {
        self.0.register(addr, len)
    }
    fn deregister(&self, mr: &ember_transport::rdma::verbs::Mr) {
        self.0.deregister(mr)
    }
    unsafe fn post_write_imm(&self, peer: usize, wr_id: u64, sges: &[ember_transport::rdma::verbs::Sge], raddr: u64, rkey: u32, imm: u32) -> Result<(), ember_transport::rdma::verbs::PostError> {
        self.0.post_write_imm(peer, wr_id, sges, raddr, rkey, imm)
    }
    fn poll(&self, out: &mut Vec<ember_transport::rdma::verbs::Wc>, max: usize) -> usize {
        self.0.poll(out, max.min(1))
    }
    fn disconnect(&self, peer: usize) -> Result<(), String> {
        self.0.disconnect(peer)
    }
    fn cache_registrations(&self) -> bool {
        self.0.cache_registrations()
    }
}

/// Rank 1 advertises `dead` for tag 1 and cancels it while rank 0 does not progress: the revoke
/// lands in rank 0's completion queue behind the advertisement, nobody acknowledges within the
/// cancel's 100 ms, and the buffer is deregistered. Then rank 1 posts `live` for tag 2. Returns
/// after checking that the cancel did revoke the registration.
fn advertise_and_cancel_unacknowledged<V: ember_transport::rdma::verbs::Verbs>(
    f: &[std::sync::Arc<ember_transport::rdma::RdmaFabric<V>>],
    stats: &ember_transport::rdma::emu::EmuStats,
    dead: &mut [u8],
    live: &mut [u8],
    w: &Wait,
) {
    let deregs = stats.deregistrations(1);
    unsafe {
        f[1].post_recv(0, tag(1), dead.as_mut_ptr(), dead.len(), w).unwrap();
        f[1].cancel_recv(0, tag(1));
        assert_eq!(stats.deregistrations(1), deregs + 1, "the cancel was to revoke the buffer (no acknowledgement)");
        dead.fill(0x55);
        f[1].post_recv(0, tag(2), live.as_mut_ptr(), live.len(), w).unwrap();
    }
}

/// Rank 0 sends tags 1 and 2 (tag 1 already issued when `first_issued`) and waits for both;
/// rank 1 receives tag 2 into `live`. The connection must carry on: nothing written into the
/// revoked buffer, nothing rejected.
fn finish_after_the_cancel<V: ember_transport::rdma::verbs::Verbs + 'static>(
    f: &[std::sync::Arc<ember_transport::rdma::RdmaFabric<V>>],
    stats: &ember_transport::rdma::emu::EmuStats,
    data: &[u8],
    dead: &[u8],
    live: &[u8],
    first_issued: bool,
    w: Wait,
) {
    let len = data.len();
    let f0 = f[0].clone();
    let d = data.to_vec();
    let wc = w.clone();
    let h = std::thread::spawn(move || unsafe {
        if !first_issued {
            f0.send(1, tag(1), d.as_ptr(), len, &wc)?;
        }
        f0.send(1, tag(2), d.as_ptr(), len, &wc)?;
        f0.wait_send(1, tag(1), &wc)?;
        f0.wait_send(1, tag(2), &wc)
    });
    let got = f[1].wait_recv(0, tag(2), &w);
    let sent = h.join().unwrap();
    assert_eq!(stats.rejected_writes(1), 0, "rank 0 wrote into the revoked buffer");
    sent.unwrap();
    assert_eq!(got.unwrap(), len);
    assert!(live == data);
    assert!(dead.iter().all(|&b| b == 0x55));
}

#[test]
fn a_sender_handles_every_arrival_before_it_writes_zero_copy() {
    // Rank 0's first poll hands it the advertisement of tag 1 alone; the revoke behind it has
    // arrived too. The send must see the revoke before it writes a byte zero-copy.
    let e = EmuConfig::fast();
    let stats = e.stats.clone();
    let f = wrapped_fabrics(2, e, RdmaConfig { slots: 4, chunk: 4096 }, OnePerPoll);
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 100_000;
    let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let (mut dead, mut live) = (vec![0u8; len], vec![0u8; len]);
    advertise_and_cancel_unacknowledged(&f, &stats, &mut dead, &mut live, &w);
    unsafe { f[0].send(1, tag(1), data.as_ptr(), len, &w).unwrap() };
    assert_eq!(stats.rejected_writes(1), 0, "the send wrote into the revoked buffer");
    finish_after_the_cancel(&f, &stats, &data, &dead, &live, true, w);
}

#[test]
fn posting_a_receive_does_not_write_into_a_revoked_buffer() {
    // Rank 0 takes up the advertisement of tag 1 (its send's announcement held back by a full
    // queue); then the revoke arrives. Posting a receive on rank 0 posts what is pending: it
    // must handle the revoke before it writes zero-copy.
    let e = EmuConfig::fast();
    let stats = e.stats.clone();
    let f = fabrics(2, e, RdmaConfig { slots: 4, chunk: 4096 });
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 100_000;
    let data: Vec<u8> = (0..len).map(|i| i as u8).collect();
    let (mut dead, mut live, mut back) = (vec![0u8; len], vec![0u8; len], vec![0u8; len]);
    let deregs = stats.deregistrations(1);
    unsafe {
        f[1].post_recv(0, tag(1), dead.as_mut_ptr(), len, &w).unwrap();
        f[0].verbs().stall_queue(1, true);
        f[0].send(1, tag(1), data.as_ptr(), len, &w).unwrap();
        f[1].cancel_recv(0, tag(1));
        assert_eq!(stats.deregistrations(1), deregs + 1, "the cancel was to revoke the buffer (no acknowledgement)");
        dead.fill(0x55);
        f[1].post_recv(0, tag(2), live.as_mut_ptr(), len, &w).unwrap();
        f[0].verbs().stall_queue(1, false);
        f[0].post_recv(1, tag(3), back.as_mut_ptr(), len, &w).unwrap();
    }
    assert_eq!(stats.rejected_writes(1), 0, "posting a receive wrote into the revoked buffer");
    f[0].cancel_recv(1, tag(3));
    finish_after_the_cancel(&f, &stats, &data, &dead, &live, true, w);
}

#[test]
fn a_write_refused_after_an_unacknowledged_cancel_is_named_on_both_sides() {
    // Rank 1 cancels an advertised receive while its queue to rank 0 is stalled: the revoke
    // cannot get out, and the buffer is deregistered. Rank 0 then writes the message zero-copy
    // (refused) and a small one behind it (lands): rank 1 sees a write missing from the stream.
    let e = EmuConfig::fast();
    let stats = e.stats.clone();
    let f = fabrics(2, e, RdmaConfig { slots: 4, chunk: 4096 }); // one 16 KiB zero-copy write
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 16 << 10;
    let data = vec![0xabu8; len];
    let (mut dead, mut small) = (vec![0u8; len], [0u8; 10]);
    let deregs = stats.deregistrations(1);
    unsafe {
        f[1].post_recv(0, tag(1), dead.as_mut_ptr(), len, &w).unwrap();
        f[1].verbs().stall_queue(0, true);
        f[1].cancel_recv(0, tag(1));
        assert_eq!(stats.deregistrations(1), deregs + 1, "the cancel was to revoke the buffer");
        dead.fill(0x55);
        f[0].verbs().hold_writes(1, true);
        f[0].send(1, tag(1), data.as_ptr(), len, &w).unwrap();
        f[0].send(1, tag(2), data.as_ptr(), small.len(), &w).unwrap();
        f[0].verbs().hold_writes(1, false);
        f[1].verbs().stall_queue(0, false);
        f[1].post_recv(0, tag(2), small.as_mut_ptr(), small.len(), &w).unwrap();
    }
    assert_eq!(stats.rejected_writes(1), 1, "the zero-copy write was to be refused");
    let e1 = f[1].wait_recv(0, tag(2), &w).unwrap_err();
    assert!(matches!(e1, Error::Protocol { peer: 0, .. }), "{e1}");
    let cause = format!("buffer of {:?}, refused: that receive was cancelled", tag(1));
    assert!(e1.to_string().contains(&cause), "{e1}");
    let e0 = f[0].wait_send(1, tag(1), &w).unwrap_err();
    assert!(matches!(e0, Error::PeerFailed { peer: 1, .. }), "{e0}");
    assert!(dead.iter().all(|&b| b == 0x55));
}

#[test]
fn hostile_zero_copy_write_is_a_protocol_error() {
    use ember_transport::rdma::verbs::{Imm, Verbs};
    let f = fabrics(2, EmuConfig::fast(), RdmaConfig { slots: 4, chunk: 4096 });
    let w = Wait::new("test", Duration::from_secs(5));
    let mut buf = vec![0u8; 100_000];
    unsafe { f[1].post_recv(0, tag(1), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
    // Rank 0 writes a zero-copy immediate for an advertisement rank 1 never made, into its slots.
    let slots = f[1].slots_for(0);
    let imm = Imm::Zc { src: 0, adv: 77, seq16: 0 }.encode();
    unsafe { f[0].verbs().post_write_imm(1, 5, &[], slots.addr, slots.rkey, imm).unwrap() };
    let e = f[1].wait_recv(0, tag(1), &w).unwrap_err();
    assert!(matches!(e, Error::Protocol { peer: 0, .. }), "{e}");
}

/// Many zero-copy messages between two ranks on threads: more than the 128 advertisement
/// indices outstanding, sends before and after the posts, posts in reverse order.
fn many_messages(e: EmuConfig, count: u64, len: usize, send_first: bool) {
    let f = fabrics(2, e, RdmaConfig { slots: 3, chunk: 512 }); // zero-copy from 2 KiB
    let w = Wait::new("test", Duration::from_secs(20));
    let f0 = f[0].clone();
    let wc = w.clone();
    let h = std::thread::spawn(move || {
        let data: Vec<Vec<u8>> = (0..count).map(|k| (0..len).map(|i| (i as u64 * 7 + k) as u8).collect()).collect();
        if !send_first {
            std::thread::sleep(Duration::from_millis(20));
        }
        for (k, d) in data.iter().enumerate() {
            unsafe { f0.send(1, tag(k as u64), d.as_ptr(), len, &wc).unwrap() };
        }
        for k in 0..count {
            f0.wait_send(1, tag(k), &wc).unwrap();
        }
    });
    if send_first {
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut bufs: Vec<Vec<u8>> = (0..count).map(|_| vec![0u8; len]).collect();
    for k in (0..count).rev() {
        unsafe { f[1].post_recv(0, tag(k), bufs[k as usize].as_mut_ptr(), len, &w).unwrap() };
    }
    for k in 0..count {
        assert_eq!(f[1].wait_recv(0, tag(k), &w).unwrap(), len);
    }
    h.join().unwrap();
    for (k, b) in bufs.iter().enumerate() {
        assert!(b.iter().enumerate().all(|(i, &x)| x == (i as u64 * 7 + k as u64) as u8), "message {k}");
    }
}

#[test]
fn more_receives_than_advertisement_indices() {
    many_messages(EmuConfig::fast(), 300, 3000, false);
    many_messages(EmuConfig::fast(), 300, 3000, true);
    many_messages(EmuConfig::adversarial(3), 200, 5000, false);
    many_messages(EmuConfig::adversarial(4), 200, 5000, true);
}

#[test]
fn upper_bound_posts_below_and_above_the_threshold() {
    // Posted 10 KB (advertised), sent 1000 bytes (slots) or 6000 bytes (zero-copy): the length
    // that arrived is reported; then the connection carries on.
    for e in [EmuConfig::fast(), EmuConfig::adversarial(8)] {
        let f = fabrics(2, e, RdmaConfig { slots: 2, chunk: 512 });
        let w = Wait::new("test", Duration::from_secs(5));
        for (k, sent) in [1000usize, 6000, 1000, 6000].into_iter().enumerate() {
            let data: Vec<u8> = (0..sent).map(|i| (i * 3 + k) as u8).collect();
            let mut buf = vec![0u8; 10_000];
            let t = tag(k as u64);
            let f0 = f[0].clone();
            let d = data.clone();
            let wc = w.clone();
            let h = std::thread::spawn(move || unsafe {
                f0.send(1, t, d.as_ptr(), d.len(), &wc).unwrap();
                f0.wait_send(1, t, &wc).unwrap();
            });
            unsafe { f[1].post_recv(0, t, buf.as_mut_ptr(), buf.len(), &w).unwrap() };
            assert_eq!(f[1].wait_recv(0, t, &w).unwrap(), sent);
            h.join().unwrap();
            assert!(buf[..sent] == data[..]);
        }
    }
}

/// A connected world of `n` fabrics over the emulation, each endpoint wrapped by `wrap`.
fn wrapped_fabrics<W: ember_transport::rdma::verbs::Verbs>(
    n: usize,
    e: EmuConfig,
    cfg: RdmaConfig,
    wrap: impl Fn(ember_transport::rdma::EmuVerbs) -> W,
) -> Vec<std::sync::Arc<ember_transport::rdma::RdmaFabric<W>>> {
    use ember_transport::rdma::{emu, RdmaFabric, RemoteSlots};
    let fabs: Vec<_> = emu::world(n, e).into_iter().map(|v| std::sync::Arc::new(RdmaFabric::new(wrap(v), cfg, "rdma-emu").unwrap())).collect();
    for (r, f) in fabs.iter().enumerate() {
        let remote: Vec<Option<RemoteSlots>> = (0..n).map(|p| (p != r).then(|| fabs[p].slots_for(r))).collect();
        f.connect(&remote).unwrap();
    }
    fabs
}

/// The emulated endpoint, with a switch that makes its next `poll` panic (a bug, or a verbs
/// library that aborts a call, inside a thread that holds the protocol's state).
struct PanickyVerbs {
    inner: ember_transport::rdma::EmuVerbs,
    panic_next_poll: std::sync::atomic::AtomicBool,
}

impl ember_transport::rdma::verbs::Verbs for PanickyVerbs {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    unsafe fn register(&self, addr: *mut u8, len: usize) -> Result<ember_transport::rdma::verbs::Mr, String> {
        self.inner.register(addr, len)
    }
    fn deregister(&self, mr: &ember_transport::rdma::verbs::Mr) {
        self.inner.deregister(mr)
    }
    unsafe fn post_write_imm(&self, peer: usize, wr_id: u64, sges: &[ember_transport::rdma::verbs::Sge], raddr: u64, rkey: u32, imm: u32) -> Result<(), ember_transport::rdma::verbs::PostError> {
        self.inner.post_write_imm(peer, wr_id, sges, raddr, rkey, imm)
    }
    fn poll(&self, out: &mut Vec<ember_transport::rdma::verbs::Wc>, max: usize) -> usize {
        if self.panic_next_poll.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("completion queue corrupted (test)");
        }
        self.inner.poll(out, max)
    }
    fn disconnect(&self, peer: usize) -> Result<(), String> {
        self.inner.disconnect(peer)
    }
    fn cache_registrations(&self) -> bool {
        self.inner.cache_registrations()
    }
}

#[test]
fn a_panic_inside_the_protocol_makes_later_calls_errors_naming_it() {
    use ember_transport::rdma::{emu, RdmaFabric, RemoteSlots};
    use std::sync::Arc;
    let fabs: Vec<Arc<RdmaFabric<PanickyVerbs>>> = emu::world(2, EmuConfig::fast())
        .into_iter()
        .map(|v| Arc::new(RdmaFabric::new(PanickyVerbs { inner: v, panic_next_poll: false.into() }, RdmaConfig::default(), "rdma-emu").unwrap()))
        .collect();
    for (r, f) in fabs.iter().enumerate() {
        let remote: Vec<Option<RemoteSlots>> = (0..2).map(|p| (p != r).then(|| fabs[p].slots_for(r))).collect();
        f.connect(&remote).unwrap();
    }
    let w = Wait::new("test", Duration::from_secs(2));
    let mut buf = vec![0u8; 64];
    // SAFETY: `buf` outlives the receive (cancelled below).
    unsafe { fabs[0].post_recv(1, tag(1), buf.as_mut_ptr(), 64, &w).unwrap() };
    fabs[0].verbs().panic_next_poll.store(true, std::sync::atomic::Ordering::SeqCst);
    let f0 = fabs[0].clone();
    let panicked = std::thread::Builder::new()
        .name("rank0-waiter".into())
        .spawn(move || f0.wait_recv(1, tag(1), &Wait::new("wait_recv", Duration::from_secs(2))))
        .unwrap()
        .join();
    assert!(panicked.is_err(), "the poll was to panic");
    // Every later call on the endpoint is an error naming that first failure, not a panic.
    let e = fabs[0].wait_recv(1, tag(1), &w).unwrap_err();
    assert!(e.to_string().contains("thread 'rank0-waiter' panicked in wait_recv"), "{e}");
    // SAFETY: as above.
    let e = unsafe { fabs[0].send(1, tag(2), buf.as_ptr(), 8, &w) }.unwrap_err();
    assert!(e.to_string().contains("unusable"), "{e}");
    fabs[0].cancel_recv(1, tag(1));
    fabs[0].cancel_send(1, tag(2));
    // The peer was disconnected: its writes no longer land here.
    let data = [7u8; 8];
    // SAFETY: `data` outlives the wait below.
    let sent = unsafe { fabs[1].send(0, tag(1), data.as_ptr(), 8, &w) }.and_then(|_| fabs[1].wait_send(0, tag(1), &w));
    assert!(sent.is_err(), "a write into a failed endpoint succeeded");
    assert_eq!(buf, vec![0u8; 64]);
}
