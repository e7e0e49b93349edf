//! Creating and destroying engines: a whole model in this process, this process's rank of a job
//! started by a launcher, or n in-process ranks with one handle each; and releasing a handle.

use crate::args::{c_str, check_out};
use crate::config::{grid_for, parse_config, plan_for, EngineConfig};
use crate::handle::{lock_registry, register, EmberEngine, Model, Ranked, State};
use crate::status::{fail, guard, panic_message, EmberStatus, R};
use engine::backend::Cpu;
use engine::config::{preset, JobConfig};
use engine::grid::{Grid, GridComms, Placement};
use engine::model::Dlrm;
use engine::parallel::Rank2D;
use ember_transport::{Comm, JoinConfig};
use std::ffi::c_char;
use std::time::Duration;

fn build_rank(ec: &EngineConfig, grid: Grid, p: engine::plan::Plan, world: Comm) -> R<State> {
    let be = Cpu::new();
    let gc = GridComms::new(grid, world)?;
    let rank = Rank2D::new(&be, &ec.train, gc, p, ec.job.parallel.clone())?;
    Ok(State { cfg: ec.train.clone(), be, model: Model::Ranked(Box::new(Ranked { rank, grid, broken: None })), steps_done: 0, samples_seen: 0 })
}

/// Collective timeout of in-process ranks: EMBER_TIMEOUT_MS (1 ms to 7 days), else the
/// transport's default; another value is a config error naming the variable.
fn local_timeout() -> R<Duration> {
    ember_transport::bootstrap::timeout_from_env().or_else(|e| fail(EmberStatus::ErrConfig, e.to_string()))
}

/// Create one engine: a whole model, or this process's rank when a launcher started the
/// process as one of several ranks (or the config asks for a grid of more than one rank).
fn create(ec: EngineConfig, out: *mut *mut EmberEngine) -> R<()> {
    let wants_ranks = ec.job.grid.is_some_and(|(m, n)| m * n > 1);
    let join = match JoinConfig::from_env() {
        Ok(j) if j.size > 1 => Some(j),
        Ok(_) => None,
        Err(e) if wants_ranks => return fail(EmberStatus::ErrConfig, format!("launcher environment: {e}")),
        Err(_) => None,
    };
    let state = match join {
        None if wants_ranks => {
            let (m, n) = ec.job.grid.expect("checked");
            return fail(
                EmberStatus::ErrConfig,
                format!(
                    "config: grid {m}x{n} needs {} ranks but this process was not started by a launcher: run it under `ember launch -n {}` (or mpirun, srun, torchrun), or create in-process ranks with ember_engine_create_local_ranks",
                    m * n,
                    m * n
                ),
            );
        }
        None => {
            // The whole model in this process: its memory is checked before it is allocated.
            plan_for(&ec, Grid::new(1, 1, Placement::ReplicasInNode)?, true)?;
            let be = Cpu::new();
            let model = Dlrm::new(&be, &ec.train)?;
            State { cfg: ec.train, be, model: Model::Single(Box::new(model)), steps_done: 0, samples_seen: 0 }
        }
        Some(j) => {
            let grid = grid_for(&ec, j.size, "the launcher's job")?;
            let p = plan_for(&ec, grid, false)?;
            let world = Comm::connect(&j)?;
            build_rank(&ec, grid, p, world)?
        }
    };
    let h = register(state)?;
    // SAFETY: every caller of `create` (the create entry points) checked `out` non-null, and
    // their contract makes it a writable handle slot.
    unsafe { *out = h };
    Ok(())
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
/// if the config does not parse, validate or fit the job (an unknown key, a number out of
/// range), `EMBER_STATUS_ERR_INTERNAL` if joining the job fails (rendezvous, token, peers,
/// timeout) or the model needs more memory than there is (checked before allocating; the
/// environment variable `EMBER_MEMORY_AVAILABLE` overrides the measured figure).
///
/// # Safety
/// `toml` is NULL or a NUL-terminated string, valid during the call; `out` is NULL or points to a
/// writable handle slot.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_from_toml(toml: *const c_char, out: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        // SAFETY: `toml` is NULL or a NUL-terminated string valid during the call (this
        // function's contract), as `c_str` asks.
        let text = unsafe { c_str(toml, "toml") }?;
        check_out(out, "out")?;
        create(parse_config(text)?, out)
    })
}

/// Create an engine from a TOML config file at `path` (NUL-terminated, caller-owned): as
/// `ember_engine_create_from_toml` with the file's text (also collective under a launcher).
/// Returns `EMBER_STATUS_ERR_IO` if the file cannot be read, `EMBER_STATUS_ERR_CONFIG` if its
/// text is rejected.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string, valid during the call; `out` is NULL or points to a
/// writable handle slot.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_from_file(path: *const c_char, out: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        // SAFETY: `path` is NULL or a NUL-terminated string valid during the call (this
        // function's contract), as `c_str` asks.
        let path = unsafe { c_str(path, "path") }?;
        check_out(out, "out")?;
        let text = engine::config::read_config_file(std::path::Path::new(path))?;
        create(parse_config(&text)?, out)
    })
}

