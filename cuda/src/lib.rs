//! Ember CUDA layer: the device memory pool, kernel sources and their NVRTC compilation.
//!
//! Without the `cuda` feature this crate holds only what the host can test: the pool (against a
//! simulated allocator) and the kernel sources. With it, [`device`] loads the CUDA driver, NVRTC
//! and cuBLAS at run time (no link-time dependency) and never panics when they are missing.
pub mod kernels;
pub mod pool;

#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod nvrtc;
/// The NCCL fallback: collectives on device buffers through libnccl (feature `nccl`).
#[cfg(feature = "nccl")]
pub mod nccl;

#[cfg(feature = "cuda")]
pub use cudarc;
