//! `ember simulate --calibrate FILE`: this machine's description (`ember_engine::simulate::Machine`)
//! measured by microbenchmarks only (`ember_engine::simulate::calibrate`), written as TOML.
//! On the CPU (default) every figure is this host's; with `--device cuda` the memory and
//! compute figures are GPU 0's and the node shape, memory budget and links stay a preset's
//! (one GPU cannot measure NVLink or InfiniBand).
use crate::common::{CliResult, Device};
use ember_engine::simulate::calibrate::{self, CalibrateOptions};
use ember_engine::simulate::Machine;
use std::path::Path;

/// The calibration's options (flattened into `ember simulate`).
#[derive(clap::Args, Clone, Debug)]
pub struct CalibrateArgs {
    /// (with --calibrate) The backend measured: cpu (this host) or cuda (GPU 0; node shape,
    /// memory budget and links from --links).
    #[arg(long = "calibrate-device", value_enum, default_value_t = Device::Cpu)]
    pub device: Device,
    /// (with --calibrate --calibrate-device cuda) The preset whose node shape, memory budget
    /// and links the file keeps [default: h200-ib on an H200, else h100-ib].
    #[arg(long = "calibrate-links")]
    pub links: Option<String>,
}

/// `ember simulate --calibrate OUT` with its options. `EMBER_CALIBRATE_QUICK=1` selects tiny
/// sizes and one repetition (tests: it checks the plumbing and measures nothing).
pub fn run_with(out: &Path, a: &CalibrateArgs) -> CliResult {
    let quick = std::env::var("EMBER_CALIBRATE_QUICK").is_ok_and(|v| v == "1");
    let args: Vec<String> = std::env::args().skip(1).collect();
    let command = format!("ember {}", args.join(" "));
    let mut log = |l: &str| println!("# {l}");
    let m = match a.device {
        Device::Cpu => {
            let o = CalibrateOptions::host(quick, &command);
            println!("# ember simulate --calibrate: this host, {} in-process ranks, {} compute units{}", o.ranks_per_node, calibrate::host_units(), if quick { " (quick)" } else { "" });
            calibrate::host(&o, &mut log)?
        }
        Device::Cuda => cuda(a, quick, &command, &mut log)?,
        Device::Emulated => return Err("--calibrate-device emulated: the emulated device is host memory behind counted copies, not a machine to describe; calibrate cpu or cuda".into()),
    };
    std::fs::write(out, m.to_toml()).map_err(|e| format!("ember simulate --calibrate: writing {}: {e}", out.display()))?;
    // The file must read back as it will be read.
    Machine::read(out)?;
    println!("# wrote {} ({})", out.display(), m.name);
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn cuda(a: &CalibrateArgs, _: bool, _: &str, _: &mut dyn FnMut(&str)) -> Result<Machine, Box<dyn std::error::Error>> {
    let links = a.links.as_deref().map(|l| format!(" (links of {l})")).unwrap_or_default();
    Err(format!("--calibrate-device cuda{links}: this binary was built without the `cuda` feature (cargo build --release -p ember-tools --features cuda)").into())
}

/// GPU 0's memory and compute figures in a preset's node: the copy bandwidth, the backend's
/// 256-byte row gather, the dense GEMMs at a per-GPU batch of 8192 and the embedding kernels
/// at a per-GPU batch of 65536 (8 tables of 1 M rows), with every unit (the one GPU) busy.
#[cfg(feature = "cuda")]
fn cuda(a: &CalibrateArgs, quick: bool, command: &str, log: &mut dyn FnMut(&str)) -> Result<Machine, Box<dyn std::error::Error>> {
    use ember_engine::backend::cuda::Cuda;
    use ember_engine::bench;
    use ember_engine::simulate::machine::MemoryRates;
    let be = Cuda::new(0)?;
    let gpu = be.device_name();
    let base = a.links.clone().unwrap_or_else(|| if gpu.contains("H200") { "h200-ib".into() } else { "h100-ib".into() });
    let mut m = Machine::preset(&base)?;
    println!("# ember simulate --calibrate --calibrate-device cuda: {gpu}, node shape and links of preset {base}");
    let o = CalibrateOptions { quick, ranks_per_node: m.ranks_per_node, gemm_batch: if quick { 8 } else { 8192 }, emb_batch: 65536, emb_rows: 1_000_000, emb_zipf: None, command: command.into() };
    let (copy_bytes, table_mib, reps) = if quick { (1 << 20, 4, 1) } else { (1 << 30, 1024, 5) };
    let copies = (0..reps).map(|_| be.copy_bandwidth(copy_bytes, 10)).collect::<Result<Vec<f64>, _>>()?;
    let copy = bench::median(&copies);
    let gather = bench::backend_gather(&be, table_mib, 256, reps)?;
    log(&format!("copy {:.1} GB/s, gather of 256-byte rows {:.1} GB/s", copy / 1e9, gather / 1e9));
    let (compute, csrc) = calibrate::compute_rates(&be, &o, 1, gather, log)?;
    let date = calibrate::utc_date();
    let keep = |s: &String| !(s.starts_with("memory.") || s.starts_with("compute."));
    let mut sources = vec![format!("calibrated: `{command}` on {date} on {gpu}: memory and compute measured; node shape, memory budget and links from preset {base}")];
    sources.extend(m.sources.iter().filter(|s| keep(s)).cloned());
    sources.push(format!(
        "memory.stream_bw, memory.gather_bw: Ember's own measurement: `{command}`: device copy of {copy_bytes} B (cuMemcpyDtoD, CUDA-event mean of 10, median of {reps}) and the backend's gather_rows of 256-byte rows from a {table_mib} MiB table (median of {reps})"
    ));
    sources.extend(csrc);
    sources.push("compute.step_overhead_s: assumption: 0, no microbenchmark measures it".into());
    m.name = format!("{base}-calibrated");
    m.description = format!("{} — memory and compute measured on {gpu}", m.description);
    m.memory = MemoryRates { stream_bw: copy, gather_bw: gather };
    m.compute = compute;
    m.sources = sources;
    m.validate().map_err(|e| format!("calibrate: the measured machine is not valid: {e}"))?;
    Ok(m)
}
