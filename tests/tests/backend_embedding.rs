//! CPU embedding kernels against the f64 reference of `ember_tests::oracle` (BRIEF.md §3):
//! forward (sum, mean via scale, empty bags, duplicate ids in a bag and across bags, D not a
//! power of two, accumulate, strided layouts), the fused backward+update for every optimizer
//! over several steps (untouched rows bitwise unchanged), the two-phase path, and column-split
//! row-wise AdaGrad combining the shards' Σg².
use ember_engine::backend::{Bags, Cpu, EmbKind, EmbUpdate, Layout, Numerics, Shard, ShardSpec};
use ember_tests::oracle::*;

fn bags(h: &HostBags) -> Bags<Cpu> {
    Bags { num_bags: h.num_bags(), offsets: h.offsets.clone(), ids: h.ids.clone(), scale: h.scale.clone() }
}

fn upd(kind: EmbKind, lr: f32, eps: f32, c: f32, eps_inside: bool, l2: f32) -> EmbUpdate {
    EmbUpdate { kind, lr, eps, c, eps_inside, l2 }
}

fn ref_opt(u: &EmbUpdate) -> RefOpt {
    let (lr, eps, c) = (u.lr as f64, u.eps as f64, u.c as f64);
    match u.kind {
        EmbKind::Sgd => RefOpt::Sgd { lr },
        EmbKind::RowWiseAdagrad => RefOpt::RowWise { lr, eps, c, eps_inside: u.eps_inside },
        EmbKind::Adagrad => RefOpt::Adagrad { lr, eps, c, eps_inside: u.eps_inside },
    }
}

/// Every optimizer variant the tests sweep.
fn all_updates() -> Vec<EmbUpdate> {
    use EmbKind::*;
    vec![
        upd(Sgd, 0.3, 0.0, 1.0, false, 0.0),
        upd(Sgd, 0.2, 0.0, 1.0, false, 0.05),
        upd(RowWiseAdagrad, 0.1, 1e-8, 1.0, false, 0.0),
        upd(RowWiseAdagrad, 0.1, 0.1, 1.0, false, 0.0),
        upd(RowWiseAdagrad, 0.1, 0.05, 1.0, true, 0.0),
        upd(RowWiseAdagrad, 0.07, 0.01, 3.0, false, 0.0),
        upd(RowWiseAdagrad, 0.07, 0.01, 2.5, true, 0.0),
        upd(RowWiseAdagrad, 0.1, 1e-3, 1.0, false, 0.05),
        upd(Adagrad, 0.1, 1e-8, 1.0, false, 0.0),
        upd(Adagrad, 0.1, 0.1, 1.0, true, 0.0),
        upd(Adagrad, 0.05, 0.01, 3.0, false, 0.0),
        upd(Adagrad, 0.05, 0.01, 1.0, false, 0.03),
    ]
}

const DIMS: [usize; 8] = [1, 4, 7, 12, 16, 20, 33, 64];

#[test]
fn forward_matches_reference_on_random_shapes() {
    let be = Cpu::new();
    let mut rng = TestRng::new(11);
    for case in 0..150 {
        let rows = rng.usize_in(1, 40);
        let cols = DIMS[rng.usize_in(0, DIMS.len() - 1)];
        let n = rng.usize_in(0, 30);
        let max_len = rng.usize_in(0, 6);
        let scaled = rng.below(2) == 1;
        let accumulate = rng.below(2) == 1;
        let col = rng.usize_in(0, 9);
        let stride = col + cols + rng.usize_in(0, 5);
        let h = if case % 5 == 0 {
            // Mean pooling as the model passes it: 1/len, 0 for empty bags.
            let lists: Vec<Vec<u64>> = (0..n).map(|_| (0..rng.usize_in(0, max_len)).map(|_| rng.below(rows as u64)).collect()).collect();
            HostBags::from_lists(&lists, true)
        } else {
            HostBags::random(&mut rng, n, max_len, rows as u64, scaled)
        };
        let w = rng.vec_f32(rows * cols, -1.0, 1.0);
        let spec = ShardSpec { table: 0, table_rows: rows as u64, dim: cols, rows: 0..rows as u64, cols: 0..cols };
        let shard = be.shard(spec, &w, &upd(EmbKind::Sgd, 0.1, 0.0, 1.0, false, 0.0)).unwrap();
        // A buffer with spare rows at the end: they and the other columns must stay untouched.
        let out0 = rng.vec_f32((n + 2) * stride, -1.0, 1.0);
        let mut out = out0.clone();
        be.embedding_forward(&shard, &bags(&h), &mut out, Layout { stride, col }, accumulate).unwrap();
        let reft = RefTable::new(&w, rows, cols, cols, &RefOpt::Sgd { lr: 0.0 });
        let mut want = to_f64(&out0);
        reft.forward(&h, &mut want, stride, col, accumulate);
        let what = format!("forward case {case}: rows {rows} cols {cols} bags {n} stride {stride} col {col} acc {accumulate}");
        assert_close(&out, &want, 1e-5, 1e-5, &what);
        for (i, (&a, &b)) in out.iter().zip(&out0).enumerate() {
            let (r, c) = (i / stride, i % stride);
            if r >= n || c < col || c >= col + cols {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}: element ({r},{c}) outside the block was written");
            }
        }
    }
}

