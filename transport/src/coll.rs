//! The collective algorithms, written once over the `Fabric` primitives (post, send, wait) and
//! over [`Memory`], where the bytes live; and point-to-point messages, one round of one message.
//!
//! All-to-all: post every receive, send to peers in a rank-dependent order (rank r starts with
//! r+1: no incast), copy the own block, wait. All-reduce = reduce-scatter + all-gather with one
//! owner per chunk that reduces the contributions in rank order (bitwise identical everywhere).
//!
//! The algorithms move byte blocks at addresses. Host memory ([`Host`], the typed slices of
//! `Comm`'s collectives) is copied and reduced by the CPU; memory the CPU must not touch (device
//! memory) is moved by the fabric's direct primitives, and copied and reduced by hooks its owner
//! supplies (a backend's device copy and summation kernel). A new memory kind implements
//! [`Memory`]; a new transport implements `Fabric`; neither touches the algorithms.
use crate::error::{Error, Result};
use crate::fabric::{Fabric, Sent, Tag, Wait};
use crate::reduce::{reduce_f32_mean_in_f64, reduce_host, ReduceOp, Reducible};
use bytemuck::Pod;
use smallvec::SmallVec;
use std::sync::Arc;
use std::time::Duration;

/// Where a collective's bytes live, and what a collective does to them besides sending them:
/// copy this rank's own block, take scratch space, reduce the contributions.
pub trait Memory {
    /// Scratch space of this memory kind, released when dropped.
    type Scratch;
    /// Whether the fabric must move these bytes with its direct primitives (`post_recv_direct`,
    /// `send_direct`): the CPU never reads or writes them.
    fn direct(&self) -> bool;
    /// Scratch of `len` bytes (contents unspecified), aligned for the element type.
    fn scratch(&self, len: usize) -> Result<Self::Scratch>;
    /// Address of a scratch's first byte.
    fn base(&self, s: &mut Self::Scratch) -> *mut u8;
    /// Copy `len` bytes from `src` to `dst`, finished when this returns.
    ///
    /// # Safety
    /// `src..+len` is readable and `dst..+len` writable memory of this kind; they do not overlap.
    unsafe fn copy(&self, src: *const u8, dst: *mut u8, len: usize) -> Result<()>;
    /// `out = reduce(parts[0], ..., parts[n-1])` element by element, where `parts[p]` is the
    /// `len` bytes at `parts + p·len`: the contributions of ranks 0..n, combined in that order
    /// (the order fixes the result bitwise; the element type and the precision of the sum are the
    /// implementation's). Finished when this returns.
    ///
    /// # Safety
    /// `parts..+n·len` is readable and `out..+len` writable memory of this kind; they do not overlap.
    unsafe fn reduce(&self, parts: *const u8, n: usize, len: usize, out: *mut u8) -> Result<()>;
    /// [`Memory::reduce`] where contribution `own` is not at `parts + own·len` but is `out`
    /// itself: `out` becomes the reduction of the n contributions, in rank order, in place. The
    /// default copies `out` into that slot and reduces; a memory whose reduction can read `out`
    /// element by element before writing it overrides it and saves the copy.
    ///
    /// # Safety
    /// `parts..+n·len` is writable and `out..+len` writable memory of this kind; they do not
    /// overlap; `own < n`.
    unsafe fn reduce_in_place(&self, parts: *mut u8, n: usize, len: usize, own: usize, out: *mut u8) -> Result<()> {
        // SAFETY: slot `own` lies inside `parts..+n·len` (own < n), which does not overlap
        // `out..+len` (this function's contract): `copy`'s and then `reduce`'s contracts.
        unsafe {
            self.copy(out, parts.add(own * len), len)?;
            self.reduce(parts, n, len, out)
        }
    }
}

/// Host memory holding `T`s: the CPU copies, and reduces (where a reduction was asked for)
/// with `op` in `T`'s own arithmetic.
pub struct Host<T> {
    reduce: Option<(ReduceOp, HostReduce)>,
    _t: std::marker::PhantomData<T>,
}

/// A typed host reduction: `(parts, n, len, own, out, op)` as in [`Memory::reduce`], or, with
/// `own = Some(q)`, as in [`Memory::reduce_in_place`] (contribution q is `out`).
type HostReduce = unsafe fn(*const u8, usize, usize, Option<usize>, *mut u8, ReduceOp);

impl<T: Pod> Host<T> {
    /// Host memory that collectives only move.
    pub fn new() -> Self {
        Host { reduce: None, _t: std::marker::PhantomData }
    }
}

impl<T: Pod> Default for Host<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Reducible> Host<T> {
    /// Host memory that reductions combine with `op`.
    pub fn reducing(op: ReduceOp) -> Self {
        Host { reduce: Some((op, reduce_host::<T>)), _t: std::marker::PhantomData }
    }
}

