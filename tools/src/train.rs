//! `ember train`: the one-process run (CPU or CUDA backend, synthetic data or a Criteo file,
//! with or without checkpoints); grids and launched ranks go to `train2d`. The flags are
//! `train_args`'.
use crate::common::{check_batch, parse_grid, CliResult, Device};
use crate::notes::{note, set_bar};
use crate::train_args::{epoch_steps, open_data, FileData, TrainArgs};
use ember_engine::backend::{Backend, Cpu};
use ember_engine::config::TrainConfig;
use ember_engine::data::criteo::CriteoReader;
use ember_engine::data::dataset::MappedData;
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::data::{DataSource, EvalSet};
use ember_engine::metrics::EvalResult;
use ember_engine::parallel::CheckpointOptions;
use ember_engine::train::{train_checkpointed, TrainReport};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub fn run(a: TrainArgs) -> CliResult {
    let mut cfg = a.model.train_config(if a.data.is_some() { "kaggle" } else { "tiny" }, a.steps)?;
    if let Some(e) = a.eval_every {
        cfg.eval_every = e;
    }
    if let Some(c) = a.momentum_c {
        use ember_engine::config::EmbOptimizer::*;
        match &mut cfg.optim.embedding {
            RowWiseAdagrad { c: cc, .. } | Adagrad { c: cc, .. } => *cc = Some(c),
            Sgd { .. } => return Err("--momentum-c applies to the AdaGrad optimizers only".into()),
        }
    }
    if a.data.is_some() && a.steps.is_none() && a.model.config.is_none() {
        cfg.steps = None; // one epoch of the file
    }
    let checkpoint = a.checkpoint()?;
    // Under a launcher of T > 1 processes, each is one rank: the grid defaults to 1xT.
    let launched = ember_transport::JoinConfig::from_env().ok().map(|j| j.size).filter(|&t| t > 1);
    let (m, n) = match (&a.grid, launched) {
        (Some(g), _) => parse_grid(g)?,
        (None, Some(t)) => (1, t),
        (None, None) => (1, 1),
    };
    check_batch(cfg.batch_size, m, n)?;
    if (m, n) != (1, 1) || launched.is_some() {
        return crate::train2d::run(&a, cfg, m, n);
    }
    if a.transport != "auto" && a.transport != "local" {
        return Err(format!("--transport {}: a single-rank run uses no transport", a.transport).into());
    }
    if a.measure_memory {
        return Err("--measure-memory measures the ranks of a grid: ember launch -n T -- ember train --grid MxN --measure-memory ...".into());
    }
    // Host memory before anything is allocated (CUDA keeps the tables on the device).
    if a.device != Device::Cuda {
        let (_, rep) = ember_engine::plan::planner::plan(&cfg.model, 1, 1, &ember_engine::plan::planner::PlanOptions::from_config(&cfg))?;
        ember_engine::memory::check_plan(&rep, 1, true)?;
    }
    let mut oracle = None;
    // The eval set: the file's eval split read chunk by chunk, or the synthetic one.
    let (mut data, eval): (Data, Box<dyn EvalSet>) = match open_data(&a, &cfg)? {
        Some(FileData::Text(r)) => {
            // A file too short for an eval split is refused before its batch count is.
            let eval = r.eval_stream()?;
            cfg.steps = Some(epoch_steps(cfg.steps, r.train_lines(), cfg.batch_size, true)?);
            (Data::Criteo(r), Box::new(eval))
        }
        Some(FileData::Mapped(d)) => {
            cfg.steps = Some(epoch_steps(cfg.steps, d.train_len() * d.epochs(), cfg.batch_size, true)?);
            let eval = d.eval_stream();
            (Data::Mapped(d), Box::new(eval))
        }
        None => {
            let mut d = SyntheticData::new(&cfg)?;
            let eval = d.eval_set()?;
            oracle = Some(d.oracle_eval());
            (Data::Synthetic(d), Box::new(eval))
        }
    };
    // The folder becomes this run's: pruning then only removes this run's checkpoints.
    let mut checkpoint = checkpoint;
    if let Some(c) = checkpoint.as_mut() {
        c.run_id = Some(ember_engine::checkpoint::claim(&c.dir, c.resume, a.overwrite_checkpoints)?);
    }
    let ck = checkpoint.as_ref();
    let run = match a.device {
        Device::Cpu => run_on(&Cpu::new(), &cfg, data.source(), eval.as_ref(), ck, &a),
        Device::Cuda => run_cuda(&cfg, data.source(), eval.as_ref(), ck, &a),
        Device::Emulated => run_on(&ember_engine::backend::Emulated::new(), &cfg, data.source(), eval.as_ref(), ck, &a),
    };
    let report = match (run, ck.filter(|c| c.resume)) {
        (Ok(r), _) => r,
        (Err(e), Some(c)) => return Err(crate::checkpoint::explain_resume_failure(&c.dir, e.to_string()).into()),
        (Err(e), None) => return Err(e),
    };
    // Bad lines skipped by the training stream and by the last pass over the eval split.
    let skipped = match &data {
        Data::Criteo(r) => Some(r.skipped() + eval.skipped()),
        Data::Mapped(_) | Data::Synthetic(_) => None,
    };
    let steps = cfg.steps.unwrap_or(0);
    let reached = report.evals.last().map_or(0, |e| e.step);
    if reached < steps {
        note(&format!("ember train: the data ran out after step {reached} of {steps} ({} bad lines skipped)", skipped.unwrap_or(0)));
    }
    print_summary(&report, skipped, oracle);
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(k) = skipped {
            v["skipped_lines"] = k.into();
        }
        if let Some(o) = oracle {
            v["oracle_auc"] = o.auc.into();
            v["oracle_ne"] = o.ne.into();
        }
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

/// The training data of a one-process run.
enum Data {
    Criteo(CriteoReader),
    Mapped(MappedData),
    Synthetic(SyntheticData),
}

impl Data {
    fn source(&mut self) -> &mut dyn DataSource {
        match self {
            Data::Criteo(r) => r,
            Data::Mapped(d) => d,
            Data::Synthetic(d) => d,
        }
    }
}

#[cfg(feature = "cuda")]
fn run_cuda(cfg: &TrainConfig, data: &mut dyn DataSource, eval: &dyn EvalSet, ck: Option<&CheckpointOptions>, a: &TrainArgs) -> Result<TrainReport, Box<dyn std::error::Error>> {
    let be = ember_engine::backend::cuda::Cuda::new(0)?;
    run_on(&be, cfg, data, eval, ck, a)
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &TrainConfig, _: &mut dyn DataSource, _: &dyn EvalSet, _: Option<&CheckpointOptions>, _: &TrainArgs) -> Result<TrainReport, Box<dyn std::error::Error>> {
    Err("--device cuda: this binary was built without the `cuda` feature (cargo build --release -p ember-tools --features cuda)".into())
}

fn run_on<B: Backend>(be: &B, cfg: &TrainConfig, data: &mut dyn DataSource, eval: &dyn EvalSet, ck: Option<&CheckpointOptions>, a: &TrainArgs) -> Result<TrainReport, Box<dyn std::error::Error>> {
    let total = cfg.steps.map(|x| x as u64).or(data.len().map(|n| n / cfg.batch_size as u64)).unwrap_or(0);
    let bar = ProgressBar::new(total);
    if a.quiet || a.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]").expect("valid template"),
    );
    set_bar(Some(bar.clone()));
    let run = train_checkpointed(be, cfg, data, eval, ck, |p| {
        bar.set_position(p.step as u64);
        if p.step % 10 == 0 || p.step == p.total {
            bar.set_message(format!("{:.0} samples/s  loss {:.4}  ne {:.4}", p.samples_per_s, p.loss, p.ne));
        }
    });
    set_bar(None);
    bar.finish_and_clear();
    Ok(run?.1)
}

fn print_summary(r: &TrainReport, skipped: Option<u64>, oracle: Option<EvalResult>) {
    // A resumed run counts the steps it ran, after the checkpoint's.
    let last = r.evals.last().map_or(r.steps, |e| e.step);
    let resumed = if last > r.steps { format!(" (steps {} to {last}, resumed)", last - r.steps + 1) } else { String::new() };
    println!("ember train: {} steps{resumed} x batch {} on {} in {:.2} s", r.steps, r.batch_size, r.backend, r.wall_s);
    println!("  throughput      {:>12.0} samples/s", r.samples_per_s);
    println!("  train loss      {:>12.5}  (mean of the last 10 % of steps)", r.loss);
    for e in &r.evals {
        println!("  eval @ {:>6}   loss {:.5}  ne {:.5}  auc {:.5}", e.step, e.loss, e.ne, e.auc);
    }
    println!("  eval            ne {:.5}  auc {:.5}  ({} held-out samples)", r.ne, r.auc, r.eval_samples);
    if let Some(o) = oracle {
        println!("  planted oracle  ne {:.5}  auc {:.5}  (the model that generated the labels)", o.ne, o.auc);
    }
    if let Some(k) = skipped {
        println!("  skipped lines   {k}");
    }
}
