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
//! An engine is either a whole model in this process (a 1x1 grid: `engine::model::Dlrm`) or one
//! rank of 2D training (`engine::parallel::Rank2D`): one rank per process under a launcher, or
//! several in-process ranks with one handle each (`ember_engine_create_local_ranks`). Calls on
//! a rank that communicate are collective: every rank of the job makes the same call, and the
//! ranks first agree that every rank's arguments were accepted (so that a bad argument on one
//! rank fails every rank's call cleanly instead of leaving the others waiting).
#![allow(clippy::missing_safety_doc)]

use engine::backend::Cpu;
use engine::checkpoint::{rank2d, Checkpoint, DataPosition};
use engine::comm_bench::{BenchOptions, Collective};
use engine::config::{preset, TrainConfig};
use engine::data::{Batch, Jagged};
use engine::grid::{Grid, GridComms, Placement};
use engine::model::Dlrm;
use engine::parallel::{ParallelOptions, Rank2D, SyncMode};
use engine::plan::planner::{plan, PlanOptions};
use engine::plan::ShardingType;
use ember_transport::{Comm, JoinConfig};
use serde::Deserialize;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Version of the C ABI described by this header. It changes whenever a function's signature or
/// a struct's layout changes incompatibly.
pub const EMBER_ABI_VERSION: u32 = 2;

/// `ember_bench_collective`: all-to-all, `size` bytes to every peer.
pub const EMBER_BENCH_ALL_TO_ALL: u32 = 0;
/// `ember_bench_collective`: all-reduce (sum) of a `size`-byte buffer.
pub const EMBER_BENCH_ALL_REDUCE: u32 = 1;
/// Largest `max_bytes` `ember_bench_collective` accepts (256 MiB).
pub const EMBER_BENCH_MAX_BYTES: usize = 256 << 20;

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
    /// The configuration (TOML text, file or preset name) was rejected, or it does not fit the
    /// job (grid size against the launcher's world size).
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
    /// Any other engine failure (device, out of memory, transport: a peer died or a collective
    /// timed out). A rank whose collective failed midway is unusable afterwards; destroy it.
    ErrInternal = 9,
    /// Multi-rank engines: another rank rejected its part of this collective call (its own
    /// call returned the reason); no rank changed its state.
    ErrPeer = 10,
}

/// An engine: a DLRM model (or one rank's part of it) with its optimizer state, on the CPU
/// backend. Opaque; created by `ember_engine_create_*`, released by `ember_engine_destroy`. A
/// handle may be used from any thread; calls on one handle are serialized by the library.
pub struct EmberEngine {
    _opaque: u8,
}

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

/// One size of a transport microbenchmark (`ember_bench_collective`), in the columns of
/// nccl-tests. Identical on every rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EmberBenchRow {
    /// Bytes per peer (all-to-all) or buffer bytes (all-reduce).
    pub size: usize,
    /// f32 elements per peer (all-to-all) or in the buffer (all-reduce): size / 4, at least 1.
    pub count: usize,
    /// Mean time per iteration in microseconds (the slowest rank's).
    pub time_us: f64,
    /// Algorithm bandwidth, GB/s: bytes moved per rank (all-to-all: size x ranks) / time.
    pub algbw: f64,
    /// Bus bandwidth, GB/s: algbw x (n-1)/n (all-to-all) or x 2(n-1)/n (all-reduce).
    pub busbw: f64,
    /// Values that differed from the independently computed expectation, over all ranks (a
    /// correct transport gives 0).
    pub wrong: u64,
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

