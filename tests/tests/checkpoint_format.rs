//! Checkpoints: bitwise save→load round trips (single process and 2D), resharding
//! across grids and plans with the accumulator rescaled by c_new / c_old, crash injection at
//! every failpoint of the writer, corruption of every file kind, pruning to K, and .npy export.
use ember_engine::backend::{Buffers, Cpu};
use ember_engine::checkpoint::{self, failpoint, rank2d, Checkpoint, DataPosition};
use ember_engine::config::{preset, DenseOptimizer, EmbOptimizer, TrainConfig};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::grid::{Grid, GridComms, Placement};
use ember_engine::model::Dlrm;
use ember_engine::parallel::{ParallelOptions, Rank2D};
use ember_engine::plan::{Plan, ShardingType};
use ember_tests::two_d::cycling_plan;
use std::path::{Path, PathBuf};

fn cfg() -> TrainConfig {
    let mut c = preset("tiny", Some(600)).unwrap();
    c.batch_size = 64;
    c.optim.embedding = EmbOptimizer::RowWiseAdagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false };
    c.optim.dense = DenseOptimizer::Adagrad { lr: 0.02, eps: 1e-8 };
    c.synthetic.eval_samples = 128;
    c
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Everything a model holds: per table (weights, state), then per dense parameter (w, s).
type Snapshot = (Vec<(Vec<f32>, Vec<f32>)>, Vec<(Vec<f32>, Vec<f32>)>);

