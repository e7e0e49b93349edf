//! Transport microbenchmarks in the style of nccl-tests: one sweep loop ([`sweep`]) over sizes
//! min..=max by a factor, timed iterations after warm-up, then checked iterations whose expected
//! output is computed independently from the seeds; one table per collective ([`CollTable`], as
//! nccl-tests' `testColl`: buffer lengths, bandwidth factors, expected output). Where the bytes
//! live is the caller's [`SizeBuffers`] (host memory and emulated device memory: [`buffers`];
//! NCCL device buffers: `ember bench --transport nccl`). The core of `ember bench a2a|allreduce`
//! (which adds the CLI, transport choice and printing) and of the C ABI's
//! `ember_bench_collective`.
//!
//! Two timing methods: back-to-back (nccl-tests, OSU: `iters` operations after one barrier,
//! the mean per operation, the slowest rank's) and per operation (`per_op`: each operation
//! starts after a barrier, cold, as a training step issues it; the median over operations of
//! the slowest rank's time).
//!
//! Columns: `size` (bytes per peer for all-to-all, buffer bytes for all-reduce), `count` (f32
//! elements), `time_us` (per operation, the slowest rank's, by the chosen method), `algbw` (GB/s: bytes / time;
//! all-to-all counts every peer's block), `busbw` (algbw × (n−1)/n for all-to-all,
//! × 2(n−1)/n for all-reduce, as nccl-tests), `wrong` (mismatched values over all ranks and
//! checked repetitions). Every rank of the communicator runs the sweep with the same options;
//! every rank gets the same rows.
mod baseline;
pub mod buffers;

pub use buffers::{bench_rank, bench_rank_device_emu, HostBuffers, Registered};

use crate::{Comm, ReduceOp};
use std::borrow::Cow;
use std::time::Instant;

/// One collective's entry (nccl-tests' `testColl`): what the sweep needs to size, rate and
/// check it. Adding a collective adds one table.
pub struct CollTable {
    /// The CLI's name.
    pub name: &'static str,
    /// Floats in the send and the receive buffer, for `count` floats per block on `n` ranks.
    pub lens: fn(count: usize, n: usize) -> (usize, usize),
    /// Bytes per iteration that algbw counts, for `size` bytes per block on `n` ranks.
    pub alg_bytes: fn(size: usize, n: usize) -> f64,
    /// busbw / algbw on `n` ranks (nccl-tests' doc/PERFORMANCE.md).
    pub bus_factor: fn(n: usize) -> f64,
    /// Element `i` of rank `me`'s output after checked repetition `rep` on `n` ranks (`count`
    /// floats per block), from the seeds alone.
    pub expected: fn(n: usize, me: usize, rep: usize, count: usize, i: usize) -> f32,
    /// Operations one run holds: `time_us` is a run's time divided by it (a ping-pong's run
    /// is a round trip, two one-way messages).
    pub per_run: f64,
}

/// `all_to_all`: `count` floats to every peer.
pub const ALL_TO_ALL: CollTable = CollTable {
    name: "a2a",
    lens: |count, n| (count * n, count * n),
    alg_bytes: |size, n| (size * n) as f64,
    bus_factor: |n| (n - 1) as f64 / n as f64,
    expected: |_, me, rep, count, i| seed(i / count, rep, me, i % count),
    per_run: 1.0,
};

/// `all_reduce` (sum) of `count` floats.
pub const ALL_REDUCE: CollTable = CollTable {
    name: "allreduce",
    lens: |count, _| (count, count),
    alg_bytes: |size, _| size as f64,
    bus_factor: |n| 2.0 * (n - 1) as f64 / n as f64,
    expected: |n, _, rep, _, i| (0..n).map(|r| seed(r, rep, 0, i)).sum::<f32>(),
    per_run: 1.0,
};

/// Ping-pong (OSU's latency test): rank 0 sends `count` floats to rank 1 (`Comm::send`), which
/// receives them and sends its own `count` back; `time_us` is half the round trip, the one-way
/// time. Ranks from 2 up take no part (their output stays untouched: NaN).
pub const PING_PONG: CollTable = CollTable {
    name: "pingpong",
    lens: |count, _| (count, count),
    alg_bytes: |size, _| size as f64,
    bus_factor: |_| 1.0,
    expected: |_, me, rep, _, i| match me {
        0 | 1 => seed(1 - me, rep, 0, i),
        _ => f32::NAN,
    },
    per_run: 2.0,
};