impl From<ember_transport::Error> for Failure {
    fn from(e: ember_transport::Error) -> Self {
        Failure(EmberStatus::ErrInternal, format!("transport: {e}"))
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

/// One rank of 2D training.
struct Ranked {
    rank: Rank2D<Cpu>,
    grid: Grid,
    /// Set when a collective failed midway: this rank may disagree with the others.
    broken: Option<String>,
}

enum Model {
    /// The whole model in this process (1x1).
    Single(Box<Dlrm<Cpu>>),
    /// One rank of a multi-rank job.
    Ranked(Box<Ranked>),
}

struct State {
    cfg: TrainConfig,
    be: Cpu,
    model: Model,
    /// Single-process engines only (a rank counts its own steps).
    steps_done: u64,
    samples_seen: u64,
}

type Shared = Arc<Mutex<State>>;

fn registry() -> &'static Mutex<BTreeMap<usize, Shared>> {
    static REG: OnceLock<Mutex<BTreeMap<usize, Shared>>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

fn lock_registry() -> std::sync::MutexGuard<'static, BTreeMap<usize, Shared>> {
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
    if let Model::Ranked(r) = &st.model {
        if let Some(why) = &r.broken {
            return fail(EmberStatus::ErrInternal, format!("engine is unusable: an earlier collective failed midway ({why}); destroy it"));
        }
    }
    f(&mut st)
}

fn register(state: State) -> *mut EmberEngine {
    let token = Box::into_raw(Box::new(EmberEngine { _opaque: 0 }));
    lock_registry().insert(token as usize, Arc::new(Mutex::new(state)));
    token
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

// ---------------------------------------------------------------------------------------------
// Configs and multi-rank engines.

/// An engine config: the `ember train` TOML plus the optional top-level `grid = "MxN"` and the
/// optional `[parallel]` table.
struct EngineConfig {
    train: TrainConfig,
    grid: Option<Grid>,
    opts: ParallelOptions,
    sharding: Option<ShardingType>,
}

fn default_sync_every() -> usize {
    1
}

/// `[parallel]`: options of 2D training (the `ember train` flags of the same names).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParallelSection {
    #[serde(default = "default_sync_every")]
    sync_every: usize,
    #[serde(default)]
    sync: SyncMode,
    #[serde(default)]
    delayed_state_sync: bool,
    #[serde(default)]
    fully_sharded: bool,
    #[serde(default)]
    placement: Option<String>,
    #[serde(default)]
    sharding: Option<String>,
}

fn config_err(msg: impl std::fmt::Display) -> Failure {
    Failure(EmberStatus::ErrConfig, format!("config: {msg}"))
}

fn parse_config(text: &str) -> R<EngineConfig> {
    let mut table: toml::Table = text.parse().map_err(config_err)?;
    let grid = table.remove("grid");
    let par = table.remove("parallel");
    let train: TrainConfig = toml::Value::Table(table).try_into().map_err(config_err)?;
    train.validate()?;
    let par: ParallelSection = match par {
        None => toml::Value::Table(Default::default()).try_into().map_err(config_err)?,
        Some(v) => v.try_into().map_err(|e| config_err(format!("[parallel]: {e}")))?,
    };
    let placement = match par.placement.as_deref() {
        None | Some("in-node") => Placement::ReplicasInNode,
        Some("across-nodes") => Placement::ReplicasAcrossNodes,
        Some(o) => return Err(config_err(format!("[parallel] placement '{o}': expected in-node or across-nodes"))),
    };
    let sharding = match par.sharding.as_deref() {
        None => None,
        Some("table") => Some(ShardingType::TableWise),
        Some("row") => Some(ShardingType::RowWise),
        Some("column") => Some(ShardingType::ColumnWise),
        Some("table-row") => Some(ShardingType::TableRowWise),
        Some(o) => return Err(config_err(format!("[parallel] sharding '{o}': expected table, row, column or table-row"))),
    };
    if par.sync_every == 0 {
        return Err(config_err("[parallel] sync_every must be >= 1"));
    }
    let grid = match grid {
        None => None,
        Some(toml::Value::String(s)) => Some(Grid::parse(&s, placement)?),
        Some(v) => return Err(config_err(format!("grid = {v}: expected a string \"MxN\""))),
    };
    let opts = ParallelOptions {
        sync_every: par.sync_every,
        sync: par.sync,
        delayed_state_sync: par.delayed_state_sync,
        fully_sharded: par.fully_sharded,
        ..Default::default()
    };
    Ok(EngineConfig { train, grid, opts, sharding })
}

/// The grid for `world` ranks: the config's (which must have `world` ranks) or 1 x world.
fn grid_for(ec: &EngineConfig, world: usize, who: &str) -> R<Grid> {
    let grid = match ec.grid {
        Some(g) => g,
        None => Grid::new(1, world, Placement::ReplicasInNode)?,
    };
    if grid.world() != world {
        return Err(config_err(format!("grid {}x{} needs {} ranks but {who} has {world}", grid.m, grid.n, grid.world())));
    }
    if ec.train.batch_size % world != 0 {
        return Err(config_err(format!("batch_size {} is not divisible by the {world} ranks", ec.train.batch_size)));
    }
    Ok(grid)
}

fn plan_for(ec: &EngineConfig, grid: Grid) -> R<engine::plan::Plan> {
    let mut popts = PlanOptions::from_config(&ec.train);
    popts.placement = grid.placement;
    popts.force = ec.sharding;
    Ok(plan(&ec.train.model, grid.m, grid.n, &popts)?.0)
}

fn build_rank(ec: &EngineConfig, grid: Grid, p: engine::plan::Plan, world: Comm) -> R<State> {
    let be = Cpu::new();
    let gc = GridComms::new(grid, world)?;
    let rank = Rank2D::new(&be, &ec.train, gc, p, ec.opts.clone())?;
    Ok(State { cfg: ec.train.clone(), be, model: Model::Ranked(Box::new(Ranked { rank, grid, broken: None })), steps_done: 0, samples_seen: 0 })
}

/// Collective timeout of in-process ranks: EMBER_TIMEOUT_MS, else the transport's default.
fn local_timeout() -> Duration {
    std::env::var("EMBER_TIMEOUT_MS").ok().and_then(|v| v.trim().parse().ok()).map(Duration::from_millis).unwrap_or(ember_transport::DEFAULT_TIMEOUT)
}

/// Create one engine: a whole model, or this process's rank when a launcher started the
/// process as one of several ranks (or the config asks for a grid of more than one rank).
fn create(ec: EngineConfig, out: *mut *mut EmberEngine) -> R<()> {
    let wants_ranks = ec.grid.is_some_and(|g| g.world() > 1);
    let join = match JoinConfig::from_env() {
        Ok(j) if j.size > 1 => Some(j),
        Ok(_) => None,
        Err(e) if wants_ranks => return fail(EmberStatus::ErrConfig, format!("launcher environment: {e}")),
        Err(_) => None,
    };
    let state = match join {
        None if wants_ranks => {
            let g = ec.grid.expect("checked");
            return fail(
                EmberStatus::ErrConfig,
                format!(
                    "config: grid {}x{} needs {} ranks but this process was not started by a launcher: run it under `ember launch -n {}` (or mpirun, srun, torchrun), or create in-process ranks with ember_engine_create_local_ranks",
                    g.m,
                    g.n,
                    g.world(),
                    g.world()
                ),
            );
        }
        None => {
            let be = Cpu::new();
            let model = Dlrm::new(&be, &ec.train)?;
            State { cfg: ec.train, be, model: Model::Single(Box::new(model)), steps_done: 0, samples_seen: 0 }
        }
        Some(j) => {
            let grid = grid_for(&ec, j.size, "the launcher's job")?;
            let p = plan_for(&ec, grid)?;
            let world = Comm::connect(&j)?;
            build_rank(&ec, grid, p, world)?
        }
    };
    // SAFETY: `out` was checked non-null by the caller of `create`.
    unsafe { *out = register(state) };
    Ok(())
}

/// Every rank's verdict on its own arguments (collective over `world`): this rank's own
/// failure, else `ErrPeer` naming the first rank that failed, else `mine`.
fn agree<T>(world: &Comm, mine: R<T>) -> R<T> {
    let code = match &mine {
        Ok(_) => 0u32,
        Err(Failure(s, _)) => *s as u32,
    };
    let mut all = vec![0u32; world.size()];
    world.all_gather(&[code], &mut all)?;
    let mine = mine?;
    if let Some((k, &c)) = all.iter().enumerate().find(|(_, &c)| c != 0) {
        let name = unsafe { CStr::from_ptr(ember_status_name(c as i32)) }.to_string_lossy().into_owned();
        return fail(EmberStatus::ErrPeer, format!("rank {k} rejected its part of this collective call ({name}; its own call returned the reason); no rank changed its state"));
    }
    Ok(mine)
}

/// Run a collective step of a rank: a transport failure midway marks the rank unusable.
fn on_rank<T>(r: &mut Ranked, f: impl FnOnce(&mut Ranked) -> R<T>) -> R<T> {
    let out = f(r);
    if let Err(Failure(EmberStatus::ErrInternal, m)) = &out {
        if m.starts_with("transport") {
            r.broken = Some(m.clone());
        }
    }
    out
}

/// Logits of `batch` on a rank, in chunks of the local batch b (the last padded by wrapping
/// around the batch), and the metrics over every rank's samples. Collective.
fn eval_ranked(be: &Cpu, r: &mut Ranked, batch: Batch, has_labels: bool, wants_metrics: bool) -> R<(Vec<f32>, EmberMetrics)> {
    let t = r.rank.comms.world.size();
    let b = r.rank.global_batch / t;
    let n = batch.size();
    let mut sizes = vec![0u64; 2 * t];
    r.rank.comms.world.all_gather(&[n as u64, has_labels as u64], &mut sizes)?;
    let chunks = sizes.chunks(2).map(|s| (s[0] as usize).div_ceil(b)).max().unwrap_or(0);
    let unlabeled: Vec<usize> = (0..t).filter(|&k| sizes[2 * k + 1] == 0).collect();
    r.rank.finish_pending(be)?;
    if r.rank.opts.fully_sharded {
        r.rank.average_weights(be)?;
    }
    let mut logits = Vec::with_capacity(chunks * b);
    for c in 0..chunks {
        let mut part = batch.slice(0..0);
        let mut i = c * b;
        while i < (c + 1) * b {
            let start = i % n;
            let end = (start + ((c + 1) * b - i)).min(n);
            part.extend(&batch.slice(start..end));
            i += end - start;
        }
        logits.extend(r.rank.predict(be, &part)?);
    }
    logits.truncate(n);
    let world = &r.rank.comms.world;
    let (all_logits, _) = world.all_gather_alloc(&logits)?;
    let (all_labels, _) = world.all_gather_alloc(&batch.labels)?;
    // Every rank made the same collectives above; only now may ranks differ in their verdict.
    if wants_metrics && !unlabeled.is_empty() {
        return fail(EmberStatus::ErrInvalidArgument, format!("metrics_out asks for metrics but ranks {unlabeled:?} passed no labels"));
    }
    let m = engine::metrics::evaluate(&all_logits, &all_labels);
    Ok((logits, EmberMetrics { loss: m.loss, ne: m.ne, auc: m.auc, samples: m.samples as u64 }))
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
        10 => "EMBER_STATUS_ERR_PEER\0",
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

/// Create an engine from the text of a TOML config: the format of `ember train --config` (model,
/// optimizer, batch_size, seed; docs/cli.md) plus, optionally, a top-level `grid = "MxN"` and a
/// `[parallel]` table (`sync_every`, `sync` = "sparse"|"full", `delayed_state_sync`,
/// `fully_sharded`, `placement` = "in-node"|"across-nodes", `sharding` =
/// "table"|"row"|"column"|"table-row"); docs/capi.md.
///
/// Which engine: when the process was started by a launcher as one of T > 1 ranks (`ember
/// launch`, mpirun, srun, torchrun: rank, size and rendezvous from the environment), this call
/// is collective: every rank calls it with the same config, joins the job, and gets a handle
/// driving its rank of a grid of T ranks (the config's grid, which must have T ranks, or 1xT).
/// Create one such engine per launched process. Otherwise the engine is the whole model in this
/// process; a config whose grid has more than one rank is then `EMBER_STATUS_ERR_CONFIG` (use
/// `ember_engine_create_local_ranks`).
///
/// `toml` is a NUL-terminated UTF-8 string owned by the caller (only read during the call). On
/// success `*out` receives a new handle that the caller owns and must release with
/// `ember_engine_destroy`; on failure `*out` is left unchanged.
/// Returns `EMBER_STATUS_ERR_NULL_POINTER` if `toml` or `out` is NULL, `EMBER_STATUS_ERR_CONFIG`
/// if the config does not parse, validate or fit the job, `EMBER_STATUS_ERR_INTERNAL` if joining
/// the job fails (rendezvous, token, peers, timeout).
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_from_toml(toml: *const c_char, out: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        let text = c_str(toml, "toml")?;
        check_out(out, "out")?;
        create(parse_config(text)?, out)
    })
}

