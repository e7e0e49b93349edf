//! Unit tests of the shared-memory backend: two fabrics of this process over real inbox files
//! (advertised receives, deferred receives, slot exhaustion, cancel races, corrupted fields).
use super::*;
use super::ring::{Rec, EAGER, HDR};
use super::segment::{Adv, ADV_SLOTS, A_CLAIMED, A_POSTED, A_WRITTEN};
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

/// The slot rank 1 advertised to rank 0 for `t`, seen from rank 0's side.
fn adv_slot(f0: &ShmFabric, t: Tag) -> &Adv {
    let ring = f0.txa[1].as_ref().unwrap();
    (0..ADV_SLOTS)
        .map(|k| ring.adv(k))
        .find(|a| a.state.load(Ordering::Acquire) & 3 == A_POSTED && a.seq.load(Ordering::Relaxed) == t.seq)
        .expect("advertised")
}

#[test]
fn advertised_receive_is_written_once_by_the_sender() {
    let (f0, f1) = pair("direct");
    let w = Wait::new("test", Duration::from_secs(5));
    let len = 100_000;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let mut buf = vec![0u8; len + 64];
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
    assert!(f0.try_direct(1, tag(1), data.as_ptr(), len, false).unwrap(), "advertisement not found");
    f0.wait_send(1, tag(1), &w).unwrap();
    assert_eq!(f1.wait_recv(0, tag(1), &w).unwrap(), len);
    assert_eq!(&buf[..len], &data[..]);
    assert!(buf[len..].iter().all(|&b| b == 0));
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
    // Too long for the advertised buffer: not written directly; RTS reports the overflow.
    buf.fill(0);
    unsafe { f1.post_recv(0, tag(2), buf.as_mut_ptr(), 1000 * 16, &w).unwrap() };
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
    unsafe { f0.send(1, tag(1), data.as_ptr(), len, &w).unwrap() }; // no advertisement yet: RTS
    f1.poll().unwrap(); // the RTS arrives before the receive is posted
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), len, &w).unwrap() };
    assert_eq!(f1.adv_lock().deferred.len(), 1);
    f0.wait_send(1, tag(1), &w).unwrap(); // polls: claims and writes
    assert_eq!(f1.wait_recv(0, tag(1), &w).unwrap(), len);
    assert_eq!(buf, data);
    assert!(f1.adv_lock().deferred.is_empty());
    // (b) The receiver waits first: it revokes and fetches, the FIN releases the sender.
    let mut buf = vec![0u8; len];
    unsafe { f0.send(1, tag(2), data.as_ptr(), len, &w).unwrap() };
    f1.poll().unwrap();
    unsafe { f1.post_recv(0, tag(2), buf.as_mut_ptr(), len, &w).unwrap() };
    assert_eq!(f1.wait_recv(0, tag(2), &w).unwrap(), len);
    assert_eq!(buf, data);
    f0.wait_send(1, tag(2), &w).unwrap();
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
    // (c) Cancelled before either copied: nothing lands, the sender is released.
    let mut buf = vec![0u8; len];
    unsafe { f0.send(1, tag(3), data.as_ptr(), len, &w).unwrap() };
    f1.poll().unwrap();
    unsafe { f1.post_recv(0, tag(3), buf.as_mut_ptr(), len, &w).unwrap() };
    f1.cancel_recv(0, tag(3));
    f0.wait_send(1, tag(3), &w).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert!(f1.adv_lock().deferred.is_empty());
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), 0);
    // (d) Cancelled while the sender holds the claim: cancel waits for the write.
    let mut buf = vec![0u8; len];
    unsafe { f0.send(1, tag(4), data.as_ptr(), len, &w).unwrap() };
    f1.poll().unwrap();
    unsafe { f1.post_recv(0, tag(4), buf.as_mut_ptr(), len, &w).unwrap() };
    let a = adv_slot(&f0, tag(4));
    let word = a.state.load(Ordering::Acquire);
    a.state.compare_exchange(word, (word & !3) | A_CLAIMED, Ordering::AcqRel, Ordering::Relaxed).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let canceller = {
        let (f1, done) = (f1.clone(), done.clone());
        std::thread::spawn(move || {
            f1.cancel_recv(0, tag(4));
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "cancel returned while a writer held the buffer");
    a.len.store(len as u64, Ordering::Relaxed);
    a.state.store((word & !3) | A_WRITTEN, Ordering::Release);
    canceller.join().unwrap();
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
        unsafe { f1.post_recv(0, tag(i as u64), b.as_mut_ptr(), len, &w).unwrap() };
    }
    assert_eq!(f1.adv_live.load(Ordering::Relaxed), ADV_SLOTS);
    for (i, d) in datas.iter().enumerate() {
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
    unsafe { f1.post_recv(0, tag(1), buf.as_mut_ptr(), buf.len(), &w).unwrap() };
    // Rank 0 claims the advertisement (as `try_direct` does) and is slow to write.
    let a = adv_slot(&f0, tag(1));
    let word = a.state.load(Ordering::Acquire);
    a.state.compare_exchange(word, (word & !3) | A_CLAIMED, Ordering::AcqRel, Ordering::Relaxed).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let canceller = {
        let (f1, done) = (f1.clone(), done.clone());
        std::thread::spawn(move || {
            f1.cancel_recv(0, tag(1));
            done.store(true, Ordering::SeqCst);
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "cancel returned while a writer held the buffer");
    a.len.store(10, Ordering::Relaxed);
    a.state.store((word & !3) | A_WRITTEN, Ordering::Release);
    canceller.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    // A cancelled (unclaimed) advertisement can no longer be claimed.
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
    unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), 8, &w).unwrap() };
    // Rank 0 writes a record whose length field claims 1 TiB.
    let rec = Rec { kind: EAGER, ctx: 1, len: 1 << 40, ..Rec::zeroed() };
    {
        let mut p = f0.tx[1].as_ref().unwrap().lock().unwrap();
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