/// Create an engine from a built-in preset ("tiny", "kaggle", "terabyte", "dlrmv2", "bench";
/// see `ember presets`). `row_cap` caps every table's rows (0: the preset's own default cap).
/// Under a launcher the engine is this process's rank of a 1xT grid (collective), as for
/// `ember_engine_create_from_toml`. Ownership of `*out` as there. Returns
/// `EMBER_STATUS_ERR_CONFIG` for an unknown name.
///
/// # Safety
/// `name` is NULL or a NUL-terminated string, valid during the call; `out` is NULL or points to a
/// writable handle slot.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_from_preset(name: *const c_char, row_cap: u64, out: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        // SAFETY: `name` is NULL or a NUL-terminated string valid during the call (this
        // function's contract), as `c_str` asks.
        let name = unsafe { c_str(name, "name") }?;
        check_out(out, "out")?;
        let train = preset(name, (row_cap > 0).then_some(row_cap))?;
        create(EngineConfig { train, job: JobConfig::default() }, out)
    })
}

/// Create `n` in-process ranks of one 2D job from the text of a TOML config (format as for
/// `ember_engine_create_from_toml`; its grid must have `n` ranks, default 1 x n), one handle per
/// rank: `out_handles` is a caller-owned array of `n` handle slots; slot w receives world rank
/// w's handle. The ranks talk through this process's memory (collective timeout:
/// EMBER_TIMEOUT_MS, 1 ms to 7 days, default 60 s). Calls that communicate (`ember_train_step`, `ember_eval`,
/// `ember_save_checkpoint`, `ember_load_checkpoint`, `ember_bench_collective`) are collective:
/// drive each handle from its own thread, every rank making the same sequence of calls; they
/// block until all ranks have called. The caller owns every handle and destroys each with
/// `ember_engine_destroy`. On failure no slot is written and no handle exists.
/// Returns `EMBER_STATUS_ERR_NULL_POINTER` if `toml` or `out_handles` is NULL,
/// `EMBER_STATUS_ERR_INVALID_ARGUMENT` if `n` is 0 or above 4096, `EMBER_STATUS_ERR_CONFIG` if
/// the config is rejected, its grid or batch size does not fit `n` ranks, or EMBER_TIMEOUT_MS is
/// not a whole number of milliseconds in that range.
///
/// # Safety
/// `toml` is NULL or a NUL-terminated string, valid during the call; `out_handles` is NULL or
/// points to `n` writable handle slots.
#[no_mangle]
pub unsafe extern "C" fn ember_engine_create_local_ranks(toml: *const c_char, n: usize, out_handles: *mut *mut EmberEngine) -> EmberStatus {
    guard(|| {
        // SAFETY: `toml` is NULL or a NUL-terminated string valid during the call (this
        // function's contract), as `c_str` asks.
        let text = unsafe { c_str(toml, "toml") }?;
        check_out(out_handles, "out_handles")?;
        if n == 0 || n > 4096 {
            return fail(EmberStatus::ErrInvalidArgument, format!("n is {n}: expected 1 to 4096 ranks"));
        }
        let ec = parse_config(text)?;
        let grid = grid_for(&ec, n, "ember_engine_create_local_ranks")?;
        let p = plan_for(&ec, grid, true)?;
        let comms = ember_transport::local_world_with_timeout(n, local_timeout()?);
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
        let mut handles = Vec::with_capacity(n);
        for st in states {
            match register(st) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // No slot is written on failure: release the handles made so far.
                    handles.into_iter().for_each(|h| drop(lock_registry().remove(h as usize)));
                    return Err(e);
                }
            }
        }
        for (w, h) in handles.into_iter().enumerate() {
            // SAFETY: `out_handles` is non-NULL (checked above) with `n` writable slots (this
            // function's contract), and there is one handle per rank: w < n.
            unsafe { *out_handles.add(w) = h };
        }
        Ok(())
    })
}

/// Release an engine and everything it owns. `engine` may be NULL (a no-op returning
/// `EMBER_STATUS_OK`). The handle is invalid afterwards, for good: using it again (or destroying
/// it twice) returns `EMBER_STATUS_ERR_INVALID_HANDLE`, whatever engines were created since.
/// Not collective: the ranks of a job may be destroyed in any order (a rank still waiting in a
/// collective for a destroyed peer fails with a transport error after the timeout).
///
/// # Safety
/// None beyond any C call's: `engine` may be any value (it is looked up among the live handles,
/// never dereferenced).
#[no_mangle]
pub unsafe extern "C" fn ember_engine_destroy(engine: *mut EmberEngine) -> EmberStatus {
    guard(|| {
        if engine.is_null() {
            return Ok(());
        }
        let removed = lock_registry().remove(engine as usize);
        match removed {
            Some(state) => {
                drop(state);
                Ok(())
            }
            None => fail(EmberStatus::ErrInvalidHandle, format!("engine handle {engine:p} is not live (destroyed twice?)")),
        }
    })
}
