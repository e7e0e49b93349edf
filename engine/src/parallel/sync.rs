//! Replica sync: every K steps each replica group (the M ranks holding the same shards)
//! averages its shards' weights and optimizer state.
//!
//! Sparse (default): only rows that some replica touched since the last sync are averaged —
//! exact, since untouched rows are still identical on every replica. Full: every row.
//! The mean is taken in f64 (the f32 values are exact in f64, summed in rank order, divided,
//! rounded once), so every replica ends bitwise identical and within 1 ulp of the f64 mean,
//! and identical values stay identical.
use super::route::Touched;
use crate::backend::{Backend, Cpu, Shard};
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

/// Union of the replicas' touched rows for each shard (identical on every replica).
fn touched_union(comm: &Comm, shards_rows: &[usize], touched: &[Touched]) -> Result<(Vec<Vec<u64>>, u64)> {
    let mut msg = Vec::new();
    for t in touched {
        let rows = t.rows();
        msg.push(rows.len() as u64);
        msg.extend_from_slice(&rows);
    }
    let bytes = msg.len() as u64 * 8;
    let (all, counts) = comm.all_gather_alloc(&msg)?;
    let mut union: Vec<Vec<u64>> = vec![Vec::new(); touched.len()];
    let mut pos = 0usize;
    for (src, &c) in counts.iter().enumerate() {
        let end = pos + c;
        for (s, u) in union.iter_mut().enumerate() {
            let bad = |m: &str| Error::Transport(format!("replica sync from replica {src}: {m} (shard {s})"));
            let n = *all.get(pos).ok_or_else(|| bad("message too short"))? as usize;
            pos += 1;
            if n > end - pos {
                return Err(bad("row count beyond the message"));
            }
            let rows = &all[pos..pos + n];
            if rows.iter().any(|&r| r as usize >= shards_rows[s]) {
                return Err(bad("row out of range"));
            }
            u.extend_from_slice(rows);
            pos += n;
        }
        if pos != end {
            return Err(Error::Transport(format!("replica sync from replica {src}: {} words left over", end - pos)));
        }
    }
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

/// Average the shards over the replica group `comm`. `touched` is cleared.
pub fn replica_sync<B: Backend>(be: &B, comm: &Comm, shards: &mut [Shard<B>], touched: &mut [Touched], mode: SyncMode) -> Result<SyncBytes> {
    replica_sync_with(be, comm, shards, touched, mode, None)
}

fn spr_of<B: Backend>(be: &B, s: &Shard<B>) -> usize {
    if s.spec.num_rows() == 0 {
        0
    } else {
        be.len(&s.state) / s.spec.num_rows()
    }
}

/// `replica_sync`; with `delayed`, the optimizer state is synced one sync behind (BRIEF.md §3):
/// the average started now is applied at the next sync as v ← mean(v then) + (v now − v then),
/// while weights are averaged now.
pub fn replica_sync_with<B: Backend>(
    be: &B,
    comm: &Comm,
    shards: &mut [Shard<B>],
    touched: &mut [Touched],
    mode: SyncMode,
    delayed: Option<&mut Option<PendingState>>,
) -> Result<SyncBytes> {
    if comm.size() == 1 {
        touched.iter_mut().for_each(Touched::clear);
        return Ok(SyncBytes::default());
    }
    if shards.iter_mut().all(|s| be.host_mut(&mut s.weights).is_some()) {
        return replica_sync_host(be, comm, shards, touched, mode, delayed);
    }
    // Device-resident shards: staged through host copies.
    staged(be, shards, |cpu, hs| replica_sync_host(cpu, comm, hs, touched, mode, delayed))
}

/// Replica sync between replicas that are threads of one process sharing one address space
/// (host memory, or one GPU's context): every replica reads the rows to average straight out of
/// all replicas' shard buffers (their addresses swapped over `comm`), averages them on its own
/// backend — in f64, in replica order, rounded once: bitwise the host path's result — and, after
/// a barrier (nobody reads any more), writes them back. Nothing is staged through the host but
/// the row indices. `value_bytes` counts the bytes read from the other replicas.
pub fn replica_sync_peers<B: Backend>(be: &B, comm: &Comm, shards: &mut [Shard<B>], touched: &mut [Touched], mode: SyncMode) -> Result<SyncBytes> {
    let m = comm.size();
    if m == 1 {
        touched.iter_mut().for_each(Touched::clear);
        return Ok(SyncBytes::default());
    }
    let mut stats = SyncBytes::default();
    let (rows_of, index_bytes) = rows_to_sync(comm, shards, touched, mode)?;
    stats.index_bytes = index_bytes;
    be.synchronize()?;
    let mut msg = Vec::with_capacity(2 * shards.len());
    for s in shards.iter() {
        msg.push(be.addr(&s.weights));
        msg.push(be.addr(&s.state));
    }
    let mut all = vec![0u64; msg.len() * m];
    comm.all_gather(&msg, &mut all)?;
    let k = msg.len();
    let mut averaged = Vec::with_capacity(shards.len());
    for (i, (s, rows)) in shards.iter().zip(&rows_of).enumerate() {
        let (cols, spr, nr) = (s.spec.num_cols(), spr_of(be, s), rows.len());
        let ids = be.upload_ids(rows)?;
        let src = |j: usize| (0..m).map(|r| all[r * k + 2 * i + j]).collect::<Vec<u64>>();
        let mut w = be.zeros(nr * cols)?;
        let mut st = be.zeros(nr * spr)?;
        // SAFETY: every replica holds the same shard (same plan), so every listed row is inside
        // each buffer (rows were range-checked by the union); no replica writes its shards
        // before the barrier below.
        unsafe {
            be.mean_rows_from(&src(0), &ids, nr, cols, &mut w)?;
            if spr > 0 {
                be.mean_rows_from(&src(1), &ids, nr, spr, &mut st)?;
            }
        }
        stats.value_bytes += ((m - 1) * nr * (cols + spr) * 4) as u64;
        averaged.push((ids, nr, w, st));
    }
    be.synchronize()?;
    comm.barrier()?;
    for (s, (ids, nr, w, st)) in shards.iter_mut().zip(averaged) {
        let (cols, spr) = (s.spec.num_cols(), spr_of(be, s));
        be.put_rows(&mut s.weights, &ids, nr, &w, cols)?;
        if spr > 0 {
            be.put_rows(&mut s.state, &ids, nr, &st, spr)?;
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

/// `replica_sync_with` on host-resident shards.
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
    // Pack weights (and, unless delayed, state) of the rows, in f64.
    let mut vals: Vec<f64> = Vec::new();
    for (s, rows) in shards.iter_mut().zip(&rows_of) {
        let cols = s.spec.num_cols();
        let spr = if with_state { spr_of(be, s) } else { 0 };
        let w = host(be, &mut s.weights)?;
        for &r in rows {
            vals.extend(w[r as usize * cols..(r as usize + 1) * cols].iter().map(|&x| x as f64));
        }
        let st = host(be, &mut s.state)?;
        for &r in rows {
            vals.extend(st[r as usize * spr..(r as usize + 1) * spr].iter().map(|&x| x as f64));
        }
    }
    stats.value_bytes += vals.len() as u64 * 8;
    comm.all_reduce(&mut vals, ReduceOp::Mean)?;
    let mut pos = 0usize;
    for (s, rows) in shards.iter_mut().zip(&rows_of) {
        let cols = s.spec.num_cols();
        let spr = if with_state { spr_of(be, s) } else { 0 };
        let w = host(be, &mut s.weights)?;
        for &r in rows {
            for (x, &v) in w[r as usize * cols..(r as usize + 1) * cols].iter_mut().zip(&vals[pos..pos + cols]) {
                *x = v as f32;
            }
            pos += cols;
        }
        let st = host(be, &mut s.state)?;
        for &r in rows {
            for (x, &v) in st[r as usize * spr..(r as usize + 1) * spr].iter_mut().zip(&vals[pos..pos + spr]) {
                *x = v as f32;
            }
            pos += spr;
        }
    }
    touched.iter_mut().for_each(Touched::clear);
    Ok(stats)
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
