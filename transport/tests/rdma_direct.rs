//! Collectives on device memory over the RDMA protocol (the GPUDirect RDMA path), on the
//! adversarial emulation with emulated device memory: pages the CPU cannot touch (a read or a
//! write by the protocol or a collective is a segmentation fault, which kills this test binary),
//! reached by the emulated NIC through a second mapping. All-to-all-v and all-gather-v against
//! a reference for 2..=8 ranks, skewed size matrices and sizes on both sides of the zero-copy
//! threshold, on sub-communicators, under lost peers and short writes; transports that copy
//! with the CPU refuse; a message for a device buffer that comes through the slots is an error,
//! never a CPU copy.
mod rdma_util;
use rdma_util::{run, fabrics};
use ember_transport::fabric::{Fabric, Tag, Wait};
use ember_transport::rdma::emu::{self, DeviceMem};
use ember_transport::rdma::{emu_world, EmuConfig, Fault, RdmaConfig};
use ember_transport::{local_world, Comm, Error};
use std::sync::Arc;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
/// Zero-copy from 16 KiB for host buffers; device buffers always go zero-copy.
const CFG: RdmaConfig = RdmaConfig { slots: 4, chunk: 4096 };

/// Elements rank `s` sends to rank `d` under matrix `kind`.
fn count(kind: u32, s: usize, d: usize, base: usize) -> usize {
    match kind {
        0 => base,
        1 => (s * 7 + d * 3) % 5 * base / 2,
        2 => if s == 0 { base * 8 } else { base / 4 },
        3 => if d == 1 { base * 8 } else { 1 },
        _ => ((s * 131 + d * 71 + base) * 2654435761usize) % (2 * base + 1),
    }
}

fn val(s: usize, d: usize, i: usize) -> u32 {
    (s as u32) << 28 ^ (d as u32) << 22 ^ (i as u32).wrapping_mul(2654435761)
}

