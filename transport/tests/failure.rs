//! Failure handling: dead or silent peers fail every other rank within the timeout (naming the
//! peer), a wrong job token is refused, and mismatched or corrupted lengths are errors.
mod common;
use common::*;
use ember_transport::bootstrap::{free_port, new_token};
use ember_transport::{Comm, Error, JoinConfig, Rendezvous, Transport};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_millis(1000);

#[test]
fn silent_or_dead_peer_fails_the_others_within_the_timeout() {
    for b in BACKENDS {
        for drop_it in [false, true] {
            let mut comms = world(b, 3, T);
            let last = comms.pop().unwrap();
            let keep = if drop_it {
                drop(last);
                None
            } else {
                Some(last) // alive but never takes part
            };
            let start = Instant::now();
            let hs: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    std::thread::spawn(move || {
                        let send = vec![1u32; 3 * 100_000];
                        let mut recv = vec![0u32; 3 * 100_000];
                        c.all_to_all(&send, &mut recv)
                    })
                })
                .collect();
            // Every survivor fails; each error names a peer, and at least one names rank 2
            // (another may name a survivor that gave up first and left the job).
            let errs: Vec<Error> = hs.into_iter().map(|h| h.join().unwrap().unwrap_err()).collect();
            assert!(errs.iter().all(|e| e.peer().is_some()), "{b}: {errs:?}");
            assert!(errs.iter().any(|e| e.peer() == Some(2) && e.to_string().contains("rank 2")), "{b} drop={drop_it}: {errs:?}");
            assert!(start.elapsed() < T + Duration::from_millis(800), "{b}: took {:?}", start.elapsed());
            drop(keep);
        }
    }
}

#[test]
fn mismatched_counts_are_an_error_not_an_overflow() {
    for b in BACKENDS {
        for big in [false, true] {
            // Rank 0 sends more than rank 1 posted room for (eager and large paths).
            let k = if big { 200_000 } else { 5 };
            // Rank 0 keeps its communicator until rank 1's collective returned: rank 0 may fail
            // first (its send found the short buffer), and dropping its communicator then could
            // reach rank 1 before rank 1's own receive fails, which would rightly report the
            // dropped peer instead of the overflow under test. (Rank 1 does not wait for rank 0,
            // which may in turn be waiting for rank 1's message until rank 1's drop ends it.)
            let rank1_done = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
            let out = run(b, 2, move |c| {
                let r = c.rank();
                let (sc, rc) = if r == 0 { (vec![0, k + 3], vec![0, 0]) } else { (vec![0, 0], vec![k, 0]) };
                let send = vec![7u8; sc.iter().sum()];
                let mut recv = vec![0u8; rc.iter().sum::<usize>() + 16];
                let n = recv.len() - 16;
                let res = c.all_to_all_v(&send, &sc, &mut recv[..n], &rc);
                let (done, cv) = &*rank1_done;
                if r == 1 {
                    *done.lock().unwrap() = true;
                    cv.notify_all();
                } else {
                    drop(cv.wait_while(done.lock().unwrap(), |d| !*d).unwrap());
                }
                (res, recv[n..].to_vec())
            });
            let (res1, guard) = &out[1];
            let e = res1.as_ref().unwrap_err();
            assert_eq!(e.peer(), Some(0), "{b}: {e}");
            assert!(matches!(e, Error::Protocol { .. }), "{b}: {e}");
            assert!(guard.iter().all(|&x| x == 0), "{b}: bytes landed past the posted buffer");
        }
    }
}

fn cfg(rank: usize, size: usize, port: u16, token: &str, t: Transport) -> JoinConfig {
    JoinConfig {
        rank,
        size,
        local_rank: rank,
        rendezvous: Rendezvous::Addr(format!("127.0.0.1:{port}")),
        token: token.into(),
        transport: t,
        timeout: Duration::from_secs(5),
    }
}

