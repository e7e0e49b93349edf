//! `ember checkpoint inspect DIR` and `ember checkpoint export DIR OUT` (docs/checkpoint.md).
use crate::common::CliResult;
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    cmd: CheckpointCmd,
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// List a checkpoint (a step-S folder, or every one under a root) and verify its manifest,
    /// shapes and every checksum; exits 1 if anything complete fails to verify.
    Inspect { dir: PathBuf },
    /// Write every table (and its optimizer state, and the dense parameters) as .npy files.
    /// DIR is a step-S folder or a root (its newest complete checkpoint is used).
    Export { dir: PathBuf, out: PathBuf },
}

pub fn run(a: CheckpointArgs) -> CliResult {
    match a.cmd {
        CheckpointCmd::Inspect { dir } => {
            let (report, ok) = ember_engine::checkpoint::export::inspect(&dir)?;
            print!("{report}");
            if !ok {
                return Err(format!("{}: verification failed", dir.display()).into());
            }
            Ok(())
        }
        CheckpointCmd::Export { dir, out } => {
            let ck = ember_engine::checkpoint::Checkpoint::open(&dir)?;
            let files = ember_engine::checkpoint::export::export(&ck, &out)?;
            println!("exported step {} from {} to {}: {} files", ck.step(), ck.dir.display(), out.display(), files.len());
            Ok(())
        }
    }
}
