//! Replica sync: every K steps each replica group (the M ranks holding the same shards)
//! averages its shards' weights and optimizer state.
//!
//! Sparse (default): only rows that some replica touched since the last sync are averaged —
//! exact, since untouched rows are still identical on every replica. Full: every row.
//!
//! One path for every backend and buffer transport but one: the rows to average are gathered
//! from the shard buffers into packed f32 buffers of at most `SYNC_CHUNK` floats (several shards
//! to a buffer), all-reduced as the mean summed in f64 (each f32 widened, added in replica order,
//! divided, rounded once: every replica ends bitwise identical, within 1 ulp of the f64 mean,
//! and identical values stay identical) by the buffer transport (`Xfer::all_reduce_mean_f64`),
//! and written back. Only the packed rows move, 4 bytes a value; a device backend gathers and
//! scatters them with its kernels and never copies a whole shard. Where the replicas are
//! threads of one process with host-memory shards (CPU backend, in-process ranks), there is
//! nothing to move: each rank averages its slice of the rows in every replica's shards
//! (`shared_rows`), with the same mean.
//!
//! Delayed state sync (BRIEF.md §3): the optimizer state's average starts at one sync, in f64
//! and non-blocking, and is applied at the next; its snapshot and its application move the
//! packed state rows only.
use super::route::Touched;
use super::shared_rows::{self, HostShard};
use super::xfer::Xfer;
use crate::backend::{Backend, Buffers, Cpu, HostDeviceBytes, Shard};
use crate::plan::{index_width, touched_as_bitmap, SYNC_CHUNK};
use crate::{Error, Result};
use ember_transport::{Comm, ReduceOp, Request};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::time::Instant;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    #[default]
    Sparse,
    Full,
}

/// Bytes one sync moved: this rank's contribution to each collective (in-process replicas that
/// average in place send none of their values; they are counted the same way, as what this
/// rank's rows contribute).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct SyncBytes {
    pub index_bytes: u64,
    pub value_bytes: u64,
}

/// Union of the replicas' touched rows for each shard (identical on every replica), and the
/// index bytes this rank sent. Each replica sends, shard after shard, the number of its touched
/// rows in the shard's [`index_width`], little-endian, then the rows: ascending in that width,
/// or as a bitmap of the shard's rows (bit r % 8 of byte r / 8) when that is smaller
/// ([`touched_as_bitmap`]: the count says which). Every buffer is allocated at its exact size.
fn touched_union(comm: &Comm, shards_rows: &[usize], touched: &[Touched]) -> Result<(Vec<Vec<u64>>, u64)> {
    let msg = encode_touched(shards_rows, touched);
    let bytes = msg.len() as u64;
    let (all, counts) = comm.all_gather_alloc(&msg)?;
    drop(msg);
    Ok((decode_touched(&all, &counts, shards_rows)?, bytes))
}

/// This replica's touched-rows message (the layout [`touched_union`] describes) for shards of
/// `shards_rows` rows, touched as `touched` says (each marking rows of its shard only).
pub fn encode_touched(shards_rows: &[usize], touched: &[Touched]) -> Vec<u8> {
    let len = touched.iter().zip(shards_rows).map(|(t, &r)| message_bytes(r, t.count())).sum();
    let mut msg = Vec::with_capacity(len);
    for (t, &rows) in touched.iter().zip(shards_rows) {
        let w = index_width(rows as u64);
        put_index(&mut msg, t.count() as u64, w);
        if touched_as_bitmap(rows as u64, t.count() as u64) {
            let at = msg.len();
            msg.resize(at + rows.div_ceil(8), 0);
            t.for_each_row(|r| msg[at + (r / 8) as usize] |= 1 << (r % 8));
        } else {
            t.for_each_row(|r| put_index(&mut msg, r, w));
        }
    }
    msg
}

/// Bytes of the rows part of a shard's message, `n` of its `rows` rows touched (`n <= rows`, so
/// nothing overflows: a list is at most `rows` indices the caller holds in memory).
fn rows_bytes(rows: usize, n: usize) -> usize {
    if touched_as_bitmap(rows as u64, n as u64) {
        rows.div_ceil(8)
    } else {
        n * index_width(rows as u64)
    }
}

/// Bytes of a shard's whole message: the count, then its rows.
fn message_bytes(rows: usize, n: usize) -> usize {
    index_width(rows as u64) + rows_bytes(rows, n)
}

/// Append `x` to `out` in `width` bytes, little-endian (`x` fits: the caller's width holds it).
fn put_index(out: &mut Vec<u8>, x: u64, width: usize) {
    out.extend_from_slice(&x.to_le_bytes()[..width]);
}

