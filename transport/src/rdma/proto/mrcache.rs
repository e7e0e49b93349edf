//! Memory registrations of send and receive buffers: the regions the caller registered once
//! (`Fabric::register_region`, used by every message inside one); the cache, kept and reused
//! across messages, keyed by address range and purpose (least recently used idle ones are
//! dropped beyond [`CACHE_MAX`]); private ones, deregistered at release, where caching is off
//! or not possible.
use super::HashMap;
use crate::rdma::verbs::{Mr, Verbs};
use std::collections::BTreeMap;

/// Registrations kept by the cache (least recently used idle ones are dropped beyond this).
const CACHE_MAX: usize = 256;

pub(super) type MrKey = (u64, usize, bool);

/// Where a registration in use comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Owner {
    /// Registered for this message alone, deregistered at release.
    Private,
    /// A cache entry.
    Cached(MrKey),
    /// The caller's registered region starting at this address.
    Region(u64),
}

/// A registration in use.
#[derive(Clone, Copy, Debug)]
pub(super) struct MrRef {
    pub(super) mr: Mr,
    pub(super) owner: Owner,
}

/// A region the caller registered: `mr` serves every message inside it.
pub(super) struct Region {
    pub(super) len: usize,
    pub(super) mr: Mr,
    /// Messages using it now.
    pub(super) users: u32,
}

pub(super) struct CacheEnt {
    pub(super) mr: Mr,
    pub(super) users: u32,
    pub(super) last: u64,
}

/// Registration cache keyed by address range (and purpose: a receive buffer is registered for
/// exactly its range and used by one receive at a time, so revoking it touches nothing else;
/// a send may use any send registration containing its range).
pub(super) struct MrCache {
    pub(super) on: bool,
    pub(super) map: HashMap<MrKey, CacheEnt>,
    pub(super) clock: u64,
    /// The caller's registered regions, by start address (they never overlap).
    pub(super) regions: BTreeMap<u64, Region>,
}

impl MrCache {
    pub(super) fn new(on: bool) -> Self {
        MrCache { on, map: HashMap::default(), clock: 0, regions: BTreeMap::new() }
    }

    /// The start of the registered region holding all of `[addr, +len)`, if any.
    fn region_of(&self, addr: u64, len: usize) -> Option<u64> {
        let (&a, r) = self.regions.range(..=addr).next_back()?;
        (addr.checked_add(len as u64)? <= a + r.len as u64).then_some(a)
    }

    /// Whether `[addr, +len)` may become a region: not empty, no wrap, no overlap with one.
    pub(super) fn check_region(&self, addr: u64, len: usize) -> std::result::Result<(), String> {
        let end = addr.checked_add(len as u64).filter(|_| len > 0).ok_or_else(|| format!("region [{addr:#x}, +{len}) is empty or wraps"))?;
        match self.regions.range(..end).next_back() {
            Some((&a, r)) if a + r.len as u64 > addr => Err(format!("region [{addr:#x}, +{len}) overlaps the registered region [{a:#x}, +{})", r.len)),
            _ => Ok(()),
        }
    }

    /// Add `mr`, a registration of `[addr, +len)` (checked by [`Self::check_region`]), as a
    /// region serving every later message inside it.
    pub(super) fn insert_region(&mut self, addr: u64, len: usize, mr: Mr) {
        self.regions.insert(addr, Region { len, mr, users: 0 });
    }

    /// Deregister the region starting at `addr`; refused while a message uses it.
    pub(super) fn unregister_region<V: Verbs>(&mut self, v: &V, addr: u64) -> std::result::Result<(), String> {
        let r = self.regions.get(&addr).ok_or_else(|| format!("no registered region starts at {addr:#x}"))?;
        if r.users > 0 {
            return Err(format!("region at {addr:#x} is in use by {} message(s)", r.users));
        }
        if let Some(r) = self.regions.remove(&addr) {
            v.deregister(&r.mr);
        }
        Ok(())
    }

    pub(super) fn acquire<V: Verbs>(&mut self, v: &V, addr: usize, len: usize, recv: bool) -> std::result::Result<MrRef, String> {
        if let Some(a) = self.region_of(addr as u64, len) {
            let r = self.regions.get_mut(&a).unwrap();
            r.users += 1;
            return Ok(MrRef { mr: r.mr, owner: Owner::Region(a) });
        }
        let reg = |v: &V| {
            // SAFETY: the Fabric contract keeps the buffer valid while in use; a cached
            // registration outliving it is harmless where caching is enabled
            // (`Verbs::cache_registrations`: registrations follow the virtual range).
            unsafe { v.register(addr as *mut u8, len) }
        };
        if !self.on {
            return Ok(MrRef { mr: reg(v)?, owner: Owner::Private });
        }
        self.clock += 1;
        let clock = self.clock;
        let key = (addr as u64, len, recv);
        if let Some(e) = self.map.get_mut(&key) {
            if !recv || e.users == 0 {
                e.users += 1;
                e.last = clock;
                return Ok(MrRef { mr: e.mr, owner: Owner::Cached(key) });
            }
            return Ok(MrRef { mr: reg(v)?, owner: Owner::Private }); // the range is posted twice at once
        }
        if !recv {
            let (a, end) = (addr as u64, addr as u64 + len as u64);
            if let Some((k, e)) = self.map.iter_mut().find(|(k, _)| !k.2 && k.0 <= a && k.0 + k.1 as u64 >= end) {
                e.users += 1;
                e.last = clock;
                return Ok(MrRef { mr: e.mr, owner: Owner::Cached(*k) });
            }
        }
        if self.map.len() >= CACHE_MAX {
            let victim = self.map.iter().filter(|(_, e)| e.users == 0).min_by_key(|(_, e)| e.last).map(|(k, _)| *k);
            match victim {
                Some(k) => v.deregister(&self.map.remove(&k).unwrap().mr),
                None => return Ok(MrRef { mr: reg(v)?, owner: Owner::Private }),
            }
        }
        let mr = reg(v)?;
        self.map.insert(key, CacheEnt { mr, users: 1, last: clock });
        Ok(MrRef { mr, owner: Owner::Cached(key) })
    }

    /// Deregister and forget the region at `addr` under the messages still using it (they fail
    /// at the NIC): the last resort when its peer could not be cut off.
    pub(super) fn drop_region<V: Verbs>(&mut self, v: &V, addr: u64) {
        if let Some(r) = self.regions.remove(&addr) {
            v.deregister(&r.mr);
        }
    }

    /// Done with `r`. `revoke`: deregister it now (no peer may write into it, and no posted
    /// read of it may happen, once this returns), and drop it from the cache. Returns the region
    /// when that is not possible: `r` is the registration of that region, which other messages
    /// share, so the caller must cut the peer off instead (`Verbs::disconnect`).
    #[must_use]
    pub(super) fn release<V: Verbs>(&mut self, v: &V, r: &MrRef, revoke: bool) -> Option<u64> {
        match r.owner {
            Owner::Private => v.deregister(&r.mr),
            Owner::Region(a) => {
                let reg = self.regions.get_mut(&a)?; // None: dropped after a failed cut
                debug_assert!(reg.users > 0, "region at {a:#x} released more often than acquired");
                reg.users = reg.users.saturating_sub(1);
                return revoke.then_some(a);
            }
            Owner::Cached(k) => {
                let e = self.map.get_mut(&k)?; // None: revoked already
                if e.mr.lkey != r.mr.lkey {
                    return None;
                }
                e.users = e.users.saturating_sub(1);
                if revoke {
                    v.deregister(&self.map.remove(&k).unwrap().mr);
                }
            }
        }
        None
    }
}
