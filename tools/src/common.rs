//! Flags shared by every subcommand, turning them into a `TrainConfig`, and the value parsers
//! that range-check every number flag (clap's error then names the flag and the range).
use clap::Args;
use ember_engine::config::limits::{MAX_BATCH, MAX_ROWS, MAX_STEPS};
use ember_engine::config::{preset, TrainConfig};

pub type CliResult = Result<(), Box<dyn std::error::Error>>;

/// A count flag in `LO..=HI`.
pub fn count<const LO: usize, const HI: usize>(s: &str) -> Result<usize, String> {
    let v: usize = s.trim().parse().map_err(|e| format!("not a whole number ({e})"))?;
    if (LO..=HI).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: expected {LO} to {HI}"))
    }
}

/// A 64-bit count flag in `LO..=HI`.
pub fn count64<const LO: u64, const HI: u64>(s: &str) -> Result<u64, String> {
    let v: u64 = s.trim().parse().map_err(|e| format!("not a whole number ({e})"))?;
    if (LO..=HI).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: expected {LO} to {HI}"))
    }
}

/// A finite number > 0 (NaN and infinities refused).
pub fn positive_f32(s: &str) -> Result<f32, String> {
    let v: f32 = s.trim().parse().map_err(|e| format!("not a number ({e})"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: expected a finite number > 0"))
    }
}

/// A finite number > 0 (NaN and infinities refused).
pub fn positive_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("not a number ({e})"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: expected a finite number > 0"))
    }
}

/// A Zipf exponent: finite, 0 to 100.
pub fn zipf(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("not a number ({e})"))?;
    if v.is_finite() && (0.0..=ember_engine::config::limits::MAX_ZIPF).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: expected a finite number from 0 to {}", ember_engine::config::limits::MAX_ZIPF))
    }
}

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
        // The flags first, each named with its range (the config's own keys are checked below).
        let flag = |name: &str, v: Option<u64>, lo: u64, hi: u64| match v {
            Some(v) if v < lo || v > hi => Err(format!("--{name} {v}: out of range, expected {lo} to {hi}")),
            _ => Ok(()),
        };
        flag("steps", self.steps.map(|v| v as u64), 1, MAX_STEPS as u64)?;
        flag("batch-size", self.batch_size.map(|v| v as u64), 1, MAX_BATCH as u64).map_err(|e| format!("{e} (the global batch_size)"))?;
        flag("max-rows", self.max_rows, 1, MAX_ROWS)?;
        let mut cfg = match &self.config {
            Some(path) => {
                let text = ember_engine::config::read_config_file(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
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
