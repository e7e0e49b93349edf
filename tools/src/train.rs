//! `ember train`: its flags, and the one-process run (CPU or CUDA backend, synthetic data or a
//! Criteo file, with or without checkpoints); grids and launched ranks go to `train2d`.
use crate::common::{check_batch, count, count64, parse_grid, positive_f32, CliResult, Device, ModelArgs, PlacementArg, ShardingArg};
use crate::notes::{note, set_bar};
use ember_engine::backend::{Backend, Cpu};
use ember_engine::config::TrainConfig;
use ember_engine::data::criteo::{BadLinePolicy, CriteoReader};
use ember_engine::data::dataset::{detect, Format, MappedData};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::config::limits::{MAX_EPOCHS, MAX_STEPS};
use ember_engine::data::{DataSource, EvalSet};
use ember_engine::metrics::EvalResult;
use ember_engine::parallel::CheckpointOptions;
use ember_engine::train::{train_checkpointed, TrainReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training data: Criteo text (raw tab-separated, or comma-separated with a header line), an
    /// Ember binary file or folder of them (`ember convert`), or TorchRec/MLPerf day_N_*.npy
    /// files or a folder of days; without --eval-data the last 10 % of its samples are held out
    /// for evaluation [default: built-in synthetic data].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// With binary or .npy --data: the held-out set, a file or folder of the same kinds
    /// [default: the last 10 % of --data's samples].
    #[arg(long, value_name = "PATH")]
    pub eval_data: Option<PathBuf>,
    /// With binary or .npy --data: passes over the training samples, each in its own seeded
    /// order of the files [default: 1].
    #[arg(long, value_name = "E", value_parser = count64::<1, MAX_EPOCHS>)]
    pub epochs: Option<u64>,
    /// Training steps, at most one epoch of --data [default: the config's; one epoch with --data].
    #[arg(long, value_parser = count::<1, MAX_STEPS>)]
    pub steps: Option<usize>,
    /// Evaluate on the held-out set every this many steps (0: only at the end) [default: the config's].
    #[arg(long, value_parser = count::<0, MAX_STEPS>)]
    pub eval_every: Option<usize>,
    /// With --data on one rank: skip malformed lines (their count is printed) instead of failing at the first.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Backend.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// M replicas x N ranks per sharding group (T = M·N ranks) [default: 1x1; under a launcher of
    /// T processes: 1xT].
    #[arg(long, help_heading = "2D")]
    pub grid: Option<String>,
    /// Transport between ranks in separate processes: auto, shm, tcp, rdma (a binary built with
    /// --features rdma); in-process ranks use local.
    #[arg(long, default_value = "auto", help_heading = "2D")]
    pub transport: String,
    /// Replica sync every K steps (grids with M > 1).
    #[arg(long, default_value_t = 1, value_parser = count::<1, MAX_STEPS>, help_heading = "2D")]
    pub sync_every: usize,
    /// Replica sync: sparse (rows touched since the last sync) or full (whole tables).
    #[arg(long, default_value = "sparse", value_parser = ["sparse", "full"], help_heading = "2D")]
    pub sync: String,
    /// Rank placement on the grid.
    #[arg(long, value_enum, default_value_t = PlacementArg::InNode, help_heading = "2D")]
    pub placement: PlacementArg,
    /// Ranks per node (for the planner's table-row-wise shards).
    #[arg(long, default_value_t = 8, value_parser = count::<1, { ember_engine::grid::MAX_RANKS }>, help_heading = "2D")]
    pub ranks_per_node: usize,
    /// Force one sharding type for every table [default: the planner chooses per table].
    #[arg(long, value_enum, help_heading = "2D")]
    pub sharding: Option<ShardingArg>,
    /// Momentum-scaling constant c of the AdaGrad optimizers [default: M under 2D, M² fully sharded, 1 on one replica].
    #[arg(long, value_parser = positive_f32, help_heading = "2D")]
    pub momentum_c: Option<f32>,
    /// Average the optimizer state one sync behind (the weights still at every sync).
    #[arg(long, help_heading = "2D")]
    pub delayed_state_sync: bool,
    /// Fully-sharded 2D: weights reduce-scattered over the replica group after the lookup,
    /// all-gathered before the embedding backward (optimizer state not averaged).
    #[arg(long, help_heading = "2D")]
    pub fully_sharded: bool,
    /// How the 2D step's buffers travel between ranks: auto (peer-to-peer device copies for
    /// in-process ranks on a GPU; for GPU ranks in separate processes GPUDirect RDMA when every
    /// rank's NIC registers device memory, else NCCL when built, else the host transport),
    /// host, staged (host transport via host copies), peers (in-process ranks copy out of each
    /// other's buffers), nccl, direct (GPUDirect RDMA: the RDMA transport on the buffers).
    #[arg(long, default_value = "auto", help_heading = "2D")]
    pub xfer: String,
    /// Count every rank's heap (one rank per process: under `ember launch`, mpirun, ...) and print
    /// its measured peak over construction and training next to the planner's figure.
    #[arg(long, help_heading = "2D")]
    pub measure_memory: bool,
    /// Write a Chrome/Perfetto trace of every rank's stages to this file (FILE.rankN.json per
    /// process under a launcher).
    #[arg(long, help_heading = "2D")]
    pub trace: Option<PathBuf>,
    /// Checkpoint folder: checkpoints are DIR/step-S/ (docs/checkpoint.md).
    #[arg(long, value_name = "DIR", help_heading = "Checkpoints")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Save a checkpoint every S steps (under 2D with M > 1: a multiple of --sync-every; 0: never).
    #[arg(long, value_name = "S", default_value_t = 0, value_parser = count::<0, MAX_STEPS>, help_heading = "Checkpoints")]
    pub checkpoint_every: usize,
    /// Keep the newest K complete checkpoints.
    #[arg(long, value_name = "K", default_value_t = 2, value_parser = count::<1, 1_000_000>, help_heading = "Checkpoints")]
    pub keep: usize,
    /// Continue from the newest complete checkpoint in --checkpoint-dir (of any grid), up to
    /// the same --steps.
    #[arg(long, help_heading = "Checkpoints")]
    pub resume: bool,
    /// Start a new run in a --checkpoint-dir that holds another run's checkpoints, removing
    /// them first (without it such a folder is refused).
    #[arg(long, help_heading = "Checkpoints")]
    pub overwrite_checkpoints: bool,
}

