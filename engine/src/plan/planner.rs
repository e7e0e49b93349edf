//! The planner: chooses a sharding type and ranks per table for one sharding group of N ranks,
//! and predicts each rank's memory, lookups and bytes per collective for any plan, counting
//! what the 2D step (`crate::parallel`) really allocates and sends (docs/plan.md).
//!
//! Notation: B global batch, M replicas, N ranks per group, G = B/M samples a group serves per
//! step, b = B/T samples a rank owns, D table width, λ ids per sample of a table, f the share of
//! a table's ids that fall in a shard (from an id histogram; uniform by default).
//!
//! - *Compute cost* of a shard = its ids per step × its columns (λ·G·f·cols); the imbalance is
//!   max/mean over the ranks.
//! - *Traffic*: the bytes each rank hands to each collective per step, in the engine's own
//!   convention ([`crate::parallel::ByteCounts`]): the whole send buffer of an all-to-all or a
//!   reduce-scatter (own block included), the own block of an all-gather, the buffer of an
//!   all-reduce; ids, bag lengths and counts are 8 bytes, floats 4, replica-sync values 8 (f64).
//! - *Memory*: the heap peak of a rank over construction and training, an upper bound: the
//!   engine's step is a sequence of phases, each with a known set of live buffers (weights and
//!   optimizer state, dense parameters and activations, the two local batches, the ids and bags
//!   of the step, pooled outputs, send and receive buffers of every collective and the host
//!   transport's scratch, gradient matrices, the dedup of the fused update, sync buffers); the
//!   figure is the largest phase. Buffers sized by ids are counted at [`STEP_SPREAD`] × their
//!   mean per step; distinct rows (the fused update's and the sparse sync's) come from the
//!   statistics' distinct-rows curve, read as an upper bound.
//!
//! The greedy balancer: tables whose bytes exceed a share of the mean per-rank table bytes are
//! split by rows (table-row-wise over one node when that brings them under the share, else
//! row-wise over all N); tables whose compute cost exceeds the mean per-rank cost of the tables
//! still to place are split over just enough ranks, by columns when they are wide enough (shards
//! at least MIN_COL_WIDTH wide), else by rows into shards of equal lookups (table-row-wise, on one
//! node when they fit); the rest go whole, largest first, to the rank whose normalised load
//! max(cost / mean cost, bytes / mean bytes) stays lowest (LPT). With a memory budget the split
//! share is lowered step by step until the plan fits, else the plan is refused.
pub use super::traffic::Traffic;
use super::trw::{trw_tables, TrwCounts};
use super::{split_range, PlacedShard, Plan, ShardingType, TablePlan};
use crate::config::{DenseOptimizer, EmbOptimizer, Interaction, ModelConfig, TableConfig, TrainConfig};
use crate::data::Batch;
use crate::grid::Placement;
use crate::{Error, Result};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// Buckets of the per-table row histogram that [`stats_from_batches`] measures.
pub const HIST_BUCKETS: usize = 1024;
/// Ids, bag lengths, counts and replica-sync values (f64) travel as 8-byte words.
const WORD: f64 = 8.0;
const F32: f64 = 4.0;
/// Buffers sized by a step's ids are counted at this multiple of the mean (ids per step vary).
pub const STEP_SPREAD: f64 = 1.05;
/// Small allocations of a rank not priced one by one (communicators, the plan and its slot
/// lists): a fixed allowance plus an allowance per shard of the plan.
const MISC_BYTES: f64 = 64.0 * 1024.0;
const MISC_PER_SHARD: f64 = 256.0;
const GIB: f64 = (1u64 << 30) as f64;
/// Narrowest column shard the planner makes (the forced column-wise split goes down to 4).
pub const MIN_COL_WIDTH: usize = 16;

/// Id-frequency statistics of one table, per sample.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TableStats {
    /// Mean number of ids per sample (bag length, empty bags included).
    pub lookups_per_sample: f64,
    /// Distinct ids / ids in the measured sample (1.0: every lookup a different row).
    pub distinct_fraction: f64,
    /// Share of the lookups that hit the most frequent row.
    pub top_row_fraction: f64,
    /// Share of the lookups per equal-width row bucket (`min(rows, HIST_BUCKETS)` buckets,
    /// bucket i covers rows [i·rows/nb, (i+1)·rows/nb)); empty means uniform over the rows.
    pub row_histogram: Vec<f64>,
    /// Distinct rows among the ids of the first `samples` samples, as `[samples, rows]` points
    /// at sample counts growing by √2; empty means uniform ids (the expected distinct count).
    pub distinct_curve: Vec<[f64; 2]>,
}

impl TableStats {
    /// The default without data: `bag_size` lookups per sample, uniform over the rows.
    pub fn from_config(t: &TableConfig) -> Self {
        TableStats { lookups_per_sample: t.bag_size as f64, distinct_fraction: 1.0, top_row_fraction: 0.0, row_histogram: Vec::new(), distinct_curve: Vec::new() }
    }

    /// Distinct rows among the ids of `samples` samples of a table of `rows` rows: the measured
    /// curve read between its points (linearly) and past its last (growing as the power of
    /// `samples` its last two points show); without one, the expectation for uniform ids.
    /// Never more than the rows or the ids.
    pub fn distinct_rows(&self, rows: u64, samples: f64) -> f64 {
        if samples <= 0.0 || rows == 0 {
            return 0.0;
        }
        let r = rows as f64;
        let ids = self.lookups_per_sample * samples;
        let c = &self.distinct_curve;
        let d = match c.iter().position(|p| p[0] >= samples) {
            _ if c.is_empty() => r * -(ids * (-1.0 / r).ln_1p()).exp_m1(),
            Some(0) => c[0][1] * samples / c[0][0],
            Some(i) => {
                let (a, b) = (c[i - 1], c[i]);
                a[1] + (b[1] - a[1]) * (samples - a[0]) / (b[0] - a[0])
            }
            None if c.len() >= 2 => {
                let (a, b) = (c[c.len() - 2], c[c.len() - 1]);
                let p = if a[1] > 0.0 && b[1] > a[1] { (b[1] / a[1]).ln() / (b[0] / a[0]).ln() } else { 0.0 };
                b[1] * (samples / b[0]).powf(p.clamp(0.0, 1.0))
            }
            None => c[0][1] * samples / c[0][0],
        };
        d.min(r).min(ids)
    }

