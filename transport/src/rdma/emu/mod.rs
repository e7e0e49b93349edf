//! An adversarial emulation of [`Verbs`] between threads of one process.
//!
//! * Writes are bounds-checked against the registered regions (lkey for every sge, rkey for the
//!   target range); a bad one completes with an error, never touches memory outside a region.
//! * `adversarial`: a posted write is not executed at once; a later `poll` of either end places it in
//!   shuffled pieces over several calls (its bytes land in any order, partly before other
//!   writes), and the receive completion is queued only after the last byte. Completions of
//!   different QPs are handed out in a random interleaving (per-QP order is kept, as verbs
//!   guarantee); `poll` returns a random number of them.
//! * Faults: a lost rank (after its n-th data write it stops; writes to it fail with a retry
//!   error, its own posts fail), a short write (n-th data write of a rank places half its bytes
//!   and reports that length), a corrupted write (a header byte flipped), a full queue (small
//!   send-queue depth and random `QueueFull` refusals).
//! * Otherwise (`EmuConfig::fast()`) a write is one `memcpy` at post time: the wire for the
//!   benchmark of the protocol's own cost.
//! * Device memory ([`DeviceMem`]): pages the CPU cannot touch (mapped without access: a read or
//!   write by the protocol or a collective is a segmentation fault), which the emulated NIC reaches
//!   through a second mapping of the same pages, as a NIC reaches GPU memory with GPUDirect RDMA.
//! * Counters (`EmuConfig::stats`, shared by the world): registrations and deregistrations per
//!   rank, and writes refused because their target region is not (any more) registered: a test
//!   can assert that buffers are registered once, and that a write into a revoked buffer was
//!   rejected rather than placed.
mod device;

pub use device::DeviceMem;

use super::verbs::{Mr, PostError, Sge, Verbs, Wc};
use device::{nic_view, unpin};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// `rank` is lost after executing `after` data writes.
    Lose { rank: usize, after: u64 },
    /// The `nth` (0-based) data write of `rank` is cut to half its bytes.
    Short { rank: usize, nth: u64 },
    /// The `nth` data write of `rank` arrives with a flipped byte at offset `at`.
    Corrupt { rank: usize, nth: u64, at: usize },
}

/// Counters of an emulated world (per rank, up to 128 ranks).
#[derive(Debug)]
pub struct EmuStats {
    regs: Vec<AtomicU64>,
    deregs: Vec<AtomicU64>,
    rejected: Vec<AtomicU64>,
}

impl Default for EmuStats {
    fn default() -> Self {
        let v = || (0..super::verbs::MAX_RANKS).map(|_| AtomicU64::new(0)).collect();
        EmuStats { regs: v(), deregs: v(), rejected: v() }
    }
}

impl EmuStats {
    /// Successful `register` calls of `rank`.
    pub fn registrations(&self, rank: usize) -> u64 {
        self.regs[rank].load(Ordering::Relaxed)
    }
    /// `deregister` calls of `rank` that removed a region.
    pub fn deregistrations(&self, rank: usize) -> u64 {
        self.deregs[rank].load(Ordering::Relaxed)
    }
    /// Writes into `rank`'s memory refused because the rkey or range is not registered there
    /// (e.g. a late write into a revoked buffer): completed with a remote access error.
    pub fn rejected_writes(&self, rank: usize) -> u64 {
        self.rejected[rank].load(Ordering::Relaxed)
    }
}

#[derive(Clone, Debug)]
pub struct EmuConfig {
    pub adversarial: bool,
    pub seed: u64,
    /// Outstanding writes per QP before `QueueFull`.
    pub sq_depth: usize,
    /// Probability (per mille) that a post is refused with `QueueFull` anyway.
    pub queue_full_permille: u32,
    pub faults: Vec<Fault>,
    /// What [`Verbs::cache_registrations`] answers: `true` (the emulation's registrations
    /// follow the virtual range); `false` makes the protocol register per message, as on the
    /// `ibverbs` binding.
    pub cache_registrations: bool,
    /// Counters, shared by every endpoint of the world (clone the `Arc` before building it).
    pub stats: Arc<EmuStats>,
}

impl EmuConfig {
    pub fn fast() -> Self {
        EmuConfig { adversarial: false, seed: 1, sq_depth: 64, queue_full_permille: 0, faults: vec![], cache_registrations: true, stats: Arc::default() }
    }
    pub fn adversarial(seed: u64) -> Self {
        EmuConfig { adversarial: true, seed, sq_depth: 4, queue_full_permille: 100, faults: vec![], cache_registrations: true, stats: Arc::default() }
    }
}

