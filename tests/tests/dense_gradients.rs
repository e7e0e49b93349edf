//! DenseNet forward and gradients against an independent f64 reference network
//! (`oracle::RefNet`, written from the DLRM / DCNv2 definitions): logits and loss match, and
//! every parameter's gradient (sampled entries) and `dwide` (embeddings and bottom output)
//! match f64 central differences of the reference loss. Dot and DCNv2 interactions.
use ember_engine::backend::Cpu;
use ember_engine::config::{Interaction, ModelConfig, Pooling, TableConfig};
use ember_engine::dense::DenseNet;
use ember_tests::oracle::*;

struct Case {
    num_dense: usize,
    tables: usize,
    dim: usize,
    bottom: Vec<usize>,
    top: Vec<usize>,
    interaction: Interaction,
    batch: usize,
}

fn check(case: Case, seed: u64) {
    let be = Cpu::new();
    let mut rng = TestRng::new(seed);
    let cfg = ModelConfig {
        num_dense: case.num_dense,
        tables: (0..case.tables).map(|_| TableConfig { rows: 10, dim: case.dim, pooling: Pooling::Sum, bag_size: 1 }).collect(),
        bottom_mlp: case.bottom.clone(),
        top_mlp: case.top.clone(),
        interaction: case.interaction,
    };
    let tag = format!("{:?} bottom {:?} top {:?}", case.interaction, case.bottom, case.top);
    let mut net = DenseNet::new(&be, &cfg, seed).unwrap();
    // Random parameters everywhere (the DCN bias starts at zero otherwise).
    for p in net.params_mut() {
        let n = p.w.len();
        p.w = rng.vec_f32(n, -0.6, 0.6);
    }
    let n = case.batch;
    let (f, d) = (case.tables, case.dim);
    let width = (f + 1) * d;
    net.ensure_batch(&be, n).unwrap();
    let wide = rng.vec_f32(n * width, -1.0, 1.0);
    net.wide_mut()[..n * width].copy_from_slice(&wide);
    let dense_x = rng.vec_f32(n * case.num_dense, -1.0, 1.0);
    let labels: Vec<f32> = (0..n).map(|_| rng.below(2) as f32).collect();
    net.forward_bottom(&be, &dense_x).unwrap();
    net.forward_top(&be).unwrap();
    let logits = net.logits()[..n].to_vec();

    let refnet = RefNet {
        num_dense: case.num_dense,
        bottom: case.bottom.clone(),
        top: case.top.clone(),
        f,
        d,
        dcn: match case.interaction {
            Interaction::Dot => None,
            Interaction::Dcn { layers, rank } => Some((layers, rank)),
        },
        params: net.params_mut().iter().map(|p| to_f64(&p.w)).collect(),
    };
    let xd = to_f64(&dense_x);
    let wd = to_f64(&wide);
    let want_logits = refnet.forward(&xd, &wd, n);
    assert_close(&logits, &want_logits, 1e-4, 1e-5, &format!("{tag}: logits"));

    let scale = 1.0 / n as f64;
    let loss = net.backward(&be, &dense_x, &labels, scale as f32).unwrap();
    let want_loss = RefNet::loss(&want_logits, &labels, 1.0);
    assert!((loss - want_loss).abs() <= 1e-4 * want_loss, "{tag}: loss {loss} vs {want_loss}");

    let h = 1e-6;
    let (rtol, atol) = (2e-3, 2e-5);
    // Every parameter tensor: a sample of entries (all of them when small).
    let grads: Vec<Vec<f32>> = net.params_mut().iter().map(|p| p.g.clone()).collect();
    for (pi, g) in grads.iter().enumerate() {
        assert_eq!(g.len(), refnet.params[pi].len(), "{tag}: param {pi} gradient size");
        let entries: Vec<usize> = if g.len() <= 40 { (0..g.len()).collect() } else { (0..40).map(|_| rng.usize_in(0, g.len() - 1)).collect() };
        for e in entries {
            let mut r = refnet.clone();
            r.params[pi][e] += h;
            let up = RefNet::loss(&r.forward(&xd, &wd, n), &labels, scale);
            r.params[pi][e] -= 2.0 * h;
            let dn = RefNet::loss(&r.forward(&xd, &wd, n), &labels, scale);
            let fd = (up - dn) / (2.0 * h);
            assert_close(&g[e..e + 1], &[fd], rtol, atol, &format!("{tag}: param {pi} entry {e} gradient vs finite differences"));
        }
    }

    // dwide: the gradient w.r.t. the whole wide matrix, block 0 being the bottom output.
    let bot = refnet.bottom_forward(&xd, n);
    let mut full = wd.clone();
    for i in 0..n {
        full[i * width..i * width + d].copy_from_slice(&bot[i * d..(i + 1) * d]);
    }
    let dwide = net.dwide()[..n * width].to_vec();
    for e in 0..n * width {
        let mut w = full.clone();
        w[e] += h;
        let up = RefNet::loss(&refnet.top_forward(&w, n), &labels, scale);
        w[e] -= 2.0 * h;
        let dn = RefNet::loss(&refnet.top_forward(&w, n), &labels, scale);
        let fd = (up - dn) / (2.0 * h);
        let (s, c) = (e / width, e % width);
        assert_close(&dwide[e..e + 1], &[fd], rtol, atol, &format!("{tag}: dwide sample {s} column {c} (block {}) vs finite differences", c / d));
    }

    // A second identical pass gives identical gradients (they are overwritten, not accumulated).
    net.forward_bottom(&be, &dense_x).unwrap();
    net.forward_top(&be).unwrap();
    net.backward(&be, &dense_x, &labels, scale as f32).unwrap();
    for (pi, p) in net.params_mut().iter().enumerate() {
        assert_bitwise(&p.g, &grads[pi], &format!("{tag}: param {pi} gradient after a second pass"));
    }
}

#[test]
fn dot_interaction_net_gradients() {
    check(Case { num_dense: 3, tables: 2, dim: 4, bottom: vec![5, 4], top: vec![6, 1], interaction: Interaction::Dot, batch: 6 }, 1);
    check(Case { num_dense: 5, tables: 3, dim: 4, bottom: vec![7, 6, 4], top: vec![9, 5, 1], interaction: Interaction::Dot, batch: 9 }, 2);
    // One table, one-layer MLPs.
    check(Case { num_dense: 2, tables: 1, dim: 8, bottom: vec![8], top: vec![1], interaction: Interaction::Dot, batch: 4 }, 3);
}

#[test]
fn dcn_interaction_net_gradients() {
    check(Case { num_dense: 3, tables: 2, dim: 4, bottom: vec![5, 4], top: vec![6, 1], interaction: Interaction::Dcn { layers: 2, rank: 3 }, batch: 6 }, 4);
    check(Case { num_dense: 4, tables: 3, dim: 4, bottom: vec![4], top: vec![7, 3, 1], interaction: Interaction::Dcn { layers: 3, rank: 2 }, batch: 5 }, 5);
    check(Case { num_dense: 2, tables: 1, dim: 8, bottom: vec![6, 8], top: vec![1], interaction: Interaction::Dcn { layers: 1, rank: 5 }, batch: 7 }, 6);
}
