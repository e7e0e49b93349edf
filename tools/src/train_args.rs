//! The flags of `ember train` and what they select: the 2D job, the checkpoint options and the
//! opened data files (shared by the one-process run in `train` and the grid run in `train2d`).
use crate::common::{count, count64, positive_f32, spelled, Device, ModelArgs};
use crate::notes::note;
use ember_engine::config::limits::{MAX_EPOCHS, MAX_STEPS};
use ember_engine::config::{JobConfig, TrainConfig};
use ember_engine::data::criteo::{BadLinePolicy, CriteoReader};
use ember_engine::data::dataset::{detect, Format, MappedData};
use ember_engine::grid::Placement;
use ember_engine::parallel::{CheckpointOptions, OverlapSync, ParallelOptions, SyncMode, XferKind};
use ember_engine::plan::ShardingType;
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
    #[arg(long, default_value = "sparse", value_parser = spelled::<SyncMode>(), help_heading = "2D")]
    pub sync: SyncMode,
    /// Rank placement on the grid.
    #[arg(long, default_value = "in-node", value_parser = spelled::<Placement>(), help_heading = "2D")]
    pub placement: Placement,
    /// Ranks per node (for the planner's table-row-wise shards).
    #[arg(long, default_value_t = 8, value_parser = count::<1, { ember_engine::grid::MAX_RANKS }>, help_heading = "2D")]
    pub ranks_per_node: usize,
    /// Force one sharding type for every table [default: the planner chooses per table].
    #[arg(long, value_parser = spelled::<ShardingType>(), help_heading = "2D")]
    pub sharding: Option<ShardingType>,
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
    /// How the 2D step's buffers travel between ranks.
    #[arg(long, default_value = "auto", value_parser = spelled::<XferKind>(), help_heading = "2D")]
    pub xfer: XferKind,
    /// Run the replica sync on a thread of its own beside the dense update, or after it (the
    /// result is bitwise the same).
    #[arg(long, default_value = "auto", value_parser = spelled::<OverlapSync>(), help_heading = "2D")]
    pub overlap_sync: OverlapSync,
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
    /// The 2D job these flags select on an M × N grid (the checkpoint folder not yet claimed).
    pub fn job(&self, m: usize, n: usize) -> Result<JobConfig, Box<dyn std::error::Error>> {
        let parallel = ParallelOptions {
            sync_every: self.sync_every,
            sync: self.sync,
            delayed_state_sync: self.delayed_state_sync,
            fully_sharded: self.fully_sharded,
            xfer: self.xfer,
            overlap_sync: self.overlap_sync,
            checkpoint: self.checkpoint()?,
        };
        Ok(JobConfig { grid: Some((m, n)), placement: self.placement, sharding: self.sharding, ranks_per_node: self.ranks_per_node, parallel })
    }

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
