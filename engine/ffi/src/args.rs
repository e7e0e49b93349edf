//! Reading the caller's arguments: C strings, out-pointers, buffers with their element counts,
//! and the batch layout shared by `ember_train_step` and `ember_eval`, each checked against the
//! model before anything runs. Sizes are checked before anything is allocated from them, and
//! the copies of the caller's buffers report a failed allocation instead of aborting.

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

/// A caller buffer of `n` elements as a slice; NULL is allowed only when `n == 0`, and
/// `n` elements must span at most isize::MAX bytes (what a slice can describe).
unsafe fn slice<'a, T>(p: *const T, n: usize, what: &str) -> R<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return fail(EmberStatus::ErrNullPointer, format!("{what} is NULL but {n} values are expected"));
    }
    if n.checked_mul(std::mem::size_of::<T>()).map_or(true, |b| b > isize::MAX as usize) {
        return fail(EmberStatus::ErrInvalidArgument, format!("{what}: {n} values of {} bytes exceed the address space", std::mem::size_of::<T>()));
    }
    // SAFETY: non-null, and the caller promises `n` readable values there (the documented
    // contract of every entry point); the span fits isize, as from_raw_parts requires.
    Ok(std::slice::from_raw_parts(p, n))
}

/// A copy of `src`, or ErrInternal if the memory cannot be had (never an abort).
pub(crate) fn copy_vec<T: Copy>(src: &[T], what: &str) -> R<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(src.len()).or_else(|_| fail(EmberStatus::ErrInternal, format!("out of memory copying {what} ({} values)", src.len())))?;
    v.extend_from_slice(src);
    Ok(v)
}

/// `n` zeros, or ErrInternal if the memory cannot be had (never an abort).
fn zeros(n: usize, what: &str) -> R<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).or_else(|_| fail(EmberStatus::ErrInternal, format!("out of memory making {what} ({n} values)")))?;
    v.resize(n, 0.0);
    Ok(v)
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
    if batch_size == 0 || batch_size > crate::steps::EMBER_MAX_BATCH {
        return fail(EmberStatus::ErrInvalidArgument, format!("batch_size is {batch_size}: expected 1 to {}", crate::steps::EMBER_MAX_BATCH));
    }
    let nd = cfg.model.num_dense;
    let nt = cfg.model.tables.len();
    let dense = slice(dense, mul(batch_size, nd, "dense size")?, "dense")?;
    let labels = if labels.is_null() && labels_optional { zeros(batch_size, "labels")? } else { copy_vec(slice(labels, batch_size, "labels")?, "labels")? };
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
