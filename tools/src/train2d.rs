//! `ember train --grid MxN`: 2D training, as T in-process ranks (threads) by default, or as
//! one rank per process under `ember launch`, mpirun, srun or torchrun.
use crate::common::CliResult;
use crate::train::TrainArgs;
use ember::backend::Cpu;
use ember::config::TrainConfig;
use ember::data::synthetic::SyntheticData;
use ember::grid::{Grid, Placement};
use ember::parallel::driver::{report, run_rank, train_in_process, write_trace, Report2D};
use ember::parallel::{CheckpointOptions, ParallelOptions, SyncMode};
use ember::plan::planner::{plan, PlanOptions};
use ember::plan::ShardingType;
use std::time::Instant;

pub fn run(a: &TrainArgs, cfg: TrainConfig, m: usize, n: usize) -> CliResult {
    let s = &a.shared;
    if s.device != "cpu" {
        return Err(format!("--device {} with a grid: 2D training on GPUs comes with the GPU-2D issue", s.device).into());
    }
    if s.data.is_some() {
        return Err("--data with a grid: 2D training reads the built-in synthetic data for now".into());
    }
    let placement = match a.placement.as_str() {
        "in-node" => Placement::ReplicasInNode,
        "across-nodes" => Placement::ReplicasAcrossNodes,
        other => return Err(format!("--placement '{other}': expected in-node or across-nodes").into()),
    };
    let sync = match a.sync.as_str() {
        "sparse" => SyncMode::Sparse,
        "full" => SyncMode::Full,
        other => return Err(format!("--sync '{other}': expected sparse or full").into()),
    };
    let grid = Grid::new(m, n, placement)?;
    let steps = cfg.steps.ok_or("--steps is required for 2D training")?;
    let mut popts = PlanOptions::from_config(&cfg);
    popts.ranks_per_node = a.ranks_per_node;
    popts.placement = placement;
    popts.force = match a.sharding.as_deref() {
        None => None,
        Some("table") => Some(ShardingType::TableWise),
        Some("row") => Some(ShardingType::RowWise),
        Some("column") => Some(ShardingType::ColumnWise),
        Some("table-row") => Some(ShardingType::TableRowWise),
        Some(o) => return Err(format!("--sharding '{o}': expected table, row, column or table-row").into()),
    };
    let (plan, _) = plan(&cfg.model, m, n, &popts)?;
    if (a.resume || a.checkpoint_every > 0) && a.checkpoint_dir.is_none() {
        return Err("--resume and --checkpoint-every need --checkpoint-dir".into());
    }
    if a.checkpoint_every % a.sync_every.max(1) != 0 {
        return Err(format!("--checkpoint-every {} must be a multiple of --sync-every {}", a.checkpoint_every, a.sync_every).into());
    }
    let checkpoint = a.checkpoint_dir.as_ref().map(|dir| CheckpointOptions { dir: dir.clone(), every: a.checkpoint_every, keep: a.keep.max(1), resume: a.resume });
    let opts = ParallelOptions {
        sync_every: a.sync_every,
        sync,
        delayed_state_sync: a.delayed_state_sync,
        fully_sharded: a.fully_sharded,
        checkpoint,
    };
    let data = SyntheticData::new(&cfg)?;
    let oracle = data.oracle_eval();

    let join = ember_transport::JoinConfig::from_env().ok().filter(|j| j.size > 1);
    let multi = join.is_some();
    let (rep, events, is_root) = match join {
        None => {
            let (rep, _, events) = train_in_process(&Cpu::new(), &cfg, grid, &plan, &opts, steps, a.trace.is_some())?;
            (rep, events, true)
        }
        Some(mut j) => {
            if s.transport != "auto" {
                j.transport = s.transport.parse()?;
            }
            if j.size != grid.world() {
                return Err(format!("--grid {m}x{n} needs {} ranks but the launcher started {}", grid.world(), j.size).into());
            }
            let world = ember_transport::Comm::connect(&j)?;
            let w = world.rank();
            let feed = |step: usize, w: usize| {
                let r = grid.sample_range(w, cfg.batch_size);
                data.samples((step * cfg.batch_size + r.start) as u64, r.len())
            };
            let t0 = Instant::now();
            let eval = data.eval_batch();
            let out = run_rank(&Cpu::new(), &cfg, grid, world, plan, opts, steps, &feed, &eval, a.trace.is_some())?;
            let rep = report(grid, steps, cfg.batch_size, t0.elapsed().as_secs_f64(), &out);
            (rep, out.trace, w == 0)
        }
    };
    if let Some(path) = &a.trace {
        // One file for in-process ranks; one per process otherwise (FILE.rankN.json).
        let path = if multi { path.with_extension(format!("rank{}.json", first_rank(&events))) } else { path.clone() };
        write_trace(&path, &events)?;
    }
    if !is_root {
        return Ok(());
    }
    print_summary(&rep, &oracle);
    if s.json {
        let mut v = serde_json::to_value(&rep)?;
        v["oracle_auc"] = oracle.auc.into();
        v["oracle_ne"] = oracle.ne.into();
        v.as_object_mut().map(|o| o.remove("losses"));
        println!("{}", serde_json::to_string(&v)?);
    }
    Ok(())
}

fn first_rank(events: &[ember::parallel::TraceEvent]) -> usize {
    events.first().map(|e| e.rank).unwrap_or(0)
}

fn print_summary(r: &Report2D, oracle: &ember::metrics::EvalResult) {
    println!("ember train: grid {}, {} steps in {:.2} s", r.grid, r.steps, r.wall_s);
    println!("  throughput      {:>12.0} samples/s", r.samples_per_s);
    println!("  train loss      {:>12.5}  (mean of the last 10 % of steps)", r.loss);
    println!("  eval            ne {:.5}  auc {:.5}", r.ne, r.auc);
    println!("  planted oracle  ne {:.5}  auc {:.5}", oracle.ne, oracle.auc);
    let st = &r.stages;
    println!(
        "  stages (ms/step, rank 0): input_dist {:.2}  lookup {:.2}  output_dist {:.2}  dense {:.2}  backward {:.2}  sync {:.2}",
        st.input_dist, st.lookup, st.output_dist, st.dense, st.backward, st.sync
    );
    println!("  bytes/step (rank 0): sparse collectives {:.0}  replica sync {:.0}", r.a2a_bytes_per_rank, r.sync_bytes_per_rank);
    println!("  embedding weights resident during the dense phase (rank 0): {:.2} MiB", r.emb_weight_bytes_resident as f64 / (1 << 20) as f64);
    println!("  lookup imbalance (max/mean over ranks) {:.3}; peak RSS of this process {:.1} MiB", r.imbalance, r.peak_rss_bytes as f64 / (1 << 20) as f64);
}
