//! The message layout of the 2D step's sparse collectives, computed once when the rank is built:
//! for every exchange inside the sharding group, the floats this rank sends to and receives from
//! each group rank, and the block copies that pack its send buffer and unpack what it received.
//!
//! Three exchanges carry the pooled vectors forward and their gradients back:
//!
//! * **pooled** (table- and column-wise shards): an all-to-all; each peer gets its b rows of
//!   every shard here, [peer][shard][b × cols];
//! * **row sums** (row-wise tables): a reduce-scatter of partial sums, [peer][table][b × d]
//!   (a rank without a shard of a table sends zeros for it);
//! * **table-row-wise** (`crate::plan::trw`): partial sums reduced among each table's holders,
//!   then each holder's summed vectors to the owners it serves.
//!
//! The backward is the forward's mirror: each backward exchange is its forward exchange
//! [`Exchange::reversed`] — the counts swapped, packed by the forward's unpack blocks (from the
//! pooled gradients where the forward wrote pooled vectors) and unpacked by its pack blocks (into
//! the shards' gradient rows where the forward read the shards' outputs).
use crate::backend::Backend;
use crate::plan::trw::{trw_tables, TrwCounts, TrwTable};
use crate::plan::traffic::Traffic;
use crate::plan::{Plan, ShardingType};
use crate::Result;

use super::route::{slots_of, LocalSlot};

/// One block of a message: `rows` × `cols` floats at `msg` in the message (row after row) and at
/// `at` in buffer `buf` on the other side of the copy ([`Side`] gives that buffer's row stride).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub buf: usize,
    pub at: usize,
    pub msg: usize,
    pub rows: usize,
    pub cols: usize,
}

/// How the `buf` and `at` of a [`Block`] name a place among the buffers on one side of an exchange.
#[derive(Clone, Copy, Debug)]
pub enum Side<'a> {
    /// Buffer `buf`, with rows of `strides[buf]` floats (a shard's outputs or gradient rows).
    Each(&'a [usize]),
    /// Buffer `buf`, every buffer with rows of this many floats.
    All(usize),
    /// Table `buf`'s `d` columns of the one (b × stride) matrix of pooled vectors: buffer 0,
    /// starting at column (buf + 1)·d (column 0 holds the bottom MLP's output).
    Wide { d: usize, stride: usize },
}

impl Side<'_> {
    /// (buffer index, offset, row stride) of `at` in buffer `buf`.
    fn place(self, buf: usize, at: usize) -> (usize, usize, usize) {
        match self {
            Side::Each(strides) => (buf, at, strides[buf]),
            Side::All(stride) => (buf, at, stride),
            Side::Wide { d, stride } => (0, (buf + 1) * d + at, stride),
        }
    }
}

/// Copy every block from `src(buf)` on `side` into the message `msg`.
pub fn pack<'a, B: Backend + 'a>(be: &B, blocks: &[Block], side: Side, src: impl Fn(usize) -> &'a B::Buf, msg: &mut B::Buf) -> Result<()> {
    for k in blocks {
        let (i, at, stride) = side.place(k.buf, k.at);
        if stride == k.cols {
            let len = k.rows * k.cols;
            be.copy_2d(src(i), at, len, msg, k.msg, len, 1, len)?;
        } else {
            be.copy_2d(src(i), at, stride, msg, k.msg, k.cols, k.rows, k.cols)?;
        }
    }
    Ok(())
}

/// Copy every block from the message `msg` into `dst[buf]` on `side`.
pub fn unpack<B: Backend>(be: &B, blocks: &[Block], msg: &B::Buf, side: Side, dst: &mut [B::Buf]) -> Result<()> {
    for k in blocks {
        let (i, at, stride) = side.place(k.buf, k.at);
        if stride == k.cols {
            let len = k.rows * k.cols;
            be.copy_2d(msg, k.msg, len, &mut dst[i], at, len, 1, len)?;
        } else {
            be.copy_2d(msg, k.msg, k.cols, &mut dst[i], at, stride, k.rows, k.cols)?;
        }
    }
    Ok(())
}

/// One exchange of the step: floats to and from each group rank, and the blocks that pack the
/// send buffer and unpack the received one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exchange {
    /// Floats this rank sends to each group rank (a reduce-scatter: its block for each).
    pub send: Vec<usize>,
    /// Floats it receives from each group rank (a reduce-scatter: one entry, its own sum).
    pub recv: Vec<usize>,
    pub pack: Vec<Block>,
    pub unpack: Vec<Block>,
}

