//! The 2D grid: T = M·N ranks as M replicas (sharding groups) × N ranks per sharding group,
//! the placement of world ranks on it, and the sharding-group / replica-group communicators.
//!
//! Placement (BRIEF.md §2): *replicas inside a node* (default) puts sharding group i at world
//! ranks {i, M+i, 2M+i, ...} and replica group j at {jM, ..., jM+M−1} (contiguous, so the weight
//! average stays on intra-node links); *replicas across nodes* makes sharding groups contiguous.
use crate::{Error, Result};
use ember_transport::Comm;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    #[default]
    ReplicasInNode,
    ReplicasAcrossNodes,
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::ReplicasInNode => "replicas in node",
            Placement::ReplicasAcrossNodes => "replicas across nodes",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grid {
    /// Replicas = number of sharding groups.
    pub m: usize,
    /// Ranks per sharding group.
    pub n: usize,
    pub placement: Placement,
}

/// Most ranks a grid may have (M·N).
pub const MAX_RANKS: usize = 1 << 16;

impl Grid {
    /// A grid of M·N ranks; M, N >= 1 and M·N at most [`MAX_RANKS`] (checked, so that every
    /// later product of ranks is in range).
    pub fn new(m: usize, n: usize, placement: Placement) -> Result<Self> {
        if m == 0 || n == 0 {
            return Err(Error::Config(format!("grid {m}x{n}: M and N must be >= 1")));
        }
        match m.checked_mul(n) {
            Some(t) if t <= MAX_RANKS => Ok(Grid { m, n, placement }),
            _ => Err(Error::Config(format!("grid {m}x{n}: M x N must be at most {MAX_RANKS} ranks"))),
        }
    }

    /// Parse "MxN".
    pub fn parse(s: &str, placement: Placement) -> Result<Self> {
        let bad = || Error::Config(format!("grid '{s}': expected MxN with M, N >= 1 (e.g. 2x4)"));
        let (m, n) = s.split_once(['x', 'X']).ok_or_else(bad)?;
        Grid::new(m.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?, placement)
    }

    pub fn world(&self) -> usize {
        self.m * self.n
    }

    /// (sharding group g, rank within the group r) of world rank `w`.
    pub fn coords(&self, w: usize) -> (usize, usize) {
        match self.placement {
            Placement::ReplicasInNode => (w % self.m, w / self.m),
            Placement::ReplicasAcrossNodes => (w / self.n, w % self.n),
        }
    }

    /// World rank of rank `r` of sharding group `g`.
    pub fn world_rank(&self, g: usize, r: usize) -> usize {
        match self.placement {
            Placement::ReplicasInNode => r * self.m + g,
            Placement::ReplicasAcrossNodes => g * self.n + r,
        }
    }

    /// World ranks of sharding group `g`, by rank in the group.
    pub fn sharding_group(&self, g: usize) -> Vec<usize> {
        (0..self.n).map(|r| self.world_rank(g, r)).collect()
    }

    /// World ranks of replica group `r` (the ranks holding shard set r), by replica index.
    pub fn replica_group(&self, r: usize) -> Vec<usize> {
        (0..self.m).map(|g| self.world_rank(g, r)).collect()
    }

    /// The global batch's sample range that world rank `w` owns within a batch of `b` samples:
    /// [g·B/M + r·B/T, g·B/M + (r+1)·B/T).
    pub fn sample_range(&self, w: usize, b: usize) -> std::ops::Range<usize> {
        let (g, r) = self.coords(w);
        let per = b / self.world();
        let start = g * (b / self.m) + r * per;
        start..start + per
    }

    /// A human-readable description of the groups (logged at start).
    pub fn describe(&self) -> String {
        let sg: Vec<String> = (0..self.m).map(|g| format!("{:?}", self.sharding_group(g))).collect();
        let rg: Vec<String> = (0..self.n).map(|r| format!("{:?}", self.replica_group(r))).collect();
        format!("grid {}x{} ({}): sharding groups {}; replica groups {}", self.m, self.n, self.placement, sg.join(" "), rg.join(" "))
    }
}

/// One rank's three communicators.
pub struct GridComms {
    pub grid: Grid,
    pub world: Comm,
    /// The N ranks of this rank's sharding group (rank = position in the group).
    pub shard: Comm,
    /// The M ranks holding the same shards (rank = replica index g).
    pub replica: Comm,
}

impl GridComms {
    /// Split `world` into sharding- and replica-group communicators. M·N must equal the world size.
    pub fn new(grid: Grid, world: Comm) -> Result<Self> {
        if grid.world() != world.size() {
            return Err(Error::Config(format!(
                "grid {}x{} needs {} ranks but the world has {}",
                grid.m,
                grid.n,
                grid.world(),
                world.size()
            )));
        }
        let (g, r) = grid.coords(world.rank());
        let shard = world.split(g as u32, r as i64)?;
        let replica = world.split(r as u32, g as i64)?;
        Ok(GridComms { grid, world, shard, replica })
    }
    /// (g, r) of this rank.
    pub fn coords(&self) -> (usize, usize) {
        self.grid.coords(self.world.rank())
    }
}
