//! Compiles every kernel for sm_90 with NVRTC (no GPU needed). Without the `cuda` feature, or
//! without libnvrtc, it says so and passes, unless EMBER_REQUIRE_NVRTC=1 (CI sets it), in which
//! case a missing NVRTC fails. A compile error fails with NVRTC's log.
#[cfg(feature = "cuda")]
#[test]
fn every_kernel_compiles_for_sm90() {
    use ember_cuda::{kernels::MODULES, nvrtc};
    let required = std::env::var("EMBER_REQUIRE_NVRTC").map(|v| v == "1").unwrap_or(false);
    if !nvrtc::nvrtc_present() {
        assert!(!required, "EMBER_REQUIRE_NVRTC=1 but libnvrtc could not be loaded (LD_LIBRARY_PATH?)");
        eprintln!("SKIPPED: libnvrtc not found; kernels not compiled (set LD_LIBRARY_PATH to the nvidia-cuda-nvrtc wheel's lib folder)");
        return;
    }
    eprintln!("NVRTC {:?}", nvrtc::nvrtc_version());
    for m in MODULES {
        let ptx = nvrtc::compile(m, "sm_90").unwrap_or_else(|log| panic!("{log}"));
        let text = ptx.to_src();
        for k in m.kernels {
            assert!(text.contains(&format!(".entry {k}(")), "{}: kernel {k} missing from the PTX", m.name);
        }
        // The forward kernel must use 16-byte loads.
        if m.name == "embedding.cu" {
            assert!(text.contains("ld.global.nc.v4.f32") || text.contains("ld.global.nc.v4.u32"), "emb_fwd_v4 lost its 16-byte loads");
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn probe_never_panics() {
    match ember_cuda::device::probe(0) {
        Ok(n) => eprintln!("CUDA devices: {n}"),
        Err(e) => eprintln!("SKIPPED (no GPU): {e}"),
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn nvrtc_kernels_need_the_cuda_feature() {
    eprintln!("SKIPPED: built without feature `cuda`; run `cargo test -p ember-cuda --features cuda` to compile the kernels with NVRTC");
}
