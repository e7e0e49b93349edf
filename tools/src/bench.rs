//! `ember bench embedding|dlrm|mem`, and dispatch of `data` and of the transport benchmarks `a2a|allreduce|pingpong`.
use crate::common::{count, count64, zipf, CliResult, Device};
use clap::{Args, Subcommand};
use ember_engine::backend::{Backend, Cpu};
use ember_engine::bench::{self, EmbeddingBench};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Which,
}

#[derive(Args, Clone, Debug)]
pub struct DeviceArgs {
    /// Backend.
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Seed of the weights and the ids.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args, Clone, Debug)]
pub struct EmbArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Number of tables.
    #[arg(long, default_value_t = 8, value_parser = count::<1, { ember_engine::config::limits::MAX_TABLES }>)]
    pub tables: usize,
    /// Rows per table.
    #[arg(long, default_value_t = 1_000_000, value_parser = count64::<1, { ember_engine::config::limits::MAX_ROWS }>)]
    pub rows: u64,
    /// Embedding dim (columns per row).
    #[arg(long, default_value_t = 64, value_parser = count::<4, { ember_engine::config::limits::MAX_DIM }>)]
    pub dim: usize,
    /// Global batch size.
    #[arg(long, default_value_t = 4096, value_parser = count::<1, { ember_engine::config::limits::MAX_BATCH }>)]
    pub batch_size: usize,
    /// Ids per bag (the pooling factor L).
    #[arg(long, default_value_t = 20, value_parser = count::<0, { ember_engine::config::limits::MAX_BAG_SIZE }>)]
    pub bag_size: usize,
    /// Power-law ids with this Zipf exponent (1.05 when given without a value) [default: uniform ids].
    #[arg(long, num_args = 0..=1, default_missing_value = "1.05", value_parser = zipf)]
    pub zipf: Option<f64>,
    /// Timed steps (after warm-up).
    #[arg(long, default_value_t = 20, value_parser = count::<1, { ember_engine::config::limits::MAX_STEPS }>)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(short = 'w', long, default_value_t = 3, value_parser = count::<0, { ember_engine::config::limits::MAX_STEPS }>)]
    pub warmup: usize,
    /// The optimizer fused into the backward.
    #[arg(long, value_enum, default_value_t = EmbOpt::RowwiseAdagrad)]
    pub optimizer: EmbOpt,
    /// Size of the table the floor's gather rate is measured on, MiB (as `bench mem --table-mib`).
    #[arg(long, default_value_t = 1024, value_parser = crate::common::count::<1, { 1 << 20 }>)]
    pub floor_table_mib: usize,
}

/// `bench embedding --optimizer`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbOpt {
    Sgd,
    RowwiseAdagrad,
    Adagrad,
}

impl EmbOpt {
    fn optimizer(self) -> ember_engine::config::EmbOptimizer {
        use ember_engine::config::EmbOptimizer;
        match self {
            EmbOpt::Sgd => EmbOptimizer::Sgd { lr: 0.01 },
            EmbOpt::RowwiseAdagrad => bench::BENCH_ROWWISE_ADAGRAD,
            EmbOpt::Adagrad => EmbOptimizer::Adagrad { lr: 0.01, eps: 1e-8, c: None, eps_inside: false },
        }
    }
}

#[derive(Args, Clone, Debug)]
pub struct GemmArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Rows of every GEMM (the per-rank batch).
    #[arg(long, default_value_t = 512, value_parser = count::<1, { ember_engine::config::limits::MAX_BATCH }>)]
    pub batch_size: usize,
    /// Built-in model whose MLPs give the shapes.
    #[arg(long, default_value = "bench")]
    pub preset: String,
    /// Timed calls per GEMM (the median is printed).
    #[arg(short = 'n', long, default_value_t = 20, value_parser = count::<1, 1_000_000>)]
    pub iters: usize,
    /// Untimed warm-up calls per GEMM.
    #[arg(short = 'w', long, default_value_t = 3, value_parser = count::<0, 1_000_000>)]
    pub warmup: usize,
}

