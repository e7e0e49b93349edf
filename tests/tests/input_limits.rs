//! Input hardening below the CLI: config limits and unknown keys, grid sizes, the kernels'
//! buffer checks, the Criteo reader's eval stream and empty sets, and checkpoint manifests,
//! headers and run ownership. Every refusal is an `Err` naming the place, never a panic.
use ember_engine::backend::{Cpu, EmbKind, EmbUpdate, Gemm, Numerics, RowGrads, Shard, ShardSpec};
use ember_engine::config::{preset, TrainConfig, WeightDecay};
use ember_engine::data::criteo::{BadLinePolicy, CriteoReader};
use ember_engine::data::{Batch, DataSource, EvalSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

#[track_caller]
fn expect_err<T>(what: &str, needles: &[&str], f: impl FnOnce() -> ember_engine::Result<T>) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(_) => panic!("{what}: panicked instead of returning Err"),
        Ok(Ok(_)) => panic!("{what}: accepted bad input"),
        Ok(Err(e)) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "{what}: error {msg:?} does not mention {n:?}");
            }
        }
    }
}

fn tmp(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ember-il-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn every_config_number_is_range_checked_naming_its_key() {
    let base = preset("tiny", None).unwrap();
    let edits: Vec<(&str, Box<dyn Fn(&mut TrainConfig)>)> = vec![
        ("model.tables[2].rows", Box::new(|c| c.model.tables[2].rows = 1 << 41)),
        ("model.tables[0].rows", Box::new(|c| c.model.tables[0].rows = 0)),
        ("model.tables[0].dim", Box::new(|c| c.model.tables.iter_mut().for_each(|t| t.dim = 1 << 20))),
        ("model.tables[1].bag_size", Box::new(|c| c.model.tables[1].bag_size = 1 << 40)),
        ("model.num_dense", Box::new(|c| c.model.num_dense = 1 << 40)),
        ("model.top_mlp[0]", Box::new(|c| c.model.top_mlp[0] = 1 << 30)),
        ("model.bottom_mlp layers", Box::new(|c| c.model.bottom_mlp = vec![16; 100])),
        ("batch_size", Box::new(|c| c.batch_size = 1 << 40)),
        ("steps", Box::new(|c| c.steps = Some(0))),
        ("steps", Box::new(|c| c.steps = Some(1 << 40))),
        ("optim.weight_decay.wd", Box::new(|c| c.optim.weight_decay = WeightDecay::L2 { wd: f32::NAN })),
        ("optim.weight_decay.wd", Box::new(|c| c.optim.weight_decay = WeightDecay::L2 { wd: -1.0 })),
        ("synthetic.zipf", Box::new(|c| c.synthetic.zipf = f64::NAN)),
        ("synthetic.zipf", Box::new(|c| c.synthetic.zipf = -1.0)),
        ("synthetic.signal", Box::new(|c| c.synthetic.signal = f32::NAN)),
        ("synthetic.signal", Box::new(|c| c.synthetic.signal = f32::INFINITY)),
        ("synthetic.eval_samples", Box::new(|c| c.synthetic.eval_samples = 0)),
    ];
    for (key, edit) in edits {
        let mut c = base.clone();
        edit(&mut c);
        expect_err(key, &[key.split(' ').next().unwrap()], || c.validate());
        // The TOML path refuses it the same way.
        expect_err(key, &[key.split(' ').next().unwrap()], || TrainConfig::from_toml(&c.to_toml()));
    }
    assert!(base.validate().is_ok());
}

#[test]
fn unknown_config_keys_are_refused_naming_the_key() {
    let text = preset("tiny", None).unwrap().to_toml();
    for (key, edited) in [
        ("stesp", format!("stesp = 10\n{text}")),
        ("rowz", text.replacen("rows = 1000\n", "rows = 1000\nrowz = 5\n", 1)),
        ("layers", text.replacen("kind = \"dot\"", "kind = \"dot\"\nlayers = 2", 1)),
        ("layerz", text.replacen("kind = \"dot\"", "kind = \"dcn\"\nlayers = 2\nrank = 4\nlayerz = 2", 1)),
        ("wd", text.replacen("[optim.weight_decay]\nkind = \"none\"", "[optim.weight_decay]\nkind = \"none\"\nwd = 0.5", 1)),
        ("eps_insde", text.replacen("eps_inside = false", "eps_insde = true", 1)),
        ("zipff", text.replacen("zipf = 1.05", "zipff = 1.05\nzipf = 1.05", 1)),
    ] {
        assert_ne!(edited, text, "{key}: the edit did not apply");
        expect_err(key, &[key], || TrainConfig::from_toml(&edited));
    }
    assert!(TrainConfig::from_toml(&text).is_ok());
}

#[test]
fn grids_of_too_many_ranks_are_refused_without_overflow() {
    use ember_engine::grid::{Grid, Placement, MAX_RANKS};
    expect_err("wrapping grid", &["4294967296x4294967296"], || Grid::parse("4294967296x4294967296", Placement::default()));
    expect_err("huge grid", &["at most"], || Grid::new(usize::MAX, 2, Placement::default()));
    expect_err("one too many", &["at most"], || Grid::new(MAX_RANKS + 1, 1, Placement::default()));
    assert_eq!(Grid::new(MAX_RANKS / 2, 2, Placement::default()).unwrap().world(), MAX_RANKS);
}

const RW: EmbUpdate = EmbUpdate { kind: EmbKind::RowWiseAdagrad, lr: 0.1, eps: 1e-8, c: 1.0, eps_inside: false, l2: 0.0 };

#[test]
fn embedding_updates_check_rows_against_the_weight_buffers() {
    let be = Cpu;
    // A shard whose spec says 10 rows but whose buffers hold 5: row 7 is inside the spec and
    // outside the weights.
    let mut s: Shard<Cpu> = Shard { spec: ShardSpec::whole(0, 10, 4), weights: vec![0.5; 5 * 4], state: vec![0.0; 10] };
    let rg = RowGrads { rows: vec![7u64], num_rows: 1, grads: vec![1.0; 4], sq: vec![4.0] };
    expect_err("apply past the weights", &["0..10", "20 weights"], || be.embedding_apply(&mut s, &rg, None, &RW));
    let bags = ember_engine::backend::Bags { num_bags: 1, offsets: vec![0, 1], ids: vec![7], scale: None };
    let l = ember_engine::backend::Layout { stride: 4, col: 0 };
    expect_err("update past the weights", &["weights"], || be.embedding_backward_update(&mut s, &bags, &vec![1.0; 4], l, &RW));
    expect_err("forward past the weights", &["weights"], || be.embedding_forward(&s, &bags, &mut vec![0.0; 4], l, false));
    assert!(s.weights.iter().all(|&w| w == 0.5) && s.state.iter().all(|&v| v == 0.0), "a refused update changed the shard");
    // Short state buffer.
    let mut s: Shard<Cpu> = Shard { spec: ShardSpec::whole(0, 10, 4), weights: vec![0.5; 10 * 4], state: vec![0.0; 3] };
    let rg = RowGrads { rows: vec![7u64], num_rows: 1, grads: vec![1.0; 4], sq: vec![4.0] };
    expect_err("apply past the state", &["state"], || be.embedding_apply(&mut s, &rg, None, &RW));
}

#[test]
fn gemm_sizes_are_multiplied_with_checked_arithmetic() {
    let be = Cpu;
    let (a, b) = (vec![0.0f32; 16], vec![0.0f32; 16]);
    let mut c = vec![0.0f32; 16];
    // m·k wraps to 0 in 64-bit arithmetic: a wrapping check would pass and read far out of bounds.
    let g = Gemm { m: 1 << 32, n: 1, k: 1 << 32, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
    expect_err("wrapping m*k", &["gemm"], || be.gemm(g, &a, &b, &mut c));
    let g = Gemm { m: 1, n: 1 << 33, k: 1 << 31, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
    expect_err("wrapping k*n", &["gemm"], || be.gemm(g, &a, &b, &mut c));
}

fn sample_lines() -> Vec<String> {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/criteo-sample-200.csv")).unwrap().lines().map(String::from).collect()
}

fn kaggle() -> ember_engine::config::ModelConfig {
    preset("kaggle", Some(1000)).unwrap().model
}

#[test]
fn the_eval_split_streams_in_chunks_equal_to_the_whole_set() {
    let lines = sample_lines();
    let p = tmp("eval.csv");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    let mut r = CriteoReader::open(&p, &kaggle(), BadLinePolicy::Fail).unwrap();
    let whole = r.eval_set().unwrap();
    assert_eq!(whole.size(), 20);
    let ev = r.eval_stream().unwrap();
    for n in [1, 3, 7, 20, 64] {
        let mut got = Batch::new(whole.num_dense, whole.sparse.len());
        let mut k = 0;
        loop {
            let b = ev.chunk(k, n).unwrap();
            if b.size() == 0 {
                break;
            }
            assert!(b.size() <= n);
            got.extend(&b);
            k += 1;
        }
        assert_eq!(got, whole, "chunks of {n}");
        // Asking again (a second evaluation, or another rank) gives the same chunks.
        assert_eq!(ev.chunk(0, n).unwrap(), whole.slice(0..n.min(20)));
        assert_eq!(ev.chunk(1, n).unwrap(), whole.slice(n.min(20)..(2 * n).min(20)));
    }
}

#[test]
fn header_only_and_eval_less_files_are_errors_not_empty_runs() {
    let lines = sample_lines();
    let p = tmp("header.csv");
    std::fs::write(&p, format!("{}\n", lines[0])).unwrap();
    expect_err("header only", &["no data lines"], || CriteoReader::open(&p, &kaggle(), BadLinePolicy::Fail));
    let p = tmp("five.csv");
    std::fs::write(&p, lines[..6].join("\n") + "\n").unwrap();
    let mut r = CriteoReader::open(&p, &kaggle(), BadLinePolicy::Fail).unwrap();
    expect_err("five lines", &["no eval set"], || r.eval_stream());
    expect_err("five lines", &["no eval set"], || r.eval_set());
    // The training loop refuses an empty eval set and a source without samples.
    let cfg = { let mut c = preset("tiny", None).unwrap(); c.steps = Some(1); c.batch_size = 8; c };
    let mut data = ember_engine::data::synthetic::SyntheticData::new(&cfg).unwrap();
    let empty = Batch::new(cfg.model.num_dense, cfg.model.tables.len());
    expect_err("empty eval set", &["eval set is empty"], || ember_engine::train::train(&Cpu, &cfg, &mut data, &empty, |_| {}));
    let mut nothing = Batch::new(cfg.model.num_dense, cfg.model.tables.len());
    struct Empty(Batch);
    impl DataSource for Empty {
        fn next_batch(&mut self, _: usize) -> ember_engine::Result<Option<Batch>> { Ok(None) }
        fn position(&self) -> u64 { 0 }
        fn skip(&mut self, _: u64) -> ember_engine::Result<()> { Ok(()) }
        fn eval_set(&mut self) -> ember_engine::Result<Batch> { Ok(self.0.clone()) }
        fn len(&self) -> Option<u64> { Some(0) }
    }
    let eval = data.eval_set().unwrap();
    nothing.extend(&eval.slice(0..0));
    expect_err("no training sample", &["no training sample"], || ember_engine::train::train(&Cpu, &cfg, &mut Empty(nothing.clone()), &eval, |_| {}));
}

#[test]
fn overlong_lines_are_bad_lines_read_past_without_holding_them() {
    let mut lines = sample_lines();
    lines[5] = "7".repeat(1 << 20);
    let p = tmp("long.csv");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    let mut r = CriteoReader::open(&p, &kaggle(), BadLinePolicy::Fail).unwrap();
    expect_err("long line", &[":6:", "limit of 65536"], || r.next_batch(10));
    let mut r = CriteoReader::open(&p, &kaggle(), BadLinePolicy::Skip).unwrap();
    let b = r.next_batch(10).unwrap().unwrap();
    assert_eq!((b.size(), r.skipped()), (10, 1));
}

mod checkpoints {
    use super::*;
    use ember_engine::checkpoint::read::{parse_dense_header, parse_manifest, parse_shard_header, plain_name, validate_manifest};
    use ember_engine::checkpoint::{claim, rank2d, read_run_id, Checkpoint, DataPosition};

    fn small() -> TrainConfig {
        let mut c = preset("tiny", Some(50)).unwrap();
        c.batch_size = 8;
        c
    }

    fn save(root: &std::path::Path, step: u64) -> PathBuf {
        let c = small();
        let mut m = ember_engine::model::Dlrm::new(&Cpu, &c).unwrap();
        rank2d::save_dlrm(&Cpu, &mut m, &c, root, step, DataPosition::default(), 2, None).unwrap()
    }

    #[test]
    fn plain_names_only() {
        for ok in ["dense.bin", "shard-t000-r0-5-c0-16.bin", "..x", "a..b"] {
            assert!(plain_name(ok), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "/etc/passwd", "a/b", "a\\b", "a\0b"] {
            assert!(!plain_name(bad), "{bad:?}");
        }
        assert!(!plain_name(&"x".repeat(256)));
    }

    #[test]
    fn a_manifest_naming_a_file_outside_its_folder_is_refused() {
        let root = tmp("ck-names");
        let dir = save(&root, 3);
        let text = std::fs::read(dir.join("manifest.json")).unwrap();
        let mut m = parse_manifest(&text, &dir).unwrap();
        validate_manifest(&m, &dir).unwrap();
        m.files[0].name = "../escape".into();
        expect_err("relative escape", &["plain files", "../escape"], || validate_manifest(&m, &dir));
        m.files[0].name = "/etc/passwd".into();
        expect_err("absolute name", &["plain files"], || validate_manifest(&m, &dir));
        assert!(Checkpoint::open(&dir).is_ok());
    }

    /// Found by the checkpoint_manifest fuzz target: a manifest whose plan names a table past
    /// the model's last one made plan validation index out of bounds (a panic).
    #[test]
    fn a_plan_naming_a_table_past_the_model_is_refused() {
        let root = tmp("ck-plan-table");
        let dir = save(&root, 2);
        let mut m = parse_manifest(&std::fs::read(dir.join("manifest.json")).unwrap(), &dir).unwrap();
        let last = m.run.plan.tables.len() - 1;
        m.run.plan.tables[last].table = last + 1;
        expect_err("plan table past the model", &["plan, table 8", "listed at position 7"], || validate_manifest(&m, &dir));
        expect_err("plan table past the model", &["listed at position"], || m.run.plan.validate(&m.run.model));
    }

    #[test]
    fn shard_and_dense_headers_are_decoded_and_checked() {
        let root = tmp("ck-headers");
        let dir = save(&root, 1);
        let ck = Checkpoint::open(&dir).unwrap();
        for f in &ck.manifest.files {
            let bytes = std::fs::read(dir.join(&f.name)).unwrap();
            match &f.kind {
                ember_engine::checkpoint::FileKind::Shard { spec, state_per_row } => {
                    let h = parse_shard_header(&bytes).unwrap();
                    assert_eq!((&h.spec, h.state_per_row), (spec, *state_per_row));
                    let mut b = bytes[..64].to_vec();
                    b[40..48].copy_from_slice(&(spec.table_rows + 1).to_le_bytes());
                    assert!(parse_shard_header(&b).is_err(), "rows past the table");
                    assert!(parse_shard_header(&bytes[..63]).is_err(), "short");
                }
                ember_engine::checkpoint::FileKind::Dense { lens } => {
                    assert_eq!(&parse_dense_header(&bytes).unwrap(), lens);
                    assert!(parse_dense_header(&bytes[..bytes.len() - 4]).is_err(), "truncated");
                    let mut b = bytes.clone();
                    b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
                    assert!(parse_dense_header(&b).is_err(), "overflowing length");
                    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
                    assert!(parse_dense_header(&b).is_err(), "huge count");
                }
                ember_engine::checkpoint::FileKind::Replica { .. } => panic!("{}: a 1x1 checkpoint has no replica files", f.name),
            }
        }
    }

    #[test]
    fn a_root_belongs_to_one_run_and_pruning_spares_other_runs() {
        let root = tmp("ck-claim");
        // A fresh root: claimed, with a run id.
        let a = claim(&root, false, false).unwrap();
        assert_eq!(read_run_id(&root).unwrap().as_deref(), Some(a.as_str()));
        save(&root, 4);
        // Another new run is refused, naming the folder, the owner and the way out.
        expect_err("second run", &["another run", a.as_str(), "--overwrite-checkpoints"], || claim(&root, false, false));
        // Resuming continues run A.
        assert_eq!(claim(&root, true, false).unwrap(), a);
        // Pruning on behalf of another run removes nothing.
        save(&root, 5);
        save(&root, 6);
        ember_engine::checkpoint::write::prune(&root, 1, Some("someone-else")).unwrap();
        assert_eq!(ember_engine::checkpoint::list(&root).unwrap().len(), 3);
        ember_engine::checkpoint::write::prune(&root, 1, Some(&a)).unwrap();
        assert_eq!(ember_engine::checkpoint::list(&root).unwrap().iter().map(|l| l.step).collect::<Vec<_>>(), vec![6]);
        // Overwrite: run A's checkpoints go, run B owns the root.
        let b = claim(&root, false, true).unwrap();
        assert_ne!(a, b);
        assert!(ember_engine::checkpoint::list(&root).unwrap().is_empty());
        // A damaged run-id file is an error, not a silent takeover.
        std::fs::write(root.join("run-id"), "../../x\n").unwrap();
        expect_err("damaged id", &["run-id"], || claim(&root, true, false));
    }
}
