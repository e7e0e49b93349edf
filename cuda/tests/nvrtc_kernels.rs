//! Compiles every kernel for sm_90 with NVRTC (feature `cuda`; no GPU needed, but libnvrtc: the
//! test is ignored by default and CI runs it with `--ignored`, the nvidia-cuda-nvrtc wheel's lib
//! folder on LD_LIBRARY_PATH). A compile error fails with NVRTC's log.
#![cfg(feature = "cuda")]

#[test]
#[ignore = "needs libnvrtc (LD_LIBRARY_PATH to the nvidia-cuda-nvrtc wheel's lib folder)"]
fn every_kernel_compiles_for_sm90() {
    use ember_cuda::{kernels::MODULES, nvrtc};
    assert!(nvrtc::nvrtc_present(), "needs libnvrtc: it could not be loaded (LD_LIBRARY_PATH?)");
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

#[test]
fn probe_never_panics() {
    // A device count, or an error naming what is missing.
    if let Err(e) = ember_cuda::device::probe(0) {
        assert!(!e.to_string().is_empty());
    }
}
