//! Engine configs: the `ember train` TOML plus the optional `grid = "MxN"` and `[parallel]`
//! table (a `JobConfig`, parsed by the engine), and the grid and sharding plan a config gives
//! for a number of ranks.

use crate::status::{EmberStatus, Failure, R};
use engine::config::{JobConfig, TrainConfig};
use engine::grid::{Grid, Placement};
use engine::plan::planner::{plan, PlanOptions};

/// An engine config: the `ember train` TOML plus the job of its optional top-level
/// `grid = "MxN"` and `[parallel]` table.
pub(crate) struct EngineConfig {
    pub(crate) train: TrainConfig,
    pub(crate) job: JobConfig,
}

fn config_err(msg: impl std::fmt::Display) -> Failure {
    Failure(EmberStatus::ErrConfig, format!("config: {msg}"))
}

pub(crate) fn parse_config(text: &str) -> R<EngineConfig> {
    let mut table: toml::Table = text.parse().map_err(config_err)?;
    let grid = table.remove("grid");
    let par = table.remove("parallel");
    let train: TrainConfig = toml::Value::Table(table).try_into().map_err(config_err)?;
    train.validate()?;
    let job = JobConfig::from_toml(grid, par)?;
    Ok(EngineConfig { train, job })
}

/// The grid for `world` ranks: the config's (which must have `world` ranks) or 1 x world.
pub(crate) fn grid_for(ec: &EngineConfig, world: usize, who: &str) -> R<Grid> {
    let grid = match ec.job.grid {
        Some((m, n)) => ec.job.grid_of(m, n)?,
        None => Grid::new(1, world, Placement::ReplicasInNode)?,
    };
    if grid.world() != world {
        return Err(config_err(format!("grid {}x{} needs {} ranks but {who} has {world}", grid.m, grid.n, grid.world())));
    }
    if ec.train.batch_size % world != 0 {
        return Err(config_err(format!("batch_size {} is not divisible by the {world} ranks", ec.train.batch_size)));
    }
    Ok(grid)
}

/// The sharding plan for `grid`, after checking that the ranks this process builds (all of
/// them when `in_process`, else its one rank) fit in the memory available.
pub(crate) fn plan_for(ec: &EngineConfig, grid: Grid, in_process: bool) -> R<engine::plan::Plan> {
    let popts = PlanOptions { placement: grid.placement, ..ec.job.plan_options(&ec.train) };
    let (p, report) = plan(&ec.train.model, grid.m, grid.n, &popts)?;
    engine::memory::check_plan(&report, grid.m, !in_process)?;
    Ok(p)
}