impl Host<f32> {
    /// Host f32s whose reduction is the mean summed in f64: the contributions widened to f64,
    /// added in rank order, divided, rounded once to f32 — bitwise the f64 mean of the same
    /// values, moving 4 bytes a value instead of 8 (replica sync).
    pub fn mean_in_f64() -> Self {
        Host { reduce: Some((ReduceOp::Mean, reduce_f32_mean_in_f64)), _t: std::marker::PhantomData }
    }
}

impl<T: Pod> Memory for Host<T> {
    /// Left uninitialised: the collectives write every scratch byte (a receive or a copy)
    /// before they read it, so zeroing it first would be a wasted pass over memory.
    type Scratch = Vec<std::mem::MaybeUninit<T>>;
    fn direct(&self) -> bool {
        false
    }
    fn scratch(&self, len: usize) -> Result<Self::Scratch> {
        let mut v = Vec::new();
        let n = len / std::mem::size_of::<T>();
        v.try_reserve_exact(n).map_err(|_| Error::usage("collective", format!("no memory for {len} bytes of scratch")))?;
        v.resize_with(n, std::mem::MaybeUninit::uninit);
        Ok(v)
    }
    fn base(&self, s: &mut Self::Scratch) -> *mut u8 {
        s.as_mut_ptr() as *mut u8
    }
    unsafe fn copy(&self, src: *const u8, dst: *mut u8, len: usize) -> Result<()> {
        // SAFETY: the caller guarantees (`Memory::copy`'s contract) `src..+len` readable and
        // `dst..+len` writable host memory that do not overlap: what `copy_nonoverlapping` needs.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        Ok(())
    }
    unsafe fn reduce(&self, parts: *const u8, n: usize, len: usize, out: *mut u8) -> Result<()> {
        let (op, f) = self.reduce.ok_or_else(|| Error::usage("collective", "host memory without a reduction".to_string()))?;
        // SAFETY: `f` is `reduce_host::<T>` or, for f32, `reduce_f32_mean_in_f64` (set by the
        // constructors with a reduction); the caller guarantees (`Memory::reduce`'s contract)
        // `parts..+n·len` readable and `out..+len` writable, not overlapping, of this memory's
        // kind: host memory holding `T`s, so whole `T`-aligned `T`s, as `reduce_tiles` requires.
        unsafe { f(parts, n, len, None, out, op) };
        Ok(())
    }
    unsafe fn reduce_in_place(&self, parts: *mut u8, n: usize, len: usize, own: usize, out: *mut u8) -> Result<()> {
        let (op, f) = self.reduce.ok_or_else(|| Error::usage("collective", "host memory without a reduction".to_string()))?;
        // SAFETY: as in `reduce`, with contribution `own` (< n, this function's contract) read
        // from `out`, readable and writable host `T`s not overlapping `parts`.
        unsafe { f(parts, n, len, Some(own), out, op) };
        Ok(())
    }
}

/// Memory the CPU must not touch whose own-block copy is `own(src, dst, len)` and that has no
/// scratch and no reduction (the all-to-all and all-gather of `Comm::*_direct`).
pub(crate) struct CopyOnly<F>(std::cell::Cell<Option<F>>);

impl<F> CopyOnly<F> {
    pub fn new(own: F) -> Self {
        CopyOnly(std::cell::Cell::new(Some(own)))
    }
}

impl<F: FnOnce(*const u8, *mut u8, usize) -> Result<()>> Memory for CopyOnly<F> {
    type Scratch = ();
    fn direct(&self) -> bool {
        true
    }
    fn scratch(&self, _len: usize) -> Result<()> {
        Err(Error::usage("collective", "this memory has no scratch space"))
    }
    fn base(&self, _s: &mut ()) -> *mut u8 {
        std::ptr::null_mut()
    }
    unsafe fn copy(&self, src: *const u8, dst: *mut u8, len: usize) -> Result<()> {
        let own = self.0.take().ok_or_else(|| Error::usage("collective", "the own-block copy ran twice"))?;
        own(src, dst, len)
    }
    unsafe fn reduce(&self, _parts: *const u8, _n: usize, _len: usize, _out: *mut u8) -> Result<()> {
        Err(Error::usage("collective", "this memory has no reduction"))
    }
}

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

/// Per-rank values of one collective (offsets, byte counts, a round's messages): inline up to
/// 8 ranks (9 offsets), so a collective on a small group allocates nothing for them.
pub(crate) type PerRank<T> = SmallVec<[T; 9]>;

