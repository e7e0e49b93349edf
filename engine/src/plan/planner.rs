//! The planner: chooses a sharding type and ranks per table for one sharding group of N ranks,
//! and predicts each rank's memory, lookups and bytes per collective for any plan, counting
//! what the 2D step (`crate::parallel`) really allocates and sends (docs/plan.md).
//!
//! Notation: B global batch, M replicas, N ranks per group, G = B/M samples a group serves per
//! step, b = B/T samples a rank owns, D table width, λ ids per sample of a table, f the share of
//! a table's ids that fall in a shard (from an id histogram; uniform by default).
//!
//! The parts, each in its own module of `crate::plan`: the tables' id statistics (`stats`), the
//! options and their resolution against a model and a grid (`options`), the byte sizes of the
//! engine's buffers (`sizes`), the greedy search for a plan (`search`), the memory model
//! (`memory`) and the per-rank report of memory, compute cost and traffic (`report`). This
//! module ties them together: [`plan`] searches and checks the budget, [`predict`] reports any
//! plan.
use super::options::Ctx;
use super::report::report_ctx;
use super::search::greedy;
use super::Plan;
use crate::config::ModelConfig;
use crate::{Error, Result};

pub use super::memory::STEP_SPREAD;
pub use super::options::{group_ranks_per_node, PlanOptions};
pub use super::report::{A2aBytes, PhaseBytes, PlanReport, RankReport, TableReport};
pub use super::search::MIN_COL_WIDTH;
pub use super::sizes::dense_params;
pub use super::stats::{default_stats, stats_from_batches, TableStats, HIST_BUCKETS};
pub use super::traffic::Traffic;

const GIB: f64 = (1u64 << 30) as f64;

/// Plans the N ranks of one sharding group for a grid of M replicas, with the global batch of
/// `opts`. The same plan serves every sharding group. Refuses (Error::Config) a plan that does not
/// fit `opts.memory_budget_bytes` on some rank, naming the rank, its need and the budget.
pub fn plan(model: &ModelConfig, grid_m: usize, n: usize, opts: &PlanOptions) -> Result<(Plan, PlanReport)> {
    let ctx = Ctx::new(model, grid_m, n, opts)?;
    let shares: &[f64] = if opts.memory_budget_bytes.is_some() && opts.force.is_none() { &[1.0, 0.5, 0.25, 0.125, 0.0625, 0.0] } else { &[1.0] };
    let mut best: Option<(Plan, PlanReport)> = None;
    for &share in shares {
        let p = greedy(&ctx, share);
        p.validate(model)?;
        let rep = report_ctx(&ctx, &p);
        let fits = opts.memory_budget_bytes.map_or(true, |b| rep.max_rank_bytes <= b);
        if fits {
            return Ok((p, rep));
        }
        if best.as_ref().map_or(true, |(_, r)| rep.max_rank_bytes < r.max_rank_bytes) {
            best = Some((p, rep));
        }
    }
    let (_, rep) = best.expect("at least one attempt");
    let budget = opts.memory_budget_bytes.unwrap_or(0);
    let worst = rep.ranks.iter().max_by_key(|r| (r.total_bytes, std::cmp::Reverse(r.rank))).expect("n >= 1");
    let g = |x: u64| x as f64 / GIB;
    Err(Error::Config(format!(
        "plan for grid {}x{} does not fit the memory budget: rank {} of each sharding group needs {:.3} GiB at its peak ({}: \
         weights {:.3}, optimizer state {:.3}, activations {:.3}, step buffers {:.3}, dense {:.3}) but the budget is {:.3} GiB per rank \
         (all {} tables with optimizer state: {:.3} GiB per replica); use more ranks per sharding group (larger N), fewer replicas, \
         a smaller batch or a larger budget",
        grid_m,
        n,
        worst.rank,
        g(worst.total_bytes),
        worst.peak_phase,
        g(worst.weights_bytes),
        g(worst.optimizer_bytes),
        g(worst.activation_bytes),
        g(worst.comm_buffer_bytes),
        g(worst.dense_bytes),
        g(budget),
        model.num_tables(),
        g(rep.table_bytes),
    )))
}

/// Predicted memory, lookups and bytes per collective of any plan (see the module doc).
pub fn predict(model: &ModelConfig, grid_m: usize, plan: &Plan, opts: &PlanOptions) -> Result<PlanReport> {
    let ctx = Ctx::new(model, grid_m, plan.n, opts)?;
    plan.validate(model)?;
    Ok(report_ctx(&ctx, plan))
}

