//! Runs 2D training on a backend and checks it against the f64 oracle of [`crate::oracle2d`]:
//! a small DLRM (5 tables of dim 8, mean and sum pooling, every sharding type in the plan),
//! random batches with shared hot rows, grids 2x2, 3x2 and 2x3 (both placements), 7 steps.
//! Used by the CPU tests (`tests/parallel_oracle.rs`) and, on a GPU, by the CUDA backend's.
use crate::oracle::{RefOpt, TestRng};
use crate::oracle2d::{batch_of, check_dense, check_shards, random_samples, sample_range, Oracle2D, Sample};
use ember_engine::backend::{Backend, Cpu, ShardSpec};
use ember_engine::config::{preset, DenseOptimizer, EmbOptimizer, Interaction, ModelConfig, Pooling, TableConfig, TrainConfig, WeightDecay};
use ember_engine::grid::{Grid, GridComms, Placement};
use ember_engine::model::Dlrm;
use ember_engine::parallel::driver::Job;
use ember_engine::parallel::{ParallelOptions, Rank2D, SyncMode, XferKind};
use ember_engine::plan::{Plan, ShardingType};

pub const STEPS: usize = 7;
pub const B: usize = 24;
pub const DENSE_LR: f32 = 0.3;

pub fn model() -> ModelConfig {
    let t = |rows: u64, pooling| TableConfig { rows, dim: 8, pooling, bag_size: 2 };
    ModelConfig {
        num_dense: 3,
        tables: vec![t(9, Pooling::Sum), t(40, Pooling::Mean), t(200, Pooling::Sum), t(5, Pooling::Sum), t(70, Pooling::Mean)],
        bottom_mlp: vec![7, 8],
        top_mlp: vec![5, 1],
        interaction: Interaction::Dot,
    }
}

pub fn config(emb: EmbOptimizer) -> TrainConfig {
    let mut c = preset("tiny", None).unwrap();
    c.model = model();
    c.batch_size = B;
    c.seed = 11;
    c.optim.embedding = emb;
    c.optim.dense = DenseOptimizer::Sgd { lr: DENSE_LR };
    c.optim.weight_decay = WeightDecay::None;
    c
}

/// The optimizers of the brief, with the reference's view of each (c resolved for M replicas).
#[derive(Clone, Copy, Debug)]
pub enum Opt {
    Sgd,
    RowWise { c_is_m: bool },
    ElementWise,
}

impl Opt {
    pub fn engine(self) -> EmbOptimizer {
        match self {
            Opt::Sgd => EmbOptimizer::Sgd { lr: 0.5 },
            Opt::RowWise { c_is_m } => EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-3, c: if c_is_m { None } else { Some(1.0) }, eps_inside: false },
            Opt::ElementWise => EmbOptimizer::Adagrad { lr: 0.1, eps: 1e-3, c: None, eps_inside: false },
        }
    }
    pub fn reference(self, m: usize) -> RefOpt {
        match self {
            Opt::Sgd => RefOpt::Sgd { lr: 0.5 },
            Opt::RowWise { c_is_m } => RefOpt::RowWise { lr: 0.1f32 as f64, eps: 1e-3f32 as f64, c: if c_is_m { m as f64 } else { 1.0 }, eps_inside: false },
            Opt::ElementWise => RefOpt::Adagrad { lr: 0.1f32 as f64, eps: 1e-3f32 as f64, c: m as f64, eps_inside: false },
        }
    }
}

/// Table t sharded as table-, row-, column- or table-row-wise by t mod 4.
pub fn plan(c: &TrainConfig, n: usize) -> Plan {
    Plan::cycling(&c.model, n, &ShardingType::ALL).unwrap()
}

/// The engine's initial model: whole tables and dense parameters.
pub fn initial(c: &TrainConfig) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let mut m = Dlrm::new(&Cpu::new(), c).unwrap();
    (m.tables.iter().map(|t| t.weights.clone()).collect(), m.dense.params_mut().into_iter().map(|p| p.w.clone()).collect())
}

pub fn data(steps: usize, seed: u64) -> Vec<Vec<Sample>> {
    let mut rng = TestRng::new(seed);
    (0..steps).map(|_| random_samples(&model(), B, &mut rng, 0.3)).collect()
}

/// A grid as the test sees it: M, N, placement.
#[derive(Clone, Copy, Debug)]
pub struct G {
    pub m: usize,
    pub n: usize,
    pub across: bool,
}

impl G {
    pub fn grid(self) -> Grid {
        Grid::new(self.m, self.n, if self.across { Placement::ReplicasAcrossNodes } else { Placement::ReplicasInNode }).unwrap()
    }
    pub fn batch(self, data: &[Vec<Sample>], step: usize, w: usize) -> ember_engine::data::Batch {
        batch_of(&model(), &data[step][sample_range(self.m, self.n, self.across, w, B)])
    }
}

pub const GRIDS: [G; 3] = [G { m: 2, n: 2, across: false }, G { m: 3, n: 2, across: false }, G { m: 2, n: 3, across: true }];

/// Every rank's shards after every step, and rank 0's losses, driving `Rank2D` step by step.
struct PerStep {
    /// `[world rank]`: (sharding group, `[step]` shards).
    ranks: Vec<(usize, usize, Vec<Vec<(ShardSpec, Vec<f32>, Vec<f32>)>>)>,
    losses: Vec<f64>,
}

