//! The shared segment: the layout of one inbox region (ring control block, advertisement
//! slots, ring data), the inbox file each rank creates in /dev/shm, and `Ring`, the typed view
//! of one region that the ring and advertisement code reads and writes through.
use crate::error::{Error, Result};
use crossbeam_utils::CachePadded;
use memmap2::MmapMut;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;

/// Ring capacity per (source, destination) pair.
pub(crate) const RING_CAP: usize = 1 << 20;
const CTL: usize = std::mem::size_of::<RingCtl>();
/// Advertisement slots per (source, destination) pair (outstanding advertised receives).
pub(crate) const ADV_SLOTS: usize = 16;
const ADV_BYTES: usize = ADV_SLOTS * std::mem::size_of::<Adv>();
pub(super) const REGION: usize = CTL + ADV_BYTES + RING_CAP;

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
pub(super) const A_FREE: u64 = 0;
pub(super) const A_POSTED: u64 = 1;
pub(super) const A_CLAIMED: u64 = 2;
pub(super) const A_WRITTEN: u64 = 3;
/// `len` value a sender stores when its write failed.
pub(super) const A_LEN_FAILED: u64 = u64::MAX;
/// Flag in `len`: the sender announced this message by RTS before it claimed the slot, so an
/// RTS record is (or was) on its way and must be dropped when it arrives.
pub(super) const A_LEN_AFTER_RTS: u64 = 1 << 62;

/// A rank's inbox file, created before the rendezvous so peers can map it.
pub(crate) struct Inbox {
    pub path: PathBuf,
    pub(super) file: File,
    pub(super) map: MmapMut,
}

impl Inbox {
    pub fn create(size: usize, rank: usize, token: &str) -> Result<Inbox> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in token.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let path = PathBuf::from(format!("/dev/shm/ember-{h:016x}-{}-{rank}-{nonce:08x}", std::process::id()));
        let err = |e: std::io::Error| Error::Bootstrap(format!("shared-memory inbox {}: {e}", path.display()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(err)?;
        file.set_len((size * REGION) as u64).map_err(err)?;
        // SAFETY: a fresh file of ours; other processes only touch it through the ring protocol.
        let mut map = unsafe { memmap2::MmapOptions::new().populate().map_mut(&file) }.map_err(err)?;
        // Touch every page now, so the rings never page-fault on the data path.
        map.fill(0);
        Ok(Inbox { path, file, map })
    }
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(super) struct Ring(pub(super) *mut u8);
unsafe impl Send for Ring {}
unsafe impl Sync for Ring {}
impl Ring {
    pub(super) fn ctl(&self) -> &RingCtl {
        // SAFETY: the region starts with a RingCtl (zero-initialised file, atomics valid for any bits).
        unsafe { &*(self.0 as *const RingCtl) }
    }
    pub(super) fn data(&self) -> *mut u8 {
        // SAFETY: the data area follows the control block and the adverts inside the same mapping.
        unsafe { self.0.add(CTL + ADV_BYTES) }
    }
    pub(super) fn adv(&self, k: usize) -> &Adv {
        debug_assert!(k < ADV_SLOTS);
        // SAFETY: ADV_SLOTS slots of 64 bytes follow the control block (zeroed file: valid atomics).
        unsafe { &*(self.0.add(CTL + k * std::mem::size_of::<Adv>()) as *const Adv) }
    }
}
