//! `ember selftest`: checks a backend against the CPU reference. Owned by the CUDA work.
use crate::common::CliResult;

#[derive(clap::Args, Clone, Debug)]
pub struct SelftestArgs {
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(_a: SelftestArgs) -> CliResult {
    Err("ember selftest: not implemented yet".into())
}
