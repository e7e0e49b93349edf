//! A machine description: what the scale model (`crate::simulate`) knows of the hardware a
//! 2D step runs on — ranks per node, memory per rank, memory and GEMM rates, the measured
//! efficiency of each embedding kernel, and the links' bandwidth and latency with measured
//! all-to-all and all-reduce curves. Read from TOML (`ember simulate --machine FILE`), shipped
//! as presets ([`Machine::PRESETS`]; every number names its source in `sources`) or written by
//! `ember simulate --calibrate` from microbenchmarks on the machine it runs on (docs/machine.md).
//!
//! Conventions (the calibration measures by them and the model predicts by them):
//! * Rates in `memory` and `compute` are one compute unit's, measured with every unit of the
//!   node busy and divided by the units (a node of U units moves U × `stream_bw`).
//! * `stream_bw` and `gather_bw` count bytes read plus bytes written, as `ember bench mem`
//!   prints them: a gathered 256-byte row counts 512 bytes.
//! * An embedding kernel's time is its bytes ([`super::kernels`])
//!   divided by `efficiency × gather_bw`; the calibration measures the efficiency as
//!   bytes ÷ time ÷ `gather_bw`.
//! * A dense GEMM's time is its FLOPs (2·m·n·k) divided by `gemm_flops`.
//! * Collective curves: `seconds` for one operation on `peers` ranks with `bytes` per rank (see
//!   [`CurvePoint`]); between curve points, and where a link has none, the model uses `bw` and
//!   `latency_s`.
use crate::config::EmbOptimizer;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Limits on what a machine file may say (it comes from outside the process).
pub const MAX_CURVE_POINTS: usize = 4096;
pub const MAX_RANKS_PER_NODE: usize = 1 << 16;
/// Largest machine file read, bytes.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Largest memory per rank (1 PiB) and collective size per rank (1 PiB), bytes.
pub const MAX_BYTES: u64 = 1 << 50;
/// Largest rate (bytes/s or FLOP/s) a file may state: 1e18.
pub const MAX_RATE: f64 = 1e18;
/// Largest kernel efficiency a file may state: a kernel whose hot rows stay in cache (skewed
/// ids) moves its counted bytes faster than the uniform random gather it is a fraction of.
pub const MAX_EFF: f64 = 8.0;
/// Largest time (curve seconds, latency, step overhead) a file may state: one hour.
pub const MAX_SECONDS: f64 = 3600.0;
/// At most this many `sources` lines, and this many characters in any text field.
pub const MAX_SOURCES: usize = 256;
pub const MAX_TEXT: usize = 4096;

/// One machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Short name (`h100-ib`, `this-host`, ...).
    pub name: String,
    /// Free text: what the machine is, and where its numbers come from.
    #[serde(default)]
    pub description: String,
    /// Ranks (GPUs, or CPU processes/threads) per node.
    pub ranks_per_node: usize,
    /// Compute units (GPUs, or CPU cores) the node's ranks run on: ranks beyond them
    /// time-share one (this host: 8 in-process ranks on 2 cores). The rates in `memory` and
    /// `compute` are one unit's.
    pub compute_units_per_node: usize,
    /// Whether the node's ranks are threads of one process whose shards are in host memory
    /// (the CPU backend's in-process ranks): a job whose ranks all fit on one node then averages
    /// its replica groups' rows in place, in every replica's shards, instead of packing and
    /// all-reducing them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_place_sync: bool,
    /// Memory a rank may use for its tables, state and buffers, bytes (the budget the model
    /// checks a plan's peak against).
    pub memory_per_rank: u64,
    pub memory: MemoryRates,
    pub compute: ComputeRates,
    /// Transfers between ranks of one node (NVLink, shared memory, in-process copies).
    pub intra_node: Link,
    /// Transfers between nodes (one NIC per rank: InfiniBand, RoCE; loopback TCP on one host).
    pub inter_node: Link,
    /// Sources of the numbers above, one line each (`field: source`).
    #[serde(default)]
    pub sources: Vec<String>,
}

