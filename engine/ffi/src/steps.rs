//! Training and evaluation steps: `ember_train_step`, `ember_eval` and its `EmberMetrics`, on a
//! whole model or (collectively) on one rank of a job.

use crate::args::{copy_vec, mul, slice, zeros};
use crate::collective::{agree, on_rank};
use crate::handle::{with_engine, EmberEngine, Model, Ranked, State};
use crate::status::{fail, guard, EmberStatus, R};
use engine::backend::Cpu;
use engine::config::TrainConfig;
use engine::data::{Batch, Jagged};
use engine::parallel::eval::evaluate;

/// Most samples one `ember_train_step` or `ember_eval` call takes (`batch_size`).
pub const EMBER_MAX_BATCH: usize = 1 << 24;

/// Quality metrics of an evaluation (filled by `ember_eval`). For multi-rank engines they cover
/// every rank's samples and are identical on every rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EmberMetrics {
    /// Mean log loss (nats).
    pub loss: f64,
    /// Normalized entropy: loss over the entropy of the evaluated samples' positive rate.
    pub ne: f64,
    /// Exact ROC AUC (0.5 when the samples have one class only).
    pub auc: f64,
    /// Samples evaluated (all ranks together).
    pub samples: u64,
}

/// Logits of `batch` on a rank and the metrics over every rank's samples, with the replicas'
/// averaged weights (`engine::parallel::eval::evaluate`). Collective.
fn eval_ranked(be: &Cpu, r: &mut Ranked, batch: Batch, has_labels: bool, wants_metrics: bool) -> R<(Vec<f32>, EmberMetrics)> {
    // One model on every replica (the replicas' average between syncs and in fully-sharded 2D),
    // without changing what training continues from.
    let e = r.rank.with_averaged_weights(be, |rank| evaluate(be, rank, &batch, has_labels))?;
    // Every rank made the same collectives above; only now may ranks differ in their verdict.
    if wants_metrics && !e.unlabeled.is_empty() {
        return fail(EmberStatus::ErrInvalidArgument, format!("metrics_out asks for metrics but ranks {:?} passed no labels", e.unlabeled));
    }
    let m = engine::metrics::evaluate(&e.all_logits, &e.all_labels);
    Ok((e.logits, EmberMetrics { loss: m.loss, ne: m.ne, auc: m.auc, samples: m.samples as u64 }))
}

