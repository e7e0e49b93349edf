//! Test-only entry points: a deliberate panic, to show that the panic guard catches it.

use crate::status::{guard, EmberStatus};

/// Test-only: panics inside the library, to show that the panic is caught. Always returns
/// `EMBER_STATUS_ERR_PANIC` with the panic's message in `ember_last_error()`; the caller keeps
/// running (a message may be printed on stderr by the Rust panic hook).
#[no_mangle]
pub extern "C" fn ember_test_panic() -> EmberStatus {
    guard(|| panic!("ember_test_panic: deliberate panic"))
}
