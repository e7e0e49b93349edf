//! The emulated device backend: a device backend whose memory is host memory that host code
//! can reach only through the backend's copy calls, and which counts the bytes those calls move.
//!
//! Its buffers ([`DevBuf`], [`DevIds`]) are opaque: `host()`/`host_mut()` return None, so the
//! 2D step and replica sync take the device code paths (`parallel::xfer`'s peers path for
//! in-process ranks, staging through host memory otherwise) exactly as on a GPU. Every copy
//! between host and "device" (upload, upload_ids, download, download_ids, download_into,
//! upload_into, and the scalars the host reads back: a loss, a row count) adds its bytes to a
//! host → device or device → host counter; copies inside the device (copy_2d, gather_rows,
//! put_rows, copy_addr, the fabric's direct copy, the parts sum_from reads) go to a third.
//! The counters are atomics shared by the clones of one `Emulated` ([`Emulated::bytes`],
//! [`Emulated::reset`]; [`Buffers::host_device_bytes`] for generic code). Each thread also
//! counts what it moved itself ([`Buffers::thread_host_device_bytes`]), so that work running
//! beside other work (replica sync beside the dense update) is attributed exactly.
//!
//! Numerics are the CPU backend's code run on the memory under the buffers (nothing is
//! duplicated), so results are bitwise the CPU backend's.
use crate::backend::cpu::BagsRef;
use crate::backend::*;
use crate::Result;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

thread_local! {
    /// What this thread moved through any `Emulated`: host → device, device → host, device → device.
    static THREAD_BYTES: Cell<[u64; 3]> = const { Cell::new([0; 3]) };
}

/// A buffer of the emulated device: f32s the host reaches only through the backend's copies.
pub struct DevBuf(Vec<f32>);

/// Row ids (u64) in the emulated device's memory.
pub struct DevIds(Vec<u64>);

#[derive(Debug, Default)]
struct Counters {
    host_to_device: AtomicU64,
    device_to_host: AtomicU64,
    device_to_device: AtomicU64,
}

impl Counters {
    /// Add to counter `which` (0: host → device, 1: device → host, 2: device → device) and to
    /// the calling thread's.
    fn add(&self, which: usize, bytes: usize) {
        let c = [&self.host_to_device, &self.device_to_host, &self.device_to_device][which];
        c.fetch_add(bytes as u64, Ordering::Relaxed);
        THREAD_BYTES.with(|t| {
            let mut v = t.get();
            v[which] += bytes as u64;
            t.set(v);
        });
    }
}

/// The emulated device backend (see the module's doc). Clones share one set of counters.
#[derive(Clone, Debug, Default)]
pub struct Emulated {
    counters: Arc<Counters>,
}

impl Emulated {
    /// A backend with its own counters, all zero.
    pub fn new() -> Self {
        Emulated::default()
    }

    /// The bytes moved so far (since creation or the last [`reset`](Self::reset)).
    pub fn bytes(&self) -> HostDeviceBytes {
        let c = &self.counters;
        HostDeviceBytes {
            host_to_device: c.host_to_device.load(Ordering::Relaxed),
            device_to_host: c.device_to_host.load(Ordering::Relaxed),
            device_to_device: c.device_to_device.load(Ordering::Relaxed),
        }
    }

    /// Set every counter back to zero.
    pub fn reset(&self) {
        let c = &self.counters;
        for a in [&c.host_to_device, &c.device_to_host, &c.device_to_device] {
            a.store(0, Ordering::Relaxed);
        }
    }

    fn h2d(&self, bytes: usize) {
        self.counters.add(0, bytes);
    }
    fn d2h(&self, bytes: usize) {
        self.counters.add(1, bytes);
    }
    fn d2d(&self, bytes: usize) {
        self.counters.add(2, bytes);
    }
}

const F32: usize = 4;
const U64: usize = 8;

fn bags(b: &Bags<Emulated>) -> BagsRef<'_> {
    BagsRef { num_bags: b.num_bags, offsets: &b.offsets.0, ids: &b.ids.0, scale: b.scale.as_ref().map(|s| &s.0[..]) }
}

/// Run `f` on the shard's memory as a CPU shard (its vectors moved, not copied), then put them back.
fn on_cpu_shard<R>(shard: &mut Shard<Emulated>, f: impl FnOnce(&mut Shard<Cpu>) -> R) -> R {
    let mut s = Shard { spec: shard.spec.clone(), weights: std::mem::take(&mut shard.weights.0), state: std::mem::take(&mut shard.state.0) };
    let r = f(&mut s);
    shard.weights.0 = s.weights;
    shard.state.0 = s.state;
    r
}

