//! Where the pools register their memory with the network (the transport's registered regions:
//! `Comm::regions` on RDMA), once per block or chunk, so that messages from and into pooled
//! memory register nothing of their own. The pools call it when they take memory from the
//! driver and before they give it back.

/// A network endpoint that registers memory regions.
pub trait Registrar: Send {
    /// Register `[addr, +len)`.
    ///
    /// # Safety
    /// The memory stays allocated until `unregister(addr)` succeeded.
    unsafe fn register(&self, addr: u64, len: usize) -> Result<(), String>;
    /// Deregister the region registered at `addr` (refused while a message uses it).
    fn unregister(&self, addr: u64) -> Result<(), String>;
}

/// Where a pool's block or chunk stands with the registrar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    None,
    Registered,
    /// A registrar refused to deregister it: it stays registered there, so it is never freed
    /// (leaked rather than freed under the NIC) nor registered again.
    Held,
}

/// What [`Registration::deregister`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// It was not registered: nothing to do; the memory may be freed.
    NotRegistered,
    /// It was registered and now is not; the memory may be freed.
    Deregistered,
    /// It stays registered (held): the memory must never be freed.
    Held,
}

impl Registration {
    /// Register `[addr, +len)` (a pool's `what`) with `r` unless it is registered or held
    /// already; returns whether it became registered. A failure is logged: the memory works
    /// unregistered (its messages register one by one).
    ///
    /// # Safety
    /// The memory stays allocated until [`Self::deregister`] says it may be freed.
    pub unsafe fn register(&mut self, r: Option<&dyn Registrar>, addr: u64, len: usize, what: &str) -> bool {
        let Some(r) = r.filter(|_| *self == Registration::None) else { return false };
        // SAFETY: our caller keeps the memory allocated until `deregister` lets it go (this
        // function's contract), which is what `Registrar::register` asks.
        match unsafe { r.register(addr, len) } {
            Ok(()) => {
                *self = Registration::Registered;
                true
            }
            Err(e) => {
                tracing::warn!("{what}: registering {len} bytes with the network failed ({e}); its messages register one by one");
                false
            }
        }
    }

    /// Deregister it from `r` if registered. A refusal (logged) makes it held for good.
    pub fn deregister(&mut self, r: Option<&dyn Registrar>, addr: u64, what: &str) -> Released {
        match (*self, r) {
            (Registration::None, _) => Released::NotRegistered,
            (Registration::Held, _) | (Registration::Registered, None) => Released::Held,
            (Registration::Registered, Some(r)) => match r.unregister(addr) {
                Ok(()) => {
                    *self = Registration::None;
                    Released::Deregistered
                }
                Err(e) => {
                    tracing::warn!("{what}: deregistering memory failed ({e}); it is never freed (leaked rather than freed under the NIC)");
                    *self = Registration::Held;
                    Released::Held
                }
            },
        }
    }
}

impl std::fmt::Debug for dyn Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registrar")
    }
}
