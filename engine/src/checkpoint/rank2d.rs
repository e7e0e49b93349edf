//! Checkpoints of the engine's two models: a 2D rank (`Rank2D`, collective over the world) and
//! the single-process `Dlrm` (a 1×1 grid with every table whole on rank 0).
//!
//! Saving a 2D run: every rank calls [`save_rank2d`] after the same step. World rank 0 prepares
//! the folder; replica g = 0 of every replica group writes its shards (after a sync the M
//! replicas are identical), and with delayed state sync or fully-sharded 2D, where they are not,
//! every replica also writes its own copies ([`super::replica`]); world rank 0 writes the dense
//! file; every rank's data position and file list are gathered to rank 0, which commits the
//! manifest. Any rank's failure makes every rank return an error and no manifest is written.
use super::replica::{self, PendingRows, ReplicaShard};
use super::{write, Checkpoint, DataPosition, FileEntry, RankPosition, RunInfo};
use crate::backend::Backend;
use crate::config::TrainConfig;
use crate::grid::Grid;
use crate::model::Dlrm;
use crate::parallel::sync::PendingState;
use crate::parallel::Rank2D;
use crate::plan::{Plan, PlacedShard, ShardingType, TablePlan};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// Host view of a backend buffer (zero-copy on the CPU backend).
fn host<'a, B: Backend>(be: &B, buf: &'a B::Buf) -> Result<Cow<'a, [f32]>> {
    Ok(match be.host(buf) {
        Some(h) => Cow::Borrowed(h),
        None => Cow::Owned(be.download(buf)?),
    })
}

#[derive(Serialize, Deserialize)]
struct RankReport {
    ok: Option<String>,
    position: RankPosition,
    files: Vec<FileEntry>,
}

