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
    /// The fused backward's byte floor, [`embedding_floor_bytes`] at this step's U.
    pub floor_bytes: f64,
    /// The gather rate the floor is divided by (bytes read plus written per second, 1e9):
    /// `ember bench mem`'s 2-thread random gather of 256-byte rows, measured in the same run
    /// (set by [`EmbeddingResult::with_gather_rate`]; None until then).
    pub gather_gb_per_s: Option<f64>,
    /// `floor_bytes` at that rate, ms.
    pub floor_ms: Option<f64>,
    /// `backward_ms / floor_ms`.
    pub backward_over_floor: Option<f64>,
    pub config: EmbeddingBench,
    pub backend: String,
}

/// The fused backward's byte floor of one step: every unique row's weights read and written
/// and its row-wise AdaGrad state read and written (`U·(2·D·4 + 2·4)`), the output gradient
/// read once (`B·F·D·4`) and the ids with their bag numbers (`B·F·L·8`). `unique_rows` is U
/// summed over the `tables` (F) tables; `bag` is L.
pub fn embedding_floor_bytes(unique_rows: f64, batch: usize, tables: usize, dim: usize, bag: usize) -> f64 {
    let (b, f, d, l) = (batch as f64, tables as f64, dim as f64, bag as f64);
    unique_rows * (2.0 * d * 4.0 + 2.0 * 4.0) + b * f * d * 4.0 + b * f * l * 8.0
}

/// Milliseconds that `bytes` take at `gb_per_s` (1e9 bytes per second).
pub fn floor_ms(bytes: f64, gb_per_s: f64) -> f64 {
    bytes / (gb_per_s * 1e9) * 1e3
}

