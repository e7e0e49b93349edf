//! Unit tests of the shared-memory backend: two fabrics of this process over real inbox files
//! (advertised receives, deferred receives, slot exhaustion, cancel races, corrupted fields).
use super::*;
use super::ring::{Rec, EAGER, HDR};
use super::segment::{self, Adv, ADV_SLOTS, A_CLAIMED, A_POSTED, A_WRITTEN};
use crate::fabric::{Fabric, Wait};
use bytemuck::Zeroable;
use std::time::Duration;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Two fabrics (ranks 0 and 1) of this process over real inbox files, large messages by CMA.
fn pair(token: &str) -> (Arc<ShmFabric>, Arc<ShmFabric>) {
    let (f0, f1) = pair_with(token, [std::process::id(); 2], Duration::from_secs(5));
    f0.use_cma(true);
    f1.use_cma(true);
    (f0, f1)
}

/// Two fabrics over real inbox files whose ranks claim the process ids `pids` (large messages
/// staged until `use_cma`).
fn pair_with(token: &str, pids: [u32; 2], timeout: Duration) -> (Arc<ShmFabric>, Arc<ShmFabric>) {
    let a = Inbox::create(2, 0, token).unwrap();
    let b = Inbox::create(2, 1, token).unwrap();
    let paths = vec![a.path.display().to_string(), b.path.display().to_string()];
    let f0 = ShmFabric::new(0, a, &paths, pids.to_vec(), timeout).unwrap();
    let f1 = ShmFabric::new(1, b, &paths, pids.to_vec(), timeout).unwrap();
    (Arc::new(f0), Arc::new(f1))
}

fn tag(seq: u64) -> Tag {
    Tag { ctx: 7, seq, round: 0 }
}

/// Rank 0 claims rank 1's advertisement of `t` (as `try_direct` does) and is slow to write:
/// rank 1's `cancel_recv` (on another thread) must wait until the claimed write of `written`
/// bytes is marked done, and returns then.
fn cancel_under_a_claim(f0: &ShmFabric, f1: &Arc<ShmFabric>, t: Tag, written: usize) {
    let a = adv_slot(f0, t);
    let word = a.state.load(Ordering::Acquire);
    a.state.compare_exchange(word, (word & !3) | A_CLAIMED, Ordering::AcqRel, Ordering::Relaxed).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let canceller = {
        let (f1, done) = (f1.clone(), done.clone());
        std::thread::spawn(move || {
            f1.cancel_recv(0, t);
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "cancel returned while a writer held the buffer");
    a.len.store(written as u64, Ordering::Relaxed);
    a.state.store((word & !3) | A_WRITTEN, Ordering::Release);
    canceller.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
}

/// The slot rank 1 advertised to rank 0 for `t`, seen from rank 0's side.
fn adv_slot(f0: &ShmFabric, t: Tag) -> &Adv {
    let ring = f0.txa[1].as_ref().unwrap();
    (0..ADV_SLOTS)
        .map(|k| ring.adv(k))
        .find(|a| a.state.load(Ordering::Acquire) & 3 == A_POSTED && a.seq.load(Ordering::Relaxed) == t.seq)
        .expect("advertised")
}

/// An eager message sent by `send_now` is done when it returns: its bytes are in the ring (the
/// send buffer is overwritten before the receive is posted, and the first bytes arrive), and no
/// completion is left in the table for a `wait_send` nobody makes. A longer one is pending
/// until `wait_send`, as after `send`.
#[test]
fn an_eager_send_is_done_at_once_and_leaves_nothing_to_wait_for() {
    use crate::fabric::Sent;
    let (f0, f1) = pair("send-now");
    let w = Wait::new("test", Duration::from_secs(5));
    for (seq, len) in [(1, 0), (2, 8), (3, 32), (4, 8192)] {
        let mut data = pattern(len, seq as u8);
        let want = data.clone();
        // SAFETY: `data` holds `len` bytes and outlives the call (a Done send reads it no more).
        assert_eq!(unsafe { f0.send_now(1, tag(seq), data.as_ptr(), len, &w) }.unwrap(), Sent::Done, "{len} bytes");
        data.fill(0xee);
        assert!(f0.mb.lock().map.is_empty(), "{len} bytes: a completion was recorded");
        let mut got = vec![0u8; len];
        // SAFETY: room for the posted length; outlives the message (waited below).
        unsafe { f1.post_recv(0, tag(seq), got.as_mut_ptr(), len, &w).unwrap() };
        assert_eq!(f1.wait_recv(0, tag(seq), &w).unwrap(), len);
        assert_eq!(got, want, "{len} bytes");
    }
    let len = 8193;
    let data = pattern(len, 9);
    let mut got = vec![0u8; len];
    // SAFETY: room for the posted length; outlives the message (waited below).
    unsafe { f1.post_recv(0, tag(9), got.as_mut_ptr(), len, &w).unwrap() };
    // SAFETY: `data` outlives the send (waited for below).
    assert_eq!(unsafe { f0.send_now(1, tag(9), data.as_ptr(), len, &w) }.unwrap(), Sent::Pending);
    let r = both(&f0, &f1, move |f| f.wait_send(1, tag(9), &Wait::new("test", Duration::from_secs(5))), move |f| f.wait_recv(0, tag(9), &Wait::new("test", Duration::from_secs(5))));
    r.0.unwrap();
    assert_eq!(r.1.unwrap(), len);
    assert_eq!(got, data);
}

#[test]
fn advertised_receive_is_written_once_by_the_sender() {
    let (f0, f1) = pair("direct");
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 100_000;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; len + 64];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
    assert!(f0.try_direct(1, tag(1), data.as_ptr(), len, false).unwrap(), "advertisement not found");
    f0.wait_send(1, tag(1), &w).unwrap();
    assert_eq!(f1.wait_recv(0, tag(1), &w).unwrap(), len);
    assert_eq!(&buf[..len], &data[..]);
    assert!(buf[len..].iter().all(|&b| b == 0));
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
    // Too long for the advertised buffer: not written directly; RTS reports the overflow.
    buf.fill(0);
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(2), buf.as_mut_ptr(), 1000 * 16, &w).unwrap() };
    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
    unsafe { f0.send(1, tag(2), data.as_ptr(), len, &w).unwrap() };
    let e = f1.wait_recv(0, tag(2), &w).unwrap_err();
    assert!(matches!(e, Error::Protocol { peer: 0, .. }), "{e}");
    f0.wait_send(1, tag(2), &w).unwrap();
    assert!(buf[16_000..].iter().all(|&b| b == 0), "bytes landed past the posted buffer");
}

