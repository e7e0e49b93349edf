//! 2D training against the independent f64 oracle of `ember_tests::oracle2d` (BRIEF.md §2–§3):
//! grids 2x2, 3x2 and 2x3 (both placements), every sharding type in the plan, mean and sum
//! pooling, K = 1 and K = 3 over 7 steps (so the run ends between syncs), SGD, row-wise AdaGrad
//! with c = 1 and c = M, element-wise AdaGrad, and delayed state sync. Every row of every
//! replica is checked after every step (relative error ≤ 1e-5 per touched row, untouched rows
//! bitwise unchanged), the replicas bitwise identical after every sync, and the driver's whole
//! run (its final sync included) against the oracle's end state.
use ember_engine::backend::Cpu;
use ember_engine::parallel::XferKind;
use ember_tests::check2d::{check, config, initial, Opt, G, GRIDS};
use ember_tests::oracle::{RefNet, TestRng};

const TOL: f64 = 1e-5;

fn cpu(opt: Opt, g: G, k: usize, delayed: bool, xfer: XferKind) {
    check(&|_| Ok(Cpu::new()), opt, g, k, delayed, xfer, TOL);
}

#[test]
fn the_reference_backward_matches_finite_differences() {
    // The oracle's own dense gradients, against central differences of its forward pass.
    let c = config(Opt::Sgd.engine());
    let (_, dense) = initial(&c);
    let net = RefNet { num_dense: 3, bottom: vec![7, 8], top: vec![5, 1], f: 5, d: 8, dcn: None, params: dense.iter().map(|p| p.iter().map(|&x| x as f64).collect()).collect() };
    let mut rng = TestRng::new(3);
    let n = 4;
    let x: Vec<f64> = (0..n * 3).map(|_| rng.range(-1.0, 1.0)).collect();
    let wide: Vec<f64> = (0..n * net.width()).map(|_| rng.range(-0.5, 0.5)).collect();
    let labels: Vec<f64> = (0..n).map(|i| (i % 2) as f64).collect();
    let loss_of = |net: &RefNet, wide: &[f64]| RefNet::loss(&net.forward(&x, wide, n), &labels.iter().map(|&y| y as f32).collect::<Vec<_>>(), 0.25);
    let (loss, grads, dwide) = net.backward(&x, &wide, &labels, n, 0.25);
    assert!((loss - loss_of(&net, &wide)).abs() <= 1e-12);
    let h = 1e-6;
    for (p, g) in grads.iter().enumerate() {
        for k in 0..g.len() {
            let mut a = net.clone();
            a.params[p][k] += h;
            let mut b = net.clone();
            b.params[p][k] -= h;
            let fd = (loss_of(&a, &wide) - loss_of(&b, &wide)) / (2.0 * h);
            assert!((fd - g[k]).abs() <= 1e-7 + 1e-5 * fd.abs(), "parameter {p}[{k}]: backward {} vs finite difference {fd}", g[k]);
        }
    }
    let d = net.d;
    for i in 0..n {
        for j in d..net.width() {
            let k = i * net.width() + j;
            let mut a = wide.clone();
            a[k] += h;
            let mut b = wide.clone();
            b[k] -= h;
            let fd = (loss_of(&net, &a) - loss_of(&net, &b)) / (2.0 * h);
            assert!((fd - dwide[k]).abs() <= 1e-7 + 1e-5 * fd.abs(), "embedding input {k}: backward {} vs finite difference {fd}", dwide[k]);
        }
    }
}

#[test]
fn sgd_matches_the_k_step_oracle() {
    for k in [1, 3] {
        for g in GRIDS {
            cpu(Opt::Sgd, g, k, false, XferKind::Auto);
        }
    }
}

#[test]
fn rowwise_adagrad_c1_matches_the_k_step_oracle() {
    for k in [1, 3] {
        for g in GRIDS {
            cpu(Opt::RowWise { c_is_m: false }, g, k, false, XferKind::Auto);
        }
    }
}

#[test]
fn rowwise_adagrad_c_m_matches_the_k_step_oracle() {
    for k in [1, 3] {
        for g in GRIDS {
            cpu(Opt::RowWise { c_is_m: true }, g, k, false, XferKind::Auto);
        }
    }
}

#[test]
fn elementwise_adagrad_matches_the_k_step_oracle() {
    for k in [1, 3] {
        for g in GRIDS {
            cpu(Opt::ElementWise, g, k, false, XferKind::Auto);
        }
    }
}

#[test]
fn peer_copy_sync_matches_the_k_step_oracle() {
    // In-process replicas averaging their packed shard rows through the in-process fabric.
    for opt in [Opt::RowWise { c_is_m: true }, Opt::ElementWise] {
        cpu(opt, GRIDS[1], 3, false, XferKind::Peers);
    }
}

#[test]
fn delayed_state_sync_matches_the_oracle() {
    for opt in [Opt::RowWise { c_is_m: true }, Opt::ElementWise] {
        for k in [1, 3] {
            for g in &GRIDS[..2] {
                cpu(opt, *g, k, true, XferKind::Auto);
            }
        }
    }
}
