//! The training loop behind `ember train` on one process: steps over a data source, periodic
//! evaluation on the held-out set, throughput and quality metrics, and the final report.
use crate::backend::Backend;
use crate::checkpoint::{rank2d, Checkpoint, DataPosition};
use crate::config::TrainConfig;
use crate::data::{Batch, DataSource, EvalSet};
use crate::metrics::{entropy, evaluate, EvalResult};
use crate::model::Dlrm;
use crate::parallel::CheckpointOptions;
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
    on_progress: impl FnMut(&Progress),
) -> Result<(Dlrm<B>, TrainReport)> {
    train_checkpointed(be, cfg, data, eval, None, on_progress)
}

/// [`train`] with checkpoints (`ck`): after every `ck.every` steps the model is saved under
/// `ck.dir` as a 1×1 checkpoint (`checkpoint::rank2d::save_dlrm`, loadable into any grid),
/// pruning only the checkpoints of run `ck.run_id` (the folder's owner, `checkpoint::claim`);
/// with `ck.resume` the run continues from the newest complete checkpoint there (of any grid),
/// with `data` moved to the saved position, up to the same `cfg.steps`. Saving only reads the
/// model, so a checkpointed run trains bitwise the model of the run without checkpoints, and a
/// resumed run on the same data ends where the uninterrupted run ends. The report counts the
/// steps this call ran (none for a run resumed at its last step; a fresh run that runs none is
/// an error). Resumes and saves are announced as `tracing` events of target
/// `checkpoint::LOG_TARGET`.
pub fn train_checkpointed<B: Backend>(
    be: &B,
    cfg: &TrainConfig,
    data: &mut dyn DataSource,
    eval: &dyn EvalSet,
    ck: Option<&CheckpointOptions>,
    mut on_progress: impl FnMut(&Progress),
) -> Result<(Dlrm<B>, TrainReport)> {
    let start = Instant::now();
    let steps = match (cfg.steps, data.len()) {
        (Some(s), _) => s,
        (None, Some(n)) => (n as usize / cfg.batch_size).max(1),
        (None, None) => return Err(Error::Config("steps must be set for an endless data source".into())),
    };
    let mut model = Dlrm::new(be, cfg)?;
    let first = match ck.filter(|c| c.resume) {
        Some(c) => resume(be, &mut model, cfg, data, &c.dir)?,
        None => 0,
    };
    // Grown as the steps run: `steps` comes from outside and may be large.
    let mut losses = Vec::with_capacity(steps.saturating_sub(first).min(1 << 16));
    let mut positives = Vec::with_capacity(steps.saturating_sub(first).min(1 << 16));
    let mut evals = Vec::new();
    let mut train_time = 0.0f64;
    let mut samples = 0u64;
    let chunk = cfg.batch_size.min(8192);
    let window = 50usize;
    for step in first..steps {
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
        if let Some(c) = ck.filter(|c| c.every > 0 && (step + 1) % c.every == 0) {
            let position = DataPosition { next_sample: data.position(), reader_offsets: Vec::new() };
            let dir = rank2d::save_dlrm(be, &mut model, cfg, &c.dir, (step + 1) as u64, position, c.keep, c.run_id.as_deref())?;
            tracing::info!(target: crate::checkpoint::LOG_TARGET, "saved {}", dir.display());
        }
        if cfg.eval_every > 0 && (step + 1) % cfg.eval_every == 0 && step + 1 < steps {
            let r = evaluate_model(be, &mut model, eval, chunk)?;
            evals.push(EvalPoint { step: step + 1, loss: r.loss, ne: r.ne, auc: r.auc });
        }
    }
    let done = losses.len();
    // A run resumed at its final step has nothing left to run; a fresh one must have run a step.
    if done == 0 && first == 0 {
        return Err(Error::Input("the data source had no training sample: no step ran".into()));
    }
    let r = evaluate_model(be, &mut model, eval, chunk)?;
    evals.push(EvalPoint { step: first + done, loss: r.loss, ne: r.ne, auc: r.auc });
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

/// Load the newest complete checkpoint under `root` into `model` and move `data` to its saved
/// position; returns the checkpoint's step (0, announced, when there is no checkpoint yet).
fn resume<B: Backend>(be: &B, model: &mut Dlrm<B>, cfg: &TrainConfig, data: &mut dyn DataSource, root: &std::path::Path) -> Result<usize> {
    let Some(dir) = crate::checkpoint::latest(root)? else {
        tracing::info!(target: crate::checkpoint::LOG_TARGET, "no checkpoint in {} yet: starting from step 0", root.display());
        return Ok(0);
    };
    let ck = Checkpoint::open(&dir)?;
    let (step, position) = rank2d::restore_dlrm(be, model, &ck, cfg)?;
    // A checkpoint of another grid records its ranks' positions: the global stream is at step·B.
    let next = position.map_or(step * cfg.batch_size as u64, |p| p.next_sample);
    let here = data.position();
    if next < here {
        return Err(Error::Input(format!("{}: saved at sample {next}, but the data source is already at sample {here}", dir.display())));
    }
    data.skip(next - here)?;
    tracing::info!(target: crate::checkpoint::LOG_TARGET, "resumed from {} (step {step})", dir.display());
    Ok(step as usize)
}

fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        0.0
    } else {
        x.iter().sum::<f64>() / x.len() as f64
    }
}
