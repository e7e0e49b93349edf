//! Ember CUDA layer: the device memory pool, the pinned host pool, kernel sources and their NVRTC
//! compilation.
//!
//! Without the `cuda` feature this crate holds only what the host can test: the pools (against a
//! simulated allocator, and heap memory) and the kernel sources. With it, [`device`] loads the
//! CUDA driver, NVRTC and cuBLAS at run time (no link-time dependency) and never panics when they
//! are missing.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod kernels;
pub mod pinned;
pub mod pool;
pub mod registrar;

#[cfg(feature = "cuda")]
pub mod device;
/// Device memory as a dma-buf for the RDMA transport's registration (feature `cuda`).
#[cfg(feature = "cuda")]
pub mod dmabuf;
#[cfg(feature = "cuda")]
pub mod nvrtc;
/// The NCCL fallback: collectives on device buffers through libnccl (feature `nccl`).
#[cfg(feature = "nccl")]
pub mod nccl;

#[cfg(feature = "cuda")]
pub use cudarc;