/// Create an engine from a TOML config file at `path` (NUL-terminated, caller-owned): as
/// `ember_engine_create_from_toml` with the file's text (also collective under a launcher).
/// Returns `EMBER_STATUS_ERR_IO` if the file cannot be read, `EMBER_STATUS_ERR_CONFIG` if its
/// text is rejected.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_from_file(path: *const c_char, out: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        let path = c_str(path, "path")?;
        check_out(out, "out")?;
        let text = std::fs::read_to_string(path).or_else(|e| fail(EmberStatus::ErrIo, format!("{path}: {e}")))?;
        create(parse_config(&text)?, out)
    })
}

/// Create an engine from a built-in preset ("tiny", "kaggle", "terabyte", "dlrmv2", "bench";
/// see `ember presets`). `row_cap` caps every table's rows (0: the preset's own default cap).
/// Under a launcher the engine is this process's rank of a 1xT grid (collective), as for
/// `ember_engine_create_from_toml`. Ownership of `*out` as there. Returns
/// `EMBER_STATUS_ERR_CONFIG` for an unknown name.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_from_preset(name: *const c_char, row_cap: u64, out: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        let name = c_str(name, "name")?;
        check_out(out, "out")?;
        let train = preset(name, (row_cap > 0).then_some(row_cap))?;
        create(EngineConfig { train, grid: None, opts: ParallelOptions::default(), sharding: None }, out)
    })
}

