//! One rank of 2D sparse-parallel training, the brief's seven steps top to bottom:
//!
//! 1. input distribution — all-to-all of ids inside the sharding group;
//! 2. local lookup — pooled bags on the local shards;
//! 3. output distribution — all-to-all of pooled vectors (reduce-scatter of partial sums for
//!    row-split tables);
//! 4. dense forward and backward; dense gradients all-reduced over all T ranks (started here,
//!    overlapping step 5);
//! 5. embedding backward — the reverse all-to-all (all-gather for row-split tables) and the
//!    fused backward+optimizer on the local shards;
//! 6. every K steps, replica sync of shard weights and optimizer state;
//! 7. dense optimizer step (run before step 6: the order changes nothing in the result, and
//!    the dense all-reduce's buffers are freed before the sync allocates its own).
//!
//! Gradient convention (BRIEF.md §2): the loss is the mean over the global batch B; dense
//! gradients are summed over all ranks (each computed with 1/B); each sharding group applies
//! M/B × its samples' embedding gradient sum, so that the replica average gives back the
//! global mean (exactly, for SGD). Mean pooling is applied by the sample's owner (it knows the
//! whole bag's length), so shards always pool sums.
pub mod driver;
pub mod route;
pub mod sync;
pub mod xfer;

use crate::backend::{Backend, Bags, DenseUpdate, EmbKind, EmbUpdate, Layout, Shard, ShardSpec};
use crate::config::{ModelConfig, Pooling, TrainConfig, WeightDecay};
use crate::data::Batch;
use crate::dense::DenseNet;
use crate::embedding::{new_shard, upload_bags};
use crate::grid::{Grid, GridComms};
use crate::plan::trw::{trw_tables, TrwCounts, TrwTable};
use crate::plan::{Plan, ShardingType};
use crate::{Error, Result};
use ember_transport::ReduceOp;
use route::{decode_input, encode_input, slots_of, LocalSlot, Touched};
use serde::{Deserialize, Serialize};
use std::time::Instant;
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

impl Default for ParallelOptions {
    fn default() -> Self {
        ParallelOptions { sync_every: 1, sync: SyncMode::Sparse, delayed_state_sync: false, fully_sharded: false, xfer: XferKind::Auto, checkpoint: None }
    }
}

/// Milliseconds spent per stage, summed over steps.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageTimes {
    pub input_dist: f64,
    pub lookup: f64,
    pub output_dist: f64,
    pub dense: f64,
    pub backward: f64,
    pub sync: f64,
}

/// Bytes this rank hands to each collective, summed over steps: the whole send buffer of an
/// all-to-all or reduce-scatter (its own block included), its own block of an all-gather, the
/// buffer of an all-reduce. The planner predicts the same quantities (docs/plan.md).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ByteCounts {
    /// Ids and bag lengths (8 bytes each) to the shards' holders, and the counts exchanged first.
    pub input_a2a: u64,
    /// Pooled vectors of table- and column-wise shards.
    pub output_a2a: u64,
    /// Partial sums of row-wise tables (every rank sends G·D floats per row-wise table).
    pub output_reduce_scatter: u64,
    /// Table-row-wise, forward: partial sums to the table's holders, then summed vectors to
    /// their owners.
    pub output_trw_reduce: u64,
    pub output_trw_owners: u64,
    /// Pooled gradients back to table- and column-wise shards.
    pub grad_a2a: u64,
    /// Row-wise tables: this rank's gradient rows (all-gather).
    pub grad_all_gather: u64,
    /// Table-row-wise, backward: gradient rows to the serving holder, then among the holders.
    pub grad_trw_owners: u64,
    pub grad_trw_gather: u64,
    /// Column-wise shards with row-wise AdaGrad: Σg² per unique row and its counts (all-gather).
    pub grad_col_sq: u64,
    /// Dense gradients and the loss (all-reduce over all T ranks).
    pub dense_all_reduce: u64,
    pub sync_index: u64,
    pub sync_values: u64,
    /// Fully-sharded 2D: the reduce-scatter and all-gather of shard weights.
    pub fs_weights: u64,
    /// Largest number of embedding-weight bytes resident during the dense phase of a step.
    pub emb_weight_bytes_resident_dense: u64,
    /// Lookup work done on this rank's shards: Σ ids × shard columns, summed over steps.
    pub lookup_cost: u64,
}

impl ByteCounts {
    /// Every count divided by `k` (per step); the resident-weights maximum is kept.
    pub fn per(&self, k: u64) -> ByteCounts {
        let k = k.max(1);
        ByteCounts {
            input_a2a: self.input_a2a / k,
            output_a2a: self.output_a2a / k,
            output_reduce_scatter: self.output_reduce_scatter / k,
            output_trw_reduce: self.output_trw_reduce / k,
            output_trw_owners: self.output_trw_owners / k,
            grad_a2a: self.grad_a2a / k,
            grad_all_gather: self.grad_all_gather / k,
            grad_trw_owners: self.grad_trw_owners / k,
            grad_trw_gather: self.grad_trw_gather / k,
            grad_col_sq: self.grad_col_sq / k,
            dense_all_reduce: self.dense_all_reduce / k,
            sync_index: self.sync_index / k,
            sync_values: self.sync_values / k,
            fs_weights: self.fs_weights / k,
            emb_weight_bytes_resident_dense: self.emb_weight_bytes_resident_dense,
            lookup_cost: self.lookup_cost / k,
        }
    }

    /// Bytes of the sparse collectives (input, output and gradient distribution).
    pub fn sparse(&self) -> u64 {
        self.input_a2a
            + self.output_a2a
            + self.output_reduce_scatter
            + self.output_trw_reduce
            + self.output_trw_owners
            + self.grad_a2a
            + self.grad_all_gather
            + self.grad_trw_owners
            + self.grad_trw_gather
            + self.grad_col_sq
    }
}

