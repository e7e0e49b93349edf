//! Element types the reductions accept, and the reduction operators.
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
/// `n · out.len()` values.
pub fn mean_f32_in_f64(parts: &[f32], n: usize, out: &mut [f32]) {
    const TILE: usize = 1024;
    let k = out.len();
    let mut acc = [0.0f64; TILE];
    for (t, o) in out.chunks_mut(TILE).enumerate() {
        let (start, acc) = (t * TILE, &mut acc[..o.len()]);
        for (a, &x) in acc.iter_mut().zip(&parts[start..start + o.len()]) {
            *a = x as f64;
        }
        for p in 1..n {
            let at = p * k + start;
            for (a, &x) in acc.iter_mut().zip(&parts[at..at + o.len()]) {
                *a += x as f64;
            }
        }
        for (o, &a) in o.iter_mut().zip(acc.iter()) {
            *o = (a / n as f64) as f32;
        }
    }
}