/// Save a checkpoint of step `rank.steps_done` under `root` (collective: every rank of the
/// world calls it after the same step). Saving changes nothing in the rank: a run that
/// checkpoints is bitwise the run that does not. The shard files hold the model as evaluation
/// sees it — replica 0's shards, with a pending delayed state average applied and fully-sharded
/// weights averaged, computed on copies; in those two modes every replica also writes its own
/// copies and the pending average ([`super::replica`]; fully-sharded 2D: M × the shard bytes)
/// so that a resume continues exactly. Under M > 1 without fully-sharded 2D the step must end
/// on a replica sync (steps_done % sync_every == 0). Keeps the newest `keep` complete
/// checkpoints of run `run_id` (the root's owner, see [`super::claim`]; only world rank 0's
/// matters). Returns the step folder.
#[allow(clippy::too_many_arguments)]
pub fn save_rank2d<B: Backend>(be: &B, rank: &mut Rank2D<B>, cfg: &TrainConfig, root: &Path, position: DataPosition, keep: usize, run_id: Option<&str>) -> Result<PathBuf> {
    let grid = rank.grid();
    let (fully_sharded, sync_every) = (rank.opts().fully_sharded, rank.opts().sync_every);
    let fs = fully_sharded && grid.m > 1;
    if grid.m > 1 && !fs && rank.steps_done() % sync_every != 0 {
        return Err(Error::Config(format!(
            "checkpoint at step {}: not a replica-sync step (sync every {}); checkpoint steps must be multiples of K",
            rank.steps_done(),
            sync_every
        )));
    }
    let (g, _) = rank.comms().coords();
    let spr: Vec<usize> = rank.shards().iter().map(|s| rank.emb_update().state_per_row(s.spec.num_cols())).collect();
    // Fully-sharded 2D: the model is the replicas' average (collective: every replica takes part).
    let model_weights = if fs { Some(rank.averaged_weights(be)?) } else { None };
    // Delayed state sync: the pending average, and (replica 0) the state with it applied.
    let mut model_states = None;
    if g == 0 && rank.pending_mut().is_some() {
        let mut st = Vec::with_capacity(rank.shards().len());
        for s in rank.shards() {
            st.push(be.download(&s.state)?);
        }
        model_states = Some(st);
    }
    let pending: Option<Vec<PendingRows>> = match rank.pending_mut() {
        None => None,
        Some(p) => {
            if let Some(st) = model_states.as_mut() {
                p.applied_to(st, &spr)?;
            }
            let (rows, snapshot, mean) = p.parts()?;
            let mut out = Vec::with_capacity(rows.len());
            let mut pos = 0;
            for (r, &k) in rows.iter().zip(&spr) {
                let n = r.len() * k;
                out.push(PendingRows { rows: r.clone(), snapshot: snapshot[pos..pos + n].to_vec(), mean: mean[pos..pos + n].to_vec() });
                pos += n;
            }
            Some(out)
        }
    };
    // Replicas differ at this step: each writes its own copies too.
    let own = fs || pending.is_some();
    let step = rank.steps_done() as u64;
    let w = rank.world().rank();
    // 1. Rank 0 prepares the folder; everyone learns whether it could.
    let dir = root.join(super::step_dir_name(step));
    let mut st = [0u8];
    let prep = if w == 0 { write::prepare(root, step).map(|_| ()) } else { Ok(()) };
    if prep.is_err() {
        st[0] = 1;
    }
    rank.world().broadcast(&mut st, 0)?;
    prep?;
    if st[0] != 0 {
        return Err(Error::Input(format!("checkpoint {}: rank 0 could not prepare the folder", dir.display())));
    }
    // 2. Every rank writes its files.
    let mut files = Vec::new();
    let mut write_mine = || -> Result<()> {
        if g == 0 {
            for (i, sh) in rank.shards().iter().enumerate() {
                let weights = match &model_weights {
                    Some(mw) => Cow::Borrowed(&mw[i][..]),
                    None => host(be, &sh.weights)?,
                };
                let state = match &model_states {
                    Some(ms) => Cow::Borrowed(&ms[i][..]),
                    None => host(be, &sh.state)?,
                };
                files.push(write::write_shard(&dir, &sh.spec, &weights, &state)?);
            }
        }
        if own {
            for (i, sh) in rank.shards().iter().enumerate() {
                let weights = if fs { Some(host(be, &sh.weights)?) } else { None };
                let p = pending.as_ref().map(|p| &p[i]);
                files.push(replica::write_replica(&dir, &sh.spec, g, weights.as_deref(), &host(be, &sh.state)?, p)?);
            }
        }
        if w == 0 {
            let mut ps = Vec::new();
            for p in rank.dense_params() {
                ps.push((be.download(&p.w)?, be.download(&p.s)?));
            }
            let views: Vec<(&[f32], &[f32])> = ps.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
            files.push(write::write_dense(&dir, &views)?);
        }
        if !files.is_empty() {
            write::sync_dir(&dir)?;
        }
        Ok(())
    };
    let mine = write_mine();
    let report = RankReport {
        ok: mine.as_ref().err().map(|e| e.to_string()),
        position: RankPosition { world_rank: w, coords: rank.comms().coords(), data: position },
        files,
    };
    // 3. Gather to everyone (so that every rank returns the same verdict); rank 0 commits.
    let bytes = serde_json::to_vec(&report).map_err(|e| Error::Input(format!("checkpoint: {e}")))?;
    let (all, counts) = rank.world().all_gather_alloc(&bytes)?;
    let mut reports = Vec::new();
    let mut pos = 0;
    for c in counts {
        let r: RankReport = serde_json::from_slice(&all[pos..pos + c]).map_err(|e| Error::Input(format!("checkpoint: rank report: {e}")))?;
        pos += c;
        reports.push(r);
    }
    mine?;
    if let Some((r, e)) = reports.iter().find_map(|r| r.ok.as_ref().map(|e| (r.position.world_rank, e))) {
        return Err(Error::Input(format!("checkpoint {}: rank {r} failed: {e}", dir.display())));
    }
    let mut st = [0u8];
    let done = if w == 0 {
        let positions = reports.iter().map(|r| r.position.clone()).collect();
        let files = reports.into_iter().flat_map(|r| r.files).collect();
        let run = RunInfo::new(cfg, grid, rank.plan().clone(), rank.emb_update().c);
        write::commit(&dir, step, run, positions, files, keep, run_id).map(|_| ())
    } else {
        Ok(())
    };
    if done.is_err() {
        st[0] = 1;
    }
    rank.world().broadcast(&mut st, 0)?;
    done?;
    if st[0] != 0 {
        return Err(Error::Input(format!("checkpoint {}: rank 0 could not write the manifest", dir.display())));
    }
    Ok(dir)
}

