//! `ember bench a2a|allreduce --transport nccl` (feature `nccl`): the NCCL fallback's
//! collectives on device buffers, with the table of the other backends (nccl-tests columns:
//! size, count, type, time(us), algbw, busbw, #wrong; `--json`: one object per row, same keys).
//!
//! One rank per GPU: under a launcher (`ember launch`, mpirun, srun, torchrun) each process is one
//! rank and uses device LOCAL_RANK (device 0 when it sees a single GPU, e.g. under
//! `CUDA_VISIBLE_DEVICES` or `srun --gpus-per-task=1`); with `--ranks N` the N ranks are threads
//! of this process on devices 0..N. The job's own bootstrap (shm or TCP) carries the NCCL unique
//! id from rank 0 and the timing/check reductions; the data move through NCCL only.
//!
//! Timing as nccl-tests: `-w` warm-up iterations, then `-n` iterations enqueued back to back and
//! one stream synchronisation, host clock; the slowest rank's time per iteration. Check: `-c`
//! repetitions with fresh seeds, results copied back to the host and compared bit for bit with
//! the expectation computed from the seeds (small integers: every sum is exact in f32).
use crate::comm_bench::CommBenchArgs;
use crate::common::CliResult;
use ember_cuda::nccl::{self, NcclBuf, NcclComm, NcclDevice, NcclInfo, NcclOp};
use ember_engine::comm_bench::{max_over, parse_size, seed, Collective, Row};
use ember_transport::{Comm, JoinConfig, ReduceOp, Transport};
use std::time::{Duration, Instant};

/// The device of a rank: LOCAL_RANK among the visible GPUs, or the only one.
fn device_for(local_rank: usize) -> Result<usize, String> {
    match NcclDevice::count() {
        0 => Err(NcclDevice::open(0).err().unwrap_or_else(|| "no CUDA device".into())),
        1 => Ok(0),
        g if local_rank < g => Ok(local_rank),
        g => Err(format!(
            "LOCAL_RANK {local_rank} but only {g} GPUs are visible (one rank per GPU: NCCL refuses two ranks on one GPU)"
        )),
    }
}

/// One rank's setup, agreed by all: if any rank cannot open its device, every rank returns an
/// error instead of waiting in ncclCommInitRank.
fn setup(c: &Comm, ordinal: Result<usize, String>) -> Result<(NcclDevice, NcclComm), String> {
    let e = |e: ember_transport::Error| e.to_string();
    let dev = ordinal.and_then(NcclDevice::open);
    let mut ok = vec![0u8; c.size()];
    c.all_gather(&[u8::from(dev.is_ok())], &mut ok).map_err(e)?;
    let dev = dev?;
    if let Some(bad) = ok.iter().position(|&x| x == 0) {
        return Err(format!("rank {bad} could not open its GPU (see its error)"));
    }
    let comm = NcclComm::init_with(dev.stream.clone(), c.rank(), c.size(), |b| c.broadcast(b, 0).map_err(|x| x.to_string()))?;
    Ok((dev, comm))
}

fn step(which: Collective, nc: &NcclComm, send: &NcclBuf<f32>, recv: &mut NcclBuf<f32>, count: usize) -> Result<(), String> {
    if which == Collective::AllToAll {
        nc.all_to_all(send, recv, count)
    } else {
        nc.all_reduce(send, recv, NcclOp::Sum)
    }
}

fn bench_rank(which: &str, c: &Comm, dev: &NcclDevice, nc: &NcclComm, a: &CommBenchArgs) -> Result<Vec<Row>, String> {
    let which = Collective::parse(which).ok_or_else(|| format!("no NCCL version of '{which}'"))?;
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
        let len = if which == Collective::AllToAll { count * n } else { count };
        let mut send = dev.alloc::<f32>(len)?;
        let mut recv = dev.alloc::<f32>(len)?;
        let mut host: Vec<f32> = (0..len).map(|i| seed(me, 0, i / count, i % count)).collect();
        dev.htod(&mut send, &host)?;
        for _ in 0..a.warmup {
            step(which, nc, &send, &mut recv, count)?;
        }
        nc.sync()?;
        c.barrier().map_err(e)?;
        let t = Instant::now();
        for _ in 0..a.iters {
            step(which, nc, &send, &mut recv, count)?;
        }
        nc.sync()?;
        let time_us = max_over(c, t.elapsed().as_secs_f64() * 1e6 / a.iters.max(1) as f64).map_err(e)?;
        // Check: fresh seeds per repetition, poisoned output, expectations from the seeds.
        let mut wrong = 0u64;
        let poison = vec![f32::NAN; len];
        for rep in 1..=a.check {
            host.iter_mut().enumerate().for_each(|(i, x)| *x = seed(me, rep, i / count, i % count));
            dev.htod(&mut send, &host)?;
            dev.htod(&mut recv, &poison)?;
            step(which, nc, &send, &mut recv, count)?;
            dev.dtoh(&mut host, &recv)?;
            for (i, &got) in host.iter().enumerate() {
                wrong += u64::from(got.to_bits() != which.expected(n, me, rep, count, i).to_bits());
            }
        }
        let mut w = [wrong];
        c.all_reduce(&mut w, ReduceOp::Sum).map_err(e)?;
        rows.push(Row::new(which, n, size, count, time_us, w[0], None));
        size *= a.factor;
    }
    Ok(rows)
}

