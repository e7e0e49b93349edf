//! The primitive layer every backend implements, and that the collectives are written over.
//!
//! The shape follows RDMA: a receiver *registers* a landing buffer for one message (`post_recv`:
//! on verbs, register the region and advertise its rkey), a sender *writes* into the peer's
//! registered buffer and notifies (`send`: on verbs, RDMA WRITE_WITH_IMM with the tag in the
//! immediate), and both sides *wait for completion* (`wait_recv`, `wait_send`: an imm-count
//! completion). Messages are matched by `(peer, Tag)`, never by arrival order, so several
//! collectives (on several communicators) can be in flight from one rank at once.
use crate::error::Result;
use std::time::{Duration, Instant};

/// Identifies one message between two ranks: communicator context, collective sequence number
/// on that communicator, and round inside the collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tag {
    pub ctx: u64,
    pub seq: u64,
    pub round: u32,
}

/// Deadline and name of the operation on whose behalf a primitive waits.
///
/// The deadline is `timeout` after the first look at it: the clock is read when a primitive
/// first has to wait (or checks the deadline), not when the operation starts, so an operation
/// whose every message is ready at once never reads it (a clock read costs about as much as
/// a small message's whole software path).
#[derive(Clone, Debug)]
pub struct Wait {
    pub op: &'static str,
    pub timeout: Duration,
    start: std::sync::OnceLock<Instant>,
}

impl Wait {
    pub fn new(op: &'static str, timeout: Duration) -> Self {
        Wait { op, timeout, start: std::sync::OnceLock::new() }
    }

    /// When this operation's waits time out (fixed at the first call).
    pub fn deadline(&self) -> Instant {
        *self.start.get_or_init(Instant::now) + self.timeout
    }
}

/// What [`Fabric::send_now`] did with a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// The message has left the send buffer (copied out): nothing reads it later, and there
    /// is no `wait_send` to make for it.
    Done,
    /// Sent as by [`Fabric::send`]: `wait_send` follows.
    Pending,
}

/// Copies `len` bytes from address `src` to address `dst` of memory the CPU must not touch,
/// finished when it returns: what an in-process fabric moves device memory with.
pub type DirectCopy = std::sync::Arc<dyn Fn(u64, u64, usize) -> Result<()> + Send + Sync>;

