//! The DLRM on one process, and its training step, readable top to bottom. The steps are the
//! brief's seven per-rank steps with the communication left out (one rank holds every table):
//! lookup, dense forward and backward, fused embedding backward+update, dense update.
use crate::backend::{Backend, Bags, DenseUpdate, EmbUpdate, Shard, ShardSpec};
use crate::config::{ModelConfig, Pooling, TrainConfig, WeightDecay};
use crate::data::Batch;
use crate::dense::DenseNet;
use crate::embedding::{new_shard, upload_bags};
use crate::Result;
use rayon::prelude::*;

pub struct Dlrm<B: Backend> {
    pub model: ModelConfig,
    pub dense: DenseNet<B>,
    /// One whole-table shard per table.
    pub tables: Vec<Shard<B>>,
    pub emb_upd: EmbUpdate,
    pub dense_upd: DenseUpdate,
}

impl<B: Backend> Dlrm<B> {
    /// A model initialised from `cfg.seed`; the momentum-scaling constant c defaults to 1 (one replica).
    pub fn new(be: &B, cfg: &TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let emb_upd = EmbUpdate::new(&cfg.optim.embedding, &cfg.optim.weight_decay, 1.0);
        let l2 = match cfg.optim.weight_decay {
            WeightDecay::None => 0.0,
            WeightDecay::L2 { wd } => wd,
        };
        let tables = cfg
            .model
            .tables
            .iter()
            .enumerate()
            .map(|(t, tc)| new_shard(be, cfg.seed, ShardSpec::whole(t, tc.rows, tc.dim), &emb_upd))
            .collect::<Result<Vec<_>>>()?;
        Ok(Dlrm {
            model: cfg.model.clone(),
            dense: DenseNet::new(be, &cfg.model, cfg.seed)?,
            tables,
            emb_upd,
            dense_upd: DenseUpdate { opt: cfg.optim.dense, l2 },
        })
    }

    fn pooling(&self, t: usize) -> Pooling {
        self.model.tables[t].pooling
    }

    /// Forward to the logits; returns the uploaded bags and dense input for the backward pass.
    fn forward(&mut self, be: &B, batch: &Batch) -> Result<(Vec<Bags<B>>, B::Buf)> {
        batch.validate(&self.model)?;
        let n = batch.size();
        self.dense.ensure_batch(be, n)?;
        let dense_x = be.upload(&batch.dense)?;
        let bags = (0..self.tables.len()).map(|t| upload_bags(be, &batch.sparse[t], self.pooling(t))).collect::<Result<Vec<_>>>()?;
        // Local lookup: pooled bags straight into the wide matrix.
        for (t, (shard, bags)) in self.tables.iter().zip(&bags).enumerate() {
            let layout = self.dense.table_layout(t);
            be.embedding_forward(shard, bags, self.dense.wide_mut(), layout, false)?;
        }
        // Dense forward.
        self.dense.forward_bottom(be, &dense_x)?;
        self.dense.forward_top(be)?;
        Ok((bags, dense_x))
    }

    /// One training step on `batch` (the loss is the batch mean); returns the mean loss.
    pub fn train_step(&mut self, be: &B, batch: &Batch) -> Result<f64> {
        let n = batch.size();
        let (bags, dense_x) = self.forward(be, batch)?;
        // Dense backward (loss, top MLP, interaction, bottom MLP).
        let loss = self.dense.backward(be, &dense_x, &batch.labels, 1.0 / n as f32)?;
        if !loss.is_finite() {
            return Err(crate::Error::Numeric(format!("training loss is {loss}: diverged (lower the learning rate)")));
        }
        // Embedding backward fused with the optimizer, one unique row at a time.
        // Tables are independent: their updates run side by side (each is parallel inside too).
        let (dense, upd) = (&self.dense, &self.emb_upd);
        self.tables
            .par_iter_mut()
            .zip(&bags)
            .enumerate()
            .try_for_each(|(t, (shard, bags))| be.embedding_backward_update(shard, bags, dense.dwide(), dense.table_layout(t), upd))?;
        // Dense optimizer step.
        self.dense.update(be, &self.dense_upd)?;
        Ok(loss / n as f64)
    }

    /// Logits for `batch` (no update).
    pub fn predict(&mut self, be: &B, batch: &Batch) -> Result<Vec<f32>> {
        self.forward(be, batch)?;
        let mut l = be.download(self.dense.logits())?;
        l.truncate(batch.size());
        Ok(l)
    }
}
