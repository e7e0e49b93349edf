//! The collective algorithms, written once over the `Fabric` primitives (post, send, wait).
//!
//! All-to-all: post every receive, send to peers in a rank-dependent order (rank r starts with
//! r+1: no incast), copy the own block, wait. All-reduce = reduce-scatter + all-gather with one
//! owner per chunk that sums the contributions in rank order (bitwise identical everywhere).
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Tag, Wait};
use crate::reduce::{add_into, ReduceOp, Reducible};
use bytemuck::Pod;
use std::sync::Arc;
use std::time::Duration;

/// A communicator's view of the fabric: its members (world ranks), own index and context.
pub(crate) struct Group {
    pub fabric: Arc<dyn Fabric>,
    pub members: Vec<usize>,
    pub me: usize,
    pub ctx: u64,
    pub timeout: Duration,
}

impl Group {
    pub fn n(&self) -> usize {
        self.members.len()
    }
}

/// One round of one collective: posted receives and started sends, cancelled on early return.
struct Round<'a> {
    g: &'a Group,
    tag: Tag,
    w: Wait,
    /// (member, expected bytes, completed)
    recvs: Vec<(usize, usize, bool)>,
    sends: Vec<usize>,
    /// The buffers are memory the CPU must not touch (`post_recv_direct`, `send_direct`).
    direct: bool,
}

impl<'a> Round<'a> {
    fn new(g: &'a Group, seq: u64, round: u32, op: &'static str) -> Self {
        Round { g, tag: Tag { ctx: g.ctx, seq, round }, w: Wait::new(op, g.timeout), recvs: Vec::new(), sends: Vec::new(), direct: false }
    }

    /// Post the landing buffer for `from`'s message, which must be exactly `buf.len()` bytes.
    ///
    /// # Safety
    /// `buf` must stay alive and untouched until this round is finished or dropped.
    unsafe fn post(&mut self, from: usize, buf: *mut u8, len: usize) -> Result<()> {
        let (f, peer) = (&self.g.fabric, self.g.members[from]);
        match self.direct {
            false => f.post_recv(peer, self.tag, buf, len, &self.w)?,
            true => f.post_recv_direct(peer, self.tag, buf, len, &self.w)?,
        }
        self.recvs.push((from, len, false));
        Ok(())
    }

    /// # Safety
    /// `data` must stay alive until `finish` returned.
    unsafe fn send(&mut self, to: usize, data: *const u8, len: usize) -> Result<()> {
        let (f, peer) = (&self.g.fabric, self.g.members[to]);
        match self.direct {
            false => f.send(peer, self.tag, data, len, &self.w)?,
            true => f.send_direct(peer, self.tag, data, len, &self.w)?,
        }
        self.sends.push(to);
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        let f = &self.g.fabric;
        for &to in &self.sends {
            f.wait_send(self.g.members[to], self.tag, &self.w)?;
        }
        self.sends.clear();
        for i in 0..self.recvs.len() {
            let (from, want, _) = self.recvs[i];
            let peer = self.g.members[from];
            let got = f.wait_recv(peer, self.tag, &self.w)?;
            self.recvs[i].2 = true;
            if got != want {
                return Err(Error::Protocol {
                    op: self.w.op,
                    peer,
                    detail: format!("expected {want} bytes, got {got} (send and receive counts disagree)"),
                });
            }
        }
        Ok(())
    }
}

impl Drop for Round<'_> {
    fn drop(&mut self) {
        // Left early (an error): sends not waited for must not read their buffers later.
        for &to in &self.sends {
            self.g.fabric.cancel_send(self.g.members[to], self.tag);
        }
        for &(from, _, done) in &self.recvs {
            if !done {
                self.g.fabric.cancel_recv(self.g.members[from], self.tag);
            }
        }
    }
}

/// Prefix offsets of `counts` (n + 1 entries); a usage error when the sum overflows.
pub(crate) fn offsets(op: &'static str, what: &str, counts: &[usize]) -> Result<Vec<usize>> {
    let mut o = Vec::with_capacity(counts.len() + 1);
    let mut at = 0usize;
    o.push(at);
    for &c in counts {
        at = at.checked_add(c).ok_or_else(|| Error::usage(op, format!("{what}: counts overflow (their sum exceeds {})", usize::MAX)))?;
        o.push(at);
    }
    Ok(o)
}

