//! Optimizer semantics (BRIEF.md §3): hand-computed values over three steps, the identity
//! "c = M equals c = 1 run with lr·√M and eps·√M" on whole Dlrm trajectories, SGD keeping no state.
use ember_engine::backend::{Bags, Cpu, EmbKind, EmbUpdate, Layout, Numerics, ShardSpec};
use ember_engine::config::*;
use ember_engine::data::Batch;
use ember_engine::model::Dlrm;
use ember_tests::oracle::*;

/// The 1-row, 2-dim table of the hand computations: w0 = [1, −0.5], three steps whose summed
/// row gradients are g1 = [0.3, 0.4] (one bag), g2 = [0.2, −0.4] (id twice in one bag with
/// incoming gradient [0.1, −0.2]), g3 = [0.25, 0.1] (two bags [0.5, 0] and [−0.25, 0.1]).
fn run_hand(u: EmbUpdate) -> Vec<(Vec<f32>, Vec<f32>)> {
    let be = Cpu::new();
    let mut shard = be.shard(ShardSpec::whole(0, 1, 2), &[1.0, -0.5], &u).unwrap();
    let steps: [(Vec<u64>, Vec<u64>, Vec<f32>); 3] = [
        (vec![0, 1], vec![0], vec![0.3, 0.4]),
        (vec![0, 2], vec![0, 0], vec![0.1, -0.2]),
        (vec![0, 1, 2], vec![0, 0], vec![0.5, 0.0, -0.25, 0.1]),
    ];
    let mut out = Vec::new();
    for (offsets, ids, grad) in steps {
        let bags = Bags::<Cpu> { num_bags: offsets.len() - 1, offsets, ids, scale: None };
        be.embedding_backward_update(&mut shard, &bags, &grad, Layout { stride: 2, col: 0 }, &u).unwrap();
        out.push((shard.weights.clone(), shard.state.clone()));
    }
    out
}

#[track_caller]
fn check_hand(u: EmbUpdate, want: &[([f64; 2], &[f64])]) {
    let got = run_hand(u);
    for (s, ((w, v), (ww, wv))) in got.iter().zip(want).enumerate() {
        assert_close(w, ww, 2e-6, 1e-7, &format!("{u:?} step {}: weights", s + 1));
        assert_close(v, wv, 2e-6, 1e-8, &format!("{u:?} step {}: state", s + 1));
    }
}

fn u(kind: EmbKind, lr: f32, eps: f32, c: f32, eps_inside: bool, l2: f32) -> EmbUpdate {
    EmbUpdate { kind, lr, eps, c, eps_inside, l2 }
}

#[test]
fn rowwise_adagrad_hand_computed() {
    // lr 0.1, eps 0.01 outside, c 1.
    // step 1: v = (0.09 + 0.16)/2 = 0.125; rate = 0.1/(√0.125 + 0.01) = 0.27506...;
    //         w = [1 − 0.3·rate, −0.5 − 0.4·rate] = [0.917481, −0.610025]
    // step 2: v = 0.125 + (0.04 + 0.16)/2 = 0.225;  step 3: v = 0.225 + (0.0625 + 0.01)/2 = 0.26125
    check_hand(
        u(EmbKind::RowWiseAdagrad, 0.1, 0.01, 1.0, false, 0.0),
        &[
            ([0.91748117119457, -0.6100251050739067], &[0.125]),
            ([0.8761880054297627, -0.5274387735442924], &[0.225]),
            ([0.8282149815443978, -0.5466279830984383], &[0.26125]),
        ],
    );
    // c = 2: rate = 0.1/(√(v/2) + 0.01); step 1: 0.1/(0.25 + 0.01) = 0.384615 → w = [0.884615, −0.653846].
    check_hand(
        u(EmbKind::RowWiseAdagrad, 0.1, 0.01, 2.0, false, 0.0),
        &[
            ([0.8846153846153846, -0.6538461538461539], &[0.125]),
            ([0.8267132143974186, -0.5380418134102221], &[0.225]),
            ([0.7594041151118366, -0.5649654531244549], &[0.26125]),
        ],
    );
    // eps inside: rate = 0.1/√(v + 0.01); step 1: 0.1/√0.135 = 0.272166 → w = [0.918350, −0.608866].
    check_hand(
        u(EmbKind::RowWiseAdagrad, 0.1, 0.01, 1.0, true, 0.0),
        &[
            ([0.9183503419072274, -0.6088662107903635], &[0.125]),
            ([0.8770934920568757, -0.5263525110896601], &[0.225]),
            ([0.8290919559831438, -0.5455531255191528], &[0.26125]),
        ],
    );
    // L2 0.5: g ← g + 0.5·w before everything; step 1: g = [0.8, 0.15], v = (0.64 + 0.0225)/2 = 0.33125.
    check_hand(
        u(EmbKind::RowWiseAdagrad, 0.1, 0.01, 1.0, false, 0.5),
        &[
            ([0.8633747312913019, -0.5256172378828808], &[0.33125]),
            ([0.7912864436458411, -0.44997738662939835], &[0.750422096629701]),
            ([0.7262793634831008, -0.437392804725473], &[0.9666607683008995]),
        ],
    );
}