/// The index of `width` bytes at `at` of `msg` (the caller checked the bytes are there).
fn get_index(msg: &[u8], at: usize, width: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..width].copy_from_slice(&msg[at..at + width]);
    u64::from_le_bytes(b)
}

/// The union, sorted, of the touched rows the replicas sent for each shard (`all`: the replicas'
/// messages one after another, `counts[p]` bytes from replica p; `shards_rows`: each shard's
/// local rows). Every replica's message is checked — its length, every row count against the
/// shard's rows and the bytes left, every row (or bitmap bit) against the shard's rows, a
/// bitmap's bits against its count — before anything is copied out of it: a malformed message
/// is an error naming the replica and the shard.
pub fn decode_touched(all: &[u8], counts: &[usize], shards_rows: &[usize]) -> Result<Vec<Vec<u64>>> {
    let widths: Vec<usize> = shards_rows.iter().map(|&r| index_width(r as u64)).collect();
    // Pass 1: check every replica's message.
    let mut pos = 0usize;
    for (src, &c) in counts.iter().enumerate() {
        let end = pos.checked_add(c).filter(|&e| e <= all.len()).ok_or_else(|| Error::Transport(format!("replica sync from replica {src}: {c} bytes beyond the message")))?;
        for (s, &w) in widths.iter().enumerate() {
            let bad = |m: &str| Error::Transport(format!("replica sync from replica {src}: {m} (shard {s})"));
            let rows = shards_rows[s];
            if end - pos < w {
                return Err(bad("message too short"));
            }
            let n = get_index(all, pos, w);
            pos += w;
            if n > rows as u64 {
                return Err(bad("row count beyond the shard's rows"));
            }
            let n = n as usize;
            let len = rows_bytes(rows, n);
            if len > end - pos {
                return Err(bad("row count beyond the message"));
            }
            let part = &all[pos..pos + len];
            if touched_as_bitmap(rows as u64, n as u64) {
                let set: usize = part.iter().map(|b| b.count_ones() as usize).sum();
                let spare = rows % 8;
                if spare != 0 && part[len - 1] >> spare != 0 {
                    return Err(bad("row out of range"));
                }
                if set != n {
                    return Err(bad("bitmap rows differ from the row count"));
                }
            } else if (0..n).any(|i| get_index(part, i * w, w) >= rows as u64) {
                return Err(bad("row out of range"));
            }
            pos += len;
        }
        if pos != end {
            return Err(Error::Transport(format!("replica sync from replica {src}: {} bytes left over", end - pos)));
        }
    }
    // Pass 2: the union as one bit per shard row (lists and bitmaps marked in), then its rows in
    // ascending order: no sort, and each row once however many replicas touched it.
    let mut sets: Vec<Touched> = shards_rows.iter().map(|&r| Touched::new(r)).collect();
    let mut pos = 0usize;
    for _ in counts {
        for ((set, &w), &rows) in sets.iter_mut().zip(&widths).zip(shards_rows) {
            let n = get_index(all, pos, w) as usize;
            pos += w;
            let len = rows_bytes(rows, n);
            if touched_as_bitmap(rows as u64, n as u64) {
                set.mark_bitmap(&all[pos..pos + len]);
            } else {
                set.mark(&(0..n).map(|i| get_index(all, pos + i * w, w)).collect::<Vec<_>>());
            }
            pos += len;
        }
    }
    let union = sets
        .iter()
        .map(|set| {
            let mut u = Vec::with_capacity(set.count());
            set.for_each_row(|r| u.push(r));
            u
        })
        .collect();
    Ok(union)
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

/// A pending state average as a checkpoint records it: rows of each shard, snapshot, mean.
pub type PendingParts<'a> = (&'a [Vec<u64>], &'a [f64], &'a [f64]);

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
    pub fn parts(&mut self) -> Result<PendingParts<'_>> {
        self.resolve()?;
        let PendingMean::Done(mean) = &self.mean else { unreachable!("resolved above") };
        Ok((&self.rows, &self.snapshot, mean))
    }

    /// Apply the average to the packed state of its rows (`state`, laid out as the snapshot):
    /// v ← mean(v then) + (v now − v then).
    fn apply_packed(&mut self, state: &mut [f32]) -> Result<()> {
        self.resolve()?;
        let PendingMean::Done(mean) = &self.mean else { unreachable!("resolved above") };
        if state.len() != self.snapshot.len() || mean.len() != self.snapshot.len() {
            return Err(Error::Input(format!("pending state average: {} state values for a snapshot of {} and a mean of {}", state.len(), self.snapshot.len(), mean.len())));
        }
        for ((x, &m), &then) in state.iter_mut().zip(mean).zip(&self.snapshot) {
            *x = (m + (*x as f64 - then)) as f32;
        }
        Ok(())
    }

    /// Every shard's state with the average applied, on host copies (`states[i]` is shard i's
    /// state, `spr[i]` floats per row); the pending average itself is kept.
    pub fn applied_to(&mut self, states: &mut [Vec<f32>], spr: &[usize]) -> Result<()> {
        if states.len() != self.rows.len() || spr.len() != self.rows.len() {
            return Err(Error::Input(format!("pending state average of {} shards applied to {} states ({} row widths)", self.rows.len(), states.len(), spr.len())));
        }
        let offs = packed_offsets(&self.rows, spr)?;
        let mut packed = vec![0.0f32; offs[self.rows.len()]];
        for (i, st) in states.iter().enumerate() {
            Cpu.gather_rows(st, &self.rows[i], self.rows[i].len(), spr[i], &mut packed, offs[i])?;
        }
        self.apply_packed(&mut packed)?;
        for (i, st) in states.iter_mut().enumerate() {
            Cpu.put_rows(&packed, offs[i], &self.rows[i], self.rows[i].len(), spr[i], st)?;
        }
        Ok(())
    }
}

