//! Replica sync: every K steps each replica group (the M ranks holding the same shards)
//! averages its shards' weights and optimizer state.
//!
//! Sparse (default): only rows that some replica touched since the last sync are averaged —
//! exact, since untouched rows are still identical on every replica. Full: every row.
//! The mean is taken in f64 (the f32 values are exact in f64, summed in rank order, divided,
//! rounded once), so every replica ends bitwise identical and within 1 ulp of the f64 mean,
//! and identical values stay identical.
//!
//! Where the values travel: host-resident shards as f64 through the host transport; where the
//! replica communicator moves the backend's buffers themselves (the peers and GPUDirect buffer
//! transports) as packed f32 rows through the transport's collectives on the backend's memory,
//! summed in f64 by its reduce hook; otherwise staged through host copies.
use super::route::Touched;
use super::xfer::{BufMem, Xfer};
use crate::backend::{Accumulate, Backend, Cpu, Shard};
use crate::plan::SYNC_CHUNK;
use crate::{Error, Result};
use ember_transport::{Comm, ReduceOp, Request};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    #[default]
    Sparse,
    Full,
}

/// Bytes one sync moved (this rank's contribution to each collective).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SyncBytes {
    pub index_bytes: u64,
    pub value_bytes: u64,
}

fn host<'a, B: Backend>(be: &B, buf: &'a mut B::Buf) -> Result<&'a mut [f32]> {
    be.host_mut(buf).ok_or_else(|| Error::Device(format!("replica sync needs host-resident shards; backend {} keeps them on the device", be.name())))
}

/// Union of the replicas' touched rows for each shard (identical on every replica). Every
/// buffer is allocated at its exact size.
fn touched_union(comm: &Comm, shards_rows: &[usize], touched: &[Touched]) -> Result<(Vec<Vec<u64>>, u64)> {
    let counts: Vec<usize> = touched.iter().map(Touched::count).collect();
    let mut msg = Vec::with_capacity(touched.len() + counts.iter().sum::<usize>());
    for t in touched {
        msg.push(t.count() as u64);
        t.push_rows(&mut msg);
    }
    let bytes = msg.len() as u64 * 8;
    let (all, counts) = comm.all_gather_alloc(&msg)?;
    drop(msg);
    // Pass 1: check every replica's message and size the unions.
    let mut sizes = vec![0usize; touched.len()];
    let mut pos = 0usize;
    for (src, &c) in counts.iter().enumerate() {
        let end = pos + c;
        for (s, size) in sizes.iter_mut().enumerate() {
            let bad = |m: &str| Error::Transport(format!("replica sync from replica {src}: {m} (shard {s})"));
            let n = *all.get(pos).filter(|_| pos < end).ok_or_else(|| bad("message too short"))? as usize;
            pos += 1;
            if n > end - pos {
                return Err(bad("row count beyond the message"));
            }
            if all[pos..pos + n].iter().any(|&r| r as usize >= shards_rows[s]) {
                return Err(bad("row out of range"));
            }
            *size += n;
            pos += n;
        }
        if pos != end {
            return Err(Error::Transport(format!("replica sync from replica {src}: {} words left over", end - pos)));
        }
    }
    // Pass 2: gather, sort, dedup.
    let mut union: Vec<Vec<u64>> = sizes.iter().map(|&k| Vec::with_capacity(k)).collect();
    let mut pos = 0usize;
    for _ in &counts {
        for u in union.iter_mut() {
            let n = all[pos] as usize;
            u.extend_from_slice(&all[pos + 1..pos + 1 + n]);
            pos += 1 + n;
        }
    }
    drop(all);
    for u in union.iter_mut() {
        u.sort_unstable();
        u.dedup();
    }
    Ok((union, bytes))
}

/// The local rows each shard averages: all of them (full), or the union of the replicas'
/// touched rows (sparse; also returns the index bytes this rank sent).
fn rows_to_sync<B: Backend>(comm: &Comm, shards: &[Shard<B>], touched: &[Touched], mode: SyncMode) -> Result<(Vec<Vec<u64>>, u64)> {
    match mode {
        SyncMode::Full => Ok((shards.iter().map(|s| (0..s.spec.num_rows() as u64).collect()).collect(), 0)),
        SyncMode::Sparse => {
            let n: Vec<usize> = shards.iter().map(|s| s.spec.num_rows()).collect();
            touched_union(comm, &n, touched)
        }
    }
}