#[test]
fn wrong_token_is_refused_and_the_job_still_forms() {
    let port = free_port().unwrap();
    let token = new_token();
    let c0 = cfg(0, 2, port, &token, Transport::Auto);
    let h0 = std::thread::spawn(move || Comm::connect(&c0));
    std::thread::sleep(Duration::from_millis(100));
    let bad = Comm::connect(&cfg(1, 2, port, "not-the-token", Transport::Auto));
    match bad {
        Err(Error::Refused(why)) => assert!(why.contains("token"), "{why}"),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a wrong token joined"),
    }
    let c1 = cfg(1, 2, port, &token, Transport::Auto);
    let h1 = std::thread::spawn(move || Comm::connect(&c1));
    let (a, b) = (h0.join().unwrap().unwrap(), h1.join().unwrap().unwrap());
    assert_eq!(a.transport(), "shm");
    let t = std::thread::spawn(move || {
        let mut v = vec![2.0f64];
        b.all_reduce(&mut v, ember_transport::ReduceOp::Sum).map(|_| v)
    });
    let mut v = vec![1.0f64];
    a.all_reduce(&mut v, ember_transport::ReduceOp::Sum).unwrap();
    assert_eq!(v, vec![3.0]);
    assert_eq!(t.join().unwrap().unwrap(), vec![3.0]);
}

#[test]
fn missing_token_and_unbuilt_transports_are_clear_errors() {
    let vars = |extra: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            let base = [("RANK", "1"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "9")];
            base.iter().chain(extra.iter()).find(|(a, _)| *a == k).map(|(_, v)| v.to_string())
        }
    };
    assert!(matches!(JoinConfig::from_vars(vars(&[])), Err(Error::Refused(_))));
    // A short rendezvous deadline: on a host with an RDMA port the made-up job's rendezvous is
    // what fails.
    let c = JoinConfig::from_vars(vars(&[("EMBER_JOB_TOKEN", "x"), ("EMBER_TRANSPORT", "rdma"), ("EMBER_TIMEOUT_MS", "300")])).unwrap();
    let e = Comm::connect(&c).err().unwrap();
    #[cfg(not(feature = "rdma"))]
    assert!(matches!(e, Error::NotBuilt(_)) && e.to_string().contains("not built"), "{e}");
    #[cfg(feature = "rdma")]
    if ember_transport::bootstrap::rdma_available().is_ok() {
        assert!(matches!(e, Error::Bootstrap(_)) && e.to_string().contains("rendezvous"), "{e}");
    } else {
        assert!(e.to_string().contains("transport 'rdma'"), "{e}");
    }
}