fn bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn words(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Device memory holding `v`.
fn device(v: &[u32]) -> DeviceMem {
    let mut d = DeviceMem::new(v.len() * 4).unwrap();
    d.write(0, &bytes(v));
    d
}

/// The own block's device copy (the collective runs it while nothing else touches the range).
fn own(s: u64, d: u64, l: usize) -> Result<(), Error> {
    // SAFETY: the collective passes its own block's source and destination, each `l` bytes of
    // emulated device memory it holds for the call, and they do not overlap.
    unsafe { DeviceMem::copy(s, d, l) }.map_err(Error::Bootstrap)
}

fn read(d: &DeviceMem) -> Vec<u32> {
    let mut b = vec![0u8; d.len()];
    d.read(0, &mut b);
    words(&b)
}

/// `iters` all-to-all-v on device buffers (the same buffers each time); every rank's result
/// against the reference.
fn a2a_device(comms: Vec<Comm>, kind: u32, base: usize, iters: usize) -> Vec<Result<(), String>> {
    let n = comms.len();
    let out = run(comms, move |c| {
        let r = c.rank();
        let sc: Vec<usize> = (0..n).map(|d| count(kind, r, d, base)).collect();
        let rc: Vec<usize> = (0..n).map(|s| count(kind, s, r, base)).collect();
        let send = device(&(0..n).flat_map(|d| (0..sc[d]).map(move |i| val(r, d, i))).collect::<Vec<_>>());
        let recv = device(&vec![0xdead_beef; rc.iter().sum()]);
        let (sb, rb): (Vec<usize>, Vec<usize>) = (sc.iter().map(|x| x * 4).collect(), rc.iter().map(|x| x * 4).collect());
        for _ in 0..iters {
            // SAFETY: both buffers hold the counts' sums of bytes and outlive the call.
            unsafe { c.all_to_all_v_direct(send.addr(), &sb, recv.addr(), &rb, own) }
                .map_err(|e| format!("rank {r}: {e}"))?;
        }
        let want: Vec<u32> = (0..n).flat_map(|s| (0..count(kind, s, r, base)).map(move |i| val(s, r, i))).collect();
        if read(&recv) != want {
            return Err(format!("rank {r}: wrong data"));
        }
        Ok(())
    });
    out
}

#[test]
fn device_all_to_all_v_matches_the_reference() {
    for n in [2, 3, 5, 8] {
        for base in [0usize, 1, 255, 4097] {
            for kind in 0..5 {
                for e in [EmuConfig::fast(), EmuConfig::adversarial(7 + n as u64 + base as u64)] {
                    let what = format!("n {n} base {base} kind {kind} adversarial {}", e.adversarial);
                    for r in a2a_device(emu_world(n, e, CFG, T).unwrap(), kind, base, 2) {
                        r.unwrap_or_else(|e| panic!("{what}: {e}"));
                    }
                }
            }
        }
    }
}

#[test]
fn device_all_gather_v_matches_the_reference() {
    for n in [2, 4, 7] {
        for base in [0usize, 3, 5000] {
            let counts: Vec<usize> = (0..n).map(|p| count(4, p, 0, base)).collect();
            let out = run(emu_world(n, EmuConfig::adversarial(n as u64), CFG, T).unwrap(), {
                let counts = counts.clone();
                move |c| {
                    let r = c.rank();
                    let send = device(&(0..counts[r]).map(|i| val(r, 0, i)).collect::<Vec<_>>());
                    let recv = device(&vec![7; counts.iter().sum()]);
                    let cb: Vec<usize> = counts.iter().map(|x| x * 4).collect();
                    // SAFETY: as above.
                    unsafe { c.all_gather_v_direct(send.addr(), &cb, recv.addr(), own) }.unwrap();
                    read(&recv)
                }
            });
            let want: Vec<u32> = (0..n).flat_map(|p| (0..counts[p]).map(move |i| val(p, 0, i))).collect();
            for (r, got) in out.into_iter().enumerate() {
                assert!(got == want, "n {n} base {base} rank {r}: wrong data");
            }
        }
    }
}

#[test]
fn device_collectives_on_sub_communicators() {
    // 6 ranks as 2 groups of 3 (a 2x3 grid's sharding groups), each running its own a2a.
    let world = emu_world(6, EmuConfig::adversarial(11), CFG, T).unwrap();
    let out = run(world, |c| {
        let sub = c.split((c.rank() / 3) as u32, c.rank() as i64).unwrap();
        let (n, r) = (sub.size(), sub.rank());
        let send = device(&(0..n).flat_map(|d| (0..300).map(move |i| val(r, d, i))).collect::<Vec<_>>());
        let recv = device(&vec![0; 300 * n]);
        let cb = vec![1200usize; n];
        // SAFETY: as above.
        unsafe { sub.all_to_all_v_direct(send.addr(), &cb, recv.addr(), &cb, own) }.unwrap();
        let want: Vec<u32> = (0..n).flat_map(|s| (0..300).map(move |i| val(s, r, i))).collect();
        read(&recv) == want
    });
    assert!(out.into_iter().all(|ok| ok));
}

#[test]
fn device_faults_are_errors_naming_a_peer_never_hangs() {
    let t = Duration::from_millis(1500);
    for fault in [Fault::Lose { rank: 2, after: 1 }, Fault::Short { rank: 1, nth: 2 }, Fault::Short { rank: 1, nth: 4 }] {
        let mut e = EmuConfig::adversarial(5);
        e.faults = vec![fault];
        let t0 = Instant::now();
        let out = run(emu_world(3, e, CFG, t).unwrap(), move |c| {
            let sb = vec![2800usize; 3];
            let send = device(&vec![1; 2100]);
            let recv = device(&vec![0; 2100]);
            for _ in 0..4 {
                // SAFETY: as above.
                if let Err(e) = unsafe { c.all_to_all_v_direct(send.addr(), &sb, recv.addr(), &sb, own) } {
                    return Some(e);
                }
            }
            None
        });
        assert!(t0.elapsed() < t * 4 + Duration::from_secs(5), "{fault:?}: took {:?}", t0.elapsed());
        let errs: Vec<&Error> = out.iter().flatten().collect();
        assert!(!errs.is_empty(), "{fault:?}: nobody noticed");
        assert!(errs.iter().all(|e| e.peer().is_some_and(|p| p < 3)), "{fault:?}: {errs:?}");
        if let Fault::Short { rank, .. } = fault {
            assert!(errs.iter().any(|e| matches!(e, Error::Protocol { peer, .. } if *peer == rank)), "{fault:?}: {errs:?}");
        }
    }
}

#[test]
fn transports_that_copy_with_the_cpu_refuse_device_memory() {
    let d = DeviceMem::new(64).unwrap();
    let out = run(local_world(2), move |c| {
        let probe = c.probe_direct(0x1000, 64);
        let dev = DeviceMem::new(32).unwrap();
        // SAFETY: refused before any byte moves (a CPU touch would be a segmentation fault).
        let r = unsafe { c.all_to_all_v_direct(dev.addr(), &[16, 16], dev.addr(), &[16, 16], |_, _, _| Ok(())) };
        (probe, r)
    });
    for (probe, r) in out {
        assert!(probe.unwrap_err().contains("local"), "probe should name the transport");
        let e = r.unwrap_err();
        assert!(matches!(e, Error::Usage { .. }) && e.to_string().contains("device memory"), "{e}");
    }
    // The RDMA communicator registers device memory, and refuses a range straddling it.
    let comms = emu_world(2, EmuConfig::fast(), CFG, T).unwrap();
    assert_eq!(comms[0].probe_direct(d.addr(), 64), Ok(()));
    assert!(comms[0].probe_direct(d.addr() - 8, 64).unwrap_err().contains("straddles"));
}

#[test]
fn a_slot_message_for_a_device_buffer_is_an_error_not_a_cpu_copy() {
    // A peer that sends a small message from host memory (through the slots) to a receive
    // posted on device memory: before and after the receive is posted (the stash path).
    for send_first in [false, true] {
        let f = fabrics(2, EmuConfig::adversarial(3), CFG);
        let tag = Tag { ctx: 5, seq: 1, round: 0 };
        let w = Wait::new("test", Duration::from_secs(5));
        let host = vec![9u8; 100];
        let dev = DeviceMem::new(100).unwrap();
        let sender = {
            let (f0, w) = (f[0].clone(), w.clone());
            let host = host.clone();
            std::thread::spawn(move || {
                // SAFETY: `host` outlives wait_send.
                unsafe { f0.send(1, tag, host.as_ptr(), host.len(), &w) }.unwrap();
                f0.wait_send(1, tag, &w)
            })
        };
        if send_first {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: `dev` outlives wait_recv.
        unsafe { f[1].post_recv_direct(0, tag, dev.addr() as *mut u8, dev.len(), &w) }.unwrap();
        let e = f[1].wait_recv(0, tag, &w).unwrap_err();
        assert!(matches!(e, Error::Protocol { peer: 0, .. }) && e.to_string().contains("device buffer"), "{e}");
        let _ = sender.join().unwrap();
        assert!(read(&dev).iter().all(|&x| x == 0), "nothing may land in the device buffer");
    }
}

#[test]
fn emulated_device_memory_faults_on_cpu_access() {
    // The adversary is real: a CPU read of a device address kills the process (checked in a
    // forked child, which would otherwise exit 0).
    let d = DeviceMem::new(4096).unwrap();
    // SAFETY: the child only reads and exits; the parent waits for it.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            std::hint::black_box(std::ptr::read_volatile(d.addr() as *const u8));
            libc::_exit(0);
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV, "status {status:#x}");
    }
}

