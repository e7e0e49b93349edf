//! The sharding plan: which rank of a sharding group holds which piece of which table.
//! Computed once for N ranks and used unchanged by every one of the M sharding groups.
//!
//! Every table is split one of four ways (BRIEF.md §2): whole on one rank (table-wise), by
//! contiguous row ranges over all N ranks (row-wise), by column ranges (column-wise), or by
//! row ranges over the ranks of one node (table-row-wise). So a table's shards always partition
//! either its rows (each shard has every column) or its columns (each shard has every row).
use crate::backend::ShardSpec;
use crate::config::ModelConfig;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;

mod memory;
mod options;
pub mod planner;
mod report;
mod search;
mod sizes;
mod stats;
pub mod traffic;
pub mod trw;

/// Values (f32) a replica sync averages per all-reduce (`crate::parallel::sync`): bounds the
/// sync's buffers, and the transport's (as large), whatever the number of touched rows; the
/// planner prices the same chunks.
pub const SYNC_CHUNK: usize = 1 << 20;

/// Bytes of each touched-row index (and of the row count before them) that a replica sends for
/// a shard of `rows` rows at a sparse replica sync: the narrowest of u16, u32 and u64 that holds
/// every local row and the count (at most `rows`). The sync and the planner both use it.
pub fn index_width(rows: u64) -> usize {
    if rows <= u16::MAX as u64 {
        2
    } else if rows <= u32::MAX as u64 {
        4
    } else {
        8
    }
}

/// Whether a replica sends the `touched` rows of a shard of `rows` rows as a bitmap (one bit a
/// row, `rows.div_ceil(8)` bytes) rather than as a list of indices: when the bitmap is smaller.
/// The row count before them says which, so the message carries no tag.
pub fn touched_as_bitmap(rows: u64, touched: u64) -> bool {
    touched.saturating_mul(index_width(rows) as u64) > rows.div_ceil(8)
}