#[test]
fn receive_posted_after_its_rts_is_written_by_the_idle_sender_or_fetched() {
    let (f0, f1) = pair("deferred");
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 70_000;
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    // (a) The sender, waiting, claims the advertisement and writes.
    let mut buf = vec![0u8; len];
    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
    unsafe { f0.send(1, tag(1), data.as_ptr(), len, &w).unwrap() }; // no advertisement yet: RTS
    f1.poll().unwrap(); // the RTS arrives before the receive is posted
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
    assert_eq!(f1.adv_lock().deferred.len(), 1);
    f0.wait_send(1, tag(1), &w).unwrap(); // polls: claims and writes
    assert_eq!(f1.wait_recv(0, tag(1), &w).unwrap(), len);
    assert_eq!(buf, data);
    assert!(f1.adv_lock().deferred.is_empty());
    // (b) The receiver waits first: it revokes and fetches, the FIN releases the sender.
    let mut buf = vec![0u8; len];
    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
    unsafe { f0.send(1, tag(2), data.as_ptr(), len, &w).unwrap() };
    f1.poll().unwrap();
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(2), buf.as_mut_ptr(), len, &w).unwrap() };
    assert_eq!(f1.wait_recv(0, tag(2), &w).unwrap(), len);
    assert_eq!(buf, data);
    f0.wait_send(1, tag(2), &w).unwrap();
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
    // (c) Cancelled before either copied: nothing lands, the sender is released.
    let mut buf = vec![0u8; len];
    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
    unsafe { f0.send(1, tag(3), data.as_ptr(), len, &w).unwrap() };
    f1.poll().unwrap();
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(3), buf.as_mut_ptr(), len, &w).unwrap() };
    f1.cancel_recv(0, tag(3));
    f0.wait_send(1, tag(3), &w).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert!(f1.adv_lock().deferred.is_empty());
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
    // (d) Cancelled while the sender holds the claim: cancel waits for the write.
    let mut buf = vec![0u8; len];
    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
    unsafe { f0.send(1, tag(4), data.as_ptr(), len, &w).unwrap() };
    f1.poll().unwrap();
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(4), buf.as_mut_ptr(), len, &w).unwrap() };
    cancel_under_a_claim(&f0, &f1, tag(4), len);
    assert!(f1.adv_lock().deferred.is_empty());
}

#[test]
fn more_receives_than_slots_fall_back_to_rts() {
    let (f0, f1) = pair("slots");
    let w = Wait::new("test", Duration::from_secs(5));
    let (n, len) = (ADV_SLOTS + 5, 20_000);
    let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; len]).collect();
    let datas: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8 + 1; len]).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
        unsafe { f1.post_recv(0, tag(i as u64), b.as_mut_ptr(), len, &w).unwrap() };
    }
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), ADV_SLOTS);
    for (i, d) in datas.iter().enumerate() {
        // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
        unsafe { f0.send(1, tag(i as u64), d.as_ptr(), len, &w).unwrap() };
    }
    for i in 0..n {
        assert_eq!(f1.wait_recv(0, tag(i as u64), &w).unwrap(), len);
    }
    for i in 0..n {
        f0.wait_send(1, tag(i as u64), &w).unwrap();
    }
    for (b, d) in bufs.iter().zip(&datas) {
        assert_eq!(b, d);
    }
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
}