#[test]
fn a_registration_keeps_freed_device_memory_mapped_as_pinning_does() {
    // A late write into device memory freed while still registered (an error path) lands in
    // the still-pinned pages, as on hardware, instead of faulting the emulated NIC.
    use ember_transport::rdma::verbs::{Sge, Verbs, Wc};
    let v = emu::world(2, EmuConfig::fast());
    let dev = DeviceMem::new(4096).unwrap();
    // SAFETY: registered below, deregistered at the end; the write targets it.
    let mr = unsafe { v[1].register(dev.addr() as *mut u8, 4096) }.unwrap();
    drop(dev);
    let mut src = vec![7u8; 512];
    // SAFETY: `src` outlives the write (fast emulation: placed at post).
    let smr = unsafe { v[0].register(src.as_mut_ptr(), src.len()) }.unwrap();
    let sge = Sge { addr: smr.addr, len: 512, lkey: smr.lkey };
    unsafe { v[0].post_write_imm(1, 1, &[sge], mr.addr + 100, mr.rkey, 0) }.unwrap();
    let mut wcs = Vec::new();
    v[0].poll(&mut wcs, 8);
    assert!(matches!(&wcs[..], [Wc::Send { status: Ok(()), .. }]), "{wcs:?}");
    v[1].deregister(&mr); // the last registration: now unmapped
    v[0].deregister(&smr);
}

