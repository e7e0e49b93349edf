//! The CUDA backend against the CPU reference (ember_engine::selftest). Needs the `cuda` feature of this
//! package (`cuda = ["ember-engine/cuda"]`) and a GPU; otherwise it says SKIPPED and passes.
#[cfg(feature = "cuda")]
#[test]
fn cuda_backend_matches_cpu() {
    use ember_engine::backend::cuda::Cuda;
    if let Err(e) = Cuda::probe() {
        eprintln!("SKIPPED (no GPU): {e}");
        return;
    }
    let be = Cuda::new(0).expect("a probed device opens");
    let rep = ember_engine::selftest::selftest(&be).expect("selftest runs");
    assert!(rep.passed(), "{rep}");
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_missing_device_is_an_error_not_a_panic() {
    // Either a device opens, or the error names what is missing; never a panic.
    match ember_engine::backend::cuda::Cuda::new(0) {
        Ok(_) => {}
        Err(e) => {
            let s = e.to_string();
            assert!(s.starts_with("device:"), "{s}");
            eprintln!("SKIPPED (no GPU): {s}");
        }
    }
    assert!(ember_engine::backend::cuda::Cuda::new(1 << 20).is_err());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_backend_needs_the_feature() {
    eprintln!("SKIPPED: built without feature `cuda` (cargo test -p ember-tests --features cuda)");
}
