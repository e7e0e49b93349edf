//! Flags that several subcommands share (one spelling per concept, docs/cli.md), turning them
//! into a `TrainConfig`, and the checks `train` and `plan` both apply.
use clap::{Args, ValueEnum};
use ember_engine::config::{preset, TrainConfig};
use ember_engine::grid::Placement;
use ember_engine::plan::ShardingType;

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

/// The model and its training configuration (`train`, `plan`, `config`).
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Built-in configuration: tiny, kaggle, terabyte, dlrmv2, bench [default: tiny; kaggle with --data].
    #[arg(long)]
    pub preset: Option<String>,
    /// A TOML config file (replaces --preset; `ember config` prints one to start from).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Global batch size, all ranks together [default: the config's].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Seed of the initial weights and of the synthetic data [default: the config's, 1 in every preset].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Cap every table's rows; dims, MLPs and pooling stay real [default: 1M for kaggle and
    /// terabyte, 200k for dlrmv2; `plan`: no cap].
    #[arg(long)]
    pub max_rows: Option<u64>,
}

impl ModelArgs {
    /// The config these flags select: --config, else --preset (else `default_preset`), then the
    /// overrides (`steps` is the subcommand's --steps, where it has one).
    pub fn train_config(&self, default_preset: &str, steps: Option<usize>) -> Result<TrainConfig, Box<dyn std::error::Error>> {
        let mut cfg = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
                TrainConfig::from_toml(&text).map_err(|e| format!("--config {}: {e}", path.display()))?
            }
            None => preset(self.preset.as_deref().unwrap_or(default_preset), self.max_rows)?,
        };
        if let Some(s) = steps {
            cfg.steps = Some(s);
        }
        if let Some(b) = self.batch_size {
            cfg.batch_size = b;
        }
        if let Some(s) = self.seed {
            cfg.seed = s;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// (M, N) of a `--grid MxN` value.
pub fn parse_grid(s: &str) -> Result<(usize, usize), String> {
    let g = ember_engine::grid::Grid::parse(s, Placement::default()).map_err(|e| match e {
        ember_engine::Error::Config(m) => format!("--{m}"),
        other => other.to_string(),
    })?;
    Ok((g.m, g.n))
}

/// Every rank takes B/T samples of each global batch: `train` refuses a batch T does not
/// divide, and `plan` refuses to plan it.
pub fn check_batch(batch: usize, m: usize, n: usize) -> Result<(), String> {
    let t = m * n;
    if batch % t != 0 {
        return Err(format!(
            "--batch-size {batch} is not divisible by the T = {t} ranks of grid {m}x{n}: every rank takes B/T samples of each global batch (e.g. --batch-size {})",
            (batch / t).max(1) * t
        ));
    }
    Ok(())
}

/// `--device`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend (the reference).
    Cpu,
    /// The CUDA backend (a binary built with `--features cuda`).
    Cuda,
}

/// `--placement`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementArg {
    /// Replica groups contiguous (the weight average stays inside a node).
    InNode,
    /// Sharding groups contiguous.
    AcrossNodes,
}

impl From<PlacementArg> for Placement {
    fn from(p: PlacementArg) -> Self {
        match p {
            PlacementArg::InNode => Placement::ReplicasInNode,
            PlacementArg::AcrossNodes => Placement::ReplicasAcrossNodes,
        }
    }
}

/// `--sharding`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardingArg {
    /// Every table whole on one rank.
    Table,
    /// Rows split over the sharding group.
    Row,
    /// Columns split over the sharding group.
    Column,
    /// Rows split over the ranks of one node.
    TableRow,
}

impl From<ShardingArg> for ShardingType {
    fn from(s: ShardingArg) -> Self {
        match s {
            ShardingArg::Table => ShardingType::TableWise,
            ShardingArg::Row => ShardingType::RowWise,
            ShardingArg::Column => ShardingType::ColumnWise,
            ShardingArg::TableRow => ShardingType::TableRowWise,
        }
    }
}

/// `--ranks-per-node` (train and plan).
pub fn ranks_per_node(r: usize) -> Result<usize, String> {
    if r == 0 {
        return Err("--ranks-per-node must be >= 1".into());
    }
    Ok(r)
}
