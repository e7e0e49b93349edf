//! The transport microbenchmark through the ABI (`ember_bench_collective`, nccl-tests style):
//! its collective selectors and size limit, and the `EmberBenchRow` it fills.

use crate::args::check_out;
use crate::collective::{agree, on_rank};
use crate::handle::{with_engine, EmberEngine, Model};
use crate::status::{fail, guard, EmberStatus, R};
use ember_transport::bench::{BenchOptions, Collective, Row};
use ember_transport::Comm;

/// `ember_bench_collective`: all-to-all, `size` bytes to every peer.
pub const EMBER_BENCH_ALL_TO_ALL: u32 = 0;
/// `ember_bench_collective`: all-reduce (sum) of a `size`-byte buffer.
pub const EMBER_BENCH_ALL_REDUCE: u32 = 1;
/// `ember_bench_collective`: ping-pong of `size` bytes between ranks 0 and 1 (the others wait);
/// time is half the round trip. Needs at least 2 ranks.
pub const EMBER_BENCH_PING_PONG: u32 = 2;
/// Largest `max_bytes` `ember_bench_collective` accepts (256 MiB).
pub const EMBER_BENCH_MAX_BYTES: usize = 256 << 20;

/// One size of a transport microbenchmark (`ember_bench_collective`), in the columns of
/// nccl-tests. Identical on every rank.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EmberBenchRow {
    /// Bytes per peer (all-to-all), buffer bytes (all-reduce) or the message (ping-pong).
    pub size: usize,
    /// f32 elements per peer (all-to-all), in the buffer (all-reduce) or the message (ping-pong):
    /// size / 4, at least 1.
    pub count: usize,
    /// Mean time per iteration in microseconds (the slowest rank's; ping-pong: half the round
    /// trip).
    pub time_us: f64,
    /// Algorithm bandwidth, GB/s: bytes moved per rank (all-to-all: size x ranks) / time.
    pub algbw: f64,
    /// Bus bandwidth, GB/s: algbw x (n-1)/n (all-to-all), x 2(n-1)/n (all-reduce) or x 1
    /// (ping-pong).
    pub busbw: f64,
    /// Values that differed from the independently computed expectation, over all ranks (a
    /// correct transport gives 0).
    pub wrong: u64,
}

