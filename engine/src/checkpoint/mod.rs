//! Checkpoints: sharded, atomic, verified, reshardable (docs/checkpoint.md).
//!
//! A checkpoint is a folder `ROOT/step-S/` holding one file per shard of one replica
//! (`shard-tTTT-RSTART-REND-cCSTART-CEND.bin`: weights then optimizer state), one dense file
//! (`dense.bin`: every dense parameter and its optimizer state) and `manifest.json`, written
//! last: model, optimizer, grid, plan, M, c, every rank's data position, and every file's size
//! and CRC-32. Files are written under temporary names, fsynced, renamed, and the folder is
//! fsynced; a folder without a manifest is incomplete and never loads. The last K complete
//! checkpoints are kept.
//!
//! A training run owns its root: `ROOT/run-id` holds the id of the run whose checkpoints the
//! root holds ([`claim`]). A new run refuses a root holding another run's checkpoints unless
//! told to overwrite them (they are then removed first); a resumed run continues the root's run;
//! and pruning only ever removes checkpoints of the run that owns the root.
//!
//! Layers: [`write`] (files and the manifest; collective-free, so one process or many can call
//! it), [`read`] ([`Checkpoint`]: open, verify, assemble any row/column block of any table),
//! [`replica`] (per-replica files for the 2D modes whose replicas differ at a checkpoint), the
//! glue for the engine's two models in [`rank2d`], and [`export`] (.npy files).
use crate::backend::ShardSpec;
use crate::config::{DenseOptimizer, EmbOptimizer, ModelConfig, TrainConfig};
use crate::grid::Grid;
use crate::plan::Plan;
use crate::Error;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub mod export;
pub mod rank2d;
pub mod read;
pub mod replica;
pub mod write;

pub use read::{latest, list, Checkpoint, Listed};
pub use write::{claim, commit, prepare, read_run_id, write_dense, write_shard};

/// `manifest.magic`.
pub const MAGIC: &str = "ember-checkpoint";
/// `manifest.format_version`; a reader refuses any other.
pub const FORMAT_VERSION: u32 = 1;
/// First 8 bytes of a shard file.
pub const SHARD_MAGIC: &[u8; 8] = b"EMBSHARD";
/// First 8 bytes of the dense file.
pub const DENSE_MAGIC: &[u8; 8] = b"EMBDENSE";
/// Bytes of a shard file's header (the weights start here, 64-byte aligned).
pub const SHARD_HEADER: usize = 64;
pub const MANIFEST: &str = "manifest.json";
/// The `tracing` target of what a training run says about its checkpoints (the resume, or that
/// there was none to resume from, and every save); `ember train` prints these events.
pub const LOG_TARGET: &str = "ember::checkpoint";
/// The file under a checkpoint root naming the run that owns it.
pub const RUN_ID_FILE: &str = "run-id";
pub const DENSE_FILE: &str = "dense.bin";

#[cfg(target_endian = "big")]
compile_error!("checkpoint files are little-endian f32; big-endian hosts are not supported");

/// Where one rank's data reader stands (recorded for every rank).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataPosition {
    /// Index of the next global sample this rank's stream reads (synthetic data: a function of
    /// the step; file readers: their own count).
    pub next_sample: u64,
    /// Reader byte offsets (one per open file, in the reader's order); empty for synthetic data.
    #[serde(default)]
    pub reader_offsets: Vec<u64>,
}

/// One rank's record in the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankPosition {
    pub world_rank: usize,
    /// (sharding group g, rank in the group r).
    pub coords: (usize, usize),
    pub data: DataPosition,
}

/// What a file holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FileKind {
    /// One shard: `spec`, `state_per_row` floats of optimizer state per row.
    Shard { spec: ShardSpec, state_per_row: usize },
    /// Dense parameters in `DenseNet::params_mut` order: (weights, optimizer state) lengths.
    Dense { lens: Vec<(usize, usize)> },
    /// One replica's own copy of a shard, for an exact resume of a mode whose replicas differ at
    /// a checkpoint (see [`replica`]): its weights when `weights` (fully-sharded 2D), its
    /// optimizer state, and the `pending_rows` rows of a delayed state average in flight.
    Replica { spec: ShardSpec, replica: usize, state_per_row: usize, weights: bool, pending_rows: Option<usize> },
}

/// One file of a checkpoint, as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Name inside the step folder.
    pub name: String,
    #[serde(flatten)]
    pub kind: FileKind,
    pub bytes: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
}