impl EmbeddingResult {
    /// Fill the floor's time and the backward's ratio to it from a gather rate (GB/s, bytes
    /// read plus written: [`host_gather_rate`] on the host).
    pub fn with_gather_rate(mut self, gb_per_s: f64) -> Self {
        let f = floor_ms(self.floor_bytes, gb_per_s);
        self.gather_gb_per_s = Some(gb_per_s);
        self.floor_ms = Some(f);
        self.backward_over_floor = Some(self.backward_ms / f);
        self
    }
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
        floor_bytes: embedding_floor_bytes(unique_rows, cfg.batch, cfg.tables, cfg.dim, cfg.bag),
        gather_gb_per_s: None,
        floor_ms: None,
        backward_over_floor: None,
        config: cfg.clone(),
        backend: be.name().into(),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct DlrmResult {
    pub samples_per_s: f64,
    pub ms_per_step: f64,
    /// Unique rows a step touches, all tables together (mean over the step's batches).
    pub unique_rows: f64,
    /// The embedding part of the floor: [`embedding_floor_bytes`] at this U.
    pub embedding_floor_bytes: f64,
    /// The dense network's GEMM FLOPs per step ([`dense_gemms`] at this batch).
    pub dense_flops: f64,
    /// The rates and the floor, set by [`DlrmResult::with_rates`] (None until then): the gather
    /// rate (GB/s, as `EmbeddingResult::gather_gb_per_s`), the GEMM rate (GFLOP/s, `ember bench
    /// gemm` at this batch), the floor (embedding bytes at the gather rate plus dense FLOPs at
    /// the GEMM rate, ms) and the step's ratio to it.
    pub gather_gb_per_s: Option<f64>,
    pub gemm_gflops: Option<f64>,
    pub floor_ms: Option<f64>,
    pub step_over_floor: Option<f64>,
    pub batch: usize,
    pub steps: usize,
    pub zipf: Option<f64>,
    pub backend: String,
}

impl DlrmResult {
    /// Fill the floor and the step's ratio to it from a gather rate (GB/s) and a GEMM rate (GFLOP/s).
    pub fn with_rates(mut self, gather_gb_per_s: f64, gemm_gflops: f64) -> Self {
        let f = dlrm_floor_ms(self.embedding_floor_bytes, gather_gb_per_s, self.dense_flops, gemm_gflops);
        self.gather_gb_per_s = Some(gather_gb_per_s);
        self.gemm_gflops = Some(gemm_gflops);
        self.floor_ms = Some(f);
        self.step_over_floor = Some(self.ms_per_step / f);
        self
    }
}

/// The DLRM step's floor, ms: the embedding floor's bytes at the gather rate plus the dense
/// network's GEMM FLOPs at the GEMM rate.
pub fn dlrm_floor_ms(embedding_bytes: f64, gather_gb_per_s: f64, dense_flops: f64, gemm_gflops: f64) -> f64 {
    floor_ms(embedding_bytes, gather_gb_per_s) + dense_flops / (gemm_gflops * 1e9) * 1e3
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
/// 13-512-256-64, dot interaction, top MLP 512-256-1, BCE). `between` runs after every timed
/// step, outside the timing (the floor's rates are sampled there, so that the steps and their
/// floor see the same state of a shared machine).
pub fn dlrm<B: Backend>(be: &B, batch: usize, steps: usize, warmup: usize, zipf: Option<f64>, seed: u64, between: &mut dyn FnMut() -> Result<()>) -> Result<DlrmResult> {
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
            between()?;
        }
    }
    let ms = median(&times);
    let unique_rows = batches.iter().map(|b| unique_ids(&b.sparse) as f64).sum::<f64>() / batches.len() as f64;
    let t0 = &cfg.model.tables[0];
    let embedding_floor_bytes = embedding_floor_bytes(unique_rows, batch, cfg.model.tables.len(), t0.dim, t0.bag_size);
    let dense_flops = dense_gemms(&cfg.model, batch).iter().map(GemmShape::flops).sum();
    Ok(DlrmResult {
        samples_per_s: batch as f64 / (ms * 1e-3),
        ms_per_step: ms,
        unique_rows,
        embedding_floor_bytes,
        dense_flops,
        gather_gb_per_s: None,
        gemm_gflops: None,
        floor_ms: None,
        step_over_floor: None,
        batch,
        steps,
        zipf,
        backend: be.name().into(),
    })
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
    let r = DlrmResult {
        samples_per_s: batch as f64 / (ms * 1e-3),
        ms_per_step: ms,
        unique_rows: f64::NAN,
        embedding_floor_bytes: f64::NAN,
        dense_flops: dense_gemms(&cfg.model, batch).iter().map(GemmShape::flops).sum(),
        gather_gb_per_s: None,
        gemm_gflops: None,
        floor_ms: None,
        step_over_floor: None,
        batch,
        steps,
        zipf,
        backend: format!("{name}, grid {m}x{n}"),
    };
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
        for threads in [1, threads_all] {
            let s = gather_secs(&table, row_bytes, threads, reps);
            let bytes = 2.0 * (((64usize << 20) / row_bytes) * row_bytes) as f64;
            rows.push(MemRow { op: "gather".into(), row_bytes, threads, gb_per_s: bytes / s / 1e9, ms: s * 1e3 });
        }
    }
    rows
}