/// Run a transport microbenchmark (nccl-tests style) over the engine's job: every rank of a
/// multi-rank engine (collective: every rank calls it with the same arguments), or a one-rank
/// world for a single-process engine. `collective` is `EMBER_BENCH_ALL_TO_ALL`,
/// `EMBER_BENCH_ALL_REDUCE` or `EMBER_BENCH_PING_PONG`. Sizes run from `min_bytes` (>= 1) to
/// `max_bytes`, multiplied by
/// `factor` (>= 2); a rank's buffers (`max_bytes`, times the number of ranks for all-to-all)
/// may not exceed `EMBER_BENCH_MAX_BYTES` each. Each size runs `warmup` untimed and
/// `iters` (>= 1) timed iterations, then one checked iteration with fresh seeded data compared
/// with expectations computed independently from the seeds. One row per size is written to
/// `rows_out`, a caller-owned array of `rows_cap` rows; `*nrows_out` (caller-owned) receives
/// the number of rows, also when `rows_cap` is too small (then nothing is measured and
/// `EMBER_STATUS_ERR_INVALID_ARGUMENT` is returned: call again with that many rows).
/// Returns `EMBER_STATUS_ERR_NULL_POINTER` for a NULL `rows_out` (with `rows_cap` > 0) or
/// `nrows_out`, `EMBER_STATUS_ERR_INVALID_ARGUMENT` for a value out of range,
/// `EMBER_STATUS_ERR_INTERNAL` for a transport failure.
///
/// # Safety
/// `rows_out` is NULL or points to `rows_cap` writable `EmberBenchRow`s; `nrows_out` is NULL or
/// points to a writable `size_t`. `engine` may be any value.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn ember_bench_collective(
    engine: *mut EmberEngine,
    collective: u32,
    min_bytes: usize,
    max_bytes: usize,
    factor: usize,
    iters: usize,
    warmup: usize,
    rows_out: *mut EmberBenchRow,
    rows_cap: usize,
    nrows_out: *mut usize,
) -> EmberStatus {
    guard(|| {
        let rows = with_engine(engine, |st| {
            let ranks = match &st.model {
                Model::Single(_) => 1,
                Model::Ranked(r) => r.grid.world(),
            };
            let checks = || -> R<(Collective, BenchOptions)> {
                check_out(nrows_out, "nrows_out")?;
                let which = match collective {
                    EMBER_BENCH_ALL_TO_ALL => Collective::AllToAll,
                    EMBER_BENCH_ALL_REDUCE => Collective::AllReduce,
                    EMBER_BENCH_PING_PONG if ranks >= 2 => Collective::PingPong,
                    EMBER_BENCH_PING_PONG => return fail(EmberStatus::ErrInvalidArgument, "EMBER_BENCH_PING_PONG needs at least 2 ranks"),
                    o => return fail(
                        EmberStatus::ErrInvalidArgument,
                        format!("collective is {o}: expected EMBER_BENCH_ALL_TO_ALL (0), EMBER_BENCH_ALL_REDUCE (1) or EMBER_BENCH_PING_PONG (2)"),
                    ),
                };
                if min_bytes == 0 || min_bytes > max_bytes || max_bytes > EMBER_BENCH_MAX_BYTES || factor < 2 || iters == 0 {
                    return fail(
                        EmberStatus::ErrInvalidArgument,
                        format!("need 1 <= min_bytes ({min_bytes}) <= max_bytes ({max_bytes}) <= {EMBER_BENCH_MAX_BYTES}, factor ({factor}) >= 2 and iters ({iters}) >= 1"),
                    );
                }
                let buffer = if which == Collective::AllToAll { max_bytes.saturating_mul(ranks) } else { max_bytes };
                if buffer > EMBER_BENCH_MAX_BYTES {
                    return fail(
                        EmberStatus::ErrInvalidArgument,
                        format!("buffers of {buffer} bytes (max_bytes {max_bytes}{}) exceed EMBER_BENCH_MAX_BYTES ({EMBER_BENCH_MAX_BYTES})", if ranks > 1 && which == Collective::AllToAll { format!(" x {ranks} ranks") } else { String::new() }),
                    );
                }
                let mut n = 0usize;
                let mut size = min_bytes;
                while size <= max_bytes {
                    n += 1;
                    match size.checked_mul(factor) {
                        Some(s) => size = s,
                        None => break,
                    }
                }
                // SAFETY: `nrows_out` is non-NULL (checked above) and writable (this function's
                // contract).
                unsafe { *nrows_out = n };
                if rows_cap < n {
                    return fail(EmberStatus::ErrInvalidArgument, format!("rows_cap is {rows_cap} but {n} sizes are measured"));
                }
                if rows_out.is_null() {
                    return fail(EmberStatus::ErrNullPointer, "rows_out is NULL");
                }
                let o = BenchOptions { min_bytes, max_bytes, factor, iters, warmup, check: 1, baseline: None, no_huge: false, register: false, per_op: false };
                Ok((which, o))
            };
            let mine = checks();
            let run = |c: &Comm, (which, o): (Collective, BenchOptions)| -> R<Vec<Row>> {
                // The options were checked above: what fails now is the transport.
                ember_transport::bench::bench_rank(which, c, &o).or_else(|e| fail(EmberStatus::ErrInternal, format!("transport: bench {}: {e}", which.name())))
            };
            match &mut st.model {
                Model::Single(_) => {
                    let args = mine?;
                    let world = ember_transport::local_world(1).pop().expect("one rank");
                    run(&world, args)
                }
                Model::Ranked(r) => on_rank(r, |r| {
                    let world = &r.rank.world();
                    let args = agree(world, mine)?;
                    run(world, args)
                }),
            }
        })?;
        for (i, r) in rows.iter().enumerate() {
            // SAFETY: the checks above passed on this rank, so `rows_out` is non-NULL with
            // rows_cap >= n writable rows (this function's contract), and the bench measures the
            // n sizes counted there: i < n.
            unsafe { *rows_out.add(i) = EmberBenchRow { size: r.size, count: r.count, time_us: r.time_us, algbw: r.algbw, busbw: r.busbw, wrong: r.wrong } };
        }
        // SAFETY: non-NULL (checked above, or we had returned) and writable (the contract).
        unsafe { *nrows_out = rows.len() };
        Ok(())
    })
}
