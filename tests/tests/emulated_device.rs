//! The 2D step's device code path, run on the emulated device backend (host memory that host
//! code reaches only through the backend's counted copies):
//!
//! * a replica sync moves exactly the touched rows: the host↔device bytes the backend counts
//!   during the syncs equal what the batches and the plan say (the union over replicas of each
//!   shard's touched local rows, times row bytes and state bytes, plus the row indices), per
//!   direction and per buffer transport — with peers the packed values never touch the host,
//!   staged they go down and up once; full sync: every row;
//! * training under the emulated backend is bitwise the CPU backend's (every step's loss, the
//!   final shards, optimizer state and dense parameters, NE) on every path.
use ember_engine::backend::{Cpu, Emulated, HostDeviceBytes};
use ember_engine::config::{preset, EmbOptimizer, Pooling, TrainConfig};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::data::Batch;
use ember_engine::grid::{Grid, Placement};
use ember_engine::parallel::driver::{Job, Report2D, RankState};
use ember_engine::parallel::route::slots_of;
use ember_engine::parallel::{ParallelOptions, SyncMode, XferKind};
use ember_engine::plan::{Plan, ShardingType};
use ember_tests::two_d::cycling_plan;
use std::collections::BTreeSet;

/// Bytes of one row index as the sync uploads it (`Buffers::upload_ids` takes u64).
const INDEX_BYTES: u64 = 8;

fn config(batch: usize, rows: u64, opt: EmbOptimizer) -> TrainConfig {
    let mut cfg = preset("tiny", Some(rows)).unwrap();
    cfg.batch_size = batch;
    cfg.optim.embedding = opt;
    cfg.synthetic.eval_samples = 128;
    for (t, tc) in cfg.model.tables.iter_mut().enumerate() {
        if t % 2 == 1 {
            tc.pooling = Pooling::Mean;
        }
    }
    cfg
}

fn rowwise() -> EmbOptimizer {
    EmbOptimizer::RowWiseAdagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false }
}

/// Optimizer-state floats per row of a shard with `cols` columns.
fn state_per_row(opt: &EmbOptimizer, cols: usize) -> u64 {
    match opt {
        EmbOptimizer::Sgd { .. } => 0,
        EmbOptimizer::RowWiseAdagrad { .. } => 1,
        EmbOptimizer::Adagrad { .. } => cols as u64,
    }
}

/// A 2D run of `steps` steps on the controlled batches `batches[step][world rank]`.
fn train<B: ember_engine::backend::Backend>(
    cfg: &TrainConfig,
    grid: Grid,
    plan: &Plan,
    opts: &ParallelOptions,
    batches: &[Vec<Batch>],
    new_be: &(dyn Fn(usize) -> ember_engine::Result<B> + Sync),
) -> (Report2D, Vec<RankState>) {
    let feed = |step: usize, w: usize| Ok(batches[step][w].clone());
    let eval = SyntheticData::new(cfg).unwrap().eval_batch();
    let (rep, states, _) = Job::new(cfg, grid, plan, opts, batches.len()).data(&feed, &eval).train(new_be).unwrap();
    (rep, states)
}

/// Every rank's part of every global batch, from the synthetic stream (the driver's layout).
fn batches(cfg: &TrainConfig, grid: Grid, steps: usize) -> Vec<Vec<Batch>> {
    let d = SyntheticData::new(cfg).unwrap();
    (0..steps)
        .map(|s| {
            (0..grid.world())
                .map(|w| {
                    let r = grid.sample_range(w, cfg.batch_size);
                    d.samples((s * cfg.batch_size + r.start) as u64, r.len())
                })
                .collect()
        })
        .collect()
}

/// Local rows of each of group rank `r`'s shards that any replica touched during `steps`
/// (batches of sharding group g: its ranks' parts), the union over the replicas.
fn touched_union(plan: &Plan, grid: Grid, batches: &[Vec<Batch>], steps: std::ops::Range<usize>, r: usize) -> Vec<BTreeSet<u64>> {
    slots_of(plan, r)
        .iter()
        .map(|slot| {
            let mut u = BTreeSet::new();
            for step in steps.clone() {
                for w in 0..grid.world() {
                    for &id in &batches[step][w].sparse[slot.table].values {
                        if slot.rows.contains(&id) {
                            u.insert(id - slot.rows.start);
                        }
                    }
                }
            }
            u
        })
        .collect()
}