fn snap(m: &mut Dlrm<Cpu>) -> Snapshot {
    let t = m.tables.iter().map(|s| (s.weights.clone(), s.state.clone())).collect();
    let d = m.dense.params_mut().into_iter().map(|p| (p.w.clone(), p.s.clone())).collect();
    (t, d)
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn assert_same(a: &Snapshot, b: &Snapshot) {
    assert_eq!(a.0.len(), b.0.len());
    for (x, y) in a.0.iter().zip(&b.0).chain(a.1.iter().zip(&b.1)) {
        assert_eq!(bits(&x.0), bits(&y.0));
        assert_eq!(bits(&x.1), bits(&y.1));
    }
}

fn trained(c: &TrainConfig, steps: usize) -> Dlrm<Cpu> {
    let be = Cpu::new();
    let data = SyntheticData::new(c).unwrap();
    let mut m = Dlrm::new(&be, c).unwrap();
    for s in 0..steps {
        m.train_step(&be, &data.samples((s * c.batch_size) as u64, c.batch_size)).unwrap();
    }
    m
}

fn pos(step: u64, c: &TrainConfig) -> DataPosition {
    DataPosition { next_sample: step * c.batch_size as u64, reader_offsets: vec![] }
}

#[test]
fn single_process_round_trip_is_bitwise_and_resume_is_exact() {
    let c = cfg();
    let be = Cpu::new();
    let root = tmp("rt");
    let mut a = trained(&c, 5);
    let dir = rank2d::save_dlrm(&be, &mut a, &c, &root, 5, pos(5, &c), 2, None).unwrap();
    assert_eq!(dir, root.join("step-5"));
    let ck = Checkpoint::open(&root).unwrap();
    ck.verify_all().unwrap();
    assert_eq!(ck.step(), 5);
    let mut b = Dlrm::new(&be, &c).unwrap();
    let (step, p) = rank2d::restore_dlrm(&be, &mut b, &ck, &c).unwrap();
    assert_eq!((step, p), (5, Some(pos(5, &c))));
    assert_same(&snap(&mut a), &snap(&mut b));
    // Continuing both gives bitwise the same model.
    let data = SyntheticData::new(&c).unwrap();
    for s in 5..9 {
        let batch = data.samples((s * c.batch_size) as u64, c.batch_size);
        let la = a.train_step(&be, &batch).unwrap();
        let lb = b.train_step(&be, &batch).unwrap();
        assert_eq!(la.to_bits(), lb.to_bits());
    }
    assert_same(&snap(&mut a), &snap(&mut b));
    std::fs::remove_dir_all(&root).unwrap();
}

/// Run `steps` steps of 2D training as threads, then `f(rank_index, rank)` on every rank.
fn run_2d<R: Send>(c: &TrainConfig, grid: Grid, plan: &Plan, steps: usize, f: &(dyn Fn(&mut Rank2D<Cpu>) -> R + Sync)) -> Vec<R> {
    let data = SyntheticData::new(c).unwrap();
    let comms = ember_transport::local_world(grid.world());
    std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|world| {
                let (plan, data) = (plan.clone(), &data);
                s.spawn(move || {
                    let be = Cpu::new();
                    let w = world.rank();
                    let gc = GridComms::new(grid, world).unwrap();
                    let mut rank = Rank2D::new(&be, c, gc, plan, ParallelOptions::default()).unwrap();
                    for step in 0..steps {
                        let r = grid.sample_range(w, c.batch_size);
                        rank.train_step(&be, &data.samples((step * c.batch_size + r.start) as u64, r.len())).unwrap();
                    }
                    f(&mut rank)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn plan_for(c: &TrainConfig, n: usize, kinds: &[ShardingType]) -> Plan {
    cycling_plan(c, n, kinds)
}

#[test]
fn two_d_save_reshards_into_other_grids_and_rescales_the_accumulator() {
    let c = cfg();
    let root = tmp("2d");
    let g24 = Grid::new(2, 4, Placement::ReplicasInNode).unwrap();
    let p24 = plan_for(&c, 4, &ShardingType::ALL);
    let root_ = root.clone();
    // Save at step 3 on 2×4 (every sharding type), and keep every rank's shards for comparison.
    let saved = run_2d(&c, g24, &p24, 3, &move |rank| {
        let be = Cpu::new();
        rank2d::save_rank2d(&be, rank, &cfg(), &root_, DataPosition { next_sample: 7, reader_offsets: vec![rank.world().rank() as u64] }, 2, None).unwrap();
        rank.shards().iter().map(|s| (s.spec.clone(), s.weights.clone(), s.state.clone())).collect::<Vec<_>>()
    });
    let ck = Checkpoint::open(&root.join("step-3")).unwrap();
    ck.verify_all().unwrap();
    assert_eq!(ck.manifest.m, 2);
    assert_eq!(ck.manifest.run.c, 2.0);
    assert_eq!(ck.manifest.positions.len(), 8);
    assert_eq!(ck.position(5).unwrap().data.reader_offsets, vec![5]);
    // Only replica 0 wrote shards: one file per planned shard.
    assert_eq!(ck.manifest.shards().count(), p24.tables.iter().map(|t| t.shards.len()).sum::<usize>());
    // Same grid: bitwise the saved shards, on every replica.
    for rank_shards in &saved {
        for (spec, w, s) in rank_shards {
            let (w2, s2) = ck.read_shard(spec, Some(2.0)).unwrap();
            assert_eq!(bits(w), bits(&w2));
            assert_eq!(bits(s), bits(&s2));
        }
    }
    // Whole tables (weights, row-wise state) as saved.
    let mut full: Vec<(Vec<f32>, Vec<f32>)> = c.model.tables.iter().map(|t| (vec![f32::NAN; t.rows as usize * t.dim], vec![f32::NAN; t.rows as usize])).collect();
    for (spec, w, st) in saved.iter().flatten() {
        let k = spec.num_cols();
        for (i, row) in (spec.rows.start..spec.rows.end).enumerate() {
            let dst = row as usize * spec.dim + spec.cols.start;
            full[spec.table].0[dst..dst + k].copy_from_slice(&w[i * k..(i + 1) * k]);
            full[spec.table].1[row as usize] = st[i];
        }
    }
    // Other grids and plans: 4×2 (row-wise), 1×8 (column-wise): every element from the saved
    // tables, state scaled by c_new / c_old = M_new / 2.
    for (m, n, kind) in [(4usize, 2usize, ShardingType::RowWise), (1, 8, ShardingType::ColumnWise), (1, 1, ShardingType::TableWise)] {
        let grid = Grid::new(m, n, Placement::ReplicasInNode).unwrap();
        let plan = plan_for(&c, n, &[kind]);
        let ck2 = Checkpoint::open(&root).unwrap();
        let got = run_2d(&c, grid, &plan, 0, &|rank| {
            let be = Cpu::new();
            let p = rank2d::restore_rank2d(&be, rank, &ck2, &c).unwrap();
            assert!(p.is_none(), "positions only restore on the same grid");
            assert_eq!(rank.steps_done(), 3);
            rank.shards().iter().map(|s| (s.spec.clone(), s.weights.clone(), s.state.clone())).collect::<Vec<_>>()
        });
        for (spec, w, s) in got.into_iter().flatten() {
            let (tw, ts) = &full[spec.table];
            let k = spec.num_cols();
            for (i, row) in (spec.rows.start..spec.rows.end).enumerate() {
                let src = row as usize * spec.dim + spec.cols.start;
                assert_eq!(bits(&w[i * k..(i + 1) * k]), bits(&tw[src..src + k]), "{m}x{n}: table {} row {row}", spec.table);
                let scale = m as f32 / 2.0;
                let v = ts[row as usize];
                let want = if scale == 1.0 { v } else { v * scale };
                assert_eq!(s[i].to_bits(), want.to_bits(), "{m}x{n}: state of table {} row {row}", spec.table);
            }
        }
    }
    std::fs::remove_dir_all(&root).unwrap();
}

fn points_of_a_save(c: &TrainConfig, m: &mut Dlrm<Cpu>, root: &Path, step: u64) -> Vec<String> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s2 = seen.clone();
    failpoint::set(Some(Box::new(move |p: &str| {
        s2.lock().unwrap().push(p.to_string());
        false
    })));
    rank2d::save_dlrm(&Cpu::new(), m, c, root, step, pos(step, c), 2, None).unwrap();
    failpoint::set(None);
    let v = seen.lock().unwrap().clone();
    v
}

#[test]
fn a_crash_at_any_failpoint_never_leaves_a_loadable_partial_checkpoint() {
    let c = cfg();
    let be = Cpu::new();
    let mut m = trained(&c, 2);
    let points = points_of_a_save(&c, &mut m, &tmp("fp-list"), 2);
    let _ = std::fs::remove_dir_all(tmp("fp-list"));
    for kind in ["during:", "before-rename:", "after-file:", "before-manifest", "before-prune"] {
        assert!(points.iter().any(|p| p.starts_with(kind)), "no failpoint {kind} in {points:?}");
    }
    assert!(points.len() >= 2 * 8 + 4, "{points:?}");
    let good = snap(&mut m);
    for p in &points {
        let root = tmp("fp");
        rank2d::save_dlrm(&be, &mut m, &c, &root, 1, pos(1, &c), 2, None).unwrap();
        let target = p.clone();
        failpoint::set(Some(Box::new(move |q: &str| q == target)));
        let r = rank2d::save_dlrm(&be, &mut m, &c, &root, 2, pos(2, &c), 2, None);
        failpoint::set(None);
        assert!(r.is_err(), "the failpoint {p} did not fire");
        // The manifest is renamed into place at "after-file:manifest.json"; from there on the new
        // checkpoint is complete. Before it, step 2 must not load.
        let committed = p == "after-file:manifest.json" || p == "before-prune";
        let new = Checkpoint::open(&root.join("step-2"));
        if committed {
            new.unwrap().verify_all().unwrap();
        } else {
            let e = new.err().unwrap_or_else(|| panic!("crash at {p} left a step-2 checkpoint that opens")).to_string();
            assert!(e.contains("manifest.json"), "{p}: {e}");
        }
        // The previous one stays loadable, and `latest` finds a loadable one.
        let old = Checkpoint::open(&root.join("step-1")).unwrap();
        old.verify_all().unwrap();
        let last = Checkpoint::open(&root).unwrap();
        assert_eq!(last.step(), if committed { 2 } else { 1 });
        let mut fresh = Dlrm::new(&be, &c).unwrap();
        rank2d::restore_dlrm(&be, &mut fresh, &last, &c).unwrap();
        assert_same(&snap(&mut fresh), &good);
        // A later save of the same step replaces the partial folder and completes.
        rank2d::save_dlrm(&be, &mut m, &c, &root, 2, pos(2, &c), 2, None).unwrap();
        Checkpoint::open(&root.join("step-2")).unwrap().verify_all().unwrap();
        std::fs::remove_dir_all(&root).unwrap();
    }
}

#[test]
fn keeps_the_last_k_complete_checkpoints() {
    let c = cfg();
    let be = Cpu::new();
    let root = tmp("keep");
    let mut m = trained(&c, 1);
    // An incomplete folder of an older step is cleaned up; complete ones beyond K are removed.
    std::fs::create_dir_all(root.join("step-0")).unwrap();
    for s in 1..=4 {
        rank2d::save_dlrm(&be, &mut m, &c, &root, s, pos(s, &c), 2, None).unwrap();
    }
    let steps: Vec<u64> = checkpoint::list(&root).unwrap().iter().map(|l| l.step).collect();
    assert_eq!(steps, vec![3, 4]);
    rank2d::save_dlrm(&be, &mut m, &c, &root, 5, pos(5, &c), 1, None).unwrap();
    let steps: Vec<u64> = checkpoint::list(&root).unwrap().iter().map(|l| l.step).collect();
    assert_eq!(steps, vec![5]);
    std::fs::remove_dir_all(&root).unwrap();
}

/// Save a fresh checkpoint and return (root, step folder).
fn saved(name: &str) -> (PathBuf, PathBuf, TrainConfig) {
    let c = cfg();
    let root = tmp(name);
    let mut m = trained(&c, 2);
    let dir = rank2d::save_dlrm(&Cpu::new(), &mut m, &c, &root, 2, pos(2, &c), 2, None).unwrap();
    (root, dir, c)
}

/// Loading fails with an error naming `file`, and leaves a model untouched.
fn fails_naming(dir: &Path, c: &TrainConfig, file: &str) {
    fails_naming_(dir, c, file, true)
}

/// `damaged`: the checkpoint itself is bad (inspect must fail too), not just another model's.
fn fails_naming_(dir: &Path, c: &TrainConfig, file: &str, damaged: bool) {
    let be = Cpu::new();
    let mut fresh = Dlrm::new(&be, c).unwrap();
    let before = snap(&mut fresh);
    let e = match Checkpoint::open(dir) {
        Err(e) => e,
        Ok(ck) => match ck.verify_all() {
            Err(e) => {
                // Loading (which maps and verifies what it reads) fails too.
                assert!(rank2d::restore_dlrm(&be, &mut fresh, &ck, c).is_err());
                e
            }
            Ok(()) => rank2d::restore_dlrm(&be, &mut fresh, &ck, c).err().expect("loading a damaged checkpoint succeeded"),
        },
    };
    assert!(e.to_string().contains(file), "error does not name {file}: {e}");
    assert_same(&snap(&mut fresh), &before);
    let (report, ok) = checkpoint::export::inspect(dir).unwrap();
    assert_eq!(!ok, damaged, "inspect of a checkpoint (damaged: {damaged}):\n{report}");
}

fn flip(path: &Path, at: u64) {
    let mut b = std::fs::read(path).unwrap();
    let i = (at as usize).min(b.len() - 1);
    b[i] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

#[test]
fn corruption_of_every_file_kind_is_caught_and_loads_nothing() {
    let shard = "shard-t004-r0-600-c0-16.bin";
    // A flipped bit in a shard's weights, in its header, and in the dense file.
    for (file, at) in [(shard, 1000u64), (shard, 20), ("dense.bin", 500), ("dense.bin", 9)] {
        let (root, dir, c) = saved("corrupt");
        flip(&dir.join(file), at);
        fails_naming(&dir, &c, file);
        std::fs::remove_dir_all(&root).unwrap();
    }
    // Truncated shard and dense files.
    for file in [shard, "dense.bin"] {
        let (root, dir, c) = saved("trunc");
        let p = dir.join(file);
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 4).unwrap();
        fails_naming(&dir, &c, file);
        std::fs::remove_dir_all(&root).unwrap();
    }
    // A missing shard.
    let (root, dir, c) = saved("missing");
    std::fs::remove_file(dir.join(shard)).unwrap();
    fails_naming(&dir, &c, shard);
    std::fs::remove_dir_all(&root).unwrap();
    // The manifest: a flipped digit (valid JSON, wrong checksum), a truncation, a deletion.
    for how in 0..3 {
        let (root, dir, c) = saved("manifest");
        let p = dir.join("manifest.json");
        let text = std::fs::read_to_string(&p).unwrap();
        match how {
            0 => std::fs::write(&p, text.replacen("\"rows\":600", "\"rows\":601", 1)).unwrap(),
            1 => std::fs::write(&p, &text[..text.len() / 2]).unwrap(),
            _ => std::fs::remove_file(&p).unwrap(),
        }
        fails_naming(&dir, &c, "manifest.json");
        std::fs::remove_dir_all(&root).unwrap();
    }
    // A manifest of a different model.
    let (root, dir, mut c) = saved("model");
    c.model.tables[0].rows += 1;
    fails_naming_(&dir, &c, "manifest.json", false);
    let mut c2 = cfg();
    c2.optim.embedding = EmbOptimizer::Sgd { lr: 0.1 };
    fails_naming_(&dir, &c2, "manifest.json", false);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn export_writes_memory_mappable_npy_tables() {
    let (root, dir, c) = saved("export");
    let ck = Checkpoint::open(&dir).unwrap();
    let out = root.join("out");
    let files = checkpoint::export::export(&ck, &out).unwrap();
    assert!(files.len() >= 2 * c.model.tables.len());
    let m = trained(&c, 2);
    for (t, tc) in c.model.tables.iter().enumerate() {
        let b = std::fs::read(out.join(format!("table_{t}.npy"))).unwrap();
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hl) % 64, 0, "data 64-byte aligned");
        let h = std::str::from_utf8(&b[10..10 + hl]).unwrap();
        assert!(h.contains(&format!("'shape': ({}, {})", tc.rows, tc.dim)) && h.contains("'<f4'") && h.ends_with('\n'), "{h}");
        let data: Vec<f32> = b[10 + hl..].chunks(4).map(|x| f32::from_le_bytes([x[0], x[1], x[2], x[3]])).collect();
        assert_eq!(bits(&data), bits(&Cpu::new().download(&m.tables[t].weights).unwrap()));
        let s = std::fs::read(out.join(format!("table_{t}_state.npy"))).unwrap();
        assert!(std::str::from_utf8(&s[10..74]).unwrap().contains(&format!("'shape': ({},)", tc.rows)));
    }
    let (report, ok) = checkpoint::export::inspect(&root).unwrap();
    assert!(ok, "{report}");
    assert!(report.contains("step 2") && report.contains("ok   dense.bin"), "{report}");
    std::fs::remove_dir_all(&root).unwrap();
}
