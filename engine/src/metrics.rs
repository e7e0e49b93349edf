//! Quality metrics of a binary click model: mean log loss (BCE with logits), normalized entropy
//! and exact AUC. This module owns the metric definitions every report of Ember uses.
//!
//! Conventions (all computed in f64):
//! - a label is positive when it is > 0.5 (labels are 0.0 or 1.0; the log loss also accepts soft
//!   labels in [0, 1]);
//! - log loss of one sample with logit `x` and label `y`: `max(x, 0) − x·y + ln(1 + e^(−|x|))`,
//!   exact for any finite logit (no overflow at ±1e4);
//! - NE = mean log loss / H(p), H(p) = −p ln p − (1−p) ln(1−p), p the positive rate of the
//!   labels. When every label is the same (p = 0 or 1) H(p) = 0 and NE would be undefined: the
//!   rate is then clamped to [1/(2n), 1 − 1/(2n)] (half a sample of the missing class), so NE
//!   stays finite and large for a model that is not nearly perfect. n = 0 gives the neutral
//!   [`EvalResult::EMPTY`];
//! - AUC: the probability that a random positive scores above a random negative, ties counting
//!   one half (average ranks; O(n log n)). With a single class the AUC is undefined and reported
//!   as 0.5.
use rayon::prelude::*;

/// Metrics of one evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    /// Mean log loss (nats per sample).
    pub loss: f64,
    /// Normalized entropy: `loss / H(positive rate)`; < 1 beats predicting the base rate.
    pub ne: f64,
    /// Exact ROC AUC.
    pub auc: f64,
    pub samples: usize,
}

impl EvalResult {
    /// The result of an empty evaluation: loss 0, NE 1, AUC 0.5, 0 samples.
    pub const EMPTY: EvalResult = EvalResult { loss: 0.0, ne: 1.0, auc: 0.5, samples: 0 };
}

/// Log loss of one sample: BCE with logits, numerically stable for any finite logit.
#[inline]
pub fn bce_with_logits(logit: f64, label: f64) -> f64 {
    logit.max(0.0) - logit * label + (-logit.abs()).exp().ln_1p()
}

/// Mean log loss over the samples (0 for none).
pub fn log_loss(logits: &[f32], labels: &[f32]) -> f64 {
    assert_eq!(logits.len(), labels.len(), "log_loss: {} logits for {} labels", logits.len(), labels.len());
    if logits.is_empty() {
        return 0.0;
    }
    let sum: f64 = logits.iter().zip(labels).map(|(&x, &y)| bce_with_logits(x as f64, y as f64)).sum();
    sum / logits.len() as f64
}

/// Binary entropy in nats; 0 at p = 0 and p = 1.
pub fn entropy(p: f64) -> f64 {
    let h = |q: f64| if q > 0.0 { -q * q.ln() } else { 0.0 };
    h(p) + h(1.0 - p)
}

/// The positive rate NE divides by: the fraction of labels > 0.5, clamped to
/// [1/(2n), 1 − 1/(2n)] so that it is never exactly 0 or 1.
pub fn ne_base_rate(positives: usize, n: usize) -> f64 {
    if n == 0 {
        return 0.5;
    }
    let half = 0.5 / n as f64;
    (positives as f64 / n as f64).clamp(half, 1.0 - half)
}

/// Normalized entropy of the logits (see the module doc for the single-class convention).
pub fn normalized_entropy(logits: &[f32], labels: &[f32]) -> f64 {
    if logits.is_empty() {
        return 1.0;
    }
    let pos = labels.iter().filter(|&&y| y > 0.5).count();
    log_loss(logits, labels) / entropy(ne_base_rate(pos, labels.len()))
}

/// Exact ROC AUC with ties counted as one half (average ranks), O(n log n).
/// Returns 0.5 when all labels belong to one class (or there are none).
pub fn auc(scores: &[f32], labels: &[f32]) -> f64 {
    assert_eq!(scores.len(), labels.len(), "auc: {} scores for {} labels", scores.len(), labels.len());
    let n = scores.len();
    let pos = labels.iter().filter(|&&y| y > 0.5).count();
    let neg = n - pos;
    if pos == 0 || neg == 0 {
        return 0.5;
    }
    // Sort (score, label) pairs; NaN scores sort last (total order) instead of panicking.
    let mut v: Vec<(f32, bool)> = scores.iter().zip(labels).map(|(&s, &y)| (s, y > 0.5)).collect();
    let cmp = |a: &(f32, bool), b: &(f32, bool)| a.0.total_cmp(&b.0);
    if n > 1 << 16 {
        v.par_sort_unstable_by(cmp);
    } else {
        v.sort_unstable_by(cmp);
    }
    // Sum of the (1-based, tie-averaged) ranks of the positives. -0.0 and 0.0 compare as a tie.
    let mut rank_sum = 0.0f64;
    let mut i = 0;
    while i < n {
        let mut j = i + 1;
        while j < n && v[j].0 == v[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j, average (i + 1 + j) / 2.
        let p = v[i..j].iter().filter(|e| e.1).count();
        rank_sum += p as f64 * (i + 1 + j) as f64 * 0.5;
        i = j;
    }
    let (p, q) = (pos as f64, neg as f64);
    (rank_sum - p * (p + 1.0) * 0.5) / (p * q)
}

/// Loss, NE and AUC of `logits` against `labels` (0.0 / 1.0).
pub fn evaluate(logits: &[f32], labels: &[f32]) -> EvalResult {
    assert_eq!(logits.len(), labels.len(), "evaluate: {} logits for {} labels", logits.len(), labels.len());
    if logits.is_empty() {
        return EvalResult::EMPTY;
    }
    let loss = log_loss(logits, labels);
    let pos = labels.iter().filter(|&&y| y > 0.5).count();
    EvalResult {
        loss,
        ne: loss / entropy(ne_base_rate(pos, labels.len())),
        auc: auc(logits, labels),
        samples: logits.len(),
    }
}
