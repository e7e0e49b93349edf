//! What `ember` tells its user: the launcher runs its own executable and names a rank killed
//! by a signal; in-process ranks report the failing rank's own error, not the transport noise it
//! causes; a run says when the data ends before --steps; skipped lines are counted; resumes say
//! from where, saves are announced, a damaged newest checkpoint names the newest intact one;
//! in-process grids refuse a transport they cannot use; `plan` refuses the batch `train`
//! refuses; and `--checkpoint-dir` at 1x1 changes neither the model nor the output.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

fn ember(args: &[&str]) -> Output {
    Command::new(EMBER).args(args).output().expect("run ember")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Run `ember args`, which must succeed; (stdout, stderr).
fn ok(args: &[&str]) -> (String, String) {
    let o = ember(args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "ember {args:?} failed ({}):\n{out}\n{err}", o.status);
    (out, err)
}

/// Run `ember args`, which must exit 1; its stderr.
fn fails(args: &[&str]) -> String {
    let o = ember(args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "ember {args:?}:\n{out}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn last_json(out: &str) -> serde_json::Value {
    let line = out.lines().filter(|l| l.contains("{\"")).last().expect("a JSON line");
    serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-msg-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn sample() -> PathBuf {
    ember_tests::test_data("criteo-sample-200.csv")
}

/// The Criteo sample (a header and 200 data lines) with data lines `bad` (0-based) malformed.
fn sample_with_bad_lines(name: &str, bad: &[usize]) -> PathBuf {
    let text = std::fs::read_to_string(sample()).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    for &i in bad {
        lines[1 + i] = "1,2,3";
    }
    let p = tmp(name).with_extension("csv");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

const ON_SAMPLE: [&str; 6] = ["--batch-size", "16", "--max-rows", "5000", "--quiet", "--json"];

#[test]
fn launch_runs_its_own_executable_and_defaults_to_one_sharding_group() {
    // No `ember` on PATH: the launcher starts itself. Without --grid, T = 3 processes are 1x3.
    let o = Command::new(EMBER)
        .args(["launch", "-n", "3", "--timeout-ms", "20000", "--", "ember", "train", "--batch-size", "240", "--steps", "4", "--json", "--quiet"])
        .env("PATH", "/nonexistent")
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    let launched = last_json(&out);
    assert_eq!(launched["grid"], "1x3");
    let threads = last_json(&ok(&["train", "--grid", "1x3", "--batch-size", "240", "--steps", "4", "--json", "--quiet"]).0);
    assert_eq!(launched["loss"], threads["loss"]);
    assert_eq!(launched["auc"], threads["auc"]);
}

#[test]
fn the_launcher_names_a_killed_rank_and_its_signal() {
    // Rank 1 dies by SIGKILL as the others fail (as real ranks do when a peer vanishes): the
    // launcher sees the exits together, the killed rank is still the one it names.
    let o = ember(&["launch", "-n", "3", "--", "sh", "-c", "sleep 0.3; if [ $RANK = 1 ]; then kill -9 $$; fi; exit 3"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(128 + 9), "{err}");
    assert!(err.contains("ember launch: rank 1 killed by signal 9 (SIGKILL) (then rank "), "{err}");
    // Without a signal: the first rank to fail, with its own status.
    let o = ember(&["launch", "-n", "2", "--", "sh", "-c", "if [ $RANK = 1 ]; then exit 5; fi; sleep 1; exit 4"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("ember launch: rank 1 exited with status 5 (then rank 0 exited with status 4)"), "{err}");
}

#[test]
fn in_process_ranks_report_the_failing_ranks_own_error() {
    // Data line 57 (file line 59) is malformed: sample 9 of the fourth batch of 16, which world
    // rank 1 reads on both grids. Only that rank sees why; rank 0 sees its peer vanish.
    let bad = sample_with_bad_lines("rank-error", &[57]);
    let b = bad.to_str().unwrap();
    for grid in ["1x2", "2x2"] {
        let err = fails(&["train", "--data", b, "--grid", grid, "--batch-size", "16", "--max-rows", "5000", "--quiet"]);
        assert!(err.contains(&format!("{b}:59: 3 fields, expected 40")), "--grid {grid}: {err}");
        assert!(!err.contains("dropped") && !err.contains("transport"), "--grid {grid}: {err}");
    }
}

#[test]
fn training_says_when_it_stops_at_the_end_of_the_data() {
    let data = sample();
    let d = data.to_str().unwrap();
    for grid in ["1x1", "2x2"] {
        let (out, err) = ok(&[&["train", "--data", d, "--grid", grid, "--steps", "50"][..], &ON_SAMPLE].concat());
        assert!(err.contains("the data holds 11 batches of 16 (180 training samples, one epoch): training stops after step 11, not --steps 50"), "{grid}: {err}");
        assert_eq!(last_json(&out)["steps"], 11, "{grid}");
        let (_, err) = ok(&[&["train", "--data", d, "--grid", grid, "--steps", "5"][..], &ON_SAMPLE].concat());
        assert!(!err.contains("stops"), "{grid}: {err}");
    }
}

#[test]
fn skipped_lines_are_counted_after_training_read_them() {
    // Two bad lines among the 180 training lines, one among the 20 held out.
    let bad = sample_with_bad_lines("skip", &[10, 100, 195]);
    let (out, _) = ok(&[&["train", "--data", bad.to_str().unwrap(), "--skip-bad-lines"][..], &ON_SAMPLE].concat());
    assert_eq!(last_json(&out)["skipped_lines"], 3, "{out}");
    let (out, _) = ok(&["train", "--data", bad.to_str().unwrap(), "--skip-bad-lines", "--batch-size", "16", "--max-rows", "5000", "--quiet"]);
    assert!(out.contains("skipped lines   3"), "{out}");
}

#[test]
fn resume_says_where_it_starts_and_every_save_is_announced() {
    for grid in ["1x1", "2x2"] {
        let dir = tmp(&format!("announce-{grid}"));
        let d = dir.to_str().unwrap();
        let base = ["train", "--grid", grid, "--checkpoint-dir", d, "--checkpoint-every", "4", "--quiet"];
        let (_, err) = ok(&[&base[..], &["--steps", "8"]].concat());
        for s in [4, 8] {
            assert!(err.contains(&format!("checkpoint: saved {d}/step-{s}\n")), "{grid}: {err}");
        }
        let (_, err) = ok(&[&base[..], &["--steps", "12", "--resume"]].concat());
        assert!(err.contains(&format!("checkpoint: resumed from {d}/step-8 (step 8)\n")), "{grid}: {err}");
        assert!(err.contains(&format!("checkpoint: saved {d}/step-12\n")), "{grid}: {err}");
        let empty = tmp(&format!("empty-{grid}"));
        let e = empty.to_str().unwrap();
        let (_, err) = ok(&["train", "--grid", grid, "--steps", "2", "--checkpoint-dir", e, "--resume", "--quiet"]);
        assert!(err.contains(&format!("checkpoint: no checkpoint in {e} yet: starting from step 0")), "{grid}: {err}");
        let err = fails(&["train", "--grid", grid, "--steps", "2", "--resume"]);
        assert!(err.contains("--resume and --checkpoint-every need --checkpoint-dir"), "{grid}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&empty);
    }
}

/// Flip a byte near the end of the first shard file of `step_dir`.
fn damage_a_shard(step_dir: &Path) {
    let shard = std::fs::read_dir(step_dir).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().contains("shard-")).unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let k = bytes.len() - 3;
    bytes[k] ^= 0x10;
    std::fs::write(&shard, bytes).unwrap();
}

#[test]
fn a_damaged_newest_checkpoint_names_the_newest_intact_one() {
    for grid in ["1x1", "2x2"] {
        let dir = tmp(&format!("damaged-{grid}"));
        let d = dir.to_str().unwrap();
        let base = ["train", "--grid", grid, "--checkpoint-dir", d, "--checkpoint-every", "4", "--keep", "3", "--quiet"];
        ok(&[&base[..], &["--steps", "8"]].concat());
        damage_a_shard(&dir.join("step-8"));
        let err = fails(&[&base[..], &["--steps", "12", "--resume"]].concat());
        assert!(err.contains(&format!("{d}/step-8 does not verify; the newest intact checkpoint is {d}/step-4 (step 4): move {d}/step-8 out of {d} to resume from it")), "{grid}: {err}");
        std::fs::rename(dir.join("step-8"), tmp(&format!("damaged-{grid}-step-8"))).unwrap();
        let (_, err) = ok(&[&base[..], &["--steps", "12", "--resume"]].concat());
        assert!(err.contains(&format!("resumed from {d}/step-4 (step 4)")), "{grid}: {err}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(tmp(&format!("damaged-{grid}-step-8")));
    }
}

#[test]
fn in_process_grids_refuse_a_transport_they_cannot_use() {
    let err = fails(&["train", "--grid", "2x2", "--steps", "2", "--transport", "shm"]);
    assert!(err.contains("run as threads of one process") && err.contains("ember launch -n 4 --transport shm -- ember train"), "{err}");
    let err = fails(&["train", "--grid", "2x2", "--steps", "2", "--transport", "bogus"]);
    assert!(err.contains("unknown transport 'bogus'"), "{err}");
    ok(&["train", "--grid", "2x2", "--steps", "2", "--transport", "local", "--quiet"]);
}

#[test]
fn plan_refuses_the_batch_that_train_refuses() {
    let from_plan = fails(&["plan", "--grid", "3x1"]);
    let from_train = fails(&["train", "--grid", "3x1", "--steps", "1"]);
    assert!(from_plan.contains("--batch-size 256 is not divisible by the T = 3 ranks of grid 3x1"), "{from_plan}");
    assert_eq!(from_plan, from_train);
    let (out, _) = ok(&["plan", "--grid", "3x1", "--batch-size", "255"]);
    assert!(out.contains("global batch 255 (85 per sharding group, 85 per rank)"), "{out}");
}

/// `s` with every number replaced by `#` and every run of spaces by one.
fn shape(s: &str) -> String {
    let mut out = String::new();
    let mut in_num = false;
    let s = s.lines().map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).collect::<Vec<_>>().join("\n");
    for c in s.chars() {
        let num = c.is_ascii_digit() || (in_num && (c == '.' || c == 'e' || c == '-'));
        if num && !in_num {
            out.push('#');
        } else if !num {
            out.push(c);
        }
        in_num = num;
    }
    out
}

#[test]
fn a_checkpoint_dir_at_1x1_changes_neither_the_model_nor_the_output() {
    let (a, b) = (tmp("same-a"), tmp("same-b"));
    let run = ["train", "--steps", "30", "--eval-every", "10", "--quiet"];
    let (plain, _) = ok(&run);
    let (ckpt, _) = ok(&[&run[..], &["--checkpoint-dir", a.to_str().unwrap(), "--checkpoint-every", "10"]].concat());
    assert_eq!(shape(&plain), shape(&ckpt), "the output changed:\n{plain}\nvs\n{ckpt}");
    // Every line but time and throughput is the same, numbers included.
    let steady = |s: &str| s.lines().filter(|l| !l.contains("samples/s") && !l.starts_with("ember train:")).map(String::from).collect::<Vec<_>>();
    assert_eq!(steady(&plain), steady(&ckpt));
    let mut pj = last_json(&ok(&[&run[..], &["--json"]].concat()).0);
    let mut cj = last_json(&ok(&[&run[..], &["--json", "--checkpoint-dir", tmp("same-c").to_str().unwrap(), "--checkpoint-every", "10"]].concat()).0);
    for v in [&mut pj, &mut cj] {
        let o = v.as_object_mut().unwrap();
        o.remove("wall_s");
        o.remove("samples_per_s");
    }
    assert_eq!(pj, cj);
    // Stopped at 20 and resumed: the same model at step 30 as the run never stopped.
    let base = ["train", "--quiet", "--eval-every", "10", "--checkpoint-dir", b.to_str().unwrap(), "--checkpoint-every", "10", "--json"];
    ok(&[&base[..], &["--steps", "20"]].concat());
    let resumed = last_json(&ok(&[&base[..], &["--steps", "30", "--resume"]].concat()).0);
    assert_eq!(resumed["steps"], 10);
    for k in ["auc", "ne", "eval_loss"] {
        assert_eq!(resumed[k], pj[k], "{k}");
    }
    for e in std::fs::read_dir(a.join("step-30")).unwrap() {
        let name = e.unwrap().file_name();
        assert!(std::fs::read(a.join("step-30").join(&name)).unwrap() == std::fs::read(b.join("step-30").join(&name)).unwrap(), "{name:?} differs");
    }
    for d in [a, b, tmp("same-c")] {
        let _ = std::fs::remove_dir_all(d);
    }
}