/// One round of one collective: posted receives and started sends, cancelled on early return.
struct Round<'a> {
    g: &'a Group,
    tag: Tag,
    w: Wait,
    /// (member, expected bytes, completed)
    recvs: PerRank<(usize, usize, bool)>,
    sends: PerRank<usize>,
    /// The buffers are memory the CPU must not touch (`post_recv_direct`, `send_direct`).
    direct: bool,
}

impl<'a> Round<'a> {
    fn new(g: &'a Group, seq: u64, round: u32, op: &'static str, direct: bool) -> Self {
        Self::tagged(g, Tag { ctx: g.ctx, seq, round }, op, direct)
    }

    fn tagged(g: &'a Group, tag: Tag, op: &'static str, direct: bool) -> Self {
        Round { g, tag, w: Wait::new(op, g.timeout), recvs: PerRank::new(), sends: PerRank::new(), direct }
    }

    /// Post the landing buffer for `from`'s message, which must be exactly `buf.len()` bytes.
    ///
    /// # Safety
    /// `buf` must stay alive and untouched until this round is finished or dropped.
    unsafe fn post(&mut self, from: usize, buf: *mut u8, len: usize) -> Result<()> {
        let (f, peer) = (&self.g.fabric, self.g.members[from]);
        // SAFETY: the caller keeps `buf..+len` alive and untouched until this round is finished
        // or dropped (this function's contract); `finish` returns only after `wait_recv` returned
        // `Ok` for every posted receive, and `drop` calls `cancel_recv` for each one not
        // completed, so the buffer outlives the fabric's use of it, as `post_recv` (and
        // `post_recv_direct`, the same contract) requires.
        unsafe {
            match self.direct {
                false => f.post_recv(peer, self.tag, buf, len, &self.w)?,
                true => f.post_recv_direct(peer, self.tag, buf, len, &self.w)?,
            }
        }
        self.recvs.push((from, len, false));
        Ok(())
    }

