//! A machine description: what the scale model (`crate::simulate`) knows of the hardware a
//! 2D step runs on — ranks per node, memory per rank, memory and GEMM rates, the measured
//! efficiency of each embedding kernel, and the links' bandwidth and latency with measured
//! all-to-all and all-reduce curves. Read from TOML (`ember simulate --machine FILE`), shipped
//! as presets (every number names its source) or written by `ember simulate --calibrate` from
//! microbenchmarks on the machine it runs on.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Limits on what a machine file may say (it comes from outside the process).
pub const MAX_CURVE_POINTS: usize = 4096;
pub const MAX_RANKS_PER_NODE: usize = 1 << 16;

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
    /// Memory a rank may use for its tables, state and buffers, bytes.
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

/// Memory system of one rank.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRates {
    /// Streaming copy bandwidth, bytes/s.
    pub stream_bw: f64,
    /// Random gather of 256-byte rows, bytes/s (what embedding kernels are bound by).
    pub gather_bw: f64,
}

/// Compute rates of one rank: dense GEMMs and the embedding kernels' efficiency.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ComputeRates {
    /// Dense f32 GEMM rate reached on the dense network's shapes, FLOP/s.
    pub gemm_flops: f64,
    /// Embedding forward (pooled lookup): fraction of `gather_bw` its bytes reach.
    pub emb_forward_eff: f64,
    /// Fused backward + optimizer: fraction of `gather_bw` its bytes reach, per optimizer.
    pub emb_backward_eff: EmbBackwardEff,
    /// Fixed cost of one step outside the stages above (launches, bookkeeping), seconds.
    #[serde(default)]
    pub step_overhead_s: f64,
}

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
}

/// One measured collective: `peers` ranks, `bytes` per rank (all-to-all: bytes each rank sends
/// in total; all-reduce: the buffer's size), `seconds` per operation (median).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CurvePoint {
    pub peers: usize,
    pub bytes: u64,
    pub seconds: f64,
}

impl Machine {
    /// Parse and check a machine file; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Machine> {
        let m: Machine = toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        m.validate().map_err(|e| Error::Config(format!("{origin}: {e}")))?;
        Ok(m)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("machine serializes")
    }

    /// Every rate finite and positive, every efficiency in (0, 1], curves bounded and sane.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let pos = |what: &str, x: f64| if x.is_finite() && x > 0.0 { Ok(()) } else { Err(format!("{what} = {x}: must be finite and > 0")) };
        let eff = |what: &str, x: f64| if x.is_finite() && x > 0.0 && x <= 1.0 { Ok(()) } else { Err(format!("{what} = {x}: must lie in (0, 1]")) };
        if self.ranks_per_node == 0 || self.ranks_per_node > MAX_RANKS_PER_NODE {
            return Err(format!("ranks_per_node = {}: must be 1..={MAX_RANKS_PER_NODE}", self.ranks_per_node));
        }
        if self.compute_units_per_node == 0 || self.compute_units_per_node > MAX_RANKS_PER_NODE {
            return Err(format!("compute_units_per_node = {}: must be 1..={MAX_RANKS_PER_NODE}", self.compute_units_per_node));
        }
        if self.memory_per_rank == 0 {
            return Err("memory_per_rank = 0".into());
        }
        pos("memory.stream_bw", self.memory.stream_bw)?;
        pos("memory.gather_bw", self.memory.gather_bw)?;
        pos("compute.gemm_flops", self.compute.gemm_flops)?;
        eff("compute.emb_forward_eff", self.compute.emb_forward_eff)?;
        let b = &self.compute.emb_backward_eff;
        eff("compute.emb_backward_eff.sgd", b.sgd)?;
        eff("compute.emb_backward_eff.rowwise_adagrad", b.rowwise_adagrad)?;
        eff("compute.emb_backward_eff.adagrad", b.adagrad)?;
        let o = self.compute.step_overhead_s;
        if !(o.is_finite() && o >= 0.0) {
            return Err(format!("compute.step_overhead_s = {o}: must be finite and >= 0"));
        }
        for (name, l) in [("intra_node", &self.intra_node), ("inter_node", &self.inter_node)] {
            pos(&format!("{name}.bw"), l.bw)?;
            let lat = l.latency_s;
            if !(lat.is_finite() && lat >= 0.0) {
                return Err(format!("{name}.latency_s = {lat}: must be finite and >= 0"));
            }
            for (cname, c) in [("all_to_all", &l.all_to_all), ("all_reduce", &l.all_reduce)] {
                if c.len() > MAX_CURVE_POINTS {
                    return Err(format!("{name}.{cname}: {} points, at most {MAX_CURVE_POINTS}", c.len()));
                }
                for (i, p) in c.iter().enumerate() {
                    if p.peers < 2 || p.peers > MAX_RANKS_PER_NODE * 1024 {
                        return Err(format!("{name}.{cname}[{i}].peers = {}: must be 2..={}", p.peers, MAX_RANKS_PER_NODE * 1024));
                    }
                    pos(&format!("{name}.{cname}[{i}].seconds"), p.seconds)?;
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
        let link = |bw: f64, lat: f64| Link { bw, latency_s: lat, all_to_all: vec![CurvePoint { peers: 2, bytes: 1 << 20, seconds: 1e-3 }], all_reduce: vec![] };
        Machine {
            name: "t".into(),
            description: String::new(),
            ranks_per_node: 8,
            compute_units_per_node: 8,
            memory_per_rank: 80 << 30,
            memory: MemoryRates { stream_bw: 3e12, gather_bw: 1e12 },
            compute: ComputeRates { gemm_flops: 5e13, emb_forward_eff: 0.5, emb_backward_eff: EmbBackwardEff { sgd: 0.4, rowwise_adagrad: 0.3, adagrad: 0.3 }, step_overhead_s: 0.0 },
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
    fn rejects_bad_numbers_naming_the_field() {
        let mut m = sample();
        m.compute.emb_forward_eff = 1.5;
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
