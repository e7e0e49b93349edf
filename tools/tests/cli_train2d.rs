//! `ember train --grid MxN`: in-process ranks, and one rank per process under `ember launch`
//! and Open MPI's mpirun (needs openmpi-bin: ignored unless asked for) — all three must give
//! bitwise the same run.
use std::process::Command;

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "stdout: {}\nstderr: {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().filter(|l| l.contains("{\"")).last().expect("a JSON line");
    let line = &line[line.find('{').unwrap()..]; // strip a launcher's "[0] " prefix
    serde_json::from_str(line).unwrap()
}

const ARGS: [&str; 7] = ["train", "--grid", "2x2", "--steps", "20", "--json", "--quiet"];

#[test]
fn grid_training_reports_stages_and_bytes() {
    let out = Command::new(env!("CARGO_BIN_EXE_ember")).args(ARGS).output().unwrap();
    let v = json_of(&out);
    assert_eq!(v["grid"], "2x2");
    for k in ["input_dist", "lookup", "output_dist", "dense", "backward", "sync"] {
        assert!(v["stages"][k].as_f64().unwrap() >= 0.0, "stage {k}");
    }
    assert!(v["a2a_bytes_per_rank"].as_f64().unwrap() > 0.0);
    assert!(v["sync_bytes_per_rank"].as_f64().unwrap() > 0.0);
}

