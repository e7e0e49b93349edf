//! Embedding tables as shards: deterministic initialisation by (table, global row, column),
//! and the construction of the bags a shard pools.
use crate::backend::{Backend, Bags, EmbUpdate, Shard, ShardSpec};
use crate::config::Pooling;
use crate::data::Jagged;
use crate::rng::{hash3, unit_f32};
use crate::Result;
use rayon::prelude::*;

/// Initial value of weight (table, row, col): uniform in ±1/sqrt(table_rows) as in DLRM,
/// a function of the seed and the global coordinates only (independent of grid and plan).
#[inline]
pub fn init_weight(seed: u64, table: usize, row: u64, col: usize, table_rows: u64) -> f32 {
    let bound = 1.0 / (table_rows as f32).sqrt();
    (2.0 * unit_f32(hash3(seed, table as u64, row, col as u64)) - 1.0) * bound
}

/// Host initial weights of a shard, (num_rows × num_cols) row-major.
pub fn init_shard_weights(seed: u64, spec: &ShardSpec) -> Vec<f32> {
    let cols = spec.num_cols();
    let mut w = vec![0.0f32; spec.num_rows() * cols];
    w.par_chunks_mut(cols.max(1) * 1024).enumerate().for_each(|(chunk, block)| {
        for (i, row) in block.chunks_mut(cols).enumerate() {
            let r = spec.rows.start + (chunk * 1024 + i) as u64;
            for (j, x) in row.iter_mut().enumerate() {
                *x = init_weight(seed, spec.table, r, spec.cols.start + j, spec.table_rows);
            }
        }
    });
    w
}

/// A freshly initialised shard on backend `b`.
pub fn new_shard<B: Backend>(b: &B, seed: u64, spec: ShardSpec, upd: &EmbUpdate) -> Result<Shard<B>> {
    let init = init_shard_weights(seed, &spec);
    b.shard(spec, &init, upd)
}

/// Host-side bags for one feature on a whole-table shard: offsets, ids and the pooling scale.
pub fn host_bags(j: &Jagged, pooling: Pooling) -> (Vec<u64>, Option<Vec<f32>>) {
    let offsets = j.offsets();
    let scale = match pooling {
        Pooling::Sum => None,
        Pooling::Mean => Some(j.lengths.iter().map(|&l| if l == 0 { 0.0 } else { 1.0 / l as f32 }).collect()),
    };
    (offsets, scale)
}

/// Upload one feature's bags (ids already local to the shard).
pub fn upload_bags<B: Backend>(b: &B, j: &Jagged, pooling: Pooling) -> Result<Bags<B>> {
    let (offsets, scale) = host_bags(j, pooling);
    Ok(Bags {
        num_bags: j.num_bags(),
        offsets: b.upload_ids(&offsets)?,
        ids: b.upload_ids(&j.values)?,
        scale: match scale {
            Some(s) => Some(b.upload(&s)?),
            None => None,
        },
    })
}
