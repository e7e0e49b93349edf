//! Inputs from outside through the CLI: absurd numbers in flags and configs, unknown config
//! keys, runs that cannot fit in memory, data files with nothing to train or evaluate on, and
//! checkpoint folders of another run are refused up front with exit status 1 and a message
//! naming the flag, key, file or folder, never a panic, an abort or a fake result.
use std::path::PathBuf;
use std::process::{Command, Output};

fn ember_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ember"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run ember")
}

fn ember(args: &[&str]) -> Output {
    ember_env(args, &[])
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-limits-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::remove_file(&d);
    d
}

/// `out` failed with status 1 (not a signal or a panic) and stderr mentions every needle.
#[track_caller]
fn refused(what: &str, out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: expected exit status 1, got {:?}; stderr: {err}", out.status);
    assert!(!err.contains("panicked"), "{what} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{what}: stderr lacks {n:?}: {err}");
    }
}

#[test]
fn absurd_flag_values_are_refused_naming_the_flag() {
    for (args, needles) in [
        (vec!["train", "--steps", "0"], vec!["--steps"]),
        (vec!["train", "--steps", "100000000000000"], vec!["--steps"]),
        (vec!["train", "--max-rows", "0"], vec!["--max-rows"]),
        (vec!["train", "--batch-size", "0"], vec!["--batch-size"]),
        (vec!["train", "--grid", "4294967296x4294967296"], vec!["grid", "4294967296"]),
        (vec!["train", "--grid", "0x2"], vec!["grid"]),
        (vec!["train", "--sync-every", "0"], vec!["--sync-every"]),
        (vec!["train", "--keep", "0", "--checkpoint-dir", "/nonexistent"], vec!["--keep"]),
        (vec!["train", "--momentum-c", "NaN"], vec!["--momentum-c"]),
        (vec!["bench", "a2a", "--ranks", "0"], vec!["--ranks"]),
        (vec!["bench", "a2a", "--ranks", "2", "-f", "1"], vec!["--step-factor"]),
        (vec!["bench", "embedding", "--rows", "0"], vec!["--rows"]),
        (vec!["bench", "embedding", "--zipf", "nan"], vec!["--zipf"]),
        (vec!["plan", "--memory-budget-gib", "inf"], vec!["--memory-budget-gib"]),
        (vec!["launch", "-n", "0", "--", "true"], vec!["--nproc"]),
        (vec!["train", "--data", "/nonexistent", "--epochs", "0"], vec!["--epochs"]),
        (vec!["convert", "--out", "/nonexistent", "--max-rows", "0", "x.tsv"], vec!["--max-rows"]),
        (vec!["bench", "data", "--samples", "999"], vec!["--samples"]),
        (vec!["bench", "data", "--samples", "100000000000"], vec!["--samples"]),
        (vec!["bench", "data", "--batch-size", "0"], vec!["--batch-size"]),
        (vec!["bench", "data", "--iters", "0"], vec!["--iters"]),
        (vec!["bench", "a2a", "--ranks", "2", "--timeout-ms", "604800001"], vec!["--timeout-ms"]),
        (vec!["launch", "--timeout-ms", "0", "--", "true"], vec!["--timeout-ms"]),
    ] {
        refused(&format!("{args:?}"), &ember(&args), &needles);
    }
}

