//! 2D sparse-parallel training: one rank of the grid and its step, and the driver that runs a
//! job's ranks. A step is the brief's seven stages, one named call each (`rank`):
//!
//! 1. input distribution — all-to-all of ids inside the sharding group (`forward`);
//! 2. local lookup — pooled bags on the local shards (`forward`);
//! 3. output distribution — all-to-all of pooled vectors (reduce-scatter of partial sums for
//!    row-split tables) (`forward`);
//! 4. dense forward and backward; dense gradients all-reduced over all T ranks (started here,
//!    overlapping step 5) (`forward`, `backward`);
//! 5. embedding backward — the output distribution in reverse and the fused backward+optimizer
//!    on the local shards (`backward`);
//! 6. every K steps, replica sync of shard weights and optimizer state (`replicas`, `sync`;
//!    `shared_rows` where the replicas are threads of one process with host-memory shards),
//!    started as soon as step 5 has made the shard weights final, on a thread of its own;
//! 7. dense optimizer step (`backward`), run while the sync is in flight (it needs none of the
//!    shards, so the order changes nothing in the result); the step ends when both are done.
//!
//! Every exchange's message layout is computed once, when the rank is built (`layout`); the
//! stages are measured by one span helper (`meter`); `route` encodes and checks the ids'
//! messages; `xfer` moves the step's buffers; `eval` evaluates a job's model.
//!
//! Gradient convention (BRIEF.md §2): the loss is the mean over the global batch B; dense
//! gradients are summed over all ranks (each computed with 1/B); each sharding group applies
//! M/B × its samples' embedding gradient sum, so that the replica average gives back the
//! global mean (exactly, for SGD). Mean pooling is applied by the sample's owner (it knows the
//! whole bag's length), so shards always pool sums.
mod backward;
pub mod driver;
pub mod eval;
mod forward;
pub mod layout;
pub mod meter;
mod rank;
mod replicas;
pub mod route;
mod shared_rows;
pub mod sync;
pub mod xfer;

use crate::grid::Grid;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
pub use meter::{ByteCounts, Stage, StageTimes, TraceEvent};
pub use rank::Rank2D;
pub use sync::SyncMode;
pub use xfer::{Xfer, XferKind};

/// Options of 2D training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParallelOptions {
    /// Replica sync every K steps.
    pub sync_every: usize,
    pub sync: SyncMode,
    /// Sync the optimizer state one sync behind (BRIEF.md §3); weights are still averaged at every sync.
    #[serde(default)]
    pub delayed_state_sync: bool,
    /// Fully-sharded 2D (BRIEF.md §2 variant): weights reduce-scattered (mean) over the replica
    /// group right after the lookup, all-gathered before the embedding backward; optimizer state
    /// is not averaged (so c defaults to M², see `default_momentum_c`) and K does not apply.
    #[serde(default)]
    pub fully_sharded: bool,
    /// How the step's buffers travel between ranks (see `xfer`).
    #[serde(default)]
    pub xfer: XferKind,
    /// Whether a training step's replica sync runs beside its dense update or after it; the
    /// result is bitwise the same either way.
    #[serde(default)]
    pub overlap_sync: OverlapSync,
    /// Periodic checkpoints and resume (not part of a saved config).
    #[serde(skip)]
    pub checkpoint: Option<CheckpointOptions>,
}

/// Where and how often a run checkpoints, and whether it resumes from the latest checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointOptions {
    pub dir: std::path::PathBuf,
    /// Save after every this many steps (a multiple of the sync interval K); 0: never.
    pub every: usize,
    /// Complete checkpoints kept.
    pub keep: usize,
    pub resume: bool,
    /// The run owning `dir` (`checkpoint::claim`): only its checkpoints are pruned.
    pub run_id: Option<String>,
}

impl ParallelOptions {
    /// The options' own consistency on `grid` ([`Rank2D::new`] checks it; a caller may check it
    /// before acting on the options, e.g. before claiming the checkpoint folder): K >= 1, and
    /// under M > 1 without fully-sharded 2D a checkpoint interval that is a multiple of K (a
    /// checkpoint must fall on a replica sync).
    pub fn check(&self, grid: Grid) -> Result<()> {
        if self.sync_every == 0 {
            return Err(Error::Config("sync_every (K) must be >= 1".into()));
        }
        if let Some(ck) = self.checkpoint.as_ref().filter(|c| c.every > 0) {
            if grid.m > 1 && !self.fully_sharded && ck.every % self.sync_every != 0 {
                return Err(Error::Config(format!(
                    "checkpoint every {} steps with replica sync every {} steps: a checkpoint must fall on a sync step, so the checkpoint interval must be a multiple of K",
                    ck.every, self.sync_every
                )));
            }
        }
        Ok(())
    }
}

/// Whether a training step's replica sync runs on a thread of its own beside the dense update
/// (`--overlap-sync`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverlapSync {
    /// Beside the dense update unless this process runs more busy threads than it has cores:
    /// off when its in-process ranks, each with a sync thread, would outnumber the cores
    /// ([`OverlapSync::resolve`]).
    #[default]
    Auto,
    On,
    Off,
}

impl OverlapSync {
    /// Whether to overlap, for a process running `local_ranks` ranks as threads on `cores` cores:
    /// `Auto` overlaps when every rank and its sync thread get a core of their own
    /// (2 × local_ranks ≤ cores). More threads than cores only take turns: the sync thread then
    /// slows the dense update and the other ranks' polling as much as it hides.
    pub fn resolve(self, local_ranks: usize, cores: usize) -> bool {
        match self {
            OverlapSync::On => true,
            OverlapSync::Off => false,
            OverlapSync::Auto => local_ranks.saturating_mul(2) <= cores,
        }
    }
}

impl Default for ParallelOptions {
    fn default() -> Self {
        ParallelOptions { sync_every: 1, sync: SyncMode::Sparse, delayed_state_sync: false, fully_sharded: false, xfer: XferKind::Auto, overlap_sync: OverlapSync::Auto, checkpoint: None }
    }
}

/// The momentum-scaling constant c an AdaGrad optimizer uses under an M-replica grid when the
/// config leaves it unset (docs/2d.md derives both): M, when the replicas average their optimizer
/// state; M² in fully-sharded 2D, where they never do. Either way c makes the step of a row that
/// a single replica touches equal to the full-sharding step.
pub fn default_momentum_c(m: usize, fully_sharded: bool) -> f32 {
    if fully_sharded {
        (m * m) as f32
    } else {
        m as f32
    }
}

#[cfg(test)]
mod tests {
    use super::OverlapSync;

    #[test]
    fn auto_overlaps_only_when_every_rank_and_its_sync_thread_get_a_core() {
        // One rank per process (a launcher): overlapped from 2 cores up.
        assert!(OverlapSync::Auto.resolve(1, 2));
        assert!(!OverlapSync::Auto.resolve(1, 1));
        // 8 in-process ranks: 16 threads need 16 cores.
        assert!(!OverlapSync::Auto.resolve(8, 2));
        assert!(!OverlapSync::Auto.resolve(8, 15));
        assert!(OverlapSync::Auto.resolve(8, 16));
        // No wrap: 2 × (2^63 + 1) would wrap to 2.
        assert!(!OverlapSync::Auto.resolve(usize::MAX / 2 + 2, usize::MAX - 1));
        // On and Off are what they say, whatever the machine.
        assert!(OverlapSync::On.resolve(8, 2) && !OverlapSync::Off.resolve(1, 64));
    }
}
