//! The NCCL fallback (feature `nccl`).
//!
//! Without libnccl or a GPU: every entry point returns an error that says what is missing (never a
//! panic), and the unique-id exchange fails on every rank when rank 0 cannot create the id.
//! With a GPU and libnccl: a 1-rank smoke test of all_to_all_v / all_reduce / all_gather /
//! reduce_scatter on device buffers against host references, and, with two or more GPUs, the
//! same collectives with one rank per GPU (threads of this process). Those are ignored by
//! default (`tools/gpu-check.sh` runs the 1-rank ones with `--ignored`) and fail, naming what is
//! missing, when run without it. EMBER_REQUIRE_LIBNCCL=1 requires that libnccl loads (CI without
//! a GPU, wheel linked).
#[cfg(feature = "nccl")]
mod with_nccl {
    use ember_cuda::nccl::{self, exchange_id, DevView, NcclComm, NcclDevice, NcclId, NcclOp, UNIQUE_ID_BYTES};
    use std::sync::{Arc, Barrier, Mutex};

    /// The GPU tests run one at a time (their communicators share device 0).
    static GPU: Mutex<()> = Mutex::new(());

    fn gpu_lock() -> std::sync::MutexGuard<'static, ()> {
        GPU.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The GPU count; fails naming what is missing unless libnccl and `min_gpus` GPUs are here.
    fn needs_gpus_and_nccl(min_gpus: usize) -> usize {
        let gpus = NcclDevice::count();
        match nccl::probe() {
            Err(e) => panic!("needs libnccl: {e}"),
            Ok(_) if gpus < min_gpus => panic!("needs {min_gpus} GPU(s), {gpus} here"),
            Ok(v) => eprintln!("NCCL {v}, {gpus} GPU(s)"),
        }
        gpus
    }

    #[test]
    fn version_codes_decode() {
        let v = nccl::decode_version(22809);
        assert_eq!((v.major, v.minor, v.patch), (2, 28, 9));
        assert_eq!(v.to_string(), "2.28.9");
        let old = nccl::decode_version(2708);
        assert_eq!((old.major, old.minor, old.patch), (2, 7, 8));
    }