impl Exchange {
    /// The same exchange run backwards: counts swapped, packed by the unpack blocks and
    /// unpacked by the pack blocks.
    pub fn reversed(&self) -> Exchange {
        Exchange { send: self.recv.clone(), recv: self.send.clone(), pack: self.unpack.clone(), unpack: self.pack.clone() }
    }
    pub fn send_len(&self) -> usize {
        self.send.iter().sum()
    }
    pub fn recv_len(&self) -> usize {
        self.recv.iter().sum()
    }
}

/// One holder's block of a table-row-wise reduce: `len` floats at `msg` of the received
/// message, summed into the table's buffer `k` (`first`: the first holder's, copied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SumBlock {
    pub k: usize,
    pub msg: usize,
    pub len: usize,
    pub first: bool,
}

/// The table-row-wise exchanges of this rank.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrwLayout {
    /// Forward i: partial sums (from the shards' outputs) to the holders serving their owners.
    pub reduce: Exchange,
    /// Forward, between i and ii: the received blocks summed, in holder order, into one buffer
    /// per table this rank holds (`sums_len[k]` floats: the owners it serves × b × d).
    pub sum: Vec<SumBlock>,
    pub sums_len: Vec<usize>,
    /// Forward ii: each owner's b summed rows (from those buffers) to it, unpacked into the
    /// pooled vectors. Its reverse carries the gradient rows back to the holders.
    pub owners: Exchange,
    /// Backward: `owners` reversed (every owner's gradient rows to the holder serving it), then
    /// (from, to, len) copies that put the rows received into the message to every holder of
    /// the table, where the forward's `sum` read them, then `reduce` reversed.
    pub grad_owners: Exchange,
    pub gather: Vec<(usize, usize, usize)>,
    pub grad_reduce: Exchange,
}

/// The step's message layout for one rank of the sharding group (b samples per rank).
#[derive(Clone, Debug)]
pub struct StepLayout {
    pub b: usize,
    pub d: usize,
    /// Row width (columns) of each local shard, in slot order.
    pub slot_cols: Vec<usize>,
    pub pooled: Exchange,
    pub pooled_grad: Exchange,
    /// None without row-wise tables.
    pub row_sums: Option<Exchange>,
    pub row_grads: Option<Exchange>,
    /// None without table-row-wise tables.
    pub trw: Option<TrwLayout>,
    /// Tables of every group rank's column-wise shards, in its slot order (the Σg² exchange of
    /// row-wise AdaGrad on column shards).
    pub col_tables: Vec<Vec<usize>>,
    /// Bytes of the forward's and the backward's fixed-size collectives per step.
    pub forward_bytes: Traffic<u64>,
    pub backward_bytes: Traffic<u64>,
}

impl StepLayout {
    /// The layout of group rank `me` under `plan`, for `b` samples per rank and dim `d`.
    pub fn new(plan: &Plan, me: usize, b: usize, d: usize) -> StepLayout {
        let n = plan.n;
        let peers: Vec<Vec<LocalSlot>> = (0..n).map(|p| slots_of(plan, p)).collect();
        let mine = &peers[me];
        let slot_cols: Vec<usize> = mine.iter().map(|s| s.cols.len()).collect();
        let pooled = pooled(&peers, me, b);
        let row_tables: Vec<usize> = plan.tables.iter().filter(|t| t.kind == ShardingType::RowWise).map(|t| t.table).collect();
        let row_sums = (!row_tables.is_empty()).then(|| row_sums(&row_tables, mine, n, b, d));
        let trw = trw_tables(plan);
        let trw = (!trw.is_empty()).then(|| table_row_wise(&trw, mine, n, me, b, d));
        let col_tables = peers.iter().map(|ps| ps.iter().filter(|s| s.kind == ShardingType::ColumnWise).map(|s| s.table).collect()).collect();
        let bytes = |floats: usize| floats as u64 * 4;
        let mut forward_bytes = Traffic { output_a2a: bytes(pooled.send_len()), ..Traffic::default() };
        let mut backward_bytes = Traffic { grad_a2a: bytes(pooled.recv_len()), ..Traffic::default() };
        if let Some(x) = &row_sums {
            forward_bytes.output_reduce_scatter = bytes(x.send_len());
            backward_bytes.grad_all_gather = bytes(x.recv_len());
        }
        if let Some(t) = &trw {
            forward_bytes.output_trw_reduce = bytes(t.reduce.send_len());
            forward_bytes.output_trw_owners = bytes(t.owners.send_len());
            backward_bytes.grad_trw_owners = bytes(t.owners.recv_len());
            backward_bytes.grad_trw_gather = bytes(t.reduce.recv_len());
        }
        StepLayout {
            b,
            d,
            slot_cols,
            pooled_grad: pooled.reversed(),
            pooled,
            row_grads: row_sums.as_ref().map(Exchange::reversed),
            row_sums,
            trw,
            col_tables,
            forward_bytes,
            backward_bytes,
        }
    }
}

