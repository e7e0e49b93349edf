//! The step model: the time of each stage of a 2D step on the slowest rank, the bytes each rank
//! puts on each link class, the step time, samples/s and the peak memory per rank, for a model,
//! a machine, a grid M×N, a global batch B and a sync interval K.
//!
//! It prices the planner's own plan (`crate::plan::planner::plan` with the machine's memory as
//! the budget) with the planner's id statistics and byte counts (`PlanReport`), stage by stage:
//!
//! | stage | work | engine stage |
//! |---|---|---|
//! | input distribution | all-to-all of ids in the sharding group (N) | input_dist |
//! | lookup | pooled lookup of the rank's shards (`kernels::forward_bytes`) | lookup |
//! | output distribution | pooled vectors / partial sums back (N) | output_dist |
//! | dense forward and backward | MLP and cross GEMMs and the dot interaction (3 × forward FLOPs), the non-GEMM passes ([`dense_elementwise_bytes`]) | dense |
//! | dense all-reduce | the dense gradients over all T ranks | dense |
//! | embedding backward | gradients to the shards (N) and the fused update (`kernels::backward_bytes`) | backward |
//! | replica sync | rows touched since the last sync averaged over the replica group (M) in chunks of `SYNC_CHUNK` floats (in place in the replicas' shards where they are threads of one process: `Machine::in_place_sync`), every K steps | sync |
//! | dense update | the dense optimizer over the replicated parameters | dense |
//!
//! Assumptions (each stated in [`Prediction::assumptions`]): compute stages on a node with more
//! ranks than compute units slow by their ratio (the units are time-shared); the dense GEMMs
//! reach `gemm_flops`, the dot interaction `interaction_flops`, and the other dense work moves
//! its bytes at `stream_bw`; destinations of a collective are spread evenly over the group's
//! nodes; on a machine whose links work while the compute units compute (ranks ≤ units), the
//! input all-to-all overlaps the previous step's dense stage, the dense all-reduce overlaps the
//! embedding backward and the replica sync, when the engine runs it beside the dense update,
//! overlaps that; on a time-shared host every transfer is work for the same cores and nothing
//! overlaps, the sync included.
use super::kernels::{backward_bytes, forward_bytes};
use super::links::{all_reduce, all_to_all, sync_all_reduce, Cost};
use super::Machine;
use crate::config::{DenseOptimizer, Interaction, ModelConfig, TrainConfig};
use crate::grid::Placement;
use crate::plan::planner::{dense_params, group_ranks_per_node, plan, PlanOptions, PlanReport, TableStats};
use crate::plan::{Plan, ShardingType, SYNC_CHUNK};
use crate::{Error, Result};
use serde::Serialize;
use std::collections::BTreeMap;

/// Everything a prediction depends on besides the model and the machine.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Replicas M and ranks per sharding group N (T = M·N).
    pub m: usize,
    pub n: usize,
    /// Global batch B.
    pub batch_size: usize,
    /// Replica sync every K steps.
    pub sync_every: usize,
    pub full_sync: bool,
    pub placement: Placement,
    /// Per-table id statistics (None: the planner's default from the config).
    pub stats: Option<Vec<TableStats>>,
    /// Whether the replica sync runs beside the dense update on a thread of its own (the
    /// engine's `--overlap-sync`); None: as the engine's `auto` does, where every rank has a
    /// compute unit of its own (ranks per node ≤ compute units), not where they time-share.
    pub overlap_sync: Option<bool>,
}

impl Scenario {
    pub fn new(m: usize, n: usize, batch_size: usize, sync_every: usize) -> Scenario {
        Scenario { m, n, batch_size, sync_every, full_sync: false, placement: Placement::ReplicasInNode, stats: None, overlap_sync: None }
    }
}

/// One stage of the step.
#[derive(Clone, Debug, Serialize)]
pub struct StagePrediction {
    /// The model's name of the stage (`input_distribution`, `lookup`, ...).
    pub name: &'static str,
    /// The `ember train --json` stage its time counts toward.
    pub engine_stage: &'static str,
    /// Time it adds to the step (after the overlap), ms, on the slowest rank.
    pub ms: f64,
    /// Its time on the slowest rank before any overlap, ms.
    pub busy_ms: f64,
    /// Group rank (0..N) that is slowest in this stage.
    pub slowest_rank: usize,
    /// Bytes that rank hands to the stage's collectives (engine convention), per step.
    pub bytes: f64,
    /// Bytes it puts on links inside its node and between nodes, per step.
    pub intra_node_bytes: f64,
    pub inter_node_bytes: f64,
    /// What the stage is assumed to overlap with.
    pub overlap: &'static str,
}

