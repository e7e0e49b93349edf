//! One 2D job's configuration: the grid and where the ranks sit on it, how the planner shards
//! the tables, and how the replicas sync. Its settings are spelt and parsed here, once, for the
//! command line (`ember train`, `ember plan`) and the C ABI's `[parallel]` table.
use crate::grid::{Grid, Placement};
use crate::parallel::{OverlapSync, ParallelOptions, SyncMode, XferKind};
use crate::plan::planner::PlanOptions;
use crate::plan::ShardingType;
use crate::{Error, Result};
use serde::Deserialize;
use std::str::FromStr;

/// The spellings of a setting's values, each with a one-line help ("" for none), in the order
/// help texts list them.
pub trait Spelled: FromStr<Err = String> + Copy + 'static {
    const VALUES: &'static [(&'static str, Self, &'static str)];
    /// The setting's name in messages.
    const WHAT: &'static str;
}

/// The value of `s` among `T::VALUES`, or a message listing them.
fn parse_spelled<T: Spelled>(s: &str) -> std::result::Result<T, String> {
    if let Some(v) = T::VALUES.iter().find(|v| v.0 == s) {
        return Ok(v.1);
    }
    let names: Vec<&str> = T::VALUES.iter().map(|v| v.0).collect();
    let (last, rest) = names.split_last().expect("a setting has values");
    let list = if rest.is_empty() { last.to_string() } else { format!("{} or {last}", rest.join(", ")) };
    Err(format!("{} '{s}': expected {list}", T::WHAT))
}

impl Spelled for Placement {
    const VALUES: &'static [(&'static str, Self, &'static str)] = &[
        ("in-node", Placement::ReplicasInNode, "Replica groups contiguous (the weight average stays inside a node)"),
        ("across-nodes", Placement::ReplicasAcrossNodes, "Sharding groups contiguous"),
    ];
    const WHAT: &'static str = "placement";
}

impl FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_spelled(s)
    }
}

impl Spelled for ShardingType {
    const VALUES: &'static [(&'static str, Self, &'static str)] = &[
        ("table", ShardingType::TableWise, "Every table whole on one rank"),
        ("row", ShardingType::RowWise, "Rows split over the sharding group"),
        ("column", ShardingType::ColumnWise, "Columns split over the sharding group"),
        ("table-row", ShardingType::TableRowWise, "Rows split over the ranks of one node"),
    ];
    const WHAT: &'static str = "sharding";
}

impl FromStr for ShardingType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_spelled(s)
    }
}

impl Spelled for SyncMode {
    const VALUES: &'static [(&'static str, Self, &'static str)] = &[("sparse", SyncMode::Sparse, ""), ("full", SyncMode::Full, "")];
    const WHAT: &'static str = "sync";
}

impl FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_spelled(s)
    }
}

impl Spelled for OverlapSync {
    const VALUES: &'static [(&'static str, Self, &'static str)] = &[
        ("auto", OverlapSync::Auto, "Beside the dense update when every in-process rank and its sync thread get a core (2 x ranks in this process <= cores), else after it"),
        ("on", OverlapSync::On, "Always beside the dense update, on a thread of its own"),
        ("off", OverlapSync::Off, "Always after the dense update"),
    ];
    const WHAT: &'static str = "overlap-sync";
}

impl FromStr for OverlapSync {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_spelled(s)
    }
}

impl Spelled for XferKind {
    const VALUES: &'static [(&'static str, Self, &'static str)] = &[
        ("auto", XferKind::Auto, "Host buffers: host; device buffers: peers in-process, else direct when every NIC registers device memory, else nccl when built, else host"),
        ("host", XferKind::Host, "The host transport on the buffers (device buffers through host staging copies)"),
        ("staged", XferKind::Staged, "The host transport on host staging copies, even of host buffers"),
        ("peers", XferKind::Peers, "In-process ranks: the buffers themselves through the in-process fabric"),
        ("nccl", XferKind::Nccl, "NCCL's collectives on device buffers (--features nccl; one rank per process)"),
        ("direct", XferKind::Direct, "GPUDirect RDMA: the RDMA transport on device buffers"),
    ];
    const WHAT: &'static str = "buffer transport";
}

impl FromStr for XferKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        parse_spelled(s)
    }
}

/// One 2D job.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConfig {
    /// M replicas × N ranks per sharding group (None: the caller's default, 1×1 in one process,
    /// 1×T under a launcher of T processes).
    pub grid: Option<(usize, usize)>,
    pub placement: Placement,
    /// One sharding type for every table (None: the planner chooses per table).
    pub sharding: Option<ShardingType>,
    /// Ranks per node (the planner's table-row-wise shards span one node).
    pub ranks_per_node: usize,
    /// Replica sync, fully-sharded 2D, buffer transport, checkpoints.
    pub parallel: ParallelOptions,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig { grid: None, placement: Placement::default(), sharding: None, ranks_per_node: 8, parallel: ParallelOptions::default() }
    }
}

/// `[parallel]`: the C ABI's spelling of a job (the `ember train` flags of the same names).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParallelSection {
    sync_every: Option<usize>,
    sync: Option<String>,
    #[serde(default)]
    delayed_state_sync: bool,
    #[serde(default)]
    fully_sharded: bool,
    placement: Option<String>,
    sharding: Option<String>,
}

