//! Per-replica files of a 2D checkpoint.
//!
//! The shard files hold one copy of the model: after a replica sync every replica holds the same
//! shards, so replica 0 writes them. Two modes keep replicas apart at a checkpoint step, and
//! resuming from that one copy would change the run:
//!
//! - *delayed state sync*: every replica's optimizer state carries its own increments since the
//!   last applied average, and the average started at this sync is still pending;
//! - *fully-sharded 2D*: every replica's weights carry its own last update on top of the average,
//!   and its optimizer state is never averaged.
//!
//! In those modes every replica also writes, for each of its shards, a replica file
//! `replica-gG-tTTT-rR0-R1-cC0-C1.bin`: a 64-byte header (`EMBREPLC`, format version, the shard's
//! table, table rows, dim, state floats per row, row and column ranges, as in a shard file; then
//! the replica index and flags: bit 0 weights present, bit 1 a pending average present), the
//! replica's weights (fully-sharded only; rows × cols f32), its optimizer state (rows ×
//! state_per_row f32), and the pending average: its local rows (u64), the state snapshot when it
//! started (f64) and the replica-group mean (f64), state_per_row values per row each. All
//! little-endian. A resume on the same grid, plan, c and mode loads them and continues bitwise;
//! any other load (another grid, export) uses the shard files.
use super::{bad, write::Out, Checkpoint, FileEntry, FileKind, SHARD_HEADER};
use crate::backend::ShardSpec;
use crate::Result;
use std::path::Path;

/// First 8 bytes of a replica file.
pub const REPLICA_MAGIC: &[u8; 8] = b"EMBREPLC";

/// A pending delayed state average of one shard: local rows, snapshot and mean (each row's
/// `state_per_row` values).
#[derive(Clone, Debug, PartialEq)]
pub struct PendingRows {
    pub rows: Vec<u64>,
    pub snapshot: Vec<f64>,
    pub mean: Vec<f64>,
}

/// One replica's own copy of a shard, as a replica file holds it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaShard {
    pub weights: Option<Vec<f32>>,
    pub state: Vec<f32>,
    pub pending: Option<PendingRows>,
}

/// The 64-byte header of a replica file.
pub(crate) fn header(spec: &ShardSpec, replica: usize, state_per_row: usize, weights: bool, pending: bool) -> [u8; SHARD_HEADER] {
    let mut h = super::write::shard_header(spec, state_per_row);
    h[0..8].copy_from_slice(REPLICA_MAGIC);
    h[56..60].copy_from_slice(&(replica as u32).to_le_bytes());
    h[60..64].copy_from_slice(&(u32::from(weights) | u32::from(pending) << 1).to_le_bytes());
    h
}

/// Bytes of a replica file of this kind (None if the count overflows).
pub(crate) fn file_bytes(spec: &ShardSpec, state_per_row: usize, weights: bool, pending_rows: Option<usize>) -> Option<u64> {
    let rows = spec.num_rows() as u64;
    let w = if weights { rows.checked_mul(spec.num_cols() as u64)? } else { 0 };
    let f32s = w.checked_add(rows.checked_mul(state_per_row as u64)?)?;
    let p = pending_rows.unwrap_or(0) as u64;
    let pend = p.checked_mul(8)?.checked_add(p.checked_mul(state_per_row as u64)?.checked_mul(16)?)?;
    (SHARD_HEADER as u64).checked_add(f32s.checked_mul(4)?)?.checked_add(pend)
}