/// The model's answer for one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct Prediction {
    pub machine: String,
    pub grid: String,
    pub m: usize,
    pub n: usize,
    pub world: usize,
    pub batch_size: usize,
    pub sync_every: usize,
    pub step_ms: f64,
    pub samples_per_s: f64,
    /// The planner's peak memory of the heaviest rank (an upper bound of the measured peak).
    pub peak_bytes_per_rank: u64,
    pub memory_per_rank: u64,
    pub fits: bool,
    /// Why it does not fit (the planner's message), when it does not.
    pub out_of_memory: Option<String>,
    /// max / mean over the ranks of the lookup work (ids × columns).
    pub imbalance: f64,
    /// Slowdown of compute stages by ranks sharing a compute unit (1: none).
    pub time_sharing: f64,
    /// Milliseconds per engine stage (the keys of `ember train --json`'s `stages`).
    pub stages: BTreeMap<&'static str, f64>,
    /// Every stage of the model.
    pub parts: Vec<StagePrediction>,
    pub tables_by_type: BTreeMap<String, usize>,
    pub assumptions: Vec<String>,
}

const F32: f64 = 4.0;

/// Forward FLOPs per sample of the dot interaction (0 for DCN, whose cross layers are GEMMs):
/// 2·d per pair of the F + 1 vectors, counted as (F + 1)² pairs.
pub fn interaction_forward_flops(model: &ModelConfig) -> f64 {
    match model.interaction {
        Interaction::Dot => {
            let vecs = (model.num_tables() + 1) as f64;
            2.0 * vecs * vecs * model.dim() as f64
        }
        Interaction::Dcn { .. } => 0.0,
    }
}

/// Forward FLOPs per sample of the dense network: MLP GEMMs, the interaction, the cross layers.
pub fn dense_forward_flops(model: &ModelConfig) -> f64 {
    let mlp = |input: usize, widths: &[usize]| {
        let mut fin = input as f64;
        let mut f = 0.0;
        for &w in widths {
            f += 2.0 * fin * w as f64;
            fin = w as f64;
        }
        f
    };
    let vecs = (model.num_tables() + 1) as f64;
    let d = model.dim() as f64;
    let inter = match model.interaction {
        Interaction::Dot => 2.0 * vecs * vecs * d,
        Interaction::Dcn { layers, rank } => layers as f64 * 2.0 * 2.0 * vecs * d * rank as f64,
    };
    mlp(model.num_dense, &model.bottom_mlp) + inter + mlp(model.interaction_width(), &model.top_mlp)
}

/// Bytes the dense network's non-GEMM work reads plus writes per sample (priced at
/// `memory.stream_bw`): per MLP layer of width w, the bias and activation in place (read and
/// write: 8w), the activation's gradient (read y and dy, write dy: 12w) and the bias gradient
/// (read dy: 4w); the bottom MLP's output copied into the interaction's input and its gradient
/// back out (16d); the dot interaction (read its (F+1)·d inputs, write d + F(F+1)/2 outputs) and
/// its backward (read the inputs and the outputs' gradients, write the inputs' gradients), or per
/// cross layer the combine (read three and write one (F+1)·d matrix), its backward (read three,
/// write two) and its bias gradient, plus the final sum of the two input gradients (read two,
/// write one); the loss (logit, label, gradient).
pub fn dense_elementwise_bytes(model: &ModelConfig) -> f64 {
    // 2 + 3 + 1 = 6 floats of w per layer.
    let layer = |w: usize| 6.0 * w as f64 * F32;
    let layers: f64 = model.bottom_mlp.iter().chain(&model.top_mlp).map(|&w| layer(w)).sum();
    let d = model.dim() as f64;
    let vecs = (model.num_tables() + 1) as f64;
    let copy = 4.0 * d * F32;
    let inter = match model.interaction {
        Interaction::Dot => {
            let out = model.interaction_width() as f64;
            (vecs * d + out) * F32 + (vecs * d + out + vecs * d) * F32
        }
        Interaction::Dcn { layers: l, .. } => {
            let w = vecs * d;
            l as f64 * (4.0 * w + 5.0 * w + w) * F32 + 3.0 * w * F32
        }
    };
    layers + copy + inter + 3.0 * F32
}

