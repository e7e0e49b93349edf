//! Tests of the CUDA backend that need a GPU: ignored by default, run by `tools/gpu-check.sh`
//! (`--ignored`).
use super::*;

/// Data through pinned staging memory to the device and back, and a second staging of the same
/// size class reuses the block.
#[test]
#[ignore = "needs a GPU"]
fn staging_round_trips_through_pinned_memory() {
    let be = Cuda::for_rank(0, PoolConfig::default()).unwrap_or_else(|e| panic!("needs a GPU: {e}"));
    let n = 300_000; // 1.2 MB: the 2 MiB class
    let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1e4).collect();
    let mut st = be.staging(n).unwrap();
    assert!(ember_cuda::device::page_locked(st.as_ptr()), "staging memory is page-locked");
    st.copy_from_slice(&data);
    let mut buf = be.zeros(n).unwrap();
    be.upload_into(&st, &mut buf).unwrap();
    let addr = st.as_ptr();
    drop(st);
    let s = be.pinned_stats();
    assert_eq!((s.driver_allocs, s.pinned, s.idle, s.live), (1, 2 << 20, 2 << 20, 0));
    let mut back = be.staging(n).unwrap();
    assert_eq!(back.as_ptr(), addr, "the same class reuses the block");
    assert_eq!(be.pinned_stats().driver_allocs, 1, "no new driver allocation");
    back.fill(0.0);
    be.download_into(&buf, &mut back).unwrap();
    assert!(back[..] == data[..], "round trip through the device");
    assert_eq!(be.download(&buf).unwrap(), data);
    assert!(matches!(be.download_into(&buf, &mut back[1..]), Err(Error::Input(_))));
    assert!(matches!(be.upload_into(&data[1..], &mut buf), Err(Error::Input(_))));
}
