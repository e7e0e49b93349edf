//! Status codes and failure reporting: `EmberStatus`, the internal `Failure` every fallible step
//! returns (and its mapping from engine and transport errors), the calling thread's last error
//! message, and the panic guard that runs every entry point.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What every fallible function returns. `EMBER_STATUS_OK` (0) is success; on any other value
/// `ember_last_error()` describes the failure.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmberStatus {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    ErrNullPointer = 1,
    /// An argument is out of range or a buffer size does not match the model (wrong batch
    /// size, ids count, output buffer too small, text not UTF-8).
    ErrInvalidArgument = 2,
    /// The configuration (TOML text, file or preset name) was rejected, or it does not fit the
    /// job (grid size against the launcher's world size).
    ErrConfig = 3,
    /// The batch contents were rejected (label not 0/1, id out of range, non-finite value).
    ErrInput = 4,
    /// Training diverged (non-finite loss) or another numeric failure.
    ErrNumeric = 5,
    /// A file could not be read or written (config file, checkpoint).
    ErrIo = 6,
    /// The engine handle is not a live handle (destroyed, or never created by this library).
    ErrInvalidHandle = 7,
    /// A panic was caught inside the library. The engine it happened in is unusable afterwards
    /// (every later call on it returns this code); destroy it.
    ErrPanic = 8,
    /// Any other engine failure (device, out of memory, transport: a peer died or a collective
    /// timed out). A rank whose collective failed midway is unusable afterwards; destroy it.
    ErrInternal = 9,
    /// Multi-rank engines: another rank rejected its part of this collective call (its own
    /// call returned the reason); no rank changed its state.
    ErrPeer = 10,
}

pub(crate) struct Failure(pub(crate) EmberStatus, pub(crate) String);

pub(crate) type R<T> = std::result::Result<T, Failure>;

pub(crate) fn fail<T>(status: EmberStatus, msg: impl Into<String>) -> R<T> {
    Err(Failure(status, msg.into()))
}

impl From<engine::Error> for Failure {
    fn from(e: engine::Error) -> Self {
        use engine::Error as E;
        let status = match &e {
            E::Config(_) => EmberStatus::ErrConfig,
            E::Data { .. } | E::Io { .. } => EmberStatus::ErrIo,
            E::Input(_) => EmberStatus::ErrInput,
            E::Numeric(_) => EmberStatus::ErrNumeric,
            E::Device(_) | E::OutOfMemory(_) | E::Transport(_) => EmberStatus::ErrInternal,
        };
        Failure(status, e.to_string())
    }
}

impl From<ember_transport::Error> for Failure {
    fn from(e: ember_transport::Error) -> Self {
        Failure(EmberStatus::ErrInternal, format!("transport: {e}"))
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".into()
    }
}

/// Run `f` with the panic guard; record the error message; return the status.
pub(crate) fn guard(f: impl FnOnce() -> R<()>) -> EmberStatus {
    set_last_error("");
    let out = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return EmberStatus::Ok,
        Ok(Err(Failure(s, m))) => (s, m),
        Err(p) => (EmberStatus::ErrPanic, format!("panic inside ember: {}", panic_message(&*p))),
    };
    // Formatting the message cannot panic in practice, but stay on the safe side.
    let _ = catch_unwind(AssertUnwindSafe(|| set_last_error(&out.1)));
    out.0
}

/// A short constant name for `status` ("EMBER_STATUS_OK", ...; "EMBER_STATUS_UNKNOWN" for a
/// value not in the enum). Static storage owned by the library: never free it. Never fails.
#[no_mangle]
pub extern "C" fn ember_status_name(status: i32) -> *const c_char {
    let s: &'static str = match status {
        0 => "EMBER_STATUS_OK\0",
        1 => "EMBER_STATUS_ERR_NULL_POINTER\0",
        2 => "EMBER_STATUS_ERR_INVALID_ARGUMENT\0",
        3 => "EMBER_STATUS_ERR_CONFIG\0",
        4 => "EMBER_STATUS_ERR_INPUT\0",
        5 => "EMBER_STATUS_ERR_NUMERIC\0",
        6 => "EMBER_STATUS_ERR_IO\0",
        7 => "EMBER_STATUS_ERR_INVALID_HANDLE\0",
        8 => "EMBER_STATUS_ERR_PANIC\0",
        9 => "EMBER_STATUS_ERR_INTERNAL\0",
        10 => "EMBER_STATUS_ERR_PEER\0",
        _ => "EMBER_STATUS_UNKNOWN\0",
    };
    s.as_ptr() as *const c_char
}

/// The message of the calling thread's most recent failure, as a NUL-terminated UTF-8 string;
/// "" when the thread's most recent ember call succeeded. Every ember function except
/// `ember_version`, `ember_abi_version`, `ember_status_name` and `ember_last_error` resets it.
/// The string is owned by the library and stays valid until the calling thread's next ember
/// call; copy it to keep it. Never returns NULL.
#[no_mangle]
pub extern "C" fn ember_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}
