//! `ember launch -n N -- CMD...`: local multi-process launcher. Owned by the transport work.
use crate::common::CliResult;

#[derive(clap::Args, Clone, Debug)]
pub struct LaunchArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

pub fn run(_a: LaunchArgs) -> CliResult {
    Err("ember launch: not implemented yet".into())
}
