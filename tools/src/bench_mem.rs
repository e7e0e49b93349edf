//! `ember bench mem`: the memory behaviour that bounds embedding work — sequential copy and
//! random row-gather bandwidth at embedding row sizes, on 1 and all threads.
use crate::common::{CliResult, Device};

#[derive(clap::Args, Clone, Debug)]
pub struct MemArgs {
    /// Host memory (cpu) or device memory and the pool (cuda).
    #[arg(long, value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// Size of the copied buffer, MiB.
    #[arg(long, default_value_t = 256, value_parser = crate::common::count::<1, { 1 << 20 }>)]
    pub copy_mib: usize,
    /// Size of the table rows are gathered from, MiB.
    #[arg(long, default_value_t = 1024, value_parser = crate::common::count::<1, { 1 << 20 }>)]
    pub table_mib: usize,
    /// Timed repetitions of each measurement (the median is printed).
    #[arg(short = 'n', long, default_value_t = 5, value_parser = crate::common::count::<1, 1_000_000>)]
    pub iters: usize,
    /// Print one JSON object per row.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: MemArgs) -> CliResult {
    if a.device == Device::Emulated {
        return Err("bench mem --device emulated: the emulated device's memory is host memory: measure it with --device cpu".into());
    }
    if a.device != Device::Cpu {
        return device_mem(&a);
    }
    let rows = ember_engine::bench::host_mem(a.copy_mib, a.table_mib, a.iters.max(1));
    println!("# ember bench mem: host memory; GB/s counts bytes read plus bytes written; median of {} repetitions", a.iters);
    println!("{:>8} {:>12} {:>8} {:>10} {:>10}", "op", "row bytes", "threads", "ms", "GB/s");
    for r in &rows {
        println!("{:>8} {:>12} {:>8} {:>10.2} {:>10.2}", r.op, r.row_bytes, r.threads, r.ms, r.gb_per_s);
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn device_mem(_: &MemArgs) -> CliResult {
    Err("--device cuda: this binary was built without the `cuda` feature (cargo build --release -p ember-tools --features cuda)".into())
}

#[cfg(feature = "cuda")]
fn device_mem(a: &MemArgs) -> CliResult {
    use ember_engine::backend::cuda::{dlrm_step_trace, Cuda};
    let be = Cuda::new(0)?;
    let reps = a.iters.max(1);
    println!("# ember bench mem --device cuda: {}", be.device_name());
    println!("# device-to-device copy (cuMemcpyDtoD), GB/s counts bytes read plus bytes written; CUDA-event mean of 10 per rep, median of {reps} reps");
    println!("{:>10} {:>10} {:>10}", "MiB", "ms", "GB/s");
    let mut json_rows = Vec::new();
    for mb in [a.copy_mib, 1024] {
        let bytes = mb << 20;
        let mut bw: Vec<f64> = (0..reps).map(|_| be.copy_bandwidth(bytes, 10)).collect::<Result<_, _>>()?;
        bw.sort_by(|x, y| x.total_cmp(y));
        let med = bw[bw.len() / 2];
        let ms = 2.0 * bytes as f64 / med * 1e3;
        println!("{:>10} {:>10.3} {:>10.1}", mb, ms, med / 1e9);
        json_rows.push(serde_json::json!({"op": "copy", "mib": mb, "ms": ms, "gb_per_s": med / 1e9}));
    }
    let g = ember_engine::bench::backend_gather(&be, a.table_mib, 256, reps)?;
    println!("# random gather of 256-byte rows from a {} MiB table (the backend's gather_rows), bytes read plus written, median of {reps}: {:.1} GB/s", a.table_mib, g / 1e9);
    json_rows.push(serde_json::json!({"op": "gather", "row_bytes": 256, "table_mib": a.table_mib, "gb_per_s": g / 1e9}));
    // Allocation trace of a DLRM step (B=2048, 26 tables, D=64): pool vs per-tensor cuMemAlloc.
    let trace = dlrm_step_trace(2048, 1, 26, 64, &[512, 256, 64, 512, 256, 1]);
    let steps = 50;
    let rows = be.bench_alloc_replay(&trace, steps)?;
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    println!("# allocation trace of a DLRM training step (B=2048, 26 tables, D=64, {} ops per step), replayed {steps} steps", trace.len());
    println!("{:>24} {:>10} {:>12} {:>10} {:>12} {:>10} {:>10}", "allocator", "time s", "us/step", "driver", "reserved MiB", "peak MiB", "frag@peak");
    for r in &rows {
        println!(
            "{:>24} {:>10.4} {:>12.1} {:>10} {:>12.1} {:>10.1} {:>10.3}",
            r.allocator,
            r.seconds,
            r.seconds * 1e6 / r.steps.max(1) as f64,
            r.driver_allocs,
            mib(r.reserved),
            mib(r.peak),
            r.fragmentation_at_peak
        );
        json_rows.push(serde_json::to_value(r)?);
    }
    let st = be.pool_stats();
    println!("# backend pool after the run: reserved {:.1} MiB, driver allocations {}", mib(st.reserved), be.driver_allocs());
    if a.json {
        for r in &json_rows {
            println!("{}", serde_json::to_string(r)?);
        }
    }
    Ok(())
}