#[derive(Args, Clone, Debug)]
pub struct DlrmArgs {
    #[command(flatten)]
    pub dev: DeviceArgs,
    /// Global batch size.
    #[arg(long, default_value_t = 4096, value_parser = count::<1, { ember_engine::config::limits::MAX_BATCH }>)]
    pub batch_size: usize,
    /// Power-law ids with this Zipf exponent (1.05 when given without a value) [default: uniform ids].
    #[arg(long, num_args = 0..=1, default_missing_value = "1.05", value_parser = zipf)]
    pub zipf: Option<f64>,
    /// Timed steps (after warm-up).
    #[arg(long, default_value_t = 10, value_parser = count::<1, { ember_engine::config::limits::MAX_STEPS }>)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(short = 'w', long, default_value_t = 2, value_parser = count::<0, { ember_engine::config::limits::MAX_STEPS }>)]
    pub warmup: usize,
    /// Train on an MxN grid of in-process ranks (on cuda: all sharing device 0, each with its
    /// own stream and pool arena).
    #[arg(long)]
    pub grid: Option<String>,
    /// Size of the table the floor's gather rate is measured on, MiB (as `bench mem --table-mib`).
    #[arg(long, default_value_t = 1024, value_parser = crate::common::count::<1, { 1 << 20 }>)]
    pub floor_table_mib: usize,
}

#[derive(Subcommand)]
pub enum Which {
    /// Embedding forward + fused backward + row-wise AdaGrad (8 x 1M x 64, B 4096, L 20).
    #[command(after_help = "Example:\n  ember bench embedding --rows 100000 --steps 5")]
    Embedding(EmbArgs),
    /// Full DLRM training steps of the `bench` model.
    #[command(after_help = "Example:\n  ember bench dlrm --grid 2x2 --steps 5")]
    Dlrm(DlrmArgs),
    /// The dense network's GEMMs (forward, weight and input gradients of every MLP layer) on the backend's gemm.
    #[command(after_help = "Example:\n  ember bench gemm --batch-size 512")]
    Gemm(GemmArgs),
    /// Host (or device) memory bandwidth: sequential copy and random row gather.
    #[command(after_help = "Example:\n  ember bench mem --copy-mib 64 --table-mib 256")]
    Mem(crate::bench_mem::MemArgs),
    /// Data paths: text parse, conversion, binary mmap, .npy/.npz; one rank and per rank, warm and cold.
    #[command(after_help = "Example:\n  ember bench data --samples 1000000 --grid 2x2")]
    Data(crate::bench_data::DataArgs),
    /// All-to-all microbenchmark (nccl-tests columns).
    #[command(after_help = "Example:\n  ember bench a2a --ranks 4 -b 1K -e 1M")]
    A2a(crate::comm_bench::CommBenchArgs),
    /// All-reduce microbenchmark (nccl-tests columns).
    #[command(after_help = "Example:\n  ember launch -n 4 -- ember bench allreduce -b 1K -e 16M")]
    Allreduce(crate::comm_bench::CommBenchArgs),
    /// Ping-pong between ranks 0 and 1 (OSU's latency test: time = half the round trip;
    /// nccl-tests columns; -b 8 for the latency).
    #[command(after_help = "Example:\n  ember launch -n 2 -- ember bench pingpong -b 8 -e 16M")]
    Pingpong(crate::comm_bench::CommBenchArgs),
}

pub fn run(a: BenchArgs) -> CliResult {
    match a.which {
        Which::Embedding(x) => with_device(x.dev.device, |be| embedding(be, &x)),
        Which::Dlrm(x) if x.grid.is_some() => dlrm_2d(&x),
        Which::Dlrm(x) => with_device(x.dev.device, |be| dlrm(be, &x)),
        Which::Gemm(x) => with_device(x.dev.device, |be| gemm(be, &x)),
        Which::Mem(x) => crate::bench_mem::run(x),
        Which::Data(x) => crate::bench_data::run(x),
        Which::A2a(x) => collective("a2a", x),
        Which::Allreduce(x) => collective("allreduce", x),
        Which::Pingpong(x) => collective("pingpong", x),
    }
}

