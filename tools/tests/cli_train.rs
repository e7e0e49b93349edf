//! The `ember` binary's contract (docs/cli.md): train's JSON line, errors with exit status 1.
use std::process::Command;

fn ember(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ember")).args(args).output().expect("run ember")
}

fn last_json(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().expect("some output");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

#[test]
fn train_json_has_the_contract_keys() {
    let out = ember(&["train", "--steps", "60", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = last_json(&out);
    for k in ["samples_per_s", "loss", "ne", "auc", "steps", "wall_s", "oracle_auc"] {
        assert!(v.get(k).is_some(), "missing key {k} in {v}");
    }
    assert_eq!(v["steps"], 60);
    let auc = v["auc"].as_f64().unwrap();
    assert!(auc > 0.5 && auc < 1.0, "auc {auc}");
}

#[test]
fn train_is_deterministic_for_a_seed() {
    let a = last_json(&ember(&["train", "--steps", "30", "--seed", "5", "--json"]));
    let b = last_json(&ember(&["train", "--steps", "30", "--seed", "5", "--json"]));
    assert_eq!(a["loss"], b["loss"]);
    assert_eq!(a["auc"], b["auc"]);
}

#[test]
fn train_reads_the_shared_criteo_sample() {
    let path = ember_tests::test_data("criteo-sample-200.csv");
    let out = ember(&["train", "--data", path.to_str().unwrap(), "--batch-size", "16", "--max-rows", "5000", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = last_json(&out);
    assert_eq!(v["eval_samples"], 20);
    assert_eq!(v["skipped_lines"], 0);
}

#[test]
fn bad_flags_and_configs_are_clear_errors() {
    for (args, needle) in [
        (vec!["train", "--preset", "nope"], "unknown preset"),
        (vec!["train", "--grid", "2y2"], "--grid"),
        (vec!["train", "--device", "tpu"], "--device"),
        (vec!["train", "--batch-size", "0"], "--batch-size"),
        (vec!["train", "--config", "/nonexistent/ember.toml"], "--config"),
    ] {
        let out = ember(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: stderr lacks '{needle}': {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

#[test]
fn a_toml_config_round_trips() {
    let dir = std::env::temp_dir().join(format!("ember-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = ember_engine::config::preset("tiny", None).unwrap();
    cfg.steps = Some(20);
    let path = dir.join("tiny.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let out = ember(&["train", "--config", path.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(last_json(&out)["steps"], 20);
    // A bad dim is refused with the field named.
    std::fs::write(&path, cfg.to_toml().replacen("dim = 16", "dim = 10", 1)).unwrap();
    let out = ember(&["train", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dim"));
}