/// Create `n` in-process ranks of one 2D job from the text of a TOML config (format as for
/// `ember_engine_create_from_toml`; its grid must have `n` ranks, default 1 x n), one handle per
/// rank: `out_handles` is a caller-owned array of `n` handle slots; slot w receives world rank
/// w's handle. The ranks talk through this process's memory (collective timeout:
/// EMBER_TIMEOUT_MS, default 60 s). Calls that communicate (`ember_train_step`, `ember_eval`,
/// `ember_save_checkpoint`, `ember_load_checkpoint`, `ember_bench_collective`) are collective:
/// drive each handle from its own thread, every rank making the same sequence of calls; they
/// block until all ranks have called. The caller owns every handle and destroys each with
/// `ember_engine_destroy`. On failure no slot is written and no handle exists.
/// Returns `EMBER_STATUS_ERR_NULL_POINTER` if `toml` or `out_handles` is NULL,
/// `EMBER_STATUS_ERR_INVALID_ARGUMENT` if `n` is 0 or above 4096, `EMBER_STATUS_ERR_CONFIG` if
/// the config is rejected or its grid or batch size does not fit `n` ranks.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_local_ranks(toml: *const c_char, n: usize, out_handles: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        let text = c_str(toml, "toml")?;
        check_out(out_handles, "out_handles")?;
        if n == 0 || n > 4096 {
            return fail(EmberStatus::ErrInvalidArgument, format!("n is {n}: expected 1 to 4096 ranks"));
        }
        let ec = parse_config(text)?;
        let grid = grid_for(&ec, n, "ember_engine_create_local_ranks")?;
        let p = plan_for(&ec, grid)?;
        let comms = ember_transport::local_world_with_timeout(n, local_timeout());
        let built: Vec<R<State>> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|world| {
                    let (ec, p) = (&ec, p.clone());
                    s.spawn(move || build_rank(ec, grid, p, world))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|p| fail(EmberStatus::ErrPanic, format!("panic inside ember: {}", panic_message(&*p)))))
                .collect()
        });
        let states = built.into_iter().collect::<R<Vec<State>>>()?;
        for (w, st) in states.into_iter().enumerate() {
            *out_handles.add(w) = register(st);
        }
        Ok(())
    })
}

