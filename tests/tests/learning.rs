//! The learning test: on planted synthetic data the single-process DLRM reaches at least 90 % of
//! the planted model's (the oracle's) margin above chance, AUC − 0.5, on the held-out set.
use ember_engine::backend::Cpu;
use ember_engine::config::preset;
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::data::DataSource;
use ember_engine::train::train;

fn learns(preset_name: &str, steps: usize, seed: u64) {
    let mut cfg = preset(preset_name, Some(20_000)).unwrap();
    cfg.steps = Some(steps);
    cfg.seed = seed;
    cfg.synthetic.eval_samples = 8192;
    let mut data = SyntheticData::new(&cfg).unwrap();
    let eval = data.eval_set().unwrap();
    let oracle = data.oracle_eval();
    let (_, report) = train(&Cpu::new(), &cfg, &mut data, &eval, |_| {}).unwrap();
    let ratio = (report.auc - 0.5) / (oracle.auc - 0.5);
    eprintln!("{preset_name} seed {seed}: model auc {:.4} ne {:.4}; oracle auc {:.4} ne {:.4}; margin ratio {ratio:.3}", report.auc, report.ne, oracle.auc, oracle.ne);
    assert!(oracle.auc > 0.6, "the planted problem must be learnable: oracle auc {}", oracle.auc);
    assert!(ratio >= 0.9, "model reached {:.1} % of the oracle's margin (auc {} vs oracle {})", 100.0 * ratio, report.auc, oracle.auc);
    assert!(report.ne < 1.0, "NE {} must beat the base rate", report.ne);
}

#[test]
fn tiny_reaches_90_percent_of_oracle_margin() {
    learns("tiny", 1500, 1);
}

#[test]
fn tiny_learns_with_another_seed() {
    learns("tiny", 1500, 7);
}
