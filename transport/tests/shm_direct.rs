//! The shm backend's one-copy paths (advertised receives written by the sender, RTS fetched by
//! the receiver, the eager ring) at sizes around each crossover, in threads and in processes.
mod common;
use common::run;
use ember_transport::bootstrap::{allowed_cores, free_port, new_token, pin_to_core, Rendezvous};
use ember_transport::{Comm, JoinConfig, ReduceOp, Transport};
use std::time::{Duration, Instant};

/// Bytes per peer around the eager limit (8 KiB), the ring record size and larger messages.
const SIZES: [usize; 9] = [0, 1, 8191, 8192, 8193, 8256, 16 << 10, (64 << 10) + 4, (1 << 20) + 12];

fn a2a_check(c: &Comm, bytes: usize, salt: usize) {
    let (r, n) = (c.rank(), c.size());
    let blk = bytes / 4;
    let send: Vec<u32> = (0..n * blk).map(|i| (r * 1_000_003 + i * 7 + salt) as u32).collect();
    let mut recv = vec![u32::MAX; n * blk];
    c.all_to_all(&send, &mut recv).unwrap();
    for p in 0..n {
        for j in [0, blk / 2, blk.saturating_sub(1)] {
            if blk > 0 {
                assert_eq!(recv[p * blk + j], (p * 1_000_003 + (r * blk + j) * 7 + salt) as u32, "{bytes} B from {p}");
            }
        }
    }
}

#[test]
fn all_to_all_around_every_crossover() {
    for n in [2, 3, 5] {
        run("shm", n, |c| {
            for (i, &b) in SIZES.iter().enumerate() {
                for rep in 0..3 {
                    a2a_check(&c, b, i * 10 + rep);
                }
            }
        });
    }
}

#[test]
fn overlapping_collectives_on_two_communicators() {
    // Many advertised receives outstanding per peer at once (non-blocking all-to-alls on two
    // communicators plus blocking ones), more than the advertisement slots: some go through RTS.
    run("shm", 4, |c| {
        let (r, n) = (c.rank(), c.size());
        let sub = c.split((r % 2) as u32, r as i64).unwrap();
        let blk = 5000;
        let mut reqs = Vec::new();
        for k in 0..24usize {
            let send: Vec<u64> = (0..n * blk).map(|i| (k * 1_000_000 + r * 100_000 + i) as u64).collect();
            reqs.push((k, c.start_all_to_all_v(send, vec![blk; n], vec![blk; n])));
        }
        for _ in 0..3 {
            a2a_check(&sub, 40_000, 1);
        }
        for (k, q) in reqs {
            let got = q.wait().unwrap();
            for p in 0..n {
                assert_eq!(got[p * blk + 3], (k * 1_000_000 + p * 100_000 + r * blk + 3) as u64);
            }
        }
        let mut v: Vec<f32> = (0..100_001).map(|i| ((i + r) % 13) as f32).collect();
        c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
        assert!(v.iter().enumerate().all(|(i, &x)| x == (0..n).map(|q| ((i + q) % 13) as f32).sum::<f32>()));
    });
}

const CHILD: &str = "EMBER_TEST_SHM_CHILD";

/// Rank body of `many_processes_on_two_cores_make_progress` (in a child process).
fn child_rank(spec: &str) {
    let f: Vec<&str> = spec.split(',').collect();
    let (rank, size, port, token) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse::<u16>().unwrap(), f[3].to_string());
    let cores = allowed_cores();
    if !cores.is_empty() {
        pin_to_core(cores[rank % cores.len().min(2)]);
    }
    let cfg = JoinConfig {
        rank,
        size,
        local_rank: rank,
        rendezvous: Rendezvous::Addr(format!("127.0.0.1:{port}")),
        token,
        transport: Transport::Shm,
        timeout: Duration::from_secs(30),
    };
    let c = Comm::connect(&cfg).unwrap();
    assert_eq!(c.transport(), "shm");
    for rep in 0..4 {
        for (i, &b) in SIZES.iter().enumerate() {
            a2a_check(&c, b, rep * 100 + i);
        }
    }
    let mut v: Vec<f64> = (0..300_001).map(|i| (i % 11) as f64).collect();
    c.all_reduce(&mut v, ReduceOp::Sum).unwrap();
    assert_eq!(v[300_000], (300_000 % 11) as f64 * size as f64);
}