struct Pending {
    wr_id: u64,
    sges: Vec<(usize, usize)>,
    raddr: u64,
    rkey: u32,
    imm: u32,
    len: usize,
    /// Flat byte ranges still to place, in placement order.
    pieces: Vec<(usize, usize)>,
    short: bool,
    corrupt: Option<usize>,
}

/// A rank's registered memory: read-locked while a peer's write is placed into it, so a copy
/// never blocks that rank's queues, and deregistration/loss waits for copies in flight.
struct Mem {
    /// rkey → (base, length, the NIC's address of `base`: `base` itself for host memory).
    regions: HashMap<u32, (usize, usize, usize)>,
    dead: Option<String>,
    /// Peers whose queue pair to this rank was disconnected: their writes are refused.
    cut: Vec<bool>,
}

struct Node {
    cq: VecDeque<Wc>,
    wire: Vec<VecDeque<Pending>>,
    sq_out: Vec<usize>,
    busy: Vec<bool>,
    /// Send queues that refuse work (`QueueFull`) until released: a test's congested QP.
    stalled: Vec<bool>,
    /// Writes to these peers are accepted but held on the wire (fast mode) until released: a
    /// slow link, for tests that need writes in flight.
    held: Vec<bool>,
    dead: Option<String>,
    data_writes: u64,
    rng: u64,
}

/// A counter on its own cache line (the ranks' counters are written by different threads).
#[repr(align(128))]
struct Padded(AtomicUsize);

struct World {
    nodes: Vec<Mutex<Node>>,
    /// Each node's completion-queue length, stored under its lock after every change: an empty
    /// queue is polled without taking the lock the other ranks' writes complete under (the
    /// spinning poller would otherwise contend with every completion, as a NIC's CQ doorbell
    /// does not).
    cq_len: Vec<Padded>,
    mems: Vec<RwLock<Mem>>,
    cfg: EmuConfig,
    keys: AtomicU32,
}

/// One rank's emulated endpoint.
pub struct EmuVerbs {
    w: Arc<World>,
    rank: usize,
}

