//! The large-message path by cross-memory attach: the receiver's one-copy fetch of an
//! announced (RTS) message with process_vm_readv, the sender's claim (CAS POSTED -> CLAIMED)
//! of an advertised buffer and its process_vm_writev into it, the announced sends still
//! looking for an advertisement, and the process liveness check.
use super::segment::{ADV_SLOTS, A_CLAIMED, A_LEN_AFTER_RTS, A_LEN_FAILED, A_POSTED, A_WRITTEN};
use super::{stat, ShmFabric};
use crate::error::{Error, Result};
use crate::fabric::Tag;
use crate::mailbox::Dir;
use std::sync::atomic::Ordering;

impl ShmFabric {
    /// Copy `len` bytes at `addr` in rank `src` into `buf` (one copy), then release the sender.
    pub(super) fn fetch(&self, src: usize, tag: Tag, addr: u64, buf: *mut u8, len: usize) -> Result<()> {
        let pid = self.pids[src];
        let r = if pid == std::process::id() {
            // Same process (ranks as threads): the sender's buffer is in our address space.
            // SAFETY: the sender keeps it alive until our FIN; len was checked against the post.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf, len) };
            Ok(())
        } else {
            cma(pid, buf, addr, len, false)
        };
        match r {
            Ok(()) => self.mb.complete(src, tag, Dir::Recv, len),
            Err(e) => self.mb.fail(src, tag, Dir::Recv, Error::Io { op: "shm fetch", peer: src, detail: e.to_string() }),
        }
        self.send_fin(src, tag)
    }

    pub(super) fn forget_rts(&self, dst: usize, tag: Tag) {
        if self.rts_n.load(Ordering::Acquire) == 0 {
            return; // nothing queued (entries are only added by this thread's `send`, or gone)
        }
        let mut out = self.rts_out.lock().unwrap_or_else(|e| e.into_inner());
        out.retain(|&(d, t, _, _)| (d, t) != (dst, tag));
        self.rts_n.store(out.len(), Ordering::Release);
    }

    /// Sender: write straight into the buffer `dst` advertised for `tag`. `Ok(false)`: no usable
    /// advertisement (not posted yet, or too small: the RTS path reports the overflow).
    pub(super) fn try_direct(&self, dst: usize, tag: Tag, data: *const u8, len: usize, after_rts: bool) -> Result<bool> {
        let ring = self.txa[dst].as_ref().expect("never sends to self");
        for k in 0..ADV_SLOTS {
            let a = ring.adv(k);
            let w = a.state.load(Ordering::Acquire);
            if w & 3 != A_POSTED
                || a.ctx.load(Ordering::Relaxed) != tag.ctx
                || a.seq.load(Ordering::Relaxed) != tag.seq
                || a.round.load(Ordering::Relaxed) != tag.round as u64
            {
                continue;
            }
            let (addr, cap) = (a.addr.load(Ordering::Relaxed), a.cap.load(Ordering::Relaxed));
            if len as u64 > cap {
                return Ok(false);
            }
            // Claim: fails if the receiver revoked (or re-used) the slot since we read it, in
            // which case the fields read above may be stale and are not used.
            if a.state.compare_exchange(w, (w & !3) | A_CLAIMED, Ordering::AcqRel, Ordering::Relaxed).is_err() {
                return Ok(false);
            }
            let r = cma(self.pids[dst], data as *mut u8, addr, len, true);
            let flag = if after_rts { A_LEN_AFTER_RTS } else { 0 };
            a.len.store(if r.is_ok() { len as u64 | flag } else { A_LEN_FAILED }, Ordering::Relaxed);
            a.state.store((w & !3) | A_WRITTEN, Ordering::Release);
            return match r {
                Ok(()) => {
                    self.mb.complete(dst, tag, Dir::Send, 0);
                    Ok(true)
                }
                Err(e) => Err(Error::Io { op: "shm write", peer: dst, detail: e.to_string() }),
            };
        }
        Ok(false)
    }

    /// Announced sends whose receiver has advertised its buffer meanwhile: write them now (the
    /// waiting sender's core is idle; the receiver would copy only once it polls).
    pub(super) fn retry_rts_out(&self) {
        if self.rts_n.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut out = self.rts_out.lock().unwrap_or_else(|e| e.into_inner());
        out.retain(|&(dst, tag, data, len)| match self.try_direct(dst, tag, data as *const u8, len, true) {
            Ok(true) => {
                stat(2);
                false
            }
            Ok(false) => true,
            Err(e) => {
                self.mb.fail(dst, tag, Dir::Send, e);
                false
            }
        });
        self.rts_n.store(out.len(), Ordering::Release);
    }
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

/// Copy `len` bytes between `local` in this process and `remote` in process `pid` with cross-memory
/// attach: `process_vm_writev` (local → remote) when `write`, else `process_vm_readv`.
///
/// Safety (of the callers): `local` is valid for `len` bytes (reads when writing: the caller's
/// send buffer, Fabric::send; writes when reading: inside the posted buffer, length checked);
/// the kernel validates `remote` against the peer's address space (len <= what it advertised).
fn cma(pid: u32, local: *mut u8, remote: u64, len: usize, write: bool) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
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
