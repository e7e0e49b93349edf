use super::wire::{check_mesh_hello, decode_frame, encode_frame, hello, parse_hello, Frame, FrameSink, MAGIC};
use super::*;
use std::io::Write;
use std::os::fd::AsRawFd;

/// Rank 1 as a real fabric, rank 0 a raw socket that completed the mesh handshake.
fn fake_rank0(token: &'static str, timeout: Duration) -> (TcpStream, TcpFabric) {
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![fake.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
    let h = std::thread::spawn(move || TcpFabric::new(1, l1, &addrs, token, timeout).unwrap());
    let (s, _) = fake.accept().unwrap();
    let mut c = Conn::new(s, Instant::now() + Duration::from_secs(5)).unwrap();
    let h1 = crate::auth::server(&mut c, token, MESH_PURPOSE, |_| Ok(())).unwrap();
    assert_eq!(parse_hello(&h1), Some((1, 0, 2)));
    (c.s, h.join().unwrap())
}

#[test]
fn frame_headers_round_trip_and_are_admitted_within_their_limits() {
    let tag = Tag { ctx: 3, seq: 4, round: 5 };
    assert_eq!(decode_frame(&encode_frame(tag, 77)), Ok((tag, 77)));
    let mut bad = encode_frame(tag, 1);
    bad[0] ^= 1;
    assert!(decode_frame(&bad).unwrap_err().contains("magic"));
    let mut s = FrameSink::default();
    s.post(0, tag, 8).unwrap();
    // Longer than the posted buffer: refused, naming the peer.
    let e = s.frame(0, &encode_frame(tag, 9)).unwrap_err();
    assert!(matches!(&e, Error::Protocol { peer: 0, detail, .. } if detail.contains("exceeds")), "{e}");
    let t2 = Tag { seq: 5, ..tag };
    s.post(0, t2, 8).unwrap();
    assert_eq!(s.frame(0, &encode_frame(t2, 8)).unwrap(), (t2, 8, true));
    // Not posted: kept within the limit on early bytes, refused past it.
    let t3 = Tag { seq: 6, ..tag };
    assert_eq!(s.frame(0, &encode_frame(t3, 100)).unwrap(), (t3, 100, false));
    assert_eq!(s.early_bytes(), 100);
    let e = s.frame(1, &encode_frame(Tag { seq: 7, ..tag }, crate::alloc_limit().unwrap())).unwrap_err();
    assert!(matches!(&e, Error::Protocol { peer: 1, detail, .. } if detail.contains("limit")), "{e}");
    assert_eq!(s.early_bytes(), 100);
    // A second frame for the same message is a protocol error.
    assert!(s.frame(0, &encode_frame(t3, 1)).is_err());
}

#[test]
fn the_mesh_hello_must_come_from_a_higher_rank_of_this_job() {
    assert_eq!(check_mesh_hello(&hello(3, 1, 4), 1, 4), Ok(3));
    assert!(check_mesh_hello(&hello(0, 1, 4), 1, 4).is_err(), "a lower rank never dials");
    assert!(check_mesh_hello(&hello(3, 2, 4), 1, 4).is_err(), "dialled another rank");
    assert!(check_mesh_hello(&hello(3, 1, 5), 1, 4).is_err(), "another job size");
    assert!(check_mesh_hello(&hello(4, 1, 4), 1, 4).is_err(), "rank past the job");
    assert!(check_mesh_hello(&hello(3, 1, 4)[..11], 1, 4).is_err());
}

#[test]
fn corrupted_length_field_is_rejected() {
    // A fake rank 0 completes the handshake, then sends a frame claiming 1 TiB.
    let (mut s, f1) = fake_rank0("tok", Duration::from_secs(2));
    let tag = Tag { ctx: 1, seq: 0, round: 0 };
    let w = Wait::new("test", Duration::from_secs(1));
    let mut buf = [0u8; 8];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), 8, &w).unwrap() };
    let f = Frame { magic: MAGIC, round: 0, ctx: 1, seq: 0, len: 1 << 40 };
    s.write_all(bytemuck::bytes_of(&f)).unwrap();
    s.write_all(&[0xAB; 64]).unwrap();
    let e = f1.wait_recv(0, tag, &w).unwrap_err();
    assert_eq!(e.peer(), Some(0));
    assert!(e.to_string().contains("exceeds"), "{e}");
    assert_eq!(buf, [0u8; 8]);
}

