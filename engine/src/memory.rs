//! Host memory a run may still use, and the check every run makes before it allocates its model:
//! "needs N GiB per rank, M GiB available" instead of growing until the kernel kills it.
//!
//! Available = the lowest of the kernel's `MemAvailable` (/proc/meminfo) and, for the cgroup
//! this process runs in and every cgroup above it, limit minus usage (cgroup v2: `memory.max` −
//! `memory.current`; v1: `memory.limit_in_bytes` − `memory.usage_in_bytes`) — a Slurm job or a
//! container is such a cgroup. [`ENV_AVAILABLE`] replaces the figure (tests, or to pin it).
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// `EMBER_MEMORY_AVAILABLE`: the available bytes to assume instead of measuring (a number with
/// an optional K, M, G or T suffix, powers of 1024).
pub const ENV_AVAILABLE: &str = "EMBER_MEMORY_AVAILABLE";

const GIB: f64 = (1u64 << 30) as f64;

/// Bytes from "123", "64K", "2G" (powers of 1024); None for anything else or an overflow.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 0),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// `MemAvailable` of a /proc/meminfo text, in bytes.
pub fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Limit minus usage of one cgroup's memory files; None when unlimited or unreadable.
fn headroom(limit: Option<String>, usage: Option<String>) -> Option<u64> {
    let limit = limit?;
    let limit = limit.trim();
    if limit == "max" {
        return None;
    }
    let limit: u64 = limit.parse().ok()?;
    // cgroup v1 reports "no limit" as a huge page-rounded number.
    if limit >= 1 << 62 {
        return None;
    }
    let usage: u64 = usage.and_then(|u| u.trim().parse().ok()).unwrap_or(0);
    Some(limit.saturating_sub(usage))
}

/// The memory cgroup directories of this process, leaf first, up to the hierarchy's root, from
/// a /proc/self/cgroup text; `root` is the file system root ("/" outside tests).
fn cgroup_dirs(root: &Path, proc_cgroup: &str) -> Vec<(PathBuf, bool)> {
    let sys = root.join("sys/fs/cgroup");
    let mut out = Vec::new();
    for line in proc_cgroup.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(ctrl), Some(path)) = (f.next(), f.next(), f.next()) else { continue };
        let rel = path.trim_start_matches('/');
        if rel.split('/').any(|c| c == "..") {
            continue;
        }
        let (base, v2) = if id == "0" && ctrl.is_empty() {
            // The unified hierarchy: mounted at /sys/fs/cgroup, or at .../unified beside v1.
            if sys.join("cgroup.controllers").exists() {
                (sys.clone(), true)
            } else {
                (sys.join("unified"), true)
            }
        } else if ctrl.split(',').any(|c| c == "memory") {
            (sys.join("memory"), false)
        } else {
            continue;
        };
        let mut dir = base.join(rel);
        loop {
            out.push((dir.clone(), v2));
            if dir == base || !dir.pop() || !dir.starts_with(&base) {
                break;
            }
        }
    }
    out
}

/// The available bytes seen from file system root `root`: MemAvailable and every cgroup limit
/// minus usage, the lowest; None if nothing could be read.
pub fn available_at(root: &Path) -> Option<u64> {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok();
    let mut best = read(root.join("proc/meminfo")).and_then(|t| mem_available(&t));
    let cg = read(root.join("proc/self/cgroup")).unwrap_or_default();
    for (dir, v2) in cgroup_dirs(root, &cg) {
        let (limit, usage) = if v2 { ("memory.max", "memory.current") } else { ("memory.limit_in_bytes", "memory.usage_in_bytes") };
        if let Some(h) = headroom(read(dir.join(limit)), read(dir.join(usage))) {
            best = Some(best.map_or(h, |b| b.min(h)));
        }
    }
    best
}

/// The bytes this process may still allocate: [`ENV_AVAILABLE`] if set, else measured
/// ([`available_at`] "/"); None when neither is known (no /proc).
pub fn available() -> Result<Option<u64>> {
    match std::env::var(ENV_AVAILABLE) {
        Ok(v) => parse_bytes(&v).map(Some).ok_or_else(|| Error::Config(format!("{ENV_AVAILABLE}={v:?}: expected bytes, e.g. 512M or 64G"))),
        Err(_) => Ok(available_at(Path::new("/"))),
    }
}