/// One timed span of one rank (Chrome/Perfetto trace "X" event).
#[derive(Clone, Debug, Serialize)]
pub struct TraceEvent {
    pub name: &'static str,
    /// Microseconds since the rank started.
    pub ts: f64,
    pub dur: f64,
    pub rank: usize,
}

/// An input all-to-all started for the next batch during this step's dense work: in flight,
/// or received (waited for before the embedding backward, so that its send buffer is gone
/// when the backward's buffers are allocated).
struct InputInFlight {
    recv: Received,
    counts: Vec<usize>,
}

enum Received {
    InFlight(ember_transport::Request<Vec<u64>>),
    Done(Vec<u64>),
}

impl InputInFlight {
    /// Wait for the all-to-all (its send buffer is freed when it completes).
    fn complete(&mut self) -> Result<()> {
        if let Received::InFlight(_) = self.recv {
            let Received::InFlight(r) = std::mem::replace(&mut self.recv, Received::Done(Vec::new())) else { unreachable!() };
            self.recv = Received::Done(r.wait()?);
        }
        Ok(())
    }
    fn finish(mut self) -> Result<(Vec<u64>, Vec<usize>)> {
        self.complete()?;
        let Received::Done(v) = self.recv else { unreachable!("completed above") };
        Ok((v, self.counts))
    }
}

/// The forward state a step keeps for its backward pass.
struct Forward<B: Backend> {
    bags: Vec<Bags<B>>,
    ids: Vec<Vec<u64>>,
    dense_x: B::Buf,
}

/// The dense-gradient all-reduce of a step: in flight on the host transport, or (peer-to-peer
/// and native buffer transports) the flat gradient to reduce when the step needs it.
enum DenseReduce<B: Backend> {
    Host(ember_transport::Request<Vec<f32>>),
    Device(B::Buf),
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

/// One rank of a 2D grid.
pub struct Rank2D<B: Backend> {
    pub comms: GridComms,
    pub model: ModelConfig,
    pub plan: Plan,
    pub dense: DenseNet<B>,
    /// This rank's shards, in plan order, with their slot descriptions.
    pub slots: Vec<LocalSlot>,
    pub shards: Vec<Shard<B>>,
    pub touched: Vec<Touched>,
    pub emb_upd: EmbUpdate,
    pub dense_upd: DenseUpdate,
    pub global_batch: usize,
    pub opts: ParallelOptions,
    /// The resolved buffer transport of the sharding-group and world collectives.
    pub xfer: Xfer,
    pub steps_done: usize,
    pub times: StageTimes,
    pub bytes: ByteCounts,
    /// Every group rank's slots (for message layouts).
    peer_slots: Vec<Vec<LocalSlot>>,
    /// Row-wise tables, in table order.
    row_tables: Vec<usize>,
    /// Table-row-wise tables, in table order, with their holders and owners.
    trw: Vec<TrwTable>,
    /// Recorded stage spans when tracing.
    pub trace: Option<Vec<TraceEvent>>,
    epoch: Instant,
    /// Delayed state sync: the state average in flight.
    pending: Option<sync::PendingState>,
    /// The next batch's input all-to-all, started during this step's dense work.
    prefetch: Option<InputInFlight>,
    /// Fully-sharded 2D: this replica's averaged part of the concatenated shard weights, and
    /// the split of that concatenation over the replica group.
    fs_part: Option<(Vec<f32>, Vec<usize>)>,
}


impl<B: Backend> Rank2D<B> {
    /// Build this rank's part of the model. Weights are seeded by (table, global row), so every
    /// replica and every grid starts from the same model.
    pub fn new(be: &B, cfg: &TrainConfig, comms: GridComms, plan: Plan, opts: ParallelOptions) -> Result<Self> {
        cfg.validate()?;
        plan.validate(&cfg.model)?;
        let grid = comms.grid;
        if plan.n != grid.n {
            return Err(Error::Config(format!("plan is for {} ranks per sharding group, grid has {}", plan.n, grid.n)));
        }
        if cfg.batch_size % grid.world() != 0 {
            return Err(Error::Config(format!("global batch {} is not divisible by the {} ranks", cfg.batch_size, grid.world())));
        }
        opts.check(grid)?;
        let (_, r) = comms.coords();
        let emb_upd = EmbUpdate::new(&cfg.optim.embedding, &cfg.optim.weight_decay, default_momentum_c(grid.m, opts.fully_sharded));
        let l2 = match cfg.optim.weight_decay {
            WeightDecay::None => 0.0,
            WeightDecay::L2 { wd } => wd,
        };
        let slots = slots_of(&plan, r);
        let shards = slots
            .iter()
            .map(|s| {
                let t = &cfg.model.tables[s.table];
                new_shard(be, cfg.seed, ShardSpec { table: s.table, table_rows: t.rows, dim: t.dim, rows: s.rows.clone(), cols: s.cols.clone() }, &emb_upd)
            })
            .collect::<Result<Vec<_>>>()?;
        let touched = slots.iter().map(|s| Touched::new((s.rows.end - s.rows.start) as usize)).collect();
        let peer_slots = (0..plan.n).map(|p| slots_of(&plan, p)).collect();
        let row_tables = plan.tables.iter().filter(|t| t.kind == ShardingType::RowWise).map(|t| t.table).collect();
        let trw = trw_tables(&plan);
        let xfer = Xfer::resolve(opts.xfer, be, &comms.world)?;
        Ok(Rank2D {
            xfer,
            dense: DenseNet::new(be, &cfg.model, cfg.seed)?,
            model: cfg.model.clone(),
            comms,
            plan,
            slots,
            shards,
            touched,
            emb_upd,
            dense_upd: DenseUpdate { opt: cfg.optim.dense, l2 },
            global_batch: cfg.batch_size,
            opts,
            steps_done: 0,
            times: StageTimes::default(),
            bytes: ByteCounts::default(),
            peer_slots,
            row_tables,
            trw,
            trace: None,
            epoch: Instant::now(),
            pending: None,
            prefetch: None,
            fs_part: None,
        })
    }

