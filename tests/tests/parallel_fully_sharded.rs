//! Fully-sharded 2D against a direct simulation of its schedule (BRIEF.md §2): replicas look up
//! with their local weights, the update is applied to the replica average, optimizer state is not
//! averaged. The simulation runs each replica as a single-process model and does the schedule's
//! averaging in f64. Also: the mode differs from full sharding, and its memory saving.
use ember_engine::backend::Cpu;
use ember_engine::config::{preset, DenseOptimizer, EmbOptimizer, TrainConfig};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::grid::{Grid, Placement};
use ember_engine::model::Dlrm;
use ember_engine::parallel::driver::Job;
use ember_engine::parallel::ParallelOptions;
use ember_engine::plan::{Plan, ShardingType};
use ember_tests::two_d::{cycling_plan, rel_err};

fn cfg(batch: usize) -> TrainConfig {
    let mut c = preset("tiny", Some(2000)).unwrap();
    c.batch_size = batch;
    c.optim.embedding = EmbOptimizer::Sgd { lr: 0.5 };
    c.optim.dense = DenseOptimizer::Sgd { lr: 0.1 };
    c.synthetic.eval_samples = 64;
    c
}

fn whole_plan(c: &TrainConfig) -> Plan {
    cycling_plan(c, 1, &[ShardingType::TableWise])
}

fn mean64(xs: &[&Vec<f32>]) -> Vec<f64> {
    let mut m = vec![0.0f64; xs[0].len()];
    for x in xs {
        m.iter_mut().zip(x.iter()).for_each(|(a, &b)| *a += b as f64);
    }
    m.iter_mut().for_each(|a| *a /= xs.len() as f64);
    m
}

/// The schedule of fully-sharded 2D on grid M×1, simulated with M single-process models.
fn simulate(c: &TrainConfig, m: usize, steps: usize) -> Vec<Dlrm<Cpu>> {
    let be = Cpu::new();
    let data = SyntheticData::new(c).unwrap();
    let per = c.batch_size / m;
    let mut sub = c.clone();
    sub.batch_size = per;
    let mut reps: Vec<Dlrm<Cpu>> = (0..m).map(|_| Dlrm::new(&be, &sub).unwrap()).collect();
    for s in 0..steps {
        // The average the lookup-time weights reduce to (the reduce-scatter + all-gather).
        let avg: Vec<Vec<f64>> = (0..c.model.tables.len()).map(|t| mean64(&reps.iter().map(|r| &r.tables[t].weights).collect::<Vec<_>>())).collect();
        for (g, r) in reps.iter_mut().enumerate() {
            let before: Vec<Vec<f32>> = r.tables.iter().map(|t| t.weights.clone()).collect();
            // Lookup and gradients at the local weights; SGD's step is linear, so the update
            // applied to the average is average + (local after − local before).
            r.train_step(&be, &data.samples((s * c.batch_size + g * per) as u64, per)).unwrap();
            for (t, tab) in r.tables.iter_mut().enumerate() {
                for (k, w) in tab.weights.iter_mut().enumerate() {
                    *w = (avg[t][k] + (*w as f64 - before[t][k] as f64)) as f32;
                }
            }
        }
        // Dense parameters: data parallel over all ranks = mean of the replicas' SGD steps.
        let np = reps[0].dense.params_mut().len();
        for p in 0..np {
            let vals: Vec<Vec<f32>> = reps.iter_mut().map(|r| r.dense.params_mut()[p].w.clone()).collect();
            let mean = mean64(&vals.iter().collect::<Vec<_>>());
            for r in reps.iter_mut() {
                r.dense.params_mut()[p].w.iter_mut().zip(&mean).for_each(|(w, &x)| *w = x as f32);
            }
        }
    }
    reps
}

#[test]
fn fully_sharded_2d_follows_its_schedule() {
    let (m, steps) = (3, 4);
    let c = cfg(48);
    let sim = simulate(&c, m, steps);
    let grid = Grid::new(m, 1, Placement::ReplicasInNode).unwrap();
    let opts = ParallelOptions { fully_sharded: true, ..Default::default() };
    // The driver averages the replicas once more before evaluating, so its final weights are
    // compared with the average of the simulated replicas.
    let (_, states, _) = Job::new(&c, grid, &whole_plan(&c), &opts, steps).train(&|_| Ok(Cpu::new())).unwrap();
    for st in &states {
        for (spec, w, _) in &st.shards {
            let avg = mean64(&sim.iter().map(|r| &r.tables[spec.table].weights).collect::<Vec<_>>());
            let avg: Vec<f32> = avg.iter().map(|&x| x as f32).collect();
            let e = rel_err(w, &avg);
            assert!(e <= 1e-5, "replica {:?} table {}: {e:e} from the simulated schedule", st.coords, spec.table);
        }
    }
    // And it is not full sharding: plain 2D with K = 1 (equal to one process for SGD) differs.
    let (_, plain, _) = Job::new(&c, grid, &whole_plan(&c), &ParallelOptions::default(), steps).train(&|_| Ok(Cpu::new())).unwrap();
    let d: f64 = states[0].shards.iter().zip(&plain[0].shards).map(|(a, b)| rel_err(&a.1, &b.1)).fold(0.0, f64::max);
    assert!(d > 1e-4, "fully-sharded 2D should differ from full sharding, differs by {d:e}");
}

