//! The planner's inputs: [`PlanOptions`] (batch, placement, optimizers, budget, statistics) and,
//! for one run, the options resolved against a model and a grid (`Ctx`: samples per group and per
//! rank, the ranks of a node, the tables' cost and bytes).
use super::sizes::{dense_activation_floats, dense_params, shard_bytes, F32};
use super::stats::{default_stats, TableStats};
use super::ShardingType;
use crate::config::{DenseOptimizer, EmbOptimizer, ModelConfig, TrainConfig};
use crate::grid::Placement;
use crate::{Error, Result};
use std::ops::Range;

/// What the planner needs besides the model and the grid.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    /// Global batch B (samples per step over all T ranks); a sharding group serves B/M.
    pub batch_size: usize,
    /// Ranks per node (world ranks); with the placement it gives the group ranks per node.
    pub ranks_per_node: usize,
    pub placement: Placement,
    /// Embedding optimizer (its state per row counts in memory).
    pub optimizer: EmbOptimizer,
    /// Dense optimizer (state of the replicated dense parameters).
    pub dense_optimizer: DenseOptimizer,
    /// Per-rank memory budget; a plan needing more on some rank is refused.
    pub memory_budget_bytes: Option<u64>,
    /// Per-table id statistics (None: [`default_stats`]).
    pub stats: Option<Vec<TableStats>>,
    /// Use one sharding type for every table instead of choosing (for measurements).
    pub force: Option<ShardingType>,
    /// Replica sync every K steps (M > 1): the sync's bytes and buffers.
    pub sync_every: usize,
    /// Whole-table replica sync instead of the rows touched since the last sync.
    pub full_sync: bool,
    /// Delayed optimizer-state sync: the state's average travels as f64 (8 bytes a value).
    pub delayed_state_sync: bool,
    /// Heap the backend's libraries keep per rank once the step has run (default: the CPU
    /// backend's GEMM blocks on this machine, `Cpu::gemm_workspace_bytes`).
    pub workspace_bytes: u64,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            batch_size: 4096,
            ranks_per_node: 8,
            placement: Placement::ReplicasInNode,
            optimizer: EmbOptimizer::RowWiseAdagrad { lr: 0.01, eps: 1e-8, c: None, eps_inside: false },
            dense_optimizer: DenseOptimizer::Adagrad { lr: 0.01, eps: 1e-8 },
            memory_budget_bytes: None,
            stats: None,
            force: None,
            sync_every: 1,
            full_sync: false,
            delayed_state_sync: false,
            workspace_bytes: crate::backend::Cpu::gemm_workspace_bytes(),
        }
    }
}

impl PlanOptions {
    /// Options for a training config: its batch size and optimizers, other fields default.
    pub fn from_config(cfg: &TrainConfig) -> Self {
        PlanOptions { batch_size: cfg.batch_size, optimizer: cfg.optim.embedding, dense_optimizer: cfg.optim.dense, ..Default::default() }
    }
}

/// Ranks of one sharding group that share a node. Replicas inside a node: a node's R world
/// ranks hold R/M ranks of each group (1 when M ≥ R); replicas across nodes: min(R, N). Group
/// rank r is taken to live on node r / L (exact when the divisions are exact).
pub fn group_ranks_per_node(m: usize, n: usize, ranks_per_node: usize, placement: Placement) -> usize {
    let r = ranks_per_node.max(1);
    let l = match placement {
        Placement::ReplicasInNode => (r / m.max(1)).max(1),
        Placement::ReplicasAcrossNodes => r,
    };
    l.min(n.max(1))
}


/// The options resolved for one planning run: the grid's shape, samples per group and per rank,
/// group ranks per node (L) and the table statistics.
pub(super) struct Ctx<'a> {
    pub(super) model: &'a ModelConfig,
    pub(super) m: usize,
    pub(super) n: usize,
    /// Samples per group (B/M) and per rank (B/T).
    pub(super) g: f64,
    pub(super) b: f64,
    pub(super) l: usize,
    pub(super) opts: &'a PlanOptions,
    pub(super) stats: Vec<TableStats>,
}

impl<'a> Ctx<'a> {
    pub(super) fn new(model: &'a ModelConfig, m: usize, n: usize, opts: &'a PlanOptions) -> Result<Self> {
        if m == 0 || n == 0 {
            return Err(Error::Config(format!("plan: grid {m}x{n}: M and N must be >= 1")));
        }
        if opts.batch_size == 0 {
            return Err(Error::Config("plan: batch_size must be > 0".into()));
        }
        if opts.sync_every == 0 {
            return Err(Error::Config("plan: sync_every (K) must be >= 1".into()));
        }
        model.validate()?;
        let stats = match &opts.stats {
            Some(s) if s.len() == model.num_tables() => s.clone(),
            Some(s) => return Err(Error::Config(format!("plan: {} table statistics for {} tables", s.len(), model.num_tables()))),
            None => default_stats(model),
        };
        let g = opts.batch_size as f64 / m as f64;
        Ok(Ctx { model, m, n, g, b: g / n as f64, l: group_ranks_per_node(m, n, opts.ranks_per_node, opts.placement), opts, stats })
    }
    pub(super) fn node_of(&self, r: usize) -> usize {
        r / self.l
    }
    pub(super) fn node_ranks(&self, node: usize) -> Range<usize> {
        node * self.l..((node + 1) * self.l).min(self.n)
    }
    pub(super) fn nodes(&self) -> usize {
        self.n.div_ceil(self.l)
    }
    pub(super) fn table_cost(&self, t: usize) -> f64 {
        self.stats[t].lookups_per_sample * self.g * self.model.tables[t].dim as f64
    }
    pub(super) fn table_bytes(&self, t: usize) -> f64 {
        let tc = &self.model.tables[t];
        shard_bytes(&self.opts.optimizer, tc.rows, tc.dim)
    }
    /// Per-rank memory that does not depend on the plan: dense parameters (weights, gradients
    /// and optimizer state are always allocated) and dense activations.
    pub(super) fn fixed_bytes(&self) -> (f64, f64) {
        let dense = dense_params(self.model) as f64 * F32 * 3.0;
        let act = F32 * self.b * dense_activation_floats(self.model);
        (dense, act)
    }
}
