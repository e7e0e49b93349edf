//! The replica sync in flight beside the dense update (engine/src/parallel/sync.rs
//! `replica_sync_beside`), and the touched rows it sends in narrow index types.
//!
//! Oracle for the overlap: the same run with `overlap_sync: OverlapSync::Off`, which runs the sync after the
//! dense update (the order the step had before the overlap): losses, NE, every shard's weights
//! and optimizer state and every dense parameter must agree bitwise, on grids 2x2, 4x1 and 2x4,
//! sparse and full sync, delayed state sync, and the staged and peer-to-peer buffer transports. A peer that dies
//! while the sync is in flight fails the others with an error naming it, within the deadline.
use ember_engine::backend::{Buffers, Cpu, EmbUpdate, ShardSpec};
use ember_engine::config::{preset, EmbOptimizer, Pooling, TrainConfig, WeightDecay};
use ember_engine::embedding::new_shard;
use ember_engine::grid::{Grid, Placement};
use ember_engine::parallel::driver::{Job, RankState};
use ember_engine::parallel::route::Touched;
use ember_engine::parallel::sync::{decode_touched, replica_sync, replica_sync_beside};
use ember_engine::parallel::{OverlapSync, ParallelOptions, SyncMode, Xfer, XferKind};
use ember_engine::plan::{index_width, ShardingType};
use ember_tests::two_d::{assert_bitwise_same, cycling_plan};
use std::time::{Duration, Instant};

fn config(batch: usize) -> TrainConfig {
    let mut cfg = preset("tiny", Some(2000)).unwrap();
    cfg.batch_size = batch;
    cfg.optim.embedding = EmbOptimizer::RowWiseAdagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false };
    cfg.synthetic.eval_samples = 128;
    for (t, tc) in cfg.model.tables.iter_mut().enumerate() {
        if t % 2 == 1 {
            tc.pooling = Pooling::Mean;
        }
    }
    cfg
}

