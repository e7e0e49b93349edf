//! Shared helpers of the integration tests (the tests themselves live in `tests/tests/`).

/// Path of a file in the repository's test data folder (`tests/data`, see its README).
pub fn test_data(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(name)
}

pub mod check2d;
pub mod oracle;
pub mod oracle2d;
pub mod two_d;
