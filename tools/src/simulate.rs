//! `ember simulate`: the scale model's command line — predict a 2D step on a described
//! machine (one grid, or a sweep over world sizes and grids with an optional plot), or
//! (`--calibrate FILE`) write this machine's description from microbenchmarks.
use crate::common::{parse_grid, spelled, CliResult, ModelArgs};
use clap::Args;
use ember_engine::config::TrainConfig;
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::grid::Placement;
use ember_engine::plan::planner::{stats_from_batches, TableStats};
use ember_engine::parallel::{OverlapSync, SyncMode};
use ember_engine::simulate::{predict, Machine, Prediction, Scenario};
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct SimulateArgs {
    /// Write this machine's description (TOML) to FILE, measured by microbenchmarks only.
    #[arg(long, value_name = "FILE")]
    pub calibrate: Option<PathBuf>,
    #[command(flatten)]
    pub calibration: crate::calibrate::CalibrateArgs,
    #[command(flatten)]
    pub model: ModelArgs,
    /// The machine: a TOML file (`ember simulate --calibrate` writes one) or a preset's name.
    #[arg(long, value_name = "FILE|PRESET")]
    pub machine: Option<String>,
    /// M replicas x N ranks per sharding group (T = M·N; 1xT is full sharding).
    #[arg(long)]
    pub grid: Option<String>,
    /// Replica sync every K steps.
    #[arg(long, default_value_t = 1, value_parser = crate::common::count::<1, { 1 << 20 }>)]
    pub sync_every: usize,
    /// Replica sync: sparse (rows touched since the last sync) or full (whole tables).
    #[arg(long, default_value = "sparse", value_parser = spelled::<SyncMode>())]
    pub sync: SyncMode,
    /// Rank placement on the grid.
    #[arg(long, default_value = "in-node", value_parser = spelled::<Placement>())]
    pub placement: Placement,
    /// The replica sync beside the dense update (`on`), after it (`off`), or as `ember train`'s
    /// `auto` does: beside it where every rank has a compute unit of its own.
    #[arg(long, default_value = "auto", value_parser = spelled::<OverlapSync>())]
    pub overlap_sync: OverlapSync,
    /// Sweep these world sizes T (comma-separated) instead of one --grid; prints a table.
    #[arg(long, value_delimiter = ',', value_parser = crate::common::count::<1, { ember_engine::grid::MAX_RANKS }>)]
    pub sweep: Vec<usize>,
    /// With --sweep: the replica counts M to try at every T (1 is full sharding).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8", value_parser = crate::common::count::<1, { ember_engine::grid::MAX_RANKS }>)]
    pub replicas: Vec<usize>,
    /// With --sweep: weak scaling, this many samples per rank (B = b·T) [default: --batch-size
    /// or the config's global batch at every T].
    #[arg(long, value_parser = crate::common::count::<1, { ember_engine::config::limits::MAX_BATCH }>)]
    pub per_rank_batch: Option<usize>,
    /// With --sweep: draw samples/s and memory per rank against T to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Measure id statistics on this many synthetic samples (the config's id distribution)
    /// instead of assuming bag_size lookups spread uniformly over the rows.
    #[arg(long, value_parser = crate::common::count::<1, { ember_engine::config::limits::MAX_BATCH }>)]
    pub stats_samples: Option<usize>,
    /// Print one JSON object (a sweep: one per line) instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `--machine`: a file if one exists at that path, else a shipped preset
/// (`Machine::PRESETS`).
pub fn load_machine(spec: &str) -> Result<Machine, Box<dyn std::error::Error>> {
    let path = std::path::Path::new(spec);
    if path.is_file() {
        return Ok(Machine::read(path).map_err(|e| format!("--machine {spec}: {e}"))?);
    }
    Machine::preset(spec).map_err(|e| format!("--machine {spec}: no such file, and {e}").into())
}

fn gib(x: f64) -> f64 {
    x / (1u64 << 30) as f64
}

fn mib(x: f64) -> f64 {
    x / (1u64 << 20) as f64
}

/// The per-stage table of one prediction (nccl-tests style: one row per stage).
pub fn render(p: &Prediction, model_name: &str) -> String {
    let mut s = String::new();
    let mut line = |l: String| {
        s.push_str(&l);
        s.push('\n');
    };
    line(format!(
        "# ember simulate: {model_name} on {}, grid {} (T = {}), global batch {} ({:.0} per rank), sync every {}",
        p.machine,
        p.grid,
        p.world,
        p.batch_size,
        p.batch_size as f64 / p.world as f64,
        p.sync_every
    ));
    line(format!(
        "# tables by type: {}; compute time-shared {:.2}x",
        p.tables_by_type.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        p.time_sharing
    ));
    line("#".into());
    line(format!(
        "# {:>22} {:>11} {:>10} {:>10} {:>5} {:>11} {:>11} {:>11}  {}",
        "stage", "engine", "time ms", "busy ms", "rank", "bytes MiB", "intra MiB", "inter MiB", "overlaps"
    ));
    for st in &p.parts {
        line(format!(
            "  {:>22} {:>11} {:>10.3} {:>10.3} {:>5} {:>11.3} {:>11.3} {:>11.3}  {}",
            st.name,
            st.engine_stage,
            st.ms,
            st.busy_ms,
            st.slowest_rank,
            mib(st.bytes),
            mib(st.intra_node_bytes),
            mib(st.inter_node_bytes),
            st.overlap
        ));
    }
    line("#".into());
    line(format!("# step {:.3} ms, {:.0} samples/s, load imbalance (max/mean lookups x dim) {:.3}", p.step_ms, p.samples_per_s, p.imbalance));
    let mem = format!("# memory: peak {:.3} GiB per rank of {:.3} GiB", gib(p.peak_bytes_per_rank as f64), gib(p.memory_per_rank as f64));
    match &p.out_of_memory {
        None => line(format!("{mem}: fits")),
        Some(why) => line(format!("{mem}: OUT OF MEMORY ({why})")),
    }
    for a in &p.assumptions {
        line(format!("# assumes: {a}"));
    }
    s
}

fn scenario(a: &SimulateArgs, stats: &Option<Vec<TableStats>>, m: usize, n: usize, batch: usize) -> Scenario {
    let overlap_sync = match a.overlap_sync {
        OverlapSync::Auto => None,
        OverlapSync::On => Some(true),
        OverlapSync::Off => Some(false),
    };
    Scenario { full_sync: a.sync == SyncMode::Full, placement: a.placement, stats: stats.clone(), overlap_sync, ..Scenario::new(m, n, batch, a.sync_every) }
}

/// `--stats-samples`: id statistics measured on synthetic samples of the config.
pub fn measured_stats(cfg: &TrainConfig, samples: Option<usize>) -> Result<Option<Vec<TableStats>>, Box<dyn std::error::Error>> {
    Ok(match samples {
        Some(s) => Some(stats_from_batches(&cfg.model, &[SyntheticData::new(cfg)?.samples(0, s)])),
        None => None,
    })
}

/// The model config: real shapes unless --max-rows caps them (nothing is allocated).
fn model_config(a: &SimulateArgs) -> Result<TrainConfig, Box<dyn std::error::Error>> {
    let mut model = a.model.clone();
    if model.max_rows.is_none() {
        model.max_rows = Some(u64::MAX);
    }
    model.train_config("tiny", None)
}

fn model_name(a: &SimulateArgs) -> String {
    match (&a.model.config, &a.model.preset) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(p)) => p.clone(),
        (None, None) => "tiny".into(),
    }
}

