//! `ember simulate --calibrate` (quick sizes) writes a machine file the model reads; `ember bench
//! gemm` times exactly the dense network's GEMMs; `bench embedding --optimizer` reports its bytes
//! by the scale model's convention.
use ember_engine::simulate::Machine;
use std::process::Command;

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

fn run(args: &[&str], env: &[(&str, &str)]) -> String {
    let o = Command::new(EMBER).args(args).envs(env.iter().copied()).output().expect("run ember");
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "ember {args:?} failed:\n{out}\n{err}");
    out
}

fn last_json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().rev().find(|l| l.starts_with('{')).expect("a JSON line")).unwrap()
}

#[test]
fn calibrate_writes_a_machine_file_with_every_rate_positive() {
    let dir = std::env::temp_dir().join(format!("ember-calibrate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("host.toml");
    let out = run(&["simulate", "--calibrate", f.to_str().unwrap()], &[("EMBER_CALIBRATE_QUICK", "1")]);
    assert!(out.contains("# wrote"), "{out}");
    let m = Machine::read(&f).unwrap();
    assert_eq!(m.name, "this-host");
    assert!(m.unsourced().is_empty(), "{:?}", m.unsourced());
    let c = &m.compute;
    for x in [m.memory.stream_bw, m.memory.gather_bw, c.gemm_flops, c.emb_forward_eff, c.emb_backward_eff.sgd, c.emb_backward_eff.rowwise_adagrad, c.emb_backward_eff.adagrad, m.intra_node.bw, m.inter_node.bw] {
        assert!(x.is_finite() && x > 0.0, "{x}");
    }
    assert!(!m.intra_node.all_to_all.is_empty() && !m.inter_node.all_reduce.is_empty());
    assert!(m.sources.iter().any(|s| s.contains("ember simulate --calibrate")));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bench_gemm_times_every_gemm_of_the_bench_models_training_step() {
    let v = last_json(&run(&["bench", "gemm", "--batch-size", "16", "-n", "1", "-w", "0", "--json"], &[]));
    let rows = v["rows"].as_array().unwrap();
    // bench model: bottom 13-512-256-64, top 100-512-256-1 (dot interaction of 8 tables + dense:
    // 64 + 9·8/2 = 100): forward and weight gradient per layer, input gradient for all but the
    // first bottom layer.
    assert_eq!(rows.len(), 17);
    let (mut flops, mut fwd) = (0.0, 0.0);
    for r in rows {
        let s = &r["shape"];
        let f = 2.0 * s["m"].as_f64().unwrap() * s["n"].as_f64().unwrap() * s["k"].as_f64().unwrap();
        flops += f;
        if s["pass"] == "forward" {
            fwd += f;
            assert_eq!(s["m"], 16);
        }
        assert!(r["ms"].as_f64().unwrap() > 0.0);
    }
    let layers = [(13, 512), (512, 256), (256, 64), (100, 512), (512, 256), (256, 1)];
    let want_fwd: f64 = layers.iter().map(|&(i, o)| 2.0 * 16.0 * (i * o) as f64).sum();
    assert_eq!(fwd, want_fwd);
    assert_eq!(flops, 3.0 * want_fwd - 2.0 * 16.0 * 13.0 * 512.0);
    let total = v["total_ms"].as_f64().unwrap();
    assert!((v["gflops"].as_f64().unwrap() - flops / (total * 1e-3) / 1e9).abs() < 1e-6 * flops);
}

#[test]
fn bench_embedding_counts_the_bytes_of_each_optimizer() {
    let (b, t, l, d) = (64.0, 2.0, 3.0, 8.0);
    for (opt, state) in [("sgd", 0.0), ("rowwise-adagrad", 1.0), ("adagrad", d)] {
        let out = run(&["bench", "embedding", "--tables", "2", "--rows", "50", "--dim", "8", "--batch-size", "64", "--bag-size", "3", "--steps", "1", "-w", "0", "--optimizer", opt, "--floor-table-mib", "8", "--json"], &[]);
        assert!(out.contains(opt), "{out}");
        let v = last_json(&out);
        let u = v["unique_rows"].as_f64().unwrap();
        // 192 ids per table over 50 rows: nearly every row is touched.
        assert!(u > 80.0 && u <= 100.0, "{u}");
        assert_eq!(v["forward_bytes"].as_f64().unwrap(), (b * t * l + b * t) * d * 4.0);
        assert_eq!(v["backward_bytes"].as_f64().unwrap(), u * (2.0 * d + 2.0 * state) * 4.0 + b * t * d * 4.0 + b * t * l * 8.0);
        // The floor: U·(2·D·4 + 2·4) + B·F·D·4 + B·F·L·8 bytes at the gather rate measured in
        // the run, and the backward's ratio to it.
        let floor_bytes = u * (2.0 * d * 4.0 + 8.0) + b * t * d * 4.0 + b * t * l * 8.0;
        assert_eq!(v["floor_bytes"].as_f64().unwrap(), floor_bytes);
        let rate = v["gather_gb_per_s"].as_f64().unwrap();
        let floor_ms = v["floor_ms"].as_f64().unwrap();
        assert!(rate > 0.0 && (floor_ms - floor_bytes / (rate * 1e9) * 1e3).abs() <= 1e-9 * floor_ms, "{v}");
        let ratio = v["backward_over_floor"].as_f64().unwrap();
        assert!((ratio - v["backward_ms"].as_f64().unwrap() / floor_ms).abs() <= 1e-9 * ratio, "{v}");
    }
}