/// Predicts one step of `cfg`'s model on `machine` for `sc`.
pub fn predict(cfg: &TrainConfig, machine: &Machine, sc: &Scenario) -> Result<Prediction> {
    machine.validate().map_err(|e| Error::Config(format!("machine {}: {e}", machine.name)))?;
    let (m, n) = (sc.m, sc.n);
    let world = m.checked_mul(n).filter(|&t| t > 0).ok_or_else(|| Error::Config(format!("simulate: grid {m}x{n}: M and N must be >= 1")))?;
    if sc.batch_size < world {
        return Err(Error::Config(format!("simulate: global batch {} is smaller than the {world} ranks", sc.batch_size)));
    }
    let model = &cfg.model;
    let mut opts = PlanOptions { batch_size: sc.batch_size, ranks_per_node: machine.ranks_per_node, placement: sc.placement, sync_every: sc.sync_every, full_sync: sc.full_sync, stats: sc.stats.clone(), memory_budget_bytes: Some(machine.memory_per_rank), ..PlanOptions::from_config(cfg) };
    let (plan_, rep, oom) = match plan(model, m, n, &opts) {
        Ok((p, r)) => (p, r, None),
        Err(Error::Config(msg)) if msg.contains("does not fit the memory budget") => {
            opts.memory_budget_bytes = None;
            let (p, r) = plan(model, m, n, &opts)?;
            (p, r, Some(msg))
        }
        Err(e) => return Err(e),
    };
    let stats = sc.stats.clone().unwrap_or_else(|| crate::plan::planner::default_stats(model));
    Ok(price(cfg, machine, sc, &plan_, &rep, &stats, oom))
}

/// Per-rank kernel bytes of the lookup and the fused backward.
fn kernel_bytes(cfg: &TrainConfig, plan: &Plan, stats: &[TableStats], g: f64, rank: usize) -> (f64, f64) {
    let (mut fwd, mut bwd) = (0.0, 0.0);
    for tp in &plan.tables {
        let tc = &cfg.model.tables[tp.table];
        let st = &stats[tp.table];
        for s in tp.shards.iter().filter(|s| s.rank == rank) {
            let cols = s.cols.len();
            let (f, unique) = if tp.kind == ShardingType::ColumnWise {
                (1.0, st.distinct_rows(tc.rows, g))
            } else {
                (st.row_fraction(tc.rows, &s.rows), st.distinct_in(tc.rows, &s.rows, g))
            };
            let ids = st.lookups_per_sample * g * f;
            fwd += forward_bytes(ids, g, cols);
            bwd += backward_bytes(&cfg.optim.embedding, ids, g, unique, cols);
        }
    }
    (fwd, bwd)
}

