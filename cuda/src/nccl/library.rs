//! Finding libnccl and checking it: [`probe`] loads the library once per process (through
//! cudarc) and reads its version, without panicking; a missing or misnamed library is an error
//! that says what to do.
use crate::device::DevResult;
use cudarc::nccl::{result as nr, sys as ns};
use std::panic::catch_unwind;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Oldest NCCL this module accepts: grouped `ncclSend`/`ncclRecv` appeared in 2.7.
pub const MIN_VERSION: (u32, u32) = (2, 7);

/// What [`probe`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NcclInfo {
    /// `ncclGetVersion`'s code (e.g. 22809).
    pub code: i32,
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl std::fmt::Display for NcclInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Decode `ncclGetVersion`'s code: `X*1000+Y*100+Z` up to 2.8, `X*10000+Y*100+Z` after.
pub fn decode_version(code: i32) -> NcclInfo {
    let c = code.max(0) as u32;
    let (major, minor, patch) = if c >= 10000 {
        (c / 10000, (c % 10000) / 100, c % 100)
    } else {
        (c / 1000, (c % 1000) / 100, c % 100)
    };
    NcclInfo { code, major, minor, patch }
}

pub(super) fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic".into())
}

/// Folders searched for a `libnccl.so.2` when `libnccl.so` does not load: `LD_LIBRARY_PATH`, then
/// the usual system folders.
fn library_dirs() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).filter(|d| !d.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    for d in [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/local/cuda/lib64",
        "/usr/lib64",
        "/usr/local/lib",
        "/usr/lib",
    ] {
        v.push(PathBuf::from(d));
    }
    v
}

/// The error when cudarc cannot open libnccl, given the folders to look in for a `libnccl.so.2`
/// (public for the tests; [`probe`] passes `LD_LIBRARY_PATH` and the system folders). When one is
/// there, or `libnccl.so.2` loads by name, the message gives the symlink to make.
pub fn missing_library_message(dirs: &[PathBuf], so2_loads: bool) -> String {
    let found = dirs.iter().map(|d| d.join("libnccl.so.2")).find(|p| p.exists());
    let fix_dir = "$HOME/.local/lib/ember-nccl";
    match (found, so2_loads) {
        (Some(p), _) => format!(
            "NCCL is installed as {} but cudarc 0.19 only opens libnccl.so (or .so.1, .so.9-.so.13): \
             run `mkdir -p {fix_dir} && ln -sf {} {fix_dir}/libnccl.so` and add {fix_dir} to LD_LIBRARY_PATH (docs/cuda.md, NCCL fallback)",
            p.display(),
            p.display()
        ),
        (None, true) => format!(
            "libnccl.so.2 loads but cudarc 0.19 only opens libnccl.so (or .so.1, .so.9-.so.13): symlink it, e.g. \
             `mkdir -p {fix_dir} && ln -sf $(ldconfig -p | awk '/libnccl.so.2 /{{print $NF; exit}}') {fix_dir}/libnccl.so`, \
             and add {fix_dir} to LD_LIBRARY_PATH (docs/cuda.md, NCCL fallback)"
        ),
        (None, false) => "no NCCL library: libnccl.so could not be loaded. Install NCCL (`pip install nvidia-nccl-cu13`, or the \
             libnccl2 package), symlink its libnccl.so.2 as libnccl.so in a folder on LD_LIBRARY_PATH (docs/cuda.md, NCCL fallback)"
            .to_string(),
    }
}

fn probe_uncached() -> DevResult<NcclInfo> {
    // SAFETY: only dlopens candidate names.
    let present = catch_unwind(|| unsafe { ns::is_culib_present() }).unwrap_or(false);
    if !present {
        // SAFETY: loading NCCL runs no user code beyond its initialisers; dropped at once.
        let so2 = catch_unwind(|| unsafe { libloading::Library::new("libnccl.so.2") }.is_ok()).unwrap_or(false);
        return Err(missing_library_message(&library_dirs(), so2));
    }
    let code = match catch_unwind(nr::get_nccl_version) {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("ncclGetVersion failed: {:?}", e.0)),
        Err(p) => return Err(format!("libnccl loaded but is not usable: {}", panic_text(p))),
    };
    let v = decode_version(code);
    if (v.major, v.minor) < MIN_VERSION {
        return Err(format!(
            "NCCL {v} is too old: the fallback needs NCCL >= {}.{} (grouped ncclSend/ncclRecv)",
            MIN_VERSION.0, MIN_VERSION.1
        ));
    }
    Ok(v)
}

/// Load libnccl (once per process) and read its version. Never panics.
pub fn probe() -> DevResult<NcclInfo> {
    static P: OnceLock<DevResult<NcclInfo>> = OnceLock::new();
    P.get_or_init(probe_uncached).clone()
}

/// `ncclGetLastError` exists from NCCL 2.13 on.
pub(super) fn has_last_error() -> bool {
    matches!(probe(), Ok(v) if (v.major, v.minor) >= (2, 13))
}

/// The folder of the libnccl that the dynamic loader would pick, when it can be told (the first
/// `libnccl.so` in `LD_LIBRARY_PATH` or the system folders): for messages.
pub fn library_path() -> Option<PathBuf> {
    library_dirs().into_iter().map(|d| d.join("libnccl.so")).find(|p| Path::new(p).exists())
}