/// Where each shard's rows start in a buffer packing `rows[i]` rows of `width[i]` floats shard
/// after shard (one entry more: the total).
fn packed_offsets(rows: &[Vec<u64>], width: &[usize]) -> Result<Vec<usize>> {
    let mut offs = Vec::with_capacity(rows.len() + 1);
    let mut at = 0usize;
    offs.push(at);
    for (r, &w) in rows.iter().zip(width) {
        at = r.len().checked_mul(w).and_then(|n| at.checked_add(n)).ok_or_else(|| Error::Input(format!("replica sync: {} rows of {w} floats overflow", r.len())))?;
        offs.push(at);
    }
    Ok(offs)
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
    average_rows(be, comm, shards, touched, mode, delayed, xfer).map_err(|e| match e {
        Error::Transport(m) if !m.starts_with("replica sync") => Error::Transport(format!("replica sync: {m}")),
        e => e,
    })
}

/// [`replica_sync`], its transport errors not yet named as the sync's.
fn average_rows<B: Backend>(
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
    let (rows_of, index_bytes) = rows_to_sync(comm, shards, touched, mode)?;
    let mut stats = SyncBytes { index_bytes, value_bytes: 0 };
    let with_state = delayed.is_none();
    if let Some(pending) = delayed {
        if let Some(p) = pending.take() {
            apply_pending(be, shards, p)?;
        }
        // Start the next state average (in f64, the mean the delayed update needs exactly); it
        // completes during the coming interval.
        let packed = gather_state(be, shards, &rows_of)?;
        let snapshot: Vec<f64> = be.download(&packed.buf)?.into_iter().map(f64::from).collect();
        stats.value_bytes += snapshot.len() as u64 * 8;
        let mean = PendingMean::InFlight(comm.start_all_reduce(snapshot.clone(), ReduceOp::Mean));
        *pending = Some(PendingState { rows: rows_of.clone(), snapshot, mean });
    }
    let width: Vec<usize> = shards.iter().map(|s| s.spec.num_cols() + if with_state { spr_of(be, s) } else { 0 }).collect();
    if xfer == (Xfer::Host { stage: false }) && comm.transport() == "local" && shards.iter_mut().all(|s| be.host_mut(&mut s.weights).is_some()) {
        // Ranks sharing this address space: averaged in place, in every replica's shards.
        let values: usize = width.iter().zip(&rows_of).map(|(w, r)| w * r.len()).sum();
        in_place(be, comm, shards, &rows_of, with_state)?;
        stats.value_bytes += values as u64 * 4;
        touched.iter_mut().for_each(Touched::clear);
        return Ok(stats);
    }
    let chunks = chunks(&width, &rows_of);
    // One packed buffer for every chunk of this sync (fresh memory per chunk would fault its
    // pages in each time).
    let mut packed = be.zeros(chunks.iter().map(|c| c.len).max().unwrap_or(0))?;
    for chunk in &chunks {
        stats.value_bytes += average_chunk(be, comm, shards, &rows_of, chunk, with_state, xfer, &mut packed)?;
    }
    touched.iter_mut().for_each(Touched::clear);
    Ok(stats)
}