#[test]
fn a_run_that_stops_between_syncs_ends_with_identical_replicas() {
    // 10 steps with a sync every 4: the run ends with a last sync, and `--json` says so (a CRC of
    // every shard compared across its replica group).
    for extra in [&[][..], &["--delayed-state-sync"][..], &["--fully-sharded"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_ember")).args(["train", "--grid", "2x2", "--sync-every", "4", "--steps", "10", "--json", "--quiet"]).args(extra).output().unwrap();
        let v = json_of(&out);
        assert_eq!(v["replicas_identical"], true, "{extra:?}: {v}");
    }
}

#[test]
fn multi_process_under_ember_launch_equals_in_process() {
    let bin = env!("CARGO_BIN_EXE_ember");
    let local = json_of(&Command::new(bin).args(ARGS).output().unwrap());
    let mut launch = vec!["launch", "-n", "4", "--timeout-ms", "20000", "--", bin];
    launch.extend(ARGS);
    let multi = json_of(&Command::new(bin).args(&launch).output().unwrap());
    assert_eq!(local["loss"], multi["loss"], "training loss differs between in-process and multi-process runs");
    assert_eq!(local["auc"], multi["auc"]);
    assert_eq!(local["a2a_bytes_per_rank"], multi["a2a_bytes_per_rank"]);
}

#[test]
#[ignore = "needs mpirun: apt-get install openmpi-bin (bash .ci/run runs it)"]
fn multi_process_under_mpirun_equals_in_process() {
    ember_tests::require_tool("mpirun", "apt-get install openmpi-bin");
    let bin = env!("CARGO_BIN_EXE_ember");
    let local = json_of(&Command::new(bin).args(ARGS).output().unwrap());
    let port = ember_transport::bootstrap::free_port().unwrap();
    let rv = format!("EMBER_RENDEZVOUS=127.0.0.1:{port}");
    let mut args = vec!["--allow-run-as-root", "--oversubscribe", "-np", "4", "-x", &rv, "-x", "EMBER_JOB_TOKEN=cli-test-token", bin];
    args.extend(ARGS);
    let out = Command::new("mpirun").args(&args).env("OMPI_MCA_plm_rsh_agent", "").output().unwrap();
    let multi = json_of(&out);
    assert_eq!(local["loss"], multi["loss"]);
    assert_eq!(local["auc"], multi["auc"]);
}

#[test]
fn wrong_world_size_is_a_clear_error() {
    let bin = env!("CARGO_BIN_EXE_ember");
    let out = Command::new(bin)
        .args(["launch", "-n", "2", "--timeout-ms", "5000", "--", bin, "train", "--grid", "2x2", "--steps", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("needs 4 ranks") && all.contains("started 2"), "{all}");
}

#[test]
fn the_trace_shows_communication_overlapping_compute() {
    let dir = std::env::temp_dir().join(format!("ember-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("t.json");
    // A 2x2 run's trace with `--overlap-sync MODE` (explicit: `auto` depends on the cores), as
    // rank → stage name → spans (start, end) in µs.
    let trace = |mode: &str| -> Box<dyn Fn(&str, u64) -> Vec<(f64, f64)>> {
        let out = Command::new(env!("CARGO_BIN_EXE_ember"))
            .args(["train", "--grid", "2x2", "--steps", "6", "--quiet", "--overlap-sync", mode, "--trace", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let ev = v["traceEvents"].as_array().unwrap().clone();
        Box::new(move |name: &str, rank: u64| {
            ev.iter()
                .filter(|e| e["name"] == name && e["tid"] == rank)
                .map(|e| (e["ts"].as_f64().unwrap(), e["ts"].as_f64().unwrap() + e["dur"].as_f64().unwrap()))
                .collect()
        })
    };
    let spans = trace("on");
    let mut overlapping = 0;
    for rank in 0..4 {
        for stage in ["input_dist", "lookup", "output_dist", "dense", "backward", "sync"] {
            assert!(!spans(stage, rank).is_empty(), "rank {rank} has no {stage} span");
        }
        // The dense all-reduce is in flight while the embedding backward runs.
        let ar = spans("dense_all_reduce (overlapped)", rank);
        let bw = spans("backward", rank);
        assert_eq!(ar.len(), 6);
        assert!(ar.iter().all(|a| bw.iter().any(|b| a.0 <= b.0 && b.1 <= a.1)), "rank {rank}: all-reduce does not cover a backward");
        // The replica sync runs on a thread of its own beside the dense update, and the step
        // then waits for what is left of it (a span of its own).
        let (sync, dense) = (spans("sync", rank), spans("dense", rank));
        assert_eq!(sync.len(), 6);
        overlapping += sync.iter().filter(|s| dense.iter().any(|d| s.0 <= d.0 && d.0 < s.1)).count();
        assert_eq!(spans("sync (wait after the dense update)", rank).len(), 6);
    }
    // A dense update begins while a sync is in flight (on a loaded machine a small sync may end
    // before its update begins, so not at every step).
    assert!(overlapping > 0, "no sync span overlaps a dense update");
    // `--overlap-sync off`: the sync runs on the rank's own thread, so no dense work begins while
    // a sync is in flight.
    let spans = trace("off");
    for rank in 0..4 {
        let (sync, dense) = (spans("sync", rank), spans("dense", rank));
        assert_eq!(sync.len(), 6);
        assert!(sync.iter().all(|s| dense.iter().all(|d| !(s.0 < d.0 && d.0 < s.1))), "rank {rank}: dense work began during a sync with --overlap-sync off");
        assert!(spans("sync (wait after the dense update)", rank).is_empty());
    }
}

#[test]
fn grid_training_reads_criteo_files_like_one_process() {
    // SGD, K = 1: the 2D run on the shared Criteo sample ends at the one-process model, so the
    // held-out AUC agrees; multi-process reads its samples from its own reader, bitwise the same.
    let data = ember_tests::test_data("criteo-sample-200.csv");
    let data = data.to_str().unwrap();
    let mut c = ember_engine::config::preset("kaggle", Some(5000)).unwrap();
    c.batch_size = 16;
    c.steps = None;
    c.optim.embedding = ember_engine::config::EmbOptimizer::Sgd { lr: 0.5 };
    c.optim.dense = ember_engine::config::DenseOptimizer::Sgd { lr: 0.05 };
    let cfg = std::env::temp_dir().join(format!("ember-criteo2d-{}.toml", std::process::id()));
    std::fs::write(&cfg, c.to_toml()).unwrap();
    let cfg = cfg.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_ember");
    let base = ["train", "--config", cfg, "--data", data, "--json", "--quiet"];
    let one = json_of(&Command::new(bin).args(base).args(["--steps", "11"]).output().unwrap());
    let grid = json_of(&Command::new(bin).args(base).args(["--steps", "11", "--grid", "2x2"]).output().unwrap());
    assert!((one["auc"].as_f64().unwrap() - grid["auc"].as_f64().unwrap()).abs() < 1e-6, "{} vs {}", one["auc"], grid["auc"]);
    let mut launch = vec!["launch", "-n", "4", "--timeout-ms", "20000", "--", bin];
    launch.extend(base);
    launch.extend(["--steps", "11", "--grid", "2x2"]);
    let multi = json_of(&Command::new(bin).args(&launch).output().unwrap());
    assert_eq!(grid["loss"], multi["loss"]);
    assert_eq!(grid["auc"], multi["auc"]);
}

#[test]
fn buffer_transports_give_the_same_run_and_bad_choices_are_refused() {
    let bin = env!("CARGO_BIN_EXE_ember");
    let host = json_of(&Command::new(bin).args(ARGS).args(["--xfer", "host"]).output().unwrap());
    for x in ["peers", "staged", "auto"] {
        let v = json_of(&Command::new(bin).args(ARGS).args(["--xfer", x]).output().unwrap());
        assert_eq!(v["loss"], host["loss"], "--xfer {x}: training loss differs from --xfer host");
        assert_eq!(v["auc"], host["auc"], "--xfer {x}");
    }
    let out = Command::new(bin).args(ARGS).args(["--xfer", "bogus"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("'bogus'") && err.contains("--xfer") && err.contains("peers") && err.contains("direct"), "{err}");
    // Peer copies need ranks in one address space: refused under a launcher's processes.
    let mut launch = vec!["launch", "-n", "4", "--timeout-ms", "20000", "--", bin];
    launch.extend(ARGS);
    launch.extend(["--xfer", "peers"]);
    let out = Command::new(bin).args(&launch).output().unwrap();
    assert!(!out.status.success());
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("needs in-process ranks"), "{text}");
    // GPUDirect RDMA needs the RDMA transport: refused in-process and over shared memory,
    // naming the rank and the transport.
    let out = Command::new(bin).args(ARGS).args(["--xfer", "direct"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("GPUDirect RDMA") && text.contains("local"), "{text}");
    let mut launch = vec!["launch", "-n", "4", "--timeout-ms", "20000", "--", bin];
    launch.extend(ARGS);
    launch.extend(["--xfer", "direct"]);
    let out = Command::new(bin).args(&launch).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() && text.contains("GPUDirect RDMA") && text.contains("shm"), "{text}");
}

#[test]
#[cfg(not(feature = "cuda"))]
fn cuda_grid_without_the_feature_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ember")).args(ARGS).args(["--device", "cuda"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("built without the `cuda` feature"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn table_row_wise_over_a_node_across_processes_sends_the_planned_bytes() {
    // 4 ranks per node: each table-row-wise table spans 4 of the 8 ranks of the group. One rank
    // per process gives the in-process run's bytes and loss, and the table-row-wise collectives
    // (sized by the plan, not by the ids) carry exactly what `ember plan` predicts for rank 0.
    let bin = env!("CARGO_BIN_EXE_ember");
    let args = ["train", "--grid", "1x8", "--sharding", "table-row", "--ranks-per-node", "4", "--steps", "3", "--json", "--quiet"];
    let local = json_of(&Command::new(bin).args(args).output().unwrap());
    let mut launch = vec!["launch", "-n", "8", "--timeout-ms", "30000", "--", bin];
    launch.extend(args);
    let multi = json_of(&Command::new(bin).args(&launch).output().unwrap());
    assert_eq!(local["loss"], multi["loss"]);
    assert_eq!(local["bytes_per_step"], multi["bytes_per_step"]);
    let plan = json_of(&Command::new(bin).args(["plan", "--grid", "1x8", "--sharding", "table-row", "--ranks-per-node", "4", "--json"]).output().unwrap());
    assert_eq!(plan["group_ranks_per_node"], 4);
    let planned = &plan["ranks"][0]["traffic"];
    for k in ["output_trw_reduce", "output_trw_owners", "grad_trw_owners", "grad_trw_gather", "dense_all_reduce"] {
        let (p, m) = (planned[k].as_f64().unwrap(), multi["bytes_per_step"][k].as_f64().unwrap());
        assert!((p - m).abs() <= 1e-9 * p.max(1.0), "{k}: planned {p}, measured {m}");
    }
    assert!(planned["output_trw_reduce"].as_f64().unwrap() > 0.0);
}

/// `--device emulated`: the device code paths train like the CPU backend (same loss, NE, AUC),
/// and the report carries the host<->device bytes: with in-process peers the sync's packed
/// values never reach the host (device -> host 0); staged, and across processes (where device
/// buffers are staged through host memory), they go down once: exactly the sync's value bytes.
#[test]
fn emulated_device_trains_like_the_cpu_and_reports_host_device_bytes() {
    let bin = env!("CARGO_BIN_EXE_ember");
    let args = ["train", "--grid", "2x1", "--steps", "6", "--json", "--quiet"];
    let cpu = json_of(&Command::new(bin).args(args).output().unwrap());
    assert!(cpu.get("sync_host_device_bytes_per_step").is_none(), "the CPU backend counts nothing: {cpu}");
    let mut launch = vec!["launch", "-n", "2", "--timeout-ms", "20000", "--", bin];
    launch.extend(args);
    launch.extend(["--device", "emulated"]);
    for (what, cmd, staged) in [
        ("peers", [&args[..], &["--device", "emulated"]].concat(), false),
        ("staged", [&args[..], &["--device", "emulated", "--xfer", "staged"]].concat(), true),
        ("two processes", launch, true),
    ] {
        let v = json_of(&Command::new(bin).args(&cmd).output().unwrap());
        for k in ["loss", "ne", "auc", "sync_bytes_per_rank"] {
            assert_eq!(v[k], cpu[k], "{what}: {k}");
        }
        let sync = &v["sync_host_device_bytes_per_step"];
        let values = v["bytes_per_step"]["sync_values"].as_u64().unwrap();
        assert!(values > 0, "{what}: {v}");
        assert_eq!(sync["device_to_host"].as_u64().unwrap(), if staged { values } else { 0 }, "{what}: {v}");
        let up = sync["host_to_device"].as_u64().unwrap();
        assert!(up > 0 && up < values * 2, "{what}: indices (and staged values) up: {v}");
        assert!(v["host_device_bytes_per_step"]["host_to_device"].as_u64().unwrap() > up, "{what}: {v}");
    }
}

/// `ember selftest --device emulated`: every backend check, then the 2D self-test on the device
/// paths (peers, staged) against the CPU backend, all passing.
#[test]
fn selftest_on_the_emulated_device_passes() {
    let out = Command::new(env!("CARGO_BIN_EXE_ember")).args(["selftest", "--device", "emulated"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    for table in ["emulated vs cpu", "emulated 2D (peers) vs cpu", "emulated 2D (staged) vs cpu"] {
        assert!(text.contains(table), "{table} missing:\n{text}");
    }
    assert_eq!(text.matches(" passed, 0 failed").count(), 3, "{text}");
}
