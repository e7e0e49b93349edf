//! Replica sync in shared memory: the replica group's ranks are threads of one process (the
//! in-process transport) and keep their shards in host memory, so each rank averages its slice
//! of the rows to sync straight in every replica's shard — each replica's row read once, the
//! mean written back into each — instead of gathering the rows into a packed buffer,
//! all-reducing that and putting it back (three more passes over the rows, and the
//! all-reduce's own copies).
//!
//! The mean is the one every other path computes: each f32 widened, added in replica order
//! starting from replica 0, divided by the group size in f64, rounded once. So the result is
//! bitwise the packed path's.
//!
//! One sync is an all-gather of where each replica's shards are (which also says that every
//! replica has finished writing them), the averaging, and a barrier (no replica uses its
//! shards again before every rank has written its slice).
use crate::backend::cpu::prefetch_span;
use crate::{Error, Result};
use ember_transport::Comm;
use std::ops::Range;

/// Rows prefetched ahead of the one being averaged (in every replica).
const AHEAD: usize = 4;

/// One shard of this replica as the sync sees it: its weights and optimizer state in host
/// memory, `cols` weights and `spr` state floats a row, and the local rows to average.
pub(super) struct HostShard<'a> {
    pub weights: &'a mut [f32],
    pub state: &'a mut [f32],
    pub cols: usize,
    pub spr: usize,
    pub rows: &'a [u64],
    /// The table the shard belongs to (for errors).
    pub table: usize,
}

/// What each replica tells the others of one shard (u64 each): weights address and length,
/// state address and length, cols, spr (0 when the state is not averaged), row count, and a
/// digest of the rows (every replica must average the same rows).
const FIELDS: usize = 8;

/// Average `shards` (with their state where `spr > 0`) over the replica group `comm`, whose
/// ranks are all threads of this process. Every replica passes the same shards and rows, each
/// shard's rows strictly ascending (checked: a row listed twice could fall to two ranks).
///
/// On an error the other replicas may still be writing into these shards (a deadline can pass
/// on this rank while a slower peer's collective still completes): the caller must then never
/// free them (it leaks them; the job has failed).
pub(super) fn average(comm: &Comm, mut shards: Vec<HostShard<'_>>) -> Result<()> {
    let m = comm.size();
    if shards.iter().all(|s| s.rows.is_empty() || s.cols + s.spr == 0) {
        // Every replica has the same rows (the union of theirs): none averages anything.
        return Ok(());
    }
    let mut msg = Vec::with_capacity(shards.len() * FIELDS);
    for s in shards.iter_mut() {
        msg.extend_from_slice(&[
            s.weights.as_mut_ptr() as u64,
            s.weights.len() as u64,
            s.state.as_mut_ptr() as u64,
            s.state.len() as u64,
            s.cols as u64,
            s.spr as u64,
            s.rows.len() as u64,
            digest(s.rows),
        ]);
    }
    // Whether the rows are ascending and lie within the shards, and the tables (for errors),
    // while this rank alone has them.
    let within: Vec<bool> = shards.iter().map(|s| rows_fit(s.rows, s.weights.len(), s.cols) && rows_fit(s.rows, s.state.len(), s.spr)).collect();
    let tables: Vec<usize> = shards.iter().map(|s| s.table).collect();
    let widths: Vec<(usize, usize)> = shards.iter().map(|s| (s.rows.len(), s.cols + s.spr)).collect();
    // From here until the barrier, this replica's shards are reached through the addresses
    // alone, by this rank and by the others.
    let mut all = vec![0u64; msg.len() * m];
    comm.all_gather(&msg, &mut all)?;
    // Every rank that got here checks the same gathered values (and rows every replica holds
    // alike): it writes only if they agree, and then every other rank that got here does too.
    check(&all, &tables, &within, m)?;
    let (me, mut acc) = (comm.rank(), Vec::new());
    let mut weights = vec![std::ptr::null_mut::<f32>(); m];
    let mut state = vec![std::ptr::null_mut::<f32>(); m];
    for (i, rows) in slice_of(&widths, m, me) {
        let s = &shards[i];
        for p in 0..m {
            weights[p] = all[p * msg.len() + i * FIELDS] as *mut f32;
            state[p] = all[p * msg.len() + i * FIELDS + 2] as *mut f32;
        }
        let mine = &s.rows[rows];
        for (j, &r) in mine.iter().enumerate() {
            // The rows are random lines of memory in M buffers: their loads are started
            // `AHEAD` rows before they are summed.
            if let Some(&next) = mine.get(j + AHEAD) {
                for p in 0..m {
                    prefetch_span(weights[p].wrapping_add(next as usize * s.cols), s.cols);
                    prefetch_span(state[p].wrapping_add(next as usize * s.spr), s.spr);
                }
            }
            let r = r as usize;
            // SAFETY: `check` found row r within every replica's buffers (all of the same
            // length as ours; each replica's are its own allocations, so no two overlap), and
            // only this rank touches row r until the barrier: the rows are
            // distinct (ascending, checked) and `slice_of` gives each to exactly one rank, each
            // replica's own rank included, from the same widths on every rank.
            unsafe {
                mean_into_all(&weights, r * s.cols, s.cols, &mut acc);
                mean_into_all(&state, r * s.spr, s.spr, &mut acc);
            }
        }
    }
    comm.barrier()?;
    drop(shards);
    Ok(())
}

