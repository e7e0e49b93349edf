//! The large-message path by cross-memory attach: the start-up probe, the receiver's one-copy
//! fetch of an announced (RTS) message under its offer (`OFFERED -> READING -> DONE`, so a
//! withdrawn offer is never delivered), the sender's offers (taken, withdrawn, released), its
//! claim (CAS `POSTED -> CLAIMED`) of an advertised buffer and its `process_vm_writev` into it,
//! the announced sends still looking for an advertisement, the process liveness check, and the
//! fence: killing a peer that holds a write claim on our memory past the job's timeout.
use super::ring::{slot_id, split_id, Rec, RTS};
use super::segment::{ADV_SLOTS, A_CLAIMED, A_LEN_AFTER_RTS, A_LEN_FAILED, A_POSTED, A_WRITTEN, OFFER_SLOTS, O_DONE, O_FREE, O_OFFERED, O_READING};
use super::{JobState, SendJob, ShmFabric};
use crate::error::{Error, Result};
use crate::fabric::{Tag, Wait};
use crate::mailbox::Dir;
use bytemuck::Zeroable;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The offer slot and generation an RTS names (`id`, made by `slot_id`): the slot must exist.
pub fn offer_slot(id: u64) -> std::result::Result<(usize, u64), String> {
    let (k, gen) = split_id(id);
    match k < OFFER_SLOTS {
        true => Ok((k, gen)),
        false => Err(format!("offer slot {k} (there are {OFFER_SLOTS})")),
    }
}

/// An advertisement slot as the sender reads it from the receiver's inbox.
#[derive(Clone, Copy, Debug)]
pub struct AdvRead {
    pub state: u64,
    pub ctx: u64,
    pub seq: u64,
    pub round: u64,
    pub cap: u64,
}

/// The sender's verdict on advertisement slot `a` for its message `tag` of `len` bytes:
/// `None`: not a posted advertisement of this message; `Some(false)`: too small (unless `short`:
/// then it is claimed and the receiver reports the overflow); `Some(true)`: to be claimed. The
/// buffer's address is checked by the kernel when written into.
pub fn usable(a: &AdvRead, tag: Tag, len: usize, short: bool) -> Option<bool> {
    if a.state & 3 != A_POSTED || a.ctx != tag.ctx || a.seq != tag.seq || a.round != tag.round as u64 {
        return None;
    }
    Some(len as u64 <= a.cap || short)
}

impl ShmFabric {
    /// Copy `len` bytes at `addr` in rank `src` into `buf` (one copy) under the sender's offer
    /// `id`, then release the sender. An offer the sender withdrew, before or during the copy,
    /// fails the receive and sends no FIN (the sender no longer waits).
    pub(super) fn fetch(&self, src: usize, tag: Tag, addr: u64, buf: *mut u8, len: usize, id: u64) -> Result<()> {
        let (k, gen) = match offer_slot(id) {
            Ok(x) => x,
            Err(detail) => {
                let e = self.proto(src, format!("RTS for {tag:?}: {detail}"));
                self.mb.fail(src, tag, Dir::Recv, e);
                return Ok(());
            }
        };
        let o = self.rx[src].offer(k);
        let withdrawn = || Error::PeerFailed { op: "shm fetch", peer: src, reason: format!("the sender withdrew the message {tag:?}") };
        if o.state.compare_exchange(gen << 2 | O_OFFERED, gen << 2 | O_READING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            self.mb.fail(src, tag, Dir::Recv, withdrawn());
            return Ok(());
        }
        let pid = self.pids[src];
        let r = if pid == std::process::id() {
            // Same process (ranks as threads): the sender's buffer is in our address space; it
            // waits for READING to end before withdrawing (`withdraw_offer`).
            // SAFETY: the sender keeps it alive while the offer is READING; len was checked against the post.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf, len) };
            Ok(())
        } else {
            cma(pid, buf, addr, len, false)
        };
        if o.state.compare_exchange(gen << 2 | O_READING, gen << 2 | O_DONE, Ordering::AcqRel, Ordering::Acquire).is_err() {
            self.mb.fail(src, tag, Dir::Recv, withdrawn());
            return Ok(());
        }
        match r {
            Ok(()) => self.mb.complete(src, tag, Dir::Recv, len),
            Err(e) => self.mb.fail(src, tag, Dir::Recv, Error::Io { op: "shm fetch", peer: src, detail: e.to_string() }),
        }
        self.send_fin(src, tag)
    }

