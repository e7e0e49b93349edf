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

/// Needs a GPU (otherwise it says SKIPPED and passes): `embedding_apply` refuses row gradients
/// whose rows repeat, go down or leave the shard (checked on the device, as the CPU backend
/// checks them on the host), and changes nothing then; good rows apply as on the CPU.
#[test]
fn apply_refuses_rows_that_repeat_or_leave_the_shard() {
    if let Err(e) = Cuda::probe() {
        eprintln!("SKIPPED (no GPU): {e}");
        return;
    }
    let be = Cuda::for_rank(0, PoolConfig::default()).expect("a probed device opens");
    let upd = EmbUpdate { kind: EmbKind::RowWiseAdagrad, lr: 0.1, eps: 1e-8, c: 1.0, eps_inside: false, l2: 0.0 };
    let spec = ShardSpec::whole(0, 10, 8);
    let init: Vec<f32> = (0..80).map(|i| i as f32 * 0.01).collect();
    let mut shard = be.shard(spec.clone(), &init, &upd).unwrap();
    let rg = |rows: &[u64]| RowGrads { rows: be.upload_ids(rows).unwrap(), num_rows: rows.len(), grads: be.upload(&vec![1.0; rows.len() * 8]).unwrap(), sq: be.upload(&vec![8.0; rows.len()]).unwrap() };
    for bad in [&[3u64, 3][..], &[5, 2], &[1, 10], &[u64::MAX]] {
        let e = be.embedding_apply(&mut shard, &rg(bad), None, &upd).expect_err("bad rows accepted");
        assert!(e.to_string().contains("unique, ascending"), "{bad:?}: {e}");
        assert_eq!(be.download(&shard.weights).unwrap(), init, "{bad:?}: a refused apply changed the weights");
    }
    be.embedding_apply(&mut shard, &rg(&[1, 4, 9]), None, &upd).unwrap();
    let mut cpu = Cpu.shard(spec, &init, &upd).unwrap();
    let crg = RowGrads { rows: vec![1, 4, 9], num_rows: 3, grads: vec![1.0; 24], sq: vec![8.0; 3] };
    Cpu.embedding_apply(&mut cpu, &crg, None, &upd).unwrap();
    let got = be.download(&shard.weights).unwrap();
    assert!(got.iter().zip(&cpu.weights).all(|(a, b)| (a - b).abs() <= 1e-6), "GPU apply differs from the CPU");
}
