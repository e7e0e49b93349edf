//! `ember train`.
use crate::common::{CliResult, Shared};

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub shared: Shared,
}

pub fn run(_a: TrainArgs) -> CliResult {
    Err("not yet".into())
}
