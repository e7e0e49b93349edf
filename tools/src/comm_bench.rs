//! `ember bench a2a` and `ember bench allreduce` in the style of nccl-tests: -b/-e/-f sizes,
//! -n/-w/-c iterations, columns size, count, type, time, algbw, busbw, #wrong, and a footer.
//! Runs with in-process ranks (`--ranks N`) or one rank per process (under `ember launch`,
//! mpirun, srun, torchrun). Data are seeded per (rank, repetition); the expected output is
//! computed separately from the same seeds. `--baseline memcpy|tcp|tcp1|tcp2` adds the ceiling measured
//! in the same run (docs/transport.md derives it). The measurement itself (sweep, buffers,
//! ceilings, table) lives in the transport crate (`ember_transport::bench`); this file is the
//! CLI: arguments, transports, printing. `--transport nccl` is the NCCL bench (nccl_bench.rs,
//! which uses this file's arguments and printing).
use crate::common::CliResult;
use ember_transport::bench::{self, bench_rank_device_emu, parse_size, BenchOptions, Collective, Row};
use ember_transport::bootstrap::threads_world;
use ember_transport::{Comm, JoinConfig, Transport};
use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct CommBenchArgs {
    /// Smallest size (bytes per peer for a2a, buffer bytes for allreduce); K/M/G suffixes.
    #[arg(short = 'b', long = "min-bytes", default_value = "1K")]
    pub min: String,
    /// Largest size.
    #[arg(short = 'e', long = "max-bytes", default_value = "16M")]
    pub max: String,
    /// Size factor between rows.
    #[arg(short = 'f', long = "step-factor", default_value_t = 2, value_parser = crate::common::count::<2, 1024>)]
    pub factor: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 20, value_parser = crate::common::count::<1, 1_000_000_000>)]
    pub iters: usize,
    /// Warm-up iterations per size (untimed).
    #[arg(short = 'w', long = "warmup", default_value_t = 2, value_parser = crate::common::count::<0, 1_000_000_000>)]
    pub warmup: usize,
    /// Checked iterations per size (after timing).
    #[arg(short = 'c', long = "check", default_value_t = 1, value_parser = crate::common::count::<0, 1_000_000_000>)]
    pub check: usize,
    /// auto, local, shm, tcp, rdma (built with --features rdma); rdma-emu (with --ranks: the
    /// RDMA protocol over emulated verbs); nccl (not a host transport: NCCL's collectives on
    /// device buffers, in a binary built with --features nccl).
    #[arg(long, default_value = "auto")]
    pub transport: String,
    /// Run N ranks as threads of this process instead of joining a multi-process job.
    #[arg(long, value_parser = crate::common::count::<1, { ember_engine::grid::MAX_RANKS }>)]
    pub ranks: Option<usize>,
    /// (with --ranks) Leave the rank threads unpinned. By default thread r runs on allowed core
    /// r mod cores, as `ember launch` pins its processes.
    #[arg(long)]
    pub no_pin: bool,
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
    /// Register each size's send and receive buffers with the transport once, before timing
    /// (`Comm::register_region`, as nccl-tests' `-R 1`): on RDMA no message then registers or
    /// deregisters memory (each would pin and unpin its pages). No effect on shm, tcp, local.
    #[arg(long)]
    pub register: bool,
    /// (rdma-emu, a2a) Buffers in emulated device memory that the CPU cannot touch, moved by
    /// the GPUDirect path (`Comm::all_to_all_v_direct`: every non-empty message zero-copy).
    #[arg(long)]
    pub device_memory: bool,
    /// Time each operation alone after a barrier (as a training step issues it) and report the
    /// median over operations of the slowest rank's time, instead of the mean of back-to-back
    /// operations (nccl-tests' method).
    #[arg(long)]
    pub per_op: bool,
    /// One JSON object per row.
    #[arg(long)]
    pub json: bool,
    /// Collective timeout in milliseconds (at most 7 days).
    #[arg(long, value_parser = crate::common::count64::<1, { ember_transport::MAX_TIMEOUT.as_millis() as u64 }>)]
    pub timeout_ms: Option<u64>,
    /// MxN: split the world (M·N ranks) into the 2D grid's sharding groups (N ranks each) and
    /// replica groups (M ranks each), placement "replicas in node" (sharding group g = world
    /// ranks g, M+g, 2M+g, ...), and run the collective on both sub-communicators at the same
    /// time (like NCCL_TESTS_SPLIT); world rank 0 prints the rows of its two groups.
    #[arg(long)]
    pub split: Option<String>,
    /// (testing) this rank aborts right after joining, to exercise failure handling.
    #[arg(long, hide = true, value_parser = crate::common::count::<0, { ember_engine::grid::MAX_RANKS }>)]
    pub fault_rank: Option<usize>,
}

