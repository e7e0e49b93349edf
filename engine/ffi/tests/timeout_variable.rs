//! `EMBER_TIMEOUT_MS` is checked before in-process ranks are created: a malformed or
//! out-of-range value is a config error naming the variable, not the default timeout. (The only
//! test of its binary: it sets the process's environment.)
use ember::{ember_engine_create_local_ranks, ember_engine_destroy, ember_last_error, EmberEngine, EmberStatus};
use std::ffi::{CStr, CString};
use std::ptr;

// The C ABI unit tests' model.
const TOML: &str = include_str!("../src/tiny_model.toml");

fn last_error() -> String {
    // SAFETY: `ember_last_error` never returns NULL, and its NUL-terminated string stays valid
    // until this thread's next ember call; it is copied at once.
    unsafe { CStr::from_ptr(ember_last_error()) }.to_str().unwrap().to_string()
}

fn create(n: usize) -> (EmberStatus, Vec<*mut EmberEngine>) {
    let toml = CString::new(TOML).unwrap();
    let mut hs = vec![ptr::null_mut::<EmberEngine>(); n];
    // SAFETY: `toml` is a live CString and `hs` has the `n` slots the call may fill.
    let st = unsafe { ember_engine_create_local_ranks(toml.as_ptr(), n, hs.as_mut_ptr()) };
    (st, hs)
}

#[test]
fn a_bad_timeout_variable_refuses_in_process_ranks() {
    for bad in ["abc", "10s", "-1", "0", "604800001", "18446744073709551615"] {
        std::env::set_var("EMBER_TIMEOUT_MS", bad);
        let (st, hs) = create(2);
        assert_eq!(st, EmberStatus::ErrConfig, "{bad:?}: {}", last_error());
        let e = last_error();
        assert!(e.contains("EMBER_TIMEOUT_MS") && e.contains("milliseconds from 1 to 604800000"), "{bad:?}: {e}");
        assert!(hs.iter().all(|h| h.is_null()), "a failed create wrote handles");
    }
    std::env::set_var("EMBER_TIMEOUT_MS", "5000");
    let (st, hs) = create(2);
    assert_eq!(st, EmberStatus::Ok, "{}", last_error());
    for h in hs {
        // SAFETY: a handle this test created, destroyed once.
        assert_eq!(unsafe { ember_engine_destroy(h) }, EmberStatus::Ok);
    }
    std::env::remove_var("EMBER_TIMEOUT_MS");
}