fn rnd(s: &mut u64) -> u64 {
    // xorshift64*
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    s.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// An emulated world of `n` endpoints.
pub fn world(n: usize, cfg: EmuConfig) -> Vec<EmuVerbs> {
    let nodes = (0..n)
        .map(|r| {
            Mutex::new(Node {
                cq: VecDeque::new(),
                wire: (0..n).map(|_| VecDeque::new()).collect(),
                sq_out: vec![0; n],
                busy: vec![false; n],
                stalled: vec![false; n],
                held: vec![false; n],
                dead: None,
                data_writes: 0,
                rng: cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (r as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03) | 1,
            })
        })
        .collect();
    let mems = (0..n).map(|_| RwLock::new(Mem { regions: HashMap::new(), dead: None, cut: vec![false; n] })).collect();
    let cq_len = (0..n).map(|_| Padded(AtomicUsize::new(0))).collect();
    let w = Arc::new(World { nodes, cq_len, mems, cfg, keys: AtomicU32::new(1) });
    (0..n).map(|rank| EmuVerbs { w: w.clone(), rank }).collect()
}

impl EmuVerbs {
    /// The world's counters.
    pub fn stats(&self) -> &EmuStats {
        &self.w.cfg.stats
    }

    /// Make every post to `peer` fail with `QueueFull` (`true`) until released (`false`): a
    /// congested send queue, for tests that need a message held back.
    pub fn stall_queue(&self, peer: usize, on: bool) {
        self.w.nodes[self.rank].lock().unwrap().stalled[peer] = on;
    }

    /// Hold the writes this rank posts to `peer` in flight (`true`: accepted, neither placed
    /// nor completed) until released (`false`: placed and completed now, in order, or failed if
    /// the connection was cut meanwhile). Fast mode only (the adversarial one holds writes on
    /// its own).
    pub fn hold_writes(&self, peer: usize, on: bool) {
        self.w.nodes[self.rank].lock().unwrap().held[peer] = on;
        if on {
            return;
        }
        loop {
            let Some(p) = self.w.nodes[self.rank].lock().unwrap().wire[peer].pop_front() else { break };
            let res = p.pieces.iter().try_for_each(|&(a, l)| self.place(self.rank, peer, &p, a, l));
            self.complete(self.rank, peer, p, res);
        }
    }

    /// Mark this endpoint lost (as if its host went away).
    pub fn kill(&self, why: &str) {
        {
            let mut me = self.w.nodes[self.rank].lock().unwrap();
            me.dead.get_or_insert_with(|| why.to_string());
            for q in me.wire.iter_mut() {
                q.clear();
            }
        }
        let mut m = self.w.mems[self.rank].write().unwrap();
        m.dead.get_or_insert_with(|| why.to_string());
        for (_, (base, _, nic)) in m.regions.drain() {
            if nic != base {
                unpin(nic);
            }
        }
    }

    /// Copy flat range [a, a+l) of the write into the target; false if the target is gone or
    /// the range is outside its region.
    fn place(&self, src: usize, dst: usize, p: &Pending, a: usize, l: usize) -> Result<(), String> {
        // Both ranks' region locks, in rank order (writers take one lock only: no cycle), so a
        // disconnect at either end waits for this copy.
        let lo = self.w.mems[src.min(dst)].read().unwrap();
        let hi = self.w.mems[src.max(dst)].read().unwrap();
        let (t, s) = if dst < src { (&lo, &hi) } else { (&hi, &lo) };
        if let Some(why) = &t.dead {
            return Err(format!("transport retry counter exceeded (rank {dst} unreachable: {why})"));
        }
        if t.cut[src] || s.cut[dst] {
            return Err(format!("queue pair between ranks {src} and {dst} in error state (disconnected)"));
        }
        let Some(&(base, rlen, nic)) = t.regions.get(&p.rkey) else {
            self.w.cfg.stats.rejected[dst].fetch_add(1, Ordering::Relaxed);
            return Err(format!("remote access error: rkey {:#x} not registered at rank {dst}", p.rkey));
        };
        let ra = p.raddr as usize;
        if ra < base || ra.checked_add(p.len).is_none_or(|e| e > base + rlen) {
            self.w.cfg.stats.rejected[dst].fetch_add(1, Ordering::Relaxed);
            return Err(format!("remote access error: [{ra:#x}, +{}) outside rank {dst}'s region", p.len));
        }
        let ra = ra - base + nic; // where the NIC writes it
        // Walk the sges for the flat range.
        let (mut flat, mut done) = (0usize, 0usize);
        for &(sa, sl) in &p.sges {
            let (s0, s1) = (flat, flat + sl);
            let (c0, c1) = (a.max(s0), (a + l).min(s1));
            if c0 < c1 {
                // SAFETY: source inside a registered local region (checked at post, kept valid by
                // the Verbs contract until the send completion); target inside a registered
                // remote region (checked above, under the target's lock so it cannot go away).
                unsafe { std::ptr::copy_nonoverlapping((sa + (c0 - s0)) as *const u8, (ra + c0) as *mut u8, c1 - c0) };
                done += c1 - c0;
            }
            flat = s1;
        }
        debug_assert_eq!(done, l);
        if let Some(at) = p.corrupt {
            if at >= a && at < a + l {
                // SAFETY: at < p.len, inside the checked target range.
                unsafe { *((ra + at) as *mut u8) ^= 0x5a };
            }
        }
        Ok(())
    }

    /// Finish or fail the write at the head of QP `src` → `dst`.
    fn complete(&self, src: usize, dst: usize, p: Pending, res: Result<(), String>) {
        if res.is_ok() {
            let byte_len = if p.short { p.len / 2 } else { p.len } as u32;
            let mut t = self.w.nodes[dst].lock().unwrap();
            if t.dead.is_none() {
                t.cq.push_back(Wc::Recv { peer: src, imm: p.imm, byte_len });
                self.w.cq_len[dst].0.store(t.cq.len(), Ordering::Release);
            }
        }
        let mut me = self.w.nodes[src].lock().unwrap();
        me.sq_out[dst] -= 1;
        me.busy[dst] = false;
        if me.dead.is_none() {
            me.cq.push_back(Wc::Send { peer: dst, wr_id: p.wr_id, status: res });
            self.w.cq_len[src].0.store(me.cq.len(), Ordering::Release);
        }
    }

    /// Execute (part of) the queued writes of this rank's QPs and of the QPs into it, as a NIC
    /// would without the poster's help: adversarial mode only. One driver per QP at a time
    /// (`busy`), so each QP's writes complete in order.
    fn drive(&self) {
        let n = self.w.nodes.len();
        let start = {
            let mut me = self.w.nodes[self.rank].lock().unwrap();
            rnd(&mut me.rng) as usize
        };
        for i in 0..2 * n {
            let other = (start + i) % n;
            if other == self.rank {
                continue;
            }
            let (src, dst) = if i < n { (self.rank, other) } else { (other, self.rank) };
            // Take a random number of pieces of the head write (maybe all, maybe a few).
            let (mut p, k) = {
                let mut sn = self.w.nodes[src].lock().unwrap();
                if sn.dead.is_some() || sn.busy[dst] {
                    continue;
                }
                let r = rnd(&mut sn.rng);
                let Some(p) = sn.wire[dst].pop_front() else { continue };
                sn.busy[dst] = true;
                let np = p.pieces.len();
                let k = if r.is_multiple_of(4) { np } else { 1 + (r as usize >> 8) % np.max(1) };
                (p, k.min(np))
            };
            let mut res = Ok(());
            for _ in 0..k {
                let (a, l) = p.pieces.pop().unwrap();
                if let Err(e) = self.place(src, dst, &p, a, l) {
                    res = Err(e);
                    break;
                }
            }
            if res.is_err() || p.pieces.is_empty() {
                self.complete(src, dst, p, res);
            } else {
                let mut sn = self.w.nodes[src].lock().unwrap();
                sn.busy[dst] = false;
                if sn.dead.is_none() {
                    sn.wire[dst].push_front(p);
                }
            }
        }
    }
}

impl Drop for EmuVerbs {
    fn drop(&mut self) {
        self.kill("its endpoint was closed");
    }
}

impl Verbs for EmuVerbs {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.w.nodes.len()
    }

    unsafe fn register(&self, addr: *mut u8, len: usize) -> Result<Mr, String> {
        let mut me = self.w.mems[self.rank].write().unwrap();
        if me.dead.is_some() {
            return Err("device lost".into());
        }
        let nic = nic_view(addr as usize, len, true)?;
        let key = self.w.keys.fetch_add(1, Ordering::Relaxed);
        me.regions.insert(key, (addr as usize, len, nic));
        self.w.cfg.stats.regs[self.rank].fetch_add(1, Ordering::Relaxed);
        Ok(Mr { addr: addr as u64, len, lkey: key, rkey: key })
    }

    /// Takes the region lock for writing: returns only after every write being placed into the
    /// region finished; later writes to it are refused (remote access error).
    fn deregister(&self, mr: &Mr) {
        if let Some((base, _, nic)) = self.w.mems[self.rank].write().unwrap().regions.remove(&mr.lkey) {
            self.w.cfg.stats.deregs[self.rank].fetch_add(1, Ordering::Relaxed);
            if nic != base {
                unpin(nic);
            }
        }
    }

    fn cache_registrations(&self) -> bool {
        self.w.cfg.cache_registrations
    }

    /// Takes this rank's region lock for writing, so writes from `peer` being placed finish
    /// first; later ones, and this rank's writes to `peer`, fail. This rank's writes to `peer`
    /// still on the wire complete at once with a flush error, as a NIC flushes a queue pair in
    /// the error state.
    fn disconnect(&self, peer: usize) -> Result<(), String> {
        {
            let mut m = self.w.mems[self.rank].write().unwrap();
            let c = m.cut.get_mut(peer).ok_or_else(|| format!("no queue pair to rank {peer}"))?;
            *c = true;
        }
        let flushed: Vec<Pending> = self.w.nodes[self.rank].lock().unwrap().wire[peer].drain(..).collect();
        for p in flushed {
            self.complete(self.rank, peer, p, Err("work request flushed: queue pair in error state".into()));
        }
        Ok(())
    }

    unsafe fn post_write_imm(&self, peer: usize, wr_id: u64, sges: &[Sge], raddr: u64, rkey: u32, imm: u32) -> Result<(), PostError> {
        let cfg = &self.w.cfg;
        if peer >= self.w.nodes.len() || peer == self.rank {
            return Err(PostError::Fatal(format!("no queue pair to rank {peer}")));
        }
        if sges.len() > self.max_sge() {
            return Err(PostError::Fatal(format!("{} sges > max {}", sges.len(), self.max_sge())));
        }
        let mut me = self.w.nodes[self.rank].lock().unwrap();
        if let Some(why) = &me.dead {
            return Err(PostError::Fatal(format!("local queue pair in error state: {why}")));
        }
        if me.sq_out[peer] >= cfg.sq_depth || me.stalled[peer] {
            return Err(PostError::QueueFull);
        }
        if cfg.queue_full_permille > 0 && (rnd(&mut me.rng) % 1000) < cfg.queue_full_permille as u64 {
            return Err(PostError::QueueFull);
        }
        let mut v = Vec::with_capacity(sges.len());
        let mut len = 0usize;
        let mem = self.w.mems[self.rank].read().unwrap();
        for s in sges {
            let Some(&(b, l, nic)) = mem.regions.get(&s.lkey) else {
                return Err(PostError::Fatal(format!("local protection error: lkey {:#x}", s.lkey)));
            };
            let a = s.addr as usize;
            if a < b || a + s.len as usize > b + l {
                return Err(PostError::Fatal(format!("local length error: sge [{a:#x}, +{}) outside its region", s.len)));
            }
            v.push((a - b + nic, s.len as usize));
            len += s.len as usize;
        }
        drop(mem);
        let mut p = Pending { wr_id, sges: v, raddr, rkey, imm, len, pieces: vec![], short: false, corrupt: None };
        if len > 0 {
            let nth = me.data_writes;
            me.data_writes += 1;
            for f in &cfg.faults {
                match *f {
                    Fault::Lose { rank, after } if rank == self.rank && nth >= after => {
                        drop(me);
                        self.kill("lost (injected fault)");
                        return Err(PostError::Fatal("local queue pair in error state: lost (injected fault)".into()));
                    }
                    Fault::Short { rank, nth: k } if rank == self.rank && k == nth => p.short = true,
                    Fault::Corrupt { rank, nth: k, at } if rank == self.rank && k == nth => p.corrupt = Some(at % len),
                    _ => {}
                }
            }
        }
        let placed = if p.short { len / 2 } else { len };
        me.sq_out[peer] += 1;
        if cfg.adversarial {
            // Shuffled pieces of 1..=len/4+1 bytes, placed back to front of this list.
            let mut a = 0;
            while a < placed {
                let l = (1 + rnd(&mut me.rng) as usize % (placed / 4 + 1)).min(placed - a);
                p.pieces.push((a, l));
                a += l;
            }
            for i in (1..p.pieces.len()).rev() {
                let j = rnd(&mut me.rng) as usize % (i + 1);
                p.pieces.swap(i, j);
            }
            me.wire[peer].push_back(p);
            return Ok(());
        }
        if me.held[peer] {
            p.pieces.push((0, placed));
            me.wire[peer].push_back(p);
            return Ok(());
        }
        drop(me);
        let res = self.place(self.rank, peer, &p, 0, placed);
        self.complete(self.rank, peer, p, res);
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Wc>, max: usize) -> usize {
        if self.w.cfg.adversarial {
            self.drive();
        }
        if !self.w.cfg.adversarial && self.w.cq_len[self.rank].0.load(Ordering::Acquire) == 0 {
            return 0;
        }
        let mut me = self.w.nodes[self.rank].lock().unwrap();
        if !self.w.cfg.adversarial {
            let k = me.cq.len().min(max);
            out.extend(me.cq.drain(..k));
            self.w.cq_len[self.rank].0.store(me.cq.len(), Ordering::Release);
            return k;
        }
        // Random interleaving across (kind, QP), keeping each QP's order; a random count.
        let mut want = 1 + rnd(&mut me.rng) as usize % max.max(1);
        let mut buckets: Vec<VecDeque<Wc>> = Vec::new();
        let mut idx: HashMap<(bool, usize), usize> = HashMap::new();
        for wc in me.cq.drain(..) {
            let key = match &wc {
                Wc::Send { peer, .. } => (false, *peer),
                Wc::Recv { peer, .. } => (true, *peer),
            };
            let i = *idx.entry(key).or_insert_with(|| {
                buckets.push(VecDeque::new());
                buckets.len() - 1
            });
            buckets[i].push_back(wc);
        }
        let mut k = 0;
        while want > 0 && !buckets.is_empty() {
            let b = rnd(&mut me.rng) as usize % buckets.len();
            out.push(buckets[b].pop_front().unwrap());
            k += 1;
            want -= 1;
            if buckets[b].is_empty() {
                buckets.swap_remove(b);
            }
        }
        // Put the rest back (each QP's order kept).
        for b in buckets {
            me.cq.extend(b);
        }
        self.w.cq_len[self.rank].0.store(me.cq.len(), Ordering::Release);
        k
    }
}