#[test]
fn elementwise_adagrad_and_sgd_hand_computed() {
    // Element-wise, lr 0.1, eps 0.01: v = g², step 1: w0 = 1 − 0.1·0.3/(0.3 + 0.01) = 0.903226,
    // w1 = −0.5 − 0.1·0.4/(0.4 + 0.01) = −0.597561.
    check_hand(
        u(EmbKind::Adagrad, 0.1, 0.01, 1.0, false, 0.0),
        &[
            ([0.9032258064516129, -0.5975609756097561], &[0.09, 0.16]),
            ([0.8492527306169094, -0.5280785842437995], &[0.13, 0.32]),
            ([0.7935422031520438, -0.5451885043606168], &[0.1925, 0.33]),
        ],
    );
    // SGD lr 0.5, L2 0.1: w ← w − 0.5·(g + 0.1·w); step 1: [1 − 0.5·0.4, −0.5 − 0.5·0.35] = [0.8, −0.675].
    check_hand(
        u(EmbKind::Sgd, 0.5, 0.0, 1.0, false, 0.1),
        &[([0.8, -0.675], &[]), ([0.66, -0.44125], &[]), ([0.502, -0.4691875], &[])],
    );
}

// ---------------------------------------------------------------- whole-model trajectories

fn small_config(embedding: EmbOptimizer, seed: u64) -> TrainConfig {
    let t = |rows: u64, pooling: Pooling| TableConfig { rows, dim: 8, pooling, bag_size: 2 };
    TrainConfig {
        model: ModelConfig {
            num_dense: 4,
            tables: vec![t(50, Pooling::Sum), t(7, Pooling::Mean), t(30, Pooling::Sum)],
            bottom_mlp: vec![16, 8],
            top_mlp: vec![12, 1],
            interaction: Interaction::Dot,
        },
        optim: OptimConfig { embedding, dense: DenseOptimizer::Adagrad { lr: 0.05, eps: 1e-8 }, weight_decay: WeightDecay::None },
        batch_size: 16,
        steps: Some(6),
        seed,
        eval_every: 0,
        synthetic: SyntheticConfig::default(),
    }
}

fn train(cfg: &TrainConfig, batches: &[Batch]) -> Dlrm<Cpu> {
    let be = Cpu::new();
    let mut m = Dlrm::new(&be, cfg).unwrap();
    for b in batches {
        m.train_step(&be, b).unwrap();
    }
    m
}

/// Max relative error over every table (weights and state) and dense parameter.
fn model_rel_err(a: &mut Dlrm<Cpu>, b: &mut Dlrm<Cpu>) -> f64 {
    let mut e: f64 = 0.0;
    for (x, y) in a.tables.iter().zip(&b.tables) {
        e = e.max(rel_err(&x.weights, &y.weights)).max(rel_err(&x.state, &y.state));
    }
    for (x, y) in a.dense.params_mut().into_iter().zip(b.dense.params_mut()) {
        e = e.max(rel_err(&x.w, &y.w));
    }
    e
}

fn momentum_identity(kind: fn(f32, f32, Option<f32>) -> EmbOptimizer, m: f32) {
    let (lr, eps) = (0.05f32, 0.02f32);
    let s = m.sqrt();
    let base = small_config(kind(lr, eps, Some(m)), 3);
    let batches = random_batches(&base.model, 16, 8, 99);
    let mut scaled = train(&base, &batches);
    let mut plain = train(&small_config(kind(lr * s, eps * s, Some(1.0)), 3), &batches);
    let err = model_rel_err(&mut scaled, &mut plain);
    assert!(err <= 1e-5, "c = {m} vs c = 1 with lr·√M, eps·√M: relative error {err:e} > 1e-5");
    // Sanity (the comparison can fail): c = 1 with the unscaled lr, or with unscaled eps, differs.
    let mut wrong_lr = train(&small_config(kind(lr, eps, Some(1.0)), 3), &batches);
    let e1 = model_rel_err(&mut scaled, &mut wrong_lr);
    assert!(e1 > 1e-3, "c = {m} should differ from c = 1 at the same lr (got {e1:e})");
    let mut wrong_eps = train(&small_config(kind(lr * s, eps, Some(1.0)), 3), &batches);
    let e2 = model_rel_err(&mut scaled, &mut wrong_eps);
    assert!(e2 > 1e-4, "eps must be scaled by √M too (got {e2:e})");
}