/// The host↔device bytes the syncs of a run must move on group rank `r` (K = 1: one sync per
/// step), from the batches and the plan alone.
fn expected(cfg: &TrainConfig, grid: Grid, plan: &Plan, batches: &[Vec<Batch>], r: usize, staged: bool, full: bool, delayed: bool) -> HostDeviceBytes {
    let slots = slots_of(plan, r);
    let mut e = HostDeviceBytes::default();
    let mut prev: Option<Vec<u64>> = None;
    for step in 0..batches.len() {
        let rows: Vec<u64> = if full {
            slots.iter().map(|s| s.rows.end - s.rows.start).collect()
        } else {
            touched_union(plan, grid, batches, step..step + 1, r).iter().map(|u| u.len() as u64).collect()
        };
        let mut values = 0; // packed floats the sync averages on the device
        let mut state = 0; // packed state floats of the delayed average
        for (s, &n) in slots.iter().zip(&rows) {
            let (cols, spr) = (s.cols.len() as u64, state_per_row(&cfg.optim.embedding, s.cols.len()));
            values += n * (cols + if delayed { 0 } else { spr });
            state += n * spr;
        }
        let ids: u64 = rows.iter().sum::<u64>() * INDEX_BYTES;
        // The weights (and, not delayed, state) average: indices up; values down and up staged.
        e.host_to_device += ids + if staged { values * 4 } else { 0 };
        e.device_to_host += if staged { values * 4 } else { 0 };
        if delayed {
            // The previous sync's state average applied: its rows' indices up, its packed state
            // down and up; this sync's state snapshot: indices up, packed state down.
            if let Some(p) = &prev {
                let (pn, ps): (u64, u64) = (p[0], p[1]);
                e.host_to_device += pn * INDEX_BYTES + ps * 4;
                e.device_to_host += ps * 4;
            }
            e.host_to_device += ids;
            e.device_to_host += state * 4;
            prev = Some(vec![rows.iter().sum(), state]);
        }
    }
    e
}

/// Replica sync on the device path moves exactly the touched rows: the counted host↔device
/// bytes of every rank's syncs equal the batches' and plan's figure, per direction, for peers
/// and staged transports, sparse and full sync, delayed state sync; every sharding type in the
/// plan; grids 2x2, 4x1 and 2x4. Element-wise AdaGrad makes state as wide as a row.
#[test]
fn device_sync_moves_exactly_the_touched_rows() {
    let steps = 3;
    let cases = [
        (2, 2, XferKind::Auto, SyncMode::Sparse, false, rowwise()),
        (2, 2, XferKind::Staged, SyncMode::Sparse, false, rowwise()),
        (2, 2, XferKind::Auto, SyncMode::Full, false, rowwise()),
        (2, 2, XferKind::Staged, SyncMode::Full, false, EmbOptimizer::Adagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false }),
        (2, 2, XferKind::Auto, SyncMode::Sparse, true, rowwise()),
        (2, 2, XferKind::Staged, SyncMode::Sparse, true, EmbOptimizer::Adagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false }),
        (4, 1, XferKind::Auto, SyncMode::Sparse, false, rowwise()),
        (4, 1, XferKind::Staged, SyncMode::Sparse, true, rowwise()),
        (2, 4, XferKind::Auto, SyncMode::Sparse, false, EmbOptimizer::Sgd { lr: 0.1 }),
        (2, 4, XferKind::Staged, SyncMode::Sparse, false, rowwise()),
        // Full tables: ~2.9 M floats a sync, several packed chunks of unequal length.
        (2, 1, XferKind::Staged, SyncMode::Full, false, rowwise()),
        (2, 1, XferKind::Auto, SyncMode::Full, true, rowwise()),
    ];
    for (m, n, xfer, sync, delayed, opt) in cases {
        let what = format!("{m}x{n} {xfer:?} {sync:?} delayed={delayed} {opt:?}");
        let cfg = config(16 * m * n, if m * n == 2 { 100_000 } else { 3000 }, opt);
        let grid = Grid::new(m, n, Placement::ReplicasInNode).unwrap();
        let plan = cycling_plan(&cfg, n, &ShardingType::ALL);
        let opts = ParallelOptions { sync_every: 1, sync, delayed_state_sync: delayed, xfer, ..ParallelOptions::default() };
        let data = batches(&cfg, grid, steps);
        let (rep, states) = train(&cfg, grid, &plan, &opts, &data, &|_| Ok(Emulated::new()));
        for st in &states {
            let (_, r) = st.coords;
            let want = expected(&cfg, grid, &plan, &data, r, xfer == XferKind::Staged, sync == SyncMode::Full, delayed);
            let got = st.bytes.sync_host_device.expect("the emulated backend counts");
            assert_eq!((got.host_to_device, got.device_to_host), (want.host_to_device, want.device_to_host), "{what}: rank {} sync bytes", st.world_rank);
            // The step moves more than the sync (its inputs, the loss), and is counted too.
            assert!(st.host_device.expect("counted").host_to_device > got.host_to_device, "{what}");
        }
        // The report carries rank 0's per-step figures.
        let per = rep.sync_host_device_bytes_per_step.expect("reported");
        assert_eq!(per, states[0].bytes.sync_host_device.unwrap().per(steps as u64), "{what}");
        assert!(rep.host_device_bytes_per_step.is_some());
        // Touched rows really are sparse here: a full sync would move more.
        if sync == SyncMode::Sparse && !delayed {
            let full = expected(&cfg, grid, &plan, &data, states[0].coords.1, xfer == XferKind::Staged, true, false);
            assert!(full.host_to_device > states[0].bytes.sync_host_device.unwrap().host_to_device, "{what}: no sparsity to test");
        }
    }
}