/// Which collective to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    /// [`ALL_TO_ALL`].
    AllToAll,
    /// [`ALL_REDUCE`].
    AllReduce,
    /// [`PING_PONG`].
    PingPong,
}

impl Collective {
    /// Its table.
    pub fn table(self) -> &'static CollTable {
        match self {
            Collective::AllToAll => &ALL_TO_ALL,
            Collective::AllReduce => &ALL_REDUCE,
            Collective::PingPong => &PING_PONG,
        }
    }

    /// "a2a", "allreduce" or "pingpong" (the CLI's names).
    pub fn parse(s: &str) -> Option<Collective> {
        [Collective::AllToAll, Collective::AllReduce, Collective::PingPong].into_iter().find(|c| c.name() == s)
    }

    pub fn name(self) -> &'static str {
        self.table().name
    }

    /// What element `i` of rank `me`'s output must be after checked repetition `rep` on `n`
    /// ranks (`count` floats per block), computed from the seeds alone.
    pub fn expected(self, n: usize, me: usize, rep: usize, count: usize, i: usize) -> f32 {
        (self.table().expected)(n, me, rep, count, i)
    }
}

/// What one benchmark run measures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchOptions {
    /// Smallest size (bytes per peer for all-to-all, buffer bytes for all-reduce), >= 1.
    pub min_bytes: usize,
    /// Largest size, >= `min_bytes`.
    pub max_bytes: usize,
    /// Size factor between rows, >= 2.
    pub factor: usize,
    /// Timed iterations per size.
    pub iters: usize,
    /// Untimed warm-up iterations per size.
    pub warmup: usize,
    /// Checked repetitions per size (after timing), each with fresh seeds.
    pub check: usize,
    /// A ceiling measured in the same run: memcpy, tcp, tcp1 or tcp2 (see `ember bench --help`).
    pub baseline: Option<String>,
    /// Plain 4 KiB-page buffers instead of huge-page-advised ones.
    pub no_huge: bool,
    /// Register each size's send and receive buffers with the transport once, before the
    /// warm-up (`Comm::register_region`, as nccl-tests' `-R 1`): on RDMA no message then
    /// registers memory.
    pub register: bool,
    /// Time each operation alone after a barrier and report the median of the slowest rank's
    /// times, instead of the mean of back-to-back operations.
    pub per_op: bool,
}

impl Default for BenchOptions {
    /// The CLI's defaults: 1 KiB to 16 MiB by 2, 20 iterations, 2 warm-up, 1 check.
    fn default() -> Self {
        BenchOptions { min_bytes: 1 << 10, max_bytes: 16 << 20, factor: 2, iters: 20, warmup: 2, check: 1, baseline: None, no_huge: false, register: false, per_op: false }
    }
}

/// A size with an optional K/M/G suffix (powers of 1024): "1K", "16M", "100".
pub fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok().and_then(|v| v.checked_mul(mul)).ok_or_else(|| format!("bad size '{s}'"))
}

/// Seeded input: small integers so every sum is exact in f32.
pub fn seed(rank: usize, rep: usize, peer: usize, i: usize) -> f32 {
    ((rank * 131 + rep * 31 + peer * 17 + i * 7) % 61) as f32 - 30.0
}

/// One size's measurement (identical on every rank).
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub size: usize,
    pub count: usize,
    pub time_us: f64,
    pub algbw: f64,
    pub busbw: f64,
    pub wrong: u64,
    /// The baseline's time per iteration (microseconds) when `BenchOptions::baseline` is set.
    pub base_us: Option<f64>,
}

impl Row {
    /// A row of `which` on `n` ranks, with algbw and busbw derived as nccl-tests does.
    pub fn new(which: Collective, n: usize, size: usize, count: usize, time_us: f64, wrong: u64, base_us: Option<f64>) -> Row {
        let t = which.table();
        let algbw = (t.alg_bytes)(size, n) / time_us / 1e3;
        Row { size, count, time_us, algbw, busbw: algbw * (t.bus_factor)(n), wrong, base_us }
    }
}

