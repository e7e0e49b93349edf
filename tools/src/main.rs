//! `ember`: train, benchmark, plan, launch, checkpoint and self-test (docs/cli.md is the contract).
use clap::{Parser, Subcommand};

mod bench;
mod bench_data;
mod bench_mem;
mod calibrate;
mod checkpoint;
mod comm_bench;
mod common;
mod config;
mod convert;
mod launch;
#[cfg(feature = "nccl")]
mod nccl_bench;
mod notes;
mod plan;
mod selftest;
mod simulate;
mod simulate_plot;
mod train;
mod train2d;
mod train_args;

/// Counts heap bytes once `ember train --measure-memory` turns counting on (off: one relaxed
/// load per allocation).
#[global_allocator]
static HEAP: ember_engine::heap::Counting = ember_engine::heap::Counting;

#[derive(Parser)]
#[command(name = "ember", version, about = "DLRM training with two-dimensional sparse parallelism")]
#[command(after_help = "Example:\n  ember train --steps 300")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a DLRM (built-in synthetic data by default, or Criteo files with --data).
    #[command(after_help = "Example:\n  ember train --grid 2x2 --steps 300 --checkpoint-dir ckpt --checkpoint-every 100")]
    Train(train_args::TrainArgs),
    /// Benchmarks: embedding, dlrm, mem, data, a2a, allreduce, pingpong.
    #[command(after_help = "Example:\n  ember bench embedding --rows 100000 --steps 5")]
    Bench(bench::BenchArgs),
    /// Print the sharding plan for a model and grid: per-rank memory, lookups, a2a bytes, imbalance.
    #[command(after_help = "Example:\n  ember plan --preset dlrmv2 --grid 16x256 --batch-size 65536")]
    Plan(plan::PlanArgs),
    /// Start N local processes with the launcher variables set (one rank each).
    #[command(after_help = "Example:\n  ember launch -n 4 -- ember train --grid 2x2 --steps 300")]
    Launch(launch::LaunchArgs),
    /// Inspect (verify) or export checkpoints.
    #[command(after_help = "Example:\n  ember checkpoint inspect ckpt")]
    Checkpoint(checkpoint::CheckpointArgs),
    /// Check a backend against the CPU reference from this binary alone.
    #[command(after_help = "Example:\n  ember selftest --device cpu")]
    Selftest(selftest::SelftestArgs),
    /// Print a training config (a preset, or a config file, with the flags applied) as TOML.
    #[command(after_help = "Example:\n  ember config --preset tiny --steps 300 > tiny.toml")]
    Config(config::ConfigArgs),
    /// Convert Criteo text files to Ember's binary format (memory-mapped by `train --data`).
    #[command(after_help = "Example:\n  ember convert day_0 day_1 --out criteo-bin --preset terabyte")]
    Convert(convert::ConvertArgs),
    /// Predict a 2D step's time, memory and samples/s on a described machine, or calibrate one.
    #[command(after_help = "Example:\n  ember simulate --calibrate this-host.toml")]
    Simulate(simulate::SimulateArgs),
}

fn main() {
    // Output into a closed pipe (`ember plan ... | head`) ends the process quietly, as for any
    // Unix tool, instead of a panic in println!.
    // SAFETY: restoring a signal's default disposition at start, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    notes::init();
    // Help and --version exit 0; every error, a rejected flag included, exits 1 (docs/cli.md).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            eprint!("{}", e.render());
            std::process::exit(1);
        }
        Err(e) => {
            eprint!("ember: {}", e.render());
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
        Cmd::Config(a) => config::run(a),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Simulate(a) => simulate::run(a),
    };
    if let Err(e) = result {
        eprintln!("ember: error: {e}");
        std::process::exit(1);
    }
}
