//! The real verbs binding (cargo feature `rdma`): [`IbVerbs`] implements [`Verbs`] on libibverbs.
//!
//! Three layers, like cudarc's sys / result / safe split:
//! * `ibverbs_sys` (the raw bindgen layer of the `ibverbs` project). The fast-path functions of
//!   `verbs.h` (`ibv_post_send`, `ibv_post_recv`, `ibv_poll_cq`) are `static inline` there, so
//!   they are called as `verbs.h` does: through the device context's ops table.
//! * [`sys`]: one thin unsafe wrapper per call, returning `Result<_, String>` with the errno text.
//! * `device` (re-exported here): which device and port a process uses ([`IbConfig`]), found
//!   by opening the devices and querying their ports and GIDs ([`probe`], [`PortInfo`]).
//! * [`IbVerbs`]: owns the device context, one protection domain, a send and a receive
//!   completion queue (two, so that a failed completion can be told apart: the opcode of an
//!   error completion is undefined), and one reliable-connected queue pair per peer; implements
//!   [`Verbs`].
//!
//! Nothing here panics on a missing device or a failing call: every failure is a `String`
//! naming the call and the device, which the bootstrap turns into an [`crate::Error`].
//!
//! Receive side: an RDMA WRITE WITH IMMEDIATE consumes one posted receive on the target QP. Each
//! QP starts with `rq_depth` zero-length receives and gets one back per receive completion (in
//! `poll`). The protocol bounds what can be outstanding on one QP (`slots` data chunks plus at
//! most `slots` credit returns plus one abort), so `rq_depth = 2 * slots + 16` never runs dry;
//! if it ever did, the QP's RNR retry (set to "infinite") makes the writer wait, not fail.
mod device;
pub mod sys;

pub use device::{probe, IbConfig, PortInfo};

use super::verbs::{Mr, PostError, Sge, Verbs, Wc};
use super::wire::QpInfo;
use device::open_port;
use ibverbs_sys as ffi;
use std::collections::HashMap;
use std::sync::Mutex;

/// `wr_id` of the synthetic failed `Wc::Send` that reports a failure seen on a QP's receive side
/// (not a posted request: the protocol only uses it to fail that peer).
pub const RECV_SIDE_FAILURE: u64 = u64::MAX;

/// Queue geometry of an endpoint.
#[derive(Clone, Copy, Debug)]
pub struct Queues {
    /// Send work requests per QP (a full queue is back-pressure).
    pub sq_depth: u32,
    /// Zero-length receives kept posted per QP.
    pub rq_depth: u32,
}

impl Queues {
    /// What the protocol with `slots` receive slots per peer needs.
    pub fn for_slots(slots: usize) -> Queues {
        let d = (2 * slots + 16).min(1 << 14) as u32;
        Queues { sq_depth: d, rq_depth: d }
    }
}

struct Qp {
    qp: *mut ffi::ibv_qp,
    psn: u32,
}

/// One rank's verbs endpoint on a real device.
pub struct IbVerbs {
    rank: usize,
    n: usize,
    ctx: *mut ffi::ibv_context,
    pd: *mut ffi::ibv_pd,
    scq: *mut ffi::ibv_cq,
    rcq: *mut ffi::ibv_cq,
    qps: Vec<Option<Qp>>,
    peer_of_qpn: HashMap<u32, usize>,
    port: PortInfo,
    max_sge: usize,
    queues: Queues,
    relaxed: std::sync::atomic::AtomicBool,
    /// Registered regions by lkey.
    mrs: Mutex<HashMap<u32, usize>>,
    /// Completion scratch (and the poll lock).
    wcs: Mutex<Vec<ffi::ibv_wc>>,
}

// SAFETY: libibverbs objects may be used from any thread (the library and providers lock
// internally); the Rust-side state is behind mutexes.
unsafe impl Send for IbVerbs {}
// SAFETY: as for Send: the verbs calls made through `&IbVerbs` are thread-safe in libibverbs,
// and every field mutated through `&self` is an atomic or behind a mutex.
unsafe impl Sync for IbVerbs {}