fn print(which: &str, a: &CommBenchArgs, n: usize, info: NcclInfo, dev: &NcclDevice, rows: &[Row]) {
    if a.json {
        for r in rows {
            let o = serde_json::json!({
                "size": r.size, "count": r.count, "type": "float", "time_us": r.time_us,
                "algbw": r.algbw, "busbw": r.busbw, "wrong": r.wrong,
                "collective": which, "ranks": n, "transport": "nccl",
            });
            println!("{o}");
        }
        return;
    }
    let what = if which == "a2a" { "size = bytes per peer" } else { "size = buffer bytes" };
    println!(
        "# ember bench {which}: {n} ranks, transport nccl, -n {} -w {} -c {} ({what})",
        a.iters, a.warmup, a.check
    );
    println!(
        "# NCCL {info}, one GPU per rank (rank 0: device {}, {}); device buffers, out of place",
        dev.ordinal, dev.name
    );
    println!(
        "#{:>11} {:>11} {:>6} {:>11} {:>11} {:>11} {:>7}",
        "size", "count", "type", "time(us)", "algbw(GB/s)", "busbw(GB/s)", "#wrong"
    );
    for r in rows {
        println!(
            "{:>12} {:>11} {:>6} {:>11.1} {:>11.3} {:>11.3} {:>7}",
            r.size, r.count, "float", r.time_us, r.algbw, r.busbw, r.wrong
        );
    }
    let wrong: u64 = rows.iter().map(|r| r.wrong).sum();
    let avg = rows.iter().map(|r| r.busbw).sum::<f64>() / rows.len().max(1) as f64;
    println!("# Out of bounds values : {wrong} {}", if wrong == 0 { "OK" } else { "FAILED" });
    println!("# Avg bus bandwidth    : {avg:.3}");
}

/// `ember bench a2a|allreduce --transport nccl`.
pub fn run(which: &str, a: &CommBenchArgs) -> CliResult {
    if !matches!(which, "a2a" | "allreduce") {
        return Err(format!("ember bench {which}: no NCCL version (a2a, allreduce)").into());
    }
    if a.baseline.is_some() {
        return Err("--baseline is not available with --transport nccl (compare with nccl-tests' alltoall_perf: docs/cuda.md, NCCL fallback)".into());
    }
    if a.split.is_some() {
        return Err("--split is not available with --transport nccl".into());
    }
    let info = nccl::probe().map_err(|e| format!("ember bench {which} --transport nccl: {e}"))?;
    let timeout = a.timeout_ms.map(Duration::from_millis).unwrap_or(ember_transport::DEFAULT_TIMEOUT);
    // The bootstrap communicators (host side) and each rank's device.
    let ranks: Vec<(Comm, Result<usize, String>)> = match a.ranks {
        Some(n) => {
            let gpus = NcclDevice::count();
            if gpus == 0 {
                return Err(format!("ember bench {which} --transport nccl: {}", device_for(0).unwrap_err()).into());
            }
            if n > gpus {
                return Err(format!("--ranks {n} --transport nccl needs one GPU per rank (NCCL refuses two ranks on one GPU): {gpus} visible").into());
            }
            ember_transport::local_world_with_timeout(n, timeout)
                .into_iter()
                .enumerate()
                .map(|(i, c)| (c, Ok(i)))
                .collect()
        }
        None => {
            let mut cfg = JoinConfig::from_env()?;
            // The bootstrap runs over a host transport (EMBER_TRANSPORT=shm|tcp, else auto); the
            // data go through NCCL.
            if !matches!(cfg.transport, Transport::Shm | Transport::Tcp) {
                cfg.transport = Transport::Auto;
            }
            cfg.timeout = timeout;
            let c = Comm::connect(&cfg)?;
            if a.fault_rank == Some(c.rank()) {
                eprintln!("rank {} aborting on purpose (--fault-rank)", c.rank());
                std::process::abort();
            }
            vec![(c, device_for(cfg.local_rank))]
        }
    };
    let hs: Vec<_> = ranks
        .into_iter()
        .map(|(c, ordinal)| {
            let (a, which) = (a.clone(), which.to_string());
            std::thread::spawn(move || -> Result<u64, String> {
                let wr = c.rank();
                let (dev, nc) = setup(&c, ordinal).map_err(|e| format!("rank {wr}: {e}"))?;
                let rows = bench_rank(&which, &c, &dev, &nc, &a).map_err(|e| format!("rank {wr}: {e}"))?;
                if wr == 0 {
                    print(&which, &a, c.size(), info, &dev, &rows);
                }
                Ok(rows.iter().map(|r| r.wrong).sum())
            })
        })
        .collect();
    crate::comm_bench::join_ranks(&format!("ember bench {which} --transport nccl"), hs)
}
