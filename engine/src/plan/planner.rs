//! The planner: chooses a sharding type and ranks per table for one sharding group of N ranks,
//! and predicts per-rank memory, lookups and all-to-all bytes for any plan (docs/plan.md).
//!
//! Cost model (all per step, for one sharding group, which serves G = B/M samples; every rank
//! owns b = B/T of them for its dense part):
//! - *compute cost* of a shard = lookups on it × its columns, lookups = λ·G·f, λ the table's
//!   lookups per sample and f the share of the table's lookups that hit the shard's rows
//!   (from an id histogram; uniform by default). The imbalance ratio is max/mean of this cost.
//! - *memory* per rank = weights (rows × cols × 4) + optimizer state (rows × state floats × 4:
//!   SGD 0, row-wise AdaGrad 1 per row — also per column shard, each keeps the whole row's v —,
//!   AdaGrad cols per row) + activations (pooled vectors, MLP activations and their gradients for
//!   the b local samples) + communication buffers (the forward all-to-all's send and receive
//!   buffers for ids and pooled vectors; the backward reuses them) + dense parameters (weights,
//!   gradients, optimizer state, replicated on every rank).
//! - *all-to-all bytes* a rank sends per forward step (its own chunk included; the backward sends
//!   the same output volume again in reverse): ids 8 bytes and bag lengths 4 bytes; pooled outputs
//!   4 bytes per float. Table-wise: a rank holding table t sends G·D floats; column-wise the same
//!   with its columns; row-wise shards send G·D partial sums (reduce-scatter) — G = B/M, so this
//!   volume shrinks by M at fixed T; table-row-wise: the G·D reduce-scatter stays inside the node,
//!   then G·D/L floats go to the owners.
//!
//! The greedy balancer: tables whose bytes exceed a share of the mean per-rank table bytes are
//! split by rows (table-row-wise over one node when that brings them under the share, else
//! row-wise over all N); tables whose compute cost exceeds the mean per-rank cost of the tables
//! still to place are split by columns (shards at least MIN_COL_WIDTH wide) over just enough
//! ranks; the rest go whole, largest first, to the rank whose normalised load
//! max(cost / mean cost, bytes / mean bytes) stays lowest (LPT). With a memory budget the split
//! share is lowered step by step until the plan fits, else the plan is refused.
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
const ID_BYTES: f64 = 8.0;
const LEN_BYTES: f64 = 4.0;
const F32: f64 = 4.0;
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
}

