//! Calibration: a [`Machine`] measured on the machine it runs on by microbenchmarks only —
//! `bench mem`'s copy and random-gather rates, the dense network's GEMMs on the backend's own
//! `gemm`, `bench embedding`'s forward and fused backward per optimizer, and all-to-all /
//! all-reduce curves of in-process ranks (shared memory between threads: `intra_node`) and of
//! two ranks over TCP on loopback (`inter_node`). Never a training step: those are what the
//! model predicts. Each figure's `sources` line says how it was measured and when.
use super::machine::{CurvePoint, EmbBackwardEff, Link, Machine, MemoryRates};
use crate::backend::Backend;
use crate::bench::{self, EmbeddingBench, BENCH_ROWWISE_ADAGRAD};
use crate::config::EmbOptimizer;
use crate::{Error, Result};
use ember_transport::bench::{bench_rank, BenchOptions, Collective};
use ember_transport::Transport;

/// What to measure and how long.
#[derive(Clone, Debug)]
pub struct CalibrateOptions {
    /// Tiny sizes and one repetition (tests: checks the plumbing, not the machine).
    pub quick: bool,
    /// Ranks the machine file says a node runs (this host's in-process runs: 8).
    pub ranks_per_node: usize,
    /// Rows of the dense network's GEMMs (the per-rank batch).
    pub gemm_batch: usize,
    /// Batch of the embedding kernels' workload (8 tables of `emb_rows` rows, dim 64, 20 ids
    /// per bag).
    pub emb_batch: usize,
    /// Rows of each of the embedding workload's tables: the kernels' efficiency depends on how
    /// much of a table the caches and the TLB hold, so it is measured at the tables' size of
    /// the model it will predict.
    pub emb_rows: u64,
    /// Zipf exponent of the embedding workload's id popularity (None: uniform): the fused
    /// backward's work per id (its dedup) does not shrink with the unique rows its bytes count,
    /// so the efficiency is measured on the id popularity of the data it will predict.
    pub emb_zipf: Option<f64>,
    /// The command line recorded in `sources`.
    pub command: String,
}

impl CalibrateOptions {
    /// This host's defaults: 8 in-process ranks, GEMMs at the `bench` model's per-rank batch at
    /// 8 ranks (4096 / 8 = 512 rows), the embedding kernels on `bench embedding`'s workload at
    /// batch 4096 with the tables and ids of the model validated here (`--preset bench
    /// --max-rows 100000`: 100,000 rows each, the synthetic data's Zipf popularity).
    pub fn host(quick: bool, command: &str) -> Self {
        let zipf = crate::config::SyntheticConfig::default().zipf;
        CalibrateOptions { quick, ranks_per_node: 8, gemm_batch: if quick { 8 } else { 512 }, emb_batch: 4096, emb_rows: 100_000, emb_zipf: Some(zipf), command: command.into() }
    }
}

/// Today's date (UTC), `YYYY-MM-DD`.
pub fn utc_date() -> String {
    civil_date(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0))
}

/// The UTC date of `secs` seconds after 1970-01-01 (H. Hinnant's civil-from-days).
fn civil_date(secs: u64) -> String {
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// The compute units this process may run on (CPU cores).
pub fn host_units() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Physical memory of this host, bytes.
fn host_memory() -> Result<u64> {
    // SAFETY: sysconf only reads system configuration values.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || page <= 0 {
        return Err(Error::Config("calibrate: cannot read this host's physical memory (sysconf)".into()));
    }
    (pages as u64).checked_mul(page as u64).ok_or_else(|| Error::Config("calibrate: physical memory overflows".into()))
}

/// `bench mem` on this host: (copy, 256-byte gather) in bytes read + written per second with
/// every thread busy, and the sources line's description of the run.
pub fn host_memory_rates(o: &CalibrateOptions) -> Result<(f64, f64, String)> {
    let (copy_mib, table_mib, reps) = if o.quick { (1, 4, 1) } else { (256, 1024, 5) };
    let rows = bench::host_mem(copy_mib, table_mib, reps);
    let threads = rows.iter().map(|r| r.threads).max().unwrap_or(1);
    let pick = |op: &str, row: Option<usize>| {
        rows.iter()
            .find(|r| r.op == op && r.threads == threads && (row.is_none() || row == Some(r.row_bytes)))
            .map(|r| r.gb_per_s * 1e9)
            .ok_or_else(|| Error::Config(format!("calibrate: bench mem gave no {op} row")))
    };
    let how = format!("bench mem: copy of {copy_mib} MiB and random gather of 256-byte rows from a {table_mib} MiB table on {threads} threads, median of {reps}");
    Ok((pick("copy", None)?, pick("gather", Some(256))?, how))
}