fn price(cfg: &TrainConfig, mc: &Machine, sc: &Scenario, plan: &Plan, rep: &PlanReport, stats: &[TableStats], oom: Option<String>) -> Prediction {
    let (m, n) = (sc.m, sc.n);
    let world = m * n;
    let model = &cfg.model;
    let rpn = mc.ranks_per_node;
    let active = world.min(rpn) as f64;
    let ts = (active / mc.compute_units_per_node as f64).max(1.0);
    let overlapping = ts <= 1.0;
    let g = rep.samples_per_group;
    let b = rep.samples_per_rank;
    let l = group_ranks_per_node(m, n, rpn, sc.placement);
    let lrep = (rpn / l).clamp(1, m);
    let world_on_node = rpn.min(world);
    let gather = mc.memory.gather_bw;
    // Per rank: (lookup s, backward kernel s, input, output, grads, col-sq, sync costs).
    struct R {
        lookup: f64,
        bwd: f64,
        input: Cost,
        output: Cost,
        grads: Cost,
        sync: Cost,
        sync_pack: f64,
        bytes: [f64; 4],
    }
    let k = sc.sync_every.max(1) as f64;
    // Replicas that are threads of one process (the whole world on one node) with host-memory
    // shards average the rows in place: nothing travels; each rank reads its 1/M of the rows in
    // M replicas and writes them back, 2 bytes of random-row traffic per byte of its values.
    let in_place = mc.in_place_sync && world <= rpn;
    let per_rank: Vec<R> = rep
        .ranks
        .iter()
        .map(|r| {
            let (fb, bb) = kernel_bytes(cfg, plan, stats, g, r.rank);
            let tr = &r.traffic;
            let out_bytes = tr.output_a2a + tr.output_reduce_scatter + tr.output_trw_reduce + tr.output_trw_owners;
            let grad_bytes = tr.grad_a2a + tr.grad_trw_owners + tr.grad_trw_gather;
            // An all-gather of an own block X reaches every peer: an all-to-all of X per peer.
            let gathered = (tr.grad_all_gather + tr.grad_col_sq) * n as f64;
            let grads = all_to_all(mc, n, l, grad_bytes);
            let gat = all_to_all(mc, n, l, gathered);
            let sync_values = tr.sync_values * k;
            let sync_index = tr.sync_index * k * m as f64;
            let sv = if in_place {
                Cost::default()
            } else {
                // The engine averages the packed rows in chunks of at most SYNC_CHUNK floats,
                // one all-reduce each.
                let chunk = SYNC_CHUNK as f64 * F32;
                let full = (sync_values / chunk).floor();
                let (a, b) = (sync_all_reduce(mc, m, lrep, chunk), sync_all_reduce(mc, m, lrep, sync_values - full * chunk));
                Cost { seconds: full * a.seconds + b.seconds, intra_bytes: full * a.intra_bytes + b.intra_bytes, inter_bytes: full * a.inter_bytes + b.inter_bytes }
            };
            let si = all_to_all(mc, m, lrep, sync_index);
            R {
                lookup: fb / (gather * mc.compute.emb_forward_eff) * ts,
                bwd: bb / (gather * mc.compute.emb_backward_eff.of(&cfg.optim.embedding)) * ts,
                input: all_to_all(mc, n, l, tr.input_a2a),
                output: all_to_all(mc, n, l, out_bytes),
                grads: Cost { seconds: grads.seconds + gat.seconds, intra_bytes: grads.intra_bytes + gat.intra_bytes, inter_bytes: grads.inter_bytes + gat.inter_bytes },
                sync: Cost { seconds: (sv.seconds + si.seconds) / k, intra_bytes: (sv.intra_bytes + si.intra_bytes) / k, inter_bytes: (sv.inter_bytes + si.inter_bytes) / k },
                // Packing the touched rows (a gather: read and write each value) and writing the
                // averages back (the same): 4 bytes moved per byte of values; in place, 2.
                sync_pack: if m > 1 { (if in_place { 2.0 } else { 4.0 }) * sync_values / gather * ts / k } else { 0.0 },
                bytes: [tr.input_a2a, out_bytes, grad_bytes + tr.grad_all_gather + tr.grad_col_sq, tr.sync_index + tr.sync_values],
            }
        })
        .collect();
    let slowest = |f: &dyn Fn(&R) -> f64| -> (usize, f64) {
        per_rank.iter().enumerate().fold((0, 0.0), |acc, (i, r)| if f(r) > acc.1 { (i, f(r)) } else { acc })
    };
    let p4 = dense_params(model) as f64 * F32 + 8.0;
    let inter = interaction_forward_flops(model);
    let dense_gemm = 3.0 * b * ((dense_forward_flops(model) - inter) / mc.compute.gemm_flops + inter / mc.compute.interaction_flops.unwrap_or(mc.compute.gemm_flops));
    let dense_elem = b * dense_elementwise_bytes(model) / mc.memory.stream_bw;
    let dense_fb = (dense_gemm + dense_elem) * ts;
    let ar = all_reduce(mc, world, world_on_node, p4);
    let passes = match cfg.optim.dense {
        DenseOptimizer::Sgd { .. } => 3.0,
        _ => 5.0,
    };
    let dense_upd = passes * (p4 - 8.0) / mc.memory.stream_bw * ts;
    let mut parts = Vec::new();
    let mut push = |name, engine_stage, busy: f64, ms_exposed: f64, rank: usize, bytes: f64, c: Cost, overlap| {
        parts.push(StagePrediction { name, engine_stage, ms: ms_exposed * 1e3, busy_ms: busy * 1e3, slowest_rank: rank, bytes, intra_node_bytes: c.intra_bytes, inter_node_bytes: c.inter_bytes, overlap });
    };
    let (ri, t_in) = slowest(&|r| r.input.seconds);
    let t_in_exposed = if overlapping { (t_in - dense_fb).max(0.0) } else { t_in };
    push("input_distribution", "input_dist", t_in, t_in_exposed, ri, per_rank[ri].bytes[0], per_rank[ri].input, if overlapping { "the previous step's dense forward and backward" } else { "none (time-shared cores)" });
    let (rl, t_lk) = slowest(&|r| r.lookup);
    push("lookup", "lookup", t_lk, t_lk, rl, 0.0, Cost::default(), "none");
    let (ro, t_out) = slowest(&|r| r.output.seconds);
    push("output_distribution", "output_dist", t_out, t_out, ro, per_rank[ro].bytes[1], per_rank[ro].output, "none");
    push("dense_forward_backward", "dense", dense_fb, dense_fb, 0, 0.0, Cost::default(), "none");
    let (rb, t_bw) = slowest(&|r| r.grads.seconds + r.bwd);
    let t_ar_exposed = if overlapping { (ar.seconds - t_bw).max(0.0) } else { ar.seconds };
    push("dense_all_reduce", "dense", ar.seconds, t_ar_exposed, 0, p4, ar, if overlapping { "the embedding backward" } else { "none (time-shared cores)" });
    push("embedding_backward", "backward", t_bw, t_bw, rb, per_rank[rb].bytes[2], per_rank[rb].grads, "none");
    let (rs, t_sync) = slowest(&|r| r.sync.seconds + r.sync_pack);
    // Beside the dense update on its own thread, the sync hides behind it where the rank's
    // compute unit has room for both (ranks ≤ units); on time-shared cores both are work for the
    // same busy cores and add up, overlapped or not.
    let beside = sc.overlap_sync.unwrap_or(overlapping);
    let (t_sync_exposed, sync_overlap) = if beside && overlapping {
        ((t_sync - dense_upd).max(0.0), "the dense update (amortized over K steps)")
    } else if beside {
        (t_sync, "none: beside the dense update, but on time-shared cores (amortized over K steps)")
    } else {
        (t_sync, "none: after the dense update (amortized over K steps)")
    };
    push("replica_sync", "sync", t_sync, t_sync_exposed, rs, per_rank[rs].bytes[3], per_rank[rs].sync, sync_overlap);
    push("dense_update", "dense", dense_upd, dense_upd, 0, 0.0, Cost::default(), if beside && overlapping { "the replica sync" } else { "none" });
    let step = parts.iter().map(|p| p.ms).sum::<f64>() / 1e3 + mc.compute.step_overhead_s;
    let mut stages: BTreeMap<&'static str, f64> = ["input_dist", "lookup", "output_dist", "dense", "backward", "sync"].into_iter().map(|s| (s, 0.0)).collect();
    for p in &parts {
        *stages.get_mut(p.engine_stage).expect("known stage") += p.ms;
    }
    let fits = oom.is_none() && rep.max_rank_bytes <= mc.memory_per_rank;
    let out_of_memory = if fits {
        None
    } else {
        Some(oom.unwrap_or_else(|| format!("peak {} bytes per rank over the {} available", rep.max_rank_bytes, mc.memory_per_rank)))
    };
    let mut assumptions = vec![
        format!("compute stages slowed {ts:.2}x: {} active ranks per node on {} compute units", active, mc.compute_units_per_node),
        "dense forward and backward: 3 x forward FLOPs at compute.gemm_flops (the dot interaction's at compute.interaction_flops), plus the activations, biases, interaction and loss as bytes read and written at memory.stream_bw".into(),
        "collective destinations spread evenly over the group's nodes; measured curves where they hold the peer count, else alpha-beta".into(),
        format!(
            "replica sync every {} steps, amortized, {}; {}",
            sc.sync_every,
            if in_place {
                "its rows averaged in place in the replicas' shards (threads of one process: 2 bytes of random-row traffic per byte of values)".to_string()
            } else {
                format!("its values packed and all-reduced in chunks of {SYNC_CHUNK} floats")
            },
            if beside && overlapping { "beside the dense update (the longer counts)" } else { "added to the step (not overlapped, or on time-shared cores)" }
        ),
    ];
    if overlapping {
        assumptions.push("links work while compute runs: the input all-to-all hides behind the dense stage, the dense all-reduce behind the embedding backward".into());
    } else {
        assumptions.push("time-shared cores: transfers are CPU work and nothing overlaps; collective curves are measured with every rank of the node busy".into());
    }
    if mc.compute.step_overhead_s > 0.0 {
        assumptions.push(format!("fixed step overhead {:.3} ms", mc.compute.step_overhead_s * 1e3));
    }
    Prediction {
        machine: mc.name.clone(),
        grid: format!("{m}x{n}"),
        m,
        n,
        world,
        batch_size: sc.batch_size,
        sync_every: sc.sync_every,
        step_ms: step * 1e3,
        samples_per_s: sc.batch_size as f64 / step,
        peak_bytes_per_rank: rep.max_rank_bytes,
        memory_per_rank: mc.memory_per_rank,
        fits,
        out_of_memory,
        imbalance: rep.imbalance,
        time_sharing: ts,
        stages,
        parts,
        tables_by_type: rep.tables_by_type.clone(),
        assumptions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{preset, EmbOptimizer, TableConfig};

    fn machine(ranks: usize, units: usize, memory: u64) -> Machine {
        Machine::for_tests(ranks, units, memory)
    }

    fn bench() -> TrainConfig {
        preset("bench", Some(100_000)).unwrap()
    }

    fn part<'a>(p: &'a Prediction, name: &str) -> &'a StagePrediction {
        p.parts.iter().find(|s| s.name == name).unwrap()
    }

    #[test]
    fn one_rank_costs_its_kernels_and_gemms_by_hand() {
        let cfg = bench();
        let mc = machine(1, 1, 1 << 40);
        let p = predict(&cfg, &mc, &Scenario::new(1, 1, 4096, 1)).unwrap();
        // 8 tables x 4096 bags x 20 ids, 64 wide, all on the one rank.
        let (bags, ids) = (4096.0, 4096.0 * 20.0);
        let fwd = 8.0 * (ids + bags) * 64.0 * 4.0;
        assert!((part(&p, "lookup").ms - fwd / (1e10 * 0.5) * 1e3).abs() < 1e-9, "{p:#?}");
        // Uniform ids: expected distinct rows among 81,920 draws from 100,000.
        let u = 100_000.0 * (1.0 - (1.0f64 - 1.0 / 100_000.0).powf(ids));
        let bwd = 8.0 * (u * 2.0 * 65.0 * 4.0 + bags * 256.0 + ids * 8.0);
        assert!((part(&p, "embedding_backward").ms - bwd / (1e10 * 0.25) * 1e3).abs() < 1e-6, "{}", part(&p, "embedding_backward").ms);
        // Dense: bottom 13-512-256-64, dot interaction of 9 vectors, top 100-512-256-1.
        let flops = 2.0 * (13.0 * 512.0 + 512.0 * 256.0 + 256.0 * 64.0) + 2.0 * 81.0 * 64.0 + 2.0 * (100.0 * 512.0 + 512.0 * 256.0 + 256.0);
        // Non-GEMM bytes per sample: 24 B per MLP output (1,601 of them), the bottom output's
        // copies (4 x 64 floats), the dot interaction (9 x 64 inputs, 100 outputs: forward reads
        // and writes 676 floats, backward 1,252) and the loss (3 floats); at 20 GB/s.
        let elem = 24.0 * 1601.0 + 4.0 * 64.0 * 4.0 + (676.0 + 1252.0) * 4.0 + 12.0;
        let dense = 3.0 * 4096.0 * flops / 1e11 + 4096.0 * elem / 2e10;
        assert!((part(&p, "dense_forward_backward").ms - dense * 1e3).abs() < 1e-9, "{}", part(&p, "dense_forward_backward").ms);
        for s in ["input_distribution", "output_distribution", "dense_all_reduce", "replica_sync"] {
            assert_eq!(part(&p, s).ms, 0.0, "{s}");
        }
        let sum: f64 = p.parts.iter().map(|s| s.ms).sum();
        assert!((p.step_ms - sum).abs() < 1e-9 && (p.samples_per_s - 4096.0 / (sum / 1e3)).abs() < 1e-6);
        assert!(p.fits && p.out_of_memory.is_none());
        let stage_sum: f64 = p.stages.values().sum();
        assert!((stage_sum - p.step_ms).abs() < 1e-9);
    }

    #[test]
    fn ranks_beyond_the_compute_units_time_share_them() {
        let cfg = bench();
        let own = predict(&cfg, &machine(8, 8, 1 << 40), &Scenario::new(1, 8, 4096, 1)).unwrap();
        let shared = predict(&cfg, &machine(8, 2, 1 << 40), &Scenario::new(1, 8, 4096, 1)).unwrap();
        assert_eq!((own.time_sharing, shared.time_sharing), (1.0, 4.0));
        for s in ["lookup", "dense_forward_backward", "dense_update"] {
            let r = part(&shared, s).busy_ms / part(&own, s).busy_ms;
            assert!((r - 4.0).abs() < 1e-9, "{s}: {r}");
        }
        // Transfers are priced by the links alone; on the time-shared host nothing hides.
        assert_eq!(part(&shared, "input_distribution").busy_ms, part(&own, "input_distribution").busy_ms);
        assert_eq!(part(&shared, "input_distribution").ms, part(&shared, "input_distribution").busy_ms);
        assert!(part(&own, "input_distribution").ms < part(&own, "input_distribution").busy_ms);
    }

    #[test]
    fn full_sync_is_amortized_over_k_and_rides_with_the_dense_update() {
        let cfg = bench();
        let mc = machine(8, 8, 1 << 40);
        let sc = |k| Scenario { full_sync: true, ..Scenario::new(4, 2, 4096, k) };
        let (k1, k4) = (predict(&cfg, &mc, &sc(1)).unwrap(), predict(&cfg, &mc, &sc(4)).unwrap());
        let (s1, s4) = (part(&k1, "replica_sync"), part(&k4, "replica_sync"));
        assert!(s1.busy_ms > 0.0 && (s1.busy_ms / s4.busy_ms - 4.0).abs() < 1e-9, "{} {}", s1.busy_ms, s4.busy_ms);
        let upd = part(&k1, "dense_update").ms;
        assert!((s1.ms - (s1.busy_ms - upd).max(0.0)).abs() < 1e-12);
        // Whole shards: 100,000 rows x (64 + 1) floats per table, each rank 4 of 8 tables' halves.
        assert!(s1.bytes > 0.0);
        // Time-shared cores: the sync is work for the same busy cores, it adds to the step.
        let shared = predict(&cfg, &machine(8, 2, 1 << 40), &sc(1)).unwrap();
        let s = part(&shared, "replica_sync");
        assert!(s.busy_ms > 0.0 && s.ms == s.busy_ms, "{s:?}");
        // Not beside the dense update (--overlap-sync off): it adds on any machine.
        let off = predict(&cfg, &mc, &Scenario { overlap_sync: Some(false), ..sc(1) }).unwrap();
        assert_eq!(part(&off, "replica_sync").ms, part(&off, "replica_sync").busy_ms);
        assert!(off.step_ms > k1.step_ms);
        // One replica: no sync at all.
        assert_eq!(part(&predict(&cfg, &mc, &Scenario::new(1, 8, 4096, 1)).unwrap(), "replica_sync").busy_ms, 0.0);
    }

    #[test]
    fn in_process_replicas_average_in_place_at_two_bytes_of_gather_traffic_per_byte() {
        let cfg = bench();
        let sc = Scenario { full_sync: true, overlap_sync: Some(false), ..Scenario::new(4, 2, 4096, 1) };
        let packed = predict(&cfg, &machine(8, 8, 1 << 40), &sc).unwrap();
        let mc = Machine { in_place_sync: true, ..machine(8, 8, 1 << 40) };
        let p = predict(&cfg, &mc, &sc).unwrap();
        // Whole shards (no row lists): each rank reads its quarter of the values in 4 replicas
        // and writes them back, at the gather rate (10 GB/s); nothing on the links.
        let (s, sp) = (part(&p, "replica_sync"), part(&packed, "replica_sync"));
        assert!(s.bytes > 0.0 && s.bytes == sp.bytes);
        assert!((s.busy_ms - 2.0 * s.bytes / 1e10 * 1e3).abs() < 1e-9, "{s:?}");
        assert!(sp.busy_ms > 2.0 * s.busy_ms, "packed {sp:?} against in place {s:?}");
        assert!(p.assumptions.iter().any(|a| a.contains("in place")), "{:?}", p.assumptions);
        // Ranks beyond one node are processes: the packed sync, whatever the flag says.
        let sc16 = Scenario { full_sync: true, overlap_sync: Some(false), ..Scenario::new(4, 4, 4096, 1) };
        let (a, b) = (predict(&cfg, &mc, &sc16).unwrap(), predict(&cfg, &machine(8, 8, 1 << 40), &sc16).unwrap());
        assert_eq!(part(&a, "replica_sync").busy_ms, part(&b, "replica_sync").busy_ms);
    }

    #[test]
    fn out_of_memory_is_stated_not_hidden() {
        let cfg = bench();
        let p = predict(&cfg, &machine(8, 8, 64 << 20), &Scenario::new(8, 1, 4096, 1)).unwrap();
        assert!(!p.fits);
        assert!(p.peak_bytes_per_rank > 64 << 20);
        assert!(p.out_of_memory.as_deref().unwrap().contains("does not fit"), "{:?}", p.out_of_memory);
        assert!(predict(&cfg, &machine(8, 8, 1 << 40), &Scenario::new(8, 1, 4096, 1)).unwrap().fits);
    }

    #[test]
    fn the_slowest_rank_sets_each_stage() {
        // One hot table among cold ones, each table whole on its own rank: rank 0 is slowest.
        let mut cfg = bench();
        cfg.model.tables = (0..4).map(|t| TableConfig { rows: 1000, dim: 64, pooling: crate::config::Pooling::Sum, bag_size: if t == 0 { 64 } else { 1 } }).collect();
        cfg.optim.embedding = EmbOptimizer::Sgd { lr: 0.1 };
        let mc = machine(4, 4, 1 << 40);
        let sc = Scenario::new(1, 4, 4096, 1);
        let plan = Plan::cycling(&cfg.model, 4, &[ShardingType::TableWise]).unwrap();
        let opts = PlanOptions { batch_size: 4096, ranks_per_node: 4, ..PlanOptions::from_config(&cfg) };
        let rep = crate::plan::planner::predict(&cfg.model, 1, &plan, &opts).unwrap();
        let stats = crate::plan::planner::default_stats(&cfg.model);
        let p = price(&cfg, &mc, &sc, &plan, &rep, &stats, None);
        let lk = part(&p, "lookup");
        assert_eq!(lk.slowest_rank, 0);
        assert!((lk.ms - forward_bytes(64.0 * 4096.0, 4096.0, 64) / (1e10 * 0.5) * 1e3).abs() < 1e-9, "{lk:?}");
        assert_eq!(part(&p, "embedding_backward").slowest_rank, 0);
        // max/mean of lookups x dim: 64 / ((64 + 3) / 4).
        assert!((p.imbalance - 64.0 / (67.0 / 4.0)).abs() < 1e-9, "{}", p.imbalance);
    }

    #[test]
    fn groups_across_nodes_put_bytes_on_the_inter_node_link() {
        let cfg = bench();
        let mc = machine(2, 2, 1 << 40);
        let p = predict(&cfg, &mc, &Scenario::new(1, 8, 4096, 1)).unwrap();
        let s = part(&p, "input_distribution");
        // 2 of 8 group ranks per node: 6/8 of the bytes leave the node.
        assert!((s.inter_node_bytes / s.bytes - 0.75).abs() < 1e-9, "{s:?}");
        let one = predict(&cfg, &machine(8, 8, 1 << 40), &Scenario::new(1, 8, 4096, 1)).unwrap();
        assert_eq!(part(&one, "input_distribution").inter_node_bytes, 0.0);
    }
}
