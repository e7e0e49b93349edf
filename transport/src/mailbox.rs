//! Per-rank matching table shared by the backends: posted buffers, early arrivals, completions,
//! failed peers, and the one place where threads wait (spin, then yield, then sleep on a condvar,
//! or for shm on the inbox's doorbell, `crate::bell`).
use crate::bell::BellRef;
use crate::error::{Error, Result};
use crate::fabric::{Tag, Wait};
use crate::spin::AdaptiveSpin;
use crossbeam_utils::Backoff;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Receive-side or send-side entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Dir {
    Recv,
    Send,
}

pub(crate) type Key = (usize, Tag, Dir);

/// Hasher for the matching table (and the RDMA protocol's state maps): keys come from this job's own ranks, so no SipHash (which
/// costs ~50 ns per lookup, several lookups per message); a multiply-rotate mix of the words.
#[derive(Default)]
pub(crate) struct KeyHasher(u64);
impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(b as u64);
        }
    }
    fn write_u64(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(26) ^ x).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn write_u32(&mut self, x: u32) {
        self.write_u64(x as u64);
    }
    fn write_usize(&mut self, x: usize) {
        self.write_u64(x as u64);
    }
    fn write_isize(&mut self, x: isize) {
        self.write_u64(x as u64);
    }
}
pub(crate) type KeyMap<V> = HashMap<Key, V, std::hash::BuildHasherDefault<KeyHasher>>;

/// A raw pointer that may cross threads (its validity is the caller's contract, see `Fabric`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RawBuf(pub *mut u8);
// SAFETY: only an address: whoever dereferences it holds the Fabric contract that keeps the
// buffer valid, from whichever thread.
unsafe impl Send for RawBuf {}

#[derive(Debug)]
pub(crate) enum Slot {
    /// The receiver's registered buffer.
    Posted { buf: RawBuf, cap: usize },
    /// A writer owns the posted buffer right now.
    Writing,
    /// The message landed (receive), or the peer released our buffer (send).
    Done(usize),
    /// The message arrived before its buffer was posted.
    Early(Vec<u8>),
    /// (shm) the sender's announcement: `len` bytes at `addr` in its address space, offered
    /// under offer `id`.
    Remote { addr: u64, len: usize, id: u64 },
    /// This message failed.
    Failed(Error),
}

/// What `post` found.
pub(crate) enum Posted {
    /// Registered; a writer will fill it later.
    Waiting,
    /// An early message was copied in: complete.
    Landed,
    /// (shm) the sender announced `len` bytes at `addr` (offer `id`): the caller must fetch
    /// them, then `complete`.
    Fetch { addr: u64, len: usize, id: u64 },
}

pub(crate) struct Mailbox {
    slots: Mutex<Table>,
    cv: Condvar,
    /// Threads asleep on `cv` (or about to be): `notify` skips the futex syscall when zero.
    sleepers: AtomicUsize,
    /// Busy-poll before backing off (shm: the waiter itself drives progress, and on a loaded
    /// host a yield hands the core to another process for a whole time slice), adapted to
    /// what yields show (`crate::spin`: a core shared with the peer stops it).
    spin: AdaptiveSpin,
    /// (shm) Waiters sleep on this doorbell instead of `cv`, so a peer process can wake them;
    /// `notify` rings it.
    bell: Option<BellRef>,
}

pub(crate) struct Table {
    pub map: KeyMap<Slot>,
    /// Why a peer is gone, by world rank: `PeerFailed`, or `Protocol` when it broke the protocol
    /// (every later wait on it reports that, with the waiting operation's name).
    pub dead: HashMap<usize, Error>,
    /// Bytes held for receives not posted yet (`Early` slots and reservations), at most
    /// [`crate::alloc_limit`].
    pub early_bytes: usize,
}

/// How long a waiter spins/yields before sleeping, and the longest single sleep.
const YIELD_FOR: Duration = Duration::from_micros(200);
const MAX_SLEEP: Duration = Duration::from_millis(1);

impl Mailbox {
    pub fn new() -> Self {
        Mailbox {
            slots: Mutex::new(Table { map: KeyMap::default(), dead: HashMap::new(), early_bytes: 0 }),
            cv: Condvar::new(),
            sleepers: AtomicUsize::new(0),
            spin: AdaptiveSpin::new(Duration::ZERO),
            bell: None,
        }
    }

