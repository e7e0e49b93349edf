//! Benchmarks behind `ember bench embedding|dlrm|mem|gemm`: workloads, timing (median of timed
//! steps after warm-up) and the byte accounting of BRIEF.md §5 and of the scale model
//! (`crate::simulate::machine`). Printing is the CLI's job.
use crate::backend::{Backend, EmbUpdate, Gemm, Layout, ShardSpec};
use crate::config::{preset, EmbOptimizer, ModelConfig, Pooling, WeightDecay};
use crate::data::{Batch, Jagged};
use crate::embedding::{new_shard, upload_bags};
use crate::model::Dlrm;
use crate::rng::{mix64, Rng};
use crate::Result;
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

/// The embedding workload: `tables` × `rows` × `dim`, global batch `batch`, `bag` ids per bag.
#[derive(Clone, Debug, Serialize)]
pub struct EmbeddingBench {
    pub tables: usize,
    pub rows: u64,
    pub dim: usize,
    pub batch: usize,
    pub bag: usize,
    /// Zipf exponent of id popularity (None: uniform).
    pub zipf: Option<f64>,
    pub steps: usize,
    pub warmup: usize,
    pub seed: u64,
    /// The optimizer fused into the backward.
    pub optimizer: EmbOptimizer,
}

/// Row-wise AdaGrad as the benchmarks run it.
pub const BENCH_ROWWISE_ADAGRAD: EmbOptimizer = EmbOptimizer::RowWiseAdagrad { lr: 0.01, eps: 1e-8, c: None, eps_inside: false };

