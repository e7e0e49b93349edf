//! The C ABI of the Ember engine: `libember.so` / `libember.a` and the generated header
//! `engine/include/ember.h` (docs/capi.md).
//!
//! Rules every entry point follows:
//! - the body runs inside `catch_unwind`: no Rust panic ever crosses the boundary (it becomes
//!   `EMBER_STATUS_ERR_PANIC`);
//! - null pointers and sizes that do not match the model are errors, never crashes;
//! - engine handles are opaque and checked against a registry of live handles, so a handle used
//!   after `ember_engine_destroy` (or a pointer that never was a handle) is reported as
//!   `EMBER_STATUS_ERR_INVALID_HANDLE` as long as its address was not reused by a newer engine;
//! - on failure a message is kept for the calling thread (`ember_last_error`).
//!
//! This first slice is single-process on the CPU backend: one handle is one whole model.
#![allow(clippy::missing_safety_doc)]

use engine::backend::Cpu;
use engine::checkpoint::{rank2d, Checkpoint, DataPosition};
use engine::config::{preset, TrainConfig};
use engine::data::{Batch, Jagged};
use engine::model::Dlrm;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

/// Version of the C ABI described by this header. It changes whenever a function's signature or
/// a struct's layout changes incompatibly.
pub const EMBER_ABI_VERSION: u32 = 1;

/// What every fallible function returns. `EMBER_STATUS_OK` (0) is success; on any other value
/// `ember_last_error()` describes the failure.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmberStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    ErrNullPointer = 1,
    /// An argument is out of range or a buffer size does not match the model (wrong batch
    /// size, ids count, output buffer too small, text not UTF-8).
    ErrInvalidArgument = 2,
    /// The configuration (TOML text, file or preset name) was rejected.
    ErrConfig = 3,
    /// The batch contents were rejected (label not 0/1, id out of range, non-finite value).
    ErrInput = 4,
    /// Training diverged (non-finite loss) or another numeric failure.
    ErrNumeric = 5,
    /// A file could not be read or written (config file, checkpoint).
    ErrIo = 6,
    /// The engine handle is not a live handle (destroyed, or never created by this library).
    ErrInvalidHandle = 7,
    /// A panic was caught inside the library. The engine it happened in is unusable afterwards
    /// (every later call on it returns this code); destroy it.
    ErrPanic = 8,
    /// Any other engine failure (device, out of memory, transport).
    ErrInternal = 9,
}

/// An engine: one DLRM model with its optimizer state, on the CPU backend. Opaque; created by
/// `ember_engine_create_*`, released by `ember_engine_destroy`. A handle may be used from any
/// thread; calls on one handle are serialized by the library.
pub struct EmberEngine {
    _opaque: u8,
}

/// Shape of an engine's model and its progress (filled by `ember_engine_info`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EmberInfo {
    /// Dense features per sample.
    pub num_dense: usize,
    /// Embedding tables (= sparse features per sample; feature f looks up table f).
    pub num_tables: usize,
    /// The config's batch size (a suggestion: train steps accept any batch size > 0).
    pub batch_size: usize,
    /// Training steps done (counted by this engine; set by `ember_load_checkpoint`).
    pub steps_done: u64,
    /// Training samples seen by this engine since creation or the last checkpoint load.
    pub samples_seen: u64,
}

/// Quality metrics of an evaluation batch (filled by `ember_eval`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EmberMetrics {
    /// Mean log loss (nats).
    pub loss: f64,
    /// Normalized entropy: loss over the entropy of the batch's positive rate.
    pub ne: f64,
    /// Exact ROC AUC (0.5 when the batch has one class only).
    pub auc: f64,
    /// Samples evaluated.
    pub samples: u64,
}

// ---------------------------------------------------------------------------------------------
// Internals: errors, the handle registry, the panic guard.

struct Failure(EmberStatus, String);

type R<T> = std::result::Result<T, Failure>;

fn fail<T>(status: EmberStatus, msg: impl Into<String>) -> R<T> {
    Err(Failure(status, msg.into()))
}

