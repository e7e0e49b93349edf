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
