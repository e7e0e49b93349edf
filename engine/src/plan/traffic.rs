//! Bytes one rank hands to each collective of the 2D step, one count per collective: what the
//! planner predicts (`plan::planner`) and what the engine counts (`crate::parallel::meter`), in
//! one struct so that the two are compared name by name.
use serde::Serialize;

/// Bytes one rank hands to each collective: the whole send buffer of an all-to-all or
/// reduce-scatter (its own block included), its own block of an all-gather, the buffer of an
/// all-reduce. The planner predicts them per step (`Traffic<f64>`; replica sync per step is per
/// sync / K); the engine counts them, summed over steps (`Traffic<u64>` in
/// [`crate::parallel::ByteCounts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Traffic<T = f64> {
    /// Ids and bag lengths (8 bytes each) to the shards' holders, and the counts exchanged first.
    pub input_a2a: T,
    /// Pooled vectors of table- and column-wise shards.
    pub output_a2a: T,
    /// Partial sums of row-wise tables (every rank sends G·D floats per row-wise table).
    pub output_reduce_scatter: T,
    /// Table-row-wise, forward: partial sums to the table's holders, then summed vectors to
    /// their owners.
    pub output_trw_reduce: T,
    pub output_trw_owners: T,
    /// Pooled gradients back to table- and column-wise shards.
    pub grad_a2a: T,
    /// Row-wise tables: this rank's gradient rows (all-gather).
    pub grad_all_gather: T,
    /// Table-row-wise, backward: gradient rows to the serving holder, then among the holders.
    pub grad_trw_owners: T,
    pub grad_trw_gather: T,
    /// Column-wise shards with row-wise AdaGrad: Σg² per unique row and its counts (all-gather).
    pub grad_col_sq: T,
    /// Dense gradients and the loss (all-reduce over all T ranks).
    pub dense_all_reduce: T,
    pub sync_index: T,
    pub sync_values: T,
}

impl<T: Copy + std::ops::Add<Output = T>> Traffic<T> {
    /// Every collective by name, in declaration order.
    pub fn fields(&self) -> [(&'static str, T); 13] {
        [
            ("input_a2a", self.input_a2a),
            ("output_a2a", self.output_a2a),
            ("output_reduce_scatter", self.output_reduce_scatter),
            ("output_trw_reduce", self.output_trw_reduce),
            ("output_trw_owners", self.output_trw_owners),
            ("grad_a2a", self.grad_a2a),
            ("grad_all_gather", self.grad_all_gather),
            ("grad_trw_owners", self.grad_trw_owners),
            ("grad_trw_gather", self.grad_trw_gather),
            ("grad_col_sq", self.grad_col_sq),
            ("dense_all_reduce", self.dense_all_reduce),
            ("sync_index", self.sync_index),
            ("sync_values", self.sync_values),
        ]
    }

    /// `f` applied to every count.
    pub fn map<U>(&self, f: impl Fn(T) -> U) -> Traffic<U> {
        Traffic {
            input_a2a: f(self.input_a2a),
            output_a2a: f(self.output_a2a),
            output_reduce_scatter: f(self.output_reduce_scatter),
            output_trw_reduce: f(self.output_trw_reduce),
            output_trw_owners: f(self.output_trw_owners),
            grad_a2a: f(self.grad_a2a),
            grad_all_gather: f(self.grad_all_gather),
            grad_trw_owners: f(self.grad_trw_owners),
            grad_trw_gather: f(self.grad_trw_gather),
            grad_col_sq: f(self.grad_col_sq),
            dense_all_reduce: f(self.dense_all_reduce),
            sync_index: f(self.sync_index),
            sync_values: f(self.sync_values),
        }
    }

    /// Count by count sum.
    pub fn add(&mut self, o: &Traffic<T>) {
        let f = |a: &mut T, b: T| *a = *a + b;
        f(&mut self.input_a2a, o.input_a2a);
        f(&mut self.output_a2a, o.output_a2a);
        f(&mut self.output_reduce_scatter, o.output_reduce_scatter);
        f(&mut self.output_trw_reduce, o.output_trw_reduce);
        f(&mut self.output_trw_owners, o.output_trw_owners);
        f(&mut self.grad_a2a, o.grad_a2a);
        f(&mut self.grad_all_gather, o.grad_all_gather);
        f(&mut self.grad_trw_owners, o.grad_trw_owners);
        f(&mut self.grad_trw_gather, o.grad_trw_gather);
        f(&mut self.grad_col_sq, o.grad_col_sq);
        f(&mut self.dense_all_reduce, o.dense_all_reduce);
        f(&mut self.sync_index, o.sync_index);
        f(&mut self.sync_values, o.sync_values);
    }

    /// The sparse collectives (input, output and gradient distribution).
    pub fn sparse(&self) -> T {
        self.input_a2a
            + self.output_a2a
            + self.output_reduce_scatter
            + self.output_trw_reduce
            + self.output_trw_owners
            + self.grad_a2a
            + self.grad_all_gather
            + self.grad_trw_owners
            + self.grad_trw_gather
            + self.grad_col_sq
    }
}
