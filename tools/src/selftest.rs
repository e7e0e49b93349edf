//! `ember selftest`: checks a backend against the CPU reference. Owned by the CUDA work.
//!
//! `--device cuda` runs every GPU check from this binary alone: each operation and optimizer on
//! random shapes, the fused backward on short/long/very long runs, column-shard updates, several
//! DLRM training steps, the pool statistics (including zero driver allocations when the same
//! work is repeated), a round trip through pinned staging memory (its block reused), and 2D
//! training of 4 in-process ranks sharing the GPU on grids 1x4, 2x2 and 4x1 against the CPU
//! backend (`engine::selftest_2d`). `--bench` adds the embedding kernels' bandwidth at B=65536, L=20,
//! D=64/128, uniform and Zipf ids, and the device copy bandwidth; `--markdown FILE` writes the
//! tables.
use crate::common::{CliResult, Device};
#[allow(unused_imports)] // Backend is used only with the `cuda` feature
use ember_engine::backend::{Backend, Buffers, Numerics, Cpu, Emulated};
use ember_engine::parallel::XferKind;
use ember_engine::selftest_2d::selftest_2d;
use std::fmt::Write as _;

#[derive(clap::Args, Clone, Debug)]
pub struct SelftestArgs {
    /// Backend to check against the CPU reference (cpu checks the reference against itself and
    /// its 2D peer-to-peer path).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Seed of the random shapes and values.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also time the embedding kernels and the device copy bandwidth (cuda only).
    #[arg(long)]
    pub bench: bool,
    /// Batch size of the --bench kernels.
    #[arg(long, default_value_t = 65536, value_parser = crate::common::count::<1, { ember_engine::config::limits::MAX_BATCH }>)]
    pub batch_size: usize,
    /// Ids per bag (the pooling factor L) of the --bench kernels.
    #[arg(long, default_value_t = 20, value_parser = crate::common::count::<1, { ember_engine::config::limits::MAX_BAG_SIZE }>)]
    pub bag_size: usize,
    /// Table rows of the --bench kernels.
    #[arg(long, default_value_t = 4_000_000, value_parser = crate::common::count::<1, { ember_engine::config::limits::MAX_ROWS as usize }>)]
    pub rows: usize,
    /// Write the results as markdown to this file.
    #[arg(long)]
    pub markdown: Option<std::path::PathBuf>,
}

