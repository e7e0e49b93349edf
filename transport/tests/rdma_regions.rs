//! Registered regions (`Comm::register_region`, user-buffer registration) on the RDMA protocol,
//! over the emulation set to register per message as the `ibverbs` binding does
//! (`cache_registrations: false`): messages inside a region register and deregister nothing
//! (counted by the emulation), while the same run without the region registers every message;
//! data against the reference for 2..=5 ranks, sizes on both sides of the zero-copy threshold,
//! fast and adversarial emulation, host and emulated device memory. Messages that leave the
//! region register one by one. Overlaps, unknown regions and unregistering a region in use are
//! refused. Revoking a registration a region shares (a cancel the sender does not acknowledge, a
//! send abandoned with writes in flight) cuts that one peer off (its queue pair to the error
//! state): its late writes never land, and other peers' messages in the region complete.
mod rdma_util;
use rdma_util::{run, fabrics, tag};
use ember_transport::fabric::{Fabric, Wait};
use ember_transport::rdma::emu::{DeviceMem, EmuStats};
use ember_transport::rdma::{emu_world, EmuConfig, RdmaConfig};
use ember_transport::{Comm, Error};
use std::sync::Arc;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);
/// Zero-copy from 16 KiB.
const CFG: RdmaConfig = RdmaConfig { slots: 4, chunk: 4096 };

/// The emulation registering per message, as on the `ibverbs` binding.
fn per_message(adversarial: bool, seed: u64) -> EmuConfig {
    let base = if adversarial { EmuConfig::adversarial(seed) } else { EmuConfig::fast() };
    EmuConfig { cache_registrations: false, ..base }
}

/// Elements rank `s` sends to rank `d`: skewed, zeros included, from a few bytes to ~40 KB.
fn count(s: usize, d: usize, base: usize) -> usize {
    ((s * 131 + d * 71 + base) * 2654435761usize) % (2 * base + 1)
}

fn val(s: usize, d: usize, i: usize) -> u32 {
    (s as u32) << 28 ^ (d as u32) << 22 ^ (i as u32).wrapping_mul(2654435761)
}

/// Where the buffers sit relative to the registered region.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Placement {
    /// No region registered.
    None,
    /// Send and receive buffers inside one region (an arena, as a pool's block).
    Inside,
    /// The region holds only the send buffer's first element: every message leaves it.
    Partly,
}

/// `iters` all-to-all-v from and into one arena per rank (send at element 16, receive after it);
/// returns per rank the emulation's (registrations, deregistrations) made during the
/// collectives, or the error.
fn arena_a2a(comms: Vec<Comm>, stats: Arc<EmuStats>, base: usize, iters: usize, place: Placement) -> Vec<Result<(u64, u64), String>> {
    let n = comms.len();
    run(comms, move |c| {
        let r = c.rank();
        let sc: Vec<usize> = (0..n).map(|d| count(r, d, base)).collect();
        let rc: Vec<usize> = (0..n).map(|s| count(s, r, base)).collect();
        let (ns, nr) = (sc.iter().sum::<usize>(), rc.iter().sum::<usize>());
        let mut arena = vec![0u32; 16 + ns + nr + 16];
        let at = arena.as_ptr() as u64;
        let region = match place {
            Placement::None => None,
            Placement::Inside => Some(arena.len() * 4),
            Placement::Partly => Some(17 * 4),
        };
        if let Some(len) = region {
            // SAFETY: the arena outlives the region (unregistered below, before it drops).
            unsafe { c.register_region(at, len) }.map_err(|e| format!("rank {r}: {e}"))?;
        }
        for (i, x) in arena[16..16 + ns].iter_mut().enumerate() {
            let (mut d, mut k) = (0, i);
            while k >= sc[d] {
                k -= sc[d];
                d += 1;
            }
            *x = val(r, d, k);
        }
        c.barrier().map_err(|e| e.to_string())?;
        let (regs, deregs) = (stats.registrations(r), stats.deregistrations(r));
        for _ in 0..iters {
            let (head, tail) = arena.split_at_mut(16 + ns);
            let recv = &mut tail[..nr];
            recv.fill(0xdead_beef);
            c.all_to_all_v(&head[16..], &sc, recv, &rc).map_err(|e| format!("rank {r}: {e}"))?;
        }
        c.barrier().map_err(|e| e.to_string())?;
        let made = (stats.registrations(r) - regs, stats.deregistrations(r) - deregs);
        let want: Vec<u32> = (0..n).flat_map(|s| (0..count(s, r, base)).map(move |i| val(s, r, i))).collect();
        if arena[16 + ns..16 + ns + nr] != want[..] {
            return Err(format!("rank {r}: wrong data"));
        }
        if region.is_some() {
            c.unregister_region(at).map_err(|e| format!("rank {r}: {e}"))?;
        }
        Ok(made)
    })
}

