//! Reading the caller's arguments: C strings, out-pointers, buffers with their element counts,
//! and the batch layout shared by `ember_train_step` and `ember_eval`, each checked against the
//! model before anything runs.

use crate::status::{fail, EmberStatus, Failure, R};
use engine::config::TrainConfig;
use engine::data::{Batch, Jagged};
use std::ffi::{c_char, CStr};

pub(crate) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> R<&'a str> {
    if p.is_null() {
        return fail(EmberStatus::ErrNullPointer, format!("{what} is NULL"));
    }
    CStr::from_ptr(p).to_str().or_else(|e| fail(EmberStatus::ErrInvalidArgument, format!("{what} is not UTF-8: {e}")))
}

pub(crate) fn check_out<T>(p: *mut T, what: &str) -> R<()> {
    if p.is_null() {
        fail(EmberStatus::ErrNullPointer, format!("{what} is NULL"))
    } else {
        Ok(())
    }
}

/// A caller buffer of `n` elements as a slice; NULL is allowed only when `n == 0`.
unsafe fn slice<'a, T>(p: *const T, n: usize, what: &str) -> R<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return fail(EmberStatus::ErrNullPointer, format!("{what} is NULL but {n} values are expected"));
    }
    Ok(std::slice::from_raw_parts(p, n))
}

fn mul(a: usize, b: usize, what: &str) -> R<usize> {
    a.checked_mul(b).ok_or_else(|| Failure(EmberStatus::ErrInvalidArgument, format!("{what}: {a} x {b} overflows")))
}

/// Copy a caller's batch (layout documented at `ember_train_step`) into a `Batch`, checking
/// every size against the model. `labels` may be NULL when `labels_optional` (zeros are used).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn read_batch(
    cfg: &TrainConfig,
    batch_size: usize,
    dense: *const f32,
    labels: *const f32,
    labels_optional: bool,
    lengths: *const u32,
    ids: *const u64,
    num_ids: usize,
) -> R<Batch> {
    if batch_size == 0 {
        return fail(EmberStatus::ErrInvalidArgument, "batch_size is 0");
    }
    let nd = cfg.model.num_dense;
    let nt = cfg.model.tables.len();
    let dense = slice(dense, mul(batch_size, nd, "dense size")?, "dense")?;
    let labels = if labels.is_null() && labels_optional { vec![0.0; batch_size] } else { slice(labels, batch_size, "labels")?.to_vec() };
    let lengths = slice(lengths, mul(batch_size, nt, "lengths size")?, "lengths")?;
    let ids = slice(ids, num_ids, "ids")?;
    let total: u64 = lengths.iter().map(|&l| l as u64).sum();
    if total != num_ids as u64 {
        return fail(
            EmberStatus::ErrInvalidArgument,
            format!("lengths ({nt} tables x {batch_size} samples) sum to {total} ids but num_ids is {num_ids}"),
        );
    }
    let mut b = Batch::new(nd, nt);
    b.dense = dense.to_vec();
    b.labels = labels;
    let mut at = 0usize;
    for (t, j) in b.sparse.iter_mut().enumerate() {
        let ls = &lengths[t * batch_size..(t + 1) * batch_size];
        let n: usize = ls.iter().map(|&l| l as usize).sum();
        *j = Jagged { lengths: ls.to_vec(), values: ids[at..at + n].to_vec() };
        at += n;
    }
    b.validate(&cfg.model)?;
    Ok(b)
}
