//! `ember convert` and `ember train` on preprocessed data: a run on the binary copy of the
//! Criteo sample gives bitwise the text run's loss, NE and AUC (one process and a 2x2 grid),
//! the TorchRec/MLPerf layouts train, and mismatched tables, corrupted blocks and flags that
//! need binary data are clear errors. `bench data` runs end to end on a small input.
use ember_tests::{test_data, TmpDir};
use std::path::Path;
use std::process::{Command, Output};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

fn ember(args: &[&str]) -> Output {
    Command::new(EMBER).args(args).output().expect("run ember")
}

fn ok(args: &[&str]) -> String {
    let o = ember(args);
    let (out, err) = (String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "ember {args:?} failed ({}):\n{out}\n{err}", o.status);
    out.into_owned()
}

fn fails(args: &[&str]) -> String {
    let o = ember(args);
    assert_eq!(o.status.code(), Some(1), "ember {args:?} should fail");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(err.starts_with("ember: error: ") && !err.contains("panicked"), "{err}");
    err
}

fn tmp(name: &str) -> TmpDir {
    TmpDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-data-{name}-{}", std::process::id())))
}

/// The last line's JSON fields that measure the model (with the evaluations along the way on one
/// process).
fn metrics(out: &str) -> (String, String, String, String) {
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let f = |k: &str| v[k].to_string();
    (f("loss"), f("ne"), f("auc"), f("evals"))
}

#[test]
fn a_run_on_the_binary_copy_is_bitwise_the_text_run() {
    let dir = tmp("bitwise");
    let csv = test_data("criteo-sample-200.csv");
    let out = ok(&["convert", csv.to_str().unwrap(), "--out", dir.to_str().unwrap(), "--max-rows", "1000"]);
    assert!(out.contains("200 samples (0 bad lines skipped)"), "{out}");
    let bin = dir.join("criteo-sample-200.ember");
    assert!(bin.exists());
    for grid in ["1x1", "2x2"] {
        let run = |data: &Path| {
            metrics(&ok(&["train", "--data", data.to_str().unwrap(), "--max-rows", "1000", "--batch-size", "16", "--grid", grid, "--eval-every", "4", "--quiet", "--json"]))
        };
        let text = run(&csv);
        assert!(text.0.parse::<f64>().is_ok() && text.1.parse::<f64>().is_ok(), "{text:?}");
        assert_eq!(run(&bin), text, "grid {grid}: binary file");
        assert_eq!(run(&dir), text, "grid {grid}: folder of binary files");
    }
    // Other tables than the file was converted for: refused before training, naming the file.
    let err = fails(&["train", "--data", bin.to_str().unwrap(), "--batch-size", "16"]);
    assert!(err.contains("criteo-sample-200.ember: feature 0 was converted for a table of 1000 rows") && err.contains("1460 rows"), "{err}");
    // Flags that need preprocessed data, and one that needs text.
    let err = fails(&["train", "--data", csv.to_str().unwrap(), "--epochs", "2"]);
    assert!(err.contains("--epochs need binary or .npy --data") && err.contains("ember convert"), "{err}");
    let err = fails(&["train", "--data", bin.to_str().unwrap(), "--max-rows", "1000", "--skip-bad-lines"]);
    assert!(err.contains("--skip-bad-lines applies to Criteo text"), "{err}");
    // Two epochs of 180 samples: 22 steps of 16, and the eval set unchanged.
    let out = ok(&["train", "--data", bin.to_str().unwrap(), "--max-rows", "1000", "--batch-size", "16", "--epochs", "2", "--quiet", "--json"]);
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!((v["steps"].as_u64(), v["eval_samples"].as_u64()), (Some(22), Some(20)), "{out}");
}

