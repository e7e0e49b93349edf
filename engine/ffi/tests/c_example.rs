//! Builds docs/examples/train.c with gcc against the built libember (shared library) and runs
//! it: it trains, checkpoints, and checks every error path from C. Skipped, with a message, when
//! gcc is not installed.
use std::path::{Path, PathBuf};
use std::process::Command;

/// The cargo profile folder holding libember.so (target/<profile>).
fn lib_dir() -> PathBuf {
    // Integration tests live in <target>/<profile>/deps, where `cargo test` leaves the cdylib;
    // `cargo build` uplifts it to <profile>.
    let exe = std::env::current_exe().expect("test path");
    let deps = exe.parent().map(Path::to_path_buf);
    let from_exe = deps.iter().cloned().chain(deps.as_deref().and_then(Path::parent).map(Path::to_path_buf)).collect::<Vec<_>>();
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| manifest.join("../../target"));
    let candidates = from_exe.into_iter().chain(["debug", "release"].iter().map(|p| target.join(p)));
    for dir in candidates {
        if dir.join("libember.so").exists() || dir.join("libember.dylib").exists() {
            return dir;
        }
    }
    panic!("libember shared library not found near {} or in {}", exe.display(), target.display());
}

#[test]
fn c_example_builds_and_runs() {
    if Command::new("gcc").arg("--version").output().is_err() {
        eprintln!("SKIPPED c_example_builds_and_runs: gcc not found on PATH");
        return;
    }
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.join("../..");
    let lib = lib_dir();
    let work = std::env::temp_dir().join(format!("ember-c-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let exe = work.join("train");
    let out = Command::new("gcc")
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-g"])
        .arg("-I")
        .arg(root.join("engine/include"))
        .arg(root.join("docs/examples/train.c"))
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-lember")
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("run gcc");
    assert!(out.status.success(), "gcc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let run = Command::new(&exe).arg(work.join("ckpt")).output().expect("run the example");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}");
    assert!(run.status.success(), "C example failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}", run.status);
    assert!(stdout.contains("all checks passed"), "{stdout}");
    assert!(work.join("ckpt/step-30").is_dir(), "checkpoint folder missing");
    let _ = std::fs::remove_dir_all(&work);
}
