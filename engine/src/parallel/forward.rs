//! The forward stages of the 2D step: 1. input distribution, 2. local lookup, 3. output
//! distribution, and the dense forward. Every exchange follows the rank's `StepLayout`.
use super::layout::{pack, unpack, Side};
use super::rank::Rank2D;
use super::route::{decode_input, encode_input, InputInFlight};
use crate::backend::{Backend, Bags, Layout};
use crate::config::Pooling;
use crate::data::{Batch, Jagged};
use crate::embedding::upload_bags;
use crate::Result;

impl<B: Backend> Rank2D<B> {
    /// Step 1 begun: the receive counts exchanged, the ids' all-to-all started.
    pub(super) fn start_input(&mut self, batch: &Batch) -> Result<InputInFlight> {
        let (send, counts) = encode_input(&self.plan, &batch.sparse);
        self.meter.bytes.traffic.input_a2a += (send.len() + counts.len()) as u64 * 8;
        // The peers' counts are checked against the allocation limit before the receive
        // buffer is allocated from them.
        let rcounts = self.comms.shard.all_to_all_counts::<u64>(&counts)?;
        Ok(InputInFlight::new(self.comms.shard.start_all_to_all_v(send, counts, rcounts.clone()), rcounts))
    }

    /// Step 1: every local shard's bags of the group's N·b samples (ids local to the shard),
    /// from the prefetch when the previous step started it.
    pub(super) fn input_distribution(&mut self, batch: &Batch) -> Result<Vec<Jagged>> {
        let input = match self.prefetch.take() {
            Some(p) => p,
            None => self.start_input(batch)?,
        };
        let (recv, rcounts) = input.finish()?;
        decode_input(&recv, &rcounts, &self.slots, batch.size())
    }

    /// Step 2: pooled sums of every local shard's bags (N·b × cols each), and the bags and ids
    /// the backward needs. `fully_sharded`: the shard weights are then reduce-scattered over the
    /// replica group.
    #[allow(clippy::type_complexity)]
    pub(super) fn lookup(&mut self, be: &B, jag: Vec<Jagged>, fully_sharded: bool) -> Result<(Vec<Bags<B>>, Vec<Vec<u64>>, Vec<B::Buf>)> {
        let bg = self.plan.n * self.layout.b;
        let bags = jag.iter().map(|j| upload_bags(be, j, Pooling::Sum)).collect::<Result<Vec<_>>>()?;
        let ids: Vec<Vec<u64>> = jag.into_iter().map(|j| j.values).collect();
        let mut outs = Vec::with_capacity(self.shards.len());
        for (s, bag) in self.shards.iter().zip(&bags) {
            let cols = s.spec.num_cols();
            let mut out = be.zeros(bg * cols)?;
            be.embedding_forward(s, bag, &mut out, Layout { stride: cols, col: 0 }, false)?;
            outs.push(out);
        }
        if fully_sharded {
            self.fs_scatter(be)?;
        }
        Ok((bags, ids, outs))
    }

    /// Step 3: the pooled vectors to their samples' owners, straight into the dense network's
    /// input (b × (f+1)·d; mean pooling applied by the owner, which knows the whole bag's
    /// length). Each shard's output is freed as soon as it is packed for sending.
    pub(super) fn output_distribution(&self, be: &B, batch: &Batch, outs: Vec<B::Buf>) -> Result<B::Buf> {
        let (b, d, f) = (self.layout.b, self.layout.d, self.model.num_tables());
        let stride = (f + 1) * d;
        let mut outs: Vec<Option<B::Buf>> = outs.into_iter().map(Some).collect();
        let mut wide = be.zeros(b * stride)?;
        self.output_pooled(be, &mut outs, &mut wide)?;
        self.output_row_sums(be, &mut outs, &mut wide)?;
        self.output_table_row_wise(be, &mut outs, &mut wide)?;
        for (t, tc) in self.model.tables.iter().enumerate() {
            if tc.pooling == Pooling::Mean {
                let s: Vec<f32> = batch.sparse[t].lengths.iter().map(|&l| if l == 0 { 0.0 } else { 1.0 / l as f32 }).collect();
                be.scale_rows(&mut wide, (t + 1) * d, stride, b, d, &be.upload(&s)?)?;
            }
        }
        Ok(wide)
    }

