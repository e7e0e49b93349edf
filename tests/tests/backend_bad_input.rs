//! Bad input to the CPU backend (and, for the bag checks, the emulated device backend) gives
//! `Err` naming the problem, never a panic: ids out of
//! range, offsets not covering the ids, wrong buffer sizes, inconsistent row gradients.
use ember_engine::backend::{Act, Bags, Buffers, Cpu, DenseUpdate, Emulated, EmbKind, EmbUpdate, Gemm, Layout, Numerics, RowGrads, Shard, ShardSpec};
use ember_engine::config::DenseOptimizer;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Run `f`; it must return `Err` (not panic, not Ok) whose message contains every `needle`.
#[track_caller]
fn expect_err<T>(what: &str, needles: &[&str], f: impl FnOnce() -> ember_engine::Result<T>) {
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(_) => panic!("{what}: panicked instead of returning Err"),
        Ok(Ok(_)) => panic!("{what}: accepted bad input"),
        Ok(Err(e)) => {
            let msg = e.to_string();
            for n in needles {
                assert!(msg.contains(n), "{what}: error message {msg:?} does not mention {n:?}");
            }
        }
    }
}

const RW: EmbUpdate = EmbUpdate { kind: EmbKind::RowWiseAdagrad, lr: 0.1, eps: 1e-8, c: 1.0, eps_inside: false, l2: 0.0 };

fn shard(rows: u64, dim: usize) -> Shard<Cpu> {
    Cpu.shard(ShardSpec::whole(0, rows, dim), &vec![0.5; rows as usize * dim], &RW).unwrap()
}

fn bags(offsets: Vec<u64>, ids: Vec<u64>, scale: Option<Vec<f32>>) -> Bags<Cpu> {
    Bags { num_bags: offsets.len().saturating_sub(1), offsets, ids, scale }
}

/// The three embedding entry points that take bags, on the same bad input.
fn all_bag_ops(what: &str, needles: &[&str], b: &Bags<Cpu>, buf_len: usize, layout: Layout) {
    let be = Cpu;
    let mut s = shard(10, 4);
    let mut out = vec![0.0f32; buf_len];
    expect_err(&format!("embedding_forward: {what}"), needles, || be.embedding_forward(&s, b, &mut out, layout, false));
    expect_err(&format!("embedding_row_grads: {what}"), needles, || be.embedding_row_grads(&s, b, &out, layout, &RW).map(|_| ()));
    let before = s.weights.clone();
    expect_err(&format!("embedding_backward_update: {what}"), needles, || be.embedding_backward_update(&mut s, b, &out, layout, &RW));
    assert_eq!(s.weights, before, "{what}: a refused update must not change the weights");
    assert!(s.state.iter().all(|&v| v == 0.0), "{what}: a refused update must not change the state");
    // The emulated device backend refuses the same input the same way (its numerics are the
    // CPU's code on its opaque buffers).
    let em = Emulated::new();
    let eb = Bags { num_bags: b.num_bags, offsets: em.upload_ids(&b.offsets).unwrap(), ids: em.upload_ids(&b.ids).unwrap(), scale: b.scale.as_ref().map(|x| em.upload(x).unwrap()) };
    let mut es = em.shard(ShardSpec::whole(0, 10, 4), &[0.5; 40], &RW).unwrap();
    let mut eout = em.zeros(buf_len).unwrap();
    expect_err(&format!("emulated embedding_forward: {what}"), needles, || em.embedding_forward(&es, &eb, &mut eout, layout, false));
    expect_err(&format!("emulated embedding_row_grads: {what}"), needles, || em.embedding_row_grads(&es, &eb, &eout, layout, &RW).map(|_| ()));
    expect_err(&format!("emulated embedding_backward_update: {what}"), needles, || em.embedding_backward_update(&mut es, &eb, &eout, layout, &RW));
    assert_eq!(em.download(&es.weights).unwrap(), before, "{what}: a refused emulated update must not change the weights");
    assert!(em.download(&es.state).unwrap().iter().all(|&v| v == 0.0), "{what}: a refused emulated update must not change the state");
}

