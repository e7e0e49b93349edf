//! Test helpers shared by the pools' tests: a registrar that records what it registers.
#![allow(dead_code)]
use ember_cuda::registrar::Registrar;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

/// Records registrations (address → length); `keep` refuses every deregistration, `refuse`
/// every registration; `calls` counts registration attempts.
#[derive(Clone, Default)]
pub struct Net {
    pub regs: Arc<Mutex<BTreeMap<u64, usize>>>,
    pub calls: Arc<AtomicUsize>,
    pub keep: bool,
    pub refuse: bool,
}

impl Registrar for Net {
    unsafe fn register(&self, addr: u64, len: usize) -> Result<(), String> {
        self.calls.fetch_add(1, SeqCst);
        if self.refuse {
            return Err("no port".into());
        }
        assert!(self.regs.lock().unwrap().insert(addr, len).is_none(), "{addr:#x} registered twice");
        Ok(())
    }
    fn unregister(&self, addr: u64) -> Result<(), String> {
        if self.keep {
            return Err("in use".into());
        }
        self.regs.lock().unwrap().remove(&addr).map(|_| ()).ok_or_else(|| format!("{addr:#x} not registered"))
    }
}
