//! Flags that several subcommands share (one spelling per concept, docs/cli.md), turning them
//! into a `TrainConfig`, the checks `train` and `plan` both apply, and the value parsers that
//! range-check every number flag (clap's error then names the flag and the range).
use clap::builder::TypedValueParser;
use clap::{Args, ValueEnum};
use ember_engine::config::limits::{MAX_BATCH, MAX_ROWS, MAX_ZIPF};
use ember_engine::config::{preset, Spelled, TrainConfig};
use ember_engine::grid::Placement;

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

/// A Zipf exponent: finite, 0 to `MAX_ZIPF`.
pub fn zipf(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|e| format!("not a number ({e})"))?;
    if v.is_finite() && (0.0..=MAX_ZIPF).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is out of range: expected a finite number from 0 to {MAX_ZIPF}"))
    }
}

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
    #[arg(long, value_parser = count::<1, MAX_BATCH>)]
    pub batch_size: Option<usize>,
    /// Seed of the initial weights and of the synthetic data [default: the config's, 1 in every preset].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Cap every table's rows; dims, MLPs and pooling stay real [default: 1M for kaggle and
    /// terabyte, 200k for dlrmv2; `plan`: no cap].
    #[arg(long, value_parser = count64::<1, MAX_ROWS>)]
    pub max_rows: Option<u64>,
}

impl ModelArgs {
    /// The config these flags select: --config, else --preset (else `default_preset`), then the
    /// overrides (`steps` is the subcommand's --steps, where it has one).
    pub fn train_config(&self, default_preset: &str, steps: Option<usize>) -> Result<TrainConfig, Box<dyn std::error::Error>> {
        let mut cfg = match &self.config {
            Some(path) => {
                let text = ember_engine::config::read_config_file(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
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
    /// The emulated device backend: host memory reached only through counted copies, so the
    /// device code paths run (and report their host<->device bytes) without a GPU.
    Emulated,
}

/// The value parser of a setting the engine spells (`--placement`, `--sharding`, `--sync`): clap
/// lists and checks the engine's spellings (with their help), the engine parses them.
pub fn spelled<T: Spelled + Clone + Send + Sync>() -> impl clap::builder::TypedValueParser<Value = T> {
    let values = T::VALUES.iter().map(|&(name, _, help)| {
        let v = clap::builder::PossibleValue::new(name);
        if help.is_empty() {
            v
        } else {
            v.help(help)
        }
    });
    clap::builder::PossibleValuesParser::new(values).try_map(|s| s.parse::<T>())
}
