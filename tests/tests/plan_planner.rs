//! The planner (engine/src/plan/planner.rs): every plan is valid, balances better than naive
//! round-robin, refuses what does not fit, and predicts the all-to-all volumes of BRIEF.md §2.
use ember_engine::config::{preset, DenseOptimizer, EmbOptimizer, Interaction, ModelConfig, Pooling, TableConfig};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::grid::Placement;
use ember_engine::plan::planner::{plan, predict, stats_from_batches, PlanOptions, TableStats};
use ember_engine::plan::{Plan, ShardingType, TablePlan};
use ember_engine::Error;

/// splitmix64: a small deterministic generator for random models.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn model(tables: Vec<TableConfig>) -> ModelConfig {
    let d = tables[0].dim;
    ModelConfig { num_dense: 13, tables, bottom_mlp: vec![64, d], top_mlp: vec![32, 1], interaction: Interaction::Dot }
}

fn random_model(rng: &mut Rng) -> ModelConfig {
    let dim = [4usize, 8, 16, 32, 64, 128][rng.below(6) as usize];
    let nt = 1 + rng.below(40) as usize;
    let tables = (0..nt)
        .map(|_| TableConfig {
            rows: 1 + (10f64.powf(rng.f64() * 7.5)) as u64,
            dim,
            pooling: Pooling::Sum,
            bag_size: if rng.below(5) == 0 { 20 + rng.below(100) as usize } else { 1 + rng.below(8) as usize },
        })
        .collect();
    model(tables)
}

fn random_stats(rng: &mut Rng, m: &ModelConfig) -> Vec<TableStats> {
    m.tables
        .iter()
        .map(|t| {
            let nb = t.rows.min(64) as usize;
            let mut h: Vec<f64> = (0..nb).map(|_| rng.f64().powi(4)).collect();
            let s: f64 = h.iter().sum::<f64>().max(1e-12);
            h.iter_mut().for_each(|x| *x /= s);
            TableStats { lookups_per_sample: rng.f64() * 30.0, distinct_fraction: rng.f64(), top_row_fraction: 0.0, row_histogram: h, distinct_curve: Vec::new() }
        })
        .collect()
}