#[test]
fn an_unposted_message_beyond_the_allocation_limit_fails_the_peer() {
    // Nothing posted: a frame of more than the limit is refused before any allocation.
    let (mut s, f1) = fake_rank0("tok", Duration::from_secs(2));
    let f = Frame { magic: MAGIC, round: 0, ctx: 1, seq: 0, len: crate::alloc_limit().unwrap() as u64 + 1 };
    s.write_all(bytemuck::bytes_of(&f)).unwrap();
    let w = Wait::new("test", Duration::from_secs(2));
    let e = f1.wait_recv(0, Tag { ctx: 1, seq: 9, round: 0 }, &w).unwrap_err();
    assert!(matches!(&e, Error::Protocol { peer: 0, detail, .. } if detail.contains("limit")), "{e}");
}

#[test]
fn wrong_token_on_the_mesh_is_refused_and_the_mesh_still_forms() {
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
    let a0 = addrs[0].clone();
    let addrs0 = addrs.clone();
    let h0 = std::thread::spawn(move || TcpFabric::new(0, l0, &addrs0, "tok", Duration::from_secs(5)).unwrap());
    // An intruder with the wrong token dials rank 0 first, claiming rank 1.
    let mut c = Conn::new(TcpStream::connect(&a0).unwrap(), Instant::now() + Duration::from_secs(5)).unwrap();
    let e = crate::auth::client(&mut c, "wrong", MESH_PURPOSE, &hello(1, 0, 2)).unwrap_err();
    assert!(e.to_string().contains("does not know the job token"), "{e}");
    let f1 = TcpFabric::new(1, l1, &addrs, "tok", Duration::from_secs(5)).unwrap();
    let f0 = h0.join().unwrap();
    let w = Wait::new("test", Duration::from_secs(2));
    let tag = Tag { ctx: 1, seq: 0, round: 0 };
    let mut got = [0u8; 4];
    // SAFETY: `got` (4 bytes) and the 4-byte literal outlive both messages, waited for below.
    unsafe {
        f1.post_recv(0, tag, got.as_mut_ptr(), 4, &w).unwrap();
        f0.send(1, tag, [1u8, 2, 3, 4].as_ptr(), 4, &w).unwrap();
    }
    f0.wait_send(1, tag, &w).unwrap();
    assert_eq!(f1.wait_recv(0, tag, &w).unwrap(), 4);
    assert_eq!(got, [1, 2, 3, 4]);
}

#[test]
fn a_slow_client_does_not_hold_up_the_mesh() {
    let l0 = TcpListener::bind("127.0.0.1:0").unwrap();
    let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
    let addrs = vec![l0.local_addr().unwrap().to_string(), l1.local_addr().unwrap().to_string()];
    let (a0, addrs0) = (addrs[0].clone(), addrs.clone());
    let h0 = std::thread::spawn(move || TcpFabric::new(0, l0, &addrs0, "tok", Duration::from_secs(8)).map(|_| ()));
    let slow = std::thread::spawn(move || {
        // A plausible start of a hello (magic, a short length, nonce bytes), a byte every
        // 250 ms: 4 s in all, each byte well within any per-read limit.
        let mut s = TcpStream::connect(&a0).unwrap();
        for b in b"EMBRAUT1".iter().copied().chain([4, 0, 0, 0, 1, 0, 0, 0]) {
            if s.write_all(&[b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let f1 = TcpFabric::new(1, l1, &addrs, "tok", Duration::from_secs(8)).unwrap();
    h0.join().unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "the mesh formed after {:?}", t0.elapsed());
    drop(f1);
    slow.join().unwrap();
}

#[test]
fn connections_detect_dead_peers_by_keepalive_and_user_timeout() {
    use std::os::fd::AsRawFd;
    let (_s, f1) = fake_rank0("tok", Duration::from_millis(4500));
    let s = f1.sh.streams[0].as_ref().unwrap();
    let get = |level, opt| {
        let mut v: libc::c_int = -1;
        let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt of a c_int into our variable.
        assert_eq!(unsafe { libc::getsockopt(s.as_raw_fd(), level, opt, &mut v as *mut _ as *mut libc::c_void, &mut l) }, 0);
        v
    };
    assert_eq!(get(libc::SOL_SOCKET, libc::SO_KEEPALIVE), 1);
    assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT), 4500);
    assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE), 2);
    assert_eq!(get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL), 1);
}

