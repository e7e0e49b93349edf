//! AdaGrad relations of BRIEF.md §3 under 2D, and the replica sync's numerics.
use ember_engine::backend::{Buffers, Cpu, EmbUpdate, ShardSpec};
use ember_engine::config::{preset, DenseOptimizer, EmbOptimizer, TrainConfig, WeightDecay};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::embedding::new_shard;
use ember_engine::grid::{Grid, Placement};
use ember_engine::model::Dlrm;
use ember_engine::parallel::driver::Job;
use ember_engine::parallel::route::Touched;
use ember_engine::parallel::sync::replica_sync;
use ember_engine::parallel::{ParallelOptions, SyncMode, Xfer};
use ember_engine::plan::{Plan, ShardingType};
use ember_tests::two_d::{assemble, cycling_plan, rel_err};

fn cfg(emb: EmbOptimizer, batch: usize) -> TrainConfig {
    let mut c = preset("tiny", Some(3000)).unwrap();
    c.batch_size = batch;
    c.optim.embedding = emb;
    c.optim.dense = DenseOptimizer::Sgd { lr: 0.05 };
    c.synthetic.eval_samples = 128;
    c
}

fn mixed_plan(c: &TrainConfig, n: usize) -> Plan {
    cycling_plan(c, n, &[ShardingType::TableWise, ShardingType::RowWise, ShardingType::ColumnWise])
}

fn rowwise(lr: f32, eps: f32, c: Option<f32>) -> EmbOptimizer {
    EmbOptimizer::RowWiseAdagrad { lr, eps, c, eps_inside: false }
}

#[test]
fn full_sharding_with_column_shards_equals_one_process_for_rowwise_adagrad() {
    // M = 1: no replicas, so any optimizer must match one process; column-wise shards must
    // combine their partial sums of squares so v is the whole row's.
    let c = cfg(rowwise(0.1, 1e-8, None), 64);
    let steps = 5;
    let be = Cpu::new();
    let data = SyntheticData::new(&c).unwrap();
    let mut m = Dlrm::new(&be, &c).unwrap();
    for s in 0..steps {
        m.train_step(&be, &data.samples((s * c.batch_size) as u64, c.batch_size)).unwrap();
    }
    let grid = Grid::new(1, 4, Placement::ReplicasInNode).unwrap();
    let (_, states, _) = Job::new(&c, grid, &mixed_plan(&c, 4), &ParallelOptions::default(), steps).train(&|_| Ok(Cpu::new())).unwrap();
    for (t, (a, b)) in assemble(&c, &states, 0).iter().zip(&m.tables).enumerate() {
        let e = rel_err(a, &b.weights);
        assert!(e <= 1e-5, "table {t}: {e:e}");
    }
}

#[test]
fn rowwise_adagrad_c1_identical_group_batches_equals_full_sharding() {
    // Every sharding group gets the same B/M samples: 2D (M = 2, c = 1) equals full sharding
    // on that batch.
    let m = 2;
    let n = 2;
    let bx = 32; // samples per group
    let c2d = cfg(rowwise(0.1, 1e-8, Some(1.0)), bx * m);
    let cfs = cfg(rowwise(0.1, 1e-8, Some(1.0)), bx);
    let data = SyntheticData::new(&cfs).unwrap();
    let b = bx / n;
    let steps = 4;
    let eval = data.eval_batch();
    let g2 = Grid::new(m, n, Placement::ReplicasInNode).unwrap();
    let feed2 = |step: usize, w: usize| {
        let (_, r) = g2.coords(w);
        Ok(data.samples((step * bx + r * b) as u64, b))
    };
    let plan = mixed_plan(&c2d, n);
    let (_, s2d, _) = Job::new(&c2d, g2, &plan, &ParallelOptions::default(), steps).data(&feed2, &eval).train(&|_| Ok(Cpu::new())).unwrap();
    let g1 = Grid::new(1, n, Placement::ReplicasInNode).unwrap();
    let feed1 = |step: usize, w: usize| Ok(data.samples((step * bx + w * b) as u64, b));
    let (_, s1, _) = Job::new(&cfs, g1, &plan, &ParallelOptions::default(), steps).data(&feed1, &eval).train(&|_| Ok(Cpu::new())).unwrap();
    for (t, (a, b)) in assemble(&c2d, &s2d, 1).iter().zip(&assemble(&cfs, &s1, 0)).enumerate() {
        let e = rel_err(a, b);
        assert!(e <= 1e-5, "table {t}: {e:e}");
    }
}