/// Invariants of a plan and its report that hold for any model and grid.
fn check(m: &ModelConfig, grid_m: usize, n: usize, opts: &PlanOptions) {
    let (p, rep) = plan(m, grid_m, n, opts).unwrap_or_else(|e| panic!("{grid_m}x{n}: {e}"));
    p.validate(m).unwrap_or_else(|e| panic!("{grid_m}x{n}: invalid plan {e}: {p:?}"));
    assert_eq!(p.n, n);
    assert_eq!(rep.ranks.len(), n);
    if let Some(kind) = opts.force {
        assert!(p.tables.iter().all(|t| t.kind == kind), "force {kind:?}");
    }
    // Weights add up to the tables (rounding to whole bytes per rank aside).
    let w: u64 = rep.ranks.iter().map(|r| r.weights_bytes).sum();
    let want: u64 = m.tables.iter().map(|t| t.rows * t.dim as u64 * 4).sum();
    assert!(w.abs_diff(want) <= n as u64, "weights {w} vs {want}");
    // Lookups add up to λ·B/M per table (column shards each look up every id).
    let lookups: f64 = rep.ranks.iter().map(|r| r.lookups).sum();
    let stats = opts.stats.clone().unwrap_or_else(|| m.tables.iter().map(TableStats::from_config).collect());
    let g = opts.batch_size as f64 / grid_m as f64;
    let want: f64 = p.tables.iter().map(|tp| stats[tp.table].lookups_per_sample * g * if tp.kind == ShardingType::ColumnWise { tp.shards.len() as f64 } else { 1.0 }).sum();
    assert!((lookups - want).abs() <= 1e-6 * want.max(1.0), "lookups {lookups} vs {want}");
    // Lookup cost (lookups × columns) adds up to λ·G·dim per table, however the table is split.
    let cost: f64 = rep.ranks.iter().map(|r| r.cost).sum();
    let want: f64 = p.tables.iter().map(|tp| stats[tp.table].lookups_per_sample * g * m.tables[tp.table].dim as f64).sum();
    assert!((cost - want).abs() <= 1e-6 * want.max(1.0), "lookup cost {cost} vs {want}");
    // With uniform ids, each rank's cost follows from its shards alone: λ·G·(rows share)·cols
    // (column shards see every id of their table).
    if opts.stats.is_none() {
        let mut per = vec![0f64; n];
        for tp in &p.tables {
            let t = &m.tables[tp.table];
            for s in &tp.shards {
                let share = if tp.kind == ShardingType::ColumnWise { 1.0 } else { (s.rows.end - s.rows.start) as f64 / t.rows as f64 };
                per[s.rank] += t.bag_size as f64 * g * share * s.cols.len() as f64;
            }
        }
        for r in &rep.ranks {
            assert!((r.cost - per[r.rank]).abs() <= 1e-6 * per[r.rank].max(1.0), "rank {}: lookup cost {} vs {} from its shards", r.rank, r.cost, per[r.rank]);
        }
    }
    // The imbalance ratio is max / mean of those costs.
    let costs: Vec<f64> = rep.ranks.iter().map(|r| r.cost).collect();
    let mean = costs.iter().sum::<f64>() / n as f64;
    let ratio = if mean > 0.0 { costs.iter().cloned().fold(0.0, f64::max) / mean } else { 1.0 };
    assert!((rep.imbalance - ratio).abs() <= 1e-9 * ratio, "imbalance {} vs max/mean {ratio}", rep.imbalance);
    // Each rank's weight and optimizer bytes follow from its shards: rows × cols floats, and 0, 1
    // or cols floats of state per row (SGD, row-wise, element-wise AdaGrad).
    let state_floats = |cols: usize| match opts.optimizer {
        EmbOptimizer::Sgd { .. } => 0u64,
        EmbOptimizer::RowWiseAdagrad { .. } => 1,
        EmbOptimizer::Adagrad { .. } => cols as u64,
    };
    let (mut wb, mut ob) = (vec![0u64; n], vec![0u64; n]);
    for tp in &p.tables {
        for s in &tp.shards {
            let rows = s.rows.end - s.rows.start;
            wb[s.rank] += rows * s.cols.len() as u64 * 4;
            ob[s.rank] += rows * state_floats(s.cols.len()) * 4;
        }
    }
    for r in &rep.ranks {
        assert_eq!((r.weights_bytes, r.optimizer_bytes), (wb[r.rank], ob[r.rank]), "rank {}: weight and optimizer bytes of its shards", r.rank);
        assert!(r.total_bytes >= r.weights_bytes + r.optimizer_bytes + r.dense_bytes, "rank {}: total below its parts", r.rank);
        assert!(r.a2a_inter_node_bytes <= r.a2a_total_bytes * (1.0 + 1e-9) + 1e-6);
        if grid_m == 1 {
            assert_eq!(r.sync_bytes_whole, 0.0);
        }
    }
}

#[test]
fn random_models_always_give_valid_plans() {
    let mut rng = Rng(7);
    for case in 0..24 {
        let m = random_model(&mut rng);
        let stats = if case % 2 == 1 { Some(random_stats(&mut rng, &m)) } else { None };
        for n in 1..=16 {
            let grid_m = [1usize, 2, 4][rng.below(3) as usize];
            let placement = if rng.below(2) == 0 { Placement::ReplicasInNode } else { Placement::ReplicasAcrossNodes };
            let optimizer = match rng.below(3) {
                0 => EmbOptimizer::Sgd { lr: 0.1 },
                1 => EmbOptimizer::RowWiseAdagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false },
                _ => EmbOptimizer::Adagrad { lr: 0.1, eps: 1e-8, c: None, eps_inside: false },
            };
            let base = PlanOptions {
                batch_size: 64 * (1 + rng.below(64) as usize),
                ranks_per_node: 1 + rng.below(8) as usize,
                placement,
                optimizer,
                stats: stats.clone(),
                ..Default::default()
            };
            check(&m, grid_m, n, &base);
            for kind in ShardingType::ALL {
                check(&m, grid_m, n, &PlanOptions { force: Some(kind), ..base.clone() });
            }
        }
    }
}