fn random_psn(salt: u64) -> u32 {
    let mut b = [0u8; 4];
    use std::io::Read;
    if std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
        b = ((t ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)) as u32).to_le_bytes();
    }
    u32::from_le_bytes(b) & 0x00ff_ffff
}

impl IbVerbs {
    /// Open the device, create the PD, CQs and one RC QP per peer (in INIT, receives posted).
    /// Then exchange [`Self::local_info`] with every peer and call [`Self::connect_peer`].
    pub fn open(rank: usize, n: usize, cfg: &IbConfig, q: Queues) -> Result<IbVerbs, String> {
        if rank >= n {
            return Err(format!("rank {rank} of {n}"));
        }
        let (ctx, port, da) = open_port(cfg)?;
        let mut v = IbVerbs {
            rank,
            n,
            ctx,
            pd: std::ptr::null_mut(),
            scq: std::ptr::null_mut(),
            rcq: std::ptr::null_mut(),
            qps: (0..n).map(|_| None).collect(),
            peer_of_qpn: HashMap::new(),
            port,
            max_sge: (da.max_sge.max(1) as usize).min(2),
            queues: Queues { sq_depth: q.sq_depth.clamp(1, da.max_qp_wr.max(1) as u32), rq_depth: q.rq_depth.clamp(1, da.max_qp_wr.max(1) as u32) },
            relaxed: std::sync::atomic::AtomicBool::new(true),
            mrs: Mutex::new(HashMap::new()),
            wcs: Mutex::new(vec![ffi::ibv_wc::default(); 64]),
        };
        let dev = v.port.device.clone();
        // SAFETY: every pointer is checked before use and owned by `v`, whose Drop releases
        // whatever was created if a later step fails.
        unsafe {
            v.pd = ffi::ibv_alloc_pd(ctx);
            if v.pd.is_null() {
                return Err(format!("ibv_alloc_pd({dev}): {}", sys::errno_text(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))));
            }
            let peers = (n - 1).max(1) as i64;
            let max_cqe = da.max_cqe.max(1) as i64;
            let scq_n = (peers * v.queues.sq_depth as i64 + 16).min(max_cqe);
            let rcq_n = (peers * v.queues.rq_depth as i64 + 16).min(max_cqe);
            if scq_n < peers * v.queues.sq_depth as i64 || rcq_n < peers * v.queues.rq_depth as i64 {
                // A CQ that can overflow is fatal on verbs: shrink the queues instead.
                let per = ((max_cqe - 16) / peers).max(1) as u32;
                v.queues.sq_depth = v.queues.sq_depth.min(per);
                v.queues.rq_depth = v.queues.rq_depth.min(per);
            }
            for (cq, len, what) in [(&mut v.scq, scq_n, "send"), (&mut v.rcq, rcq_n, "receive")] {
                *cq = ffi::ibv_create_cq(ctx, len as i32, std::ptr::null_mut(), std::ptr::null_mut(), 0);
                if cq.is_null() {
                    return Err(format!("ibv_create_cq({dev}, {what}, {len} entries): {}", sys::errno_text(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))));
                }
            }
            for p in 0..n {
                if p == rank {
                    continue;
                }
                let mut ia: ffi::ibv_qp_init_attr = std::mem::zeroed();
                ia.send_cq = v.scq;
                ia.recv_cq = v.rcq;
                ia.qp_type = ffi::ibv_qp_type::IBV_QPT_RC;
                ia.sq_sig_all = 0;
                ia.cap.max_send_wr = v.queues.sq_depth;
                ia.cap.max_recv_wr = v.queues.rq_depth;
                ia.cap.max_send_sge = v.max_sge as u32;
                ia.cap.max_recv_sge = 1;
                let qp = ffi::ibv_create_qp(v.pd, &mut ia);
                if qp.is_null() {
                    return Err(format!("ibv_create_qp({dev}, RC, for rank {p}): {}", sys::errno_text(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))));
                }
                v.qps[p] = Some(Qp { qp, psn: random_psn((rank * n + p) as u64) });
                v.peer_of_qpn.insert((*qp).qp_num, p);
                let mut a: ffi::ibv_qp_attr = std::mem::zeroed();
                a.qp_state = ffi::ibv_qp_state::IBV_QPS_INIT;
                a.pkey_index = 0;
                a.port_num = v.port.port;
                a.qp_access_flags = (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE).0;
                let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
                    | ffi::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                    | ffi::ibv_qp_attr_mask::IBV_QP_PORT
                    | ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
                let rc = ffi::ibv_modify_qp(qp, &mut a, mask.0 as i32);
                if rc != 0 {
                    return Err(format!("ibv_modify_qp({dev}, QP for rank {p} -> INIT): {}", sys::errno_text(rc)));
                }
                for _ in 0..v.queues.rq_depth {
                    v.post_one_recv(p).map_err(|e| format!("{dev}: {e}"))?;
                }
            }
        }
        tracing::debug!(rank, "rdma: opened {} with {} QPs (send queue {}, receive queue {})", v.port, n - 1, v.queues.sq_depth, v.queues.rq_depth);
        Ok(v)
    }

    /// The port in use.
    pub fn port(&self) -> &PortInfo {
        &self.port
    }

    pub fn queues(&self) -> Queues {
        self.queues
    }

    /// Whether registrations still ask for relaxed ordering (false once the library refused
    /// the flag; the library silently drops it on devices without it).
    pub fn relaxed_ordering(&self) -> bool {
        self.relaxed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// What `peer` needs to connect its QP to ours.
    pub fn local_info(&self, peer: usize) -> Option<QpInfo> {
        let q = self.qps.get(peer)?.as_ref()?;
        // SAFETY: the QP is live while self is.
        let qpn = unsafe { (*q.qp).qp_num };
        Some(QpInfo { qpn, psn: q.psn, lid: self.port.lid, gid: self.port.gid, mtu: self.port.mtu })
    }

    /// Move our QP for `peer` to RTR then RTS, connected to the peer's QP `remote`.
    pub fn connect_peer(&self, peer: usize, remote: &QpInfo) -> Result<(), String> {
        let q = self.qps.get(peer).and_then(|q| q.as_ref()).ok_or_else(|| format!("no QP for rank {peer}"))?;
        let dev = &self.port.device;
        // A GRH is needed on RoCE, and on InfiniBand across subnets (no LID) or when asked for.
        let global = self.port.roce || remote.lid == 0 || self.port.lid == 0;
        if global && remote.gid.iter().all(|&b| b == 0) {
            return Err(format!("rank {peer} sent no GID, but this port ({}) needs one", self.port));
        }
        // SAFETY: the QP is live; the attrs are plain data.
        unsafe {
            let mut a: ffi::ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTR;
            a.path_mtu = self.port.mtu.min(remote.mtu).max(1) as _;
            a.dest_qp_num = remote.qpn;
            a.rq_psn = remote.psn;
            a.max_dest_rd_atomic = 1;
            a.min_rnr_timer = 12; // 0.64 ms
            a.ah_attr.dlid = remote.lid;
            a.ah_attr.sl = 0;
            a.ah_attr.src_path_bits = 0;
            a.ah_attr.port_num = self.port.port;
            if global {
                a.ah_attr.is_global = 1;
                a.ah_attr.grh.dgid.raw = remote.gid;
                a.ah_attr.grh.sgid_index = self.port.gid_index as u8;
                a.ah_attr.grh.hop_limit = 64;
                a.ah_attr.grh.traffic_class = 0;
                a.ah_attr.grh.flow_label = 0;
            }
            let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
                | ffi::ibv_qp_attr_mask::IBV_QP_AV
                | ffi::ibv_qp_attr_mask::IBV_QP_PATH_MTU
                | ffi::ibv_qp_attr_mask::IBV_QP_DEST_QPN
                | ffi::ibv_qp_attr_mask::IBV_QP_RQ_PSN
                | ffi::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | ffi::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
            let rc = ffi::ibv_modify_qp(q.qp, &mut a, mask.0 as i32);
            if rc != 0 {
                return Err(format!("ibv_modify_qp({dev}, QP for rank {peer} -> RTR, remote QPN {:#x} LID {}): {}", remote.qpn, remote.lid, sys::errno_text(rc)));
            }
            let mut a: ffi::ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ffi::ibv_qp_state::IBV_QPS_RTS;
            a.timeout = 14; // 4.096 us * 2^14 = 67 ms per try
            a.retry_cnt = 7;
            a.rnr_retry = 7; // infinite: a receive queue that ran dry only delays
            a.sq_psn = q.psn;
            a.max_rd_atomic = 1;
            let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
                | ffi::ibv_qp_attr_mask::IBV_QP_TIMEOUT
                | ffi::ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                | ffi::ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                | ffi::ibv_qp_attr_mask::IBV_QP_SQ_PSN
                | ffi::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
            let rc = ffi::ibv_modify_qp(q.qp, &mut a, mask.0 as i32);
            if rc != 0 {
                return Err(format!("ibv_modify_qp({dev}, QP for rank {peer} -> RTS): {}", sys::errno_text(rc)));
            }
        }
        Ok(())
    }

    /// Post one zero-length receive on the QP of `peer` (consumed by one incoming write-with-imm).
    fn post_one_recv(&self, peer: usize) -> Result<(), String> {
        let q = self.qps.get(peer).and_then(|q| q.as_ref()).ok_or_else(|| format!("no QP for rank {peer}"))?;
        // SAFETY: zero-sge receive on a live QP.
        unsafe {
            let mut wr: ffi::ibv_recv_wr = std::mem::zeroed();
            wr.wr_id = peer as u64;
            wr.sg_list = std::ptr::null_mut();
            wr.num_sge = 0;
            let rc = sys::post_recv(q.qp, &mut wr);
            if rc != 0 {
                return Err(format!("ibv_post_recv (QP for rank {peer}): {}", sys::errno_text(rc)));
            }
        }
        Ok(())
    }
}

