//! Every collective against a plain reference, for 1..=8 ranks, on every backend, blocking and
//! non-blocking, with odd sizes, zero-size peers and unequal counts.
mod common;
use common::*;
use ember_transport::{ReduceOp, split_evenly};

fn a2a_case(backend: &'static str, n: usize, nonblocking: bool) {
    let out = run(backend, n, move |c| {
        let (r, n) = (c.rank(), c.size());
        let sc: Vec<usize> = (0..n).map(|p| count(r, p, 1)).collect();
        let rc: Vec<usize> = (0..n).map(|p| count(p, r, 1)).collect();
        let mut send = Vec::new();
        for (p, &c) in sc.iter().enumerate() {
            for i in 0..c {
                send.push((r * 1_000_000 + p * 1000 + i) as u32);
            }
        }
        let recv = if nonblocking {
            c.start_all_to_all_v(send, sc, rc).wait().unwrap()
        } else {
            let mut recv = vec![0u32; rc.iter().sum()];
            c.all_to_all_v(&send, &sc, &mut recv, &rc).unwrap();
            recv
        };
        (r, recv)
    });
    for (r, recv) in out {
        let want: Vec<u32> = (0..n).flat_map(|p| (0..count(p, r, 1)).map(move |i| (p * 1_000_000 + r * 1000 + i) as u32)).collect();
        assert_eq!(recv, want, "{backend} n={n} rank {r}");
    }
}

fn allreduce_case(backend: &'static str, n: usize, nonblocking: bool, len: usize) {
    for op in [ReduceOp::Sum, ReduceOp::Mean] {
        let out = run(backend, n, move |c| {
            let r = c.rank();
            let v64: Vec<f64> = (0..len).map(|i| val(r, i, 3) * 0.25).collect();
            let v32: Vec<f32> = (0..len).map(|i| val(r, i, 4) as f32).collect();
            if nonblocking {
                let a = c.start_all_reduce(v64, op);
                let b = c.start_all_reduce(v32, op);
                (a.wait().unwrap(), b.wait().unwrap())
            } else {
                let (mut a, mut b) = (v64, v32);
                c.all_reduce(&mut a, op).unwrap();
                c.all_reduce(&mut b, op).unwrap();
                (a, b)
            }
        });
        let mut want64 = vec![0f64; len];
        let mut want32 = vec![0f32; len];
        for i in 0..len {
            for r in 0..n {
                want64[i] += val(r, i, 3) * 0.25;
                want32[i] += val(r, i, 4) as f32;
            }
            if op == ReduceOp::Mean {
                want64[i] /= n as f64;
                want32[i] /= n as f32;
            }
        }
        for (a, b) in &out {
            assert_eq!(a, &want64, "{backend} n={n} {op:?} f64");
            assert_eq!(b, &want32, "{backend} n={n} {op:?} f32");
        }
    }
}

#[test]
fn all_to_all_v_every_backend() {
    for b in BACKENDS {
        for n in 1..=8 {
            a2a_case(b, n, false);
        }
        for n in [2, 3, 5] {
            a2a_case(b, n, true);
        }
    }
}

#[test]
fn all_reduce_every_backend() {
    for b in BACKENDS {
        for n in [1, 2, 3, 4, 7, 8] {
            allreduce_case(b, n, false, 1013);
        }
        allreduce_case(b, 3, false, 2); // fewer elements than ranks: empty chunks
        allreduce_case(b, 5, true, 333);
        // Chunks of several 256 KiB segments: 3 ranks × 131 074 or 131 073 elements (f64: 4
        // segments, the last short; f32: 2 and a short one); 2 ranks × exactly 2 segments of f32.
        allreduce_case(b, 3, false, 393_221);
        allreduce_case(b, 2, true, 2 * 2 * 65_536);
    }
}

