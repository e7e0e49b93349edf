//! Routing of table-row-wise tables: which ranks hold a table and which owners each serves, and
//! the float counts of the all-to-alls that carry them (the 2D step in `crate::parallel` moves
//! the buffers; the planner prices the same counts).
//!
//! A table-row-wise table is split by rows over a few ranks of the
//! sharding group (its *holders*, normally the ranks of one node). Each holder pools partial sums
//! for all G = N·b samples of the group; then
//!
//! 1. the holders reduce them among themselves: holder i receives every holder's partial sums
//!    for the samples of the owners it serves (`owners[i]`, a contiguous block of group ranks,
//!    the N ranks split as evenly as possible over the k holders) and adds them in holder order;
//! 2. each holder sends every owner it serves that owner's b summed vectors.
//!
//! Ranks that hold no shard of the table take no part in step 1 and send nothing for it; the
//! volume is G·D floats per holder in step 1 and ≈ G·D/k in step 2. The backward runs in
//! reverse: every owner sends its b gradient rows to the holder serving it, and the holders
//! exchange these blocks so that each has the gradient of all G samples.
//!
//! Every table-row-wise table of the plan travels in the same all-to-alls (one per step), each
//! message holding the tables in table order.
use super::{split_range, Plan, ShardingType};
use std::ops::Range;

/// One table-row-wise table: its holders and the owners each serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrwTable {
    pub table: usize,
    /// Group ranks holding a shard, ascending.
    pub holders: Vec<usize>,
    /// `owners[i]`: the group ranks whose samples holder i reduces and sends back.
    pub owners: Vec<Range<usize>>,
}

impl TrwTable {
    /// Position of group rank `r` among the holders.
    pub fn holder_index(&self, r: usize) -> Option<usize> {
        self.holders.iter().position(|&h| h == r)
    }

    /// Position (among the holders) of the holder that serves owner `o`.
    pub fn server_of(&self, o: usize) -> usize {
        self.owners.iter().position(|r| r.contains(&o)).expect("owners cover every group rank")
    }

    /// Owners that group rank `r` serves (empty when it holds no shard).
    pub fn served_by(&self, r: usize) -> Range<usize> {
        self.holder_index(r).map_or(0..0, |i| self.owners[i].clone())
    }
}

/// The table-row-wise tables of `plan`, in table order.
pub fn trw_tables(plan: &Plan) -> Vec<TrwTable> {
    plan.tables
        .iter()
        .filter(|t| t.kind == ShardingType::TableRowWise)
        .map(|t| {
            let mut holders: Vec<usize> = t.shards.iter().map(|s| s.rank).collect();
            holders.sort_unstable();
            let owners = split_range(plan.n as u64, holders.len(), 1).into_iter().map(|r| r.start as usize..r.end as usize).collect();
            TrwTable { table: t.table, holders, owners }
        })
        .collect()
}

/// Float counts of the four table-row-wise all-to-alls, for group rank `me`, `b` samples per
/// rank and `d` columns per table, each `[peer]` (what `me` sends to, and receives from, each
/// group rank).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrwCounts {
    /// Step 1 (forward reduce among holders): partial sums to the holders.
    pub reduce_send: Vec<usize>,
    pub reduce_recv: Vec<usize>,
    /// Step 2: summed vectors to the owners.
    pub owners_send: Vec<usize>,
    pub owners_recv: Vec<usize>,
}

impl TrwCounts {
    pub fn new(tables: &[TrwTable], n: usize, me: usize, b: usize, d: usize) -> Self {
        let mut c = TrwCounts { reduce_send: vec![0; n], reduce_recv: vec![0; n], owners_send: vec![0; n], owners_recv: vec![0; n] };
        for t in tables {
            if let Some(i) = t.holder_index(me) {
                for (j, &h) in t.holders.iter().enumerate() {
                    c.reduce_send[h] += t.owners[j].len() * b * d;
                    c.reduce_recv[h] += t.owners[i].len() * b * d;
                }
                for o in t.owners[i].clone() {
                    c.owners_send[o] += b * d;
                }
            }
            c.owners_recv[t.holders[t.server_of(me)]] += b * d;
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlacedShard, TablePlan};

    #[test]
    fn owners_are_split_evenly_over_the_holders_in_rank_order() {
        // Holders listed out of rank order in the plan (the heaviest shard went to rank 3).
        let tp = TablePlan {
            table: 0,
            kind: ShardingType::TableRowWise,
            shards: vec![PlacedShard { rank: 3, rows: 0..5, cols: 0..4 }, PlacedShard { rank: 2, rows: 5..10, cols: 0..4 }],
        };
        let plan = Plan { n: 5, tables: vec![tp] };
        let t = &trw_tables(&plan)[0];
        assert_eq!(t.holders, vec![2, 3]);
        assert_eq!(t.owners, vec![0..3, 3..5]);
        assert_eq!((t.server_of(0), t.server_of(2), t.server_of(4)), (0, 0, 1));
        assert_eq!(t.served_by(1), 0..0);
        // Rank 2 sends its partial sums for owners 0..3 to itself and for 3..5 to rank 3, and
        // receives 3 owners' sums from each holder; rank 0 (no shard) sends nothing in step 1.
        let c = TrwCounts::new(&trw_tables(&plan), 5, 2, 2, 4);
        assert_eq!(c.reduce_send, vec![0, 0, 24, 16, 0]);
        assert_eq!(c.reduce_recv, vec![0, 0, 24, 24, 0]);
        assert_eq!(c.owners_send, vec![8, 8, 8, 0, 0]);
        assert_eq!(c.owners_recv, vec![0, 0, 8, 0, 0]);
        let c0 = TrwCounts::new(&trw_tables(&plan), 5, 0, 2, 4);
        assert_eq!(c0.reduce_send.iter().sum::<usize>() + c0.owners_send.iter().sum::<usize>(), 0);
        assert_eq!(c0.owners_recv, vec![0, 0, 8, 0, 0]);
    }
}
