//! Transport microbenchmarks in the style of nccl-tests: all-to-all and all-reduce over a
//! communicator, sizes min..=max by a factor, timed iterations after warm-up, then checked
//! iterations whose expected output is computed independently from the seeds. The measurement
//! core behind `ember bench a2a|allreduce` (which adds the CLI, transport choice and printing)
//! and the C ABI's `ember_bench_collective`.
//!
//! Columns: `size` (bytes per peer for all-to-all, buffer bytes for all-reduce), `count` (f32
//! elements), `time_us` (mean per iteration, the slowest rank's), `algbw` (GB/s: bytes / time;
//! all-to-all counts every peer's block), `busbw` (algbw × (n−1)/n for all-to-all,
//! × 2(n−1)/n for all-reduce, as nccl-tests), `wrong` (mismatched values over all ranks and
//! checked repetitions). Every rank of the communicator must call [`bench_rank`] with the same
//! options; every rank gets the same rows.
use ember_transport::{Comm, ReduceOp};
use std::io::{Read, Write};
use std::time::Instant;

/// Which collective to measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    /// `all_to_all`: `count` floats to every peer.
    AllToAll,
    /// `all_reduce` (sum) of `count` floats.
    AllReduce,
}

impl Collective {
    /// "a2a" or "allreduce" (the CLI's names).
    pub fn parse(s: &str) -> Option<Collective> {
        match s {
            "a2a" => Some(Collective::AllToAll),
            "allreduce" => Some(Collective::AllReduce),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Collective::AllToAll => "a2a",
            Collective::AllReduce => "allreduce",
        }
    }

    /// What element `i` of rank `me`'s output must be after checked repetition `rep` on `n`
    /// ranks (`count` floats per block), computed from the seeds alone.
    pub fn expected(self, n: usize, me: usize, rep: usize, count: usize, i: usize) -> f32 {
        match self {
            Collective::AllToAll => seed(i / count, rep, me, i % count),
            Collective::AllReduce => (0..n).map(|r| seed(r, rep, 0, i)).sum::<f32>(),
        }
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
}

impl Default for BenchOptions {
    /// The CLI's defaults: 1 KiB to 16 MiB by 2, 20 iterations, 2 warm-up, 1 check.
    fn default() -> Self {
        BenchOptions { min_bytes: 1 << 10, max_bytes: 16 << 20, factor: 2, iters: 20, warmup: 2, check: 1, baseline: None, no_huge: false, register: false }
    }
}

/// Benchmark buffers (and the memcpy ceiling's): huge-page advised unless `plain`.
fn alloc(n: usize, plain: bool) -> Vec<f32> {
    if plain {
        vec![0f32; n]
    } else {
        ember_transport::huge_vec(n)
    }
}

/// Regions registered with a communicator's transport for the bench (`--register`),
/// unregistered when this drops (declare it after the buffers it covers, so it drops first).
pub struct Registered<'a> {
    c: &'a Comm,
    at: Vec<u64>,
}

impl<'a> Registered<'a> {
    /// Register each non-empty `(addr, bytes)`; on a failure, those registered so far are
    /// unregistered again.
    ///
    /// # Safety
    /// Each range stays allocated until the guard drops.
    pub unsafe fn new(c: &'a Comm, ranges: &[(u64, usize)]) -> Result<Self, String> {
        let mut g = Registered { c, at: Vec::new() };
        for &(addr, len) in ranges.iter().filter(|r| r.1 > 0) {
            // SAFETY: the range stays allocated until the guard drops (this function's contract),
            // and the guard's drop unregisters it, which is what `register_region` asks.
            unsafe { c.register_region(addr, len) }.map_err(|e| e.to_string())?;
            g.at.push(addr);
        }
        Ok(g)
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        for &a in &self.at {
            if let Err(e) = self.c.unregister_region(a) {
                tracing::warn!("bench: unregistering a buffer: {e}");
            }
        }
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
        let bytes = if which == Collective::AllToAll { (size * n) as f64 } else { size as f64 };
        let algbw = bytes / time_us / 1e3;
        let factor = if which == Collective::AllToAll { (n - 1) as f64 / n as f64 } else { 2.0 * (n - 1) as f64 / n as f64 };
        Row { size, count, time_us, algbw, busbw: algbw * factor, wrong, base_us }
    }
}

