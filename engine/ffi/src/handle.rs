//! The engine handle: the opaque `EmberEngine` the caller holds, the state behind it (a whole
//! model or one rank of 2D training), and the registry of live handles that turns a stale or
//! foreign pointer into `EMBER_STATUS_ERR_INVALID_HANDLE` and serializes calls on one handle.

use crate::status::{fail, EmberStatus, R};
use engine::backend::Cpu;
use engine::config::TrainConfig;
use engine::grid::Grid;
use engine::model::Dlrm;
use engine::parallel::Rank2D;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

/// An engine: a DLRM model (or one rank's part of it) with its optimizer state, on the CPU
/// backend. Opaque; created by `ember_engine_create_*`, released by `ember_engine_destroy`. A
/// handle may be used from any thread; calls on one handle are serialized by the library.
pub struct EmberEngine {
    _opaque: u8,
}

/// One rank of 2D training.
pub(crate) struct Ranked {
    pub(crate) rank: Rank2D<Cpu>,
    pub(crate) grid: Grid,
    /// Set when a collective failed midway: this rank may disagree with the others.
    pub(crate) broken: Option<String>,
}

pub(crate) enum Model {
    /// The whole model in this process (1x1).
    Single(Box<Dlrm<Cpu>>),
    /// One rank of a multi-rank job.
    Ranked(Box<Ranked>),
}

pub(crate) struct State {
    pub(crate) cfg: TrainConfig,
    pub(crate) be: Cpu,
    pub(crate) model: Model,
    /// Single-process engines only (a rank counts its own steps).
    pub(crate) steps_done: u64,
    pub(crate) samples_seen: u64,
}

type Shared = Arc<Mutex<State>>;

fn registry() -> &'static Mutex<BTreeMap<usize, Shared>> {
    static REG: OnceLock<Mutex<BTreeMap<usize, Shared>>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

pub(crate) fn lock_registry() -> std::sync::MutexGuard<'static, BTreeMap<usize, Shared>> {
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

pub(crate) fn with_engine<T>(h: *const EmberEngine, f: impl FnOnce(&mut State) -> R<T>) -> R<T> {
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

pub(crate) fn register(state: State) -> *mut EmberEngine {
    let token = Box::into_raw(Box::new(EmberEngine { _opaque: 0 }));
    lock_registry().insert(token as usize, Arc::new(Mutex::new(state)));
    token
}