/// An optimizer-state average started at one sync and applied at the next (delayed state sync).
pub struct PendingState {
    /// Local rows of each shard whose state is being averaged.
    rows: Vec<Vec<u64>>,
    /// The state values of `rows` when the average started (every shard's rows in order, each
    /// row's `state_per_row` floats).
    snapshot: Vec<f64>,
    mean: PendingMean,
}

/// The replica-group mean of a pending state average: still in flight, or received.
enum PendingMean {
    InFlight(Request<Vec<f64>>),
    Done(Vec<f64>),
}

impl PendingState {
    /// A pending average as a checkpoint recorded it; `snapshot` and `mean` hold every row's
    /// `state_per_row[shard]` floats, shard after shard.
    pub fn from_parts(rows: Vec<Vec<u64>>, snapshot: Vec<f64>, mean: Vec<f64>, state_per_row: &[usize]) -> Result<Self> {
        let want = rows.iter().zip(state_per_row).try_fold(0usize, |a, (r, &spr)| r.len().checked_mul(spr).and_then(|x| a.checked_add(x)));
        if rows.len() != state_per_row.len() || want != Some(snapshot.len()) || want != Some(mean.len()) {
            return Err(Error::Input(format!(
                "pending state average: {} shards of rows for {} shards, {} snapshot and {} mean values for {want:?}",
                rows.len(),
                state_per_row.len(),
                snapshot.len(),
                mean.len()
            )));
        }
        Ok(PendingState { rows, snapshot, mean: PendingMean::Done(mean) })
    }

    /// Wait for the mean (it is the same value whenever it is waited for, so waiting early —
    /// to save a checkpoint — changes nothing).
    pub fn resolve(&mut self) -> Result<()> {
        if let PendingMean::InFlight(_) = self.mean {
            let PendingMean::InFlight(r) = std::mem::replace(&mut self.mean, PendingMean::Done(Vec::new())) else { unreachable!() };
            self.mean = PendingMean::Done(r.wait()?);
        }
        Ok(())
    }

    /// (rows of each shard, snapshot, mean), the mean waited for.
    pub fn parts(&mut self) -> Result<(&[Vec<u64>], &[f64], &[f64])> {
        self.resolve()?;
        let PendingMean::Done(mean) = &self.mean else { unreachable!("resolved above") };
        Ok((&self.rows, &self.snapshot, mean))
    }

    /// Apply the average to shard `i`'s host state (`spr` floats per row): v ← mean(v then) +
    /// (v now − v then), on the rows of that sync. `start` is the shard's first value in the
    /// snapshot; returns the next shard's.
    fn apply_shard(&mut self, i: usize, state: &mut [f32], spr: usize, start: usize) -> Result<usize> {
        self.resolve()?;
        let PendingMean::Done(mean) = &self.mean else { unreachable!("resolved above") };
        let mut pos = start;
        for &r in &self.rows[i] {
            let row = state.get_mut(r as usize * spr..(r as usize + 1) * spr).ok_or_else(|| Error::Input(format!("pending state average: row {r} outside shard {i}")))?;
            for x in row.iter_mut() {
                *x = (mean[pos] + (*x as f64 - self.snapshot[pos])) as f32;
                pos += 1;
            }
        }
        Ok(pos)
    }

    /// Every shard's state with the average applied, on host copies (`states[i]` is shard i's
    /// state, `spr[i]` floats per row); the pending average itself is kept.
    pub fn applied_to(&mut self, states: &mut [Vec<f32>], spr: &[usize]) -> Result<()> {
        let mut pos = 0;
        for (i, (st, &k)) in states.iter_mut().zip(spr).enumerate() {
            pos = self.apply_shard(i, st, k, pos)?;
        }
        Ok(())
    }
}

fn spr_of<B: Backend>(be: &B, s: &Shard<B>) -> usize {
    if s.spec.num_rows() == 0 {
        0
    } else {
        be.len(&s.state) / s.spec.num_rows()
    }
}