    /// The side of the pooled-vector matrix (`wide`).
    fn wide_side(&self) -> Side<'static> {
        Side::Wide { d: self.layout.d, stride: (self.model.num_tables() + 1) * self.layout.d }
    }

    /// Step 3a: table- and column-wise shards, an all-to-all of each peer's b rows.
    fn output_pooled(&self, be: &B, outs: &mut [Option<B::Buf>], wide: &mut B::Buf) -> Result<()> {
        let x = &self.layout.pooled;
        let mut send = be.zeros(x.send_len())?;
        pack(be, &x.pack, Side::Each(&self.layout.slot_cols), |i| outs[i].as_ref().expect("output not yet sent"), &mut send)?;
        for (slot, out) in self.slots.iter().zip(outs.iter_mut()) {
            if !slot.kind.splits_rows() {
                *out = None;
            }
        }
        let mut recv = be.zeros(x.recv_len())?;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &x.send, &mut recv, &x.recv)?;
        drop(send);
        unpack(be, &x.unpack, &recv, self.wide_side(), std::slice::from_mut(wide))
    }

    /// Step 3b: row-wise tables, a reduce-scatter of partial sums over the whole group.
    fn output_row_sums(&self, be: &B, outs: &mut [Option<B::Buf>], wide: &mut B::Buf) -> Result<()> {
        let Some(x) = &self.layout.row_sums else { return Ok(()) };
        let mut send = be.zeros(x.send_len())?;
        pack(be, &x.pack, Side::Each(&self.layout.slot_cols), |i| outs[i].as_ref().expect("output not yet sent"), &mut send)?;
        for k in &x.pack {
            outs[k.buf] = None;
        }
        let mut mine = be.zeros(x.recv_len())?;
        self.xfer.reduce_scatter_sum(be, &self.comms.shard, &send, &mut mine)?;
        drop(send);
        unpack(be, &x.unpack, &mine, self.wide_side(), std::slice::from_mut(wide))
    }

    /// Step 3c: table-row-wise tables (`crate::plan::trw`): partial sums reduced among each
    /// table's holders, then each holder's summed vectors to the owners it serves.
    fn output_table_row_wise(&self, be: &B, outs: &mut [Option<B::Buf>], wide: &mut B::Buf) -> Result<()> {
        let Some(t) = &self.layout.trw else { return Ok(()) };
        // i) Partial sums to the holders serving their owners.
        let mut send = be.zeros(t.reduce.send_len())?;
        pack(be, &t.reduce.pack, Side::Each(&self.layout.slot_cols), |i| outs[i].as_ref().expect("output not yet sent"), &mut send)?;
        for k in &t.reduce.pack {
            outs[k.buf] = None;
        }
        let mut recv = be.zeros(t.reduce.recv_len())?;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &t.reduce.send, &mut recv, &t.reduce.recv)?;
        drop(send);
        // The holders' blocks summed in holder order, one buffer per table this rank holds.
        let mut sums: Vec<B::Buf> = t.sums_len.iter().map(|&s| be.zeros(s)).collect::<Result<_>>()?;
        for s in &t.sum {
            if s.first {
                be.copy_2d(&recv, s.msg, s.len, &mut sums[s.k], 0, s.len, 1, s.len)?;
            } else {
                let mut part = be.zeros(s.len)?;
                be.copy_2d(&recv, s.msg, s.len, &mut part, 0, s.len, 1, s.len)?;
                be.axpy(1.0, &part, &mut sums[s.k])?;
            }
        }
        drop(recv);
        // ii) Each owner's b summed rows to it.
        let mut send = be.zeros(t.owners.send_len())?;
        pack(be, &t.owners.pack, Side::All(self.layout.d), |k| &sums[k], &mut send)?;
        drop(sums);
        let mut recv = be.zeros(t.owners.recv_len())?;
        self.xfer.all_to_all_v(be, &self.comms.shard, &send, &t.owners.send, &mut recv, &t.owners.recv)?;
        drop(send);
        unpack(be, &t.owners.unpack, &recv, self.wide_side(), std::slice::from_mut(wide))
    }

    /// Step 4, first half: the dense network's forward on the bottom MLP's input and the pooled
    /// vectors (`wide`). Returns the dense input, kept for the backward.
    pub(super) fn dense_forward(&mut self, be: &B, batch: &Batch, wide: B::Buf) -> Result<B::Buf> {
        self.dense.ensure_batch(be, batch.size())?;
        *self.dense.wide_mut() = wide;
        let dense_x = be.upload(&batch.dense)?;
        self.dense.forward_bottom(be, &dense_x)?;
        self.dense.forward_top(be)?;
        Ok(dense_x)
    }
}