fn rowwise(lr: f32, eps: f32, c: Option<f32>) -> EmbOptimizer {
    EmbOptimizer::RowWiseAdagrad { lr, eps, c, eps_inside: false }
}
fn elementwise(lr: f32, eps: f32, c: Option<f32>) -> EmbOptimizer {
    EmbOptimizer::Adagrad { lr, eps, c, eps_inside: false }
}

#[test]
fn c_equals_m_is_c_one_with_scaled_lr_and_eps_rowwise() {
    momentum_identity(rowwise, 3.0);
    momentum_identity(rowwise, 8.0);
}

#[test]
fn c_equals_m_is_c_one_with_scaled_lr_and_eps_elementwise() {
    momentum_identity(elementwise, 3.0);
    momentum_identity(elementwise, 5.0);
}

#[test]
fn state_sizes_and_default_c() {
    let be = Cpu::new();
    let cfgs = [
        (EmbOptimizer::Sgd { lr: 0.1 }, 0usize),
        (rowwise(0.1, 1e-8, None), 1),
        (elementwise(0.1, 1e-8, None), 8),
    ];
    for (opt, per_row) in cfgs {
        let cfg = small_config(opt, 5);
        let batches = random_batches(&cfg.model, 16, 3, 5);
        let mut m = Dlrm::new(&be, &cfg).unwrap();
        // One replica: c defaults to 1.
        assert_eq!(m.emb_upd.c, 1.0, "{opt:?}: default c on one process");
        for b in &batches {
            m.train_step(&be, b).unwrap();
        }
        for (t, (shard, tc)) in m.tables.iter().zip(&cfg.model.tables).enumerate() {
            assert_eq!(shard.state.len(), tc.rows as usize * per_row, "{opt:?}: table {t} state size after training");
        }
    }
    // EmbUpdate::new resolves an unset c to the caller's default (M under 2D) and keeps a set one.
    let wd = WeightDecay::L2 { wd: 0.25 };
    let r = EmbUpdate::new(&rowwise(0.1, 1e-8, None), &wd, 4.0);
    assert_eq!((r.c, r.l2, r.kind), (4.0, 0.25, EmbKind::RowWiseAdagrad));
    assert_eq!(EmbUpdate::new(&elementwise(0.1, 1e-8, Some(2.0)), &wd, 4.0).c, 2.0);
}

#[test]
fn rowwise_many_steps_on_dlrm_tables_match_reference() {
    // A longer single-table trajectory with power-law-ish ids (hot rows touched every step):
    // the f32 accumulator stays within 1e-5 of the f64 reference over 40 steps.
    let be = Cpu::new();
    let mut rng = TestRng::new(21);
    let (rows, dim) = (64usize, 12usize);
    let up = u(EmbKind::RowWiseAdagrad, 0.05, 1e-8, 1.0, false, 0.0);
    let w0 = rng.vec_f32(rows * dim, -0.1, 0.1);
    let mut shard = be.shard(ShardSpec::whole(0, rows as u64, dim), &w0, &up).unwrap();
    let opt = RefOpt::RowWise { lr: 0.05, eps: 1e-8, c: 1.0, eps_inside: false };
    let mut reft = RefTable::new(&w0, rows, dim, dim, &opt);
    for step in 0..40 {
        let n = 32;
        let lists: Vec<Vec<u64>> = (0..n)
            .map(|_| (0..rng.usize_in(0, 4)).map(|_| { let x = rng.unit(); ((x * x * x) * rows as f64) as u64 }).collect())
            .collect();
        let h = HostBags::from_lists(&lists, false);
        let grad = rng.vec_f32(n * dim, -0.01, 0.01);
        let bags = Bags::<Cpu> { num_bags: n, offsets: h.offsets.clone(), ids: h.ids.clone(), scale: None };
        be.embedding_backward_update(&mut shard, &bags, &grad, Layout { stride: dim, col: 0 }, &up).unwrap();
        reft.step(&h, &grad, dim, 0, 0.0, &opt);
        assert_close(&shard.state, &reft.v, 1e-5, 1e-12, &format!("step {step}: v"));
    }
    assert_close(&shard.weights, &reft.w, 1e-5, 1e-6, "weights after 40 steps");
}