    /// # Safety
    /// `data` must stay alive until `finish` returned.
    unsafe fn send(&mut self, to: usize, data: *const u8, len: usize) -> Result<()> {
        let (f, peer) = (&self.g.fabric, self.g.members[to]);
        // SAFETY: the caller keeps `data..+len` alive until `finish` returned (this function's
        // contract), and `finish` returns only after `wait_send` returned for every pending send
        // (one reported `Sent::Done` is read no more); a round left early calls `cancel_send` for
        // each pending one in `drop`, after which the fabric reads no byte of it. That is
        // `send_now`'s (and `send_direct`'s) contract.
        let sent = unsafe {
            match self.direct {
                false => f.send_now(peer, self.tag, data, len, &self.w)?,
                true => f.send_direct(peer, self.tag, data, len, &self.w).map(|()| Sent::Pending)?,
            }
        };
        // A message already copied out has nothing to wait for or cancel.
        if sent == Sent::Pending {
            self.sends.push(to);
        }
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
pub(crate) fn offsets(op: &'static str, what: &str, counts: &[usize]) -> Result<PerRank<usize>> {
    let mut o: PerRank<usize> = smallvec::smallvec![0; counts.len() + 1];
    for (i, &c) in counts.iter().enumerate() {
        o[i + 1] = o[i].checked_add(c).ok_or_else(|| Error::usage(op, format!("{what}: counts overflow (their sum exceeds {})", usize::MAX)))?;
    }
    Ok(o)
}

/// `counts` scaled by `size` (elements to bytes); a usage error on overflow.
fn scaled(op: &'static str, counts: &[usize], size: usize) -> Result<PerRank<usize>> {
    let mut b: PerRank<usize> = smallvec::smallvec![0; counts.len()];
    for (b, &c) in b.iter_mut().zip(counts) {
        *b = c.checked_mul(size).ok_or_else(|| Error::usage(op, format!("count {c} of {size}-byte elements overflows")))?;
    }
    Ok(b)
}

/// Split `len` elements into `n` contiguous chunks, the first `len % n` one longer.
pub(crate) fn even_counts(len: usize, n: usize) -> PerRank<usize> {
    (0..n).map(|i| len / n + usize::from(i < len % n)).collect()
}

/// The sum of `counts`; a usage error naming `what` when it overflows.
fn counts_sum(op: &'static str, what: &str, counts: &[usize]) -> Result<usize> {
    crate::limits::checked_sum(counts).ok_or_else(|| Error::usage(op, format!("{what}: counts overflow (their sum exceeds {})", usize::MAX)))
}

fn check_counts(op: &'static str, what: &str, counts: &[usize], n: usize, total: usize) -> Result<()> {
    if counts.len() != n {
        return Err(Error::usage(op, format!("{what}: {} counts for {n} ranks", counts.len())));
    }
    let sum = counts_sum(op, what, counts)?;
    if sum != total {
        return Err(Error::usage(op, format!("{what}: counts sum to {sum} but the buffer holds {total}")));
    }
    Ok(())
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
    let n = g.n();
    check_counts(OP, "send", send_counts, n, send.len())?;
    check_counts(OP, "receive", recv_counts, n, recv.len())?;
    // SAFETY: the counts (checked above) sum to exactly the lengths of `send` and `recv`, so
    // with `T`'s size as the element size both hold the counts' sums of elements; they are host
    // memory holding `T`s (`Host<T>`'s kind), borrowed (`send` shared, so unchanged; `recv`
    // exclusively, so untouched by others and not overlapping `send`) for the whole call.
    unsafe { all_to_all_v_in(g, seq, &Host::<T>::new(), send.as_ptr() as *const u8, send_counts, recv.as_mut_ptr() as *mut u8, recv_counts, std::mem::size_of::<T>()) }
}

/// All-to-all-v in memory `mem` of blocks of `counts[p]` elements of `elem` bytes (byte blocks
/// with `elem` 1): `send_counts[p]` elements at `send` (in rank order) go to rank p,
/// `recv_counts[p]` elements from rank p land at `recv` (in rank order). Each block's offset is
/// a running sum, so nothing is allocated: a small all-to-all's whole cost is its messages.
///
/// # Safety
/// `send` and `recv` hold the counts' sums of elements of `mem`'s kind and stay valid (and,
/// for `send`, unchanged) until this returns.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn all_to_all_v_in<M: Memory>(
    g: &Group,
    seq: u64,
    mem: &M,
    send: *const u8,
    send_counts: &[usize],
    recv: *mut u8,
    recv_counts: &[usize],
    elem: usize,
) -> Result<()> {
    const OP: &str = "all_to_all_v";
    let (n, me) = (g.n(), g.me);
    if send_counts.len() != n || recv_counts.len() != n {
        return Err(Error::usage(OP, format!("{} send and {} receive counts for {n} ranks", send_counts.len(), recv_counts.len())));
    }
    if send_counts[me] != recv_counts[me] {
        return Err(Error::usage(OP, format!("send count to self {} != receive count from self {}", send_counts[me], recv_counts[me])));
    }
    // Checked once here: every partial sum below is at most its total, so none overflows.
    let bytes = |what: &str, counts: &[usize]| {
        counts_sum(OP, what, counts)?.checked_mul(elem).ok_or_else(|| {
            Error::usage(OP, format!("{what}: counts overflow (their sum of {elem}-byte elements exceeds {} bytes)", usize::MAX))
        })
    };
    let recv_total = bytes("receive", recv_counts)?;
    bytes("send", send_counts)?;
    let (own_send, own_recv) = (send_counts[..me].iter().sum::<usize>() * elem, recv_counts[..me].iter().sum::<usize>() * elem);
    let mut r = Round::new(g, seq, 0, OP, mem.direct());
    // SAFETY: the caller guarantees (this function's contract) that `send` and `recv` hold the
    // counts' sums of elements of `mem`'s kind, valid until this returns; block p lies at the
    // sum of the counts before p (times `elem`: the running offsets below, checked sums) and
    // ends inside them. `r` is finished or dropped before this returns, so the posted and sent
    // blocks outlive the round (`post`, `send`). The own-block copy's ranges do not overlap:
    // `recv` is written while `send` stays unchanged (contract).
    unsafe {
        // From me - 1 down, wrapping to n - 1: each block starts at the next one's start minus
        // its own length.
        let mut at = own_recv;
        for i in 1..n {
            let p = (me + n - i) % n;
            let len = recv_counts[p] * elem;
            at = (if p == n - 1 { recv_total } else { at }) - len;
            r.post(p, recv.add(at), len)?;
        }
        // From me + 1 up, wrapping to 0.
        let mut at = own_send + send_counts[me] * elem;
        for i in 1..n {
            let p = (me + i) % n;
            if p == 0 {
                at = 0;
            }
            let len = send_counts[p] * elem;
            r.send(p, send.add(at), len)?;
            at += len;
        }
        // The own block last: peers (shm: reading our buffer; tcp: receiving) start at once
        // instead of waiting for this copy.
        mem.copy(send.add(own_send), recv.add(own_recv), send_counts[me] * elem)?;
    }
    r.finish()
}

/// All-gather-v of byte blocks in memory `mem`: rank p's `counts[p]` bytes land at offset
/// Σ counts[..p] of every rank's `recv`.
///
/// # Safety
/// `send` holds `counts[me]` bytes, `recv` their sum, of `mem`'s kind; both valid (and `send`
/// unchanged) until this returns.
pub(crate) unsafe fn all_gather_v_in<M: Memory>(g: &Group, seq: u64, mem: &M, send: *const u8, counts: &[usize], recv: *mut u8) -> Result<()> {
    const OP: &str = "all_gather";
    if counts.len() != g.n() {
        return Err(Error::usage(OP, format!("{} counts for {} ranks", counts.len(), g.n())));
    }
    // SAFETY: with o the prefix sums of `counts`, the caller guarantees (this function's
    // contract) `recv` holds o[n] bytes and `send` this rank's block of o[me+1] - o[me] =
    // counts[me] bytes, unchanged and valid until this returns: `gather_bytes`'s contract.
    unsafe { gather_bytes(g, seq, 0, OP, mem, send, &offsets(OP, "receive", counts)?, recv) }
}

/// Reduce-scatter of byte blocks in memory `mem`: rank p's block q (`counts[q]` bytes at offset
/// Σ counts[..q] of its `send`) goes to rank q, which reduces the n blocks in rank order into
/// `recv` (`counts[me]` bytes).
///
/// # Safety
/// `send` holds the counts' sum of bytes, `recv` `counts[me]`, of `mem`'s kind; both valid (and
/// `send` unchanged) until this returns.
pub(crate) unsafe fn reduce_scatter_v_in<M: Memory>(g: &Group, seq: u64, mem: &M, send: *const u8, counts: &[usize], recv: *mut u8) -> Result<()> {
    const OP: &str = "reduce_scatter";
    if counts.len() != g.n() {
        return Err(Error::usage(OP, format!("{} counts for {} ranks", counts.len(), g.n())));
    }
    // SAFETY: with o the prefix sums of `counts`, the caller guarantees (this function's
    // contract) `send` holds o[n] bytes and `recv` this rank's chunk of counts[me] bytes, valid
    // (and `send` unchanged) until this returns: `reduce_scatter_bytes`'s contract.
    unsafe { reduce_scatter_bytes(g, seq, 0, OP, mem, send, &offsets(OP, "send", counts)?, recv) }
}

/// All-reduces that send at most this many bytes per rank ((n − 1) · buffer) take one round
/// (every rank gathers every contribution and reduces them itself) instead of reduce-scatter +
/// all-gather: half the synchronous rounds where latency, not bandwidth, bounds them.
const SMALL_ALL_REDUCE: usize = 32 << 10;

/// The segment of a large all-reduce's reduce-scatter, bytes: each round moves one segment of
/// every chunk, so the n contributions a rank reduces are still in its cache when it reduces
/// them, and the next segment travels while it does.
const SEGMENT: usize = 256 << 10;

/// A large all-reduce's segment, bytes, when its largest chunk is `largest` bytes of `elem`-byte
/// elements: whole elements, at most [`SEGMENT`] and at most the chunk (the scratch is sized by
/// it); the whole chunk for memory the CPU must not touch (`direct`: its copies and sums are
/// kernel launches).
fn segment_bytes(largest: usize, elem: usize, direct: bool) -> usize {
    if direct { largest } else { ((SEGMENT / elem).max(1) * elem).min(largest) }.max(1)
}

/// The scratch of a segmented all-reduce: two sets (one when there is one round) of n segments.
fn segmented_scratch(n: usize, seg: usize, rounds: usize) -> Option<usize> {
    n.checked_mul(seg)?.checked_mul(rounds.min(2)).filter(|&t| t <= isize::MAX as usize)
}

/// Bytes of scratch [`Comm::all_reduce_in`](crate::Comm::all_reduce_in) (and so
/// `Comm::all_reduce`) allocates for `count` elements of `elem` bytes over `n` ranks, in host
/// memory (`direct` false) or in memory the CPU must not touch (`direct` true), besides the
/// buffer itself: for memory planners. `None` when the sizes overflow.
pub fn all_reduce_scratch_bytes(count: usize, elem: usize, n: usize, direct: bool) -> Option<usize> {
    if n <= 1 {
        return Some(0);
    }
    let bytes = count.checked_mul(elem)?;
    if (n - 1).saturating_mul(bytes) <= SMALL_ALL_REDUCE {
        return n.checked_mul(bytes);
    }
    let largest = count.div_ceil(n).checked_mul(elem)?;
    let seg = segment_bytes(largest, elem, direct);
    segmented_scratch(n, seg, largest.div_ceil(seg))
}

/// All-reduce in place of `count` elements of `elem` bytes at `buf`, in memory `mem`:
/// reduce-scatter of even chunks (whole elements), then all-gather; small ones in one round
/// ([`SMALL_ALL_REDUCE`]).
///
/// The reduce-scatter runs in rounds of one [`SEGMENT`] per chunk (host memory; memory the CPU
/// must not touch in one round, its hooks being kernel launches), double-buffered: the next
/// round's receives are posted and its sends started before this round's segment is reduced.
/// Each chunk's owner reduces its segment straight into its own chunk of `buf`, which the
/// all-gather then sends from: no chunk-sized scratch, no copy of the result.
///
/// # Safety
/// `buf` holds `count · elem` bytes of `mem`'s kind, valid and untouched by others until this returns.
pub(crate) unsafe fn all_reduce_in<M: Memory>(g: &Group, seq: u64, mem: &M, buf: *mut u8, count: usize, elem: usize) -> Result<()> {
    const OP: &str = "all_reduce";
    let (n, me) = (g.n(), g.me);
    if n == 1 {
        return Ok(()); // Mean over one rank is the identity too.
    }
    let bytes = count.checked_mul(elem).ok_or_else(|| Error::usage(OP, format!("{count} elements of {elem} bytes overflow")))?;
    if (n - 1).saturating_mul(bytes) <= SMALL_ALL_REDUCE {
        // One round instead of two: every rank gathers every whole contribution and reduces
        // them in rank order itself (the same reduction as a chunk's owner: bitwise the same
        // result on every rank and as the two-round form).
        let o: PerRank<usize> = (0..=n).map(|p| p * bytes).collect();
        let mut all = mem.scratch(o[n])?;
        let ap = mem.base(&mut all);
        // SAFETY: `buf` holds `bytes` bytes (this function's contract), this rank's whole
        // contribution, unchanged while the gather reads it; `all` is scratch of this memory's
        // kind holding o[n] = n·bytes bytes, disjoint from `buf`, alive until the end of this
        // block. The reduction reads the n slots of `all` and writes `buf` after the gather
        // finished: the ranges do not overlap.
        unsafe {
            gather_bytes(g, seq, 0, OP, mem, buf, &o, ap)?;
            return mem.reduce(ap, n, bytes, buf);
        }
    }
    let o = scaled(OP, &offsets(OP, "chunk", &even_counts(count, n))?, elem)?;
    let largest = (0..n).map(|p| o[p + 1] - o[p]).max().unwrap_or(0);
    let seg = segment_bytes(largest, elem, mem.direct());
    let rounds = largest.div_ceil(seg);
    // Segment k of chunk q: (offset in `buf`, length).
    let part = |q: usize, k: usize| {
        let at = (k * seg).min(o[q + 1] - o[q]);
        (o[q] + at, (o[q + 1] - o[q] - at).min(seg))
    };
    let slots = segmented_scratch(n, seg, rounds).ok_or_else(|| Error::usage(OP, format!("{n} contributions of {seg} bytes overflow")))?;
    let mut scratch = mem.scratch(slots)?;
    let sb = mem.base(&mut scratch);
    // Round k: post this rank's segment k from every peer into slot set k % 2, send every
    // peer its segment k. Tag rounds 1.. (the all-gather is round 0).
    let start = |k: usize| -> Result<Round<'_>> {
        let round = u32::try_from(k + 1).map_err(|_| Error::usage(OP, format!("{rounds} segments exceed the round numbers")))?;
        let mut r = Round::new(g, seq, round, OP, mem.direct());
        let (_, len) = part(me, k);
        let set = (k % 2) * n * seg;
        // SAFETY: slot p of set k % 2 lies at set + p·len..+len <= (k % 2 + 1)·n·seg, inside
        // `scratch` (n·seg bytes per set, min(rounds, 2) sets); segment k of chunk p lies
        // inside chunk p of `buf` (`part`), which holds o[n] bytes (this function's contract).
        // Both outlive the round, finished or dropped before this function returns.
        unsafe {
            if len > 0 {
                for i in 1..n {
                    let p = (me + n - i) % n;
                    r.post(p, sb.add(set + p * len), len)?;
                }
            }
            for i in 1..n {
                let p = (me + i) % n;
                let (at, l) = part(p, k);
                if l > 0 {
                    r.send(p, buf.add(at), l)?;
                }
            }
        }
        Ok(r)
    };
    let mut cur = if rounds > 0 { Some(start(0)?) } else { None };
    for k in 0..rounds {
        let next = if k + 1 < rounds { Some(start(k + 1)?) } else { None };
        if let Some(r) = cur.take() {
            r.finish()?;
        }
        let (at, len) = part(me, k);
        if len > 0 {
            let set = (k % 2) * n * seg;
            // SAFETY: set k % 2 of `scratch` holds n slots of `len` bytes (as in `start`), the
            // other n - 1 filled by the finished round; this rank's own contribution is the
            // segment itself (inside its chunk of `buf`), reduced in place: no peer reads or
            // writes it during the reduce-scatter (peers are sent only their own chunks), and it
            // is disjoint from `scratch`.
            unsafe { mem.reduce_in_place(sb.add(set), n, len, me, buf.add(at))? };
        }
        cur = next;
    }
    drop(scratch);
    // SAFETY: o is the byte prefix sum of the chunks, o[n] = count·elem: the bytes at `buf`
    // (this function's contract). This rank's reduced chunk is at o[me] inside it, where the
    // gather's own block goes (so `gather_bytes` skips that copy), and it is not written while
    // the peers read it; every other chunk is only written.
    unsafe { gather_bytes(g, seq, 0, OP, mem, buf.add(o[me]), &o, buf) }
}

