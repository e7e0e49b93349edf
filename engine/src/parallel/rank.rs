//! One rank of a 2D grid (`Rank2D`): its part of the model, and the training step as the
//! brief's seven stages, one named call each, top to bottom. The stages themselves live in
//! `forward` (1–3 and the dense forward), `backward` (4, 5 and 7) and `replicas` (6).
use super::layout::StepLayout;
use super::meter::{ByteCounts, Meter, Stage, StageTimes, TraceEvent};
use super::route::{slots_of, LocalSlot, Touched};
use super::sync::PendingState;
use super::xfer::Xfer;
use super::{default_momentum_c, ParallelOptions};
use crate::backend::{Backend, Bags, DenseUpdate, EmbUpdate, Shard, ShardSpec};
use crate::config::{ModelConfig, TrainConfig, WeightDecay};
use crate::data::Batch;
use crate::dense::{DenseNet, Param};
use crate::embedding::new_shard;
use crate::grid::{Grid, GridComms};
use crate::plan::Plan;
use crate::{Error, Result};
use ember_transport::Comm;
use std::time::Instant;

/// One rank of a 2D grid.
pub struct Rank2D<B: Backend> {
    pub(super) comms: GridComms,
    pub(super) model: ModelConfig,
    pub(super) plan: Plan,
    pub(super) dense: DenseNet<B>,
    /// This rank's shards, in plan order, with their slot descriptions.
    pub(super) slots: Vec<LocalSlot>,
    pub(super) shards: Vec<Shard<B>>,
    /// Rows of each shard touched since the last replica sync.
    pub(super) touched: Vec<Touched>,
    pub(super) emb_upd: EmbUpdate,
    pub(super) dense_upd: DenseUpdate,
    pub(super) global_batch: usize,
    pub(super) opts: ParallelOptions,
    /// The resolved buffer transport of the sharding-group and world collectives.
    pub(super) xfer: Xfer,
    /// Whether a training step's replica sync runs beside its dense update (resolved once).
    pub(super) overlap_sync: bool,
    pub(super) steps_done: usize,
    /// Every exchange's message layout, computed for this rank and its b samples.
    pub(super) layout: StepLayout,
    pub(super) meter: Meter,
    /// Delayed state sync: the state average in flight.
    pub(super) pending: Option<PendingState>,
    /// The next batch's input all-to-all, started during this step's dense work.
    pub(super) prefetch: Option<super::route::InputInFlight>,
    /// Fully-sharded 2D: this replica's averaged part of the concatenated shard weights, and
    /// the split of that concatenation over the replica group.
    pub(super) fs_part: Option<(Vec<f32>, Vec<usize>)>,
}