impl From<engine::Error> for Failure {
    fn from(e: engine::Error) -> Self {
        use engine::Error as E;
        let status = match &e {
            E::Config(_) => EmberStatus::ErrConfig,
            E::Data { .. } | E::Io { .. } => EmberStatus::ErrIo,
            E::Input(_) => EmberStatus::ErrInput,
            E::Numeric(_) => EmberStatus::ErrNumeric,
            E::Device(_) | E::OutOfMemory(_) | E::Transport(_) => EmberStatus::ErrInternal,
        };
        Failure(status, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

/// Run `f` with the panic guard; record the error message; return the status.
fn guard(f: impl FnOnce() -> R<()>) -> EmberStatus {
    set_last_error("");
    let out = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return EmberStatus::Ok,
        Ok(Err(Failure(s, m))) => (s, m),
        Err(p) => (EmberStatus::ErrPanic, format!("panic inside ember: {}", panic_message(&*p))),
    };
    // Formatting the message cannot panic in practice, but stay on the safe side.
    let _ = catch_unwind(AssertUnwindSafe(|| set_last_error(&out.1)));
    out.0
}

struct State {
    cfg: TrainConfig,
    be: Cpu,
    model: Dlrm<Cpu>,
    steps_done: u64,
    samples_seen: u64,
}

type Shared = Arc<Mutex<State>>;

fn registry() -> &'static Mutex<HashMap<usize, Shared>> {
    static REG: OnceLock<Mutex<HashMap<usize, Shared>>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

fn lock_registry() -> std::sync::MutexGuard<'static, HashMap<usize, Shared>> {
    // The registry is only touched by code that cannot panic while holding it.
    registry().lock().unwrap_or_else(|e| e.into_inner())
}

/// The live state behind `h` (shared, so that a concurrent destroy cannot free it under us).
fn lookup(h: *const EmberEngine) -> R<Shared> {
    if h.is_null() {
        return fail(EmberStatus::ErrNullPointer, "engine handle is NULL");
    }
    match lock_registry().get(&(h as usize)) {
        Some(s) => Ok(s.clone()),
        None => fail(EmberStatus::ErrInvalidHandle, format!("engine handle {h:p} is not live (destroyed, or not created by ember)")),
    }
}

fn with_engine<T>(h: *const EmberEngine, f: impl FnOnce(&mut State) -> R<T>) -> R<T> {
    let shared = lookup(h)?;
    let mut st = match shared.lock() {
        Ok(g) => g,
        Err(_) => return fail(EmberStatus::ErrPanic, "engine is unusable: an earlier call panicked inside it; destroy it"),
    };
    f(&mut st)
}

fn create(cfg: TrainConfig, out: *mut *mut EmberEngine) -> R<()> {
    let be = Cpu::new();
    let model = Dlrm::new(&be, &cfg)?;
    let state = State { cfg, be, model, steps_done: 0, samples_seen: 0 };
    let token = Box::into_raw(Box::new(EmberEngine { _opaque: 0 }));
    lock_registry().insert(token as usize, Arc::new(Mutex::new(state)));
    // SAFETY: `out` was checked non-null by the caller of `create`.
    unsafe { *out = token };
    Ok(())
}

unsafe fn c_str<'a>(p: *const c_char, what: &str) -> R<&'a str> {
    if p.is_null() {
        return fail(EmberStatus::ErrNullPointer, format!("{what} is NULL"));
    }
    CStr::from_ptr(p).to_str().or_else(|e| fail(EmberStatus::ErrInvalidArgument, format!("{what} is not UTF-8: {e}")))
}

fn check_out<T>(p: *mut T, what: &str) -> R<()> {
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
unsafe fn read_batch(
    st: &State,
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
    let nd = st.cfg.model.num_dense;
    let nt = st.cfg.model.tables.len();
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
    b.validate(&st.cfg.model)?;
    Ok(b)
}

// ---------------------------------------------------------------------------------------------
// The API.

/// The library version as a NUL-terminated string ("MAJOR.MINOR.PATCH"). Static storage owned by
/// the library: never free it. Never fails.
#[no_mangle]
pub extern "C" fn ember_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The ABI version this library implements (compare with `EMBER_ABI_VERSION` from the header
/// the caller was compiled against). Never fails.
#[no_mangle]
pub extern "C" fn ember_abi_version() -> u32 {
    EMBER_ABI_VERSION
}

/// A short constant name for `status` ("EMBER_STATUS_OK", ...; "EMBER_STATUS_UNKNOWN" for a
/// value not in the enum). Static storage owned by the library: never free it. Never fails.
#[no_mangle]
pub extern "C" fn ember_status_name(status: i32) -> *const c_char {
    let s: &'static str = match status {
        0 => "EMBER_STATUS_OK\0",
        1 => "EMBER_STATUS_ERR_NULL_POINTER\0",
        2 => "EMBER_STATUS_ERR_INVALID_ARGUMENT\0",
        3 => "EMBER_STATUS_ERR_CONFIG\0",
        4 => "EMBER_STATUS_ERR_INPUT\0",
        5 => "EMBER_STATUS_ERR_NUMERIC\0",
        6 => "EMBER_STATUS_ERR_IO\0",
        7 => "EMBER_STATUS_ERR_INVALID_HANDLE\0",
        8 => "EMBER_STATUS_ERR_PANIC\0",
        9 => "EMBER_STATUS_ERR_INTERNAL\0",
        _ => "EMBER_STATUS_UNKNOWN\0",
    };
    s.as_ptr() as *const c_char
}

/// The message of the calling thread's most recent failure, as a NUL-terminated UTF-8 string;
/// "" when the thread's most recent ember call succeeded. Every ember function except
/// `ember_version`, `ember_abi_version`, `ember_status_name` and `ember_last_error` resets it.
/// The string is owned by the library and stays valid until the calling thread's next ember
/// call; copy it to keep it. Never returns NULL.
#[no_mangle]
pub extern "C" fn ember_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Create an engine from the text of a TOML config (the format of `ember train --config`; see
/// docs/cli.md). `toml` is a NUL-terminated UTF-8 string owned by the caller (only read during
/// the call). On success `*out` receives a new handle that the caller owns and must release
/// with `ember_engine_destroy`; on failure `*out` is left unchanged.
/// Returns `EMBER_STATUS_ERR_NULL_POINTER` if `toml` or `out` is NULL, `EMBER_STATUS_ERR_CONFIG`
/// if the config does not parse or validate.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_from_toml(toml: *const c_char, out: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        let text = c_str(toml, "toml")?;
        check_out(out, "out")?;
        create(TrainConfig::from_toml(text)?, out)
    })
}

