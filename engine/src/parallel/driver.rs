//! Running a 2D training job ([`Job::train`], the one entry point): its ranks as threads of this
//! process (all T of them by default; or this process's one rank of a launched job), each with
//! its own communicators and backend, reading its own samples of every global batch, then the
//! final evaluation. Returns the report, every rank's final state (for tests and checkpoints)
//! and the stage spans.
use super::eval::evaluate;
use super::{ByteCounts, ParallelOptions, Rank2D, StageTimes, TraceEvent};
use crate::backend::{Backend, HostDeviceBytes, ShardSpec};
use crate::config::TrainConfig;
use crate::data::synthetic::SyntheticData;
use crate::data::{Batch, EvalSet};
use crate::grid::{Grid, GridComms};
use crate::plan::Plan;
use crate::{Error, Result};
use serde::Serialize;
use std::time::Instant;

/// A rank's final state.
pub struct RankState {
    pub world_rank: usize,
    pub coords: (usize, usize),
    /// (spec, weights, optimizer state) of each local shard.
    pub shards: Vec<(ShardSpec, Vec<f32>, Vec<f32>)>,
    /// Dense parameter values in `DenseNet::params_mut` order.
    pub dense: Vec<Vec<f32>>,
    pub times: StageTimes,
    pub bytes: ByteCounts,
    /// Bytes moved between host and device during the training steps, where the backend
    /// counts them (the emulated device backend).
    pub host_device: Option<HostDeviceBytes>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report2D {
    pub grid: String,
    pub samples_per_s: f64,
    /// Mean training loss over the last 10 % of steps.
    pub loss: f64,
    pub ne: f64,
    pub auc: f64,
    pub steps: usize,
    pub wall_s: f64,
    /// Rank 0's mean milliseconds per step per stage (training steps only).
    pub stages: StageTimes,
    /// Rank 0's all-to-all (and reduce-scatter / all-gather) bytes sent per step, all stages.
    pub a2a_bytes_per_rank: f64,
    /// Rank 0's bytes per step handed to each collective (its send buffers; an all-gather
    /// counts this rank's own block), training steps only.
    pub bytes_per_step: ByteCounts,
    /// Rank 0's replica-sync bytes per step (indices + values; fully-sharded: its weight
    /// reduce-scatter and all-gather).
    pub sync_bytes_per_rank: f64,
    /// Rank 0's bytes per training step moved between host and device, and those of its replica
    /// syncs alone, where the backend counts them (`--device emulated`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_device_bytes_per_step: Option<HostDeviceBytes>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_host_device_bytes_per_step: Option<HostDeviceBytes>,
    /// Rank 0's largest embedding-weight bytes resident during the dense phase.
    pub emb_weight_bytes_resident: u64,
    /// Load imbalance over all ranks: max / mean of lookup work (ids × columns).
    pub imbalance: f64,
    /// Peak resident memory of this process (VmHWM; all in-process ranks together), bytes.
    pub peak_rss_bytes: u64,
    /// Every world rank's measured heap peak during its model construction and training (bytes
    /// above what was live when the rank started), by world rank; empty unless each rank is its
    /// own process counting its heap (`crate::heap`, `ember train --measure-memory`).
    pub heap_peak_bytes: Vec<u64>,
    /// Median wall-clock milliseconds of rank 0's steps after the first (warm-up) step.
    pub step_ms_median: f64,
    /// At the end, every shard's weights (and optimizer state, except in fully-sharded 2D) were
    /// bitwise identical across its replica group (CRC-32 of each shard compared).
    pub replicas_identical: bool,
    /// Rank 0's wall-clock milliseconds per step.
    #[serde(skip)]
    pub step_ms: Vec<f64>,
    pub losses: Vec<f64>,
}

/// Local batches of a run: `feed(step, world_rank)` is that rank's part of global batch `step`.
pub type Feed<'a> = dyn Fn(usize, usize) -> Result<Batch> + Sync + 'a;

/// One 2D training run: what to train, on which grid and plan, for how many steps, on which
/// data, and which of its ranks run here. [`Job::train`] is the driver's one entry point.
pub struct Job<'a> {
    cfg: &'a TrainConfig,
    grid: Grid,
    plan: &'a Plan,
    opts: &'a ParallelOptions,
    steps: usize,
    data: Option<(&'a Feed<'a>, &'a dyn EvalSet)>,
    comms: Option<Vec<ember_transport::Comm>>,
    trace: bool,
}

impl<'a> Job<'a> {
    /// `steps` steps of `cfg` on `grid` with `plan` and `opts`: by default every rank a thread
    /// of this process, on the synthetic stream of `cfg` (world rank w reads its
    /// `Grid::sample_range` of every global batch) and its eval set.
    pub fn new(cfg: &'a TrainConfig, grid: Grid, plan: &'a Plan, opts: &'a ParallelOptions, steps: usize) -> Self {
        Job { cfg, grid, plan, opts, steps, data: None, comms: None, trace: false }
    }

