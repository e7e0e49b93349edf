//! Bad batches given to the single-process Dlrm: `Err` naming the problem, never a panic, and
//! the model is left unchanged.
use ember_engine::backend::Cpu;
use ember_engine::config::*;
use ember_engine::data::Batch;
use ember_engine::model::Dlrm;
use ember_tests::oracle::*;
use std::panic::{catch_unwind, AssertUnwindSafe};

fn config() -> TrainConfig {
    let t = |rows: u64| TableConfig { rows, dim: 4, pooling: Pooling::Sum, bag_size: 1 };
    TrainConfig {
        model: ModelConfig { num_dense: 3, tables: vec![t(10), t(5)], bottom_mlp: vec![4], top_mlp: vec![3, 1], interaction: Interaction::Dot },
        optim: OptimConfig {
            embedding: EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false },
            dense: DenseOptimizer::Sgd { lr: 0.1 },
            weight_decay: WeightDecay::None,
        },
        batch_size: 4,
        steps: Some(1),
        seed: 1,
        eval_every: 0,
        synthetic: SyntheticConfig::default(),
    }
}

fn snapshot(m: &mut Dlrm<Cpu>) -> Vec<Vec<f32>> {
    let mut v: Vec<Vec<f32>> = m.tables.iter().flat_map(|t| [t.weights.clone(), t.state.clone()]).collect();
    v.extend(m.dense.params_mut().into_iter().map(|p| p.w.clone()));
    v
}

#[test]
fn bad_batches_are_errors_and_change_nothing() {
    let be = Cpu::new();
    let cfg = config();
    let good = random_batches(&cfg.model, 4, 1, 3).remove(0);
    let mut cases: Vec<(&str, Vec<&str>, Batch)> = Vec::new();
    let mut b = good.clone();
    b.sparse[1].values.push(5);
    b.sparse[1].lengths[0] += 1;
    cases.push(("id out of range", vec!["feature 1", "id 5", "out of range"], b));
    let mut b = good.clone();
    b.sparse[0].values.push(1);
    cases.push(("lengths not covering the ids", vec!["feature 0", "ids"], b));
    let mut b = good.clone();
    b.sparse[0].lengths.pop();
    cases.push(("too few bags", vec!["feature 0", "bags"], b));
    let mut b = good.clone();
    b.dense.pop();
    cases.push(("dense values missing", vec!["dense"], b));
    let mut b = good.clone();
    b.sparse.pop();
    cases.push(("a feature missing", vec!["sparse features"], b));
    let mut b = good.clone();
    b.labels[2] = 0.5;
    cases.push(("label not 0/1", vec!["label", "sample 2"], b));
    let mut b = good.clone();
    b.dense[4] = f32::NAN;
    cases.push(("non-finite dense feature", vec!["not finite", "sample 1"], b));

    let mut m = Dlrm::new(&be, &cfg).unwrap();
    let before = snapshot(&mut m);
    for (what, needles, batch) in cases {
        for (op, r) in [
            ("train_step", catch_unwind(AssertUnwindSafe(|| m.train_step(&be, &batch).map(|_| ())))),
            ("predict", catch_unwind(AssertUnwindSafe(|| m.predict(&be, &batch).map(|_| ())))),
        ] {
            let r = r.unwrap_or_else(|_| panic!("{op}: {what}: panicked instead of returning Err"));
            let msg = r.err().unwrap_or_else(|| panic!("{op}: {what}: accepted")).to_string();
            for n in &needles {
                assert!(msg.contains(n), "{op}: {what}: message {msg:?} does not mention {n:?}");
            }
        }
        let after = snapshot(&mut m);
        assert_eq!(after, before, "{what}: a refused step changed the model");
    }
    // The good batch still trains.
    assert!(m.train_step(&be, &good).unwrap().is_finite());
}

#[test]
fn bad_configs_are_errors() {
    let be = Cpu::new();
    let mut c = config();
    c.model.bottom_mlp = vec![5];
    assert!(Dlrm::new(&be, &c).err().unwrap().to_string().contains("bottom_mlp"));
    let mut c = config();
    c.optim.embedding = EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-8, c: Some(0.0), eps_inside: false };
    assert!(Dlrm::new(&be, &c).is_err(), "c = 0 must be refused");
    let mut c = config();
    c.model.tables[1].dim = 8;
    assert!(Dlrm::new(&be, &c).err().unwrap().to_string().contains("dim"));
}
