//! Determinism of the single-process Dlrm: same seed ⇒ bitwise identical weights after N steps
//! (also across rayon thread counts); weight init is a function of (seed, table, row, col) only,
//! so any row-range / column-range shard regenerates exactly its slice of the whole table.
use ember_engine::backend::{Buffers, Cpu, ShardSpec};
use ember_engine::config::*;
use ember_engine::embedding::init_shard_weights;
use ember_engine::model::Dlrm;
use ember_tests::oracle::*;

fn config(seed: u64, embedding: EmbOptimizer, bottom: Vec<usize>, num_dense: usize) -> TrainConfig {
    let t = |rows: u64, pooling: Pooling| TableConfig { rows, dim: 16, pooling, bag_size: 2 };
    TrainConfig {
        model: ModelConfig {
            num_dense,
            tables: vec![t(300, Pooling::Sum), t(20, Pooling::Mean), t(1000, Pooling::Sum), t(5, Pooling::Sum)],
            bottom_mlp: bottom,
            top_mlp: vec![32, 1],
            interaction: Interaction::Dot,
        },
        optim: OptimConfig {
            embedding,
            dense: DenseOptimizer::Adagrad { lr: 0.05, eps: 1e-8 },
            weight_decay: WeightDecay::None,
        },
        batch_size: 64,
        steps: Some(5),
        seed,
        eval_every: 0,
        synthetic: SyntheticConfig::default(),
    }
}

fn rowwise() -> EmbOptimizer {
    EmbOptimizer::RowWiseAdagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false }
}

fn run(cfg: &TrainConfig, batch: usize, steps: usize) -> (Vec<Vec<f32>>, Vec<f32>) {
    let be = Cpu::new();
    let batches = random_batches(&cfg.model, batch, steps + 1, 77);
    let mut m = Dlrm::new(&be, cfg).unwrap();
    for b in &batches[..steps] {
        m.train_step(&be, b).unwrap();
    }
    let mut out: Vec<Vec<f32>> = m.tables.iter().flat_map(|t| [t.weights.clone(), t.state.clone()]).collect();
    out.extend(m.dense.params_mut().into_iter().flat_map(|p| [p.w.clone(), p.s.clone()]));
    let logits = m.predict(&be, &batches[steps]).unwrap();
    (out, logits)
}

fn assert_same(a: &(Vec<Vec<f32>>, Vec<f32>), b: &(Vec<Vec<f32>>, Vec<f32>), what: &str) {
    assert_eq!(a.0.len(), b.0.len());
    for (i, (x, y)) in a.0.iter().zip(&b.0).enumerate() {
        assert_bitwise(x, y, &format!("{what}: tensor {i}"));
    }
    assert_bitwise(&a.1, &b.1, &format!("{what}: logits"));
}

#[test]
fn same_seed_gives_bitwise_identical_models() {
    for emb in [rowwise(), EmbOptimizer::Adagrad { lr: 0.05, eps: 1e-8, c: None, eps_inside: false }, EmbOptimizer::Sgd { lr: 0.1 }] {
        let cfg = config(11, emb, vec![32, 16], 13);
        let a = run(&cfg, 64, 6);
        let b = run(&cfg, 64, 6);
        assert_same(&a, &b, &format!("{emb:?}: two runs"));
        // Sanity: another seed gives another model.
        let c = run(&config(12, emb, vec![32, 16], 13), 64, 6);
        assert!(a.0[0] != c.0[0], "{emb:?}: a different seed should change the initial weights");
    }
}

#[test]
fn bitwise_identical_across_thread_counts() {
    // Large enough that the GEMMs take their parallel path (m·n·k ≥ 2^18) and the embedding
    // updates split across threads.
    let cfg = config(5, rowwise(), vec![128, 16], 13);
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| run(&cfg, 256, 3));
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap().install(|| run(&cfg, 256, 3));
    let four = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap().install(|| run(&cfg, 256, 3));
    assert_same(&one, &two, "1 vs 2 threads");
    assert_same(&one, &four, "1 vs 4 threads");
}

#[test]
fn init_is_a_function_of_seed_table_row_col() {
    let (rows, dim) = (37u64, 20usize);
    for table in [0usize, 3] {
        let whole = init_shard_weights(9, &ShardSpec::whole(table, rows, dim));
        assert_eq!(whole.len(), rows as usize * dim);
        let bound = 1.0 / (rows as f32).sqrt();
        assert!(whole.iter().all(|w| w.abs() <= bound), "init outside ±1/sqrt(rows)");
        // Spread: not constant, both signs.
        assert!(whole.iter().any(|&w| w > bound / 2.0) && whole.iter().any(|&w| w < -bound / 2.0), "init not spread over ±bound");
        for (r0, r1, c0, c1) in [(0u64, 37u64, 0usize, 20usize), (5, 17, 3, 9), (36, 37, 19, 20), (0, 1, 0, 12), (10, 37, 12, 20)] {
            let spec = ShardSpec { table, table_rows: rows, dim, rows: r0..r1, cols: c0..c1 };
            let part = init_shard_weights(9, &spec);
            let want: Vec<f32> = (r0 as usize..r1 as usize).flat_map(|r| whole[r * dim + c0..r * dim + c1].iter().copied()).collect();
            assert_bitwise(&part, &want, &format!("table {table} shard rows {r0}..{r1} cols {c0}..{c1}"));
        }
    }
    // A large shard (several parallel init chunks) equals its pieces.
    let big = ShardSpec::whole(1, 5000, 8);
    let whole = init_shard_weights(4, &big);
    let part = init_shard_weights(4, &ShardSpec { rows: 1023..4097, cols: 2..7, ..big.clone() });
    let want: Vec<f32> = (1023..4097usize).flat_map(|r| whole[r * 8 + 2..r * 8 + 7].iter().copied()).collect();
    assert_bitwise(&part, &want, "large shard slice");
    // Depends on the seed and the table.
    assert_ne!(init_shard_weights(9, &ShardSpec::whole(0, rows, dim)), init_shard_weights(9, &ShardSpec::whole(1, rows, dim)));
    assert_ne!(init_shard_weights(9, &ShardSpec::whole(0, rows, dim)), init_shard_weights(10, &ShardSpec::whole(0, rows, dim)));
}

#[test]
fn dlrm_tables_start_from_init_shard_weights() {
    let be = Cpu::new();
    let cfg = config(21, rowwise(), vec![32, 16], 13);
    let m = Dlrm::new(&be, &cfg).unwrap();
    for (t, (shard, tc)) in m.tables.iter().zip(&cfg.model.tables).enumerate() {
        let want = init_shard_weights(21, &ShardSpec::whole(t, tc.rows, tc.dim));
        assert_bitwise(&be.download(&shard.weights).unwrap(), &want, &format!("table {t} initial weights"));
        assert!(shard.state.iter().all(|&v| v == 0.0), "table {t}: optimizer state starts at zero");
    }
}