    /// Train on `feed` and evaluate on `eval` (every rank reads the same eval set).
    pub fn data(mut self, feed: &'a Feed<'a>, eval: &'a dyn EvalSet) -> Self {
        self.data = Some((feed, eval));
        self
    }

    /// Run the ranks of these world communicators, one thread each: all `grid.world()` of the
    /// job (e.g. an emulated RDMA world), or this process's rank of a launched job.
    pub fn comms(mut self, comms: Vec<ember_transport::Comm>) -> Self {
        self.comms = Some(comms);
        self
    }

    /// Record every rank's stage spans.
    pub fn trace(mut self, on: bool) -> Self {
        self.trace = on;
        self
    }

    /// Train: every rank this process runs on its own thread, with the backend `new_be(world
    /// rank)` makes on that thread (several in-process ranks sharing one GPU each get their own
    /// stream and pool). Returns the report of the lowest world rank run here (rank 0 unless
    /// this process runs one rank of a launched job), every such rank's final state, by world
    /// rank, and, when tracing, their stage spans.
    pub fn train<B: Backend>(self, new_be: &(dyn Fn(usize) -> Result<B> + Sync)) -> Result<(Report2D, Vec<RankState>, Vec<TraceEvent>)> {
        let Job { cfg, grid, plan, opts, steps, data, comms, trace } = self;
        let t = grid.world();
        if cfg.batch_size % t != 0 {
            return Err(Error::Config(format!("global batch {} is not divisible by T = {t}", cfg.batch_size)));
        }
        let comms = comms.unwrap_or_else(|| ember_transport::local_world(t));
        if comms.len() != t && !(comms.len() == 1 && comms[0].size() == t) {
            return Err(Error::Config(format!("{} world communicators for a grid of {t} ranks", comms.len())));
        }
        let synthetic = match data {
            Some(_) => None,
            None => Some(SyntheticData::new(cfg)?),
        };
        let synthetic_feed = |step: usize, w: usize| {
            let d = synthetic.as_ref().expect("synthetic data without a feed");
            let range = grid.sample_range(w, cfg.batch_size);
            Ok(d.samples((step * cfg.batch_size + range.start) as u64, range.len()))
        };
        let synthetic_eval = synthetic.as_ref().map(|d| d.eval_batch());
        let (feed, eval): (&Feed, &dyn EvalSet) = match (data, &synthetic_eval) {
            (Some((f, e)), _) => (f, e),
            (None, Some(e)) => (&synthetic_feed, e),
            (None, None) => unreachable!("synthetic data made above"),
        };
        let start = Instant::now();
        let results: Vec<Result<RankOutcome>> = std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|world| {
                    let (plan, opts) = (plan.clone(), opts.clone());
                    s.spawn(move || {
                        let be = new_be(world.rank())?;
                        run_rank(&be, cfg, grid, world, plan, opts, steps, feed, eval, trace)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::Config("a rank thread panicked".into())))).collect()
        });
        let mut outcomes = Vec::with_capacity(t);
        let mut failures = Vec::new();
        for r in results {
            match r {
                Ok(o) => outcomes.push(o),
                Err(e) => failures.push(e),
            }
        }
        if let Some(e) = root_cause(failures) {
            return Err(e);
        }
        outcomes.sort_by_key(|o| o.state.world_rank);
        let report = report(grid, steps, cfg.batch_size, start.elapsed().as_secs_f64(), &outcomes[0]);
        let events = outcomes.iter_mut().flat_map(|o| std::mem::take(&mut o.trace)).collect();
        Ok((report, outcomes.into_iter().map(|o| o.state).collect(), events))
    }
}

