//! `ember plan`: the sharding plan of one sharding group, with predicted per-rank memory,
//! lookups, all-to-all bytes and imbalance (docs/plan.md). Allocates no tables and trains nothing.
use crate::common::{check_batch, parse_grid, spelled, CliResult, ModelArgs};
use clap::Args;
use ember_engine::config::{JobConfig, TrainConfig};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::plan::planner::{plan, stats_from_batches, PlanOptions, PlanReport};
use ember_engine::grid::Placement;
use ember_engine::parallel::{ParallelOptions, SyncMode};
use ember_engine::plan::ShardingType;
use ember_engine::simulate::choose::{choose, SYNC_INTERVALS};
use ember_engine::simulate::Scenario;

#[derive(Args, Clone, Debug)]
pub struct PlanArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// M replicas x N ranks per sharding group (T = M·N ranks); the plan is one sharding group's.
    #[arg(long, default_value = "1x1")]
    pub grid: String,
    /// Ranks per node (world ranks); table-row-wise shards span one node.
    #[arg(long, default_value_t = 8, value_parser = crate::common::count::<1, { ember_engine::grid::MAX_RANKS }>)]
    pub ranks_per_node: usize,
    /// Per-rank memory budget in GiB; a plan that does not fit is refused.
    #[arg(long, value_parser = crate::common::positive_f64)]
    pub memory_budget_gib: Option<f64>,
    /// Rank placement on the grid.
    #[arg(long, default_value = "in-node", value_parser = spelled::<Placement>())]
    pub placement: Placement,
    /// Force one sharding type for every table [default: the planner chooses per table].
    #[arg(long, value_parser = spelled::<ShardingType>())]
    pub sharding: Option<ShardingType>,
    /// Measure id statistics on this many synthetic samples instead of assuming bag_size
    /// lookups spread uniformly over the rows.
    #[arg(long, value_parser = crate::common::count::<1, { ember_engine::config::limits::MAX_BATCH }>)]
    pub stats_samples: Option<usize>,
    /// Replica sync every K steps (its bytes and buffers).
    #[arg(long, default_value_t = 1)]
    pub sync_every: usize,
    /// Replica sync: sparse (rows touched since the last sync) or full (whole tables).
    #[arg(long, default_value = "sparse", value_parser = spelled::<SyncMode>())]
    pub sync: SyncMode,
    /// Print every rank [default: all when N <= 16, else the 8 heaviest].
    #[arg(long)]
    pub all_ranks: bool,
    /// Choose the grid: predict every M dividing T (N = T/M) with K = 1, 2, 4, 8 on --machine
    /// and plan the fastest that fits its memory (rejected candidates say why).
    #[arg(long, requires = "machine")]
    pub auto: bool,
    /// With --auto: the world size T [default: M·N of --grid].
    #[arg(long, value_parser = crate::common::count::<1, { ember_engine::grid::MAX_RANKS }>)]
    pub ranks: Option<usize>,
    /// With --auto: the machine (a TOML file or a preset's name; `ember simulate`).
    #[arg(long, value_name = "FILE|PRESET")]
    pub machine: Option<String>,
    /// Also print the plan report as one JSON object (the last line).
    #[arg(long)]
    pub json: bool,
}

/// The options `ember plan` passes to the planner.
pub fn options(a: &PlanArgs, cfg: &TrainConfig) -> Result<PlanOptions, Box<dyn std::error::Error>> {
    let budget = match a.memory_budget_gib {
        Some(g) if !(g.is_finite() && g > 0.0) => return Err(format!("--memory-budget-gib {g}: must be > 0").into()),
        Some(g) => Some((g * (1u64 << 30) as f64) as u64),
        None => None,
    };
    let stats = match a.stats_samples {
        Some(s) if s > 0 => {
            let data = SyntheticData::new(cfg)?;
            Some(stats_from_batches(&cfg.model, &[data.samples(0, s)]))
        }
        _ => None,
    };
    let job = JobConfig {
        placement: a.placement,
        sharding: a.sharding,
        ranks_per_node: a.ranks_per_node,
        parallel: ParallelOptions { sync_every: a.sync_every, sync: a.sync, ..ParallelOptions::default() },
        ..JobConfig::default()
    };
    Ok(PlanOptions { memory_budget_bytes: budget, stats, ..job.plan_options(cfg) })
}

