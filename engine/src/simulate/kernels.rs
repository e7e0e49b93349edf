//! Bytes the embedding kernels move, the convention a machine's kernel efficiencies are measured
//! in (`compute.emb_forward_eff`, `compute.emb_backward_eff`: achieved bytes/s over
//! `memory.gather_bw`) and the scale model prices them with.
//!
//! - Forward (pooled lookup) of one shard: every id reads one row of the shard's columns, every
//!   bag writes one pooled vector: `ids · cols · 4 + bags · cols · 4`.
//! - Fused backward and optimizer of one shard: every unique row reads and writes its weights
//!   and optimizer state, every bag's pooled gradient is read once, every id (8 bytes) is read
//!   by the dedup: `unique · 2 · (cols + state) · 4 + bags · cols · 4 + ids · 8`, `state` being
//!   the optimizer's floats per row (SGD 0, row-wise AdaGrad 1, AdaGrad cols).
use crate::config::EmbOptimizer;

const F32: f64 = 4.0;
const WORD: f64 = 8.0;

/// Bytes of a pooled lookup over `bags` bags holding `ids` ids of rows `cols` wide.
pub fn forward_bytes(ids: f64, bags: f64, cols: usize) -> f64 {
    (ids + bags) * cols as f64 * F32
}

/// Bytes of the fused backward + optimizer update touching `unique` rows.
pub fn backward_bytes(opt: &EmbOptimizer, ids: f64, bags: f64, unique: f64, cols: usize) -> f64 {
    let state = opt.state_per_row(cols) as f64;
    unique * 2.0 * (cols as f64 + state) * F32 + bags * cols as f64 * F32 + ids * WORD
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_follow_the_stated_formulas() {
        // 4096 bags of 20 ids over a 64-wide table, 50,000 unique rows.
        let (ids, bags, u) = (81920.0, 4096.0, 50000.0);
        assert_eq!(forward_bytes(ids, bags, 64), (81920.0 + 4096.0) * 256.0);
        let rw = EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false };
        assert_eq!(backward_bytes(&rw, ids, bags, u, 64), u * (2.0 * 64.0 * 4.0 + 2.0 * 4.0) + bags * 256.0 + ids * 8.0);
        let ada = EmbOptimizer::Adagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false };
        assert_eq!(backward_bytes(&ada, ids, bags, u, 64), u * 4.0 * 64.0 * 4.0 + bags * 256.0 + ids * 8.0);
    }
}