/// Create an engine from a TOML config file at `path` (NUL-terminated, caller-owned). Ownership
/// of `*out` as for `ember_engine_create_from_toml`. Returns `EMBER_STATUS_ERR_IO` if the file
/// cannot be read, `EMBER_STATUS_ERR_CONFIG` if its text is rejected.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_from_file(path: *const c_char, out: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        let path = c_str(path, "path")?;
        check_out(out, "out")?;
        let text = std::fs::read_to_string(path).or_else(|e| fail(EmberStatus::ErrIo, format!("{path}: {e}")))?;
        create(TrainConfig::from_toml(&text)?, out)
    })
}

/// Create an engine from a built-in preset ("tiny", "kaggle", "terabyte", "dlrmv2", "bench";
/// see `ember presets`). `row_cap` caps every table's rows (0: the preset's own default cap).
/// Ownership of `*out` as for `ember_engine_create_from_toml`. Returns
/// `EMBER_STATUS_ERR_CONFIG` for an unknown name.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_from_preset(name: *const c_char, row_cap: u64, out: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        let name = c_str(name, "name")?;
        check_out(out, "out")?;
        create(preset(name, (row_cap > 0).then_some(row_cap))?, out)
    })
}

/// Release an engine and everything it owns. `engine` may be NULL (a no-op returning
/// `EMBER_STATUS_OK`). The handle is invalid afterwards; using it again (or destroying it twice)
/// returns `EMBER_STATUS_ERR_INVALID_HANDLE` unless its address was reused by a newer engine.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_destroy(engine: *mut EmberEngine) -> EmberStatus {
    guard(|| {
        if engine.is_null() {
            return Ok(());
        }
        let removed = lock_registry().remove(&(engine as usize));
        match removed {
            Some(state) => {
                // SAFETY: the registry held this address, so it came from Box::into_raw in
                // `create` and has not been freed (removal above makes this the only free).
                drop(Box::from_raw(engine));
                drop(state);
                Ok(())
            }
            None => fail(EmberStatus::ErrInvalidHandle, format!("engine handle {engine:p} is not live (destroyed twice?)")),
        }
    })
}

/// Fill `*out` (caller-owned) with the model's shape and the engine's progress.
/// Returns `EMBER_STATUS_ERR_NULL_POINTER` / `EMBER_STATUS_ERR_INVALID_HANDLE` for a bad
/// argument.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_info(engine: *const EmberEngine, out: *mut EmberInfo) -> EmberStatus {
    guard(|| {
        check_out(out, "out")?;
        let info = with_engine(engine, |st| {
            Ok(EmberInfo {
                num_dense: st.cfg.model.num_dense,
                num_tables: st.cfg.model.tables.len(),
                batch_size: st.cfg.batch_size,
                steps_done: st.steps_done,
                samples_seen: st.samples_seen,
            })
        })?;
        *out = info;
        Ok(())
    })
}

