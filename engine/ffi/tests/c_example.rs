//! Builds docs/examples/train.c with the C compiler against the built libember and runs it: one process;
//! 4 ranks as processes under `ember launch -n 4`; 4 in-process ranks on threads; under valgrind;
//! installed with tools/install-capi.sh and built through pkg-config; linked statically. The
//! program checks every error path from C itself; here the runs are compared with each other:
//! every rank prints the same global loss at every step (bitwise), the process-per-rank and
//! thread-per-rank runs agree bitwise (the engine is deterministic across transports), and both
//! agree with the one-process run to 1e-6 (the same model and data; the 2D ranks sum embedding
//! lookups in another order). The C compiler is `cc` (or $CC), which every Rust toolchain on
//! Linux links with. The parts that need the `ember` binary (built by another package), valgrind
//! or pkg-config are ignored by default (`.ci/run` installs them and runs them with `--ignored`)
//! and fail, naming what is missing and how to get it, when run without it.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The cargo profile folder holding libember.so (target/<profile>).
fn lib_dir() -> PathBuf {
    // Integration tests live in <target>/<profile>/deps, where `cargo test` leaves the cdylib;
    // `cargo build` uplifts it to <profile>.
    let exe = std::env::current_exe().expect("test path");
    let deps = exe.parent().map(Path::to_path_buf);
    let from_exe = deps.iter().cloned().chain(deps.as_deref().and_then(Path::parent).map(Path::to_path_buf)).collect::<Vec<_>>();
    let target = target_dir();
    let candidates = from_exe.into_iter().chain(["debug", "release"].iter().map(|p| target.join(p)));
    for dir in candidates {
        if dir.join("libember.so").exists() || dir.join("libember.dylib").exists() {
            return dir;
        }
    }
    panic!("libember shared library not found near {} or in {}", exe.display(), target.display());
}