impl TableStats {
    /// The default without data: `bag_size` lookups per sample, uniform over the rows.
    pub fn from_config(t: &TableConfig) -> Self {
        TableStats { lookups_per_sample: t.bag_size as f64, distinct_fraction: 1.0, top_row_fraction: 0.0, row_histogram: Vec::new() }
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
}

/// Per-table statistics derived from the config alone (bag sizes, uniform ids).
pub fn default_stats(model: &ModelConfig) -> Vec<TableStats> {
    model.tables.iter().map(TableStats::from_config).collect()
}

/// Measures per-table statistics on sample batches (feature t looks up table t). Tables with no
/// samples get the config default.
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
            let mut ids = 0u64;
            for b in batches {
                if let Some(j) = b.sparse.get(t) {
                    for &id in &j.values {
                        let id = id.min(tc.rows - 1);
                        hist[((id as u128 * nb as u128) / tc.rows as u128) as usize] += 1.0;
                        *counts.entry(id).or_insert(0) += 1;
                        ids += 1;
                    }
                }
            }
            if ids == 0 {
                return TableStats { lookups_per_sample: 0.0, distinct_fraction: 1.0, top_row_fraction: 0.0, row_histogram: Vec::new() };
            }
            hist.iter_mut().for_each(|h| *h /= ids as f64);
            TableStats {
                lookups_per_sample: ids as f64 / samples as f64,
                distinct_fraction: counts.len() as f64 / ids as f64,
                top_row_fraction: *counts.values().max().unwrap_or(&0) as f64 / ids as f64,
                row_histogram: hist,
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

/// All-to-all bytes one rank sends per forward step for tables of one sharding type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct A2aBytes {
    /// Input distribution: ids (8 bytes) and bag lengths (4 bytes).
    pub ids: f64,
    /// Output distribution: pooled vectors, or partial sums (reduce-scatter) for row splits.
    pub outputs: f64,
}

impl A2aBytes {
    pub fn total(&self) -> f64 {
        self.ids + self.outputs
    }
    fn add(&mut self, o: &A2aBytes) {
        self.ids += o.ids;
        self.outputs += o.outputs;
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RankReport {
    pub rank: usize,
    pub weights_bytes: u64,
    pub optimizer_bytes: u64,
    pub activation_bytes: u64,
    pub comm_buffer_bytes: u64,
    pub dense_bytes: u64,
    pub total_bytes: u64,
    /// Ids this rank looks up per step.
    pub lookups: f64,
    /// lookups × columns, summed over its shards.
    pub cost: f64,
    pub shards: usize,
    /// Bytes sent per forward step, by sharding type name.
    pub a2a: BTreeMap<String, A2aBytes>,
    pub a2a_total_bytes: f64,
    /// Of those, bytes leaving the node (estimate).
    pub a2a_inter_node_bytes: f64,
    /// Replica sync per sync step (0 when M = 1): whole shards, and touched rows only (estimate).
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
    /// Mean over ranks of the bytes sent per forward step, by sharding type.
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

/// Floats of dense activations per sample (forward; the backward keeps as many gradients).
fn dense_activation_floats(model: &ModelConfig) -> f64 {
    let width = (model.num_tables() + 1) * model.dim();
    let inter = match model.interaction {
        Interaction::Dot => model.interaction_width(),
        Interaction::Dcn { layers, rank } => layers * (2 * width + rank),
    };
    (model.bottom_mlp.iter().sum::<usize>() + width + inter + model.top_mlp.iter().sum::<usize>()) as f64
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
    /// Per-rank memory that does not depend on the plan: dense parameters and activations.
    fn fixed_bytes(&self) -> (f64, f64) {
        let p = dense_params(self.model) as f64;
        let state = match self.opts.dense_optimizer {
            DenseOptimizer::Sgd { .. } => 0.0,
            DenseOptimizer::Adagrad { .. } => 1.0,
        };
        let dense = p * F32 * (2.0 + state);
        let act = 2.0 * F32 * self.b * dense_activation_floats(self.model);
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
    fn ranked(&self, c: f64, m: f64, among: Range<usize>) -> Vec<usize> {
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

/// A row split of table `t` over `ranks` (heaviest shard to the least-loaded rank).
fn place_rows(ctx: &Ctx, loads: &mut Loads, t: usize, kind: ShardingType, ranks: Vec<usize>) -> TablePlan {
    let tc = &ctx.model.tables[t];
    let ranges: Vec<Range<u64>> = split_range(tc.rows, ranks.len(), 1).into_iter().filter(|r| !r.is_empty()).collect();
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

fn place_whole(ctx: &Ctx, loads: &mut Loads, t: usize) -> TablePlan {
    let (c, m) = (ctx.table_cost(t), ctx.table_bytes(t));
    let r = loads.ranked(c, m, 0..ctx.n)[0];
    loads.add(r, c, m);
    let tc = &ctx.model.tables[t];
    TablePlan::new(t, tc.rows, tc.dim, ShardingType::TableWise, &[r])
}

/// The node (block of L group ranks) whose ranks' summed score stays lowest.
fn best_node(ctx: &Ctx, loads: &Loads, c: f64, m: f64) -> usize {
    (0..ctx.nodes())
        .min_by(|&a, &b| {
            let s = |nd: usize| {
                let rs = ctx.node_ranks(nd);
                let k = rs.len() as f64;
                rs.map(|r| loads.score(r, c / k, m / k)).fold(0.0, f64::max)
            };
            s(a).total_cmp(&s(b)).then(a.cmp(&b))
        })
        .unwrap_or(0)
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
    let all: Vec<usize> = (0..n).collect();

    if let Some(kind) = ctx.opts.force {
        let mut order: Vec<usize> = (0..nt).collect();
        order.sort_by(|&a, &b| ctx.table_bytes(b).total_cmp(&ctx.table_bytes(a)).then(a.cmp(&b)));
        for t in order {
            let tc = &ctx.model.tables[t];
            plans[t] = Some(match kind {
                ShardingType::TableWise => place_whole(ctx, &mut loads, t),
                ShardingType::RowWise => place_rows(ctx, &mut loads, t, kind, all.clone()),
                ShardingType::ColumnWise => place_cols(ctx, &mut loads, t, tc.dim / 4),
                ShardingType::TableRowWise => {
                    let nd = best_node(ctx, &loads, ctx.table_cost(t), ctx.table_bytes(t));
                    place_rows(ctx, &mut loads, t, kind, ctx.node_ranks(nd).collect())
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
            let nd = best_node(ctx, &loads, ctx.table_cost(t), bytes);
            place_rows(ctx, &mut loads, t, ShardingType::TableRowWise, ctx.node_ranks(nd).collect())
        } else {
            place_rows(ctx, &mut loads, t, ShardingType::RowWise, all.clone())
        });
    }

    // 2. Column splits for hot tables, and whole tables, in LPT order of their per-shard load.
    struct Item {
        t: usize,
        k: usize,
        key: f64,
    }
    // A table is hot when its cost exceeds the mean per-rank cost of the tables still to place
    // (the row splits already load every rank about evenly): split it over just enough ranks.
    let rest_avg = ((0..nt).filter(|&t| plans[t].is_none()).map(|t| ctx.table_cost(t)).sum::<f64>() / n as f64).max(1e-9);
    let mut items: Vec<Item> = (0..nt)
        .filter(|&t| plans[t].is_none())
        .map(|t| {
            let dim = ctx.model.tables[t].dim;
            let c = ctx.table_cost(t);
            let kmax = (dim / MIN_COL_WIDTH).min(n);
            let k = if kmax >= 2 && c > rest_avg { ((c / rest_avg).ceil() as usize).clamp(2, kmax) } else { 1 };
            let key = (c / k as f64 / loads.cost_avg).max(ctx.table_bytes(t) / k as f64 / loads.mem_avg);
            Item { t, k, key }
        })
        .collect();
    items.sort_by(|a, b| b.key.total_cmp(&a.key).then(a.t.cmp(&b.t)));
    for it in items {
        plans[it.t] = Some(if it.k > 1 { place_cols(ctx, &mut loads, it.t, it.k) } else { place_whole(ctx, &mut loads, it.t) });
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
        "plan for grid {}x{} does not fit the memory budget: rank {} of each sharding group needs {:.3} GiB \
         (weights {:.3}, optimizer state {:.3}, activations {:.3}, comm buffers {:.3}, dense {:.3}) but the budget is {:.3} GiB per rank \
         (all {} tables with optimizer state: {:.3} GiB per replica); use more ranks per sharding group (larger N), fewer replicas, \
         a smaller batch or a larger budget",
        grid_m,
        n,
        worst.rank,
        g(worst.total_bytes),
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

/// Predicted memory, lookups and all-to-all bytes of any plan (see the module doc).
pub fn predict(model: &ModelConfig, grid_m: usize, plan: &Plan, opts: &PlanOptions) -> Result<PlanReport> {
    let ctx = Ctx::new(model, grid_m, plan.n, opts)?;
    plan.validate(model)?;
    Ok(report_ctx(&ctx, plan))
}

fn report_ctx(ctx: &Ctx, plan: &Plan) -> PlanReport {
    let (n, g, b) = (ctx.n, ctx.g, ctx.b);
    let opt = &ctx.opts.optimizer;
    let nodes = ctx.nodes();
    let node_size = |nd: usize| ctx.node_ranks(nd).len() as f64;
    let mut weights = vec![0f64; n];
    let mut optim = vec![0f64; n];
    let mut lookups = vec![0f64; n];
    let mut cost = vec![0f64; n];
    let mut shards = vec![0usize; n];
    let mut ids_recv = vec![0f64; n];
    let mut out_recv = vec![0f64; n];
    let mut a2a: Vec<BTreeMap<String, A2aBytes>> = vec![BTreeMap::new(); n];
    let mut inter = vec![0f64; n];
    let mut sync_whole = vec![0f64; n];
    let mut sync_sparse = vec![0f64; n];
    let mut tables = Vec::new();
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for tp in &plan.tables {
        let tc = &ctx.model.tables[tp.table];
        let st = &ctx.stats[tp.table];
        let lam = st.lookups_per_sample;
        let d = tc.dim as f64;
        let k = tp.shards.len();
        let key = tp.kind.name().to_string();
        *by_type.entry(key.clone()).or_insert(0) += 1;
        for r in 0..n {
            a2a[r].entry(key.clone()).or_default();
        }
        // Ids every rank sends for this table, and their destination nodes.
        let mut to_node = vec![0f64; nodes];
        let mut ids_send = 0.0;
        for s in &tp.shards {
            let f = if tp.kind == ShardingType::ColumnWise { 1.0 } else { st.row_fraction(tc.rows, &s.rows) };
            let per_src = lam * b * f * ID_BYTES + b * LEN_BYTES;
            to_node[ctx.node_of(s.rank)] += per_src;
            ids_send += per_src;
            let rank = s.rank;
            let cols = s.cols.len() as f64;
            let rows = s.rows.end - s.rows.start;
            let lk = lam * g * f;
            lookups[rank] += lk;
            cost[rank] += lk * cols;
            shards[rank] += 1;
            let w = rows as f64 * cols * F32;
            let o = rows as f64 * state_floats(opt, s.cols.len()) as f64 * F32;
            weights[rank] += w;
            optim[rank] += o;
            ids_recv[rank] += lk * ID_BYTES + g * LEN_BYTES;
            // Outputs this shard sends, and the part leaving the node.
            let off_node = (n as f64 - node_size(ctx.node_of(rank))) / n as f64;
            let (out, out_inter) = match tp.kind {
                ShardingType::TableWise | ShardingType::ColumnWise | ShardingType::RowWise => (g * cols * F32, g * cols * F32 * off_node),
                ShardingType::TableRowWise => {
                    // Reduce-scatter inside the node, then G/k samples per shard rank to the owners.
                    out_recv[rank] += g * cols * F32;
                    let a = g / k as f64 * cols * F32;
                    (g * cols * F32 + a, a * off_node)
                }
            };
            let e = a2a[rank].get_mut(&key).expect("entry");
            e.outputs += out;
            inter[rank] += out_inter;
            if ctx.m > 1 {
                sync_whole[rank] += w + o;
                let touched = (st.distinct_fraction * lam * ctx.opts.batch_size as f64 * f).min(rows as f64);
                sync_sparse[rank] += touched * ((cols + state_floats(opt, s.cols.len()) as f64) * F32 + ID_BYTES);
            }
        }
        let ids_total: f64 = to_node.iter().sum();
        for r in 0..n {
            a2a[r].get_mut(&key).expect("entry").ids += ids_send;
            inter[r] += ids_total - to_node[ctx.node_of(r)];
            // Pooled outputs (or partial sums) this rank receives for its b samples.
            out_recv[r] += match tp.kind {
                ShardingType::RowWise => k as f64 * b * d * F32,
                _ => b * d * F32,
            };
        }
        tables.push(TableReport {
            table: tp.table,
            rows: tc.rows,
            dim: tc.dim,
            kind: tp.kind,
            ranks: tp.shards.iter().map(|s| s.rank).collect(),
            lookups_per_sample: lam,
            bytes: shard_bytes(opt, tc.rows, tc.dim) as u64,
            cost: lam * g * d,
        });
    }
    let (dense, act) = ctx.fixed_bytes();
    let ranks: Vec<RankReport> = (0..n)
        .map(|r| {
            let sent = a2a[r].values().fold(A2aBytes::default(), |mut acc, x| {
                acc.add(x);
                acc
            });
            let comm = sent.ids + ids_recv[r] + sent.outputs + out_recv[r];
            let total = weights[r] + optim[r] + act + comm + dense;
            RankReport {
                rank: r,
                weights_bytes: weights[r] as u64,
                optimizer_bytes: optim[r] as u64,
                activation_bytes: act as u64,
                comm_buffer_bytes: comm as u64,
                dense_bytes: dense as u64,
                total_bytes: total as u64,
                lookups: lookups[r],
                cost: cost[r],
                shards: shards[r],
                a2a_total_bytes: sent.total(),
                a2a: a2a[r].clone(),
                a2a_inter_node_bytes: inter[r],
                sync_bytes_whole: sync_whole[r],
                sync_bytes_sparse: sync_sparse[r],
            }
        })
        .collect();
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
        optimizer_state_floats_per_row: state_floats(opt, ctx.model.dim()),
        table_bytes: (0..ctx.model.num_tables()).map(|t| ctx.table_bytes(t)).sum::<f64>() as u64,
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