#[test]
fn real_shapes_give_valid_plans() {
    for name in ["tiny", "kaggle", "terabyte", "dlrmv2", "bench"] {
        let cfg = preset(name, Some(u64::MAX)).unwrap();
        for n in 1..=16 {
            for grid_m in [1, 2, 8] {
                check(&cfg.model, grid_m, n, &PlanOptions::from_config(&cfg));
            }
        }
    }
}

fn round_robin(m: &ModelConfig, n: usize) -> Plan {
    Plan { n, tables: m.tables.iter().enumerate().map(|(t, tc)| TablePlan::new(t, tc.rows, tc.dim, ShardingType::TableWise, &[t % n])).collect() }
}

#[test]
fn balances_a_skewed_model_better_than_round_robin() {
    // Zipf-like lookups: table t has ~ 200/(t+1) ids per sample; sizes vary independently.
    let mut rng = Rng(3);
    let tables: Vec<TableConfig> = (0..40)
        .map(|t| TableConfig { rows: 1000 + rng.below(2_000_000), dim: 64, pooling: Pooling::Sum, bag_size: (200 / (t + 1)).max(1) })
        .collect();
    let m = model(tables);
    for n in [2, 4, 8, 16] {
        let opts = PlanOptions { batch_size: 8192, ..Default::default() };
        let (p, rep) = plan(&m, 1, n, &opts).unwrap();
        let rr = predict(&m, 1, &round_robin(&m, n), &opts).unwrap();
        assert!(rep.imbalance < rr.imbalance, "N={n}: planner {} vs round-robin {}", rep.imbalance, rr.imbalance);
        assert!(rep.imbalance < 1.25, "N={n}: imbalance {} ({:?})", rep.imbalance, rep.tables_by_type);
        // The hottest table (200 of ~856 ids per sample: more than a rank's share from N = 8)
        // is split by columns.
        if n >= 8 {
            assert_eq!(p.tables[0].kind, ShardingType::ColumnWise, "N={n}: {:?}", p.tables[0]);
        }
    }
}

#[test]
fn huge_tables_are_split_by_rows_and_within_a_node_when_that_suffices() {
    // One table of 10 units and 15 of 1: mean per rank over 16 ranks is 25/16 units, so the big
    // table must be split; over one node of 8 ranks it is 10/8 = 1.25 units: table-row-wise.
    let mut tables = vec![TableConfig { rows: 1_000_000, dim: 32, pooling: Pooling::Sum, bag_size: 2 }];
    tables.extend((0..15).map(|_| TableConfig { rows: 100_000, dim: 32, pooling: Pooling::Sum, bag_size: 1 }));
    let m = model(tables);
    let opts = PlanOptions { ranks_per_node: 8, ..Default::default() };
    let (p, rep) = plan(&m, 1, 16, &opts).unwrap();
    assert_eq!(p.tables[0].kind, ShardingType::TableRowWise);
    assert_eq!(p.tables[0].shards.len(), 8);
    let mut ranks: Vec<usize> = p.tables[0].shards.iter().map(|s| s.rank).collect();
    ranks.sort();
    assert!(ranks == (0..8).collect::<Vec<_>>() || ranks == (8..16).collect::<Vec<_>>(), "{ranks:?}");
    assert_eq!(rep.group_ranks_per_node, 8);
    // With 4 replicas inside a node a node holds 2 ranks of a group: 10/2 units is too much, row-wise.
    let (p, rep) = plan(&m, 4, 16, &opts).unwrap();
    assert_eq!(rep.group_ranks_per_node, 2);
    assert_eq!(p.tables[0].kind, ShardingType::RowWise);
    // Replicas across nodes keep the whole node for the group.
    let (p, _) = plan(&m, 4, 16, &PlanOptions { placement: Placement::ReplicasAcrossNodes, ..opts.clone() }).unwrap();
    assert_eq!(p.tables[0].kind, ShardingType::TableRowWise);
    // One rank: everything table-wise on rank 0.
    let (p, _) = plan(&m, 1, 1, &opts).unwrap();
    assert!(p.tables.iter().all(|t| t.kind == ShardingType::TableWise && t.shards[0].rank == 0));
}

