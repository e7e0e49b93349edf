//! Byte sizes the planner prices a rank's buffers with: words and floats, a shard's weights and
//! optimizer state, the dense network's parameters and activations (as the engine allocates
//! them).
use crate::config::{EmbOptimizer, Interaction, ModelConfig};

/// Ids, bag lengths and counts travel as 8-byte words.
pub(super) const WORD: f64 = 8.0;
pub(super) const F32: f64 = 4.0;
/// The delayed state sync's values travel as f64.
pub(super) const F64: f64 = 8.0;

/// Bytes a replica sync moves per row of a shard of `cols` columns: its weights as f32, and its
/// optimizer state as f32, or as f64 with delayed state sync.
pub(super) fn sync_row_bytes(opt: &EmbOptimizer, cols: usize, delayed_state: bool) -> f64 {
    cols as f64 * F32 + state_floats(opt, cols) as f64 * if delayed_state { F64 } else { F32 }
}

pub(super) fn state_floats(opt: &EmbOptimizer, cols: usize) -> usize {
    opt.state_per_row(cols)
}

pub(super) fn shard_bytes(opt: &EmbOptimizer, rows: u64, cols: usize) -> f64 {
    rows as f64 * (cols + state_floats(opt, cols)) as f64 * F32
}

/// Dense parameter count (bottom MLP, cross layers, top MLP).
pub fn dense_params(model: &ModelConfig) -> u64 {
    let mlp = |input: usize, widths: &[usize]| {
        let mut fin = input as u64;
        let mut p = 0u64;
        for &w in widths {
            p += fin * w as u64 + w as u64;
            fin = w as u64;
        }
        p
    };
    let width = ((model.num_tables() + 1) * model.dim()) as u64;
    let cross = match model.interaction {
        Interaction::Dcn { layers, rank } => layers as u64 * (2 * rank as u64 * width + width),
        Interaction::Dot => 0,
    };
    mlp(model.num_dense, &model.bottom_mlp) + cross + mlp(model.interaction_width(), &model.top_mlp)
}

/// Floats per sample of the dense network's activation and gradient buffers (as
/// `crate::dense::DenseNet` allocates them), the labels included.
pub(super) fn dense_activation_floats(model: &ModelConfig) -> f64 {
    let width = (model.num_tables() + 1) * model.dim();
    let mlps = 2 * (model.bottom_mlp.iter().sum::<usize>() + model.top_mlp.iter().sum::<usize>());
    let inter = match model.interaction {
        // wide, dwide, z, dz.
        Interaction::Dot => 2 * width + 2 * model.interaction_width(),
        // wide, dwide, dz; per layer x, t, uv; dt, duv, dx0.
        Interaction::Dcn { layers, rank } => 3 * width + layers * (2 * width + rank) + rank + 2 * width,
    };
    (mlps + inter + 1) as f64
}