/// Run one training step (forward, backward, optimizer update) on a batch of `batch_size`
/// samples held in caller-owned buffers, which are only read during the call:
/// - `dense`: `batch_size * num_dense` floats, row-major (sample by sample);
/// - `labels`: `batch_size` floats, each 0 or 1;
/// - `lengths`: `num_tables * batch_size` bag lengths, table-major: `lengths[t * batch_size + i]`
///   is the number of ids sample `i` looks up in table `t`;
/// - `ids`: `num_ids` ids, table-major and sample by sample inside a table (table 0's bags, then
///   table 1's, ...); `num_ids` must equal the sum of `lengths`, each id of table t below its rows.
///
/// A pointer may be NULL only if its element count is 0. The loss is the mean over the batch.
/// `loss_out` (caller-owned) receives the mean training loss (nats) and may be NULL.
///
/// Multi-rank engines: collective. Each rank passes its slice of the global batch: exactly
/// `local_batch_size` = B / world_size samples, samples [sample_start, sample_start +
/// local_batch_size) of the global batch (`ember_engine_info`). `*loss_out` is the mean loss
/// over the whole global batch, identical on every rank. If any rank's arguments are rejected,
/// no rank trains: that rank gets the reason, the others `EMBER_STATUS_ERR_PEER`.
///
/// Returns `EMBER_STATUS_ERR_INVALID_ARGUMENT` for sizes that do not match (batch_size 0, above
/// `EMBER_MAX_BATCH` or not the local batch size of a rank, ids count), `EMBER_STATUS_ERR_INPUT` for bad contents (the
/// model is unchanged in both cases), `EMBER_STATUS_ERR_NUMERIC` if the loss is not finite.
///
/// # Safety
/// `dense`, `labels`, `lengths` and `ids` each point to the number of values given above (or are
/// NULL), valid and unchanged during the call; `loss_out` is NULL or points to a writable
/// `double`. `engine` may be any value.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ember_train_step(
    engine: *mut EmberEngine,
    batch_size: usize,
    dense: *const f32,
    labels: *const f32,
    lengths: *const u32,
    ids: *const u64,
    num_ids: usize,
    loss_out: *mut f64,
) -> EmberStatus {
    guard(|| {
        let loss = with_engine(engine, |st| {
            let State { cfg, be, model, steps_done, samples_seen } = st;
            match model {
                Model::Single(model) => {
                    // SAFETY: the batch pointers hold the values the layout gives them (this
                    // function's contract), which is `read_batch`'s.
                    let batch = unsafe { read_batch(cfg, batch_size, dense, labels, false, lengths, ids, num_ids) }?;
                    let loss = model.train_step(be, &batch)?;
                    *steps_done += 1;
                    *samples_seen += batch_size as u64;
                    Ok(loss)
                }
                Model::Ranked(r) => {
                    let local = cfg.batch_size / r.grid.world();
                    let mine = if batch_size != local {
                        fail(
                            EmberStatus::ErrInvalidArgument,
                            format!(
                                "batch_size is {batch_size} but each of the {} ranks feeds {local} samples (global batch {} / {} ranks)",
                                r.grid.world(),
                                cfg.batch_size,
                                r.grid.world()
                            ),
                        )
                    } else {
                        // SAFETY: as in the single-process case.
                        unsafe { read_batch(cfg, batch_size, dense, labels, false, lengths, ids, num_ids) }
                    };
                    on_rank(r, |r| {
                        let batch = agree(&r.rank.world(), mine)?;
                        let loss = r.rank.train_step(be, &batch)?;
                        *samples_seen += batch_size as u64;
                        Ok(loss)
                    })
                }
            }
        })?;
        if !loss_out.is_null() {
            // SAFETY: non-NULL, and writable (this function's contract).
            unsafe { *loss_out = loss };
        }
        Ok(())
    })
}

/// Evaluate a batch without updating the model. Buffers and sizes as for `ember_train_step`,
/// except that `labels` may be NULL when `metrics_out` is NULL (logits only).
/// - `logits_out`: caller-owned buffer of `logits_len` floats that receives the `batch_size`
///   logits (pre-sigmoid scores), or NULL to skip them; `logits_len < batch_size` is
///   `EMBER_STATUS_ERR_INVALID_ARGUMENT`.
/// - `metrics_out`: caller-owned, receives log loss, NE and AUC of the batch; may be NULL.
///
/// `batch_size` is at most `EMBER_MAX_BATCH`; every size is checked before anything is
/// allocated. Single-process engines process large batches in chunks of the config's batch size
/// (at most 8192). Multi-rank engines: collective; each rank passes any number of its own samples (> 0;
/// ranks may pass different numbers), processed in chunks of the local batch size; the logits
/// are this rank's, the metrics cover every rank's samples and are identical on every rank
/// (a rank asking for metrics gets `EMBER_STATUS_ERR_INVALID_ARGUMENT` if some rank passed no
/// labels).
///
/// # Safety
/// The batch pointers as for `ember_train_step`; `logits_out` is NULL or points to `logits_len`
/// writable floats; `metrics_out` is NULL or points to a writable `EmberMetrics`. `engine` may
/// be any value.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ember_eval(
    engine: *mut EmberEngine,
    batch_size: usize,
    dense: *const f32,
    labels: *const f32,
    lengths: *const u32,
    ids: *const u64,
    num_ids: usize,
    logits_out: *mut f32,
    logits_len: usize,
    metrics_out: *mut EmberMetrics,
) -> EmberStatus {
    guard(|| {
        let (logits, metrics) = with_engine(engine, |st| {
            let checks = || -> R<Batch> {
                if !logits_out.is_null() && logits_len < batch_size {
                    return fail(EmberStatus::ErrInvalidArgument, format!("logits_len is {logits_len}, below batch_size {batch_size}"));
                }
                if labels.is_null() && !metrics_out.is_null() {
                    return fail(EmberStatus::ErrNullPointer, "labels is NULL but metrics_out asks for metrics");
                }
                // SAFETY: the batch pointers hold the values the layout gives them (this
                // function's contract), which is `read_batch`'s.
                unsafe { read_batch(&st.cfg, batch_size, dense, labels, true, lengths, ids, num_ids) }
            };
            let mine = checks();
            let State { cfg, be, model, .. } = st;
            match model {
                Model::Single(model) => {
                    let batch = mine?;
                    let chunk = cfg.batch_size.clamp(1, 8192);
                    let logits = engine::train::predict_all(be, model, &batch, chunk)?;
                    let r = engine::metrics::evaluate(&logits, &batch.labels);
                    Ok((logits, EmberMetrics { loss: r.loss, ne: r.ne, auc: r.auc, samples: r.samples as u64 }))
                }
                Model::Ranked(r) => on_rank(r, |r| {
                    let batch = agree(&r.rank.world(), mine)?;
                    eval_ranked(be, r, batch, !labels.is_null(), !metrics_out.is_null())
                }),
            }
        })?;
        if !logits_out.is_null() {
            // SAFETY: `logits` holds batch_size values (one per sample), `logits_out` is non-NULL
            // with room for logits_len >= batch_size floats (checked before the batch was read;
            // the contract makes them writable), and our fresh Vec cannot overlap it.
            unsafe { std::ptr::copy_nonoverlapping(logits.as_ptr(), logits_out, batch_size) };
        }
        if !metrics_out.is_null() {
            // SAFETY: non-NULL, and writable (this function's contract).
            unsafe { *metrics_out = metrics };
        }
        Ok(())
    })
}