    /// Position in `slots` of this rank's shard of `table` (row splits: at most one per rank).
    fn slot_of(&self, table: usize) -> usize {
        self.slots.iter().position(|s| s.table == table).expect("a shard of the table on this rank")
    }

    /// Close a stage that began at `t0`: milliseconds (added to the stage's total by the
    /// caller) and a trace span when tracing.
    fn stage(&mut self, name: &'static str, t0: Instant) -> f64 {
        let now = Instant::now();
        if let Some(tr) = self.trace.as_mut() {
            let ts = (t0 - self.epoch).as_secs_f64() * 1e6;
            tr.push(TraceEvent { name, ts, dur: (now - t0).as_secs_f64() * 1e6, rank: self.comms.world.rank() });
        }
        (now - t0).as_secs_f64() * 1e3
    }

    /// Steps 1–4a: distribute ids, look up, distribute pooled vectors, dense forward.
    /// Step 1 begun: the receive counts exchanged, the ids' all-to-all started.
    fn start_input(&mut self, batch: &Batch) -> Result<InputInFlight> {
        let (send, counts) = encode_input(&self.plan, &batch.sparse);
        self.bytes.input_a2a += (send.len() + counts.len()) as u64 * 8;
        // The peers' counts are checked against the allocation limit before the receive
        // buffer is allocated from them.
        let rcounts = self.comms.shard.all_to_all_counts::<u64>(&counts)?;
        Ok(InputInFlight { recv: Received::InFlight(self.comms.shard.start_all_to_all_v(send, counts, rcounts.clone())), counts: rcounts })
    }

    /// `prefetched`: take step 1's result from the previous step's prefetch of this batch.
    fn forward(&mut self, be: &B, batch: &Batch, fully_sharded: bool, prefetched: bool) -> Result<Forward<B>> {
        batch.validate(&self.model)?;
        let b = batch.size();
        if b * self.comms.grid.world() != self.global_batch {
            return Err(Error::Input(format!("local batch of {b} samples; expected {}", self.global_batch / self.comms.grid.world())));
        }
        let (n, d, f) = (self.plan.n, self.model.dim(), self.model.num_tables());
        let bg = n * b;
        // 1. Input distribution (already in flight when the previous step prefetched it).
        let t0 = Instant::now();
        let (recv, rcounts) = match (prefetched, self.prefetch.take()) {
            (true, Some(p)) => p.finish()?,
            _ => self.start_input(batch)?.finish()?,
        };
        let jag = decode_input(&recv, &rcounts, &self.slots, b)?;
        drop(recv);
        self.bytes.lookup_cost += jag.iter().zip(&self.slots).map(|(j, s)| (j.values.len() * s.cols.len()) as u64).sum::<u64>();
        self.times.input_dist += self.stage("input_dist", t0);
        // 2. Local lookup: sums over the group's N·b samples.
        let t0 = Instant::now();
        let bags = jag.iter().map(|j| upload_bags(be, j, Pooling::Sum)).collect::<Result<Vec<_>>>()?;
        let ids: Vec<Vec<u64>> = jag.into_iter().map(|j| j.values).collect();
        let mut outs = Vec::with_capacity(self.shards.len());
        for (s, bg_) in self.shards.iter().zip(&bags) {
            let cols = s.spec.num_cols();
            let mut out = be.zeros(bg * cols)?;
            be.embedding_forward(s, bg_, &mut out, Layout { stride: cols, col: 0 }, false)?;
            outs.push(Some(out));
        }
        if fully_sharded {
            self.fs_scatter(be)?;
        }
        self.times.lookup += self.stage("lookup", t0);
        // 3. Output distribution, straight into the dense network's input (b × (f+1)·d). Each
        // shard's output is freed as soon as it is packed for sending.
        let t0 = Instant::now();
        let stride = (f + 1) * d;
        let mut wide = be.zeros(b * stride)?;
        self.output_pooled(be, &mut outs, &mut wide, b)?;
        self.output_row_sums(be, &mut outs, &mut wide, b)?;
        self.output_table_row_wise(be, &mut outs, &mut wide, b)?;
        // Mean pooling, by the owner of the sample (it knows the whole bag's length).
        for (t, tc) in self.model.tables.iter().enumerate() {
            if tc.pooling == Pooling::Mean {
                let s: Vec<f32> = batch.sparse[t].lengths.iter().map(|&l| if l == 0 { 0.0 } else { 1.0 / l as f32 }).collect();
                be.scale_rows(&mut wide, (t + 1) * d, stride, b, d, &be.upload(&s)?)?;
            }
        }
        self.times.output_dist += self.stage("output_dist", t0);
        // 4a. Dense forward.
        let t0 = Instant::now();
        self.dense.ensure_batch(be, b)?;
        *self.dense.wide_mut() = wide;
        let dense_x = be.upload(&batch.dense)?;
        self.dense.forward_bottom(be, &dense_x)?;
        self.dense.forward_top(be)?;
        self.times.dense += self.stage("dense", t0);
        Ok(Forward { bags, ids, dense_x })
    }