#[test]
fn all_reduce_is_bitwise_identical_on_every_rank() {
    // Non-integer values whose sum depends on order: all ranks must still agree bit for bit,
    // and equal the rank-order sum. Every form: one round (small), reduce-scatter + all-gather
    // in one segment (20 000 f32s from each of 5 ranks), and in several segments (300 007: 5
    // chunks of 60 002 or 60 001 f32s, each a 256 KiB segment and a short one), on every backend.
    let n = 5;
    for (b, len) in [("local", 257usize), ("local", 20_000)].into_iter().chain(BACKENDS.iter().map(|&b| (b, 300_007))) {
        let out = run(b, n, move |c| {
            let r = c.rank();
            let mut v: Vec<f32> = (0..len).map(|i| 1.0 / (1.0 + (r * 257 + i) as f32) * 1e3f32.powi(r as i32 % 3)).collect();
            c.all_reduce(&mut v, ReduceOp::Mean).unwrap();
            v
        });
        assert_eq!(out[0].len(), len);
        for (i, got) in out[0].iter().enumerate() {
            let mut s = 0f32;
            for r in 0..n {
                s += 1.0 / (1.0 + (r * 257 + i) as f32) * 1e3f32.powi(r as i32 % 3);
            }
            assert_eq!(got.to_bits(), (s / n as f32).to_bits());
        }
        for o in &out {
            assert!(o.iter().zip(&out[0]).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}

#[test]
fn reduce_scatter_all_gather_broadcast_barrier() {
    for b in BACKENDS {
        for n in [1, 2, 3, 6] {
            let out = run(b, n, move |c| {
                let (r, n) = (c.rank(), c.size());
                let counts: Vec<usize> = (0..n).map(|p| count(p, p, 2)).collect();
                let total: usize = counts.iter().sum();
                let send: Vec<f64> = (0..total).map(|i| val(r, i, 5)).collect();
                let mut rs = vec![0f64; counts[r]];
                c.reduce_scatter_v(&send, &counts, &mut rs, ReduceOp::Sum).unwrap();
                let rs_nb = c.start_reduce_scatter_v(send, counts.clone(), ReduceOp::Mean).wait().unwrap();
                // all-gather: rank p contributes count(p, 0, 9) items
                let gc: Vec<usize> = (0..n).map(|p| count(p, 0, 9)).collect();
                let mine: Vec<i64> = (0..gc[r]).map(|i| (r * 100 + i) as i64).collect();
                let mut ag = vec![0i64; gc.iter().sum()];
                c.all_gather_v(&mine, &mut ag, &gc).unwrap();
                let (ag2, gc2) = c.all_gather_alloc(&mine).unwrap();
                let ag3 = c.start_all_gather_v(mine, gc.clone()).wait().unwrap();
                let mut bc: Vec<u64> = if r == n - 1 { (0..37).map(|i| i * 3 + 1).collect() } else { vec![0; 37] };
                c.broadcast(&mut bc, n - 1).unwrap();
                let bc2 = c.start_broadcast(vec![r as u8; 5], 0).wait().unwrap();
                c.barrier().unwrap();
                c.start_barrier().wait().unwrap();
                assert_eq!(gc2, gc);
                assert_eq!(ag2, ag);
                assert_eq!(ag3, ag);
                (r, rs, rs_nb, ag, bc, bc2)
            });
            let counts: Vec<usize> = (0..n).map(|p| count(p, p, 2)).collect();
            let offs: Vec<usize> = (0..n).map(|p| counts[..p].iter().sum()).collect();
            let gc: Vec<usize> = (0..n).map(|p| count(p, 0, 9)).collect();
            let ag_want: Vec<i64> = (0..n).flat_map(|p| (0..gc[p]).map(move |i| (p * 100 + i) as i64)).collect();
            for (r, rs, rs_nb, ag, bc, bc2) in out {
                let want: Vec<f64> = (0..counts[r]).map(|i| (0..n).map(|q| val(q, offs[r] + i, 5)).sum()).collect();
                assert_eq!(rs, want, "{b} n={n} reduce_scatter rank {r}");
                let mean: Vec<f64> = want.iter().map(|x| x / n as f64).collect();
                assert_eq!(rs_nb, mean);
                assert_eq!(ag, ag_want, "{b} n={n} all_gather rank {r}");
                assert_eq!(bc, (0..37).map(|i| i * 3 + 1).collect::<Vec<u64>>());
                assert_eq!(bc2, vec![0u8; 5]);
            }
        }
    }
}

#[test]
fn split_forms_sharding_and_replica_groups_in_flight_together() {
    // 2x3 grid, "replicas inside a node": sharding group i = {i, M+i, ...}, replica group j = {jM..jM+M-1}.
    for b in BACKENDS {
        let (m, nn) = (2usize, 3usize);
        let out = run(b, m * nn, move |c| {
            let r = c.rank();
            let shard = c.split((r % m) as u32, r as i64).unwrap();
            let replica = c.split((r / m) as u32, r as i64).unwrap();
            // A sharding-group all-to-all and a replica-group all-reduce in flight at once.
            let n = shard.size();
            let send: Vec<u32> = (0..n).map(|p| (r * 10 + p) as u32).collect();
            let a = shard.start_all_to_all_v(send, vec![1; n], vec![1; n]);
            let bq = replica.start_all_reduce(vec![r as f64; 4], ReduceOp::Mean);
            let mut w = vec![1.0f32; 3];
            c.all_reduce(&mut w, ReduceOp::Sum).unwrap(); // and a world collective meanwhile
            (r, shard.rank(), shard.world_ranks().to_vec(), replica.world_ranks().to_vec(), a.wait().unwrap(), bq.wait().unwrap(), w)
        });
        for (r, srank, sm, rm, a2a, avg, w) in out {
            let g = r % m;
            let want_sm: Vec<usize> = (0..nn).map(|k| k * m + g).collect();
            assert_eq!(sm, want_sm);
            assert_eq!(srank, r / m);
            let j = r / m;
            assert_eq!(rm, (j * m..j * m + m).collect::<Vec<_>>());
            let want: Vec<u32> = want_sm.iter().map(|&p| (p * 10 + srank) as u32).collect();
            assert_eq!(a2a, want, "{b}");
            let mean = (j * m..j * m + m).map(|x| x as f64).sum::<f64>() / m as f64;
            assert_eq!(avg, vec![mean; 4]);
            assert_eq!(w, vec![6.0; 3]);
        }
    }
}

#[test]
fn many_ranks_on_few_cores_make_progress() {
    // 8 ranks (threads) on a 2-core machine: repeated large all-to-alls must not stall.
    let out = run("local", 8, |c| {
        let n = c.size();
        let blk = 40_000;
        let send: Vec<u32> = (0..n * blk).map(|i| (c.rank() * 7 + i) as u32).collect();
        let mut recv = vec![0u32; n * blk];
        for _ in 0..10 {
            c.all_to_all(&send, &mut recv).unwrap();
        }
        recv[blk * 3]
    });
    assert_eq!(out[0], (3 * 7) as u32);
    assert_eq!(split_evenly(10, 4), vec![3, 3, 2, 2]);
}

/// Point to point on every backend: a ring where every rank sends several messages of odd
/// lengths (one empty) to its right neighbour, interleaved with collectives on the same
/// communicator, and the messages arrive whole and in the order sent; then the errors: a
/// receive of another length names the sender, and a send to oneself or out of range is refused.
#[test]
fn send_and_recv_arrive_in_order_apart_from_the_collectives() {
    for b in BACKENDS {
        for n in [2, 3, 5] {
            let out = run(b, n, move |c| {
                let (r, n) = (c.rank(), c.size());
                let (right, left) = ((r + 1) % n, (r + n - 1) % n);
                let msg = |from: usize, k: usize| -> Vec<u32> { (0..count(from, k, 7) * 37 % 1000).map(|i| (from * 1_000_000 + k * 1000 + i) as u32).collect() };
                let mut got = Vec::new();
                for k in 0..4 {
                    // Even ranks send first, odd ranks receive first: a ring of synchronous
                    // sends cannot wait on itself (n odd: rank n−1 and rank 0 both send first,
                    // but rank 0's right neighbour, 1, receives first).
                    let mut buf = vec![0u32; msg(left, k).len()];
                    if r % 2 == 0 {
                        c.send(right, &msg(r, k)).unwrap();
                        c.recv(left, &mut buf).unwrap();
                    } else {
                        c.recv(left, &mut buf).unwrap();
                        c.send(right, &msg(r, k)).unwrap();
                    }
                    got.push(buf);
                    let mut s = [r as u64];
                    c.all_reduce(&mut s, ReduceOp::Sum).unwrap();
                    assert_eq!(s[0] as usize, n * (n - 1) / 2);
                }
                // Errors: the length disagrees (8 elements sent, 9 posted), oneself, out of range.
                let e = if r == 0 {
                    c.send(1, &[0u32; 8]).unwrap();
                    None
                } else if r == 1 {
                    Some(c.recv(0, &mut [0u32; 9]).unwrap_err().to_string())
                } else {
                    None
                };
                let me = c.send(r, &[1u8]).unwrap_err().to_string();
                let far = c.recv(n, &mut [0u8; 1]).unwrap_err().to_string();
                (r, got, e, me, far)
            });
            for (r, got, e, me, far) in out {
                let left = (r + n - 1) % n;
                for (k, m) in got.iter().enumerate() {
                    let want: Vec<u32> = (0..count(left, k, 7) * 37 % 1000).map(|i| (left * 1_000_000 + k * 1000 + i) as u32).collect();
                    assert_eq!(m, &want, "{b} n={n} rank {r} message {k}");
                }
                if r == 1 {
                    let e = e.unwrap();
                    assert!(e.contains("rank 0") && e.contains("recv"), "{b}: {e}");
                }
                assert!(me.contains("destination") && far.contains("source"), "{b}: {me} / {far}");
            }
        }
    }
}