#[test]
fn momentum_scaling_c_equals_scaled_lr_and_eps() {
    // c = M equals c = 1 with lr·√M and eps·√M (eps outside the sqrt), step for step.
    let m = 4usize;
    let grid = Grid::new(m, 1, Placement::ReplicasInNode).unwrap();
    for emb in [
        (rowwise(0.1, 1e-3, None), rowwise(0.1 * 2.0, 1e-3 * 2.0, Some(1.0))),
        (
            EmbOptimizer::Adagrad { lr: 0.1, eps: 1e-3, c: None, eps_inside: false },
            EmbOptimizer::Adagrad { lr: 0.2, eps: 2e-3, c: Some(1.0), eps_inside: false },
        ),
    ] {
        let (ca, cb) = (cfg(emb.0, 64), cfg(emb.1, 64));
        let plan = mixed_plan(&ca, 1);
        let (ra, sa, _) = Job::new(&ca, grid, &plan, &ParallelOptions::default(), 5).train(&|_| Ok(Cpu::new())).unwrap();
        let (rb, sb, _) = Job::new(&cb, grid, &plan, &ParallelOptions::default(), 5).train(&|_| Ok(Cpu::new())).unwrap();
        for (la, lb) in ra.losses.iter().zip(&rb.losses) {
            assert!((la - lb).abs() <= 1e-5 * la.abs(), "losses {la} vs {lb}");
        }
        for (t, (a, b)) in assemble(&ca, &sa, 0).iter().zip(&assemble(&cb, &sb, 0)).enumerate() {
            let e = rel_err(a, b);
            assert!(e <= 1e-5, "{:?} table {t}: {e:e}", emb.0);
        }
    }
}

