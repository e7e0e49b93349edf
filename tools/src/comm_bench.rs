//! `ember bench a2a` and `ember bench allreduce` (nccl-tests style). Owned by the transport work.
use crate::common::CliResult;

#[derive(clap::Args, Clone, Debug)]
pub struct CommBenchArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

pub fn run(_which: &str, _a: CommBenchArgs) -> CliResult {
    Err("ember bench a2a/allreduce: not implemented yet".into())
}