/// Table- and column-wise shards: this rank's shard outputs, [peer][slot][b × cols], to their
/// owners, unpacked into each table's columns.
fn pooled(peers: &[Vec<LocalSlot>], me: usize, b: usize) -> Exchange {
    let n = peers.len();
    let whole = |ps: &[LocalSlot]| ps.iter().enumerate().filter(|(_, s)| !s.kind.splits_rows()).map(|(i, s)| (i, s.clone())).collect::<Vec<_>>();
    let mine = whole(&peers[me]);
    let per: usize = mine.iter().map(|(_, s)| b * s.cols.len()).sum();
    let mut x = Exchange { send: vec![per; n], ..Default::default() };
    let mut pos = 0;
    for p in 0..n {
        for (i, s) in &mine {
            let cols = s.cols.len();
            x.pack.push(Block { buf: *i, at: p * b * cols, msg: pos, rows: b, cols });
            pos += b * cols;
        }
    }
    let mut pos = 0;
    for ps in peers {
        let start = pos;
        for (_, s) in whole(ps) {
            let cols = s.cols.len();
            x.unpack.push(Block { buf: s.table, at: s.cols.start, msg: pos, rows: b, cols });
            pos += b * cols;
        }
        x.recv.push(pos - start);
    }
    x
}

/// Row-wise tables: partial sums, [peer][table][b × d], reduce-scattered; this rank's sums,
/// [table][b × d], unpacked into each table's columns.
fn row_sums(row_tables: &[usize], mine: &[LocalSlot], n: usize, b: usize, d: usize) -> Exchange {
    let rt = row_tables.len();
    let mut x = Exchange { send: vec![rt * b * d; n], recv: vec![rt * b * d], ..Default::default() };
    for (i, s) in mine.iter().enumerate().filter(|(_, s)| s.kind == ShardingType::RowWise) {
        let k = row_tables.iter().position(|&t| t == s.table).expect("row table listed");
        for p in 0..n {
            x.pack.push(Block { buf: i, at: p * b * d, msg: (p * rt + k) * b * d, rows: b, cols: d });
        }
    }
    for (k, &t) in row_tables.iter().enumerate() {
        x.unpack.push(Block { buf: t, at: 0, msg: k * b * d, rows: b, cols: d });
    }
    x
}

