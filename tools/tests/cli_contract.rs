//! The command line as docs/cli.md writes it: the flag-name table against every subcommand's
//! help (one spelling per concept, no flag a subcommand ignores), a help line for every flag and
//! an example ending every subcommand's help, the exit status of rejected flags, readable names
//! in output, `ember config`, the example configs in docs/examples, and the README's examples.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EMBER: &str = env!("CARGO_BIN_EXE_ember");

fn ember(args: &[&str]) -> Output {
    Command::new(EMBER).args(args).output().expect("run ember")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn ok(args: &[&str]) -> String {
    let o = ember(args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "ember {args:?} failed ({}):\n{out}\n{err}", o.status);
    out
}

/// Every subcommand that takes flags, as words after `ember`.
const SUBCOMMANDS: [&str; 17] = [
    "train",
    "convert",
    "plan",
    "simulate",
    "config",
    "launch",
    "selftest",
    "bench embedding",
    "bench dlrm",
    "bench mem",
    "bench gemm",
    "bench data",
    "bench a2a",
    "bench allreduce",
    "bench pingpong",
    "checkpoint inspect",
    "checkpoint export",
];

fn help(sub: &str) -> String {
    let mut args: Vec<&str> = sub.split(' ').collect();
    args.push("--help");
    ok(&args)
}

/// (short, long) of every flag in a help text, --help itself excluded.
fn flags_in_help(h: &str) -> BTreeMap<String, Option<char>> {
    let mut flags = BTreeMap::new();
    for line in h.lines() {
        let t = line.trim_start();
        let (short, rest) = match t.strip_prefix('-') {
            Some(r) if !r.starts_with('-') && r.len() > 3 && &r[1..3] == ", " => (r.chars().next(), &r[3..]),
            _ => (None, t),
        };
        if let Some(long) = rest.strip_prefix("--") {
            let name: String = long.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            if name != "help" && line.starts_with("  ") {
                flags.insert(name, short);
            }
        }
    }
    flags
}

/// The flag-name table of docs/cli.md: long name -> (short, subcommands).
fn flag_table() -> BTreeMap<String, (Option<char>, BTreeSet<String>)> {
    let doc = std::fs::read_to_string(root().join("docs/cli.md")).unwrap();
    let start = doc.find("## Flag names").expect("docs/cli.md has a '## Flag names' section");
    let mut table = BTreeMap::new();
    for line in doc[start..].lines().skip(1).take_while(|l| !l.starts_with("## ")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let subs: BTreeSet<String> = cells[cells.len() - 2].split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        // The first cell: `-s, --long VALUE` (short optional).
        let spec = cells[1].trim_matches('`');
        let (short, long) = match spec.split_once(", ") {
            Some((s, l)) => (s.strip_prefix('-').and_then(|s| s.chars().next()), l),
            None => (None, spec),
        };
        let long = long.strip_prefix("--").unwrap_or_else(|| panic!("bad flag cell {spec}")).split(' ').next().unwrap().to_string();
        assert!(table.insert(long.clone(), (short, subs)).is_none(), "--{long} is listed twice in docs/cli.md");
    }
    assert!(table.len() > 40, "the flag table lists only {} flags", table.len());
    table
}

#[test]
fn the_flag_table_in_docs_is_exactly_what_each_subcommand_takes() {
    let table = flag_table();
    for sub in SUBCOMMANDS {
        let have = flags_in_help(&help(sub));
        let want: BTreeMap<String, Option<char>> = table.iter().filter(|(_, (_, subs))| subs.contains(sub)).map(|(l, (s, _))| (l.clone(), *s)).collect();
        assert_eq!(have, want, "`ember {sub}`: flags in --help (left) differ from docs/cli.md's flag table (right)");
    }
    let known: BTreeSet<&str> = SUBCOMMANDS.into_iter().collect();
    for (long, (_, subs)) in &table {
        for s in subs {
            assert!(known.contains(s.as_str()), "docs/cli.md lists --{long} for unknown subcommand '{s}'");
        }
    }
}

#[test]
fn one_spelling_per_concept_and_no_flag_a_subcommand_ignores() {
    // The spellings that were settled away, each refused where it used to be accepted.
    for (args, flag) in [
        (vec!["plan", "--force", "table"], "--force"),
        (vec!["plan", "--steps", "5"], "--steps"),
        (vec!["plan", "--device", "cpu"], "--device"),
        (vec!["plan", "--transport", "shm"], "--transport"),
        (vec!["plan", "--data", "x.csv"], "--data"),
        (vec!["bench", "a2a", "--ranks", "2", "--warmup_iters", "1"], "--warmup_iters"),
        (vec!["bench", "a2a", "--ranks", "2", "--minbytes", "1K"], "--minbytes"),
        (vec!["bench", "embedding", "--bag", "4"], "--bag"),
        (vec!["bench", "mem", "--reps", "2"], "--reps"),
        (vec!["selftest", "--batch", "64"], "--batch"),
        (vec!["selftest", "--pooling", "4"], "--pooling"),
    ] {
        let o = ember(&args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(&format!("unexpected argument '{flag}'")), "{args:?}: {err}");
    }
    // The same concept, the same values: --sharding and --placement in train and plan.
    let plan = ok(&["plan", "--grid", "1x4", "--sharding", "table-row", "--placement", "across-nodes"]);
    assert!(plan.contains("by type: table_row_wise 8"), "{plan}");
    let train = ok(&["train", "--grid", "1x2", "--steps", "2", "--sharding", "table-row", "--placement", "across-nodes", "--quiet"]);
    assert!(train.contains("grid 1x2"), "{train}");
}

#[test]
fn every_flag_has_a_help_line_and_every_help_ends_with_an_example() {
    let mut all = vec!["".to_string(), "bench".into(), "checkpoint".into()];
    all.extend(SUBCOMMANDS.iter().map(|s| s.to_string()));
    for sub in &all {
        let h = if sub.is_empty() { ok(&["--help"]) } else { help(sub) };
        let lines: Vec<&str> = h.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            // A flag (`--long`, `-s, --long`) or a positional (`<NAME>`); not a `- value:` line.
            let is_item = line.starts_with("  ") && (t.starts_with("--") || t.starts_with('<') || (t.starts_with('-') && t.as_bytes().get(2) == Some(&b',')));
            if !is_item {
                continue;
            }
            // "  --flag <V>   help" on one line, or the help on the next, further indented line.
            let same_line = t.split("  ").skip(1).any(|s| !s.trim().is_empty());
            let indent = line.len() - t.len();
            let next_line = lines.get(i + 1).is_some_and(|n| {
                let nt = n.trim_start();
                !nt.is_empty() && n.len() - nt.len() > indent && !nt.starts_with('-')
            });
            assert!(same_line || next_line, "`ember {sub} --help`: no help line for `{}`", t);
        }
        let last = lines.iter().rev().find(|l| !l.trim().is_empty()).unwrap();
        let example_at = lines.iter().rposition(|l| l.starts_with("Example")).unwrap_or_else(|| panic!("`ember {sub} --help` has no example:\n{h}"));
        assert!(lines[example_at + 1..].iter().all(|l| l.trim().is_empty() || l.starts_with("  ember ")), "`ember {sub} --help` does not end with an example:\n{h}");
        assert!(last.starts_with("  ember ") && last.contains(sub.split(' ').last().unwrap()), "`ember {sub} --help` ends with `{last}`");
    }
}