/// `counts` scaled by `size` (elements to bytes); a usage error on overflow.
fn scaled(op: &'static str, counts: &[usize], size: usize) -> Result<Vec<usize>> {
    counts
        .iter()
        .map(|&c| c.checked_mul(size).ok_or_else(|| Error::usage(op, format!("count {c} of {size}-byte elements overflows"))))
        .collect()
}

/// Split `len` elements into `n` contiguous chunks, the first `len % n` one longer.
pub(crate) fn even_counts(len: usize, n: usize) -> Vec<usize> {
    (0..n).map(|i| len / n + usize::from(i < len % n)).collect()
}

fn check_counts(op: &'static str, what: &str, counts: &[usize], n: usize, total: usize) -> Result<Vec<usize>> {
    if counts.len() != n {
        return Err(Error::usage(op, format!("{what}: {} counts for {n} ranks", counts.len())));
    }
    let o = offsets(op, what, counts)?;
    if o[n] != total {
        return Err(Error::usage(op, format!("{what}: counts sum to {} but the buffer holds {total}", o[n])));
    }
    Ok(o)
}

pub(crate) fn all_to_all_v<T: Pod>(
    g: &Group,
    seq: u64,
    send: &[T],
    send_counts: &[usize],
    recv: &mut [T],
    recv_counts: &[usize],
) -> Result<()> {
    const OP: &str = "all_to_all_v";
    let (n, me) = (g.n(), g.me);
    check_counts(OP, "send", send_counts, n, send.len())?;
    check_counts(OP, "receive", recv_counts, n, recv.len())?;
    if send_counts[me] != recv_counts[me] {
        return Err(Error::usage(OP, format!("send count to self {} != receive count from self {}", send_counts[me], recv_counts[me])));
    }
    let sz = std::mem::size_of::<T>();
    let (sb, rb) = (scaled(OP, send_counts, sz)?, scaled(OP, recv_counts, sz)?);
    let own = |s: *const u8, d: *mut u8, len: usize| {
        // SAFETY: the own blocks, inside `send` and `recv` (checked above).
        unsafe { std::ptr::copy_nonoverlapping(s, d, len) };
        Ok(())
    };
    // SAFETY: every range lies inside `recv`/`send` (offsets checked above); both outlive the call.
    unsafe { a2a_bytes(g, seq, false, send.as_ptr() as *const u8, &sb, recv.as_mut_ptr() as *mut u8, &rb, own) }
}

/// The all-to-all of byte blocks at raw addresses; `direct`: the memory is the CPU's to never
/// touch, and `own(src, dst, len)` moves the own block. Counts whose sum overflows are an error.
///
/// # Safety
/// Both buffers hold the counts' sums of bytes and stay valid until this returns.
#[allow(clippy::too_many_arguments)]
unsafe fn a2a_bytes(
    g: &Group,
    seq: u64,
    direct: bool,
    sbase: *const u8,
    scounts: &[usize],
    rbase: *mut u8,
    rcounts: &[usize],
    own: impl FnOnce(*const u8, *mut u8, usize) -> Result<()>,
) -> Result<()> {
    let (n, me) = (g.n(), g.me);
    let (so, ro) = (offsets("all_to_all_v", "send", scounts)?, offsets("all_to_all_v", "receive", rcounts)?);
    let mut r = Round::new(g, seq, 0, "all_to_all_v");
    r.direct = direct;
    for i in 1..n {
        let p = (me + n - i) % n;
        r.post(p, rbase.add(ro[p]), rcounts[p])?;
    }
    for i in 1..n {
        let p = (me + i) % n;
        r.send(p, sbase.add(so[p]), scounts[p])?;
    }
    // The own block last: peers (shm: reading our buffer; tcp: receiving) start at once
    // instead of waiting for this copy.
    own(sbase.add(so[me]), rbase.add(ro[me]), scounts[me])?;
    r.finish()
}