#[test]
fn cancel_waits_for_a_claimed_advertisement_and_revokes_the_rest() {
    let (f0, f1) = pair("claim");
    let w = Wait::new("test", Duration::from_secs(5));
    let mut buf = vec![0u8; 50_000];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
    // Rank 0 claims the advertisement (as `try_direct` does) and is slow to write.
    cancel_under_a_claim(&f0, &f1, tag(1), 10);
    // A cancelled (unclaimed) advertisement can no longer be claimed.
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(2), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
    f1.cancel_recv(0, tag(2));
    let data = vec![9u8; 40_000];
    assert!(!f0.try_direct(1, tag(2), data.as_ptr(), data.len(), false).unwrap());
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
}

#[test]
fn no_write_lands_after_cancel_returns() {
    // A writer races the canceller many times: after cancel_recv returns, the buffer holds
    // either the whole message or nothing, and never changes again.
    let (f0, f1) = pair("race");
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 64 << 10;
    let data = Arc::new(vec![0xabu8; len]);
    let (mut wrote, mut revoked) = (0, 0);
    for i in 0..400u64 {
        let mut buf = vec![0u8; len];
        // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
        unsafe { f1.post_recv(0, tag(i), buf.as_mut_ptr(), len, &w).unwrap() };
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (f0, data, stop) = (f0.clone(), data.clone(), stop.clone());
            std::thread::spawn(move || loop {
                if f0.try_direct(1, tag(i), data.as_ptr(), len, false).unwrap() {
                    return true;
                }
                if stop.load(Ordering::SeqCst) {
                    return false;
                }
                std::hint::spin_loop();
            })
        };
        for _ in 0..(i % 7) * 300 {
            std::hint::spin_loop();
        }
        f1.cancel_recv(0, tag(i));
        let snap = buf.clone();
        stop.store(true, Ordering::SeqCst);
        let did = writer.join().unwrap();
        assert_eq!(buf, snap, "a write landed after cancel_recv returned");
        if did {
            wrote += 1;
            assert!(buf.iter().all(|&b| b == 0xab));
        } else {
            revoked += 1;
            assert!(buf.iter().all(|&b| b == 0));
        }
    }
    assert_eq!(wrote + revoked, 400);
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
}

#[test]
fn corrupted_advertisement_is_rejected() {
    let (f0, f1) = pair("corrupt-adv");
    let w = Wait::new("test", Duration::from_secs(1));
    let mut buf = vec![0u8; 20_000];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
    // The writer claims 1 TiB written.
    let a = adv_slot(&f0, tag(1));
    let word = a.state.load(Ordering::Acquire);
    a.len.store(1 << 40, Ordering::Relaxed);
    a.state.store((word & !3) | A_WRITTEN, Ordering::Release);
    let e = f1.wait_recv(0, tag(1), &w).unwrap_err();
    assert!(matches!(e, Error::Protocol { peer: 0, .. }), "{e}");
    f1.cancel_recv(0, tag(1));
    // A state word of another generation.
    let (f0, f1) = pair("corrupt-adv2");
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
    adv_slot(&f0, tag(1)).state.store(99 << 2 | A_WRITTEN, Ordering::Release);
    let e = f1.wait_recv(0, tag(1), &w).unwrap_err();
    assert!(matches!(e, Error::Protocol { peer: 0, .. }), "{e}");
    f1.cancel_recv(0, tag(1));
}

#[test]
fn corrupted_length_field_is_rejected() {
    let (f0, f1) = pair("t");
    let tag = Tag { ctx: 1, seq: 0, round: 0 };
    let w = Wait::new("test", Duration::from_secs(1));
    let mut buf = [0u8; 8];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), 8, &w).unwrap() };
    // Rank 0 writes a record whose length field claims 1 TiB.
    let rec = Rec { kind: EAGER, ctx: 1, len: 1 << 40, ..Rec::zeroed() };
    {
        let mut p = f0.tx[1].as_ref().unwrap().lock().unwrap();
        // SAFETY: the ring's data area holds at least one record header of HDR bytes, and `rec` is HDR bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytemuck::bytes_of(&rec).as_ptr(), p.ring.data(), HDR) };
        p.head += HDR as u64;
        p.ring.ctl().head.store(p.head, Ordering::Release);
    }
    let e = f1.wait_recv(0, tag, &w).unwrap_err();
    assert_eq!(e.peer(), Some(0));
    assert!(e.to_string().contains("eager record claims"), "{e}");
    assert_eq!(buf, [0u8; 8]);
    // A head pointer beyond the ring is rejected too.
    f0.tx[1].as_ref().unwrap().lock().unwrap().ring.ctl().head.store(u64::MAX, Ordering::Release);
    assert!(f1.drain_ring(0, &mut 0).is_err());
}