/// Reduce-scatter: `data` holds every rank's chunk (byte offsets `o`); `out` receives this rank's
/// chunk, the n contributions reduced in rank order by `mem`.
///
/// # Safety
/// `data` holds `o[n]` bytes and `out` this rank's chunk, of `mem`'s kind; both valid until this returns.
#[allow(clippy::too_many_arguments)]
unsafe fn reduce_scatter_bytes<M: Memory>(g: &Group, seq: u64, round: u32, op_name: &'static str, mem: &M, data: *const u8, o: &[usize], out: *mut u8) -> Result<()> {
    let (n, me) = (g.n(), g.me);
    let mine = o[me + 1] - o[me];
    let total = mine.checked_mul(n).filter(|&t| t <= isize::MAX as usize);
    let total = total.ok_or_else(|| Error::usage(op_name, format!("{n} contributions of {mine} bytes overflow")))?;
    let mut scratch = mem.scratch(total)?;
    let sb = mem.base(&mut scratch);
    {
        let mut r = Round::new(g, seq, round, op_name, mem.direct());
        // SAFETY: `scratch` holds n·mine bytes (`mem.scratch(total)`), so slot p lies at
        // p·mine..(p+1)·mine inside it; block p of `data` lies at o[p]..o[p+1] <= o[n], inside
        // the bytes the caller guarantees (this function's contract). `scratch` and `data` both
        // outlive `r`, which is finished or dropped at the end of this block.
        unsafe {
            for i in 1..n {
                let p = (me + n - i) % n;
                r.post(p, sb.add(p * mine), mine)?;
            }
            for i in 1..n {
                let p = (me + i) % n;
                r.send(p, data.add(o[p]), o[p + 1] - o[p])?;
            }
        }
        r.finish()?;
    }
    // SAFETY: this rank's chunk of `data` (o[me]..o[me+1], inside `data` by this function's
    // contract) goes to slot me of `scratch` (inside its n·mine bytes; a fresh buffer, so no
    // overlap); then the n slots of `mine` bytes are reduced into `out`, which holds `mine`
    // bytes (contract) and is not `scratch`. All of `mem`'s kind, valid during these calls.
    unsafe {
        mem.copy(data.add(o[me]), sb.add(me * mine), mine)?;
        mem.reduce(sb, n, mine, out)
    }
}