#[test]
fn fully_sharded_2d_keeps_one_mth_of_the_weights_resident() {
    let m = 4;
    let c = cfg(64);
    let grid = Grid::new(m, 1, Placement::ReplicasInNode).unwrap();
    let full = Job::new(&c, grid, &whole_plan(&c), &ParallelOptions::default(), 2).train(&|_| Ok(Cpu::new())).unwrap().0;
    let fs = Job::new(&c, grid, &whole_plan(&c), &ParallelOptions { fully_sharded: true, ..Default::default() }, 2).train(&|_| Ok(Cpu::new())).unwrap().0;
    let table_bytes: u64 = c.model.tables.iter().map(|t| t.rows * t.dim as u64 * 4).sum();
    assert_eq!(full.emb_weight_bytes_resident, table_bytes);
    assert!(fs.emb_weight_bytes_resident <= table_bytes.div_ceil(m as u64) + 4, "{} of {table_bytes}", fs.emb_weight_bytes_resident);
}

/// Fully-sharded 2D never averages the optimizer state, so a row that one sharding group alone
/// touches accumulates (M·g)² where full sharding accumulates g² (that group applies M/B × its
/// gradient sum); its averaged update is 1/M of the group's. The default c = M² reads the
/// accumulator back at the full-sharding scale, which makes the model's first update of such a
/// row exactly the full-sharding update; the c = M of plain 2D leaves it √M too small.
#[test]
fn fully_sharded_default_c_gives_rows_one_replica_touches_the_full_sharding_step() {
    use ember_engine::config::{Interaction, ModelConfig, Pooling, TableConfig, WeightDecay};
    use ember_engine::parallel::driver::Job;
    use ember_tests::oracle::TestRng;
    use ember_tests::oracle2d::{batch_of, Sample};
    let model = ModelConfig {
        num_dense: 3,
        tables: [12u64, 30, 60].iter().map(|&rows| TableConfig { rows, dim: 8, pooling: Pooling::Sum, bag_size: 2 }).collect(),
        bottom_mlp: vec![7, 8],
        top_mlp: vec![5, 1],
        interaction: Interaction::Dot,
    };
    let b = 12;
    for emb in [
        |c| EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-8, c, eps_inside: false },
        |c| EmbOptimizer::Adagrad { lr: 0.1, eps: 1e-8, c, eps_inside: false },
    ] as [fn(Option<f32>) -> EmbOptimizer; 2]
    {
        for m in [2usize, 3] {
            // Sharding group g's samples look up only rows ≡ g (mod M).
            let mut rng = TestRng::new(m as u64);
            let per = b / m;
            let samples: Vec<Sample> = (0..b)
                .map(|i| Sample {
                    dense: rng.vec_f32(3, -1.0, 1.0),
                    label: (i % 2) as f32,
                    bags: model.tables.iter().map(|t| (0..rng.usize_in(1, 3)).map(|_| rng.below(t.rows / m as u64) * m as u64 + (i / per) as u64).collect()).collect(),
                })
                .collect();
            let run = |grid_m: usize, c: Option<f32>, fully_sharded: bool| {
                let mut cfg = preset("tiny", None).unwrap();
                cfg.model = model.clone();
                cfg.batch_size = b;
                cfg.optim.embedding = emb(c);
                cfg.optim.dense = DenseOptimizer::Sgd { lr: 0.1 };
                cfg.optim.weight_decay = WeightDecay::None;
                let grid = Grid::new(grid_m, 1, Placement::ReplicasInNode).unwrap();
                let feed = |_: usize, w: usize| Ok(batch_of(&model, &samples[w * (b / grid_m)..(w + 1) * (b / grid_m)]));
                let opts = ParallelOptions { fully_sharded, ..Default::default() };
                let eval = batch_of(&model, &samples);
                let (_, states, _) = Job::new(&cfg, grid, &whole_plan(&cfg), &opts, 1).data(&feed, &eval).train(&|_| Ok(Cpu::new())).unwrap();
                let (_, init, _) = Job::new(&cfg, grid, &whole_plan(&cfg), &opts, 0).data(&feed, &eval).train(&|_| Ok(Cpu::new())).unwrap();
                (0..model.tables.len())
                    .map(|t| {
                        let (a, z) = (&states[0].shards[t].1, &init[0].shards[t].1);
                        a.iter().zip(z).map(|(x, y)| *x as f64 - *y as f64).collect::<Vec<f64>>()
                    })
                    .collect::<Vec<_>>()
            };
            let full = run(1, None, false);
            let fs = run(m, None, true);
            let fs_c_m = run(m, Some(m as f32), true);
            for t in 0..model.tables.len() {
                for (k, &want) in full[t].iter().enumerate() {
                    if want.abs() < 1e-6 {
                        continue;
                    }
                    let what = format!("{:?} M = {m}, table {t} element {k}", emb(None));
                    assert!((fs[t][k] - want).abs() <= 1e-3 * want.abs(), "{what}: fully-sharded update {} vs full sharding {want}", fs[t][k]);
                    let r = fs_c_m[t][k] / want;
                    assert!((r - 1.0 / (m as f64).sqrt()).abs() <= 1e-3, "{what}: with c = M the update is {r} × the full-sharding one, not 1/√M");
                }
            }
        }
    }
}
