//! 2D self-test: a backend driving T = 4 in-process ranks on grids 1×4, 2×2 and 4×1, checked
//! against the CPU backend on the same grid, plan and data — the SGD equivalence of BRIEF.md §3
//! (every shard, optimizer state and dense parameter after a few steps, to 1e-4 relative) and
//! matching row-wise AdaGrad loss curves over 50 steps. Every sharding type is in the plan
//! (table t is table-, row-, column- or table-row-wise by t mod 4) and odd tables mean-pool.
use crate::backend::{Backend, Cpu};
use crate::config::{preset, DenseOptimizer, EmbOptimizer, Pooling, TrainConfig};
use crate::grid::{Grid, Placement};
use crate::parallel::driver::{Job, Report2D};
use crate::parallel::{ParallelOptions, XferKind};
use crate::plan::{Plan, ShardingType};
use crate::selftest::{Check, SelftestReport};
use crate::Result;

/// The grids checked (T = 4).
pub const GRIDS: [(usize, usize); 3] = [(1, 4), (2, 2), (4, 1)];

/// Relative tolerance of the SGD equivalence, and of each step's loss on the AdaGrad curve.
pub const SGD_TOL: f64 = 1e-4;
pub const CURVE_TOL: f64 = 1e-3;

/// One grid's device run of the AdaGrad curve: its report (samples/s, per-stage times).
pub struct GridRun {
    pub grid: String,
    pub report: Report2D,
}

fn config(batch: usize, sgd: bool) -> Result<TrainConfig> {
    let mut cfg = preset("tiny", Some(4000))?;
    cfg.batch_size = batch;
    cfg.synthetic.eval_samples = 256;
    if sgd {
        cfg.optim.embedding = EmbOptimizer::Sgd { lr: 0.5 };
        cfg.optim.dense = DenseOptimizer::Sgd { lr: 0.1 };
    } else {
        cfg.optim.embedding = EmbOptimizer::RowWiseAdagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false };
    }
    for (t, tc) in cfg.model.tables.iter_mut().enumerate() {
        if t % 2 == 1 {
            tc.pooling = Pooling::Mean;
        }
    }
    Ok(cfg)
}

/// Table t sharded as `ShardingType::ALL[t % 4]` over the group's `n` ranks.
pub fn mixed_plan(cfg: &TrainConfig, n: usize) -> Result<Plan> {
    Plan::cycling(&cfg.model, n, &ShardingType::ALL)
}

/// Run the 2D checks with one backend (named `name`) per rank from `new_be(world_rank)`, buffers
/// moved by `xfer`.
pub fn selftest_2d<B: Backend>(name: &str, new_be: &(dyn Fn(usize) -> Result<B> + Sync), xfer: XferKind) -> Result<(SelftestReport, Vec<GridRun>)> {
    let cpu = |_: usize| Ok(Cpu::new());
    let mut rep = SelftestReport { backend: name.to_string(), checks: Vec::new() };
    let mut runs = Vec::new();
    for (m, n) in GRIDS {
        let grid = Grid::new(m, n, Placement::ReplicasInNode)?;
        let g = format!("{m}x{n}");
        // SGD, K = 1: every shard, state and dense parameter against the CPU backend.
        let cfg = config(32 * m * n, true)?;
        let plan = mixed_plan(&cfg, n)?;
        let opts = ParallelOptions { xfer, ..ParallelOptions::default() };
        let (_, want, _) = Job::new(&cfg, grid, &plan, &opts, 4).train(&cpu)?;
        let (_, got, _) = Job::new(&cfg, grid, &plan, &opts, 4).train(new_be)?;
        for (a, b) in got.iter().zip(&want) {
            for (i, ((_, wa, _), (_, wb, _))) in a.shards.iter().zip(&b.shards).enumerate() {
                rep.push(format!("2D {g} SGD: rank {} shard {i} weights", a.world_rank), wa, wb, SGD_TOL);
            }
            let (da, db): (Vec<f32>, Vec<f32>) = (a.dense.concat(), b.dense.concat());
            rep.push(format!("2D {g} SGD: rank {} dense parameters", a.world_rank), &da, &db, SGD_TOL);
        }
        // Row-wise AdaGrad, K = 2, 50 steps: the loss curves, and the final shards and state.
        let cfg = config(64 * m * n, false)?;
        let plan = mixed_plan(&cfg, n)?;
        let opts = ParallelOptions { sync_every: 2, xfer, ..ParallelOptions::default() };
        let (want_rep, want, _) = Job::new(&cfg, grid, &plan, &opts, 50).train(&cpu)?;
        let (got_rep, got, _) = Job::new(&cfg, grid, &plan, &opts, 50).train(new_be)?;
        let worst = got_rep
            .losses
            .iter()
            .zip(&want_rep.losses)
            .map(|(a, b)| if a.is_finite() { (a - b).abs() / b.abs().max(1e-30) } else { f64::INFINITY })
            .fold(0.0, f64::max);
        let ok = got_rep.losses.len() == want_rep.losses.len() && worst <= CURVE_TOL;
        rep.checks.push(Check { name: format!("2D {g} row-wise AdaGrad: loss curve, 50 steps (worst step)"), rel_err: worst, tol: CURVE_TOL, ok });
        for (a, b) in got.iter().zip(&want) {
            let (sa, sb): (Vec<f32>, Vec<f32>) = (a.shards.iter().flat_map(|s| s.2.clone()).collect(), b.shards.iter().flat_map(|s| s.2.clone()).collect());
            rep.push(format!("2D {g} row-wise AdaGrad: rank {} optimizer state after 50 steps", a.world_rank), &sa, &sb, 10.0 * CURVE_TOL);
        }
        runs.push(GridRun { grid: g, report: got_rep });
    }
    Ok((rep, runs))
}

/// Markdown table of the device runs: samples/s and per-stage ms per step, per grid.
pub fn timing_table(runs: &[GridRun]) -> String {
    let mut s = String::from("| grid | samples/s | input_dist | lookup | output_dist | dense | backward | sync | ms/step |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in runs {
        let st = &r.report.stages;
        let total = st.input_dist + st.lookup + st.output_dist + st.dense + st.backward + st.sync;
        s += &format!(
            "| {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |\n",
            r.grid, r.report.samples_per_s, st.input_dist, st.lookup, st.output_dist, st.dense, st.backward, st.sync, total
        );
    }
    s
}
