//! Where the benchmarked bytes live, for the sweep ([`super::SizeBuffers`]): host vectors moved
//! by the communicator's collectives ([`HostBuffers`], [`bench_rank`]), and emulated device
//! memory the CPU cannot touch, moved by the direct path ([`bench_rank_device_emu`]); either
//! optionally registered with the transport first ([`Registered`]).
use super::{sweep, BenchOptions, Collective, Row, SizeBuffers};
use crate::rdma::DeviceMem;
use crate::{Comm, ReduceOp};
use std::borrow::Cow;

/// Benchmark buffers (and the memcpy ceiling's): huge-page advised unless `plain`.
pub(super) fn alloc(n: usize, plain: bool) -> Vec<f32> {
    if plain {
        vec![0f32; n]
    } else {
        crate::huge_vec(n)
    }
}

/// Regions registered with a communicator's transport for the bench (`--register`),
/// unregistered when this drops (declare it before the buffers it covers in a struct, after
/// them in a function, so it drops first).
pub struct Registered<'a> {
    c: &'a Comm,
    at: Vec<u64>,
}

impl<'a> Registered<'a> {
    /// Register each non-empty `(addr, bytes)`; on a failure, those registered so far are
    /// unregistered again.
    ///
    /// # Safety
    /// Each range stays allocated until the guard drops.
    pub unsafe fn new(c: &'a Comm, ranges: &[(u64, usize)]) -> Result<Self, String> {
        let mut g = Registered { c, at: Vec::new() };
        for &(addr, len) in ranges.iter().filter(|r| r.1 > 0) {
            // SAFETY: the range stays allocated until the guard drops (this function's contract),
            // and the guard's drop unregisters it, which is what `register_region` asks.
            unsafe { c.register_region(addr, len) }.map_err(|e| e.to_string())?;
            g.at.push(addr);
        }
        Ok(g)
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        for &a in &self.at {
            if let Err(e) = self.c.unregister_region(a) {
                tracing::warn!("bench: unregistering a buffer: {e}");
            }
        }
    }
}

/// One size's host buffers and the collective on them (`Comm::all_to_all`, a copy of the
/// input then `Comm::all_reduce` in place, or the ping-pong's `Comm::send` and `Comm::recv`).
pub struct HostBuffers<'a> {
    // Declared first: dropped (unregistered) before the buffers it covers.
    _registered: Option<Registered<'a>>,
    which: Collective,
    c: &'a Comm,
    send: Vec<f32>,
    recv: Vec<f32>,
}

impl<'a> HostBuffers<'a> {
    /// Buffers for `count` floats per block (huge-page advised unless `o.no_huge`, registered
    /// when `o.register`).
    pub fn new(which: Collective, c: &'a Comm, count: usize, o: &BenchOptions) -> Result<Self, String> {
        let (send_len, recv_len) = (which.table().lens)(count, c.size());
        let (send, recv) = (alloc(send_len, o.no_huge), alloc(recv_len, o.no_huge));
        let ranges = [(send.as_ptr() as u64, send.len() * 4), (recv.as_ptr() as u64, recv.len() * 4)];
        // SAFETY: the vectors' heap memory does not move when they move into the struct, and
        // the guard is its first field, so it unregisters them before they drop.
        let _registered = if o.register { Some(unsafe { Registered::new(c, &ranges) }?) } else { None };
        Ok(HostBuffers { _registered, which, c, send, recv })
    }
}

impl SizeBuffers for HostBuffers<'_> {
    fn load(&mut self, input: &dyn Fn(usize) -> f32) -> Result<(), String> {
        for (i, x) in self.send.iter_mut().enumerate() {
            *x = input(i);
        }
        self.recv.fill(f32::NAN);
        Ok(())
    }
    fn run(&mut self) -> Result<(), String> {
        match self.which {
            Collective::AllToAll => self.c.all_to_all(&self.send, &mut self.recv),
            Collective::AllReduce => {
                self.recv.copy_from_slice(&self.send);
                self.c.all_reduce(&mut self.recv, ReduceOp::Sum)
            }
            Collective::PingPong => match self.c.rank() {
                0 => self.c.send(1, &self.send).and_then(|()| self.c.recv(1, &mut self.recv)),
                1 => self.c.recv(0, &mut self.recv).and_then(|()| self.c.send(0, &self.send)),
                _ => Ok(()),
            },
        }
        .map_err(|e| e.to_string())
    }
    fn output(&mut self) -> Result<Cow<'_, [f32]>, String> {
        Ok(Cow::Borrowed(&self.recv))
    }
}

/// Measure `which` on `c` over host buffers for every size of `o` (collective: every rank of
/// `c` calls it with the same options).
pub fn bench_rank(which: Collective, c: &Comm, o: &BenchOptions) -> Result<Vec<Row>, String> {
    sweep(which, c, o, |count| HostBuffers::new(which, c, count, o))
}

/// One size's all-to-all between emulated device buffers, through the direct path.
struct EmuDeviceBuffers<'a> {
    // Declared first: dropped (unregistered) before the buffers it covers.
    _registered: Option<Registered<'a>>,
    c: &'a Comm,
    send: DeviceMem,
    recv: DeviceMem,
    counts: Vec<usize>,
}

impl SizeBuffers for EmuDeviceBuffers<'_> {
    fn load(&mut self, input: &dyn Fn(usize) -> f32) -> Result<(), String> {
        let v: Vec<f32> = (0..self.send.len() / 4).map(input).collect();
        self.send.write(0, bytemuck::cast_slice(&v));
        self.recv.write(0, &vec![0xff; self.recv.len()]);
        Ok(())
    }
    fn run(&mut self) -> Result<(), String> {
        let (sa, ra) = (self.send.addr(), self.recv.addr());
        // SAFETY: both buffers hold n blocks of `counts[p]` bytes and live as long as `self`;
        // the own block is copied while nothing else touches `recv`.
        unsafe { self.c.all_to_all_v_direct(sa, &self.counts, ra, &self.counts, |s, d, l| DeviceMem::copy(s, d, l).map_err(crate::Error::Bootstrap)) }
            .map_err(|e| e.to_string())
    }
    fn output(&mut self) -> Result<Cow<'_, [f32]>, String> {
        let mut got = vec![0f32; self.recv.len() / 4];
        self.recv.read(0, bytemuck::cast_slice_mut(&mut got));
        Ok(Cow::Owned(got))
    }
}

/// The all-to-all between emulated device buffers (`rdma::DeviceMem`, which the CPU cannot
/// touch) through the direct path (`Comm::all_to_all_v_direct`: every non-empty message
/// zero-copy), timed and checked as [`bench_rank`] does.
pub fn bench_rank_device_emu(c: &Comm, o: &BenchOptions) -> Result<Vec<Row>, String> {
    let n = c.size();
    sweep(Collective::AllToAll, c, o, |count| {
        let len = 4 * count * n;
        let (send, recv) = (DeviceMem::new(len).map_err(|x| x.to_string())?, DeviceMem::new(len).map_err(|x| x.to_string())?);
        let ranges = [(send.addr(), send.len()), (recv.addr(), recv.len())];
        // SAFETY: the mappings do not move when the handles move into the struct, and the
        // guard is its first field, so it unregisters them before they are unmapped.
        let _registered = if o.register { Some(unsafe { Registered::new(c, &ranges) }?) } else { None };
        Ok(EmuDeviceBuffers { _registered, c, send, recv, counts: vec![4 * count; n] })
    })
}