/// `ember bench a2a|allreduce|pingpong`: over a host transport, or (`--transport nccl`) NCCL's own
/// collectives on device buffers.
fn collective(which: &str, a: crate::comm_bench::CommBenchArgs) -> CliResult {
    if a.transport.eq_ignore_ascii_case("nccl") {
        #[cfg(feature = "nccl")]
        return crate::nccl_bench::run(which, &a);
        #[cfg(not(feature = "nccl"))]
        return Err(format!(
            "ember bench {which} --transport nccl: NCCL's collectives on device buffers: this needs the binary built with --features nccl \
             (cargo build --release -p ember-tools --features nccl; docs/cuda.md); the host transports are auto, local, shm, tcp, rdma"
        )
        .into());
    }
    crate::comm_bench::run(which, a)
}

/// Run `f` on the backend named by `device`.
pub fn with_device(device: Device, f: impl FnOnce(&dyn DynBench) -> CliResult) -> CliResult {
    match device {
        Device::Cpu => f(&Cpu::new()),
        Device::Cuda => cuda_backend(f),
        Device::Emulated => f(&ember_engine::backend::Emulated::new()),
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_f: impl FnOnce(&dyn DynBench) -> CliResult) -> CliResult {
    Err("--device cuda: this binary was built without the `cuda` feature (cargo build --release --features cuda)".into())
}

#[cfg(feature = "cuda")]
fn cuda_backend(f: impl FnOnce(&dyn DynBench) -> CliResult) -> CliResult {
    let be = ember_engine::backend::cuda::Cuda::new(0)?;
    f(&be)
}

/// The benchmarks, object-safe so one dispatch serves every backend.
pub trait DynBench {
    fn embedding(&self, cfg: &EmbeddingBench) -> ember_engine::Result<bench::EmbeddingResult>;
    fn dlrm(&self, batch: usize, steps: usize, warmup: usize, zipf: Option<f64>, seed: u64, between: &mut dyn FnMut() -> ember_engine::Result<()>) -> ember_engine::Result<bench::DlrmResult>;
    fn gemm(&self, model: &ember_engine::config::ModelConfig, batch: usize, reps: usize, warmup: usize, seed: u64) -> ember_engine::Result<bench::GemmResult>;
    fn gather(&self, table_mib: usize, row_bytes: usize, reps: usize) -> ember_engine::Result<f64>;
}

impl<B: Backend> DynBench for B {
    fn embedding(&self, cfg: &EmbeddingBench) -> ember_engine::Result<bench::EmbeddingResult> {
        bench::embedding(self, cfg)
    }
    fn dlrm(&self, batch: usize, steps: usize, warmup: usize, zipf: Option<f64>, seed: u64, between: &mut dyn FnMut() -> ember_engine::Result<()>) -> ember_engine::Result<bench::DlrmResult> {
        bench::dlrm(self, batch, steps, warmup, zipf, seed, between)
    }
    fn gemm(&self, model: &ember_engine::config::ModelConfig, batch: usize, reps: usize, warmup: usize, seed: u64) -> ember_engine::Result<bench::GemmResult> {
        bench::gemm(self, model, batch, reps, warmup, seed)
    }
    fn gather(&self, table_mib: usize, row_bytes: usize, reps: usize) -> ember_engine::Result<f64> {
        bench::backend_gather(self, table_mib, row_bytes, reps)
    }
}

/// The floors' gather rate, GB/s (bytes read plus written): `ember bench mem`'s random gather
/// of 256-byte rows from a `table_mib` MiB table (1 GiB by default) on all threads, median of 5
/// (on a device, its own `gather_rows`, as `bench mem --device cuda` prints).
fn floor_gather_rate(device: Device, be: &dyn DynBench, table_mib: usize) -> ember_engine::Result<f64> {
    match device {
        Device::Cpu | Device::Emulated => Ok(bench::host_gather_rate(table_mib, 256, 5)),
        Device::Cuda => Ok(be.gather(table_mib, 256, 5)? / 1e9),
    }
}

fn gemm(be: &dyn DynBench, a: &GemmArgs) -> CliResult {
    let model = ember_engine::config::preset(&a.preset, None)?.model;
    let r = be.gemm(&model, a.batch_size, a.iters, a.warmup, a.dev.seed)?;
    println!("# ember bench gemm: the {} model's MLP GEMMs at batch {}, backend {}; median of {} calls after {} warm-up; GFLOP/s = 2 m n k / time", a.preset, r.batch, r.backend, a.iters, a.warmup);
    println!("{:>10} {:>12} {:>7} {:>7} {:>7} {:>10} {:>10}", "layer", "pass", "m", "n", "k", "ms", "GFLOP/s");
    for x in &r.rows {
        let s = &x.shape;
        println!("{:>10} {:>12} {:>7} {:>7} {:>7} {:>10.4} {:>10.2}", s.layer, s.pass, s.m, s.n, s.k, x.ms, x.gflops);
    }
    println!("# all {} GEMMs of a training step: {:.3} ms, {:.2} GFLOP/s", r.rows.len(), r.total_ms, r.gflops);
    if a.dev.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

fn embedding(be: &dyn DynBench, a: &EmbArgs) -> CliResult {
    let cfg = EmbeddingBench {
        tables: a.tables,
        rows: a.rows,
        dim: a.dim,
        batch: a.batch_size,
        bag: a.bag_size,
        zipf: a.zipf,
        steps: a.steps,
        warmup: a.warmup,
        seed: a.dev.seed,
        optimizer: a.optimizer.optimizer(),
    };
    let r = be.embedding(&cfg)?;
    let r = r.with_gather_rate(floor_gather_rate(a.dev.device, be, a.floor_table_mib)?);
    let opt = clap::ValueEnum::to_possible_value(&a.optimizer).map(|v| v.get_name().to_string()).unwrap_or_default();
    println!("# ember bench embedding: {} tables x {} rows x dim {}, batch {}, {} ids/bag, {} ids, {opt}, backend {}",
        cfg.tables, cfg.rows, cfg.dim, cfg.batch, cfg.bag, if cfg.zipf.is_some() { "zipf" } else { "uniform" }, r.backend);
    println!("# median of {} steps after {} warm-up; GB/s = 2 x (B*sumD*4 + B*sumD*L*4) / time: outputs plus rows read, forward and backward (docs/cli.md)", cfg.steps, cfg.warmup);
    println!("# floor = (U*(2*D*4 + 2*4) + B*F*D*4 + B*F*L*8) / the 2-thread random gather of 256-byte rows (ember bench mem, this run: {:.2} GB/s)", r.gather_gb_per_s.unwrap_or(f64::NAN));
    println!("{:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>10}", "ms/step", "fwd ms", "bwd+opt ms", "steps/s", "GB/s", "U", "floor ms", "bwd/floor");
    println!(
        "{:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>10.2} {:>10.0} {:>10.2} {:>10.2}",
        r.ms_per_step,
        r.forward_ms,
        r.backward_ms,
        r.steps_per_s,
        r.gb_per_s,
        r.unique_rows,
        r.floor_ms.unwrap_or(f64::NAN),
        r.backward_over_floor.unwrap_or(f64::NAN)
    );
    println!("# unique rows U {:.0}; by the scale model's bytes (docs/machine.md): forward {:.1} MB at {:.2} GB/s, backward {:.1} MB at {:.2} GB/s",
        r.unique_rows, r.forward_bytes / 1e6, r.forward_bytes / (r.forward_ms * 1e-3) / 1e9, r.backward_bytes / 1e6, r.backward_bytes / (r.backward_ms * 1e-3) / 1e9);
    if a.dev.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}

/// `bench dlrm --grid MxN`: in-process ranks, one backend each.
fn dlrm_2d(a: &DlrmArgs) -> CliResult {
    let g = ember_engine::grid::Grid::parse(a.grid.as_deref().unwrap_or("1x1"), ember_engine::grid::Placement::ReplicasInNode)?;
    let (m, n) = (g.m, g.n);
    let (r, rep) = match a.dev.device {
        Device::Cpu => bench::dlrm_2d("cpu", &|_| Ok(Cpu::new()), m, n, a.batch_size, a.steps, a.warmup, a.zipf, a.dev.seed)?,
        Device::Cuda => cuda_dlrm_2d(a, m, n)?,
        Device::Emulated => bench::dlrm_2d("emulated", &|_| Ok(ember_engine::backend::Emulated::new()), m, n, a.batch_size, a.steps, a.warmup, a.zipf, a.dev.seed)?,
    };
    let st = &rep.stages;
    println!("# ember bench dlrm: bench model (8 x 1M x 64, L 20; bottom 13-512-256-64, dot, top 512-256-1), batch {}, backend {}", r.batch, r.backend);
    println!("# stages, ms/step averaged over all steps (rank 0): input_dist {:.2}  lookup {:.2}  output_dist {:.2}  dense {:.2}  backward {:.2}  sync {:.2}",
        st.input_dist, st.lookup, st.output_dist, st.dense, st.backward, st.sync);
    println!("{:>12} {:>14}", "ms/step", "samples/s");
    println!("{:>12.2} {:>14.0}", r.ms_per_step, r.samples_per_s);
    if a.dev.json {
        let mut v = serde_json::to_value(&r)?;
        v["stages"] = serde_json::to_value(st)?;
        // The emulated device's host<->device bytes (rank 0, per step; all steps, warm-up included).
        if let (Some(all), Some(sync)) = (rep.host_device_bytes_per_step, rep.sync_host_device_bytes_per_step) {
            v["host_device_bytes_per_step"] = serde_json::to_value(all)?;
            v["sync_host_device_bytes_per_step"] = serde_json::to_value(sync)?;
        }
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn cuda_dlrm_2d(a: &DlrmArgs, m: usize, n: usize) -> ember_engine::Result<(bench::DlrmResult, ember_engine::parallel::driver::Report2D)> {
    use ember_engine::backend::cuda::{Cuda, PoolConfig};
    bench::dlrm_2d("cuda", &|_| Cuda::for_rank(0, PoolConfig::default()), m, n, a.batch_size, a.steps, a.warmup, a.zipf, a.dev.seed)
}

#[cfg(not(feature = "cuda"))]
fn cuda_dlrm_2d(_: &DlrmArgs, _: usize, _: usize) -> Result<(bench::DlrmResult, ember_engine::parallel::driver::Report2D), Box<dyn std::error::Error>> {
    Err("--device cuda: this binary was built without the `cuda` feature (cargo build --release --features cuda)".into())
}

fn dlrm(be: &dyn DynBench, a: &DlrmArgs) -> CliResult {
    let model = ember_engine::config::preset("bench", None)?.model;
    // The floor's two rates are sampled after every timed step (a GEMM pass; on the host also
    // one 64 MiB gather), and their medians taken: on a shared machine both drift by tens of
    // per cent within seconds, and sampled this way the steps and their floor see the same drift.
    let host_table = matches!(a.dev.device, Device::Cpu | Device::Emulated).then(|| bench::GatherTable::new(a.floor_table_mib));
    let (mut gathers, mut gemms) = (Vec::new(), Vec::new());
    let r = be.dlrm(a.batch_size, a.steps, a.warmup, a.zipf, a.dev.seed, &mut || {
        gemms.push(be.gemm(&model, a.batch_size, 1, 1, a.dev.seed)?.gflops);
        if let Some(t) = &host_table {
            gathers.push(t.rate(256, 1));
        }
        Ok(())
    })?;
    let gather = match &host_table {
        Some(_) => bench::median(&gathers),
        None => floor_gather_rate(a.dev.device, be, a.floor_table_mib)?,
    };
    let gemm_rate = bench::median(&gemms);
    let r = r.with_rates(gather, gemm_rate);
    println!("# ember bench dlrm: bench model (8 x 1M x 64, L 20; bottom 13-512-256-64, dot, top 512-256-1), batch {}, backend {}", r.batch, r.backend);
    println!(
        "# floor = embedding floor (U {:.0}: {:.1} MB at the 2-thread 256-byte gather rate, {:.2} GB/s) + {:.2} GFLOP of MLP GEMMs at {:.1} GFLOP/s (ember bench gemm --batch-size {}); both rates medians of samples taken after each timed step",
        r.unique_rows,
        r.embedding_floor_bytes / 1e6,
        r.gather_gb_per_s.unwrap_or(f64::NAN),
        r.dense_flops / 1e9,
        gemm_rate,
        r.batch
    );
    println!("{:>12} {:>14} {:>10} {:>12}", "ms/step", "samples/s", "floor ms", "step/floor");
    println!("{:>12.2} {:>14.0} {:>10.2} {:>12.2}", r.ms_per_step, r.samples_per_s, r.floor_ms.unwrap_or(f64::NAN), r.step_over_floor.unwrap_or(f64::NAN));
    if a.dev.json {
        println!("{}", serde_json::to_string(&r)?);
    }
    Ok(())
}
