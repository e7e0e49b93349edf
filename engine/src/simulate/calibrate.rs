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
    /// Batch of the embedding kernels' workload (8 tables of 1 M rows, dim 64, 20 ids per bag).
    pub emb_batch: usize,
    /// The command line recorded in `sources`.
    pub command: String,
}

impl CalibrateOptions {
    /// This host's defaults: 8 in-process ranks, GEMMs at the `bench` model's per-rank batch at
    /// 8 ranks (4096 / 8 = 512 rows), the embedding kernels on `bench embedding`'s default
    /// workload (batch 4096).
    pub fn host(quick: bool, command: &str) -> Self {
        CalibrateOptions { quick, ranks_per_node: 8, gemm_batch: if quick { 8 } else { 512 }, emb_batch: 4096, command: command.into() }
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
        "compute.gemm_flops: Ember's own measurement: `{}`: bench gemm (the `bench` model's {} MLP GEMMs, forward and both gradients, batch {}, the {} backend's gemm, median of {reps}) {:.1} GFLOP/s on {units} units, / {units}",
        o.command,
        g.rows.len(),
        g.batch,
        g.backend,
        g.gflops
    )];
    let base = if o.quick {
        EmbeddingBench { tables: 2, rows: 1000, dim: 8, batch: 32, bag: 2, zipf: None, steps: 1, warmup: 0, seed: 1, optimizer: BENCH_ROWWISE_ADAGRAD }
    } else {
        EmbeddingBench { batch: o.emb_batch, steps: 10, warmup: 2, ..EmbeddingBench::default() }
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
        "bench embedding ({} tables x {} rows x dim {}, batch {}, bag {}, uniform ids, median of {} steps, the {} backend)",
        base.tables, base.rows, base.dim, base.batch, base.bag, base.steps, be.name()
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
    let eff = |x: f64| x.min(1.0);
    let rates = super::machine::ComputeRates {
        gemm_flops: g.gflops * 1e9 / units as f64,
        emb_forward_eff: eff(emb_forward_eff),
        emb_backward_eff: EmbBackwardEff { sgd: eff(bwd[0].1), rowwise_adagrad: eff(bwd[1].1), adagrad: eff(bwd[2].1) },
        step_overhead_s: 0.0,
    };
    if [emb_forward_eff, bwd[0].1, bwd[1].1, bwd[2].1].iter().any(|&x| x > 1.0) {
        sources.push("compute: an efficiency above 1 (the kernel beat the gather reference, e.g. from cache) was written as 1".into());
    }
    Ok((rates, sources))
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
/// `transport`: one point per size per rank ([`curve_sizes`]), `iters` scaled so each size
/// moves about 32 MiB per rank.
fn curves(transport: Transport, peers: usize, quick: bool) -> Result<(Vec<CurvePoint>, Vec<CurvePoint>)> {
    let comms = ember_transport::bootstrap::threads_world(peers, transport, ember_transport::DEFAULT_TIMEOUT)?;
    let sizes = curve_sizes(quick);
    let hs: Vec<_> = comms
        .into_iter()
        .map(|c| {
            let sizes = sizes.clone();
            std::thread::spawn(move || -> std::result::Result<_, String> {
                let mut out = (Vec::new(), Vec::new());
                for &total in &sizes {
                    let iters = if quick { 1 } else { ((32usize << 20) / total).clamp(3, 50) };
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
                Ok(out)
            })
        })
        .collect();
    let mut first = None;
    for (i, h) in hs.into_iter().enumerate() {
        let r = h.join().map_err(|_| Error::Transport("calibrate: a rank thread panicked".into()))?.map_err(|e| Error::Transport(format!("calibrate: {transport:?} rank {i}: {e}")))?;
        first.get_or_insert(r);
    }
    first.ok_or_else(|| Error::Transport("calibrate: no ranks".into()))
}

/// A link from its curves: `bw` = the largest all-to-all at the most peers, counting the bytes
/// each rank sends to the others; `latency_s` = the smallest 2-rank all-to-all.
fn link(all_to_all: Vec<CurvePoint>, all_reduce: Vec<CurvePoint>) -> Result<Link> {
    let most = all_to_all.iter().map(|p| p.peers).max().ok_or_else(|| Error::Config("calibrate: empty all-to-all curve".into()))?;
    let big = all_to_all.iter().filter(|p| p.peers == most).max_by_key(|p| p.bytes).expect("a point of the most peers");
    let bw = big.bytes as f64 * (most - 1) as f64 / most as f64 / big.seconds;
    let small = all_to_all.iter().filter(|p| p.peers == 2).min_by_key(|p| p.bytes);
    let latency_s = small.map(|p| p.seconds).unwrap_or(0.0);
    Ok(Link { bw, latency_s, all_to_all, all_reduce })
}

/// In-process links: `intra_node` from `peer_counts` local ranks (threads sharing memory),
/// `inter_node` from 2 ranks over TCP on loopback.
pub fn host_links(o: &CalibrateOptions, log: &mut dyn FnMut(&str)) -> Result<(Link, Link, Vec<String>)> {
    let peer_counts: Vec<usize> = if o.quick { vec![2] } else { [2, 4, 8].into_iter().filter(|&p| p <= o.ranks_per_node.max(2)).collect() };
    let (mut a2a, mut ar) = (Vec::new(), Vec::new());
    for &p in &peer_counts {
        let (x, y) = curves(Transport::Local, p, o.quick)?;
        log(&format!("local, {p} ranks: all-to-all {:.1} us .. {:.1} us, all-reduce {:.1} us .. {:.1} us", x[0].seconds * 1e6, x[x.len() - 1].seconds * 1e6, y[0].seconds * 1e6, y[y.len() - 1].seconds * 1e6));
        a2a.extend(x);
        ar.extend(y);
    }
    let intra = link(a2a, ar)?;
    let (x, y) = curves(Transport::Tcp, 2, o.quick)?;
    log(&format!("tcp loopback, 2 ranks: all-to-all {:.1} us .. {:.1} us, all-reduce {:.1} us .. {:.1} us", x[0].seconds * 1e6, x[x.len() - 1].seconds * 1e6, y[0].seconds * 1e6, y[y.len() - 1].seconds * 1e6));
    let inter = link(x, y)?;
    let sizes = curve_sizes(o.quick);
    let span = format!("{} B .. {} B per rank", sizes[0], sizes[sizes.len() - 1]);
    let peers = peer_counts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    let cmd = &o.command;
    let sources = vec![
        format!("intra_node.all_to_all, intra_node.all_reduce: Ember's own measurement: `{cmd}`: bench a2a / bench allreduce --transport local (threads of one process), {peers} ranks, {span}, mean of the timed iterations, slowest rank"),
        format!("intra_node.bw: Ember's own measurement: `{cmd}`: the largest all-to-all of the most ranks above, bytes each rank sends to the others / time"),
        format!("intra_node.latency_s: Ember's own measurement: `{cmd}`: the smallest 2-rank all-to-all above"),
        format!("inter_node.all_to_all, inter_node.all_reduce: Ember's own measurement: `{cmd}`: bench a2a / bench allreduce --transport tcp on loopback, 2 ranks as threads of one process, {span} (multi-process: `ember launch -n 2 -- ember bench a2a --transport tcp`)"),
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
