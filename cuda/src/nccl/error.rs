//! A failed NCCL call as an error message: every call is guarded against the panic of a
//! missing symbol, and a failure is described by its code, NCCL's text for it, NCCL's last
//! error and a hint at the usual cause.
use super::library::{has_last_error, panic_text};
use cudarc::nccl::{result as nr, sys as ns};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A failed NCCL call: its result code, or the panic of a missing symbol.
pub(super) enum Fail {
    Nccl(ns::ncclResult_t),
    Panic(String),
}

pub(super) fn guard<R>(f: impl FnOnce() -> Result<R, nr::NcclError>) -> Result<R, Fail> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(Fail::Nccl(e.0)),
        Err(p) => Err(Fail::Panic(panic_text(p))),
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string that lives while we copy it.
unsafe fn cstr(p: *const std::ffi::c_char) -> Option<String> {
    (!p.is_null())
        // SAFETY: non-null here, so a NUL-terminated string alive while we copy it (this
        // function's contract).
        .then(|| unsafe { std::ffi::CStr::from_ptr(p) }.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}

pub(super) fn describe(what: &str, f: Fail, comm: ns::ncclComm_t) -> String {
    let code = match f {
        Fail::Panic(p) => return format!("NCCL {what}: libnccl is not usable ({p})"),
        Fail::Nccl(c) => c,
    };
    // SAFETY: NCCL returns static strings.
    let text = catch_unwind(|| unsafe { cstr(ns::ncclGetErrorString(code)) }).ok().flatten();
    let last = if has_last_error() {
        // SAFETY: `comm` is a live communicator or null (NCCL then reports the thread's last error).
        catch_unwind(AssertUnwindSafe(|| unsafe { cstr(ns::ncclGetLastError(comm)) })).ok().flatten()
    } else {
        None
    };
    let hint = match code {
        ns::ncclResult_t::ncclUnhandledCudaError => " (a CUDA call inside NCCL failed: wrong device, out of memory, or a bad device pointer)",
        ns::ncclResult_t::ncclSystemError => " (a system or network call failed: check NCCL_SOCKET_IFNAME and the network)",
        ns::ncclResult_t::ncclInvalidUsage => " (invalid usage: e.g. two ranks on one GPU, or mismatched calls across ranks)",
        ns::ncclResult_t::ncclRemoteError => " (a remote rank failed)",
        _ => "",
    };
    let mut s = format!("NCCL {what} failed: {code:?}");
    if let Some(t) = text {
        s += &format!(" ({t})");
    }
    s += hint;
    if let Some(l) = last {
        s += &format!(": {l}");
    }
    s + " [NCCL_DEBUG=WARN tells more]"
}

pub(super) fn de<E: std::fmt::Debug>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e:?}")
}