    #[test]
    fn missing_library_message_names_the_fix() {
        // A folder holding only libnccl.so.2 (as the PyPI wheel and Debian's libnccl2 install it).
        let dir = std::env::temp_dir().join(format!("ember-nccl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let so2 = dir.join("libnccl.so.2");
        std::fs::write(&so2, b"").unwrap();
        let m = nccl::missing_library_message(&[dir.join("nothing-here"), dir.clone()], false);
        assert!(m.contains(&format!("ln -sf {}", so2.display())), "{m}");
        assert!(m.contains("/libnccl.so`") && m.contains("LD_LIBRARY_PATH"), "{m}");
        std::fs::remove_dir_all(&dir).ok();
        let m = nccl::missing_library_message(&[], true);
        assert!(m.contains("libnccl.so.2 loads") && m.contains("ln -sf"), "{m}");
        let m = nccl::missing_library_message(&[], false);
        assert!(m.starts_with("no NCCL library") && m.contains("nvidia-nccl-cu13"), "{m}");
    }

    #[test]
    fn without_gpu_or_libnccl_creation_is_an_error_not_a_panic() {
        let _g = gpu_lock();
        let probe = nccl::probe();
        let gpus = NcclDevice::count();
        // CI with the wheel linked sets EMBER_REQUIRE_LIBNCCL=1: the library must load (no GPU needed).
        if std::env::var("EMBER_REQUIRE_LIBNCCL").map(|v| v == "1").unwrap_or(false) {
            assert!(probe.is_ok(), "EMBER_REQUIRE_LIBNCCL=1 but {:?}", probe);
        }
        // Creating a communicator: probes NCCL, then the device, then NCCL's init.
        let r = std::panic::catch_unwind(|| NcclComm::single(0).map(|_| ()));
        let r = r.expect("NcclComm::single panicked");
        match (&probe, gpus) {
            (Err(e), _) => {
                eprintln!("no libnccl (as expected here): {e}");
                assert!(e.contains("libnccl"), "the error should name libnccl: {e}");
                let err = r.expect_err("a communicator without libnccl");
                assert!(err.contains("libnccl"), "{err}");
                let id = NcclId::new().expect_err("a unique id without libnccl");
                assert!(id.contains("libnccl"), "{id}");
            }
            (Ok(v), 0) => {
                eprintln!("libnccl {v} loads, no GPU");
                let err = r.expect_err("a communicator without a GPU");
                assert!(err.contains("CUDA"), "the error should name CUDA: {err}");
                assert!(NcclDevice::open(0).is_err());
            }
            (Ok(v), n) => {
                eprintln!("libnccl {v} and {n} GPU(s) present: the communicator opens");
                r.expect("1-rank communicator on device 0");
            }
        }
    }

    /// A broadcast over threads for the id exchange: rank 0 publishes, the others copy.
    struct ThreadBcast {
        slot: Mutex<Vec<u8>>,
        barrier: Barrier,
    }

    impl ThreadBcast {
        fn new(n: usize) -> Arc<ThreadBcast> {
            Arc::new(ThreadBcast {
                slot: Mutex::new(Vec::new()),
                barrier: Barrier::new(n),
            })
        }
        fn bcast(&self, rank: usize, b: &mut [u8]) -> Result<(), String> {
            if rank == 0 {
                *self.slot.lock().unwrap() = b.to_vec();
            }
            self.barrier.wait();
            if rank != 0 {
                b.copy_from_slice(&self.slot.lock().unwrap());
            }
            Ok(())
        }
    }

    #[test]
    fn id_exchange_reaches_every_rank_or_fails_on_every_rank() {
        let n = 3;
        let b = ThreadBcast::new(n);
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let b = b.clone();
                std::thread::spawn(move || exchange_id(r, |buf| b.bcast(r, buf)))
            })
            .collect();
        let res: Vec<_> = hs.into_iter().map(|h| h.join().expect("no panic")).collect();
        match nccl::probe() {
            Ok(_) => {
                let id0 = res[0].clone().expect("rank 0 id");
                for (r, x) in res.iter().enumerate() {
                    assert_eq!(x.as_ref().expect("id"), &id0, "rank {r} got another id");
                }
                assert_eq!(id0.as_bytes().len(), UNIQUE_ID_BYTES);
            }
            Err(e) => {
                assert_eq!(res[0].as_ref().unwrap_err(), &e);
                for x in &res[1..] {
                    assert!(x.as_ref().unwrap_err().contains("rank 0 could not create"), "{x:?}");
                }
            }
        }
        assert!(NcclId::from_bytes(&[0u8; 5]).is_err());
    }

    /// Small integers: every sum is exact in f32.
    fn seed(rank: usize, peer: usize, i: usize) -> f32 {
        ((rank * 131 + peer * 17 + i * 7) % 61) as f32 - 30.0
    }

