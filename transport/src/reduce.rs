//! Element types the reductions accept, the reduction operators, and the host reductions
//! themselves (rank order, tile by tile).
use bytemuck::Pod;

/// How `all_reduce` / `reduce_scatter` combine contributions. Contributions are always summed in
/// rank order 0, 1, ..., n-1 (one owner per element), so every rank gets bitwise the same result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum in rank order, then divide by the number of ranks.
    Mean,
}

/// A `Pod` element that can be reduced.
pub trait Reducible: Pod + Send + Sync {
    fn add(self, other: Self) -> Self;
    /// `self / n` (integer types truncate).
    fn div_n(self, n: usize) -> Self;
}

macro_rules! reducible {
    ($($t:ty),*) => {$(
        impl Reducible for $t {
            #[inline]
            fn add(self, o: Self) -> Self { self + o }
            #[inline]
            fn div_n(self, n: usize) -> Self { self / (n as $t) }
        }
    )*};
}
reducible!(f32, f64, i32, i64, u32, u64);

/// `acc[i] = acc[i] + x[i]`.
pub(crate) fn add_into<T: Reducible>(acc: &mut [T], x: &[T]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a = a.add(*b);
    }
}

/// `out[i] = (Σ_p parts[p·k + i]) / n` for `k = out.len()`, each f32 contribution widened to f64
/// and added in rank order starting from rank 0's, divided in f64 and rounded once to f32:
/// bitwise the f64 mean of the same values, with half the bytes on the wire. `parts` holds
/// `n · out.len()` values (panics if it holds fewer).
pub fn mean_f32_in_f64(parts: &[f32], n: usize, out: &mut [f32]) {
    assert!(parts.len() >= n.max(1) * out.len(), "mean_f32_in_f64: {} values for {n} contributions of {}", parts.len(), out.len());
    // SAFETY: `parts` holds at least max(n, 1) contributions of out.len() f32s (checked above)
    // and `out` out.len() writable f32s; a shared and an exclusive borrow do not overlap.
    unsafe { reduce_f32_mean_in_f64(parts.as_ptr() as *const u8, n, 4 * out.len(), None, out.as_mut_ptr() as *mut u8, ReduceOp::Mean) }
}

/// Elements a host reduction combines at a time: the n contributions' tiles and the
/// accumulator stay in L1.
const TILE: usize = 1024;

/// The reduction of host `T`s, tile by tile: `acc` starts as contribution 0's tile, `add(acc,
/// contribution p's tile)` for p = 1..n in rank order, `finish(acc, out tile)`. Contribution
/// `own` (when given) is read from `out`, each tile before it is written.
///
/// # Safety
/// `parts..+n·len` (but slot `own`) and `out..+len` readable, `out..+len` writable, not
/// overlapping, holding whole `T`s at `T`-aligned addresses; `own < n`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn reduce_tiles<T: Pod, A: Pod>(
    parts: *const u8,
    n: usize,
    len: usize,
    own: Option<usize>,
    out: *mut u8,
    start: impl Fn(&mut [A], &[T]),
    add: impl Fn(&mut [A], &[T]),
    finish: impl Fn(&[A], &mut [T]),
) {
    let k = len / std::mem::size_of::<T>();
    // Only the first min(k, TILE) accumulators are ever used: a small reduction does not
    // clear the whole tile.
    let mut tile = [std::mem::MaybeUninit::<A>::uninit(); TILE];
    let used = &mut tile[..k.min(TILE)];
    used.iter_mut().for_each(|a| {
        a.write(A::zeroed());
    });
    // SAFETY: every element of `used` was just initialised, and `MaybeUninit<A>` has `A`'s layout.
    let acc: &mut [A] = unsafe { std::slice::from_raw_parts_mut(used.as_mut_ptr() as *mut A, used.len()) };
    let part = |p: usize, at: usize| -> *const T {
        let base = if own == Some(p) { out as *const T } else { (parts as *const T).wrapping_add(p * k) };
        base.wrapping_add(at)
    };
    let mut at = 0;
    while at < k {
        let m = (k - at).min(TILE);
        let acc = &mut acc[..m];
        // SAFETY: contribution p's elements at..at+m lie inside its k = len / size_of::<T>()
        // elements (slot p of `parts`, or `out` for `own`), readable whole `T`s (this function's
        // contract); each shared slice is dropped before `out`'s tile is borrowed mutably, and
        // `out` does not overlap `parts`.
        unsafe {
            start(acc, std::slice::from_raw_parts(part(0, at), m));
            for p in 1..n {
                add(acc, std::slice::from_raw_parts(part(p, at), m));
            }
            finish(acc, std::slice::from_raw_parts_mut((out as *mut T).add(at), m));
        }
        at += m;
    }
}

/// `Memory::reduce` of host f32s as the f64-summed mean (`op` is `Mean`, set by
/// `Host::mean_in_f64`): [`mean_f32_in_f64`] on raw contributions.
///
/// # Safety
/// As [`reduce_tiles`], with `T = f32`.
pub(crate) unsafe fn reduce_f32_mean_in_f64(parts: *const u8, n: usize, len: usize, own: Option<usize>, out: *mut u8, _op: ReduceOp) {
    // SAFETY: this function's contract is `reduce_tiles`'s.
    unsafe {
        reduce_tiles::<f32, f64>(
            parts,
            n,
            len,
            own,
            out,
            |a, x| a.iter_mut().zip(x).for_each(|(a, &x)| *a = x as f64),
            |a, x| a.iter_mut().zip(x).for_each(|(a, &x)| *a += x as f64),
            |a, o| o.iter_mut().zip(a).for_each(|(o, &a)| *o = (a / n as f64) as f32),
        )
    }
}

/// `Memory::reduce` on host `T`s: the first contribution, plus each next one in rank order,
/// then divided by n for `Mean`.
///
/// # Safety
/// As [`reduce_tiles`].
pub(crate) unsafe fn reduce_host<T: Reducible>(parts: *const u8, n: usize, len: usize, own: Option<usize>, out: *mut u8, op: ReduceOp) {
    // SAFETY: this function's contract is `reduce_tiles`'s.
    unsafe {
        reduce_tiles::<T, T>(
            parts,
            n,
            len,
            own,
            out,
            |a, x| a.copy_from_slice(x),
            |a, x| add_into(a, x),
            |a, o| match op {
                ReduceOp::Mean => o.iter_mut().zip(a).for_each(|(o, &a)| *o = a.div_n(n)),
                ReduceOp::Sum => o.copy_from_slice(a),
            },
        )
    }
}