/// All-gather of byte blocks: this rank's `o[me+1] - o[me]` bytes at `send` go to offset
/// `o[p]` of every rank p's `recv`; `mem` copies this rank's block first (it is never posted),
/// unless `send` is already that block of `recv` (an in-place gather).
///
/// # Safety
/// `recv` holds `o[n]` bytes and `send` this rank's block, of `mem`'s kind; both valid (and
/// `send` unchanged) until this returns. `send` either is `recv + o[me]` or does not overlap `recv`.
#[allow(clippy::too_many_arguments)]
unsafe fn gather_bytes<M: Memory>(g: &Group, seq: u64, round: u32, op_name: &'static str, mem: &M, send: *const u8, o: &[usize], recv: *mut u8) -> Result<()> {
    let (n, me) = (g.n(), g.me);
    let mine = o[me + 1] - o[me];
    let mut r = Round::new(g, seq, round, op_name, mem.direct());
    // SAFETY: the caller guarantees (this function's contract) `recv` holds o[n] bytes, so block p
    // at o[p]..o[p+1] lies inside it, and `send` this rank's `mine` bytes, unchanged while `recv`
    // is written (so the own-block copy's ranges do not overlap, or the copy is skipped when
    // `send` is that block). Both stay valid until this returns, after `r` is finished or dropped.
    unsafe {
        if !std::ptr::eq(send, recv.add(o[me])) {
            mem.copy(send, recv.add(o[me]), mine)?;
        }
        for i in 1..n {
            let p = (me + n - i) % n;
            r.post(p, recv.add(o[p]), o[p + 1] - o[p])?;
        }
        for i in 1..n {
            let p = (me + i) % n;
            r.send(p, send, mine)?;
        }
    }
    r.finish()
}