#[test]
fn sync_is_bitwise_identical_and_within_one_ulp_of_the_f64_mean() {
    // Through the host transport (f64 values), and on the buffers themselves through the
    // in-process fabric (packed f32 rows, summed in f64 by the backend's reduce hook).
    for (mode, xfer) in [SyncMode::Sparse, SyncMode::Full].into_iter().flat_map(|m| [(m, Xfer::Host { stage: false }), (m, Xfer::Peers)]) {
        let m = 3;
        let upd = EmbUpdate::new(&rowwise(0.1, 1e-8, None), &WeightDecay::None, m as f32);
        let spec = ShardSpec { table: 0, table_rows: 50, dim: 8, rows: 10..50, cols: 0..8 };
        let world = ember_transport::local_world(m);
        let out: Vec<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = world
                .into_iter()
                .map(|comm| {
                    let spec = spec.clone();
                    s.spawn(move || {
                        let be = Cpu::new();
                        if xfer == Xfer::Peers {
                            comm.set_direct_copy(be.direct_copy()).unwrap();
                        }
                        let r = comm.rank();
                        let mut shard = new_shard(&be, 3, spec.clone(), &upd).unwrap();
                        let mut touched = vec![Touched::new(spec.num_rows())];
                        // Each replica perturbs its own rows (odd rows by all, some by one).
                        let rows: Vec<u64> = (0..40u64).filter(|i| i % 2 == 1 || i % 7 == r as u64).collect();
                        for &i in &rows {
                            for j in 0..8 {
                                shard.weights[i as usize * 8 + j] += (r as f32 + 1.0) * 0.1234567 * (j as f32 - 3.3);
                            }
                            shard.state[i as usize] += 0.37 * (r as f32 + 1.0);
                        }
                        touched[0].mark(&rows);
                        let (pre_w, pre_s) = (shard.weights.clone(), shard.state.clone());
                        replica_sync(&be, &comm, std::slice::from_mut(&mut shard), &mut touched, mode, None, xfer).unwrap();
                        (pre_w, pre_s, be.download(&shard.weights).unwrap(), be.download(&shard.state).unwrap())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for k in 0..out[0].2.len() {
            let mean: f64 = out.iter().map(|o| o.0[k] as f64).sum::<f64>() / m as f64;
            let got = out[0].2[k];
            for o in &out {
                assert_eq!(o.2[k].to_bits(), got.to_bits(), "replicas differ at {k}");
            }
            let ulp = (got.abs() * f32::EPSILON).max(f32::MIN_POSITIVE);
            assert!(((got as f64) - mean).abs() <= ulp as f64, "{mode:?} {xfer:?}: element {k}: {got} vs f64 mean {mean}");
            if out.iter().all(|o| o.0[k] == out[0].0[k]) {
                assert_eq!(got.to_bits(), out[0].0[k].to_bits(), "identical values must stay identical");
            }
        }
        for k in 0..out[0].3.len() {
            let mean: f64 = out.iter().map(|o| o.1[k] as f64).sum::<f64>() / m as f64;
            let got = out[0].3[k];
            for o in &out {
                assert_eq!(o.3[k].to_bits(), got.to_bits(), "{mode:?}: replicas' optimizer state differs at row {k}");
            }
            assert!(((got as f64) - mean).abs() <= (got.abs() * f32::EPSILON) as f64 + 1e-30, "state {k}");
        }
    }
}

#[test]
fn delayed_state_sync_applies_the_previous_average_plus_local_increments() {
    use ember_engine::parallel::sync::apply_pending;
    let m = 2;
    let upd = EmbUpdate::new(&rowwise(0.1, 1e-8, None), &WeightDecay::None, m as f32);
    let spec = ShardSpec { table: 0, table_rows: 6, dim: 4, rows: 0..6, cols: 0..4 };
    let world = ember_transport::local_world(m);
    let out: Vec<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let hs: Vec<_> = world
            .into_iter()
            .map(|comm| {
                let spec = spec.clone();
                s.spawn(move || {
                    let be = Cpu::new();
                    let r = comm.rank() as f32;
                    let mut shard = new_shard(&be, 3, spec.clone(), &upd).unwrap();
                    let mut touched = vec![Touched::new(6)];
                    let mut pending = None;
                    // Before sync 1: v = 1 + r on every row.
                    shard.state.iter_mut().for_each(|v| *v = 1.0 + r);
                    shard.weights.iter_mut().for_each(|w| *w += r);
                    touched[0].mark(&[0, 1, 2, 3, 4, 5]);
                    replica_sync(&be, &comm, std::slice::from_mut(&mut shard), &mut touched, SyncMode::Full, Some(&mut pending), Xfer::Host { stage: false }).unwrap();
                    let after1 = (shard.state.clone(), shard.weights.clone());
                    // Local increments during the interval: +10·(r+1) on row 2 only.
                    shard.state[2] += 10.0 * (r + 1.0);
                    touched[0].mark(&[2]);
                    replica_sync(&be, &comm, std::slice::from_mut(&mut shard), &mut touched, SyncMode::Full, Some(&mut pending), Xfer::Host { stage: false }).unwrap();
                    apply_pending(&be, std::slice::from_mut(&mut shard), pending.take().unwrap()).unwrap();
                    (after1.0, after1.1, shard.state.clone(), shard.weights.clone())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, o) in out.iter().enumerate() {
        // Sync 1 averaged the weights at once but left the state for later.
        assert!(o.0.iter().all(|&v| v == 1.0 + r as f32), "state must not change at the sync that starts its average");
        assert_eq!(o.1, out[0].1, "weights are averaged at every sync");
        // Sync 2 applied sync 1's average (1.5) plus the local increment; then the pending
        // average of sync 2 (taken after the first was applied: 1.5 + increments) replaced it.
        let mean2 = 1.5 + (10.0 + 20.0) / 2.0;
        assert_eq!(o.2[2], mean2, "row 2 after both averages");
        assert_eq!(o.2[0], 1.5, "row 0 after both averages");
    }
}

/// One sparse sync moves exactly the touched-union rows as packed f32 values: its value bytes
/// are 4 × Σ_shards |union| × (cols + state per row) on every buffer transport (with delayed
/// state sync the state travels as f64: 8 bytes a value, weights still 4); touched rows end
/// at the f64 mean rounded once, bitwise the same on every path, untouched rows unchanged.
#[test]
fn one_sync_moves_exactly_the_touched_union_rows_as_f32() {
    use ember_engine::config::EmbOptimizer;
    let m = 3;
    // Two shards: row-wise AdaGrad (1 state float a row), element-wise AdaGrad (cols a row).
    let shards = [
        (ShardSpec { table: 0, table_rows: 40, dim: 8, rows: 0..40, cols: 0..8 }, rowwise(0.1, 1e-8, None)),
        (ShardSpec { table: 1, table_rows: 30, dim: 4, rows: 10..30, cols: 0..4 }, EmbOptimizer::Adagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false }),
    ];
    // Replica r touches rows r, r+3, ... below 10 of shard 0 and row 2r+1 of shard 1.
    let touched_rows = |r: usize| -> [Vec<u64>; 2] { [(r as u64..10).step_by(3).collect(), vec![2 * r as u64 + 1]] };
    let union: [Vec<u64>; 2] = [(0..10).collect(), vec![1, 3, 5]];
    let f32_values: usize = union[0].len() * (8 + 1) + union[1].len() * (4 + 4);
    let run = |xfer: Xfer, delayed: bool| -> Vec<(u64, Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>)> {
        let world = ember_transport::local_world(m);
        std::thread::scope(|s| {
            let hs: Vec<_> = world
                .into_iter()
                .map(|comm| {
                    let shards = shards.clone();
                    s.spawn(move || {
                        let be = Cpu::new();
                        if xfer == Xfer::Peers {
                            comm.set_direct_copy(be.direct_copy()).unwrap();
                        }
                        let r = comm.rank();
                        let mut sh: Vec<_> = shards.iter().map(|(spec, opt)| new_shard(&be, 5, spec.clone(), &EmbUpdate::new(opt, &WeightDecay::None, 1.0)).unwrap()).collect();
                        let mut touched: Vec<Touched> = sh.iter().map(|s| Touched::new(s.spec.num_rows())).collect();
                        for ((s, t), rows) in sh.iter_mut().zip(touched.iter_mut()).zip(touched_rows(r)) {
                            let (cols, spr) = (s.spec.num_cols(), s.state.len() / s.spec.num_rows());
                            for &i in &rows {
                                let i = i as usize;
                                s.weights[i * cols..(i + 1) * cols].iter_mut().enumerate().for_each(|(j, w)| *w += (r as f32 + 1.0) * 0.173 * (j as f32 - 1.7));
                                s.state[i * spr..(i + 1) * spr].iter_mut().for_each(|v| *v += 0.31 * (r as f32 + 1.0));
                            }
                            t.mark(&rows);
                        }
                        let pre: Vec<Vec<f32>> = sh.iter().map(|s| s.weights.clone()).collect();
                        let mut pending = None;
                        let stats = replica_sync(&be, &comm, &mut sh, &mut touched, SyncMode::Sparse, delayed.then_some(&mut pending), xfer).unwrap();
                        (stats.value_bytes, pre, sh.iter().map(|s| s.weights.clone()).collect(), sh.iter().map(|s| s.state.clone()).collect())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let reference = run(Xfer::Host { stage: false }, false);
    for (xfer, delayed) in [(Xfer::Host { stage: false }, false), (Xfer::Host { stage: true }, false), (Xfer::Peers, false), (Xfer::Host { stage: false }, true), (Xfer::Host { stage: true }, true)] {
        let out = run(xfer, delayed);
        let want = if delayed { 4 * (union[0].len() * 8 + union[1].len() * 4) + 8 * (union[0].len() + union[1].len() * 4) } else { 4 * f32_values };
        for (r, o) in out.iter().enumerate() {
            assert_eq!(o.0, want as u64, "{xfer:?} delayed={delayed} rank {r}: value bytes of one sync");
            for (sh, w) in o.2.iter().enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(w), bits(&reference[0].2[sh]), "{xfer:?} delayed={delayed} rank {r} shard {sh}: weights differ from the zero-copy host path");
            }
        }
    }
    // The reference itself: the f64 mean rounded once on the union's rows, the rest untouched.
    for (sh, rows) in union.iter().enumerate() {
        let cols = shards[sh].0.num_cols();
        for (k, &got) in reference[0].2[sh].iter().enumerate() {
            let want = if rows.contains(&((k / cols) as u64)) { (reference.iter().map(|o| o.1[sh][k] as f64).sum::<f64>() / m as f64) as f32 } else { reference[0].1[sh][k] };
            assert_eq!(got.to_bits(), want.to_bits(), "shard {sh} element {k}");
        }
    }
}