    /// Share of this table's lookups that fall in `range` of its `rows` rows.
    pub fn row_fraction(&self, rows: u64, range: &Range<u64>) -> f64 {
        if rows == 0 {
            return 0.0;
        }
        let (a, b) = (range.start.min(rows) as f64, range.end.min(rows) as f64);
        if self.row_histogram.is_empty() {
            return (b - a) / rows as f64;
        }
        let nb = self.row_histogram.len();
        let w = rows as f64 / nb as f64;
        let first = ((a / w) as usize).min(nb - 1);
        let last = (((b / w).ceil() as usize).max(first + 1)).min(nb);
        let mut f = 0.0;
        for (i, &h) in self.row_histogram.iter().enumerate().take(last).skip(first) {
            let (lo, hi) = (i as f64 * w, (i + 1) as f64 * w);
            let overlap = (b.min(hi) - a.max(lo)).max(0.0);
            f += h * overlap / w;
        }
        f
    }

    /// Distinct rows in `range` among the ids of `samples` samples: the table's distinct rows
    /// apportioned over the histogram's buckets by the rows each would show with uniform ids
    /// inside it (a hot bucket saturates, a cold one does not); by rows without a histogram.
    pub fn distinct_in(&self, rows: u64, range: &Range<u64>, samples: f64) -> f64 {
        let total = self.distinct_rows(rows, samples);
        let (a, b) = (range.start.min(rows) as f64, range.end.min(rows) as f64);
        let share = if self.row_histogram.is_empty() || rows == 0 {
            (b - a) / rows.max(1) as f64
        } else {
            let nb = self.row_histogram.len();
            let w = rows as f64 / nb as f64;
            let ids = self.lookups_per_sample * samples;
            let (mut all, mut inside) = (0f64, 0f64);
            for (i, &h) in self.row_histogram.iter().enumerate() {
                let u = w * -(-ids * h / w).exp_m1();
                let (lo, hi) = (i as f64 * w, (i + 1) as f64 * w);
                let overlap = (b.min(hi) - a.max(lo)).max(0.0) / w;
                all += u;
                inside += u * overlap;
            }
            if all > 0.0 {
                inside / all
            } else {
                (b - a) / rows as f64
            }
        };
        (total * share).min(b - a).min(self.lookups_per_sample * samples * self.row_fraction(rows, range))
    }
}

/// Per-table statistics derived from the config alone (bag sizes, uniform ids).
pub fn default_stats(model: &ModelConfig) -> Vec<TableStats> {
    model.tables.iter().map(TableStats::from_config).collect()
}

/// Measures per-table statistics on sample batches (feature t looks up table t), the batches
/// taken in order as one stream of samples. Tables with no samples get the config default.
pub fn stats_from_batches(model: &ModelConfig, batches: &[Batch]) -> Vec<TableStats> {
    model
        .tables
        .iter()
        .enumerate()
        .map(|(t, tc)| {
            let samples: usize = batches.iter().map(|b| b.sparse.get(t).map_or(0, |j| j.num_bags())).sum();
            if samples == 0 {
                return TableStats::from_config(tc);
            }
            let nb = (tc.rows.min(HIST_BUCKETS as u64)).max(1) as usize;
            let mut hist = vec![0f64; nb];
            let mut counts: HashMap<u64, u64> = HashMap::new();
            let mut curve = Vec::new();
            let (mut ids, mut seen) = (0u64, 0usize);
            let mut next_point = 1.0f64;
            for b in batches {
                let Some(j) = b.sparse.get(t) else { continue };
                let mut pos = 0usize;
                for &l in &j.lengths {
                    for &id in &j.values[pos..pos + l as usize] {
                        let id = id.min(tc.rows - 1);
                        hist[((id as u128 * nb as u128) / tc.rows as u128) as usize] += 1.0;
                        *counts.entry(id).or_insert(0) += 1;
                        ids += 1;
                    }
                    pos += l as usize;
                    seen += 1;
                    if seen as f64 >= next_point.ceil() || seen == samples {
                        curve.push([seen as f64, counts.len() as f64]);
                        next_point = (seen as f64 * std::f64::consts::SQRT_2).max(seen as f64 + 1.0);
                    }
                }
            }
            if ids == 0 {
                return TableStats { lookups_per_sample: 0.0, distinct_fraction: 1.0, top_row_fraction: 0.0, row_histogram: Vec::new(), distinct_curve: curve };
            }
            hist.iter_mut().for_each(|h| *h /= ids as f64);
            TableStats {
                lookups_per_sample: ids as f64 / samples as f64,
                distinct_fraction: counts.len() as f64 / ids as f64,
                top_row_fraction: *counts.values().max().unwrap_or(&0) as f64 / ids as f64,
                row_histogram: hist,
                distinct_curve: curve,
            }
        })
        .collect()
}

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

/// Sparse-collective bytes one rank hands over per step for the tables of one sharding type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct A2aBytes {
    /// Input distribution: ids and bag lengths (8 bytes each).
    pub ids: f64,
    /// Output distribution: pooled vectors, or partial sums of row splits.
    pub outputs: f64,
    /// Gradient distribution (and, for column-wise tables, the Σg² exchange).
    pub grads: f64,
}

impl A2aBytes {
    pub fn total(&self) -> f64 {
        self.ids + self.outputs + self.grads
    }
}

