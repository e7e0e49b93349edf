//! `ember bench mem`: the memory behaviour that bounds embedding work — sequential copy and
//! random row-gather bandwidth at embedding row sizes, on 1 and all threads.
use crate::common::CliResult;

#[derive(clap::Args, Clone, Debug)]
pub struct MemArgs {
    /// cpu (host memory) or cuda (device memory and the pool).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Size of the copied buffer, MiB.
    #[arg(long, default_value_t = 256)]
    pub copy_mib: usize,
    /// Size of the table rows are gathered from, MiB.
    #[arg(long, default_value_t = 1024)]
    pub table_mib: usize,
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Print one JSON object per row.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: MemArgs) -> CliResult {
    if a.device != "cpu" {
        return device_mem(&a);
    }
    let rows = ember::bench::host_mem(a.copy_mib, a.table_mib, a.reps.max(1));
    println!("# ember bench mem: host memory; GB/s counts bytes read plus bytes written; median of {} reps", a.reps);
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
fn device_mem(a: &MemArgs) -> CliResult {
    Err(format!("--device {}: this binary was built without the `cuda` feature", a.device).into())
}

#[cfg(feature = "cuda")]
fn device_mem(a: &MemArgs) -> CliResult {
    Err(format!("--device {}: device memory benchmark not wired yet", a.device).into())
}