#[test]
fn memory_budget_refusal_names_rank_need_and_budget() {
    let cfg = preset("dlrmv2", Some(u64::MAX)).unwrap();
    let opts = PlanOptions { batch_size: 65536, memory_budget_bytes: Some(16 << 30), ..PlanOptions::from_config(&cfg) };
    // ~195 GiB of tables with AdaGrad state over 8 ranks cannot fit 16 GiB per rank.
    let err = plan(&cfg.model, 1, 8, &opts).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    for want in ["does not fit the memory budget", "rank ", "needs ", "GiB", "budget is 16.000 GiB per rank", "grid 1x8"] {
        assert!(msg.contains(want), "missing '{want}' in: {msg}");
    }
    // The same grid fits a budget above what the planner needs, and respects it.
    let (_, free) = plan(&cfg.model, 1, 8, &PlanOptions { memory_budget_bytes: None, ..opts.clone() }).unwrap();
    let budget = free.max_rank_bytes + (1 << 20);
    let (p, rep) = plan(&cfg.model, 1, 8, &PlanOptions { memory_budget_bytes: Some(budget), ..opts.clone() }).unwrap();
    p.validate(&cfg.model).unwrap();
    assert!(rep.max_rank_bytes <= budget);
    // A tight budget is met by splitting more tables by rows (the default plan's heaviest rank
    // would not fit), when an even split can fit.
    let n = 64;
    let (_, loose) = plan(&cfg.model, 1, n, &PlanOptions { memory_budget_bytes: None, ..opts.clone() }).unwrap();
    let even = loose.ranks.iter().map(|r| r.total_bytes).sum::<u64>() / n as u64;
    let tight = (even as f64 * 1.15) as u64;
    assert!(tight < loose.max_rank_bytes, "test premise: {tight} < {}", loose.max_rank_bytes);
    let (_, rep) = plan(&cfg.model, 1, n, &PlanOptions { memory_budget_bytes: Some(tight), ..opts.clone() }).unwrap();
    assert!(rep.max_rank_bytes <= tight);
}

