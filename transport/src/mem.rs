//! Buffers for the one-copy paths. The shm backend's large-message copy (`process_vm_readv`)
//! pins the sender's pages one by one; on 4 KiB pages that costs ~20-40 % of memcpy speed, on
//! 2 MiB transparent huge pages almost nothing (docs/transport.md). Advising a buffer before its
//! first touch is the CPU analogue of registering memory for RDMA: optional, never required.
use bytemuck::Pod;

const HUGE: usize = 2 << 20;

/// Ask the kernel to back `buf` with transparent huge pages (`madvise(MADV_HUGEPAGE)` on the
/// 2 MiB-aligned part). Takes effect for pages first touched afterwards. Returns whether advice
/// was given (false for buffers under 2 MiB, or when the kernel refused).
pub fn advise_huge_pages<T>(buf: &mut [T]) -> bool {
    let start = buf.as_mut_ptr() as usize;
    let end = start + std::mem::size_of_val(buf);
    let (a, b) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
    if b <= a {
        return false;
    }
    // SAFETY: advice only, on whole pages inside memory we own.
    unsafe { libc::madvise(a as *mut libc::c_void, b - a, libc::MADV_HUGEPAGE) == 0 }
}

/// `n` zeroed elements; from 4 MiB on, advised for huge pages before the first touch.
pub fn huge_vec<T: Pod>(n: usize) -> Vec<T> {
    let mut v = vec![T::zeroed(); n]; // calloc: large blocks are fresh, untouched mmap pages
    if std::mem::size_of_val(v.as_slice()) >= 2 * HUGE {
        advise_huge_pages(&mut v);
    }
    v
}
