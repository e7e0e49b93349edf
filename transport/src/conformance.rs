//! The `Fabric` contract, checked on every backend: local (threads; host memory, and memory the
//! CPU must not touch moved by the rank's direct copy: the peers path), shared memory (by CMA and
//! copied through shared memory), TCP and the RDMA protocol over the emulated verbs. Each test
//! runs the same scenario on each; a backend-specific hook only holds a message back at the
//! receiver (a peer that stopped reading).
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Local,
    LocalDirect,
    ShmCma,
    ShmStaged,
    Tcp,
    RdmaEmu,
}

const KINDS: [Kind; 6] = [Kind::Local, Kind::LocalDirect, Kind::ShmCma, Kind::ShmStaged, Kind::Tcp, Kind::RdmaEmu];

/// Two connected ranks of one backend, with their concrete types for the hooks.
struct World {
    kind: Kind,
    /// Messages go through the direct primitives (`post_recv_direct`, `send_direct`).
    direct: bool,
    f: Vec<Arc<dyn Fabric>>,
    tcp: Vec<Arc<crate::tcp::TcpFabric>>,
    rdma: Vec<Arc<crate::rdma::RdmaFabric<crate::rdma::EmuVerbs>>>,
}

impl World {
    fn new(kind: Kind) -> World {
        let mut w = World { kind, direct: matches!(kind, Kind::LocalDirect), f: Vec::new(), tcp: Vec::new(), rdma: Vec::new() };
        let t = Duration::from_secs(10);
        match kind {
            Kind::Local => w.f = crate::local::world(2).into_iter().map(|f| Arc::new(f) as Arc<dyn Fabric>).collect(),
            Kind::LocalDirect => {
                for f in crate::local::world(2) {
                    // The device copy of the peers path, on host memory here: a plain memcpy.
                    let copy: crate::fabric::DirectCopy = Arc::new(|src, dst, len| {
                        // SAFETY: the fabric copies between the sender's data and the posted
                        // buffer, both valid for `len` bytes and distinct (Fabric contract).
                        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
                        Ok(())
                    });
                    f.set_direct_copy(copy).unwrap();
                    w.f.push(Arc::new(f));
                }
            }
            Kind::ShmCma | Kind::ShmStaged => {
                let tok = format!("conformance-{kind:?}");
                let inboxes: Vec<_> = (0..2).map(|r| crate::shm::Inbox::create(2, r, &tok).unwrap()).collect();
                let paths: Vec<String> = inboxes.iter().map(|i| i.path.display().to_string()).collect();
                let pid = std::process::id();
                for (r, i) in inboxes.into_iter().enumerate() {
                    let f = crate::shm::ShmFabric::new(r, i, &paths, vec![pid, pid], t).unwrap();
                    f.use_cma(matches!(kind, Kind::ShmCma));
                    w.f.push(Arc::new(f));
                }
            }
            Kind::Tcp => {
                let ls: Vec<_> = (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
                let addrs: Vec<String> = ls.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
                let hs: Vec<_> = ls
                    .into_iter()
                    .enumerate()
                    .map(|(r, l)| {
                        let a = addrs.clone();
                        std::thread::spawn(move || crate::tcp::TcpFabric::new(r, l, &a, "tok", t).unwrap())
                    })
                    .collect();
                w.tcp = hs.into_iter().map(|h| Arc::new(h.join().unwrap())).collect();
                w.f = w.tcp.iter().map(|f| f.clone() as Arc<dyn Fabric>).collect();
            }
            Kind::RdmaEmu => {
                use crate::rdma::{emu, EmuConfig, RdmaConfig, RdmaFabric, RemoteSlots};
                let fabs: Vec<_> = emu::world(2, EmuConfig::fast()).into_iter().map(|v| RdmaFabric::new(v, RdmaConfig::default(), "rdma-emu").unwrap()).collect();
                for (r, f) in fabs.iter().enumerate() {
                    let remote: Vec<Option<RemoteSlots>> = (0..2).map(|p| (p != r).then(|| fabs[p].slots_for(r))).collect();
                    f.connect(&remote).unwrap();
                }
                w.rdma = fabs.into_iter().map(Arc::new).collect();
                w.f = w.rdma.iter().map(|f| f.clone() as Arc<dyn Fabric>).collect();
            }
        }
        w
    }

    /// Hold back (`on`) or release what rank 0 sends to rank 1: rank 1 stops reading (tcp), or
    /// rank 0's queue to it is congested (rdma). Shared memory needs nothing (rank 1 makes no
    /// progress while it does not wait); local sends wait for the post anyway.
    fn hold(&self, on: bool) {
        match self.kind {
            Kind::Tcp => self.tcp[1].pause_rx(on),
            Kind::RdmaEmu => self.rdma[0].verbs().stall_queue(1, on),
            _ => {}
        }
    }
}

/// `post_recv`, or `post_recv_direct` on a direct world.
///
/// # Safety
/// As `Fabric::post_recv`.
unsafe fn post(f: &dyn Fabric, direct: bool, src: usize, t: Tag, buf: *mut u8, len: usize, w: &Wait) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        match direct {
            false => f.post_recv(src, t, buf, len, w),
            true => f.post_recv_direct(src, t, buf, len, w),
        }
    }
}