/// Memory rates of one compute unit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRates {
    /// Streaming copy bandwidth, bytes read plus written per second.
    pub stream_bw: f64,
    /// Random gather of 256-byte rows into a dense buffer, bytes read plus written per second
    /// (what embedding kernels are bound by; their efficiencies are fractions of it).
    pub gather_bw: f64,
}

/// Compute rates of one compute unit: dense GEMMs and the embedding kernels' efficiency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeRates {
    /// Dense f32 GEMM rate reached on the dense network's shapes (forward, weight gradient and
    /// input gradient of every MLP layer), FLOP/s counting 2·m·n·k per GEMM.
    pub gemm_flops: f64,
    /// Embedding forward (pooled lookup): fraction of `gather_bw` its bytes
    /// ([`super::kernels::forward_bytes`]) reach.
    pub emb_forward_eff: f64,
    /// Fused backward + optimizer: fraction of `gather_bw` its bytes
    /// ([`super::kernels::backward_bytes`]) reach, per optimizer.
    pub emb_backward_eff: EmbBackwardEff,
    /// Fixed cost of one step outside the stages above (launches, bookkeeping), seconds.
    #[serde(default)]
    pub step_overhead_s: f64,
    /// The dot interaction's rate (forward and backward, FLOP/s counting 2·d per pair of
    /// vectors; it is no GEMM call on every backend); absent: `gemm_flops`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interaction_flops: Option<f64>,
}

/// Efficiency of the fused embedding backward + optimizer, per optimizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbBackwardEff {
    pub sgd: f64,
    pub rowwise_adagrad: f64,
    pub adagrad: f64,
}

/// One class of link: nominal bandwidth and latency, and measured collective curves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// Per-rank unidirectional bandwidth, bytes/s.
    pub bw: f64,
    /// One-way latency of a small message, seconds.
    pub latency_s: f64,
    /// Measured all-to-all times (empty: derived from `bw` and `latency_s`).
    #[serde(default)]
    pub all_to_all: Vec<CurvePoint>,
    /// Measured all-reduce times (empty: derived from `bw` and `latency_s`).
    #[serde(default)]
    pub all_reduce: Vec<CurvePoint>,
    /// Measured times of the replica sync's all-reduce: f32 values averaged in f64 on the host
    /// (the engine's sync path), with every rank of the node busy (empty: `all_reduce`).
    #[serde(default)]
    pub sync_all_reduce: Vec<CurvePoint>,
}

/// One measured collective on `peers` ranks: `bytes` per rank — all-to-all: the rank's whole
/// send buffer (its block for every peer, its own included); all-reduce: the buffer's size —
/// and `seconds` per operation (the slowest rank's mean over the timed iterations, as
/// nccl-tests). Within one `peers`, points are listed by strictly increasing `bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurvePoint {
    pub peers: usize,
    pub bytes: u64,
    pub seconds: f64,
}

impl EmbBackwardEff {
    /// The efficiency of `opt`'s fused backward.
    pub fn of(&self, opt: &EmbOptimizer) -> f64 {
        match opt {
            EmbOptimizer::Sgd { .. } => self.sgd,
            EmbOptimizer::RowWiseAdagrad { .. } => self.rowwise_adagrad,
            EmbOptimizer::Adagrad { .. } => self.adagrad,
        }
    }
}

/// The numeric field groups a machine file holds; a preset's `sources` names each one
/// (`group: source`), the curves only where they have points.
pub const FIELD_GROUPS: &[&str] = &[
    "ranks_per_node",
    "compute_units_per_node",
    "in_place_sync",
    "memory_per_rank",
    "memory.stream_bw",
    "memory.gather_bw",
    "compute.gemm_flops",
    "compute.emb_forward_eff",
    "compute.emb_backward_eff",
    "compute.step_overhead_s",
    "compute.interaction_flops",
    "intra_node.bw",
    "intra_node.latency_s",
    "intra_node.all_to_all",
    "intra_node.all_reduce",
    "intra_node.sync_all_reduce",
    "inter_node.bw",
    "inter_node.latency_s",
    "inter_node.all_to_all",
    "inter_node.all_reduce",
    "inter_node.sync_all_reduce",
];