fn gib(x: f64) -> String {
    format!("{:.3}", x / (1u64 << 30) as f64)
}

fn mib(x: f64) -> String {
    format!("{:.2}", x / (1u64 << 20) as f64)
}

fn group_ranks(ranks: &[usize]) -> String {
    if ranks.len() <= 4 {
        return format!("{ranks:?}");
    }
    let contiguous = ranks.windows(2).all(|w| w[1] == w[0] + 1);
    if contiguous {
        format!("{}..={} ({})", ranks[0], ranks[ranks.len() - 1], ranks.len())
    } else {
        format!("{} ranks: {}, {}, ... {}", ranks.len(), ranks[0], ranks[1], ranks[ranks.len() - 1])
    }
}

/// The human-readable report.
pub fn render(rep: &PlanReport, all_ranks: bool) -> String {
    let mut s = String::new();
    let push = |s: &mut String, l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    push(
        &mut s,
        format!(
            "plan: grid {}x{} (T = {}), global batch {} ({} per sharding group, {} per rank), {}, {} ranks per node ({} of a group)",
            rep.m, rep.n, rep.world, rep.batch_size, rep.samples_per_group, rep.samples_per_rank, rep.placement, rep.ranks_per_node, rep.group_ranks_per_node
        ),
    );
    push(
        &mut s,
        format!(
            "tables: {} GiB with optimizer state ({} state floats per row); by type: {}",
            gib(rep.table_bytes as f64),
            rep.optimizer_state_floats_per_row,
            rep.tables_by_type.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
        ),
    );
    push(
        &mut s,
        format!(
            "imbalance (max/mean of lookups x dim): {:.3}; memory max/mean: {:.3}; max rank memory {} GiB{}",
            rep.imbalance,
            rep.memory_imbalance,
            gib(rep.max_rank_bytes as f64),
            rep.memory_budget_bytes.map(|b| format!(" (budget {} GiB)", gib(b as f64))).unwrap_or_default()
        ),
    );
    push(&mut s, "sparse collectives, MiB per rank per step (mean over ranks; send buffers as the engine counts them):".into());
    for (k, v) in &rep.a2a_mean_bytes_per_rank {
        if rep.tables_by_type.contains_key(k) {
            push(&mut s, format!("  {k:<15} ids {:>10}  outputs {:>10}  grads {:>10}", mib(v.ids), mib(v.outputs), mib(v.grads)));
        }
    }
    push(&mut s, format!("  {:<15} mean {:>9}  max {:>14}", "total", mib(rep.a2a_mean_total_bytes_per_rank), mib(rep.a2a_max_total_bytes_per_rank)));
    push(&mut s, String::new());
    push(
        &mut s,
        format!(
            "{:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>12} {:>10} {:>10} {:>8}  {}",
            "rank", "mem GiB", "weights", "optim", "activ", "step buf", "dense", "shards", "lookups", "a2a MiB", "inter MiB", "cost/avg", "peak phase"
        ),
    );
    let mean_cost = rep.ranks.iter().map(|r| r.cost).sum::<f64>() / rep.ranks.len().max(1) as f64;
    let mut order: Vec<usize> = (0..rep.ranks.len()).collect();
    let show_all = all_ranks || rep.ranks.len() <= 16;
    if !show_all {
        order.sort_by(|&a, &b| rep.ranks[b].total_bytes.cmp(&rep.ranks[a].total_bytes).then(rep.ranks[b].cost.total_cmp(&rep.ranks[a].cost)));
        order.truncate(8);
    }
    for i in order {
        let r = &rep.ranks[i];
        push(
            &mut s,
            format!(
                "{:>5} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>6} {:>12.0} {:>10} {:>10} {:>8.3}  {}",
                r.rank,
                gib(r.total_bytes as f64),
                gib(r.weights_bytes as f64),
                gib(r.optimizer_bytes as f64),
                gib(r.activation_bytes as f64),
                gib(r.comm_buffer_bytes as f64),
                gib(r.dense_bytes as f64),
                r.shards,
                r.lookups,
                mib(r.a2a_total_bytes),
                mib(r.a2a_inter_node_bytes),
                if mean_cost > 0.0 { r.cost / mean_cost } else { 0.0 },
                r.peak_phase
            ),
        );
    }
    if !show_all {
        push(&mut s, format!("  ({} ranks; the 8 with the most memory shown; --all-ranks prints every rank)", rep.ranks.len()));
    }
    push(&mut s, String::new());
    push(&mut s, format!("{:>5} {:>10} {:>5} {:>15} {:>8} {:>10} {}", "table", "rows", "dim", "kind", "ids/smp", "GiB", "ranks"));
    for t in &rep.tables {
        push(
            &mut s,
            format!(
                "{:>5} {:>10} {:>5} {:>15} {:>8.2} {:>10} {}",
                t.table,
                t.rows,
                t.dim,
                t.kind.name(),
                t.lookups_per_sample,
                gib(t.bytes as f64),
                group_ranks(&t.ranks)
            ),
        );
    }
    s
}