#[test]
fn verify_finds_a_corrupted_block_and_training_a_truncated_file_fails_before_it_starts() {
    let dir = tmp("verify");
    let csv = test_data("criteo-sample-200.csv");
    ok(&["convert", csv.to_str().unwrap(), "--out", dir.to_str().unwrap(), "--max-rows", "1000"]);
    let bin = dir.join("criteo-sample-200.ember");
    assert!(ok(&["convert", "--verify", bin.to_str().unwrap()]).contains("ok (200 samples"));
    let good = std::fs::read(&bin).unwrap();
    let mut bad = good.clone();
    bad[4096] ^= 1;
    std::fs::write(&bin, &bad).unwrap();
    let err = fails(&["convert", "--verify", bin.to_str().unwrap()]);
    assert!(err.contains("criteo-sample-200.ember: block 0") && err.contains("checksum mismatch"), "{err}");
    std::fs::write(&bin, &good[..good.len() - 100]).unwrap();
    let err = fails(&["train", "--data", bin.to_str().unwrap(), "--max-rows", "1000", "--batch-size", "16"]);
    assert!(err.contains("criteo-sample-200.ember") && err.contains("truncated"), "{err}");
    // A bad line fails the conversion naming file and line, and leaves no output.
    let bad_text = dir.join("bad.csv");
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines[7] = "1,2,3";
    std::fs::write(&bad_text, lines.join("\n")).unwrap();
    let err = fails(&["convert", bad_text.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    assert!(err.contains("bad.csv:8:") && err.contains("3 fields"), "{err}");
    assert!(!dir.join("bad.ember").exists());
    let out = ok(&["convert", bad_text.to_str().unwrap(), "--out", dir.to_str().unwrap(), "--skip-bad-lines"]);
    assert!(out.contains("199 samples (1 bad lines skipped)"), "{out}");
}

#[test]
fn torchrec_and_mlperf_days_train() {
    let npy = test_data("npy");
    // Day 0 trains (5 samples), day 1 (3 samples) evaluates; one-hot and multi-hot.
    for (preset, batch) in [("kaggle", "2"), ("dlrmv2", "2")] {
        let out = ok(&[
            "train",
            "--data",
            npy.join("day_0_dense.npy").to_str().unwrap(),
            "--eval-data",
            npy.join("day_1_labels.npy").to_str().unwrap(),
            "--preset",
            preset,
            "--batch-size",
            batch,
            "--quiet",
            "--json",
        ]);
        let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        assert_eq!((v["steps"].as_u64(), v["eval_samples"].as_u64()), (Some(2), Some(3)), "{preset}: {out}");
    }
    // The folder: both days, the last 10 % of 8 samples is none: an error, not a metric of nothing.
    let err = fails(&["train", "--data", npy.to_str().unwrap(), "--batch-size", "2", "--quiet"]);
    assert!(err.contains("8 samples leave no eval set"), "{err}");
}

#[test]
fn bench_data_runs_every_path() {
    let dir = tmp("bench");
    let out = ok(&["bench", "data", "--samples", "4000", "--batch-size", "1024", "--grid", "2x2", "-n", "1", "--dir", dir.to_str().unwrap()]);
    for path in ["text parse", "convert text -> binary", "binary mmap, 1 rank", "binary mmap, rank of 2x2", "TorchRec .npy one-hot", "MLPerf .npz multi-hot", "binary mmap multi-hot"] {
        for cache in ["warm", "cold"] {
            if path.starts_with("convert") && cache == "cold" {
                continue;
            }
            assert!(out.lines().any(|l| l.starts_with(path) && l.contains(cache)), "no {path} {cache} row:\n{out}");
        }
    }
    assert!(out.contains("ember convert peak RSS") && out.contains("bench dlrm --device cpu") && out.contains("docs/gpu-results.md"), "{out}");
    assert_eq!(std::fs::read_dir(&*dir).unwrap().count(), 0, "scratch files left behind");
}

#[test]
fn convert_refuses_bad_inputs_naming_them() {
    let dir = tmp("convert-bad");
    let out = dir.join("out");
    let out_s = out.to_str().unwrap();
    let csv = test_data("criteo-sample-200.csv");
    // A file that is not there, and a folder given as a file.
    let missing = dir.join("day_5");
    let err = fails(&["convert", missing.to_str().unwrap(), "--out", out_s]);
    assert!(err.contains("day_5") && err.contains("No such file"), "{err}");
    let err = fails(&["convert", dir.to_str().unwrap(), "--out", out_s]);
    assert!(err.contains(dir.to_str().unwrap()), "{err}");
    // Empty input, and text that is not Criteo.
    let empty = dir.join("empty.tsv");
    std::fs::write(&empty, "").unwrap();
    let err = fails(&["convert", empty.to_str().unwrap(), "--out", out_s]);
    assert!(err.contains("empty.tsv: no data lines"), "{err}");
    let prose = dir.join("notes.txt");
    std::fs::write(&prose, "hello world\n").unwrap();
    let err = fails(&["convert", prose.to_str().unwrap(), "--out", out_s]);
    assert!(err.contains("notes.txt") && err.contains("not a Criteo file"), "{err}");
    // A line past the length limit names its line.
    let long = dir.join("long.tsv");
    std::fs::write(&long, format!("1\t{}\n", "7".repeat(70_000))).unwrap();
    let err = fails(&["convert", long.to_str().unwrap(), "--out", out_s]);
    assert!(err.contains("long.tsv:1:") && err.contains("longer than the limit"), "{err}");
    // Already converted, or NumPy: said so, not a parse error.
    ok(&["convert", csv.to_str().unwrap(), "--out", out_s, "--max-rows", "1000"]);
    let bin = out.join("criteo-sample-200.ember");
    let err = fails(&["convert", bin.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    assert!(err.contains("criteo-sample-200.ember: an Ember binary file already"), "{err}");
    let npy = test_data("npy").join("day_0_dense.npy");
    let err = fails(&["convert", npy.to_str().unwrap(), "--out", out_s]);
    assert!(err.contains("day_0_dense.npy: a NumPy .npy/.npz file"), "{err}");
    // Two inputs that would write one output; --out that is a file; --verify of text.
    let err = fails(&["convert", csv.to_str().unwrap(), dir.join("x/criteo-sample-200.tsv").to_str().unwrap(), "--out", out_s]);
    assert!(err.contains("would both be written to") && err.contains("criteo-sample-200.ember"), "{err}");
    let err = fails(&["convert", csv.to_str().unwrap(), "--out", empty.to_str().unwrap()]);
    assert!(err.contains("--out") && err.contains("empty.tsv"), "{err}");
    let err = fails(&["convert", "--verify", csv.to_str().unwrap()]);
    assert!(err.contains("criteo-sample-200.csv: not an Ember binary data file"), "{err}");
    // Without --out, or with an option --verify does not take: usage errors.
    assert!(fails(&["convert", csv.to_str().unwrap()]).contains("--out"));
    assert!(fails(&["convert", "--verify", bin.to_str().unwrap(), "--out", out_s]).contains("cannot be used with"));
    // Nothing half-written was left by the failures: only the one good output.
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(left, vec!["criteo-sample-200.ember".to_string()]);
}