/// The largest of every rank's `x` (the slowest rank's time; all-gather, then max: identical
/// on every rank).
pub fn max_over(c: &Comm, x: f64) -> crate::Result<f64> {
    let mut all = vec![0f64; c.size()];
    c.all_gather(&[x], &mut all)?;
    Ok(all.into_iter().fold(0.0, f64::max))
}

/// The buffers of one size on one rank and the collective on them: what the sweep needs from
/// the place the bytes live.
pub trait SizeBuffers {
    /// Set the input (element `i` of the send buffer's `lens().0` floats: `input(i)`, written
    /// in place) and poison the output.
    fn load(&mut self, input: &dyn Fn(usize) -> f32) -> Result<(), String>;
    /// Run the collective once (it may only be enqueued: see [`Self::sync`]).
    fn run(&mut self) -> Result<(), String>;
    /// Wait until every run enqueued so far has completed (host collectives: they have).
    fn sync(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// The output (the receive buffer's `lens().1` floats) after the last completed run.
    fn output(&mut self) -> Result<Cow<'_, [f32]>, String>;
}

/// Measure `which` on `c` for every size of `o`: `buffers(count)` makes one size's buffers
/// (`count` floats per block). Collective: every rank of `c` calls it with the same options.
/// Errors are transport failures or options out of range.
pub fn sweep<B: SizeBuffers>(which: Collective, c: &Comm, o: &BenchOptions, mut buffers: impl FnMut(usize) -> Result<B, String>) -> Result<Vec<Row>, String> {
    let (n, me) = (c.size(), c.rank());
    let e = |e: crate::Error| e.to_string();
    let (min, max) = (o.min_bytes, o.max_bytes);
    if o.factor < 2 || min == 0 || min > max {
        return Err("need -b >= 1, -b <= -e and -f >= 2".into());
    }
    if which == Collective::PingPong && n < 2 {
        return Err("pingpong needs at least 2 ranks".into());
    }
    let base = o.baseline.as_deref().map(baseline::Baseline::parse).transpose()?;
    let mut rows = Vec::new();
    let mut size = min;
    while size <= max {
        let count = (size / 4).max(1);
        let send_len = (which.table().lens)(count, n).0;
        let input = |rep| move |i| seed(me, rep, i / count, i % count);
        let mut b = buffers(count)?;
        b.load(&input(0))?;
        for _ in 0..o.warmup {
            b.run()?;
        }
        b.sync()?;
        let run_us = if o.per_op { per_op_us(c, &mut b, o.iters)? } else { back_to_back_us(c, &mut b, o.iters)? };
        let time_us = run_us / which.table().per_run;
        // Ceiling measured in the same run.
        let base_us = base.map(|k| k.measure(c, size, send_len, o)).transpose()?;
        // Check: fresh seeds per repetition, poisoned output, expectations from the seeds.
        let mut wrong = 0u64;
        for rep in 1..=o.check {
            b.load(&input(rep))?;
            b.run()?;
            b.sync()?;
            for (i, &got) in b.output()?.iter().enumerate() {
                wrong += u64::from(got.to_bits() != which.expected(n, me, rep, count, i).to_bits());
            }
        }
        let mut w = [wrong];
        c.all_reduce(&mut w, ReduceOp::Sum).map_err(e)?;
        rows.push(Row::new(which, n, size, count, time_us, w[0], base_us));
        match size.checked_mul(o.factor) {
            Some(s) => size = s,
            None => break,
        }
    }
    Ok(rows)
}

/// Back-to-back: one barrier, `iters` operations, the slowest rank's mean per operation.
fn back_to_back_us<B: SizeBuffers>(c: &Comm, b: &mut B, iters: usize) -> Result<f64, String> {
    let e = |e: crate::Error| e.to_string();
    c.barrier().map_err(e)?;
    let t = Instant::now();
    for _ in 0..iters {
        b.run()?;
    }
    b.sync()?;
    max_over(c, t.elapsed().as_secs_f64() * 1e6 / iters.max(1) as f64).map_err(e)
}

/// Per operation: `iters` times a barrier then one operation, timed alone; the median over
/// operations of the slowest rank's time (identical on every rank).
fn per_op_us<B: SizeBuffers>(c: &Comm, b: &mut B, iters: usize) -> Result<f64, String> {
    let e = |e: crate::Error| e.to_string();
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        c.barrier().map_err(e)?;
        let t = Instant::now();
        b.run()?;
        b.sync()?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        times.push(max_over(c, us).map_err(e)?);
    }
    times.sort_by(f64::total_cmp);
    let m = times.len() / 2;
    Ok(if times.len() % 2 == 1 { times[m] } else { (times[m - 1] + times[m]) / 2.0 })
}