/// The congestion control a socket runs (`TCP_CONGESTION`).
fn congestion(s: &TcpStream) -> String {
    let mut v = [0u8; 16];
    let mut l = v.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `l` bytes into our buffer.
    assert_eq!(unsafe { libc::getsockopt(s.as_raw_fd(), libc::IPPROTO_TCP, libc::TCP_CONGESTION, v.as_mut_ptr() as *mut libc::c_void, &mut l) }, 0);
    String::from_utf8_lossy(&v[..l as usize]).trim_end_matches('\0').to_string()
}

#[test]
fn a_same_host_connection_runs_reno_unless_the_user_names_one_or_the_system() {
    // The mesh's own choice (no EMBER_TCP_CONGESTION in the test environment, or it says so).
    let (_s, f1) = fake_rank0("tok", Duration::from_secs(5));
    let s = f1.sh.streams[0].as_ref().unwrap();
    match std::env::var("EMBER_TCP_CONGESTION") {
        Err(_) => assert_eq!(congestion(s), "reno"),
        Ok(v) if v != "system" => assert_eq!(congestion(s), v),
        Ok(_) => {}
    }
    // A fresh loopback pair: `system` leaves the kernel's default, a named one is set, a name
    // the kernel does not know fails naming the variable.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let system = congestion(&a);
    tune(&a, Duration::from_secs(5), Some(""), 0).unwrap();
    assert_eq!(congestion(&a), system);
    tune(&a, Duration::from_secs(5), Some("reno"), 0).unwrap();
    assert_eq!(congestion(&a), "reno");
    let e = tune(&a, Duration::from_secs(5), Some("no_such_cc"), 0).unwrap_err().to_string();
    assert!(e.contains("EMBER_TCP_CONGESTION=no_such_cc") && e.contains("tcp_allowed_congestion_control"), "{e}");
    assert_eq!(congestion(&a), "reno", "a refused name changes nothing");
    // What the variable may say.
    use std::ffi::OsString;
    assert_eq!(parse_congestion(None).unwrap(), None);
    assert_eq!(parse_congestion(Some("system".into())).unwrap(), Some(String::new()));
    assert_eq!(parse_congestion(Some("cubic".into())).unwrap(), Some("cubic".into()));
    for bad in ["", "a b", "sixteen_letters_", "reno\0"] {
        let e = parse_congestion(Some(bad.into())).unwrap_err().to_string();
        assert!(e.contains("EMBER_TCP_CONGESTION"), "{bad:?}: {e}");
    }
    use std::os::unix::ffi::OsStringExt;
    assert!(parse_congestion(Some(OsString::from_vec(vec![0xff]))).is_err());
}

#[test]
fn the_socket_buffer_variable_is_checked() {
    assert_eq!(parse_sockbuf(None).unwrap(), 4 << 20);
    assert_eq!(parse_sockbuf(Some("0".into())).unwrap(), 0, "0: the kernel's autotuning");
    assert_eq!(parse_sockbuf(Some("262144".into())).unwrap(), 256 << 10);
    assert_eq!(parse_sockbuf(Some("1073741824".into())).unwrap(), 1 << 30);
    for bad in ["4M", "4k", "-1", "abc", "", "1073741825", "4294967296"] {
        let e = parse_sockbuf(Some(bad.into())).unwrap_err().to_string();
        assert!(e.contains("EMBER_TCP_SOCKBUF") && e.contains("bytes from 0 to 1073741824"), "{bad:?}: {e}");
    }
}