impl CommBenchArgs {
    /// The sweep's options (sizes parsed; checked by the sweep).
    pub(crate) fn options(&self) -> Result<BenchOptions, String> {
        Ok(BenchOptions {
            min_bytes: parse_size(&self.min)?,
            max_bytes: parse_size(&self.max)?,
            factor: self.factor,
            iters: self.iters,
            warmup: self.warmup,
            check: self.check,
            baseline: self.baseline.clone(),
            no_huge: self.no_huge,
            register: self.register,
            per_op: self.per_op,
        })
    }
}

/// One rank's rows: host buffers, or (`--device-memory`) emulated device memory.
fn bench_rank(which: &str, c: &Comm, a: &CommBenchArgs) -> Result<Vec<Row>, String> {
    let o = a.options()?;
    let coll = Collective::parse(which).ok_or_else(|| format!("unknown collective '{which}'"))?;
    if a.device_memory {
        return bench_rank_device_emu(c, &o);
    }
    bench::bench_rank(coll, c, &o)
}

/// What the first lines of a table say about the run.
pub(crate) struct Heading<'a> {
    pub which: &'a str,
    pub ranks: usize,
    pub transport: &'a str,
    /// `(name, world ranks)` of a `--split` group.
    pub group: Option<(&'a str, &'a [usize])>,
    /// After the transport's name (", registered buffers", ...).
    pub notes: String,
    /// A second `#` line.
    pub more: Option<String>,
}

/// Rank 0's output: the table (nccl-tests' layout), or `--json` rows.
pub(crate) fn print(a: &CommBenchArgs, h: &Heading, rows: &[Row]) {
    let base = a.baseline.as_deref();
    if a.json {
        for r in rows {
            let mut o = serde_json::json!({
                "size": r.size, "count": r.count, "type": "float", "time_us": r.time_us,
                "algbw": r.algbw, "busbw": r.busbw, "wrong": r.wrong,
                "collective": h.which, "ranks": h.ranks, "transport": h.transport,
                "method": if a.per_op { "per_op" } else { "back_to_back" },
            });
            if let Some((g, members)) = h.group {
                o["group"] = g.into();
                o["members"] = serde_json::json!(members);
            }
            if let (Some(b), Some(us)) = (base, r.base_us) {
                o["baseline"] = b.into();
                o["base_us"] = us.into();
            }
            println!("{o}");
        }
        return;
    }
    let what = match h.which {
        "a2a" => "size = bytes per peer",
        "pingpong" => "size = message bytes, ranks 0 and 1; time = half the round trip",
        _ => "size = buffer bytes",
    };
    let grp = h.group.map(|(g, m)| format!(" ({g} group {m:?}, run concurrently with the other group)")).unwrap_or_default();
    let method = if a.per_op { "per operation after a barrier, median of the slowest rank's" } else { "back-to-back mean, the slowest rank's" };
    println!("# ember bench {}: {} ranks{grp}, transport {}{}, -n {} -w {} -c {} ({what}; time: {method})", h.which, h.ranks, h.transport, h.notes, a.iters, a.warmup, a.check);
    if let Some(m) = &h.more {
        println!("{m}");
    }
    for l in bench::table(rows, h.ranks, base) {
        println!("{l}");
    }
}