    /// For backends whose waiters drive progress themselves (shm): busy-poll for up to
    /// `spin` before the yield/sleep back-off, and sleep on `bell` (which peers ring), if any.
    pub fn new_polling(spin: Duration, bell: Option<BellRef>) -> Self {
        Mailbox { spin: AdaptiveSpin::new(spin), bell, ..Self::new() }
    }

    pub fn lock(&self) -> MutexGuard<'_, Table> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wake sleeping waiters. A sleeper registers (under the table lock) before it sleeps and
    /// re-checks its condition under the same lock, so a state change made under the lock and
    /// followed by `notify` is never missed; without sleepers this costs no syscall.
    pub fn notify(&self) {
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            self.cv.notify_all(); // `cancel` sleeps on it
            if let Some(b) = &self.bell {
                b.get().ring(false); // a sleeper armed it under the lock we held before this
            }
        }
    }

    /// Sleep for at most `d` (the caller holds the table lock `t`): on the condvar, or on the
    /// doorbell, after one more `poll` (a peer's change made before the bell was armed rang
    /// nobody), skipped if that poll moved anything.
    pub fn sleep<'a>(&'a self, t: MutexGuard<'a, Table>, d: Duration, poll: &dyn Fn() -> Result<bool>) -> Result<MutexGuard<'a, Table>> {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let t = match &self.bell {
            None => Ok(self.cv.wait_timeout(t, d).unwrap_or_else(|e| e.into_inner()).0),
            Some(b) => {
                let seen = b.get().arm();
                drop(t);
                let r = poll().map(|moved| {
                    if !moved {
                        b.get().wait(seen, d);
                    }
                });
                b.get().disarm();
                r.map(|()| self.lock())
            }
        };
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        t
    }

    /// Register a receive buffer, consuming an early arrival if there is one.
    pub fn post(&self, src: usize, tag: Tag, buf: *mut u8, cap: usize, op: &'static str) -> Result<Posted> {
        let mut g = self.lock();
        let t = &mut *g;
        let mut o = match t.map.entry((src, tag, Dir::Recv)) {
            Entry::Vacant(v) => {
                v.insert(Slot::Posted { buf: RawBuf(buf), cap });
                drop(g);
                self.notify(); // a sender may be waiting for this buffer (local rendezvous)
                return Ok(Posted::Waiting);
            }
            Entry::Occupied(o) => o,
        };
        match o.get() {
            Slot::Early(v) => {
                let n = v.len();
                t.early_bytes -= n;
                if n > cap {
                    let e = too_long(op, src, n, cap);
                    o.insert(Slot::Failed(e.clone()));
                    return Err(e);
                }
                // SAFETY: the caller guarantees buf..buf+cap is writable (Fabric::post_recv).
                unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), buf, n) };
                o.insert(Slot::Done(n));
                Ok(Posted::Landed)
            }
            &Slot::Remote { addr, len, id } => {
                if len > cap {
                    let e = too_long(op, src, len, cap);
                    o.insert(Slot::Failed(e.clone()));
                    return Err(e);
                }
                o.insert(Slot::Writing);
                Ok(Posted::Fetch { addr, len, id })
            }
            Slot::Failed(_) => match o.remove() {
                Slot::Failed(e) => Err(e),
                _ => unreachable!("matched above"),
            },
            _ => Err(Error::usage(op, format!("receive from rank {src} posted twice for {tag:?}"))),
        }
    }

    /// A writer claims the posted buffer for `len` bytes. `Ok(None)`: not posted yet.
    pub fn claim(t: &mut Table, src: usize, tag: Tag, len: usize, op: &'static str) -> Result<Option<RawBuf>> {
        let Some(slot) = t.map.get_mut(&(src, tag, Dir::Recv)) else { return Ok(None) };
        match *slot {
            Slot::Posted { buf, cap } => {
                if len > cap {
                    let e = too_long(op, src, len, cap);
                    *slot = Slot::Failed(e.clone());
                    return Err(e);
                }
                *slot = Slot::Writing;
                Ok(Some(buf))
            }
            _ => {
                let e = Error::Protocol { op, peer: src, detail: format!("duplicate message for {tag:?}") };
                if let Slot::Early(v) = std::mem::replace(slot, Slot::Failed(e.clone())) {
                    t.early_bytes -= v.len();
                }
                Err(e)
            }
        }
    }

    /// Count `len` more bytes held for receives not posted yet: a protocol error naming `peer`
    /// past [`crate::alloc_limit`] (a peer sending far ahead of the receives).
    pub fn reserve_early(t: &mut Table, peer: usize, len: usize, op: &'static str) -> Result<()> {
        let limit = crate::limits::alloc_limit()?;
        match t.early_bytes.checked_add(len).filter(|&b| b <= limit) {
            Some(b) => {
                t.early_bytes = b;
                Ok(())
            }
            None => Err(Error::Protocol {
                op,
                peer,
                detail: format!("{len} more bytes ahead of their receives would exceed the {limit}-byte limit (EMBER_MAX_ALLOC_BYTES)"),
            }),
        }
    }

    /// Return a reservation of `reserve_early` that was not delivered.
    pub fn release_early(&self, len: usize) {
        let mut t = self.lock();
        t.early_bytes = t.early_bytes.saturating_sub(len);
    }

    /// Deliver a whole message that arrived as bytes: copy it into the posted buffer if there is
    /// one, else keep it until `post`. `reserved`: its bytes were counted (`reserve_early`)
    /// already.
    pub fn deliver(&self, src: usize, tag: Tag, data: Vec<u8>, reserved: bool, op: &'static str) -> Result<()> {
        let mut t = self.lock();
        let r = Self::deliver_locked(&mut t, src, tag, data, reserved, op);
        drop(t);
        self.notify();
        r
    }

    /// Deliver a whole message read in place (a shared-memory ring record): copied straight
    /// into its posted buffer under one lock and one lookup, or kept (copied out) until `post`.
    pub fn deliver_slice(&self, src: usize, tag: Tag, data: &[u8], op: &'static str) -> Result<()> {
        let mut t = self.lock();
        let r = match t.map.get_mut(&(src, tag, Dir::Recv)) {
            Some(slot) if matches!(*slot, Slot::Posted { cap, .. } if data.len() <= cap) => {
                let Slot::Posted { buf, .. } = *slot else { unreachable!("matched above") };
                // SAFETY: the posted buffer holds `cap >= data.len()` writable bytes until the
                // receive completes or is cancelled (`Fabric::post_recv`), which cannot happen
                // while we hold the table lock; `data` is not the receiver's buffer.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.0, data.len()) };
                *slot = Slot::Done(data.len());
                Ok(())
            }
            _ => Self::deliver_locked(&mut t, src, tag, data.to_vec(), false, op),
        };
        drop(t);
        self.notify();
        r
    }

    pub fn deliver_locked(t: &mut Table, src: usize, tag: Tag, data: Vec<u8>, reserved: bool, op: &'static str) -> Result<()> {
        let claimed = Self::claim(t, src, tag, data.len(), op);
        if reserved && !matches!(claimed, Ok(None)) {
            t.early_bytes -= data.len();
        }
        match claimed? {
            Some(buf) => {
                // SAFETY: claim checked the length against the posted capacity.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.0, data.len()) };
                t.map.insert((src, tag, Dir::Recv), Slot::Done(data.len()));
            }
            None => {
                if !reserved {
                    if let Err(e) = Self::reserve_early(t, src, data.len(), op) {
                        t.map.insert((src, tag, Dir::Recv), Slot::Failed(e.clone()));
                        return Err(e);
                    }
                }
                t.map.insert((src, tag, Dir::Recv), Slot::Early(data));
            }
        }
        Ok(())
    }

    /// (shm) The sender announced `len` bytes at `addr` (offer `id`); returns the posted buffer
    /// to fetch into, or keeps the announcement until `post`.
    pub fn announce(&self, src: usize, tag: Tag, addr: u64, len: usize, id: u64, op: &'static str) -> Result<Option<RawBuf>> {
        let mut t = self.lock();
        match Self::claim(&mut t, src, tag, len, op)? {
            Some(b) => Ok(Some(b)),
            None => {
                t.map.insert((src, tag, Dir::Recv), Slot::Remote { addr, len, id });
                Ok(None)
            }
        }
    }

    /// Mark `(peer, tag, dir)` complete with `len` bytes and wake waiters.
    pub fn complete(&self, peer: usize, tag: Tag, dir: Dir, len: usize) {
        self.lock().map.insert((peer, tag, dir), Slot::Done(len));
        self.notify();
    }

    pub fn fail(&self, peer: usize, tag: Tag, dir: Dir, e: Error) {
        self.lock().map.insert((peer, tag, dir), Slot::Failed(e));
        self.notify();
    }

    /// Record that `peer` is gone; every wait on it fails from now on.
    pub fn peer_died(&self, peer: usize, reason: String) {
        self.peer_failed(Error::PeerFailed { op: "", peer, reason });
    }

    /// Record that the peer `e` names is gone for the reason `e` gives (the first one counts).
    pub fn peer_failed(&self, e: Error) {
        if let Some(peer) = e.peer() {
            self.lock().dead.entry(peer).or_insert(e);
        }
        self.notify();
    }

    /// Wait for `(peer, tag, dir)` to be `Done`, calling `poll` between checks (shm progress).
    pub fn wait_done(&self, peer: usize, tag: Tag, dir: Dir, w: &Wait, poll: &dyn Fn() -> Result<bool>) -> Result<usize> {
        self.wait_until(peer, w, poll, |t| match t.map.entry((peer, tag, dir)) {
            Entry::Occupied(o) if matches!(o.get(), Slot::Done(_) | Slot::Failed(_)) => match o.remove() {
                Slot::Done(n) => Some(Ok(n)),
                Slot::Failed(e) => Some(Err(e)),
                _ => unreachable!("matched above"),
            },
            _ => None,
        })
    }

    /// The one waiting loop: check under the lock; spin, then yield, then sleep on the condvar
    /// (bounded, so cross-process progress via `poll` still happens); fail on a dead peer or
    /// at the deadline. `poll` returns whether it moved anything (shm: drained a record or
    /// pushed a chunk); while it does, the wait starts over at the spin phase instead of
    /// sleeping, since a message streamed through shared memory moves only while its two
    /// ranks poll.
    pub fn wait_until<T>(
        &self,
        peer: usize,
        w: &Wait,
        poll: &dyn Fn() -> Result<bool>,
        mut check: impl FnMut(&mut Table) -> Option<Result<T>>,
    ) -> Result<T> {
        // While busy-polling, the clock is read every CLOCK_EVERY-th pass only: a pass costs
        // about as much as a read of it (a VM's clock source), and a message that arrives
        // within a microsecond is what a small collective waits for. The spin phase starts at
        // the first read (`start`: none yet, or after progress).
        const CLOCK_EVERY: u32 = 32;
        let backoff = Backoff::new();
        let mut start: Option<Instant> = None;
        let spin_for = self.spin.begin();
        let mut sleep = Duration::from_micros(20);
        let mut yielded: Option<Duration> = None;
        let mut passes = 0u32;
        let mut spinning = true;
        // The first look comes before any progress: what is already complete (a send that went
        // out eagerly) costs no poll.
        let mut first = true;
        loop {
            if !std::mem::take(&mut first) && poll()? {
                start = None;
                sleep = Duration::from_micros(20);
                backoff.reset();
                spinning = true;
            }
            let mut t = self.lock();
            let done = check(&mut t);
            if let Some(took) = yielded.take() {
                self.spin.after_yield(took, done.is_some());
            }
            if let Some(r) = done {
                return r;
            }
            if let Some(e) = t.dead.get(&peer) {
                return Err(e.clone().with_op(w.op));
            }
            passes = passes.wrapping_add(1);
            if spinning && !passes.is_multiple_of(CLOCK_EVERY) && !spin_for.is_zero() {
                drop(t);
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now >= w.deadline() {
                return Err(Error::Timeout { op: w.op, peer, timeout: w.timeout });
            }
            let start = *start.get_or_insert(now);
            spinning = now - start < spin_for;
            if spinning {
                drop(t);
                std::hint::spin_loop();
            } else if !self.spin.spins() && !backoff.is_completed() {
                // A short spin-then-yield where waits do not busy-poll (their yields are timed
                // below only where the busy-poll adapts).
                drop(t);
                backoff.snooze();
            } else if now - start < YIELD_FOR {
                drop(t);
                let t0 = Instant::now(); // after the unlock, which may wake a waiter (a syscall)
                std::thread::yield_now();
                yielded = Some(t0.elapsed());
            } else {
                let d = sleep.min(w.deadline() - now);
                drop(self.sleep(t, d, poll)?);
                sleep = (sleep * 2).min(MAX_SLEEP);
            }
        }
    }

    /// Withdraw a posted receive; waits while a writer is copying into it.
    pub fn cancel(&self, src: usize, tag: Tag) {
        let key = (src, tag, Dir::Recv);
        let mut t = self.lock();
        while matches!(t.map.get(&key), Some(Slot::Writing)) {
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            t = self.cv.wait_timeout(t, Duration::from_millis(1)).unwrap_or_else(|e| e.into_inner()).0;
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
        t.map.remove(&key);
    }
}

pub(crate) fn too_long(op: &'static str, peer: usize, len: usize, cap: usize) -> Error {
    Error::Protocol { op, peer, detail: format!("message of {len} bytes exceeds the {cap}-byte buffer posted for it") }
}
