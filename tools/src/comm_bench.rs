//! `ember bench a2a` and `ember bench allreduce` in the style of nccl-tests: -b/-e/-f sizes,
//! -n/-w/-c iterations, columns size, count, type, time, algbw, busbw, #wrong, and a footer.
//! Runs with in-process ranks (`--ranks N`) or one rank per process (under `ember launch`,
//! mpirun, srun, torchrun). Data are seeded per (rank, repetition); the expected output is
//! computed separately from the same seeds. `--baseline memcpy|tcp|tcp1|tcp2` adds the ceiling measured
//! in the same run (docs/transport.md derives it).
use crate::common::CliResult;
use ember_transport::bootstrap::threads_world;
use ember_transport::{Comm, JoinConfig, ReduceOp, Transport};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct CommBenchArgs {
    /// Smallest size (bytes per peer for a2a, buffer bytes for allreduce); K/M/G suffixes.
    #[arg(short = 'b', long = "minbytes", default_value = "1K")]
    pub min: String,
    /// Largest size.
    #[arg(short = 'e', long = "maxbytes", default_value = "16M")]
    pub max: String,
    /// Size factor between rows.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    pub factor: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 20)]
    pub iters: usize,
    /// Warm-up iterations per size (untimed).
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 2)]
    pub warmup: usize,
    /// Checked iterations per size (after timing).
    #[arg(short = 'c', long = "check", default_value_t = 1)]
    pub check: usize,
    /// auto, local, shm, tcp; rdma-emu (with --ranks: the RDMA protocol over emulated verbs)
    /// (rdma, nccl: not built yet).
    #[arg(long, default_value = "auto")]
    pub transport: String,
    /// Run N ranks as threads of this process instead of joining a multi-process job.
    #[arg(long)]
    pub ranks: Option<usize>,
    /// Add the ceiling measured in the same run: memcpy (the copies the collective must make),
    /// tcp (one loopback TCP stream from rank 0's process to rank 1's, with the ranks' own
    /// pinning), tcp1 (one stream with both ends in rank 0's process) or tcp2 (rank 0 and rank 1
    /// stream to each other at once: the 2-rank all-to-all's traffic without a protocol).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Plain 4 KiB-page buffers instead of huge-page-advised ones (for the collective and the
    /// memcpy ceiling alike; see docs/transport.md).
    #[arg(long)]
    pub no_huge: bool,
    /// One JSON object per row.
    #[arg(long)]
    pub json: bool,
    /// Collective timeout in milliseconds.
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// MxN: split the world (M·N ranks) into the 2D grid's sharding groups (N ranks each) and
    /// replica groups (M ranks each), placement "replicas in node" (sharding group g = world
    /// ranks g, M+g, 2M+g, ...), and run the collective on both sub-communicators at the same
    /// time (like NCCL_TESTS_SPLIT); world rank 0 prints the rows of its two groups.
    #[arg(long)]
    pub split: Option<String>,
    /// (testing) this rank aborts right after joining, to exercise failure handling.
    #[arg(long, hide = true)]
    pub fault_rank: Option<usize>,
}

/// Benchmark buffers (and the memcpy ceiling's): huge-page advised unless `plain`.
fn alloc(n: usize, plain: bool) -> Vec<f32> {
    if plain {
        vec![0f32; n]
    } else {
        ember_transport::huge_vec(n)
    }
}

fn parse_size(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().map(|v| v * mul).map_err(|_| format!("bad size '{s}'"))
}

/// Seeded input: small integers so every sum is exact in f32.
fn seed(rank: usize, rep: usize, peer: usize, i: usize) -> f32 {
    ((rank * 131 + rep * 31 + peer * 17 + i * 7) % 61) as f32 - 30.0
}

struct Row {
    size: usize,
    count: usize,
    time_us: f64,
    algbw: f64,
    busbw: f64,
    wrong: u64,
    base_us: Option<f64>,
}

