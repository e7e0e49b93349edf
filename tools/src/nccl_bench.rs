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
//!
//! The one module of the CLI that reaches the NCCL binding (`ember_cuda::nccl`); it uses the
//! transport's sweep and the host bench's arguments and printing (`comm_bench`), never the
//! other way round.
use crate::comm_bench::{join_ranks, print, CommBenchArgs, Heading};
use crate::common::CliResult;
use ember_cuda::nccl::{self, NcclBuf, NcclComm, NcclDevice, NcclInfo, NcclOp};
use ember_transport::bench::{sweep, Collective, Row, SizeBuffers};
use ember_transport::{Comm, JoinConfig, Transport};
use std::borrow::Cow;
use std::time::Duration;

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

/// One size's device buffers and NCCL's collective on them: runs are enqueued on the rank's
/// stream (timed as nccl-tests: back to back, one synchronisation); the check copies the output
/// back to the host.
struct NcclBuffers<'a> {
    which: Collective,
    dev: &'a NcclDevice,
    nc: &'a NcclComm,
    count: usize,
    send: NcclBuf<f32>,
    recv: NcclBuf<f32>,
}

impl SizeBuffers for NcclBuffers<'_> {
    fn load(&mut self, input: &dyn Fn(usize) -> f32) -> Result<(), String> {
        let host: Vec<f32> = (0..self.send.len()).map(input).collect();
        self.dev.htod(&mut self.send, &host)?;
        self.dev.htod(&mut self.recv, &vec![f32::NAN; host.len()])
    }
    fn run(&mut self) -> Result<(), String> {
        match self.which {
            Collective::AllToAll => self.nc.all_to_all(&self.send, &mut self.recv, self.count),
            Collective::AllReduce => self.nc.all_reduce(&self.send, &mut self.recv, NcclOp::Sum),
            Collective::PingPong => Err("no NCCL ping-pong".into()),
        }
    }
    fn sync(&mut self) -> Result<(), String> {
        self.nc.sync()
    }
    fn output(&mut self) -> Result<Cow<'_, [f32]>, String> {
        let mut host = vec![0f32; self.recv.len()];
        self.dev.dtoh(&mut host, &self.recv)?;
        Ok(Cow::Owned(host))
    }
}

fn bench_rank(which: &str, c: &Comm, dev: &NcclDevice, nc: &NcclComm, a: &CommBenchArgs) -> Result<Vec<Row>, String> {
    let which = Collective::parse(which).ok_or_else(|| format!("no NCCL version of '{which}'"))?;
    let n = c.size();
    sweep(which, c, &a.options()?, |count| {
        let len = (which.table().lens)(count, n).0;
        Ok(NcclBuffers { which, dev, nc, count, send: dev.alloc::<f32>(len)?, recv: dev.alloc::<f32>(len)? })
    })
}

fn print_nccl(which: &str, a: &CommBenchArgs, n: usize, info: NcclInfo, dev: &NcclDevice, rows: &[Row]) {
    let more = format!("# NCCL {info}, one GPU per rank (rank 0: device {}, {}); device buffers, out of place", dev.ordinal, dev.name);
    print(a, &Heading { which, ranks: n, transport: "nccl", group: None, notes: String::new(), more: Some(more) }, rows);
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
                    print_nccl(&which, &a, c.size(), info, &dev, &rows);
                }
                Ok(rows.iter().map(|r| r.wrong).sum())
            })
        })
        .collect();
    join_ranks(&format!("ember bench {which} --transport nccl"), hs)
}