/// A consumer that writes a tail inconsistent with the head (beyond it, or more than a ring
/// behind) is a protocol error naming it, found when the producer next needs the space its last
/// checked tail does not give; until then records go where that tail allows, inside the ring.
#[test]
fn a_corrupted_tail_is_rejected_before_the_producer_overwrites_anything() {
    for bogus in [u64::MAX, 1 << 40] {
        let (f0, _f1) = pair("tail");
        // Rank 1 never drains; it writes a bogus tail into the ring rank 0 produces into.
        f0.tx[1].as_ref().unwrap().lock().unwrap().ring.ctl().tail.store(bogus, Ordering::Release);
        let payload = vec![7u8; 4096];
        let rec = Rec { kind: EAGER, ctx: 9, len: payload.len() as u64, ..Rec::zeroed() };
        let mut pushed = 0usize;
        let e = loop {
            match f0.try_push(1, &rec, &payload) {
                Ok(true) => pushed += 1,
                Ok(false) => panic!("a full ring after {pushed} records: the bogus tail was not read"),
                Err(e) => break e,
            }
            assert!(pushed <= segment::RING_CAP / 4096, "{pushed} records of 4 KiB pushed into a ring of {} bytes", segment::RING_CAP);
        };
        assert_eq!(e.peer(), Some(1), "{e}");
        assert!(e.to_string().contains("inconsistent with tail"), "{e}");
        // Every record before the error fitted the ring behind the last checked tail (0).
        let head = f0.tx[1].as_ref().unwrap().lock().unwrap().head;
        assert!(head <= segment::RING_CAP as u64, "head {head} past the ring's first lap");
    }
}

/// Run `f0_side` (rank 0) and `f1_side` (rank 1) on two threads; their results.
fn both<A: Send + 'static, B: Send + 'static>(
    f0: &Arc<ShmFabric>,
    f1: &Arc<ShmFabric>,
    f0_side: impl FnOnce(&ShmFabric) -> A + Send + 'static,
    f1_side: impl FnOnce(&ShmFabric) -> B + Send + 'static,
) -> (A, B) {
    let (g0, g1) = (f0.clone(), f1.clone());
    let h0 = std::thread::spawn(move || f0_side(&g0));
    let h1 = std::thread::spawn(move || f1_side(&g1));
    (h0.join().unwrap(), h1.join().unwrap())
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ salt).collect()
}

#[test]
fn staged_messages_arrive_whole_posted_before_or_after_the_send() {
    let (f0, f1) = pair_with("staged", [std::process::id(); 2], Duration::from_secs(5));
    assert!(f0.is_staged() && f1.is_staged());
    let mut seq = 0;
    for len in [8193, 100_000, super::CHUNK_BYTES, super::CHUNK_BYTES + 1, (1 << 20) + 13, 3 << 20] {
        for late_post in [false, true] {
            seq += 1;
            let t = tag(seq);
            let data = Arc::new(pattern(len, seq as u8));
            let d = data.clone();
            let (sent, got) = both(
                &f0,
                &f1,
                move |f| {
                    let w = Wait::new("test", Duration::from_secs(5));
                    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
                    unsafe { f.send(1, t, d.as_ptr(), len, &w) }.and_then(|_| f.wait_send(1, t, &w))
                },
                move |f| {
                    let w = Wait::new("test", Duration::from_secs(5));
                    if late_post {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    let mut buf = vec![0u8; len + 64];
                    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
                    unsafe { f.post_recv(0, t, buf.as_mut_ptr(), len, &w) }.unwrap();
                    f.wait_recv(0, t, &w).map(|n| (n, buf))
                },
            );
            sent.unwrap();
            let (n, buf) = got.unwrap();
            assert_eq!(n, len);
            assert!(buf[..len] == data[..], "len {len} late {late_post}: wrong bytes");
            assert!(buf[len..].iter().all(|&b| b == 0), "bytes past the message");
        }
    }
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
}

#[test]
fn staged_receives_beyond_the_slots_wait_for_one() {
    let (f0, f1) = pair_with("staged-slots", [std::process::id(); 2], Duration::from_secs(5));
    let (n, len) = (ADV_SLOTS + 5, 20_000);
    let (sent, got) = both(
        &f0,
        &f1,
        move |f| {
            let w = Wait::new("test", Duration::from_secs(5));
            let datas: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8 + 1; len]).collect();
            for (i, d) in datas.iter().enumerate() {
                // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
                unsafe { f.send(1, tag(i as u64), d.as_ptr(), len, &w) }.unwrap();
            }
            (0..n).try_for_each(|i| f.wait_send(1, tag(i as u64), &w))
        },
        move |f| {
            let w = Wait::new("test", Duration::from_secs(5));
            let mut bufs: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; len]).collect();
            for (i, b) in bufs.iter_mut().enumerate() {
                // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
                unsafe { f.post_recv(0, tag(i as u64), b.as_mut_ptr(), len, &w) }.unwrap();
            }
            for i in (0..n).rev() {
                assert_eq!(f.wait_recv(0, tag(i as u64), &w).unwrap(), len);
            }
            bufs
        },
    );
    sent.unwrap();
    for (i, b) in got.iter().enumerate() {
        assert!(b.iter().all(|&x| x == i as u8 + 1));
    }
}

