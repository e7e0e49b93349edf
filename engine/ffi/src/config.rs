//! Engine configs: the `ember train` TOML plus the optional `grid = "MxN"` and `[parallel]`
//! table, parsed into an `EngineConfig`, and the grid and sharding plan a config gives for a
//! number of ranks.

use crate::status::{EmberStatus, Failure, R};
use engine::config::TrainConfig;
use engine::grid::{Grid, Placement};
use engine::parallel::{ParallelOptions, SyncMode};
use engine::plan::planner::{plan, PlanOptions};
use engine::plan::ShardingType;
use serde::Deserialize;

/// An engine config: the `ember train` TOML plus the optional top-level `grid = "MxN"` and the
/// optional `[parallel]` table.
pub(crate) struct EngineConfig {
    pub(crate) train: TrainConfig,
    pub(crate) grid: Option<Grid>,
    pub(crate) opts: ParallelOptions,
    pub(crate) sharding: Option<ShardingType>,
}

fn default_sync_every() -> usize {
    1
}

/// `[parallel]`: options of 2D training (the `ember train` flags of the same names).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParallelSection {
    #[serde(default = "default_sync_every")]
    sync_every: usize,
    #[serde(default)]
    sync: SyncMode,
    #[serde(default)]
    delayed_state_sync: bool,
    #[serde(default)]
    fully_sharded: bool,
    #[serde(default)]
    placement: Option<String>,
    #[serde(default)]
    sharding: Option<String>,
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
    let par: ParallelSection = match par {
        None => toml::Value::Table(Default::default()).try_into().map_err(config_err)?,
        Some(v) => v.try_into().map_err(|e| config_err(format!("[parallel]: {e}")))?,
    };
    let placement = match par.placement.as_deref() {
        None | Some("in-node") => Placement::ReplicasInNode,
        Some("across-nodes") => Placement::ReplicasAcrossNodes,
        Some(o) => return Err(config_err(format!("[parallel] placement '{o}': expected in-node or across-nodes"))),
    };
    let sharding = match par.sharding.as_deref() {
        None => None,
        Some("table") => Some(ShardingType::TableWise),
        Some("row") => Some(ShardingType::RowWise),
        Some("column") => Some(ShardingType::ColumnWise),
        Some("table-row") => Some(ShardingType::TableRowWise),
        Some(o) => return Err(config_err(format!("[parallel] sharding '{o}': expected table, row, column or table-row"))),
    };
    if par.sync_every == 0 {
        return Err(config_err("[parallel] sync_every must be >= 1"));
    }
    let grid = match grid {
        None => None,
        Some(toml::Value::String(s)) => Some(Grid::parse(&s, placement)?),
        Some(v) => return Err(config_err(format!("grid = {v}: expected a string \"MxN\""))),
    };
    let opts = ParallelOptions {
        sync_every: par.sync_every,
        sync: par.sync,
        delayed_state_sync: par.delayed_state_sync,
        fully_sharded: par.fully_sharded,
        ..Default::default()
    };
    Ok(EngineConfig { train, grid, opts, sharding })
}

/// The grid for `world` ranks: the config's (which must have `world` ranks) or 1 x world.
pub(crate) fn grid_for(ec: &EngineConfig, world: usize, who: &str) -> R<Grid> {
    let grid = match ec.grid {
        Some(g) => g,
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
    let mut popts = PlanOptions::from_config(&ec.train);
    popts.placement = grid.placement;
    popts.force = ec.sharding;
    let (p, report) = plan(&ec.train.model, grid.m, grid.n, &popts)?;
    engine::memory::check_plan(&report, grid.m, !in_process)?;
    Ok(p)
}