/// Losses, NE and every rank's final state of a 5-step run.
fn run(m: usize, n: usize, opts: &ParallelOptions) -> (Vec<f64>, f64, Vec<RankState>) {
    let cfg = config(8 * m * n);
    let grid = Grid::new(m, n, Placement::ReplicasInNode).unwrap();
    let plan = cycling_plan(&cfg, n, &ShardingType::ALL);
    let (report, states, _) = Job::new(&cfg, grid, &plan, opts, 5).train(&|_| Ok(Cpu::new())).unwrap();
    assert!(report.replicas_identical);
    (report.losses, report.ne, states)
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn assert_same(what: &str, a: &(Vec<f64>, f64, Vec<RankState>), b: &(Vec<f64>, f64, Vec<RankState>)) {
    assert_eq!(a.1.to_bits(), b.1.to_bits(), "{what}: NE {} vs {}", a.1, b.1);
    assert_bitwise_same(what, (&a.0, &b.0), &a.2, &b.2);
}

#[test]
fn the_sync_beside_the_dense_update_trains_bitwise_like_the_sync_after_it() {
    let cases: [(usize, usize, SyncMode, bool, XferKind, usize); 8] = [
        (2, 2, SyncMode::Sparse, false, XferKind::Host, 1),
        (4, 1, SyncMode::Sparse, false, XferKind::Host, 1),
        (2, 4, SyncMode::Sparse, false, XferKind::Host, 1),
        (2, 2, SyncMode::Full, false, XferKind::Host, 1),
        (4, 1, SyncMode::Sparse, true, XferKind::Host, 2),
        (2, 2, SyncMode::Sparse, true, XferKind::Staged, 1),
        (2, 4, SyncMode::Full, false, XferKind::Staged, 2),
        (2, 2, SyncMode::Sparse, true, XferKind::Peers, 1),
    ];
    for (m, n, sync, delayed, xfer, k) in cases {
        let opts = |overlap| ParallelOptions { sync_every: k, sync, delayed_state_sync: delayed, xfer, overlap_sync: if overlap { OverlapSync::On } else { OverlapSync::Off }, ..ParallelOptions::default() };
        let after = run(m, n, &opts(false));
        assert!(after.0.iter().all(|l| l.is_finite()) && after.1.is_finite());
        let beside = run(m, n, &opts(true));
        assert_same(&format!("{m}x{n} {sync:?} delayed={delayed} {xfer:?} K={k}"), &beside, &after);
    }
}

#[test]
fn index_widths_are_the_narrowest_that_hold_the_rows() {
    assert_eq!(index_width(0), 2);
    assert_eq!(index_width(65_535), 2);
    assert_eq!(index_width(65_536), 4);
    assert_eq!(index_width(u32::MAX as u64), 4);
    assert_eq!(index_width(u32::MAX as u64 + 1), 8);
}

/// A sparse sync's index bytes: per shard, its touched rows and their count, in the shard's
/// width (2 bytes for a 40-row shard, 4 for a 70 000-row one), or the count and a bitmap when
/// that is smaller (48 of a 64-row shard's rows: 8 bytes instead of 96); values as before, and
/// the densely touched shard averaged like an f64 oracle.
#[test]
fn a_sync_sends_each_shards_touched_rows_in_its_index_width() {
    let m = 2;
    let upd = EmbUpdate::new(&EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false }, &WeightDecay::None, 1.0);
    let specs = [
        ShardSpec { table: 0, table_rows: 40, dim: 4, rows: 0..40, cols: 0..4 },
        ShardSpec { table: 1, table_rows: 70_000, dim: 2, rows: 0..70_000, cols: 0..2 },
        ShardSpec { table: 2, table_rows: 64, dim: 1, rows: 0..64, cols: 0..1 },
    ];
    // Replica r touches rows {r, 5} of shard 0, {69_999 − r, 66_000, 7} of shard 1 and every
    // row i of shard 2 with i % 4 != r (48 rows; together all 64).
    let rows = |r: u64| [vec![r, 5], vec![7, 66_000, 69_999 - r], (0..64).filter(|i| i % 4 != r).collect::<Vec<u64>>()];
    let world = ember_transport::local_world(m);
    let out: Vec<(u64, u64, Vec<Vec<f32>>)> = std::thread::scope(|s| {
        let hs: Vec<_> = world
            .into_iter()
            .map(|comm| {
                let specs = specs.clone();
                s.spawn(move || {
                    let be = Cpu::new();
                    let r = comm.rank() as u64;
                    let mut sh: Vec<_> = specs.iter().map(|spec| new_shard(&be, 7, spec.clone(), &upd).unwrap()).collect();
                    let mut touched: Vec<Touched> = specs.iter().map(|s| Touched::new(s.num_rows())).collect();
                    for ((s, t), rows) in sh.iter_mut().zip(touched.iter_mut()).zip(rows(r)) {
                        let cols = s.spec.num_cols();
                        for &i in &rows {
                            s.weights[i as usize * cols] += 1.0 + r as f32;
                        }
                        t.mark(&rows);
                    }
                    let st = replica_sync(&be, &comm, &mut sh, &mut touched, SyncMode::Sparse, None, Xfer::Host { stage: false }).unwrap();
                    (st.index_bytes, st.value_bytes, sh.iter().map(|s| be.download(&s.weights).unwrap()).collect())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let be = Cpu::new();
    let initial = be.download(&new_shard(&be, 7, specs[2].clone(), &upd).unwrap().weights).unwrap();
    let oracle: Vec<u32> = (0..64u64)
        .map(|i| {
            let w = |r: u64| (initial[i as usize] + if i % 4 != r { 1.0 + r as f32 } else { 0.0 }) as f64;
            (((w(0) + w(1)) / 2.0) as f32).to_bits()
        })
        .collect();
    for (r, o) in out.iter().enumerate() {
        assert_eq!(o.0, (1 + 2) * 2 + (1 + 3) * 4 + (2 + 8), "rank {r}: index bytes");
        // Unions {0, 1, 5}, {7, 66 000, 69 998, 69 999} and all 64 rows: (cols + 1 state float) × 4 bytes.
        assert_eq!(o.1, (3 * (4 + 1) + 4 * (2 + 1) + 64 * (1 + 1)) * 4, "rank {r}: value bytes");
        assert_eq!(bits(&o.2[0]), bits(&out[0].2[0]));
        assert_eq!(bits(&o.2[1]), bits(&out[0].2[1]));
        assert_eq!(bits(&o.2[2]), oracle, "rank {r}: the densely touched shard");
    }
}

/// A replica's touched-rows message in the sync's layout: per shard its count and rows, each
/// `width` bytes little-endian.
fn message(shards: &[(usize, &[u64])]) -> Vec<u8> {
    let mut m = Vec::new();
    for &(w, rows) in shards {
        m.extend_from_slice(&(rows.len() as u64).to_le_bytes()[..w]);
        for r in rows {
            m.extend_from_slice(&r.to_le_bytes()[..w]);
        }
    }
    m
}

#[test]
fn hostile_touched_rows_messages_are_refused_before_anything_is_indexed() {
    // Shard 0 has 300 rows (u16 indices), shard 1 100 000 (u32).
    let rows = [300usize, 100_000];
    let good0 = message(&[(2, &[1, 299]), (4, &[0, 99_999])]);
    let good1 = message(&[(2, &[5]), (4, &[])]);
    let all = [good0.clone(), good1.clone()].concat();
    let u = decode_touched(&all, &[good0.len(), good1.len()], &rows).unwrap();
    assert_eq!(u, vec![vec![1, 5, 299], vec![0, 99_999]]);
    let refuse = |what: &str, msg: Vec<u8>, needles: &[&str]| {
        let all = [good0.clone(), msg.clone()].concat();
        let e = decode_touched(&all, &[good0.len(), msg.len()], &rows).expect_err(what).to_string();
        for n in needles {
            assert!(e.contains(n), "{what}: {e}");
        }
    };
    refuse("row past the shard", message(&[(2, &[300]), (4, &[])]), &["replica 1", "row out of range", "shard 0"]);
    refuse("row past the second shard", message(&[(2, &[]), (4, &[100_000])]), &["replica 1", "row out of range", "shard 1"]);
    refuse("count beyond the shard", [vec![0x2d, 0x01], message(&[(4, &[])])].concat(), &["replica 1", "row count beyond the shard's rows", "shard 0"]);
    // 19 rows of shard 0 travel as a list (38 bytes, no more than its bitmap's 38): none came.
    refuse("count beyond the message", [vec![19, 0], message(&[(4, &[])])].concat(), &["replica 1", "row count beyond the message", "shard 0"]);
    refuse("truncated", message(&[(2, &[1])]), &["replica 1", "too short", "shard 1"]);
    refuse("empty", Vec::new(), &["replica 1", "too short", "shard 0"]);
    refuse("trailing bytes", [message(&[(2, &[1]), (4, &[2])]), vec![0]].concat(), &["replica 1", "left over"]);
    // 20 or more rows of shard 0 travel as its 300-bit bitmap (38 bytes, smaller than the list).
    let bitmap_msg = |n: u16, set: &[usize]| {
        let mut b = vec![0u8; 38];
        for &r in set {
            b[r / 8] |= 1 << (r % 8);
        }
        [n.to_le_bytes().to_vec(), b, message(&[(4, &[7])])].concat()
    };
    let dense: Vec<usize> = (0..300).step_by(10).collect();
    let m1 = bitmap_msg(30, &dense);
    let u = decode_touched(&[good0.clone(), m1.clone()].concat(), &[good0.len(), m1.len()], &rows).unwrap();
    let mut want: Vec<u64> = dense.iter().map(|&r| r as u64).chain([1, 299]).collect();
    want.sort_unstable();
    want.dedup();
    assert_eq!(u, vec![want, vec![0, 7, 99_999]]);
    let mut past = dense.clone();
    past.push(301);
    refuse("bitmap bit past the shard", bitmap_msg(31, &past), &["replica 1", "row out of range", "shard 0"]);
    refuse("bitmap bits against its count", bitmap_msg(31, &dense), &["replica 1", "bitmap rows differ from the row count", "shard 0"]);
    refuse("truncated bitmap", bitmap_msg(30, &dense)[..20].to_vec(), &["replica 1", "row count beyond the message", "shard 0"]);
    // Counts that do not fit the bytes received.
    let e = decode_touched(&all, &[good0.len(), good1.len() + 1], &rows).unwrap_err().to_string();
    assert!(e.contains("replica 1") && e.contains("beyond the message"), "{e}");
    let e = decode_touched(&all, &[usize::MAX, 1], &rows).unwrap_err().to_string();
    assert!(e.contains("replica 0") && e.contains("beyond the message"), "{e}");
}

/// A peer that vanishes while the others' sync is in flight beside a collective on another
/// communicator: the others' sync fails with an error naming that rank, well within the
/// deadline, the collective beside it (of live ranks) completes, and nothing hangs.
#[test]
fn a_peer_dying_while_the_sync_is_in_flight_fails_the_others_naming_it() {
    let m = 3;
    let timeout = Duration::from_secs(20);
    let world = ember_transport::local_world_with_timeout(m, timeout);
    let upd = EmbUpdate::new(&EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false }, &WeightDecay::None, 1.0);
    let spec = ShardSpec { table: 0, table_rows: 64, dim: 4, rows: 0..64, cols: 0..4 };
    // Ranks 0 and 1 keep their communicators until both syncs have failed: otherwise the first
    // to fail could drop its own before the other saw rank 2's failure, and be named instead.
    let gate = std::sync::Barrier::new(2);
    let t0 = Instant::now();
    let out: Vec<Option<(String, u64)>> = std::thread::scope(|s| {
        let hs: Vec<_> = world
            .into_iter()
            .map(|world| {
                let spec = spec.clone();
                let gate = &gate;
                s.spawn(move || {
                    let be = Cpu::new();
                    let r = world.rank();
                    // The replica group: the same members on a communicator of their own.
                    let replica = world.split(0, r as i64).unwrap();
                    // Ranks 0 and 1 on a communicator of their own.
                    let pair = world.split(u32::from(r == 2), r as i64).unwrap();
                    let mut sh = vec![new_shard(&be, 7, spec.clone(), &upd).unwrap()];
                    let mut touched = vec![Touched::new(64)];
                    touched[0].mark(&[r as u64]);
                    world.barrier().unwrap();
                    if r == 2 {
                        // Dies before its sync: its communicators go with it.
                        drop((replica, pair, world));
                        return None;
                    }
                    // Beside the sync: a collective of ranks 0 and 1 alone (the sum of r + 1).
                    let (synced, _, work) = replica_sync_beside(&be, &replica, &mut sh, &mut touched, SyncMode::Sparse, None, Xfer::Host { stage: false }, || {
                        let mut x = [r as u64 + 1];
                        pair.all_reduce(&mut x, ember_transport::ReduceOp::Sum).map(|_| x[0])
                    });
                    gate.wait();
                    Some((synced.expect_err("the sync must fail").to_string(), work.unwrap()))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(t0.elapsed() < timeout, "the failure took {:?}", t0.elapsed());
    for (r, o) in out.iter().enumerate().take(2) {
        let (e, work) = o.as_ref().unwrap();
        assert_eq!(*work, 3, "rank {r}: the collective beside the sync finished");
        assert!(e.contains("replica sync") && e.contains("rank 2 failed"), "rank {r}: {e}");
    }
}
