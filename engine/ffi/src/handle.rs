//! The engine handle: the opaque `EmberEngine` the caller holds, the state behind it (a whole
//! model or one rank of 2D training), and the registry of live handles that turns a stale or
//! foreign handle into `EMBER_STATUS_ERR_INVALID_HANDLE` and serializes calls on one handle.
//! Handles are slot indices with a generation, never addresses, so a destroyed engine's handle
//! stays invalid even after a new engine takes its slot.

use crate::status::{fail, EmberStatus, R};
use engine::backend::Cpu;
use engine::config::TrainConfig;
use engine::grid::Grid;
use engine::model::Dlrm;
use engine::parallel::Rank2D;
use std::sync::{Arc, Mutex, OnceLock};

/// An engine: a DLRM model (or one rank's part of it) with its optimizer state, on the CPU
/// backend. Opaque; created by `ember_engine_create_*`, released by `ember_engine_destroy`. A
/// handle is a token, not an address (never dereference it); a destroyed engine's handle is
/// never valid again. A handle may be used from any thread; calls on one handle are serialized
/// by the library.
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

/// Bits of a handle's value that hold the slot (the rest hold the generation).
const SLOT_BITS: u32 = usize::BITS / 2;

/// The live engines. A handle is not an address but `generation << SLOT_BITS | (slot + 1)`:
/// destroying an engine bumps its slot's generation, so an old handle never names the engine a
/// later create puts in the same slot.
#[derive(Default)]
pub(crate) struct Registry {
    slots: Vec<(usize, Option<Shared>)>,
    free: Vec<usize>,
}

impl Registry {
    fn decode(h: usize) -> Option<(usize, usize)> {
        let slot = (h & ((1usize << SLOT_BITS) - 1)).checked_sub(1)?;
        Some((slot, h >> SLOT_BITS))
    }

    fn get(&self, h: usize) -> Option<&Shared> {
        let (slot, generation) = Self::decode(h)?;
        match self.slots.get(slot) {
            Some((g, Some(s))) if *g == generation => Some(s),
            _ => None,
        }
    }

    /// Store `state`; the handle, or None when every slot is taken.
    fn insert(&mut self, state: Shared) -> Option<usize> {
        let slot = match self.free.pop() {
            Some(i) => i,
            None if self.slots.len() + 1 < 1usize << SLOT_BITS => {
                self.slots.push((1, None));
                self.slots.len() - 1
            }
            None => return None,
        };
        self.slots[slot].1 = Some(state);
        Some((self.slots[slot].0 << SLOT_BITS) | (slot + 1))
    }

    /// Take the engine of `h` out; its slot's generation moves on (a slot whose generation
    /// would wrap is retired instead of reused).
    pub(crate) fn remove(&mut self, h: usize) -> Option<Shared> {
        self.get(h)?;
        let (slot, _) = Self::decode(h)?;
        let e = &mut self.slots[slot];
        let state = e.1.take();
        e.0 += 1;
        if e.0 < 1usize << (usize::BITS - SLOT_BITS) {
            self.free.push(slot);
        }
        state
    }
}

fn registry() -> &'static Mutex<Registry> {
    static REG: OnceLock<Mutex<Registry>> = OnceLock::new();
    REG.get_or_init(Default::default)
}

pub(crate) fn lock_registry() -> std::sync::MutexGuard<'static, Registry> {
    // The registry is only touched by code that cannot panic while holding it.
    registry().lock().unwrap_or_else(|e| e.into_inner())
}

/// The live state behind `h` (shared, so that a concurrent destroy cannot free it under us).
fn lookup(h: *const EmberEngine) -> R<Shared> {
    if h.is_null() {
        return fail(EmberStatus::ErrNullPointer, "engine handle is NULL");
    }
    match lock_registry().get(h as usize) {
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

/// A new handle for `state` (a value, never dereferenced: see [`Registry`]).
pub(crate) fn register(state: State) -> R<*mut EmberEngine> {
    match lock_registry().insert(Arc::new(Mutex::new(state))) {
        Some(h) => Ok(h as *mut EmberEngine),
        None => fail(EmberStatus::ErrInternal, "too many live engines"),
    }
}
