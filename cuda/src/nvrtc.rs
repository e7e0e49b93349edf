//! Run-time compilation of the kernel sources with NVRTC (loaded dynamically).
use crate::kernels::Module;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};

/// Is libnvrtc loadable? Never panics.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library by its candidate names.
    std::panic::catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// NVRTC's version (major, minor), if the library loads.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    std::panic::catch_unwind(|| {
        let (mut a, mut b) = (0, 0);
        // SAFETY: the library is loaded (checked above); the call only writes the two `i32`
        // out-parameters, live locals.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
        (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((a, b))
    })
    .ok()
    .flatten()
}

/// Compile one module for `arch` (e.g. "sm_90"); the error carries NVRTC's whole log.
pub fn compile(m: &Module, arch: &'static str) -> Result<Ptx, String> {
    if !nvrtc_present() {
        return Err("libnvrtc not found (install the nvidia-cuda-nvrtc wheel of the CUDA 13.0 line and put its lib folder on LD_LIBRARY_PATH)".into());
    }
    let opts = CompileOptions {
        arch: Some(arch),
        name: Some(m.name.to_string()),
        options: vec!["--std=c++17".into(), "-default-device".into(), "-lineinfo".into()],
        ..Default::default()
    };
    let src = m.source;
    match std::panic::catch_unwind(move || compile_ptx_with_opts(src, opts)) {
        Ok(Ok(ptx)) => Ok(ptx),
        Ok(Err(CompileError::CompileError { nvrtc, options, log })) => Err(format!(
            "NVRTC failed to compile {} for {arch} ({nvrtc:?}, options {options:?}):\n{}",
            m.name,
            log.to_string_lossy()
        )),
        Ok(Err(e)) => Err(format!("NVRTC error on {}: {e:?}", m.name)),
        Err(_) => Err(format!("NVRTC panicked while compiling {}", m.name)),
    }
}

/// Map a compute capability to the architecture name NVRTC takes.
pub fn arch_name(major: i32, minor: i32) -> &'static str {
    match (major, minor) {
        (9, 0) => "sm_90",
        (8, 0) => "sm_80",
        (8, 6) => "sm_86",
        (8, 9) => "sm_89",
        (10, 0) => "sm_100",
        (12, 0) => "sm_120",
        (7, 5) => "sm_75",
        _ if major >= 9 => "sm_90",
        _ => "sm_75",
    }
}
