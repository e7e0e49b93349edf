//! Device memory as a dma-buf, for NICs that register GPU memory through `ibv_reg_dmabuf_mr`
//! (the open GPU kernel modules without `nvidia-peermem`): the transport's
//! `rdma::DmabufExporter`, installed by the CUDA backend.
use cudarc::driver::sys;

/// The page-aligned range around `[addr, +len)` (inside its device allocation) as a dma-buf:
/// `(fd, offset of addr)`.
/// `None` when no CUDA driver is loaded or `addr` is not device memory of the current context.
pub fn export(addr: u64, len: usize) -> Option<Result<(i32, u64), String>> {
    // SAFETY: only dlopens candidate names.
    if !std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false) {
        return None;
    }
    // SAFETY: plain driver queries on an address; the out-parameters are locals.
    unsafe {
        let mut kind: u32 = 0;
        let rc = sys::cuPointerGetAttribute(
            &mut kind as *mut u32 as *mut std::ffi::c_void,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            addr,
        );
        if rc != sys::CUresult::CUDA_SUCCESS || kind != sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32 {
            return None;
        }
        let (mut base, mut size) = (0u64, 0usize);
        let rc = sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr);
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Some(Err(format!("cuMemGetAddressRange({addr:#x}): {rc:?}")));
        }
        const PAGE: u64 = 4096;
        let (start, end) = ((addr / PAGE * PAGE).max(base), (addr + len.max(1) as u64).next_multiple_of(PAGE));
        if end > base + size as u64 || start % PAGE != 0 {
            return Some(Err(format!("[{addr:#x}, +{len}) has no page-aligned range inside its allocation [{base:#x}, +{size})")));
        }
        let mut fd: i32 = -1;
        let rc = sys::cuMemGetHandleForAddressRange(
            &mut fd as *mut i32 as *mut std::ffi::c_void,
            start,
            (end - start) as usize,
            sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            0,
        );
        if rc != sys::CUresult::CUDA_SUCCESS {
            return Some(Err(format!("cuMemGetHandleForAddressRange({} bytes at {start:#x}, dma-buf): {rc:?}", end - start)));
        }
        Some(Ok((fd, addr - start)))
    }
}

#[cfg(test)]
mod tests {
    use crate::device::{probe, Gpu};
    use crate::pool::PoolConfig;

    /// A pool buffer is recognised as device memory and exported (or the driver says why not,
    /// naming the call).
    #[test]
    #[ignore = "needs a GPU"]
    fn pool_memory_exports_as_a_dma_buf() {
        if let Err(e) = probe(0) {
            panic!("needs a GPU: {e}");
        }
        let gpu = Gpu::open(0, PoolConfig::default()).unwrap();
        gpu.bind().unwrap();
        let b = gpu.alloc::<f32>(1 << 20).unwrap();
        let addr = b.ptr() + 4096;
        match super::export(addr, 8192) {
            None => panic!("device memory at {addr:#x} not recognised"),
            Some(Err(e)) => {
                assert!(e.contains("cuMemGetHandleForAddressRange"), "{e}");
                eprintln!("dma-buf export unsupported on this driver/kernel: {e}");
            }
            Some(Ok((fd, off))) => {
                assert!(fd >= 0 && off < 4096, "fd {fd} offset {off}");
                eprintln!("dma-buf export: fd {fd}, offset {off}");
                // SAFETY: our descriptor, closed once.
                drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            }
        }
    }

    #[test]
    fn host_memory_is_not_exported_and_nothing_panics() {
        // Without a CUDA driver (this build machine) or for host memory, there is nothing to export.
        let v = vec![0u8; 4096];
        assert!(super::export(v.as_ptr() as u64, v.len()).is_none());
    }
}