/// The compute rates of one unit of a node of `units`: the dense network's GEMMs and the
/// embedding kernels per optimizer on `be`, with every unit busy; `gather_bw_node` is the
/// node's 256-byte gather rate measured with every unit busy.
pub fn compute_rates<B: Backend>(be: &B, o: &CalibrateOptions, units: usize, gather_bw_node: f64, log: &mut dyn FnMut(&str)) -> Result<(super::machine::ComputeRates, Vec<String>)> {
    let model = crate::config::preset("bench", None)?.model;
    let (reps, warm) = if o.quick { (1, 0) } else { (20, 3) };
    let g = bench::gemm(be, &model, o.gemm_batch, reps, warm, 1)?;
    log(&format!("gemm: {} GEMMs of the bench model at batch {}: {:.3} ms, {:.1} GFLOP/s", g.rows.len(), g.batch, g.total_ms, g.gflops));
    let mut sources = vec![format!(
        "compute.gemm_flops: Ember's own measurement: `{}`: bench gemm (the `bench` model's {} MLP GEMMs, forward and both gradients, batch {}, the {} backend's gemm on every unit, median of {reps}) {:.1} GFLOP/s on {units} units, / {units}",
        o.command,
        g.rows.len(),
        g.batch,
        g.backend,
        g.gflops
    )];
    let inter_flops = interaction_rate(be, &model, o.gemm_batch, reps, warm)? / units as f64;
    log(&format!("dot interaction at batch {}: {:.1} GFLOP/s per unit", o.gemm_batch, inter_flops / 1e9));
    sources.push(format!(
        "compute.interaction_flops: Ember's own measurement: `{}`: the backend's dot_interaction and its backward on the `bench` model's shape ({} vectors of {}, batch {}, median of {reps}) on every unit, 3 x 2 (F+1)^2 d FLOPs per sample / time, / {units}",
        o.command,
        model.num_tables() + 1,
        model.dim(),
        o.gemm_batch
    ));
    let base = if o.quick {
        EmbeddingBench { tables: 2, rows: 1000, dim: 8, batch: 32, bag: 2, zipf: None, steps: 1, warmup: 0, seed: 1, optimizer: BENCH_ROWWISE_ADAGRAD }
    } else {
        EmbeddingBench { batch: o.emb_batch, rows: o.emb_rows, zipf: o.emb_zipf, steps: 10, warmup: 2, ..EmbeddingBench::default() }
    };
    let opts = [
        ("sgd", EmbOptimizer::Sgd { lr: 0.01 }),
        ("rowwise_adagrad", BENCH_ROWWISE_ADAGRAD),
        ("adagrad", EmbOptimizer::Adagrad { lr: 0.01, eps: 1e-8, c: None, eps_inside: false }),
    ];
    let mut fwd = Vec::new();
    let mut bwd = Vec::new();
    for (name, opt) in opts {
        let r = bench::embedding(be, &EmbeddingBench { optimizer: opt, ..base.clone() })?;
        let f = r.forward_bytes / (r.forward_ms * 1e-3) / gather_bw_node;
        let b = r.backward_bytes / (r.backward_ms * 1e-3) / gather_bw_node;
        log(&format!("embedding {name}: forward {:.2} ms ({f:.3} of gather), backward {:.2} ms ({b:.3} of gather), {:.0} unique rows", r.forward_ms, r.backward_ms, r.unique_rows));
        fwd.push(f);
        bwd.push((name, b));
    }
    let workload = format!(
        "bench embedding ({} tables x {} rows x dim {}, batch {}, bag {}, {} ids, median of {} steps, the {} backend on every unit)",
        base.tables,
        base.rows,
        base.dim,
        base.batch,
        base.bag,
        base.zipf.map(|z| format!("Zipf {z}")).unwrap_or_else(|| "uniform".into()),
        base.steps,
        be.name()
    );
    let emb_forward_eff = bench::median(&fwd);
    sources.push(format!(
        "compute.emb_forward_eff: Ember's own measurement: `{}`: {workload}, forward bytes (lookups + outputs) x D x 4 / time / gather_bw, median over the three optimizers' runs",
        o.command
    ));
    sources.push(format!(
        "compute.emb_backward_eff: Ember's own measurement: `{}`: {workload}, fused backward + each optimizer, bytes U x (2 D + 2 S) x 4 + B F D x 4 + B F L x 8 / time / gather_bw",
        o.command
    ));
    let eff = |x: f64| x.min(super::machine::MAX_EFF);
    let rates = super::machine::ComputeRates {
        gemm_flops: g.gflops * 1e9 / units as f64,
        emb_forward_eff: eff(emb_forward_eff),
        emb_backward_eff: EmbBackwardEff { sgd: eff(bwd[0].1), rowwise_adagrad: eff(bwd[1].1), adagrad: eff(bwd[2].1) },
        step_overhead_s: 0.0,
        interaction_flops: Some(inter_flops),
    };
    if [emb_forward_eff, bwd[0].1, bwd[1].1, bwd[2].1].iter().any(|&x| x > 1.0) {
        sources.push("compute: an efficiency above 1: the kernel beat the uniform gather reference (its hot rows stay in cache)".into());
    }
    Ok((rates, sources))
}

