//! The scale model against steps measured on this host: engine/tests/fixtures/scale_here.json
//! holds the measured stage times and the microbenchmark figures the two machine files
//! (this-host-threads.toml: 8 in-process ranks on 2 cores; this-host-procs.toml: processes under
//! `ember launch`) were written from; tools/experiments/scale.sh measures them again.
use super::model::{predict, Scenario};
use super::Machine;
use crate::config::preset;

const FIXTURE: &str = include_str!("../../tests/fixtures/scale_here.json");
const THREADS: &str = include_str!("../../tests/fixtures/this-host-threads.toml");
const PROCS: &str = include_str!("../../tests/fixtures/this-host-procs.toml");

#[test]
fn machine_files_hold_the_recorded_calibration() {
    let fx: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let c = &fx["calibration"];
    let close = |a: f64, b: f64| (a / b - 1.0).abs() < 1e-3;
    for text in [THREADS, PROCS] {
        let m = Machine::from_toml(text, "fixture").unwrap();
        assert!(close(m.memory.gather_bw, c["gather_bw"].as_f64().unwrap()));
        assert!(close(m.memory.stream_bw, c["stream_bw"].as_f64().unwrap()));
        assert!(close(m.compute.emb_forward_eff, c["emb_forward_eff"].as_f64().unwrap()));
        assert!(close(m.compute.emb_backward_eff.rowwise_adagrad, c["emb_backward_eff_rowwise"].as_f64().unwrap()));
    }
}

#[test]
fn predicts_every_measured_step_within_2x() {
    let fx: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let threads = Machine::from_toml(THREADS, "this-host-threads.toml").unwrap();
    let procs = Machine::from_toml(PROCS, "this-host-procs.toml").unwrap();
    let cfg = preset("bench", Some(100_000)).unwrap();
    let runs = fx["runs"].as_array().unwrap();
    let grids: Vec<&str> = runs.iter().map(|r| r["grid"].as_str().unwrap()).collect();
    assert!(grids.starts_with(&["1x8", "2x4", "4x2", "8x1"]), "{grids:?}");
    let mut report = String::new();
    let mut bad = Vec::new();
    for r in runs {
        let g = r["grid"].as_str().unwrap();
        let (m, n) = g.split_once('x').map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap())).unwrap();
        let machine = if r["ranks"] == "procs" { &procs } else { &threads };
        let p = predict(&cfg, machine, &Scenario::new(m, n, 4096, 1)).unwrap();
        let measured = r["step_ms_median"].as_f64().unwrap();
        let ratio = p.step_ms / measured;
        report.push_str(&format!("{g} {}: predicted {:.1} ms, measured {measured:.1} ms ({ratio:.2}x)\n", r["ranks"], p.step_ms));
        for (k, v) in r["stages"].as_object().unwrap() {
            report.push_str(&format!("    {k}: predicted {:.1} ms, measured {:.1} ms\n", p.stages[k.as_str()], v.as_f64().unwrap()));
        }
        if !(0.5..=2.0).contains(&ratio) {
            bad.push(g);
        }
    }
    assert!(bad.is_empty(), "step predictions off by more than 2x: {bad:?}\n{report}");
}
