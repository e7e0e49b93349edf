//! The CPU backend: host buffers (`Vec<f32>`), rayon for parallel loops, the `gemm` crate for
//! matrix products. It is the reference every other backend is tested against, and it is
//! written to be fast: embedding work is bound by random row traffic, so rows are prefetched,
//! ids are deduplicated with a radix sort, and every unique row is read and written once.
mod embedding;
pub(crate) use embedding::{prefetch_span, BagsRef};
mod numerics;

use crate::backend::*;
use crate::{Error, Result};

/// The CPU backend (uses the current rayon pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

impl Cpu {
    pub fn new() -> Self {
        Cpu
    }

    /// Heap the `gemm` crate keeps for good once threads have run matrix products: one block
    /// of the L2 cache's size per thread that ran one (the calling thread, and the rayon pool's
    /// threads when there are several), the L2 size read from sysfs (1 MiB when unknown).
    pub fn gemm_workspace_bytes() -> u64 {
        let l2 = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/cache/index2/size")
            .ok()
            .and_then(|s| {
                let s = s.trim();
                let (num, mul) = match s.strip_suffix('K') {
                    Some(k) => (k, 1u64 << 10),
                    None => match s.strip_suffix('M') {
                        Some(m) => (m, 1 << 20),
                        None => (s, 1),
                    },
                };
                num.parse::<u64>().ok().map(|x| x * mul)
            })
            .unwrap_or(1 << 20);
        let pool = rayon::current_num_threads() as u64;
        l2 * (1 + if pool > 1 { pool } else { 0 })
    }
}

fn check(cond: bool, what: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::Input(what()))
    }
}