/// Max of a value over ranks (all-gather, then max: identical on every rank).
/// The largest of every rank's `x` (the slowest rank's time).
pub fn max_over(c: &Comm, x: f64) -> ember_transport::Result<f64> {
    let mut all = vec![0f64; c.size()];
    c.all_gather(&[x], &mut all)?;
    Ok(all.into_iter().fold(0.0, f64::max))
}

/// Receiving end of a baseline stream: `total` bytes into a buffer of `chunk` bytes (the size
/// of what the collective lands per iteration, so both write the same memory footprint).
fn stream_sink(s: &mut std::net::TcpStream, chunk: usize, total: usize) -> std::io::Result<()> {
    let mut buf = vec![0u8; chunk.max(1)];
    let mut got = 0;
    while got < total {
        let off = got % buf.len();
        let n = s.read(&mut buf[off..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    s.write_all(&[1])
}

/// Sending end: `iters` writes of `bytes`, then wait for the receiver's acknowledgement.
fn stream_source(s: &mut std::net::TcpStream, bytes: usize, iters: usize) -> std::io::Result<f64> {
    s.set_nodelay(true)?;
    let data = vec![1u8; bytes];
    let t = Instant::now();
    for _ in 0..iters {
        s.write_all(&data)?;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    Ok(t.elapsed().as_secs_f64() * 1e6 / iters as f64)
}

/// One loopback stream with both ends in this process (`--baseline tcp1`).
fn tcp_stream_us(bytes: usize, iters: usize) -> std::io::Result<f64> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let rx = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        stream_sink(&mut s, bytes, bytes * iters)
    });
    let mut s = std::net::TcpStream::connect(addr)?;
    let us = stream_source(&mut s, bytes, iters)?;
    rx.join().map_err(|_| std::io::Error::other("reader panicked"))??;
    Ok(us)
}

/// One loopback stream from rank 0's process to rank 1's (`--baseline tcp`): the two ends run
/// where the ranks run, with their pinning. Returns the time per iteration on rank 0 (0 elsewhere).
fn tcp_pair_stream_us(c: &Comm, bytes: usize, iters: usize) -> Result<f64, String> {
    let e = |e: ember_transport::Error| e.to_string();
    let io = |e: std::io::Error| format!("tcp baseline: {e}");
    let me = c.rank();
    let l = if me == 1 { Some(std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?) } else { None };
    let mut port = [l.as_ref().map(|l| l.local_addr().map(|a| a.port() as u64)).transpose().map_err(io)?.unwrap_or(0)];
    c.broadcast(&mut port, 1).map_err(e)?;
    match me {
        0 => {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port[0] as u16)).map_err(io)?;
            stream_source(&mut s, bytes, iters).map_err(io)
        }
        1 => {
            let (mut s, _) = l.unwrap().accept().map_err(io)?;
            stream_sink(&mut s, bytes, bytes * iters).map_err(io)?;
            Ok(0.0)
        }
        _ => Ok(0.0),
    }
}

/// Both directions at once between rank 0 and rank 1 (`--baseline tcp2`): each sends `bytes`
/// per iteration to the other over its own loopback connection, as the 2-rank all-to-all does,
/// with no protocol. Returns the slower rank's time per iteration (0 on other ranks).
fn tcp_bidir_us(c: &Comm, bytes: usize, iters: usize) -> Result<f64, String> {
    let e = |e: ember_transport::Error| e.to_string();
    let io = |e: std::io::Error| format!("tcp baseline: {e}");
    let me = c.rank();
    let l = if me <= 1 { Some(std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?) } else { None };
    let mine = [l.as_ref().map(|l| l.local_addr().map(|a| a.port() as u64)).transpose().map_err(io)?.unwrap_or(0)];
    let mut ports = vec![0u64; c.size()];
    c.all_gather(&mine, &mut ports).map_err(e)?;
    let Some(l) = l else { return Ok(0.0) };
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = l.accept()?;
        stream_sink(&mut s, bytes, bytes * iters)
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", ports[1 - me] as u16)).map_err(io)?;
    let us = stream_source(&mut s, bytes, iters).map_err(io)?;
    sink.join().map_err(|_| "tcp baseline: reader panicked".to_string())?.map_err(io)?;
    Ok(us)
}