#[test]
fn rejected_flags_exit_with_status_1_and_help_with_0() {
    for args in [
        vec!["train", "--no-such-flag"],
        vec!["train", "--steps"],
        vec!["train", "--steps", "many"],
        vec!["train", "--device", "tpu"],
        vec!["train", "--sharding", "diagonal"],
        vec!["plan", "--placement", "inside"],
        vec!["no-such-subcommand"],
    ] {
        let o = ember(&args);
        let (out, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}:\n{out}{err}");
        assert!(err.starts_with("ember: error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    // No subcommand: the help, as an error.
    for args in [vec![], vec!["bench"], vec!["checkpoint"]] {
        let o = ember(&args);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}:\n{err}");
        assert!(err.contains("Usage: ember "), "{args:?}: {err}");
    }
    for args in [vec!["--help"], vec!["train", "--help"], vec!["--version"], vec!["bench", "a2a", "-h"]] {
        assert_eq!(ember(&args).status.code(), Some(0), "{args:?}");
    }
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::io::Read;
    let mut child = Command::new(EMBER)
        .args(["plan", "--preset", "dlrmv2", "--grid", "1x2048", "--all-ranks"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // then the pipe closes
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let _ = child.wait().unwrap();
    assert!(err.is_empty(), "{err}");
}

#[test]
fn output_names_things_in_words_not_rust_debug_forms() {
    let plan = ok(&["plan", "--grid", "2x2", "--placement", "across-nodes"]);
    assert!(plan.contains(", replicas across nodes,"), "{plan}");
    let dir = std::env::temp_dir().join(format!("ember-names-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    ok(&["train", "--grid", "2x1", "--steps", "2", "--quiet", "--checkpoint-dir", dir.to_str().unwrap(), "--checkpoint-every", "2"]);
    let inspect = ok(&["checkpoint", "inspect", dir.to_str().unwrap()]);
    assert!(inspect.contains("embedding row-wise AdaGrad (lr 0.05, eps 1e-8), dense AdaGrad (lr 0.02, eps 1e-8)"), "{inspect}");
    assert!(inspect.contains("grid 2x1 (replicas in node)") && inspect.contains("dot interaction"), "{inspect}");
    for text in [&plan, &inspect] {
        for debug in ["ReplicasInNode", "ReplicasAcrossNodes", "RowWiseAdagrad", "Adagrad {", "Sgd {", "Dot", "None"] {
            assert!(!text.contains(debug), "Rust debug form '{debug}' in:\n{text}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The JSON object on the last line of `out`.
fn last_json(out: &str) -> serde_json::Value {
    let line = out.lines().last().expect("output");
    serde_json::from_str(&line[line.find('{').expect("JSON")..]).unwrap()
}

#[test]
fn config_prints_a_preset_that_trains_exactly_like_the_preset() {
    let dir = std::env::temp_dir().join(format!("ember-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (preset, steps) in [("tiny", "20"), ("kaggle", "3")] {
        let toml = ok(&["config", "--preset", preset, "--max-rows", "20000", "--steps", steps]);
        let path = dir.join(format!("{preset}.toml"));
        std::fs::write(&path, &toml).unwrap();
        let from_file = last_json(&ok(&["train", "--config", path.to_str().unwrap(), "--json", "--quiet"]));
        let from_preset = last_json(&ok(&["train", "--preset", preset, "--max-rows", "20000", "--steps", steps, "--json", "--quiet"]));
        assert_eq!(from_file["steps"].as_u64(), Some(steps.parse().unwrap()));
        assert_eq!(from_file["loss"], from_preset["loss"], "{preset}");
        assert_eq!(from_file["auc"], from_preset["auc"], "{preset}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_example_configs_train() {
    let mut n = 0;
    for e in std::fs::read_dir(root().join("docs/examples")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let v = last_json(&ok(&["train", "--config", p.to_str().unwrap(), "--steps", "3", "--json", "--quiet"]));
            assert_eq!(v["steps"], 3, "{}", p.display());
            assert!(v["loss"].as_f64().is_some_and(f64::is_finite), "{}", p.display());
            n += 1;
        }
    }
    assert!(n >= 3, "docs/examples holds {n} configs");
}

/// Every `$ ember ...` command of the README, in order, run as written (from a scratch folder
/// that sees the repository's tests/data and docs/examples), with `ember` this build's binary.
#[test]
fn the_readme_examples_run_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let work = std::env::temp_dir().join(format!("ember-readme-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("tests")).unwrap();
    std::fs::create_dir_all(work.join("docs")).unwrap();
    std::os::unix::fs::symlink(root().join("tests/data").canonicalize().unwrap(), work.join("tests/data")).unwrap();
    std::os::unix::fs::symlink(root().join("docs/examples").canonicalize().unwrap(), work.join("docs/examples")).unwrap();
    let mut ran = 0;
    for line in readme.lines() {
        let Some(cmd) = line.strip_prefix("$ ember ") else { continue };
        let args: Vec<&str> = cmd.split_whitespace().take_while(|a| !a.starts_with('#') && *a != ">").collect();
        let redirect = cmd.split_once(" > ").map(|(_, f)| f.trim());
        let o = Command::new(EMBER).args(&args).current_dir(&work).output().unwrap();
        let (out, err) = text(&o);
        assert!(o.status.success(), "README: `ember {cmd}` failed ({}):\n{out}\n{err}", o.status);
        if let Some(f) = redirect {
            std::fs::write(work.join(f), &out).unwrap();
        }
        ran += 1;
    }
    assert!(ran >= 8, "the README shows {ran} ember commands");
    let _ = std::fs::remove_dir_all(&work);
}
