//! Flags shared by every subcommand, and turning them into a `TrainConfig`.
use clap::Args;
use ember_engine::config::{preset, TrainConfig};

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Args, Clone, Debug)]
pub struct Shared {
    /// Built-in configuration: tiny (default), kaggle, terabyte, dlrmv2, bench.
    #[arg(long)]
    pub preset: Option<String>,
    /// A TOML config file (overrides --preset).
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Criteo-format data file (tab-separated raw, or comma-separated with a header).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Grid MxN: M replicas x N ranks per sharding group.
    #[arg(long, default_value = "1x1")]
    pub grid: String,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// auto, local, shm, tcp, rdma, nccl.
    #[arg(long, default_value = "auto")]
    pub transport: String,
    /// Training steps (overrides the preset).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Global batch size (overrides the preset).
    #[arg(long)]
    pub batch_size: Option<usize>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Cap every table's rows (presets keep their real dims and MLPs).
    #[arg(long)]
    pub max_rows: Option<u64>,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

impl Shared {
    /// The config these flags select: --config, else --preset (default tiny), then overrides.
    pub fn train_config(&self, default_preset: &str) -> Result<TrainConfig, Box<dyn std::error::Error>> {
        let mut cfg = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
                TrainConfig::from_toml(&text).map_err(|e| format!("--config {}: {e}", path.display()))?
            }
            None => preset(self.preset.as_deref().unwrap_or(default_preset), self.max_rows)?,
        };
        if let Some(s) = self.steps {
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

    /// (M, N) from --grid.
    pub fn grid(&self) -> Result<(usize, usize), String> {
        let g = ember_engine::grid::Grid::parse(&self.grid, ember_engine::grid::Placement::default()).map_err(|e| match e {
            ember_engine::Error::Config(m) => format!("--{m}"),
            other => other.to_string(),
        })?;
        Ok((g.m, g.n))
    }
}