/// One row of a sweep.
#[derive(serde::Serialize)]
pub struct SweepRow {
    pub world: usize,
    pub m: usize,
    pub n: usize,
    pub prediction: Prediction,
}

/// Predictions for every T of `worlds` and every M of `replicas` that divides it.
pub fn sweep(cfg: &TrainConfig, machine: &Machine, a: &SimulateArgs, stats: &Option<Vec<TableStats>>, worlds: &[usize], replicas: &[usize]) -> Result<Vec<SweepRow>, Box<dyn std::error::Error>> {
    let mut rows = Vec::new();
    for &t in worlds {
        let batch = match a.per_rank_batch {
            Some(b) => b.checked_mul(t).ok_or("--per-rank-batch x T overflows")?,
            None => cfg.batch_size,
        };
        for &m in replicas {
            if t % m != 0 || batch % t != 0 {
                continue;
            }
            let p = predict(cfg, machine, &scenario(a, stats, m, t / m, batch))?;
            rows.push(SweepRow { world: t, m, n: t / m, prediction: p });
        }
    }
    Ok(rows)
}

/// The sweep's table: one row per (T, grid).
pub fn render_sweep(rows: &[SweepRow]) -> String {
    let mut s = format!("# {:>6} {:>11} {:>9} {:>10} {:>14} {:>12} {:>9} {:>10}\n", "T", "grid", "batch", "step ms", "samples/s", "GiB/rank", "fits", "imbalance");
    for r in rows {
        let p = &r.prediction;
        s.push_str(&format!(
            "  {:>6} {:>11} {:>9} {:>10.3} {:>14.0} {:>12.3} {:>9} {:>10.3}\n",
            r.world,
            p.grid,
            p.batch_size,
            p.step_ms,
            p.samples_per_s,
            gib(p.peak_bytes_per_rank as f64),
            if p.fits { "yes" } else { "OOM" },
            p.imbalance
        ));
    }
    s
}

pub fn run(a: SimulateArgs) -> CliResult {
    if let Some(out) = &a.calibrate {
        return crate::calibrate::run_with(out, &a.calibration);
    }
    let machine = load_machine(a.machine.as_deref().ok_or("ember simulate: --machine FILE|PRESET is required")?)?;
    let cfg = model_config(&a)?;
    let stats = measured_stats(&cfg, a.stats_samples)?;
    if !a.sweep.is_empty() {
        let rows = sweep(&cfg, &machine, &a, &stats, &a.sweep, &a.replicas)?;
        if rows.is_empty() {
            return Err("ember simulate --sweep: no (T, M) pair divides the batch; check --sweep, --replicas and the batch".into());
        }
        if a.json {
            for r in &rows {
                println!("{}", serde_json::to_string(&r.prediction)?);
            }
        } else {
            print!("{}", render_sweep(&rows));
        }
        if let Some(path) = &a.plot {
            crate::simulate_plot::draw(path, &rows, &model_name(&a), &machine.name)?;
        }
        return Ok(());
    }
    if a.plot.is_some() {
        return Err("ember simulate: --plot draws a --sweep".into());
    }
    let (m, n) = parse_grid(a.grid.as_deref().ok_or("ember simulate: --grid MxN (or --sweep) is required")?)?;
    crate::common::check_batch(cfg.batch_size, m, n)?;
    let p = predict(&cfg, &machine, &scenario(&a, &stats, m, n, cfg.batch_size))?;
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
    } else {
        print!("{}", render(&p, &model_name(&a)));
    }
    Ok(())
}