impl JobConfig {
    /// The job of an engine config's top-level `grid = "MxN"` and `[parallel]` table (either
    /// may be absent). Errors name the key.
    pub fn from_toml(grid: Option<toml::Value>, parallel: Option<toml::Value>) -> Result<JobConfig> {
        let par: ParallelSection = match parallel {
            None => toml::Value::Table(Default::default()).try_into().map_err(|e: toml::de::Error| Error::Config(e.to_string()))?,
            Some(v) => v.try_into().map_err(|e: toml::de::Error| Error::Config(format!("[parallel]: {e}")))?,
        };
        let bad = |m: String| Error::Config(format!("[parallel] {m}"));
        let mut job = JobConfig::default();
        if let Some(p) = &par.placement {
            job.placement = p.parse().map_err(bad)?;
        }
        job.sharding = par.sharding.as_deref().map(str::parse).transpose().map_err(bad)?;
        if let Some(s) = &par.sync {
            job.parallel.sync = s.parse().map_err(bad)?;
        }
        job.parallel.sync_every = par.sync_every.unwrap_or(1);
        if job.parallel.sync_every == 0 {
            return Err(Error::Config("[parallel] sync_every must be >= 1".into()));
        }
        job.parallel.delayed_state_sync = par.delayed_state_sync;
        job.parallel.fully_sharded = par.fully_sharded;
        job.grid = match grid {
            None => None,
            Some(toml::Value::String(s)) => {
                let g = Grid::parse(&s, job.placement)?;
                Some((g.m, g.n))
            }
            Some(v) => return Err(Error::Config(format!("grid = {v}: expected a string \"MxN\""))),
        };
        Ok(job)
    }

    /// The grid of M × N ranks with this job's placement.
    pub fn grid_of(&self, m: usize, n: usize) -> Result<Grid> {
        Grid::new(m, n, self.placement)
    }

    /// The planner's options for this job training `cfg`.
    pub fn plan_options(&self, cfg: &crate::config::TrainConfig) -> PlanOptions {
        PlanOptions {
            ranks_per_node: self.ranks_per_node,
            placement: self.placement,
            force: self.sharding,
            sync_every: self.parallel.sync_every,
            full_sync: self.parallel.sync == SyncMode::Full,
            delayed_state_sync: self.parallel.delayed_state_sync,
            ..PlanOptions::from_config(cfg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_parses_back_and_a_wrong_one_lists_them_all() {
        for &(s, v, _) in Placement::VALUES {
            assert_eq!(s.parse::<Placement>(), Ok(v));
        }
        for &(s, v, _) in ShardingType::VALUES {
            assert_eq!(s.parse::<ShardingType>(), Ok(v));
        }
        for &(s, v, _) in SyncMode::VALUES {
            assert_eq!(s.parse::<SyncMode>(), Ok(v));
        }
        // Every buffer transport is spelt once: the table covers every variant, and serde (run
        // records, checkpoints) spells each as the table does.
        assert_eq!(XferKind::VALUES.len(), 6);
        for &(s, v, _) in XferKind::VALUES {
            assert_eq!(s.parse::<XferKind>(), Ok(v));
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{s}\""));
        }
        for &(s, v, _) in OverlapSync::VALUES {
            assert_eq!(s.parse::<OverlapSync>(), Ok(v));
            assert_eq!(serde_json::to_string(&v).unwrap(), format!("\"{s}\""));
        }
        assert_eq!("maybe".parse::<OverlapSync>(), Err("overlap-sync 'maybe': expected auto, on or off".to_string()));
        assert_eq!("inside".parse::<Placement>(), Err("placement 'inside': expected in-node or across-nodes".to_string()));
        assert_eq!("diagonal".parse::<ShardingType>(), Err("sharding 'diagonal': expected table, row, column or table-row".to_string()));
        assert_eq!("half".parse::<SyncMode>(), Err("sync 'half': expected sparse or full".to_string()));
        assert_eq!("bogus".parse::<XferKind>(), Err("buffer transport 'bogus': expected auto, host, staged, peers, nccl or direct".to_string()));
    }

    #[test]
    fn a_parallel_table_gives_the_job_and_names_a_bad_key() {
        let t = |s: &str| -> toml::Value { toml::from_str::<toml::Table>(s).unwrap().into() };
        let job = JobConfig::from_toml(
            Some(toml::Value::String("2x4".into())),
            Some(t("sync_every = 3\nsync = \"full\"\nplacement = \"across-nodes\"\nsharding = \"table-row\"\nfully_sharded = true")),
        )
        .unwrap();
        assert_eq!(job.grid, Some((2, 4)));
        assert_eq!((job.placement, job.sharding), (Placement::ReplicasAcrossNodes, Some(ShardingType::TableRowWise)));
        assert_eq!((job.parallel.sync_every, job.parallel.sync, job.parallel.fully_sharded), (3, SyncMode::Full, true));
        assert_eq!(JobConfig::from_toml(None, None).unwrap(), JobConfig::default());
        for (bad, says) in [
            ("placement = \"inside\"", "[parallel] placement 'inside'"),
            ("sharding = \"diagonal\"", "[parallel] sharding 'diagonal'"),
            ("sync = \"half\"", "[parallel] sync 'half'"),
            ("sync_every = 0", "[parallel] sync_every must be >= 1"),
            ("sync_evry = 2", "[parallel]: unknown field"),
        ] {
            let e = JobConfig::from_toml(None, Some(t(bad))).unwrap_err().to_string();
            assert!(e.starts_with("config: ") && e.contains(says), "{bad}: {e}");
        }
        let e = JobConfig::from_toml(Some(toml::Value::Integer(4)), None).unwrap_err().to_string();
        assert!(e.contains("grid = 4: expected a string"), "{e}");
    }
}