/// The column header, the rows and the footer of a table as nccl-tests prints them (after the
/// caller's `#` lines), with the ceiling's columns when `baseline` is set; `n` ranks.
pub fn table(rows: &[Row], n: usize, baseline: Option<&str>) -> Vec<String> {
    let extra = match baseline {
        Some("memcpy") => "  memcpy(us)  %ceiling",
        Some(_) => "  stream(GB/s)  %stream",
        None => "",
    };
    let mut out = vec![format!("#{:>11} {:>11} {:>6} {:>11} {:>11} {:>11} {:>7}{extra}", "size", "count", "type", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong")];
    for r in rows {
        let tail = match (baseline, r.base_us) {
            (Some("memcpy"), Some(us)) => format!("  {:>10.1}  {:>7.1}", us, 100.0 * us / r.time_us),
            (Some(_), Some(us)) => {
                let stream = (r.size * (n - 1).max(1)) as f64 / us / 1e3;
                format!("  {:>12.3}  {:>6.1}", stream, 100.0 * r.busbw / stream)
            }
            _ => String::new(),
        };
        out.push(format!("{:>12} {:>11} {:>6} {:>11.1} {:>11.3} {:>11.3} {:>7}{tail}", r.size, r.count, "float", r.time_us, r.algbw, r.busbw, r.wrong));
    }
    let wrong: u64 = rows.iter().map(|r| r.wrong).sum();
    let avg = rows.iter().map(|r| r.busbw).sum::<f64>() / rows.len().max(1) as f64;
    out.push(format!("# Out of bounds values : {wrong} {}", if wrong == 0 { "OK" } else { "FAILED" }));
    out.push(format!("# Avg bus bandwidth    : {avg:.3}"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Buffers whose operation only sleeps: rank 0's third operation takes 200 ms, every other
    /// one 1 ms on every rank.
    struct Sleepy {
        rank: usize,
        runs: usize,
    }

    impl SizeBuffers for Sleepy {
        fn load(&mut self, _: &dyn Fn(usize) -> f32) -> Result<(), String> {
            Ok(())
        }
        fn run(&mut self) -> Result<(), String> {
            self.runs += 1;
            let slow = self.rank == 0 && self.runs == 3;
            std::thread::sleep(Duration::from_millis(if slow { 200 } else { 1 }));
            Ok(())
        }
        fn output(&mut self) -> Result<Cow<'_, [f32]>, String> {
            Ok(Cow::Owned(Vec::new()))
        }
    }

    /// One straggling operation: the back-to-back mean carries it (≥ 200/5 ms), the per-operation
    /// median does not (it sees the slowest rank's 1 ms operations). Sleeps never undershoot, and
    /// the per-operation bound leaves 99 ms for scheduling delays.
    #[test]
    fn per_op_takes_the_median_of_the_slowest_rank_and_back_to_back_the_mean() {
        let hs: Vec<_> = crate::local_world(3)
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let mut b = Sleepy { rank: c.rank(), runs: 0 };
                    let b2b = back_to_back_us(&c, &mut b, 5).unwrap();
                    b.runs = 0;
                    let op = per_op_us(&c, &mut b, 5).unwrap();
                    (b2b, op)
                })
            })
            .collect();
        let got: Vec<(f64, f64)> = hs.into_iter().map(|h| h.join().unwrap()).collect();
        for &(b2b, op) in &got {
            assert_eq!((b2b, op), got[0], "every rank reports the same times");
            assert!(b2b >= 40_000.0, "back-to-back mean {b2b} us");
            assert!((1_000.0..100_000.0).contains(&op), "per-operation median {op} us");
        }
    }
}
