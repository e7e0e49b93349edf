//! `ember simulate`: the scale model's command line — predict a 2D step on a described
//! machine, or (`--calibrate FILE`) write this machine's description from microbenchmarks.
use crate::common::CliResult;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Clone, Debug)]
pub struct SimulateArgs {
    /// Write this machine's description (TOML) to FILE, measured by microbenchmarks only.
    #[arg(long, value_name = "FILE")]
    pub calibrate: Option<PathBuf>,
}

pub fn run(a: SimulateArgs) -> CliResult {
    if let Some(out) = &a.calibrate {
        return crate::calibrate::run(out);
    }
    Err("ember simulate: the model is not built yet".into())
}