#[test]
fn forward_known_small_case() {
    // Table rows r = [r, 10r, 100r]; bags: [0,2,2] (duplicate), [] (empty), [2] (repeated
    // across bags), [1]; mean pooling, dim 3 at column 1 of stride 5.
    let be = Cpu::new();
    let w: Vec<f32> = (0..3).flat_map(|r| [r as f32, 10.0 * r as f32, 100.0 * r as f32]).collect();
    let shard = be.shard(ShardSpec::whole(0, 3, 3), &w, &upd(EmbKind::Sgd, 0.1, 0.0, 1.0, false, 0.0)).unwrap();
    let h = HostBags::from_lists(&[vec![0, 2, 2], vec![], vec![2], vec![1]], true);
    let mut out = vec![-1.0f32; 4 * 5];
    be.embedding_forward(&shard, &bags(&h), &mut out, Layout { stride: 5, col: 1 }, false).unwrap();
    #[rustfmt::skip]
    let want = [
        -1.0, 4.0 / 3.0, 40.0 / 3.0, 400.0 / 3.0, -1.0,
        -1.0, 0.0, 0.0, 0.0, -1.0,
        -1.0, 2.0, 20.0, 200.0, -1.0,
        -1.0, 1.0, 10.0, 100.0, -1.0,
    ];
    assert_close(&out, &want, 1e-6, 0.0, "known forward");
    // Accumulate adds a second (sum-pooled) pass on top.
    let h2 = HostBags::from_lists(&[vec![1], vec![1, 1], vec![], vec![0]], false);
    be.embedding_forward(&shard, &bags(&h2), &mut out, Layout { stride: 5, col: 1 }, true).unwrap();
    #[rustfmt::skip]
    let want = [
        -1.0, 4.0 / 3.0 + 1.0, 40.0 / 3.0 + 10.0, 400.0 / 3.0 + 100.0, -1.0,
        -1.0, 2.0, 20.0, 200.0, -1.0,
        -1.0, 2.0, 20.0, 200.0, -1.0,
        -1.0, 1.0, 10.0, 100.0, -1.0,
    ];
    assert_close(&out, &want, 1e-6, 0.0, "known forward, accumulated");
}

/// Random (bags, grad) for one step on a shard of `rows` rows, gradients laid out with `stride`.
fn random_step(rng: &mut TestRng, rows: usize, stride: usize) -> (HostBags, Vec<f32>) {
    let n = rng.usize_in(0, 24);
    let max_len = rng.usize_in(0, 5);
    let scaled = rng.below(2) == 1;
    let h = HostBags::random(rng, n, max_len, rows as u64, scaled);
    let grad = rng.vec_f32(n.max(1) * stride, -1.0, 1.0);
    (h, grad)
}

fn touched(h: &HostBags, rows: usize) -> Vec<bool> {
    let mut t = vec![false; rows];
    for &id in &h.ids {
        t[id as usize] = true;
    }
    t
}