/// Average the shards over the replica group `comm`, whose buffer transport is `xfer`;
/// `touched` is cleared. With `delayed`, the optimizer state is synced one sync behind
/// (BRIEF.md §3): the average started now is applied at the next sync as
/// v ← mean(v then) + (v now − v then), while weights are averaged now.
pub fn replica_sync<B: Backend>(
    be: &B,
    comm: &Comm,
    shards: &mut [Shard<B>],
    touched: &mut [Touched],
    mode: SyncMode,
    delayed: Option<&mut Option<PendingState>>,
    xfer: Xfer,
) -> Result<SyncBytes> {
    if comm.size() == 1 {
        touched.iter_mut().for_each(Touched::clear);
        return Ok(SyncBytes::default());
    }
    if delayed.is_none() && matches!(xfer, Xfer::Peers | Xfer::Direct) {
        return replica_sync_buffers(be, comm, shards, touched, mode);
    }
    if shards.iter_mut().all(|s| be.host_mut(&mut s.weights).is_some()) {
        return replica_sync_host(be, comm, shards, touched, mode, delayed);
    }
    // Device-resident shards: staged through host copies.
    staged(be, shards, |cpu, hs| replica_sync_host(cpu, comm, hs, touched, mode, delayed))
}

/// Replica sync on the shard buffers themselves: each shard's rows to average are packed (f32,
/// on the backend), all-reduced through the transport's collectives on the backend's memory —
/// summed in f64 in replica order, divided, rounded once: bitwise the host path's mean — and
/// written back. Nothing but the row indices goes through host memory.
fn replica_sync_buffers<B: Backend>(be: &B, comm: &Comm, shards: &mut [Shard<B>], touched: &mut [Touched], mode: SyncMode) -> Result<SyncBytes> {
    let mut stats = SyncBytes::default();
    let (rows_of, index_bytes) = rows_to_sync(comm, shards, touched, mode)?;
    stats.index_bytes = index_bytes;
    let mean = BufMem::with(be, Accumulate::F64Mean);
    for (s, rows) in shards.iter_mut().zip(&rows_of) {
        let (cols, spr, nr) = (s.spec.num_cols(), spr_of(be, s), rows.len());
        let ids = be.upload_ids(rows)?;
        for (buf, k) in [(&mut s.weights, cols), (&mut s.state, spr)] {
            // Every replica has the same union of rows, so all skip the same empty collectives.
            if nr == 0 || k == 0 {
                continue;
            }
            let mut packed = be.zeros(nr * k)?;
            // SAFETY: one source, this replica's own buffer, which holds every listed row (the
            // union was range-checked against the shard's rows) and is not written during the
            // call (borrowed here): the mean of one source is the rows themselves.
            unsafe { be.mean_rows_from(&[be.addr(buf)], &ids, nr, k, &mut packed)? };
            be.synchronize()?;
            // SAFETY: `packed` holds nr·k floats, owned here and finished with by the device.
            unsafe { comm.all_reduce_in(&mean, be.addr(&packed), nr * k, 4) }?;
            be.flush_remote_writes()?;
            be.put_rows(buf, &ids, nr, &packed, k)?;
            stats.value_bytes += (nr * k * 4) as u64;
        }
    }
    touched.iter_mut().for_each(Touched::clear);
    Ok(stats)
}

/// Run `f` on host copies of device-resident shards (downloaded, then uploaded back): the
/// staging path of replica sync for backends that keep shards on a device.
fn staged<B: Backend, R>(be: &B, shards: &mut [Shard<B>], f: impl FnOnce(&Cpu, &mut [Shard<Cpu>]) -> Result<R>) -> Result<R> {
    let mut hs = Vec::with_capacity(shards.len());
    for s in shards.iter() {
        hs.push(Shard { spec: s.spec.clone(), weights: be.download(&s.weights)?, state: be.download(&s.state)? });
    }
    let r = f(&Cpu::new(), &mut hs)?;
    for (s, h) in shards.iter_mut().zip(hs) {
        s.weights = be.upload(&h.weights)?;
        s.state = be.upload(&h.state)?;
    }
    Ok(r)
}

