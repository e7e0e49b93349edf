//! The search for a plan: a greedy balancer over the ranks of one sharding group.
//!
//! Tables whose bytes exceed a share of the mean per-rank table bytes are split by rows
//! (table-row-wise over one node when that brings them under the share, else row-wise over all
//! N); tables whose compute cost exceeds the mean per-rank cost of the tables still to place are
//! split over just enough ranks, by columns when they are wide enough (shards at least
//! [`MIN_COL_WIDTH`] wide), else by rows into shards of equal lookups (table-row-wise, on one node
//! when they fit); the rest go whole, largest first, to the rank whose normalised load
//! max(cost / mean cost, bytes / mean bytes) stays lowest (LPT). `super::planner::plan` lowers
//! the split share step by step until the plan fits a memory budget.
use super::options::Ctx;
use super::sizes::shard_bytes;
use super::stats::TableStats;
use super::{split_range, PlacedShard, Plan, ShardingType, TablePlan};
use std::ops::Range;

/// Narrowest column shard the planner makes (the forced column-wise split goes down to 4).
pub const MIN_COL_WIDTH: usize = 16;

/// Current per-rank loads during greedy placement.
struct Loads {
    cost: Vec<f64>,
    mem: Vec<f64>,
    cost_avg: f64,
    mem_avg: f64,
    /// Table-byte budget per rank (budget minus plan-independent memory), if any.
    mem_cap: Option<f64>,
}

impl Loads {
    fn score(&self, r: usize, c: f64, m: f64) -> f64 {
        ((self.cost[r] + c) / self.cost_avg).max((self.mem[r] + m) / self.mem_avg)
    }
    fn fits(&self, r: usize, m: f64) -> bool {
        self.mem_cap.map_or(true, |cap| self.mem[r] + m <= cap)
    }
    /// Ranks sorted by the score they would have after adding (c, m); ranks within the cap first.
    fn ranked(&self, c: f64, m: f64, among: impl Iterator<Item = usize>) -> Vec<usize> {
        let mut v: Vec<usize> = among.collect();
        v.sort_by(|&a, &b| {
            (!self.fits(a, m)).cmp(&!self.fits(b, m)).then(self.score(a, c, m).total_cmp(&self.score(b, c, m))).then(a.cmp(&b))
        });
        v
    }
    fn add(&mut self, r: usize, c: f64, m: f64) {
        self.cost[r] += c;
        self.mem[r] += m;
    }
}