impl Default for EmbeddingBench {
    fn default() -> Self {
        EmbeddingBench { tables: 8, rows: 1_000_000, dim: 64, batch: 4096, bag: 20, zipf: None, steps: 20, warmup: 3, seed: 1, optimizer: BENCH_ROWWISE_ADAGRAD }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct EmbeddingResult {
    pub ms_per_step: f64,
    pub steps_per_s: f64,
    /// Bytes by the formula of BRIEF.md §5 (outputs + rows read, ×2 for forward+backward) per second, 1e9.
    pub gb_per_s: f64,
    pub forward_ms: f64,
    pub backward_ms: f64,
    pub bytes_per_step: f64,
    /// Unique rows a step touches, all tables together (mean over the step's id sets).
    pub unique_rows: f64,
    /// The forward's and the fused backward's bytes by the scale model's convention
    /// ([`crate::simulate::kernels::forward_bytes`], [`crate::simulate::kernels::backward_bytes`]).
    pub forward_bytes: f64,
    pub backward_bytes: f64,
    pub config: EmbeddingBench,
    pub backend: String,
}

/// Median of a sample (sorted copy).
pub fn median(x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    let mut v = x.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Id sampler: uniform, or Zipf(s) by inverse CDF over ranks, ranks scattered over rows by a hash.
pub struct IdSampler {
    rows: u64,
    cdf: Option<Vec<f64>>,
    salt: u64,
}

impl IdSampler {
    pub fn new(rows: u64, zipf: Option<f64>, salt: u64) -> Self {
        let cdf = zipf.filter(|&s| s > 0.0).map(|s| {
            let n = rows.min(1 << 22) as usize;
            let mut c = Vec::with_capacity(n);
            let mut acc = 0.0;
            for k in 1..=n {
                acc += (k as f64).powf(-s);
                c.push(acc);
            }
            c.iter_mut().for_each(|x| *x /= acc);
            c
        });
        IdSampler { rows, cdf, salt }
    }
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        match &self.cdf {
            None => rng.below(self.rows),
            Some(c) => {
                let u = rng.f64();
                let rank = c.partition_point(|&p| p < u) as u64;
                mix64(rank ^ self.salt) % self.rows
            }
        }
    }
}

/// Fixed-length bags of sampled ids for `tables` features.
pub fn sample_jagged(samplers: &[IdSampler], batch: usize, bag: usize, rng: &mut Rng) -> Vec<Jagged> {
    samplers
        .iter()
        .map(|s| {
            let mut j = Jagged::with_capacity(batch, batch * bag);
            for _ in 0..batch {
                j.lengths.push(bag as u32);
                for _ in 0..bag {
                    j.values.push(s.sample(rng));
                }
            }
            j
        })
        .collect()
}

/// Distinct ids of one bag set (all tables together).
fn unique_ids(set: &[Jagged]) -> usize {
    set.iter()
        .map(|j| {
            let mut v = j.values.clone();
            v.sort_unstable();
            v.dedup();
            v.len()
        })
        .sum()
}

/// Forward + fused backward with `cfg.optimizer` over `cfg.tables` tables, timed per step.
pub fn embedding<B: Backend>(be: &B, cfg: &EmbeddingBench) -> Result<EmbeddingResult> {
    let upd = EmbUpdate::new(&cfg.optimizer, &WeightDecay::None, 1.0);
    let mut shards = (0..cfg.tables)
        .map(|t| new_shard(be, cfg.seed, ShardSpec::whole(t, cfg.rows, cfg.dim), &upd))
        .collect::<Result<Vec<_>>>()?;
    let samplers: Vec<IdSampler> = (0..cfg.tables).map(|t| IdSampler::new(cfg.rows, cfg.zipf, t as u64)).collect();
    let mut rng = Rng::new(cfg.seed);
    // A few id sets, rotated, so the ids are not all cached from the last step.
    let host_sets: Vec<Vec<Jagged>> = (0..4).map(|_| sample_jagged(&samplers, cfg.batch, cfg.bag, &mut rng)).collect();
    let unique_rows = host_sets.iter().map(|s| unique_ids(s) as f64).sum::<f64>() / host_sets.len() as f64;
    let sets: Vec<Vec<_>> = host_sets.iter().map(|set| set.iter().map(|j| upload_bags(be, j, Pooling::Sum)).collect::<Result<Vec<_>>>()).collect::<Result<_>>()?;
    let stride = cfg.tables * cfg.dim;
    let mut out = be.zeros(cfg.batch * stride)?;
    let grad_host: Vec<f32> = (0..cfg.batch * stride).map(|_| (rng.f32() - 0.5) * 1e-3).collect();
    let grad = be.upload(&grad_host)?;
    let (mut fwd, mut bwd, mut tot) = (Vec::new(), Vec::new(), Vec::new());
    for it in 0..cfg.warmup + cfg.steps {
        let bags = &sets[it % sets.len()];
        let t0 = Instant::now();
        for (t, (s, b)) in shards.iter().zip(bags).enumerate() {
            be.embedding_forward(s, b, &mut out, Layout { stride, col: t * cfg.dim }, false)?;
        }
        be.synchronize()?;
        let t1 = Instant::now();
        shards
            .par_iter_mut()
            .zip(bags)
            .enumerate()
            .try_for_each(|(t, (s, b))| be.embedding_backward_update(s, b, &grad, Layout { stride, col: t * cfg.dim }, &upd))?;
        be.synchronize()?;
        let t2 = Instant::now();
        if it >= cfg.warmup {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
            tot.push((t2 - t0).as_secs_f64() * 1e3);
        }
    }
    let sum_d = (cfg.tables * cfg.dim) as f64;
    let bytes = 2.0 * (cfg.batch as f64 * sum_d * 4.0 + cfg.batch as f64 * sum_d * cfg.bag as f64 * 4.0);
    let ms = median(&tot);
    let outputs = (cfg.batch * cfg.tables) as f64;
    let lookups = outputs * cfg.bag as f64;
    Ok(EmbeddingResult {
        ms_per_step: ms,
        steps_per_s: 1e3 / ms,
        gb_per_s: bytes / (ms * 1e-3) / 1e9,
        forward_ms: median(&fwd),
        backward_ms: median(&bwd),
        bytes_per_step: bytes,
        unique_rows,
        forward_bytes: crate::simulate::kernels::forward_bytes(lookups, outputs, cfg.dim),
        backward_bytes: crate::simulate::kernels::backward_bytes(&cfg.optimizer, lookups, outputs, unique_rows, cfg.dim),
        config: cfg.clone(),
        backend: be.name().into(),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct DlrmResult {
    pub samples_per_s: f64,
    pub ms_per_step: f64,
    pub batch: usize,
    pub steps: usize,
    pub zipf: Option<f64>,
    pub backend: String,
}

/// Four global batches of `batch` samples for the `bench` model: dense features, 25 % positive
/// labels, ids drawn uniformly or by Zipf popularity.
fn bench_batches(cfg: &crate::config::TrainConfig, batch: usize, zipf: Option<f64>, seed: u64) -> Vec<Batch> {
    let samplers: Vec<IdSampler> = cfg.model.tables.iter().enumerate().map(|(t, tc)| IdSampler::new(tc.rows, zipf, t as u64)).collect();
    let mut rng = Rng::new(seed);
    (0..4)
        .map(|_| Batch {
            num_dense: cfg.model.num_dense,
            dense: (0..batch * cfg.model.num_dense).map(|_| rng.f32() * 4.0).collect(),
            labels: (0..batch).map(|_| (rng.f32() < 0.25) as u8 as f32).collect(),
            sparse: sample_jagged(&samplers, batch, cfg.model.tables[0].bag_size, &mut rng),
        })
        .collect()
}

/// Full training steps of the `bench` preset model (the embedding workload + bottom MLP
/// 13-512-256-64, dot interaction, top MLP 512-256-1, BCE).
pub fn dlrm<B: Backend>(be: &B, batch: usize, steps: usize, warmup: usize, zipf: Option<f64>, seed: u64) -> Result<DlrmResult> {
    let mut cfg = preset("bench", None)?;
    cfg.batch_size = batch;
    cfg.seed = seed;
    let mut model = Dlrm::new(be, &cfg)?;
    let batches = bench_batches(&cfg, batch, zipf, seed);
    let mut times = Vec::new();
    for it in 0..warmup + steps {
        let t0 = Instant::now();
        model.train_step(be, &batches[it % batches.len()])?;
        be.synchronize()?;
        if it >= warmup {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let ms = median(&times);
    Ok(DlrmResult { samples_per_s: batch as f64 / (ms * 1e-3), ms_per_step: ms, batch, steps, zipf, backend: be.name().into() })
}

/// `dlrm` on a 2D grid of in-process ranks (one backend per rank from `new_be(world_rank)`):
/// the same model and global batches, planned by the planner for `m × n`. Returns the result
/// (median step of rank 0 after `warmup` steps) and the run's report (per-stage times).
#[allow(clippy::too_many_arguments)]
pub fn dlrm_2d<B: Backend>(
    name: &str,
    new_be: &(dyn Fn(usize) -> Result<B> + Sync),
    m: usize,
    n: usize,
    batch: usize,
    steps: usize,
    warmup: usize,
    zipf: Option<f64>,
    seed: u64,
) -> Result<(DlrmResult, crate::parallel::driver::Report2D)> {
    use crate::grid::{Grid, Placement};
    let mut cfg = preset("bench", None)?;
    cfg.batch_size = batch;
    cfg.seed = seed;
    let grid = Grid::new(m, n, Placement::ReplicasInNode)?;
    let (plan, _) = crate::plan::planner::plan(&cfg.model, m, n, &crate::plan::planner::PlanOptions::from_config(&cfg))?;
    let batches = bench_batches(&cfg, batch, zipf, seed);
    let feed = |step: usize, w: usize| Ok(batches[step % batches.len()].slice(grid.sample_range(w, batch)));
    let opts = crate::parallel::ParallelOptions::default();
    let total = warmup.max(1) + steps;
    let (rep, _, _) = crate::parallel::driver::Job::new(&cfg, grid, &plan, &opts, total).data(&feed, &batches[0]).train(new_be)?;
    let mut t = rep_steps(&rep, warmup.max(1));
    t.sort_by(f64::total_cmp);
    let ms = t.get(t.len() / 2).copied().unwrap_or(f64::NAN);
    let r = DlrmResult { samples_per_s: batch as f64 / (ms * 1e-3), ms_per_step: ms, batch, steps, zipf, backend: format!("{name}, grid {m}x{n}") };
    Ok((r, rep))
}

fn rep_steps(rep: &crate::parallel::driver::Report2D, skip: usize) -> Vec<f64> {
    rep.step_ms.iter().skip(skip).copied().collect()
}

/// Random gather of `row_bytes`-byte rows from a `table_mib` MiB table on the backend's own
/// `gather_rows` (64 MiB gathered per repetition, ids uniform): bytes read plus written per
/// second, median of `reps` after one warm-up. `bench mem --device cuda`'s gather; the host's
/// is [`host_mem`].
pub fn backend_gather<B: Backend>(be: &B, table_mib: usize, row_bytes: usize, reps: usize) -> Result<f64> {
    let cols = (row_bytes / 4).max(1);
    let table_len = table_mib.checked_mul(1 << 18).ok_or_else(|| crate::Error::Input(format!("gather: table of {table_mib} MiB")))?;
    let nrows = (table_len / cols).max(1);
    let gathers = ((64usize << 20) / (cols * 4)).max(1);
    let table = be.zeros(nrows * cols)?;
    let mut rng = Rng::new(row_bytes as u64);
    let ids = be.upload_ids(&(0..gathers).map(|_| rng.below(nrows as u64)).collect::<Vec<u64>>())?;
    let mut out = be.zeros(gathers * cols)?;
    let mut t = Vec::new();
    for it in 0..reps.max(1) + 1 {
        let t0 = Instant::now();
        be.gather_rows(&table, &ids, gathers, cols, &mut out, 0)?;
        be.synchronize()?;
        if it > 0 {
            t.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(2.0 * (gathers * cols * 4) as f64 / median(&t))
}

/// One row of `ember bench mem`.
#[derive(Clone, Debug, Serialize)]
pub struct MemRow {
    /// "copy" (sequential) or "gather" (random rows).
    pub op: String,
    /// Bytes per row gathered (the whole buffer for copy).
    pub row_bytes: usize,
    pub threads: usize,
    /// Bytes read plus bytes written per second, 1e9.
    pub gb_per_s: f64,
    pub ms: f64,
}

/// Host memory bandwidth: sequential copy of `copy_mib` MiB, and random gathers of
/// rows of 64..512 B from a `table_mib` MiB table, on 1 and all threads (median of `reps`).
pub fn host_mem(copy_mib: usize, table_mib: usize, reps: usize) -> Vec<MemRow> {
    let threads_all = rayon::current_num_threads();
    let mut rows = Vec::new();
    let n = copy_mib << 18; // f32 count
    let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut dst = vec![0.0f32; n];
    for threads in [1, threads_all] {
        let mut t = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            if threads == 1 {
                dst.copy_from_slice(&src);
            } else {
                let chunk = n.div_ceil(threads);
                dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
            }
            t.push(t0.elapsed().as_secs_f64());
        }
        std::hint::black_box(&dst);
        let s = median(&t);
        rows.push(MemRow { op: "copy".into(), row_bytes: n * 4, threads, gb_per_s: 2.0 * (n * 4) as f64 / s / 1e9, ms: s * 1e3 });
    }
    drop(dst);
    let table_len = table_mib << 18;
    let table: Vec<f32> = if table_len <= n { src[..table_len].to_vec() } else { (0..table_len).map(|i| i as f32).collect() };
    drop(src);
    for row_bytes in [64usize, 128, 256, 512] {
        let cols = row_bytes / 4;
        let nrows = table_len / cols;
        let gathers = (64usize << 20) / row_bytes; // 64 MiB gathered per rep
        let mut rng = Rng::new(row_bytes as u64);
        let idx: Vec<u32> = (0..gathers).map(|_| rng.below(nrows as u64) as u32).collect();
        let mut out = vec![0.0f32; gathers * cols];
        for threads in [1, threads_all] {
            let mut t = Vec::new();
            for _ in 0..reps {
                let t0 = Instant::now();
                let per = if threads == 1 { gathers } else { gathers.div_ceil(threads) };
                out.par_chunks_mut(per * cols).zip(idx.par_chunks(per)).for_each(|(o, ix)| {
                    for (k, &r) in ix.iter().enumerate() {
                        let r = r as usize * cols;
                        o[k * cols..(k + 1) * cols].copy_from_slice(&table[r..r + cols]);
                    }
                });
                t.push(t0.elapsed().as_secs_f64());
            }
            std::hint::black_box(&out);
            let s = median(&t);
            let bytes = 2.0 * (gathers * row_bytes) as f64;
            rows.push(MemRow { op: "gather".into(), row_bytes, threads, gb_per_s: bytes / s / 1e9, ms: s * 1e3 });
        }
    }
    rows
}

/// One GEMM of the dense network's training step.
#[derive(Clone, Debug, Serialize)]
pub struct GemmShape {
    /// `bottom.I` or `top.I` (layer I of that MLP).
    pub layer: String,
    /// `forward` (y = x·Wᵀ), `weight_grad` (dW = dyᵀ·x) or `input_grad` (dx = dy·W).
    pub pass: &'static str,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

impl GemmShape {
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

/// The GEMMs of one training step of `model`'s MLPs on `batch` rows, as `dense.rs` calls
/// them: per layer the forward, the weight gradient and (except the bottom MLP's first layer,
/// whose input needs no gradient) the input gradient. DCN cross layers are not included.
pub fn dense_gemms(model: &ModelConfig, batch: usize) -> Vec<GemmShape> {
    let mut out = Vec::new();
    for (mlp, fan_in0, sizes) in [("bottom", model.num_dense, &model.bottom_mlp), ("top", model.interaction_width(), &model.top_mlp)] {
        let mut fan_in = fan_in0;
        for (i, &fan_out) in sizes.iter().enumerate() {
            let layer = format!("{mlp}.{i}");
            let g = |pass, m, n, k, trans_a, trans_b| GemmShape { layer: layer.clone(), pass, m, n, k, trans_a, trans_b };
            out.push(g("forward", batch, fan_out, fan_in, false, true));
            out.push(g("weight_grad", fan_out, fan_in, batch, true, false));
            if !(mlp == "bottom" && i == 0) {
                out.push(g("input_grad", batch, fan_in, fan_out, false, false));
            }
            fan_in = fan_out;
        }
    }
    out
}

/// One timed GEMM of `ember bench gemm`.
#[derive(Clone, Debug, Serialize)]
pub struct GemmRow {
    pub shape: GemmShape,
    /// Median time of one call, ms.
    pub ms: f64,
    pub gflops: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct GemmResult {
    pub rows: Vec<GemmRow>,
    pub batch: usize,
    /// The step's GEMM FLOPs over the sum of the median times, 1e9/s.
    pub gflops: f64,
    /// Sum of the median times, ms.
    pub total_ms: f64,
    pub backend: String,
}

/// Time every GEMM of [`dense_gemms`] on the backend's own `gemm` (median of `reps` after
/// `warmup`), on random operands.
pub fn gemm<B: Backend>(be: &B, model: &ModelConfig, batch: usize, reps: usize, warmup: usize, seed: u64) -> Result<GemmResult> {
    let mut rng = Rng::new(seed);
    let mut rows = Vec::new();
    for shape in dense_gemms(model, batch) {
        let mut rand = |n: usize| be.upload(&(0..n).map(|_| rng.f32() - 0.5).collect::<Vec<f32>>());
        let (a, b) = (rand(shape.m * shape.k)?, rand(shape.k * shape.n)?);
        let mut c = be.zeros(shape.m * shape.n)?;
        let g = Gemm { m: shape.m, n: shape.n, k: shape.k, trans_a: shape.trans_a, trans_b: shape.trans_b, alpha: 1.0, beta: 0.0 };
        let mut t = Vec::new();
        for it in 0..warmup + reps.max(1) {
            let t0 = Instant::now();
            be.gemm(g, &a, &b, &mut c)?;
            be.synchronize()?;
            if it >= warmup {
                t.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let ms = median(&t);
        rows.push(GemmRow { gflops: shape.flops() / (ms * 1e-3) / 1e9, shape, ms });
    }
    let total_ms: f64 = rows.iter().map(|r| r.ms).sum();
    let flops: f64 = rows.iter().map(|r| r.shape.flops()).sum();
    Ok(GemmResult { gflops: flops / (total_ms * 1e-3) / 1e9, rows, batch, total_ms, backend: be.name().into() })
}