/// [`shared_rows::average`] on host views of `shards` (weights, and state `with_state`). On an
/// error its shards are leaked, never freed: other replicas may still be writing into them.
fn in_place<B: Backend>(be: &B, comm: &Comm, shards: &mut [Shard<B>], rows_of: &[Vec<u64>], with_state: bool) -> Result<()> {
    let spr: Vec<usize> = shards.iter().map(|s| if with_state { spr_of(be, s) } else { 0 }).collect();
    // Empty buffers to put in the shards' place should the sync fail, made now: leaking the
    // shards must not itself be able to fail.
    let mut spare = Vec::with_capacity(shards.len());
    for _ in 0..shards.len() {
        spare.push((be.zeros(0)?, be.zeros(0)?));
    }
    let mut views = Vec::with_capacity(shards.len());
    for ((s, rows), spr) in shards.iter_mut().zip(rows_of).zip(spr) {
        let (cols, table) = (s.spec.num_cols(), s.spec.table);
        let (Some(weights), Some(state)) = (be.host_mut(&mut s.weights), be.host_mut(&mut s.state)) else {
            return Err(Error::Config("replica sync in place: a shard is not in host memory".into()));
        };
        views.push(HostShard { weights, state, cols, spr, rows, table });
    }
    let r = shared_rows::average(comm, views);
    if r.is_err() {
        for (s, (w, st)) in shards.iter_mut().zip(spare) {
            std::mem::forget(std::mem::replace(&mut s.weights, w));
            std::mem::forget(std::mem::replace(&mut s.state, st));
        }
    }
    r
}

/// When a replica sync ran (it ran on a thread of its own: see [`replica_sync_beside`]).
#[derive(Clone, Copy, Debug)]
pub struct SyncSpan {
    pub start: Instant,
    pub end: Instant,
    /// What the sync's thread moved between host and device, where the backend counts it.
    pub host_device: Option<HostDeviceBytes>,
}

/// [`replica_sync`] in flight while `work` runs on the calling thread; both finished when this
/// returns. The sync runs on a scoped thread of its own: its collectives are blocking calls on
/// the replica group's `comm`, and `work`'s collectives run on other communicators (the
/// world's). Every transport matches messages by (peer, communicator, sequence number), never
/// by arrival order, so collectives of different communicators may be in flight at once from
/// one rank (in-process, shared memory, TCP, RDMA, and the peers path, whose device copies are
/// the sender's and complete before it returns). `work` must not touch what the sync reads or
/// writes (the shards, their touched rows, the pending state average): the borrows say so.
///
/// The wait for the sync thread has no deadline of its own: every wait inside the sync is one
/// of its collectives', each bounded by `comm`'s timeout, and a dead peer fails them (the
/// error names the peer), so the thread ends by that deadline at the latest. Returns the
/// sync's result and span, and `work`'s result.
#[allow(clippy::too_many_arguments)]
pub fn replica_sync_beside<B: Backend, R>(
    be: &B,
    comm: &Comm,
    shards: &mut [Shard<B>],
    touched: &mut [Touched],
    mode: SyncMode,
    delayed: Option<&mut Option<PendingState>>,
    xfer: Xfer,
    work: impl FnOnce() -> R,
) -> (Result<SyncBytes>, SyncSpan, R) {
    let start = Instant::now();
    std::thread::scope(|s| {
        let sync = std::thread::Builder::new().name("ember-replica-sync".into()).spawn_scoped(s, move || {
            let hd0 = be.thread_host_device_bytes();
            let r = replica_sync(be, comm, shards, touched, mode, delayed, xfer);
            let hd = hd0.zip(be.thread_host_device_bytes()).map(|(a, b)| b.since(&a));
            (r, Instant::now(), hd)
        });
        let out = work();
        let (synced, end, host_device) = match sync {
            Ok(h) => h.join().unwrap_or_else(|_| (Err(Error::Transport("replica sync: its thread panicked".into())), Instant::now(), None)),
            Err(e) => (Err(Error::Transport(format!("replica sync: cannot start its thread: {e}"))), Instant::now(), None),
        };
        (synced, SyncSpan { start, end, host_device }, out)
    })
}

/// One packed buffer of replica sync: runs of rows (shard, range of its rows to sync, offset
/// of the run in the buffer; each row `width[shard]` floats) and the buffer's length.
struct Chunk {
    runs: Vec<(usize, Range<usize>, usize)>,
    len: usize,
}

