//! `Comm`: one rank's communicator (rank, size, split) and the public collective API, blocking
//! and non-blocking.
use crate::coll::{self, even_counts, CopyOnly, Group, Memory};
use crate::error::{Error, Result};
use crate::fabric::Fabric;
use crate::reduce::{ReduceOp, Reducible};
use bytemuck::Pod;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Default time any collective waits for a peer before failing (60 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest timeout the environment (`EMBER_TIMEOUT_MS`) or the command line may ask for:
/// 7 days. A longer wait is not a timeout, and the deadlines derived from it (`Instant` +
/// timeout, TCP's `TCP_USER_TIMEOUT` in milliseconds) stay far from overflowing.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

struct Inner {
    g: Group,
    /// Sequence number of the next collective issued on this communicator.
    seq: AtomicU64,
    /// Point-to-point messages: sent to and received from each member so far (a pair's
    /// messages are matched in the order sent).
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
}

impl Inner {
    fn new(g: Group) -> Inner {
        let n = g.n();
        let count = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Inner { g, seq: AtomicU64::new(0), sent: count(), received: count() }
    }
    /// The tag of point-to-point message `k` of a pair: its own context, apart from every
    /// collective's.
    fn p2p_tag(&self, k: u64) -> crate::fabric::Tag {
        crate::fabric::Tag { ctx: mix(self.g.ctx ^ P2P), seq: k, round: 0 }
    }
}

/// Salt of the point-to-point context.
const P2P: u64 = 0x7032_7020_6d73_6773;

/// One rank's communicator. Collectives on one `Comm` must be issued in the same order on every
/// member (as in MPI); collectives on different communicators are independent and may be in
/// flight at the same time (use the `start_*` forms, or several threads).
pub struct Comm {
    inner: Arc<Inner>,
}

/// Registers memory regions on one rank's network endpoint ([`Comm::regions`]).
#[derive(Clone)]
pub struct Regions {
    fabric: Arc<dyn Fabric>,
}

impl Regions {
    /// As [`Comm::register_region`].
    ///
    /// # Safety
    /// As [`Comm::register_region`]: the memory stays allocated until `unregister` succeeded
    /// or the endpoint is gone.
    pub unsafe fn register(&self, addr: u64, len: usize) -> Result<()> {
        // SAFETY: the caller keeps the memory allocated as `Fabric::register_region` asks (this
        // function's contract is the same).
        unsafe { self.fabric.register_region(addr, len) }
    }
    /// As [`Comm::unregister_region`].
    pub fn unregister(&self, addr: u64) -> Result<()> {
        self.fabric.unregister_region(addr)
    }
}

/// A collective started with a `start_*` method; it progresses on its own thread.
/// `wait` returns the buffers handed in (now filled).
#[must_use = "a started collective must be waited for"]
pub struct Request<R> {
    handle: JoinHandle<Result<R>>,
}

impl<R> Request<R> {
    /// Block until the collective finished.
    pub fn wait(self) -> Result<R> {
        match self.handle.join() {
            Ok(r) => r,
            Err(_) => Err(Error::Bootstrap("collective thread panicked".into())),
        }
    }
    /// Whether `wait` would return at once.
    pub fn is_done(&self) -> bool {
        self.handle.is_finished()
    }
}

fn mix(mut x: u64) -> u64 {
    // splitmix64 finaliser: derives sub-communicator context ids.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Comm {
    pub(crate) fn from_fabric(fabric: Arc<dyn Fabric>, timeout: Duration) -> Comm {
        let n = fabric.size();
        let me = fabric.rank();
        Comm { inner: Arc::new(Inner::new(Group { fabric, members: (0..n).collect(), me, ctx: 1, timeout })) }
    }

    /// This rank's index in the communicator.
    pub fn rank(&self) -> usize {
        self.inner.g.me
    }
    /// Number of ranks in the communicator.
    pub fn size(&self) -> usize {
        self.inner.g.n()
    }
    /// The world rank (rank in the job) of member `i`.
    pub fn world_rank_of(&self, i: usize) -> usize {
        self.inner.g.members[i]
    }
    /// World ranks of all members, in communicator rank order.
    pub fn world_ranks(&self) -> &[usize] {
        &self.inner.g.members
    }
    /// "local", "shm" or "tcp".
    pub fn transport(&self) -> &'static str {
        self.inner.g.fabric.name()
    }
    /// How long each collective waits for a peer.
    pub fn timeout(&self) -> Duration {
        self.inner.g.timeout
    }

    /// The same members with another timeout (a new communicator: collective over this one,
    /// like `split`, so call it on every member in the same order).
    pub fn with_timeout(&self, timeout: Duration) -> Result<Comm> {
        let c = self.split(0, self.rank() as i64)?;
        let inner = Arc::try_unwrap(c.inner).map_err(|_| Error::usage("with_timeout", "unexpected sharing"))?;
        let mut g = inner.g;
        g.timeout = timeout;
        Ok(Comm { inner: Arc::new(Inner::new(g)) })
    }

    fn next_seq(&self) -> u64 {
        self.inner.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// MPI_Comm_split: members with equal `color` form a new communicator, ordered by `key`
    /// (ties by parent rank). Collective over this communicator.
    pub fn split(&self, color: u32, key: i64) -> Result<Comm> {
        let seq = self.next_seq();
        let g = &self.inner.g;
        let n = g.n();
        let mine = [color as u64, key as u64];
        let mut all = vec![0u64; 2 * n];
        coll::all_gather_v(g, seq, &mine, &vec![2; n], &mut all).map_err(|e| e.with_op("split"))?;
        let mut group: Vec<(i64, usize)> =
            (0..n).filter(|&i| all[2 * i] == color as u64).map(|i| (all[2 * i + 1] as i64, i)).collect();
        group.sort();
        let me = group.iter().position(|&(_, i)| i == g.me).expect("own rank is in its color");
        let members = group.iter().map(|&(_, i)| g.members[i]).collect();
        let ctx = mix(g.ctx ^ mix(seq) ^ mix(mix(color as u64)));
        Ok(Comm {
            inner: Arc::new(Inner::new(Group { fabric: g.fabric.clone(), members, me, ctx, timeout: g.timeout })),
        })
    }

    // ---------------------------------------------------------------- blocking collectives

    /// All-to-all with a different count per peer: `send` holds `send_counts[p]` elements for
    /// each peer p in rank order; `recv` receives `recv_counts[p]` from each. Counts must agree
    /// pairwise (a mismatch is an error naming the peer).
    pub fn all_to_all_v<T: Pod>(&self, send: &[T], send_counts: &[usize], recv: &mut [T], recv_counts: &[usize]) -> Result<()> {
        coll::all_to_all_v(&self.inner.g, self.next_seq(), send, send_counts, recv, recv_counts)
    }

    /// All-to-all with equal blocks: `send.len() == recv.len() == size * block`.
    pub fn all_to_all<T: Pod>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let n = self.size();
        if !send.len().is_multiple_of(n) || recv.len() != send.len() {
            return Err(Error::usage("all_to_all", format!("buffers of {} and {} elements for {n} ranks", send.len(), recv.len())));
        }
        let c: coll::PerRank<usize> = smallvec::smallvec![send.len() / n; n];
        self.all_to_all_v(send, &c, recv, &c)
    }

    /// All-to-all where receive counts are not known: exchanges the counts first, then the data.
    /// Returns `(received elements, receive counts)`.
    /// The counts the peers send are checked (overflow, [`crate::alloc_limit`]) before anything
    /// is allocated: a protocol error naming the peer.
    pub fn all_to_all_v_alloc<T: Pod>(&self, send: &[T], send_counts: &[usize]) -> Result<(Vec<T>, Vec<usize>)> {
        let rc = self.all_to_all_counts::<T>(send_counts)?;
        let total = rc.iter().sum(); // checked by all_to_all_counts
        let mut recv = crate::mem::huge_vec(total);
        self.all_to_all_v(send, send_counts, &mut recv, &rc)?;
        Ok((recv, rc))
    }

    /// The counts exchange of an all-to-all-v whose receive counts are not known (one
    /// all-to-all of the counts): returns this rank's receive counts, checked (overflow,
    /// [`crate::alloc_limit`] for elements of `T`) before the caller allocates from them; a
    /// protocol error names the peer.
    pub fn all_to_all_counts<T: Pod>(&self, send_counts: &[usize]) -> Result<Vec<usize>> {
        const OP: &str = "all_to_all_v";
        let n = self.size();
        let sc: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let mut rc = vec![0u64; n];
        if sc.len() != n {
            return Err(Error::usage(OP, format!("{} send counts for {n} ranks", sc.len())));
        }
        self.all_to_all(&sc, &mut rc).map_err(|e| e.with_op("all_to_all_v (counts)"))?;
        let rc: Vec<usize> = rc.into_iter().map(|c| usize::try_from(c).unwrap_or(usize::MAX)).collect();
        crate::limits::peer_total(OP, &rc, std::mem::size_of::<T>(), self.world_ranks())?;
        Ok(rc)
    }

    /// In-place all-reduce. Every rank gets bitwise the same result (sum in rank order).
    pub fn all_reduce<T: Reducible>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        coll::all_reduce(&self.inner.g, self.next_seq(), buf, op)
    }

    /// Reduce-scatter with equal chunks: `send.len() == size * recv.len()`.
    pub fn reduce_scatter<T: Reducible>(&self, send: &[T], recv: &mut [T], op: ReduceOp) -> Result<()> {
        let c: coll::PerRank<usize> = smallvec::smallvec![recv.len(); self.size()];
        self.reduce_scatter_v(send, &c, recv, op)
    }

    /// Reduce-scatter with `counts[p]` elements for rank p; `recv.len() == counts[rank]`.
    pub fn reduce_scatter_v<T: Reducible>(&self, send: &[T], counts: &[usize], recv: &mut [T], op: ReduceOp) -> Result<()> {
        coll::reduce_scatter_v(&self.inner.g, self.next_seq(), send, counts, recv, op)
    }

    /// All-gather with equal contributions: `recv.len() == size * send.len()`.
    pub fn all_gather<T: Pod>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let c: coll::PerRank<usize> = smallvec::smallvec![send.len(); self.size()];
        self.all_gather_v(send, recv, &c)
    }

    /// All-gather where rank p contributes `counts[p]` elements.
    pub fn all_gather_v<T: Pod>(&self, send: &[T], recv: &mut [T], counts: &[usize]) -> Result<()> {
        coll::all_gather_v(&self.inner.g, self.next_seq(), send, counts, recv)
    }

    /// All-gather of variable contributions whose sizes are not known: exchanges them first.
    /// The sizes the peers send are checked (overflow, [`crate::alloc_limit`]) before anything
    /// is allocated: a protocol error naming the peer.
    pub fn all_gather_alloc<T: Pod>(&self, send: &[T]) -> Result<(Vec<T>, Vec<usize>)> {
        let n = self.size();
        let mut c = vec![0u64; n];
        self.all_gather(&[send.len() as u64], &mut c).map_err(|e| e.with_op("all_gather (counts)"))?;
        let c: Vec<usize> = c.into_iter().map(|x| usize::try_from(x).unwrap_or(usize::MAX)).collect();
        let total = crate::limits::peer_total("all_gather", &c, std::mem::size_of::<T>(), self.world_ranks())?;
        let mut recv = vec![T::zeroed(); total];
        self.all_gather_v(send, &mut recv, &c)?;
        Ok((recv, c))
    }

    /// `buf` on `root` is copied to every rank (all pass buffers of the same length).
    pub fn broadcast<T: Pod>(&self, buf: &mut [T], root: usize) -> Result<()> {
        coll::broadcast(&self.inner.g, self.next_seq(), buf, root)
    }

    pub fn barrier(&self) -> Result<()> {
        coll::barrier(&self.inner.g, self.next_seq())
    }

    // ------------------------------------------------ point to point

    /// Send `buf` to member `to`; returns once `buf` may be reused. It may wait until `to`
    /// posted the matching [`Self::recv`] (a synchronous send, as `MPI_Ssend`: two members that
    /// send to each other first may wait for each other until the timeout). The messages of
    /// one pair are received in the order sent, apart from the collectives'. After a failed
    /// `send` or `recv` the pair's order is lost (as after an MPI error): use collectives, or
    /// a new communicator.
    pub fn send<T: Pod>(&self, to: usize, buf: &[T]) -> Result<()> {
        self.point_to_point(&self.inner.sent, to, coll::Msg::Send(bytemuck::cast_slice(buf)))
    }

    /// Receive the next message from member `from` into `buf`, which must be the message's
    /// length: one of another length is an error naming the peer.
    pub fn recv<T: Pod>(&self, from: usize, buf: &mut [T]) -> Result<()> {
        self.point_to_point(&self.inner.received, from, coll::Msg::Recv(bytemuck::cast_slice_mut(buf)))
    }

    /// `msg` as the next message of its direction with `peer` (`count`: each peer's so far).
    fn point_to_point(&self, count: &[AtomicU64], peer: usize, msg: coll::Msg<'_>) -> Result<()> {
        let k = count.get(peer).map_or(0, |c| c.fetch_add(1, Ordering::Relaxed));
        coll::point_to_point(&self.inner.g, self.inner.p2p_tag(k), peer, msg)
    }

    // ------------------------------------------------ registered regions

    /// Register `[addr, +len)` (host or device memory) with this rank's network endpoint once,
    /// so that no later message whose buffer lies inside it registers or deregisters memory
    /// (on RDMA each would otherwise pin and unpin its pages; a no-op on transports that copy
    /// with the CPU). Local to this rank; it serves every communicator split from the same
    /// world. Long-lived communication buffers (pools) are what to register.
    ///
    /// # Safety
    /// The memory must stay allocated (never freed or re-mapped) until
    /// [`Self::unregister_region`] returned `Ok` or every communicator of this world is dropped.
    pub unsafe fn register_region(&self, addr: u64, len: usize) -> Result<()> {
        // SAFETY: the caller keeps the memory allocated as `Fabric::register_region` asks (this
        // function's contract is the same).
        unsafe { self.inner.g.fabric.register_region(addr, len) }
    }

    /// Deregister the region that starts at `addr`; a usage error while a message inside it is
    /// in flight, or when no region starts there.
    pub fn unregister_region(&self, addr: u64) -> Result<()> {
        self.inner.g.fabric.unregister_region(addr)
    }

    /// A handle for registering regions on this rank's endpoint, for a memory pool to keep (it
    /// keeps the endpoint alive, so the pool can deregister its blocks before it frees them).
    pub fn regions(&self) -> Regions {
        Regions { fabric: self.inner.g.fabric.clone() }
    }

    // ------------------------------------------------ device memory (GPUDirect RDMA)

    /// Whether this communicator moves memory the CPU must not touch (GPU memory the NIC
    /// reaches with GPUDirect RDMA), probed by registering `len` bytes at `addr` on this rank
    /// only (agree across ranks before relying on it). Only the RDMA transport can, and only
    /// where the NIC's driver registers device memory (`nvidia-peermem`); `Err` says why not.
    pub fn probe_direct(&self, addr: u64, len: usize) -> std::result::Result<(), String> {
        self.inner.g.fabric.probe_direct(addr, len)
    }

    /// Let this rank move memory the CPU must not touch with `copy` (in-process ranks sharing
    /// one device context); every communicator split from this one shares it. Refused by
    /// transports that move such memory themselves or cannot reach it.
    pub fn set_direct_copy(&self, copy: crate::fabric::DirectCopy) -> Result<()> {
        self.inner.g.fabric.set_direct_copy(copy)
    }

    /// All-to-all-v of byte blocks in memory `mem` (see [`Memory`]), by address, counts in
    /// **bytes**: `send_counts[p]` bytes at `send` (in rank order) go to rank p, `recv_counts[p]`
    /// from rank p land at `recv`. Memory the CPU must not touch needs a transport that moves it
    /// ([`Self::probe_direct`]); the others fail with a usage error.
    ///
    /// # Safety
    /// `send` and `recv` point at the counts' sums of bytes of `mem`'s kind, registrable by the
    /// NIC where the transport needs it, valid (and `send` unchanged, `recv` untouched by others)
    /// until this returns; all device work that writes `send` has finished.
    pub unsafe fn all_to_all_v_in<M: Memory>(&self, mem: &M, send: u64, send_counts: &[usize], recv: u64, recv_counts: &[usize]) -> Result<()> {
        // SAFETY: this function's contract.
        unsafe { coll::all_to_all_v_in(&self.inner.g, self.next_seq(), mem, send as *const u8, send_counts, recv as *mut u8, recv_counts, 1) }
    }

    /// All-gather-v of byte blocks in memory `mem`: rank p's `counts[p]` bytes land at offset
    /// Σ counts[..p] of every `recv`.
    ///
    /// # Safety
    /// As [`Self::all_to_all_v_in`]: `send` holds `counts[rank]` bytes, `recv` their sum.
    pub unsafe fn all_gather_v_in<M: Memory>(&self, mem: &M, send: u64, counts: &[usize], recv: u64) -> Result<()> {
        // SAFETY: this function's contract.
        unsafe { coll::all_gather_v_in(&self.inner.g, self.next_seq(), mem, send as *const u8, counts, recv as *mut u8) }
    }

    /// Reduce-scatter of byte blocks in memory `mem`: block q (`counts[q]` bytes at offset
    /// Σ counts[..q]) of every rank's `send` goes to rank q, which reduces the contributions in
    /// rank order into `recv` ([`Memory::reduce`]).
    ///
    /// # Safety
    /// As [`Self::all_to_all_v_in`]: `send` holds the counts' sum of bytes, `recv` `counts[rank]`.
    pub unsafe fn reduce_scatter_v_in<M: Memory>(&self, mem: &M, send: u64, counts: &[usize], recv: u64) -> Result<()> {
        // SAFETY: this function's contract.
        unsafe { coll::reduce_scatter_v_in(&self.inner.g, self.next_seq(), mem, send as *const u8, counts, recv as *mut u8) }
    }

    /// All-reduce in place of `count` elements of `elem` bytes at `buf` in memory `mem`, the
    /// contributions reduced in rank order ([`Memory::reduce`]).
    ///
    /// # Safety
    /// As [`Self::all_to_all_v_in`]: `buf` holds `count · elem` bytes.
    pub unsafe fn all_reduce_in<M: Memory>(&self, mem: &M, buf: u64, count: usize, elem: usize) -> Result<()> {
        // SAFETY: this function's contract.
        unsafe { coll::all_reduce_in(&self.inner.g, self.next_seq(), mem, buf as *mut u8, count, elem) }
    }

    /// [`Self::all_to_all_v_in`] on memory the CPU must not touch whose own block
    /// `own(src, dst, len)` copies (a device-to-device copy that is finished when it returns).
    ///
    /// # Safety
    /// As [`Self::all_to_all_v_in`].
    pub unsafe fn all_to_all_v_direct(
        &self,
        send: u64,
        send_counts: &[usize],
        recv: u64,
        recv_counts: &[usize],
        own: impl FnOnce(u64, u64, usize) -> Result<()>,
    ) -> Result<()> {
        let mem = CopyOnly::new(|s: *const u8, d: *mut u8, len| own(s as u64, d as u64, len));
        // SAFETY: this function's contract.
        unsafe { self.all_to_all_v_in(&mem, send, send_counts, recv, recv_counts) }
    }

    /// [`Self::all_gather_v_in`] on memory the CPU must not touch whose own block
    /// `own(src, dst, len)` copies.
    ///
    /// # Safety
    /// As [`Self::all_gather_v_in`].
    pub unsafe fn all_gather_v_direct(&self, send: u64, counts: &[usize], recv: u64, own: impl FnOnce(u64, u64, usize) -> Result<()>) -> Result<()> {
        let mem = CopyOnly::new(|s: *const u8, d: *mut u8, len| own(s as u64, d as u64, len));
        // SAFETY: this function's contract.
        unsafe { self.all_gather_v_in(&mem, send, counts, recv) }
    }

    // ------------------------------------------------------------ non-blocking collectives

    fn start<R: Send + 'static>(&self, name: &str, f: impl FnOnce(&Group, u64) -> Result<R> + Send + 'static) -> Request<R> {
        let seq = self.next_seq(); // issue order, not execution order, fixes the tag
        let inner = self.inner.clone();
        let handle = std::thread::Builder::new()
            .name(format!("ember-{name}"))
            .spawn(move || f(&inner.g, seq))
            .expect("spawn collective thread");
        Request { handle }
    }

    /// Non-blocking `all_to_all_v`; `wait` returns the filled receive buffer.
    pub fn start_all_to_all_v<T: Pod + Send>(&self, send: Vec<T>, send_counts: Vec<usize>, recv_counts: Vec<usize>) -> Request<Vec<T>> {
        self.start("a2a", move |g, seq| {
            let mut recv = crate::mem::huge_vec(crate::limits::own_total("all_to_all_v", &recv_counts, std::mem::size_of::<T>())?);
            coll::all_to_all_v(g, seq, &send, &send_counts, &mut recv, &recv_counts)?;
            Ok(recv)
        })
    }

    /// Non-blocking in-place `all_reduce`; `wait` returns the reduced buffer.
    pub fn start_all_reduce<T: Reducible>(&self, mut buf: Vec<T>, op: ReduceOp) -> Request<Vec<T>> {
        self.start("allreduce", move |g, seq| coll::all_reduce(g, seq, &mut buf, op).map(|_| buf))
    }

    /// Non-blocking `reduce_scatter_v`; `wait` returns this rank's reduced chunk.
    pub fn start_reduce_scatter_v<T: Reducible>(&self, send: Vec<T>, counts: Vec<usize>, op: ReduceOp) -> Request<Vec<T>> {
        self.start("reducescatter", move |g, seq| {
            let mut recv = vec![T::zeroed(); counts.get(g.me).copied().unwrap_or(0)];
            coll::reduce_scatter_v(g, seq, &send, &counts, &mut recv, op).map(|_| recv)
        })
    }

    /// Non-blocking `all_gather_v`; `wait` returns the gathered buffer.
    pub fn start_all_gather_v<T: Pod + Send>(&self, send: Vec<T>, counts: Vec<usize>) -> Request<Vec<T>> {
        self.start("allgather", move |g, seq| {
            let mut recv = vec![T::zeroed(); crate::limits::own_total("all_gather", &counts, std::mem::size_of::<T>())?];
            coll::all_gather_v(g, seq, &send, &counts, &mut recv).map(|_| recv)
        })
    }

    /// Non-blocking `broadcast`; `wait` returns the buffer (root's contents on every rank).
    pub fn start_broadcast<T: Pod + Send>(&self, mut buf: Vec<T>, root: usize) -> Request<Vec<T>> {
        self.start("bcast", move |g, seq| coll::broadcast(g, seq, &mut buf, root).map(|_| buf))
    }

    pub fn start_barrier(&self) -> Request<()> {
        self.start("barrier", coll::barrier)
    }
}

/// `n` in-process ranks (threads of this process): the embedded default. Move each `Comm` to
/// its own thread (collectives block until all members take part).
pub fn local_world(n: usize) -> Vec<Comm> {
    local_world_with_timeout(n, DEFAULT_TIMEOUT)
}

/// `local_world` with a collective timeout other than the default.
pub fn local_world_with_timeout(n: usize, timeout: Duration) -> Vec<Comm> {
    crate::local::world(n).into_iter().map(|f| Comm::from_fabric(Arc::new(f), timeout)).collect()
}

/// Counts that split `len` elements over `n` ranks as evenly as possible (first ones longer):
/// the chunking `all_reduce` uses internally, exposed for reduce-scatter callers.
pub fn split_evenly(len: usize, n: usize) -> Vec<usize> {
    even_counts(len, n).into_vec()
}
