//! `ember launch -n N -- CMD...`: starts N local processes with the launcher variables (RANK,
//! WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, EMBER_RENDEZVOUS, a fresh EMBER_JOB_TOKEN), pins
//! each to a core (round-robin over the cores this process may use), forwards their output
//! prefixed with the rank, and exits with the status of the rank that failed first (a rank
//! killed by a signal before any other: the others fail because it vanished).
use crate::common::CliResult;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone, Debug)]
pub struct LaunchArgs {
    /// Number of processes (ranks).
    #[arg(short = 'n', long = "nproc", default_value_t = 2, value_parser = crate::common::count::<1, { ember_engine::grid::MAX_RANKS }>)]
    pub n: usize,
    /// Transport the ranks use (sets EMBER_TRANSPORT): auto, shm, tcp, rdma.
    #[arg(long)]
    pub transport: Option<String>,
    /// Collective timeout in milliseconds, at most 7 days (sets EMBER_TIMEOUT_MS).
    #[arg(long, value_parser = crate::common::count64::<1, { ember_transport::MAX_TIMEOUT.as_millis() as u64 }>)]
    pub timeout_ms: Option<u64>,
    /// After one rank fails, how long the others may run before they are killed (seconds).
    #[arg(long, default_value_t = 70, value_parser = crate::common::count64::<0, { u32::MAX as u64 }>)]
    pub grace: u64,
    /// Do not pin processes to cores.
    #[arg(long)]
    pub no_pin: bool,
    /// The command each rank runs (after `--`); `ember` is this executable.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// The program a rank runs: `ember` means this executable (installed or not).
fn program(name: &str) -> std::path::PathBuf {
    if name == "ember" {
        if let Ok(me) = std::env::current_exe() {
            return me;
        }
    }
    std::path::PathBuf::from(name)
}

/// A signal's name, for the common ones.
fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        _ => "signal",
    }
}

/// How a rank ended, in words, and the launcher's exit status for it.
fn describe(rank: usize, st: &ExitStatus) -> (String, i32) {
    match (st.code(), st.signal()) {
        (Some(c), _) => (format!("rank {rank} exited with status {c}"), c),
        (None, Some(sig)) => (format!("rank {rank} killed by signal {sig} ({})", signal_name(sig)), 128 + sig),
        (None, None) => (format!("rank {rank} ended ({st})"), 1),
    }
}

fn forward(rank: usize, r: impl std::io::Read + Send + 'static, err: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if err {
                let _ = writeln!(std::io::stderr().lock(), "[{rank}] {line}");
            } else {
                let _ = writeln!(std::io::stdout().lock(), "[{rank}] {line}");
            }
        }
    })
}

pub fn run(a: LaunchArgs) -> CliResult {
    if a.n == 0 {
        return Err("ember launch: -n must be at least 1".into());
    }
    let port = ember_transport::bootstrap::free_port()?;
    let token = ember_transport::bootstrap::new_token();
    let cores = if a.no_pin { vec![] } else { ember_transport::bootstrap::allowed_cores() };
    let mut children: Vec<Option<Child>> = Vec::new();
    let mut pumps = Vec::new();
    for rank in 0..a.n {
        let prog = program(&a.cmd[0]);
        let mut c = Command::new(&prog);
        c.args(&a.cmd[1..])
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", a.n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", a.n.to_string())
            .env("EMBER_RENDEZVOUS", format!("127.0.0.1:{port}"))
            .env("EMBER_JOB_TOKEN", &token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(t) = &a.transport {
            c.env("EMBER_TRANSPORT", t);
        }
        if let Some(t) = a.timeout_ms {
            c.env("EMBER_TIMEOUT_MS", t.to_string());
        }
        let core = (!cores.is_empty()).then(|| cores[rank % cores.len()]);
        // SAFETY: only async-signal-safe calls (prctl, sched_setaffinity) between fork and exec.
        unsafe {
            c.pre_exec(move || {
                // A rank never outlives its launcher (e.g. one killed with SIGKILL).
                ember_transport::bootstrap::die_with_parent();
                if let Some(core) = core {
                    ember_transport::bootstrap::pin_to_core(core);
                }
                Ok(())
            });
        }
        let mut child = c.spawn().map_err(|e| format!("ember launch: cannot start {}: {e}", prog.display()))?;
        pumps.push(forward(rank, child.stdout.take().unwrap(), false));
        pumps.push(forward(rank, child.stderr.take().unwrap(), true));
        children.push(Some(child));
    }
    // Failures in the order they were seen; ranks the launcher killed itself are not causes.
    let mut failures: Vec<(usize, ExitStatus)> = Vec::new();
    let mut killed_by_us = vec![false; a.n];
    let mut failed_at: Option<Instant> = None;
    let mut running = a.n;
    while running > 0 {
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(ch) = slot.as_mut() else { continue };
            if let Ok(Some(st)) = ch.try_wait() {
                running -= 1;
                *slot = None;
                if !st.success() {
                    failures.push((rank, st));
                    failed_at.get_or_insert_with(Instant::now);
                }
            }
        }
        if failed_at.is_some_and(|t| t.elapsed() > Duration::from_secs(a.grace)) {
            for (rank, ch) in children.iter_mut().enumerate() {
                if let Some(ch) = ch {
                    killed_by_us[rank] = true;
                    let _ = ch.kill();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    for p in pumps {
        let _ = p.join();
    }
    let causes: Vec<&(usize, ExitStatus)> = failures.iter().filter(|(r, _)| !killed_by_us[*r]).collect();
    // A rank killed by a signal is the cause of the others' failures (they lost a peer).
    let cause = causes.iter().find(|(_, st)| st.signal().is_some()).or(causes.first()).copied().or(failures.first());
    let Some((rank, st)) = cause else { return Ok(()) };
    let (what, code) = describe(*rank, st);
    let others: Vec<String> = failures.iter().filter(|(r, _)| r != rank).map(|(r, s)| describe(*r, s).0).collect();
    if others.is_empty() {
        eprintln!("ember launch: {what}");
    } else {
        eprintln!("ember launch: {what} (then {})", others.join(", "));
    }
    std::process::exit(code.clamp(1, 255));
}
