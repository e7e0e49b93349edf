//! Evaluation of a 2D job's model on samples spread over its ranks: the one evaluation behind
//! the driver's report and the C ABI's `ember_eval`.
use super::rank::Rank2D;
use crate::backend::Backend;
use crate::data::Batch;
use crate::{Error, Result};

/// What an evaluation gives every rank.
#[derive(Clone, Debug, PartialEq)]
pub struct Evaluation {
    /// This rank's logits, one per sample it passed.
    pub logits: Vec<f32>,
    /// Every rank's logits and labels, world rank after world rank.
    pub all_logits: Vec<f32>,
    pub all_labels: Vec<f32>,
    /// World ranks that passed no labels (their labels in `all_labels` are the batch's zeros).
    pub unlabeled: Vec<usize>,
}

/// Predict this rank's `samples` (any number above 0; ranks may pass different numbers) with the
/// rank's current weights, in chunks of the local batch b — the last chunk padded by wrapping
/// around `samples`, its extra logits dropped — and gather every rank's logits and labels.
/// `has_labels`: whether `samples.labels` are real labels. Collective over the world: every rank
/// calls it together (a job evaluating between replica syncs wraps it in
/// [`Rank2D::with_averaged_weights`]).
pub fn evaluate<B: Backend>(be: &B, rank: &mut Rank2D<B>, samples: &Batch, has_labels: bool) -> Result<Evaluation> {
    let t = rank.world().size();
    let b = rank.global_batch() / t;
    let n = samples.size();
    let mut sizes = vec![0u64; 2 * t];
    rank.world().all_gather(&[n as u64, has_labels as u64], &mut sizes)?;
    if let Some(k) = (0..t).find(|&k| sizes[2 * k] == 0) {
        return Err(Error::Input(format!("evaluation: world rank {k} passed no samples")));
    }
    let chunks = sizes.chunks(2).map(|s| (s[0] as usize).div_ceil(b)).max().unwrap_or(0);
    let unlabeled: Vec<usize> = (0..t).filter(|&k| sizes[2 * k + 1] == 0).collect();
    let mut logits = Vec::with_capacity(chunks * b);
    for c in 0..chunks {
        let mut part = samples.slice(0..0);
        let mut i = c * b;
        while i < (c + 1) * b {
            let start = i % n;
            let end = (start + ((c + 1) * b - i)).min(n);
            part.extend(&samples.slice(start..end));
            i += end - start;
        }
        logits.extend(rank.predict(be, &part)?);
    }
    logits.truncate(n);
    let (all_logits, _) = rank.world().all_gather_alloc(&logits)?;
    let (all_labels, _) = rank.world().all_gather_alloc(&samples.labels)?;
    Ok(Evaluation { logits, all_logits, all_labels, unlabeled })
}
