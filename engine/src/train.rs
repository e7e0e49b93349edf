//! The training loop behind `ember train` on one process: steps over a data source, periodic
//! evaluation on the held-out set, throughput and quality metrics, and the final report.
use crate::backend::Backend;
use crate::config::TrainConfig;
use crate::data::{Batch, DataSource, EvalSet};
use crate::metrics::{entropy, evaluate, EvalResult};
use crate::model::Dlrm;
use crate::{Error, Result};
use serde::Serialize;
use std::time::Instant;

/// What the progress callback sees after each step.
#[derive(Clone, Debug)]
pub struct Progress {
    pub step: usize,
    pub total: usize,
    /// Mean training loss over the recent window.
    pub loss: f64,
    /// Training NE over the recent window.
    pub ne: f64,
    pub samples_per_s: f64,
}

/// One evaluation on the held-out set.
#[derive(Clone, Debug, Serialize)]
pub struct EvalPoint {
    pub step: usize,
    pub loss: f64,
    pub ne: f64,
    pub auc: f64,
}

/// The summary of a run (the `--json` object of `ember train`).
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    /// Training samples per second over the training steps (data loading included, eval excluded).
    pub samples_per_s: f64,
    /// Mean training loss over the last 10 % of steps (nats).
    pub loss: f64,
    /// Normalized entropy on the eval set at the end.
    pub ne: f64,
    /// Exact AUC on the eval set at the end.
    pub auc: f64,
    /// Mean log loss on the eval set at the end (nats).
    pub eval_loss: f64,
    pub steps: usize,
    pub samples: u64,
    pub batch_size: usize,
    /// Wall-clock seconds of the whole run (eval included).
    pub wall_s: f64,
    pub eval_samples: usize,
    pub evals: Vec<EvalPoint>,
    pub backend: String,
}

/// Logits of the model over `eval`, in chunks of `chunk` samples.
pub fn predict_all<B: Backend>(be: &B, model: &mut Dlrm<B>, eval: &Batch, chunk: usize) -> Result<Vec<f32>> {
    let mut logits = Vec::with_capacity(eval.size());
    let mut s = 0;
    while s < eval.size() {
        let e = (s + chunk).min(eval.size());
        logits.extend(model.predict(be, &eval.slice(s..e))?);
        s = e;
    }
    Ok(logits)
}

/// Evaluate `model` on `eval`, read `chunk` samples at a time (only the logits and labels are
/// kept: the exact AUC needs them all). An empty eval set is an error, not a neutral metric.
pub fn evaluate_model<B: Backend>(be: &B, model: &mut Dlrm<B>, eval: &dyn EvalSet, chunk: usize) -> Result<EvalResult> {
    let (mut logits, mut labels) = (Vec::new(), Vec::new());
    for k in 0.. {
        let b = eval.chunk(k, chunk)?;
        if b.size() == 0 {
            break;
        }
        logits.extend(model.predict(be, &b)?);
        labels.extend_from_slice(&b.labels);
    }
    if labels.is_empty() {
        return Err(Error::Input("the eval set is empty: there is no metric to report".into()));
    }
    Ok(evaluate(&logits, &labels))
}

/// Train `cfg` on `data` for `cfg.steps` steps (or one epoch of `data`), evaluating on `eval`.
pub fn train<B: Backend>(
    be: &B,
    cfg: &TrainConfig,
    data: &mut dyn DataSource,
    eval: &dyn EvalSet,
    mut on_progress: impl FnMut(&Progress),
) -> Result<(Dlrm<B>, TrainReport)> {
    let start = Instant::now();
    let steps = match (cfg.steps, data.len()) {
        (Some(s), _) => s,
        (None, Some(n)) => (n as usize / cfg.batch_size).max(1),
        (None, None) => return Err(Error::Config("steps must be set for an endless data source".into())),
    };
    let mut model = Dlrm::new(be, cfg)?;
    // Grown as the steps run: `steps` comes from outside and may be large.
    let mut losses = Vec::with_capacity(steps.min(1 << 16));
    let mut positives = Vec::with_capacity(steps.min(1 << 16));
    let mut evals = Vec::new();
    let mut train_time = 0.0f64;
    let mut samples = 0u64;
    let chunk = cfg.batch_size.min(8192);
    let window = 50usize;
    for step in 0..steps {
        let t0 = Instant::now();
        let Some(batch) = data.next_batch(cfg.batch_size)? else { break };
        let loss = model.train_step(be, &batch)?;
        train_time += t0.elapsed().as_secs_f64();
        samples += batch.size() as u64;
        losses.push(loss);
        positives.push(batch.labels.iter().sum::<f32>() as f64 / batch.size() as f64);
        let lo = losses.len().saturating_sub(window);
        let wl = mean(&losses[lo..]);
        let wp = mean(&positives[lo..]);
        on_progress(&Progress {
            step: step + 1,
            total: steps,
            loss: wl,
            ne: wl / entropy(wp.clamp(1e-6, 1.0 - 1e-6)),
            samples_per_s: samples as f64 / train_time.max(1e-9),
        });
        if cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0 && step + 1 < steps {
            let r = evaluate_model(be, &mut model, eval, chunk)?;
            evals.push(EvalPoint { step: step + 1, loss: r.loss, ne: r.ne, auc: r.auc });
        }
    }
    let done = losses.len();
    if done == 0 {
        return Err(Error::Input("the data source had no training sample: no step ran".into()));
    }
    let r = evaluate_model(be, &mut model, eval, chunk)?;
    evals.push(EvalPoint { step: done, loss: r.loss, ne: r.ne, auc: r.auc });
    let tail = (done / 10).max(1).min(done);
    let report = TrainReport {
        samples_per_s: samples as f64 / train_time.max(1e-9),
        loss: mean(&losses[done - tail..]),
        ne: r.ne,
        auc: r.auc,
        eval_loss: r.loss,
        steps: done,
        samples,
        batch_size: cfg.batch_size,
        wall_s: start.elapsed().as_secs_f64(),
        eval_samples: r.samples,
        evals,
        backend: be.name().to_string(),
    };
    Ok((model, report))
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}
