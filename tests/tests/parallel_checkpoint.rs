//! The modes around the 2D step: a run ends with one model on every replica whatever steps % K;
//! an evaluation between syncs sees one model and changes nothing; saving a checkpoint changes
//! nothing (a run that saves is bitwise the run that does not, in
//! every mode) and resuming continues bitwise (delayed state sync and fully-sharded 2D
//! included); the checkpoint interval is checked against K when the run starts; resharding
//! 2x2 → 4x1 → 1x4 keeps the next update of every row equal to the f64 reference.
use ember_engine::backend::Cpu;
use ember_engine::checkpoint::{Checkpoint, FileKind};
use ember_engine::config::{preset, DenseOptimizer, EmbOptimizer, Interaction, ModelConfig, Pooling, TableConfig, TrainConfig, WeightDecay};
use ember_engine::grid::{Grid, Placement};
use ember_engine::model::Dlrm;
use ember_engine::parallel::driver::{Job, RankState};
use ember_engine::parallel::{CheckpointOptions, ParallelOptions};
use ember_engine::plan::{Plan, ShardingType};
use ember_tests::oracle::{RefOpt, TestRng};
use ember_tests::oracle2d::{batch_of, check_dense, check_shards, random_samples, sample_range, Oracle2D, Sample};
use std::path::PathBuf;

fn cfg(emb: EmbOptimizer) -> TrainConfig {
    let mut c = preset("tiny", Some(2000)).unwrap();
    c.batch_size = 64;
    c.optim.embedding = emb;
    c.synthetic.eval_samples = 64;
    c
}

fn rowwise() -> EmbOptimizer {
    EmbOptimizer::RowWiseAdagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false }
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-ckpt2d-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn plan(c: &TrainConfig, n: usize) -> Plan {
    Plan::cycling(&c.model, n, &[ShardingType::TableWise, ShardingType::RowWise, ShardingType::ColumnWise]).unwrap()
}

fn grid(m: usize, n: usize) -> Grid {
    Grid::new(m, n, Placement::ReplicasInNode).unwrap()
}

/// The modes whose checkpoints must change nothing.
fn modes() -> Vec<(&'static str, ParallelOptions)> {
    vec![
        ("K = 2", ParallelOptions { sync_every: 2, ..Default::default() }),
        ("delayed state sync, K = 2", ParallelOptions { sync_every: 2, delayed_state_sync: true, ..Default::default() }),
        ("delayed state sync, K = 1", ParallelOptions { delayed_state_sync: true, ..Default::default() }),
        ("fully sharded", ParallelOptions { fully_sharded: true, ..Default::default() }),
    ]
}