#[test]
fn a_device_receive_that_cannot_register_fails_fast_on_both_sides() {
    // The receive range straddles the end of a device mapping: the emulated NIC refuses to
    // register it. The receiver gets an I/O error and the sender is told to drop the message,
    // whether the sender's announcement arrives before or after the receive is posted; nobody
    // waits for the timeout.
    for send_first in [true, false] {
        let f = fabrics(2, EmuConfig::adversarial(9), CFG);
        let tag = Tag { ctx: 6, seq: 1, round: 0 };
        let w = Wait::new("test", Duration::from_secs(10));
        let src = device(&vec![5; 1000]);
        let dst = DeviceMem::new(8192).unwrap();
        let t0 = Instant::now();
        let sender = {
            let (f0, a, w) = (f[0].clone(), src.addr(), w.clone());
            std::thread::spawn(move || {
                // SAFETY: `src` outlives the thread (joined below).
                unsafe { f0.send_direct(1, tag, a as *const u8, 4000, &w) }.unwrap();
                f0.wait_send(1, tag, &w)
            })
        };
        if send_first {
            std::thread::sleep(Duration::from_millis(50));
        }
        let bad = dst.addr() + 8192 - 100;
        // SAFETY: the range is never written: its registration fails.
        unsafe { f[1].post_recv_direct(0, tag, bad as *mut u8, 4000, &w) }.unwrap();
        let e = f[1].wait_recv(0, tag, &w).unwrap_err();
        assert!(matches!(e, Error::Io { .. }) && e.to_string().contains("straddles"), "{e}");
        // The receiving rank goes on (progressing, as its next collective would) until the
        // sender is released.
        while !sender.is_finished() {
            let _ = f[1].wait_recv(0, Tag { ctx: 99, seq: 0, round: 0 }, &Wait::new("pump", Duration::from_millis(5)));
        }
        sender.join().unwrap().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(3), "send_first {send_first}: took {:?}", t0.elapsed());
    }
}

#[test]
fn a_cancelled_send_is_never_written() {
    // A direct send abandoned before the receiver advertised (an error path in a collective):
    // once `cancel_send` returns its buffer is not read any more, so a receive posted later
    // gets nothing (and times out) while the buffer may be reused.
    let f = fabrics(2, EmuConfig::adversarial(4), CFG);
    let tag = Tag { ctx: 7, seq: 1, round: 0 };
    let w = Wait::new("test", Duration::from_secs(5));
    let src = device(&vec![0x1234_5678; 2000]);
    // SAFETY: `src` outlives the fabric's use of it (until cancel_send returns).
    unsafe { f[0].send_direct(1, tag, src.addr() as *const u8, 8000, &w) }.unwrap();
    f[0].cancel_send(1, tag);
    let dst = DeviceMem::new(8000).unwrap();
    // SAFETY: `dst` outlives the wait below.
    unsafe { f[1].post_recv_direct(0, tag, dst.addr() as *mut u8, 8000, &w) }.unwrap();
    // Keep the sender's side progressing while the receiver waits.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pump = {
        let (f0, stop) = (f[0].clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = f0.wait_recv(1, Tag { ctx: 99, seq: 0, round: 0 }, &Wait::new("pump", Duration::from_millis(20)));
            }
        })
    };
    let e = f[1].wait_recv(0, tag, &Wait::new("test", Duration::from_millis(500))).unwrap_err();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    pump.join().unwrap();
    assert!(matches!(e, Error::Timeout { peer: 0, .. }), "{e}");
    assert!(read(&dst).iter().all(|&x| x == 0), "a cancelled send wrote into the receiver");
}