    /// Step 3a: table- and column-wise shards, an all-to-all of each peer's b rows.
    fn output_pooled(&mut self, be: &B, outs: &mut [Option<B::Buf>], wide: &mut B::Buf, b: usize) -> Result<()> {
        let (n, d) = (self.plan.n, self.model.dim());
        let stride = be.len(wide) / b.max(1);
        let per: usize = self.slots.iter().filter(|s| !s.kind.splits_rows()).map(|s| b * s.cols.len()).sum();
        let mut send = be.zeros(per * n)?;
        let mut pos = 0;
        for p in 0..n {
            for (slot, out) in self.slots.iter().zip(outs.iter()).filter(|(s, _)| !s.kind.splits_rows()) {
                let len = b * slot.cols.len();
                be.copy_2d(out.as_ref().expect("output not yet sent"), p * len, len, &mut send, pos, len, 1, len)?;
                pos += len;
            }
        }
        for (slot, out) in self.slots.iter().zip(outs.iter_mut()) {
            if !slot.kind.splits_rows() {
                *out = None;
            }
        }
        let rcounts: Vec<usize> =
            self.peer_slots.iter().map(|ps| ps.iter().filter(|s| !s.kind.splits_rows()).map(|s| b * s.cols.len()).sum()).collect();
        let mut recv = be.zeros(rcounts.iter().sum())?;
        self.bytes.output_a2a += (per * n) as u64 * 4;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &vec![per; n], &mut recv, &rcounts)?;
        drop(send);
        let mut pos = 0;
        for ps in &self.peer_slots {
            for s in ps.iter().filter(|s| !s.kind.splits_rows()) {
                let cols = s.cols.len();
                be.copy_2d(&recv, pos, cols, wide, (s.table + 1) * d + s.cols.start, stride, b, cols)?;
                pos += b * cols;
            }
        }
        Ok(())
    }

    /// Step 3b: row-wise tables, a reduce-scatter of partial sums over the whole group,
    /// [peer][table][b × d] (a rank without a shard of a table sends zeros for it).
    fn output_row_sums(&mut self, be: &B, outs: &mut [Option<B::Buf>], wide: &mut B::Buf, b: usize) -> Result<()> {
        if self.row_tables.is_empty() {
            return Ok(());
        }
        let (n, d) = (self.plan.n, self.model.dim());
        let stride = be.len(wide) / b.max(1);
        let rt = self.row_tables.len();
        let mut send = be.zeros(n * rt * b * d)?;
        for (slot, out) in self.slots.iter().zip(outs.iter_mut()).filter(|(s, _)| s.kind == ShardingType::RowWise) {
            let k = self.row_tables.iter().position(|&t| t == slot.table).expect("row table listed");
            let out = out.take().expect("output not yet sent");
            for p in 0..n {
                be.copy_2d(&out, p * b * d, b * d, &mut send, (p * rt + k) * b * d, b * d, 1, b * d)?;
            }
        }
        let mut mine = be.zeros(rt * b * d)?;
        self.bytes.output_reduce_scatter += (n * rt * b * d) as u64 * 4;
        self.xfer.reduce_scatter_sum(be, &self.comms.shard, &send, &mut mine)?;
        drop(send);
        for (k, &t) in self.row_tables.iter().enumerate() {
            be.copy_2d(&mine, k * b * d, d, wide, (t + 1) * d, stride, b, d)?;
        }
        Ok(())
    }

