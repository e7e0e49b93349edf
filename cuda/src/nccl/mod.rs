//! The NCCL fallback: all-to-all (grouped send/recv), all-reduce, reduce-scatter and all-gather on
//! device buffers, through libnccl loaded at run time by cudarc (feature `nccl`).
//!
//! NCCL has no put/notify primitive, so this module implements the collectives directly on
//! NCCL's own calls: the one documented exception to "collectives written once" (docs/cuda.md,
//! "NCCL fallback").
//!
//! * [`probe`] loads libnccl and reads its version, without panicking; every constructor calls it
//!   first, so a missing library is an error that says what to do. cudarc 0.19 opens
//!   `libnccl.so` (and `.so.1`, `.so.9`–`.so.13`), not the `libnccl.so.2` that the PyPI wheel
//!   (`nvidia-nccl-cu13`) and Debian's `libnccl2` install: the error names the symlink to make.
//! * [`NcclId`]: the 128-byte unique id that rank 0 creates and the caller moves to the other ranks
//!   (through the job's bootstrap communicator: [`NcclComm::init_with`] takes the broadcast).
//! * [`NcclComm`]: one rank of an NCCL communicator on a CUDA stream (the engine's
//!   [`Gpu`](crate::device::Gpu) stream, or an [`NcclDevice`]'s). Buffers are anything that is
//!   [`DeviceMem`]: the engine's [`DevBuf`](crate::device::DevBuf), this module's [`NcclBuf`], or a bounds-checked
//!   [`DevView`] into either. Operations are enqueued on the stream (asynchronous, like NCCL);
//!   [`NcclComm::sync`] waits, polling the stream and NCCL's asynchronous error (a dead peer)
//!   instead of blocking in the driver, and aborts the communicator (`ncclCommAbort`) at that
//!   error or at the job's timeout; `Drop` waits the same way.
//! * [`NcclDevice`]: a CUDA context and a non-blocking stream without the engine's kernels (no
//!   NVRTC, no cuBLAS needed), for the benchmark and the tests.
//!
//! cudarc supplies the layers below: the symbol table loaded at run time (`cudarc::nccl::sys`) and
//! the calls returning NCCL's result code (`cudarc::nccl::result`). This module is the safe layer
//! over them, one concept a file: finding and checking the library (`library`), a failed call as
//! an error message (`error`), the unique id and its exchange (`id`), the device memory NCCL
//! reads and writes (`memory`) and the communicator with its collectives (`comm`).
mod comm;
mod error;
mod id;
mod library;
mod memory;

pub use comm::{default_timeout, NcclComm, NcclOp};
pub use cudarc::nccl::NcclType;
pub use id::{exchange_id, NcclId, UNIQUE_ID_BYTES};
pub use library::{decode_version, library_path, missing_library_message, probe, NcclInfo, MIN_VERSION};
pub use memory::{DevView, DeviceMem, NcclBuf, NcclDevice};