#[test]
fn fused_update_matches_reference_over_several_steps() {
    let be = Cpu::new();
    let mut rng = TestRng::new(12);
    for u in all_updates() {
        for trial in 0..6 {
            let rows = rng.usize_in(1, 60);
            let dim = DIMS[rng.usize_in(0, DIMS.len() - 1)];
            let col = rng.usize_in(0, 6);
            let stride = col + dim + rng.usize_in(0, 4);
            let layout = Layout { stride, col };
            let w0 = rng.vec_f32(rows * dim, -1.0, 1.0);
            let mut shard = be.shard(ShardSpec::whole(3, rows as u64, dim), &w0, &u).unwrap();
            assert_eq!(shard.state.len(), rows * u.state_per_row(dim), "{u:?}: state size");
            let opt = ref_opt(&u);
            let mut reft = RefTable::new(&w0, rows, dim, dim, &opt);
            for step in 0..5 {
                let (h, grad) = random_step(&mut rng, rows, stride);
                let (pw, ps) = (shard.weights.clone(), shard.state.clone());
                be.embedding_backward_update(&mut shard, &bags(&h), &grad, layout, &u).unwrap();
                reft.step(&h, &grad, stride, col, u.l2 as f64, &opt);
                let what = format!("{u:?} trial {trial} step {step} rows {rows} dim {dim}");
                assert_close(&shard.weights, &reft.w, 1e-5, 1e-6, &format!("{what}: weights"));
                assert_close(&shard.state, &reft.v, 1e-5, 1e-7, &format!("{what}: state"));
                let t = touched(&h, rows);
                let spr = u.state_per_row(dim);
                for r in (0..rows).filter(|&r| !t[r]) {
                    assert_bitwise(&shard.weights[r * dim..(r + 1) * dim], &pw[r * dim..(r + 1) * dim], &format!("{what}: untouched row {r}"));
                    assert_bitwise(&shard.state[r * spr..(r + 1) * spr], &ps[r * spr..(r + 1) * spr], &format!("{what}: untouched state {r}"));
                }
            }
        }
    }
}

#[test]
fn two_phase_equals_fused_and_row_grads_match_reference() {
    let be = Cpu::new();
    let mut rng = TestRng::new(13);
    for u in all_updates() {
        for _ in 0..4 {
            let rows = rng.usize_in(1, 50);
            let dim = DIMS[rng.usize_in(0, DIMS.len() - 1)];
            let col = rng.usize_in(0, 4);
            let stride = col + dim + rng.usize_in(0, 3);
            let layout = Layout { stride, col };
            let w0 = rng.vec_f32(rows * dim, -1.0, 1.0);
            let mut fused = be.shard(ShardSpec::whole(0, rows as u64, dim), &w0, &u).unwrap();
            let mut split = be.shard(ShardSpec::whole(0, rows as u64, dim), &w0, &u).unwrap();
            for step in 0..4 {
                let (h, grad) = random_step(&mut rng, rows, stride);
                let what = format!("{u:?} step {step} rows {rows} dim {dim}");
                // Row gradients against the reference (before either update).
                let reft = RefTable::new(&split.weights, rows, dim, dim, &ref_opt(&u));
                let want = reft.row_grads(&h, &grad, stride, col, u.l2 as f64);
                let rg = be.embedding_row_grads(&split, &bags(&h), &grad, layout, &u).unwrap();
                assert_eq!(rg.num_rows, want.len(), "{what}: unique rows");
                assert_eq!(rg.rows, want.iter().map(|(r, _)| *r as u64).collect::<Vec<_>>(), "{what}: unique rows ascending");
                let wg: Vec<f64> = want.iter().flat_map(|(_, g)| g.iter().copied()).collect();
                assert_close(&rg.grads, &wg, 1e-5, 1e-6, &format!("{what}: row grads"));
                let wsq: Vec<f64> = want.iter().map(|(_, g)| g.iter().map(|x| x * x).sum()).collect();
                assert_close(&rg.sq, &wsq, 1e-5, 1e-6, &format!("{what}: row sq"));

                be.embedding_apply(&mut split, &rg, None, &u).unwrap();
                be.embedding_backward_update(&mut fused, &bags(&h), &grad, layout, &u).unwrap();
                assert_close(&split.weights, &to_f64(&fused.weights), 1e-6, 1e-7, &format!("{what}: two-phase weights vs fused"));
                assert_close(&split.state, &to_f64(&fused.state), 1e-6, 1e-7, &format!("{what}: two-phase state vs fused"));
            }
        }
    }
}