#[test]
fn staged_overflow_fails_the_receive_naming_the_sender() {
    let (f0, f1) = pair_with("staged-over", [std::process::id(); 2], Duration::from_secs(5));
    let (sent, got) = both(
        &f0,
        &f1,
        |f| {
            let w = Wait::new("test", Duration::from_secs(5));
            let d = vec![7u8; 300_000];
            // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
            unsafe { f.send(1, tag(1), d.as_ptr(), d.len(), &w) }.and_then(|_| f.wait_send(1, tag(1), &w))?;
            // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
            unsafe { f.send(1, tag(2), [1u8, 2, 3, 4].as_ptr(), 4, &w) }
        },
        |f| {
            let w = Wait::new("test", Duration::from_secs(5));
            let mut buf = vec![0u8; 200_064];
            // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
            let r = unsafe { f.post_recv(0, tag(1), buf.as_mut_ptr(), 200_000, &w) }.and_then(|_| f.wait_recv(0, tag(1), &w));
            // The rest of the stream is consumed (and dropped) while waiting for the next message.
            let mut small = [0u8; 4];
            // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
            unsafe { f.post_recv(0, tag(2), small.as_mut_ptr(), 4, &w) }.unwrap();
            (r, buf, f.wait_recv(0, tag(2), &w), small)
        },
    );
    sent.unwrap();
    let (r, buf, r2, small) = got;
    let e = r.unwrap_err();
    assert!(matches!(e, Error::Protocol { peer: 0, .. }), "{e}");
    assert!(buf.iter().all(|&b| b == 0), "bytes of a message too long landed");
    assert_eq!(r2.unwrap(), 4);
    assert_eq!(small, [1, 2, 3, 4]);
}

#[test]
fn staged_cancel_recv_mid_stream_returns_at_once_and_drops_the_rest() {
    let (f0, f1) = pair_with("staged-cancel", [std::process::id(); 2], Duration::from_secs(5));
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 3 << 20;
    let data = pattern(len, 3);
    let mut buf = vec![0u8; len];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
    unsafe { f0.send(1, tag(1), data.as_ptr(), len, &w).unwrap() }; // the first MiB or so
    f1.poll().unwrap(); // some of it lands
    let t0 = std::time::Instant::now();
    f1.cancel_recv(0, tag(1)); // rank 0 is not polling: nothing to wait for
    assert!(t0.elapsed() < Duration::from_millis(100), "{:?}", t0.elapsed());
    let snap = buf.clone();
    assert!(snap.iter().any(|&b| b != 0), "nothing had landed before the cancel");
    // Rank 0 streams the rest; rank 1 drains it (dropping it) while it waits for another message.
    let (sent, got) = both(
        &f0,
        &f1,
        move |f| {
            let w = Wait::new("test", Duration::from_secs(5));
            f.wait_send(1, tag(1), &w)?;
            // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
            unsafe { f.send(1, tag(2), [5u8; 16].as_ptr(), 16, &w) }
        },
        |f| {
            let w = Wait::new("test", Duration::from_secs(5));
            let mut small = [0u8; 16];
            // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
            unsafe { f.post_recv(0, tag(2), small.as_mut_ptr(), 16, &w) }.unwrap();
            f.wait_recv(0, tag(2), &w).map(|_| small)
        },
    );
    sent.unwrap();
    assert_eq!(got.unwrap(), [5u8; 16]);
    assert!(buf == snap, "bytes landed in the withdrawn buffer");
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
}

#[test]
fn staged_cancel_send_mid_stream_fails_the_receive() {
    let (f0, f1) = pair_with("staged-abort", [std::process::id(); 2], Duration::from_secs(5));
    let w = Wait::new("test", Duration::from_secs(2));
    let len = 3 << 20;
    let mut data = vec![0x11u8; len];
    let mut buf = vec![0u8; len];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
    unsafe { f0.send(1, tag(1), data.as_ptr(), len, &w).unwrap() };
    f0.cancel_send(1, tag(1));
    data.fill(0xEE); // the caller reuses its buffer
    let e = f1.wait_recv(0, tag(1), &w).unwrap_err();
    assert!(matches!(&e, Error::PeerFailed { peer: 0, reason, .. } if reason.contains("withdrew")), "{e}");
    assert!(!buf.contains(&0xEE), "bytes of a withdrawn send were delivered");
}