pub fn run(a: SelftestArgs) -> CliResult {
    let mut md = String::new();
    let ok = match a.device {
        Device::Cpu => {
            let rep = ember_engine::selftest::selftest_seeded(&Cpu::new(), a.seed)?;
            println!("{rep}");
            let _ = writeln!(md, "{rep}");
            // 2D on the CPU: peer-to-peer buffer copies between in-process ranks against the
            // host transport, grids 1x4, 2x2, 4x1.
            let (rep2, _) = selftest_2d("cpu (peers)", &|_| Ok(Cpu::new()), XferKind::Peers)?;
            println!("{rep2}");
            let _ = writeln!(md, "{rep2}");
            rep.passed() && rep2.passed()
        }
        Device::Cuda => cuda(&a, &mut md)?,
        Device::Emulated => {
            let rep = ember_engine::selftest::selftest_seeded(&Emulated::new(), a.seed)?;
            println!("{rep}");
            let _ = writeln!(md, "{rep}");
            // 2D on the emulated device: the device code paths (peer-to-peer copies between
            // in-process ranks, and staging through host memory) against the CPU backend.
            let mut ok = rep.passed();
            for (name, xfer) in [("emulated 2D (peers)", XferKind::Auto), ("emulated 2D (staged)", XferKind::Staged)] {
                let (rep2, _) = selftest_2d(name, &|_| Ok(Emulated::new()), xfer)?;
                println!("{rep2}");
                let _ = writeln!(md, "{rep2}");
                ok &= rep2.passed();
            }
            ok
        }
    };
    if let Some(p) = &a.markdown {
        std::fs::write(p, &md).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    if ok {
        Ok(())
    } else {
        Err("selftest failed (see the table above)".into())
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda(_a: &SelftestArgs, _md: &mut String) -> Result<bool, Box<dyn std::error::Error>> {
    Err("--device cuda: this binary was built without the `cuda` feature (cargo build --release -p ember-tools --features cuda)".into())
}

#[cfg(feature = "cuda")]
fn cuda(a: &SelftestArgs, md: &mut String) -> Result<bool, Box<dyn std::error::Error>> {
    use ember_engine::backend::cuda::Cuda;
    let t0 = std::time::Instant::now();
    let be = Cuda::new(0)?;
    println!("device: {} (opened and kernels compiled in {:.2} s)", be.device_name(), t0.elapsed().as_secs_f64());
    let _ = writeln!(md, "Device: {}\n", be.device_name());
    let rep = ember_engine::selftest::selftest_seeded(&be, a.seed)?;
    println!("{rep}");
    let _ = writeln!(md, "{rep}\n");
    let mut ok = rep.passed();
    // Pool: repeat the same work; a steady state makes no driver allocation.
    let before = be.driver_allocs();
    be.reset_peak();
    let rep2 = ember_engine::selftest::selftest_seeded(&be, a.seed)?;
    let after = be.driver_allocs();
    let s = be.pool_stats();
    let steady = after == before;
    ok &= rep2.passed() && steady;
    let pool = format!(
        "| pool statistic | value |\n|---|---|\n| reserved | {:.1} MiB |\n| allocated now | {:.1} MiB |\n| peak (repeat run) | {:.1} MiB |\n| largest free block | {:.1} MiB |\n| fragmentation now | {:.3} |\n| fragmentation at peak | {:.3} |\n| driver allocations (total) | {} |\n| driver allocations during the repeat run | {} ({}) |\n| arena size | {:.1} MiB |\n| arena overflows | {} |\n| retries / failed | {} / {} |\n",
        mib(s.reserved),
        mib(s.allocated),
        mib(s.peak),
        mib(s.largest_free),
        s.fragmentation,
        s.fragmentation_at_peak,
        after,
        after - before,
        if steady { "ok" } else { "FAIL: expected 0" },
        mib(s.arena_size),
        s.arena_overflows,
        s.retries,
        s.failed
    );
    println!("{pool}");
    let _ = writeln!(md, "{pool}");
    // Staging through pinned memory: a round trip, and the same size class reuses its block.
    let data: Vec<f32> = (0..300_000).map(|i| i as f32 - 1e5).collect();
    let (mut st, mut buf) = (be.staging(data.len())?, be.zeros(data.len())?);
    st.copy_from_slice(&data);
    be.upload_into(&st, &mut buf)?;
    drop(st);
    let pins = be.pinned_stats().driver_allocs;
    let mut st = be.staging(data.len())?;
    be.download_into(&buf, &mut st)?;
    let staged = st[..] == data[..] && be.pinned_stats().driver_allocs == pins;
    ok &= staged;
    let line = format!("pinned staging round trip, block reused: {}\n", if staged { "ok" } else { "FAIL" });
    println!("{line}");
    let _ = writeln!(md, "{line}");
    // 2D: T = 4 in-process ranks sharing this GPU (own streams and pool arenas), grids 1x4,
    // 2x2 and 4x1, against the CPU backend on the same grid and data.
    use ember_engine::backend::cuda::PoolConfig;
    let t0 = std::time::Instant::now();
    let (rep2, runs) = selftest_2d("cuda 2D, 4 ranks on one GPU", &|_| Cuda::for_rank(0, PoolConfig::default()), XferKind::Auto)?;
    println!("{rep2}");
    let table = ember_engine::selftest_2d::timing_table(&runs);
    println!("2D runs on the GPU (row-wise AdaGrad, 50 steps, tiny model; {:.1} s for all 2D checks):\n{table}", t0.elapsed().as_secs_f64());
    let _ = writeln!(md, "{rep2}\n\n{table}");
    ok &= rep2.passed();
    if a.bench {
        bench(&be, a, md)?;
    }
    println!("selftest --device cuda: {}", if ok { "PASSED" } else { "FAILED" });
    Ok(ok)
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn mib(b: usize) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Zipf(s) ids over `rows` (rank r with probability ∝ 1/(r+1)^s), ranks scattered over the table.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn zipf_ids(n: usize, rows: usize, s: f64, seed: u64) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(rows);
    let mut acc = 0f64;
    for r in 0..rows {
        acc += 1.0 / ((r + 1) as f64).powf(s);
        cdf.push(acc);
    }
    let mut rng = ember_engine::rng::Rng::new(seed);
    (0..n)
        .map(|_| {
            let u = rng.f64() * acc;
            let rank = cdf.partition_point(|&c| c < u).min(rows - 1) as u64;
            ember_engine::rng::mix64(rank ^ 0x9e37_79b9_7f4a_7c15) % rows as u64
        })
        .collect()
}

#[cfg(feature = "cuda")]
fn bench(be: &ember_engine::backend::cuda::Cuda, a: &SelftestArgs, md: &mut String) -> Result<(), Box<dyn std::error::Error>> {
    use ember_engine::backend::{Bags, EmbKind, EmbUpdate, Layout, ShardSpec};
    let copy = be.copy_bandwidth(1 << 30, 20)?;
    let line = format!("Device-to-device copy (1 GiB, bytes read + written): {:.0} GB/s\n", copy / 1e9);
    println!("{line}");
    let _ = writeln!(md, "{line}");
    let mut table = String::from("| D | ids | forward ms | forward GB/s | % of copy | fused bwd + row-wise AdaGrad ms | bwd GB/s | % of copy | % of copy, bytes moved | of which keys + sort ms | general-path bwd ms | unique rows |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    let (b, l, rows) = (a.batch_size, a.bag_size, a.rows);
    for d in [64usize, 128] {
        let upd = EmbUpdate { kind: EmbKind::RowWiseAdagrad, lr: 0.01, eps: 1e-8, c: 1.0, eps_inside: false, l2: 0.0 };
        let spec = ShardSpec::whole(0, rows as u64, d);
        let init: Vec<f32> = (0..rows * d).map(|i| ember_engine::rng::unit_f32(ember_engine::rng::mix64(i as u64)) - 0.5).collect();
        let mut shard = be.shard(spec, &init, &upd)?;
        drop(init);
        for (dist, zipf) in [("uniform", None), ("zipf 1.05", Some(1.05))] {
            let n = b * l;
            let ids: Vec<u64> = match zipf {
                None => {
                    let mut r = ember_engine::rng::Rng::new(7);
                    (0..n).map(|_| r.below(rows as u64)).collect()
                }
                Some(s) => zipf_ids(n, rows, s, 7),
            };
            let mut uniq = ids.clone();
            uniq.sort_unstable();
            uniq.dedup();
            let offsets: Vec<u64> = (0..=b as u64).map(|i| i * l as u64).collect();
            let bags = Bags { num_bags: b, offsets: be.upload_ids(&offsets)?, ids: be.upload_ids(&ids)?, scale: None };
            let mut out = be.zeros(b * d)?;
            let grad: Vec<f32> = (0..b * d).map(|i| (ember_engine::rng::unit_f32(ember_engine::rng::mix64(i as u64 + 99)) - 0.5) * 1e-3).collect();
            let grad = be.upload(&grad)?;
            let lay = Layout { stride: d, col: 0 };
            let bytes = (b * d * 4 + b * d * l * 4) as f64;
            // warm up
            for _ in 0..3 {
                be.embedding_forward(&shard, &bags, &mut out, lay, false)?;
                be.embedding_backward_update(&mut shard, &bags, &grad, lay, &upd)?;
            }
            let fwd = be.gpu().time_ms(20, || be.embedding_forward(&shard, &bags, &mut out, lay, false).map_err(|e| e.to_string()))?;
            let bwd = be.gpu().time_ms(20, || be.embedding_backward_update(&mut shard, &bags, &grad, lay, &upd).map_err(|e| e.to_string()))?;
            be.set_legacy_backward(true);
            let old = be.gpu().time_ms(5, || be.embedding_backward_update(&mut shard, &bags, &grad, lay, &upd).map_err(|e| e.to_string()));
            be.set_legacy_backward(false);
            let old = old?;
            let sort = be.time_backward_sort(&bags, rows, 10)?;
            // Fewest bytes the update must move: ids (u64) and the gradient once, each unique row and
            // its row-wise state read and written once.
            let moved = (n * 8 + b * d * 4 + 2 * uniq.len() * (d * 4 + 4)) as f64;
            let (fg, bg) = (bytes / (fwd * 1e-3), bytes / (bwd * 1e-3));
            let _ = writeln!(
                table,
                "| {d} | {dist} | {fwd:.3} | {:.0} | {:.0} % | {bwd:.3} | {:.0} | {:.0} % | {:.0} % | {sort:.3} | {old:.3} | {} |",
                fg / 1e9,
                100.0 * fg / copy,
                bg / 1e9,
                100.0 * bg / copy,
                100.0 * moved / (bwd * 1e-3) / copy,
                uniq.len()
            );
        }
    }
    let head = format!("Embedding kernels: B={b}, L={l}, rows={rows}, one table; bytes = B·D·4 + B·L·D·4 per pass (outputs plus rows read); bytes moved = ids·8 + B·D·4 + 2·unique·(D·4 + 4) (the update's floor); CUDA-event timing, mean of 20 after 3 warm-ups.\n");
    println!("{head}\n{table}");
    let _ = writeln!(md, "{head}\n{table}");
    // Allocation-trace replay: pool vs per-tensor cuMemAlloc.
    let trace = ember_cuda_trace();
    let rows = be.bench_alloc_replay(&trace, 50)?;
    let mut t = String::from("| allocator | steps | time s | driver allocations | reserved MiB | peak MiB | fragmentation at peak |\n|---|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(t, "| {} | {} | {:.4} | {} | {:.1} | {:.1} | {:.3} |", r.allocator, r.steps, r.seconds, r.driver_allocs, mib(r.reserved), mib(r.peak), r.fragmentation_at_peak);
    }
    println!("Allocation trace of a DLRM step (B=2048, 26 tables, D=64), replayed:\n{t}");
    let _ = writeln!(md, "Allocation trace of a DLRM step (B=2048, 26 tables, D=64), replayed:\n\n{t}");
    Ok(())
}

#[cfg(feature = "cuda")]
fn ember_cuda_trace() -> Vec<ember_engine::backend::cuda::TraceOp> {
    ember_engine::backend::cuda::dlrm_step_trace(2048, 1, 26, 64, &[512, 256, 64, 512, 256, 1])
}