/// Two column shards (cols 0..k and k..D) of one table, each holding its own slice.
fn col_shards(be: &Cpu, w: &[f32], rows: usize, dim: usize, k: usize, u: &EmbUpdate) -> [Shard<Cpu>; 2] {
    let slice = |a: usize, b: usize| -> Vec<f32> { (0..rows).flat_map(|r| w[r * dim + a..r * dim + b].iter().copied()).collect() };
    let spec = |a: usize, b: usize| ShardSpec { table: 0, table_rows: rows as u64, dim, rows: 0..rows as u64, cols: a..b };
    [be.shard(spec(0, k), &slice(0, k), u).unwrap(), be.shard(spec(k, dim), &slice(k, dim), u).unwrap()]
}

fn join_cols(a: &[f32], b: &[f32], rows: usize, k: usize, dim: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| a[r * k..(r + 1) * k].iter().chain(&b[r * (dim - k)..(r + 1) * (dim - k)]).copied().collect::<Vec<_>>()).collect()
}

#[test]
fn column_split_rowwise_adagrad_equals_unsharded() {
    let be = Cpu::new();
    let mut rng = TestRng::new(14);
    let variants = [
        upd(EmbKind::RowWiseAdagrad, 0.1, 1e-8, 1.0, false, 0.0),
        upd(EmbKind::RowWiseAdagrad, 0.1, 0.05, 3.0, false, 0.0),
        upd(EmbKind::RowWiseAdagrad, 0.1, 0.05, 2.0, true, 0.0),
        upd(EmbKind::RowWiseAdagrad, 0.1, 1e-3, 1.0, false, 0.04),
    ];
    for u in variants {
        for &(dim, k) in &[(12usize, 5usize), (20, 10), (7, 1), (16, 15)] {
            let rows = rng.usize_in(2, 30);
            let stride = dim + 3;
            let col = 2;
            let w0 = rng.vec_f32(rows * dim, -1.0, 1.0);
            let mut full = be.shard(ShardSpec::whole(0, rows as u64, dim), &w0, &u).unwrap();
            let [mut a, mut b] = col_shards(&be, &w0, rows, dim, k, &u);
            // The split shard without combining Σg² (per-shard v): must NOT match (sanity: the
            // comparison below can fail).
            let [mut a_bad, mut b_bad] = col_shards(&be, &w0, rows, dim, k, &u);
            let opt = ref_opt(&u);
            let mut reft = RefTable::new(&w0, rows, dim, dim, &opt);
            // The fused path refuses a column shard for row-wise AdaGrad.
            let (h, grad) = random_step(&mut rng, rows, stride);
            let e = be.embedding_backward_update(&mut a, &bags(&h), &grad, Layout { stride, col }, &u);
            assert!(e.is_err(), "fused row-wise update on a column shard must be refused");
            assert!(format!("{}", e.err().unwrap()).contains("column"), "error should name the column shard");
            for step in 0..5 {
                let (h, grad) = random_step(&mut rng, rows, stride);
                let what = format!("{u:?} dim {dim} k {k} step {step}");
                let la = Layout { stride, col };
                let lb = Layout { stride, col: col + k };
                let ra = be.embedding_row_grads(&a, &bags(&h), &grad, la, &u).unwrap();
                let rb = be.embedding_row_grads(&b, &bags(&h), &grad, lb, &u).unwrap();
                assert_eq!(ra.rows, rb.rows, "{what}: both column shards see the same unique rows");
                let row_sq: Vec<f32> = ra.sq.iter().zip(&rb.sq).map(|(x, y)| x + y).collect();
                be.embedding_apply(&mut a, &ra, Some(&row_sq), &u).unwrap();
                be.embedding_apply(&mut b, &rb, Some(&row_sq), &u).unwrap();
                be.embedding_backward_update(&mut full, &bags(&h), &grad, Layout { stride, col }, &u).unwrap();
                reft.step(&h, &grad, stride, col, u.l2 as f64, &opt);

                let joined = join_cols(&a.weights, &b.weights, rows, k, dim);
                assert_close(&joined, &to_f64(&full.weights), 1e-5, 1e-6, &format!("{what}: split weights vs unsharded"));
                assert_close(&joined, &reft.w, 1e-5, 1e-6, &format!("{what}: split weights vs reference"));
                assert_close(&a.state, &to_f64(&full.state), 1e-5, 1e-7, &format!("{what}: shard 0 v vs unsharded"));
                assert_close(&b.state, &to_f64(&full.state), 1e-5, 1e-7, &format!("{what}: shard 1 v vs unsharded"));

                let ra = be.embedding_row_grads(&a_bad, &bags(&h), &grad, la, &u).unwrap();
                let rb = be.embedding_row_grads(&b_bad, &bags(&h), &grad, lb, &u).unwrap();
                be.embedding_apply(&mut a_bad, &ra, None, &u).unwrap();
                be.embedding_apply(&mut b_bad, &rb, None, &u).unwrap();
            }
            let bad = join_cols(&a_bad.weights, &b_bad.weights, rows, k, dim);
            assert!(rel_err(&bad, &full.weights) > 1e-4, "{u:?}: per-shard v should differ from whole-row v (test sanity)");
        }
    }
}

