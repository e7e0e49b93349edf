//! `ember train --grid MxN`: 2D training, as T in-process ranks (threads) by default, or as
//! one rank per process under `ember launch`, mpirun, srun or torchrun.
use crate::common::{CliResult, Device};
use crate::train_args::{epoch_steps, open_data, FileData, TrainArgs};
use ember_engine::backend::{Backend, Cpu, Emulated, HostDeviceBytes};
use ember_engine::config::TrainConfig;
use ember_engine::data::criteo::{BadLinePolicy, CriteoReader};
use ember_engine::data::dataset::MappedData;
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::data::{Batch, DataSource, EvalSet};
use ember_engine::grid::Grid;
use ember_engine::parallel::driver::{write_trace, Feed, Job, Report2D};
use ember_engine::parallel::{ParallelOptions, TraceEvent};
use ember_engine::plan::planner::{plan, predict, stats_from_batches, PlanOptions};
use ember_engine::plan::Plan;
use std::sync::Mutex;

pub fn run(a: &TrainArgs, cfg: TrainConfig, m: usize, n: usize) -> CliResult {
    if a.data.is_some() && a.skip_bad_lines {
        return Err("--skip-bad-lines with a grid: every rank must agree on sample boundaries; fix or filter the file first".into());
    }
    let join = ember_transport::JoinConfig::from_env().ok().filter(|j| j.size > 1);
    let multi = join.is_some();
    // In-process ranks talk through the local transport; the others connect processes.
    a.transport.parse::<ember_transport::Transport>().map_err(|e| format!("--transport {}: {e}", a.transport))?;
    if !multi && a.transport != "auto" && a.transport != "local" {
        return Err(format!(
            "--transport {}: the {} ranks of this grid run as threads of one process and talk through the local transport; \
             to use {} start one process per rank: ember launch -n {} --transport {} -- ember train ...",
            a.transport,
            m * n,
            a.transport,
            m * n,
            a.transport
        )
        .into());
    }
    let job = a.job(m, n)?;
    if a.measure_memory {
        if !multi {
            return Err(format!(
                "--measure-memory counts one rank per process; the {} ranks of this grid would share one: ember launch -n {} -- ember train ... --measure-memory",
                m * n,
                m * n
            )
            .into());
        }
        ember_engine::heap::enable();
    }
    let grid = job.grid_of(m, n)?;
    let popts = job.plan_options(&cfg);
    let (plan, plan_report) = plan(&cfg.model, m, n, &popts)?;
    let plan_for_memory = a.measure_memory.then(|| plan.clone());
    // Host memory before anything is allocated (CUDA ranks keep their tables on the device).
    if a.device != Device::Cuda {
        ember_engine::memory::check_plan(&plan_report, m, multi)?;
    }
    // The data: the synthetic stream, or a Criteo file read by one reader per local rank; every
    // rank reads exactly its samples of each global batch (docs/2d.md).
    // A memory-mapped dataset is shared by the in-process ranks: each reads its samples' bytes.
    let source = match open_data(a, &cfg)? {
        None => Source::Synthetic(SyntheticData::new(&cfg)?),
        Some(FileData::Mapped(d)) => Source::Mapped(d),
        Some(FileData::Text(first)) => {
            let path = a.data.as_ref().expect("text data comes from --data");
            let mut readers = vec![Mutex::new(first)];
            for _ in 1..if multi { 1 } else { grid.world() } {
                readers.push(Mutex::new(CriteoReader::open(path, &cfg.model, BadLinePolicy::Fail)?));
            }
            Source::Files(readers)
        }
    };
    // The eval set: the synthetic one, or the data's eval part read chunk by chunk (shared by
    // the in-process ranks).
    let (eval, oracle): (Box<dyn EvalSet>, _) = match &source {
        Source::Synthetic(d) => (Box::new(d.eval_batch()), Some(d.oracle_eval())),
        Source::Files(r) => (Box::new(r[0].lock().map_err(|_| "reader lock")?.eval_stream()?), None),
        Source::Mapped(d) => (Box::new(d.eval_stream()), None),
    };
    let root = join.as_ref().map_or(true, |j| j.rank == 0);
    let steps = match (cfg.steps, &source) {
        (st, Source::Files(r)) => epoch_steps(st, r[0].lock().map_err(|_| "reader lock")?.train_lines(), cfg.batch_size, root)?,
        (st, Source::Mapped(d)) => epoch_steps(st, d.train_len() * d.epochs(), cfg.batch_size, root)?,
        (Some(st), Source::Synthetic(_)) => st,
        (None, Source::Synthetic(_)) => return Err("--steps is required with synthetic data".into()),
    };
    let mut opts = job.parallel;
    let resume_root = opts.checkpoint.as_ref().filter(|c| c.resume).map(|c| c.dir.clone());
    // The folder becomes this run's (world rank 0 decides; only it commits and prunes), once
    // the options are known to be consistent: a refused run leaves the folder as it was.
    opts.check(grid)?;
    if let Some(c) = opts.checkpoint.as_mut().filter(|_| root) {
        c.run_id = Some(ember_engine::checkpoint::claim(&c.dir, c.resume, a.overwrite_checkpoints)?);
    }
    let feed = |step: usize, w: usize| -> ember_engine::Result<Batch> {
        let r = grid.sample_range(w, cfg.batch_size);
        let start = (step * cfg.batch_size + r.start) as u64;
        match &source {
            Source::Synthetic(d) => Ok(d.samples(start, r.len())),
            Source::Mapped(d) => d.read_global(start, r.len()),
            Source::Files(readers) => {
                let mut rd = readers[if multi { 0 } else { w }].lock().map_err(|_| ember_engine::Error::Input("reader lock poisoned".into()))?;
                let pos = rd.position();
                if pos > start {
                    return Err(ember_engine::Error::Input(format!("reader at sample {pos} cannot go back to {start}")));
                }
                rd.skip(start - pos)?;
                match rd.next_batch(r.len())? {
                    Some(b) if b.size() == r.len() => Ok(b),
                    _ => Err(ember_engine::Error::Input(format!("the data file ends before sample {} (step {step})", start + r.len() as u64))),
                }
            }
        }
    };
    let run = Run { cfg: &cfg, grid, plan, opts, steps, feed: &feed, eval: eval.as_ref(), trace: a.trace.is_some() };
    let run = match a.device {
        Device::Cuda => run_cuda(run, join, &a.transport),
        Device::Cpu => run.on(&|_| Ok(Cpu::new()), join, &a.transport),
        Device::Emulated => run.on(&|_| Ok(Emulated::new()), join, &a.transport),
    };
    let (rep, events, is_root) = match (run, resume_root) {
        (Ok(r), _) => r,
        (Err(e), Some(root)) => return Err(crate::checkpoint::explain_resume_failure(&root, e.to_string()).into()),
        (Err(e), None) => return Err(e),
    };
    if let Some(path) = &a.trace {
        // One file for in-process ranks; one per process otherwise (FILE.rankN.json).
        let path = if multi { path.with_extension(format!("rank{}.json", first_rank(&events))) } else { path.clone() };
        write_trace(&path, &events)?;
    }
    if !is_root {
        return Ok(());
    }
    print_summary(&rep, oracle.as_ref());
    let memory = match (&plan_for_memory, &source) {
        (Some(p), Source::Synthetic(d)) if !rep.heap_peak_bytes.is_empty() => Some(memory_table(&cfg, grid, p, &popts, d, steps, &rep)?),
        _ => None,
    };
    if a.json {
        let mut v = serde_json::to_value(&rep)?;
        if let Some(mem) = memory {
            v["memory"] = mem;
        }
        if let Some(o) = &oracle {
            v["oracle_auc"] = o.auc.into();
            v["oracle_ne"] = o.ne.into();
        }
        v.as_object_mut().map(|o| o.remove("losses"));
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

/// Planned against measured heap peak per world rank, and rank 0's planned against measured
/// bytes per collective (printed; returned as JSON). The plan's figures use id statistics
/// measured on the run's own global batches (the first 64 of a longer run).
fn memory_table(
    cfg: &TrainConfig,
    grid: Grid,
    plan: &Plan,
    popts: &PlanOptions,
    data: &SyntheticData,
    steps: usize,
    rep: &Report2D,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let batches: Vec<Batch> = (0..steps.clamp(1, 64) as u64).map(|s| data.samples(s * cfg.batch_size as u64, cfg.batch_size)).collect();
    let opts = PlanOptions { stats: Some(stats_from_batches(&cfg.model, &batches)), ..popts.clone() };
    let pr = predict(&cfg.model, grid.m, plan, &opts)?;
    let mib = |x: u64| x as f64 / (1u64 << 20) as f64;
    println!("  memory per rank (heap peak over construction and training; plan: ember plan with the run's id statistics):");
    println!("  {:>5} {:>6} {:>13} {:>12} {:>9}  {}", "rank", "group", "measured MiB", "planned MiB", "plan/meas", "planned peak phase");
    let (mut planned, mut measured, mut phases) = (Vec::new(), Vec::new(), Vec::new());
    for (w, &meas) in rep.heap_peak_bytes.iter().enumerate() {
        let (_, r) = grid.coords(w);
        let p = &pr.ranks[r];
        println!("  {:>5} {:>6} {:>13.2} {:>12.2} {:>9.3}  {}", w, r, mib(meas), mib(p.total_bytes), p.total_bytes as f64 / meas.max(1) as f64, p.peak_phase);
        planned.push(p.total_bytes);
        measured.push(meas);
        phases.push(p.peak_phase);
    }
    let planned_bytes = serde_json::to_value(&pr.ranks[grid.coords(0).1].traffic)?;
    let measured_bytes = serde_json::to_value(&rep.bytes_per_step)?;
    println!("  bytes per step handed to each collective by rank 0 (plan with the run's ids / measured):");
    if let (Some(p), Some(m)) = (planned_bytes.as_object(), measured_bytes.as_object()) {
        for (k, pv) in p {
            let (pv, mv) = (pv.as_f64().unwrap_or(0.0), m.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0));
            if pv > 0.0 || mv > 0.0 {
                println!("  {k:>22} {pv:>14.0} {mv:>14.0}");
            }
        }
    }
    Ok(serde_json::json!({ "measured": measured, "planned": planned, "planned_peak_phase": phases, "planned_bytes_per_step": planned_bytes }))
}

/// Everything a run needs but the backend.
struct Run<'a> {
    cfg: &'a TrainConfig,
    grid: Grid,
    plan: Plan,
    opts: ParallelOptions,
    steps: usize,
    feed: &'a Feed<'a>,
    eval: &'a dyn EvalSet,
    trace: bool,
}

