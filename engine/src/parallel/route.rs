//! Routing of the sparse input within a sharding group: which shard each id goes to, the
//! wire layout of the input all-to-all, and its checked decoding. Also the bit set of rows
//! touched since the last replica sync.
use crate::data::Jagged;
use crate::plan::{Plan, ShardingType};
use crate::{Error, Result};

/// One shard this rank holds, in plan order (tables ascending, shards in table order).
#[derive(Clone, Debug)]
pub struct LocalSlot {
    pub table: usize,
    pub kind: ShardingType,
    pub rows: std::ops::Range<u64>,
    pub cols: std::ops::Range<usize>,
}

/// Shards of rank `rank` in plan order.
pub fn slots_of(plan: &Plan, rank: usize) -> Vec<LocalSlot> {
    let mut v = Vec::new();
    for tp in &plan.tables {
        for s in &tp.shards {
            if s.rank == rank {
                v.push(LocalSlot { table: tp.table, kind: tp.kind, rows: s.rows.clone(), cols: s.cols.clone() });
            }
        }
    }
    v
}

/// The ids of `bags` that fall into `rows`, shifted to local rows, as a jagged list.
fn filter_rows(bags: &Jagged, rows: &std::ops::Range<u64>, out: &mut Vec<u64>) {
    let mut pos = 0usize;
    let mut lens = Vec::with_capacity(bags.lengths.len());
    let mut ids = Vec::new();
    for &l in &bags.lengths {
        let mut k = 0u64;
        for &id in &bags.values[pos..pos + l as usize] {
            if rows.contains(&id) {
                ids.push(id - rows.start);
                k += 1;
            }
        }
        lens.push(k);
        pos += l as usize;
    }
    out.extend_from_slice(&lens);
    out.extend_from_slice(&ids);
}

/// Encode this rank's sparse features for the input all-to-all: for each destination rank
/// (in order), for each shard of that rank (plan order): `b` lengths, then the local ids.
/// Returns the flat message and the per-destination counts.
pub fn encode_input(plan: &Plan, sparse: &[Jagged]) -> (Vec<u64>, Vec<usize>) {
    let mut send = Vec::new();
    let mut counts = Vec::with_capacity(plan.n);
    for dest in 0..plan.n {
        let start = send.len();
        for slot in slots_of(plan, dest) {
            filter_rows(&sparse[slot.table], &slot.rows, &mut send);
        }
        counts.push(send.len() - start);
    }
    (send, counts)
}

/// Decode the input all-to-all on the receiving rank: for each of `slots`, the bags of all
/// N·b samples of the sharding group (ordered by source rank). Every length and id is checked:
/// a malformed message is an error naming the source, never an out-of-bounds access.
pub fn decode_input(recv: &[u64], counts: &[usize], slots: &[LocalSlot], b: usize) -> Result<Vec<Jagged>> {
    let mut out: Vec<Jagged> = slots.iter().map(|_| Jagged::with_capacity(b * counts.len(), 0)).collect();
    let mut pos = 0usize;
    for (src, &c) in counts.iter().enumerate() {
        let end = pos + c;
        let bad = |m: String| Error::Transport(format!("input all-to-all from group rank {src}: {m}"));
        for (slot, j) in slots.iter().zip(out.iter_mut()) {
            if pos + b > end {
                return Err(bad(format!("message of {c} words too short for the lengths of table {}", slot.table)));
            }
            let lens = &recv[pos..pos + b];
            pos += b;
            let total: u64 = lens.iter().try_fold(0u64, |a, &l| a.checked_add(l)).ok_or_else(|| bad("length overflow".into()))?;
            if total > (end - pos) as u64 || lens.iter().any(|&l| l > u32::MAX as u64) {
                return Err(bad(format!("lengths of table {} sum to {total}, more than the {} words left", slot.table, end - pos)));
            }
            let n_rows = slot.rows.end - slot.rows.start;
            let ids = &recv[pos..pos + total as usize];
            if let Some(&id) = ids.iter().find(|&&id| id >= n_rows) {
                return Err(bad(format!("id {id} out of range for the shard of table {} ({n_rows} rows)", slot.table)));
            }
            j.lengths.extend(lens.iter().map(|&l| l as u32));
            j.values.extend_from_slice(ids);
            pos += total as usize;
        }
        if pos != end {
            return Err(bad(format!("{} words left over", end - pos)));
        }
    }
    Ok(out)
}

/// Rows of a shard touched since the last replica sync.
#[derive(Clone, Debug)]
pub struct Touched {
    bits: Vec<u64>,
}

impl Touched {
    pub fn new(rows: usize) -> Self {
        Touched { bits: vec![0; rows.div_ceil(64)] }
    }
    pub fn mark(&mut self, rows: &[u64]) {
        for &r in rows {
            self.bits[(r / 64) as usize] |= 1 << (r % 64);
        }
    }
    /// Ascending touched rows.
    pub fn rows(&self) -> Vec<u64> {
        let mut v = Vec::new();
        for (w, &bits) in self.bits.iter().enumerate() {
            let mut x = bits;
            while x != 0 {
                let t = x.trailing_zeros() as u64;
                v.push(w as u64 * 64 + t);
                x &= x - 1;
            }
        }
        v
    }
    pub fn clear(&mut self) {
        self.bits.fill(0);
    }
}
