//! `ember`: train, benchmark, plan, launch, checkpoint and self-test (docs/cli.md is the contract).
use clap::{Parser, Subcommand};

mod bench;
mod bench_mem;
mod checkpoint;
mod comm_bench;
mod common;
mod launch;
#[cfg(feature = "nccl")]
mod nccl_bench;
mod plan;
mod selftest;
mod train;
mod train2d;

#[derive(Parser)]
#[command(name = "ember", version, about = "DLRM training with two-dimensional sparse parallelism")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a DLRM (built-in synthetic data by default, or Criteo files with --data).
    Train(train::TrainArgs),
    /// Benchmarks: embedding, dlrm, mem, a2a, allreduce.
    Bench(bench::BenchArgs),
    /// Print the sharding plan for a model and grid: per-rank memory, lookups, a2a bytes, imbalance.
    Plan(plan::PlanArgs),
    /// Start N local processes with the launcher variables set.
    Launch(launch::LaunchArgs),
    /// Inspect (verify) or export checkpoints.
    Checkpoint(checkpoint::CheckpointArgs),
    /// Check a backend against the CPU reference from this binary alone.
    Selftest(selftest::SelftestArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    // Every error exits 1 with "ember: error: ..." (docs/cli.md), flag errors included.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            eprint!("ember: {e}");
            std::process::exit(1);
        }
    };
    let result = match cli.cmd {
        Cmd::Train(a) => train::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Launch(a) => launch::run(a),
        Cmd::Selftest(a) => selftest::run(a),
        Cmd::Plan(a) => plan::run(a),
        Cmd::Checkpoint(a) => checkpoint::run(a),
    };
    if let Err(e) = result {
        eprintln!("ember: error: {e}");
        std::process::exit(1);
    }
}