/// Number of rows of table `table` into `*rows_out` (caller-owned): ids of feature `table` must
/// be below it. Returns `EMBER_STATUS_ERR_INVALID_ARGUMENT` if `table >= num_tables`.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_table_rows(engine: *const EmberEngine, table: usize, rows_out: *mut u64) -> EmberStatus {
    guard(|| {
        check_out(rows_out, "rows_out")?;
        let rows = with_engine(engine, |st| match st.cfg.model.tables.get(table) {
            Some(t) => Ok(t.rows),
            None => fail(EmberStatus::ErrInvalidArgument, format!("table {table} out of range ({} tables)", st.cfg.model.tables.len())),
        })?;
        *rows_out = rows;
        Ok(())
    })
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
/// Returns `EMBER_STATUS_ERR_INVALID_ARGUMENT` for sizes that do not match (batch_size 0, ids
/// count), `EMBER_STATUS_ERR_INPUT` for bad contents (the model is unchanged in both cases),
/// `EMBER_STATUS_ERR_NUMERIC` if the loss is not finite.
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
            let batch = read_batch(st, batch_size, dense, labels, false, lengths, ids, num_ids)?;
            let State { be, model, .. } = st;
            let loss = model.train_step(be, &batch)?;
            st.steps_done += 1;
            st.samples_seen += batch_size as u64;
            Ok(loss)
        })?;
        if !loss_out.is_null() {
            *loss_out = loss;
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
/// Large batches are processed in chunks of the config's batch size (at most 8192).
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
        if !logits_out.is_null() && logits_len < batch_size {
            return fail(EmberStatus::ErrInvalidArgument, format!("logits_len is {logits_len}, below batch_size {batch_size}"));
        }
        if labels.is_null() && !metrics_out.is_null() {
            return fail(EmberStatus::ErrNullPointer, "labels is NULL but metrics_out asks for metrics");
        }
        let (logits, labels) = with_engine(engine, |st| {
            let batch = read_batch(st, batch_size, dense, labels, true, lengths, ids, num_ids)?;
            let chunk = st.cfg.batch_size.clamp(1, 8192);
            let State { be, model, .. } = st;
            let logits = engine::train::predict_all(be, model, &batch, chunk)?;
            Ok((logits, batch.labels))
        })?;
        if !logits_out.is_null() {
            std::ptr::copy_nonoverlapping(logits.as_ptr(), logits_out, batch_size);
        }
        if !metrics_out.is_null() {
            let r = engine::metrics::evaluate(&logits, &labels);
            *metrics_out = EmberMetrics { loss: r.loss, ne: r.ne, auc: r.auc, samples: r.samples as u64 };
        }
        Ok(())
    })
}

/// Save a checkpoint of the engine as training step `step` under the folder `dir`
/// (NUL-terminated, caller-owned; created if missing): the checkpoint is `dir/step-<step>`
/// (docs/checkpoint.md; a 1x1-grid checkpoint that loads into any grid). It is complete once
/// this returns `EMBER_STATUS_OK`; older checkpoints in `dir` are kept.
/// Returns `EMBER_STATUS_ERR_IO` if it cannot be written.
#[no_mangle]
pub unsafe extern "C" fn ember_save_checkpoint(engine: *mut EmberEngine, dir: *const c_char, step: u64) -> EmberStatus {
    guard(|| {
        let dir = c_str(dir, "dir")?;
        with_engine(engine, |st| {
            let State { be, model, cfg, samples_seen, .. } = st;
            let pos = DataPosition { next_sample: *samples_seen, reader_offsets: Vec::new() };
            rank2d::save_dlrm(be, model, cfg, Path::new(dir), step, pos, usize::MAX)?;
            Ok(())
        })
    })
}

/// Load a checkpoint into the engine: `dir` (NUL-terminated, caller-owned) is either a step
/// folder (`.../step-<S>`) or a checkpoint root, whose newest complete checkpoint is loaded.
/// Checkpoints of any grid load as long as the model and optimizer match the engine's config.
/// Sets the engine's step count to the checkpoint's step and writes it to `*step_out`
/// (caller-owned; may be NULL). On any error the engine is unchanged.
/// Returns `EMBER_STATUS_ERR_IO` / `EMBER_STATUS_ERR_INPUT` for a missing or corrupt checkpoint,
/// `EMBER_STATUS_ERR_CONFIG` for one of another model.
#[no_mangle]
pub unsafe extern "C" fn ember_load_checkpoint(engine: *mut EmberEngine, dir: *const c_char, step_out: *mut u64) -> EmberStatus {
    guard(|| {
        let dir = c_str(dir, "dir")?;
        let step = with_engine(engine, |st| {
            let ck = Checkpoint::open(Path::new(dir))?;
            let State { be, model, cfg, .. } = st;
            let (step, pos) = rank2d::restore_dlrm(be, model, &ck, cfg)?;
            st.steps_done = step;
            st.samples_seen = pos.map(|p| p.next_sample).unwrap_or(0);
            Ok(step)
        })?;
        if !step_out.is_null() {
            *step_out = step;
        }
        Ok(())
    })
}

/// Test-only: panics inside the library, to show that the panic is caught. Always returns
/// `EMBER_STATUS_ERR_PANIC` with the panic's message in `ember_last_error()`; the caller keeps
/// running (a message may be printed on stderr by the Rust panic hook).
#[no_mangle]
pub extern "C" fn ember_test_panic() -> EmberStatus {
    guard(|| panic!("ember_test_panic: deliberate panic"))
}

#[cfg(test)]
mod abi_tests;
