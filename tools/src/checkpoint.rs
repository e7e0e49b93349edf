//! `ember checkpoint inspect DIR` and `ember checkpoint export DIR OUT` (docs/checkpoint.md),
//! and what `ember train --resume` says when the newest checkpoint is damaged.
use crate::common::CliResult;
use clap::{Args, Subcommand};
use ember_engine::checkpoint::{list, Checkpoint};
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct CheckpointArgs {
    #[command(subcommand)]
    cmd: CheckpointCmd,
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// List a checkpoint (a step-S folder, or every one under a root) and verify its manifest,
    /// shapes and every checksum; exits 1 if anything complete fails to verify.
    #[command(after_help = "Example:\n  ember checkpoint inspect ckpt")]
    Inspect {
        /// A step-S folder, or a checkpoint root (the --checkpoint-dir of `ember train`).
        dir: PathBuf,
    },
    /// Write every table (and its optimizer state, and the dense parameters) as .npy files.
    #[command(after_help = "Example:\n  ember checkpoint export ckpt/step-600 weights")]
    Export {
        /// A step-S folder, or a checkpoint root (its newest complete checkpoint is exported).
        dir: PathBuf,
        /// Output folder (created if missing).
        out: PathBuf,
    },
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
            let ck = Checkpoint::open(&dir)?;
            let files = ember_engine::checkpoint::export::export(&ck, &out)?;
            println!("exported step {} from {} to {}: {} files", ck.step(), ck.dir.display(), out.display(), files.len());
            Ok(())
        }
    }
}

/// Every file of the checkpoint in `dir` verifies (manifest, sizes, checksums).
fn intact(dir: &Path) -> bool {
    Checkpoint::open(dir).is_ok_and(|c| c.verify_each().iter().all(|(_, e)| e.is_none()))
}

/// The error of a failed `--resume` from `root`, and, when the newest complete checkpoint there
/// does not verify, the newest one that does (resuming takes the newest: the user moves the
/// damaged one aside).
pub fn explain_resume_failure(root: &Path, err: String) -> String {
    let Ok(found) = list(root) else { return err };
    let complete: Vec<_> = found.into_iter().filter(|l| l.complete).collect();
    let Some(newest) = complete.last() else { return err };
    if intact(&newest.dir) {
        return err;
    }
    match complete.iter().rev().skip(1).find(|l| intact(&l.dir)) {
        Some(good) => format!(
            "{err}\n{} does not verify; the newest intact checkpoint is {} (step {}): move {} out of {} to resume from it",
            newest.dir.display(),
            good.dir.display(),
            good.step,
            newest.dir.display(),
            root.display()
        ),
        None => format!("{err}\n{} does not verify, and no older checkpoint in {} does", newest.dir.display(), root.display()),
    }
}