impl TrainArgs {
    /// The checkpoint options these flags select (the folder not yet claimed: `run_id` None).
    pub fn checkpoint(&self) -> Result<Option<CheckpointOptions>, String> {
        match &self.checkpoint_dir {
            None if self.resume || self.checkpoint_every > 0 => {
                Err("--resume and --checkpoint-every need --checkpoint-dir DIR (the folder of the checkpoints)".into())
            }
            None => Ok(None),
            Some(dir) => Ok(Some(CheckpointOptions { dir: dir.clone(), every: self.checkpoint_every, keep: self.keep, resume: self.resume, run_id: None })),
        }
    }
}

pub fn run(a: TrainArgs) -> CliResult {
    let mut cfg = a.model.train_config(if a.data.is_some() { "kaggle" } else { "tiny" }, a.steps)?;
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
    if a.data.is_some() && a.steps.is_none() && a.model.config.is_none() {
        cfg.steps = None; // one epoch of the file
    }
    let checkpoint = a.checkpoint()?;
    // Under a launcher of T > 1 processes, each is one rank: the grid defaults to 1xT.
    let launched = ember_transport::JoinConfig::from_env().ok().map(|j| j.size).filter(|&t| t > 1);
    let (m, n) = match (&a.grid, launched) {
        (Some(g), _) => parse_grid(g)?,
        (None, Some(t)) => (1, t),
        (None, None) => (1, 1),
    };
    check_batch(cfg.batch_size, m, n)?;
    if (m, n) != (1, 1) || launched.is_some() {
        return crate::train2d::run(&a, cfg, m, n, checkpoint);
    }
    if a.transport != "auto" && a.transport != "local" {
        return Err(format!("--transport {}: a single-rank run uses no transport", a.transport).into());
    }
    if a.measure_memory {
        return Err("--measure-memory measures the ranks of a grid: ember launch -n T -- ember train --grid MxN --measure-memory ...".into());
    }
    // Host memory before anything is allocated (CUDA keeps the tables on the device).
    if a.device == Device::Cpu {
        let (_, rep) = ember_engine::plan::planner::plan(&cfg.model, 1, 1, &ember_engine::plan::planner::PlanOptions::from_config(&cfg))?;
        ember_engine::memory::check_plan(&rep, 1, true)?;
    }
    let mut oracle = None;
    // The eval set: the file's eval split read chunk by chunk, or the synthetic one.
    let (mut data, eval): (Data, Box<dyn EvalSet>) = match open_data(&a, &cfg)? {
        Some(FileData::Text(r)) => {
            // A file too short for an eval split is refused before its batch count is.
            let eval = r.eval_stream()?;
            cfg.steps = Some(epoch_steps(cfg.steps, r.train_lines(), cfg.batch_size, true)?);
            (Data::Criteo(r), Box::new(eval))
        }
        Some(FileData::Mapped(d)) => {
            cfg.steps = Some(epoch_steps(cfg.steps, d.train_len() * d.epochs(), cfg.batch_size, true)?);
            let eval = d.eval_stream();
            (Data::Mapped(d), Box::new(eval))
        }
        None => {
            let mut d = SyntheticData::new(&cfg)?;
            let eval = d.eval_set()?;
            oracle = Some(d.oracle_eval());
            (Data::Synthetic(d), Box::new(eval))
        }
    };
    // The folder becomes this run's: pruning then only removes this run's checkpoints.
    let mut checkpoint = checkpoint;
    if let Some(c) = checkpoint.as_mut() {
        c.run_id = Some(ember_engine::checkpoint::claim(&c.dir, c.resume, a.overwrite_checkpoints)?);
    }
    let ck = checkpoint.as_ref();
    let run = match a.device {
        Device::Cpu => run_on(&Cpu::new(), &cfg, data.source(), eval.as_ref(), ck, &a),
        Device::Cuda => run_cuda(&cfg, data.source(), eval.as_ref(), ck, &a),
    };
    let report = match (run, ck.filter(|c| c.resume)) {
        (Ok(r), _) => r,
        (Err(e), Some(c)) => return Err(crate::checkpoint::explain_resume_failure(&c.dir, e.to_string()).into()),
        (Err(e), None) => return Err(e),
    };
    // Bad lines skipped by the training stream and by the last pass over the eval split.
    let skipped = match &data {
        Data::Criteo(r) => Some(r.skipped() + eval.skipped()),
        Data::Mapped(_) | Data::Synthetic(_) => None,
    };
    let steps = cfg.steps.unwrap_or(0);
    let reached = report.evals.last().map_or(0, |e| e.step);
    if reached < steps {
        note(&format!("ember train: the data ran out after step {reached} of {steps} ({} bad lines skipped)", skipped.unwrap_or(0)));
    }
    print_summary(&report, skipped, oracle);
    if a.json {
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

/// The steps of a run on a data file with `lines` training samples: the requested steps (None:
/// one epoch), at most the epoch's full batches, saying so (when `say`) if that cuts the run short.
pub fn epoch_steps(requested: Option<usize>, lines: u64, batch: usize, say: bool) -> Result<usize, String> {
    let full = usize::try_from(lines / batch as u64).unwrap_or(usize::MAX);
    if full == 0 {
        return Err(format!("--data holds {lines} training samples, fewer than one batch of {batch} (--batch-size)"));
    }
    match requested {
        Some(s) if s > full => {
            if say {
                note(&format!(
                    "ember train: the data holds {full} batches of {batch} ({lines} training samples, one epoch): training stops after step {full}, not --steps {s}"
                ));
            }
            Ok(full)
        }
        Some(s) => Ok(s),
        None => Ok(full),
    }
}

/// The training data of a one-process run.
enum Data {
    Criteo(CriteoReader),
    Mapped(MappedData),
    Synthetic(SyntheticData),
}

impl Data {
    fn source(&mut self) -> &mut dyn DataSource {
        match self {
            Data::Criteo(r) => r,
            Data::Mapped(d) => d,
            Data::Synthetic(d) => d,
        }
    }
}

/// A `--data` path, opened: Criteo text, or a memory-mapped dataset (binary or .npy).
pub enum FileData {
    Text(CriteoReader),
    Mapped(MappedData),
}

/// Opens `--data` (None without it) with `--eval-data` and `--epochs`, every file checked
/// against the model before training starts.
pub fn open_data(a: &TrainArgs, cfg: &TrainConfig) -> Result<Option<FileData>, Box<dyn std::error::Error>> {
    let Some(path) = &a.data else {
        if a.eval_data.is_some() || a.epochs.is_some() {
            return Err("--eval-data and --epochs need --data".into());
        }
        return Ok(None);
    };
    let format = detect(path, &cfg.model)?;
    if let Format::Text(p) = format {
        if a.eval_data.is_some() || a.epochs.is_some() {
            return Err(format!(
                "--eval-data and --epochs need binary or .npy --data; {} is Criteo text: convert it first (ember convert {} --out DIR)",
                p.display(),
                p.display()
            )
            .into());
        }
        let policy = if a.skip_bad_lines { BadLinePolicy::Skip } else { BadLinePolicy::Fail };
        return Ok(Some(FileData::Text(CriteoReader::open(&p, &cfg.model, policy)?)));
    }
    if a.skip_bad_lines {
        return Err(format!("--skip-bad-lines applies to Criteo text; {} is preprocessed data", path.display()).into());
    }
    let eval = a.eval_data.as_ref().map(|p| detect(p, &cfg.model)).transpose()?;
    Ok(Some(FileData::Mapped(MappedData::open(&format, eval.as_ref(), &cfg.model, a.epochs.unwrap_or(1), cfg.seed)?)))
}

#[cfg(feature = "cuda")]
fn run_cuda(cfg: &TrainConfig, data: &mut dyn DataSource, eval: &dyn EvalSet, ck: Option<&CheckpointOptions>, a: &TrainArgs) -> Result<TrainReport, Box<dyn std::error::Error>> {
    let be = ember_engine::backend::cuda::Cuda::new(0)?;
    run_on(&be, cfg, data, eval, ck, a)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &TrainConfig, _: &mut dyn DataSource, _: &dyn EvalSet, _: Option<&CheckpointOptions>, _: &TrainArgs) -> Result<TrainReport, Box<dyn std::error::Error>> {
    Err("--device cuda: this binary was built without the `cuda` feature (cargo build --release -p ember-tools --features cuda)".into())
}

fn run_on<B: Backend>(be: &B, cfg: &TrainConfig, data: &mut dyn DataSource, eval: &dyn EvalSet, ck: Option<&CheckpointOptions>, a: &TrainArgs) -> Result<TrainReport, Box<dyn std::error::Error>> {
    let total = cfg.steps.map(|x| x as u64).or(data.len().map(|n| n / cfg.batch_size as u64)).unwrap_or(0);
    let bar = ProgressBar::new(total);
    if a.quiet || a.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]").expect("valid template"),
    );
    set_bar(Some(bar.clone()));
    let run = train_checkpointed(be, cfg, data, eval, ck, |p| {
        bar.set_position(p.step as u64);
        if p.step % 10 == 0 || p.step == p.total {
            bar.set_message(format!("{:.0} samples/s  loss {:.4}  ne {:.4}", p.samples_per_s, p.loss, p.ne));
        }
    });
    set_bar(None);
    bar.finish_and_clear();
    Ok(run?.1)
}

fn print_summary(r: &TrainReport, skipped: Option<u64>, oracle: Option<EvalResult>) {
    // A resumed run counts the steps it ran, after the checkpoint's.
    let last = r.evals.last().map_or(r.steps, |e| e.step);
    let resumed = if last > r.steps { format!(" (steps {} to {last}, resumed)", last - r.steps + 1) } else { String::new() };
    println!("ember train: {} steps{resumed} x batch {} on {} in {:.2} s", r.steps, r.batch_size, r.backend, r.wall_s);
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