impl Buffers for Emulated {
    type Buf = DevBuf;
    type Ids = DevIds;
    type Staging = Vec<f32>;

    fn name(&self) -> &'static str {
        "emulated"
    }

    fn zeros(&self, n: usize) -> Result<DevBuf> {
        Ok(DevBuf(Cpu.zeros(n)?))
    }

    fn upload(&self, host: &[f32]) -> Result<DevBuf> {
        let b = DevBuf(Cpu.upload(host)?);
        self.h2d(host.len() * F32);
        Ok(b)
    }

    fn download(&self, buf: &DevBuf) -> Result<Vec<f32>> {
        self.d2h(buf.0.len() * F32);
        Ok(buf.0.clone())
    }

    fn upload_ids(&self, host: &[u64]) -> Result<DevIds> {
        self.h2d(host.len() * U64);
        Ok(DevIds(host.to_vec()))
    }

    fn download_ids(&self, ids: &DevIds) -> Result<Vec<u64>> {
        self.d2h(ids.0.len() * U64);
        Ok(ids.0.clone())
    }

    fn len(&self, buf: &DevBuf) -> usize {
        buf.0.len()
    }

    fn download_into(&self, buf: &DevBuf, out: &mut [f32]) -> Result<()> {
        Cpu.download_into(&buf.0, out)?;
        self.d2h(out.len() * F32);
        Ok(())
    }

    fn upload_into(&self, src: &[f32], buf: &mut DevBuf) -> Result<()> {
        Cpu.upload_into(src, &mut buf.0)?;
        self.h2d(src.len() * F32);
        Ok(())
    }

    fn copy_2d(&self, src: &DevBuf, src_off: usize, src_stride: usize, dst: &mut DevBuf, dst_off: usize, dst_stride: usize, rows: usize, cols: usize) -> Result<()> {
        Cpu.copy_2d(&src.0, src_off, src_stride, &mut dst.0, dst_off, dst_stride, rows, cols)?;
        self.d2d(rows * cols * F32);
        Ok(())
    }

    fn gather_rows(&self, src: &DevBuf, rows: &DevIds, num_rows: usize, cols: usize, dst: &mut DevBuf, dst_off: usize) -> Result<()> {
        Cpu.gather_rows(&src.0, &rows.0, num_rows, cols, &mut dst.0, dst_off)?;
        self.d2d(num_rows * cols * F32);
        Ok(())
    }

    fn put_rows(&self, src: &DevBuf, src_off: usize, rows: &DevIds, num_rows: usize, cols: usize, dst: &mut DevBuf) -> Result<()> {
        Cpu.put_rows(&src.0, src_off, &rows.0, num_rows, cols, &mut dst.0)?;
        self.d2d(num_rows * cols * F32);
        Ok(())
    }

    fn staging(&self, n: usize) -> Result<Vec<f32>> {
        Cpu.staging(n)
    }

    fn addr(&self, buf: &DevBuf) -> u64 {
        Cpu.addr(&buf.0)
    }

    unsafe fn copy_addr(&self, src: u64, dst: u64, len: usize) -> Result<()> {
        // SAFETY: our caller meets this method's contract (live, non-overlapping ranges of
        // this address space), which is the whole of what the CPU backend's asks.
        unsafe { Cpu.copy_addr(src, dst, len) }?;
        self.d2d(len * F32);
        Ok(())
    }

    unsafe fn sum_from(&self, parts: u64, n: usize, len: usize, out: u64, acc: Accumulate) -> Result<()> {
        // SAFETY: as for copy_addr: the same contract as the CPU backend's.
        unsafe { Cpu.sum_from(parts, n, len, out, acc) }?;
        self.d2d(n.saturating_mul(len) * F32);
        Ok(())
    }

    fn direct_copy(&self) -> ember_transport::fabric::DirectCopy {
        let (copy, counters) = (Cpu.direct_copy(), self.counters.clone());
        Arc::new(move |src, dst, len| {
            copy(src, dst, len)?;
            counters.add(2, len);
            Ok(())
        })
    }

    fn host_device_bytes(&self) -> Option<HostDeviceBytes> {
        Some(self.bytes())
    }

    fn thread_host_device_bytes(&self) -> Option<HostDeviceBytes> {
        let [h, d, dd] = THREAD_BYTES.with(Cell::get);
        Some(HostDeviceBytes { host_to_device: h, device_to_host: d, device_to_device: dd })
    }
}

