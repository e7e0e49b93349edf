//! Checkpoints through the CLI: exact resume, resharding then continuing, a SIGKILL during a
//! checkpointed multi-process run, and `ember checkpoint inspect|export`.
use std::path::{Path, PathBuf};
use std::process::Command;

fn ember() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ember"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-ck-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(args: &[&str]) {
    let out = ember().args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn same_files(a: &Path, b: &Path) {
    let mut names: Vec<_> = std::fs::read_dir(a).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert!(!names.is_empty());
    for n in names {
        let (x, y) = (std::fs::read(a.join(&n)).unwrap(), std::fs::read(b.join(&n)).unwrap());
        assert!(x == y, "{} differs between {} and {}", n.to_string_lossy(), a.display(), b.display());
    }
}

#[test]
fn a_resumed_run_is_bitwise_the_uninterrupted_run() {
    let (a, b) = (tmp("a"), tmp("b"));
    let common = ["train", "--grid", "2x2", "--checkpoint-every", "4", "--quiet"];
    run(&[&common[..], &["--steps", "12", "--checkpoint-dir", a.to_str().unwrap()]].concat());
    run(&[&common[..], &["--steps", "8", "--checkpoint-dir", b.to_str().unwrap()]].concat());
    run(&[&common[..], &["--steps", "12", "--checkpoint-dir", b.to_str().unwrap(), "--resume"]].concat());
    same_files(&a.join("step-12"), &b.join("step-12"));
}

#[test]
fn resharding_then_continuing_with_sgd_matches_a_run_never_resharded() {
    // SGD, K = 1: 2D equals full sharding, so a run moved 2x4 → 4x2 → 1x8 must end where a
    // 1x8 run that was never resharded ends (up to reduction-order rounding: compared via export).
    let cfg = tmp("cfg.toml");
    let mut c = ember_engine::config::preset("tiny", Some(3000)).unwrap();
    c.batch_size = 64;
    c.optim.embedding = ember_engine::config::EmbOptimizer::Sgd { lr: 0.5 };
    c.optim.dense = ember_engine::config::DenseOptimizer::Sgd { lr: 0.1 };
    std::fs::write(&cfg, c.to_toml()).unwrap();
    let cfg = cfg.to_str().unwrap();
    let (moved, direct) = (tmp("moved"), tmp("direct"));
    let m = moved.to_str().unwrap();
    run(&["train", "--config", cfg, "--grid", "2x4", "--steps", "3", "--checkpoint-dir", m, "--checkpoint-every", "3", "--quiet"]);
    run(&["train", "--config", cfg, "--grid", "4x2", "--steps", "6", "--checkpoint-dir", m, "--checkpoint-every", "3", "--resume", "--quiet"]);
    run(&["train", "--config", cfg, "--grid", "1x8", "--steps", "9", "--checkpoint-dir", m, "--checkpoint-every", "3", "--resume", "--quiet"]);
    run(&["train", "--config", cfg, "--grid", "1x8", "--steps", "9", "--checkpoint-dir", direct.to_str().unwrap(), "--checkpoint-every", "9", "--quiet"]);
    let (ea, eb) = (tmp("ea"), tmp("eb"));
    run(&["checkpoint", "export", moved.join("step-9").to_str().unwrap(), ea.to_str().unwrap()]);
    run(&["checkpoint", "export", direct.join("step-9").to_str().unwrap(), eb.to_str().unwrap()]);
    let mut n = 0;
    for e in std::fs::read_dir(&eb).unwrap() {
        let name = e.unwrap().file_name();
        let (x, y) = (std::fs::read(ea.join(&name)).unwrap(), std::fs::read(eb.join(&name)).unwrap());
        assert_eq!(x.len(), y.len());
        // .npy v1: magic (6), version (2), header length (u16 LE), header; then the f32 data.
        let h = 10 + u16::from_le_bytes([x[8], x[9]]) as usize;
        assert_eq!(&x[..h], &y[..h], "{}: npy headers differ", name.to_string_lossy());
        let fx: Vec<f32> = x[h..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let fy: Vec<f32> = y[h..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let num: f64 = fx.iter().zip(&fy).map(|(a, b)| ((*a - *b) as f64).powi(2)).sum();
        let den: f64 = fy.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().max(1e-30);
        assert!((num / den).sqrt() < 1e-5, "{}: resharded run differs", name.to_string_lossy());
        n += 1;
    }
    assert!(n >= 8, "exported {n} files");
}

#[test]
fn sigkill_during_a_checkpointed_run_resumes_from_the_last_complete_checkpoint() {
    let dir = tmp("kill");
    let d = dir.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_ember");
    let mut child = ember()
        .args(["launch", "-n", "4", "--timeout-ms", "5000", "--", bin, "train", "--grid", "2x2", "--steps", "100000", "--checkpoint-dir", d, "--checkpoint-every", "1", "--keep", "3", "--quiet", "--seed", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Reap(String);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = Command::new("pkill").args(["-9", "-f", "--", &self.0]).status();
        }
    }
    let _reap = Reap(format!("--checkpoint-dir {d} "));
    // Wait until a few checkpoints exist, then kill the whole job mid-run.
    let t0 = std::time::Instant::now();
    while ember_engine::checkpoint::list(&dir).map(|l| l.len()).unwrap_or(0) < 2 && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    std::thread::sleep(std::time::Duration::from_millis(137));
    // SIGKILL every rank at once (and the launcher): no cleanup runs anywhere.
    let _ = Command::new("pkill").args(["-9", "-f", "--", &format!("--checkpoint-dir {d} ")]).status();
    let _ = child.kill();
    let _ = child.wait();
    let t1 = std::time::Instant::now();
    while Command::new("pgrep").args(["-f", "--", &format!("--checkpoint-dir {d} ")]).output().map(|o| !o.stdout.is_empty()).unwrap_or(false) {
        assert!(t1.elapsed().as_secs() < 10, "ranks survived SIGKILL");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let latest = ember_engine::checkpoint::latest(&dir).unwrap().expect("a complete checkpoint survives");
    ember_engine::checkpoint::Checkpoint::open(&latest).expect("the latest complete checkpoint verifies");
    let step: usize = latest.file_name().unwrap().to_str().unwrap()["step-".len()..].parse().unwrap();
    let out = ember().args(["train", "--grid", "2x2", "--steps", &(step + 2).to_string(), "--checkpoint-dir", d, "--checkpoint-every", "1", "--resume", "--quiet", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["steps"], 2, "resumed at step {step} and ran the 2 remaining steps");
}

#[test]
fn inspect_verifies_and_names_a_corrupted_file() {
    let dir = tmp("inspect");
    run(&["train", "--grid", "1x2", "--steps", "2", "--checkpoint-dir", dir.to_str().unwrap(), "--checkpoint-every", "2", "--quiet"]);
    let step = dir.join("step-2");
    run(&["checkpoint", "inspect", step.to_str().unwrap()]);
    let shard = std::fs::read_dir(&step).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().contains("shard-")).unwrap();
    let mut bytes = std::fs::read(&shard).unwrap();
    let k = bytes.len() - 3;
    bytes[k] ^= 0x10;
    std::fs::write(&shard, bytes).unwrap();
    let out = ember().args(["checkpoint", "inspect", step.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success());
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains(shard.file_name().unwrap().to_str().unwrap()), "{all}");
}