#[test]
fn column_split_elementwise_and_sgd_fused_equal_unsharded() {
    let be = Cpu::new();
    let mut rng = TestRng::new(15);
    for u in [upd(EmbKind::Adagrad, 0.1, 0.01, 2.0, false, 0.02), upd(EmbKind::Sgd, 0.2, 0.0, 1.0, false, 0.01)] {
        let (rows, dim, k) = (17usize, 20usize, 8usize);
        let stride = dim + 1;
        let w0 = rng.vec_f32(rows * dim, -1.0, 1.0);
        let mut full = be.shard(ShardSpec::whole(0, rows as u64, dim), &w0, &u).unwrap();
        let [mut a, mut b] = col_shards(&be, &w0, rows, dim, k, &u);
        for step in 0..4 {
            let (h, grad) = random_step(&mut rng, rows, stride);
            be.embedding_backward_update(&mut a, &bags(&h), &grad, Layout { stride, col: 1 }, &u).unwrap();
            be.embedding_backward_update(&mut b, &bags(&h), &grad, Layout { stride, col: 1 + k }, &u).unwrap();
            be.embedding_backward_update(&mut full, &bags(&h), &grad, Layout { stride, col: 1 }, &u).unwrap();
            let joined = join_cols(&a.weights, &b.weights, rows, k, dim);
            assert_close(&joined, &to_f64(&full.weights), 1e-6, 1e-7, &format!("{u:?} step {step}: column shards vs unsharded"));
        }
    }
}

#[test]
fn row_range_shard_forward_equals_whole_table_slice() {
    // A row-range shard (global rows a..b, local ids) pools exactly what the whole table pools.
    let be = Cpu::new();
    let mut rng = TestRng::new(16);
    let (rows, dim, a, b) = (40usize, 12usize, 10usize, 25usize);
    let w = rng.vec_f32(rows * dim, -1.0, 1.0);
    let sgd = upd(EmbKind::Sgd, 0.1, 0.0, 1.0, false, 0.0);
    let whole = be.shard(ShardSpec::whole(0, rows as u64, dim), &w, &sgd).unwrap();
    let spec = ShardSpec { table: 0, table_rows: rows as u64, dim, rows: a as u64..b as u64, cols: 0..dim };
    let part = be.shard(spec, &w[a * dim..b * dim], &sgd).unwrap();
    let local = HostBags::random(&mut rng, 20, 4, (b - a) as u64, true);
    let global = HostBags { ids: local.ids.iter().map(|&i| i + a as u64).collect(), ..local.clone() };
    let mut o1 = vec![0.0f32; 20 * dim];
    let mut o2 = vec![0.0f32; 20 * dim];
    be.embedding_forward(&part, &bags(&local), &mut o1, Layout { stride: dim, col: 0 }, false).unwrap();
    be.embedding_forward(&whole, &bags(&global), &mut o2, Layout { stride: dim, col: 0 }, false).unwrap();
    assert_bitwise(&o1, &o2, "row-range shard forward");
}