impl Numerics for Emulated {
    fn gemm(&self, g: Gemm, a: &DevBuf, b: &DevBuf, c: &mut DevBuf) -> Result<()> {
        Cpu.gemm(g, &a.0, &b.0, &mut c.0)
    }

    fn bias_act(&self, x: &mut DevBuf, bias: &DevBuf, rows: usize, cols: usize, act: Act) -> Result<()> {
        Cpu.bias_act(&mut x.0, &bias.0, rows, cols, act)
    }

    fn act_backward(&self, y: &DevBuf, dy: &mut DevBuf, act: Act) -> Result<()> {
        Cpu.act_backward(&y.0, &mut dy.0, act)
    }

    fn col_sum(&self, x: &DevBuf, rows: usize, cols: usize, beta: f32, out: &mut DevBuf) -> Result<()> {
        Cpu.col_sum(&x.0, rows, cols, beta, &mut out.0)
    }

    fn copy_block(&self, narrow: &mut DevBuf, wide: &mut DevBuf, rows: usize, cols: usize, dst: Layout, to_wide: bool) -> Result<()> {
        Cpu.copy_block(&mut narrow.0, &mut wide.0, rows, cols, dst, to_wide)
    }

    fn scale_rows(&self, x: &mut DevBuf, off: usize, stride: usize, rows: usize, cols: usize, s: &DevBuf) -> Result<()> {
        Cpu.scale_rows(&mut x.0, off, stride, rows, cols, &s.0)
    }

    fn axpy(&self, a: f32, x: &DevBuf, y: &mut DevBuf) -> Result<()> {
        Cpu.axpy(a, &x.0, &mut y.0)
    }

    fn scale(&self, x: &mut DevBuf, a: f32) -> Result<()> {
        Cpu.scale(&mut x.0, a)
    }

    fn dot_interaction(&self, x: &DevBuf, batch: usize, f: usize, d: usize, out: &mut DevBuf) -> Result<()> {
        Cpu.dot_interaction(&x.0, batch, f, d, &mut out.0)
    }

    fn dot_interaction_backward(&self, x: &DevBuf, dout: &DevBuf, batch: usize, f: usize, d: usize, dx: &mut DevBuf) -> Result<()> {
        Cpu.dot_interaction_backward(&x.0, &dout.0, batch, f, d, &mut dx.0)
    }

    fn cross_combine(&self, x0: &DevBuf, uv: &DevBuf, bias: &DevBuf, xl: &DevBuf, rows: usize, cols: usize, out: &mut DevBuf) -> Result<()> {
        Cpu.cross_combine(&x0.0, &uv.0, &bias.0, &xl.0, rows, cols, &mut out.0)
    }

    fn cross_combine_backward(&self, x0: &DevBuf, uv: &DevBuf, bias: &DevBuf, dout: &DevBuf, rows: usize, cols: usize, duv: &mut DevBuf, dx0: &mut DevBuf) -> Result<()> {
        Cpu.cross_combine_backward(&x0.0, &uv.0, &bias.0, &dout.0, rows, cols, &mut duv.0, &mut dx0.0)
    }

    fn bce_with_logits(&self, logits: &DevBuf, labels: &DevBuf, scale: f32, dlogits: &mut DevBuf) -> Result<f64> {
        let loss = Cpu.bce_with_logits(&logits.0, &labels.0, scale, &mut dlogits.0)?;
        // The host reads the loss back.
        self.d2h(std::mem::size_of::<f64>());
        Ok(loss)
    }

    fn dense_update(&self, param: &mut DevBuf, grad: &DevBuf, state: &mut DevBuf, upd: &DenseUpdate) -> Result<()> {
        Cpu.dense_update(&mut param.0, &grad.0, &mut state.0, upd)
    }

    fn embedding_forward(&self, shard: &Shard<Self>, b: &Bags<Self>, out: &mut DevBuf, layout: Layout, accumulate: bool) -> Result<()> {
        Cpu.forward_on(&shard.spec, &shard.weights.0, bags(b), &mut out.0, layout, accumulate)
    }

    fn embedding_backward_update(&self, shard: &mut Shard<Self>, b: &Bags<Self>, grad: &DevBuf, layout: Layout, upd: &EmbUpdate) -> Result<()> {
        on_cpu_shard(shard, |s| Cpu.backward_update_on(s, bags(b), &grad.0, layout, upd))
    }