/// The error to report when in-process ranks failed (listed by world rank): the first that is
/// not a transport error. One rank's own failure (bad data, a damaged checkpoint) makes its
/// communicators drop, and every other rank then fails in a collective with "rank w failed";
/// those follow-on errors are transport errors, the cause is not.
fn root_cause(mut failures: Vec<Error>) -> Option<Error> {
    let i = failures.iter().position(|e| !matches!(e, Error::Transport(_))).unwrap_or(0);
    (i < failures.len()).then(|| failures.swap_remove(i))
}

/// What one rank returns.
struct RankOutcome {
    pub state: RankState,
    pub losses: Vec<f64>,
    /// (NE, AUC) on the eval set (every rank computes the same).
    pub metrics: (f64, f64),
    pub trace: Vec<TraceEvent>,
    /// max / mean over all ranks of the lookup work.
    pub imbalance: f64,
    /// Seconds of this rank's training steps (construction and evaluation excluded).
    pub train_s: f64,
    /// Wall-clock milliseconds of each training step on this rank.
    pub step_ms: Vec<f64>,
    /// Every shard bitwise the same on every replica at the end (`Rank2D::replicas_identical`).
    pub replicas_identical: bool,
    /// Every world rank's heap peak (see `Report2D::heap_peak_bytes`); empty when not counted.
    pub heap_peak_bytes: Vec<u64>,
}