/// Release an engine and everything it owns. `engine` may be NULL (a no-op returning
/// `EMBER_STATUS_OK`). The handle is invalid afterwards; using it again (or destroying it twice)
/// returns `EMBER_STATUS_ERR_INVALID_HANDLE` unless its address was reused by a newer engine.
/// Not collective: the ranks of a job may be destroyed in any order (a rank still waiting in a
/// collective for a destroyed peer fails with a transport error after the timeout).
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
                // `register` and has not been freed (removal above makes this the only free).
                drop(Box::from_raw(engine));
                drop(state);
                Ok(())
            }
            None => fail(EmberStatus::ErrInvalidHandle, format!("engine handle {engine:p} is not live (destroyed twice?)")),
        }
    })
}

/// Fill `*out` (caller-owned) with the model's shape, the engine's place in its job (rank,
/// world size, grid, the local batch size and the first sample of this rank's slice) and its
/// progress. Not collective. Returns `EMBER_STATUS_ERR_NULL_POINTER` /
/// `EMBER_STATUS_ERR_INVALID_HANDLE` for a bad argument.
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
                let w = r.rank.comms.world.rank();
                let range = r.grid.sample_range(w, st.cfg.batch_size);
                info.local_batch_size = range.len();
                info.sample_start = range.start;
                info.rank = w;
                info.world_size = r.grid.world();
                info.grid_m = r.grid.m;
                info.grid_n = r.grid.n;
                info.steps_done = r.rank.steps_done as u64;
            }
            Ok(info)
        })?;
        *out = info;
        Ok(())
    })
}