/// `replica_sync` on host-resident shards.
fn replica_sync_host<B: Backend>(
    be: &B,
    comm: &Comm,
    shards: &mut [Shard<B>],
    touched: &mut [Touched],
    mode: SyncMode,
    delayed: Option<&mut Option<PendingState>>,
) -> Result<SyncBytes> {
    let mut stats = SyncBytes::default();
    let (rows_of, index_bytes) = rows_to_sync(comm, shards, touched, mode)?;
    stats.index_bytes = index_bytes;
    let with_state = delayed.is_none();
    if let Some(pending) = delayed {
        if let Some(p) = pending.take() {
            apply_pending(be, shards, p)?;
        }
        // Start the next state average; it completes during the coming interval.
        let mut snapshot = Vec::new();
        for (s, rows) in shards.iter_mut().zip(&rows_of) {
            let spr = spr_of(be, s);
            let st = host(be, &mut s.state)?;
            for &r in rows {
                snapshot.extend(st[r as usize * spr..(r as usize + 1) * spr].iter().map(|&x| x as f64));
            }
        }
        stats.value_bytes += snapshot.len() as u64 * 8;
        let mean = PendingMean::InFlight(comm.start_all_reduce(snapshot.clone(), ReduceOp::Mean));
        *pending = Some(PendingState { rows: rows_of.clone(), snapshot, mean });
    }
    // Weights (and, unless delayed, state) of the rows, row after row, in f64, averaged in
    // chunks of at most SYNC_CHUNK values.
    let spr: Vec<usize> = shards.iter().map(|s| if with_state { spr_of(be, s) } else { 0 }).collect();
    let total: usize = shards.iter().zip(&rows_of).zip(&spr).map(|((s, r), &k)| r.len() * (s.spec.num_cols() + k)).sum();
    let mut vals: Vec<f64> = Vec::with_capacity(total.min(SYNC_CHUNK));
    // (shard, first row index, end row index) of each run of rows in `vals`.
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for i in 0..shards.len() {
        let (cols, k) = (shards[i].spec.num_cols(), spr[i]);
        let mut j = 0;
        while j < rows_of[i].len() {
            if !vals.is_empty() && vals.len() + cols + k > SYNC_CHUNK {
                average_runs(be, comm, shards, &rows_of, &spr, &mut vals, &mut runs, &mut stats)?;
            }
            let room = ((SYNC_CHUNK - vals.len()) / (cols + k).max(1)).max(1);
            let end = (j + room).min(rows_of[i].len());
            let s = &mut shards[i];
            let w = host(be, &mut s.weights)?;
            let st = host(be, &mut s.state)?;
            for &r in &rows_of[i][j..end] {
                let r = r as usize;
                vals.extend(w[r * cols..(r + 1) * cols].iter().map(|&x| x as f64));
                vals.extend(st[r * k..(r + 1) * k].iter().map(|&x| x as f64));
            }
            runs.push((i, j, end));
            j = end;
        }
    }
    if !vals.is_empty() {
        average_runs(be, comm, shards, &rows_of, &spr, &mut vals, &mut runs, &mut stats)?;
    }
    touched.iter_mut().for_each(Touched::clear);
    Ok(stats)
}

/// All-reduce (mean) the packed rows of `runs` and write them back; empties both.
#[allow(clippy::too_many_arguments)]
fn average_runs<B: Backend>(
    be: &B,
    comm: &Comm,
    shards: &mut [Shard<B>],
    rows_of: &[Vec<u64>],
    spr: &[usize],
    vals: &mut Vec<f64>,
    runs: &mut Vec<(usize, usize, usize)>,
    stats: &mut SyncBytes,
) -> Result<()> {
    stats.value_bytes += vals.len() as u64 * 8;
    comm.all_reduce(vals, ReduceOp::Mean)?;
    let mut pos = 0usize;
    for &(i, a, e) in runs.iter() {
        let (cols, k) = (shards[i].spec.num_cols(), spr[i]);
        let s = &mut shards[i];
        for &r in &rows_of[i][a..e] {
            let r = r as usize;
            for (x, &v) in host(be, &mut s.weights)?[r * cols..(r + 1) * cols].iter_mut().zip(&vals[pos..pos + cols]) {
                *x = v as f32;
            }
            pos += cols;
            for (x, &v) in host(be, &mut s.state)?[r * k..(r + 1) * k].iter_mut().zip(&vals[pos..pos + k]) {
                *x = v as f32;
            }
            pos += k;
        }
    }
    vals.clear();
    runs.clear();
    Ok(())
}

/// Finish a delayed state average: v ← mean(v then) + (v now − v then), rows of that sync.
pub fn apply_pending<B: Backend>(be: &B, shards: &mut [Shard<B>], p: PendingState) -> Result<()> {
    if shards.iter_mut().all(|s| be.host_mut(&mut s.weights).is_some()) {
        apply_pending_host(be, shards, p)
    } else {
        staged(be, shards, |cpu, hs| apply_pending_host(cpu, hs, p))
    }
}

fn apply_pending_host<B: Backend>(be: &B, shards: &mut [Shard<B>], mut p: PendingState) -> Result<()> {
    let mut pos = 0;
    for (i, s) in shards.iter_mut().enumerate() {
        let spr = spr_of(be, s);
        pos = p.apply_shard(i, host(be, &mut s.state)?, spr, pos)?;
    }
    Ok(())
}