impl Run<'_> {
    /// In-process ranks (one backend each, made on its thread by `new_be(world_rank)`), or this
    /// process's rank of a launched job (`new_be(local_rank)`). Returns (report, trace, is_root).
    fn on<B: Backend>(
        self,
        new_be: &(dyn Fn(usize) -> ember_engine::Result<B> + Sync),
        join: Option<ember_transport::JoinConfig>,
        transport: &str,
    ) -> Result<(Report2D, Vec<TraceEvent>, bool), Box<dyn std::error::Error>> {
        let Run { cfg, grid, plan, opts, steps, feed, eval, trace } = self;
        let job = Job::new(cfg, grid, &plan, &opts, steps).data(feed, eval).trace(trace);
        let Some(mut j) = join else {
            let (rep, _, events) = job.train(new_be)?;
            return Ok((rep, events, true));
        };
        if transport != "auto" {
            j.transport = transport.parse()?;
        }
        if j.size != grid.world() {
            return Err(format!("--grid {}x{} needs {} ranks but the launcher started {}", grid.m, grid.n, grid.world(), j.size).into());
        }
        let local = j.local_rank;
        let world = ember_transport::Comm::connect(&j)?;
        let root = world.rank() == 0;
        let (rep, _, events) = job.comms(vec![world]).train(&|_| new_be(local))?;
        Ok((rep, events, root))
    }
}