/// Table-row-wise tables (`crate::plan::trw`).
fn table_row_wise(trw: &[TrwTable], mine: &[LocalSlot], n: usize, me: usize, b: usize, d: usize) -> TrwLayout {
    let c = TrwCounts::new(trw, n, me, b, d);
    let slot_of = |table: usize| mine.iter().position(|s| s.table == table).expect("a shard of the table on this rank");
    let held: Vec<&TrwTable> = trw.iter().filter(|t| t.holder_index(me).is_some()).collect();
    // i) Partial sums for the owners holder h serves, to h: [peer][table][owners × b × d].
    let mut reduce = Exchange { send: c.reduce_send.clone(), recv: c.reduce_recv.clone(), ..Default::default() };
    let mut pos = 0;
    for h in 0..n {
        for t in &held {
            let Some(j) = t.holder_index(h) else { continue };
            let rows = t.owners[j].len() * b;
            reduce.pack.push(Block { buf: slot_of(t.table), at: t.owners[j].start * b * d, msg: pos, rows, cols: d });
            pos += rows * d;
        }
    }
    // The holders' blocks, summed in holder order: [table][owners × b × d] for my tables.
    let sums_len: Vec<usize> = held.iter().map(|t| t.served_by(me).len() * b * d).collect();
    let mut sum = Vec::new();
    let mut pos = 0;
    for h in 0..n {
        for (k, t) in held.iter().enumerate() {
            if t.holder_index(h).is_some() {
                sum.push(SumBlock { k, msg: pos, len: sums_len[k], first: h == t.holders[0] });
                pos += sums_len[k];
            }
        }
    }
    // ii) Each owner's b summed rows to it: [peer][table][b × d].
    let mut owners = Exchange { send: c.owners_send.clone(), recv: c.owners_recv.clone(), ..Default::default() };
    let mut pos = 0;
    for o in 0..n {
        for (k, t) in held.iter().enumerate() {
            let served = t.served_by(me);
            if served.contains(&o) {
                owners.pack.push(Block { buf: k, at: (o - served.start) * b * d, msg: pos, rows: b, cols: d });
                pos += b * d;
            }
        }
    }
    let mut pos = 0;
    for h in 0..n {
        for t in trw.iter().filter(|t| t.holders[t.server_of(me)] == h) {
            owners.unpack.push(Block { buf: t.table, at: 0, msg: pos, rows: b, cols: d });
            pos += b * d;
        }
    }
    // Backward: the owners' gradient rows (where the forward packed each owner's sums) to every
    // holder of the table (where the forward's sum read each holder's block).
    let mut gather = Vec::new();
    for s in &sum {
        let served = held[s.k].served_by(me);
        for (j, _) in served.enumerate() {
            let from = owners.pack.iter().find(|k| k.buf == s.k && k.at == j * b * d).expect("every served owner packed").msg;
            gather.push((from, s.msg + j * b * d, b * d));
        }
    }
    TrwLayout { grad_owners: owners.reversed(), grad_reduce: reduce.reversed(), reduce, sum, sums_len, owners, gather }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlacedShard, TablePlan};

    fn plan() -> Plan {
        // Table 0 table-wise on rank 1; table 1 column-wise over ranks 0 and 1; table 2 row-wise
        // over both; table 3 table-row-wise over ranks 0 and 1 (owners 0 and 1 one each).
        let shard = |rank, rows: std::ops::Range<u64>, cols: std::ops::Range<usize>| PlacedShard { rank, rows, cols };
        Plan {
            n: 2,
            tables: vec![
                TablePlan { table: 0, kind: ShardingType::TableWise, shards: vec![shard(1, 0..10, 0..4)] },
                TablePlan { table: 1, kind: ShardingType::ColumnWise, shards: vec![shard(0, 0..10, 0..2), shard(1, 0..10, 2..4)] },
                TablePlan { table: 2, kind: ShardingType::RowWise, shards: vec![shard(0, 0..5, 0..4), shard(1, 5..10, 0..4)] },
                TablePlan { table: 3, kind: ShardingType::TableRowWise, shards: vec![shard(0, 0..5, 0..4), shard(1, 5..10, 0..4)] },
            ],
        }
    }

    #[test]
    fn every_message_is_packed_and_unpacked_exactly_once_and_the_backward_mirrors_it() {
        let (b, d) = (3, 4);
        for me in 0..2 {
            let l = StepLayout::new(&plan(), me, b, d);
            // Blocks tile the messages: no gap, no overlap.
            let tiles = |blocks: &[Block], len: usize| {
                let mut v: Vec<(usize, usize)> = blocks.iter().map(|k| (k.msg, k.rows * k.cols)).collect();
                v.sort_unstable();
                let mut at = 0;
                for (m, l) in v {
                    assert_eq!(m, at, "rank {me}: a gap or an overlap at {m}");
                    at += l;
                }
                assert_eq!(at, len, "rank {me}");
            };
            for x in [&l.pooled, l.row_sums.as_ref().unwrap(), &l.trw.as_ref().unwrap().reduce, &l.trw.as_ref().unwrap().owners] {
                tiles(&x.pack, x.send_len());
            }
            tiles(&l.pooled.unpack, l.pooled.recv_len());
            tiles(&l.row_sums.as_ref().unwrap().unpack, l.row_sums.as_ref().unwrap().recv_len());
            tiles(&l.trw.as_ref().unwrap().owners.unpack, l.trw.as_ref().unwrap().owners.recv_len());
            assert_eq!(l.pooled_grad, l.pooled.reversed());
            assert_eq!(l.pooled_grad.reversed(), l.pooled);
            assert_eq!(l.row_grads.as_ref().unwrap().reversed(), *l.row_sums.as_ref().unwrap());
            // Every rank receives its b rows of the whole table 0 and of both column halves of table 1.
            let cols: usize = l.pooled.unpack.iter().map(|k| k.cols).sum();
            assert_eq!(cols, 4 + 4);
            // Each of the 2 owners of table 3 gets b × d back from its holder; the backward
            // sends each holder the rows of every owner it serves.
            let t = l.trw.as_ref().unwrap();
            assert_eq!(t.owners.recv_len(), b * d);
            let g: usize = t.gather.iter().map(|g| g.2).sum();
            assert_eq!(g, t.reduce.recv_len());
        }
        // Rank 0 holds no table-wise shard: it sends its column half of table 1 only.
        let l0 = StepLayout::new(&plan(), 0, b, d);
        assert_eq!(l0.pooled.send, vec![b * 2, b * 2]);
        assert_eq!(l0.pooled.recv, vec![b * 2, b * (4 + 2)]);
        assert_eq!(l0.forward_bytes.output_a2a, 4 * 4 * b as u64);
        assert_eq!(l0.col_tables, vec![vec![1], vec![1]]);
    }
}