/// Copy a caller's batch (layout documented at `ember_train_step`) into a `Batch`, checking
/// every size against the model. `labels` may be NULL when `labels_optional` (zeros are used).
///
/// # Safety
/// Each pointer is NULL or points to as many values as the layout gives it for `batch_size` and
/// `num_ids` (`ember_train_step`'s contract), valid and unchanged during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn read_batch(
    cfg: &TrainConfig,
    batch_size: usize,
    dense: *const f32,
    labels: *const f32,
    labels_optional: bool,
    lengths: *const u32,
    ids: *const u64,
    num_ids: usize,
) -> R<Batch> {
    if batch_size == 0 || batch_size > EMBER_MAX_BATCH {
        return fail(EmberStatus::ErrInvalidArgument, format!("batch_size is {batch_size}: expected 1 to {}", EMBER_MAX_BATCH));
    }
    let nd = cfg.model.num_dense;
    let nt = cfg.model.tables.len();
    // SAFETY: the contract promises batch_size x num_dense values at `dense`; `slice` refuses
    // NULL and spans past isize::MAX.
    let dense = unsafe { slice(dense, mul(batch_size, nd, "dense size")?, "dense") }?;
    // SAFETY: the contract promises batch_size labels at a non-NULL `labels`.
    let labels = if labels.is_null() && labels_optional { zeros(batch_size, "labels")? } else { copy_vec(unsafe { slice(labels, batch_size, "labels") }?, "labels")? };
    // SAFETY: the contract promises num_tables x batch_size lengths.
    let lengths = unsafe { slice(lengths, mul(batch_size, nt, "lengths size")?, "lengths") }?;
    // SAFETY: the contract promises num_ids ids.
    let ids = unsafe { slice(ids, num_ids, "ids") }?;
    let total: u64 = lengths.iter().map(|&l| l as u64).sum();
    if total != num_ids as u64 {
        return fail(
            EmberStatus::ErrInvalidArgument,
            format!("lengths ({nt} tables x {batch_size} samples) sum to {total} ids but num_ids is {num_ids}"),
        );
    }
    let mut b = Batch::new(nd, nt);
    b.dense = copy_vec(dense, "dense")?;
    b.labels = labels;
    let mut at = 0usize;
    for (t, j) in b.sparse.iter_mut().enumerate() {
        let ls = &lengths[t * batch_size..(t + 1) * batch_size];
        let n: usize = ls.iter().map(|&l| l as usize).sum();
        *j = Jagged { lengths: copy_vec(ls, "lengths")?, values: copy_vec(&ids[at..at + n], "ids")? };
        at += n;
    }
    b.validate(&cfg.model)?;
    Ok(b)
}
