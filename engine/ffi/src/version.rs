//! The library's identity: the ABI version constant and the two calls that report the library
//! and ABI versions.

use std::ffi::c_char;

/// Version of the C ABI described by this header. It changes whenever a function's signature or
/// a struct's layout changes incompatibly.
pub const EMBER_ABI_VERSION: u32 = 2;

/// The library version as a NUL-terminated string ("MAJOR.MINOR.PATCH"). Static storage owned by
/// the library: never free it. Never fails.
#[no_mangle]
pub extern "C" fn ember_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// The ABI version this library implements (compare with `EMBER_ABI_VERSION` from the header
/// the caller was compiled against). Never fails.
#[no_mangle]
pub extern "C" fn ember_abi_version() -> u32 {
    EMBER_ABI_VERSION
}