/// Every shard's rows, shard after shard, cut into chunks of at most `SYNC_CHUNK` floats (a
/// row wider than that gets a chunk of its own): small tables share a collective.
fn chunks(width: &[usize], rows_of: &[Vec<u64>]) -> Vec<Chunk> {
    let mut out = Vec::new();
    let mut cur = Chunk { runs: Vec::new(), len: 0 };
    for (i, (&w, rows)) in width.iter().zip(rows_of).enumerate() {
        if w == 0 {
            continue;
        }
        let mut j = 0;
        while j < rows.len() {
            if cur.len > 0 && cur.len + w > SYNC_CHUNK {
                out.push(std::mem::replace(&mut cur, Chunk { runs: Vec::new(), len: 0 }));
            }
            let room = (SYNC_CHUNK.saturating_sub(cur.len) / w).max(1);
            let end = (j + room).min(rows.len());
            cur.runs.push((i, j..end, cur.len));
            cur.len += (end - j) * w;
            j = end;
        }
    }
    if cur.len > 0 {
        out.push(cur);
    }
    out
}

/// Average one chunk: gather its rows' weights (then, with `with_state`, their state) into the
/// start of `packed` (at least `chunk.len` floats), all-reduce that as the f64-summed mean on
/// `xfer`'s memory, put the rows back. Returns the value bytes this rank sent.
#[allow(clippy::too_many_arguments)]
fn average_chunk<B: Backend>(be: &B, comm: &Comm, shards: &mut [Shard<B>], rows_of: &[Vec<u64>], chunk: &Chunk, with_state: bool, xfer: Xfer, packed: &mut B::Buf) -> Result<u64> {
    let mut ids = Vec::with_capacity(chunk.runs.len());
    for (i, rows, off) in &chunk.runs {
        let (s, n) = (&shards[*i], rows.len());
        let id = be.upload_ids(&rows_of[*i][rows.clone()])?;
        let cols = s.spec.num_cols();
        be.gather_rows(&s.weights, &id, n, cols, packed, *off)?;
        if with_state {
            be.gather_rows(&s.state, &id, n, spr_of(be, s), packed, off + n * cols)?;
        }
        ids.push(id);
    }
    xfer.all_reduce_mean_f64(be, comm, packed, chunk.len)?;
    for ((i, rows, off), id) in chunk.runs.iter().zip(&ids) {
        let n = rows.len();
        let spr = spr_of(be, &shards[*i]);
        let s = &mut shards[*i];
        let cols = s.spec.num_cols();
        be.put_rows(packed, *off, id, n, cols, &mut s.weights)?;
        if with_state {
            be.put_rows(packed, off + n * cols, id, n, spr, &mut s.state)?;
        }
    }
    Ok(chunk.len as u64 * 4)
}

/// Packed optimizer state: the buffer, and each shard's row ids (uploaded) and offset in it.
struct PackedState<B: Backend> {
    buf: B::Buf,
    shards: Vec<(B::Ids, usize)>,
}

/// The optimizer state of every shard's `rows` (its `spr` floats a row), packed shard after
/// shard into one buffer.
fn gather_state<B: Backend>(be: &B, shards: &[Shard<B>], rows: &[Vec<u64>]) -> Result<PackedState<B>> {
    if rows.len() != shards.len() {
        return Err(Error::Input(format!("replica sync: rows of {} shards for {} shards", rows.len(), shards.len())));
    }
    let spr: Vec<usize> = shards.iter().map(|s| spr_of(be, s)).collect();
    let offs = packed_offsets(rows, &spr)?;
    let mut packed = be.zeros(offs[rows.len()])?;
    let mut ids = Vec::with_capacity(rows.len());
    for (i, s) in shards.iter().enumerate() {
        let id = be.upload_ids(&rows[i])?;
        be.gather_rows(&s.state, &id, rows[i].len(), spr[i], &mut packed, offs[i])?;
        ids.push((id, offs[i]));
    }
    Ok(PackedState { buf: packed, shards: ids })
}

/// Finish a delayed state average: v ← mean(v then) + (v now − v then), rows of that sync.
/// Only those rows' state moves: gathered, downloaded packed, updated, uploaded, put back.
pub fn apply_pending<B: Backend>(be: &B, shards: &mut [Shard<B>], mut p: PendingState) -> Result<()> {
    let PackedState { buf, shards: ids } = gather_state(be, shards, &p.rows)?;
    let mut host = be.download(&buf)?;
    p.apply_packed(&mut host)?;
    let packed = be.upload(&host)?;
    for ((s, (id, off)), rows) in shards.iter_mut().zip(&ids).zip(&p.rows) {
        let spr = spr_of(be, s);
        be.put_rows(&packed, *off, id, rows.len(), spr, &mut s.state)?;
    }
    Ok(())
}