/// The forward state a step keeps for its backward pass.
pub(super) struct Forward<B: Backend> {
    pub(super) bags: Vec<Bags<B>>,
    pub(super) ids: Vec<Vec<u64>>,
    pub(super) dense_x: B::Buf,
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
        let mut dense = DenseNet::new(be, &cfg.model, cfg.seed)?;
        let mut layout = StepLayout::new(&plan, r, cfg.batch_size / grid.world(), cfg.model.dim());
        // The dense gradients and the loss, all-reduced every step.
        let dense_floats: usize = dense.params_mut().iter().map(|p| be.len(&p.g)).sum();
        layout.backward_bytes.dense_all_reduce = dense_floats as u64 * 4 + 8;
        let xfer = Xfer::resolve(opts.xfer, be, &comms.world)?;
        let overlap_sync = sync_overlaps(&opts, &comms, xfer);
        Ok(Rank2D {
            xfer,
            overlap_sync,
            dense,
            model: cfg.model.clone(),
            meter: Meter::new(comms.world.rank()),
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
            layout,
            pending: None,
            prefetch: None,
            fs_part: None,
        })
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
        // 1–3 and the dense forward.
        let fwd = self.forward(be, batch, fs)?;
        if let Some(nb) = next {
            nb.validate(&self.model)?;
            self.prefetch = Some(self.span_as("input_dist (next batch, started)", Some(Stage::InputDist), |r| r.start_input(nb))?);
        }
        self.note_resident_weights(be);
        // 4. Dense backward; the dense gradients' all-reduce over all T ranks started.
        let (loss, grads) = self.span(Stage::Dense, |r| r.dense_backward(be, batch, &fwd.dense_x))?;
        // 5. Embedding backward: pooled gradients back to the shards, fused update.
        self.span(Stage::Backward, |r| r.embedding_backward(be, batch, fwd, fs))?;
        // 6. Replica sync every K steps, started as soon as the shard weights are final for the
        // step, in flight beside 7. the dense optimizer step (which needs none of the shards;
        // the order changes nothing in the result).
        self.steps_done += 1;
        let sync_now = !fs && self.steps_done % self.opts.sync_every == 0;
        let loss = if sync_now && self.overlap_sync {
            self.dense_update_beside_sync(be, grads, loss)?
        } else {
            let loss = self.span(Stage::Dense, |r| r.dense_update(be, grads, loss))?;
            if sync_now {
                self.sync(be)?;
            }
            loss
        };
        self.meter.bytes.traffic.add(&self.layout.backward_bytes);
        let mean = loss / self.global_batch as f64;
        if !mean.is_finite() {
            return Err(Error::Numeric(format!("training loss is {mean}: diverged (lower the learning rate)")));
        }
        Ok(mean)
    }

    /// Stages 1–3 and the dense forward: ids to the shards' holders, local lookup, pooled
    /// vectors back to the samples' owners, the dense network's forward. `fully_sharded`:
    /// reduce-scatter the shard weights after the lookup.
    fn forward(&mut self, be: &B, batch: &Batch, fully_sharded: bool) -> Result<Forward<B>> {
        batch.validate(&self.model)?;
        let b = batch.size();
        if b * self.comms.grid.world() != self.global_batch {
            return Err(Error::Input(format!("local batch of {b} samples; expected {}", self.global_batch / self.comms.grid.world())));
        }
        // 1. Input distribution (in flight already when the previous step prefetched it).
        let ids = self.span(Stage::InputDist, |r| r.input_distribution(batch))?;
        self.meter.bytes.lookup_cost += ids.iter().zip(&self.slots).map(|(j, s)| (j.values.len() * s.cols.len()) as u64).sum::<u64>();
        // 2. Local lookup: sums over the group's N·b samples.
        let (bags, ids, pooled) = self.span(Stage::Lookup, |r| r.lookup(be, ids, fully_sharded))?;
        // 3. Output distribution, straight into the dense network's input.
        let wide = self.span(Stage::OutputDist, |r| r.output_distribution(be, batch, pooled))?;
        self.meter.bytes.traffic.add(&self.layout.forward_bytes);
        // 4, first half. Dense forward.
        let dense_x = self.span(Stage::Dense, |r| r.dense_forward(be, batch, wide))?;
        Ok(Forward { bags, ids, dense_x })
    }

    /// Logits of this rank's samples (forward only).
    pub fn predict(&mut self, be: &B, batch: &Batch) -> Result<Vec<f32>> {
        if self.prefetch.is_some() {
            return Err(Error::Input("predict while a prefetched training batch is in flight".into()));
        }
        self.forward(be, batch, false)?;
        let mut l = be.download(self.dense.logits())?;
        l.truncate(batch.size());
        Ok(l)
    }

    /// Run `f` as a span of `stage`: its time goes to the stage's total and, when tracing, to
    /// the trace.
    pub(super) fn span<R>(&mut self, stage: Stage, f: impl FnOnce(&mut Self) -> R) -> R {
        self.span_as(stage.name(), Some(stage), f)
    }

    /// [`Self::span`] under another name (None: traced only).
    pub(super) fn span_as<R>(&mut self, name: &'static str, stage: Option<Stage>, f: impl FnOnce(&mut Self) -> R) -> R {
        let t0 = Instant::now();
        let r = f(self);
        self.meter.close(name, stage, t0);
        r
    }

    /// Keep the largest embedding-weight bytes resident during the dense phase.
    fn note_resident_weights(&mut self, be: &B) {
        let resident = self.shards.iter().map(|s| be.len(&s.weights) * 4).sum::<usize>() + self.fs_part.as_ref().map_or(0, |p| p.0.len() * 4);
        let m = &mut self.meter.bytes.emb_weight_bytes_resident_dense;
        *m = (*m).max(resident as u64);
    }

    // Accessors: what checkpoints, drivers and the C ABI read of a rank.

    /// The grid and this rank's world, sharding-group and replica-group communicators.
    pub fn comms(&self) -> &GridComms {
        &self.comms
    }
    pub fn grid(&self) -> Grid {
        self.comms.grid
    }
    /// The world communicator (all T ranks).
    pub fn world(&self) -> &Comm {
        &self.comms.world
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn opts(&self) -> &ParallelOptions {
        &self.opts
    }
    /// Global batch size B (every rank takes B/T samples).
    pub fn global_batch(&self) -> usize {
        self.global_batch
    }
    /// Training steps done (restored by a checkpoint).
    pub fn steps_done(&self) -> usize {
        self.steps_done
    }
    /// This rank's shards, in plan order.
    pub fn shards(&self) -> &[Shard<B>] {
        &self.shards
    }
    /// The embedding optimizer (its momentum-scaling constant c and state layout).
    pub fn emb_update(&self) -> &EmbUpdate {
        &self.emb_upd
    }
    /// The dense parameters (values, gradients, optimizer state), in `DenseNet::params_mut` order.
    pub fn dense_params(&mut self) -> Vec<&mut Param<B>> {
        self.dense.params_mut()
    }
    /// Milliseconds per stage, summed over the steps (and forward passes) so far.
    pub fn times(&self) -> &StageTimes {
        &self.meter.times
    }
    /// Bytes handed to each collective, summed over the steps (and forward passes) so far.
    pub fn bytes(&self) -> &ByteCounts {
        &self.meter.bytes
    }
    /// Record every stage span from now on.
    pub fn start_trace(&mut self) {
        self.meter.start_trace();
    }
    /// The stage spans recorded so far.
    pub fn take_trace(&mut self) -> Vec<TraceEvent> {
        self.meter.take_trace()
    }

    /// The delayed state average in flight, if any (a checkpoint records it without applying it).
    pub fn pending_mut(&mut self) -> Option<&mut PendingState> {
        self.pending.as_mut()
    }

    /// Replace the trained state at once (a checkpoint restoring it): every shard's weights and
    /// optimizer state, in shard order, the dense parameters' values and state, the steps done
    /// and the delayed state average in flight. The caller checked every length.
    pub fn restore(&mut self, shards: Vec<(B::Buf, B::Buf)>, dense: Vec<(B::Buf, B::Buf)>, steps_done: usize, pending: Option<PendingState>) {
        for (sh, (w, s)) in self.shards.iter_mut().zip(shards) {
            sh.weights = w;
            sh.state = s;
        }
        for (p, (w, s)) in self.dense.params_mut().into_iter().zip(dense) {
            p.w = w;
            p.s = s;
        }
        self.steps_done = steps_done;
        self.pending = pending;
    }
}

/// Whether a training step's replica sync runs beside its dense update: with more than one
/// replica, when the options say so ([`super::OverlapSync::resolve`]: the in-process ranks are this
/// process's ranks, one otherwise) and the buffer transport is not the backend's native one
/// (NCCL's kernels wait for their peers on the stream that the sync's staging copies would
/// share; that path keeps the sync after the dense update).
fn sync_overlaps(opts: &ParallelOptions, comms: &GridComms, xfer: Xfer) -> bool {
    let world = &comms.world;
    let local_ranks = if world.transport() == "local" { world.size() } else { 1 };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    comms.grid.m > 1 && xfer != Xfer::Native && opts.overlap_sync.resolve(local_ranks, cores)
}
