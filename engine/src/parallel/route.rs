//! Routing of the sparse input within a sharding group: which shard each id goes to, the
//! wire layout of the input all-to-all, its checked decoding, and the all-to-all in flight
//! (`InputInFlight`: the next batch's, started during this step's dense work). Also the bit set
//! of rows touched since the last replica sync.
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

/// Append the bags of `bags` restricted to `rows` (ids shifted to local rows) to `out`: first
/// every bag's length, then the ids. Allocates nothing beyond `out`'s growth.
fn filter_rows(bags: &Jagged, rows: &std::ops::Range<u64>, out: &mut Vec<u64>) {
    let mut pos = 0usize;
    for &l in &bags.lengths {
        let bag = &bags.values[pos..pos + l as usize];
        out.push(bag.iter().filter(|id| rows.contains(id)).count() as u64);
        pos += l as usize;
    }
    out.extend(bags.values.iter().filter(|id| rows.contains(id)).map(|id| id - rows.start));
}

/// Words of `filter_rows(bags, rows, ..)`.
fn filtered_len(bags: &Jagged, rows: &std::ops::Range<u64>) -> usize {
    bags.lengths.len() + bags.values.iter().filter(|id| rows.contains(id)).count()
}

/// Encode this rank's sparse features for the input all-to-all: for each destination rank
/// (in order), for each shard of that rank (plan order): `b` lengths, then the local ids.
/// Returns the flat message (allocated at its exact size) and the per-destination counts.
pub fn encode_input(plan: &Plan, sparse: &[Jagged]) -> (Vec<u64>, Vec<usize>) {
    let dests: Vec<Vec<LocalSlot>> = (0..plan.n).map(|d| slots_of(plan, d)).collect();
    let counts: Vec<usize> = dests.iter().map(|slots| slots.iter().map(|s| filtered_len(&sparse[s.table], &s.rows)).sum()).collect();
    let mut send = Vec::with_capacity(counts.iter().sum());
    for slots in &dests {
        for slot in slots {
            filter_rows(&sparse[slot.table], &slot.rows, &mut send);
        }
    }
    (send, counts)
}

/// Decode the input all-to-all on the receiving rank: for each of `slots`, the bags of all
/// N·b samples of the sharding group (ordered by source rank). Every length and id is checked:
/// a malformed message is an error naming the source, never an out-of-bounds access.
pub fn decode_input(recv: &[u64], counts: &[usize], slots: &[LocalSlot], b: usize) -> Result<Vec<Jagged>> {
    // Pass 1: check the layout and size each shard's ids exactly.
    let mut ids = vec![0usize; slots.len()];
    let mut pos = 0usize;
    for (src, &c) in counts.iter().enumerate() {
        let end = pos.checked_add(c).filter(|&e| e <= recv.len()).ok_or_else(|| Error::Transport(format!("input all-to-all from group rank {src}: {c} words beyond the message")))?;
        let bad = |m: String| Error::Transport(format!("input all-to-all from group rank {src}: {m}"));
        for (slot, n_ids) in slots.iter().zip(ids.iter_mut()) {
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
            if let Some(&id) = recv[pos..pos + total as usize].iter().find(|&&id| id >= n_rows) {
                return Err(bad(format!("id {id} out of range for the shard of table {} ({n_rows} rows)", slot.table)));
            }
            *n_ids += total as usize;
            pos += total as usize;
        }
        if pos != end {
            return Err(bad(format!("{} words left over", end - pos)));
        }
    }
    // Pass 2: copy, every buffer at its final size.
    let mut out: Vec<Jagged> = ids.iter().map(|&k| Jagged::with_capacity(b * counts.len(), k)).collect();
    let mut pos = 0usize;
    for _ in counts {
        for j in out.iter_mut() {
            let lens = &recv[pos..pos + b];
            let total = lens.iter().sum::<u64>() as usize;
            j.lengths.extend(lens.iter().map(|&l| l as u32));
            j.values.extend_from_slice(&recv[pos + b..pos + b + total]);
            pos += b + total;
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
    /// Mark the rows set in `bitmap` (bit r % 8 of byte r / 8; the caller checked that every set
    /// bit is a row of this shard).
    pub fn mark_bitmap(&mut self, bitmap: &[u8]) {
        for (i, &b) in bitmap.iter().enumerate() {
            self.bits[i / 8] |= (b as u64) << (8 * (i % 8));
        }
    }
    /// Number of touched rows.
    pub fn count(&self) -> usize {
        self.bits.iter().map(|w| w.count_ones() as usize).sum()
    }
    /// Call `f` with every touched row, ascending.
    pub fn for_each_row(&self, mut f: impl FnMut(u64)) {
        for (w, &bits) in self.bits.iter().enumerate() {
            let mut x = bits;
            while x != 0 {
                let t = x.trailing_zeros() as u64;
                f(w as u64 * 64 + t);
                x &= x - 1;
            }
        }
    }
    pub fn clear(&mut self) {
        self.bits.fill(0);
    }
}

/// An input all-to-all started for the next batch during this step's dense work: in flight,
/// or received (waited for before the embedding backward, so that its send buffer is gone
/// when the backward's buffers are allocated).
pub(super) struct InputInFlight {
    recv: Received,
    counts: Vec<usize>,
}

enum Received {
    InFlight(ember_transport::Request<Vec<u64>>),
    Done(Vec<u64>),
}

impl InputInFlight {
    /// The all-to-all `req` of the ids, `counts` ids from each group rank.
    pub(super) fn new(req: ember_transport::Request<Vec<u64>>, counts: Vec<usize>) -> Self {
        InputInFlight { recv: Received::InFlight(req), counts }
    }
    /// Wait for the all-to-all (its send buffer is freed when it completes).
    pub(super) fn complete(&mut self) -> Result<()> {
        if let Received::InFlight(_) = self.recv {
            let Received::InFlight(r) = std::mem::replace(&mut self.recv, Received::Done(Vec::new())) else { unreachable!() };
            self.recv = Received::Done(r.wait()?);
        }
        Ok(())
    }
    pub(super) fn finish(mut self) -> Result<(Vec<u64>, Vec<usize>)> {
        self.complete()?;
        let Received::Done(v) = self.recv else { unreachable!("completed above") };
        Ok((v, self.counts))
    }
}