    /// Announce `len` bytes at `data` to `dst` (RTS) under a fresh offer; the job stays until
    /// `wait_send` or `cancel_send`. Waits (driving progress) while every offer slot to `dst`
    /// is taken.
    pub(super) fn announce(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()> {
        let ring = self.txa[dst].as_ref().expect("never sends to self");
        let backoff = crossbeam_utils::Backoff::new();
        let (k, gen) = loop {
            {
                let mut s = self.sends_lock();
                if let Some(k) = s.offers[dst].iter().position(|u| !u) {
                    s.offers[dst][k] = true;
                    s.offer_gens[dst][k] += 1;
                    let gen = s.offer_gens[dst][k];
                    let o = ring.offer(k);
                    o.addr.store(data as u64, Ordering::Relaxed);
                    o.len.store(len as u64, Ordering::Relaxed);
                    o.state.store(gen << 2 | O_OFFERED, Ordering::Release);
                    s.jobs.push(SendJob { dst, tag, data: data as usize, len, state: JobState::Announced { k, gen } });
                    self.sends_n.store(s.jobs.len(), Ordering::Release);
                    break (k, gen);
                }
            }
            self.poll()?;
            if let Some(e) = self.mb.lock().dead.get(&dst) {
                return Err(e.clone().with_op(w.op));
            }
            if Instant::now() >= w.deadline() {
                return Err(Error::Timeout { op: w.op, peer: dst, timeout: w.timeout });
            }
            backoff.snooze();
        };
        let rec = Rec { kind: RTS, round: tag.round, ctx: tag.ctx, seq: tag.seq, len: len as u64, addr: data as u64, id: slot_id(k, gen), ..Rec::zeroed() };
        if let Err(e) = self.push_wait(dst, &rec, &[], w) {
            self.finish_send(dst, tag);
            return Err(e);
        }
        Ok(())
    }

    /// Withdraw offer `k` (generation `gen`) to `dst`: a receiver that has not taken it never
    /// will, one copying it now discards what it read. A reader in this process (ranks as
    /// threads) reads our memory directly, so it is waited for (one copy).
    pub(super) fn withdraw_offer(&self, dst: usize, k: usize, gen: u64) {
        let o = self.txa[dst].as_ref().expect("never sends to self").offer(k);
        if self.pids[dst] != std::process::id() {
            o.state.store(gen << 2 | O_FREE, Ordering::Release);
            return;
        }
        loop {
            match o.state.compare_exchange(gen << 2 | O_OFFERED, gen << 2 | O_FREE, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(w) if w == gen << 2 | O_READING => std::hint::spin_loop(),
                Err(_) => return, // done, or another generation
            }
        }
    }

    /// Sender: write straight into the buffer `dst` advertised for `tag`. `Ok(false)`: no usable
    /// advertisement (not posted yet, or too small: the RTS path reports the overflow).
    pub(super) fn try_direct(&self, dst: usize, tag: Tag, data: *const u8, len: usize, after_rts: bool) -> Result<bool> {
        let Some((_, a, w, addr)) = self.claim_advert(dst, tag, len, false) else { return Ok(false) };
        let r = cma(self.pids[dst], data as *mut u8, addr, len, true);
        let flag = if after_rts { A_LEN_AFTER_RTS } else { 0 };
        a.len.store(if r.is_ok() { len as u64 | flag } else { A_LEN_FAILED }, Ordering::Relaxed);
        a.state.store((w & !3) | A_WRITTEN, Ordering::Release);
        self.ring_bell(dst, true);
        match r {
            Ok(()) => {
                self.mb.complete(dst, tag, Dir::Send, 0);
                Ok(true)
            }
            Err(e) => Err(Error::Io { op: "shm write", peer: dst, detail: e.to_string() }),
        }
    }

    /// Claim the advertisement `dst` made for `tag` (CAS `POSTED -> CLAIMED`), if there is one
    /// that holds `len` bytes (`short`: or a smaller one, whose receiver then reports the
    /// overflow): the slot's index, the slot, its state word before the claim and the buffer's
    /// address.
    pub(super) fn claim_advert(&self, dst: usize, tag: Tag, len: usize, short: bool) -> Option<(usize, &super::segment::Adv, u64, u64)> {
        let ring = self.txa[dst].as_ref().expect("never sends to self");
        for k in 0..ADV_SLOTS {
            let a = ring.adv(k);
            let w = a.state.load(Ordering::Acquire);
            let seen = AdvRead {
                state: w,
                ctx: a.ctx.load(Ordering::Relaxed),
                seq: a.seq.load(Ordering::Relaxed),
                round: a.round.load(Ordering::Relaxed),
                cap: a.cap.load(Ordering::Relaxed),
            };
            let addr = a.addr.load(Ordering::Relaxed);
            match usable(&seen, tag, len, short) {
                None => continue,
                Some(false) => return None,
                Some(true) => {}
            }
            // Claim: fails if the receiver revoked (or re-used) the slot since we read it, in
            // which case the fields read above may be stale and are not used.
            return a.state.compare_exchange(w, (w & !3) | A_CLAIMED, Ordering::AcqRel, Ordering::Relaxed).is_ok().then_some((k, a, w, addr));
        }
        None
    }

    /// Kill process `p`, which holds a write claim on our memory past the job's timeout, wait
    /// until it is gone, and fail this fabric for good.
    pub(super) fn fence(&self, p: usize, what: &str) {
        let pid = self.pids[p];
        let why = format!("rank {p} (pid {pid}) held a write into this rank's memory for longer than the timeout of {:?} ({what}): it was killed", self.timeout);
        tracing::error!("shm rank {}: {why}", self.rank);
        match &self.pidfds[p] {
            // SAFETY: a signal to the process our pidfd names (no pid reuse race).
            Some(fd) => unsafe {
                libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0);
            },
            // SAFETY: plain kill of a peer process.
            None => unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            },
        }
        let t0 = Instant::now();
        while alive(pid) && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if alive(pid) {
            tracing::error!("shm rank {}: rank {p} (pid {pid}) still runs 10 s after SIGKILL", self.rank);
        }
        self.fail_for_good(why);
    }
}

