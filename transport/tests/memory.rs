//! The collectives on memory the CPU must not touch, written once over `Memory`: in-process ranks
//! (the peers path) move it with their direct copy and reduce it with the memory's own hook. Here
//! the "device" is host memory behind such hooks, so every result can be checked against the
//! host collectives (bitwise: same algorithm, same order) and against plain references: f32
//! payloads summed in f32 in rank order, or in f64 in rank order then rounded once.
mod common;
use common::*;
use ember_transport::fabric::DirectCopy;
use ember_transport::{split_evenly, Comm, Error, Memory, ReduceOp};
use std::sync::Arc;

/// How the test memory reduces f32 contributions.
#[derive(Clone, Copy)]
enum Acc {
    /// Σ in f32, rank order (what the host transport does for f32).
    F32Sum,
    /// Σ in f64, rank order, divided by n, rounded once to f32 (replica sync's mean).
    F64Mean,
}

/// f32 "device" memory: the CPU moves it only through these hooks (and the fabric's direct copy).
struct Dev(Acc);

impl Memory for Dev {
    type Scratch = Vec<f32>;
    fn direct(&self) -> bool {
        true
    }
    fn scratch(&self, len: usize) -> ember_transport::Result<Vec<f32>> {
        Ok(vec![f32::NAN; len / 4])
    }
    fn base(&self, s: &mut Vec<f32>) -> *mut u8 {
        s.as_mut_ptr() as *mut u8
    }
    unsafe fn copy(&self, src: *const u8, dst: *mut u8, len: usize) -> ember_transport::Result<()> {
        // SAFETY: the `Memory::copy` contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        Ok(())
    }
    unsafe fn reduce(&self, parts: *const u8, n: usize, len: usize, out: *mut u8) -> ember_transport::Result<()> {
        let k = len / 4;
        // SAFETY: the `Memory::reduce` contract (f32 blocks of f32 buffers).
        let (parts, out) = unsafe { (std::slice::from_raw_parts(parts as *const f32, n * k), std::slice::from_raw_parts_mut(out as *mut f32, k)) };
        for (i, o) in out.iter_mut().enumerate() {
            *o = match self.0 {
                Acc::F32Sum => (1..n).fold(parts[i], |a, p| a + parts[p * k + i]),
                Acc::F64Mean => ((0..n).map(|p| parts[p * k + i] as f64).sum::<f64>() / n as f64) as f32,
            };
        }
        Ok(())
    }
}

fn memcpy() -> DirectCopy {
    Arc::new(|src, dst, len| {
        // SAFETY: the fabric copies between a sender's block and a posted buffer, both valid for
        // `len` bytes and distinct.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
        Ok(())
    })
}