/// Write replica `replica`'s copy of the shard `spec` into the step folder: its weights (when
/// given), its optimizer state, and its part of a pending state average (when given).
pub fn write_replica(dir: &Path, spec: &ShardSpec, replica: usize, weights: Option<&[f32]>, state: &[f32], pending: Option<&PendingRows>) -> Result<FileEntry> {
    let name = super::replica_file_name(spec, replica);
    let path = dir.join(&name);
    let rows = spec.num_rows();
    if rows == 0 || state.len() % rows != 0 {
        return Err(bad(&path, format!("{} state floats for {rows} rows", state.len())));
    }
    let spr = state.len() / rows;
    if let Some(w) = weights {
        if w.len() != rows * spec.num_cols() {
            return Err(bad(&path, format!("{} weights for a {rows}×{} shard", w.len(), spec.num_cols())));
        }
    }
    if let Some(p) = pending {
        if p.snapshot.len() != p.rows.len() * spr || p.mean.len() != p.rows.len() * spr || p.rows.iter().any(|&x| x as usize >= rows) {
            return Err(bad(&path, "pending state average does not match the shard"));
        }
    }
    let mut o = Out::create(dir, &name)?;
    o.put(&header(spec, replica, spr, weights.is_some(), pending.is_some()))?;
    if let Some(w) = weights {
        o.put_f32(w)?;
    }
    o.put_f32(state)?;
    if let Some(p) = pending {
        o.put(bytemuck::cast_slice(&p.rows))?;
        o.put(bytemuck::cast_slice(&p.snapshot))?;
        o.put(bytemuck::cast_slice(&p.mean))?;
    }
    let (bytes, crc32) = o.finish()?;
    let kind = FileKind::Replica { spec: spec.clone(), replica, state_per_row: spr, weights: weights.is_some(), pending_rows: pending.map(|p| p.rows.len()) };
    Ok(FileEntry { name, kind, bytes, crc32 })
}

/// Read a replica file (its size, CRC and header verified first).
pub fn read_replica(ck: &Checkpoint, f: &FileEntry) -> Result<ReplicaShard> {
    let FileKind::Replica { spec, state_per_row: spr, weights, pending_rows, .. } = &f.kind else {
        return Err(bad(&ck.dir.join(&f.name), "not a replica file"));
    };
    let map = ck.map(f)?;
    let mut pos = SHARD_HEADER;
    let mut take = |n: usize| {
        let s = &map[pos..pos + n];
        pos += n;
        s
    };
    let f32s = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect::<Vec<f32>>();
    let f64s = |b: &[u8]| b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect::<Vec<f64>>();
    let rows = spec.num_rows();
    // `map` checked the size against the manifest, and `Checkpoint::open` the manifest's size
    // against this layout, so every slice below is inside the file.
    let weights = weights.then(|| f32s(take(rows * spec.num_cols() * 4)));
    let state = f32s(take(rows * spr * 4));
    let pending = pending_rows.map(|p| {
        let rows: Vec<u64> = take(p * 8).chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        let snapshot = f64s(take(p * spr * 8));
        let mean = f64s(take(p * spr * 8));
        PendingRows { rows, snapshot, mean }
    });
    if let Some(p) = &pending {
        if let Some(&r) = p.rows.iter().find(|&&r| r as usize >= rows) {
            return Err(bad(&ck.dir.join(&f.name), format!("pending row {r} outside the shard's {rows} rows")));
        }
    }
    Ok(ReplicaShard { weights, state, pending })
}

/// Check a replica file's manifest entry against the run (called by `Checkpoint::open`).
pub(crate) fn check_entry(dir: &Path, f: &FileEntry, m: &super::Manifest) -> Result<()> {
    let FileKind::Replica { spec, replica, state_per_row, weights, pending_rows } = &f.kind else { return Ok(()) };
    let p = dir.join(&f.name);
    let r = &m.run;
    let planned = r.plan.tables.iter().any(|tp| {
        tp.table == spec.table
            && r.model.tables.get(tp.table).is_some_and(|t| t.rows == spec.table_rows && t.dim == spec.dim)
            && tp.shards.iter().any(|s| s.rows == spec.rows && s.cols == spec.cols)
    });
    if !planned {
        return Err(bad(&p, "replica file of a shard the plan does not have"));
    }
    if *replica >= m.m {
        return Err(bad(&p, format!("replica {replica} of a grid with M = {}", m.m)));
    }
    if *state_per_row != r.embedding_optimizer.state_per_row(spec.num_cols()) {
        return Err(bad(&p, "listed with another optimizer state layout"));
    }
    if f.name != super::replica_file_name(spec, *replica) || Some(f.bytes) != file_bytes(spec, *state_per_row, *weights, *pending_rows) {
        return Err(bad(&p, "listed with a name or size that does not match its shape"));
    }
    Ok(())
}