/// Number of rows of table `table` into `*rows_out` (caller-owned): ids of feature `table` must
/// be below it. Not collective. Returns `EMBER_STATUS_ERR_INVALID_ARGUMENT` if
/// `table >= num_tables`.
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
///
/// Multi-rank engines: collective. Each rank passes its slice of the global batch: exactly
/// `local_batch_size` = B / world_size samples, samples [sample_start, sample_start +
/// local_batch_size) of the global batch (`ember_engine_info`). `*loss_out` is the mean loss
/// over the whole global batch, identical on every rank. If any rank's arguments are rejected,
/// no rank trains: that rank gets the reason, the others `EMBER_STATUS_ERR_PEER`.
///
/// Returns `EMBER_STATUS_ERR_INVALID_ARGUMENT` for sizes that do not match (batch_size 0 or not
/// the local batch size of a rank, ids count), `EMBER_STATUS_ERR_INPUT` for bad contents (the
/// model is unchanged in both cases), `EMBER_STATUS_ERR_NUMERIC` if the loss is not finite.
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
                    let batch = read_batch(cfg, batch_size, dense, labels, false, lengths, ids, num_ids)?;
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
                        read_batch(cfg, batch_size, dense, labels, false, lengths, ids, num_ids)
                    };
                    on_rank(r, |r| {
                        let batch = agree(&r.rank.comms.world, mine)?;
                        let loss = r.rank.train_step(be, &batch)?;
                        *samples_seen += batch_size as u64;
                        Ok(loss)
                    })
                }
            }
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
/// Single-process engines process large batches in chunks of the config's batch size (at most
/// 8192). Multi-rank engines: collective; each rank passes any number of its own samples (> 0;
/// ranks may pass different numbers), processed in chunks of the local batch size; the logits
/// are this rank's, the metrics cover every rank's samples and are identical on every rank
/// (a rank asking for metrics gets `EMBER_STATUS_ERR_INVALID_ARGUMENT` if some rank passed no
/// labels).
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
                read_batch(&st.cfg, batch_size, dense, labels, true, lengths, ids, num_ids)
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
                    let batch = agree(&r.rank.comms.world, mine)?;
                    eval_ranked(be, r, batch, !labels.is_null(), !metrics_out.is_null())
                }),
            }
        })?;
        if !logits_out.is_null() {
            std::ptr::copy_nonoverlapping(logits.as_ptr(), logits_out, batch_size);
        }
        if !metrics_out.is_null() {
            *metrics_out = metrics;
        }
        Ok(())
    })
}

/// Save a checkpoint of the engine as training step `step` under the folder `dir`
/// (NUL-terminated, caller-owned; created if missing): the checkpoint is `dir/step-<step>`
/// (docs/checkpoint.md). It is complete once this returns `EMBER_STATUS_OK`; older checkpoints
/// in `dir` are kept. A single-process engine writes a 1x1-grid checkpoint under any `step`.
/// Multi-rank engines: collective, every rank passes the same `dir` (on a filesystem every rank
/// sees) and `step`, which must be the engine's `steps_done` (and, with M > 1 replicas without
/// fully-sharded training, a multiple of `sync_every`); checkpoints of any grid load into any
/// other grid or into a single-process engine of the same model.
/// Returns `EMBER_STATUS_ERR_IO` / `EMBER_STATUS_ERR_INPUT` if it cannot be written,
/// `EMBER_STATUS_ERR_INVALID_ARGUMENT` for a multi-rank `step` that is not `steps_done`.
#[no_mangle]
pub unsafe extern "C" fn ember_save_checkpoint(engine: *mut EmberEngine, dir: *const c_char, step: u64) -> EmberStatus {
    guard(|| {
        with_engine(engine, |st| {
            let dir = c_str(dir, "dir");
            let State { be, model, cfg, samples_seen, .. } = st;
            match model {
                Model::Single(model) => {
                    let pos = DataPosition { next_sample: *samples_seen, reader_offsets: Vec::new() };
                    rank2d::save_dlrm(be, model, cfg, Path::new(dir?), step, pos, usize::MAX)?;
                    Ok(())
                }
                Model::Ranked(r) => {
                    let done = r.rank.steps_done as u64;
                    let mine = dir.and_then(|d| {
                        if step != done {
                            fail(EmberStatus::ErrInvalidArgument, format!("step is {step} but a multi-rank engine saves the step it is at ({done} steps done)"))
                        } else {
                            Ok(d)
                        }
                    });
                    on_rank(r, |r| {
                        let dir = agree(&r.rank.comms.world, mine)?;
                        let w = r.rank.comms.world.rank();
                        let range = r.grid.sample_range(w, cfg.batch_size);
                        let pos = DataPosition { next_sample: done * cfg.batch_size as u64 + range.start as u64, reader_offsets: Vec::new() };
                        rank2d::save_rank2d(be, &mut r.rank, cfg, Path::new(dir), pos, usize::MAX)?;
                        Ok(())
                    })
                }
            }
        })
    })
}