/// What the caller knows about the run (the manifest minus files and positions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub model: ModelConfig,
    pub embedding_optimizer: EmbOptimizer,
    pub dense_optimizer: DenseOptimizer,
    pub seed: u64,
    pub batch_size: usize,
    pub grid: Grid,
    pub plan: Plan,
    /// Momentum-scaling constant the optimizer state was accumulated with (v is read as v/c).
    pub c: f32,
}

impl RunInfo {
    pub fn new(cfg: &TrainConfig, grid: Grid, plan: Plan, c: f32) -> Self {
        RunInfo {
            model: cfg.model.clone(),
            embedding_optimizer: cfg.optim.embedding,
            dense_optimizer: cfg.optim.dense,
            seed: cfg.seed,
            batch_size: cfg.batch_size,
            grid,
            plan,
            c,
        }
    }
}

/// `manifest.json` (inside a CRC envelope: `{"crc32":"xxxxxxxx","manifest":{...}}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub magic: String,
    pub format_version: u32,
    pub step: u64,
    #[serde(flatten)]
    pub run: RunInfo,
    /// M (replicas) of the grid that wrote it.
    pub m: usize,
    pub positions: Vec<RankPosition>,
    pub files: Vec<FileEntry>,
}

impl Manifest {
    pub fn shards(&self) -> impl Iterator<Item = (&FileEntry, &ShardSpec, usize)> {
        self.files.iter().filter_map(|f| match &f.kind {
            FileKind::Shard { spec, state_per_row } => Some((f, spec, *state_per_row)),
            _ => None,
        })
    }
    /// Replica files: (entry, spec, replica).
    pub fn replicas(&self) -> impl Iterator<Item = (&FileEntry, &ShardSpec, usize)> {
        self.files.iter().filter_map(|f| match &f.kind {
            FileKind::Replica { spec, replica, .. } => Some((f, spec, *replica)),
            _ => None,
        })
    }
    pub fn dense(&self) -> Option<(&FileEntry, &[(usize, usize)])> {
        self.files.iter().find_map(|f| match &f.kind {
            FileKind::Dense { lens } => Some((f, lens.as_slice())),
            _ => None,
        })
    }
}

/// Folder name of step `s`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// Shard file name: table, row range, column range.
pub fn shard_file_name(spec: &ShardSpec) -> String {
    format!("shard-t{:03}-r{}-{}-c{}-{}.bin", spec.table, spec.rows.start, spec.rows.end, spec.cols.start, spec.cols.end)
}

/// Replica file name: replica g, then the shard's table, row range, column range.
pub fn replica_file_name(spec: &ShardSpec, replica: usize) -> String {
    format!("replica-g{replica}-t{:03}-r{}-{}-c{}-{}.bin", spec.table, spec.rows.start, spec.rows.end, spec.cols.start, spec.cols.end)
}

/// A checkpoint error naming the file it concerns.
pub(crate) fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("checkpoint {}: {msg}", path.display()))
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

/// Floats of embedding optimizer state per row of `cols` columns.
pub fn state_per_row(opt: &EmbOptimizer, cols: usize) -> usize {
    opt.state_per_row(cols)
}

/// Test-only crash injection. A hook installed on the current thread is called at every
/// failpoint of the writer with the point's name (`before-rename:NAME`, `after-file:NAME`,
/// `during:NAME`, `before-manifest`, `before-prune`); when it returns true the writer stops
/// right there with an error and cleans nothing up, as a crash would leave it.
pub mod failpoint {
    use std::cell::RefCell;

    type Hook = Box<dyn FnMut(&str) -> bool>;
    thread_local! {
        static HOOK: RefCell<Option<Hook>> = const { RefCell::new(None) };
    }

    /// Install (or with None remove) this thread's hook.
    #[doc(hidden)]
    pub fn set(hook: Option<Box<dyn FnMut(&str) -> bool>>) {
        HOOK.with(|h| *h.borrow_mut() = hook);
    }

    pub(crate) fn hit(name: &str) -> crate::Result<()> {
        let fire = HOOK.with(|h| h.borrow_mut().as_mut().map(|f| f(name)).unwrap_or(false));
        if fire {
            return Err(crate::Error::Input(format!("checkpoint: failpoint {name} (injected crash)")));
        }
        Ok(())
    }
}

/// Root of the checkpoint folder a step folder belongs to.
pub fn root_of(step_dir: &Path) -> PathBuf {
    step_dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}