/// Bytes live in one phase of the step (see the module doc).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhaseBytes {
    pub phase: &'static str,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RankReport {
    pub rank: usize,
    pub weights_bytes: u64,
    pub optimizer_bytes: u64,
    /// Dense activations and their gradients for the rank's b samples.
    pub activation_bytes: u64,
    /// The rest of the peak phase: the step's ids and bags, input batches, pooled outputs,
    /// gradient matrices, send and receive buffers, transport scratch, sync buffers.
    pub comm_buffer_bytes: u64,
    /// Dense weights, gradients and optimizer state (replicated).
    pub dense_bytes: u64,
    /// The planned peak: the largest phase (an upper bound of the measured heap peak).
    pub total_bytes: u64,
    /// The phase that sets `total_bytes`.
    pub peak_phase: &'static str,
    /// Bytes live in every phase.
    pub phases: Vec<PhaseBytes>,
    /// Ids this rank looks up per step.
    pub lookups: f64,
    /// lookups × columns, summed over its shards.
    pub cost: f64,
    pub shards: usize,
    /// Bytes per collective per step.
    pub traffic: Traffic,
    /// Sparse-collective bytes per step by sharding type name (the id counts exchanged before
    /// the input all-to-all, N·8 bytes, belong to no type).
    pub a2a: BTreeMap<String, A2aBytes>,
    /// All sparse-collective bytes per step (`traffic.sparse()`).
    pub a2a_total_bytes: f64,
    /// Of those, bytes whose destination is on another node (estimate: blocks to every rank
    /// are spread evenly over the nodes).
    pub a2a_inter_node_bytes: f64,
    /// Replica sync per sync step (0 when M = 1), values as f64 and row indices: whole shards,
    /// and the rows touched since the last sync (estimated from the distinct-rows curve).
    pub sync_bytes_whole: f64,
    pub sync_bytes_sparse: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TableReport {
    pub table: usize,
    pub rows: u64,
    pub dim: usize,
    pub kind: ShardingType,
    pub ranks: Vec<usize>,
    pub lookups_per_sample: f64,
    /// Weights + optimizer state of the whole table.
    pub bytes: u64,
    /// lookups × dim per step for the whole table (sum over its shards).
    pub cost: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PlanReport {
    pub m: usize,
    pub n: usize,
    pub world: usize,
    pub batch_size: usize,
    /// B/M and B/T.
    pub samples_per_group: f64,
    pub samples_per_rank: f64,
    pub ranks_per_node: usize,
    pub placement: Placement,
    /// Ranks of one sharding group on one node (the span of a table-row-wise table).
    pub group_ranks_per_node: usize,
    pub optimizer_state_floats_per_row: usize,
    /// Bytes of all tables with optimizer state (one replica).
    pub table_bytes: u64,
    /// max / mean of the per-rank cost (lookups × dim).
    pub imbalance: f64,
    /// max / mean of the per-rank total memory.
    pub memory_imbalance: f64,
    pub max_rank_bytes: u64,
    pub memory_budget_bytes: Option<u64>,
    /// Tables per sharding type.
    pub tables_by_type: BTreeMap<String, usize>,
    /// Mean over ranks of the sparse-collective bytes per step, by sharding type.
    pub a2a_mean_bytes_per_rank: BTreeMap<String, A2aBytes>,
    pub a2a_mean_total_bytes_per_rank: f64,
    pub a2a_max_total_bytes_per_rank: f64,
    pub ranks: Vec<RankReport>,
    pub tables: Vec<TableReport>,
}

fn state_floats(opt: &EmbOptimizer, cols: usize) -> usize {
    opt.state_per_row(cols)
}

fn shard_bytes(opt: &EmbOptimizer, rows: u64, cols: usize) -> f64 {
    rows as f64 * (cols + state_floats(opt, cols)) as f64 * F32
}

/// Dense parameter count (bottom MLP, cross layers, top MLP).
pub fn dense_params(model: &ModelConfig) -> u64 {
    let mlp = |input: usize, widths: &[usize]| {
        let mut fin = input as u64;
        let mut p = 0u64;
        for &w in widths {
            p += fin * w as u64 + w as u64;
            fin = w as u64;
        }
        p
    };
    let width = ((model.num_tables() + 1) * model.dim()) as u64;
    let cross = match model.interaction {
        Interaction::Dcn { layers, rank } => layers as u64 * (2 * rank as u64 * width + width),
        Interaction::Dot => 0,
    };
    mlp(model.num_dense, &model.bottom_mlp) + cross + mlp(model.interaction_width(), &model.top_mlp)
}

/// Floats per sample of the dense network's activation and gradient buffers (as
/// `crate::dense::DenseNet` allocates them), the labels included.
fn dense_activation_floats(model: &ModelConfig) -> f64 {
    let width = (model.num_tables() + 1) * model.dim();
    let mlps = 2 * (model.bottom_mlp.iter().sum::<usize>() + model.top_mlp.iter().sum::<usize>());
    let inter = match model.interaction {
        // wide, dwide, z, dz.
        Interaction::Dot => 2 * width + 2 * model.interaction_width(),
        // wide, dwide, dz; per layer x, t, uv; dt, duv, dx0.
        Interaction::Dcn { layers, rank } => 3 * width + layers * (2 * width + rank) + rank + 2 * width,
    };
    (mlps + inter + 1) as f64
}

struct Ctx<'a> {
    model: &'a ModelConfig,
    m: usize,
    n: usize,
    /// Samples per group (B/M) and per rank (B/T).
    g: f64,
    b: f64,
    l: usize,
    opts: &'a PlanOptions,
    stats: Vec<TableStats>,
}