/// The rows rank `me` of `m` averages, as (shard, range of the shard's rows), for shards of
/// `(rows, floats a row)`: the shards' floats, shard after shard and row after row, are cut
/// into `m` even spans, and a row belongs to the span that holds its first float. So every row
/// of every shard belongs to exactly one rank, its floats (weights and state) together.
fn slice_of(widths: &[(usize, usize)], m: usize, me: usize) -> Vec<(usize, Range<usize>)> {
    // Bounded: the rows are rows of shards this replica holds in memory.
    let total: usize = widths.iter().map(|&(n, w)| n * w).sum();
    let (lo, hi) = (total / m * me + (total % m).min(me), total / m * (me + 1) + (total % m).min(me + 1));
    let mut out = Vec::new();
    let mut start = 0usize;
    for (i, &(n, w)) in widths.iter().enumerate() {
        let end_f = start + n * w;
        if w > 0 && end_f > lo && start < hi {
            let first = lo.saturating_sub(start).div_ceil(w);
            let end = (hi - start).div_ceil(w).min(n);
            if first < end {
                out.push((i, first..end));
            }
        }
        start = end_f;
    }
    out
}

/// Every replica's fields must equal replica 0's (same shard sizes, same rows), and the rows
/// must lie within the shards (`within`); checked on values every rank holds alike.
fn check(all: &[u64], tables: &[usize], within: &[bool], m: usize) -> Result<()> {
    let n = tables.len() * FIELDS;
    for p in 1..m {
        for (i, t) in tables.iter().enumerate() {
            let (a, b) = (&all[i * FIELDS..(i + 1) * FIELDS], &all[p * n + i * FIELDS..p * n + (i + 1) * FIELDS]);
            if a[1] != b[1] || a[3] != b[3] || a[4..] != b[4..] {
                return Err(Error::Transport(format!(
                    "replica sync: replica {p} holds shard {i} (table {t}) as {} weights, {} state, {}+{} floats a row, {} rows to average; replica 0 as {}, {}, {}+{}, {} (or other rows)",
                    b[1], b[3], b[4], b[5], b[6], a[1], a[3], a[4], a[5], a[6]
                )));
            }
        }
    }
    if let Some(i) = within.iter().position(|&ok| !ok) {
        return Err(Error::Input(format!("replica sync: shard {i} (table {})'s rows to average are not ascending or reach beyond its buffers", tables[i])));
    }
    Ok(())
}

/// Whether `rows` are strictly ascending and, `w` floats each, lie within a buffer of `len`
/// floats.
fn rows_fit(rows: &[u64], len: usize, w: usize) -> bool {
    let end = rows.last().map_or(0, |&r| r as u128 + 1);
    rows.windows(2).all(|p| p[0] < p[1]) && end * w as u128 <= len as u128
}