/// All-to-all-v on memory the CPU must not touch (device memory, GPUDirect RDMA); counts in
/// bytes; `own(src, dst, len)` copies the own block (a device copy).
///
/// # Safety
/// `send` and `recv` hold the counts' sums of bytes and stay valid (and, for `send`, unchanged)
/// until this returns.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn all_to_all_v_direct(
    g: &Group,
    seq: u64,
    send: *const u8,
    send_counts: &[usize],
    recv: *mut u8,
    recv_counts: &[usize],
    own: impl FnOnce(*const u8, *mut u8, usize) -> Result<()>,
) -> Result<()> {
    const OP: &str = "all_to_all_v";
    let n = g.n();
    if send_counts.len() != n || recv_counts.len() != n {
        return Err(Error::usage(OP, format!("{} send and {} receive counts for {n} ranks", send_counts.len(), recv_counts.len())));
    }
    if send_counts[g.me] != recv_counts[g.me] {
        return Err(Error::usage(OP, format!("send count to self {} != receive count from self {}", send_counts[g.me], recv_counts[g.me])));
    }
    a2a_bytes(g, seq, true, send, send_counts, recv, recv_counts, own)
}

/// All-gather-v on memory the CPU must not touch: rank p's `counts[p]` bytes land at offset
/// Σ counts[..p] of `recv`; `own(src, dst, len)` copies this rank's block.
///
/// # Safety
/// `send` holds `counts[me]` bytes, `recv` their sum; both valid until this returns.
pub(crate) unsafe fn all_gather_v_direct(
    g: &Group,
    seq: u64,
    send: *const u8,
    counts: &[usize],
    recv: *mut u8,
    own: impl FnOnce(*const u8, *mut u8, usize) -> Result<()>,
) -> Result<()> {
    const OP: &str = "all_gather";
    if counts.len() != g.n() {
        return Err(Error::usage(OP, format!("{} counts for {} ranks", counts.len(), g.n())));
    }
    gather_bytes(g, seq, 0, OP, true, send, &offsets(OP, "receive", counts)?, recv, own)
}

/// Reduce-scatter: `data` holds every rank's chunk (offsets `o`); `out` receives this rank's
/// chunk, summed over ranks in rank order.
fn reduce_scatter_into<T: Reducible>(
    g: &Group,
    seq: u64,
    round: u32,
    op_name: &'static str,
    data: &[T],
    o: &[usize],
    out: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    let (n, me) = (g.n(), g.me);
    let mine = o[me + 1] - o[me];
    debug_assert_eq!(out.len(), mine);
    let sz = std::mem::size_of::<T>();
    let total = mine.checked_mul(n).filter(|t| t.checked_mul(sz).is_some_and(|b| b <= isize::MAX as usize));
    let total = total.ok_or_else(|| Error::usage(op_name, format!("{n} contributions of {mine} elements overflow")))?;
    let mut scratch: Vec<T> = vec![T::zeroed(); total];
    {
        let mut r = Round::new(g, seq, round, op_name);
        let sb = scratch.as_mut_ptr() as *mut u8;
        let db = data.as_ptr() as *const u8;
        // SAFETY: ranges inside `scratch` / `data`, which outlive `r`.
        unsafe {
            for i in 1..n {
                let p = (me + n - i) % n;
                r.post(p, sb.add(p * mine * sz), mine * sz)?;
            }
            for i in 1..n {
                let p = (me + i) % n;
                r.send(p, db.add(o[p] * sz), (o[p + 1] - o[p]) * sz)?;
            }
        }
        r.finish()?;
    }
    scratch[me * mine..(me + 1) * mine].copy_from_slice(&data[o[me]..o[me + 1]]);
    out.copy_from_slice(&scratch[..mine]);
    for p in 1..n {
        add_into(out, &scratch[p * mine..(p + 1) * mine]);
    }
    if op == ReduceOp::Mean {
        for x in out.iter_mut() {
            *x = x.div_n(n);
        }
    }
    Ok(())
}

/// All-gather: `mine` goes to `recv[o[me]..o[me+1]]` on every rank.
fn all_gather_into<T: Pod>(g: &Group, seq: u64, round: u32, op_name: &'static str, mine: &[T], o: &[usize], recv: &mut [T]) -> Result<()> {
    let ob = scaled(op_name, o, std::mem::size_of::<T>())?;
    let own = |s: *const u8, d: *mut u8, len: usize| {
        // SAFETY: `mine` into its own range of `recv` (offsets from checked counts).
        unsafe { std::ptr::copy_nonoverlapping(s, d, len) };
        Ok(())
    };
    // SAFETY: ranges inside `recv` and `mine`, which outlive the call.
    unsafe { gather_bytes(g, seq, round, op_name, false, mine.as_ptr() as *const u8, &ob, recv.as_mut_ptr() as *mut u8, own) }
}