    /// Step 3c: table-row-wise tables (`crate::plan::trw`): partial sums reduced among each
    /// table's holders, then each holder's summed vectors to the owners it serves.
    fn output_table_row_wise(&mut self, be: &B, outs: &mut [Option<B::Buf>], wide: &mut B::Buf, b: usize) -> Result<()> {
        if self.trw.is_empty() {
            return Ok(());
        }
        let (n, d) = (self.plan.n, self.model.dim());
        let stride = be.len(wide) / b.max(1);
        let me = self.comms.shard.rank();
        let c = TrwCounts::new(&self.trw, n, me, b, d);
        // i) Partial sums for the owners holder h serves, to h: [peer][table][owners × b × d].
        let mut send = be.zeros(c.reduce_send.iter().sum())?;
        let mut pos = 0;
        for h in 0..n {
            for t in self.trw.iter().filter(|t| t.holder_index(me).is_some()) {
                let Some(j) = t.holder_index(h) else { continue };
                let out = outs[self.slot_of(t.table)].as_ref().expect("output not yet sent");
                let len = t.owners[j].len() * b * d;
                be.copy_2d(out, t.owners[j].start * b * d, len, &mut send, pos, len, 1, len)?;
                pos += len;
            }
        }
        for t in &self.trw {
            if t.holder_index(me).is_some() {
                outs[self.slot_of(t.table)] = None;
            }
        }
        let mut recv = be.zeros(c.reduce_recv.iter().sum())?;
        self.bytes.output_trw_reduce += pos as u64 * 4;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &c.reduce_send, &mut recv, &c.reduce_recv)?;
        drop(send);
        // Sum the holders' blocks in holder order: [table][owners × b × d] for my tables.
        let mine: Vec<&TrwTable> = self.trw.iter().filter(|t| t.holder_index(me).is_some()).collect();
        let sizes: Vec<usize> = mine.iter().map(|t| t.served_by(me).len() * b * d).collect();
        let mut sums: Vec<B::Buf> = sizes.iter().map(|&s| be.zeros(s)).collect::<Result<_>>()?;
        let mut pos = 0;
        for h in 0..n {
            for (k, t) in mine.iter().enumerate() {
                if t.holder_index(h).is_none() {
                    continue;
                }
                let len = sizes[k];
                if h == t.holders[0] {
                    be.copy_2d(&recv, pos, len, &mut sums[k], 0, len, 1, len)?;
                } else {
                    let mut part = be.zeros(len)?;
                    be.copy_2d(&recv, pos, len, &mut part, 0, len, 1, len)?;
                    be.axpy(1.0, &part, &mut sums[k])?;
                }
                pos += len;
            }
        }
        drop(recv);
        // ii) Each owner's b summed rows to it: [peer][table][b × d].
        let mut send = be.zeros(c.owners_send.iter().sum())?;
        let mut pos = 0;
        for o in 0..n {
            for (k, t) in mine.iter().enumerate() {
                let served = t.served_by(me);
                if served.contains(&o) {
                    be.copy_2d(&sums[k], (o - served.start) * b * d, b * d, &mut send, pos, b * d, 1, b * d)?;
                    pos += b * d;
                }
            }
        }
        drop(sums);
        let mut recv = be.zeros(c.owners_recv.iter().sum())?;
        self.bytes.output_trw_owners += pos as u64 * 4;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &c.owners_send, &mut recv, &c.owners_recv)?;
        drop(send);
        let mut pos = 0;
        for h in 0..n {
            for t in self.trw.iter().filter(|t| t.holders[t.server_of(me)] == h) {
                be.copy_2d(&recv, pos, d, wide, (t.table + 1) * d, stride, b, d)?;
                pos += b * d;
            }
        }
        Ok(())
    }

    /// One training step on this rank's `b = B/T` samples. Returns the global mean loss.
    pub fn train_step(&mut self, be: &B, batch: &Batch) -> Result<f64> {
        self.train_step_prefetch(be, batch, None)
    }

    /// A training step that also starts the input distribution of `next` (the following step's
    /// local batch) so that its all-to-all overlaps this step's dense work. The following call
    /// must then be for `next`.
    pub fn train_step_prefetch(&mut self, be: &B, batch: &Batch, next: Option<&Batch>) -> Result<f64> {
        let fs = self.opts.fully_sharded && self.comms.grid.m > 1;
        let prefetched = self.prefetch.is_some();
        let fwd = self.forward(be, batch, fs, prefetched)?;
        if let Some(nb) = next {
            nb.validate(&self.model)?;
            let t0 = Instant::now();
            self.prefetch = Some(self.start_input(nb)?);
            self.times.input_dist += self.stage("input_dist (next batch, started)", t0);
        }
        let resident: usize = self.shards.iter().map(|s| be.len(&s.weights) * 4).sum::<usize>() + self.fs_part.as_ref().map_or(0, |p| p.0.len() * 4);
        self.bytes.emb_weight_bytes_resident_dense = self.bytes.emb_weight_bytes_resident_dense.max(resident as u64);
        let (n, d, f, m) = (self.plan.n, self.model.dim(), self.model.num_tables(), self.comms.grid.m);
        let b = batch.size();
        let stride = (f + 1) * d;
        // 4b. Dense backward; dense gradients summed over all T ranks, started now.
        let t0 = Instant::now();
        let loss = self.dense.backward(be, &fwd.dense_x, &batch.labels, 1.0 / self.global_batch as f32)?;
        let total: usize = self.dense.params_mut().iter().map(|p| be.len(&p.g)).sum();
        let mut grads = be.zeros(total)?;
        let mut pos = 0;
        for p in self.dense.params_mut() {
            let len = be.len(&p.g);
            be.copy_2d(&p.g, 0, len, &mut grads, pos, len, 1, len)?;
            pos += len;
        }
        self.bytes.dense_all_reduce += total as u64 * 4;
        let dense_req = match self.xfer {
            Xfer::Host { .. } => {
                let host = be.download(&grads)?;
                drop(grads);
                DenseReduce::<B>::Host(self.comms.world.start_all_reduce(host, ReduceOp::Sum))
            }
            Xfer::Peers | Xfer::Native | Xfer::Direct => DenseReduce::Device(grads),
        };
        let ar_start = Instant::now();
        self.times.dense += self.stage("dense", t0);
        // 5. Embedding backward: pooled gradients back to the shards, fused update. The next
        // batch's ids (their all-to-all overlapped the dense work) are received first.
        let t0 = Instant::now();
        if let Some(p) = self.prefetch.as_mut() {
            p.complete()?;
        }
        // Per-table gradient blocks (b × d): × M (the group applies M/B · Σ), × 1/len for mean.
        let dwide = self.dense.dwide();
        let mut scaled = Vec::with_capacity(f);
        for t in 0..f {
            let mean = self.model.tables[t].pooling == Pooling::Mean;
            let s: Vec<f32> =
                batch.sparse[t].lengths.iter().map(|&l| m as f32 * if mean { if l == 0 { 0.0 } else { 1.0 / l as f32 } } else { 1.0 }).collect();
            let mut g = be.zeros(b * d)?;
            be.copy_2d(dwide, (t + 1) * d, stride, &mut g, 0, d, b, d)?;
            be.scale_rows(&mut g, 0, d, b, d, &be.upload(&s)?)?;
            scaled.push(g);
        }
        let mut gmats: Vec<B::Buf> = self.slots.iter().map(|s| be.zeros(n * b * s.cols.len())).collect::<Result<_>>()?;
        self.grad_pooled(be, &scaled, &mut gmats, b)?;
        self.grad_row_sums(be, &scaled, &mut gmats, b)?;
        self.grad_table_row_wise(be, &scaled, &mut gmats, b)?;
        drop(scaled);
        if fs {
            self.fs_gather(be)?;
        }
        self.apply_embedding_grads(be, &fwd, gmats)?;
        drop(fwd);
        self.times.backward += self.stage("backward", t0);
        // 7. Dense optimizer step. It runs before the replica sync: the order changes nothing
        // in the result, and the dense all-reduce's buffers are gone when the sync allocates.
        let t0 = Instant::now();
        let summed = match dense_req {
            DenseReduce::Host(r) => be.upload(&r.wait()?)?,
            DenseReduce::Device(mut g) => {
                self.xfer.all_reduce_sum(be, &self.comms.world, &mut g)?;
                g
            }
        };
        self.stage("dense_all_reduce (overlapped)", ar_start);
        let mut pos = 0;
        for p in self.dense.params_mut() {
            let len = be.len(&p.g);
            be.copy_2d(&summed, pos, len, &mut p.g, 0, len, 1, len)?;
            pos += len;
        }
        drop(summed);
        self.dense.update(be, &self.dense_upd)?;
        let mut l = [loss];
        self.bytes.dense_all_reduce += 8;
        self.comms.world.all_reduce(&mut l, ReduceOp::Sum)?;
        self.times.dense += self.stage("dense", t0);
        // 6. Replica sync every K steps.
        self.steps_done += 1;
        if !fs && self.steps_done % self.opts.sync_every == 0 {
            self.sync(be)?;
        }
        let mean = l[0] / self.global_batch as f64;
        if !mean.is_finite() {
            return Err(Error::Numeric(format!("training loss is {mean}: diverged (lower the learning rate)")));
        }
        Ok(mean)
    }

    /// Step 5a: table- and column-wise shards, the reverse all-to-all of the pooled gradients.
    fn grad_pooled(&mut self, be: &B, scaled: &[B::Buf], gmats: &mut [B::Buf], b: usize) -> Result<()> {
        let (n, d) = (self.plan.n, self.model.dim());
        let scounts: Vec<usize> =
            self.peer_slots.iter().map(|ps| ps.iter().filter(|s| !s.kind.splits_rows()).map(|s| b * s.cols.len()).sum()).collect();
        let mut send = be.zeros(scounts.iter().sum())?;
        let mut pos = 0;
        for ps in &self.peer_slots {
            for s in ps.iter().filter(|s| !s.kind.splits_rows()) {
                let cols = s.cols.len();
                be.copy_2d(&scaled[s.table], s.cols.start, d, &mut send, pos, cols, b, cols)?;
                pos += b * cols;
            }
        }
        let per: usize = self.slots.iter().filter(|s| !s.kind.splits_rows()).map(|s| b * s.cols.len()).sum();
        let mut recv = be.zeros(per * n)?;
        self.bytes.grad_a2a += pos as u64 * 4;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &scounts, &mut recv, &vec![per; n])?;
        drop(send);
        let mut pos = 0;
        for p in 0..n {
            for (s, g) in self.slots.iter().zip(gmats.iter_mut()).filter(|(s, _)| !s.kind.splits_rows()) {
                let len = b * s.cols.len();
                be.copy_2d(&recv, pos, len, g, p * len, len, 1, len)?;
                pos += len;
            }
        }
        Ok(())
    }

    /// Step 5b: row-wise tables, an all-gather of every rank's [table][b × d] blocks.
    fn grad_row_sums(&mut self, be: &B, scaled: &[B::Buf], gmats: &mut [B::Buf], b: usize) -> Result<()> {
        if self.row_tables.is_empty() {
            return Ok(());
        }
        let (n, d) = (self.plan.n, self.model.dim());
        let rt = self.row_tables.len();
        let mut mine = be.zeros(rt * b * d)?;
        for (k, &t) in self.row_tables.iter().enumerate() {
            be.copy_2d(&scaled[t], 0, b * d, &mut mine, k * b * d, b * d, 1, b * d)?;
        }
        let mut all = be.zeros(n * rt * b * d)?;
        self.bytes.grad_all_gather += (rt * b * d) as u64 * 4;
        self.xfer.all_gather(be, &self.comms.shard, &mine, &mut all)?;
        drop(mine);
        for (s, g) in self.slots.iter().zip(gmats.iter_mut()).filter(|(s, _)| s.kind == ShardingType::RowWise) {
            let k = self.row_tables.iter().position(|&t| t == s.table).expect("row table listed");
            for p in 0..n {
                be.copy_2d(&all, (p * rt + k) * b * d, b * d, g, p * b * d, b * d, 1, b * d)?;
            }
        }
        Ok(())
    }

    /// Step 5c: table-row-wise tables, the forward in reverse: every owner's b gradient rows to
    /// the holder serving it, then the holders swap these blocks so each has all G samples'.
    fn grad_table_row_wise(&mut self, be: &B, scaled: &[B::Buf], gmats: &mut [B::Buf], b: usize) -> Result<()> {
        if self.trw.is_empty() {
            return Ok(());
        }
        let (n, d) = (self.plan.n, self.model.dim());
        let me = self.comms.shard.rank();
        let c = TrwCounts::new(&self.trw, n, me, b, d);
        // i) My b rows of each table to the holder serving me: [peer][table][b × d].
        let mut send = be.zeros(c.owners_recv.iter().sum())?;
        let mut pos = 0;
        for h in 0..n {
            for t in self.trw.iter().filter(|t| t.holders[t.server_of(me)] == h) {
                be.copy_2d(&scaled[t.table], 0, b * d, &mut send, pos, b * d, 1, b * d)?;
                pos += b * d;
            }
        }
        let mut recv = be.zeros(c.owners_send.iter().sum())?;
        self.bytes.grad_trw_owners += pos as u64 * 4;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &c.owners_recv, &mut recv, &c.owners_send)?;
        drop(send);
        // ii) The rows of the owners I serve, to every holder of the table (me included):
        // [peer][table][owners × b × d]; received blocks land at their owners' rows.
        let mine: Vec<&TrwTable> = self.trw.iter().filter(|t| t.holder_index(me).is_some()).collect();
        let mut at: Vec<Vec<usize>> = mine.iter().map(|t| vec![0; t.served_by(me).len()]).collect();
        let mut pos = 0;
        for o in 0..n {
            for (k, t) in mine.iter().enumerate() {
                let served = t.served_by(me);
                if served.contains(&o) {
                    at[k][o - served.start] = pos;
                    pos += b * d;
                }
            }
        }
        let mut send = be.zeros(c.reduce_recv.iter().sum())?;
        let mut pos = 0;
        for h in 0..n {
            for (k, t) in mine.iter().enumerate() {
                if t.holder_index(h).is_some() {
                    for &src in &at[k] {
                        be.copy_2d(&recv, src, b * d, &mut send, pos, b * d, 1, b * d)?;
                        pos += b * d;
                    }
                }
            }
        }
        drop(recv);
        let mut all = be.zeros(c.reduce_send.iter().sum())?;
        self.bytes.grad_trw_gather += pos as u64 * 4;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &c.reduce_recv, &mut all, &c.reduce_send)?;
        drop(send);
        let mut pos = 0;
        for h in 0..n {
            for t in &mine {
                let Some(j) = t.holder_index(h) else { continue };
                let len = t.owners[j].len() * b * d;
                be.copy_2d(&all, pos, len, &mut gmats[self.slot_of(t.table)], t.owners[j].start * b * d, len, 1, len)?;
                pos += len;
            }
        }
        Ok(())
    }

    /// The fused update on every local shard; column-wise shards with row-wise AdaGrad first
    /// combine their partial Σg² so the whole row's accumulator is used.
    fn apply_embedding_grads(&mut self, be: &B, fwd: &Forward<B>, gmats: Vec<B::Buf>) -> Result<()> {
        let combine = self.emb_upd.kind == EmbKind::RowWiseAdagrad && self.plan.tables.iter().any(|t| t.kind == ShardingType::ColumnWise);
        let mut partial = Vec::new();
        for (i, grad) in gmats.into_iter().enumerate() {
            let cols = self.slots[i].cols.len();
            let layout = Layout { stride: cols, col: 0 };
            if combine && self.slots[i].kind == ShardingType::ColumnWise {
                partial.push((i, be.embedding_row_grads(&self.shards[i], &fwd.bags[i], &grad, layout, &self.emb_upd)?));
            } else {
                be.embedding_backward_update(&mut self.shards[i], &fwd.bags[i], &grad, layout, &self.emb_upd)?;
            }
            self.touched[i].mark(&fwd.ids[i]);
        }
        if !combine {
            return Ok(());
        }
        // Σg² of each unique row, per column shard, gathered over the group; the shards of one
        // table see the same ids, hence the same unique rows in the same order.
        let mut mine = Vec::new();
        for (_, rg) in &partial {
            mine.extend(be.download(&rg.sq)?);
        }
        let my_counts: Vec<u64> = partial.iter().map(|(_, rg)| rg.num_rows as u64).collect();
        self.bytes.grad_col_sq += my_counts.len() as u64 * 8 + mine.len() as u64 * 4;
        let (ucounts, ucc) = self.comms.shard.all_gather_alloc(&my_counts)?;
        let (all, counts) = self.comms.shard.all_gather_alloc(&mine)?;
        // For each group rank: (table, offset, length) of its column-shard blocks.
        let mut blocks: Vec<Vec<(usize, usize, usize)>> = Vec::with_capacity(counts.len());
        let (mut upos, mut vpos) = (0usize, 0usize);
        for (p, (&uc, &vc)) in ucc.iter().zip(&counts).enumerate() {
            let tables: Vec<usize> = self.peer_slots[p].iter().filter(|s| s.kind == ShardingType::ColumnWise).map(|s| s.table).collect();
            if tables.len() != uc {
                return Err(Error::Transport(format!("group rank {p} sent {uc} column-shard counts, its plan has {}", tables.len())));
            }
            let mut off = vpos;
            let mut v = Vec::new();
            for (k, &t) in tables.iter().enumerate() {
                let len = ucounts[upos + k] as usize;
                v.push((t, off, len));
                off += len;
            }
            if off != vpos + vc {
                return Err(Error::Transport(format!("group rank {p}: column-shard sums of {vc} floats, counts say {}", off - vpos)));
            }
            blocks.push(v);
            upos += uc;
            vpos += vc;
        }
        for (i, rg) in &partial {
            let table = self.slots[*i].table;
            let tp = &self.plan.tables[table];
            let mut total = vec![0.0f32; rg.num_rows];
            for sh in &tp.shards {
                let &(_, off, len) = blocks[sh.rank].iter().find(|b| b.0 == table).expect("column shard listed");
                if len != rg.num_rows {
                    return Err(Error::Transport(format!(
                        "column shards of table {table} disagree on unique rows: {len} on group rank {} vs {} here",
                        sh.rank, rg.num_rows
                    )));
                }
                total.iter_mut().zip(&all[off..off + len]).for_each(|(a, &x)| *a += x);
            }
            let total = be.upload(&total)?;
            be.embedding_apply(&mut self.shards[*i], rg, Some(&total), &self.emb_upd)?;
        }
        Ok(())
    }

    /// Step 6: replica sync (also callable at the end of training).
    pub fn sync(&mut self, be: &B) -> Result<()> {
        let t0 = Instant::now();
        let delayed = if self.opts.delayed_state_sync { Some(&mut self.pending) } else { None };
        let s = sync::replica_sync(be, &self.comms.replica, &mut self.shards, &mut self.touched, self.opts.sync, delayed, self.xfer)?;
        self.bytes.sync_index += s.index_bytes;
        self.bytes.sync_values += s.value_bytes;
        self.times.sync += self.stage("sync", t0);
        Ok(())
    }

    /// Fully-sharded 2D, after the lookup: reduce-scatter (mean) the concatenated shard weights
    /// over the replica group and keep only this replica's part resident.
    fn fs_scatter(&mut self, be: &B) -> Result<()> {
        let mut flat = Vec::new();
        for s in &mut self.shards {
            flat.extend(be.download(&s.weights)?);
            s.weights = be.zeros(0)?;
        }
        let counts = ember_transport::split_evenly(flat.len(), self.comms.grid.m);
        let mut part = vec![0.0f32; counts[self.comms.replica.rank()]];
        self.bytes.fs_weights += flat.len() as u64 * 4;
        self.comms.replica.reduce_scatter_v(&flat, &counts, &mut part, ReduceOp::Mean)?;
        self.fs_part = Some((part, counts));
        Ok(())
    }

    /// Fully-sharded 2D, before the embedding backward: all-gather the averaged weights.
    fn fs_gather(&mut self, be: &B) -> Result<()> {
        let (part, counts) = self.fs_part.take().ok_or_else(|| Error::Config("fully-sharded gather without a scatter".into()))?;
        let mut flat = vec![0.0f32; counts.iter().sum()];
        self.bytes.fs_weights += part.len() as u64 * 4;
        self.comms.replica.all_gather_v(&part, &mut flat, &counts)?;
        let mut pos = 0;
        for s in &mut self.shards {
            let n = s.spec.num_rows() * s.spec.num_cols();
            s.weights = be.upload(&flat[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    /// Every shard's weights averaged over the replica group (f64 mean in replica order, rounded
    /// once), as host vectors; the rank is not changed. Collective over the replica group.
    pub fn averaged_weights(&self, be: &B) -> Result<Vec<Vec<f32>>> {
        let mut own = Vec::with_capacity(self.shards.len());
        for s in &self.shards {
            own.push(be.download(&s.weights)?);
        }
        if self.comms.grid.m == 1 {
            return Ok(own);
        }
        let mut flat: Vec<f64> = own.iter().flatten().map(|&x| x as f64).collect();
        self.comms.replica.all_reduce(&mut flat, ReduceOp::Mean)?;
        let mut pos = 0;
        for w in own.iter_mut() {
            for (x, &v) in w.iter_mut().zip(&flat[pos..]) {
                *x = v as f32;
            }
            pos += w.len();
        }
        Ok(own)
    }

    /// Run `f` with every shard's weights replaced by their replica-group average, then put this
    /// replica's own weights back: an evaluation between syncs, or in fully-sharded 2D, sees one
    /// model and leaves training unchanged. Collective over the replica group.
    pub fn with_averaged_weights<R>(&mut self, be: &B, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        if self.comms.grid.m == 1 {
            return f(self);
        }
        let avg = self.averaged_weights(be)?;
        let mut own = Vec::with_capacity(avg.len());
        for (s, w) in self.shards.iter_mut().zip(&avg) {
            let up = be.upload(w)?;
            own.push(std::mem::replace(&mut s.weights, up));
        }
        let r = f(self);
        for (s, w) in self.shards.iter_mut().zip(own) {
            s.weights = w;
        }
        r
    }

    /// Average the weights over the replica group now (fully-sharded 2D keeps replicas apart
    /// between steps; evaluation and checkpoints use the average).
    pub fn average_weights(&mut self, be: &B) -> Result<()> {
        if self.comms.grid.m > 1 {
            self.fs_scatter(be)?;
            self.fs_gather(be)?;
        }
        Ok(())
    }

    /// Finish any delayed state average still in flight (at the end of training).
    pub fn finish_pending(&mut self, be: &B) -> Result<()> {
        if let Some(p) = self.pending.take() {
            sync::apply_pending(be, &mut self.shards, p)?;
        }
        Ok(())
    }

    /// The delayed state average in flight, if any (a checkpoint records it without applying it).
    pub fn pending_mut(&mut self) -> Option<&mut sync::PendingState> {
        self.pending.as_mut()
    }

    /// Replace the delayed state average in flight (a checkpoint restoring one, or None).
    pub fn set_pending(&mut self, p: Option<sync::PendingState>) {
        self.pending = p;
    }

    /// End training with one model on every replica: a last replica sync when the run stopped
    /// between syncs (steps % K ≠ 0), the delayed state average applied, fully-sharded weights
    /// averaged. Evaluation, export and the C ABI then see the same model on every replica.
    pub fn finish_training(&mut self, be: &B) -> Result<()> {
        let fs = self.opts.fully_sharded && self.comms.grid.m > 1;
        if !fs && self.steps_done % self.opts.sync_every != 0 {
            self.sync(be)?;
        }
        self.finish_pending(be)?;
        if fs {
            self.average_weights(be)?;
        }
        Ok(())
    }

    /// Whether every shard holds bitwise the same values on every replica of its replica group
    /// (a CRC-32 of each shard's weights and, except in fully-sharded 2D where each replica keeps
    /// its own optimizer state, its state, compared over the replica group, then over the world).
    /// Collective.
    pub fn replicas_identical(&self, be: &B) -> Result<bool> {
        let with_state = !self.opts.fully_sharded || self.comms.grid.m == 1;
        let mut mine = Vec::with_capacity(self.shards.len());
        for s in &self.shards {
            let mut h = crc32fast::Hasher::new();
            h.update(bytemuck::cast_slice(&be.download(&s.weights)?));
            if with_state {
                h.update(bytemuck::cast_slice(&be.download(&s.state)?));
            }
            mine.push(h.finalize());
        }
        let mut all = vec![0u32; mine.len() * self.comms.replica.size()];
        self.comms.replica.all_gather(&mine, &mut all)?;
        let same = all.chunks(mine.len().max(1)).all(|c| mine.is_empty() || c == &mine[..]);
        let mut flags = vec![0u32; self.comms.world.size()];
        self.comms.world.all_gather(&[u32::from(same)], &mut flags)?;
        Ok(flags.iter().all(|&f| f == 1))
    }

    /// Logits of this rank's samples (forward only).
    pub fn predict(&mut self, be: &B, batch: &Batch) -> Result<Vec<f32>> {
        if self.prefetch.is_some() {
            return Err(Error::Input("predict while a prefetched training batch is in flight".into()));
        }
        self.forward(be, batch, false, false)?;
        let mut l = be.download(self.dense.logits())?;
        l.truncate(batch.size());
        Ok(l)
    }
}