/// Run `n` rank processes (this test binary re-run as test `name`) with `env`; their outputs.
fn rank_processes(name: &str, n: usize, env: &[(&str, &str)]) -> Vec<std::process::Output> {
    rank_processes_pids(name, n, env).into_iter().map(|(_, o)| o).collect()
}

/// [`rank_processes`], with each process's id.
fn rank_processes_pids(name: &str, n: usize, env: &[(&str, &str)]) -> Vec<(u32, std::process::Output)> {
    let port = free_port().unwrap();
    let token = new_token();
    let exe = std::env::current_exe().unwrap();
    let kids: Vec<_> = (0..n)
        .map(|r| {
            std::process::Command::new(&exe)
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(CHILD, format!("{r},{n},{port},{token}"))
                .envs(env.iter().copied())
                // Captured: a rank meant to fail would print libtest's FAILED lines among the parent's.
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    kids.into_iter().map(|k| (k.id(), k.wait_with_output().unwrap())).collect()
}

#[test]
fn many_processes_on_two_cores_make_progress() {
    if let Ok(spec) = std::env::var(CHILD) {
        return child_rank(&spec);
    }
    // 8 rank processes pinned to (at most) 2 cores; every message size, including the
    // advertised-write and RTS paths across real processes (process_vm_writev / _readv).
    let t = Instant::now();
    let out = rank_processes("many_processes_on_two_cores_make_progress", 8, &[]);
    for o in &out {
        assert!(o.status.success(), "a rank process failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(t.elapsed() < Duration::from_secs(120), "took {:?}", t.elapsed());
}

#[test]
fn processes_copy_through_shared_memory_when_told_to() {
    if let Ok(spec) = std::env::var(CHILD) {
        return child_rank(&spec);
    }
    // The fallback for hosts that forbid cross-memory attach, forced: 4 rank processes, every
    // size; the path counters each rank prints show streamed messages and no CMA copy at all.
    let out = rank_processes("processes_copy_through_shared_memory_when_told_to", 4, &[("EMBER_SHM_COPY", "staged"), ("EMBER_SHM_STATS", "1")]);
    for (r, o) in out.iter().enumerate() {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "rank {r} failed: {err}");
        let line = err.lines().find(|l| l.starts_with(&format!("shm rank {r}:"))).unwrap_or_else(|| panic!("no counters from rank {r}: {err}"));
        let count = |k: &str| -> u64 { line.split(&format!(" {k} ")).nth(1).and_then(|t| t.split_whitespace().next()).and_then(|v| v.parse().ok()).unwrap() };
        assert!(count("staged") > 0, "{line}");
        assert_eq!((count("direct"), count("direct-after-rts"), count("rts-fetch")), (0, 0, 0), "{line}");
    }
}

#[test]
fn a_bad_variable_fails_the_shm_world_naming_it_and_leaves_no_inbox() {
    if let Ok(spec) = std::env::var(CHILD) {
        return child_rank(&spec);
    }
    // Every rank process reads the same bad value when its shared-memory fabric is built (after
    // the rendezvous created its inbox): each fails naming the variable, and removes its inbox.
    let name = "a_bad_variable_fails_the_shm_world_naming_it_and_leaves_no_inbox";
    for (var, v) in [("EMBER_SHM_EAGER", "262145"), ("EMBER_SHM_DIRECT", "yes"), ("EMBER_SHM_COPY", "stagd"), ("EMBER_SPIN_US", "5us"), ("EMBER_MAX_ALLOC_BYTES", "0")] {
        let t = Instant::now();
        for (r, (pid, o)) in rank_processes_pids(name, 2, &[(var, v)]).iter().enumerate() {
            let err = String::from_utf8_lossy(&o.stderr);
            // (The child's panic shows the error's Debug form: the value's quotes escaped.)
            assert!(!o.status.success() && err.contains(&format!("{var}=\\\"{v}\\\"")), "rank {r} with {var}={v:?}: {err}");
            let left: Vec<_> = std::fs::read_dir("/dev/shm")
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|f| f.starts_with("ember-") && f.contains(&format!("-{pid}-{r}-")))
                .collect();
            assert!(left.is_empty(), "rank {r} with {var}={v:?} left its inbox: {left:?}");
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{var}: took {:?}", t.elapsed());
    }
}