#[test]
fn a_withdrawn_offer_is_never_delivered() {
    // CMA: rank 0 announces (RTS) a message rank 1 has not posted, then withdraws it and
    // reuses the buffer. Rank 1 posts late: it must fail the receive, not copy the new bytes.
    let (f0, f1) = pair("offer");
    let w = Wait::new("test", Duration::from_secs(2));
    let len = 100_000;
    let mut data = vec![0x22u8; len];
    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
    unsafe { f0.send(1, tag(1), data.as_ptr(), len, &w).unwrap() };
    f0.cancel_send(1, tag(1));
    data.fill(0xEE);
    let mut buf = vec![0u8; len];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
    let e = f1.wait_recv(0, tag(1), &w).unwrap_err();
    assert!(matches!(&e, Error::PeerFailed { peer: 0, reason, .. } if reason.contains("withdrew")), "{e}");
    assert!(!buf.contains(&0xEE), "a withdrawn send was delivered from reused memory");
    f1.cancel_recv(0, tag(1));
    // The offer slot is free again: the next message goes through.
    let data2 = pattern(len, 9);
    let mut buf2 = vec![0u8; len];
    let w = Wait::new("test", Duration::from_secs(5));
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(2), buf2.as_mut_ptr(), len, &w).unwrap() };
    // SAFETY: holds the length sent, and outlives the message (waited for below, or the test ends).
    unsafe { f0.send(1, tag(2), data2.as_ptr(), len, &w).unwrap() };
    f0.wait_send(1, tag(2), &w).unwrap();
    assert_eq!(f1.wait_recv(0, tag(2), &w).unwrap(), len);
    assert_eq!(buf2, data2);
}

#[test]
fn a_stalled_cma_writer_is_fenced_after_the_timeout() {
    // Rank 0 is another process that claimed rank 1's advertisement and stopped (SIGSTOP, a
    // debugger): it could write whenever it resumes. Rank 1's cancel waits the timeout, then
    // kills it, and the fabric is failed for good; before, the cancel waited as long as rank 0
    // lived.
    let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    let (f0, f1) = pair_with("fence", [child.id(), std::process::id()], Duration::from_millis(300));
    f0.use_cma(true);
    f1.use_cma(true);
    let w = Wait::new("test", Duration::from_secs(1));
    let mut buf = vec![0u8; 50_000];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
    let a = adv_slot(&f0, tag(1));
    let word = a.state.load(Ordering::Acquire);
    a.state.compare_exchange(word, (word & !3) | A_CLAIMED, Ordering::AcqRel, Ordering::Relaxed).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let g1 = f1.clone();
    let t0 = std::time::Instant::now();
    std::thread::spawn(move || {
        g1.cancel_recv(0, tag(1));
        let _ = tx.send(());
    });
    let returned = rx.recv_timeout(Duration::from_secs(5));
    let status = child.try_wait().unwrap();
    if returned.is_err() {
        let _ = child.kill();
        panic!("cancel_recv waited for a stopped writer");
    }
    assert!(t0.elapsed() >= Duration::from_millis(300), "fenced before the timeout");
    use std::os::unix::process::ExitStatusExt;
    let status = status.or_else(|| child.wait().ok()).expect("the writer is gone");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    // Failed for good: every later operation says why.
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    let e = unsafe { f1.post_recv(0, tag(2), buf.as_mut_ptr(), 8, &w) }.unwrap_err();
    assert!(e.to_string().contains("killed"), "{e}");
}