/// Median seconds of `reps` random gathers of 64 MiB of `row_bytes`-byte rows from `table`
/// into a packed buffer, split over `threads` threads (ids uniform, seeded by the row size).
fn gather_secs(table: &[f32], row_bytes: usize, threads: usize, reps: usize) -> f64 {
    let cols = row_bytes / 4;
    let nrows = table.len() / cols;
    let gathers = (64usize << 20) / row_bytes; // 64 MiB gathered per rep
    let mut rng = Rng::new(row_bytes as u64);
    let idx: Vec<u32> = (0..gathers).map(|_| rng.below(nrows as u64) as u32).collect();
    // Written once before timing (pages faulted in), as a buffer reused between runs would be.
    let mut out = vec![1.0f32; gathers * cols];
    let mut t = Vec::new();
    for _ in 0..reps.max(1) {
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
    median(&t)
}

/// The host's random-gather rate of `ember bench mem` for one row size on all the pool's
/// threads: a `table_mib` MiB table, 64 MiB gathered per repetition, median of `reps`; bytes
/// read plus written per second, 1e9. The embedding floors' denominator (at 256-byte rows).
pub fn host_gather_rate(table_mib: usize, row_bytes: usize, reps: usize) -> f64 {
    GatherTable::new(table_mib).rate(row_bytes, reps)
}

/// The table [`host_gather_rate`] gathers from, made once so that a benchmark can sample the
/// rate many times (between its timed steps) without rebuilding it.
pub struct GatherTable(Vec<f32>);

impl GatherTable {
    /// A `table_mib` MiB table of distinct values.
    pub fn new(table_mib: usize) -> Self {
        GatherTable((0..table_mib << 18).map(|i| i as f32).collect())
    }

    /// [`host_gather_rate`] on this table: GB/s read plus written, median of `reps`.
    pub fn rate(&self, row_bytes: usize, reps: usize) -> f64 {
        let s = gather_secs(&self.0, row_bytes, rayon::current_num_threads(), reps);
        2.0 * (((64usize << 20) / row_bytes) * row_bytes) as f64 / s / 1e9
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The floors against hand-computed values: U = 10 rows of D = 4 (10·(2·16 + 8) = 400
    /// bytes), B = 2 bags × F = 3 tables of gradient rows (2·3·16 = 96) and of L = 5 ids with
    /// their bag numbers (2·3·5·8 = 240): 736 bytes; at 1.472e-3 GB/s, 0.5 ms.
    #[test]
    fn floors_match_hand_computed_values() {
        assert_eq!(embedding_floor_bytes(10.0, 2, 3, 4, 5), 736.0);
        assert!((floor_ms(736.0, 1.472e-3) - 0.5).abs() < 1e-12);
        // The bench workload: U = 629 000, B 4096, F 8, D 64, L 20:
        // 629000·520 + 4096·8·256 + 4096·8·160 = 327 080 000 + 8 388 608 + 5 242 880.
        assert_eq!(embedding_floor_bytes(629_000.0, 4096, 8, 64, 20), 340_711_488.0);
        // DLRM: 736 bytes at 1.472e-3 GB/s (0.5 ms) plus 3e6 FLOPs at 1.5 GFLOP/s (2 ms).
        assert!((dlrm_floor_ms(736.0, 1.472e-3, 3e6, 1.5) - 2.5).abs() < 1e-12);
        let mut r = DlrmResult {
            samples_per_s: 0.0,
            ms_per_step: 5.0,
            unique_rows: 10.0,
            embedding_floor_bytes: 736.0,
            dense_flops: 3e6,
            gather_gb_per_s: None,
            gemm_gflops: None,
            floor_ms: None,
            step_over_floor: None,
            batch: 2,
            steps: 1,
            zipf: None,
            backend: "cpu".into(),
        };
        r = r.with_rates(1.472e-3, 1.5);
        assert!((r.floor_ms.unwrap() - 2.5).abs() < 1e-12 && (r.step_over_floor.unwrap() - 2.0).abs() < 1e-12);
    }

    /// The dense network's FLOPs of the bench model at batch 4096, by hand: bottom 13-512-256-64
    /// (forward and weight gradient of every layer, input gradient of all but the first) and
    /// top (interaction width)-512-256-1.
    #[test]
    fn dense_flops_of_the_bench_model() {
        let model = preset("bench", None).unwrap().model;
        let b = 4096.0;
        let w = model.interaction_width() as f64;
        let fwd = 13.0 * 512.0 + 512.0 * 256.0 + 256.0 * 64.0 + w * 512.0 + 512.0 * 256.0 + 256.0;
        let input_grad = fwd - 13.0 * 512.0;
        let want = 2.0 * b * (2.0 * fwd + input_grad);
        let got: f64 = dense_gemms(&model, 4096).iter().map(GemmShape::flops).sum();
        assert_eq!(got, want);
    }
}
