//! The shared segment: the layout of an inbox file (a header page, which also holds the owner's
//! doorbell (`crate::bell`), then one region per source rank:
//! ring control block, advertisement slots, offer slots, ring data), creating this rank's inbox
//! (mode 0600) and opening a peer's (refused unless it is a regular file of this user with mode
//! 0600 and the expected size and header), and `Ring`, the typed view of one region that the
//! ring, advertisement and offer code reads and writes through.
use crate::bell::BellRef;
use crate::error::{Error, Result};
use crossbeam_utils::CachePadded;
use memmap2::MmapMut;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

/// Ring capacity per (source, destination) pair.
pub const RING_CAP: usize = 1 << 20;
const CTL: usize = std::mem::size_of::<RingCtl>();
/// Advertisement slots per (source, destination) pair (outstanding advertised receives).
pub const ADV_SLOTS: usize = 16;
const ADV_BYTES: usize = ADV_SLOTS * std::mem::size_of::<Adv>();
/// Offer slots per (source, destination) pair (announced sends a receiver may still copy).
pub const OFFER_SLOTS: usize = 64;
const OFFER_BYTES: usize = OFFER_SLOTS * std::mem::size_of::<Offer>();
pub(super) const REGION: usize = CTL + ADV_BYTES + OFFER_BYTES + RING_CAP;
/// The inbox header's size (a page: the regions stay page-aligned).
pub(super) const HEADER: usize = 4096;
/// Where in the header page the owner's doorbell lies (`crate::bell`: its own cache line,
/// after the header proper).
const BELL_AT: usize = 64;
const _: () = assert!(std::mem::size_of::<Header>() <= BELL_AT && BELL_AT + 64 <= HEADER);
const MAGIC: u64 = 0x3158_4f42_4e49_4d45; // "EMINBOX1"

#[repr(C)]
pub(super) struct RingCtl {
    pub(super) head: CachePadded<AtomicU64>,
    pub(super) tail: CachePadded<AtomicU64>,
}

/// One advertised receive buffer, in the receiver's inbox (written by the receiver, claimed and
/// completed by the sender). `state` = `gen << 2 | A_*`; only the receiver changes `gen` and
/// only while the slot is not claimed.
#[repr(C, align(64))]
pub(super) struct Adv {
    pub(super) state: AtomicU64,
    pub(super) ctx: AtomicU64,
    pub(super) seq: AtomicU64,
    pub(super) round: AtomicU64,
    pub(super) addr: AtomicU64,
    pub(super) cap: AtomicU64,
    pub(super) len: AtomicU64,
}
const _: () = assert!(std::mem::size_of::<Adv>() == 64);
pub const A_FREE: u64 = 0;
pub const A_POSTED: u64 = 1;
pub const A_CLAIMED: u64 = 2;
pub const A_WRITTEN: u64 = 3;
/// `len` value a sender stores when its write failed.
pub const A_LEN_FAILED: u64 = u64::MAX;
/// Flag in `len`: the sender announced this message by RTS before it claimed the slot, so an
/// RTS record is (or was) on its way and must be dropped when it arrives.
pub const A_LEN_AFTER_RTS: u64 = 1 << 62;

/// One announced send (RTS) the receiver may copy from the sender's memory, in the receiver's
/// inbox (written by the sender). `state` = `gen << 2 | O_*`: the receiver takes it
/// `OFFERED -> READING` before copying and `READING -> DONE` after; the sender withdraws it by
/// storing `FREE` (a receiver whose compare-and-swap then fails discards what it copied).
#[repr(C, align(64))]
pub(super) struct Offer {
    pub(super) state: AtomicU64,
    pub(super) addr: AtomicU64,
    pub(super) len: AtomicU64,
}
const _: () = assert!(std::mem::size_of::<Offer>() == 64);
pub(super) const O_FREE: u64 = 0;
pub(super) const O_OFFERED: u64 = 1;
pub(super) const O_READING: u64 = 2;
pub(super) const O_DONE: u64 = 3;

/// The inbox header, written once by its owner before the rendezvous: who owns it, and a word
/// of its memory (`probe_addr` holding `probe_value`) through which peers test cross-memory
/// attach.
#[repr(C)]
struct Header {
    magic: u64,
    rank: u64,
    size: u64,
    probe_addr: u64,
    probe_value: u64,
}

/// A rank's inbox file, created before the rendezvous so peers can map it.
pub(crate) struct Inbox {
    pub path: PathBuf,
    pub(super) _file: File,
    pub(super) map: MmapMut,
    /// The word peers read to test cross-memory attach (its address is in the header).
    _probe: Box<u64>,
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

impl Inbox {
    /// Create `/dev/shm/ember-<tokenhash>-<pid>-<rank>-<random>`, mode 0600 (whatever the umask).
    pub fn create(size: usize, rank: usize, token: &str) -> Result<Inbox> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in token.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let mut r = [0u8; 16];
        crate::auth::random(&mut r).map_err(|e| Error::Bootstrap(format!("shared-memory inbox: no random source: {e}")))?;
        let (nonce, probe) = (u64::from_le_bytes(r[..8].try_into().unwrap()), u64::from_le_bytes(r[8..].try_into().unwrap()));
        let path = PathBuf::from(format!("/dev/shm/ember-{h:016x}-{}-{rank}-{nonce:016x}", std::process::id()));
        let err = |e: std::io::Error| Error::Bootstrap(format!("shared-memory inbox {}: {e}", path.display()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(err)?;
        let fail = |e: std::io::Error| {
            let _ = std::fs::remove_file(&path);
            err(e)
        };
        file.set_permissions(std::fs::Permissions::from_mode(0o600)).map_err(fail)?;
        file.set_len((HEADER + size * REGION) as u64).map_err(fail)?;
        // SAFETY: a fresh file of ours; other processes only touch it through the ring protocol.
        let mut map = unsafe { memmap2::MmapOptions::new().populate().map_mut(&file) }.map_err(fail)?;
        // Touch every page now, so the rings never page-fault on the data path.
        map.fill(0);
        let probe = Box::new(probe);
        let hdr = Header { magic: MAGIC, rank: rank as u64, size: size as u64, probe_addr: &*probe as *const u64 as u64, probe_value: *probe };
        // SAFETY: the mapping holds at least HEADER bytes; Header is plain data.
        unsafe { std::ptr::write_unaligned(map.as_mut_ptr() as *mut Header, hdr) };
        Ok(Inbox { path, _file: file, map, _probe: probe })
    }

    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }

