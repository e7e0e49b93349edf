//! Model, optimizer and training configuration, the presets, and their validation; a 2D job's
//! configuration in [`job`].
//!
//! A config is plain data (serde, TOML on disk). Every later layer — the planner, the
//! 2D scheduler, the C ABI — reads the same structs. A config from outside is checked in full
//! before anything is sized from it: unknown keys are refused (a misspelt key would otherwise
//! silently keep its default) and every number is range-checked against [`limits`], the error
//! naming the key.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

pub mod job;
pub use job::{JobConfig, Spelled};

/// The range every number of a config must lie in (docs/security.md, "Input limits"). They
/// bound what a config can make the engine size before the memory check
/// (`crate::memory`) compares the real need with the memory there is.
pub mod limits {
    /// Rows of one table (2^40).
    pub const MAX_ROWS: u64 = 1 << 40;
    /// Embedding dim.
    pub const MAX_DIM: usize = 1 << 14;
    pub const MAX_TABLES: usize = 1 << 12;
    pub const MAX_NUM_DENSE: usize = 1 << 16;
    /// Width of one MLP layer, and the DCN rank.
    pub const MAX_WIDTH: usize = 1 << 16;
    /// Layers of one MLP, and DCN cross layers.
    pub const MAX_LAYERS: usize = 64;
    /// Mean ids per bag of the synthetic data.
    pub const MAX_BAG_SIZE: usize = 1 << 16;
    /// Global batch size (samples per step).
    pub const MAX_BATCH: usize = 1 << 24;
    /// Training steps, and `eval_every`.
    pub const MAX_STEPS: usize = 1_000_000_000;
    /// Epochs over a dataset (`--epochs`): each is at least one step.
    pub const MAX_EPOCHS: u64 = MAX_STEPS as u64;
    /// Synthetic eval samples.
    pub const MAX_EVAL_SAMPLES: usize = 1 << 26;
    /// The Zipf exponent of the synthetic ids.
    pub const MAX_ZIPF: f64 = 100.0;
    /// |signal| of the synthetic data.
    pub const MAX_SIGNAL: f32 = 1e6;
    /// Size of a config file (a config is a few kilobytes).
    pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
}

/// The text of a config file, read only up to [`limits::MAX_CONFIG_BYTES`].
pub fn read_config_file(path: &std::path::Path) -> Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    f.take(limits::MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limits::MAX_CONFIG_BYTES {
        return Err(Error::Config(format!("{}: larger than {} bytes: not a config", path.display(), limits::MAX_CONFIG_BYTES)));
    }
    String::from_utf8(bytes).map_err(|e| Error::Config(format!("{}: not UTF-8 ({e})", path.display())))
}

/// `Err(Config)` unless `lo <= v <= hi`, naming `what`.
fn in_range<T: PartialOrd + std::fmt::Display>(what: &str, v: T, lo: T, hi: T) -> Result<()> {
    if v >= lo && v <= hi {
        Ok(())
    } else {
        Err(Error::Config(format!("{what} = {v} is out of range: expected {lo} to {hi}")))
    }
}

/// `Err(Config)` unless `v` is finite and inside `lo..=hi` (`lo_open`: strictly above `lo`).
fn finite_in(what: &str, v: f64, lo: f64, lo_open: bool, hi: f64) -> Result<()> {
    let above = if lo_open { v > lo } else { v >= lo };
    if v.is_finite() && above && v <= hi {
        Ok(())
    } else {
        let low = if lo_open { format!("> {lo}") } else { format!(">= {lo}") };
        Err(Error::Config(format!("{what} = {v} is out of range: expected a finite number {low} and <= {hi}")))
    }
}

/// How the vectors of one bag are pooled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    Sum,
    Mean,
}

/// One embedding table; feature `f` of a batch looks up table `f`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(tag = "kind", rename_all = "lowercase", try_from = "InteractionRepr")]
pub enum Interaction {
    /// DLRM: the dense vector concatenated with all pairwise dot products (strict lower triangle).
    Dot,
    /// DCNv2 low-rank cross layers over the concatenation of all vectors.
    Dcn { layers: usize, rank: usize },
}

/// How an [`Interaction`] is read: every key named, so that a key the kind does not take (or a
/// misspelt one) is refused instead of ignored (serde ignores extra keys of a unit variant).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InteractionRepr {
    kind: String,
    layers: Option<usize>,
    rank: Option<usize>,
}

