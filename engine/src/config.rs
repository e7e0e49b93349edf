//! Model, optimizer and training configuration, the presets, and their validation.
//!
//! A config is plain data (serde, TOML on disk). Every later layer — the planner, the
//! 2D scheduler, the C ABI — reads the same structs.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// How the vectors of one bag are pooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Sum,
    Mean,
}

/// One embedding table; feature `f` of a batch looks up table `f`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableConfig {
    pub rows: u64,
    pub dim: usize,
    #[serde(default = "default_pooling")]
    pub pooling: Pooling,
    /// Mean number of ids per bag in synthetic data (multi-hot size).
    #[serde(default = "one")]
    pub bag_size: usize,
}

fn default_pooling() -> Pooling {
    Pooling::Sum
}
fn one() -> usize {
    1
}

/// Feature interaction between the bottom-MLP output and the pooled embeddings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Interaction {
    /// DLRM: the dense vector concatenated with all pairwise dot products (strict lower triangle).
    Dot,
    /// DCNv2 low-rank cross layers over the concatenation of all vectors.
    Dcn { layers: usize, rank: usize },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub num_dense: usize,
    pub tables: Vec<TableConfig>,
    /// Output sizes of the bottom MLP layers (input is `num_dense`); the last equals the table dim.
    pub bottom_mlp: Vec<usize>,
    /// Output sizes of the top MLP layers; the last is 1 (the logit).
    pub top_mlp: Vec<usize>,
    pub interaction: Interaction,
}

impl ModelConfig {
    /// The common embedding dim (DLRM interactions need one dim for all tables).
    pub fn dim(&self) -> usize {
        self.tables.first().map(|t| t.dim).unwrap_or(0)
    }
    pub fn num_tables(&self) -> usize {
        self.tables.len()
    }
    /// Width of the interaction output, the input of the top MLP.
    pub fn interaction_width(&self) -> usize {
        let d = self.dim();
        let f = self.tables.len();
        match self.interaction {
            Interaction::Dot => d + (f + 1) * f / 2,
            Interaction::Dcn { .. } => d * (f + 1),
        }
    }
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.num_dense == 0 {
            return bad("model.num_dense must be > 0".into());
        }
        if self.tables.is_empty() {
            return bad("model.tables is empty".into());
        }
        let d = self.dim();
        for (i, t) in self.tables.iter().enumerate() {
            if t.rows == 0 {
                return bad(format!("model.tables[{i}].rows must be > 0"));
            }
            if t.dim != d {
                return bad(format!("model.tables[{i}].dim = {} but table 0 has dim {d}: DLRM interactions need one dim", t.dim));
            }
            if t.dim == 0 || t.dim % 4 != 0 {
                return bad(format!("model.tables[{i}].dim = {} must be a positive multiple of 4", t.dim));
            }
        }
        if self.bottom_mlp.last() != Some(&d) {
            return bad(format!("model.bottom_mlp must end in the table dim {d}, got {:?}", self.bottom_mlp));
        }
        if self.top_mlp.last() != Some(&1) {
            return bad(format!("model.top_mlp must end in 1 (the logit), got {:?}", self.top_mlp));
        }
        if self.bottom_mlp.iter().chain(&self.top_mlp).any(|&w| w == 0) {
            return bad("MLP layer widths must be > 0".into());
        }
        if let Interaction::Dcn { layers, rank } = self.interaction {
            if layers == 0 || rank == 0 {
                return bad("dcn interaction needs layers > 0 and rank > 0".into());
            }
        }
        Ok(())
    }
}

/// Weight-decay mode for embedding and dense optimizers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum WeightDecay {
    #[default]
    None,
    /// L2: adds `wd · w` to the gradient before the update.
    L2 { wd: f32 },
}