/// `--auto`: the candidates' table, one line per rejected candidate, and the chosen grid.
fn choose_grid(a: &PlanArgs, cfg: &TrainConfig, opts: &PlanOptions, world: usize) -> Result<(usize, usize, usize), Box<dyn std::error::Error>> {
    let machine = crate::simulate::load_machine(a.machine.as_deref().ok_or("--auto needs --machine")?)?;
    let base = Scenario { stats: opts.stats.clone(), placement: a.placement, full_sync: a.sync == SyncMode::Full, ..Scenario::new(1, world, cfg.batch_size, 1) };
    let c = choose(cfg, &machine, world, &base, &SYNC_INTERVALS)?;
    println!("plan --auto: T = {world} ranks on {}, global batch {}, {} GiB per rank", machine.name, cfg.batch_size, gib(machine.memory_per_rank as f64));
    println!("{:>11} {:>4} {:>10} {:>14} {:>10} {:>9} {:>9}", "grid", "K", "step ms", "samples/s", "GiB/rank", "imbal", "");
    for (i, k) in c.candidates.iter().enumerate() {
        if let Some(p) = &k.prediction {
            let verdict = if Some(i) == c.best { "CHOSEN" } else if p.fits { "" } else { "OOM" };
            println!("{:>11} {:>4} {:>10.3} {:>14.0} {:>10} {:>9.3} {:>9}", p.grid, k.sync_every, p.step_ms, p.samples_per_s, gib(p.peak_bytes_per_rank as f64), p.imbalance, verdict);
        }
    }
    println!("rejected:");
    for k in &c.candidates {
        if let Some(why) = &k.rejected {
            println!("  {}x{} K={}: {why}", k.m, k.n, k.sync_every);
        }
    }
    let best = c.best.ok_or_else(|| format!("plan --auto: no grid of {world} ranks fits {} GiB per rank", gib(machine.memory_per_rank as f64)))?;
    let k = &c.candidates[best];
    println!("chosen: grid {}x{}, sync every {} (ember train --grid {}x{} --sync-every {})\n", k.m, k.n, k.sync_every, k.m, k.n, k.sync_every);
    Ok((k.m, k.n, k.sync_every))
}

pub fn run(a: PlanArgs) -> CliResult {
    let mut model = a.model.clone();
    // Nothing is allocated: plan the real shapes unless --max-rows caps them.
    if model.max_rows.is_none() {
        model.max_rows = Some(u64::MAX);
    }
    let cfg = model.train_config("tiny", None)?;
    let (mut m, mut n) = parse_grid(&a.grid)?;
    let mut opts = options(&a, &cfg)?;
    if a.auto {
        let (cm, cn, ck) = choose_grid(&a, &cfg, &opts, a.ranks.unwrap_or(m * n))?;
        (m, n) = (cm, cn);
        opts.sync_every = ck;
    }
    check_batch(cfg.batch_size, m, n)?;
    let (_plan, rep) = plan(&cfg.model, m, n, &opts)?;
    print!("{}", render(&rep, a.all_ranks));
    if a.json {
        println!("{}", serde_json::to_string(&rep)?);
    }
    Ok(())
}