/// Values whose f32 sum depends on the order (large and small magnitudes mixed).
fn x(r: usize, i: usize) -> f32 {
    let big = if (r + i).is_multiple_of(3) { 3.0e7 } else { -1.1e7 };
    big * (1.0 + r as f32 * 0.37) + val(r, i, 5) as f32 * 0.013
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn peers(n: usize, f: impl Fn(Comm) -> Vec<Vec<f32>> + Send + Sync + 'static) -> Vec<Vec<Vec<f32>>> {
    run("local", n, move |c| {
        c.set_direct_copy(memcpy()).unwrap();
        f(c)
    })
}

#[test]
fn all_reduce_in_device_memory_equals_the_host_collective_and_the_references() {
    for n in 1..=5 {
        // 100 003: host memory in several segments, device memory in one, reduced in place.
        for len in [0usize, 1, 7, 1000, 4099, 100_003] {
            let out = peers(n, move |c| {
                let r = c.rank();
                let v: Vec<f32> = (0..len).map(|i| x(r, i)).collect();
                let (mut host, mut sum, mut mean) = (v.clone(), v.clone(), v.clone());
                c.all_reduce(&mut host, ReduceOp::Sum).unwrap();
                // SAFETY: each buffer holds `len` f32s, borrowed mutably for the call.
                unsafe {
                    c.all_reduce_in(&Dev(Acc::F32Sum), sum.as_mut_ptr() as u64, len, 4).unwrap();
                    c.all_reduce_in(&Dev(Acc::F64Mean), mean.as_mut_ptr() as u64, len, 4).unwrap();
                }
                vec![host, sum, mean]
            });
            let f32_sum: Vec<f32> = (0..len).map(|i| (1..n).fold(x(0, i), |a, p| a + x(p, i))).collect();
            let f64_mean: Vec<f32> = (0..len).map(|i| ((0..n).map(|p| x(p, i) as f64).sum::<f64>() / n as f64) as f32).collect();
            for (r, o) in out.iter().enumerate() {
                assert_eq!(bits(&o[0]), bits(&f32_sum), "n={n} len={len} rank {r}: host all_reduce");
                assert_eq!(bits(&o[1]), bits(&f32_sum), "n={n} len={len} rank {r}: device all_reduce, f32 sum in rank order");
                assert_eq!(bits(&o[2]), bits(&f64_mean), "n={n} len={len} rank {r}: device all_reduce, f64 mean in rank order");
            }
        }
    }
}

#[test]
fn reduce_scatter_all_to_all_and_all_gather_in_device_memory_equal_the_host_collectives() {
    for n in 1..=5 {
        let out = peers(n, move |c| {
            let (r, n) = (c.rank(), c.size());
            // Reduce-scatter with unequal (and zero) counts.
            let counts: Vec<usize> = (0..n).map(|p| count(p, p, 2)).collect();
            let send: Vec<f32> = (0..counts.iter().sum()).map(|i| x(r, i)).collect();
            let mut host = vec![0f32; counts[r]];
            c.reduce_scatter_v(&send, &counts, &mut host, ReduceOp::Sum).unwrap();
            let mut dev = vec![0f32; counts[r]];
            let cb: Vec<usize> = counts.iter().map(|c| 4 * c).collect();
            // SAFETY: `send` holds the counts' sum, `dev` this rank's count.
            unsafe { c.reduce_scatter_v_in(&Dev(Acc::F32Sum), send.as_ptr() as u64, &cb, dev.as_mut_ptr() as u64) }.unwrap();
            // All-to-all-v.
            let sc: Vec<usize> = (0..n).map(|p| count(r, p, 1)).collect();
            let rc: Vec<usize> = (0..n).map(|p| count(p, r, 1)).collect();
            let a2a_send: Vec<f32> = (0..sc.iter().sum()).map(|i| x(r, i)).collect();
            let mut a2a_host = vec![0f32; rc.iter().sum()];
            c.all_to_all_v(&a2a_send, &sc, &mut a2a_host, &rc).unwrap();
            let mut a2a_dev = vec![f32::NAN; rc.iter().sum()];
            let (sb, rb): (Vec<usize>, Vec<usize>) = (sc.iter().map(|c| 4 * c).collect(), rc.iter().map(|c| 4 * c).collect());
            // SAFETY: both buffers hold their counts' sums.
            unsafe { c.all_to_all_v_in(&Dev(Acc::F32Sum), a2a_send.as_ptr() as u64, &sb, a2a_dev.as_mut_ptr() as u64, &rb) }.unwrap();
            // All-gather-v of uneven blocks.
            let gc = split_evenly(23, n);
            let mine: Vec<f32> = (0..gc[r]).map(|i| x(r, i)).collect();
            let mut g_host = vec![0f32; 23];
            c.all_gather_v(&mine, &mut g_host, &gc).unwrap();
            let mut g_dev = vec![f32::NAN; 23];
            let gb: Vec<usize> = gc.iter().map(|c| 4 * c).collect();
            // SAFETY: `mine` holds this rank's count, `g_dev` their sum.
            unsafe { c.all_gather_v_in(&Dev(Acc::F32Sum), mine.as_ptr() as u64, &gb, g_dev.as_mut_ptr() as u64) }.unwrap();
            vec![host, dev, a2a_host, a2a_dev, g_host, g_dev]
        });
        for (r, o) in out.iter().enumerate() {
            // The reference: rank r's block of every rank's send, summed in f32 in rank order.
            let counts: Vec<usize> = (0..n).map(|p| count(p, p, 2)).collect();
            let off: usize = counts[..r].iter().sum();
            let want: Vec<f32> = (0..counts[r]).map(|i| (1..n).fold(x(0, off + i), |a, p| a + x(p, off + i))).collect();
            assert_eq!(bits(&o[0]), bits(&want), "n={n} rank {r}: host reduce-scatter");
            assert_eq!(bits(&o[1]), bits(&want), "n={n} rank {r}: device reduce-scatter");
            assert_eq!(bits(&o[2]), bits(&o[3]), "n={n} rank {r}: all-to-all-v");
            assert_eq!(bits(&o[4]), bits(&o[5]), "n={n} rank {r}: all-gather-v");
        }
    }
}

#[test]
fn device_memory_needs_the_ranks_direct_copy_and_its_failure_is_reported() {
    // Without a direct copy the local transport refuses before any byte moves.
    let out = run("local", 2, |c| {
        let mut v = vec![1f32; 8];
        // SAFETY: `v` holds 8 f32s.
        unsafe { c.all_reduce_in(&Dev(Acc::F32Sum), v.as_mut_ptr() as u64, 8, 4) }.unwrap_err()
    });
    for e in out {
        assert!(matches!(e, Error::Usage { .. }) && e.to_string().contains("direct copy"), "{e}");
    }
    // A failing device copy fails the collective on every rank: the copying rank reports the
    // copy's error, a rank waiting on it that rank's failure (or its departure).
    let out = run("local", 2, |c| {
        c.set_direct_copy(Arc::new(|_, _, _| Err(Error::Bootstrap("device copy: out of memory".into())))).unwrap();
        let mut v = vec![1f32; 8];
        // SAFETY: `v` holds 8 f32s.
        (c.rank(), unsafe { c.all_reduce_in(&Dev(Acc::F32Sum), v.as_mut_ptr() as u64, 8, 4) }.unwrap_err())
    });
    for (r, e) in &out {
        let s = e.to_string();
        assert!(s.contains("out of memory") || matches!(e, Error::PeerFailed { peer, .. } if *peer == 1 - r), "rank {r}: {s}");
    }
    assert!(out.iter().any(|(_, e)| e.to_string().contains("out of memory")), "{out:?}");
}

/// Host f32s reduced as the f64-summed mean (`Host::<f32>::mean_in_f64`, replica sync's
/// reduction): bitwise the f64 host all-reduce (mean) of the same values rounded once, and the
/// device memory's f64 mean; the payload is the f32s themselves. Lengths cross the reduction's
/// tiles and split unevenly over the ranks; -0.0 stays -0.0.
#[test]
fn host_f32_mean_summed_in_f64_equals_the_f64_mean_rounded_once() {
    for n in 1..=5 {
        // 5000: one round for 2 ranks, one segment per chunk for more; 200 003: chunks of
        // several 256 KiB segments, the last one short, reduced in place.
        for len in [0usize, 1, 7, 1023, 1025, 5000, 200_003] {
            let out = run("local", n, move |c| {
                let r = c.rank();
                let v: Vec<f32> = (0..len).map(|i| if i == 3 { -0.0 } else { x(r, i) }).collect();
                let mut wide: Vec<f64> = v.iter().map(|&a| a as f64).collect();
                c.all_reduce(&mut wide, ReduceOp::Mean).unwrap();
                let mut mean = v.clone();
                // SAFETY: `mean` holds `len` f32s, borrowed mutably for the call.
                unsafe { c.all_reduce_in(&ember_transport::Host::<f32>::mean_in_f64(), mean.as_mut_ptr() as u64, len, 4).unwrap() };
                vec![wide.iter().map(|&a| a as f32).collect(), mean]
            });
            for (r, o) in out.iter().enumerate() {
                assert_eq!(bits(&o[1]), bits(&o[0]), "n={n} len={len} rank {r}: f32 mean in f64 vs f64 mean rounded");
                assert_eq!(bits(&o[1]), bits(&out[0][1]), "n={n} len={len}: ranks differ");
            }
            if len > 3 {
                assert_eq!(out[0][1][3].to_bits(), (-0.0f32).to_bits(), "n={n}: -0.0 averaged must stay -0.0");
            }
        }
    }
}

/// A memory that records the scratch it hands out, around another.
struct Counted<M>(M, std::sync::Mutex<Vec<usize>>);

impl<M: Memory> Memory for Counted<M> {
    type Scratch = M::Scratch;
    fn direct(&self) -> bool {
        self.0.direct()
    }
    fn scratch(&self, len: usize) -> ember_transport::Result<M::Scratch> {
        self.1.lock().unwrap().push(len);
        self.0.scratch(len)
    }
    fn base(&self, s: &mut M::Scratch) -> *mut u8 {
        self.0.base(s)
    }
    unsafe fn copy(&self, src: *const u8, dst: *mut u8, len: usize) -> ember_transport::Result<()> {
        // SAFETY: the caller's `Memory::copy` contract, passed on.
        unsafe { self.0.copy(src, dst, len) }
    }
    unsafe fn reduce(&self, parts: *const u8, n: usize, len: usize, out: *mut u8) -> ember_transport::Result<()> {
        // SAFETY: the caller's `Memory::reduce` contract, passed on.
        unsafe { self.0.reduce(parts, n, len, out) }
    }
    unsafe fn reduce_in_place(&self, parts: *mut u8, n: usize, len: usize, own: usize, out: *mut u8) -> ember_transport::Result<()> {
        // SAFETY: the caller's `Memory::reduce_in_place` contract, passed on.
        unsafe { self.0.reduce_in_place(parts, n, len, own, out) }
    }
}

/// The scratch figure memory planners read (`all_reduce_scratch_bytes`) is what an all-reduce
/// allocates, in host memory and in device memory: one round (small), one segment per chunk,
/// several segments, fewer elements than ranks.
#[test]
fn all_reduce_scratch_bytes_is_what_the_all_reduce_allocates() {
    for n in 1..=5 {
        for len in [0usize, 1, 3, 2049, 8193, 65_537, 200_003] {
            let out = peers(n, move |c| {
                let r = c.rank();
                let v: Vec<f32> = (0..len).map(|i| x(r, i)).collect();
                let (mut host, mut dev) = (v.clone(), v);
                let h = Counted(ember_transport::Host::<f32>::reducing(ReduceOp::Sum), Default::default());
                let d = Counted(Dev(Acc::F32Sum), Default::default());
                // SAFETY: each buffer holds `len` f32s, borrowed mutably for the call.
                unsafe {
                    c.all_reduce_in(&h, host.as_mut_ptr() as u64, len, 4).unwrap();
                    c.all_reduce_in(&d, dev.as_mut_ptr() as u64, len, 4).unwrap();
                }
                // Byte counts as f32s (exact: below 2^24), to travel with the buffers.
                let took = |m: &std::sync::Mutex<Vec<usize>>| m.lock().unwrap().iter().map(|&b| b as f32).collect::<Vec<f32>>();
                vec![took(&h.1), took(&d.1), host, dev]
            });
            for (direct, i) in [(false, 0), (true, 1)] {
                let want = ember_transport::all_reduce_scratch_bytes(len, 4, n, direct).unwrap();
                let got: Vec<f32> = out[0][i].clone();
                let total: f32 = got.iter().sum();
                assert_eq!(total as usize, want, "n={n} len={len} direct={direct}: allocated {got:?}");
                assert!(got.len() <= 1, "n={n} len={len} direct={direct}: one scratch per call, got {got:?}");
            }
            assert_eq!(bits(&out[0][2]), bits(&out[0][3]), "n={n} len={len}: host and device sums");
        }
    }
}