#[test]
fn embedding_bad_bags() {
    let l = Layout { stride: 4, col: 0 };
    all_bag_ops("id out of range", &["id 10", "out of range"], &bags(vec![0, 2, 3], vec![1, 10, 2], None), 8, l);
    all_bag_ops("huge id", &["out of range"], &bags(vec![0, 1], vec![u64::MAX], None), 4, l);
    all_bag_ops("offsets end short of ids", &["offsets", "3 ids"], &bags(vec![0, 1, 2], vec![1, 2, 3], None), 8, l);
    all_bag_ops("offsets end past ids", &["offsets"], &bags(vec![0, 1, 5], vec![1, 2], None), 8, l);
    all_bag_ops("offsets not starting at 0", &["offsets"], &bags(vec![1, 1, 2], vec![1, 2], None), 8, l);
    all_bag_ops("decreasing offsets", &["offsets"], &bags(vec![0, 3, 1, 3], vec![1, 2, 3], None), 12, l);
    let wrong_count = Bags { num_bags: 3, offsets: vec![0, 1, 2], ids: vec![1, 2], scale: None };
    all_bag_ops("offsets length vs num_bags", &["offsets", "3 bags"], &wrong_count, 12, l);
    let no_offsets = Bags { num_bags: 0, offsets: vec![], ids: vec![], scale: None };
    all_bag_ops("empty offsets", &["offsets"], &no_offsets, 4, l);
    all_bag_ops("scale length", &["scales"], &bags(vec![0, 1, 2], vec![1, 2], Some(vec![1.0])), 8, l);
    all_bag_ops("buffer too small", &["too small"], &bags(vec![0, 1, 2], vec![1, 2], None), 7, l);
    all_bag_ops("buffer too small for stride", &["too small"], &bags(vec![0, 1, 2], vec![1, 2], None), 9, Layout { stride: 6, col: 2 });
    all_bag_ops("columns past stride", &["stride"], &bags(vec![0, 1], vec![1], None), 100, Layout { stride: 5, col: 2 });
}

#[test]
fn embedding_bad_state_and_row_grads() {
    let be = Cpu;
    let b = bags(vec![0, 2], vec![1, 3], None);
    let l = Layout { stride: 4, col: 0 };
    let g = vec![0.1f32; 4];
    // A shard whose state was made for another optimizer.
    let mut s = shard(10, 4); // row-wise state: 10 floats
    let ew = EmbUpdate { kind: EmbKind::Adagrad, ..RW };
    expect_err("update with the wrong optimizer state", &["state"], || be.embedding_backward_update(&mut s, &b, &g, l, &ew));
    let rg = be.embedding_row_grads(&s, &b, &g, l, &RW).unwrap();
    expect_err("apply with the wrong optimizer state", &["state"], || be.embedding_apply(&mut s, &rg, None, &ew));
    // Row sums of the wrong length.
    expect_err("apply with row_sq of the wrong length", &["row sums"], || be.embedding_apply(&mut s, &rg, Some(&vec![1.0; 3]), &RW));
    // Inconsistent / unsorted / out-of-range row gradients.
    let bad = |rows: Vec<u64>, n: usize, grads: usize, sq: usize| RowGrads::<Cpu> { rows, num_rows: n, grads: vec![0.1; grads], sq: vec![0.1; sq] };
    expect_err("row grads: size mismatch", &["inconsistent"], || be.embedding_apply(&mut s, &bad(vec![1, 2], 2, 7, 2), None, &RW));
    expect_err("row grads: num_rows mismatch", &["inconsistent"], || be.embedding_apply(&mut s, &bad(vec![1, 2], 3, 12, 3), None, &RW));
    expect_err("row grads: duplicate rows", &["unique"], || be.embedding_apply(&mut s, &bad(vec![2, 2], 2, 8, 2), None, &RW));
    expect_err("row grads: descending rows", &["ascending"], || be.embedding_apply(&mut s, &bad(vec![3, 2], 2, 8, 2), None, &RW));
    expect_err("row grads: row outside the shard", &["inside the shard"], || be.embedding_apply(&mut s, &bad(vec![2, 10], 2, 8, 2), None, &RW));
    assert!(s.weights.iter().all(|&w| w == 0.5), "refused applies must not change the weights");
}

