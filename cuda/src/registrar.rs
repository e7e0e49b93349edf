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

impl std::fmt::Debug for dyn Registrar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registrar")
    }
}