pub(crate) fn all_reduce<T: Reducible>(g: &Group, seq: u64, buf: &mut [T], op: ReduceOp) -> Result<()> {
    // SAFETY: `buf` holds buf.len() elements of size_of::<T>() bytes of host `T`s (`Host<T>`'s
    // kind), borrowed exclusively (valid and untouched by others) for the whole call.
    unsafe { all_reduce_in(g, seq, &Host::<T>::reducing(op), buf.as_mut_ptr() as *mut u8, buf.len(), std::mem::size_of::<T>()) }
}

pub(crate) fn reduce_scatter_v<T: Reducible>(g: &Group, seq: u64, send: &[T], counts: &[usize], recv: &mut [T], op: ReduceOp) -> Result<()> {
    const OP: &str = "reduce_scatter";
    check_counts(OP, "send", counts, g.n(), send.len())?;
    if recv.len() != counts[g.me] {
        return Err(Error::usage(OP, format!("receive buffer holds {} but this rank's count is {}", recv.len(), counts[g.me])));
    }
    let sz = std::mem::size_of::<T>();
    // SAFETY: `send` holds the counts' sum and `recv` this rank's count (checked above), so in
    // bytes (the same counts scaled by size_of::<T>()) the lengths are as required; both are
    // host `T`s (`Host<T>`'s kind), borrowed for the whole call (`send` shared, so unchanged).
    unsafe { reduce_scatter_v_in(g, seq, &Host::<T>::reducing(op), send.as_ptr() as *const u8, &scaled(OP, counts, sz)?, recv.as_mut_ptr() as *mut u8) }
}