#[test]
fn bad_transport_variables_are_refused_naming_the_variable() {
    // Each is read when its transport is built: the benchmark fails at start, before any row.
    let a2a = |t: &'static str| vec!["bench", "a2a", "--transport", t, "--ranks", "2", "-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "-c", "0"];
    for (t, var, v, accepted) in [
        ("shm", "EMBER_SHM_EAGER", "300000", "bytes from 0 to 262144"),
        ("shm", "EMBER_SHM_DIRECT", "yes", "`0` or `1`"),
        ("shm", "EMBER_SHM_COPY", "cma", "`auto` or `staged`"),
        ("shm", "EMBER_SPIN_US", "-1", "microseconds from 0 to 1000000"),
        ("tcp", "EMBER_TCP_SOCKBUF", "4M", "bytes from 0 to 1073741824"),
        ("tcp", "EMBER_MAX_ALLOC_BYTES", "0", "bytes from 1 to"),
        ("shm", "EMBER_MAX_ALLOC_BYTES", "1G", "bytes from 1 to"),
        ("rdma-emu", "EMBER_RDMA_SLOTS", "lots", "slots from 1 to 256"),
        ("rdma-emu", "EMBER_RDMA_CHUNK", "256k", "bytes from 1 to 1073741824"),
    ] {
        let what = format!("{t}: {var}={v}");
        refused(&what, &ember_env(&a2a(t), &[(var, v)]), &[&format!("{var}=\"{v}\""), accepted]);
    }
    // Joining a job from the launcher's variables (one rank, no launcher).
    let one = ["bench", "a2a", "-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "-c", "0"];
    for v in ["60s", "0", "604800001"] {
        refused(&format!("EMBER_TIMEOUT_MS={v}"), &ember_env(&one, &[("EMBER_TIMEOUT_MS", v)]), &["EMBER_TIMEOUT_MS", "milliseconds from 1 to 604800000"]);
    }
}

/// Write `text` as a config file; returns its path.
fn config(name: &str, text: &str) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The tiny preset's config with `edit` applied to its TOML text.
fn tiny_with(edit: impl Fn(&str) -> String) -> String {
    edit(&ember_engine::config::preset("tiny", None).unwrap().to_toml())
}

#[test]
fn absurd_config_values_and_unknown_keys_are_refused_naming_the_key() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        ("huge rows", tiny_with(|t| t.replacen("rows = 1000\n", "rows = 9223372036854775807\n", 1)), vec!["model.tables[0].rows", "9223372036854775807"]),
        ("nan wd", tiny_with(|t| t.replace("[optim.weight_decay]\nkind = \"none\"", "[optim.weight_decay]\nkind = \"l2\"\nwd = nan")), vec!["optim.weight_decay.wd", "NaN"]),
        ("nan zipf", tiny_with(|t| t.replace("zipf = 1.05", "zipf = nan")), vec!["synthetic.zipf"]),
        ("nan signal", tiny_with(|t| t.replace("signal = 1.0", "signal = nan")), vec!["synthetic.signal"]),
        ("infinite lr", tiny_with(|t| t.lines().map(|l| if l.starts_with("lr = 0.05") { "lr = inf" } else { l }).collect::<Vec<_>>().join("\n")), vec!["optim.embedding.lr"]),
        ("steps 0", tiny_with(|t| t.replace("steps = 600", "steps = 0")), vec!["steps = 0"]),
        ("no eval samples", tiny_with(|t| t.replace("eval_samples = 16384", "eval_samples = 0")), vec!["synthetic.eval_samples"]),
        ("huge batch", tiny_with(|t| t.replace("batch_size = 256", "batch_size = 1000000000000")), vec!["batch_size"]),
        ("unknown top-level key", tiny_with(|t| format!("stesp = 10\n{t}")), vec!["stesp"]),
        ("unknown table key", tiny_with(|t| t.replacen("rows = 1000\n", "rows = 1000\nrowz = 5\n", 1)), vec!["rowz"]),
        ("unknown optimizer key", tiny_with(|t| t.replacen("lr = 0.05", "lr = 0.05\nepsilon = 1.0", 1)), vec!["epsilon"]),
    ];
    for (what, text, needles) in cases {
        let p = config(&format!("cfg-{}", what.replace(' ', "-")), &text);
        refused(what, &ember(&["train", "--config", p.to_str().unwrap(), "--steps", "1", "--quiet"]), &needles);
    }
    // A config file that is not a few kilobytes is not read whole.
    refused("huge config", &ember(&["train", "--config", "/dev/zero"]), &["--config", "bytes"]);
}