    /// The collectives on `comm` (rank r of n) against host references computed from the seeds.
    fn check_collectives(dev: &NcclDevice, comm: &NcclComm) {
        let (n, me) = (comm.size(), comm.rank());
        // all_to_all_v, uneven counts: rank r sends (r + p) % 3 + 2 * p + 1 elements to rank p.
        let cnt = |from: usize, to: usize| (from + to) % 3 + 2 * to + 1;
        let sc: Vec<usize> = (0..n).map(|p| cnt(me, p)).collect();
        let rc: Vec<usize> = (0..n).map(|p| cnt(p, me)).collect();
        let host_send: Vec<f32> = (0..n).flat_map(|p| (0..cnt(me, p)).map(move |i| seed(me, p, i))).collect();
        let want: Vec<f32> = (0..n).flat_map(|p| (0..cnt(p, me)).map(move |i| seed(p, me, i))).collect();
        let mut send = dev.alloc::<f32>(host_send.len()).unwrap();
        dev.htod(&mut send, &host_send).unwrap();
        let mut recv = dev.alloc::<f32>(want.len() + 3).unwrap();
        dev.htod(&mut recv, &vec![f32::NAN; want.len() + 3]).unwrap();
        comm.all_to_all_v(&send, &sc, &mut recv, &rc).unwrap();
        let mut got = vec![0f32; want.len() + 3];
        dev.dtoh(&mut got, &recv).unwrap();
        assert_eq!(&got[..want.len()], &want[..], "all_to_all_v (rank {me})");
        assert!(got[want.len()..].iter().all(|x| x.is_nan()), "all_to_all_v wrote past its counts");

        // all_to_all, equal counts, bytes.
        let c = 1000;
        let hs: Vec<u8> = (0..n * c).map(|i| ((me * 7 + i) % 251) as u8).collect();
        let wb: Vec<u8> = (0..n * c).map(|i| ((i / c * 7 + me * c + i % c) % 251) as u8).collect();
        let mut sb = dev.alloc::<u8>(n * c).unwrap();
        dev.htod(&mut sb, &hs).unwrap();
        let mut rb = dev.alloc::<u8>(n * c).unwrap();
        comm.all_to_all(&sb, &mut rb, c).unwrap();
        let mut gb = vec![0u8; n * c];
        dev.dtoh(&mut gb, &rb).unwrap();
        assert_eq!(gb, wb, "all_to_all u8 (rank {me})");

        // all_reduce (sum) f32, out of place and in place; f64 through a view.
        let len = 4099;
        let x: Vec<f32> = (0..len).map(|i| seed(me, 0, i)).collect();
        let sum: Vec<f32> = (0..len).map(|i| (0..n).map(|r| seed(r, 0, i)).sum()).collect();
        let mut a = dev.alloc::<f32>(len).unwrap();
        dev.htod(&mut a, &x).unwrap();
        let mut b = dev.alloc::<f32>(len).unwrap();
        comm.all_reduce(&a, &mut b, NcclOp::Sum).unwrap();
        let mut g = vec![0f32; len];
        dev.dtoh(&mut g, &b).unwrap();
        assert_eq!(g, sum, "all_reduce f32 (rank {me})");
        comm.all_reduce_in_place(&mut a, NcclOp::Sum).unwrap();
        dev.dtoh(&mut g, &a).unwrap();
        assert_eq!(g, sum, "all_reduce_in_place f32 (rank {me})");
        let xd: Vec<f64> = (0..len).map(|i| seed(me, 1, i) as f64 * 0.5).collect();
        let sd: Vec<f64> = (0..len).map(|i| (0..n).map(|r| seed(r, 1, i) as f64 * 0.5).sum()).collect();
        let mut d = dev.alloc::<f64>(len + 10).unwrap();
        dev.htod(&mut d, &[0f64; 10]).unwrap();
        {
            let mut v = DevView::of(&d, 10, len).unwrap();
            dev.htod(&mut v, &xd).unwrap();
            comm.all_reduce_in_place(&mut v, NcclOp::Sum).unwrap();
        }
        let mut gd = vec![0f64; len + 10];
        dev.dtoh(&mut gd, &d).unwrap();
        assert_eq!(&gd[10..], &sd[..], "all_reduce f64 through a view (rank {me})");
        assert!(gd[..10].iter().all(|&v| v == 0.0), "the view leaked");
        comm.all_reduce_in_place(&mut DevView::of(&d, 10, len).unwrap(), NcclOp::Max).unwrap();
        comm.sync().unwrap();

        // all_gather: rank r contributes k values; everyone gets them in rank order.
        let k = 777;
        let mine: Vec<f32> = (0..k).map(|i| seed(me, 2, i)).collect();
        let all: Vec<f32> = (0..n).flat_map(|r| (0..k).map(move |i| seed(r, 2, i))).collect();
        let mut s = dev.alloc::<f32>(k).unwrap();
        dev.htod(&mut s, &mine).unwrap();
        let mut r = dev.alloc::<f32>(n * k).unwrap();
        comm.all_gather(&s, &mut r).unwrap();
        let mut gg = vec![0f32; n * k];
        dev.dtoh(&mut gg, &r).unwrap();
        assert_eq!(gg, all, "all_gather (rank {me})");

        // reduce_scatter: block `me` of the sum over ranks.
        let full: Vec<f32> = (0..n * k).map(|i| seed(me, 3, i)).collect();
        let block: Vec<f32> = (0..k).map(|i| (0..n).map(|rr| seed(rr, 3, me * k + i)).sum()).collect();
        let mut s2 = dev.alloc::<f32>(n * k).unwrap();
        dev.htod(&mut s2, &full).unwrap();
        let mut r2 = dev.alloc::<f32>(k).unwrap();
        comm.reduce_scatter(&s2, &mut r2, NcclOp::Sum).unwrap();
        let mut gr = vec![0f32; k];
        dev.dtoh(&mut gr, &r2).unwrap();
        assert_eq!(gr, block, "reduce_scatter (rank {me})");

        // Misuse is an error naming the operation (checked before NCCL is called).
        let e = comm.all_to_all_v(&send, &sc[..n - 1], &mut recv, &rc).unwrap_err();
        assert!(e.contains("all_to_all_v"), "{e}");
        let e = comm.reduce_scatter(&DevView::of(&s2, 0, n * k - 1).unwrap(), &mut r2, NcclOp::Sum).unwrap_err();
        assert!(e.contains("reduce_scatter"), "{e}");
        let e = comm.all_gather(&s, &mut DevView::of(&r, 0, n * k - 1).unwrap()).unwrap_err();
        assert!(e.contains("all_gather"), "{e}");
        comm.sync().unwrap();
    }