/// An empty host buffer with room for `n` floats, or `OutOfMemory` (never an abort). Large ones
/// ask the kernel for transparent huge pages before their first touch: random row lookups over
/// a big table otherwise miss the TLB on nearly every access.
fn alloc_host(n: usize) -> Result<Vec<f32>> {
    const HUGE: usize = 2 << 20;
    let mut v: Vec<f32> = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory(format!("{n} floats of host memory")))?;
    let bytes = n * 4;
    if bytes >= 4 * HUGE {
        let start = (v.as_ptr() as usize).next_multiple_of(HUGE);
        let end = (v.as_ptr() as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside this vector's allocation; MADV_HUGEPAGE is advice
            // only (its failure, e.g. THP disabled, changes nothing).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    Ok(v)
}

impl Buffers for Cpu {
    type Buf = Vec<f32>;
    type Ids = Vec<u64>;
    type Staging = Vec<f32>;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        let mut v = alloc_host(n)?;
        v.resize(n, 0.0);
        Ok(v)
    }

    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        let mut v = alloc_host(host.len())?;
        v.extend_from_slice(host);
        Ok(v)
    }

    fn download(&self, buf: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(buf.clone())
    }

    fn upload_ids(&self, host: &[u64]) -> Result<Vec<u64>> {
        Ok(host.to_vec())
    }

    fn download_ids(&self, ids: &Vec<u64>) -> Result<Vec<u64>> {
        Ok(ids.clone())
    }

    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn download_into(&self, buf: &Vec<f32>, out: &mut [f32]) -> Result<()> {
        super::check_same_len("download_into", buf.len(), out.len())?;
        out.copy_from_slice(buf);
        Ok(())
    }

    fn upload_into(&self, src: &[f32], buf: &mut Vec<f32>) -> Result<()> {
        super::check_same_len("upload_into", buf.len(), src.len())?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn download_prefix_into(&self, buf: &Vec<f32>, out: &mut [f32]) -> Result<()> {
        super::check_prefix("download_prefix_into", out.len(), buf.len())?;
        out.copy_from_slice(&buf[..out.len()]);
        Ok(())
    }

    fn upload_prefix_into(&self, src: &[f32], buf: &mut Vec<f32>) -> Result<()> {
        super::check_prefix("upload_prefix_into", src.len(), buf.len())?;
        buf[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn host<'a>(&self, buf: &'a Vec<f32>) -> Option<&'a [f32]> {
        Some(buf)
    }

    fn host_mut<'a>(&self, buf: &'a mut Vec<f32>) -> Option<&'a mut [f32]> {
        Some(buf)
    }

    fn copy_2d(&self, src: &Vec<f32>, src_off: usize, src_stride: usize, dst: &mut Vec<f32>, dst_off: usize, dst_stride: usize, rows: usize, cols: usize) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        super::check_copy_2d(src.len(), src_off, src_stride, dst.len(), dst_off, dst_stride, rows, cols)?;
        if rows == 1 || (src_stride == cols && dst_stride == cols) {
            dst[dst_off..dst_off + rows * cols].copy_from_slice(&src[src_off..src_off + rows * cols]);
        } else {
            for i in 0..rows {
                let (s, d) = (src_off + i * src_stride, dst_off + i * dst_stride);
                dst[d..d + cols].copy_from_slice(&src[s..s + cols]);
            }
        }
        Ok(())
    }

    fn gather_rows(&self, src: &Vec<f32>, rows: &Vec<u64>, num_rows: usize, cols: usize, dst: &mut Vec<f32>, dst_off: usize) -> Result<()> {
        let n = super::check_packed_rows("gather_rows", rows.len(), num_rows, cols, dst_off, dst.len())?;
        check_row_ids("gather_rows", rows, cols, src.len(), false)?;
        for (d, &r) in dst[dst_off..dst_off + n].chunks_mut(cols.max(1)).zip(rows) {
            d.copy_from_slice(&src[r as usize * cols..][..cols]);
        }
        Ok(())
    }

    fn put_rows(&self, src: &Vec<f32>, src_off: usize, rows: &Vec<u64>, num_rows: usize, cols: usize, dst: &mut Vec<f32>) -> Result<()> {
        let n = super::check_packed_rows("put_rows", rows.len(), num_rows, cols, src_off, src.len())?;
        check_row_ids("put_rows", rows, cols, dst.len(), true)?;
        for (s, &r) in src[src_off..src_off + n].chunks(cols.max(1)).zip(rows) {
            dst[r as usize * cols..][..cols].copy_from_slice(s);
        }
        Ok(())
    }

    fn staging(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn addr(&self, buf: &Vec<f32>) -> u64 {
        buf.as_ptr() as u64
    }

    unsafe fn copy_addr(&self, src: u64, dst: u64, len: usize) -> Result<()> {
        if len > 0 {
            // SAFETY: both ranges lie in live, non-overlapping buffers (this function's contract).
            unsafe { std::ptr::copy_nonoverlapping(src as *const f32, dst as *mut f32, len) };
        }
        Ok(())
    }

    unsafe fn sum_from(&self, parts: u64, n: usize, len: usize, out: u64, acc: Accumulate) -> Result<()> {
        check(n > 0 && n.checked_mul(len).is_some(), || format!("sum_from: {n} contributions of {len} floats"))?;
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `parts` holds n·len floats and `out` len, live and not overlapping (this
        // function's contract).
        let (parts, out) = unsafe { (std::slice::from_raw_parts(parts as *const f32, n * len), std::slice::from_raw_parts_mut(out as *mut f32, len)) };
        match acc {
            Accumulate::F32Sum => {
                out.copy_from_slice(&parts[..len]);
                for p in 1..n {
                    out.iter_mut().zip(&parts[p * len..(p + 1) * len]).for_each(|(o, &x)| *o += x);
                }
            }
            Accumulate::F64Mean => ember_transport::mean_f32_in_f64(parts, n, out),
        }
        Ok(())
    }

    fn direct_copy(&self) -> ember_transport::fabric::DirectCopy {
        std::sync::Arc::new(|src, dst, len| {
            // SAFETY: the fabric copies a sender's block into a posted buffer: both live for
            // `len` bytes and distinct (its `send_direct` contract).
            unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, len) };
            Ok(())
        })
    }
}