#[test]
fn a_peer_stalled_mid_frame_times_out_and_cancel_returns_at_once() {
    // Rank 0 sends a header and half the payload, then stalls (SIGSTOP, paused VM). The
    // receive times out; the cancel returns without waiting for rank 0; the rest of the
    // frame, sent later, never reaches the withdrawn buffer.
    let (mut s, f1) = fake_rank0("tok", Duration::from_secs(5));
    let tag = Tag { ctx: 1, seq: 0, round: 0 };
    let w = Wait::new("test", Duration::from_millis(300));
    let len = 200_000;
    let mut buf = vec![0u8; len];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), len, &w).unwrap() };
    let f = Frame { magic: MAGIC, round: 0, ctx: 1, seq: 0, len: len as u64 };
    s.write_all(bytemuck::bytes_of(&f)).unwrap();
    s.write_all(&vec![0x11u8; len / 2]).unwrap();
    let e = f1.wait_recv(0, tag, &w).unwrap_err();
    assert!(matches!(e, Error::Timeout { peer: 0, .. }), "{e}");
    let (tx, rx) = std::sync::mpsc::channel();
    let f1 = Arc::new(f1);
    let f1c = f1.clone();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        f1c.cancel_recv(0, tag);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(2)).expect("cancel_recv waited for the stalled peer");
    assert!(t0.elapsed() < Duration::from_secs(1));
    let snapshot = buf.clone();
    // The peer wakes up: the rest of the frame, then a small frame for a live receive.
    s.write_all(&vec![0x22u8; len - len / 2]).unwrap();
    let tag2 = Tag { ctx: 1, seq: 1, round: 0 };
    let mut small = [0u8; 3];
    let w = Wait::new("test", Duration::from_secs(2));
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag2, small.as_mut_ptr(), 3, &w).unwrap() };
    s.write_all(bytemuck::bytes_of(&Frame { magic: MAGIC, round: 0, ctx: 1, seq: 1, len: 3 })).unwrap();
    s.write_all(&[7, 8, 9]).unwrap();
    assert_eq!(f1.wait_recv(0, tag2, &w).unwrap(), 3);
    assert_eq!(small, [7, 8, 9]);
    assert!(buf == snapshot, "bytes landed in the withdrawn buffer");
}

#[test]
fn a_write_failing_on_a_peer_that_broke_the_protocol_reports_the_protocol_error() {
    // Rank 0 sends more than rank 1 posted room for, then fails over it and resets the
    // connection before rank 1 read a byte (rank 1's progress thread paused). Rank 1's next
    // send fails on the reset connection: it reports the oversized frame rank 0 sent first,
    // naming rank 0, not the reset; nothing lands in the buffer.
    let (s, f1) = fake_rank0("tok", Duration::from_secs(5));
    f1.pause_rx(true);
    let tag = Tag { ctx: 1, seq: 0, round: 0 };
    let w = Wait::new("test", Duration::from_secs(5));
    let mut buf = [0u8; 5 + 16];
    // SAFETY: room for the posted length; outlives the message (waited, cancelled or failed below).
    unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), 5, &w).unwrap() };
    let mut s = s;
    // The frame must reach rank 1 before the reset: a reset discards what the closing side has
    // not sent yet, and Nagle may hold a small write back. So no delay, one write, and the
    // reset only once rank 1's kernel acknowledged every byte (nothing left in the send queue).
    s.set_nodelay(true).unwrap();
    let mut frame = bytemuck::bytes_of(&Frame { magic: MAGIC, round: 0, ctx: 1, seq: 0, len: 8 }).to_vec();
    frame.extend_from_slice(&[0xAB; 8]);
    s.write_all(&frame).unwrap();
    {
        use std::os::fd::AsRawFd;
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let mut unacked: libc::c_int = 0;
            // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int: the bytes the peer has not acknowledged.
            let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut unacked) };
            assert_eq!(r, 0);
            if unacked == 0 {
                break;
            }
            assert!(Instant::now() < until, "rank 1 did not acknowledge the frame");
            std::thread::sleep(Duration::from_millis(1));
        }
        let l = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt of a linger struct on a socket we own: close sends a reset.
        let r = unsafe {
            libc::setsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_LINGER, &l as *const libc::linger as *const libc::c_void, std::mem::size_of::<libc::linger>() as libc::socklen_t)
        };
        assert_eq!(r, 0);
    }
    drop(s);
    // Until the reset has reached rank 1, its sends still succeed.
    static ONE: [u8; 1] = [1];
    let e = (1..)
        .find_map(|seq| {
            // SAFETY: a static payload outlives every send.
            let r = unsafe { f1.send(0, Tag { ctx: 1, seq, round: 0 }, ONE.as_ptr(), 1, &w) };
            assert!(seq < 100_000, "no send failed on the reset connection");
            std::thread::yield_now();
            r.err()
        })
        .unwrap();
    assert!(matches!(&e, Error::Protocol { peer: 0, detail, .. } if detail.contains("exceeds")), "{e}");
    let e = f1.wait_recv(0, tag, &w).unwrap_err();
    assert!(matches!(&e, Error::Protocol { peer: 0, .. }), "{e}");
    assert_eq!(buf, [0u8; 21]);
}

