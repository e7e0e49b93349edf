//! Reading the caller's arguments: C strings, out-pointers, and buffers with their element
//! counts (the batch layout shared by `ember_train_step` and `ember_eval` is read in `steps`
//! with these). Sizes are checked before anything is allocated from them, and
//! the copies of the caller's buffers report a failed allocation instead of aborting.

use crate::status::{fail, EmberStatus, Failure, R};
use std::ffi::{c_char, CStr};

/// The caller's C string `p` as UTF-8 (`what` names it in errors); NULL is an error.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that stays valid and unchanged for `'a`.
pub(crate) unsafe fn c_str<'a>(p: *const c_char, what: &str) -> R<&'a str> {
    if p.is_null() {
        return fail(EmberStatus::ErrNullPointer, format!("{what} is NULL"));
    }
    // SAFETY: non-null, and NUL-terminated and valid for 'a (this function's contract).
    unsafe { CStr::from_ptr(p) }.to_str().or_else(|e| fail(EmberStatus::ErrInvalidArgument, format!("{what} is not UTF-8: {e}")))
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
///
/// # Safety
/// `p` is NULL or points to `n` initialised values of `T`, valid and unchanged for `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, n: usize, what: &str) -> R<&'a [T]> {
    if n == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return fail(EmberStatus::ErrNullPointer, format!("{what} is NULL but {n} values are expected"));
    }
    if n.checked_mul(std::mem::size_of::<T>()).map_or(true, |b| b > isize::MAX as usize) {
        return fail(EmberStatus::ErrInvalidArgument, format!("{what}: {n} values of {} bytes exceed the address space", std::mem::size_of::<T>()));
    }
    // SAFETY: non-null, and the caller promises `n` readable values there (this function's
    // contract, passed on from every entry point's); the span fits isize (checked above), as
    // from_raw_parts requires.
    Ok(unsafe { std::slice::from_raw_parts(p, n) })
}

/// A copy of `src`, or ErrInternal if the memory cannot be had (never an abort).
pub(crate) fn copy_vec<T: Copy>(src: &[T], what: &str) -> R<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(src.len()).or_else(|_| fail(EmberStatus::ErrInternal, format!("out of memory copying {what} ({} values)", src.len())))?;
    v.extend_from_slice(src);
    Ok(v)
}

/// `n` zeros, or ErrInternal if the memory cannot be had (never an abort).
pub(crate) fn zeros(n: usize, what: &str) -> R<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).or_else(|_| fail(EmberStatus::ErrInternal, format!("out of memory making {what} ({n} values)")))?;
    v.resize(n, 0.0);
    Ok(v)
}

pub(crate) fn mul(a: usize, b: usize, what: &str) -> R<usize> {
    a.checked_mul(b).ok_or_else(|| Failure(EmberStatus::ErrInvalidArgument, format!("{what}: {a} x {b} overflows")))
}