impl<'a> Ctx<'a> {
    fn new(model: &'a ModelConfig, m: usize, n: usize, opts: &'a PlanOptions) -> Result<Self> {
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
    fn node_of(&self, r: usize) -> usize {
        r / self.l
    }
    fn node_ranks(&self, node: usize) -> Range<usize> {
        node * self.l..((node + 1) * self.l).min(self.n)
    }
    fn nodes(&self) -> usize {
        self.n.div_ceil(self.l)
    }
    fn table_cost(&self, t: usize) -> f64 {
        self.stats[t].lookups_per_sample * self.g * self.model.tables[t].dim as f64
    }
    fn table_bytes(&self, t: usize) -> f64 {
        let tc = &self.model.tables[t];
        shard_bytes(&self.opts.optimizer, tc.rows, tc.dim)
    }
    /// Per-rank memory that does not depend on the plan: dense parameters (weights, gradients
    /// and optimizer state are always allocated) and dense activations.
    fn fixed_bytes(&self) -> (f64, f64) {
        let dense = dense_params(self.model) as f64 * F32 * 3.0;
        let act = F32 * self.b * dense_activation_floats(self.model);
        (dense, act)
    }
}

/// Current per-rank loads during greedy placement.
struct Loads {
    cost: Vec<f64>,
    mem: Vec<f64>,
    cost_avg: f64,
    mem_avg: f64,
    /// Table-byte budget per rank (budget minus plan-independent memory), if any.
    mem_cap: Option<f64>,
}

impl Loads {
    fn score(&self, r: usize, c: f64, m: f64) -> f64 {
        ((self.cost[r] + c) / self.cost_avg).max((self.mem[r] + m) / self.mem_avg)
    }
    fn fits(&self, r: usize, m: f64) -> bool {
        self.mem_cap.map_or(true, |cap| self.mem[r] + m <= cap)
    }
    /// Ranks sorted by the score they would have after adding (c, m); ranks within the cap first.
    fn ranked(&self, c: f64, m: f64, among: impl Iterator<Item = usize>) -> Vec<usize> {
        let mut v: Vec<usize> = among.collect();
        v.sort_by(|&a, &b| {
            (!self.fits(a, m)).cmp(&!self.fits(b, m)).then(self.score(a, c, m).total_cmp(&self.score(b, c, m))).then(a.cmp(&b))
        });
        v
    }
    fn add(&mut self, r: usize, c: f64, m: f64) {
        self.cost[r] += c;
        self.mem[r] += m;
    }
}

/// `k` contiguous row ranges of a table of `rows` rows holding about equal shares of its
/// lookups (by the id histogram; equal rows without one). No range is empty.
fn split_by_lookups(st: &TableStats, rows: u64, k: usize) -> Vec<Range<u64>> {
    let k = (k as u64).clamp(1, rows.max(1));
    if st.row_histogram.is_empty() || k == 1 {
        return split_range(rows, k as usize, 1);
    }
    let mut cuts = vec![0u64];
    for i in 1..k {
        let target = i as f64 / k as f64;
        // Smallest row whose prefix share reaches the target (binary search on the prefix).
        let (mut lo, mut hi) = (cuts[cuts.len() - 1] + 1, rows - (k - i));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if st.row_fraction(rows, &(0..mid)) >= target {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        cuts.push(lo);
    }
    cuts.push(rows);
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

/// A row split of table `t` into `ranges`, over `ranks` (heaviest shard to the least-loaded rank).
fn place_rows(ctx: &Ctx, loads: &mut Loads, t: usize, kind: ShardingType, ranges: Vec<Range<u64>>, ranks: Vec<usize>) -> TablePlan {
    let tc = &ctx.model.tables[t];
    let shard = |r: &Range<u64>| {
        let f = ctx.stats[t].row_fraction(tc.rows, r);
        (ctx.stats[t].lookups_per_sample * ctx.g * f * tc.dim as f64, shard_bytes(&ctx.opts.optimizer, r.end - r.start, tc.dim))
    };
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by(|&a, &b| {
        let (ca, ma) = shard(&ranges[a]);
        let (cb, mb) = shard(&ranges[b]);
        (cb / loads.cost_avg).max(mb / loads.mem_avg).total_cmp(&(ca / loads.cost_avg).max(ma / loads.mem_avg)).then(a.cmp(&b))
    });
    let mut free = ranks;
    let mut assigned = vec![0usize; ranges.len()];
    for i in order {
        let (c, m) = shard(&ranges[i]);
        free.sort_by(|&a, &b| loads.score(a, c, m).total_cmp(&loads.score(b, c, m)).then(a.cmp(&b)));
        let r = free.remove(0);
        loads.add(r, c, m);
        assigned[i] = r;
    }
    let shards = ranges.into_iter().zip(assigned).map(|(rows, rank)| PlacedShard { rank, rows, cols: 0..tc.dim }).collect();
    TablePlan { table: t, kind, shards }
}

/// Equal row ranges of table `t` over `ranks` (empty ranges dropped).
fn equal_rows(ctx: &Ctx, t: usize, ranks: usize) -> Vec<Range<u64>> {
    split_range(ctx.model.tables[t].rows, ranks, 1).into_iter().filter(|r| !r.is_empty()).collect()
}

/// A column split of table `t` over `k` ranks chosen by load.
fn place_cols(ctx: &Ctx, loads: &mut Loads, t: usize, k: usize) -> TablePlan {
    let tc = &ctx.model.tables[t];
    let k = k.clamp(1, (tc.dim / 4).max(1)).min(ctx.n);
    let c = ctx.table_cost(t) / k as f64;
    let m = shard_bytes(&ctx.opts.optimizer, tc.rows, tc.dim / k);
    let ranks: Vec<usize> = loads.ranked(c, m, 0..ctx.n).into_iter().take(k).collect();
    let tp = TablePlan::new(t, tc.rows, tc.dim, ShardingType::ColumnWise, &ranks);
    for s in &tp.shards {
        loads.add(s.rank, ctx.stats[t].lookups_per_sample * ctx.g * s.cols.len() as f64, shard_bytes(&ctx.opts.optimizer, tc.rows, s.cols.len()));
    }
    tp
}

/// A hot table too narrow for a column split: rows split into `k` shards of equal lookups, on
/// the k least-loaded ranks of the best node when k ≤ L, else of the whole group
/// (table-row-wise: partial sums reduced among those ranks only).
fn place_hot_rows(ctx: &Ctx, loads: &mut Loads, t: usize, k: usize) -> TablePlan {
    let ranges = split_by_lookups(&ctx.stats[t], ctx.model.tables[t].rows, k.min(ctx.n));
    let (c, m) = (ctx.table_cost(t) / ranges.len() as f64, ctx.table_bytes(t) / ranges.len() as f64);
    let k = ranges.len();
    let among: Vec<usize> = match best_node(ctx, loads, c * k as f64, m * k as f64, k) {
        Some(nd) => ctx.node_ranks(nd).collect(),
        None => (0..ctx.n).collect(),
    };
    let ranks: Vec<usize> = loads.ranked(c, m, among.into_iter()).into_iter().take(ranges.len()).collect();
    place_rows(ctx, loads, t, ShardingType::TableRowWise, ranges, ranks)
}

fn place_whole(ctx: &Ctx, loads: &mut Loads, t: usize) -> TablePlan {
    let (c, m) = (ctx.table_cost(t), ctx.table_bytes(t));
    let r = loads.ranked(c, m, 0..ctx.n)[0];
    loads.add(r, c, m);
    let tc = &ctx.model.tables[t];
    TablePlan::new(t, tc.rows, tc.dim, ShardingType::TableWise, &[r])
}

/// The node (block of L group ranks) of at least `min_ranks` ranks whose ranks' highest score
/// stays lowest; none when no node is that large.
fn best_node(ctx: &Ctx, loads: &Loads, c: f64, m: f64, min_ranks: usize) -> Option<usize> {
    (0..ctx.nodes()).filter(|&nd| ctx.node_ranks(nd).len() >= min_ranks).min_by(|&a, &b| {
        let s = |nd: usize| {
            let rs = ctx.node_ranks(nd);
            let k = rs.len() as f64;
            rs.map(|r| loads.score(r, c / k, m / k)).fold(0.0, f64::max)
        };
        s(a).total_cmp(&s(b)).then(a.cmp(&b))
    })
}

/// One greedy plan with split threshold `share` (a table bigger than share × mean per-rank
/// table bytes is split by rows).
fn greedy(ctx: &Ctx, share: f64) -> Plan {
    let n = ctx.n;
    let nt = ctx.model.num_tables();
    let total_cost: f64 = (0..nt).map(|t| ctx.table_cost(t)).sum();
    let total_bytes: f64 = (0..nt).map(|t| ctx.table_bytes(t)).sum();
    let (dense, act) = ctx.fixed_bytes();
    let mut loads = Loads {
        cost: vec![0.0; n],
        mem: vec![0.0; n],
        cost_avg: (total_cost / n as f64).max(1e-9),
        mem_avg: (total_bytes / n as f64).max(1.0),
        mem_cap: ctx.opts.memory_budget_bytes.map(|b| b as f64 - dense - act),
    };
    let mut plans: Vec<Option<TablePlan>> = vec![None; nt];

    if let Some(kind) = ctx.opts.force {
        let mut order: Vec<usize> = (0..nt).collect();
        order.sort_by(|&a, &b| ctx.table_bytes(b).total_cmp(&ctx.table_bytes(a)).then(a.cmp(&b)));
        for t in order {
            let tc = &ctx.model.tables[t];
            plans[t] = Some(match kind {
                ShardingType::TableWise => place_whole(ctx, &mut loads, t),
                ShardingType::RowWise => place_rows(ctx, &mut loads, t, kind, equal_rows(ctx, t, n), (0..n).collect()),
                ShardingType::ColumnWise => place_cols(ctx, &mut loads, t, tc.dim / 4),
                ShardingType::TableRowWise => {
                    let nd = best_node(ctx, &loads, ctx.table_cost(t), ctx.table_bytes(t), 1).unwrap_or(0);
                    let ranks: Vec<usize> = ctx.node_ranks(nd).collect();
                    place_rows(ctx, &mut loads, t, kind, equal_rows(ctx, t, ranks.len()), ranks)
                }
            });
        }
        return Plan { n, tables: plans.into_iter().map(|p| p.expect("every table placed")).collect() };
    }

    // 1. Row splits: tables too big for a rank's share of the table bytes (largest first).
    let mut big: Vec<usize> = (0..nt)
        .filter(|&t| n > 1 && ctx.model.tables[t].rows > 1 && ctx.table_bytes(t) > share * loads.mem_avg)
        .collect();
    big.sort_by(|&a, &b| ctx.table_bytes(b).total_cmp(&ctx.table_bytes(a)).then(a.cmp(&b)));
    for &t in &big {
        let bytes = ctx.table_bytes(t);
        let l = ctx.l;
        let trw = l >= 2 && l < n && bytes / l as f64 <= share * loads.mem_avg;
        plans[t] = Some(if trw {
            let nd = best_node(ctx, &loads, ctx.table_cost(t), bytes, 1).unwrap_or(0);
            let ranks: Vec<usize> = ctx.node_ranks(nd).collect();
            place_rows(ctx, &mut loads, t, ShardingType::TableRowWise, equal_rows(ctx, t, ranks.len()), ranks)
        } else {
            place_rows(ctx, &mut loads, t, ShardingType::RowWise, equal_rows(ctx, t, n), (0..n).collect())
        });
    }

    // 2. Hot tables split over just enough ranks (by columns, or by rows when too narrow), and
    // whole tables, in LPT order of their per-shard load.
    struct Item {
        t: usize,
        k: usize,
        key: f64,
    }
    // A table is hot when its cost exceeds the mean per-rank cost of the tables still to place
    // (the row splits already load every rank about evenly).
    let rest_avg = ((0..nt).filter(|&t| plans[t].is_none()).map(|t| ctx.table_cost(t)).sum::<f64>() / n as f64).max(1e-9);
    let mut items: Vec<Item> = (0..nt)
        .filter(|&t| plans[t].is_none())
        .map(|t| {
            let tc = &ctx.model.tables[t];
            let c = ctx.table_cost(t);
            let kmax = if tc.dim >= 2 * MIN_COL_WIDTH { tc.dim / MIN_COL_WIDTH } else { tc.rows.min(n as u64) as usize }.min(n);
            let k = if kmax >= 2 && c > rest_avg { ((c / rest_avg).ceil() as usize).clamp(2, kmax) } else { 1 };
            let key = (c / k as f64 / loads.cost_avg).max(ctx.table_bytes(t) / k as f64 / loads.mem_avg);
            Item { t, k, key }
        })
        .collect();
    items.sort_by(|a, b| b.key.total_cmp(&a.key).then(a.t.cmp(&b.t)));
    for it in items {
        let wide = ctx.model.tables[it.t].dim >= 2 * MIN_COL_WIDTH;
        plans[it.t] = Some(match (it.k > 1, wide) {
            (true, true) => place_cols(ctx, &mut loads, it.t, it.k),
            (true, false) => place_hot_rows(ctx, &mut loads, it.t, it.k),
            (false, _) => place_whole(ctx, &mut loads, it.t),
        });
    }
    Plan { n, tables: plans.into_iter().map(|p| p.expect("every table placed")).collect() }
}

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

/// Bytes a matrix product of the dense network may pack its operands into (at most its
/// largest operand: a layer's weights, or b rows of its widest side).
fn gemm_packing(model: &ModelConfig, b: f64) -> f64 {
    let mut dims = vec![model.num_dense];
    dims.extend(&model.bottom_mlp);
    let mut top = vec![model.interaction_width()];
    top.extend(&model.top_mlp);
    let layers = dims.windows(2).chain(top.windows(2)).map(|w| (w[0] * w[1]) as f64).fold(0.0, f64::max);
    let widest = dims.iter().chain(&top).copied().max().unwrap_or(0).max((model.num_tables() + 1) * model.dim()) as f64;
    layers.max(b * widest) * F32
}

/// One rank's shard as the report needs it.
struct SlotInfo {
    table: usize,
    kind: ShardingType,
    /// The shard's rows of the table (all of them for a column shard).
    range: Range<u64>,
    rows: u64,
    cols: usize,
    /// Share of the table's ids that this shard looks up (1 for a column shard).
    f: f64,
}

/// Memory phases of one rank (bytes live in each; see the module doc), and its weight and
/// optimizer bytes.
fn rank_memory(ctx: &Ctx, plan: &Plan, r: usize, slots: &[SlotInfo], traffic: &Traffic, counts: &TrwCounts) -> Vec<(&'static str, f64)> {
    let (n, g, b) = (ctx.n, ctx.g, ctx.b);
    let model = ctx.model;
    let opt = &ctx.opts.optimizer;
    let d = model.dim() as f64;
    let nt = model.num_tables() as f64;
    let st = &ctx.stats;
    let spread = STEP_SPREAD;
    let ids_of = |s: &SlotInfo| st[s.table].lookups_per_sample * g * s.f * spread;
    // Unique rows of a shard among `samples` samples of its table.
    let distinct = |s: &SlotInfo, samples: f64| st[s.table].distinct_in(model.tables[s.table].rows, &s.range, samples);
    // Persistent: embedding shards and touched-row bits, dense parameters and activations,
    // the current and the next local batch, the labels' upload.
    let (dense, act) = ctx.fixed_bytes();
    let weights: f64 = slots.iter().map(|s| s.rows as f64 * s.cols as f64 * F32).sum();
    let state: f64 = slots.iter().map(|s| s.rows as f64 * state_floats(opt, s.cols) as f64 * F32).sum();
    let touched: f64 = slots.iter().map(|s| (s.rows as f64 / 64.0).ceil() * WORD).sum();
    let ids_per_sample: f64 = st.iter().map(|s| s.lookups_per_sample).sum();
    let batch = b * (model.num_dense as f64 * F32 + F32 + nt * F32 + ids_per_sample * WORD * spread);
    let misc = MISC_BYTES + MISC_PER_SHARD * plan.tables.iter().map(|t| t.shards.len()).sum::<usize>() as f64;
    let base = weights + state + touched + dense + act + b * F32 + 2.0 * batch + ctx.opts.workspace_bytes as f64 + misc;
    // Construction: shard after shard, each from a host copy of its initial weights.
    let mut construction = 0f64;
    let mut built = 0f64;
    for s in slots {
        let w = s.rows as f64 * s.cols as f64 * F32;
        let v = s.rows as f64 * state_floats(opt, s.cols) as f64 * F32;
        construction = construction.max(misc + built + 2.0 * w + v);
        built += w + v;
    }
    // Step 1: the id message (this rank's send buffer, the receive buffer), decoded.
    let send_in = traffic.input_a2a * spread;
    let recv_in: f64 = slots.iter().map(|s| (g + ids_of(s)) * WORD).sum();
    let jag: f64 = slots.iter().map(|s| g * F32 + ids_of(s) * WORD).sum();
    // Step 2: bags (offsets and ids) and the ids kept for the backward; pooled outputs.
    let bags: f64 = slots.iter().map(|s| (g + 1.0) * WORD + ids_of(s) * WORD).sum();
    let kept: f64 = slots.iter().map(|s| ids_of(s) * WORD).sum();
    let fwd = bags + kept;
    let out_of = |pred: &dyn Fn(ShardingType) -> bool| slots.iter().filter(|s| pred(s.kind)).map(|s| g * s.cols as f64 * F32).sum::<f64>();
    let outs = out_of(&|_| true);
    let outs_pw = out_of(&|k| !k.splits_rows());
    let outs_rw = out_of(&|k| k == ShardingType::RowWise);
    let outs_trw = out_of(&|k| k == ShardingType::TableRowWise);
    let wide = b * (nt + 1.0) * d * F32;
    let pw_tables = plan.tables.iter().filter(|t| !t.kind.splits_rows()).count() as f64;
    let recv_pw = b * pw_tables * d * F32;
    let rt = plan.tables.iter().filter(|t| t.kind == ShardingType::RowWise).count() as f64;
    let send_rs = n as f64 * rt * b * d * F32;
    let mine_rs = rt * b * d * F32;
    let fsum = |v: &[usize]| v.iter().sum::<usize>() as f64 * F32;
    let (send_a, recv_a, send_b, recv_b) = (fsum(&counts.reduce_send), fsum(&counts.reduce_recv), fsum(&counts.owners_send), fsum(&counts.owners_recv));
    let trw = trw_tables(plan);
    let sums: f64 = trw.iter().map(|t| t.served_by(r).len() as f64 * b * d * F32).sum();
    let part = trw.iter().filter(|t| t.holders.len() > 1).map(|t| t.served_by(r).len() as f64 * b * d * F32).fold(0.0, f64::max);
    let dense_x = b * model.num_dense as f64 * F32;
    // The dense all-reduce in flight: its buffer, the transport's chunk and scratch.
    let p4 = dense_params(model) as f64 * F32;
    let world = (ctx.m * n) as f64;
    let ar = if world > 1.0 { p4 * (2.0 + 1.0 / world) } else { p4 };
    let scaled = nt * b * d * F32;
    let gmats = outs;
    let send_g = b * pw_tables * d * F32;
    let recv_g = outs_pw;
    // The fused update's dedup of one shard, and column shards' per-row gradients kept until
    // their Σg² are combined (row-wise AdaGrad).
    let dedup = slots
        .iter()
        .map(|s| {
            let (i, u) = (ids_of(s), distinct(s, g) * spread);
            (16.0 * i).max(4.0 * i + 4.0 * WORD * u)
        })
        .fold(0.0, f64::max);
    let combine = matches!(opt, EmbOptimizer::RowWiseAdagrad { .. }) && plan.tables.iter().any(|t| t.kind == ShardingType::ColumnWise);
    // Per unique row: its index (a vector grown by doubling), its gradient and its Σg².
    let cw_rows: Vec<(f64, usize)> = if combine { slots.iter().filter(|s| s.kind == ShardingType::ColumnWise).map(|s| (distinct(s, g) * spread, s.cols)).collect() } else { Vec::new() };
    let partials: f64 = cw_rows.iter().map(|&(u, cols)| u * (2.0 * WORD + cols as f64 * F32 + F32)).sum();
    // Then the Σg² of every column shard of the group gathered, and one table's total uploaded.
    let group_u: f64 = if combine {
        plan.tables.iter().filter(|t| t.kind == ShardingType::ColumnWise).map(|t| t.shards.len() as f64 * st[t.table].distinct_rows(model.tables[t.table].rows, g) * spread).sum()
    } else {
        0.0
    };
    let mine_u: f64 = cw_rows.iter().map(|r| r.0).sum();
    let max_u = cw_rows.iter().map(|r| r.0).fold(0.0, f64::max);
    let combine_bufs = partials + 2.0 * mine_u * F32 + group_u * F32 + 2.0 * max_u * F32;
    let mut phases = vec![
        ("construction", construction),
        ("next batch", base + recv_in + 24.0 * b),
        ("input distribution", base + send_in + recv_in + jag),
        ("lookup", base + (jag + bags + (g + 1.0) * WORD).max(fwd + outs)),
        ("output: pooled", base + fwd + wide + (outs + outs_pw).max(outs + recv_pw)),
    ];
    if rt > 0.0 {
        phases.push(("output: row-wise", base + fwd + wide + (outs_rw + outs_trw + send_rs).max(outs_trw + 2.0 * send_rs + mine_rs)));
    }
    if !trw.is_empty() {
        let m = [outs_trw + send_a, send_a + recv_a, recv_a + sums + part, sums + send_b, send_b + recv_b].into_iter().fold(0.0, f64::max);
        phases.push(("output: table-row-wise", base + fwd + wide + m));
    }
    phases.push(("dense", base + fwd + dense_x + wide.max(send_in + recv_in + gemm_packing(model, b).max(2.0 * p4))));
    let bwd_base = base + fwd + dense_x + recv_in + ar + scaled + gmats;
    let (send_i, recv_i, send_ii, all_ii) = (recv_b, send_b, recv_a, send_a);
    let comm = [send_g + recv_g, mine_rs + send_rs, send_i + recv_i, recv_i + send_ii, send_ii + all_ii].into_iter().fold(0.0, f64::max);
    phases.push(("embedding backward", bwd_base + comm));
    phases.push(("embedding update", base + fwd + dense_x + recv_in + ar + gmats + dedup + partials));
    if combine {
        phases.push(("column Σg² combine", base + fwd + dense_x + recv_in + ar + combine_bufs));
    }
    if ctx.m > 1 {
        let k = ctx.opts.sync_every as f64;
        let m = ctx.m as f64;
        let tau: Vec<f64> = slots.iter().map(|s| distinct(s, k * g) * spread).collect();
        let msg: f64 = tau.iter().map(|t| (1.0 + t) * WORD).sum();
        let (rows_list, vals): (f64, f64) = if ctx.opts.full_sync {
            (slots.iter().map(|s| s.rows as f64 * WORD).sum(), slots.iter().map(|s| s.rows as f64 * (s.cols + state_floats(opt, s.cols)) as f64).sum())
        } else {
            let union: Vec<f64> = slots.iter().map(|s| distinct(s, k * m * g) * spread).collect();
            (m * tau.iter().sum::<f64>() * WORD, slots.iter().zip(&union).map(|(s, u)| u * (s.cols + state_floats(opt, s.cols)) as f64).sum())
        };
        let chunk = vals.min(super::SYNC_CHUNK as f64) * F32;
        let sync_base = base + recv_in;
        let index = if ctx.opts.full_sync { rows_list } else { (msg + m * msg).max(m * msg + rows_list) };
        // Averaging a chunk: the rows lists, a chunk's row ids on the backend, the packed chunk and
        // the all-reduce's scratch.
        phases.push(("replica sync", sync_base + index.max(2.0 * rows_list + chunk * (2.0 + 1.0 / m))));
    }
    phases.push(("dense update", base + recv_in + 2.0 * p4));
    phases
}

fn report_ctx(ctx: &Ctx, plan: &Plan) -> PlanReport {
    let (n, g, b) = (ctx.n, ctx.g, ctx.b);
    let opt = &ctx.opts.optimizer;
    let model = ctx.model;
    let d = model.dim() as f64;
    let st = &ctx.stats;
    let trw = trw_tables(plan);
    let rt = plan.tables.iter().filter(|t| t.kind == ShardingType::RowWise).count() as f64;
    let combine = matches!(opt, EmbOptimizer::RowWiseAdagrad { .. }) && plan.tables.iter().any(|t| t.kind == ShardingType::ColumnWise);
    let p4 = dense_params(model) as f64 * F32;
    let node_size = |r: usize| ctx.node_ranks(ctx.node_of(r)).len() as f64;
    let off_node = |r: usize| (n as f64 - node_size(r)) / n as f64;
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    let mut tables = Vec::new();
    for tp in &plan.tables {
        let tc = &model.tables[tp.table];
        *by_type.entry(tp.kind.name().to_string()).or_insert(0) += 1;
        tables.push(TableReport {
            table: tp.table,
            rows: tc.rows,
            dim: tc.dim,
            kind: tp.kind,
            ranks: tp.shards.iter().map(|s| s.rank).collect(),
            lookups_per_sample: st[tp.table].lookups_per_sample,
            bytes: shard_bytes(opt, tc.rows, tc.dim) as u64,
            cost: st[tp.table].lookups_per_sample * g * tc.dim as f64,
        });
    }
    let share_of = |tp: &TablePlan, s: &PlacedShard| {
        if tp.kind == ShardingType::ColumnWise {
            1.0
        } else {
            st[tp.table].row_fraction(model.tables[tp.table].rows, &s.rows)
        }
    };
    let (dense, act) = ctx.fixed_bytes();
    let mut ranks = Vec::with_capacity(n);
    for r in 0..n {
        let mut slots = Vec::new();
        let mut a2a: BTreeMap<String, A2aBytes> = by_type.keys().map(|k| (k.clone(), A2aBytes::default())).collect();
        let mut tr = Traffic { input_a2a: n as f64 * WORD, dense_all_reduce: p4 + WORD, ..Traffic::default() };
        let mut inter = 0f64;
        let (mut lookups, mut cost) = (0f64, 0f64);
        for tp in &plan.tables {
            let tc = &model.tables[tp.table];
            let lam = st[tp.table].lookups_per_sample;
            let e = a2a.get_mut(tp.kind.name()).expect("every type listed");
            for s in &tp.shards {
                let f = share_of(tp, s);
                // This rank's ids (and b lengths) for the shard; its gradient rows back to it.
                let ids = (b + lam * b * f) * WORD;
                tr.input_a2a += ids;
                e.ids += ids;
                let remote = ctx.node_of(s.rank) != ctx.node_of(r);
                inter += if remote { ids } else { 0.0 };
                if !tp.kind.splits_rows() {
                    let gr = b * s.cols.len() as f64 * F32;
                    tr.grad_a2a += gr;
                    e.grads += gr;
                    inter += if remote { gr } else { 0.0 };
                }
                if s.rank != r {
                    continue;
                }
                slots.push(SlotInfo { table: tp.table, kind: tp.kind, range: s.rows.clone(), rows: s.rows.end - s.rows.start, cols: s.cols.len(), f });
                let lk = lam * g * f;
                lookups += lk;
                cost += lk * s.cols.len() as f64;
                if !tp.kind.splits_rows() {
                    let out = g * s.cols.len() as f64 * F32;
                    tr.output_a2a += out;
                    e.outputs += out;
                    inter += out * off_node(r);
                }
                if tp.kind == ShardingType::ColumnWise && combine {
                    let u = st[tp.table].distinct_rows(tc.rows, g);
                    tr.grad_col_sq += WORD + u * F32;
                    e.grads += WORD + u * F32;
                }
            }
        }
        if rt > 0.0 {
            let (out, gr) = (rt * n as f64 * b * d * F32, rt * b * d * F32);
            tr.output_reduce_scatter = out;
            tr.grad_all_gather = gr;
            let e = a2a.get_mut(ShardingType::RowWise.name()).expect("row-wise listed");
            e.outputs += out;
            e.grads += gr;
            inter += (out + gr) * off_node(r);
        }
        // Table-row-wise counts in units of b·D floats.
        let unit = TrwCounts::new(&trw, n, r, 1, 1);
        if !trw.is_empty() {
            let bytes = |v: &[usize]| v.iter().sum::<usize>() as f64 * b * d * F32;
            let remote = |v: &[usize]| v.iter().enumerate().filter(|(p, _)| ctx.node_of(*p) != ctx.node_of(r)).map(|(_, &c)| c).sum::<usize>() as f64 * b * d * F32;
            tr.output_trw_reduce = bytes(&unit.reduce_send);
            tr.output_trw_owners = bytes(&unit.owners_send);
            tr.grad_trw_owners = bytes(&unit.owners_recv);
            tr.grad_trw_gather = bytes(&unit.reduce_recv);
            let e = a2a.get_mut(ShardingType::TableRowWise.name()).expect("table-row-wise listed");
            e.outputs += tr.output_trw_reduce + tr.output_trw_owners;
            e.grads += tr.grad_trw_owners + tr.grad_trw_gather;
            inter += remote(&unit.reduce_send) + remote(&unit.owners_send) + remote(&unit.owners_recv) + remote(&unit.reduce_recv);
        }
        // Replica sync, per sync: f32 values of the rows (and their indices, sparse).
        let (mut whole, mut sparse) = (0f64, 0f64);
        if ctx.m > 1 {
            let k = ctx.opts.sync_every as f64;
            let (mut index, mut values) = (0f64, 0f64);
            for s in &slots {
                let tc = &model.tables[s.table];
                let distinct = |samples: f64| st[s.table].distinct_in(tc.rows, &s.range, samples);
                let per_row = (s.cols + state_floats(opt, s.cols)) as f64 * F32;
                whole += s.rows as f64 * per_row;
                index += (1.0 + distinct(k * g)) * WORD;
                values += distinct(k * ctx.m as f64 * g) * per_row;
            }
            sparse = index + values;
            (tr.sync_index, tr.sync_values) = if ctx.opts.full_sync { (0.0, whole / k) } else { (index / k, values / k) };
        }
        // Scale the TRW unit counts to floats for the memory model.
        let counts = TrwCounts {
            reduce_send: unit.reduce_send.iter().map(|&c| (c as f64 * b * d) as usize).collect(),
            reduce_recv: unit.reduce_recv.iter().map(|&c| (c as f64 * b * d) as usize).collect(),
            owners_send: unit.owners_send.iter().map(|&c| (c as f64 * b * d) as usize).collect(),
            owners_recv: unit.owners_recv.iter().map(|&c| (c as f64 * b * d) as usize).collect(),
        };
        let phases = rank_memory(ctx, plan, r, &slots, &tr, &counts);
        let (peak_phase, peak) = phases.iter().fold(("", 0f64), |acc, &(p, x)| if x > acc.1 { (p, x) } else { acc });
        let weights: f64 = slots.iter().map(|s| s.rows as f64 * s.cols as f64 * F32).sum();
        let optim: f64 = slots.iter().map(|s| s.rows as f64 * state_floats(opt, s.cols) as f64 * F32).sum();
        let total = peak.ceil();
        ranks.push(RankReport {
            rank: r,
            weights_bytes: weights as u64,
            optimizer_bytes: optim as u64,
            activation_bytes: act as u64,
            comm_buffer_bytes: (total - weights - optim - act - dense).max(0.0) as u64,
            dense_bytes: dense as u64,
            total_bytes: total as u64,
            peak_phase,
            phases: phases.iter().map(|&(phase, x)| PhaseBytes { phase, bytes: x.ceil() as u64 }).collect(),
            lookups,
            cost,
            shards: slots.len(),
            a2a_total_bytes: tr.sparse(),
            traffic: tr,
            a2a,
            a2a_inter_node_bytes: inter,
            sync_bytes_whole: whole,
            sync_bytes_sparse: sparse,
        });
    }
    let ratio = |v: &[f64]| {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        if mean > 0.0 {
            v.iter().cloned().fold(0.0, f64::max) / mean
        } else {
            1.0
        }
    };
    let costs: Vec<f64> = ranks.iter().map(|r| r.cost).collect();
    let mems: Vec<f64> = ranks.iter().map(|r| r.total_bytes as f64).collect();
    let mut mean_a2a: BTreeMap<String, A2aBytes> = BTreeMap::new();
    for r in &ranks {
        for (k, v) in &r.a2a {
            let e = mean_a2a.entry(k.clone()).or_default();
            e.ids += v.ids / n as f64;
            e.outputs += v.outputs / n as f64;
            e.grads += v.grads / n as f64;
        }
    }
    let totals: Vec<f64> = ranks.iter().map(|r| r.a2a_total_bytes).collect();
    PlanReport {
        m: ctx.m,
        n,
        world: ctx.m * n,
        batch_size: ctx.opts.batch_size,
        samples_per_group: g,
        samples_per_rank: b,
        ranks_per_node: ctx.opts.ranks_per_node,
        placement: ctx.opts.placement,
        group_ranks_per_node: ctx.l,
        optimizer_state_floats_per_row: state_floats(opt, model.dim()),
        table_bytes: (0..model.num_tables()).map(|t| ctx.table_bytes(t)).sum::<f64>() as u64,
        imbalance: ratio(&costs),
        memory_imbalance: ratio(&mems),
        max_rank_bytes: ranks.iter().map(|r| r.total_bytes).max().unwrap_or(0),
        memory_budget_bytes: ctx.opts.memory_budget_bytes,
        tables_by_type: by_type,
        a2a_mean_bytes_per_rank: mean_a2a,
        a2a_mean_total_bytes_per_rank: totals.iter().sum::<f64>() / n as f64,
        a2a_max_total_bytes_per_rank: totals.iter().cloned().fold(0.0, f64::max),
        ranks,
        tables,
    }
}
