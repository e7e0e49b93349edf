//! `ember train`: one process, CPU (or CUDA) backend, synthetic data or Criteo files.
use crate::common::{count, CliResult, Shared};
use ember_engine::backend::{Backend, Cpu};
use ember_engine::config::TrainConfig;
use ember_engine::data::criteo::{BadLinePolicy, CriteoReader};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::data::{DataSource, EvalSet};
use ember_engine::metrics::EvalResult;
use ember_engine::train::{train, TrainReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub shared: Shared,
    /// Evaluate on the held-out set every this many steps (0: only at the end).
    #[arg(long, value_parser = count::<0, { ember_engine::config::limits::MAX_STEPS }>)]
    pub eval_every: Option<usize>,
    /// With --data: skip malformed lines (counted and printed) instead of failing.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Replica sync every K steps (grids with M > 1).
    #[arg(long, default_value_t = 1, value_parser = count::<1, { ember_engine::config::limits::MAX_STEPS }>)]
    pub sync_every: usize,
    /// Replica sync: sparse (rows touched since the last sync) or full (whole tables).
    #[arg(long, default_value = "sparse")]
    pub sync: String,
    /// Rank placement: in-node (replica groups contiguous; default) or across-nodes.
    #[arg(long, default_value = "in-node")]
    pub placement: String,
    /// Ranks per node (for the planner's table-row-wise choice).
    #[arg(long, default_value_t = 8, value_parser = count::<1, { ember_engine::grid::MAX_RANKS }>)]
    pub ranks_per_node: usize,
    /// Momentum-scaling constant c of the AdaGrad optimizers (default: M under 2D, 1 on one replica).
    #[arg(long, value_parser = crate::common::positive_f32)]
    pub momentum_c: Option<f32>,
    /// Force one sharding type for every table: table, row, column, table-row (default: the planner chooses).
    #[arg(long)]
    pub sharding: Option<String>,
    /// Sync the optimizer state one sync behind (weights still every sync).
    #[arg(long)]
    pub delayed_state_sync: bool,
    /// Fully-sharded 2D: weights reduce-scattered over the replica group after the lookup,
    /// all-gathered before the embedding backward (optimizer state not averaged).
    #[arg(long)]
    pub fully_sharded: bool,
    /// How the 2D step's buffers travel between ranks: auto (peer-to-peer device copies for
    /// in-process ranks on a GPU; for GPU ranks in separate processes GPUDirect RDMA when every
    /// rank's NIC registers device memory, else NCCL when built, else the host transport),
    /// host, staged (host transport via host copies), peers (in-process ranks copy out of each
    /// other's buffers), nccl, direct (GPUDirect RDMA: the RDMA transport on the buffers).
    #[arg(long, default_value = "auto")]
    pub xfer: String,
    /// Checkpoint folder (DIR/step-S/); checkpointed runs go through the grid engine (also 1x1).
    #[arg(long)]
    pub checkpoint_dir: Option<std::path::PathBuf>,
    /// Save a checkpoint every S steps (a multiple of --sync-every).
    #[arg(long, default_value_t = 0, value_parser = count::<0, { ember_engine::config::limits::MAX_STEPS }>)]
    pub checkpoint_every: usize,
    /// Keep the last K complete checkpoints.
    #[arg(long, default_value_t = 2, value_parser = count::<1, 1_000_000>)]
    pub keep: usize,
    /// Resume from the latest complete checkpoint in --checkpoint-dir.
    #[arg(long)]
    pub resume: bool,
    /// Start a new run in a --checkpoint-dir that holds another run's checkpoints, removing
    /// them first (without it such a folder is refused).
    #[arg(long)]
    pub overwrite_checkpoints: bool,
    /// Write a Chrome/Perfetto trace of every rank's stages to this file.
    #[arg(long)]
    pub trace: Option<std::path::PathBuf>,
}