impl Drop for IbVerbs {
    fn drop(&mut self) {
        // SAFETY: every object was created by us and is destroyed once, children first.
        unsafe {
            for q in self.qps.iter_mut().filter_map(Option::take) {
                let rc = ffi::ibv_destroy_qp(q.qp);
                if rc != 0 {
                    tracing::warn!("rdma: ibv_destroy_qp: {}", sys::errno_text(rc));
                }
            }
            for (_, mr) in self.mrs.get_mut().map(std::mem::take).unwrap_or_default() {
                ffi::ibv_dereg_mr(mr as *mut ffi::ibv_mr);
            }
            for cq in [self.scq, self.rcq] {
                if !cq.is_null() {
                    let rc = ffi::ibv_destroy_cq(cq);
                    if rc != 0 {
                        tracing::warn!("rdma: ibv_destroy_cq: {}", sys::errno_text(rc));
                    }
                }
            }
            if !self.pd.is_null() {
                let rc = ffi::ibv_dealloc_pd(self.pd);
                if rc != 0 {
                    tracing::warn!("rdma: ibv_dealloc_pd: {}", sys::errno_text(rc));
                }
            }
            sys::close(self.ctx);
        }
    }
}

impl Verbs for IbVerbs {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.n
    }
    fn max_sge(&self) -> usize {
        self.max_sge
    }

    unsafe fn register(&self, addr: *mut u8, len: usize) -> Result<Mr, String> {
        use std::sync::atomic::Ordering;
        let base = (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE).0;
        let len = len.max(1); // a zero-length region cannot be registered; nothing reads the byte
        let mut mr: *mut ffi::ibv_mr = std::ptr::null_mut();
        let relaxed = self.relaxed.load(Ordering::Relaxed);
        if relaxed {
            // Relaxed ordering is an "optional" access flag: the library drops it where the
            // device lacks it; a library too old to know it fails the call, and we stop asking
            // (only then: a registration refused for another reason, e.g. device memory without
            // peer-memory support, fails the plain call too).
            let ro = base | ffi::ibv_access_flags::IBV_ACCESS_RELAXED_ORDERING.0;
            // SAFETY: `pd` is live while `self` is; the memory stays valid until `deregister`
            // (this function's contract).
            mr = unsafe { ffi::ibv_reg_mr_iova2(self.pd, addr as *mut _, len, addr as u64, ro) };
        }
        if mr.is_null() {
            // SAFETY: as above.
            mr = unsafe { ffi::ibv_reg_mr(self.pd, addr as *mut _, len, base as i32) };
            if relaxed && !mr.is_null() {
                self.relaxed.store(false, Ordering::Relaxed);
            }
        }
        if mr.is_null() {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
            let hint = if e == libc::ENOMEM || e == libc::EPERM { " (locked-memory limit? raise `ulimit -l` to unlimited)" } else { "" };
            let why = format!("ibv_reg_mr({} bytes at {addr:p} on {}): {}{hint}", len, self.port.device, sys::errno_text(e));
            // Device memory without nvidia-peermem: register it through a dma-buf of the GPU.
            mr = match super::dmabuf_exporter().and_then(|f| f(addr as u64, len)) {
                None => return Err(why),
                Some(Err(x)) => return Err(format!("{why}; dma-buf export: {x}")),
                Some(Ok((fd, off))) => {
                    // SAFETY: `pd` is live; `fd` is the exporter's new dma-buf descriptor for a
                    // range holding `[addr, +len)` at `off`, valid until `deregister`.
                    let m = unsafe { ffi::ibv_reg_dmabuf_mr(self.pd, off, len, addr as u64, fd, base as i32) };
                    let e2 = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                    // SAFETY: the descriptor is ours (the exporter hands it over) and closed once;
                    // the registration holds its own reference to the dma-buf.
                    unsafe { libc::close(fd) };
                    if m.is_null() {
                        return Err(format!("{why}; ibv_reg_dmabuf_mr: {}", sys::errno_text(e2)));
                    }
                    m
                }
            };
        }
        // SAFETY: `mr` is a non-NULL region the library returned, live until deregistered.
        let (lkey, rkey) = unsafe { ((*mr).lkey, (*mr).rkey) };
        self.mrs.lock().unwrap_or_else(|e| e.into_inner()).insert(lkey, mr as usize);
        Ok(Mr { addr: addr as u64, len, lkey, rkey })
    }

    fn deregister(&self, mr: &Mr) {
        let Some(p) = self.mrs.lock().unwrap_or_else(|e| e.into_inner()).remove(&mr.lkey) else { return };
        // SAFETY: registered by us, removed from the table: deregistered once.
        let rc = unsafe { ffi::ibv_dereg_mr(p as *mut ffi::ibv_mr) };
        if rc != 0 {
            tracing::warn!("rdma: ibv_dereg_mr: {}", sys::errno_text(rc));
        }
    }

    unsafe fn post_write_imm(&self, peer: usize, wr_id: u64, sges: &[Sge], raddr: u64, rkey: u32, imm: u32) -> Result<(), PostError> {
        let Some(q) = self.qps.get(peer).and_then(|q| q.as_ref()) else {
            return Err(PostError::Fatal(format!("no queue pair to rank {peer}")));
        };
        if sges.len() > self.max_sge {
            return Err(PostError::Fatal(format!("{} scatter/gather entries (device allows {})", sges.len(), self.max_sge)));
        }
        let mut sg = [ffi::ibv_sge { addr: 0, length: 0, lkey: 0 }; 2];
        for (d, s) in sg.iter_mut().zip(sges) {
            *d = ffi::ibv_sge { addr: s.addr, length: s.len, lkey: s.lkey };
        }
        // SAFETY: a plain C struct of integers, pointers and unions of them: all-zero is valid.
        let mut wr: ffi::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.next = std::ptr::null_mut();
        wr.sg_list = if sges.is_empty() { std::ptr::null_mut() } else { sg.as_mut_ptr() };
        wr.num_sge = sges.len() as i32;
        wr.opcode = ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM;
        wr.send_flags = ffi::ibv_send_flags::IBV_SEND_SIGNALED.0;
        wr.__bindgen_anon_1.imm_data = imm.to_be();
        wr.wr.rdma.remote_addr = raddr;
        wr.wr.rdma.rkey = rkey;
        // SAFETY: the QP lives as long as `self`; `wr` is well formed and its sges lie in
        // regions registered here, valid until the completion (this function's contract).
        match unsafe { sys::post_send(q.qp, &mut wr) } {
            0 => Ok(()),
            rc if rc == libc::ENOMEM || rc == -libc::ENOMEM => Err(PostError::QueueFull),
            rc => Err(PostError::Fatal(format!("ibv_post_send to rank {peer}: {}", sys::errno_text(rc)))),
        }
    }

    fn disconnect(&self, peer: usize) -> Result<(), String> {
        let q = self.qps.get(peer).and_then(|q| q.as_ref()).ok_or_else(|| format!("no QP for rank {peer}"))?;
        // SAFETY: a state change of a live QP; its outstanding work is flushed with errors.
        let rc = unsafe {
            let mut a: ffi::ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ffi::ibv_qp_state::IBV_QPS_ERR;
            ffi::ibv_modify_qp(q.qp, &mut a, ffi::ibv_qp_attr_mask::IBV_QP_STATE.0 as i32)
        };
        if rc != 0 {
            return Err(format!("ibv_modify_qp({}, QP for rank {peer} -> ERR): {}", self.port.device, sys::errno_text(rc)));
        }
        Ok(())
    }

    fn poll(&self, out: &mut Vec<Wc>, max: usize) -> usize {
        let mut wcs = self.wcs.lock().unwrap_or_else(|e| e.into_inner());
        let mut got = 0;
        // Half the budget to arrivals first (they return credits and complete receives), the
        // rest to send completions: neither queue starves the other.
        for (i, (cq, send)) in [(self.rcq, false), (self.scq, true)].into_iter().enumerate() {
            let budget = if i == 0 { max.div_ceil(2) } else { max.saturating_sub(got) };
            let want = budget.min(wcs.len());
            if want == 0 {
                break;
            }
            // SAFETY: live CQ, buffer of at least `want` entries.
            let k = unsafe { sys::poll_cq(cq, want as i32, wcs.as_mut_ptr()) };
            if k < 0 {
                // A CQ error breaks every QP on it: report it against every peer.
                let why = format!("ibv_poll_cq ({} queue) on {}: {}", if send { "send" } else { "receive" }, self.port.device, sys::errno_text(k));
                for p in (0..self.n).filter(|&p| p != self.rank) {
                    out.push(Wc::Send { peer: p, wr_id: RECV_SIDE_FAILURE, status: Err(why.clone()) });
                    got += 1;
                }
                return got;
            }
            for wc in &wcs[..k as usize] {
                let peer = self.peer_of_qpn.get(&wc.qp_num).copied().unwrap_or(usize::MAX);
                if send {
                    let status = match wc.error() {
                        None => Ok(()),
                        Some((s, vendor)) => Err(format!("{} (vendor error {vendor:#x})", sys::wc_status_text(s))),
                    };
                    out.push(Wc::Send { peer, wr_id: wc.wr_id(), status });
                    got += 1;
                    continue;
                }
                if peer == usize::MAX {
                    continue;
                }
                match (wc.error(), wc.imm_data()) {
                    (None, Some(imm)) if wc.opcode() == ffi::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => {
                        let refill = self.post_one_recv(peer);
                        out.push(Wc::Recv { peer, imm: u32::from_be(imm), byte_len: wc.len() as u32 });
                        got += 1;
                        if let Err(e) = refill {
                            out.push(Wc::Send { peer, wr_id: RECV_SIDE_FAILURE, status: Err(e) });
                            got += 1;
                        }
                    }
                    // Flushed receives: the QP went to error, which its send side reports too.
                    (Some((s, _)), _) if s == ffi::ibv_wc_status::IBV_WC_WR_FLUSH_ERR => {}
                    (Some((s, vendor)), _) => {
                        out.push(Wc::Send { peer, wr_id: RECV_SIDE_FAILURE, status: Err(format!("receive completion: {} (vendor error {vendor:#x})", sys::wc_status_text(s))) });
                        got += 1;
                    }
                    (None, _) => {
                        out.push(Wc::Send { peer, wr_id: RECV_SIDE_FAILURE, status: Err(format!("unexpected receive completion (opcode {}, no immediate)", wc.opcode())) });
                        got += 1;
                    }
                }
            }
        }
        got
    }
}