    #[test]
    #[ignore = "needs a GPU and libnccl"]
    fn one_rank_smoke_on_device_buffers() {
        let _g = gpu_lock();
        needs_gpus_and_nccl(1);
        let (dev, comm) = NcclComm::single(0).expect("1-rank NCCL communicator");
        eprintln!("device 0: {}", dev.name);
        assert_eq!((comm.rank(), comm.size()), (0, 1));
        check_collectives(&dev, &comm);
    }

    /// The engine's buffers (pool blocks of `Gpu`) on the engine's stream; NVRTC and cuBLAS open
    /// the engine's device.
    #[test]
    #[ignore = "needs a GPU, libnccl, NVRTC and cuBLAS"]
    fn one_rank_on_engine_buffers() {
        let _g = gpu_lock();
        needs_gpus_and_nccl(1);
        let gpu = ember_cuda::device::Gpu::open(0, ember_cuda::pool::PoolConfig::default())
            .unwrap_or_else(|e| panic!("needs the engine's device (NVRTC/cuBLAS on LD_LIBRARY_PATH?): {e}"));
        let id = NcclId::new().unwrap();
        let comm = NcclComm::new(gpu.stream.clone(), 0, 1, &id).expect("communicator on the engine's stream");
        let x: Vec<f32> = (0..5000).map(|i| seed(0, 9, i)).collect();
        let a = gpu.alloc::<f32>(x.len()).unwrap();
        gpu.htod(a.ptr(), &x).unwrap();
        let mut b = gpu.alloc::<f32>(x.len()).unwrap();
        comm.all_reduce(&a, &mut b, NcclOp::Sum).unwrap();
        let mut c = gpu.alloc::<f32>(x.len()).unwrap();
        comm.all_to_all(&b, &mut c, x.len()).unwrap();
        let mut g = vec![0f32; x.len()];
        gpu.dtoh(&mut g, c.ptr()).unwrap();
        assert_eq!(g, x);
    }

    /// One rank per GPU, as threads of this process (NCCL allows it with one device per rank).
    #[test]
    #[ignore = "needs two GPUs and libnccl"]
    fn one_rank_per_gpu_when_several() {
        let _g = gpu_lock();
        let gpus = needs_gpus_and_nccl(2);
        let n = gpus.min(8);
        let b = ThreadBcast::new(n);
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let dev = NcclDevice::open(r).expect("device");
                    let comm = NcclComm::init_with(dev.stream.clone(), r, n, |buf| b.bcast(r, buf)).expect("communicator");
                    check_collectives(&dev, &comm);
                })
            })
            .collect();
        for h in hs {
            h.join().expect("rank thread");
        }
    }
}