pub fn run(a: TrainArgs) -> CliResult {
    let s = &a.shared;
    let mut cfg = s.train_config(if s.data.is_some() { "kaggle" } else { "tiny" })?;
    if let Some(e) = a.eval_every {
        cfg.eval_every = e;
    }
    if let Some(c) = a.momentum_c {
        use ember_engine::config::EmbOptimizer::*;
        match &mut cfg.optim.embedding {
            RowWiseAdagrad { c: cc, .. } | Adagrad { c: cc, .. } => *cc = Some(c),
            Sgd { .. } => return Err("--momentum-c applies to the AdaGrad optimizers only".into()),
        }
    }
    if s.data.is_some() && s.steps.is_none() && s.config.is_none() {
        cfg.steps = None; // one epoch of the file
    }
    let (m, n) = s.grid()?;
    let launched = ember_transport::JoinConfig::from_env().map(|j| j.size > 1).unwrap_or(false);
    if (m, n) != (1, 1) || launched || a.checkpoint_dir.is_some() {
        return crate::train2d::run(&a, cfg, m, n);
    }
    if s.transport != "auto" && s.transport != "local" {
        return Err(format!("--transport {}: a single-rank run uses no transport", s.transport).into());
    }
    if s.device == "cpu" {
        let (_, rep) = ember_engine::plan::planner::plan(&cfg.model, 1, 1, &ember_engine::plan::planner::PlanOptions::from_config(&cfg))?;
        ember_engine::memory::check_plan(&rep, 1, true)?;
    }
    let mut skipped = None;
    let mut oracle = None;
    // The eval set: the file's eval split read chunk by chunk, or the synthetic one.
    let (mut data, eval): (Box<dyn DataSource>, Box<dyn EvalSet>) = match &s.data {
        Some(path) => {
            let policy = if a.skip_bad_lines { BadLinePolicy::Skip } else { BadLinePolicy::Fail };
            let r = CriteoReader::open(path, &cfg.model, policy)?;
            let eval = r.eval_stream()?;
            skipped = Some(0);
            (Box::new(r), Box::new(eval))
        }
        None => {
            let mut d = SyntheticData::new(&cfg)?;
            let eval = d.eval_set()?;
            oracle = Some(d.oracle_eval());
            (Box::new(d), Box::new(eval))
        }
    };
    match s.device.as_str() {
        "cpu" => run_on(&Cpu::new(), &cfg, data.as_mut(), eval.as_ref(), &a, skipped, oracle),
        "cuda" => run_cuda(&cfg, data.as_mut(), eval.as_ref(), &a, skipped, oracle),
        other => Err(format!("--device '{other}': expected cpu or cuda").into()),
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(cfg: &TrainConfig, data: &mut dyn DataSource, eval: &dyn EvalSet, a: &TrainArgs, skipped: Option<u64>, oracle: Option<EvalResult>) -> CliResult {
    let be = ember_engine::backend::cuda::Cuda::new(0)?;
    run_on(&be, cfg, data, eval, a, skipped, oracle)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &TrainConfig, _: &mut dyn DataSource, _: &dyn EvalSet, _: &TrainArgs, _: Option<u64>, _: Option<EvalResult>) -> CliResult {
    Err("--device cuda: this binary was built without the `cuda` feature (cargo build --release --features cuda)".into())
}

fn run_on<B: Backend>(be: &B, cfg: &TrainConfig, data: &mut dyn DataSource, eval: &dyn EvalSet, a: &TrainArgs, skipped: Option<u64>, oracle: Option<EvalResult>) -> CliResult {
    let s = &a.shared;
    let total = cfg.steps.map(|x| x as u64).or(data.len().map(|n| n / cfg.batch_size as u64)).unwrap_or(0);
    let bar = ProgressBar::new(total);
    if a.quiet || s.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]").expect("valid template"),
    );
    let (_model, report) = train(be, cfg, data, eval, |p| {
        bar.set_position(p.step as u64);
        if p.step % 10 == 0 || p.step == p.total {
            bar.set_message(format!("{:.0} samples/s  loss {:.4}  ne {:.4}", p.samples_per_s, p.loss, p.ne));
        }
    })?;
    bar.finish_and_clear();
    // Bad lines skipped by the training stream and by the eval pass (files only).
    let skipped = skipped.map(|_| data.skipped() + eval.skipped());
    print_summary(&report, skipped, oracle);
    if s.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(k) = skipped {
            v["skipped_lines"] = k.into();
        }
        if let Some(o) = oracle {
            v["oracle_auc"] = o.auc.into();
            v["oracle_ne"] = o.ne.into();
        }
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

fn print_summary(r: &TrainReport, skipped: Option<u64>, oracle: Option<EvalResult>) {
    println!("ember train: {} steps x batch {} on {} in {:.2} s", r.steps, r.batch_size, r.backend, r.wall_s);
    println!("  throughput      {:>12.0} samples/s", r.samples_per_s);
    println!("  train loss      {:>12.5}  (mean of the last 10 % of steps)", r.loss);
    for e in &r.evals {
        println!("  eval @ {:>6}   loss {:.5}  ne {:.5}  auc {:.5}", e.step, e.loss, e.ne, e.auc);
    }
    println!("  eval            ne {:.5}  auc {:.5}  ({} held-out samples)", r.ne, r.auc, r.eval_samples);
    if let Some(o) = oracle {
        println!("  planted oracle  ne {:.5}  auc {:.5}  (the model that generated the labels)", o.ne, o.auc);
    }
    if let Some(k) = skipped {
        println!("  skipped lines   {k}");
    }
}