/// FLOP/s of the backend's dot interaction, forward and backward (3 × the forward's
/// 2·(F+1)²·d per sample, the model's count), at `batch` samples of `model`'s shape.
fn interaction_rate<B: Backend>(be: &B, model: &crate::config::ModelConfig, batch: usize, reps: usize, warm: usize) -> Result<f64> {
    let (f, d) = (model.num_tables(), model.dim());
    let width = d + (f + 1) * f / 2;
    let mut rng = crate::rng::Rng::new(7);
    let x = be.upload(&(0..batch * (f + 1) * d).map(|_| rng.f32() - 0.5).collect::<Vec<f32>>())?;
    let dout = be.upload(&(0..batch * width).map(|_| rng.f32() - 0.5).collect::<Vec<f32>>())?;
    let (mut out, mut dx) = (be.zeros(batch * width)?, be.zeros(batch * (f + 1) * d)?);
    let mut t = Vec::new();
    for it in 0..warm + reps.max(1) {
        let t0 = std::time::Instant::now();
        be.dot_interaction(&x, batch, f, d, &mut out)?;
        be.dot_interaction_backward(&x, &dout, batch, f, d, &mut dx)?;
        be.synchronize()?;
        if it >= warm {
            t.push(t0.elapsed().as_secs_f64());
        }
    }
    let flops = 3.0 * batch as f64 * super::model::interaction_forward_flops(model);
    Ok(flops / bench::median(&t))
}

/// The sizes per rank the collective curves cover.
fn curve_sizes(quick: bool) -> Vec<usize> {
    if quick {
        vec![1 << 10, 4 << 10]
    } else {
        (0..8).map(|i| (1usize << 10) << (2 * i)).collect() // 1 KiB, 4 KiB, ... 16 MiB
    }
}