/// On GPUs: in-process ranks share device 0, each with its own stream and pool arena; a
/// launched rank takes device `local_rank mod devices`.
#[cfg(feature = "cuda")]
fn run_cuda(run: Run, join: Option<ember_transport::JoinConfig>, transport: &str) -> Result<(Report2D, Vec<TraceEvent>, bool), Box<dyn std::error::Error>> {
    use ember_engine::backend::cuda::{Cuda, PoolConfig};
    let devices = Cuda::probe()?;
    if join.is_some() {
        run.on(&|local| Cuda::new(local % devices), join, transport)
    } else {
        run.on(&|_| Cuda::for_rank(0, PoolConfig::default()), join, transport)
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: Run, _: Option<ember_transport::JoinConfig>, _: &str) -> Result<(Report2D, Vec<TraceEvent>, bool), Box<dyn std::error::Error>> {
    Err("--device cuda: this binary was built without the `cuda` feature (cargo build --release -p ember-tools --features cuda)".into())
}

fn first_rank(events: &[ember_engine::parallel::TraceEvent]) -> usize {
    events.first().map(|e| e.rank).unwrap_or(0)
}

/// Where the samples come from.
enum Source {
    Synthetic(SyntheticData),
    Files(Vec<Mutex<CriteoReader>>),
    Mapped(MappedData),
}

fn print_summary(r: &Report2D, oracle: Option<&ember_engine::metrics::EvalResult>) {
    println!("ember train: grid {}, {} steps in {:.2} s", r.grid, r.steps, r.wall_s);
    println!("  throughput      {:>12.0} samples/s", r.samples_per_s);
    println!("  train loss      {:>12.5}  (mean of the last 10 % of steps)", r.loss);
    println!("  eval            ne {:.5}  auc {:.5}", r.ne, r.auc);
    if let Some(o) = oracle {
        println!("  planted oracle  ne {:.5}  auc {:.5}", o.ne, o.auc);
    }
    let st = &r.stages;
    println!(
        "  stages (ms/step, rank 0): input_dist {:.2}  lookup {:.2}  output_dist {:.2}  dense {:.2}  backward {:.2}  sync {:.2}",
        st.input_dist, st.lookup, st.output_dist, st.dense, st.backward, st.sync
    );
    println!("  bytes/step (rank 0): sparse collectives {:.0}  replica sync {:.0}", r.a2a_bytes_per_rank, r.sync_bytes_per_rank);
    if let (Some(all), Some(sync)) = (r.host_device_bytes_per_step, r.sync_host_device_bytes_per_step) {
        let hd = |b: HostDeviceBytes| format!("host->device {}  device->host {}", b.host_to_device, b.device_to_host);
        println!("  host<->device bytes/step (rank 0): step {}; replica sync {}", hd(all), hd(sync));
    }
    println!("  embedding weights resident during the dense phase (rank 0): {:.2} MiB", r.emb_weight_bytes_resident as f64 / (1 << 20) as f64);
    println!("  lookup imbalance (max/mean over ranks) {:.3}; peak RSS of this process {:.1} MiB", r.imbalance, r.peak_rss_bytes as f64 / (1 << 20) as f64);
    println!("  replicas identical at the end: {}", if r.replicas_identical { "yes" } else { "NO" });
}