/// A caller blocked in its `poll` hears another thread's progress: a pass that moved something
/// while another caller is blocked signals `cfd`, and a caller's blocking pass returns on it
/// (its sockets being silent: the frame was read by that other thread). Without it the caller
/// slept its whole block (here 20 s, past the 10 s bound). A caller woken by the signal alone
/// does not pass it on (two blocked callers would bounce it forever), and with no caller
/// blocked nothing is signalled (a wait that never blocks costs no system call).
#[test]
fn another_threads_progress_wakes_a_caller_blocked_in_its_poll() {
    let (mut s, f1) = fake_rank0("tok", Duration::from_secs(30));
    let sh = f1.sh.clone();
    // Callers drive (the progress thread keeps out), another one blocked; this thread's pass
    // below is the one that moves.
    sh.drivers.fetch_add(2, Ordering::AcqRel);
    sh.blocked.fetch_add(1, Ordering::SeqCst);
    let tag = Tag { ctx: 1, seq: 0, round: 0 };
    s.write_all(&encode_frame(tag, 4)).unwrap();
    s.write_all(&[1, 2, 3, 4]).unwrap();
    let t = Instant::now();
    while !sh.pass(Runner::Caller, Duration::ZERO) {
        assert!(t.elapsed() < Duration::from_secs(10), "the frame never arrived");
    }
    let mut v = 0u64;
    // SAFETY: an 8-byte read from the fabric's non-blocking eventfd.
    let n = unsafe { libc::read(sh.cfd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    assert_eq!(n, 8, "the pass that read the frame signalled the other caller");
    // A caller whose sockets stay silent (reading paused) wakes on the signal alone, and does
    // not pass it on to the other blocked caller (counted: 2 with itself), having moved nothing.
    f1.pause_rx(true);
    sh.blocked.fetch_add(1, Ordering::SeqCst);
    let sh2 = sh.clone();
    let blocked = std::thread::spawn(move || {
        let t = Instant::now();
        (sh2.pass(Runner::Caller, Duration::from_secs(20)), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(50));
    super::progress::signal(sh.cfd.as_raw_fd());
    let (moved, took) = blocked.join().unwrap();
    assert!(moved && took < Duration::from_secs(10), "woke after {took:?} (moved {moved})");
    // SAFETY: as above.
    let n = unsafe { libc::read(sh.cfd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    assert_eq!(n, -1, "a caller woken by the signal alone signalled again");
    sh.blocked.fetch_sub(2, Ordering::SeqCst);
    // Nobody blocked: a pass that moves signals nothing.
    s.write_all(&encode_frame(Tag { seq: 1, ..tag }, 4)).unwrap();
    s.write_all(&[5, 6, 7, 8]).unwrap();
    f1.pause_rx(false);
    let t = Instant::now();
    while !sh.pass(Runner::Caller, Duration::ZERO) {
        assert!(t.elapsed() < Duration::from_secs(10), "the frame never arrived");
    }
    // SAFETY: as above.
    let n = unsafe { libc::read(sh.cfd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
    assert_eq!(n, -1, "no caller was blocked, yet the pass signalled");
    sh.drivers.fetch_sub(2, Ordering::AcqRel);
}

/// Rank 0 (a raw socket) sends a 256 KiB frame for `tag`, then 8 bytes for the next tag; rank 1
/// (holding a frame at most `hold_max`, or its default) has posted neither. Returns once rank
/// 1's stream stops at the long frame, or (a hold as short as the default's may end before this
/// thread looks) once the frame was kept aside: the socket, rank 1, the tag and the long payload.
fn long_frame_then_short(hold_max: Option<Duration>) -> (TcpStream, TcpFabric, Tag, Vec<u8>) {
    let (mut s, f1) = fake_rank0("tok", Duration::from_secs(30));
    if let Some(h) = hold_max {
        f1.sh.hold_max_us.store(h.as_micros() as u64, Ordering::Relaxed);
    }
    let tag = Tag { ctx: 1, seq: 0, round: 0 };
    let long: Vec<u8> = (0..256 << 10).map(|i| (i * 7 + 3) as u8).collect();
    s.write_all(&encode_frame(tag, long.len())).unwrap();
    s.write_all(&long).unwrap();
    s.write_all(&encode_frame(Tag { seq: tag.seq + 1, ..tag }, 8)).unwrap();
    s.write_all(&[9; 8]).unwrap();
    let t = Instant::now();
    while !f1.sh.held[0].load(Ordering::Acquire) && f1.sh.mb.lock().early_bytes < long.len() {
        assert!(t.elapsed() < Duration::from_secs(10), "the long frame was never held");
        std::thread::yield_now();
    }
    (s, f1, tag, long)
}

/// Post a receive of `len` bytes from rank 0 and wait for it: what landed.
fn receive(f1: &TcpFabric, tag: Tag, len: usize) -> Vec<u8> {
    let w = Wait::new("test", Duration::from_secs(10));
    let mut buf = vec![0u8; len];
    // SAFETY: `buf` outlives the wait below, which completes (or fails) the receive.
    unsafe { f1.post_recv(0, tag, buf.as_mut_ptr(), len, &w).unwrap() };
    let n = f1.wait_recv(0, tag, &w).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn a_long_frame_ahead_of_its_receive_waits_in_the_stream_and_lands_in_place() {
    // Held until posted, however slow this test runs.
    let (_s, f1, tag, long) = long_frame_then_short(Some(Duration::from_secs(30)));
    // Held: nothing kept aside, and the frame behind it not read either.
    assert_eq!(f1.sh.mb.lock().early_bytes, 0);
    assert!(f1.sh.mb.lock().map.keys().all(|k| k.0 != 0 || k.1.seq != 1), "read past the held frame");
    assert_eq!(receive(&f1, tag, long.len()), long);
    assert!(!f1.sh.held[0].load(Ordering::Acquire));
    // Into its receive, not kept aside (the short frame behind it may be, by now).
    assert!(f1.sh.mb.lock().early_bytes <= 8);
    assert_eq!(receive(&f1, Tag { seq: 1, ..tag }, 8), [9; 8]);
}

#[test]
fn a_held_frame_gives_way_to_a_receive_behind_it_and_to_time() {
    // A receive posted for the frame behind: the held one is kept aside, so that one arrives.
    let (_s, f1, tag, long) = long_frame_then_short(Some(Duration::from_secs(30)));
    assert_eq!(receive(&f1, Tag { seq: 1, ..tag }, 8), [9; 8]);
    assert_eq!(f1.sh.mb.lock().early_bytes, long.len());
    assert_eq!(receive(&f1, tag, long.len()), long);
    assert_eq!(f1.sh.mb.lock().early_bytes, 0);
    // Nobody posts: held at most HOLD_MAX (the 256 KiB frame's hold), then kept aside by the
    // progress thread alone.
    let (_s, f1, tag, long) = long_frame_then_short(None);
    let t = Instant::now();
    while f1.sh.held[0].load(Ordering::Acquire) || f1.sh.mb.lock().early_bytes < long.len() + 8 {
        assert!(t.elapsed() < Duration::from_secs(10), "still held after {:?}", t.elapsed());
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(receive(&f1, tag, long.len()), long);
    assert_eq!(receive(&f1, Tag { seq: 1, ..tag }, 8), [9; 8]);
}

/// Between operations the caller's frames are its own for a moment ([`progress::QUIET`]); after
/// it, the progress thread alone reads what arrives (here kept until posted).
#[test]
fn after_a_wait_the_progress_thread_reads_again() {
    let (mut s, f1) = fake_rank0("tok", Duration::from_secs(30));
    let tag = Tag { ctx: 1, seq: 0, round: 0 };
    s.write_all(&encode_frame(tag, 4)).unwrap();
    s.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(receive(&f1, tag, 4), [1, 2, 3, 4]);
    s.write_all(&encode_frame(Tag { seq: 1, ..tag }, 4)).unwrap();
    s.write_all(&[5, 6, 7, 8]).unwrap();
    let t = Instant::now();
    while f1.sh.mb.lock().early_bytes != 4 {
        assert!(t.elapsed() < Duration::from_secs(10), "nobody read the frame that came after the wait");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(receive(&f1, Tag { seq: 1, ..tag }, 4), [5, 6, 7, 8]);
}

/// A frame is held its floor (1 ms unless a test sets another), or 1 ns per byte when longer,
/// up to 100 ms.
#[test]
fn a_long_frame_is_held_in_proportion_to_its_length() {
    use super::progress::{hold_for, HOLD_MAX};
    assert_eq!(hold_for(256 << 10, HOLD_MAX), Duration::from_millis(1));
    assert_eq!(hold_for(1_000_000, HOLD_MAX), Duration::from_millis(1));
    assert_eq!(hold_for(16 << 20, HOLD_MAX), Duration::from_nanos(16 << 20));
    assert_eq!(hold_for(16 << 20, Duration::from_secs(30)), Duration::from_secs(30));
    assert_eq!(hold_for(64 << 20, HOLD_MAX), Duration::from_nanos(64 << 20));
    assert_eq!(hold_for(usize::MAX, HOLD_MAX), Duration::from_millis(100));
}