    /// The doorbell this rank's waiters sleep on.
    pub(super) fn bell(&self) -> BellRef {
        // SAFETY: the mapping is page-aligned and holds HEADER > BELL_AT + 64 bytes; it lives as
        // long as the fabric that owns this inbox and every holder of the bell (its mailbox).
        unsafe { BellRef::new((self.map.as_ptr() as *mut u8).add(BELL_AT)) }
    }

    /// The region of source `s`.
    pub(super) fn region(&self, s: usize) -> Ring {
        // SAFETY: the mapping holds HEADER + size * REGION bytes (s < size by the callers).
        Ring(unsafe { (self.map.as_ptr() as *mut u8).add(HEADER + s * REGION) })
    }
}

/// The doorbell in a peer's inbox mapping `m` (from [`open_peer`]).
pub(super) fn peer_bell(m: &mut MmapMut) -> BellRef {
    // SAFETY: `open_peer` checked the mapping holds HEADER + size * REGION bytes, more than
    // BELL_AT + 64; it is page-aligned, and the fabric keeps it mapped as long as the bell.
    unsafe { BellRef::new(m.as_mut_ptr().add(BELL_AT)) }
}

/// Rank `rank`'s inbox in a job of `size`, opened by a peer: refused unless it is a regular file
/// (not a link) owned by this user, mode 0600, of the expected size, with the header its owner
/// wrote. Returns the mapping and the owner's probe word `(address, value)`.
pub(super) fn open_peer(path: &Path, rank: usize, size: usize) -> Result<(MmapMut, (u64, u64))> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let err = |e: String| Error::Bootstrap(format!("rank {rank}'s shared-memory inbox {}: {e}", path.display()));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| err(e.to_string()))?;
    // fstat of the file we opened (no race with a rename of the name).
    let m = f.metadata().map_err(|e| err(e.to_string()))?;
    if !m.file_type().is_file() || m.uid() != euid() || m.mode() & 0o7777 != 0o600 {
        return Err(err(format!(
            "refused: owner uid {}, mode {:o} (expected a regular file of uid {} with mode 0600)",
            m.uid(),
            m.mode() & 0o7777,
            euid()
        )));
    }
    let want = (HEADER + size * REGION) as u64;
    if m.len() != want {
        return Err(err(format!("{} bytes, expected {want}", m.len())));
    }
    // SAFETY: shared mapping of a peer's inbox; accessed only through the ring protocol.
    let map = unsafe { memmap2::MmapOptions::new().populate().map_mut(&f) }.map_err(|e| err(e.to_string()))?;
    // SAFETY: the mapping holds at least HEADER bytes; any bits are a valid Header.
    let h = unsafe { std::ptr::read_unaligned(map.as_ptr() as *const Header) };
    if h.magic != MAGIC || h.rank != rank as u64 || h.size != size as u64 {
        return Err(err(format!("header says rank {} of {} (magic {:#x}), expected rank {rank} of {size}", h.rank, h.size, h.magic)));
    }
    Ok((map, (h.probe_addr, h.probe_value)))
}

pub(super) struct Ring(pub(super) *mut u8);
// SAFETY: the address of a shared mapping that lives as long as the fabric owning it; it is not
// tied to a thread.
unsafe impl Send for Ring {}
// SAFETY: every access through it is to the ring's atomics or to slots the ring protocol hands
// to one side at a time.
unsafe impl Sync for Ring {}
impl Ring {
    pub(super) fn ctl(&self) -> &RingCtl {
        // SAFETY: the region starts with a RingCtl (zero-initialised file, atomics valid for any bits).
        unsafe { &*(self.0 as *const RingCtl) }
    }
    pub(super) fn data(&self) -> *mut u8 {
        // SAFETY: the data area follows the control block, adverts and offers inside the same mapping.
        unsafe { self.0.add(CTL + ADV_BYTES + OFFER_BYTES) }
    }
    pub(super) fn adv(&self, k: usize) -> &Adv {
        debug_assert!(k < ADV_SLOTS);
        // SAFETY: ADV_SLOTS slots of 64 bytes follow the control block (zeroed file: valid atomics).
        unsafe { &*(self.0.add(CTL + k * std::mem::size_of::<Adv>()) as *const Adv) }
    }
    pub(super) fn offer(&self, k: usize) -> &Offer {
        debug_assert!(k < OFFER_SLOTS);
        // SAFETY: OFFER_SLOTS slots of 64 bytes follow the advertisements (zeroed file: valid atomics).
        unsafe { &*(self.0.add(CTL + ADV_BYTES + k * std::mem::size_of::<Offer>()) as *const Offer) }
    }
}
