//! `ember bench embedding|dlrm|mem` (and dispatch of the transport benchmarks).
use crate::common::CliResult;
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub which: Which,
}

#[derive(Subcommand)]
pub enum Which {
    /// All-to-all microbenchmark (nccl-tests columns).
    A2a(crate::comm_bench::CommBenchArgs),
    /// All-reduce microbenchmark (nccl-tests columns).
    Allreduce(crate::comm_bench::CommBenchArgs),
}

pub fn run(a: BenchArgs) -> CliResult {
    match a.which {
        Which::A2a(x) => crate::comm_bench::run("a2a", x),
        Which::Allreduce(x) => crate::comm_bench::run("allreduce", x),
    }
}
