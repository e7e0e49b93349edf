//! Multi-process transport tests through the CLI: `ember launch` (shm and tcp), `ember bench`
//! in-process with --json, a peer killed mid-job, and Open MPI's mpirun (needs openmpi-bin: ignored unless asked for).
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

fn ember(args: &[&str]) -> Output {
    Command::new(EMBER).args(args).output().expect("run ember")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

#[test]
fn launch_runs_checked_benchmarks_over_shm_and_tcp() {
    for t in ["shm", "tcp"] {
        for which in ["a2a", "allreduce", "pingpong"] {
            let o = ember(&["launch", "-n", "3", "--transport", t, "--", EMBER, "bench", which, "-b", "100", "-e", "200K", "-f", "7", "-n", "3", "-w", "1", "-c", "2"]);
            let (out, err) = text(&o);
            assert!(o.status.success(), "{t} {which}: {out}\n{err}");
            assert!(out.contains(&format!("[0] # ember bench {which}: 3 ranks, transport {t}")), "{out}");
            assert!(out.contains("[0] # Out of bounds values : 0 OK"), "{out}");
            assert_eq!(out.lines().filter(|l| l.starts_with("[0]  ")).count(), 4, "{out}"); // 100, 700, 4900, 34300
        }
    }
}

#[test]
fn in_process_json_rows() {
    let o = ember(&["bench", "a2a", "--ranks", "4", "-b", "1K", "-e", "64K", "-f", "8", "-n", "2", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON row")).collect();
    assert_eq!(rows.len(), 3);
    for (r, size) in rows.iter().zip([1024, 8192, 65536]) {
        assert_eq!(r["size"], size);
        assert_eq!(r["count"], size / 4);
        assert_eq!(r["type"], "float");
        assert_eq!(r["wrong"], 0);
        let (t, alg, bus) = (r["time_us"].as_f64().unwrap(), r["algbw"].as_f64().unwrap(), r["busbw"].as_f64().unwrap());
        assert!(t > 0.0);
        assert!((alg - 4.0 * size as f64 / t / 1e3).abs() < 1e-9 * alg.max(1.0));
        assert!((bus - alg * 3.0 / 4.0).abs() < 1e-9 * alg.max(1.0));
    }
}

#[test]
fn a_killed_rank_fails_the_others_within_the_timeout() {
    for t in ["shm", "tcp"] {
        let start = Instant::now();
        let o = ember(&["launch", "-n", "3", "--transport", t, "--timeout-ms", "1500", "--", EMBER, "bench", "a2a", "-b", "1M", "-e", "1M", "--fault-rank", "1"]);
        let (out, err) = text(&o);
        assert!(!o.status.success(), "{t}: {out}");
        assert!(start.elapsed() < Duration::from_secs(15), "{t}: took {:?}", start.elapsed());
        // Both survivors report an error naming a peer, at least one of them rank 1.
        for r in [0, 2] {
            assert!(err.lines().any(|l| l.starts_with(&format!("[{r}]")) && l.contains("rank ")), "{t} rank {r}: {err}");
        }
        assert!(err.contains("rank 1"), "{t}: {err}");
    }
}

#[test]
fn unbuilt_transport_is_a_clear_error() {
    let o = ember(&["bench", "a2a", "--ranks", "2", "--transport", "rdma"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(err.contains("not built"), "{err}");
}

#[test]
fn nccl_is_the_device_buffer_bench_or_a_clear_refusal_never_a_host_transport() {
    // `bench --transport nccl`: NCCL's collectives on device buffers. Without the feature: a
    // refusal naming the feature and the host transports. With it but without libnccl or a GPU
    // (this host): the probe's error, not a transport error.
    let o = ember(&["bench", "a2a", "--ranks", "2", "--transport", "nccl", "-b", "1K", "-e", "1K"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    if cfg!(feature = "nccl") {
        assert!(err.contains("ember bench a2a --transport nccl:") && !err.contains("unknown transport"), "{err}");
    } else {
        assert!(err.contains("needs the binary built with --features nccl") && err.contains("auto, local, shm, tcp, rdma"), "{err}");
    }
    // Anywhere a host transport is asked for, "nccl" is refused with the NCCL paths to use.
    let o = ember(&["train", "--grid", "2x1", "--steps", "1", "--transport", "nccl"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(err.contains("NCCL is not a host transport") && err.contains("--xfer nccl"), "{err}");
    let o = ember(&["launch", "-n", "2", "--transport", "nccl", "--", EMBER, "bench", "a2a", "-b", "1K", "-e", "1K"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(err.contains("NCCL is not a host transport"), "{err}");
}

#[test]
#[ignore = "needs mpirun: apt-get install openmpi-bin (bash .ci/run runs it)"]
fn runs_under_open_mpi_mpirun() {
    ember_tests::require_tool("mpirun", "apt-get install openmpi-bin");
    let port = ember_transport::bootstrap::free_port().unwrap();
    let rdv = format!("EMBER_RENDEZVOUS=127.0.0.1:{port}");
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "3", "-x", "EMBER_JOB_TOKEN=mpirun-test", "-x", &rdv, EMBER, "bench", "allreduce", "-b", "1K", "-e", "256K", "-f", "16", "-n", "3"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("# ember bench allreduce: 3 ranks, transport shm"), "{out}");
    assert!(out.contains("# Out of bounds values : 0 OK"), "{out}");
}

#[test]
#[ignore = "needs mpirun: apt-get install openmpi-bin (bash .ci/run runs it)"]
fn bare_mpirun_needs_no_variables() {
    ember_tests::require_tool("mpirun", "apt-get install openmpi-bin");
    // No EMBER_JOB_TOKEN, no rendezvous: rank 0 writes a 0600 job file keyed by the job id.
    let o = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", EMBER, "bench", "a2a", "-b", "1K", "-e", "64K", "-f", "64", "-n", "3"])
        .env_remove("EMBER_JOB_TOKEN")
        .env_remove("EMBER_RENDEZVOUS")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("# ember bench a2a: 2 ranks, transport shm"), "{out}");
    assert!(out.contains("# Out of bounds values : 0 OK"), "{out}");
}

#[test]
fn split_runs_both_grid_groups_at_once() {
    // 2x3 grid in-process: sharding groups of 3, replica groups of 2, both checked.
    let o = ember(&["bench", "a2a", "--ranks", "6", "--split", "2x3", "-b", "1K", "-e", "64K", "-f", "64", "-n", "2", "-c", "2", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let rows: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("JSON row")).collect();
    assert_eq!(rows.len(), 4, "{out}");
    for r in &rows {
        assert_eq!(r["wrong"], 0);
        match r["group"].as_str().unwrap() {
            "shard" => assert_eq!((r["ranks"].as_u64(), r["members"].clone()), (Some(3), serde_json::json!([0, 2, 4]))),
            "replica" => assert_eq!((r["ranks"].as_u64(), r["members"].clone()), (Some(2), serde_json::json!([0, 1]))),
            g => panic!("group {g}"),
        }
    }
    // Across processes (shm), allreduce on a 2x2 grid.
    let o = ember(&["launch", "-n", "4", "--", EMBER, "bench", "allreduce", "--split", "2x2", "-b", "1K", "-e", "256K", "-f", "16", "-n", "2", "-c", "2"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert_eq!(out.matches("[0] # Out of bounds values : 0 OK").count(), 2, "{out}");
    // A grid that does not match the world is a clear error.
    let o = ember(&["bench", "a2a", "--ranks", "3", "--split", "2x2"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("needs 4 ranks"), "{:?}", text(&o));
}

#[test]
fn ranks_die_with_a_killed_launcher() {
    let bin = env!("CARGO_BIN_EXE_ember");
    let tag = format!("--seed {}", 1000 + std::process::id() % 1000);
    let seed = tag.split(' ').nth(1).unwrap().to_string();
    let mut child = std::process::Command::new(bin)
        .args(["launch", "-n", "2", "--", bin, "train", "--grid", "1x2", "--steps", "1000000", "--quiet", "--seed", &seed])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pattern = format!("--steps 1000000 --quiet {tag}");
    let alive = || std::process::Command::new("pgrep").args(["-f", "--", &pattern]).output().map(|o| o.stdout.len()).unwrap_or(0);
    // Whatever happens below, no rank of this test outlives it.
    struct Reap(String);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = std::process::Command::new("pkill").args(["-9", "-f", "--", &self.0]).status();
        }
    }
    let _reap = Reap(pattern.clone());
    let t0 = std::time::Instant::now();
    while alive() == 0 && t0.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(alive() > 0, "ranks did not start");
    child.kill().unwrap(); // SIGKILL the launcher only
    let _ = child.wait();
    let t1 = std::time::Instant::now();
    while alive() > 0 {
        assert!(t1.elapsed().as_secs() < 10, "ranks outlived their killed launcher");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn device_memory_bench_over_the_emulated_rdma_protocol() {
    // 3 ranks, sizes 100 B .. 200 KB in emulated device memory (CPU access would kill the
    // process), checked twice per size.
    let o = ember(&["bench", "a2a", "--transport", "rdma-emu", "--ranks", "3", "--device-memory", "-b", "100", "-e", "200K", "-f", "7", "-n", "3", "-w", "1", "-c", "2"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("transport rdma-emu (emulated device memory, direct path)"), "{out}");
    assert!(out.contains("# Out of bounds values : 0 OK"), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("  ")).count(), 4, "{out}");
    let o = ember(&["bench", "a2a", "--ranks", "2", "--device-memory"]);
    assert!(!o.status.success() && text(&o).1.contains("--device-memory: only"), "{}", text(&o).1);
}

#[test]
fn registered_buffers_bench_over_the_emulated_rdma_protocol() {
    // `--register`: each size's buffers registered once (host, then emulated device memory),
    // checked twice per size, unregistered before the next size (a region still in use would
    // fail the run).
    for extra in [&[][..], &["--device-memory"][..]] {
        let mut args = vec!["bench", "a2a", "--transport", "rdma-emu", "--ranks", "3", "--register", "-b", "100", "-e", "300K", "-f", "9", "-n", "3", "-w", "1", "-c", "2"];
        args.extend_from_slice(extra);
        let o = ember(&args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}\n{err}");
        assert!(out.contains("registered buffers"), "{out}");
        assert!(out.contains("# Out of bounds values : 0 OK"), "{out}");
        assert_eq!(out.lines().filter(|l| l.starts_with("  ")).count(), 4, "{out}");
    }
}