/// Load a checkpoint into a freshly built rank (any grid and plan: every local shard is
/// assembled from whichever saved shards cover it; the optimizer state is rescaled to this
/// rank's momentum-scaling constant). On the grid, plan, c and mode that wrote it, a checkpoint
/// with replica files (delayed state sync, fully-sharded 2D) loads this replica's own copies and
/// pending state average instead, so the run continues bitwise. Everything is read and verified
/// into host memory before the rank is touched: on any error the rank is unchanged. Sets
/// `steps_done` to the saved step and the pending state average (None unless restored), and
/// returns this rank's saved data position when the grid is the same (None otherwise: the caller
/// derives it from the step).
pub fn restore_rank2d<B: Backend>(be: &B, rank: &mut Rank2D<B>, ck: &Checkpoint, cfg: &TrainConfig) -> Result<Option<DataPosition>> {
    ck.check_compatible(cfg)?;
    let c = rank.emb_update().c;
    let mut shards = rank.shards().iter().map(|sh| ck.read_shard(&sh.spec, Some(c))).collect::<Result<Vec<_>>>()?;
    let mut pending = None;
    if let Some(own) = own_copies(ck, rank)? {
        let mut parts = (Vec::new(), Vec::new(), Vec::new());
        for ((w, s), r) in shards.iter_mut().zip(own) {
            if let Some(rw) = r.weights {
                *w = rw;
            }
            *s = r.state;
            if let Some(p) = r.pending {
                parts.0.push(p.rows);
                parts.1.extend(p.snapshot);
                parts.2.extend(p.mean);
            }
        }
        if !parts.0.is_empty() {
            let spr: Vec<usize> = rank.shards().iter().map(|s| rank.emb_update().state_per_row(s.spec.num_cols())).collect();
            pending = Some(PendingState::from_parts(parts.0, parts.1, parts.2, &spr).map_err(|e| Error::Input(format!("checkpoint {}: {e}", ck.dir.display())))?);
        }
    }
    let dense = ck.read_dense()?;
    let params = rank.dense_params();
    check_dense(ck, &dense, params.iter().map(|p| (be.len(&p.w), be.len(&p.s))))?;
    for ((w, s), sh) in shards.iter().zip(rank.shards()) {
        if w.len() != be.len(&sh.weights) || s.len() != be.len(&sh.state) {
            return Err(Error::Input(format!("checkpoint {}: table {} shard has another state layout", ck.dir.display(), sh.spec.table)));
        }
    }
    // Upload everything first, then swap in (an upload failure leaves the rank unchanged).
    let up_sh = shards.iter().map(|(w, s)| Ok((be.upload(w)?, be.upload(s)?))).collect::<Result<Vec<_>>>()?;
    let up_dn = dense.iter().map(|(w, s)| Ok((be.upload(w)?, be.upload(s)?))).collect::<Result<Vec<_>>>()?;
    rank.restore(up_sh, up_dn, ck.step() as usize, pending);
    let same_grid = ck.manifest.run.grid == rank.grid();
    Ok(if same_grid { ck.position(rank.world().rank()).map(|p| p.data.clone()) } else { None })
}

/// This replica's own copies of its shards, when the checkpoint has them and was written by the
/// same grid, plan, c and mode (fully-sharded 2D: weights; delayed state sync: a pending
/// average); None otherwise (the shard files are the model then).
fn own_copies<B: Backend>(ck: &Checkpoint, rank: &Rank2D<B>) -> Result<Option<Vec<ReplicaShard>>> {
    let run = &ck.manifest.run;
    let grid = rank.grid();
    let fs = rank.opts().fully_sharded && grid.m > 1;
    let delayed = rank.opts().delayed_state_sync && !fs && grid.m > 1;
    if !(fs || delayed) || run.grid != grid || *rank.plan() != run.plan || run.c != rank.emb_update().c {
        return Ok(None);
    }
    let (g, _) = rank.comms().coords();
    let mut out = Vec::with_capacity(rank.shards().len());
    for sh in rank.shards() {
        let found = ck.manifest.replicas().find(|(_, spec, r)| **spec == sh.spec && *r == g);
        let Some((f, _, _)) = found else {
            if out.is_empty() {
                return Ok(None);
            }
            return Err(Error::Input(format!("checkpoint {}: replica {g} has copies of some shards but not of table {}'s", ck.dir.display(), sh.spec.table)));
        };
        let mode = match &f.kind {
            super::FileKind::Replica { weights, pending_rows, .. } => *weights == fs && pending_rows.is_some() == delayed,
            _ => false,
        };
        if !mode {
            return Ok(None);
        }
        out.push(replica::read_replica(ck, f)?);
    }
    Ok(Some(out))
}