/// Every one of `rows` lies inside a row-major buffer of `len` floats and `cols` columns (row
/// r spans r·cols ..(r + 1)·cols, checked arithmetic), and with `ascending` they are strictly
/// ascending: checked before any row is used.
fn check_row_ids(what: &str, rows: &[u64], cols: usize, len: usize, ascending: bool) -> Result<()> {
    for (i, &r) in rows.iter().enumerate() {
        let end = usize::try_from(r).ok().and_then(|r| r.checked_add(1)?.checked_mul(cols));
        let ordered = !ascending || i == 0 || rows[i - 1] < r;
        if !(end.is_some_and(|e| e <= len) && ordered) {
            let order = if ascending { "strictly ascending and " } else { "" };
            return Err(Error::Input(format!("{what}: row {r} (index {i}) is not {order}inside a buffer of {len} floats ({cols} per row)")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_round_trips_and_checks_lengths() {
        let be = Cpu::new();
        let data: Vec<f32> = (0..1000).map(|i| i as f32 * 0.25 - 7.0).collect();
        let mut st = be.staging(data.len()).unwrap();
        assert_eq!(st.len(), data.len());
        st.copy_from_slice(&data);
        let mut buf = be.zeros(data.len()).unwrap();
        be.upload_into(&st, &mut buf).unwrap();
        assert_eq!(buf, data);
        st.fill(0.0);
        be.download_into(&buf, &mut st).unwrap();
        assert_eq!(st, data);
        // Lengths must match exactly, both ways; a failed copy leaves both sides untouched.
        let e = be.download_into(&buf, &mut st[..999]).unwrap_err().to_string();
        assert!(e.contains("download_into") && e.contains("1000") && e.contains("999"), "{e}");
        let e = be.upload_into(&[1.0; 1001], &mut buf).unwrap_err().to_string();
        assert!(e.contains("upload_into") && e.contains("1000") && e.contains("1001"), "{e}");
        assert_eq!(buf, data);
        assert!(matches!(be.upload_into(&[], &mut buf), Err(Error::Input(_))));
        assert!(be.staging(0).unwrap().is_empty());
    }

    /// gather_rows packs the listed rows at an offset and put_rows writes them back from one
    /// (known answers); rows outside the buffer, put rows not strictly ascending, packed blocks
    /// past the buffer's end and sizes that overflow are refused, and a refused put writes
    /// nothing.
    #[test]
    fn gather_and_put_rows_round_trip_and_refuse_bad_rows() {
        let be = Cpu::new();
        let src: Vec<f32> = (0..15).map(|i| i as f32).collect(); // 5 rows of 3
        let mut packed = vec![-1.0f32; 8];
        be.gather_rows(&src, &vec![4, 0], 2, 3, &mut packed, 1).unwrap();
        assert_eq!(packed, [-1.0, 12.0, 13.0, 14.0, 0.0, 1.0, 2.0, -1.0]);
        let mut dst = vec![0.0f32; 15];
        be.put_rows(&packed, 1, &vec![1, 3], 2, 3, &mut dst).unwrap();
        assert_eq!(dst, [0.0, 0.0, 0.0, 12.0, 13.0, 14.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.0]);
        let before = dst.clone();
        for (rows, off) in [(vec![5u64], 0), (vec![u64::MAX], 0), (vec![0], 6)] {
            let e = be.gather_rows(&src, &rows, 1, 3, &mut packed, off).unwrap_err();
            assert!(matches!(e, Error::Input(_)) && e.to_string().contains("gather_rows"), "{rows:?} at {off}: {e}");
            let e = be.put_rows(&packed, off, &rows, 1, 3, &mut dst).unwrap_err();
            assert!(matches!(e, Error::Input(_)) && e.to_string().contains("put_rows"), "{rows:?} at {off}: {e}");
        }
        for rows in [vec![3u64, 1], vec![2, 2], vec![0, 5]] {
            let e = be.put_rows(&packed, 0, &rows, 2, 3, &mut dst).unwrap_err();
            assert!(e.to_string().contains("strictly ascending"), "{rows:?}: {e}");
        }
        assert!(be.gather_rows(&src, &vec![0, 1], 3, 3, &mut packed, 0).is_err(), "index count and num_rows disagree");
        assert!(be.gather_rows(&src, &vec![0], 1, usize::MAX, &mut packed, 0).is_err(), "size overflows");
        assert!(be.put_rows(&packed, usize::MAX, &vec![0], 1, 3, &mut dst).is_err(), "offset overflows");
        assert_eq!(dst, before, "a refused put_rows wrote");
    }
}