impl TryFrom<InteractionRepr> for Interaction {
    type Error = String;
    fn try_from(r: InteractionRepr) -> std::result::Result<Self, String> {
        match (r.kind.as_str(), r.layers, r.rank) {
            ("dot", None, None) => Ok(Interaction::Dot),
            ("dot", _, _) => Err("interaction kind \"dot\" takes no layers or rank".into()),
            ("dcn", Some(layers), Some(rank)) => Ok(Interaction::Dcn { layers, rank }),
            ("dcn", _, _) => Err("interaction kind \"dcn\" needs layers and rank".into()),
            (k, _, _) => Err(format!("unknown interaction kind \"{k}\": expected dot or dcn")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// Every count and size inside [`limits`], and the shapes consistent.
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        let bad = |m: String| Err(Error::Config(m));
        in_range("model.num_dense", self.num_dense, 1, MAX_NUM_DENSE)?;
        in_range("the number of model.tables", self.tables.len(), 1, MAX_TABLES)?;
        let d = self.dim();
        for (i, t) in self.tables.iter().enumerate() {
            in_range(&format!("model.tables[{i}].rows"), t.rows, 1, MAX_ROWS)?;
            in_range(&format!("model.tables[{i}].dim"), t.dim, 4, MAX_DIM)?;
            in_range(&format!("model.tables[{i}].bag_size"), t.bag_size, 0, MAX_BAG_SIZE)?;
            if t.dim != d {
                return bad(format!("model.tables[{i}].dim = {} but table 0 has dim {d}: DLRM interactions need one dim", t.dim));
            }
            if t.dim % 4 != 0 {
                return bad(format!("model.tables[{i}].dim = {} must be a positive multiple of 4", t.dim));
            }
        }
        for (name, mlp) in [("model.bottom_mlp", &self.bottom_mlp), ("model.top_mlp", &self.top_mlp)] {
            in_range(&format!("the number of {name} layers"), mlp.len(), 1, MAX_LAYERS)?;
            for (i, &w) in mlp.iter().enumerate() {
                in_range(&format!("{name}[{i}]"), w, 1, MAX_WIDTH)?;
            }
        }
        if self.bottom_mlp.last() != Some(&d) {
            return bad(format!("model.bottom_mlp must end in the table dim {d}, got {:?}", self.bottom_mlp));
        }
        if self.top_mlp.last() != Some(&1) {
            return bad(format!("model.top_mlp must end in 1 (the logit), got {:?}", self.top_mlp));
        }
        if let Interaction::Dcn { layers, rank } = self.interaction {
            in_range("model.interaction.layers", layers, 1, MAX_LAYERS)?;
            in_range("model.interaction.rank", rank, 1, MAX_WIDTH)?;
        }
        Ok(())
    }
}

/// Weight-decay mode for embedding and dense optimizers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", try_from = "WeightDecayRepr")]
pub enum WeightDecay {
    #[default]
    None,
    /// L2: adds `wd · w` to the gradient before the update.
    L2 { wd: f32 },
}

/// How a [`WeightDecay`] is read (see [`InteractionRepr`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightDecayRepr {
    kind: String,
    wd: Option<f32>,
}

impl TryFrom<WeightDecayRepr> for WeightDecay {
    type Error = String;
    fn try_from(r: WeightDecayRepr) -> std::result::Result<Self, String> {
        match (r.kind.as_str(), r.wd) {
            ("none", None) => Ok(WeightDecay::None),
            ("none", Some(_)) => Err("weight decay kind \"none\" takes no wd".into()),
            ("l2", Some(wd)) => Ok(WeightDecay::L2 { wd }),
            ("l2", None) => Err("weight decay kind \"l2\" needs wd".into()),
            (k, _) => Err(format!("unknown weight decay kind \"{k}\": expected none or l2")),
        }
    }
}

/// Embedding optimizer (fused into the backward pass). Formulas: BRIEF.md §3.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
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
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DenseOptimizer {
    Sgd { lr: f32 },
    Adagrad { lr: f32, eps: f32 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub embedding: EmbOptimizer,
    pub dense: DenseOptimizer,
    #[serde(default)]
    pub weight_decay: WeightDecay,
}

/// Synthetic data parameters (see `data::synthetic`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
    /// The whole config against [`limits`] (the model's shapes included); the error names the key.
    pub fn validate(&self) -> Result<()> {
        use limits::*;
        self.model.validate()?;
        in_range("batch_size", self.batch_size, 1, MAX_BATCH)?;
        if let Some(s) = self.steps {
            in_range("steps", s, 1, MAX_STEPS)?;
        }
        in_range("eval_every", self.eval_every, 0, MAX_STEPS)?;
        let lr = |what: &str, v: f32| finite_in(what, v as f64, 0.0, true, f32::MAX as f64);
        let eps = |what: &str, v: f32| finite_in(what, v as f64, 0.0, false, f32::MAX as f64);
        match self.optim.embedding {
            EmbOptimizer::Sgd { lr: l } => lr("optim.embedding.lr", l)?,
            EmbOptimizer::RowWiseAdagrad { lr: l, eps: e, c, .. } | EmbOptimizer::Adagrad { lr: l, eps: e, c, .. } => {
                lr("optim.embedding.lr", l)?;
                eps("optim.embedding.eps", e)?;
                if let Some(c) = c {
                    lr("optim.embedding.c", c)?;
                }
            }
        }
        match self.optim.dense {
            DenseOptimizer::Sgd { lr: l } => lr("optim.dense.lr", l)?,
            DenseOptimizer::Adagrad { lr: l, eps: e } => {
                lr("optim.dense.lr", l)?;
                eps("optim.dense.eps", e)?;
            }
        }
        if let WeightDecay::L2 { wd } = self.optim.weight_decay {
            eps("optim.weight_decay.wd", wd)?;
        }
        let syn = &self.synthetic;
        finite_in("synthetic.zipf", syn.zipf, 0.0, false, MAX_ZIPF)?;
        finite_in("synthetic.signal", syn.signal as f64, -(MAX_SIGNAL as f64), false, MAX_SIGNAL as f64)?;
        in_range("synthetic.eval_samples", syn.eval_samples, 1, MAX_EVAL_SAMPLES)?;
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
