//! Checkpoints through the ABI: saving an engine (a 1x1 grid, or collectively every rank's part)
//! and loading any grid's checkpoint into it.

use crate::args::c_str;
use crate::collective::{agree, on_rank};
use crate::handle::{with_engine, EmberEngine, Model, State};
use crate::status::{fail, guard, EmberStatus, Failure, R};
use engine::checkpoint::{rank2d, Checkpoint, DataPosition};
use std::ffi::c_char;
use std::path::Path;

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
///
/// # Safety
/// `dir` is NULL or a NUL-terminated string, valid during the call. `engine` may be any value.
#[no_mangle]
pub unsafe extern "C" fn ember_save_checkpoint(engine: *mut EmberEngine, dir: *const c_char, step: u64) -> EmberStatus {
    guard(|| {
        with_engine(engine, |st| {
            // SAFETY: `dir` is NULL or a NUL-terminated string valid during the call (this
            // function's contract), as `c_str` asks.
            let dir = unsafe { c_str(dir, "dir") };
            let State { be, model, cfg, samples_seen, .. } = st;
            match model {
                Model::Single(model) => {
                    let pos = DataPosition { next_sample: *samples_seen, reader_offsets: Vec::new() };
                    rank2d::save_dlrm(be, model, cfg, Path::new(dir?), step, pos, usize::MAX, None)?;
                    Ok(())
                }
                Model::Ranked(r) => {
                    let done = r.rank.steps_done() as u64;
                    let mine = dir.and_then(|d| {
                        if step != done {
                            fail(EmberStatus::ErrInvalidArgument, format!("step is {step} but a multi-rank engine saves the step it is at ({done} steps done)"))
                        } else {
                            Ok(d)
                        }
                    });
                    on_rank(r, |r| {
                        let dir = agree(&r.rank.world(), mine)?;
                        let w = r.rank.world().rank();
                        let range = r.grid.sample_range(w, cfg.batch_size);
                        let pos = DataPosition { next_sample: done * cfg.batch_size as u64 + range.start as u64, reader_offsets: Vec::new() };
                        rank2d::save_rank2d(be, &mut r.rank, cfg, Path::new(dir), pos, usize::MAX, None)?;
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
///
/// # Safety
/// `dir` is NULL or a NUL-terminated string, valid during the call; `step_out` is NULL or points
/// to a writable `uint64_t`. `engine` may be any value.
#[no_mangle]
pub unsafe extern "C" fn ember_load_checkpoint(engine: *mut EmberEngine, dir: *const c_char, step_out: *mut u64) -> EmberStatus {
    guard(|| {
        let step = with_engine(engine, |st| {
            // SAFETY: `dir` is NULL or a NUL-terminated string valid during the call (this
            // function's contract), as `c_str` asks.
            let dir = unsafe { c_str(dir, "dir") };
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
                    let dir = agree(&r.rank.world(), dir)?;
                    let loaded = (|| -> R<u64> {
                        let ck = Checkpoint::open(Path::new(dir))?;
                        rank2d::restore_rank2d(be, &mut r.rank, &ck, cfg)?;
                        Ok(r.rank.steps_done() as u64)
                    })();
                    let code = match &loaded {
                        Ok(_) => 0u32,
                        Err(Failure(s, _)) => *s as u32,
                    };
                    let mut all = vec![0u32; r.grid.world()];
                    r.rank.world().all_gather(&[code], &mut all)?;
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
            // SAFETY: non-NULL, and writable (this function's contract).
            unsafe { *step_out = step };
        }
        Ok(())
    })
}
