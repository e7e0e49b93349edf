//! `ember simulate --calibrate FILE`: this machine's description (`ember_engine::simulate::Machine`)
//! measured by microbenchmarks only.
use crate::common::CliResult;
use std::path::Path;

pub fn run(_out: &Path) -> CliResult {
    Err("ember simulate --calibrate: not built yet".into())
}
