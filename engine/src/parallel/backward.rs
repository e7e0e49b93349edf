//! The backward stages of the 2D step: 4. dense backward (its gradients' all-reduce started),
//! 5. embedding backward (the output distribution in reverse, then the fused update) and
//! 7. the dense optimizer step. Every exchange is its forward exchange reversed (`StepLayout`).
use super::layout::{pack, unpack, Side};
use super::rank::{Forward, Rank2D};
use super::xfer::Xfer;
use crate::backend::{Backend, DenseUpdate, EmbKind, Layout};
use crate::dense::DenseNet;
use crate::config::Pooling;
use crate::data::Batch;
use crate::plan::ShardingType;
use crate::{Error, Result};
use ember_transport::{Comm, ReduceOp};
use std::time::Instant;

/// The dense-gradient all-reduce of a step: in flight on the host transport, or (peer-to-peer
/// and native buffer transports) the flat gradient to reduce when the step needs it; and when
/// it began (traced as overlapping the embedding backward).
pub(super) struct DenseReduce<B: Backend> {
    grads: DenseGrads<B>,
    started: Instant,
}

impl<B: Backend> DenseReduce<B> {
    /// When the all-reduce began.
    pub(super) fn started(&self) -> Instant {
        self.started
    }
}

enum DenseGrads<B: Backend> {
    Host(ember_transport::Request<Vec<f32>>),
    Device(B::Buf),
}

impl<B: Backend> Rank2D<B> {
    /// Step 4, second half: the dense backward (loss scaled by 1/B), and the flat dense
    /// gradient's sum over all T ranks started. Returns this rank's summed loss.
    pub(super) fn dense_backward(&mut self, be: &B, batch: &Batch, dense_x: &B::Buf) -> Result<(f64, DenseReduce<B>)> {
        let loss = self.dense.backward(be, dense_x, &batch.labels, 1.0 / self.global_batch as f32)?;
        let total: usize = self.dense.params_mut().iter().map(|p| be.len(&p.g)).sum();
        let mut grads = be.zeros(total)?;
        let mut pos = 0;
        for p in self.dense.params_mut() {
            let len = be.len(&p.g);
            be.copy_2d(&p.g, 0, len, &mut grads, pos, len, 1, len)?;
            pos += len;
        }
        let grads = match self.xfer {
            Xfer::Host { .. } => {
                let host = be.download(&grads)?;
                drop(grads);
                DenseGrads::Host(self.comms.world.start_all_reduce(host, ReduceOp::Sum))
            }
            Xfer::Peers | Xfer::Native | Xfer::Direct => DenseGrads::Device(grads),
        };
        Ok((loss, DenseReduce { grads, started: Instant::now() }))
    }

    /// Step 5: the pooled vectors' gradients (× M, since the group applies M/B · Σ; × 1/len for
    /// mean pooling) back to the shards through the output distribution in reverse, then the
    /// fused backward and optimizer update on every local shard. The next batch's ids (their
    /// all-to-all overlapped the dense work) are received first. `fully_sharded`: the shard
    /// weights are all-gathered before the update.
    pub(super) fn embedding_backward(&mut self, be: &B, batch: &Batch, fwd: Forward<B>, fully_sharded: bool) -> Result<()> {
        if let Some(p) = self.prefetch.as_mut() {
            p.complete()?;
        }
        let (b, d, f, m) = (self.layout.b, self.layout.d, self.model.num_tables(), self.comms.grid.m);
        let stride = (f + 1) * d;
        // Per-table gradient blocks (b × d).
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
        let n = self.plan.n;
        let mut gmats: Vec<B::Buf> = self.slots.iter().map(|s| be.zeros(n * b * s.cols.len())).collect::<Result<_>>()?;
        self.grad_pooled(be, &scaled, &mut gmats)?;
        self.grad_row_sums(be, &scaled, &mut gmats)?;
        self.grad_table_row_wise(be, &scaled, &mut gmats)?;
        drop(scaled);
        if fully_sharded {
            self.fs_gather(be)?;
        }
        self.apply_embedding_grads(be, &fwd, gmats)
    }