#[test]
fn messages_inside_a_region_register_nothing() {
    for n in [2, 3, 5] {
        for base in [3usize, 700, 9000] {
            for adversarial in [false, true] {
                let what = format!("n {n} base {base} adversarial {adversarial}");
                let world = |seed| {
                    let e = per_message(adversarial, seed);
                    let stats = e.stats.clone();
                    (emu_world(n, e, CFG, T).unwrap(), stats)
                };
                // The oracle for the counters: without a region every message registers.
                let (comms, stats) = world(n as u64 + base as u64);
                for (r, x) in arena_a2a(comms, stats, base, 3, Placement::None).into_iter().enumerate() {
                    let (regs, deregs) = x.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert!(regs >= 3 && deregs >= 3, "{what} rank {r}: per-message registration not counted ({regs}, {deregs})");
                }
                let (comms, stats) = world(n as u64 * 7 + base as u64);
                for (r, x) in arena_a2a(comms, stats, base, 3, Placement::Inside).into_iter().enumerate() {
                    let made = x.unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_eq!(made, (0, 0), "{what} rank {r}: messages inside the region registered memory");
                }
            }
        }
    }
}

#[test]
fn buffers_leaving_the_region_register_per_message() {
    for adversarial in [false, true] {
        let e = per_message(adversarial, 5);
        let stats = e.stats.clone();
        let (n, base, iters) = (3, 9000, 2);
        for (r, x) in arena_a2a(emu_world(n, e, CFG, T).unwrap(), stats, base, iters, Placement::Partly).into_iter().enumerate() {
            let (regs, _) = x.unwrap_or_else(|e| panic!("adversarial {adversarial}: {e}"));
            // At least every non-empty send to a peer registers (eager ones included).
            let sends = (0..n).filter(|&d| d != r && count(r, d, base) > 0).count() as u64;
            assert!(sends > 0 && regs >= iters as u64 * sends, "adversarial {adversarial} rank {r}: {regs} registrations for {sends} sends per call");
        }
    }
}

#[test]
fn device_memory_regions_serve_direct_collectives() {
    for (n, adversarial) in [(2, false), (4, true)] {
        let e = per_message(adversarial, 3);
        let stats = e.stats.clone();
        let per = 5000usize; // bytes per peer; device buffers go zero-copy at any size
        let out = run(emu_world(n, e, CFG, T).unwrap(), move |c| {
            let r = c.rank();
            let mut arena = DeviceMem::new(2 * n * per).unwrap();
            let send: Vec<u8> = (0..n * per).map(|i| (r * 37 + i / per * 11 + i) as u8).collect();
            arena.write(0, &send);
            let (s, rv) = (arena.addr(), arena.addr() + (n * per) as u64);
            // SAFETY: the arena outlives the region.
            unsafe { c.register_region(arena.addr(), arena.len()) }.unwrap();
            let counts = vec![per; n];
            let regs = stats.registrations(r);
            for _ in 0..3 {
                // SAFETY: both halves of the arena hold n × per bytes; `copy` is the device copy.
                unsafe { c.all_to_all_v_direct(s, &counts, rv, &counts, |a, b, l| DeviceMem::copy(a, b, l).map_err(Error::Bootstrap)) }.unwrap();
            }
            c.barrier().unwrap();
            let made = stats.registrations(r) - regs;
            let mut got = vec![0u8; n * per];
            arena.read(n * per, &mut got);
            c.unregister_region(arena.addr()).unwrap();
            let want: Vec<u8> = (0..n * per).map(|i| ((i / per) * 37 + r * 11 + r * per + i % per) as u8).collect();
            (made, got == want)
        });
        for (r, (made, ok)) in out.into_iter().enumerate() {
            assert!(ok, "n {n} rank {r}: wrong data");
            assert_eq!(made, 0, "n {n} rank {r}: device messages inside the region registered memory");
        }
    }
}