#[test]
fn dense_kernels_bad_sizes() {
    let be = Cpu;
    let v = |n: usize| vec![0.5f32; n];
    let g = |m, n, k| Gemm { m, n, k, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
    expect_err("gemm: A too small", &["gemm", "too small"], || be.gemm(g(3, 4, 5), &v(14), &v(20), &mut v(12)));
    expect_err("gemm: B too small", &["gemm", "too small"], || be.gemm(g(3, 4, 5), &v(15), &v(19), &mut v(12)));
    expect_err("gemm: C too small", &["gemm", "too small"], || be.gemm(g(3, 4, 5), &v(15), &v(20), &mut v(11)));
    expect_err("bias_act: bias length", &["bias_act"], || be.bias_act(&mut v(12), &v(3), 3, 4, Act::Relu));
    expect_err("bias_act: x too small", &["bias_act"], || be.bias_act(&mut v(11), &v(4), 3, 4, Act::None));
    expect_err("act_backward: length mismatch", &["act_backward"], || be.act_backward(&v(5), &mut v(6), Act::Relu));
    expect_err("col_sum: out length", &["col_sum"], || be.col_sum(&v(12), 3, 4, 0.0, &mut v(3)));
    expect_err("col_sum: x too small", &["col_sum"], || be.col_sum(&v(11), 3, 4, 0.0, &mut v(4)));
    expect_err("copy_block: past stride", &["copy_block"], || be.copy_block(&mut v(6), &mut v(12), 3, 2, Layout { stride: 4, col: 3 }, true));
    expect_err("copy_block: wide too small", &["copy_block"], || be.copy_block(&mut v(6), &mut v(11), 3, 2, Layout { stride: 4, col: 0 }, true));
    expect_err("copy_block: narrow too small", &["copy_block"], || be.copy_block(&mut v(5), &mut v(12), 3, 2, Layout { stride: 4, col: 0 }, false));
    expect_err("axpy: length mismatch", &["axpy"], || be.axpy(1.0, &v(3), &mut v(4)));
    // dot interaction: batch 2, f 2, d 3: x needs 18, out 2·(3+3) = 12.
    expect_err("dot_interaction: x too small", &["dot_interaction"], || be.dot_interaction(&v(17), 2, 2, 3, &mut v(12)));
    expect_err("dot_interaction: out too small", &["dot_interaction"], || be.dot_interaction(&v(18), 2, 2, 3, &mut v(11)));
    expect_err("dot_interaction_backward: dout too small", &["dot_interaction_backward"], || {
        be.dot_interaction_backward(&v(18), &v(11), 2, 2, 3, &mut v(18))
    });
    expect_err("dot_interaction_backward: dx too small", &["dot_interaction_backward"], || {
        be.dot_interaction_backward(&v(18), &v(12), 2, 2, 3, &mut v(17))
    });
    expect_err("cross_combine: bias length", &["cross_combine"], || be.cross_combine(&v(6), &v(6), &v(2), &v(6), 2, 3, &mut v(6)));
    expect_err("cross_combine: out too small", &["cross_combine"], || be.cross_combine(&v(6), &v(6), &v(3), &v(6), 2, 3, &mut v(5)));
    expect_err("cross_combine_backward: duv too small", &["cross_combine_backward"], || {
        be.cross_combine_backward(&v(6), &v(6), &v(3), &v(6), 2, 3, &mut v(5), &mut v(6))
    });
    expect_err("cross_combine_backward: dx0 too small", &["cross_combine_backward"], || {
        be.cross_combine_backward(&v(6), &v(6), &v(3), &v(6), 2, 3, &mut v(6), &mut v(5))
    });
    expect_err("bce: logits too short", &["bce_with_logits"], || be.bce_with_logits(&v(3), &v(4), 1.0, &mut v(4)));
    expect_err("bce: dlogits too short", &["bce_with_logits"], || be.bce_with_logits(&v(4), &v(4), 1.0, &mut v(3)));
    let sgd = DenseUpdate { opt: DenseOptimizer::Sgd { lr: 0.1 }, l2: 0.0 };
    let ada = DenseUpdate { opt: DenseOptimizer::Adagrad { lr: 0.1, eps: 1e-8 }, l2: 0.0 };
    expect_err("dense_update: grad length", &["dense_update"], || be.dense_update(&mut v(4), &v(5), &mut v(4), &sgd));
    expect_err("dense_update: adagrad state length", &["dense_update", "state"], || be.dense_update(&mut v(4), &v(4), &mut v(3), &ada));
}

#[test]
fn degenerate_zero_widths_do_not_panic() {
    // Zero-width blocks are not useful, but "never a panic" holds for them too: Ok (nothing to
    // do) or Err are both acceptable.
    let be = Cpu;
    let mut panicked = Vec::new();
    let mut ok_or_err = |what: &'static str, r: std::thread::Result<ember_engine::Result<()>>| {
        if r.is_err() {
            panicked.push(what);
        }
    };
    ok_or_err("bias_act cols 0", catch_unwind(|| be.bias_act(&mut vec![], &vec![], 3, 0, Act::Relu)));
    ok_or_err("cross_combine cols 0", catch_unwind(|| be.cross_combine(&vec![], &vec![], &vec![], &vec![], 3, 0, &mut vec![])));
    ok_or_err("cross_combine_backward cols 0", catch_unwind(|| be.cross_combine_backward(&vec![], &vec![], &vec![], &vec![], 3, 0, &mut vec![], &mut vec![])));
    ok_or_err("dot_interaction d 0 f 0", catch_unwind(|| be.dot_interaction(&vec![], 2, 0, 0, &mut vec![])));
    ok_or_err("dot_interaction_backward d 0 f 0", catch_unwind(|| be.dot_interaction_backward(&vec![], &vec![], 2, 0, 0, &mut vec![])));
    ok_or_err("col_sum cols 0", catch_unwind(|| be.col_sum(&vec![], 3, 0, 0.0, &mut vec![])));
    ok_or_err("gemm k 0", catch_unwind(|| be.gemm(Gemm { m: 2, n: 2, k: 0, trans_a: true, trans_b: true, alpha: 1.0, beta: 0.0 }, &vec![], &vec![], &mut vec![0.0; 4])));
    let sgd = EmbUpdate { kind: EmbKind::Sgd, ..RW };
    let s = Cpu.shard(ShardSpec { table: 0, table_rows: 4, dim: 4, rows: 0..4, cols: 0..0 }, &[], &sgd).unwrap();
    let b = bags(vec![0, 1, 2], vec![1, 2], None);
    let l0 = Layout { stride: 0, col: 0 };
    ok_or_err("embedding_forward, zero-column shard, stride 0", catch_unwind(AssertUnwindSafe(|| be.embedding_forward(&s, &b, &mut vec![], l0, false))));
    let mut s2 = Cpu.shard(ShardSpec { table: 0, table_rows: 4, dim: 4, rows: 0..4, cols: 0..0 }, &[], &sgd).unwrap();
    ok_or_err(
        "embedding_backward_update, zero-column shard, stride 0",
        catch_unwind(AssertUnwindSafe(|| be.embedding_backward_update(&mut s2, &b, &vec![], l0, &sgd))),
    );
    assert!(panicked.is_empty(), "panicked on zero-width input (Ok or Err expected): {panicked:?}");
}