fn target_dir() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| manifest.join("../../target"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fresh scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let work = std::env::temp_dir().join(format!("ember-c-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    work
}

/// The C compiler: $CC, else `cc`.
fn cc() -> String {
    std::env::var("CC").ok().filter(|c| !c.is_empty()).unwrap_or_else(|| "cc".into())
}

/// Compile the example with `extra` link arguments into `exe`.
fn compile(exe: &Path, include: &Path, extra: &[String]) {
    let out = Command::new(cc())
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-O1", "-g", "-pthread"])
        .arg("-I")
        .arg(include)
        .arg(root().join("docs/examples/train.c"))
        .args(extra)
        .arg("-o")
        .arg(exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{}`: {e} (install gcc, or set CC)", cc()));
    assert!(out.status.success(), "{} failed:\n{}", cc(), String::from_utf8_lossy(&out.stderr));
}

/// The example linked against the shared library in the cargo target folder.
fn build(work: &Path) -> PathBuf {
    let lib = lib_dir();
    let exe = work.join("train");
    compile(&exe, &root().join("engine/include"), &[format!("-L{}", lib.display()), format!("-Wl,-rpath,{}", lib.display()), "-lember".into()]);
    exe
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The example's environment: no launcher variables of an enclosing job (they would make the
/// example join it), and no LD_LIBRARY_PATH — cargo's (target/<profile> among others) outranks
/// the example's RUNPATH and could load an older libember.so left there by `cargo build`.
fn isolate(cmd: &mut Command) -> &mut Command {
    for v in ["RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "SLURM_NTASKS", "SLURM_PROCID", "PMI_SIZE", "PMI_RANK", "LD_LIBRARY_PATH"] {
        cmd.env_remove(v);
    }
    cmd
}

fn run_ok(cmd: &mut Command, what: &str) -> String {
    isolate(cmd);
    let o = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let (out, err) = text(&o);
    assert!(o.status.success(), "{what} failed ({}):\nstdout:\n{out}\nstderr:\n{err}", o.status);
    out
}

/// Per rank: the loss printed at every step (as printed, 17 significant digits) and the eval line.
struct Run {
    losses: BTreeMap<usize, Vec<String>>,
    evals: BTreeMap<usize, String>,
}

/// Parse "rank W step S loss X" and "rank W eval ..." lines (with or without the launcher's
/// "[w] " prefix).
fn parse(out: &str) -> Run {
    let mut run = Run { losses: BTreeMap::new(), evals: BTreeMap::new() };
    for line in out.lines() {
        let line = if line.starts_with('[') { line.split_once("] ").map_or(line, |x| x.1) } else { line };
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["rank", w, "step", s, "loss", x] => {
                let v = run.losses.entry(w.parse().unwrap()).or_default();
                assert_eq!(v.len() + 1, s.parse::<usize>().unwrap(), "steps out of order: {line}");
                v.push(x.to_string());
            }
            ["rank", w, "eval", rest @ ..] => {
                run.evals.insert(w.parse().unwrap(), rest.join(" "));
            }
            _ => {}
        }
    }
    run
}

/// Every rank printed `steps` losses, the same at every step, and the same metrics.
fn ranks_agree(r: &Run, ranks: usize, steps: usize, what: &str) -> Vec<String> {
    assert_eq!(r.losses.len(), ranks, "{what}: ranks that printed losses");
    assert_eq!(r.evals.len(), ranks, "{what}: ranks that printed metrics");
    let first = &r.losses[&0];
    assert_eq!(first.len(), steps, "{what}");
    for (w, l) in &r.losses {
        assert_eq!(l, first, "{what}: rank {w}'s global losses differ from rank 0's");
        assert_eq!(r.evals[w], r.evals[&0], "{what}: rank {w}'s metrics differ from rank 0's");
    }
    first.clone()
}

#[test]
fn c_example_one_process_and_four_threads() {
    let work = scratch("example");
    let exe = build(&work);
    // One process.
    let out = run_ok(Command::new(&exe).arg(work.join("ckpt1")), "one process");
    println!("{out}");
    assert!(out.contains("all checks passed"), "{out}");
    assert!(work.join("ckpt1/step-30/manifest.json").is_file(), "checkpoint missing");
    let single = ranks_agree(&parse(&out), 1, 30, "one process");
    // Four ranks on threads of one process.
    let out = run_ok(Command::new(&exe).args(["--ranks", "4"]).arg(work.join("ckpt4t")), "4 in-process ranks");
    assert!(out.contains("all checks passed"), "{out}");
    assert!(out.contains("grid 1x4"), "{out}");
    let threads = parse(&out);
    let threaded = ranks_agree(&threads, 4, 30, "4 in-process ranks");
    assert!(work.join("ckpt4t/step-30/manifest.json").is_file(), "checkpoint missing");
    for (s, (a, b)) in single.iter().zip(&threaded).enumerate() {
        let (a, b): (f64, f64) = (a.parse().unwrap(), b.parse().unwrap());
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "step {}: one process {a} vs 4 ranks {b}", s + 1);
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
#[ignore = "needs the ember binary (cargo build -p ember-tools, or EMBER_BIN)"]
fn c_example_four_processes_equal_four_threads() {
    let lib = lib_dir();
    let ember = std::env::var_os("EMBER_BIN").map(PathBuf::from).unwrap_or_else(|| {
        let near = [lib.join("ember"), lib.parent().map_or_else(|| lib.join("ember"), |p| p.join("ember"))];
        near.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| target_dir().join("debug/ember"))
    });
    assert!(
        ember.exists(),
        "this test needs the `ember` binary, not found at {}: `cargo build -p ember-tools` (or set EMBER_BIN)",
        ember.display()
    );
    let work = scratch("launch");
    let exe = build(&work);
    let out = run_ok(Command::new(&exe).args(["--ranks", "4"]).arg(work.join("ckpt4t")), "4 in-process ranks");
    let threads = parse(&out);
    let threaded = ranks_agree(&threads, 4, 30, "4 in-process ranks");
    let out = run_ok(Command::new(&ember).args(["launch", "-n", "4", "--"]).arg(&exe).arg(work.join("ckpt4p")), "ember launch -n 4");
    assert_eq!(out.matches("all checks passed").count(), 4, "{out}");
    let procs = parse(&out);
    let launched = ranks_agree(&procs, 4, 30, "ember launch -n 4");
    assert_eq!(launched, threaded, "processes and threads give different losses");
    assert_eq!(procs.evals, threads.evals, "processes and threads give different metrics");
    assert!(work.join("ckpt4p/step-30/manifest.json").is_file(), "checkpoint missing");
    println!("ember launch -n 4: every rank's loss at step 30 is {}", launched[29]);
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
#[ignore = "needs valgrind: apt-get install valgrind (bash .ci/run runs it)"]
fn c_example_is_clean_under_valgrind() {
    ember_tests::require_tool("valgrind", "apt-get install valgrind");
    let work = scratch("valgrind");
    let exe = build(&work);
    let supp = root().join("docs/examples/valgrind.supp");
    for (args, what) in [(&["--steps", "4"][..], "one process"), (&["--ranks", "4", "--steps", "3"][..], "4 in-process ranks")] {
        let mut cmd = Command::new("valgrind");
        cmd.args(["--error-exitcode=1", "--leak-check=full", "--errors-for-leak-kinds=definite,indirect,possible"])
            .arg(format!("--suppressions={}", supp.display()))
            .arg(&exe)
            .args(args)
            .arg(work.join(format!("ckpt-{}", args.len())))
            .env("RUST_BACKTRACE", "0");
        let o = isolate(&mut cmd).output().expect("run valgrind");
        let (out, err) = text(&o);
        assert!(o.status.success(), "valgrind ({what}) failed ({}):\nstdout:\n{out}\nstderr:\n{err}", o.status);
        assert!(out.contains("all checks passed"), "{out}");
        assert!(err.contains("ERROR SUMMARY: 0 errors"), "{err}");
        assert!(err.contains("definitely lost: 0 bytes") || err.contains("All heap blocks were freed"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&work);
}

#[test]
#[ignore = "needs pkg-config: apt-get install pkg-config (bash .ci/run runs it)"]
fn installed_library_is_found_by_pkg_config_and_links_statically() {
    ember_tests::require_tool("pkg-config", "apt-get install pkg-config");
    let work = scratch("pkgconfig");
    let prefix = work.join("prefix");
    let out = run_ok(Command::new("sh").arg(root().join("tools/install-capi.sh")).arg(&prefix).arg(lib_dir()), "tools/install-capi.sh");
    assert!(out.contains("installed libember"), "{out}");
    let pc = std::fs::read_to_string(prefix.join("lib/pkgconfig/ember.pc")).unwrap();
    assert!(!pc.contains('@'), "unsubstituted placeholder in ember.pc:\n{pc}");
    let pkg = |args: &[&str]| {
        let o = Command::new("pkg-config").args(args).arg("ember").env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig")).output().unwrap();
        assert!(o.status.success(), "pkg-config {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().split_whitespace().map(String::from).collect::<Vec<_>>()
    };
    assert_eq!(pkg(&["--modversion"]), vec![env!("CARGO_PKG_VERSION").to_string()]);
    let cflags = pkg(&["--cflags"]);
    let libs = pkg(&["--libs"]);
    assert_eq!(cflags, vec![format!("-I{}", prefix.join("include").display())]);
    assert_eq!(libs, vec![format!("-L{}", prefix.join("lib").display()), "-lember".to_string()]);
    // Built with nothing but what pkg-config says (plus an rpath to find the .so at run time).
    let exe = work.join("train-pc");
    let include = prefix.join("include");
    let mut extra = libs.clone();
    extra.push(format!("-Wl,-rpath,{}", prefix.join("lib").display()));
    compile(&exe, &include, &extra);
    let out = run_ok(Command::new(&exe).args(["--steps", "3"]).arg(work.join("ckpt-pc")), "example built with pkg-config");
    assert!(out.contains("all checks passed"), "{out}");
    // Statically linked: libember.a and the private libraries pkg-config lists.
    let statics: Vec<String> = pkg(&["--static", "--libs"]).into_iter().filter(|a| a != "-lember" && !a.starts_with("-L")).collect();
    assert!(statics.contains(&"-lpthread".to_string()), "{statics:?}");
    let exe = work.join("train-static");
    let mut extra = vec![prefix.join("lib/libember.a").display().to_string()];
    extra.extend(statics);
    compile(&exe, &include, &extra);
    let ldd = Command::new("ldd").arg(&exe).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    assert!(!ldd.contains("libember"), "the static build still loads libember.so:\n{ldd}");
    let out = run_ok(Command::new(&exe).args(["--steps", "3"]).arg(work.join("ckpt-static")), "statically linked example");
    assert!(out.contains("all checks passed"), "{out}");
    let _ = std::fs::remove_dir_all(&work);
}