/// Load a checkpoint into the engine: `dir` (NUL-terminated, caller-owned) is either a step
/// folder (`.../step-<S>`) or a checkpoint root, whose newest complete checkpoint is loaded.
/// Checkpoints of any grid load as long as the model and optimizer match the engine's config.
/// Sets the engine's step count to the checkpoint's step and writes it to `*step_out`
/// (caller-owned; may be NULL). On any error a single-process engine is unchanged.
/// Multi-rank engines: collective, every rank passes the same `dir`; if some ranks load and
/// others fail, every rank returns an error and the engines are unusable (destroy them); if
/// every rank fails (e.g. no checkpoint), every engine is unchanged.
/// Returns `EMBER_STATUS_ERR_IO` / `EMBER_STATUS_ERR_INPUT` for a missing or corrupt checkpoint,
/// `EMBER_STATUS_ERR_CONFIG` for one of another model.
#[no_mangle]
pub unsafe extern "C" fn ember_load_checkpoint(engine: *mut EmberEngine, dir: *const c_char, step_out: *mut u64) -> EmberStatus {
    guard(|| {
        let step = with_engine(engine, |st| {
            let dir = c_str(dir, "dir");
            let State { be, model, cfg, steps_done, samples_seen } = st;
            match model {
                Model::Single(model) => {
                    let ck = Checkpoint::open(Path::new(dir?))?;
                    let (step, pos) = rank2d::restore_dlrm(be, model, &ck, cfg)?;
                    *steps_done = step;
                    *samples_seen = pos.map(|p| p.next_sample).unwrap_or(0);
                    Ok(step)
                }
                Model::Ranked(r) => on_rank(r, |r| {
                    let dir = agree(&r.rank.comms.world, dir)?;
                    let loaded = (|| -> R<u64> {
                        let ck = Checkpoint::open(Path::new(dir))?;
                        r.rank.finish_pending(be)?;
                        rank2d::restore_rank2d(be, &mut r.rank, &ck, cfg)?;
                        Ok(r.rank.steps_done as u64)
                    })();
                    let code = match &loaded {
                        Ok(_) => 0u32,
                        Err(Failure(s, _)) => *s as u32,
                    };
                    let mut all = vec![0u32; r.grid.world()];
                    r.rank.comms.world.all_gather(&[code], &mut all)?;
                    let failed: Vec<usize> = (0..all.len()).filter(|&k| all[k] != 0).collect();
                    if !failed.is_empty() && failed.len() < all.len() {
                        let why = format!("checkpoint {dir}: ranks {failed:?} failed to load it while the others loaded it");
                        r.broken = Some(why.clone());
                        return match loaded {
                            Err(Failure(s, m)) => fail(s, format!("{m} ({why}; destroy the engines)")),
                            Ok(_) => fail(EmberStatus::ErrPeer, format!("{why}; destroy the engines")),
                        };
                    }
                    let step = loaded?;
                    *samples_seen = step * (cfg.batch_size / r.grid.world()) as u64;
                    Ok(step)
                }),
            }
        })?;
        if !step_out.is_null() {
            *step_out = step;
        }
        Ok(())
    })
}