/// One rank's whole run: its communicators, model part, `steps` steps on `feed(step, w)`, the
/// final evaluation and state.
#[allow(clippy::too_many_arguments)]
fn run_rank<B: Backend>(
    be: &B,
    cfg: &TrainConfig,
    grid: Grid,
    world: ember_transport::Comm,
    plan: Plan,
    opts: ParallelOptions,
    steps: usize,
    feed: &(dyn Fn(usize, usize) -> Result<Batch> + Sync),
    eval: &dyn EvalSet,
    trace: bool,
) -> Result<RankOutcome> {
    let w = world.rank();
    // The heap measured from here to the end of training (construction included, the final
    // evaluation not): what the planner's per-rank memory figure bounds.
    let heap0 = crate::heap::enabled().then(crate::heap::reset_peak);
    let gc = GridComms::new(grid, world)?;
    if w == 0 {
        tracing::info!("{}", grid.describe());
    }
    let mut rank = Rank2D::new(be, cfg, gc, plan, opts)?;
    if trace {
        rank.start_trace();
    }
    let ckpt = rank.opts().checkpoint.clone();
    let mut first = 0;
    if let Some(ck) = ckpt.as_ref().filter(|c| c.resume) {
        match crate::checkpoint::latest(&ck.dir)? {
            Some(dir) => {
                let c = crate::checkpoint::Checkpoint::open(&dir)?;
                crate::checkpoint::rank2d::restore_rank2d(be, &mut rank, &c, cfg)?;
                first = rank.steps_done();
                if w == 0 {
                    tracing::info!(target: crate::checkpoint::LOG_TARGET, "resumed from {} (step {first})", dir.display());
                }
            }
            None if w == 0 => {
                tracing::info!(target: crate::checkpoint::LOG_TARGET, "no checkpoint in {} yet: starting from step 0", ck.dir.display());
            }
            None => {}
        }
    }
    // Grown as the steps run: `steps` comes from outside and may be large.
    let mut losses = Vec::with_capacity(steps.min(1 << 16));
    let mut step_ms = Vec::with_capacity(steps.min(1 << 16));
    let t0 = Instant::now();
    let hd0 = be.host_device_bytes();
    // Each step starts the next step's input all-to-all during its dense work.
    let mut batch = if first < steps { Some(feed(first, w)?) } else { None };
    for step in first..steps {
        let next = if step + 1 < steps { Some(feed(step + 1, w)?) } else { None };
        let ts = Instant::now();
        losses.push(rank.train_step_prefetch(be, batch.as_ref().expect("a batch"), next.as_ref())?);
        be.synchronize()?;
        step_ms.push(ts.elapsed().as_secs_f64() * 1e3);
        batch = next;
        if let Some(ck) = ckpt.as_ref().filter(|c| c.every > 0 && (step + 1) % c.every == 0) {
            let r = grid.sample_range(w, cfg.batch_size);
            let position = crate::checkpoint::DataPosition { next_sample: ((step + 1) * cfg.batch_size + r.start) as u64, reader_offsets: vec![] };
            let dir = crate::checkpoint::rank2d::save_rank2d(be, &mut rank, cfg, &ck.dir, position, ck.keep, ck.run_id.as_deref())?;
            if w == 0 {
                tracing::info!(target: crate::checkpoint::LOG_TARGET, "saved {}", dir.display());
            }
        }
    }
    let train_s = t0.elapsed().as_secs_f64();
    let host_device = hd0.zip(be.host_device_bytes()).map(|(a, b)| b.since(&a));
    rank.finish_training(be)?;
    let heap = heap0.map(|h0| (crate::heap::peak() - h0).max(0) as u64);
    let (heaps, _) = rank.world().all_gather_alloc(&[heap.unwrap_or(u64::MAX)])?;
    let heap_peak_bytes = if heaps.contains(&u64::MAX) { Vec::new() } else { heaps };
    let replicas_identical = rank.replicas_identical(be)?;
    // The evaluation's forward passes are not part of the training counters.
    let (times, bytes) = (rank.times().clone(), rank.bytes().clone());
    let metrics = eval_2d(be, &mut rank, eval, cfg.batch_size)?;
    let mut shards = Vec::new();
    for sh in rank.shards() {
        shards.push((sh.spec.clone(), be.download(&sh.weights)?, be.download(&sh.state)?));
    }
    let mut dense = Vec::new();
    for p in rank.dense_params() {
        dense.push(be.download(&p.w)?);
    }
    let (costs, _) = rank.world().all_gather_alloc(&[bytes.lookup_cost])?;
    let mean = costs.iter().sum::<u64>() as f64 / costs.len() as f64;
    let imbalance = if mean > 0.0 { *costs.iter().max().unwrap_or(&0) as f64 / mean } else { 1.0 };
    let coords = rank.comms().coords();
    let state = RankState { world_rank: w, coords, shards, dense, times, bytes, host_device };
    Ok(RankOutcome { state, losses, metrics, trace: rank.take_trace(), imbalance, train_s, step_ms, replicas_identical, heap_peak_bytes })
}