#[test]
fn bad_region_calls_are_refused() {
    let f = fabrics(2, per_message(false, 1), CFG);
    let mut arena = vec![0u8; 1 << 16];
    let a = arena.as_mut_ptr() as u64;
    let usage = |r: Result<(), Error>, what: &str| match r {
        Err(Error::Usage { detail, .. }) => assert!(detail.contains(what), "{detail}"),
        other => panic!("want a usage error with '{what}', got {other:?}"),
    };
    // SAFETY: every region lies inside `arena`, which outlives them (unregistered at the end).
    unsafe {
        usage(f[1].register_region(a, 0), "empty");
        f[1].register_region(a + 4096, 32768).unwrap();
        usage(f[1].register_region(a, 4097), "overlaps");
        usage(f[1].register_region(a + 36863, 10), "overlaps");
        f[1].register_region(a, 4096).unwrap(); // adjacent: fine
        f[1].register_region(a + 36864, 4096).unwrap();
    }
    usage(f[1].unregister_region(a + 1), "no registered region");
    // A zero-copy receive inside a region keeps it in use until it completes.
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 20_000;
    // SAFETY: 4096 + len bytes lie inside `arena`, untouched until the receive completes below.
    unsafe { f[1].post_recv(0, tag(1), arena.as_mut_ptr().add(4096), len, &w).unwrap() };
    let msg: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    usage(f[1].unregister_region(a + 4096), "in use by 1");
    // SAFETY: `msg` holds len bytes and lives until the send is waited for below.
    unsafe { f[0].send(1, tag(1), msg.as_ptr(), len, &w).unwrap() };
    let f0 = f[0].clone();
    let wc = w.clone();
    let h = std::thread::spawn(move || f0.wait_send(1, tag(1), &wc));
    assert_eq!(f[1].wait_recv(0, tag(1), &w).unwrap(), len);
    h.join().unwrap().unwrap();
    assert!(arena[4096..4096 + len] == msg[..]);
    for off in [0, 4096, 36864] {
        f[1].unregister_region(a + off).unwrap();
    }
    usage(f[1].unregister_region(a), "no registered region");
}

#[test]
fn an_unacknowledged_cancel_in_a_region_cuts_off_that_peer_only() {
    let e = per_message(false, 1);
    let stats = e.stats.clone();
    let f = fabrics(3, e, CFG);
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 1 << 20;
    let mut arena = vec![0u8; 2 * len];
    let a = arena.as_mut_ptr() as u64;
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    // SAFETY: the region and both receives lie inside `arena`, and `data` is sent from; both
    // outlive every operation (waited for, failed or cancelled below). The cancelled receive's
    // half is written by this thread only after `cancel_recv` returned.
    unsafe {
        // Rank 2 receives from ranks 0 and 1 into one region. Its queue to rank 0 stalls, so the
        // cancel of rank 0's receive is never acknowledged: rank 0 is cut off, the region stays.
        f[2].register_region(a, arena.len()).unwrap();
        let (regs, deregs) = (stats.registrations(2), stats.deregistrations(2));
        f[2].post_recv(0, tag(1), arena.as_mut_ptr(), len, &w).unwrap();
        f[2].post_recv(1, tag(1), arena.as_mut_ptr().add(len), len, &w).unwrap();
        f[2].verbs().stall_queue(0, true);
        f[2].cancel_recv(0, tag(1));
        assert_eq!((stats.registrations(2), stats.deregistrations(2)), (regs, deregs), "the region was re-registered");
        arena[..len].fill(0x55); // ours again
        f[0].send(2, tag(1), data.as_ptr(), len, &w).unwrap();
        f[1].send(2, tag(1), data.as_ptr(), len, &w).unwrap();
    }
    let err = f[0].wait_send(2, tag(1), &w).unwrap_err();
    assert!(matches!(err, Error::PeerFailed { peer: 2, .. }), "{err}");
    // Rank 1's message into the same region completes.
    let f1 = f[1].clone();
    let wc = w.clone();
    let h = std::thread::spawn(move || f1.wait_send(2, tag(1), &wc));
    assert_eq!(f[2].wait_recv(1, tag(1), &w).unwrap(), len);
    h.join().unwrap().unwrap();
    assert!(arena[len..] == data[..], "the other peer's message did not land");
    assert!(arena[..len].iter().all(|&b| b == 0x55), "a late write landed in the cancelled buffer");
    // Rank 0 is gone for rank 2, with the reason.
    let mut b = [0u8; 8];
    // SAFETY: `b` holds 8 bytes; the receive is refused (the peer is cut off) before it is posted.
    let err = unsafe { f[2].post_recv(0, tag(2), b.as_mut_ptr(), 8, &w) }.unwrap_err();
    assert!(matches!(&err, Error::PeerFailed { peer: 0, reason, .. } if reason.contains("disconnected")), "{err}");
    f[2].unregister_region(a).unwrap();
}

