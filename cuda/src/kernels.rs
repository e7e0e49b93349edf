//! Kernel sources, embedded at build time and compiled at run time by NVRTC.

/// One CUDA C source file and the kernels it defines.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    pub name: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

pub const EMBEDDING: Module = Module {
    name: "embedding.cu",
    source: include_str!("../kernels/embedding.cu"),
    kernels: &[
        "emb_fwd_v4",
        "emb_fwd_scalar",
        "emb_bag_of",
        "emb_keys",
        "radix_hist",
        "radix_scatter",
        "scan_blocks",
        "scan_add",
        "rle_flags",
        "rle_compact",
        "emb_bwd_short",
        "emb_bwd_long_accum",
        "emb_bwd_long_apply",
        "emb_apply_rowgrads",
        "widen_u32",
        "check_rows_ascending",
        "emb_keys_bags",
        "emb_bwd_fused1",
        "emb_bwd_fused4",
        "emb_bwd_long_accum2",
        "emb_bwd_long_apply2",
        "emb_bwd_long_accum_v4_1",
        "emb_bwd_long_accum_v4_4",
    ],
};

pub const DENSE: Module = Module {
    name: "dense.cu",
    source: include_str!("../kernels/dense.cu"),
    kernels: &[
        "fill_f32",
        "axpy_f32",
        "scale_f32",
        "bias_act",
        "act_backward",
        "col_sum",
        "copy_block",
        "copy_2d",
        "scale_rows",
        "dot_interaction",
        "dot_interaction_backward",
        "cross_combine",
        "cross_combine_backward",
        "bce_with_logits",
        "dense_update",
        "gather_rows",
        "put_rows",
        "mean_f64_parts",
    ],
};

/// Every module, in load order.
pub const MODULES: &[Module] = &[EMBEDDING, DENSE];

/// Kernel-side constants the host must agree with.
pub const SHORT_RUN: usize = 32;
pub const CHUNK: usize = 1024;
/// Columns a backward kernel supports per shard (16 per lane of a warp).
pub const MAX_BWD_COLS: usize = 512;
pub const RADIX_TILE: usize = 1024;
pub const SCAN_BLOCK: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn every_listed_kernel_is_defined() {
        for m in MODULES {
            for k in m.kernels {
                let pat = format!(" {k}(");
                assert!(m.source.contains(&pat), "{}: kernel {k} not found", m.name);
            }
        }
    }
}
