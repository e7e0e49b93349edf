//! A rank's dealings with its replica group: stage 6 of the step (replica sync every K steps),
//! fully-sharded 2D's weight reduce-scatter and all-gather, the replicas' averaged model (for
//! evaluation and checkpoints), the end of training, and the check that replicas agree.
use super::backward::{self, DenseReduce};
use super::meter::Stage;
use super::rank::Rank2D;
use super::sync;
use crate::backend::{Backend, HostDeviceBytes};
use crate::{Error, Result};
use ember_transport::ReduceOp;
use std::time::Instant;

impl<B: Backend> Rank2D<B> {
    /// Step 6: replica sync (also callable at the end of training).
    pub fn sync(&mut self, be: &B) -> Result<()> {
        let hd0 = be.thread_host_device_bytes();
        let s = self.span(Stage::Sync, |r| {
            let delayed = if r.opts.delayed_state_sync { Some(&mut r.pending) } else { None };
            sync::replica_sync(be, &r.comms.replica, &mut r.shards, &mut r.touched, r.opts.sync, delayed, r.xfer)
        })?;
        self.meter.bytes.traffic.sync_index += s.index_bytes;
        self.meter.bytes.traffic.sync_values += s.value_bytes;
        if let Some(hd) = hd0.zip(be.thread_host_device_bytes()).map(|(a, b)| b.since(&a)) {
            self.note_sync_host_device(hd);
        }
        Ok(())
    }

    /// Steps 6 and 7 at once: the replica sync on a thread of its own (its collectives on the
    /// replica group) while this thread runs the dense update (its collectives on the world);
    /// both finished when this returns. Traced as the sync's span overlapping the dense
    /// update's, and the wait for the sync once the dense update is done.
    pub(super) fn dense_update_beside_sync(&mut self, be: &B, grads: DenseReduce<B>, loss: f64) -> Result<f64> {
        let Rank2D { comms, shards, touched, pending, opts, xfer, dense, dense_upd, .. } = self;
        let delayed = if opts.delayed_state_sync { Some(pending) } else { None };
        let started = grads.started();
        let (synced, span, (dense_t0, updated)) = sync::replica_sync_beside(be, &comms.replica, shards, touched, opts.sync, delayed, *xfer, || {
            let t0 = Instant::now();
            let r = backward::dense_step(be, dense, dense_upd, &comms.world, *xfer, grads, loss);
            (t0, r.map(|x| (x, Instant::now())))
        });
        let joined = Instant::now();
        let ((loss, reduced), dense_end) = updated?;
        let s = synced?;
        self.meter.close_at("dense_all_reduce (overlapped)", None, started, reduced);
        self.meter.close_at(Stage::Dense.name(), Some(Stage::Dense), dense_t0, dense_end);
        self.meter.close_at(Stage::Sync.name(), Some(Stage::Sync), span.start, span.end);
        self.meter.close_at("sync (wait after the dense update)", None, dense_end, joined);
        self.meter.bytes.traffic.sync_index += s.index_bytes;
        self.meter.bytes.traffic.sync_values += s.value_bytes;
        if let Some(hd) = span.host_device {
            self.note_sync_host_device(hd);
        }
        Ok(loss)
    }

    /// Add one sync's host↔device bytes (counted on the thread that ran it) to the meter.
    fn note_sync_host_device(&mut self, hd: HostDeviceBytes) {
        let m = self.meter.bytes.sync_host_device.get_or_insert_with(Default::default);
        *m = m.plus(&hd);
    }

    /// Fully-sharded 2D, after the lookup: reduce-scatter (mean) the concatenated shard weights
    /// over the replica group and keep only this replica's part resident.
    pub(super) fn fs_scatter(&mut self, be: &B) -> Result<()> {
        let mut flat = Vec::new();
        for s in &mut self.shards {
            flat.extend(be.download(&s.weights)?);
            s.weights = be.zeros(0)?;
        }
        let counts = ember_transport::split_evenly(flat.len(), self.comms.grid.m);
        let mut part = vec![0.0f32; counts[self.comms.replica.rank()]];
        self.meter.bytes.fs_weights += flat.len() as u64 * 4;
        self.comms.replica.reduce_scatter_v(&flat, &counts, &mut part, ReduceOp::Mean)?;
        self.fs_part = Some((part, counts));
        Ok(())
    }

    /// Fully-sharded 2D, before the embedding backward: all-gather the averaged weights.
    pub(super) fn fs_gather(&mut self, be: &B) -> Result<()> {
        let (part, counts) = self.fs_part.take().ok_or_else(|| Error::Config("fully-sharded gather without a scatter".into()))?;
        let mut flat = vec![0.0f32; counts.iter().sum()];
        self.meter.bytes.fs_weights += part.len() as u64 * 4;
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
}