#[test]
fn the_inbox_is_private_and_a_peer_inbox_of_another_mode_or_owner_is_refused() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let a = Inbox::create(2, 0, "perm").unwrap();
    let m = std::fs::metadata(&a.path).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o600, "inbox created with mode {:o}", m.mode() & 0o7777);
    // Our own file under other modes, and as another user's file (root can make one).
    std::fs::set_permissions(&a.path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = segment::open_peer(&a.path, 0, 2).expect_err("refused");
    assert!(e.to_string().contains("refused") && e.to_string().contains(&a.path.display().to_string()), "{e}");
    std::fs::set_permissions(&a.path, std::fs::Permissions::from_mode(0o660)).unwrap();
    assert!(segment::open_peer(&a.path, 0, 2).is_err());
    std::fs::set_permissions(&a.path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(segment::open_peer(&a.path, 0, 2).is_ok());
    // A header for another rank or job size.
    assert!(segment::open_peer(&a.path, 1, 2).is_err());
    // A link to it is not followed.
    let link = std::path::PathBuf::from(format!("{}-link", a.path.display()));
    std::os::unix::fs::symlink(&a.path, &link).unwrap();
    assert!(segment::open_peer(&link, 0, 2).is_err());
    let _ = std::fs::remove_file(&link);
    if std::os::unix::fs::chown(&a.path, Some(65534), None).is_ok() {
        let e = segment::open_peer(&a.path, 0, 2).expect_err("refused");
        assert!(e.to_string().contains("owner uid 65534"), "{e}");
    }
    a.unlink();
}

#[test]
fn the_probe_reports_a_process_it_may_not_attach_to() {
    // A process this one may attach to (itself) passes; one it may not (ptrace rules) fails with
    // EPERM named in the message. The forbidden case is made with a child process: as root, a
    // child running as `nobody` probes us; otherwise we probe a child that made itself
    // non-dumpable.
    let probe_word = Box::new(0x5eed_u64);
    let addr = &*probe_word as *const u64 as u64;
    cma::probe(std::process::id(), addr, 0x5eed).unwrap();
    assert!(cma::probe(std::process::id(), addr, 0x0bad).is_err());
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let parent = std::process::id();
    // SAFETY: the child only makes raw syscalls (setuid, prctl, process_vm_readv, pause, _exit).
    let child = unsafe { libc::fork() };
    assert!(child >= 0);
    if child == 0 {
        // SAFETY: raw syscalls on this process and on locals, in the forked child (see the fork).
        unsafe {
            let code = if root {
                if libc::setuid(65534) != 0 {
                    3
                } else {
                    let mut got = 0u64;
                    let l = libc::iovec { iov_base: &mut got as *mut u64 as *mut libc::c_void, iov_len: 8 };
                    let r = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: 8 };
                    match libc::process_vm_readv(parent as libc::pid_t, &l, 1, &r, 1, 0) {
                        8 => 0,
                        _ if *libc::__errno_location() == libc::EPERM => 1,
                        _ => 2,
                    }
                }
            } else {
                libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
                libc::sleep(5);
                0
            };
            libc::_exit(code);
        }
    }
    if root {
        let mut st = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(child, &mut st, 0) };
        assert_eq!(libc::WEXITSTATUS(st), 1, "an unprivileged process could read a root process's memory");
    } else {
        std::thread::sleep(Duration::from_millis(200));
        let e = cma::probe(child as u32, addr, 0x5eed).unwrap_err();
        assert!(e.to_string().contains("ptrace"), "{e}");
        // SAFETY: our own child.
        unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
    }
    drop(probe_word);
}

#[test]
fn ring_records_are_checked_before_use() {
    use super::wire::*;
    let rec = |kind, len| Rec { kind, len, ..Rec::zeroed() };
    assert_eq!(check_ring(10, 3), Ok(7));
    assert!(check_ring(3, 10).is_err() && check_ring(RING_CAP as u64 + 1, 0).is_err());
    assert_eq!(check_record(&rec(EAGER, 100), 0, 4096, 8192), Ok(Checked { kind: EAGER, payload: 100, at: HDR, used: 192 }));
    // Up to 32 bytes travel in the header's line; one more takes a payload line.
    assert_eq!(check_record(&rec(EAGER, 32), 0, 64, 8192), Ok(Checked { kind: EAGER, payload: 32, at: INLINE_AT, used: 64 }));
    assert_eq!(check_record(&rec(EAGER, 33), 0, 128, 8192), Ok(Checked { kind: EAGER, payload: 33, at: HDR, used: 128 }));
    assert!(check_record(&rec(EAGER, 33), 0, 64, 8192).is_err(), "a 33-byte payload is not inline");
    assert_eq!(check_record(&rec(CHUNK, 8), 0, 128, 8192).map(|c| (c.at, c.used)), Ok((HDR, 128)), "only EAGER is inline");
    assert!(check_record(&rec(EAGER, 8193), 0, 1 << 20, 8192).is_err(), "eager over its maximum");
    assert!(check_record(&rec(EAGER, 100), 0, 128, 8192).is_err(), "payload past the published bytes");
    assert!(check_record(&rec(CHUNK, 128), RING_CAP - 128, 4096, 8192).is_err(), "payload past the ring's end");
    assert!(check_record(&rec(CHUNK, u64::MAX), 0, 4096, 8192).is_err());
    assert_eq!(check_record(&rec(PAD, 128), RING_CAP - 128, 4096, 0), Ok(Checked { kind: PAD, payload: 0, at: HDR, used: 128 }));
    assert!(check_record(&rec(PAD, 64), RING_CAP - 128, 4096, 0).is_err(), "a pad must run to the ring's end");
    assert_eq!(check_record(&rec(RTS, u64::MAX), 64, 64, 0).map(|c| c.used), Ok(HDR));
    assert!(check_record(&rec(7, 0), 0, 64, 0).is_err());
    assert!(check_record(&rec(FIN, 0), 32, 64, 0).is_err() && check_record(&rec(FIN, 0), 0, 63, 0).is_err(), "misaligned, short");
}

