//! Shared helpers of the integration tests (the tests themselves live in `tests/tests/`).

/// Path of the shared data folder beside the checkout (`../shared/data`).
pub fn shared_data(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data").join(name)
}

pub mod oracle;
pub mod two_d;
