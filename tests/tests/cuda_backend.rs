//! The CUDA backend (feature `cuda` of this package, `cuda = ["ember-engine/cuda"]`): against the
//! CPU reference (`ember_engine::selftest`), and 2D training with in-process ranks sharing one
//! GPU against the f64 oracle of `ember_tests::oracle2d`. The tests that need a GPU are ignored
//! by default; `tools/gpu-check.sh` runs them (`--ignored`).
#![cfg(feature = "cuda")]
use ember_engine::backend::cuda::{Cuda, PoolConfig};

#[test]
#[ignore = "needs a GPU"]
fn cuda_backend_matches_cpu() {
    let be = Cuda::new(0).unwrap_or_else(|e| panic!("needs a GPU: {e}"));
    let rep = ember_engine::selftest::selftest(&be).expect("selftest runs");
    assert!(rep.passed(), "{rep}");
}

#[test]
fn cuda_missing_device_is_an_error_not_a_panic() {
    // Either a device opens, or the error names what is missing; never a panic.
    if let Err(e) = Cuda::new(0) {
        let s = e.to_string();
        assert!(s.starts_with("device:"), "{s}");
    }
    assert!(Cuda::new(1 << 20).is_err());
}

#[test]
#[ignore = "needs a GPU"]
fn two_d_on_one_gpu_matches_the_k_step_oracle() {
    use ember_engine::parallel::XferKind;
    use ember_tests::check2d::{check, Opt, GRIDS};
    Cuda::probe().unwrap_or_else(|e| panic!("needs a GPU: {e}"));
    let gpu = |_: usize| Cuda::for_rank(0, PoolConfig::default());
    for opt in [Opt::Sgd, Opt::RowWise { c_is_m: true }, Opt::ElementWise] {
        for k in [1, 3] {
            check(&gpu, opt, GRIDS[0], k, false, XferKind::Auto, 1e-4);
        }
    }
    check(&gpu, Opt::RowWise { c_is_m: true }, GRIDS[1], 3, true, XferKind::Auto, 1e-4);
}