/// A pidfd for `pid` (Linux 5.3+), or `None`.
pub(super) fn pidfd(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open returns a new descriptor we own, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a fresh descriptor, owned from here on.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub(super) fn alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // A zombie (exited, not yet reaped) is dead too.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => r == 0,
    }
}

/// Whether this process may read process `pid`'s memory: reads the 8-byte probe word it
/// published (`addr` holding `value`) with `process_vm_readv`.
pub(super) fn probe(pid: u32, addr: u64, value: u64) -> std::io::Result<()> {
    let mut got = 0u64;
    cma(pid, &mut got as *mut u64 as *mut u8, addr, 8, false).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => std::io::Error::new(
            e.kind(),
            format!("{e} (ptrace rules forbid cross-memory attach, e.g. kernel.yama.ptrace_scope >= 1 or a container without CAP_SYS_PTRACE)"),
        ),
        _ => e,
    })?;
    match got == value {
        true => Ok(()),
        false => Err(std::io::Error::other(format!("read {got:#x} where the peer published {value:#x}"))),
    }
}

/// Copy `len` bytes between `local` in this process and `remote` in process `pid` with cross-memory
/// attach: `process_vm_writev` (local → remote) when `write`, else `process_vm_readv`.
///
/// Safety (of the callers): `local` is valid for `len` bytes (reads when writing: the caller's
/// send buffer, Fabric::send; writes when reading: inside the posted buffer, length checked);
/// the kernel validates `remote` against the peer's address space (len <= what it advertised).
fn cma(pid: u32, local: *mut u8, remote: u64, len: usize, write: bool) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        // SAFETY: done < len: inside the caller's buffer.
        let l = libc::iovec { iov_base: unsafe { local.add(done) } as *mut libc::c_void, iov_len: len - done };
        let r = libc::iovec { iov_base: (remote as usize + done) as *mut libc::c_void, iov_len: len - done };
        // SAFETY: see above.
        let n = unsafe {
            if write {
                libc::process_vm_writev(pid as libc::pid_t, &l, 1, &r, 1, 0)
            } else {
                libc::process_vm_readv(pid as libc::pid_t, &l, 1, &r, 1, 0)
            }
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if n == 0 {
            let call = if write { "process_vm_writev" } else { "process_vm_readv" };
            return Err(std::io::Error::other(format!("{call} made no progress")));
        }
        done += n as usize;
    }
    Ok(())
}
