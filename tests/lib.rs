//! Shared helpers of the integration tests (the tests themselves live in `tests/tests/`).

/// Path of a file in the repository's test data folder (`tests/data`, see its README).
pub fn test_data(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(name)
}

/// Fail, naming `tool` and how to install it (`install`), unless `tool --version` runs. For
/// the tests that need a program `.ci/run` installs: they are `#[ignore = "needs …"]`, so a
/// plain `cargo test --workspace` passes without the program, and `.ci/run` runs them after
/// installing it, where a missing program is a failure, never a silent skip.
pub fn require_tool(tool: &str, install: &str) {
    let runs = std::process::Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(runs, "this test needs `{tool}`, which is not on PATH: {install} (bash .ci/run installs it and runs the tests that need it)");
}

pub mod binary;
pub mod check2d;
pub mod oracle;
pub mod oracle2d;
pub mod two_d;

/// A scratch folder for one test, emptied when made and removed when the test ends.
pub struct TmpDir(std::path::PathBuf);

impl TmpDir {
    pub fn new(dir: std::path::PathBuf) -> TmpDir {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TmpDir(dir)
    }
}

impl std::ops::Deref for TmpDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
