//! The plan's report: per rank its memory (from the memory model), lookups, compute cost and
//! the bytes it hands to each collective per step; per table its type, ranks and cost; and the
//! imbalance over the ranks.
//!
//! - *Compute cost* of a shard = its ids per step × its columns (λ·G·f·cols); the imbalance is
//!   max/mean over the ranks.
//! - *Traffic*: the bytes each rank hands to each collective per step, in the engine's own
//!   convention ([`crate::parallel::ByteCounts`]): the whole send buffer of an all-to-all or a
//!   reduce-scatter (own block included), the own block of an all-gather, the buffer of an
//!   all-reduce; ids, bag lengths and counts are 8 bytes, floats 4; the replica sync's touched
//!   rows are their count in 2, 4 or 8 bytes (the shard's [`super::index_width`]) then the rows
//!   in that width or a bitmap, whichever is smaller ([`touched_message_bytes`]), its values
//!   f32, the optimizer state's f64 with delayed state sync.
use super::memory::{rank_memory, SlotInfo};
use super::options::Ctx;
use super::sizes::{dense_params, shard_bytes, state_floats, sync_row_bytes, F32, WORD};
use super::traffic::Traffic;
use super::trw::{trw_tables, TrwCounts};
use super::{touched_message_bytes, PlacedShard, Plan, ShardingType, TablePlan};
use crate::config::EmbOptimizer;
use crate::grid::Placement;
use serde::Serialize;
use std::collections::BTreeMap;

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

/// Bytes live in one phase of the step (see `super::memory`).
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

pub(super) fn report_ctx(ctx: &Ctx, plan: &Plan) -> PlanReport {
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
        // Replica sync, per sync: the rows' values (f32; the state f64 with delayed state sync)
        // and, sparse, this rank's touched rows and their count in the shard's index width.
        let (mut whole, mut sparse) = (0f64, 0f64);
        if ctx.m > 1 {
            let k = ctx.opts.sync_every as f64;
            let (mut index, mut values) = (0f64, 0f64);
            for s in &slots {
                let tc = &model.tables[s.table];
                let distinct = |samples: f64| st[s.table].distinct_in(tc.rows, &s.range, samples);
                let per_row = sync_row_bytes(opt, s.cols, ctx.opts.delayed_state_sync);
                whole += s.rows as f64 * per_row;
                index += touched_message_bytes(s.rows, distinct(k * g));
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

