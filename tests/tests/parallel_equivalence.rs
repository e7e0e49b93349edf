//! The exact relations of BRIEF.md §3 for 2D training over in-process ranks:
//! with SGD and K = 1, one process == full sharding == 2D grids == pure data parallel, for every
//! sharding type; after a sync all replicas are bitwise identical.
use ember_engine::backend::Cpu;
use ember_engine::config::{preset, DenseOptimizer, EmbOptimizer, TrainConfig};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::grid::{Grid, Placement};
use ember_engine::model::Dlrm;
use ember_engine::parallel::driver::Job;
use ember_engine::parallel::{ParallelOptions, SyncMode};
use ember_engine::plan::{Plan, ShardingType};
use ember_tests::two_d::{assemble, cycling_plan, rel_err};

fn sgd_config(batch: usize) -> TrainConfig {
    let mut cfg = preset("tiny", Some(3000)).unwrap();
    cfg.batch_size = batch;
    cfg.optim.embedding = EmbOptimizer::Sgd { lr: 0.5 };
    cfg.optim.dense = DenseOptimizer::Sgd { lr: 0.1 };
    cfg.synthetic.eval_samples = 256;
    cfg
}

/// A plan using every sharding type: table t gets kind t % 4.
fn mixed_plan(cfg: &TrainConfig, n: usize) -> Plan {
    cycling_plan(cfg, n, &ShardingType::ALL)
}

/// Tables, dense parameters and the eval AUC of one process trained on the same global batches.
fn single_process(cfg: &TrainConfig, steps: usize) -> (Vec<Vec<f32>>, Vec<Vec<f32>>, f64) {
    let be = Cpu::new();
    let data = SyntheticData::new(cfg).unwrap();
    let mut m = Dlrm::new(&be, cfg).unwrap();
    for s in 0..steps {
        m.train_step(&be, &data.samples((s * cfg.batch_size) as u64, cfg.batch_size)).unwrap();
    }
    let auc = ember_engine::train::evaluate_model(&be, &mut m, &data.eval_batch(), cfg.batch_size).unwrap().auc;
    let tables = m.tables.iter().map(|t| t.weights.clone()).collect();
    let dense = m.dense.params_mut().into_iter().map(|p| p.w.clone()).collect();
    (tables, dense, auc)
}

fn check_grid(m: usize, n: usize, placement: Placement) {
    let steps = 4;
    let cfg = sgd_config(16 * m * n);
    let (ref_tables, ref_dense, ref_auc) = single_process(&cfg, steps);
    let grid = Grid::new(m, n, placement).unwrap();
    let plan = mixed_plan(&cfg, n);
    let (report, states, _) = Job::new(&cfg, grid, &plan, &ParallelOptions::default(), steps).train(&|_| Ok(Cpu::new())).unwrap();
    assert!(report.loss.is_finite());
    // The distributed evaluation (global chunks of B, the last one padded) sees the same model.
    assert!((report.auc - ref_auc).abs() < 1e-4, "grid {m}x{n}: eval AUC {} vs one process {ref_auc}", report.auc);
    let tables = assemble(&cfg, &states, 0);
    for (t, (a, b)) in tables.iter().zip(&ref_tables).enumerate() {
        let e = rel_err(a, b);
        assert!(e <= 1e-5, "grid {m}x{n}: table {t} ({:?}) differs from one process by {e:e}", plan.tables[t].kind);
    }
    for st in &states {
        for (i, (a, b)) in st.dense.iter().zip(&ref_dense).enumerate() {
            let e = rel_err(a, b);
            assert!(e <= 1e-5, "grid {m}x{n}: dense param {i} on rank {} differs by {e:e}", st.world_rank);
        }
    }
    // After the sync every replica holds bitwise the same shards.
    for st in &states {
        let twin = states.iter().find(|o| o.coords == (0, st.coords.1)).unwrap();
        for ((sa, wa, va), (sb, wb, vb)) in st.shards.iter().zip(&twin.shards) {
            assert_eq!(sa, sb);
            assert!(wa.iter().zip(wb).all(|(x, y)| x.to_bits() == y.to_bits()), "replica {:?} differs from replica 0", st.coords);
            assert!(va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }
}

#[test]
fn sgd_full_sharding_equals_one_process() {
    check_grid(1, 4, Placement::ReplicasInNode);
}

#[test]
fn sgd_2d_2x2_equals_one_process() {
    check_grid(2, 2, Placement::ReplicasInNode);
}

#[test]
fn sgd_2d_2x2_replicas_across_nodes_equals_one_process() {
    check_grid(2, 2, Placement::ReplicasAcrossNodes);
}

#[test]
fn sgd_data_parallel_equals_one_process() {
    check_grid(4, 1, Placement::ReplicasInNode);
}

#[test]
fn sgd_2d_2x3_equals_one_process() {
    check_grid(2, 3, Placement::ReplicasInNode);
}

#[test]
fn sparse_sync_equals_full_sync() {
    let cfg = sgd_config(64);
    let grid = Grid::new(2, 2, Placement::ReplicasInNode).unwrap();
    let plan = mixed_plan(&cfg, 2);
    let run = |mode| {
        let opts = ParallelOptions { sync: mode, ..Default::default() };
        assemble(&cfg, &Job::new(&cfg, grid, &plan, &opts, 3).train(&|_| Ok(Cpu::new())).unwrap().1, 0)
    };
    let (a, b) = (run(SyncMode::Sparse), run(SyncMode::Full));
    for (x, y) in a.iter().zip(&b) {
        assert!(x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()), "sparse and full sync differ");
    }
}

#[test]
fn grid_size_must_match_world() {
    let cfg = sgd_config(64);
    let grid = Grid::new(2, 2, Placement::ReplicasInNode).unwrap();
    let world = ember_transport::local_world(3);
    let err = std::thread::scope(|s| {
        let hs: Vec<_> = world.into_iter().map(|c| s.spawn(move || ember_engine::grid::GridComms::new(grid, c).err())).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
    });
    let msg = err[0].as_ref().expect("an error").to_string();
    assert!(msg.contains("needs 4 ranks") && msg.contains("has 3"), "{msg}");
    let _ = cfg;
}
