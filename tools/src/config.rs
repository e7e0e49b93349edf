//! `ember config`: print the training config that a preset (or a config file) and the
//! overriding flags select, as the TOML that `ember train --config` reads.
use crate::common::{CliResult, ModelArgs};

#[derive(clap::Args)]
pub struct ConfigArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Training steps.
    #[arg(long, value_parser = crate::common::count::<1, { ember_engine::config::limits::MAX_STEPS }>)]
    pub steps: Option<usize>,
}

pub fn run(a: ConfigArgs) -> CliResult {
    let cfg = a.model.train_config("tiny", a.steps)?;
    let mut v: toml::Value = toml::from_str(&cfg.to_toml())?;
    tidy(&mut v);
    println!("# ember train --config FILE (fields: docs/cli.md, \"Config files\")");
    print!("{}", toml::to_string(&v)?);
    Ok(())
}

/// Write each float the way it was meant: the config's f32 fields (learning rates, eps) come out
/// of TOML widened to f64 (0.05 as 0.05000000074505806); a float that is exactly an f32 is
/// printed as that f32's shortest form, which reads back to the same f32.
fn tidy(v: &mut toml::Value) {
    match v {
        toml::Value::Float(x) => {
            let f = *x as f32;
            if f.is_finite() && f as f64 == *x {
                *x = f.to_string().parse().unwrap_or(*x);
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(tidy),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, x)| tidy(x)),
        _ => {}
    }
}
