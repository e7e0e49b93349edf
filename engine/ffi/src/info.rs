//! What an engine reports about itself: `EmberInfo` (model shape, place in the job, progress)
//! and the rows of each table.

use crate::args::check_out;
use crate::handle::{with_engine, EmberEngine, Model};
use crate::status::{fail, guard, EmberStatus};

/// Shape of an engine's model, its place in the job and its progress (`ember_engine_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmberInfo {
    /// Dense features per sample.
    pub num_dense: usize,
    /// Embedding tables (= sparse features per sample; feature f looks up table f).
    pub num_tables: usize,
    /// The config's (global) batch size B. Single-process engines: a suggestion (train steps
    /// accept any batch size > 0). Multi-rank engines: every train step is one global batch.
    pub batch_size: usize,
    /// Samples this rank feeds to each `ember_train_step`: B / world_size for a multi-rank
    /// engine; B for a single-process one (which accepts other sizes too).
    pub local_batch_size: usize,
    /// Index, within each global batch, of this rank's first sample: the rank feeds samples
    /// [sample_start, sample_start + local_batch_size) of every global batch (0 single-process).
    pub sample_start: usize,
    /// This engine's rank in its job (0 single-process).
    pub rank: usize,
    /// Ranks in the job (1 single-process).
    pub world_size: usize,
    /// Grid replicas M (sharding groups); 1 single-process.
    pub grid_m: usize,
    /// Ranks per sharding group N; 1 single-process.
    pub grid_n: usize,
    /// Training steps done (counted by this engine; set by `ember_load_checkpoint`).
    pub steps_done: u64,
    /// Training samples this rank was fed since creation or the last checkpoint load.
    pub samples_seen: u64,
}

/// Fill `*out` (caller-owned) with the model's shape, the engine's place in its job (rank,
/// world size, grid, the local batch size and the first sample of this rank's slice) and its
/// progress. Not collective. Returns `EMBER_STATUS_ERR_NULL_POINTER` /
/// `EMBER_STATUS_ERR_INVALID_HANDLE` for a bad argument.
///
/// # Safety
/// `out` is NULL or points to a writable `EmberInfo`. `engine` may be any value (it is checked
/// against the live handles).
#[no_mangle]
pub unsafe extern "C" fn ember_engine_info(engine: *const EmberEngine, out: *mut EmberInfo) -> EmberStatus {
    guard(|| {
        check_out(out, "out")?;
        let info = with_engine(engine, |st| {
            let mut info = EmberInfo {
                num_dense: st.cfg.model.num_dense,
                num_tables: st.cfg.model.tables.len(),
                batch_size: st.cfg.batch_size,
                local_batch_size: st.cfg.batch_size,
                sample_start: 0,
                rank: 0,
                world_size: 1,
                grid_m: 1,
                grid_n: 1,
                steps_done: st.steps_done,
                samples_seen: st.samples_seen,
            };
            if let Model::Ranked(r) = &st.model {
                let w = r.rank.world().rank();
                let range = r.grid.sample_range(w, st.cfg.batch_size);
                info.local_batch_size = range.len();
                info.sample_start = range.start;
                info.rank = w;
                info.world_size = r.grid.world();
                info.grid_m = r.grid.m;
                info.grid_n = r.grid.n;
                info.steps_done = r.rank.steps_done() as u64;
            }
            Ok(info)
        })?;
        // SAFETY: `out` is non-NULL (checked above) and writable (this function's contract).
        unsafe { *out = info };
        Ok(())
    })
}

/// Number of rows of table `table` into `*rows_out` (caller-owned): ids of feature `table` must
/// be below it. Not collective. Returns `EMBER_STATUS_ERR_INVALID_ARGUMENT` if
/// `table >= num_tables`.
///
/// # Safety
/// `rows_out` is NULL or points to a writable `uint64_t`. `engine` may be any value.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_table_rows(engine: *const EmberEngine, table: usize, rows_out: *mut u64) -> EmberStatus {
    guard(|| {
        check_out(rows_out, "rows_out")?;
        let rows = with_engine(engine, |st| match st.cfg.model.tables.get(table) {
            Some(t) => Ok(t.rows),
            None => fail(EmberStatus::ErrInvalidArgument, format!("table {table} out of range ({} tables)", st.cfg.model.tables.len())),
        })?;
        // SAFETY: `rows_out` is non-NULL (checked above) and writable (this function's contract).
        unsafe { *rows_out = rows };
        Ok(())
    })
}