#[test]
fn slots_and_chunks_written_by_a_peer_are_checked() {
    use super::wire::*;
    let tag = crate::fabric::Tag { ctx: 1, seq: 2, round: 3 };
    assert_eq!(offer_slot(slot_id(5, 9)), Ok((5, 9)));
    assert!(offer_slot(slot_id(OFFER_SLOTS, 9)).is_err());
    assert_eq!(settled(7 << 2 | A_POSTED, 7, 0), None);
    assert_eq!(settled(7 << 2 | A_WRITTEN, 7, 0), Some(Ok(())));
    assert!(matches!(settled(6 << 2 | A_WRITTEN, 7, 0), Some(Err(_))), "another generation");
    assert_eq!(written(10 | A_LEN_AFTER_RTS, 10), Written::Landed { len: 10, after_rts: true });
    assert_eq!(written(A_LEN_FAILED, 10), Written::Failed);
    assert!(matches!(written(11, 10), Written::Bad { .. }));
    let a = AdvRead { state: 3 << 2 | A_POSTED, ctx: 1, seq: 2, round: 3, cap: 100 };
    assert_eq!(usable(&a, tag, 100, false), Some(true));
    assert_eq!(usable(&a, tag, 101, false), Some(false));
    assert_eq!(usable(&a, tag, 101, true), Some(true), "claimed; the receiver reports the overflow");
    assert_eq!(usable(&AdvRead { state: A_CLAIMED, ..a }, tag, 1, false), None);
    assert_eq!(usable(&AdvRead { round: 4, ..a }, tag, 1, false), None);
    assert!(check_chunk(0, 10, 30, 0, 0).is_ok() && check_chunk(10, 20, 30, 10, 30).is_ok());
    assert!(check_chunk(10, 21, 30, 10, 30).is_err(), "past the message");
    assert!(check_chunk(20, 10, 30, 10, 30).is_err(), "a gap");
    assert!(check_chunk(10, 10, 40, 10, 30).is_err(), "the length changed");
    assert!(check_chunk(0, 0, 30, 0, 0).is_err(), "empty");
    assert!(check_chunk(u64::MAX, 1, u64::MAX, usize::MAX, u64::MAX).is_err());
}

#[test]
fn the_shm_variables_are_checked() {
    let opts = |pairs: &'static [(&'static str, &'static str)]| Options::from_vars(move |k| pairs.iter().find(|(a, _)| *a == k).map(|(_, v)| v.into()));
    assert_eq!(opts(&[]).unwrap(), Options { eager_max: 8 << 10, direct: true, staged: false });
    let set = opts(&[("EMBER_SHM_EAGER", "262144"), ("EMBER_SHM_DIRECT", "0"), ("EMBER_SHM_COPY", "staged")]).unwrap();
    assert_eq!(set, Options { eager_max: MAX_EAGER, direct: false, staged: true });
    assert_eq!(MAX_EAGER, 256 << 10);
    let set = opts(&[("EMBER_SHM_EAGER", "0"), ("EMBER_SHM_DIRECT", "1"), ("EMBER_SHM_COPY", "AUTO")]).unwrap();
    assert_eq!(set, Options { eager_max: 0, direct: true, staged: false });
    let bad: [(&'static str, &'static str, &str); 12] = [
        ("EMBER_SHM_EAGER", "262145", "bytes from 0 to 262144"),
        ("EMBER_SHM_EAGER", "1048576", "bytes from 0 to 262144"),
        ("EMBER_SHM_EAGER", "4k", "bytes from 0 to 262144"),
        ("EMBER_SHM_EAGER", "-1", "bytes from 0 to 262144"),
        ("EMBER_SHM_EAGER", "", "bytes from 0 to 262144"),
        ("EMBER_SHM_DIRECT", "off", "`0` or `1`"),
        ("EMBER_SHM_DIRECT", "2", "`0` or `1`"),
        ("EMBER_SHM_DIRECT", "", "`0` or `1`"),
        ("EMBER_SHM_COPY", "stagde", "`auto` or `staged`"),
        ("EMBER_SHM_COPY", "cma", "`auto` or `staged`"),
        ("EMBER_SHM_COPY", "1", "`auto` or `staged`"),
        ("EMBER_SHM_COPY", "", "`auto` or `staged`"),
    ];
    for (var, v, accepted) in bad {
        let pairs: &'static [(&str, &str)] = Box::leak(Box::new([(var, v)]));
        let e = opts(pairs).unwrap_err().to_string();
        assert!(e.contains(&format!("{var}={v:?}")) && e.contains(accepted), "{var}={v:?}: {e}");
    }
}