/// All-to-all and all-reduce curves of `peers` ranks as threads of this process over
/// `transport`, with every one of `world` ranks busy: the world is split into `world / peers`
/// groups of `peers` ranks (as a 2D grid's groups: group g = ranks g, g + world/peers, ...) that
/// run the same collectives at the same time, as the groups of a training step do on one node;
/// group 0's slowest rank is recorded. One point per size per rank ([`curve_sizes`]), `iters`
/// scaled so each size moves about 32 MiB per rank. Returns the all-to-all, the all-reduce and
/// the replica sync's all-reduce (f32 values averaged in f64 on the host path, as the engine's
/// sync calls it: `Xfer::all_reduce_mean_f64`) curves.
fn curves(transport: Transport, peers: usize, world: usize, quick: bool) -> Result<[Vec<CurvePoint>; 3]> {
    let world = world.max(peers);
    if !world.is_multiple_of(peers) {
        return Err(Error::Config(format!("calibrate: {peers} peers do not divide the {world} ranks")));
    }
    let groups = world / peers;
    let comms = ember_transport::bootstrap::threads_world(world, transport, ember_transport::DEFAULT_TIMEOUT)?;
    let sizes = curve_sizes(quick);
    let hs: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(w, c)| {
            let sizes = sizes.clone();
            std::thread::spawn(move || -> std::result::Result<_, String> {
                let (g, r) = (w % groups, w / groups);
                let c = if groups > 1 { c.split(g as u32, r as i64).map_err(|e| format!("split: {e}"))? } else { c };
                let mut out = (Vec::new(), Vec::new());
                let mut sync = Vec::new();
                let be = crate::backend::Cpu::new();
                for &total in &sizes {
                    let iters = if quick { 1 } else { ((32usize << 20) / total).clamp(3, 50) };
                    sync.push(sync_all_reduce_seconds(&be, &c, total, iters).map_err(|e| format!("sync all-reduce: {e}"))?);
                    for (coll, curve) in [(Collective::AllToAll, &mut out.0), (Collective::AllReduce, &mut out.1)] {
                        // All-to-all sizes are per peer; a point records the rank's whole buffer.
                        let size = if coll == Collective::AllToAll { (total / peers).max(4) } else { total };
                        let o = BenchOptions { min_bytes: size, max_bytes: size, factor: 2, iters, warmup: 1, check: 0, baseline: None, no_huge: false, per_op: false, register: false };
                        let rows = bench_rank(coll, &c, &o)?;
                        for r in rows {
                            let bytes = if coll == Collective::AllToAll { r.size * peers } else { r.size };
                            curve.push(CurvePoint { peers, bytes: bytes as u64, seconds: r.time_us * 1e-6 });
                        }
                    }
                }
                Ok((g, out, sync))
            })
        })
        .collect();
    let mut first = None;
    let mut slowest_sync = vec![0.0f64; sizes.len()];
    for (i, h) in hs.into_iter().enumerate() {
        let (g, r, sync) = h.join().map_err(|_| Error::Transport("calibrate: a rank thread panicked".into()))?.map_err(|e| Error::Transport(format!("calibrate: {transport:?} rank {i}: {e}")))?;
        if g == 0 {
            first.get_or_insert(r);
            slowest_sync.iter_mut().zip(&sync).for_each(|(a, &b)| *a = a.max(b));
        }
    }
    let (a2a, ar) = first.ok_or_else(|| Error::Transport("calibrate: no ranks".into()))?;
    let sync = sizes.iter().zip(&slowest_sync).map(|(&bytes, &seconds)| CurvePoint { peers, bytes: bytes as u64, seconds }).collect();
    Ok([a2a, ar, sync])
}

/// One rank's mean time of the replica sync's all-reduce of a `bytes` buffer on `comm` (one
/// untimed operation first, then `iters` back to back).
fn sync_all_reduce_seconds(be: &crate::backend::Cpu, comm: &ember_transport::Comm, bytes: usize, iters: usize) -> Result<f64> {
    use crate::backend::Buffers;
    let len = (bytes / 4).max(1);
    let mut buf = be.upload(&vec![1.0f32; len])?;
    let xfer = crate::parallel::xfer::Xfer::Host { stage: false };
    xfer.all_reduce_mean_f64(be, comm, &mut buf, len)?;
    let t0 = std::time::Instant::now();
    for _ in 0..iters {
        xfer.all_reduce_mean_f64(be, comm, &mut buf, len)?;
    }
    Ok(t0.elapsed().as_secs_f64() / iters as f64)
}

/// A link from its curves: `bw` = the largest all-to-all at the most peers, counting the bytes
/// each rank sends to the others; `latency_s` = the smallest 2-rank all-to-all.
fn link(all_to_all: Vec<CurvePoint>, all_reduce: Vec<CurvePoint>, sync_all_reduce: Vec<CurvePoint>) -> Result<Link> {
    let most = all_to_all.iter().map(|p| p.peers).max().ok_or_else(|| Error::Config("calibrate: empty all-to-all curve".into()))?;
    let big = all_to_all.iter().filter(|p| p.peers == most).max_by_key(|p| p.bytes).expect("a point of the most peers");
    let bw = big.bytes as f64 * (most - 1) as f64 / most as f64 / big.seconds;
    let small = all_to_all.iter().filter(|p| p.peers == 2).min_by_key(|p| p.bytes);
    let latency_s = small.map(|p| p.seconds).unwrap_or(0.0);
    Ok(Link { bw, latency_s, all_to_all, all_reduce, sync_all_reduce })
}