/// All-gather of byte blocks: this rank's `o[me+1] - o[me]` bytes at `send` go to offset
/// `o[p]` of every rank p's `recv`; `own` places this rank's block first (it is never posted).
///
/// # Safety
/// `recv` holds `o[n]` bytes and `send` this rank's block; both valid until this returns.
#[allow(clippy::too_many_arguments)]
unsafe fn gather_bytes(
    g: &Group,
    seq: u64,
    round: u32,
    op_name: &'static str,
    direct: bool,
    send: *const u8,
    o: &[usize],
    recv: *mut u8,
    own: impl FnOnce(*const u8, *mut u8, usize) -> Result<()>,
) -> Result<()> {
    let (n, me) = (g.n(), g.me);
    let mine = o[me + 1] - o[me];
    own(send, recv.add(o[me]), mine)?;
    let mut r = Round::new(g, seq, round, op_name);
    r.direct = direct;
    for i in 1..n {
        let p = (me + n - i) % n;
        r.post(p, recv.add(o[p]), o[p + 1] - o[p])?;
    }
    for i in 1..n {
        let p = (me + i) % n;
        r.send(p, send, mine)?;
    }
    r.finish()
}

pub(crate) fn all_reduce<T: Reducible>(g: &Group, seq: u64, buf: &mut [T], op: ReduceOp) -> Result<()> {
    const OP: &str = "all_reduce";
    let n = g.n();
    if n == 1 {
        return Ok(()); // Mean over one rank is the identity too.
    }
    let o = offsets(OP, "chunk", &even_counts(buf.len(), n))?;
    let mut mine = vec![T::zeroed(); o[g.me + 1] - o[g.me]];
    reduce_scatter_into(g, seq, 0, OP, buf, &o, &mut mine, op)?;
    all_gather_into(g, seq, 1, OP, &mine, &o, buf)
}

pub(crate) fn reduce_scatter_v<T: Reducible>(g: &Group, seq: u64, send: &[T], counts: &[usize], recv: &mut [T], op: ReduceOp) -> Result<()> {
    const OP: &str = "reduce_scatter";
    let o = check_counts(OP, "send", counts, g.n(), send.len())?;
    if recv.len() != counts[g.me] {
        return Err(Error::usage(OP, format!("receive buffer holds {} but this rank's count is {}", recv.len(), counts[g.me])));
    }
    reduce_scatter_into(g, seq, 0, OP, send, &o, recv, op)
}

pub(crate) fn all_gather_v<T: Pod>(g: &Group, seq: u64, send: &[T], counts: &[usize], recv: &mut [T]) -> Result<()> {
    const OP: &str = "all_gather";
    let o = check_counts(OP, "receive", counts, g.n(), recv.len())?;
    if send.len() != counts[g.me] {
        return Err(Error::usage(OP, format!("send buffer holds {} but this rank's count is {}", send.len(), counts[g.me])));
    }
    all_gather_into(g, seq, 0, OP, send, &o, recv)
}

pub(crate) fn broadcast<T: Pod>(g: &Group, seq: u64, buf: &mut [T], root: usize) -> Result<()> {
    const OP: &str = "broadcast";
    let (n, me) = (g.n(), g.me);
    if root >= n {
        return Err(Error::usage(OP, format!("root {root} out of range for {n} ranks")));
    }
    let bytes = std::mem::size_of_val(buf);
    let mut r = Round::new(g, seq, 0, OP);
    // SAFETY: `buf` outlives `r`.
    unsafe {
        if me == root {
            for i in 1..n {
                r.send((me + i) % n, buf.as_ptr() as *const u8, bytes)?;
            }
        } else {
            r.post(root, buf.as_mut_ptr() as *mut u8, bytes)?;
        }
    }
    r.finish()
}

pub(crate) fn barrier(g: &Group, seq: u64) -> Result<()> {
    let n = g.n();
    let zeros = vec![0usize; n];
    all_to_all_v::<u8>(g, seq, &[], &zeros, &mut [], &zeros).map_err(|e| e.with_op("barrier"))
}