fn bits32(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bits64(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Training under the emulated device backend is bitwise the CPU backend's: every step's loss,
/// NE and AUC, every shard's weights and optimizer state and the dense parameters, at 1x1, 2x2
/// and 4x1, on the peers and staged transports, sparse and full sync, K = 1 and 2, delayed
/// state sync.
#[test]
fn training_is_bitwise_the_cpu_backend() {
    let steps = 6;
    for (m, n) in [(1, 1), (2, 2), (4, 1)] {
        let grid = Grid::new(m, n, Placement::ReplicasInNode).unwrap();
        let cfg = config(16 * m * n, 2000, rowwise());
        let plan = cycling_plan(&cfg, n, &ShardingType::ALL);
        let data = batches(&cfg, grid, steps);
        let (want_rep, want) = train(&cfg, grid, &plan, &ParallelOptions::default(), &data, &|_| Ok(Cpu::new()));
        for (xfer, sync, k, delayed) in [
            (XferKind::Auto, SyncMode::Sparse, 1, false),
            (XferKind::Staged, SyncMode::Sparse, 1, false),
            (XferKind::Host, SyncMode::Full, 1, false),
            (XferKind::Auto, SyncMode::Sparse, 2, true),
            (XferKind::Staged, SyncMode::Full, 2, true),
        ] {
            let what = format!("{m}x{n} {xfer:?} {sync:?} K={k} delayed={delayed}");
            let opts = ParallelOptions { sync_every: k, sync, delayed_state_sync: delayed, xfer, ..ParallelOptions::default() };
            let cpu_opts = ParallelOptions { xfer: XferKind::Auto, ..opts.clone() };
            // The CPU reference with the same sync options (its host path, zero-copy).
            let (want_rep, want) = if (k, sync, delayed) == (1, SyncMode::Sparse, false) {
                (want_rep.clone(), clone_states(&want))
            } else {
                train(&cfg, grid, &plan, &cpu_opts, &data, &|_| Ok(Cpu::new()))
            };
            let (got_rep, got) = train(&cfg, grid, &plan, &opts, &data, &|_| Ok(Emulated::new()));
            assert_eq!(bits64(&got_rep.losses), bits64(&want_rep.losses), "{what}: losses {:?} vs {:?}", got_rep.losses, want_rep.losses);
            assert_eq!((got_rep.ne.to_bits(), got_rep.auc.to_bits()), (want_rep.ne.to_bits(), want_rep.auc.to_bits()), "{what}: NE/AUC");
            assert!(got_rep.replicas_identical, "{what}");
            for (a, b) in got.iter().zip(&want) {
                for (i, ((sa, wa, va), (sb, wb, vb))) in a.shards.iter().zip(&b.shards).enumerate() {
                    assert_eq!(sa, sb);
                    assert!(bits32(wa) == bits32(wb), "{what}: rank {} shard {i} weights differ", a.world_rank);
                    assert!(bits32(va) == bits32(vb), "{what}: rank {} shard {i} optimizer state differs", a.world_rank);
                }
                for (i, (pa, pb)) in a.dense.iter().zip(&b.dense).enumerate() {
                    assert!(bits32(pa) == bits32(pb), "{what}: rank {} dense parameter {i} differs", a.world_rank);
                }
            }
        }
    }
}

fn clone_states(s: &[RankState]) -> Vec<RankState> {
    s.iter()
        .map(|r| RankState { world_rank: r.world_rank, coords: r.coords, shards: r.shards.clone(), dense: r.dense.clone(), times: r.times.clone(), bytes: r.bytes.clone(), host_device: r.host_device })
        .collect()
}