/// The run's report from one rank's outcome; `wall` is the whole run's wall-clock time.
fn report(grid: Grid, steps: usize, batch_size: usize, wall: f64, o: &RankOutcome) -> Report2D {
    // Steps this run executed (fewer than `steps` after a resume).
    let steps = o.losses.len().min(steps);
    let s0 = &o.state;
    let losses = o.losses.clone();
    let metrics = o.metrics;
    let k = steps.max(1) as f64;
    let per = |x: f64| x / k;
    let stages = s0.times.per(k);
    let b = &s0.bytes;
    let tail = (losses.len() / 10).max(1).min(losses.len());
    Report2D {
        grid: format!("{}x{}", grid.m, grid.n),
        samples_per_s: (steps * batch_size) as f64 / o.train_s.max(1e-9),
        loss: losses[losses.len() - tail..].iter().sum::<f64>() / tail.max(1) as f64,
        ne: metrics.0,
        auc: metrics.1,
        steps,
        wall_s: wall,
        stages,
        a2a_bytes_per_rank: per(b.traffic.sparse() as f64),
        sync_bytes_per_rank: per((b.traffic.sync_index + b.traffic.sync_values + b.fs_weights) as f64),
        emb_weight_bytes_resident: b.emb_weight_bytes_resident_dense,
        bytes_per_step: b.per(steps as u64),
        host_device_bytes_per_step: s0.host_device.map(|x| x.per(steps as u64)),
        sync_host_device_bytes_per_step: b.sync_host_device.map(|x| x.per(steps as u64)),
        imbalance: o.imbalance,
        peak_rss_bytes: peak_rss(),
        step_ms_median: {
            let mut t: Vec<f64> = o.step_ms.iter().skip(1.min(o.step_ms.len().saturating_sub(1))).copied().collect();
            t.sort_by(f64::total_cmp);
            t.get(t.len() / 2).copied().unwrap_or(0.0)
        },
        step_ms: o.step_ms.clone(),
        replicas_identical: o.replicas_identical,
        heap_peak_bytes: o.heap_peak_bytes.clone(),
        losses,
    }
}

/// Write a Chrome/Perfetto trace (JSON object format) of the stage spans of every rank.
pub fn write_trace(path: &std::path::Path, events: &[TraceEvent]) -> Result<()> {
    let ev: Vec<serde_json::Value> = events
        .iter()
        .map(|e| serde_json::json!({"name": e.name, "ph": "X", "ts": e.ts, "dur": e.dur, "pid": 0, "tid": e.rank}))
        .collect();
    let text = serde_json::json!({ "traceEvents": ev, "displayTimeUnit": "ms" }).to_string();
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Evaluate on `eval` in global chunks of `gb` samples (every rank reads the same chunk of the
/// shared set and predicts its own part of it); every rank gets (NE, AUC) over the chunks'
/// samples in their order. An empty eval set is an error (every rank sees the same set, so
/// every rank returns it).
fn eval_2d<B: Backend>(be: &B, rank: &mut Rank2D<B>, eval: &dyn EvalSet, gb: usize) -> Result<(f64, f64)> {
    let grid = rank.grid();
    let w = rank.world().rank();
    let mut logits = Vec::new();
    let mut labels = Vec::new();
    for k in 0.. {
        let chunk = eval.chunk(k, gb)?;
        let total = chunk.size();
        if total == 0 {
            break;
        }
        let r = grid.sample_range(w, gb);
        // Indices past the end of a short last chunk wrap around (padding); their logits are
        // dropped below.
        let mut part = chunk.slice(0..0);
        let mut i = r.start;
        while i < r.end {
            let start = i % total;
            let end = (start + (r.end - i)).min(total);
            part.extend(&chunk.slice(start..end));
            i += end - start;
        }
        let all = evaluate(be, rank, &part, true)?.all_logits;
        // Reorder: world rank order → sample order of the global chunk.
        let mut ordered = vec![0.0f32; gb];
        let per = gb / grid.world();
        for wr in 0..grid.world() {
            let rr = grid.sample_range(wr, gb);
            ordered[rr].copy_from_slice(&all[wr * per..(wr + 1) * per]);
        }
        logits.extend_from_slice(&ordered[..total]);
        labels.extend_from_slice(&chunk.labels);
        if total < gb {
            break;
        }
    }
    if labels.is_empty() {
        return Err(Error::Input("the eval set is empty: there is no metric to report".into()));
    }
    let r = crate::metrics::evaluate(&logits, &labels);
    Ok((r.ne, r.auc))
}

/// Peak resident set of this process (VmHWM), bytes; 0 where /proc is not available.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kb| kb * 1024)
}