/// A digest of the rows (order included): replicas that would average different rows differ
/// here with overwhelming probability.
fn digest(rows: &[u64]) -> u64 {
    rows.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &r| (h ^ r).wrapping_mul(0x0100_0000_01b3).rotate_left(5))
}

/// Floats [at, at + len) of every buffer in `bufs` set to their mean: each widened to f64,
/// added in buffer order, divided by the count, rounded once. `acc` is scratch.
///
/// # Safety
/// The buffers are distinct (each replica's own), every one holds at least `at + len` floats,
/// and no other thread reads or writes those floats during the call.
unsafe fn mean_into_all(bufs: &[*mut f32], at: usize, len: usize, acc: &mut Vec<f64>) {
    if len == 0 {
        return;
    }
    acc.clear();
    // SAFETY: within every buffer and ours alone, and no two buffers overlap (the caller's
    // contract), so the rows of different buffers are disjoint.
    let row = |p: usize| unsafe { std::slice::from_raw_parts_mut(bufs[p].add(at), len) };
    acc.extend(row(0).iter().map(|&x| x as f64));
    for p in 1..bufs.len() {
        for (a, &x) in acc.iter_mut().zip(row(p).iter()) {
            *a += x as f64;
        }
    }
    let (n, first) = (bufs.len() as f64, row(0));
    for (o, &a) in first.iter_mut().zip(acc.iter()) {
        *o = (a / n) as f32;
    }
    for p in 1..bufs.len() {
        row(p).copy_from_slice(first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Replica p's value at float i of shard k's buffer b: distinct per replica, with ties and
    /// values whose f32 sum would round differently from the f64 one.
    fn value(p: usize, k: usize, b: usize, i: usize) -> f32 {
        let x = ((p * 7919 + k * 104_729 + b * 31 + i * 2_654_435_761) % 1_000_003) as f32;
        (x - 500_000.0) * 1.0e-3 + if i.is_multiple_of(5) { 1.0e7 } else { 0.0 }
    }

    /// Shards (cols, spr, rows held, rows to average) averaged by `m` in-process replicas: every
    /// replica's averaged rows equal the f64 oracle (sum in replica order, divided, rounded
    /// once), every other row keeps its own value.
    fn check_against_oracle(m: usize, shards: &[(usize, usize, usize, Vec<u64>)]) {
        let comms = ember_transport::local_world(m);
        let bufs: Vec<Vec<(Vec<f32>, Vec<f32>)>> = std::thread::scope(|sc| {
            let hs: Vec<_> = comms
                .into_iter()
                .enumerate()
                .map(|(p, comm)| {
                    sc.spawn(move || {
                        let mut own: Vec<(Vec<f32>, Vec<f32>)> = shards
                            .iter()
                            .enumerate()
                            .map(|(k, (c, s, n, _))| ((0..n * c).map(|i| value(p, k, 0, i)).collect(), (0..n * s).map(|i| value(p, k, 1, i)).collect()))
                            .collect();
                        let views = own
                            .iter_mut()
                            .zip(shards)
                            .enumerate()
                            .map(|(k, ((w, st), (c, s, _, rows)))| HostShard { weights: w, state: st, cols: *c, spr: *s, rows, table: k })
                            .collect();
                        average(&comm, views).unwrap();
                        own
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (k, (c, s, n, rows)) in shards.iter().enumerate() {
            for (b, w) in [(0, *c), (1, *s)] {
                for row in 0..*n {
                    let synced = rows.contains(&(row as u64));
                    for i in row * w..(row + 1) * w {
                        let mean = ((0..m).map(|p| value(p, k, b, i) as f64).sum::<f64>() / m as f64) as f32;
                        for (p, replica) in bufs.iter().enumerate() {
                            let got = if b == 0 { &replica[k].0 } else { &replica[k].1 };
                            let want = if synced { mean } else { value(p, k, b, i) };
                            assert_eq!(got[i].to_bits(), want.to_bits(), "m={m} shard {k} buffer {b} row {row} float {i} replica {p}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn every_replica_ends_with_the_f64_mean_of_the_rows_to_average_and_nothing_else_changes() {
        // Fewer rows than ranks, a shard without rows, odd widths, no state, one wide shard.
        let shards = vec![(3, 1, 10, vec![0, 4, 9]), (5, 0, 4, vec![]), (8, 2, 40, (0..40).filter(|r| r % 3 != 1).collect()), (1, 1, 7, vec![6]), (130, 1, 9, vec![1, 2, 8])];
        for m in [2, 3, 5, 8] {
            check_against_oracle(m, &shards);
        }
        // Fewer floats in all than ranks; a shard of rows without floats beside one with.
        check_against_oracle(8, &[(1, 0, 3, vec![2])]);
        check_against_oracle(5, &[(0, 0, 6, vec![0, 5]), (2, 1, 2, vec![1])]);
    }

    #[test]
    fn the_ranks_slices_cover_every_row_exactly_once() {
        // Shapes as (rows, floats a row); every rank's slice, over every M up to 9.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |k: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % k) as usize
        };
        for case in 0..300 {
            let shards = 1 + next(6);
            let widths: Vec<(usize, usize)> = (0..shards).map(|_| (next(30), if next(4) == 0 { 0 } else { 1 + next(140) })).collect();
            for m in 1..=9 {
                let mut owner: Vec<Vec<Option<usize>>> = widths.iter().map(|&(n, _)| vec![None; n]).collect();
                for me in 0..m {
                    for (i, rows) in slice_of(&widths, m, me) {
                        assert!(widths[i].1 > 0 && !rows.is_empty(), "case {case} m {m}: {widths:?}");
                        for r in rows {
                            assert!(owner[i][r].replace(me).is_none(), "case {case} m {m}: row {r} of shard {i} twice ({widths:?})");
                        }
                    }
                }
                for (i, (o, &(_, w))) in owner.iter().zip(&widths).enumerate() {
                    assert!(w == 0 || o.iter().all(Option::is_some), "case {case} m {m}: shard {i} not covered ({widths:?})");
                }
            }
        }
    }

    #[test]
    fn replicas_that_would_average_different_rows_or_shapes_all_refuse_and_write_nothing() {
        for (what, rows1, cols1) in [("rows", vec![1u64, 3], 4usize), ("width", vec![1, 2], 5)] {
            let comms = ember_transport::local_world(2);
            let rows1 = &rows1;
            let out: Vec<(Result<()>, Vec<f32>)> = std::thread::scope(|sc| {
                let hs: Vec<_> = comms
                    .into_iter()
                    .enumerate()
                    .map(|(p, comm)| {
                        sc.spawn(move || {
                            let (rows, cols) = if p == 1 { (rows1.clone(), cols1) } else { (vec![1, 2], 4) };
                            let mut w: Vec<f32> = (0..4 * cols).map(|i| (p * 100 + i) as f32).collect();
                            let mut st = vec![p as f32; 4];
                            let r = average(&comm, vec![HostShard { weights: &mut w, state: &mut st, cols, spr: 1, rows: &rows, table: 7 }]);
                            (r, w)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (p, (r, w)) in out.iter().enumerate() {
                let e = r.as_ref().unwrap_err().to_string();
                assert!(e.contains("replica 1") && e.contains("table 7"), "{what}: replica {p}: {e}");
                assert!(w.iter().enumerate().all(|(i, &x)| x == (p * 100 + i) as f32), "{what}: replica {p} was written");
            }
        }
        // Rows beyond the shard, or not ascending: refused before anything is written.
        for rows in [[0u64, 2], [1, 0], [1, 1]] {
            let comms = ember_transport::local_world(2);
            std::thread::scope(|sc| {
                for (p, comm) in comms.into_iter().enumerate() {
                    sc.spawn(move || {
                        let (mut w, mut st) = (vec![p as f32; 8], vec![p as f32; 2]);
                        let e = average(&comm, vec![HostShard { weights: &mut w, state: &mut st, cols: 4, spr: 1, rows: &rows, table: 0 }]).unwrap_err();
                        assert!(e.to_string().contains("not ascending or reach beyond"), "{rows:?}: {e}");
                        assert!(w.iter().chain(&st).all(|&x| x == p as f32), "{rows:?}: replica {p} was written");
                    });
                }
            });
        }
    }
}