fn per_step<Be: Backend>(new_be: &(dyn Fn(usize) -> ember_engine::Result<Be> + Sync), c: &TrainConfig, g: G, opts: &ParallelOptions, data: &[Vec<Sample>]) -> PerStep {
    let p = plan(c, g.n);
    let world = ember_transport::local_world(g.m * g.n);
    let mut out: Vec<(usize, (usize, usize, Vec<Vec<_>>), Vec<f64>)> = std::thread::scope(|s| {
        let hs: Vec<_> = world
            .into_iter()
            .map(|comm| {
                let (p, opts) = (p.clone(), opts.clone());
                s.spawn(move || {
                    let w = comm.rank();
                    let be = new_be(w).unwrap();
                    let gc = GridComms::new(g.grid(), comm).unwrap();
                    let (gg, rr) = gc.coords();
                    let mut rank = Rank2D::new(&be, c, gc, p, opts).unwrap();
                    let mut snaps = Vec::new();
                    let mut losses = Vec::new();
                    for step in 0..data.len() {
                        losses.push(rank.train_step(&be, &g.batch(data, step, w)).unwrap());
                        snaps.push(rank.shards().iter().map(|s| (s.spec.clone(), be.download(&s.weights).unwrap(), be.download(&s.state).unwrap())).collect());
                    }
                    (w, (gg, rr, snaps), losses)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    out.sort_by_key(|o| o.0);
    let losses = out[0].2.clone();
    PerStep { ranks: out.into_iter().map(|o| o.1).collect(), losses }
}

/// The oracle after each step (its state after step s at index s).
fn oracle_steps(c: &TrainConfig, g: G, k: usize, opt: Opt, delayed: bool, data: &[Vec<Sample>]) -> (Vec<Oracle2D>, Oracle2D) {
    let (tables, dense) = initial(c);
    let mut o = Oracle2D::new(&c.model, g.m, k, opt.reference(g.m), DENSE_LR as f64, delayed, &tables, &dense);
    let mut after = Vec::new();
    for s in data {
        o.step(s);
        after.push(o.clone());
    }
    let mut end = o.clone();
    end.finish();
    (after, end)
}

pub fn bits_equal(a: &[(ShardSpec, Vec<f32>, Vec<f32>)], b: &[(ShardSpec, Vec<f32>, Vec<f32>)], state: bool) -> bool {
    a.iter().zip(b).all(|((sa, wa, va), (sb, wb, vb))| {
        sa == sb && wa.iter().zip(wb).all(|(x, y)| x.to_bits() == y.to_bits()) && (!state || va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()))
    })
}

/// The whole check of one configuration on the backends `new_be(world_rank)` makes: every rank's
/// shards after every step against the oracle (relative error ≤ `tol` per touched row), replicas
/// bitwise equal after every sync, the driver's run (its final sync included) against the
/// oracle's end state, and — for K > 1 — whole-table sync bitwise equal to sparse sync.
pub fn check<Be: Backend>(new_be: &(dyn Fn(usize) -> ember_engine::Result<Be> + Sync), opt: Opt, g: G, k: usize, delayed: bool, xfer: XferKind, tol: f64) {
    let c = config(opt.engine());
    let d = data(STEPS, 5 + k as u64);
    let (init, _) = initial(&c);
    let opts = ParallelOptions { sync_every: k, delayed_state_sync: delayed, xfer, ..Default::default() };
    let what = format!("{opt:?} grid {}x{}{} K={k}{}", g.m, g.n, if g.across { " (across nodes)" } else { "" }, if delayed { " delayed" } else { "" });
    let (after, end) = oracle_steps(&c, g, k, opt, delayed, &d);
    // Step by step.
    let ps = per_step(new_be, &c, g, &opts, &d);
    for s in 0..STEPS {
        for (gg, rr, snaps) in &ps.ranks {
            check_shards(&format!("{what}, after step {}", s + 1), *gg, &snaps[s], &after[s], &init, tol);
            if (s + 1) % k == 0 {
                // Replicas bitwise identical after the sync: weights always, state unless it is
                // synced one sync behind.
                let twin = ps.ranks.iter().find(|o| o.0 == 0 && o.1 == *rr).unwrap();
                assert!(bits_equal(&snaps[s], &twin.2[s], !delayed), "{what}: after the sync of step {}, replica {gg} differs from replica 0", s + 1);
            }
        }
        let (l, r) = (ps.losses[s], after[s].losses[s]);
        assert!((l - r).abs() <= tol * r.abs(), "{what}: step {} loss {l} vs reference {r}", s + 1);
    }
    // The driver: the same run, ending with a sync.
    let eval = batch_of(&c.model, &d[0]);
    let feed = |step: usize, w: usize| Ok(g.batch(&d, step, w));
    let (rep, states, _) = Job::new(&c, g.grid(), &plan(&c, g.n), &opts, STEPS).data(&feed, &eval).train(new_be).unwrap();
    assert!(rep.replicas_identical, "{what}: the run ended with replicas that differ");
    for st in &states {
        check_shards(&format!("{what}, end of run"), st.coords.0, &st.shards, &end, &init, tol);
        check_dense(&format!("{what}, end of run, rank {}", st.world_rank), &st.dense, &end, tol);
        let twin = states.iter().find(|o| o.coords == (0, st.coords.1)).unwrap();
        assert!(bits_equal(&st.shards, &twin.shards, true), "{what}: at the end replica {:?} differs from replica 0", st.coords);
    }
    // Whole-table sync gives bitwise the sparse sync's run.
    if k > 1 && !delayed {
        let full = ParallelOptions { sync: SyncMode::Full, ..opts.clone() };
        let (_, fstates, _) = Job::new(&c, g.grid(), &plan(&c, g.n), &full, STEPS).data(&feed, &eval).train(new_be).unwrap();
        for (a, b) in states.iter().zip(&fstates) {
            assert!(bits_equal(&a.shards, &b.shards, true), "{what}: whole-table sync differs from sparse sync on rank {}", a.world_rank);
        }
    }
}