/// In-process links: `intra_node` from `peer_counts` local ranks (threads sharing memory),
/// `inter_node` from 2 ranks over TCP on loopback.
pub fn host_links(o: &CalibrateOptions, log: &mut dyn FnMut(&str)) -> Result<(Link, Link, Vec<String>)> {
    let peer_counts: Vec<usize> = if o.quick { vec![2] } else { [2, 4, 8].into_iter().filter(|&p| p <= o.ranks_per_node.max(2)).collect() };
    let us = |c: &[CurvePoint]| (c[0].seconds * 1e6, c[c.len() - 1].seconds * 1e6);
    let (mut a2a, mut ar, mut sy) = (Vec::new(), Vec::new(), Vec::new());
    for &p in &peer_counts {
        let [x, y, z] = curves(Transport::Local, p, o.ranks_per_node.max(p), o.quick)?;
        let ((x0, x1), (y0, y1), (z0, z1)) = (us(&x), us(&y), us(&z));
        log(&format!("local, {p} ranks: all-to-all {x0:.1} us .. {x1:.1} us, all-reduce {y0:.1} us .. {y1:.1} us, sync all-reduce {z0:.1} us .. {z1:.1} us"));
        a2a.extend(x);
        ar.extend(y);
        sy.extend(z);
    }
    let intra = link(a2a, ar, sy)?;
    let [x, y, z] = curves(Transport::Tcp, 2, 2, o.quick)?;
    let ((x0, x1), (y0, y1), (z0, z1)) = (us(&x), us(&y), us(&z));
    log(&format!("tcp loopback, 2 ranks: all-to-all {x0:.1} us .. {x1:.1} us, all-reduce {y0:.1} us .. {y1:.1} us, sync all-reduce {z0:.1} us .. {z1:.1} us"));
    let inter = link(x, y, z)?;
    let sizes = curve_sizes(o.quick);
    let span = format!("{} B .. {} B per rank", sizes[0], sizes[sizes.len() - 1]);
    let peers = peer_counts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    let cmd = &o.command;
    let busy = format!("groups of {peers} ranks, all {} ranks busy (the groups run at once, as `bench a2a --ranks {} --split`)", o.ranks_per_node, o.ranks_per_node);
    let sources = vec![
        format!("intra_node.all_to_all, intra_node.all_reduce: Ember's own measurement: `{cmd}`: bench a2a / bench allreduce --transport local (threads of one process), {busy}, {span}, mean of the timed iterations, slowest rank of group 0"),
        format!("intra_node.sync_all_reduce: Ember's own measurement: `{cmd}`: the replica sync's all-reduce (Xfer::all_reduce_mean_f64 on the CPU backend: f32 values averaged in f64) --transport local, {busy}, {span}, mean of back-to-back operations, slowest rank of group 0"),
        format!("intra_node.bw: Ember's own measurement: `{cmd}`: the largest all-to-all of the most ranks above, bytes each rank sends to the others / time"),
        format!("intra_node.latency_s: Ember's own measurement: `{cmd}`: the smallest 2-rank all-to-all above"),
        format!("inter_node.all_to_all, inter_node.all_reduce, inter_node.sync_all_reduce: Ember's own measurement: `{cmd}`: bench a2a / bench allreduce and the sync's all-reduce as above, --transport tcp on loopback, 2 ranks as threads of one process, {span} (multi-process: `ember launch -n 2 -- ember bench a2a --transport tcp`)"),
        format!("inter_node.bw: Ember's own measurement: `{cmd}`: the largest 2-rank TCP all-to-all above, bytes sent to the peer / time"),
        format!("inter_node.latency_s: Ember's own measurement: `{cmd}`: the smallest 2-rank TCP all-to-all above"),
    ];
    Ok((intra, inter, sources))
}