    /// Step 5a: table- and column-wise shards, the reverse all-to-all of the pooled gradients.
    fn grad_pooled(&self, be: &B, scaled: &[B::Buf], gmats: &mut [B::Buf]) -> Result<()> {
        let x = &self.layout.pooled_grad;
        let mut send = be.zeros(x.send_len())?;
        pack(be, &x.pack, Side::All(self.layout.d), |t| &scaled[t], &mut send)?;
        let mut recv = be.zeros(x.recv_len())?;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &x.send, &mut recv, &x.recv)?;
        drop(send);
        unpack(be, &x.unpack, &recv, Side::Each(&self.layout.slot_cols), gmats)
    }

    /// Step 5b: row-wise tables, an all-gather of every rank's [table][b × d] blocks.
    fn grad_row_sums(&self, be: &B, scaled: &[B::Buf], gmats: &mut [B::Buf]) -> Result<()> {
        let Some(x) = &self.layout.row_grads else { return Ok(()) };
        let mut mine = be.zeros(x.send_len())?;
        pack(be, &x.pack, Side::All(self.layout.d), |t| &scaled[t], &mut mine)?;
        let mut all = be.zeros(x.recv_len())?;
        self.xfer.all_gather(be, &self.comms.shard, &mine, &mut all)?;
        drop(mine);
        unpack(be, &x.unpack, &all, Side::Each(&self.layout.slot_cols), gmats)
    }

    /// Step 5c: table-row-wise tables, the forward in reverse: every owner's b gradient rows to
    /// the holder serving it, then the holders swap these blocks so each has all G samples'.
    fn grad_table_row_wise(&self, be: &B, scaled: &[B::Buf], gmats: &mut [B::Buf]) -> Result<()> {
        let Some(t) = &self.layout.trw else { return Ok(()) };
        let (owners, reduce) = (&t.grad_owners, &t.grad_reduce);
        // i) My b rows of each table to the holder serving me.
        let mut send = be.zeros(owners.send_len())?;
        pack(be, &owners.pack, Side::All(self.layout.d), |t| &scaled[t], &mut send)?;
        let mut recv = be.zeros(owners.recv_len())?;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &owners.send, &mut recv, &owners.recv)?;
        drop(send);
        // ii) The rows of the owners I serve, to every holder of the table (me included).
        let mut send = be.zeros(reduce.send_len())?;
        for &(from, to, len) in &t.gather {
            be.copy_2d(&recv, from, len, &mut send, to, len, 1, len)?;
        }
        drop(recv);
        let mut all = be.zeros(reduce.recv_len())?;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &reduce.send, &mut all, &reduce.recv)?;
        drop(send);
        unpack(be, &reduce.unpack, &all, Side::Each(&self.layout.slot_cols), gmats)
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
        self.meter.bytes.traffic.grad_col_sq += my_counts.len() as u64 * 8 + mine.len() as u64 * 4;
        let (ucounts, ucc) = self.comms.shard.all_gather_alloc(&my_counts)?;
        let (all, counts) = self.comms.shard.all_gather_alloc(&mine)?;
        // For each group rank: (table, offset, length) of its column-shard blocks.
        let mut blocks: Vec<Vec<(usize, usize, usize)>> = Vec::with_capacity(counts.len());
        let (mut upos, mut vpos) = (0usize, 0usize);
        for (p, (&uc, &vc)) in ucc.iter().zip(&counts).enumerate() {
            let tables = &self.layout.col_tables[p];
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

    /// Step 7: the summed dense gradients back into the parameters and the dense optimizer
    /// step; this rank's `loss` summed over all T ranks (returned).
    pub(super) fn dense_update(&mut self, be: &B, reduce: DenseReduce<B>, loss: f64) -> Result<f64> {
        let started = reduce.started();
        let (loss, reduced) = dense_step(be, &mut self.dense, &self.dense_upd, &self.comms.world, self.xfer, reduce, loss)?;
        self.meter.close_at("dense_all_reduce (overlapped)", None, started, reduced);
        Ok(loss)
    }
}

/// Step 7 on the dense network alone (so that it can run beside the replica sync, which owns
/// the shards meanwhile): the summed dense gradients back into the parameters of `net`, its
/// optimizer step, and `loss` summed over the world. Returns the summed loss and when the
/// gradients' all-reduce had finished.
pub(super) fn dense_step<B: Backend>(be: &B, net: &mut DenseNet<B>, upd: &DenseUpdate, world: &Comm, xfer: Xfer, reduce: DenseReduce<B>, loss: f64) -> Result<(f64, Instant)> {
    let summed = match reduce.grads {
        DenseGrads::Host(r) => be.upload(&r.wait()?)?,
        DenseGrads::Device(mut g) => {
            xfer.all_reduce_sum(be, world, &mut g)?;
            g
        }
    };
    let reduced = Instant::now();
    let mut pos = 0;
    for p in net.params_mut() {
        let len = be.len(&p.g);
        be.copy_2d(&summed, pos, len, &mut p.g, 0, len, 1, len)?;
        pos += len;
    }
    drop(summed);
    net.update(be, upd)?;
    let mut l = [loss];
    world.all_reduce(&mut l, ReduceOp::Sum)?;
    Ok((l[0], reduced))
}
