//! The device memory an NCCL call reads or writes: anything that is [`DeviceMem`] (the engine's
//! device buffers, a bounds-checked [`DevView`] into one), and [`NcclDevice`], a CUDA context and
//! stream with its own buffers ([`NcclBuf`]) for the benchmark and the tests.
use super::error::de;
use crate::device::{DevBuf, DevResult};
use cudarc::driver::{result as dr, CudaContext, CudaStream};
use std::marker::PhantomData;
use std::panic::catch_unwind;
use std::sync::Arc;

/// Device memory an NCCL call may read or write: a device address and a length in elements.
pub trait DeviceMem<T> {
    fn dev_ptr(&self) -> u64;
    fn dev_len(&self) -> usize;
}

impl<T> DeviceMem<T> for DevBuf<T> {
    fn dev_ptr(&self) -> u64 {
        self.ptr()
    }
    fn dev_len(&self) -> usize {
        self.len()
    }
}

/// A bounds-checked window into a device buffer, borrowed from it.
pub struct DevView<'a, T> {
    ptr: u64,
    len: usize,
    _b: PhantomData<&'a T>,
}

impl<'a, T> DevView<'a, T> {
    /// Elements `offset .. offset + len` of `buf`.
    pub fn of(buf: &'a impl DeviceMem<T>, offset: usize, len: usize) -> DevResult<DevView<'a, T>> {
        let end = offset.saturating_add(len);
        if end > buf.dev_len() {
            return Err(format!(
                "device view {offset}..{} out of a buffer of {}",
                offset.saturating_add(len),
                buf.dev_len()
            ));
        }
        Ok(DevView {
            ptr: buf.dev_ptr() + (offset * std::mem::size_of::<T>()) as u64,
            len,
            _b: PhantomData,
        })
    }

    /// # Safety
    /// `ptr` must address `len` elements of device memory that outlive the view.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> DevView<'a, T> {
        DevView { ptr, len, _b: PhantomData }
    }
}

impl<T> DeviceMem<T> for DevView<'_, T> {
    fn dev_ptr(&self) -> u64 {
        self.ptr
    }
    fn dev_len(&self) -> usize {
        self.len
    }
}

/// A CUDA context and its own non-blocking stream, without the engine's kernels: what the NCCL
/// benchmark and tests need (the driver only; no NVRTC or cuBLAS).
pub struct NcclDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub ordinal: usize,
    pub name: String,
}

impl NcclDevice {
    /// Open device `ordinal` (probes the driver first: no GPU is an error, never a panic).
    pub fn open(ordinal: usize) -> DevResult<NcclDevice> {
        crate::device::probe(ordinal)?;
        catch_unwind(|| -> DevResult<NcclDevice> {
            let ctx = CudaContext::new(ordinal).map_err(de("creating the CUDA context"))?;
            // SAFETY: no CudaSlice is used with this context; streams order everything.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().map_err(de("creating a CUDA stream"))?;
            let name = ctx.name().unwrap_or_else(|_| "?".into());
            Ok(NcclDevice { ctx, stream, ordinal, name })
        })
        .unwrap_or_else(|_| Err("CUDA initialisation panicked (a library failed to load?)".into()))
    }

    /// Number of CUDA devices visible to this process (0 without a driver).
    pub fn count() -> usize {
        crate::device::probe(0).unwrap_or(0)
    }

    fn bind(&self) -> DevResult<()> {
        self.ctx.bind_to_thread().map_err(de("binding the CUDA context"))
    }

    /// `len` elements of device memory (contents undefined), freed on drop.
    pub fn alloc<T>(&self, len: usize) -> DevResult<NcclBuf<T>> {
        self.bind()?;
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        // SAFETY: plain allocation, freed once by NcclBuf::drop.
        let ptr = unsafe { dr::malloc_sync(bytes) }.map_err(|e| format!("cuMemAlloc of {bytes} bytes: {e:?}"))?;
        Ok(NcclBuf {
            ptr,
            len,
            ctx: self.ctx.clone(),
            _t: PhantomData,
        })
    }

    /// Copy `src` into the start of `dst` (ordered on the stream).
    pub fn htod<T: Copy>(&self, dst: &mut impl DeviceMem<T>, src: &[T]) -> DevResult<()> {
        if src.len() > dst.dev_len() {
            return Err(format!("host-to-device copy of {} elements into a buffer of {}", src.len(), dst.dev_len()));
        }
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: dst holds at least src.len() elements; the copy from pageable memory is staged
        // before the call returns.
        unsafe { dr::memcpy_htod_async(dst.dev_ptr(), src, self.stream.cu_stream()) }.map_err(de("host-to-device copy"))
    }

    /// Copy the start of `src` into `dst` and wait for it.
    pub fn dtoh<T: Copy>(&self, dst: &mut [T], src: &impl DeviceMem<T>) -> DevResult<()> {
        if dst.len() > src.dev_len() {
            return Err(format!("device-to-host copy of {} elements from a buffer of {}", dst.len(), src.dev_len()));
        }
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: src holds at least dst.len() elements; we wait before returning.
        unsafe { dr::memcpy_dtoh_async(dst, src.dev_ptr(), self.stream.cu_stream()) }.map_err(de("device-to-host copy"))?;
        self.sync()
    }

    pub fn sync(&self) -> DevResult<()> {
        self.stream.synchronize().map_err(de("stream synchronize"))
    }
}

/// Device memory of an [`NcclDevice`].
pub struct NcclBuf<T> {
    ptr: u64,
    len: usize,
    ctx: Arc<CudaContext>,
    _t: PhantomData<T>,
}

impl<T> NcclBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> DeviceMem<T> for NcclBuf<T> {
    fn dev_ptr(&self) -> u64 {
        self.ptr
    }
    fn dev_len(&self) -> usize {
        self.len
    }
}

impl<T> Drop for NcclBuf<T> {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // Work still queued on any stream may use the buffer.
        let _ = self.ctx.synchronize();
        // SAFETY: allocated by NcclDevice::alloc, freed once.
        let _ = unsafe { dr::free_sync(self.ptr) };
    }
}
