//! What a rank measures of its steps: milliseconds per stage, bytes handed to each collective
//! and, when tracing, one span per stage. The step's math touches neither: a stage runs inside
//! `Rank2D::span`, and the step adds the bytes its layout says each exchange moves.
use crate::backend::HostDeviceBytes;
use crate::plan::traffic::Traffic;
use serde::Serialize;
use std::time::Instant;

/// The stages a step's time is split into (the brief's seven steps; the dense forward and
/// backward, all-reduce and update count as one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    InputDist,
    Lookup,
    OutputDist,
    Dense,
    Backward,
    Sync,
}

impl Stage {
    /// The stage's name in reports and traces.
    pub fn name(self) -> &'static str {
        match self {
            Stage::InputDist => "input_dist",
            Stage::Lookup => "lookup",
            Stage::OutputDist => "output_dist",
            Stage::Dense => "dense",
            Stage::Backward => "backward",
            Stage::Sync => "sync",
        }
    }
}

/// Milliseconds spent per stage, summed over steps.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StageTimes {
    pub input_dist: f64,
    pub lookup: f64,
    pub output_dist: f64,
    pub dense: f64,
    pub backward: f64,
    /// The replica sync's own time: during a training step it runs beside the dense update
    /// (`sync::replica_sync_beside`), so it overlaps `dense` rather than adding to the step.
    pub sync: f64,
}

impl StageTimes {
    fn at(&mut self, s: Stage) -> &mut f64 {
        match s {
            Stage::InputDist => &mut self.input_dist,
            Stage::Lookup => &mut self.lookup,
            Stage::OutputDist => &mut self.output_dist,
            Stage::Dense => &mut self.dense,
            Stage::Backward => &mut self.backward,
            Stage::Sync => &mut self.sync,
        }
    }

    /// Every time divided by `k` (per step).
    pub fn per(&self, k: f64) -> StageTimes {
        StageTimes {
            input_dist: self.input_dist / k,
            lookup: self.lookup / k,
            output_dist: self.output_dist / k,
            dense: self.dense / k,
            backward: self.backward / k,
            sync: self.sync / k,
        }
    }
}

/// Bytes this rank hands to each collective, summed over steps (the planner predicts the same
/// quantities per step: docs/plan.md), and the step's other counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ByteCounts {
    #[serde(flatten)]
    pub traffic: Traffic<u64>,
    /// Fully-sharded 2D: the reduce-scatter and all-gather of shard weights.
    pub fs_weights: u64,
    /// Largest number of embedding-weight bytes resident during the dense phase of a step.
    pub emb_weight_bytes_resident_dense: u64,
    /// Lookup work done on this rank's shards: Σ ids × shard columns, summed over steps.
    pub lookup_cost: u64,
    /// Bytes the replica syncs moved between host and device, where the backend counts them
    /// (the emulated device backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_host_device: Option<HostDeviceBytes>,
}

impl ByteCounts {
    /// Every count divided by `k` (per step); the resident-weights maximum is kept.
    pub fn per(&self, k: u64) -> ByteCounts {
        let k = k.max(1);
        ByteCounts {
            traffic: self.traffic.map(|x| x / k),
            fs_weights: self.fs_weights / k,
            emb_weight_bytes_resident_dense: self.emb_weight_bytes_resident_dense,
            lookup_cost: self.lookup_cost / k,
            sync_host_device: self.sync_host_device.map(|b| b.per(k)),
        }
    }
}

/// One timed span of one rank (Chrome/Perfetto trace "X" event).
#[derive(Clone, Debug, Serialize)]
pub struct TraceEvent {
    pub name: &'static str,
    /// Microseconds since the rank started.
    pub ts: f64,
    pub dur: f64,
    pub rank: usize,
}

/// A rank's stage times, byte counts and trace.
#[derive(Debug)]
pub struct Meter {
    pub times: StageTimes,
    pub bytes: ByteCounts,
    /// Recorded spans when tracing.
    trace: Option<Vec<TraceEvent>>,
    epoch: Instant,
    rank: usize,
}

impl Meter {
    /// A meter for world rank `rank`, not tracing.
    pub fn new(rank: usize) -> Meter {
        Meter { times: StageTimes::default(), bytes: ByteCounts::default(), trace: None, epoch: Instant::now(), rank }
    }

    /// Record every span closed from now on.
    pub fn start_trace(&mut self) {
        self.trace.get_or_insert_with(Vec::new);
    }

    /// The spans recorded so far (tracing goes on).
    pub fn take_trace(&mut self) -> Vec<TraceEvent> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Close a span named `name` that began at `t0`: its milliseconds go to `stage`'s total
    /// (None: the trace only), and it is traced when tracing.
    pub fn close(&mut self, name: &'static str, stage: Option<Stage>, t0: Instant) {
        self.close_at(name, stage, t0, Instant::now());
    }

    /// [`Self::close`] for a span that ended at `now` (one that ran on another thread).
    pub fn close_at(&mut self, name: &'static str, stage: Option<Stage>, t0: Instant, now: Instant) {
        if let Some(tr) = self.trace.as_mut() {
            let ts = (t0 - self.epoch).as_secs_f64() * 1e6;
            tr.push(TraceEvent { name, ts, dur: (now - t0).as_secs_f64() * 1e6, rank: self.rank });
        }
        if let Some(s) = stage {
            *self.times.at(s) += (now - t0).as_secs_f64() * 1e3;
        }
    }
}