#[test]
fn launcher_variables_are_read_in_order() {
    let get = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string());
    let c = JoinConfig::from_vars(get(&[
        ("OMPI_COMM_WORLD_RANK", "3"),
        ("OMPI_COMM_WORLD_SIZE", "8"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("RANK", "0"),
        ("WORLD_SIZE", "2"),
        ("EMBER_RENDEZVOUS", "10.0.0.1:555"),
        ("MASTER_ADDR", "x"),
        ("MASTER_PORT", "1"),
        ("EMBER_JOB_TOKEN", "t"),
        ("EMBER_TIMEOUT_MS", "1500"),
    ]))
    .unwrap();
    assert_eq!((c.rank, c.size, c.local_rank), (3, 8, 1));
    assert_eq!(c.rendezvous, Rendezvous::Addr("10.0.0.1:555".into()));
    assert_eq!(c.timeout, Duration::from_millis(1500));
    let s = JoinConfig::from_vars(get(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "16"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[07-09,12],cpu1"),
        ("SLURM_JOB_ID", "123456"),
        ("EMBER_JOB_TOKEN", "t"),
    ]))
    .unwrap();
    assert_eq!((s.rank, s.size, s.local_rank), (5, 16, 1));
    assert_eq!(s.rendezvous, Rendezvous::Addr(format!("gpu07:{}", 20000 + 123456 % 20000)));
    let p = JoinConfig::from_vars(get(&[("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("EMBER_RENDEZVOUS_FILE", "/shared/rdv"), ("EMBER_JOB_TOKEN", "t")])).unwrap();
    assert_eq!((p.rank, p.size), (1, 2));
    assert_eq!(p.rendezvous, Rendezvous::File("/shared/rdv".into()));
    let t = JoinConfig::from_vars(get(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "m"), ("MASTER_PORT", "29500"), ("EMBER_JOB_TOKEN", "t")])).unwrap();
    assert_eq!(t.rendezvous, Rendezvous::Addr("m:29500".into()));
    let single = JoinConfig::from_vars(get(&[])).unwrap();
    assert_eq!((single.rank, single.size), (0, 1));
}

#[test]
fn large_messages_take_the_one_copy_path_on_every_backend() {
    for b in BACKENDS {
        let out = run(b, 3, |c| {
            let (r, n) = (c.rank(), c.size());
            let blk = 100_003usize; // > eager limit, odd
            let send: Vec<u64> = (0..n * blk).map(|i| (r * 10_000_000 + i) as u64).collect();
            let mut recv = vec![0u64; n * blk];
            c.all_to_all(&send, &mut recv).unwrap();
            let mut v: Vec<f32> = (0..300_001).map(|i| ((i + r) % 97) as f32).collect();
            c.all_reduce(&mut v, ember_transport::ReduceOp::Sum).unwrap();
            (r, recv, v)
        });
        for (r, recv, v) in out {
            for p in 0..3 {
                assert_eq!(recv[p * 100_003], (p * 10_000_000 + r * 100_003) as u64, "{b}");
                assert_eq!(recv[p * 100_003 + 100_002], (p * 10_000_000 + r * 100_003 + 100_002) as u64, "{b}");
            }
            assert!(v.iter().enumerate().all(|(i, &x)| x == (0..3).map(|q| ((i + q) % 97) as f32).sum::<f32>()), "{b}");
        }
    }
}

#[test]
fn bare_mpirun_defaults_to_a_job_file_that_carries_the_token() {
    let get = |kv: &'static [(&'static str, &'static str)]| move |k: &str| kv.iter().find(|(a, _)| *a == k).map(|(_, v)| v.to_string());
    let c = JoinConfig::from_vars(get(&[
        ("OMPI_COMM_WORLD_RANK", "1"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("OMPI_MCA_ess_base_jobid", "6160385"),
        ("EMBER_RENDEZVOUS_DIR", "/shared/x"),
    ]))
    .unwrap();
    assert_eq!(c.rendezvous, Rendezvous::JobFile("/shared/x/ember-6160385.rdv".into()));
    assert!(c.token.is_empty());
    // Without a job id (not mpirun) a missing token is still refused.
    assert!(matches!(JoinConfig::from_vars(get(&[("RANK", "1"), ("WORLD_SIZE", "2"), ("EMBER_RENDEZVOUS_FILE", "/f")])), Err(Error::Refused(_))));
    // A real job through a job file, no token given: rank 0 creates one, the others read it.
    let dir = std::env::temp_dir().join(format!("ember-jobfile-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ember-job.rdv");
    let hs: Vec<_> = (0..3)
        .map(|rank| {
            let cfg = JoinConfig {
                rank,
                size: 3,
                local_rank: rank,
                rendezvous: Rendezvous::JobFile(path.clone()),
                token: String::new(),
                transport: Transport::Tcp,
                timeout: Duration::from_secs(5),
            };
            std::thread::spawn(move || {
                let c = Comm::connect(&cfg)?;
                let mut x = [c.rank() as u64 + 1];
                c.all_reduce(&mut x, ember_transport::ReduceOp::Sum)?;
                Ok::<u64, Error>(x[0])
            })
        })
        .collect();
    for h in hs {
        assert_eq!(h.join().unwrap().unwrap(), 6);
    }
    assert!(!path.exists(), "the job file is removed once everyone joined");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tcp_sends_beyond_the_socket_buffers_complete_and_fail_cleanly() {
    // 24 MiB each way (more than the socket buffers hold), the receivers posting late: the
    // caller's write stops short and the progress thread finishes the queued rest.
    let out = run("tcp", 2, |c| {
        let (r, blk) = (c.rank(), 3 << 20); // u64s per peer
        let send: Vec<u64> = (0..2 * blk).map(|i| (r * 100_000_000 + i) as u64).collect();
        let mut recv = vec![0u64; 2 * blk];
        if r == 1 {
            std::thread::sleep(Duration::from_millis(100));
        }
        c.all_to_all(&send, &mut recv).unwrap();
        (r, recv[(1 - r) * blk..(2 - r) * blk].iter().enumerate().all(|(i, &x)| x == ((1 - r) * 100_000_000 + r * blk + i) as u64))
    });
    assert!(out.iter().all(|&(_, ok)| ok));
    // A send to a peer whose connection closed fails at once, naming it (the receiving side
    // keeps unposted messages, so a live peer always drains a send: no queued send can hang).
    let mut w = world("tcp", 2, T);
    drop(w.pop().unwrap());
    let c0 = w.pop().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let e = c0.broadcast(&mut vec![7u64; 4 << 20], 0).unwrap_err();
    assert_eq!(e.peer(), Some(1), "{e}");
    assert!(t0.elapsed() < T, "{:?}", t0.elapsed());
}