/// Rank 0's table of the host transports' bench.
fn print_host(which: &str, a: &CommBenchArgs, c: &Comm, rows: &[Row], group: Option<&str>) {
    let mem = if a.device_memory { " (emulated device memory, direct path)" } else { "" };
    let notes = format!("{mem}{}", if a.register { ", registered buffers" } else { "" });
    let h = Heading { which, ranks: c.size(), transport: c.transport(), group: group.map(|g| (g, c.world_ranks())), notes, more: None };
    print(a, &h, rows);
}

pub fn run(which: &str, a: CommBenchArgs) -> CliResult {
    let timeout = a.timeout_ms.map(Duration::from_millis).unwrap_or(ember_transport::DEFAULT_TIMEOUT);
    let rdma_emu = a.transport == "rdma-emu";
    if a.device_memory && !(rdma_emu && which == "a2a" && a.baseline.is_none()) {
        return Err("--device-memory: only `bench a2a --transport rdma-emu --ranks N`, without --baseline".into());
    }
    let transport: Transport = if rdma_emu { Transport::Local } else { a.transport.parse()? };
    let comms: Vec<Comm> = match a.ranks {
        // The RDMA protocol over emulated verbs (threads): the protocol's own cost.
        Some(n) if rdma_emu => {
            use ember_transport::rdma::{emu_world, EmuConfig};
            // EMBER_RDMA_SLOTS / EMBER_RDMA_CHUNK, checked as the real RDMA transport checks them.
            let cfg = ember_transport::bootstrap::rdma_config_from_vars(|k| std::env::var(k).ok())?;
            emu_world(n, EmuConfig::fast(), cfg, timeout)?
        }
        None if rdma_emu => return Err("--transport rdma-emu needs --ranks N (in-process emulation)".into()),
        Some(n) => {
            let t = if transport == Transport::Auto { Transport::Local } else { transport };
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
            if m == 0 || n == 0 || m.checked_mul(n) != Some(world) {
                let need = m.checked_mul(n).map_or("more than 2^64".to_string(), |t| t.to_string());
                return Err(format!("--split {m}x{n} needs {need} ranks but the world has {world}").into());
            }
            Some((m, n))
        }
    };
    let cores = if a.ranks.is_some() && !a.no_pin { ember_transport::bootstrap::allowed_cores() } else { vec![] };
    let hs: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let a = a.clone();
            let which = which.to_string();
            let core = (cores.len() > 1).then(|| cores[i % cores.len()]);
            std::thread::spawn(move || {
                if let Some(core) = core {
                    ember_transport::bootstrap::pin_to_core(core);
                }
                let wr = c.world_rank_of(c.rank());
                let Some((m, nn)) = split else {
                    let rows = bench_rank(&which, &c, &a);
                    if c.rank() == 0 {
                        if let Ok(r) = &rows {
                            print_host(&which, &a, &c, r, None);
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
                        print_host(&which, &a, sub, &rows, Some(name));
                    }
                    wrong += rows.iter().map(|x| x.wrong).sum::<u64>();
                }
                Ok(wrong)
            })
        })
        .collect();
    join_ranks(&format!("ember bench {which}"), hs)
}

/// Wait for the rank threads of a benchmark; the first error, or the wrong-value count, fails it.
pub(crate) fn join_ranks(what: &str, hs: Vec<std::thread::JoinHandle<Result<u64, String>>>) -> CliResult {
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
        return Err(format!("{what}: {e}").into());
    }
    if wrong > 0 {
        return Err(format!("{what}: {wrong} wrong values").into());
    }
    Ok(())
}