/// Embedding optimizer (fused into the backward pass). Formulas: BRIEF.md §3.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EmbOptimizer {
    Sgd { lr: f32 },
    /// Row-wise AdaGrad: one f32 of state per row. `c` is the momentum-scaling constant
    /// (None means: M under 2D, M² in fully-sharded 2D, 1 on one replica). `eps_inside` selects
    /// lr/sqrt(v/c + eps).
    RowWiseAdagrad { lr: f32, eps: f32, c: Option<f32>, #[serde(default)] eps_inside: bool },
    /// Element-wise AdaGrad: D floats of state per row.
    Adagrad { lr: f32, eps: f32, c: Option<f32>, #[serde(default)] eps_inside: bool },
}

impl EmbOptimizer {
    /// Floats of optimizer state per row of width `dim`.
    pub fn state_per_row(&self, dim: usize) -> usize {
        match self {
            EmbOptimizer::Sgd { .. } => 0,
            EmbOptimizer::RowWiseAdagrad { .. } => 1,
            EmbOptimizer::Adagrad { .. } => dim,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DenseOptimizer {
    Sgd { lr: f32 },
    Adagrad { lr: f32, eps: f32 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub embedding: EmbOptimizer,
    pub dense: DenseOptimizer,
    #[serde(default)]
    pub weight_decay: WeightDecay,
}

/// Synthetic data parameters (see `data::synthetic`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SyntheticConfig {
    /// Zipf exponent of id popularity; 0 gives uniform ids.
    pub zipf: f64,
    /// Scale of the planted model's logits (larger: an easier problem, higher oracle AUC).
    pub signal: f32,
    /// Number of samples held out for evaluation.
    pub eval_samples: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig { zipf: 1.05, signal: 1.0, eval_samples: 16384 }
    }
}

/// Everything `ember train` needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub optim: OptimConfig,
    /// Global batch size (samples per step over all ranks).
    pub batch_size: usize,
    /// Number of training steps; with `--data`, None means one epoch.
    pub steps: Option<usize>,
    pub seed: u64,
    /// Evaluate every this many steps (0: only at the end).
    #[serde(default)]
    pub eval_every: usize,
    #[serde(default)]
    pub synthetic: SyntheticConfig,
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.batch_size == 0 {
            return Err(Error::Config("batch_size must be > 0".into()));
        }
        let lr_ok = |lr: f32| lr.is_finite() && lr > 0.0;
        let ok = match self.optim.embedding {
            EmbOptimizer::Sgd { lr } => lr_ok(lr),
            EmbOptimizer::RowWiseAdagrad { lr, eps, c, .. } | EmbOptimizer::Adagrad { lr, eps, c, .. } => {
                lr_ok(lr) && eps >= 0.0 && c.map_or(true, |c| c.is_finite() && c > 0.0)
            }
        } && match self.optim.dense {
            DenseOptimizer::Sgd { lr } => lr_ok(lr),
            DenseOptimizer::Adagrad { lr, eps } => lr_ok(lr) && eps >= 0.0,
        };
        if !ok {
            return Err(Error::Config(format!("optimizer hyper-parameters out of range: {:?}", self.optim)));
        }
        Ok(())
    }

    /// Parse a TOML config file's text.
    pub fn from_toml(text: &str) -> Result<Self> {
        let cfg: TrainConfig = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

/// Names of the built-in presets.
pub const PRESETS: &[&str] = &["tiny", "kaggle", "terabyte", "dlrmv2", "bench"];

/// Criteo Kaggle cardinalities (BRIEF.md §6).
pub const KAGGLE_ROWS: [u64; 26] = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992, 5461306, 10,
    5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
];
/// DLRMv2 cardinalities and multi-hot sizes (BRIEF.md §6).
pub const DLRMV2_ROWS: [u64; 26] = [
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209, 11938, 155, 4,
    976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
];
pub const DLRMV2_HOTNESS: [usize; 26] = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1];

/// Row cap that keeps the large presets inside this machine's memory.
pub const DEFAULT_ROW_CAP: u64 = 1_000_000;

fn rowwise(lr: f32) -> EmbOptimizer {
    EmbOptimizer::RowWiseAdagrad { lr, eps: 1e-8, c: None, eps_inside: false }
}

/// A preset by name. `row_cap` caps every table's rows (the shapes stay real).
pub fn preset(name: &str, row_cap: Option<u64>) -> Result<TrainConfig> {
    let cap = |rows: u64, default_cap: u64| rows.min(row_cap.unwrap_or(default_cap)).max(1);
    let (model, batch_size, steps, optim) = match name {
        "tiny" => (
            ModelConfig {
                num_dense: 13,
                tables: [1000u64, 5000, 20000, 300, 100000, 50, 7000, 40000]
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| TableConfig {
                        rows: cap(r, u64::MAX),
                        dim: 16,
                        pooling: if i % 3 == 2 { Pooling::Mean } else { Pooling::Sum },
                        bag_size: 1 + i % 3,
                    })
                    .collect(),
                bottom_mlp: vec![64, 32, 16],
                top_mlp: vec![64, 32, 1],
                interaction: Interaction::Dot,
            },
            256,
            Some(600),
            OptimConfig {
                embedding: rowwise(0.05),
                dense: DenseOptimizer::Adagrad { lr: 0.02, eps: 1e-8 },
                weight_decay: WeightDecay::None,
            },
        ),
        "kaggle" => (
            ModelConfig {
                num_dense: 13,
                tables: KAGGLE_ROWS
                    .iter()
                    .map(|&r| TableConfig { rows: cap(r, DEFAULT_ROW_CAP), dim: 16, pooling: Pooling::Sum, bag_size: 1 })
                    .collect(),
                bottom_mlp: vec![512, 256, 64, 16],
                top_mlp: vec![512, 256, 1],
                interaction: Interaction::Dot,
            },
            128,
            Some(2000),
            OptimConfig { embedding: rowwise(0.05), dense: DenseOptimizer::Adagrad { lr: 0.01, eps: 1e-8 }, weight_decay: WeightDecay::None },
        ),
        "terabyte" => (
            ModelConfig {
                num_dense: 13,
                tables: KAGGLE_ROWS
                    .iter()
                    .map(|&r| TableConfig { rows: cap(r, DEFAULT_ROW_CAP), dim: 64, pooling: Pooling::Sum, bag_size: 1 })
                    .collect(),
                bottom_mlp: vec![512, 256, 64],
                top_mlp: vec![512, 512, 256, 1],
                interaction: Interaction::Dot,
            },
            2048,
            Some(200),
            OptimConfig { embedding: rowwise(0.05), dense: DenseOptimizer::Adagrad { lr: 0.01, eps: 1e-8 }, weight_decay: WeightDecay::None },
        ),
        "dlrmv2" => (
            ModelConfig {
                num_dense: 13,
                tables: DLRMV2_ROWS
                    .iter()
                    .zip(DLRMV2_HOTNESS)
                    .map(|(&r, h)| TableConfig { rows: cap(r, 200_000), dim: 128, pooling: Pooling::Sum, bag_size: h })
                    .collect(),
                bottom_mlp: vec![512, 256, 128],
                top_mlp: vec![1024, 1024, 512, 256, 1],
                interaction: Interaction::Dcn { layers: 3, rank: 512 },
            },
            2048,
            Some(20),
            OptimConfig {
                embedding: EmbOptimizer::Adagrad { lr: 0.005, eps: 1e-8, c: None, eps_inside: false },
                dense: DenseOptimizer::Adagrad { lr: 0.005, eps: 1e-8 },
                weight_decay: WeightDecay::None,
            },
        ),
        // The `ember bench dlrm` model: 8 tables x 1M rows x dim 64, 20 ids per bag.
        "bench" => (
            ModelConfig {
                num_dense: 13,
                tables: (0..8)
                    .map(|_| TableConfig { rows: cap(1_000_000, u64::MAX), dim: 64, pooling: Pooling::Sum, bag_size: 20 })
                    .collect(),
                bottom_mlp: vec![512, 256, 64],
                top_mlp: vec![512, 256, 1],
                interaction: Interaction::Dot,
            },
            4096,
            Some(20),
            OptimConfig { embedding: rowwise(0.02), dense: DenseOptimizer::Adagrad { lr: 0.005, eps: 1e-8 }, weight_decay: WeightDecay::None },
        ),
        other => {
            return Err(Error::Config(format!("unknown preset '{other}'; known: {}", PRESETS.join(", "))))
        }
    };
    let cfg = TrainConfig {
        model,
        optim,
        batch_size,
        steps,
        seed: 1,
        eval_every: 0,
        synthetic: SyntheticConfig::default(),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Human-readable names (for reports and `ember checkpoint inspect`).
impl std::fmt::Display for EmbOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let adagrad = |f: &mut std::fmt::Formatter<'_>, name: &str, lr: f32, eps: f32, c: Option<f32>, eps_inside: bool| {
            write!(f, "{name} (lr {lr}, eps {eps:e}")?;
            if let Some(c) = c {
                write!(f, ", momentum scaling c = {c}")?;
            }
            if eps_inside {
                write!(f, ", eps inside the square root")?;
            }
            write!(f, ")")
        };
        match *self {
            EmbOptimizer::Sgd { lr } => write!(f, "SGD (lr {lr})"),
            EmbOptimizer::RowWiseAdagrad { lr, eps, c, eps_inside } => adagrad(f, "row-wise AdaGrad", lr, eps, c, eps_inside),
            EmbOptimizer::Adagrad { lr, eps, c, eps_inside } => adagrad(f, "AdaGrad", lr, eps, c, eps_inside),
        }
    }
}

impl std::fmt::Display for DenseOptimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            DenseOptimizer::Sgd { lr } => write!(f, "SGD (lr {lr})"),
            DenseOptimizer::Adagrad { lr, eps } => write!(f, "AdaGrad (lr {lr}, eps {eps:e})"),
        }
    }
}

impl std::fmt::Display for Interaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Interaction::Dot => write!(f, "dot interaction"),
            Interaction::Dcn { layers, rank } => write!(f, "DCN interaction ({layers} layers, rank {rank})"),
        }
    }
}