/// This host's machine description (the CPU backend), from microbenchmarks only; `log` gets
/// one line per measurement.
pub fn host(o: &CalibrateOptions, log: &mut dyn FnMut(&str)) -> Result<Machine> {
    let units = host_units();
    let date = utc_date();
    let cmd = &o.command;
    let (copy, gather, how) = host_memory_rates(o)?;
    log(&format!("{how}: copy {:.2} GB/s, gather {:.2} GB/s", copy / 1e9, gather / 1e9));
    let (compute, mut csrc) = compute_rates(&crate::backend::Cpu::new(), o, units, gather, log)?;
    let (intra_node, inter_node, mut lsrc) = host_links(o, log)?;
    let memory = host_memory()?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| s.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string()));
    let mut sources = vec![
        format!("calibrated: `{cmd}` on {date}{}", if o.quick { " (quick: tiny sizes, not a measurement of the machine)" } else { "" }),
        format!("ranks_per_node: assumption: {} in-process ranks, as this host's 2D runs (`ember train --grid 1x8`, `bench dlrm --grid 2x4`) use", o.ranks_per_node),
        format!("compute_units_per_node: Ember's own measurement: `{cmd}`: the CPUs this process may use (std::thread::available_parallelism) = {units}"),
        "in_place_sync: assumption: the ranks are in-process ranks of the CPU backend, which average their replica groups' rows in place (engine/src/parallel/shared_rows.rs)".into(),
        format!("memory_per_rank: Ember's own measurement: `{cmd}`: physical memory (sysconf) {memory} B / {} ranks", o.ranks_per_node),
        format!("memory.stream_bw, memory.gather_bw: Ember's own measurement: `{cmd}`: {how}, / {units} units"),
    ];
    sources.append(&mut csrc);
    sources.push("compute.step_overhead_s: assumption: 0, no microbenchmark measures it".into());
    sources.append(&mut lsrc);
    let m = Machine {
        name: "this-host".into(),
        description: format!("this host: {} CPUs ({}), {:.1} GiB, the CPU backend; in-process ranks share memory, two processes talk TCP on loopback", units, cpu.unwrap_or_else(|| "unknown CPU".into()), memory as f64 / (1u64 << 30) as f64),
        ranks_per_node: o.ranks_per_node,
        compute_units_per_node: units,
        in_place_sync: true,
        memory_per_rank: memory / o.ranks_per_node.max(1) as u64,
        memory: MemoryRates { stream_bw: copy / units as f64, gather_bw: gather / units as f64 },
        compute,
        intra_node,
        inter_node,
        sources,
    };
    m.validate().map_err(|e| Error::Config(format!("calibrate: the measured machine is not valid: {e}")))?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quick_calibration_gives_a_machine_the_model_accepts() {
        let mut lines = Vec::new();
        let m = host(&CalibrateOptions::host(true, "ember simulate --calibrate t.toml"), &mut |l| lines.push(l.to_string())).unwrap();
        let back = Machine::from_toml(&m.to_toml(), "calibrated").unwrap();
        assert_eq!(back, m);
        assert!(m.unsourced().is_empty(), "no source for {:?}", m.unsourced());
        assert!(m.sources.iter().any(|l| l.contains("ember simulate --calibrate t.toml") && l.contains(&utc_date())));
        assert_eq!((m.ranks_per_node, m.compute_units_per_node), (8, host_units()));
        let r = [m.memory.stream_bw, m.memory.gather_bw, m.compute.gemm_flops, m.intra_node.bw, m.inter_node.bw, m.intra_node.latency_s, m.inter_node.latency_s];
        assert!(r.iter().all(|&x| x.is_finite() && x > 0.0), "{r:?}");
        // Both links have both curves, at every size measured.
        for l in [&m.intra_node, &m.inter_node] {
            for c in [&l.all_to_all, &l.all_reduce] {
                let bytes: Vec<u64> = c.iter().map(|p| p.bytes).collect();
                assert_eq!(bytes, vec![1024, 4096], "{c:?}");
                assert!(c.iter().all(|p| p.peers == 2 && p.seconds > 0.0));
            }
        }
        assert!(lines.iter().any(|l| l.starts_with("embedding adagrad")) && lines.iter().any(|l| l.starts_with("tcp loopback")), "{lines:?}");
    }

    #[test]
    fn civil_dates_match_known_days() {
        // Known answers (`date -u -d @SECS +%F`).
        for (secs, day) in [(0, "1970-01-01"), (951_782_400, "2000-02-29"), (951_868_799, "2000-02-29"), (1_709_251_200, "2024-03-01"), (4_102_444_800, "2100-01-01")] {
            assert_eq!(civil_date(secs), day, "{secs}");
        }
    }
}