/// `send`, or `send_direct` on a direct world.
///
/// # Safety
/// As `Fabric::send`.
unsafe fn send(f: &dyn Fabric, direct: bool, dst: usize, t: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        match direct {
            false => f.send(dst, t, data, len, w),
            true => f.send_direct(dst, t, data, len, w),
        }
    }
}

fn tag(seq: u64) -> Tag {
    Tag { ctx: 77, seq, round: 0 }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 253) as u8 ^ salt).collect()
}

/// `len` bytes from rank 0 to rank 1, checked; rank 1 posts before the send, or 20 ms after
/// it started (a backend's send may wait for the post), and waits on a thread of its own.
fn transfer(w: &World, t: Tag, len: usize, post_first: bool) -> std::result::Result<(), String> {
    let direct = w.direct;
    let data = pattern(len, t.seq as u8);
    let f1 = w.f[1].clone();
    let posted = Arc::new(std::sync::Barrier::new(2));
    let p2 = posted.clone();
    let recv = std::thread::spawn(move || {
        let wt = Wait::new("conformance", Duration::from_secs(10));
        let mut buf = vec![0u8; len + 64];
        if !post_first {
            p2.wait();
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: `buf` outlives the receive (waited for or cancelled below).
        let r = unsafe { post(&*f1, direct, 0, t, buf.as_mut_ptr(), len, &wt) };
        if post_first {
            p2.wait();
        }
        let r = r.and_then(|_| f1.wait_recv(0, t, &wt));
        if r.is_err() {
            f1.cancel_recv(0, t);
        }
        let n = r.map_err(|e| e.to_string())?;
        if n != len || buf[..len] != pattern(len, t.seq as u8)[..] || buf[len..].iter().any(|&b| b != 0) {
            return Err(format!("{len} bytes arrived wrong (got {n})"));
        }
        Ok(())
    });
    let wt = Wait::new("conformance", Duration::from_secs(10));
    posted.wait();
    // SAFETY: `data` outlives the send (waited for, or cancelled, below).
    let sent = unsafe { send(&*w.f[0], direct, 1, t, data.as_ptr(), len, &wt) }.and_then(|_| w.f[0].wait_send(1, t, &wt));
    if sent.is_err() {
        w.f[0].cancel_send(1, t);
    }
    let got = recv.join().unwrap();
    sent.map_err(|e| e.to_string())?;
    got
}

#[test]
fn messages_of_every_size_arrive_whole_posted_before_or_after_the_send() {
    for kind in KINDS {
        let w = World::new(kind);
        let mut seq = 0;
        for len in [0, 1, 8191, 8193, 100_000, 1_000_003] {
            for post_first in [true, false] {
                seq += 1;
                transfer(&w, tag(seq), len, post_first).unwrap_or_else(|e| panic!("{kind:?} len {len} post first {post_first}: {e}"));
            }
        }
    }
}

#[test]
fn a_message_longer_than_the_posted_buffer_fails_naming_the_sender() {
    for kind in KINDS {
        let w = World::new(kind);
        let direct = w.direct;
        for (i, len) in [100usize, 200_000].into_iter().enumerate() {
            let t = tag(i as u64 + 1);
            let data = vec![9u8; len + 1000];
            let f1 = w.f[1].clone();
            let recv = std::thread::spawn(move || {
                let wt = Wait::new("conformance", Duration::from_secs(5));
                let mut buf = vec![0u8; len + 64];
                // SAFETY: `buf` outlives the receive.
                let r = unsafe { post(&*f1, direct, 0, t, buf.as_mut_ptr(), len, &wt) }.and_then(|_| f1.wait_recv(0, t, &wt));
                if r.is_err() {
                    f1.cancel_recv(0, t);
                }
                (r, buf[len..].iter().all(|&b| b == 0))
            });
            let wt = Wait::new("conformance", Duration::from_secs(2));
            // SAFETY: `data` outlives the send.
            let _ = unsafe { send(&*w.f[0], direct, 1, t, data.as_ptr(), data.len(), &wt) }.and_then(|_| w.f[0].wait_send(1, t, &wt));
            w.f[0].cancel_send(1, t);
            let (r, clean) = recv.join().unwrap();
            let e = r.expect_err("an oversized message was accepted");
            assert!(matches!(e, Error::Protocol { peer: 0, .. }), "{kind:?} {len}: {e}");
            assert!(clean, "{kind:?} {len}: bytes landed past the posted buffer");
        }
    }
}

#[test]
fn after_cancel_send_not_a_byte_of_the_buffer_is_read() {
    // A large message is still queued (its receiver stopped reading) when the collective fails
    // for another reason (a dead peer): `cancel_send`, then the caller reuses the buffer. When
    // the receiver reads again, none of the new bytes may reach it.
    for kind in KINDS {
        let w = World::new(kind);
        let direct = w.direct;
        let len = 32 << 20;
        let t = tag(1);
        let mut data = vec![0x11u8; len];
        w.hold(true);
        let wt = Wait::new("conformance", Duration::from_millis(300));
        // SAFETY: `data` stays allocated; after cancel_send it is only ours.
        let _ = unsafe { send(&*w.f[0], direct, 1, t, data.as_ptr(), len, &wt) };
        w.f[0].cancel_send(1, t);
        data.fill(0xEE);
        w.hold(false);
        let mut buf = vec![0u8; len];
        let wt = Wait::new("conformance", Duration::from_millis(1500));
        // SAFETY: `buf` outlives the receive.
        let r = unsafe { post(&*w.f[1], direct, 0, t, buf.as_mut_ptr(), len, &wt) }.and_then(|_| w.f[1].wait_recv(0, t, &wt));
        if r.is_err() {
            w.f[1].cancel_recv(0, t);
        }
        assert!(!buf.contains(&0xEE), "{kind:?}: bytes written into the buffer after cancel_send reached the receiver ({r:?})");
        drop(data);
    }
}

#[test]
fn after_cancel_recv_not_a_byte_lands_in_the_buffer() {
    // The sender streams a large message while the receiver gives up on it: once cancel_recv
    // returns, the buffer never changes again, whatever the sender still does.
    for kind in KINDS {
        let w = World::new(kind);
        let direct = w.direct;
        for (i, delay_us) in [0u64, 50, 300, 2000].into_iter().enumerate() {
            let t = tag(i as u64 + 1);
            let len = 4 << 20;
            let f0 = w.f[0].clone();
            let sender = std::thread::spawn(move || {
                let data = vec![0x5Au8; len];
                let wt = Wait::new("conformance", Duration::from_secs(2));
                // SAFETY: `data` lives until the wait (or the cancel) below returned.
                let r = unsafe { send(&*f0, direct, 1, t, data.as_ptr(), len, &wt) }.and_then(|_| f0.wait_send(1, t, &wt));
                if r.is_err() {
                    f0.cancel_send(1, t);
                }
            });
            let mut buf = vec![0u8; len];
            let wt = Wait::new("conformance", Duration::from_secs(2));
            // SAFETY: `buf` outlives the receive (cancelled below).
            unsafe { post(&*w.f[1], direct, 0, t, buf.as_mut_ptr(), len, &wt) }.unwrap();
            std::thread::sleep(Duration::from_micros(delay_us));
            w.f[1].cancel_recv(0, t);
            let snap = buf.clone();
            sender.join().unwrap();
            // Let the receiver drain whatever still arrives (a later message behind it).
            let _ = transfer(&w, tag(100 + i as u64), 10, true);
            assert!(buf == snap, "{kind:?} delay {delay_us} µs: bytes landed after cancel_recv returned");
        }
    }
}

#[test]
fn a_silent_peer_times_out_and_cancel_returns_promptly() {
    for kind in KINDS {
        let w = World::new(kind);
        let direct = w.direct;
        let t = tag(1);
        let mut buf = vec![0u8; 1 << 20];
        let wt = Wait::new("conformance", Duration::from_millis(300));
        let t0 = Instant::now();
        // SAFETY: `buf` outlives the receive (cancelled below).
        unsafe { post(&*w.f[1], direct, 0, t, buf.as_mut_ptr(), buf.len(), &wt) }.unwrap();
        let e = w.f[1].wait_recv(0, t, &wt).unwrap_err();
        assert!(matches!(e, Error::Timeout { peer: 0, .. }), "{kind:?}: {e}");
        let c0 = Instant::now();
        w.f[1].cancel_recv(0, t);
        assert!(c0.elapsed() < Duration::from_millis(200), "{kind:?}: cancel took {:?}", c0.elapsed());
        assert!(t0.elapsed() < Duration::from_millis(1300), "{kind:?}: {:?}", t0.elapsed());
    }
}