/// Max of a value over ranks (all-gather, then max: identical on every rank).
fn max_over(c: &Comm, x: f64) -> ember_transport::Result<f64> {
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

fn bench_rank(which: &str, c: &Comm, a: &CommBenchArgs) -> Result<Vec<Row>, String> {
    let (n, me) = (c.size(), c.rank());
    let e = |e: ember_transport::Error| e.to_string();
    let (min, max) = (parse_size(&a.min)?, parse_size(&a.max)?);
    if a.factor < 2 || min == 0 || min > max {
        return Err("need -b >= 1, -b <= -e and -f >= 2".into());
    }
    let mut rows = Vec::new();
    let mut size = min;
    while size <= max {
        let count = (size / 4).max(1);
        let (send_len, recv_len) = if which == "a2a" { (count * n, count * n) } else { (count, count) };
        let mut send = alloc(send_len, a.no_huge);
        let mut recv = alloc(recv_len, a.no_huge);
        let iter = |send: &[f32], recv: &mut [f32]| -> Result<(), String> {
            if which == "a2a" {
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
                let want = if which == "a2a" {
                    seed(i / count, rep, me, i % count)
                } else {
                    (0..n).map(|r| seed(r, rep, 0, i)).sum::<f32>()
                };
                wrong += u64::from(got.to_bits() != want.to_bits());
            }
        }
        let mut w = [wrong];
        c.all_reduce(&mut w, ReduceOp::Sum).map_err(e)?;
        let bytes = if which == "a2a" { (size * n) as f64 } else { size as f64 };
        let algbw = bytes / time_us / 1e3;
        let factor = if which == "a2a" { (n - 1) as f64 / n as f64 } else { 2.0 * (n - 1) as f64 / n as f64 };
        rows.push(Row { size, count, time_us, algbw, busbw: algbw * factor, wrong: w[0], base_us });
        size *= a.factor;
    }
    Ok(rows)
}

fn print(which: &str, a: &CommBenchArgs, c: &Comm, rows: &[Row], group: Option<&str>) {
    let base = a.baseline.as_deref();
    if a.json {
        for r in rows {
            let mut o = serde_json::json!({
                "size": r.size, "count": r.count, "type": "float", "time_us": r.time_us,
                "algbw": r.algbw, "busbw": r.busbw, "wrong": r.wrong,
                "collective": which, "ranks": c.size(), "transport": c.transport(),
            });
            if let Some(g) = group {
                o["group"] = g.into();
                o["members"] = serde_json::json!(c.world_ranks());
            }
            if let (Some(b), Some(us)) = (base, r.base_us) {
                o["baseline"] = b.into();
                o["base_us"] = us.into();
            }
            println!("{o}");
        }
        return;
    }
    let what = if which == "a2a" { "size = bytes per peer" } else { "size = buffer bytes" };
    let grp = group.map(|g| format!(" ({g} group {:?}, run concurrently with the other group)", c.world_ranks())).unwrap_or_default();
    println!("# ember bench {which}: {} ranks{grp}, transport {}, -n {} -w {} -c {} ({what})", c.size(), c.transport(), a.iters, a.warmup, a.check);
    let extra = match base {
        Some("memcpy") => "  memcpy(us)  %ceiling",
        Some(_) => "  stream(GB/s)  %stream",
        None => "",
    };
    println!("#{:>11} {:>11} {:>6} {:>11} {:>11} {:>11} {:>7}{extra}", "size", "count", "type", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong");
    for r in rows {
        let tail = match (base, r.base_us) {
            (Some("memcpy"), Some(us)) => format!("  {:>10.1}  {:>7.1}", us, 100.0 * us / r.time_us),
            (Some(_), Some(us)) => {
                let stream = (r.size * (c.size() - 1).max(1)) as f64 / us / 1e3;
                format!("  {:>12.3}  {:>6.1}", stream, 100.0 * r.busbw / stream)
            }
            _ => String::new(),
        };
        println!("{:>12} {:>11} {:>6} {:>11.1} {:>11.3} {:>11.3} {:>7}{tail}", r.size, r.count, "float", r.time_us, r.algbw, r.busbw, r.wrong);
    }
    let wrong: u64 = rows.iter().map(|r| r.wrong).sum();
    let avg = rows.iter().map(|r| r.busbw).sum::<f64>() / rows.len().max(1) as f64;
    println!("# Out of bounds values : {wrong} {}", if wrong == 0 { "OK" } else { "FAILED" });
    println!("# Avg bus bandwidth    : {avg:.3}");
}

pub fn run(which: &str, a: CommBenchArgs) -> CliResult {
    let timeout = a.timeout_ms.map(Duration::from_millis).unwrap_or(ember_transport::DEFAULT_TIMEOUT);
    let rdma_emu = a.transport == "rdma-emu";
    let transport: Transport = if rdma_emu { Transport::Local } else { a.transport.parse()? };
    let comms: Vec<Comm> = match a.ranks {
        // The RDMA protocol over emulated verbs (threads): the protocol's own cost.
        Some(n) if rdma_emu => {
            use ember_transport::rdma::{emu_world, EmuConfig, RdmaConfig};
            let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
            let d = RdmaConfig::default();
            let cfg = RdmaConfig { slots: env("EMBER_RDMA_SLOTS", d.slots), chunk: env("EMBER_RDMA_CHUNK", d.chunk) };
            emu_world(n, EmuConfig::fast(), cfg, timeout)?
        }
        None if rdma_emu => return Err("--transport rdma-emu needs --ranks N (in-process emulation)".into()),
        Some(n) => {
            let t = if transport == Transport::Auto { Transport::Local } else { transport };
            if matches!(t, Transport::Rdma | Transport::Nccl) {
                return Err(ember_transport::Error::NotBuilt(a.transport.clone()).into());
            }
            threads_world(n, t, timeout)?
        }
        None => {
            let mut cfg = JoinConfig::from_env()?;
            if a.transport != "auto" {
                cfg.transport = transport;
            }
            if let Some(ms) = a.timeout_ms {
                cfg.timeout = Duration::from_millis(ms);
            }
            let c = Comm::connect(&cfg)?;
            if a.fault_rank == Some(c.rank()) {
                eprintln!("rank {} aborting on purpose (--fault-rank)", c.rank());
                std::process::abort();
            }
            vec![c]
        }
    };
    let split = match &a.split {
        None => None,
        Some(g) => {
            let bad = || format!("--split '{g}': expected MxN with M, N >= 1 (e.g. 2x4)");
            let (m, n) = g.split_once(['x', 'X']).ok_or_else(bad)?;
            let (m, n): (usize, usize) = (m.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
            let world = comms.first().map(|c| c.size()).unwrap_or(0);
            if m == 0 || n == 0 || m * n != world {
                return Err(format!("--split {m}x{n} needs {} ranks but the world has {world}", m * n).into());
            }
            Some((m, n))
        }
    };
    let hs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let a = a.clone();
            let which = which.to_string();
            std::thread::spawn(move || {
                let wr = c.world_rank_of(c.rank());
                let Some((m, nn)) = split else {
                    let rows = bench_rank(&which, &c, &a);
                    if c.rank() == 0 {
                        if let Ok(r) = &rows {
                            print(&which, &a, &c, r, None);
                        }
                    }
                    return rows.map(|r| r.iter().map(|x| x.wrong).sum::<u64>()).map_err(|e| format!("rank {wr}: {e}"));
                };
                // 2D grid, replicas in node: (sharding group g, rank in group r) = (w % M, w / M).
                let w = c.rank();
                let (g, r) = (w % m, w / m);
                debug_assert!(r < nn);
                let err = |e: ember_transport::Error| format!("rank {wr}: split: {e}");
                let shard = c.split(g as u32, r as i64).map_err(err)?;
                let replica = c.split(r as u32, g as i64).map_err(err)?;
                c.barrier().map_err(err)?;
                let mut wrong = 0;
                let results: Vec<_> = std::thread::scope(|s| {
                    let hs: Vec<_> = [("shard", &shard), ("replica", &replica)]
                        .into_iter()
                        .map(|(name, sub)| {
                            let (a, which) = (&a, &which);
                            s.spawn(move || (name, sub, bench_rank(which, sub, a)))
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().expect("bench thread")).collect()
                });
                for (name, sub, rows) in results {
                    let rows = rows.map_err(|e| format!("rank {wr} ({name} group): {e}"))?;
                    if w == 0 {
                        print(&which, &a, sub, &rows, Some(name));
                    }
                    wrong += rows.iter().map(|x| x.wrong).sum::<u64>();
                }
                Ok(wrong)
            })
        })
        .collect();
    let mut first_err = None;
    let mut wrong = 0;
    for h in hs {
        match h.join().map_err(|_| "bench thread panicked".to_string()).and_then(|r| r) {
            Ok(w) => wrong = wrong.max(w),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(format!("ember bench {which}: {e}").into());
    }
    if wrong > 0 {
        return Err(format!("ember bench {which}: {wrong} wrong values").into());
    }
    Ok(())
}
