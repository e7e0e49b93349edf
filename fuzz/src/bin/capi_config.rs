//! The C ABI's config parsing through its real entry point, `ember_engine_create_from_toml`:
//! any text gives a status, never a panic (`EMBER_STATUS_ERR_PANIC` counts as a crash) or an
//! abort; a created engine answers `ember_engine_info` and is destroyed. The memory the
//! process may use is pinned low, so that a large valid model is refused, not built.
#![no_main]
use ember::{ember_engine_create_from_toml, ember_engine_destroy, ember_engine_info, EmberInfo, EmberStatus};
use std::ffi::CString;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        std::env::set_var("EMBER_MEMORY_AVAILABLE", "64M");
        for k in ["RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"] {
            std::env::remove_var(k);
        }
    });
    let Ok(text) = CString::new(data) else { return };
    let mut e = std::ptr::null_mut();
    // SAFETY: a NUL-terminated string and a valid out-pointer, as the ABI requires.
    let st = unsafe { ember_engine_create_from_toml(text.as_ptr(), &mut e) };
    assert_ne!(st, EmberStatus::ErrPanic, "a panic inside the library");
    if st == EmberStatus::Ok {
        let mut info = EmberInfo::default();
        // SAFETY: `e` is a live handle and `info` a valid out-pointer.
        unsafe {
            assert_eq!(ember_engine_info(e, &mut info), EmberStatus::Ok);
            assert_eq!(ember_engine_destroy(e), EmberStatus::Ok);
        }
    } else {
        assert!(e.is_null(), "a failed create wrote a handle");
    }
});