    fn embedding_row_grads(&self, shard: &Shard<Self>, b: &Bags<Self>, grad: &DevBuf, layout: Layout, upd: &EmbUpdate) -> Result<RowGrads<Self>> {
        let rg = Cpu.row_grads_on(&shard.spec, &shard.weights.0, bags(b), &grad.0, layout, upd)?;
        // The host reads the number of unique rows back.
        self.d2h(std::mem::size_of::<u64>());
        Ok(RowGrads { rows: DevIds(rg.rows), num_rows: rg.num_rows, grads: DevBuf(rg.grads), sq: DevBuf(rg.sq) })
    }

    fn embedding_apply(&self, shard: &mut Shard<Self>, rg: &RowGrads<Self>, row_sq: Option<&DevBuf>, upd: &EmbUpdate) -> Result<()> {
        on_cpu_shard(shard, |s| Cpu.apply_on(s, &rg.rows.0, rg.num_rows, &rg.grads.0, &rg.sq.0, row_sq.map(|v| &v.0[..]), upd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffers are opaque (no host view), and every copy is counted in its direction with
    /// its exact bytes; refused copies count nothing; reset zeroes the counters; clones share them.
    #[test]
    fn copies_are_counted_by_direction_and_buffers_are_opaque() {
        let be = Emulated::new();
        let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let mut buf = be.upload(&data).unwrap();
        assert!(be.host(&buf).is_none() && be.host_mut(&mut buf).is_none());
        assert_eq!(be.bytes(), HostDeviceBytes { host_to_device: 4000, device_to_host: 0, device_to_device: 0 });
        assert_eq!(be.download(&buf).unwrap(), data);
        let ids = be.upload_ids(&[3, 1, 4]).unwrap();
        assert_eq!(be.download_ids(&ids).unwrap(), [3, 1, 4]);
        let mut st = be.staging(1000).unwrap();
        be.download_into(&buf, &mut st).unwrap();
        be.upload_into(&st, &mut buf).unwrap();
        assert_eq!(be.bytes(), HostDeviceBytes { host_to_device: 4000 + 24 + 4000, device_to_host: 4000 + 24 + 4000, device_to_device: 0 });
        // Refused copies move nothing and count nothing.
        assert!(be.download_into(&buf, &mut st[..999]).is_err());
        assert!(be.upload_into(&st[..10], &mut buf).is_err());
        assert_eq!(be.bytes().host_to_device, 8024);
        // A prefix moves its own bytes only; the rest of the buffer is kept.
        be.reset();
        let mut part = vec![0.0f32; 10];
        be.download_prefix_into(&buf, &mut part).unwrap();
        assert_eq!(part, data[..10]);
        be.upload_prefix_into(&[-1.0; 3], &mut buf).unwrap();
        assert_eq!(be.bytes().device_to_host, 40);
        assert_eq!(be.bytes().host_to_device, 12);
        let back = be.download(&buf).unwrap();
        assert_eq!((&back[..3], &back[3..]), (&[-1.0f32; 3][..], &data[3..]));
        assert!(be.download_prefix_into(&buf, &mut vec![0.0; 1001]).is_err() && be.upload_prefix_into(&[0.0; 1001], &mut buf).is_err());
        buf = be.upload(&data).unwrap();
        // Device-side copies go to their own counter: 2 rows of 3, then 2 rows of 4 packed.
        be.reset();
        let clone = be.clone();
        let mut dst = be.zeros(1000).unwrap();
        assert_eq!(be.bytes(), HostDeviceBytes::default(), "zeros moves no bytes");
        be.copy_2d(&buf, 0, 10, &mut dst, 0, 10, 2, 3).unwrap();
        be.gather_rows(&buf, &ids, 3, 4, &mut dst, 100).unwrap();
        be.put_rows(&dst, 100, &be.upload_ids(&[0, 5]).unwrap(), 2, 4, &mut buf).unwrap();
        // SAFETY: both ranges lie inside live buffers of 1000 floats and do not overlap.
        unsafe { be.copy_addr(be.addr(&buf), be.addr(&dst), 7).unwrap() };
        assert_eq!(clone.bytes(), HostDeviceBytes { host_to_device: 16, device_to_host: 0, device_to_device: (6 + 12 + 8 + 7) * 4 });
        assert_eq!(clone.host_device_bytes(), Some(clone.bytes()));
        assert_eq!(Cpu.host_device_bytes(), None);
    }

    /// The whole self-test (every operation, optimizer and several training steps against the
    /// CPU backend) passes, every comparison exact: the numerics are the CPU's code.
    #[test]
    fn passes_the_selftest_bitwise() {
        let rep = crate::selftest::selftest(&Emulated::new()).unwrap();
        assert!(rep.passed(), "{rep}");
        assert!(rep.checks.iter().all(|c| c.rel_err == 0.0), "{rep}");
    }
}