#[test]
fn an_abandoned_send_from_a_region_cuts_off_that_peer_only() {
    let e = per_message(false, 2);
    let stats = e.stats.clone();
    let f = fabrics(3, e, CFG);
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 100_000; // zero-copy
    let arena: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let a = arena.as_ptr() as u64;
    let (mut r1, mut r2) = (vec![0u8; len], vec![0u8; len]);
    // SAFETY: the region is `arena`, and the receive buffers `small`, `r1`, `r2` hold what is
    // posted into them; `small`'s message completes inside this block (its send waited for),
    // the others outlive their receives (completed, or the peer cut off, below).
    unsafe {
        f[0].register_region(a, len).unwrap();
        let (regs, deregs) = (stats.registrations(0), stats.deregistrations(0));
        let mut small = [0u8; 8];
        f[1].post_recv(0, tag(0), small.as_mut_ptr(), 8, &w).unwrap();
        f[1].post_recv(0, tag(1), r1.as_mut_ptr(), len, &w).unwrap();
        f[2].post_recv(0, tag(1), r2.as_mut_ptr(), len, &w).unwrap();
        // A small message first: waiting for it, rank 0 takes in rank 1's advertisement.
        f[0].send(1, tag(0), arena.as_ptr(), 8, &w).unwrap();
        f[0].wait_send(1, tag(0), &w).unwrap();
        // Its writes in flight (held on the link): abandoning the send revokes the region's
        // registration, which other messages share, so rank 1 is cut off instead.
        f[0].verbs().hold_writes(1, true);
        f[0].send(1, tag(1), arena.as_ptr(), len, &w).unwrap();
        f[0].cancel_send(1, tag(1));
        f[0].verbs().hold_writes(1, false); // the held writes arrive now, on a cut connection
        assert_eq!((stats.registrations(0), stats.deregistrations(0)), (regs, deregs), "the region was re-registered");
        f[0].send(2, tag(1), arena.as_ptr(), len, &w).unwrap();
    }
    let f0 = f[0].clone();
    let wc = w.clone();
    let h = std::thread::spawn(move || f0.wait_send(2, tag(1), &wc));
    assert_eq!(f[2].wait_recv(0, tag(1), &w).unwrap(), len);
    h.join().unwrap().unwrap();
    assert!(r2 == arena, "the other peer's message from the region is wrong");
    // SAFETY: `arena` holds 8 bytes; the send is refused (the peer is cut off) before it is posted.
    let err = unsafe { f[0].send(1, tag(2), arena.as_ptr(), 8, &w) }.unwrap_err();
    assert!(matches!(&err, Error::PeerFailed { peer: 1, reason, .. } if reason.contains("disconnected")), "{err}");
    assert!(r1.iter().all(|&b| b == 0), "a write of the abandoned send landed");
    f[0].unregister_region(a).unwrap();
}