#[test]
fn row_wise_output_bytes_shrink_by_m_at_fixed_t() {
    let t = 64;
    let bytes = |name: &str, kind: ShardingType, grid_m: usize| {
        let cfg = preset(name, Some(u64::MAX)).unwrap();
        // Replicas across nodes: a node holds 8 ranks of a group whatever M.
        let placement = Placement::ReplicasAcrossNodes;
        let opts = PlanOptions { batch_size: 65536, force: Some(kind), placement, ..PlanOptions::from_config(&cfg) };
        let (_, rep) = plan(&cfg.model, grid_m, t / grid_m, &opts).unwrap();
        rep.a2a_mean_bytes_per_rank[kind.name()]
    };
    let sum_d = |name: &str| preset(name, None).unwrap().model.tables.iter().map(|t| t.dim as f64).sum::<f64>();
    for m in [1, 2, 4] {
        // `bench`: 8 tables of 1M rows, all split over every rank: exactly a factor 2 per doubling,
        // and every rank sends G·ΣD floats of partial sums, G = B/M.
        let (a, b) = (bytes("bench", ShardingType::RowWise, m), bytes("bench", ShardingType::RowWise, 2 * m));
        assert!((a.outputs / b.outputs - 2.0).abs() < 1e-9, "row-wise M {m} -> {}: {} / {}", 2 * m, a.outputs, b.outputs);
        assert!((a.outputs - 65536.0 / m as f64 * sum_d("bench") * 4.0).abs() < 1e-6 * a.outputs);
        // DLRMv2 has tables with fewer rows than ranks (fewer shards): close to 2.
        let (a, b) = (bytes("dlrmv2", ShardingType::RowWise, m), bytes("dlrmv2", ShardingType::RowWise, 2 * m));
        assert!((1.85..=2.0 + 1e-9).contains(&(a.outputs / b.outputs)), "dlrmv2 row-wise M {m}: {} / {}", a.outputs, b.outputs);
        // Table-row-wise (fixed node span L): each shard's intra-node reduce-scatter (G·D floats)
        // and its G·D/L floats that leave the node both shrink by M. (Per rank on average it does
        // not: a table is split over L ranks, not N, so at fixed T each rank holds M times more
        // table-row-wise shards.)
        let per_shard = |grid_m: usize| {
            let cfg = preset("bench", None).unwrap();
            let opts = PlanOptions { batch_size: 65536, force: Some(ShardingType::TableRowWise), placement: Placement::ReplicasAcrossNodes, ..PlanOptions::from_config(&cfg) };
            let (p, rep) = plan(&cfg.model, grid_m, t / grid_m, &opts).unwrap();
            let shards: usize = p.tables.iter().map(|tp| tp.shards.len()).sum();
            assert_eq!(rep.group_ranks_per_node, 8);
            rep.ranks.iter().map(|r| r.a2a["table_row_wise"].outputs).sum::<f64>() / shards as f64
        };
        let (a, b) = (per_shard(m), per_shard(2 * m));
        assert!((a / b - 2.0).abs() < 1e-9, "table-row-wise M {m}: {a} / {b}");
        assert!((a - 65536.0 / m as f64 * 64.0 * 4.0 * (1.0 + 1.0 / 8.0)).abs() < 1e-6 * a);
    }
    // Table-wise and column-wise: B·ΣD/T floats per rank on average, whatever M.
    for name in ["bench", "dlrmv2"] {
        for kind in [ShardingType::TableWise, ShardingType::ColumnWise] {
            for grid_m in [1, 2, 4, 8] {
                let o = bytes(name, kind, grid_m).outputs;
                assert!((o - 65536.0 * sum_d(name) * 4.0 / t as f64).abs() < 1e-6 * o, "{name} {kind:?} M={grid_m}: {o}");
            }
        }
    }
}

#[test]
fn dlrmv2_plans_at_4096_ranks() {
    let cfg = preset("dlrmv2", Some(u64::MAX)).unwrap();
    assert_eq!(cfg.model.tables[0].rows, 40_000_000, "uncapped rows");
    let opts = PlanOptions { batch_size: 65536, ..PlanOptions::from_config(&cfg) };
    for (gm, n) in [(16, 256), (1, 4096), (4, 1024), (4096, 1)] {
        let (p, rep) = plan(&cfg.model, gm, n, &opts).unwrap();
        p.validate(&cfg.model).unwrap();
        assert_eq!(rep.world, 4096);
    }
    // 2D balances better than full sharding at the same T (BRIEF.md §4 reports 5.70 vs 1.57).
    let full = plan(&cfg.model, 1, 4096, &opts).unwrap().1;
    let twod = plan(&cfg.model, 16, 256, &opts).unwrap().1;
    assert!(twod.imbalance < full.imbalance, "{} vs {}", twod.imbalance, full.imbalance);
    assert!(twod.a2a_mean_total_bytes_per_rank < full.a2a_mean_total_bytes_per_rank);
}

#[test]
fn report_serialises_to_json() {
    let cfg = preset("tiny", None).unwrap();
    let (_, rep) = plan(&cfg.model, 2, 4, &PlanOptions::from_config(&cfg)).unwrap();
    let text = serde_json::to_string(&rep).unwrap();
    assert!(!text.contains('\n'));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["m"], 2);
    assert_eq!(v["n"], 4);
    assert_eq!(v["ranks"].as_array().unwrap().len(), 4);
    assert_eq!(v["tables"].as_array().unwrap().len(), cfg.model.num_tables());
    assert!(v["imbalance"].as_f64().unwrap() >= 1.0);
    assert!(v["ranks"][0]["a2a"].is_object());
    assert!(v["ranks"][0]["total_bytes"].as_u64().unwrap() > 0);
    let kind = v["tables"][0]["kind"].as_str().unwrap();
    assert!(ShardingType::ALL.iter().any(|k| k.name() == kind), "{kind}");
}

