//! Ember CUDA layer: the device memory pool, kernel sources and their NVRTC compilation.
