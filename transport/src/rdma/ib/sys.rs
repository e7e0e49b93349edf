//! The thin unsafe layer over libibverbs: one function per verbs call, errors as text.
use ibverbs_sys as ffi;
use std::ffi::CStr;

pub fn errno_text(rc: i32) -> String {
    let e = if rc < 0 { -rc } else { rc };
    format!("{} (errno {e})", std::io::Error::from_raw_os_error(e))
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// The raw device list (freed with `free_devices`) and its (name, device) entries.
pub type DeviceList = (*mut *mut ffi::ibv_device, Vec<(String, *mut ffi::ibv_device)>);

/// The device list (name, device pointer). The list must be freed with `free_devices`.
///
/// # Safety
/// Plain library call; the pointers are valid until `free_devices(list)`.
pub unsafe fn devices() -> Result<DeviceList, String> {
    let mut num: i32 = 0;
    // SAFETY: `num` is a live i32 the library writes the count into.
    let list = unsafe { ffi::ibv_get_device_list(&mut num) };
    if list.is_null() {
        let e = last_errno();
        return Err(match e {
            libc::ENOSYS => "no RDMA device: the kernel has no RDMA support (ibv_get_device_list: ENOSYS)".to_string(),
            _ => format!("no RDMA device: ibv_get_device_list failed: {}", errno_text(e)),
        });
    }
    let mut out = Vec::new();
    for i in 0..num.max(0) as usize {
        // SAFETY: the non-NULL list holds `num` device pointers (and a NULL terminator).
        let d = unsafe { *list.add(i) };
        if d.is_null() {
            break;
        }
        // SAFETY: `d` is a device of the live list.
        let name = unsafe { ffi::ibv_get_device_name(d) };
        // SAFETY: a non-NULL name is a NUL-terminated string owned by the device, alive with the list.
        let name = if name.is_null() { format!("device{i}") } else { unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned() };
        out.push((name, d));
    }
    Ok((list, out))
}

/// # Safety
/// `list` from `devices`, freed once.
pub unsafe fn free_devices(list: *mut *mut ffi::ibv_device) {
    // SAFETY: `list` came from `devices` and is freed once (this function's contract).
    unsafe { ffi::ibv_free_device_list(list) };
}

/// # Safety
/// `d` from a live device list.
pub unsafe fn open(d: *mut ffi::ibv_device, name: &str) -> Result<*mut ffi::ibv_context, String> {
    // SAFETY: `d` is a device of a live list (this function's contract).
    let c = unsafe { ffi::ibv_open_device(d) };
    if c.is_null() {
        return Err(format!("ibv_open_device({name}): {}", errno_text(last_errno())));
    }
    Ok(c)
}

/// # Safety
/// `ctx` open.
pub unsafe fn query_device(ctx: *mut ffi::ibv_context) -> Result<ffi::ibv_device_attr, String> {
    // SAFETY: a plain C struct of integers and arrays: all-zero is a valid value.
    let mut a: ffi::ibv_device_attr = unsafe { std::mem::zeroed() };
    // SAFETY: `ctx` is open (this function's contract); `a` is a live struct it fills.
    let rc = unsafe { ffi::ibv_query_device(ctx, &mut a) };
    if rc != 0 {
        return Err(format!("ibv_query_device: {}", errno_text(rc)));
    }
    Ok(a)
}

/// # Safety
/// `ctx` open.
pub unsafe fn query_port(ctx: *mut ffi::ibv_context, port: u8) -> Result<ffi::ibv_port_attr, String> {
    // The exported symbol fills the compat layout, a prefix of `ibv_port_attr` (what verbs.h's
    // inline wrapper falls back to as well).
    // SAFETY: a plain C struct of integers: all-zero is a valid value.
    let mut a: ffi::ibv_port_attr = unsafe { std::mem::zeroed() };
    // SAFETY: `ctx` is open (this function's contract); the compat layout the call fills is
    // a prefix of the live `ibv_port_attr` it points into.
    let rc = unsafe { ffi::ibv_query_port(ctx, port, &mut a as *mut ffi::ibv_port_attr as *mut ffi::_compat_ibv_port_attr) };
    if rc != 0 {
        return Err(format!("ibv_query_port(port {port}): {}", errno_text(rc)));
    }
    Ok(a)
}

/// # Safety
/// `ctx` open.
pub unsafe fn query_gid(ctx: *mut ffi::ibv_context, port: u8, index: u32) -> Result<[u8; 16], String> {
    // SAFETY: a union of byte arrays and integers: all-zero is a valid value.
    let mut g: ffi::ibv_gid = unsafe { std::mem::zeroed() };
    // SAFETY: `ctx` is open (this function's contract); `g` is a live union it fills.
    let rc = unsafe { ffi::ibv_query_gid(ctx, port, index as i32, &mut g) };
    if rc != 0 {
        return Err(format!("ibv_query_gid(port {port}, index {index}): {}", errno_text(if rc == -1 { last_errno() } else { rc })));
    }
    // SAFETY: every field of the union is plain bytes; `raw` covers all 16.
    Ok(unsafe { g.raw })
}

/// # Safety
/// `ctx` open.
pub unsafe fn close(ctx: *mut ffi::ibv_context) {
    // SAFETY: `ctx` is open and closed once (this function's contract).
    if unsafe { ffi::ibv_close_device(ctx) } != 0 {
        tracing::warn!("rdma: ibv_close_device failed");
    }
}

/// `ibv_post_send` (inline in verbs.h: through the ops table).
///
/// # Safety
/// `qp` live; `wr` well formed, its sges registered.
pub unsafe fn post_send(qp: *mut ffi::ibv_qp, wr: *mut ffi::ibv_send_wr) -> i32 {
    let mut bad: *mut ffi::ibv_send_wr = std::ptr::null_mut();
    // SAFETY: `qp` is live (this function's contract), so it and its context can be read.
    let op = unsafe { (*(*qp).context).ops.post_send };
    match op {
        // SAFETY: the provider's post_send on a live QP and a well-formed work request.
        Some(f) => unsafe { f(qp, wr, &mut bad) },
        None => libc::ENOSYS,
    }
}

/// `ibv_post_recv` (inline in verbs.h).
///
/// # Safety
/// `qp` live; `wr` well formed.
pub unsafe fn post_recv(qp: *mut ffi::ibv_qp, wr: *mut ffi::ibv_recv_wr) -> i32 {
    let mut bad: *mut ffi::ibv_recv_wr = std::ptr::null_mut();
    // SAFETY: `qp` is live (this function's contract), so it and its context can be read.
    let op = unsafe { (*(*qp).context).ops.post_recv };
    match op {
        // SAFETY: the provider's post_recv on a live QP and a well-formed work request.
        Some(f) => unsafe { f(qp, wr, &mut bad) },
        None => libc::ENOSYS,
    }
}

/// `ibv_poll_cq` (inline in verbs.h). Returns the number of completions, or < 0.
///
/// # Safety
/// `cq` live; `wc` has room for `n`.
pub unsafe fn poll_cq(cq: *mut ffi::ibv_cq, n: i32, wc: *mut ffi::ibv_wc) -> i32 {
    // SAFETY: `cq` is live (this function's contract), so it and its context can be read.
    let op = unsafe { (*(*cq).context).ops.poll_cq };
    match op {
        // SAFETY: the provider's poll_cq on a live CQ, `wc` with room for `n` completions.
        Some(f) => unsafe { f(cq, n, wc) },
        None => -libc::ENOSYS,
    }
}

pub fn wc_status_text(status: ffi::ibv_wc_status::Type) -> String {
    // SAFETY: returns a static string for any value.
    let s = unsafe { ffi::ibv_wc_status_str(status) };
    if s.is_null() {
        format!("status {status}")
    } else {
        // SAFETY: static NUL-terminated string.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    }
}