#[test]
fn stats_from_synthetic_batches() {
    let mut cfg = preset("tiny", None).unwrap();
    cfg.synthetic.zipf = 1.05;
    let data = SyntheticData::new(&cfg).unwrap();
    let batch = data.samples(0, 4096);
    let stats = stats_from_batches(&cfg.model, &[batch.slice(0..2048), batch.slice(2048..4096)]);
    for (t, (s, tc)) in stats.iter().zip(&cfg.model.tables).enumerate() {
        let ids = batch.sparse[t].values.len() as f64;
        assert!((s.lookups_per_sample - ids / 4096.0).abs() < 1e-12);
        // Mean bag about bag_size, 5 % empty.
        assert!((s.lookups_per_sample / tc.bag_size as f64 - 0.95).abs() < 0.1, "table {t}: {}", s.lookups_per_sample);
        assert!((s.row_histogram.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!((s.row_fraction(tc.rows, &(0..tc.rows)) - 1.0).abs() < 1e-9);
        let half = s.row_fraction(tc.rows, &(0..tc.rows / 2)) + s.row_fraction(tc.rows, &(tc.rows / 2..tc.rows));
        assert!((half - 1.0).abs() < 1e-9);
        assert!(s.distinct_fraction > 0.0 && s.distinct_fraction <= 1.0);
        assert!(s.top_row_fraction > 0.0 && s.top_row_fraction <= 1.0);
    }
    // Zipf ids: the most popular row takes far more than 1/rows of the lookups.
    assert!(stats[4].top_row_fraction > 100.0 / cfg.model.tables[4].rows as f64);
    // Planning with measured statistics works and the dense optimizer does not matter to validity.
    let opts = PlanOptions { stats: Some(stats), dense_optimizer: DenseOptimizer::Sgd { lr: 0.1 }, ..PlanOptions::from_config(&cfg) };
    for n in 1..=8 {
        check(&cfg.model, 2, n, &opts);
    }
}

#[test]
fn bad_inputs_are_config_errors() {
    let cfg = preset("tiny", None).unwrap();
    let opts = PlanOptions::from_config(&cfg);
    assert!(matches!(plan(&cfg.model, 0, 4, &opts), Err(Error::Config(_))));
    assert!(matches!(plan(&cfg.model, 1, 0, &opts), Err(Error::Config(_))));
    assert!(matches!(plan(&cfg.model, 1, 4, &PlanOptions { batch_size: 0, ..opts.clone() }), Err(Error::Config(_))));
    assert!(matches!(plan(&cfg.model, 1, 4, &PlanOptions { stats: Some(vec![]), ..opts.clone() }), Err(Error::Config(_))));
}

/// Zipf-like shares over `min(rows, 1024)` buckets (exponent 1.05, the synthetic data's).
fn zipf_histogram(rows: u64) -> Vec<f64> {
    let nb = rows.min(1024) as usize;
    let h: Vec<f64> = (0..nb).map(|i| 1.0 / ((i + 1) as f64).powf(1.05)).collect();
    let s: f64 = h.iter().sum();
    h.into_iter().map(|x| x / s).collect()
}

#[test]
fn hot_narrow_tables_are_split_by_rows_for_balance() {
    // Kaggle shapes (26 tables, dim 16: too narrow for a column split) with skewed statistics:
    // zipf ids inside every table, one id per sample in most tables but 24, 12 and 8 in three
    // small ones (305, 93 145 and 14 992 rows). A plan that keeps a table whole has an imbalance
    // of at least its cost over the mean per-rank cost (2.87 for the 24-id table at N = 8).
    let cfg = preset("kaggle", Some(u64::MAX)).unwrap();
    let hot = [(4usize, 24.0), (9, 12.0), (14, 8.0)];
    let stats: Vec<TableStats> = cfg
        .model
        .tables
        .iter()
        .enumerate()
        .map(|(t, tc)| TableStats {
            lookups_per_sample: hot.iter().find(|h| h.0 == t).map_or(1.0, |h| h.1),
            distinct_fraction: 1.0,
            top_row_fraction: 0.0,
            row_histogram: zipf_histogram(tc.rows),
            distinct_curve: Vec::new(),
        })
        .collect();
    let total: f64 = stats.iter().map(|s| s.lookups_per_sample).sum();
    for (m, n) in [(1, 8), (2, 8), (1, 16), (4, 16)] {
        let opts = PlanOptions { batch_size: 8192, stats: Some(stats.clone()), ..PlanOptions::from_config(&cfg) };
        let (p, rep) = plan(&cfg.model, m, n, &opts).unwrap();
        let whole_bound = 24.0 * n as f64 / total;
        eprintln!("kaggle {m}x{n}: imbalance {:.3} (any plan with the hot tables whole: >= {whole_bound:.3})", rep.imbalance);
        assert!(whole_bound > 1.5, "{m}x{n}: the 24-id table is hot");
        assert!(rep.imbalance < 1.3, "{m}x{n}: imbalance {} ({:?})", rep.imbalance, rep.tables_by_type);
        let t4 = &p.tables[4];
        assert!(matches!(t4.kind, ShardingType::TableRowWise | ShardingType::RowWise) && t4.shards.len() >= 2, "{m}x{n}: {t4:?}");
        // The shards hold about equal shares of the table's ids (the hottest row alone holds
        // 1/H(305) ≈ 16 %, so no shard can go below that).
        let k = t4.shards.len() as f64;
        let top = stats[4].row_histogram[0];
        for s in &t4.shards {
            let f = stats[4].row_fraction(305, &s.rows);
            assert!(f <= (1.0 / k).max(top) + 1.0 / k, "{m}x{n}: shard {:?} has {f} of the ids ({} shards)", s.rows, k);
        }
        // Kept on one node when the shards fit in it (8 ranks per node, M replicas inside).
        let l = (8 / m).min(n);
        if t4.kind == ShardingType::TableRowWise && t4.shards.len() <= l {
            let nodes: std::collections::BTreeSet<usize> = t4.shards.iter().map(|s| s.rank / l).collect();
            assert_eq!(nodes.len(), 1, "{m}x{n}: {t4:?}");
        }
        check(&cfg.model, m, n, &opts);
    }
}

#[test]
fn the_tiny_preset_is_balanced_with_its_measured_statistics() {
    // The tiny preset (8 tables of dim 16; 1 to 3 ids per sample) with statistics measured on
    // its zipf synthetic stream: the 3-id tables cost more than a rank's share at N = 8 and are
    // split by rows; whole tables alone cannot do better than max cost / mean cost.
    let cfg = preset("tiny", None).unwrap();
    let data = SyntheticData::new(&cfg).unwrap();
    let batches: Vec<_> = (0..8).map(|s| data.samples(s * 256, 256)).collect();
    let stats = stats_from_batches(&cfg.model, &batches);
    let opts = PlanOptions { stats: Some(stats.clone()), ..PlanOptions::from_config(&cfg) };
    let (p, rep) = plan(&cfg.model, 1, 8, &opts).unwrap();
    let costs: Vec<f64> = stats.iter().map(|s| s.lookups_per_sample).collect();
    let whole_bound = costs.iter().cloned().fold(0.0, f64::max) * 8.0 / costs.iter().sum::<f64>();
    eprintln!("tiny 1x8: imbalance {:.3} (whole tables: >= {whole_bound:.3})", rep.imbalance);
    assert!(rep.imbalance < whole_bound, "imbalance {} vs the whole-table bound {whole_bound}", rep.imbalance);
    assert!(p.tables.iter().any(|t| t.kind.splits_rows()), "{:?}", rep.tables_by_type);
}
