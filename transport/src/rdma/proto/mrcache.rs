//! The registration cache: memory registrations of send and receive buffers, kept and reused
//! across messages, keyed by address range and purpose (least recently used idle ones are
//! dropped beyond [`CACHE_MAX`]); private ones, deregistered at release, where caching is off
//! or not possible.
use super::HashMap;
use crate::rdma::verbs::{Mr, Verbs};

/// Registrations kept by the cache (least recently used idle ones are dropped beyond this).
const CACHE_MAX: usize = 256;

pub(super) type MrKey = (u64, usize, bool);

/// A registration in use: `key` names its cache entry (`None`: a private one, deregistered at release).
#[derive(Clone, Copy, Debug)]
pub(super) struct MrRef {
    pub(super) mr: Mr,
    pub(super) key: Option<MrKey>,
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
}

impl MrCache {
    pub(super) fn acquire<V: Verbs>(&mut self, v: &V, addr: usize, len: usize, recv: bool) -> std::result::Result<MrRef, String> {
        // SAFETY (of the registrations below): the Fabric contract keeps the buffer valid while
        // in use; a cached registration outliving it is harmless where caching is enabled
        // (`Verbs::cache_registrations`: registrations follow the virtual range).
        let reg = |v: &V| unsafe { v.register(addr as *mut u8, len) };
        if !self.on {
            return Ok(MrRef { mr: reg(v)?, key: None });
        }
        self.clock += 1;
        let clock = self.clock;
        let key = (addr as u64, len, recv);
        if let Some(e) = self.map.get_mut(&key) {
            if !recv || e.users == 0 {
                e.users += 1;
                e.last = clock;
                return Ok(MrRef { mr: e.mr, key: Some(key) });
            }
            return Ok(MrRef { mr: reg(v)?, key: None }); // the range is posted twice at once
        }
        if !recv {
            let (a, end) = (addr as u64, addr as u64 + len as u64);
            if let Some((k, e)) = self.map.iter_mut().find(|(k, _)| !k.2 && k.0 <= a && k.0 + k.1 as u64 >= end) {
                e.users += 1;
                e.last = clock;
                return Ok(MrRef { mr: e.mr, key: Some(*k) });
            }
        }
        if self.map.len() >= CACHE_MAX {
            let victim = self.map.iter().filter(|(_, e)| e.users == 0).min_by_key(|(_, e)| e.last).map(|(k, _)| *k);
            match victim {
                Some(k) => v.deregister(&self.map.remove(&k).unwrap().mr),
                None => return Ok(MrRef { mr: reg(v)?, key: None }),
            }
        }
        let mr = reg(v)?;
        self.map.insert(key, CacheEnt { mr, users: 1, last: clock });
        Ok(MrRef { mr, key: Some(key) })
    }

    /// Done with `r`. `revoke`: deregister it now (no peer may write into it, and no posted
    /// read of it may happen, once this returns), and drop it from the cache.
    pub(super) fn release<V: Verbs>(&mut self, v: &V, r: &MrRef, revoke: bool) {
        match r.key {
            None => v.deregister(&r.mr),
            Some(k) => {
                let Some(e) = self.map.get_mut(&k) else { return }; // revoked already
                if e.mr.lkey != r.mr.lkey {
                    return;
                }
                e.users = e.users.saturating_sub(1);
                if revoke {
                    v.deregister(&self.map.remove(&k).unwrap().mr);
                }
            }
        }
    }
}
