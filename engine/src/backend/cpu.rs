//! The CPU backend (rayon).