pub(crate) fn all_gather_v<T: Pod>(g: &Group, seq: u64, send: &[T], counts: &[usize], recv: &mut [T]) -> Result<()> {
    const OP: &str = "all_gather";
    check_counts(OP, "receive", counts, g.n(), recv.len())?;
    if send.len() != counts[g.me] {
        return Err(Error::usage(OP, format!("send buffer holds {} but this rank's count is {}", send.len(), counts[g.me])));
    }
    let sz = std::mem::size_of::<T>();
    // SAFETY: `recv` holds the counts' sum and `send` this rank's count (checked above), so in
    // bytes (the same counts scaled by size_of::<T>()) the lengths are as required; both are
    // host `T`s (`Host<T>`'s kind), borrowed for the whole call (`send` shared, so unchanged and
    // not overlapping the exclusively borrowed `recv`).
    unsafe { all_gather_v_in(g, seq, &Host::<T>::new(), send.as_ptr() as *const u8, &scaled(OP, counts, sz)?, recv.as_mut_ptr() as *mut u8) }
}

pub(crate) fn broadcast<T: Pod>(g: &Group, seq: u64, buf: &mut [T], root: usize) -> Result<()> {
    const OP: &str = "broadcast";
    let (n, me) = (g.n(), g.me);
    if root >= n {
        return Err(Error::usage(OP, format!("root {root} out of range for {n} ranks")));
    }
    let bytes = std::mem::size_of_val(buf);
    let mut r = Round::new(g, seq, 0, OP, false);
    // SAFETY: `buf` is borrowed exclusively for this function, so it outlives `r` (finished or
    // dropped before this returns) and nothing else touches it; the root sends its `bytes`
    // bytes, the others post all `bytes` of it.
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

/// One point-to-point message, as bytes: the data to send, or the buffer to receive into
/// (exactly the message's length).
pub(crate) enum Msg<'b> {
    Send(&'b [u8]),
    Recv(&'b mut [u8]),
}

/// Point to point: message `tag` to or from member `peer`, one round of one message. A send
/// returns once its bytes may be reused (a backend may wait until `peer` posted the receive),
/// a receive once they landed.
pub(crate) fn point_to_point(g: &Group, tag: Tag, peer: usize, msg: Msg<'_>) -> Result<()> {
    let (op, role) = match msg {
        Msg::Send(_) => ("send", "destination"),
        Msg::Recv(_) => ("recv", "source"),
    };
    if peer >= g.n() || peer == g.me {
        return Err(Error::usage(op, format!("{role} {peer}: need another member of the {} ranks", g.n())));
    }
    let mut r = Round::tagged(g, tag, op, false);
    // SAFETY: the message's bytes are borrowed (a receive's exclusively, so nothing else touches
    // them) for this function, so they outlive `r`, finished or dropped before this returns;
    // a receive posts all of its buffer.
    unsafe {
        match msg {
            Msg::Send(d) => r.send(peer, d.as_ptr(), d.len())?,
            Msg::Recv(b) => r.post(peer, b.as_mut_ptr(), b.len())?,
        }
    }
    r.finish()
}

pub(crate) fn barrier(g: &Group, seq: u64) -> Result<()> {
    let n = g.n();
    let zeros: PerRank<usize> = smallvec::smallvec![0; n];
    all_to_all_v::<u8>(g, seq, &[], &zeros, &mut [], &zeros).map_err(|e| e.with_op("barrier"))
}