/// One rank's endpoint into a world of `size()` ranks. Ranks here are world ranks.
///
/// Contract used by the collectives (and required of a new backend):
/// * every message has exactly one `post_recv` on the receiver and one `send` on the sender,
///   in either order; the receiver's posted length is an upper bound, checked before any byte lands;
/// * a collective posts all receives of a round before sending in it, so a backend may make
///   `send` wait until the peer has posted (rendezvous);
/// * nothing is ever sent to oneself.
pub trait Fabric: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// "local", "shm" or "tcp".
    fn name(&self) -> &'static str;
    /// Register `len` bytes at `buf` as the landing zone of message `(src, tag)`.
    ///
    /// # Safety
    /// `buf..buf+len` must stay valid for writes, and untouched by the caller, until
    /// `wait_recv(src, tag)` returned `Ok` or `cancel_recv(src, tag)` returned.
    unsafe fn post_recv(&self, src: usize, tag: Tag, buf: *mut u8, len: usize, w: &Wait) -> Result<()>;
    /// Write `len` bytes at `data` into the buffer `dst` posted for `tag`, then notify.
    ///
    /// # Safety
    /// `data..data+len` must stay valid for reads until `wait_send(dst, tag)` returned
    /// (or until either call returned an error; a backend reading it later only reads).
    unsafe fn send(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<()>;
    /// `send`, saying whether the message already left `data` ([`Sent::Done`]: then no
    /// `wait_send` may follow) or a `wait_send` must ([`Sent::Pending`]). What the collectives
    /// call: a backend that copies a small message out at once (shm's eager ring) then skips
    /// recording a completion that its caller would look up again straight away.
    ///
    /// # Safety
    /// As `send` (with `Sent::Done`, `data` is not read after this returns).
    unsafe fn send_now(&self, dst: usize, tag: Tag, data: *const u8, len: usize, w: &Wait) -> Result<Sent> {
        // SAFETY: the caller holds `send`'s contract (this function's).
        unsafe { self.send(dst, tag, data, len, w) }.map(|()| Sent::Pending)
    }
    /// Wait until the send buffer of `(dst, tag)` may be reused.
    fn wait_send(&self, dst: usize, tag: Tag, w: &Wait) -> Result<()>;
    /// Wait until message `(src, tag)` has landed; returns its length in bytes.
    fn wait_recv(&self, src: usize, tag: Tag, w: &Wait) -> Result<usize>;
    /// Withdraw a posted buffer (on an error path). Returns once no writer can touch it any more,
    /// and within the job's timeout (a peer that could still write into it is cut off first).
    fn cancel_recv(&self, src: usize, tag: Tag);
    /// Abandon a send whose `wait_send` will not be called (error path): once this returns, this
    /// rank reads no byte of its data any more, and nothing read from it afterwards is delivered
    /// (a peer copying it out of this process at that moment discards what it read). Every
    /// backend that may still read the buffer after `send` returned implements it.
    fn cancel_send(&self, dst: usize, tag: Tag);

    /// Register `[addr, +len)` with the network once, for every later message whose buffer lies
    /// inside it (user-buffer registration, as NCCL's `ncclCommRegister`): on RDMA, no message
    /// inside it is registered or deregistered any more. Host or device memory. Regions of one
    /// rank never overlap. Backends that copy with the CPU need nothing.
    ///
    /// # Safety
    /// The memory must stay allocated (never freed or re-mapped) until `unregister_region(addr)`
    /// returned `Ok` or the fabric is dropped. Peers may write anywhere in a registered region
    /// that holds a buffer advertised to them, as with any registered memory.
    unsafe fn register_region(&self, _addr: u64, _len: usize) -> Result<()> {
        Ok(())
    }
    /// Deregister the region that starts at `addr`; refused while a message inside it is in flight.
    fn unregister_region(&self, _addr: u64) -> Result<()> {
        Ok(())
    }

    /// Whether this backend can move memory the CPU must not touch (GPU memory the NIC reaches
    /// with GPUDirect RDMA): registers `len` bytes at `addr` for remote writes and releases them.
    /// `Err` says why not. Only RDMA can; the others copy with the CPU.
    fn probe_direct(&self, _addr: u64, _len: usize) -> std::result::Result<(), String> {
        Err(format!("the {} transport moves bytes with the CPU", self.name()))
    }
    /// Let this rank move memory the CPU must not touch with `copy` (in-process ranks sharing one
    /// device context: a device-to-device copy). Refused by transports whose NIC moves such
    /// memory itself (RDMA), or that cannot reach it.
    fn set_direct_copy(&self, _copy: DirectCopy) -> Result<()> {
        Err(crate::Error::usage("set_direct_copy", format!("the {} transport cannot copy device memory between ranks", self.name())))
    }
    /// `post_recv` for memory the CPU must not touch: every byte is placed by the NIC (or by the
    /// sender's [`DirectCopy`]).
    ///
    /// # Safety
    /// As `post_recv`.
    unsafe fn post_recv_direct(&self, _src: usize, _tag: Tag, _buf: *mut u8, _len: usize, w: &Wait) -> Result<()> {
        Err(crate::Error::usage(w.op, format!("the {} transport cannot receive into device memory", self.name())))
    }
    /// `send` from memory the CPU must not touch: the NIC reads it.
    ///
    /// # Safety
    /// As `send`.
    unsafe fn send_direct(&self, _dst: usize, _tag: Tag, _data: *const u8, _len: usize, w: &Wait) -> Result<()> {
        Err(crate::Error::usage(w.op, format!("the {} transport cannot send from device memory", self.name())))
    }
}