fn check_dense(ck: &Checkpoint, saved: &[(Vec<f32>, Vec<f32>)], want: impl Iterator<Item = (usize, usize)>) -> Result<()> {
    let want: Vec<_> = want.collect();
    let got: Vec<_> = saved.iter().map(|(w, s)| (w.len(), s.len())).collect();
    if want != got {
        return Err(Error::Input(format!("checkpoint {}: dense parameters of shapes {got:?}, this model has {want:?}", ck.dir.join(super::DENSE_FILE).display())));
    }
    Ok(())
}

/// The plan of a single-process model: every table whole on rank 0 of a 1×1 grid.
pub fn single_plan(cfg: &TrainConfig) -> Plan {
    let tables = cfg
        .model
        .tables
        .iter()
        .enumerate()
        .map(|(t, tc)| TablePlan { table: t, kind: ShardingType::TableWise, shards: vec![PlacedShard { rank: 0, rows: 0..tc.rows, cols: 0..tc.dim }] })
        .collect();
    Plan { n: 1, tables }
}

/// Save the single-process model after `step` steps (a 1×1 checkpoint; loads into any grid).
/// Keeps the newest `keep` complete checkpoints of run `run_id` (the root's owner, see
/// [`super::claim`]; None: a root no run has claimed).
#[allow(clippy::too_many_arguments)]
pub fn save_dlrm<B: Backend>(be: &B, model: &mut Dlrm<B>, cfg: &TrainConfig, root: &Path, step: u64, position: DataPosition, keep: usize, run_id: Option<&str>) -> Result<PathBuf> {
    let dir = write::prepare(root, step)?;
    let mut files = Vec::new();
    for sh in &model.tables {
        files.push(write::write_shard(&dir, &sh.spec, &host(be, &sh.weights)?, &host(be, &sh.state)?)?);
    }
    let mut ps = Vec::new();
    for p in model.dense.params_mut() {
        ps.push((be.download(&p.w)?, be.download(&p.s)?));
    }
    let views: Vec<(&[f32], &[f32])> = ps.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
    files.push(write::write_dense(&dir, &views)?);
    let grid = Grid::new(1, 1, Default::default())?;
    let run = RunInfo::new(cfg, grid, single_plan(cfg), model.emb_upd.c);
    let positions = vec![RankPosition { world_rank: 0, coords: (0, 0), data: position }];
    write::commit(&dir, step, run, positions, files, keep, run_id)
}

/// Load a checkpoint (of any grid) into a single-process model; returns (step, rank 0's
/// position when the checkpoint is 1×1). On any error the model is unchanged.
pub fn restore_dlrm<B: Backend>(be: &B, model: &mut Dlrm<B>, ck: &Checkpoint, cfg: &TrainConfig) -> Result<(u64, Option<DataPosition>)> {
    ck.check_compatible(cfg)?;
    let c = model.emb_upd.c;
    let tables = model.tables.iter().map(|sh| ck.read_shard(&sh.spec, Some(c))).collect::<Result<Vec<_>>>()?;
    let dense = ck.read_dense()?;
    let params = model.dense.params_mut();
    check_dense(ck, &dense, params.iter().map(|p| (be.len(&p.w), be.len(&p.s))))?;
    let up_t = tables.iter().map(|(w, s)| Ok((be.upload(w)?, be.upload(s)?))).collect::<Result<Vec<_>>>()?;
    let up_d = dense.iter().map(|(w, s)| Ok((be.upload(w)?, be.upload(s)?))).collect::<Result<Vec<_>>>()?;
    for (sh, (w, s)) in model.tables.iter_mut().zip(up_t) {
        sh.weights = w;
        sh.state = s;
    }
    for (p, (w, s)) in model.dense.params_mut().into_iter().zip(up_d) {
        p.w = w;
        p.s = s;
    }
    let one = ck.manifest.run.grid.world() == 1;
    Ok((ck.step(), if one { ck.position(0).map(|p| p.data.clone()) } else { None }))
}