/// `k` contiguous row ranges of a table of `rows` rows holding about equal shares of its
/// lookups (by the id histogram; equal rows without one). No range is empty.
fn split_by_lookups(st: &TableStats, rows: u64, k: usize) -> Vec<Range<u64>> {
    let k = (k as u64).clamp(1, rows.max(1));
    if st.row_histogram.is_empty() || k == 1 {
        return split_range(rows, k as usize, 1);
    }
    let mut cuts = vec![0u64];
    for i in 1..k {
        let target = i as f64 / k as f64;
        // Smallest row whose prefix share reaches the target (binary search on the prefix).
        let (mut lo, mut hi) = (cuts[cuts.len() - 1] + 1, rows - (k - i));
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if st.row_fraction(rows, &(0..mid)) >= target {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        cuts.push(lo);
    }
    cuts.push(rows);
    cuts.windows(2).map(|w| w[0]..w[1]).collect()
}

/// A row split of table `t` into `ranges`, over `ranks` (heaviest shard to the least-loaded rank).
fn place_rows(ctx: &Ctx, loads: &mut Loads, t: usize, kind: ShardingType, ranges: Vec<Range<u64>>, ranks: Vec<usize>) -> TablePlan {
    let tc = &ctx.model.tables[t];
    let shard = |r: &Range<u64>| {
        let f = ctx.stats[t].row_fraction(tc.rows, r);
        (ctx.stats[t].lookups_per_sample * ctx.g * f * tc.dim as f64, shard_bytes(&ctx.opts.optimizer, r.end - r.start, tc.dim))
    };
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by(|&a, &b| {
        let (ca, ma) = shard(&ranges[a]);
        let (cb, mb) = shard(&ranges[b]);
        (cb / loads.cost_avg).max(mb / loads.mem_avg).total_cmp(&(ca / loads.cost_avg).max(ma / loads.mem_avg)).then(a.cmp(&b))
    });
    let mut free = ranks;
    let mut assigned = vec![0usize; ranges.len()];
    for i in order {
        let (c, m) = shard(&ranges[i]);
        free.sort_by(|&a, &b| loads.score(a, c, m).total_cmp(&loads.score(b, c, m)).then(a.cmp(&b)));
        let r = free.remove(0);
        loads.add(r, c, m);
        assigned[i] = r;
    }
    let shards = ranges.into_iter().zip(assigned).map(|(rows, rank)| PlacedShard { rank, rows, cols: 0..tc.dim }).collect();
    TablePlan { table: t, kind, shards }
}

/// Equal row ranges of table `t` over `ranks` (empty ranges dropped).
fn equal_rows(ctx: &Ctx, t: usize, ranks: usize) -> Vec<Range<u64>> {
    split_range(ctx.model.tables[t].rows, ranks, 1).into_iter().filter(|r| !r.is_empty()).collect()
}

/// A column split of table `t` over `k` ranks chosen by load.
fn place_cols(ctx: &Ctx, loads: &mut Loads, t: usize, k: usize) -> TablePlan {
    let tc = &ctx.model.tables[t];
    let k = k.clamp(1, (tc.dim / 4).max(1)).min(ctx.n);
    let c = ctx.table_cost(t) / k as f64;
    let m = shard_bytes(&ctx.opts.optimizer, tc.rows, tc.dim / k);
    let ranks: Vec<usize> = loads.ranked(c, m, 0..ctx.n).into_iter().take(k).collect();
    let tp = TablePlan::new(t, tc.rows, tc.dim, ShardingType::ColumnWise, &ranks);
    for s in &tp.shards {
        loads.add(s.rank, ctx.stats[t].lookups_per_sample * ctx.g * s.cols.len() as f64, shard_bytes(&ctx.opts.optimizer, tc.rows, s.cols.len()));
    }
    tp
}

/// A hot table too narrow for a column split: rows split into `k` shards of equal lookups, on
/// the k least-loaded ranks of the best node when k ≤ L, else of the whole group
/// (table-row-wise: partial sums reduced among those ranks only).
fn place_hot_rows(ctx: &Ctx, loads: &mut Loads, t: usize, k: usize) -> TablePlan {
    let ranges = split_by_lookups(&ctx.stats[t], ctx.model.tables[t].rows, k.min(ctx.n));
    let (c, m) = (ctx.table_cost(t) / ranges.len() as f64, ctx.table_bytes(t) / ranges.len() as f64);
    let k = ranges.len();
    let among: Vec<usize> = match best_node(ctx, loads, c * k as f64, m * k as f64, k) {
        Some(nd) => ctx.node_ranks(nd).collect(),
        None => (0..ctx.n).collect(),
    };
    let ranks: Vec<usize> = loads.ranked(c, m, among.into_iter()).into_iter().take(ranges.len()).collect();
    place_rows(ctx, loads, t, ShardingType::TableRowWise, ranges, ranks)
}

fn place_whole(ctx: &Ctx, loads: &mut Loads, t: usize) -> TablePlan {
    let (c, m) = (ctx.table_cost(t), ctx.table_bytes(t));
    let r = loads.ranked(c, m, 0..ctx.n)[0];
    loads.add(r, c, m);
    let tc = &ctx.model.tables[t];
    TablePlan::new(t, tc.rows, tc.dim, ShardingType::TableWise, &[r])
}

/// The node (block of L group ranks) of at least `min_ranks` ranks whose ranks' highest score
/// stays lowest; none when no node is that large.
fn best_node(ctx: &Ctx, loads: &Loads, c: f64, m: f64, min_ranks: usize) -> Option<usize> {
    (0..ctx.nodes()).filter(|&nd| ctx.node_ranks(nd).len() >= min_ranks).min_by(|&a, &b| {
        let s = |nd: usize| {
            let rs = ctx.node_ranks(nd);
            let k = rs.len() as f64;
            rs.map(|r| loads.score(r, c / k, m / k)).fold(0.0, f64::max)
        };
        s(a).total_cmp(&s(b)).then(a.cmp(&b))
    })
}

/// One greedy plan with split threshold `share` (a table bigger than share × mean per-rank
/// table bytes is split by rows).
pub(super) fn greedy(ctx: &Ctx, share: f64) -> Plan {
    let n = ctx.n;
    let nt = ctx.model.num_tables();
    let total_cost: f64 = (0..nt).map(|t| ctx.table_cost(t)).sum();
    let total_bytes: f64 = (0..nt).map(|t| ctx.table_bytes(t)).sum();
    let (dense, act) = ctx.fixed_bytes();
    let mut loads = Loads {
        cost: vec![0.0; n],
        mem: vec![0.0; n],
        cost_avg: (total_cost / n as f64).max(1e-9),
        mem_avg: (total_bytes / n as f64).max(1.0),
        mem_cap: ctx.opts.memory_budget_bytes.map(|b| b as f64 - dense - act),
    };
    let mut plans: Vec<Option<TablePlan>> = vec![None; nt];

    if let Some(kind) = ctx.opts.force {
        let mut order: Vec<usize> = (0..nt).collect();
        order.sort_by(|&a, &b| ctx.table_bytes(b).total_cmp(&ctx.table_bytes(a)).then(a.cmp(&b)));
        for t in order {
            let tc = &ctx.model.tables[t];
            plans[t] = Some(match kind {
                ShardingType::TableWise => place_whole(ctx, &mut loads, t),
                ShardingType::RowWise => place_rows(ctx, &mut loads, t, kind, equal_rows(ctx, t, n), (0..n).collect()),
                ShardingType::ColumnWise => place_cols(ctx, &mut loads, t, tc.dim / 4),
                ShardingType::TableRowWise => {
                    let nd = best_node(ctx, &loads, ctx.table_cost(t), ctx.table_bytes(t), 1).unwrap_or(0);
                    let ranks: Vec<usize> = ctx.node_ranks(nd).collect();
                    place_rows(ctx, &mut loads, t, kind, equal_rows(ctx, t, ranks.len()), ranks)
                }
            });
        }
        return Plan { n, tables: plans.into_iter().map(|p| p.expect("every table placed")).collect() };
    }

    // 1. Row splits: tables too big for a rank's share of the table bytes (largest first).
    let mut big: Vec<usize> = (0..nt)
        .filter(|&t| n > 1 && ctx.model.tables[t].rows > 1 && ctx.table_bytes(t) > share * loads.mem_avg)
        .collect();
    big.sort_by(|&a, &b| ctx.table_bytes(b).total_cmp(&ctx.table_bytes(a)).then(a.cmp(&b)));
    for &t in &big {
        let bytes = ctx.table_bytes(t);
        let l = ctx.l;
        let trw = l >= 2 && l < n && bytes / l as f64 <= share * loads.mem_avg;
        plans[t] = Some(if trw {
            let nd = best_node(ctx, &loads, ctx.table_cost(t), bytes, 1).unwrap_or(0);
            let ranks: Vec<usize> = ctx.node_ranks(nd).collect();
            place_rows(ctx, &mut loads, t, ShardingType::TableRowWise, equal_rows(ctx, t, ranks.len()), ranks)
        } else {
            place_rows(ctx, &mut loads, t, ShardingType::RowWise, equal_rows(ctx, t, n), (0..n).collect())
        });
    }

    // 2. Hot tables split over just enough ranks (by columns, or by rows when too narrow), and
    // whole tables, in LPT order of their per-shard load.
    struct Item {
        t: usize,
        k: usize,
        key: f64,
    }
    // A table is hot when its cost exceeds the mean per-rank cost of the tables still to place
    // (the row splits already load every rank about evenly).
    let rest_avg = ((0..nt).filter(|&t| plans[t].is_none()).map(|t| ctx.table_cost(t)).sum::<f64>() / n as f64).max(1e-9);
    let mut items: Vec<Item> = (0..nt)
        .filter(|&t| plans[t].is_none())
        .map(|t| {
            let tc = &ctx.model.tables[t];
            let c = ctx.table_cost(t);
            let kmax = if tc.dim >= 2 * MIN_COL_WIDTH { tc.dim / MIN_COL_WIDTH } else { tc.rows.min(n as u64) as usize }.min(n);
            let k = if kmax >= 2 && c > rest_avg { ((c / rest_avg).ceil() as usize).clamp(2, kmax) } else { 1 };
            let key = (c / k as f64 / loads.cost_avg).max(ctx.table_bytes(t) / k as f64 / loads.mem_avg);
            Item { t, k, key }
        })
        .collect();
    items.sort_by(|a, b| b.key.total_cmp(&a.key).then(a.t.cmp(&b.t)));
    for it in items {
        let wide = ctx.model.tables[it.t].dim >= 2 * MIN_COL_WIDTH;
        plans[it.t] = Some(match (it.k > 1, wide) {
            (true, true) => place_cols(ctx, &mut loads, it.t, it.k),
            (true, false) => place_hot_rows(ctx, &mut loads, it.t, it.k),
            (false, _) => place_whole(ctx, &mut loads, it.t),
        });
    }
    Plan { n, tables: plans.into_iter().map(|p| p.expect("every table placed")).collect() }
}