impl Machine {
    /// The shipped presets (engine/src/simulate/presets/NAME.toml).
    pub const PRESETS: &'static [&'static str] = &["h100-ib", "h200-ib", "this-host"];

    /// A shipped preset by name.
    pub fn preset(name: &str) -> Result<Machine> {
        let text = match name {
            "h100-ib" => include_str!("presets/h100-ib.toml"),
            "h200-ib" => include_str!("presets/h200-ib.toml"),
            "this-host" => include_str!("presets/this-host.toml"),
            _ => return Err(Error::Config(format!("unknown machine preset '{name}': expected one of {}", Self::PRESETS.join(", ")))),
        };
        Self::from_toml(text, &format!("machine preset {name}"))
    }

    /// Read and check a machine file (at most [`MAX_FILE_BYTES`]).
    pub fn read(path: &std::path::Path) -> Result<Machine> {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let mut text = String::new();
        f.take(MAX_FILE_BYTES + 1).read_to_string(&mut text).map_err(|e| Error::io(path, e))?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(Error::Config(format!("{}: machine file larger than {MAX_FILE_BYTES} bytes", path.display())));
        }
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parse and check a machine file; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Machine> {
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(Error::Config(format!("{origin}: machine file larger than {MAX_FILE_BYTES} bytes")));
        }
        let m: Machine = toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        m.validate().map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        Ok(m)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("machine serializes")
    }

    /// The field groups ([`FIELD_GROUPS`]) that no `sources` line names (`group: ...`); curves
    /// without points need none.
    pub fn unsourced(&self) -> Vec<&'static str> {
        let empty = |g: &str| match g {
            "intra_node.all_to_all" => self.intra_node.all_to_all.is_empty(),
            "intra_node.all_reduce" => self.intra_node.all_reduce.is_empty(),
            "inter_node.all_to_all" => self.inter_node.all_to_all.is_empty(),
            "inter_node.all_reduce" => self.inter_node.all_reduce.is_empty(),
            "compute.interaction_flops" => self.compute.interaction_flops.is_none(),
            "intra_node.sync_all_reduce" => self.intra_node.sync_all_reduce.is_empty(),
            "inter_node.sync_all_reduce" => self.inter_node.sync_all_reduce.is_empty(),
            "in_place_sync" => !self.in_place_sync,
            _ => false,
        };
        let named = |g: &str| {
            self.sources.iter().any(|s| s.split_once(':').is_some_and(|(head, src)| head.split(',').any(|h| h.trim() == g) && !src.trim().is_empty()))
        };
        FIELD_GROUPS.iter().copied().filter(|g| !empty(g) && !named(g)).collect()
    }

    /// A machine for the model's unit tests: `ranks` per node on `units`, `memory` per rank,
    /// round rates (20 GB/s stream, 10 GB/s gather, 100 GFLOP/s, links 10 and 1 GB/s).
    #[cfg(test)]
    pub(crate) fn for_tests(ranks: usize, units: usize, memory: u64) -> Machine {
        let link = |bw: f64, lat: f64| Link { bw, latency_s: lat, all_to_all: vec![], all_reduce: vec![], sync_all_reduce: vec![] };
        Machine {
            name: "t".into(),
            description: String::new(),
            ranks_per_node: ranks,
            compute_units_per_node: units,
            in_place_sync: false,
            memory_per_rank: memory,
            memory: MemoryRates { stream_bw: 2e10, gather_bw: 1e10 },
            compute: ComputeRates { gemm_flops: 1e11, emb_forward_eff: 0.5, emb_backward_eff: EmbBackwardEff { sgd: 0.25, rowwise_adagrad: 0.25, adagrad: 0.25 }, step_overhead_s: 0.0, interaction_flops: None },
            intra_node: link(1e10, 1e-6),
            inter_node: link(1e9, 1e-5),
            sources: vec![],
        }
    }

    /// Every rate finite, positive and below [`MAX_RATE`], every efficiency in (0, [`MAX_EFF`]], every
    /// time finite, non-negative and below [`MAX_SECONDS`], curves bounded, sorted and sane,
    /// text bounded. The error names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let rate = |what: &str, x: f64| {
            if x.is_finite() && x > 0.0 && x <= MAX_RATE {
                Ok(())
            } else {
                Err(format!("{what} = {x}: must be finite, > 0 and <= {MAX_RATE:e}"))
            }
        };
        let eff = |what: &str, x: f64| if x.is_finite() && x > 0.0 && x <= MAX_EFF { Ok(()) } else { Err(format!("{what} = {x}: must lie in (0, {MAX_EFF}]")) };
        let secs = |what: &str, x: f64, zero_ok: bool| {
            if x.is_finite() && (x > 0.0 || (zero_ok && x == 0.0)) && x <= MAX_SECONDS {
                Ok(())
            } else {
                Err(format!("{what} = {x}: must be finite, {} and <= {MAX_SECONDS}", if zero_ok { ">= 0" } else { "> 0" }))
            }
        };
        if self.name.is_empty() || self.name.len() > 64 {
            return Err(format!("name: {} characters, must be 1..=64", self.name.len()));
        }
        if self.description.len() > MAX_TEXT {
            return Err(format!("description: {} characters, at most {MAX_TEXT}", self.description.len()));
        }
        if self.sources.len() > MAX_SOURCES {
            return Err(format!("sources: {} lines, at most {MAX_SOURCES}", self.sources.len()));
        }
        if let Some(i) = self.sources.iter().position(|s| s.len() > MAX_TEXT) {
            return Err(format!("sources[{i}]: longer than {MAX_TEXT} characters"));
        }
        if self.ranks_per_node == 0 || self.ranks_per_node > MAX_RANKS_PER_NODE {
            return Err(format!("ranks_per_node = {}: must be 1..={MAX_RANKS_PER_NODE}", self.ranks_per_node));
        }
        if self.compute_units_per_node == 0 || self.compute_units_per_node > MAX_RANKS_PER_NODE {
            return Err(format!("compute_units_per_node = {}: must be 1..={MAX_RANKS_PER_NODE}", self.compute_units_per_node));
        }
        if self.memory_per_rank == 0 || self.memory_per_rank > MAX_BYTES {
            return Err(format!("memory_per_rank = {}: must be 1..={MAX_BYTES}", self.memory_per_rank));
        }
        rate("memory.stream_bw", self.memory.stream_bw)?;
        rate("memory.gather_bw", self.memory.gather_bw)?;
        rate("compute.gemm_flops", self.compute.gemm_flops)?;
        if let Some(x) = self.compute.interaction_flops {
            rate("compute.interaction_flops", x)?;
        }
        eff("compute.emb_forward_eff", self.compute.emb_forward_eff)?;
        let b = &self.compute.emb_backward_eff;
        eff("compute.emb_backward_eff.sgd", b.sgd)?;
        eff("compute.emb_backward_eff.rowwise_adagrad", b.rowwise_adagrad)?;
        eff("compute.emb_backward_eff.adagrad", b.adagrad)?;
        secs("compute.step_overhead_s", self.compute.step_overhead_s, true)?;
        for (name, l) in [("intra_node", &self.intra_node), ("inter_node", &self.inter_node)] {
            rate(&format!("{name}.bw"), l.bw)?;
            secs(&format!("{name}.latency_s"), l.latency_s, true)?;
            for (cname, c) in [("all_to_all", &l.all_to_all), ("all_reduce", &l.all_reduce), ("sync_all_reduce", &l.sync_all_reduce)] {
                if c.len() > MAX_CURVE_POINTS {
                    return Err(format!("{name}.{cname}: {} points, at most {MAX_CURVE_POINTS}", c.len()));
                }
                for (i, p) in c.iter().enumerate() {
                    let at = format!("{name}.{cname}[{i}]");
                    if p.peers < 2 || p.peers > MAX_RANKS_PER_NODE * 1024 {
                        return Err(format!("{at}.peers = {}: must be 2..={}", p.peers, MAX_RANKS_PER_NODE * 1024));
                    }
                    if p.bytes == 0 || p.bytes > MAX_BYTES {
                        return Err(format!("{at}.bytes = {}: must be 1..={MAX_BYTES}", p.bytes));
                    }
                    secs(&format!("{at}.seconds"), p.seconds, false)?;
                    if let Some(q) = c[..i].iter().rev().find(|q| q.peers == p.peers) {
                        if q.bytes >= p.bytes {
                            return Err(format!("{at}.bytes = {}: points of {} peers must list strictly increasing bytes (an earlier one has {})", p.bytes, p.peers, q.bytes));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Machine {
        let link = |bw: f64, lat: f64| Link { bw, latency_s: lat, all_to_all: vec![CurvePoint { peers: 2, bytes: 1 << 20, seconds: 1e-3 }], all_reduce: vec![], sync_all_reduce: vec![] };
        Machine {
            name: "t".into(),
            description: String::new(),
            ranks_per_node: 8,
            compute_units_per_node: 8,
            in_place_sync: false,
            memory_per_rank: 80 << 30,
            memory: MemoryRates { stream_bw: 3e12, gather_bw: 1e12 },
            compute: ComputeRates { gemm_flops: 5e13, emb_forward_eff: 0.5, emb_backward_eff: EmbBackwardEff { sgd: 0.4, rowwise_adagrad: 0.3, adagrad: 0.3 }, step_overhead_s: 0.0, interaction_flops: None },
            intra_node: link(4.5e11, 3e-6),
            inter_node: link(5e10, 5e-6),
            sources: vec![],
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let m = sample();
        assert_eq!(Machine::from_toml(&m.to_toml(), "t").unwrap(), m);
    }

    #[test]
    fn every_preset_parses_validates_and_names_the_source_of_every_field_group() {
        for &name in Machine::PRESETS {
            let m = Machine::preset(name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(m.name, name);
            assert!(m.unsourced().is_empty(), "{name}: no source for {:?}", m.unsourced());
            // Every source line says what kind of source it is.
            for l in &m.sources {
                assert!(["datasheet", "Ember's own measurement", "assumption", "calibrated", "published", "compute:"].iter().any(|k| l.contains(k)), "{name}: {l}");
            }
        }
        assert!(Machine::preset("h300").unwrap_err().to_string().contains("h100-ib, h200-ib, this-host"));
        // The GPU presets: one GPU per rank, eight per node, a NIC per GPU slower than NVLink.
        for name in ["h100-ib", "h200-ib"] {
            let m = Machine::preset(name).unwrap();
            assert_eq!((m.ranks_per_node, m.compute_units_per_node), (8, 8));
            assert!(m.inter_node.bw < m.intra_node.bw);
        }
        assert!(Machine::preset("h200-ib").unwrap().memory_per_rank > Machine::preset("h100-ib").unwrap().memory_per_rank);
    }

    #[test]
    fn unsourced_reports_a_group_without_a_source_line() {
        let mut m = Machine::preset("h100-ib").unwrap();
        m.sources.retain(|l| !l.starts_with("memory.gather_bw"));
        assert_eq!(m.unsourced(), vec!["memory.gather_bw"]);
        // One line may name several groups; an empty source names none.
        m.sources.push("memory.gather_bw, compute.gemm_flops:   ".into());
        assert_eq!(m.unsourced(), vec!["memory.gather_bw"]);
        // Curves need a source only when they have points.
        m.sources.push("memory.gather_bw: assumption: test".into());
        m.intra_node.all_reduce.push(CurvePoint { peers: 2, bytes: 4, seconds: 1e-5 });
        assert_eq!(m.unsourced(), vec!["intra_node.all_reduce"]);
    }

    #[test]
    fn the_byte_convention_matches_the_sources_arithmetic() {
        // The H200 figures of docs/gpu-results.md the h200-ib preset derives its efficiencies from.
        use crate::config::EmbOptimizer;
        use crate::simulate::kernels::{backward_bytes, forward_bytes};
        let rowwise = EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false };
        let sgd = EmbOptimizer::Sgd { lr: 0.1 };
        let adagrad = EmbOptimizer::Adagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false };
        assert_eq!(forward_bytes(1_310_720.0, 65_536.0, 64), 352_321_536.0);
        assert_eq!(backward_bytes(&rowwise, 1_310_720.0, 65_536.0, 1_118_404.0, 64), 608_833_056.0);
        let m = Machine::preset("h200-ib").unwrap();
        let fwd = 352_321_536.0 / 0.097e-3 / m.memory.gather_bw;
        let bwd = 608_833_056.0 / 0.496e-3 / m.memory.gather_bw;
        assert!((fwd - m.compute.emb_forward_eff).abs() < 0.005, "{fwd}");
        assert!((bwd - m.compute.emb_backward_eff.rowwise_adagrad).abs() < 0.005, "{bwd}");
        // SGD moves no state, element-wise AdaGrad D floats per row.
        assert_eq!(backward_bytes(&sgd, 0.0, 0.0, 10.0, 4), 10.0 * 32.0);
        assert_eq!(backward_bytes(&adagrad, 0.0, 0.0, 10.0, 4), 10.0 * 64.0);
        assert_eq!(m.compute.emb_backward_eff.of(&adagrad), m.compute.emb_backward_eff.adagrad);
    }

    /// `text` with `key = ...` (first occurrence) replaced by `key = value`.
    fn with(text: &str, key: &str, value: &str) -> String {
        let mut done = false;
        text.lines()
            .map(|l| {
                if !done && l.trim_start().starts_with(&format!("{key} =")) {
                    done = true;
                    format!("{key} = {value}")
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn hostile_machine_files_get_errors_naming_the_field() {
        let good = include_str!("presets/h100-ib.toml");
        let err = |text: &str| Machine::from_toml(text, "m.toml").unwrap_err().to_string();
        for (text, want) in [
            (with(good, "stream_bw", "nan"), "memory.stream_bw"),
            (with(good, "gather_bw", "-1.0"), "memory.gather_bw"),
            (with(good, "gemm_flops", "inf"), "compute.gemm_flops"),
            (with(good, "gemm_flops", "1e30"), "compute.gemm_flops"),
            (with(good, "emb_forward_eff", "0.0"), "compute.emb_forward_eff"),
            (with(good, "adagrad", "8.5"), "compute.emb_backward_eff.adagrad"),
            (with(good, "step_overhead_s", "-0.1"), "compute.step_overhead_s"),
            (with(good, "latency_s", "1e9"), "intra_node.latency_s"),
            (with(good, "ranks_per_node", "-8"), "ranks_per_node"),
            (with(good, "ranks_per_node", "0"), "ranks_per_node"),
            (with(good, "memory_per_rank", "0"), "memory_per_rank"),
            (with(good, "memory_per_rank", "18446744073709551615"), "memory_per_rank"),
            (with(good, "stream_bw", "\"fast\""), "stream_bw"),
            (good.replace("[memory]", "[memory]\nbandwidth = 1.0"), "bandwidth"),
            (good.replace("[compute]", "[compute]\nemb_forward_efficiency = 0.5"), "emb_forward_efficiency"),
            (good.replace("ranks_per_node = 8", "ranks_per_nod = 8"), "ranks_per_nod"),
            (good.replace("[memory]", "[[memory]]"), "memory"),
        ] {
            let e = err(&text);
            assert!(e.contains("m.toml") && e.contains(want), "{want}: {e}");
        }
        // Curves: bad points, a point past the limit, unsorted sizes.
        let curve = |pts: &str| good.replacen("all_to_all = []", &format!("all_to_all = [{pts}]"), 1);
        for (pts, want) in [
            ("{ peers = 1, bytes = 1024, seconds = 1e-5 }", "intra_node.all_to_all[0].peers"),
            ("{ peers = 2, bytes = 0, seconds = 1e-5 }", "intra_node.all_to_all[0].bytes"),
            ("{ peers = 2, bytes = 1125899906842625, seconds = 1e-5 }", "intra_node.all_to_all[0].bytes"),
            ("{ peers = 2, bytes = 1024, seconds = nan }", "intra_node.all_to_all[0].seconds"),
            ("{ peers = 2, bytes = 1024, seconds = 0.0 }", "intra_node.all_to_all[0].seconds"),
            ("{ peers = 2, bytes = 1024, seconds = 1e-5 }, { peers = 4, bytes = 64, seconds = 1e-5 }, { peers = 2, bytes = 1024, seconds = 2e-5 }", "intra_node.all_to_all[2].bytes"),
            ("{ peers = 2, bytes = 1024, seconds = 1e-5, extra = 1 }", "extra"),
        ] {
            let e = err(&curve(pts));
            assert!(e.contains(want), "{want}: {e}");
        }
        let ok = Machine::from_toml(&curve("{ peers = 2, bytes = 1024, seconds = 1e-5 }, { peers = 4, bytes = 64, seconds = 1e-5 }, { peers = 2, bytes = 2048, seconds = 2e-5 }"), "m.toml").unwrap();
        assert_eq!(ok.intra_node.all_to_all.len(), 3);
        let many = (0..=MAX_CURVE_POINTS).map(|i| format!("{{ peers = 2, bytes = {}, seconds = 1e-5 }}", i + 1)).collect::<Vec<_>>().join(", ");
        let e = err(&curve(&many));
        assert!(e.contains("intra_node.all_to_all") && e.contains("4097 points"), "{e}");
        // Text past the file limit, before parsing.
        let big = format!("{good}\n# {}", "x".repeat(MAX_FILE_BYTES as usize));
        assert!(err(&big).contains("larger than"), "{}", err(&big));
        let many_sources = good.replace("sources = [", &format!("sources = [{}", "\"x: y\", ".repeat(MAX_SOURCES + 1)));
        assert!(err(&many_sources).contains("sources"), "{}", err(&many_sources));
    }

    #[test]
    fn read_checks_the_file() {
        let dir = std::env::temp_dir().join(format!("ember-machine-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("m.toml");
        std::fs::write(&p, Machine::preset("h200-ib").unwrap().to_toml()).unwrap();
        assert_eq!(Machine::read(&p).unwrap(), Machine::preset("h200-ib").unwrap());
        std::fs::write(&p, vec![b'#'; MAX_FILE_BYTES as usize + 10]).unwrap();
        assert!(Machine::read(&p).unwrap_err().to_string().contains("larger than"));
        assert!(Machine::read(&dir.join("none.toml")).unwrap_err().to_string().contains("none.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_bad_numbers_naming_the_field() {
        let mut m = sample();
        m.compute.emb_forward_eff = 9.0;
        let e = Machine::from_toml(&m.to_toml(), "f.toml").unwrap_err().to_string();
        assert!(e.contains("f.toml") && e.contains("emb_forward_eff"), "{e}");
        let mut m = sample();
        m.intra_node.bw = f64::NAN;
        assert!(m.validate().unwrap_err().contains("intra_node.bw"));
        let mut m = sample();
        m.ranks_per_node = 0;
        assert!(m.validate().is_err());
        let text = sample().to_toml().replace("ranks_per_node", "ranks_per_nod");
        assert!(Machine::from_toml(&text, "x").is_err());
    }
}
