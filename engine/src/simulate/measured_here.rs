//! The scale model against steps measured on this host: engine/tests/fixtures/scale_here.json
//! holds the measured stage times and the calibration the two machine files hold
//! (this-host-threads.toml: 8 in-process ranks on 2 cores, written by `ember simulate
//! --calibrate`; this-host-procs.toml: ranks as processes under `ember launch`, derived from it
//! with the links between processes measured by `ember bench a2a|allreduce` under `ember
//! launch`); `RECORD=... tools/experiments/scale.sh here` measures them again.
use super::model::{predict, Scenario};
use super::Machine;
use crate::config::preset;
use crate::data::synthetic::SyntheticData;
use crate::plan::planner::stats_from_batches;

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
        assert!(close(m.compute.gemm_flops, c["gemm_flops"].as_f64().unwrap()));
        assert!(close(m.compute.emb_forward_eff, c["emb_forward_eff"].as_f64().unwrap()));
        assert!(close(m.compute.emb_backward_eff.rowwise_adagrad, c["emb_backward_eff_rowwise"].as_f64().unwrap()));
        assert!(m.unsourced().is_empty(), "no source for {:?}", m.unsourced());
    }
    let procs = Machine::from_toml(PROCS, "procs").unwrap();
    assert_eq!((procs.ranks_per_node, procs.compute_units_per_node), (1, 1));
}

#[test]
fn predicts_every_measured_step_within_2x() {
    let fx: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let threads = Machine::from_toml(THREADS, "this-host-threads.toml").unwrap();
    let procs = Machine::from_toml(PROCS, "this-host-procs.toml").unwrap();
    let cfg = preset("bench", Some(100_000)).unwrap();
    // The id statistics `tools/experiments/scale.sh here` predicts with (`--stats-samples
    // 16384`): measured on the synthetic data the runs train on.
    let stats = stats_from_batches(&cfg.model, &[SyntheticData::new(&cfg).unwrap().samples(0, 16384)]);
    let runs = fx["runs"].as_array().unwrap();
    let grids: Vec<&str> = runs.iter().map(|r| r["grid"].as_str().unwrap()).collect();
    assert!(grids.starts_with(&["1x8", "2x4", "4x2", "8x1"]), "{grids:?}");
    let mut report = String::new();
    let mut bad = Vec::new();
    for r in runs {
        let g = r["grid"].as_str().unwrap();
        let (m, n) = g.split_once('x').map(|(a, b)| (a.parse().unwrap(), b.parse().unwrap())).unwrap();
        let machine = if r["ranks"] == "procs" { &procs } else { &threads };
        let p = predict(&cfg, machine, &Scenario { stats: Some(stats.clone()), ..Scenario::new(m, n, 4096, 1) }).unwrap();
        let measured = r["step_ms_median"].as_f64().unwrap();
        let ratio = p.step_ms / measured;
        report.push_str(&format!("{g} {}: predicted {:.1} ms, measured {measured:.1} ms ({:+.0} %)\n", r["ranks"], p.step_ms, (ratio - 1.0) * 100.0));
        for (k, v) in r["stages"].as_object().unwrap() {
            let v = v.as_f64().unwrap();
            report.push_str(&format!("    {k}: predicted {:.1} ms, measured {v:.1} ms\n", p.stages[k.as_str()]));
        }
        if !(0.5..=2.0).contains(&ratio) {
            bad.push(g);
        }
    }
    eprintln!("{report}");
    assert!(bad.is_empty(), "step predictions off by more than 2x: {bad:?}\n{report}");
}