fn with_checkpoints(o: &ParallelOptions, dir: &std::path::Path, every: usize, resume: bool) -> ParallelOptions {
    ParallelOptions { checkpoint: Some(CheckpointOptions { dir: dir.to_path_buf(), every, keep: 2, resume, run_id: None }), ..o.clone() }
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

#[track_caller]
fn same_states(what: &str, a: &[RankState], b: &[RankState]) {
    for (x, y) in a.iter().zip(b) {
        for ((sa, wa, va), (sb, wb, vb)) in x.shards.iter().zip(&y.shards) {
            assert_eq!(sa, sb);
            assert!(bits(wa) == bits(wb), "{what}: rank {} table {} weights differ", x.world_rank, sa.table);
            assert!(bits(va) == bits(vb), "{what}: rank {} table {} optimizer state differs", x.world_rank, sa.table);
        }
        for (k, (p, q)) in x.dense.iter().zip(&y.dense).enumerate() {
            assert!(bits(p) == bits(q), "{what}: rank {} dense parameter {k} differs", x.world_rank);
        }
    }
}

#[test]
fn a_run_that_stops_between_syncs_ends_with_identical_replicas() {
    // `train --grid 2x2 --sync-every 4 --steps 10`: steps 9 and 10 were never synced by the loop.
    let c = cfg(rowwise());
    for opts in [ParallelOptions { sync_every: 4, ..Default::default() }, ParallelOptions { sync_every: 3, delayed_state_sync: true, ..Default::default() }] {
        let (_, states, _) = Job::new(&c, grid(2, 2), &plan(&c, 2), &opts, 10).train(&|_| Ok(Cpu::new())).unwrap();
        for st in &states {
            let twin = states.iter().find(|o| o.coords == (0, st.coords.1)).unwrap();
            for ((spec, w, v), (_, w0, v0)) in st.shards.iter().zip(&twin.shards) {
                assert!(bits(w) == bits(w0), "K = {}: replica {} of table {} ends with other weights than replica 0", opts.sync_every, st.coords.0, spec.table);
                assert!(bits(v) == bits(v0), "K = {}: replica {} of table {} ends with another optimizer state", opts.sync_every, st.coords.0, spec.table);
            }
        }
    }
}

#[test]
fn evaluation_between_syncs_sees_one_model_and_changes_nothing() {
    // Every rank evaluates after step 3 (between syncs with K = 2; delayed state pending; fully
    // sharded) through `with_averaged_weights`: the ranks at the same place of every sharding
    // group, given the same samples, get bitwise the same logits, and the run continues exactly
    // as without the evaluation.
    use ember_engine::data::synthetic::SyntheticData;
    use ember_engine::grid::GridComms;
    use ember_engine::parallel::Rank2D;
    let c = &cfg(rowwise());
    let data = SyntheticData::new(c).unwrap();
    let p = plan(c, 2);
    let g = grid(2, 2);
    let b = c.batch_size / 4;
    for (what, o) in modes() {
        let run = |evaluate: bool| -> Vec<(usize, Vec<u32>, Vec<Vec<u32>>)> {
            std::thread::scope(|s| {
                let hs: Vec<_> = ember_transport::local_world(4)
                    .into_iter()
                    .map(|comm| {
                        let (p, o, data) = (p.clone(), o.clone(), &data);
                        s.spawn(move || {
                            let be = Cpu::new();
                            let w = comm.rank();
                            let gc = GridComms::new(g, comm).unwrap();
                            let r = gc.coords().1;
                            let mut rank = Rank2D::new(&be, c, gc, p, o).unwrap();
                            let mut logits = Vec::new();
                            for step in 0..5 {
                                let range = g.sample_range(w, c.batch_size);
                                rank.train_step(&be, &data.samples((step * c.batch_size + range.start) as u64, b)).unwrap();
                                if evaluate && step == 2 {
                                    let eval = data.samples(1_000_000 + (r * b) as u64, b);
                                    logits = rank.with_averaged_weights(&be, |rk| rk.predict(&be, &eval)).unwrap().iter().map(|x| x.to_bits()).collect();
                                }
                            }
                            let shards = rank.shards().iter().flat_map(|s| [bits(&s.weights), bits(&s.state)]).collect();
                            (w, logits, shards)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        let (with, without) = (run(true), run(false));
        for (x, y) in with.iter().zip(&without) {
            assert!(x.2 == y.2, "{what}: rank {} trains differently after an evaluation", x.0);
            let (gx, rx) = g.coords(x.0);
            let twin = with.iter().find(|t| g.coords(t.0) == (0, rx)).unwrap();
            assert!(x.1 == twin.1, "{what}: sharding group {gx} scores the samples differently from group 0");
        }
    }
}

#[test]
fn saving_checkpoints_changes_nothing_in_any_mode() {
    let c = cfg(rowwise());
    let p = plan(&c, 2);
    for (what, o) in modes() {
        let dir = tmp("nochange");
        let (ra, sa, _) = Job::new(&c, grid(2, 2), &p, &o, 6).train(&|_| Ok(Cpu::new())).unwrap();
        let (rb, sb, _) = Job::new(&c, grid(2, 2), &p, &with_checkpoints(&o, &dir, 2, false), 6).train(&|_| Ok(Cpu::new())).unwrap();
        assert!(Checkpoint::open(&dir.join("step-6")).is_ok(), "{what}: no checkpoint written");
        assert_eq!(ra.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), rb.losses.iter().map(|l| l.to_bits()).collect::<Vec<_>>(), "{what}: losses differ with checkpoints");
        same_states(&format!("{what}, with checkpoints every 2 steps"), &sa, &sb);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn resume_is_bitwise_the_uninterrupted_run_in_every_mode() {
    let c = cfg(rowwise());
    let p = plan(&c, 2);
    for (what, o) in modes() {
        let dir = tmp("resume");
        let (ra, sa, _) = Job::new(&c, grid(2, 2), &p, &o, 6).train(&|_| Ok(Cpu::new())).unwrap();
        Job::new(&c, grid(2, 2), &p, &with_checkpoints(&o, &dir, 2, false), 4).train(&|_| Ok(Cpu::new())).unwrap();
        let (rc, sc, _) = Job::new(&c, grid(2, 2), &p, &with_checkpoints(&o, &dir, 2, true), 6).train(&|_| Ok(Cpu::new())).unwrap();
        assert_eq!(rc.losses.len(), 2, "{what}: the resumed run starts at step 4");
        for (s, (x, y)) in rc.losses.iter().zip(&ra.losses[4..]).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "{what}: step {} loss {x} after the resume vs {y}", s + 5);
        }
        same_states(&format!("{what}, resumed at step 4"), &sc, &sa);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn the_checkpoint_interval_must_be_a_multiple_of_k_from_the_start() {
    let c = cfg(rowwise());
    let p = plan(&c, 2);
    let dir = tmp("interval");
    // 2 steps: the run would end before its first checkpoint at step 3; it must not start.
    let o = with_checkpoints(&ParallelOptions { sync_every: 2, ..Default::default() }, &dir, 3, false);
    let e = Job::new(&c, grid(2, 2), &p, &o, 2).train(&|_| Ok(Cpu::new())).err().expect("refused");
    let msg = e.to_string();
    assert!(msg.contains("every 3") && msg.contains("multiple of K"), "{msg}");
    // Without replicas, and in fully-sharded 2D, K does not constrain checkpoints.
    Job::new(&c, grid(1, 2), &p, &o, 3).train(&|_| Ok(Cpu::new())).unwrap();
    let fs = ParallelOptions { fully_sharded: true, ..o.clone() };
    Job::new(&c, grid(2, 2), &p, &fs, 3).train(&|_| Ok(Cpu::new())).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn modes_whose_replicas_differ_save_every_replicas_copy() {
    // Fully-sharded 2D: M × the shard bytes (every replica's weights and state); the shard files
    // hold the replicas' average. Delayed state sync: every replica's state and pending average.
    let c = cfg(rowwise());
    let p = plan(&c, 2);
    for (what, o) in modes().into_iter().skip(1) {
        let dir = tmp("copies");
        let (_, states, _) = Job::new(&c, grid(2, 2), &p, &with_checkpoints(&o, &dir, 2, false), 2).train(&|_| Ok(Cpu::new())).unwrap();
        let ck = Checkpoint::open(&dir.join("step-2")).unwrap();
        ck.verify_all().unwrap();
        let shards = ck.manifest.shards().count();
        let replicas: Vec<_> = ck.manifest.replicas().collect();
        assert_eq!(replicas.len(), 2 * shards, "{what}: one copy per replica and shard");
        let shard_bytes: u64 = ck.manifest.shards().map(|(f, _, _)| f.bytes).sum();
        let copy_bytes: u64 = replicas.iter().map(|(f, _, _)| f.bytes).sum();
        for (f, _, _) in &replicas {
            let FileKind::Replica { weights, pending_rows, .. } = &f.kind else { unreachable!() };
            assert_eq!(*weights, o.fully_sharded, "{what}: {}", f.name);
            assert_eq!(pending_rows.is_some(), o.delayed_state_sync, "{what}: {}", f.name);
        }
        if o.fully_sharded {
            assert_eq!(copy_bytes, 2 * shard_bytes, "{what}: M × the shard bytes");
            // The model (shard files) is the average of the replicas' weights, which is also
            // what the run ended with (it stopped right after the save).
            for st in &states {
                for (spec, w, _) in &st.shards {
                    let (saved, _) = ck.read_shard(spec, None).unwrap();
                    assert!(bits(&saved) == bits(w), "{what}: table {} model copy is not the replicas' average", spec.table);
                }
            }
        } else {
            assert!(copy_bytes < shard_bytes, "{what}: state and pending rows only");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

// ------------------------------------------------------------- resharding against the oracle

fn small_model() -> ModelConfig {
    let t = |rows: u64, pooling| TableConfig { rows, dim: 8, pooling, bag_size: 2 };
    ModelConfig {
        num_dense: 3,
        tables: vec![t(9, Pooling::Sum), t(40, Pooling::Mean), t(200, Pooling::Sum), t(5, Pooling::Sum)],
        bottom_mlp: vec![7, 8],
        top_mlp: vec![5, 1],
        interaction: Interaction::Dot,
    }
}

const B: usize = 16;

#[test]
fn resharding_2x2_4x1_1x4_keeps_the_next_update_equal_to_the_reference() {
    for (emb, rf) in [
        (
            EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-3, c: None, eps_inside: false },
            (|m: usize| RefOpt::RowWise { lr: 0.1f32 as f64, eps: 1e-3f32 as f64, c: m as f64, eps_inside: false }) as fn(usize) -> RefOpt,
        ),
        (
            EmbOptimizer::Adagrad { lr: 0.1, eps: 1e-3, c: None, eps_inside: false },
            (|m: usize| RefOpt::Adagrad { lr: 0.1f32 as f64, eps: 1e-3f32 as f64, c: m as f64, eps_inside: false }) as fn(usize) -> RefOpt,
        ),
    ] {
        let mut c = preset("tiny", None).unwrap();
        c.model = small_model();
        c.batch_size = B;
        c.optim.embedding = emb;
        c.optim.dense = DenseOptimizer::Sgd { lr: 0.3 };
        c.optim.weight_decay = WeightDecay::None;
        let mut rng = TestRng::new(21);
        let data: Vec<Vec<Sample>> = (0..5).map(|_| random_samples(&c.model, B, &mut rng, 0.3)).collect();
        let mut m0 = Dlrm::new(&Cpu::new(), &c).unwrap();
        let init: Vec<Vec<f32>> = m0.tables.iter().map(|t| t.weights.clone()).collect();
        let dense: Vec<Vec<f32>> = m0.dense.params_mut().into_iter().map(|p| p.w.clone()).collect();
        let dir = tmp("reshard");
        let eval = batch_of(&c.model, &data[0]);
        let mut oracle = Oracle2D::new(&c.model, 2, 1, rf(2), 0.3, false, &init, &dense);
        let mut prev_m = 2;
        // (grid, steps the run ends at, steps the oracle takes before it).
        for (m, n, end) in [(2usize, 2usize, 3usize), (4, 1, 4), (1, 4, 5)] {
            let what = format!("{emb:?} on {m}x{n}, step {end}");
            if m != prev_m {
                // The checkpoint stores v for c = M_old; the new grid reads it as v / M_new.
                oracle.regrid(m, rf(m), m as f64 / prev_m as f64);
                prev_m = m;
            }
            while oracle.steps < end {
                let s = oracle.steps;
                oracle.step(&data[s]);
            }
            let feed = |step: usize, w: usize| Ok(batch_of(&c.model, &data[step][sample_range(m, n, false, w, B)]));
            let opts = ParallelOptions { checkpoint: Some(CheckpointOptions { dir: dir.clone(), every: 1, keep: 2, resume: true, run_id: None }), ..Default::default() };
            let plan = Plan::cycling(&c.model, n, &ShardingType::ALL).unwrap();
            let (rep, states, _) = Job::new(&c, grid(m, n), &plan, &opts, end).data(&feed, &eval).train(&|_| Ok(Cpu::new())).unwrap();
            assert_eq!(rep.losses.len(), if end == 3 { 3 } else { 1 }, "{what}: resumed from the previous grid's checkpoint");
            for st in &states {
                check_shards(&what, st.coords.0, &st.shards, &oracle, &init, 1e-5);
                check_dense(&what, &st.dense, &oracle, 1e-5);
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