/// Run a transport microbenchmark (nccl-tests style) over the engine's job: every rank of a
/// multi-rank engine (collective: every rank calls it with the same arguments), or a one-rank
/// world for a single-process engine. `collective` is `EMBER_BENCH_ALL_TO_ALL` or
/// `EMBER_BENCH_ALL_REDUCE`. Sizes run from `min_bytes` (>= 1) to `max_bytes`, multiplied by
/// `factor` (>= 2); a rank's buffers (`max_bytes`, times the number of ranks for all-to-all)
/// may not exceed `EMBER_BENCH_MAX_BYTES` each. Each size runs `warmup` untimed and
/// `iters` (>= 1) timed iterations, then one checked iteration with fresh seeded data compared
/// with expectations computed independently from the seeds. One row per size is written to
/// `rows_out`, a caller-owned array of `rows_cap` rows; `*nrows_out` (caller-owned) receives
/// the number of rows, also when `rows_cap` is too small (then nothing is measured and
/// `EMBER_STATUS_ERR_INVALID_ARGUMENT` is returned: call again with that many rows).
/// Returns `EMBER_STATUS_ERR_NULL_POINTER` for a NULL `rows_out` (with `rows_cap` > 0) or
/// `nrows_out`, `EMBER_STATUS_ERR_INVALID_ARGUMENT` for a value out of range,
/// `EMBER_STATUS_ERR_INTERNAL` for a transport failure.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ember_bench_collective(
    engine: *mut EmberEngine,
    collective: u32,
    min_bytes: usize,
    max_bytes: usize,
    factor: usize,
    iters: usize,
    warmup: usize,
    rows_out: *mut EmberBenchRow,
    rows_cap: usize,
    nrows_out: *mut usize,
) -> EmberStatus {
    guard(|| {
        let rows = with_engine(engine, |st| {
            let ranks = match &st.model {
                Model::Single(_) => 1,
                Model::Ranked(r) => r.grid.world(),
            };
            let checks = || -> R<(Collective, BenchOptions)> {
                check_out(nrows_out, "nrows_out")?;
                let which = match collective {
                    EMBER_BENCH_ALL_TO_ALL => Collective::AllToAll,
                    EMBER_BENCH_ALL_REDUCE => Collective::AllReduce,
                    o => return fail(EmberStatus::ErrInvalidArgument, format!("collective is {o}: expected EMBER_BENCH_ALL_TO_ALL (0) or EMBER_BENCH_ALL_REDUCE (1)")),
                };
                if min_bytes == 0 || min_bytes > max_bytes || max_bytes > EMBER_BENCH_MAX_BYTES || factor < 2 || iters == 0 {
                    return fail(
                        EmberStatus::ErrInvalidArgument,
                        format!("need 1 <= min_bytes ({min_bytes}) <= max_bytes ({max_bytes}) <= {EMBER_BENCH_MAX_BYTES}, factor ({factor}) >= 2 and iters ({iters}) >= 1"),
                    );
                }
                let buffer = if which == Collective::AllToAll { max_bytes.saturating_mul(ranks) } else { max_bytes };
                if buffer > EMBER_BENCH_MAX_BYTES {
                    return fail(
                        EmberStatus::ErrInvalidArgument,
                        format!("buffers of {buffer} bytes (max_bytes {max_bytes}{}) exceed EMBER_BENCH_MAX_BYTES ({EMBER_BENCH_MAX_BYTES})", if ranks > 1 && which == Collective::AllToAll { format!(" x {ranks} ranks") } else { String::new() }),
                    );
                }
                let mut n = 0usize;
                let mut size = min_bytes;
                while size <= max_bytes {
                    n += 1;
                    match size.checked_mul(factor) {
                        Some(s) => size = s,
                        None => break,
                    }
                }
                *nrows_out = n;
                if rows_cap < n {
                    return fail(EmberStatus::ErrInvalidArgument, format!("rows_cap is {rows_cap} but {n} sizes are measured"));
                }
                if rows_out.is_null() {
                    return fail(EmberStatus::ErrNullPointer, "rows_out is NULL");
                }
                let o = BenchOptions { min_bytes, max_bytes, factor, iters, warmup, check: 1, baseline: None, no_huge: false };
                Ok((which, o))
            };
            let mine = checks();
            let run = |c: &Comm, (which, o): (Collective, BenchOptions)| -> R<Vec<engine::comm_bench::Row>> {
                // The options were checked above: what fails now is the transport.
                engine::comm_bench::bench_rank(which, c, &o).or_else(|e| fail(EmberStatus::ErrInternal, format!("transport: bench {}: {e}", which.name())))
            };
            match &mut st.model {
                Model::Single(_) => {
                    let args = mine?;
                    let world = ember_transport::local_world(1).pop().expect("one rank");
                    run(&world, args)
                }
                Model::Ranked(r) => on_rank(r, |r| {
                    let world = &r.rank.comms.world;
                    let args = agree(world, mine)?;
                    run(world, args)
                }),
            }
        })?;
        for (i, r) in rows.iter().enumerate() {
            *rows_out.add(i) = EmberBenchRow { size: r.size, count: r.count, time_us: r.time_us, algbw: r.algbw, busbw: r.busbw, wrong: r.wrong };
        }
        *nrows_out = rows.len();
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