/// Refuse a run whose ranks in this process need more than `available` bytes together:
/// `ranks` holds each in-process rank's need (the planner's estimate; one entry for a process
/// that is one rank of a launched job). The error says "needs N GiB per rank, M GiB available".
pub fn check_fits(ranks: &[u64], available: Option<u64>) -> Result<()> {
    let Some(avail) = available else { return Ok(()) };
    let total = ranks.iter().try_fold(0u64, |a, &b| a.checked_add(b));
    if total.is_some_and(|t| t <= avail) {
        return Ok(());
    }
    let g = |x: u64| x as f64 / GIB;
    let per_rank = ranks.iter().copied().max().unwrap_or(0);
    let all = match (ranks.len(), total) {
        (1, _) => String::new(),
        (n, Some(t)) => format!(" ({n} ranks in this process: {:.2} GiB)", g(t)),
        (n, None) => format!(" ({n} ranks in this process: more than 2^64 bytes)"),
    };
    Err(Error::OutOfMemory(format!(
        "the model needs {:.2} GiB per rank{all}, {:.2} GiB available (the lower of MemAvailable and the cgroup limit; {ENV_AVAILABLE} overrides it): \
         use fewer rows (--max-rows), more ranks per sharding group, or a machine with more memory",
        g(per_rank),
        g(avail)
    )))
}

/// [`check_fits`] for the ranks of `grid` that this process holds (all of them, or one when
/// `one_rank`), with the needs from the planner's report and the measured [`available`] memory.
pub fn check_plan(report: &crate::plan::planner::PlanReport, m: usize, one_rank: bool) -> Result<()> {
    let needs: Vec<u64> = if one_rank {
        vec![report.max_rank_bytes]
    } else {
        (0..m).flat_map(|_| report.ranks.iter().map(|r| r.total_bytes)).collect()
    };
    check_fits(&needs, available()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes_and_refuse_overflow() {
        assert_eq!(parse_bytes("123"), Some(123));
        assert_eq!(parse_bytes(" 64K "), Some(64 << 10));
        assert_eq!(parse_bytes("2G"), Some(2 << 30));
        assert_eq!(parse_bytes("3t"), Some(3 << 40));
        assert_eq!(parse_bytes("99999999999T"), None);
        assert_eq!(parse_bytes("G"), None);
        assert_eq!(parse_bytes("-1"), None);
        assert_eq!(parse_bytes(""), None);
    }

    #[test]
    fn check_fits_sums_in_process_ranks_and_names_both_figures() {
        assert!(check_fits(&[1 << 30; 4], Some(4 << 30)).is_ok());
        assert!(check_fits(&[u64::MAX], None).is_ok());
        let e = check_fits(&[1 << 29, 1 << 30, 1 << 30, 1 << 30, 1 << 31], Some(4 << 30)).unwrap_err().to_string();
        assert!(e.contains("needs 2.00 GiB per rank") && e.contains("5 ranks in this process: 5.50 GiB") && e.contains("4.00 GiB available"), "{e}");
        let e = check_fits(&[u64::MAX / 2; 3], Some(1)).unwrap_err().to_string();
        assert!(e.contains("more than 2^64 bytes"), "{e}");
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    #[test]
    fn available_is_the_lowest_of_meminfo_and_every_cgroup_level() {
        let root = std::env::temp_dir().join(format!("ember-mem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // cgroup v1: the job's own cgroup is unlimited, its parent has 3 GiB with 1 GiB used.
        write(&root, "proc/meminfo", "MemTotal: 100 kB\nMemAvailable:   8388608 kB\n");
        write(&root, "proc/self/cgroup", "5:cpu:/\n4:memory:/slurm/job7\n0::/\n");
        write(&root, "sys/fs/cgroup/memory/slurm/job7/memory.limit_in_bytes", "9223372036854771712\n");
        write(&root, "sys/fs/cgroup/memory/slurm/job7/memory.usage_in_bytes", "5\n");
        write(&root, "sys/fs/cgroup/memory/slurm/memory.limit_in_bytes", &format!("{}\n", 3u64 << 30));
        write(&root, "sys/fs/cgroup/memory/slurm/memory.usage_in_bytes", &format!("{}\n", 1u64 << 30));
        assert_eq!(available_at(&root), Some(2 << 30));
        // Without the cgroup limit: MemAvailable (8 GiB).
        write(&root, "sys/fs/cgroup/memory/slurm/memory.limit_in_bytes", "9223372036854771712\n");
        assert_eq!(available_at(&root), Some(8 << 30));
        // cgroup v2 (unified at /sys/fs/cgroup): memory.max "max" at the leaf, 1 GiB above.
        let _ = std::fs::remove_dir_all(root.join("sys"));
        write(&root, "proc/self/cgroup", "0::/user.slice/job\n");
        write(&root, "sys/fs/cgroup/cgroup.controllers", "memory\n");
        write(&root, "sys/fs/cgroup/user.slice/job/memory.max", "max\n");
        write(&root, "sys/fs/cgroup/user.slice/memory.max", &format!("{}\n", 1u64 << 30));
        write(&root, "sys/fs/cgroup/user.slice/memory.current", &format!("{}\n", 1u64 << 29));
        assert_eq!(available_at(&root), Some(1 << 29));
        // Usage above the limit leaves nothing.
        write(&root, "sys/fs/cgroup/user.slice/memory.current", &format!("{}\n", 2u64 << 30));
        assert_eq!(available_at(&root), Some(0));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