#[test]
fn a_run_that_cannot_fit_in_memory_is_refused_before_allocating() {
    // The figure is overridable; with 1 MiB available even the tiny model does not fit.
    let out = ember_env(&["train", "--steps", "1", "--quiet"], &[("EMBER_MEMORY_AVAILABLE", "1M")]);
    refused("tiny in 1 MiB", &out, &["GiB per rank", "0.00 GiB available"]);
    // In-process ranks add up.
    let out = ember_env(&["train", "--grid", "2x2", "--steps", "1", "--quiet"], &[("EMBER_MEMORY_AVAILABLE", "1M")]);
    refused("2x2 in 1 MiB", &out, &["GiB per rank", "4 ranks in this process"]);
    // DLRMv2 at full size (40M-row tables, dim 128) needs hundreds of GiB.
    let t0 = std::time::Instant::now();
    let out = ember_env(&["train", "--preset", "dlrmv2", "--max-rows", "999999999999", "--steps", "1", "--quiet"], &[("EMBER_MEMORY_AVAILABLE", "16G")]);
    refused("dlrmv2 uncapped", &out, &["GiB per rank", "16.00 GiB available"]);
    assert!(t0.elapsed().as_secs() < 30, "the refusal must come before any allocation");
    // The same run fits with room to spare.
    let out = ember_env(&["train", "--steps", "1", "--quiet"], &[("EMBER_MEMORY_AVAILABLE", "64G")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn sample_lines() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/criteo-sample-200.csv")).unwrap();
    text.lines().map(String::from).collect()
}

#[test]
fn data_files_with_nothing_to_train_or_evaluate_on_are_errors() {
    let lines = sample_lines();
    let header_only = tmp("header-only.csv");
    std::fs::write(&header_only, format!("{}\n", lines[0])).unwrap();
    refused("header only", &ember(&["train", "--data", header_only.to_str().unwrap(), "--quiet"]), &["no data lines"]);
    // 5 data lines: the last 10 % is no line at all, so there is no AUC to report.
    let five = tmp("five.csv");
    std::fs::write(&five, lines[..6].join("\n") + "\n").unwrap();
    refused("five lines", &ember(&["train", "--data", five.to_str().unwrap(), "--quiet"]), &["no eval set"]);
    refused("five lines, 2D", &ember(&["train", "--data", five.to_str().unwrap(), "--grid", "1x2", "--quiet"]), &["no eval set"]);
}

#[test]
fn an_overlong_line_is_a_bad_line_not_a_memory_hog() {
    let mut lines = sample_lines();
    let long = tmp("long.csv");
    lines[3] = "1".repeat(200_000);
    std::fs::write(&long, lines.join("\n") + "\n").unwrap();
    refused("long line", &ember(&["train", "--data", long.to_str().unwrap(), "--quiet"]), &[":4:", "limit of 65536"]);
    // Skipped on request like any bad line.
    let out = ember(&["train", "--data", long.to_str().unwrap(), "--skip-bad-lines", "--quiet", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["skipped_lines"], 1);
    // A file without any newline is refused at its first line.
    let one = tmp("one-line.csv");
    std::fs::write(&one, "1,".repeat(100_000)).unwrap();
    refused("no newline", &ember(&["train", "--data", one.to_str().unwrap(), "--quiet"]), &["line 1", "limit of 65536"]);
}

#[test]
fn a_checkpoint_folder_of_another_run_is_refused_unless_overwritten() {
    let dir = tmp("ck-other-run");
    let d = dir.to_str().unwrap();
    let run = |extra: &[&str]| ember(&[&["train", "--grid", "1x2", "--checkpoint-dir", d, "--checkpoint-every", "4", "--keep", "1", "--quiet"][..], extra].concat());
    let a = run(&["--steps", "8"]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let a_id = std::fs::read_to_string(dir.join("run-id")).unwrap();
    // A new run (no --resume) in the same folder: refused, and run A's checkpoint untouched.
    refused("second run", &run(&["--steps", "4"]), &[d, "another run", a_id.trim(), "--overwrite-checkpoints"]);
    assert!(dir.join("step-8/manifest.json").is_file());
    // Told to overwrite: run A's checkpoints go first, then B keeps its own step-4 (which the
    // old pruning by step number deleted in favour of A's step-8).
    let b = run(&["--steps", "4", "--overwrite-checkpoints"]);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let b_id = std::fs::read_to_string(dir.join("run-id")).unwrap();
    assert_ne!(a_id, b_id);
    assert!(dir.join("step-4/manifest.json").is_file(), "run B's own checkpoint was pruned");
    assert!(!dir.join("step-8").exists(), "run A's checkpoint is still there");
    // --resume continues run B (from its step 4), under its id.
    let c = run(&["--steps", "8", "--resume", "--json"]);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&c.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["steps"], 4, "resumed at run B's step 4");
    assert_eq!(std::fs::read_to_string(dir.join("run-id")).unwrap(), b_id);
    assert!(dir.join("step-8/manifest.json").is_file() && !dir.join("step-4").exists(), "keep 1 keeps run B's newest");
}

/// Rewrite the manifest of step folder `step` through `edit` (on its JSON), with a valid CRC.
fn edit_manifest(step: &std::path::Path, edit: impl Fn(&mut serde_json::Value)) {
    let p = step.join("manifest.json");
    let text = std::fs::read_to_string(&p).unwrap();
    let mut env: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut env["manifest"]);
    let body = serde_json::to_string(&env["manifest"]).unwrap();
    let crc = crc32fast::hash(body.as_bytes());
    std::fs::write(&p, format!("{{\"crc32\":\"{crc:08x}\",\"manifest\":{body}}}\n")).unwrap();
}

#[test]
fn manifests_name_only_files_of_their_own_folder_and_sizes_never_wrap() {
    let dir = tmp("ck-manifest");
    let out = ember(&["train", "--steps", "2", "--grid", "1x1", "--checkpoint-dir", dir.to_str().unwrap(), "--checkpoint-every", "2", "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let step = dir.join("step-2");
    let pristine = std::fs::read(step.join("manifest.json")).unwrap();
    // A file outside the folder, made to look right (its size is the dense file's).
    let outside = dir.join("secret.bin");
    std::fs::copy(step.join("dense.bin"), &outside).unwrap();
    for (what, name) in [("relative", "../secret.bin".to_string()), ("absolute", outside.to_str().unwrap().to_string())] {
        std::fs::write(step.join("manifest.json"), &pristine).unwrap();
        edit_manifest(&step, |m| {
            for f in m["files"].as_array_mut().unwrap() {
                if f["name"] == "dense.bin" {
                    f["name"] = name.clone().into();
                }
            }
        });
        let out = ember(&["checkpoint", "inspect", step.to_str().unwrap()]);
        refused(what, &out, &["verification failed"]);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(report.contains("plain files") && report.contains("secret.bin"), "{what}: {report}");
        // Neither its size nor its CRC is reported: the manifest is refused before any file.
        assert!(!report.lines().any(|l| l.contains("secret.bin") && l.contains("crc32")), "{what}: inspect read the outside file: {report}");
    }
    // Shard rows that make the size formula overflow: an error, not a panic or a wrapped size.
    std::fs::write(step.join("manifest.json"), &pristine).unwrap();
    edit_manifest(&step, |m| {
        let huge = serde_json::json!(1u64 << 62);
        m["model"]["tables"][0]["rows"] = huge.clone();
        m["plan"]["tables"][0]["shards"][0]["rows"]["end"] = huge.clone();
        for f in m["files"].as_array_mut().unwrap() {
            if f["kind"] == "shard" && f["spec"]["table"] == 0 {
                f["spec"]["table_rows"] = huge.clone();
                f["spec"]["rows"]["end"] = huge.clone();
            }
        }
    });
    let out = ember(&["checkpoint", "inspect", step.to_str().unwrap()]);
    refused("huge shard", &out, &["verification failed"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("model.tables[0].rows"), "{}", String::from_utf8_lossy(&out.stdout));
    std::fs::write(step.join("manifest.json"), &pristine).unwrap();
    edit_manifest(&step, |m| {
        for f in m["files"].as_array_mut().unwrap() {
            if f["kind"] == "dense" {
                f["lens"][0][0] = serde_json::json!(u64::MAX / 2);
            }
        }
    });
    let out = ember(&["checkpoint", "inspect", step.to_str().unwrap()]);
    refused("huge dense", &out, &["verification failed"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("dense.bin"), "{}", String::from_utf8_lossy(&out.stdout));
}