/// Measure `which` on `c` for every size of `a` (collective: every rank of `c` calls it with
/// the same options). Errors are transport failures or options out of range.
pub fn bench_rank(which: Collective, c: &Comm, a: &BenchOptions) -> Result<Vec<Row>, String> {
    let (n, me) = (c.size(), c.rank());
    let e = |e: ember_transport::Error| e.to_string();
    let (min, max) = (a.min_bytes, a.max_bytes);
    if a.factor < 2 || min == 0 || min > max {
        return Err("need -b >= 1, -b <= -e and -f >= 2".into());
    }
    let mut rows = Vec::new();
    let mut size = min;
    while size <= max {
        let count = (size / 4).max(1);
        let (send_len, recv_len) = if which == Collective::AllToAll { (count * n, count * n) } else { (count, count) };
        let mut send = alloc(send_len, a.no_huge);
        let mut recv = alloc(recv_len, a.no_huge);
        // SAFETY: the guard is declared after the buffers, so it unregisters them before they drop.
        let _registered = if a.register { Some(unsafe { Registered::new(c, &[(send.as_ptr() as u64, send.len() * 4), (recv.as_ptr() as u64, recv.len() * 4)]) }?) } else { None };
        let iter = |send: &[f32], recv: &mut [f32]| -> Result<(), String> {
            if which == Collective::AllToAll {
                c.all_to_all(send, recv).map_err(e)
            } else {
                recv.copy_from_slice(send);
                c.all_reduce(recv, ReduceOp::Sum).map_err(e)
            }
        };
        for (i, x) in send.iter_mut().enumerate() {
            *x = seed(me, 0, i / count, i % count);
        }
        for _ in 0..a.warmup {
            iter(&send, &mut recv)?;
        }
        c.barrier().map_err(e)?;
        let t = Instant::now();
        for _ in 0..a.iters {
            iter(&send, &mut recv)?;
        }
        let time_us = max_over(c, t.elapsed().as_secs_f64() * 1e6 / a.iters.max(1) as f64).map_err(e)?;
        // Ceiling measured in the same run.
        let base_us = match a.baseline.as_deref() {
            Some("memcpy") => {
                // Each rank copies the bytes it must move once (all n blocks for a2a, its buffer for allreduce), all ranks at once.
                let mut src = alloc(send_len, a.no_huge);
                src.fill(1.0);
                let mut dst = alloc(send_len, a.no_huge);
                dst.fill(0.0);
                c.barrier().map_err(e)?;
                let t = Instant::now();
                for _ in 0..a.iters {
                    dst.copy_from_slice(std::hint::black_box(&src));
                    std::hint::black_box(&mut dst);
                }
                Some(max_over(c, t.elapsed().as_secs_f64() * 1e6 / a.iters.max(1) as f64).map_err(e)?)
            }
            Some("tcp") if n >= 2 => {
                // One loopback stream, rank 0 -> rank 1, carrying the bytes one rank sends to its peers.
                c.barrier().map_err(e)?;
                let us = tcp_pair_stream_us(c, size * (n - 1), a.iters.max(1))?;
                c.barrier().map_err(e)?;
                Some(max_over(c, us).map_err(e)?)
            }
            Some("tcp2") if n >= 2 => {
                c.barrier().map_err(e)?;
                let us = tcp_bidir_us(c, size * (n - 1), a.iters.max(1))?;
                c.barrier().map_err(e)?;
                Some(max_over(c, us).map_err(e)?)
            }
            Some("tcp") | Some("tcp1") | Some("tcp2") => {
                // Both ends in rank 0's process (on its core when pinned).
                c.barrier().map_err(e)?;
                let us = if me == 0 { tcp_stream_us(size * (n - 1).max(1), a.iters.max(1)).map_err(|x| x.to_string())? } else { 0.0 };
                c.barrier().map_err(e)?;
                Some(max_over(c, us).map_err(e)?)
            }
            None => None,
            Some(o) => return Err(format!("unknown --baseline '{o}' (memcpy, tcp, tcp1, tcp2)")),
        };
        // Check: fresh seeds per repetition, expectations computed from the seeds directly.
        let mut wrong = 0u64;
        for rep in 1..=a.check {
            for (i, x) in send.iter_mut().enumerate() {
                *x = seed(me, rep, i / count, i % count);
            }
            recv.iter_mut().for_each(|x| *x = f32::NAN);
            iter(&send, &mut recv)?;
            for (i, &got) in recv.iter().enumerate() {
                wrong += u64::from(got.to_bits() != which.expected(n, me, rep, count, i).to_bits());
            }
        }
        let mut w = [wrong];
        c.all_reduce(&mut w, ReduceOp::Sum).map_err(e)?;
        rows.push(Row::new(which, n, size, count, time_us, w[0], base_us));
        match size.checked_mul(a.factor) {
            Some(s) => size = s,
            None => break,
        }
    }
    Ok(rows)
}
