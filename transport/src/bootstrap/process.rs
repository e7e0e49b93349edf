//! What a launcher does to the rank processes it starts: CPU affinity ([`allowed_cores`],
//! [`pin_to_core`]) and dying with the launcher ([`die_with_parent`]).

/// Cores this process may run on (for launchers that pin ranks round-robin).
pub fn allowed_cores() -> Vec<usize> {
    // SAFETY: sched_getaffinity fills the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![];
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Ask the kernel to SIGKILL this process when its parent dies (Linux), so the ranks of a
/// launcher that is itself killed do not run on. Async-signal-safe: callable between fork and exec.
pub fn die_with_parent() -> bool {
    #[cfg(target_os = "linux")]
    // SAFETY: a plain prctl on this process.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Pin the calling thread (or, between fork and exec, the new process) to one core.
/// Async-signal-safe: usable in `CommandExt::pre_exec`.
pub fn pin_to_core(core: usize) -> bool {
    // SAFETY: plain syscalls on a set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}
