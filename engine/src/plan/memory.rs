//! The memory model: the heap peak of one rank over construction and training, an upper bound.
//! The engine's step is a sequence of phases, each with a known set of live buffers (weights and
//! optimizer state, dense parameters and activations, the two local batches, the ids and bags of
//! the step, pooled outputs, send and receive buffers of every collective and the host
//! transport's scratch, gradient matrices, the dedup of the fused update, sync buffers); the
//! figure is the largest phase. Buffers sized by ids are counted at [`STEP_SPREAD`] × their mean
//! per step; distinct rows (the fused update's and the sparse sync's) come from the statistics'
//! distinct-rows curve, read as an upper bound.
use super::options::Ctx;
use super::sizes::{dense_params, state_floats, F32, WORD};
use super::traffic::Traffic;
use super::trw::{trw_tables, TrwCounts};
use super::{Plan, ShardingType};
use crate::config::{EmbOptimizer, ModelConfig};
use std::ops::Range;

/// Buffers sized by a step's ids are counted at this multiple of the mean (ids per step vary).
pub const STEP_SPREAD: f64 = 1.05;
/// Small allocations of a rank not priced one by one (communicators, the plan and its slot
/// lists): a fixed allowance plus an allowance per shard of the plan.
const MISC_BYTES: f64 = 64.0 * 1024.0;
const MISC_PER_SHARD: f64 = 256.0;

/// Host scratch of the transport's all-reduce of `bytes` bytes of f32s over `ranks` ranks (as
/// the transport computes it for itself).
fn all_reduce_scratch(bytes: f64, ranks: usize) -> f64 {
    let count = (bytes / F32).ceil() as usize;
    ember_transport::all_reduce_scratch_bytes(count, 4, ranks, false).map_or(f64::INFINITY, |s| s as f64)
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
pub(super) struct SlotInfo {
    pub(super) table: usize,
    pub(super) kind: ShardingType,
    /// The shard's rows of the table (all of them for a column shard).
    pub(super) range: Range<u64>,
    pub(super) rows: u64,
    pub(super) cols: usize,
    /// Share of the table's ids that this shard looks up (1 for a column shard).
    pub(super) f: f64,
}

/// Memory phases of one rank (bytes live in each; see the module doc), and its weight and
/// optimizer bytes.
pub(super) fn rank_memory(ctx: &Ctx, plan: &Plan, r: usize, slots: &[SlotInfo], traffic: &Traffic, counts: &TrwCounts) -> Vec<(&'static str, f64)> {
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
    // The dense all-reduce in flight: its buffer and the transport's scratch.
    let p4 = dense_params(model) as f64 * F32;
    let ar = p4 + all_reduce_scratch(p4, ctx.m * n);
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
        let msg: f64 = slots.iter().zip(&tau).map(|(s, &t)| super::touched_message_bytes(s.rows, t)).sum();
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
        // the all-reduce's scratch; beside the dense update's buffers (the sync runs while it does).
        let averaging = 2.0 * rows_list + chunk + all_reduce_scratch(chunk, ctx.m);
        phases.push(("replica sync", sync_base + index.max(averaging) + 2.0 * p4));
    }
    phases.push(("dense update", base + recv_in + 2.0 * p4));
    phases
}