/// Bytes of a replica's sparse-sync message for a shard of `rows` rows of which it touched
/// `touched` (an expectation, for the planner): the count, then the list or the bitmap,
/// whichever is smaller ([`touched_as_bitmap`]).
pub fn touched_message_bytes(rows: u64, touched: f64) -> f64 {
    let w = index_width(rows) as f64;
    w + (touched * w).min(rows.div_ceil(8) as f64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardingType {
    TableWise,
    RowWise,
    ColumnWise,
    TableRowWise,
}

impl ShardingType {
    pub const ALL: [ShardingType; 4] = [ShardingType::TableWise, ShardingType::RowWise, ShardingType::ColumnWise, ShardingType::TableRowWise];
    pub fn name(&self) -> &'static str {
        match self {
            ShardingType::TableWise => "table_wise",
            ShardingType::RowWise => "row_wise",
            ShardingType::ColumnWise => "column_wise",
            ShardingType::TableRowWise => "table_row_wise",
        }
    }
    /// Whether the shards split rows (partial pooled sums, combined by a reduce-scatter).
    pub fn splits_rows(&self) -> bool {
        matches!(self, ShardingType::RowWise | ShardingType::TableRowWise)
    }
}

/// One piece of a table on one rank of the sharding group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacedShard {
    /// Rank within the sharding group, 0..N.
    pub rank: usize,
    pub rows: Range<u64>,
    pub cols: Range<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablePlan {
    pub table: usize,
    pub kind: ShardingType,
    /// Ordered by row (row splits) or column (column splits); one per rank at most.
    pub shards: Vec<PlacedShard>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Ranks per sharding group.
    pub n: usize,
    pub tables: Vec<TablePlan>,
}

/// Split `len` into `parts` contiguous ranges whose sizes differ by at most one (multiples of
/// `align` except the last when `len` is one).
pub fn split_range(len: u64, parts: usize, align: u64) -> Vec<Range<u64>> {
    let units = len / align;
    let parts = parts.max(1) as u64;
    let mut out = Vec::new();
    let mut start = 0u64;
    for p in 0..parts {
        let take = units / parts + u64::from(p < units % parts);
        let end = if p + 1 == parts { len } else { start + take * align };
        out.push(start..end);
        start = end;
    }
    out
}

impl TablePlan {
    /// A table placed with `kind` over `ranks` (one shard per rank; empty row ranges dropped).
    pub fn new(table: usize, rows: u64, dim: usize, kind: ShardingType, ranks: &[usize]) -> Self {
        let shards = match kind {
            ShardingType::TableWise => vec![PlacedShard { rank: ranks[0], rows: 0..rows, cols: 0..dim }],
            ShardingType::RowWise | ShardingType::TableRowWise => split_range(rows, ranks.len(), 1)
                .into_iter()
                .zip(ranks)
                .filter(|(r, _)| !r.is_empty())
                .map(|(r, &rank)| PlacedShard { rank, rows: r, cols: 0..dim })
                .collect(),
            ShardingType::ColumnWise => split_range(dim as u64, ranks.len().min(dim / 4).max(1), 4)
                .into_iter()
                .zip(ranks)
                .map(|(c, &rank)| PlacedShard { rank, rows: 0..rows, cols: c.start as usize..c.end as usize })
                .collect(),
        };
        TablePlan { table, kind, shards }
    }
}

impl Plan {
    /// A plan that cycles table t through `kinds[t % kinds.len()]` on `n` ranks: table-wise on
    /// rank t mod n, row- and column-wise over all ranks, table-row-wise over the first half
    /// (every sharding type in one model, for tests and the 2D self-test).
    pub fn cycling(model: &ModelConfig, n: usize, kinds: &[ShardingType]) -> Result<Plan> {
        if n == 0 || kinds.is_empty() {
            return Err(Error::Config("a cycling plan needs n >= 1 ranks and at least one sharding type".into()));
        }
        let all: Vec<usize> = (0..n).collect();
        let half: Vec<usize> = (0..n.div_ceil(2)).collect();
        let tables = model
            .tables
            .iter()
            .enumerate()
            .map(|(t, tc)| {
                let kind = kinds[t % kinds.len()];
                let ranks: &[usize] = match kind {
                    ShardingType::TableWise => &all[t % n..t % n + 1],
                    ShardingType::TableRowWise => &half,
                    _ => &all,
                };
                TablePlan::new(t, tc.rows, tc.dim, kind, ranks)
            })
            .collect();
        let p = Plan { n, tables };
        p.validate(model)?;
        Ok(p)
    }

    /// The shards rank `rank` of a sharding group holds, as backend shard specs.
    pub fn shards_of(&self, model: &ModelConfig, rank: usize) -> Vec<(usize, ShardSpec)> {
        let mut v = Vec::new();
        for tp in &self.tables {
            let t = &model.tables[tp.table];
            for (i, s) in tp.shards.iter().enumerate() {
                if s.rank == rank {
                    v.push((i, ShardSpec { table: tp.table, table_rows: t.rows, dim: t.dim, rows: s.rows.clone(), cols: s.cols.clone() }));
                }
            }
        }
        v
    }

    /// Checks that every table is covered exactly once by shards on valid ranks.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        if self.tables.len() != model.tables.len() {
            return Err(Error::Config(format!("plan covers {} tables, model has {}", self.tables.len(), model.tables.len())));
        }
        for (i, tp) in self.tables.iter().enumerate() {
            let bad = |m: String| Err(Error::Config(format!("plan, table {}: {m}", tp.table)));
            if tp.table != i {
                return bad(format!("listed at position {i}"));
            }
            let t = &model.tables[i];
            if tp.shards.is_empty() {
                return bad("no shards".into());
            }
            if tp.shards.iter().any(|s| s.rank >= self.n) {
                return bad(format!("a shard on a rank outside 0..{}", self.n));
            }
            let mut ranks: Vec<usize> = tp.shards.iter().map(|s| s.rank).collect();
            ranks.sort();
            ranks.dedup();
            if ranks.len() != tp.shards.len() {
                return bad("two shards on one rank".into());
            }
            let (mut r, mut c) = (0u64, 0usize);
            for s in &tp.shards {
                if tp.kind == ShardingType::ColumnWise {
                    if s.rows != (0..t.rows) || s.cols.start != c || s.cols.is_empty() || s.cols.len() % 4 != 0 {
                        return bad(format!("column shard {:?} does not continue at column {c}", s.cols));
                    }
                    c = s.cols.end;
                } else {
                    if s.cols != (0..t.dim) || s.rows.start != r || s.rows.is_empty() {
                        return bad(format!("row shard {:?} does not continue at row {r}", s.rows));
                    }
                    r = s.rows.end;
                }
            }
            if (tp.kind == ShardingType::ColumnWise && c != t.dim) || (tp.kind != ShardingType::ColumnWise && r != t.rows) {
                return bad("shards do not cover the table".into());
            }
        }
        Ok(())
    }
}
