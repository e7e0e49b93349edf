//! Emulated device memory ([`DeviceMem`]): pages the CPU cannot touch, which the emulated NIC
//! reaches through a second mapping of the same pages ([`nic_view`]), as a NIC reaches GPU
//! memory with GPUDirect RDMA.
use std::sync::Mutex;

/// Emulated device memory: what a GPU allocation is to the CPU. [`DeviceMem::addr`] is the
/// address the protocol and the collectives see; it is mapped without access rights, so any CPU
/// read or write there is a segmentation fault. The emulated NIC reaches the same pages through
/// a second, writable mapping (found by
/// [`Verbs::register`](crate::rdma::verbs::Verbs::register)), as a NIC reaches GPU memory with
/// GPUDirect RDMA. `write`, `read` and [`DeviceMem::copy`] are the test's `cudaMemcpy`s.
pub struct DeviceMem {
    dev: usize,
    nic: usize,
    len: usize,
}

/// A device mapping. Registrations pin it, as a registered MR pins its pages: a `DeviceMem`
/// dropped while registered stays mapped until the last registration goes (a late write then
/// lands in memory nobody uses, as on hardware, instead of faulting the emulated NIC).
struct DevMap {
    dev: usize,
    nic: usize,
    map: usize,
    regs: usize,
    dropped: bool,
}

static DEVICE_MAPS: Mutex<Vec<DevMap>> = Mutex::new(Vec::new());

/// The NIC's address for `[addr, +len)`: the alias of device memory, or `addr` itself. `pin`:
/// count a registration of it.
pub(super) fn nic_view(addr: usize, len: usize, pin: bool) -> Result<usize, String> {
    let mut maps = DEVICE_MAPS.lock().unwrap();
    for m in maps.iter_mut().filter(|m| !m.dropped) {
        let inside = addr >= m.dev && addr.checked_add(len).is_some_and(|e| e <= m.dev + m.map);
        if inside {
            m.regs += usize::from(pin);
            return Ok(addr - m.dev + m.nic);
        }
        if addr < m.dev + m.map && addr.saturating_add(len) > m.dev {
            return Err(format!("[{addr:#x}, +{len}) straddles device memory"));
        }
    }
    Ok(addr)
}

/// A registration of device memory at NIC address `nic` went away.
pub(super) fn unpin(nic: usize) {
    let mut maps = DEVICE_MAPS.lock().unwrap();
    let Some(i) = maps.iter().position(|m| nic >= m.nic && nic < m.nic + m.map) else { return };
    maps[i].regs -= 1;
    if maps[i].dropped && maps[i].regs == 0 {
        unmap(maps.swap_remove(i));
    }
}

fn unmap(m: DevMap) {
    // SAFETY: the mapping's last user is gone.
    unsafe {
        libc::munmap(m.dev as *mut libc::c_void, m.map);
        libc::munmap(m.nic as *mut libc::c_void, m.map);
    }
}

impl DeviceMem {
    /// `len` zeroed bytes of emulated device memory.
    pub fn new(len: usize) -> std::io::Result<DeviceMem> {
        let page = 4096;
        let map = len.max(1).next_multiple_of(page);
        // SAFETY: plain memfd and mmap calls; the mappings are owned by the result and unmapped
        // in Drop.
        unsafe {
            let fd = libc::memfd_create(c"ember-emu-device".as_ptr(), libc::MFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut maps = [libc::MAP_FAILED; 2];
            let mut err = None;
            if libc::ftruncate(fd, map as libc::off_t) != 0 {
                err = Some(std::io::Error::last_os_error());
            } else {
                for (i, prot) in [libc::PROT_NONE, libc::PROT_READ | libc::PROT_WRITE].into_iter().enumerate() {
                    maps[i] = libc::mmap(std::ptr::null_mut(), map, prot, libc::MAP_SHARED, fd, 0);
                    if maps[i] == libc::MAP_FAILED {
                        err = Some(std::io::Error::last_os_error());
                    }
                }
            }
            libc::close(fd);
            if let Some(e) = err {
                for m in maps.into_iter().filter(|&m| m != libc::MAP_FAILED) {
                    libc::munmap(m, map);
                }
                return Err(e);
            }
            let (dev, nic) = (maps[0] as usize, maps[1] as usize);
            DEVICE_MAPS.lock().unwrap().push(DevMap { dev, nic, map, regs: 0, dropped: false });
            Ok(DeviceMem { dev, nic, len })
        }
    }

    /// The device address (not accessible to the CPU).
    pub fn addr(&self) -> u64 {
        self.dev as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host to device: `data` at byte `off`.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        assert!(off.checked_add(data.len()).is_some_and(|e| e <= self.len), "device write out of range");
        // SAFETY: inside the writable alias (checked).
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), (self.nic + off) as *mut u8, data.len()) };
    }

    /// Device to host: `out.len()` bytes from byte `off`.
    pub fn read(&self, off: usize, out: &mut [u8]) {
        assert!(off.checked_add(out.len()).is_some_and(|e| e <= self.len), "device read out of range");
        // SAFETY: inside the alias (checked).
        unsafe { std::ptr::copy_nonoverlapping((self.nic + off) as *const u8, out.as_mut_ptr(), out.len()) };
    }

    /// A device-side copy of `len` bytes between two device addresses (of any `DeviceMem`s), as
    /// a copy kernel does: `Err` if either range is not inside emulated device memory.
    ///
    /// # Safety
    /// Nothing else reads or writes the destination range meanwhile (as for a device copy).
    pub unsafe fn copy(src: u64, dst: u64, len: usize) -> Result<(), String> {
        let (s, d) = (src as usize, dst as usize);
        let (ns, nd) = (nic_view(s, len, false)?, nic_view(d, len, false)?);
        if len > 0 && (ns == s || nd == d) {
            return Err(format!("device copy {s:#x} -> {d:#x} of {len} bytes outside device memory"));
        }
        // SAFETY: both ranges inside live device mappings' writable aliases (checked); the caller
        // excludes concurrent access.
        unsafe { std::ptr::copy(ns as *const u8, nd as *mut u8, len) };
        Ok(())
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        let mut maps = DEVICE_MAPS.lock().unwrap();
        let i = maps.iter().position(|m| m.dev == self.dev).expect("live mapping");
        if maps[i].regs == 0 {
            unmap(maps.swap_remove(i));
        } else {
            maps[i].dropped = true;
        }
    }
}

// SAFETY: plain addresses of mappings owned by the value; the mappings are not tied to a thread.
unsafe impl Send for DeviceMem {}
// SAFETY: `&DeviceMem` only reads the addresses and reads device memory; writes take `&mut`.
unsafe impl Sync for DeviceMem {}
