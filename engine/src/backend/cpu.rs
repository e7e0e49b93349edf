//! The CPU backend: host buffers (`Vec<f32>`), rayon for parallel loops, the `gemm` crate for
//! matrix products. It is the reference every other backend is tested against, and it is
//! written to be fast: embedding work is bound by random row traffic, so rows are prefetched,
//! ids are deduplicated with a radix sort, and every unique row is read and written once.
use super::*;
use crate::{Error, Result};
use rayon::prelude::*;

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

/// Hint the cache to fetch the line at `p` (any address: nothing is dereferenced).
#[inline(always)]
fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a prefetch is a hint that never faults, whatever the address, and SSE (which
        // the intrinsic needs) is part of every x86_64 target.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[inline(always)]
fn prefetch_row(w: &[f32], row: usize, cols: usize) {
    let base = row * cols;
    if base < w.len() {
        let p = w[base..].as_ptr();
        let mut off = 0;
        while off < cols {
            prefetch(p.wrapping_add(off));
            off += 16;
        }
    }
}

/// Bounds checks shared by the embedding ops: offsets monotone and covering `ids`, every id a
/// local row of the shard, the output/gradient matrix large enough.
fn check_bags(shard_rows: usize, cols: usize, bags: &Bags<Cpu>, buf_len: usize, layout: Layout, what: &str) -> Result<()> {
    let n = bags.num_bags;
    check(cols > 0, || format!("{what}: a shard needs at least one column"))?;
    check(bags.offsets.len() == n + 1, || format!("{what}: {} offsets for {n} bags", bags.offsets.len()))?;
    check(bags.offsets[0] == 0 && bags.offsets[n] as usize == bags.ids.len(), || {
        format!("{what}: offsets span 0..{} but {} ids given", bags.offsets[n], bags.ids.len())
    })?;
    check(bags.offsets.windows(2).all(|w| w[0] <= w[1]), || format!("{what}: offsets are not non-decreasing"))?;
    if let Some(k) = bags.ids.iter().position(|&id| id as usize >= shard_rows || id >= u64::MAX / 2) {
        return Err(Error::Input(format!("{what}: id {} at position {k} out of range for a shard of {shard_rows} rows", bags.ids[k])));
    }
    if let Some(s) = &bags.scale {
        check(s.len() == n, || format!("{what}: {} scales for {n} bags", s.len()))?;
    }
    super::check_layout(what, n, cols, layout, buf_len)
}

/// Occurrences of each unique row: `rows[u]` with its (bag) occurrences `bags[starts[u]..starts[u+1]]`.
struct Dedup {
    rows: Vec<u64>,
    starts: Vec<usize>,
    bags: Vec<u32>,
}

/// Sort (row, bag) pairs by row then bag (a deterministic summation order) and run-length
/// encode them. LSD radix sort on packed keys when they fit in 64 bits.
fn dedup(offsets: &[u64], ids: &[u64], shard_rows: usize) -> Dedup {
    let n_bags = offsets.len() - 1;
    let bag_bits = (64 - (n_bags.max(1) as u64).leading_zeros()).max(1);
    let row_bits = (64 - (shard_rows.max(1) as u64).leading_zeros()).max(1);
    let mut keys: Vec<u64> = Vec::with_capacity(ids.len());
    if bag_bits + row_bits <= 64 && n_bags < u32::MAX as usize {
        for b in 0..n_bags {
            for &id in &ids[offsets[b] as usize..offsets[b + 1] as usize] {
                keys.push((id << bag_bits) | b as u64);
            }
        }
        // Keys were pushed in bag order, so a stable sort on the row bits alone keeps each
        // row's occurrences in bag order.
        radix_sort(&mut keys, bag_bits, row_bits);
        let mask = (1u64 << bag_bits) - 1;
        let mut d = Dedup { rows: Vec::new(), starts: Vec::new(), bags: Vec::with_capacity(keys.len()) };
        let mut prev = u64::MAX;
        for (i, &k) in keys.iter().enumerate() {
            let row = k >> bag_bits;
            if row != prev {
                d.rows.push(row);
                d.starts.push(i);
                prev = row;
            }
            d.bags.push((k & mask) as u32);
        }
        d.starts.push(keys.len());
        d
    } else {
        let mut pairs: Vec<(u64, u32)> = Vec::with_capacity(ids.len());
        for b in 0..n_bags {
            for &id in &ids[offsets[b] as usize..offsets[b + 1] as usize] {
                pairs.push((id, b as u32));
            }
        }
        pairs.par_sort_unstable();
        let mut d = Dedup { rows: Vec::new(), starts: Vec::new(), bags: Vec::with_capacity(pairs.len()) };
        let mut prev = u64::MAX;
        for (i, &(row, bag)) in pairs.iter().enumerate() {
            if row != prev {
                d.rows.push(row);
                d.starts.push(i);
                prev = row;
            }
            d.bags.push(bag);
        }
        d.starts.push(pairs.len());
        d
    }
}

/// Stable LSD radix sort of `keys` on bits `lo..lo + bits`, in as few passes of at most 11 bits
/// as the width needs.
fn radix_sort(keys: &mut Vec<u64>, lo: u32, bits: u32) {
    let passes = bits.div_ceil(11).max(1);
    let width = bits.div_ceil(passes);
    let mut tmp = vec![0u64; keys.len()];
    let mask = (1u64 << width) - 1;
    let mut counts = vec![0usize; 1 << width];
    for p in 0..passes {
        let shift = lo + p * width;
        counts.fill(0);
        for &k in keys.iter() {
            counts[((k >> shift) & mask) as usize] += 1;
        }
        let mut sum = 0;
        for c in counts.iter_mut() {
            let t = *c;
            *c = sum;
            sum += t;
        }
        for &k in keys.iter() {
            let slot = &mut counts[((k >> shift) & mask) as usize];
            tmp[*slot] = k;
            *slot += 1;
        }
        std::mem::swap(keys, &mut tmp);
    }
}

/// Sum of one unique row's incoming gradients (scaled per bag), plus the L2 term, into `g`.
#[inline]
fn row_grad(g: &mut [f32], occ: &[u32], grad: &[f32], layout: Layout, scale: Option<&[f32]>, l2: f32, w: &[f32]) {
    g.fill(0.0);
    let cols = g.len();
    for &bag in occ {
        let bag = bag as usize;
        let src = &grad[bag * layout.stride + layout.col..][..cols];
        match scale {
            None => g.iter_mut().zip(src).for_each(|(a, &b)| *a += b),
            Some(s) => {
                let s = s[bag];
                g.iter_mut().zip(src).for_each(|(a, &b)| *a += s * b)
            }
        }
    }
    if l2 != 0.0 {
        g.iter_mut().zip(w).for_each(|(a, &b)| *a += l2 * b);
    }
}

/// Apply one row's update given its summed gradient `g` and the whole-row Σg² `sq`.
#[inline]
fn apply_row(w: &mut [f32], state: &mut [f32], g: &[f32], sq: f32, dim: usize, upd: &EmbUpdate) {
    match upd.kind {
        EmbKind::Sgd => w.iter_mut().zip(g).for_each(|(w, &g)| *w -= upd.lr * g),
        EmbKind::RowWiseAdagrad => {
            state[0] += sq / dim as f32;
            let r = upd.rate(state[0]);
            w.iter_mut().zip(g).for_each(|(w, &g)| *w -= r * g);
        }
        EmbKind::Adagrad => {
            for ((w, v), &g) in w.iter_mut().zip(state.iter_mut()).zip(g) {
                *v += g * g;
                *w -= upd.rate(*v) * g;
            }
        }
    }
}

/// Raw pointer wrapper for disjoint parallel row writes into a shard.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the pointer is only dereferenced in `update_rows`, where every thread touches rows no
// other thread touches while the buffer it points into is mutably borrowed for the whole call.
unsafe impl Send for SendPtr {}
// SAFETY: as for Send: shared use only ever reaches disjoint rows.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    #[inline]
    fn get(self) -> *mut f32 {
        self.0
    }
}

impl Cpu {
    /// Shared body of the fused update and `embedding_apply`: for each unique row `u`, `grad_of(u, g)`
    /// fills the row gradient and returns Σg² (or the caller's whole-row value) before applying.
    /// The rows must be unique; each is checked against the shard's weight and state buffers.
    fn update_rows<F>(&self, shard: &mut Shard<Cpu>, rows: &[u64], upd: &EmbUpdate, grad_of: F) -> Result<()>
    where
        F: Fn(usize, &mut [f32], &[f32]) -> f32 + Sync,
    {
        let cols = shard.spec.num_cols();
        let dim = shard.spec.dim;
        let spr = upd.state_per_row(cols);
        let n = shard.spec.num_rows();
        super::check_shard_bufs("embedding update", &shard.spec, shard.weights.len(), Some((shard.state.len(), spr)))?;
        if let Some(&bad) = rows.iter().find(|&&r| r >= n as u64) {
            return Err(Error::Input(format!("embedding update: row {bad} outside the shard's {n} rows")));
        }
        let w = SendPtr(shard.weights.as_mut_ptr());
        let s = SendPtr(shard.state.as_mut_ptr());
        const CHUNK: usize = 256;
        const AHEAD: usize = 6;
        rows.par_chunks(CHUNK).enumerate().for_each_init(
            || vec![0.0f32; cols],
            |g, (ci, chunk)| {
                for (k, &row) in chunk.iter().enumerate() {
                    // Rows are scattered over the table: fetch a few ahead (weights and state).
                    if let Some(&next) = chunk.get(k + AHEAD) {
                        let next = next as usize;
                        let mut off = 0;
                        while off < cols {
                            prefetch(w.get().wrapping_add(next * cols + off));
                            off += 16;
                        }
                        if spr > 0 {
                            prefetch(s.get().wrapping_add(next * spr));
                        }
                    }
                    let row = row as usize;
                    // SAFETY: rows are unique (deduplicated by every caller) and < num_rows, and
                    // the buffers hold num_rows rows (both checked above), so every iteration
                    // touches a disjoint row inside weights and state.
                    let (wr, sr) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(w.get().add(row * cols), cols),
                            std::slice::from_raw_parts_mut(s.get().add(row * spr), spr),
                        )
                    };
                    let sq = grad_of(ci * CHUNK + k, g, wr);
                    apply_row(wr, sr, g, sq, dim, upd);
                }
            },
        );
        Ok(())
    }
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

impl Numerics for Cpu {
    fn gemm(&self, g: Gemm, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>) -> Result<()> {
        let Gemm { m, n, k, trans_a, trans_b, alpha, beta } = g;
        super::check_gemm(&g, a.len(), b.len(), c.len())?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Strides of op(A) (m×k) and op(B) (k×n) as (column stride, row stride).
        let (a_cs, a_rs) = if trans_a { (m as isize, 1) } else { (1, k as isize) };
        let (b_cs, b_rs) = if trans_b { (k as isize, 1) } else { (1, n as isize) };
        let flops = super::product(&[m, n, k]).unwrap_or(usize::MAX);
        let par = if flops >= 1 << 18 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
        // SAFETY: the sizes were checked above; the strides describe row-major storage of
        // exactly those sizes; `c` does not alias `a` or `b` (distinct borrows).
        unsafe {
            gemm::gemm(
                m, n, k,
                c.as_mut_ptr(), 1, n as isize,
                beta != 0.0,
                a.as_ptr(), a_cs, a_rs,
                b.as_ptr(), b_cs, b_rs,
                beta, alpha,
                false, false, false,
                par,
            );
        }
        Ok(())
    }

    fn bias_act(&self, x: &mut Vec<f32>, bias: &Vec<f32>, rows: usize, cols: usize, act: Act) -> Result<()> {
        check(x.len() >= rows * cols && bias.len() == cols, || format!("bias_act: {rows}x{cols} with bias {}", bias.len()))?;
        if rows * cols == 0 {
            return Ok(());
        }
        x[..rows * cols].par_chunks_mut(cols).with_min_len(16).for_each(|r| {
            for (v, &b) in r.iter_mut().zip(bias.iter()) {
                let y = *v + b;
                *v = if act == Act::Relu { y.max(0.0) } else { y };
            }
        });
        Ok(())
    }

    fn act_backward(&self, y: &Vec<f32>, dy: &mut Vec<f32>, act: Act) -> Result<()> {
        check(y.len() == dy.len(), || format!("act_backward: {} vs {}", y.len(), dy.len()))?;
        if act == Act::Relu {
            dy.par_chunks_mut(4096).zip(y.par_chunks(4096)).for_each(|(d, y)| {
                d.iter_mut().zip(y).for_each(|(d, &y)| if y <= 0.0 { *d = 0.0 })
            });
        }
        Ok(())
    }

    fn col_sum(&self, x: &Vec<f32>, rows: usize, cols: usize, beta: f32, out: &mut Vec<f32>) -> Result<()> {
        check(x.len() >= rows * cols && out.len() == cols, || format!("col_sum: {rows}x{cols} into {}", out.len()))?;
        // Fixed chunking, partial sums combined in order: deterministic whatever the threads.
        const CHUNKS: usize = 8;
        let per = rows.div_ceil(CHUNKS).max(1);
        let partial: Vec<Vec<f32>> = (0..CHUNKS)
            .into_par_iter()
            .map(|c| {
                let mut s = vec![0.0f32; cols];
                for r in (c * per).min(rows)..((c + 1) * per).min(rows) {
                    s.iter_mut().zip(&x[r * cols..(r + 1) * cols]).for_each(|(a, &b)| *a += b);
                }
                s
            })
            .collect();
        for (j, o) in out.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for p in &partial {
                acc += p[j];
            }
            *o = if beta == 0.0 { acc } else { beta * *o + acc };
        }
        Ok(())
    }

    fn copy_block(&self, narrow: &mut Vec<f32>, wide: &mut Vec<f32>, rows: usize, cols: usize, dst: Layout, to_wide: bool) -> Result<()> {
        check(narrow.len() >= rows * cols && dst.col + cols <= dst.stride && wide.len() >= rows * dst.stride, || {
            format!("copy_block: {rows}x{cols} at col {} of stride {}", dst.col, dst.stride)
        })?;
        if cols == 0 {
            return Ok(());
        }
        wide[..rows * dst.stride].par_chunks_mut(dst.stride).zip(narrow[..rows * cols].par_chunks_mut(cols)).for_each(|(w, n)| {
            if to_wide {
                w[dst.col..dst.col + cols].copy_from_slice(n)
            } else {
                n.copy_from_slice(&w[dst.col..dst.col + cols])
            }
        });
        Ok(())
    }

    fn scale_rows(&self, x: &mut Vec<f32>, off: usize, stride: usize, rows: usize, cols: usize, s: &Vec<f32>) -> Result<()> {
        if rows == 0 || cols == 0 {
            return Ok(());
        }
        super::check_scale_rows(x.len(), off, stride, rows, cols, s.len())?;

        for (i, &f) in s[..rows].iter().enumerate() {
            x[off + i * stride..off + i * stride + cols].iter_mut().for_each(|v| *v *= f);
        }
        Ok(())
    }

    fn axpy(&self, a: f32, x: &Vec<f32>, y: &mut Vec<f32>) -> Result<()> {
        check(x.len() == y.len(), || format!("axpy: {} vs {}", x.len(), y.len()))?;
        y.par_chunks_mut(8192).zip(x.par_chunks(8192)).for_each(|(y, x)| y.iter_mut().zip(x).for_each(|(y, &x)| *y += a * x));
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, a: f32) -> Result<()> {
        x.par_chunks_mut(8192).for_each(|x| x.iter_mut().for_each(|v| *v *= a));
        Ok(())
    }

    fn dot_interaction(&self, x: &Vec<f32>, batch: usize, f: usize, d: usize, out: &mut Vec<f32>) -> Result<()> {
        check(d > 0, || "dot_interaction: d must be > 0".into())?;
        let w = d + (f + 1) * f / 2;
        let v = (f + 1) * d;
        check(x.len() >= batch * v && out.len() >= batch * w, || format!("dot_interaction: batch {batch}, f {f}, d {d}: buffers too small"))?;
        out[..batch * w].par_chunks_mut(w).zip(x[..batch * v].par_chunks(v)).with_min_len(8).for_each(|(o, xs)| {
            o[..d].copy_from_slice(&xs[..d]);
            let mut k = d;
            for i in 1..=f {
                let xi = &xs[i * d..(i + 1) * d];
                for j in 0..i {
                    let xj = &xs[j * d..(j + 1) * d];
                    o[k] = xi.iter().zip(xj).map(|(a, b)| a * b).sum();
                    k += 1;
                }
            }
        });
        Ok(())
    }

    fn dot_interaction_backward(&self, x: &Vec<f32>, dout: &Vec<f32>, batch: usize, f: usize, d: usize, dx: &mut Vec<f32>) -> Result<()> {
        check(d > 0, || "dot_interaction_backward: d must be > 0".into())?;
        let w = d + (f + 1) * f / 2;
        let v = (f + 1) * d;
        check(x.len() >= batch * v && dout.len() >= batch * w && dx.len() >= batch * v, || {
            format!("dot_interaction_backward: batch {batch}, f {f}, d {d}: buffers too small")
        })?;
        dx[..batch * v].par_chunks_mut(v).zip(x[..batch * v].par_chunks(v)).zip(dout[..batch * w].par_chunks(w)).with_min_len(8).for_each(
            |((g, xs), o)| {
                g[..d].copy_from_slice(&o[..d]);
                g[d..].fill(0.0);
                let mut k = d;
                for i in 1..=f {
                    for j in 0..i {
                        let go = o[k];
                        k += 1;
                        if go == 0.0 {
                            continue;
                        }
                        for t in 0..d {
                            g[i * d + t] += go * xs[j * d + t];
                            g[j * d + t] += go * xs[i * d + t];
                        }
                    }
                }
            },
        );
        Ok(())
    }

    fn cross_combine(&self, x0: &Vec<f32>, uv: &Vec<f32>, bias: &Vec<f32>, xl: &Vec<f32>, rows: usize, cols: usize, out: &mut Vec<f32>) -> Result<()> {
        let n = rows * cols;
        check(x0.len() >= n && uv.len() >= n && xl.len() >= n && out.len() >= n && bias.len() == cols, || format!("cross_combine: {rows}x{cols}"))?;
        if n == 0 {
            return Ok(());
        }
        out[..n].par_chunks_mut(cols).enumerate().for_each(|(r, o)| {
            let base = r * cols;
            for c in 0..cols {
                o[c] = x0[base + c] * (uv[base + c] + bias[c]) + xl[base + c];
            }
        });
        Ok(())
    }

    fn cross_combine_backward(&self, x0: &Vec<f32>, uv: &Vec<f32>, bias: &Vec<f32>, dout: &Vec<f32>, rows: usize, cols: usize, duv: &mut Vec<f32>, dx0: &mut Vec<f32>) -> Result<()> {
        let n = rows * cols;
        check(x0.len() >= n && uv.len() >= n && dout.len() >= n && duv.len() >= n && dx0.len() >= n && bias.len() == cols, || {
            format!("cross_combine_backward: {rows}x{cols}")
        })?;
        if n == 0 {
            return Ok(());
        }
        duv[..n].par_chunks_mut(cols).zip(dx0[..n].par_chunks_mut(cols)).enumerate().for_each(|(r, (du, dx))| {
            let base = r * cols;
            for c in 0..cols {
                let g = dout[base + c];
                du[c] = g * x0[base + c];
                dx[c] += g * (uv[base + c] + bias[c]);
            }
        });
        Ok(())
    }

    fn bce_with_logits(&self, logits: &Vec<f32>, labels: &Vec<f32>, scale: f32, dlogits: &mut Vec<f32>) -> Result<f64> {
        let n = labels.len();
        check(logits.len() >= n && dlogits.len() >= n, || format!("bce_with_logits: {} logits for {n} labels", logits.len()))?;
        let mut loss = 0.0f64;
        for i in 0..n {
            let x = logits[i];
            let y = labels[i];
            loss += (x.max(0.0) - x * y) as f64 + (-x.abs()).exp().ln_1p() as f64;
            let s = 1.0 / (1.0 + (-x).exp());
            dlogits[i] = scale * (s - y);
        }
        Ok(loss)
    }

    fn dense_update(&self, p: &mut Vec<f32>, g: &Vec<f32>, s: &mut Vec<f32>, upd: &DenseUpdate) -> Result<()> {
        check(p.len() == g.len(), || format!("dense_update: param {} vs grad {}", p.len(), g.len()))?;
        let l2 = upd.l2;
        match upd.opt {
            DenseOptimizer::Sgd { lr } => p.iter_mut().zip(g).for_each(|(p, &g)| *p -= lr * (g + l2 * *p)),
            DenseOptimizer::Adagrad { lr, eps } => {
                check(s.len() == p.len(), || format!("dense_update: state {} vs param {}", s.len(), p.len()))?;
                for ((p, s), &g) in p.iter_mut().zip(s.iter_mut()).zip(g) {
                    let g = g + l2 * *p;
                    *s += g * g;
                    *p -= lr * g / (s.sqrt() + eps);
                }
            }
        }
        Ok(())
    }

    fn embedding_forward(&self, shard: &Shard<Cpu>, bags: &Bags<Cpu>, out: &mut Vec<f32>, layout: Layout, accumulate: bool) -> Result<()> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        super::check_shard_bufs("embedding_forward", &shard.spec, shard.weights.len(), None)?;
        check_bags(rows, cols, bags, out.len(), layout, "embedding_forward")?;
        let n = bags.num_bags;
        if n == 0 {
            return Ok(());
        }
        let w = &shard.weights;
        let (off, ids) = (&bags.offsets, &bags.ids);
        let scale = bags.scale.as_deref();
        // One output row per bag; the last row of `out` may be shorter than the stride.
        let body = &mut out[..(n - 1) * layout.stride + layout.col + cols];
        body.par_chunks_mut(layout.stride).enumerate().with_min_len(32).for_each(|(b, orow)| {
            let o = &mut orow[layout.col..layout.col + cols];
            if !accumulate {
                o.fill(0.0);
            }
            let (s, e) = (off[b] as usize, off[b + 1] as usize);
            let sc = scale.map_or(1.0, |s| s[b]);
            // Prefetch a few rows ahead: the gather is bound by memory latency.
            for &id in &ids[s..e.min(s + 4)] {
                prefetch_row(w, id as usize, cols);
            }
            for j in s..e {
                if j + 4 < ids.len() {
                    prefetch_row(w, ids[j + 4] as usize, cols);
                }
                let r = &w[ids[j] as usize * cols..][..cols];
                if sc == 1.0 {
                    o.iter_mut().zip(r).for_each(|(a, &x)| *a += x);
                } else {
                    o.iter_mut().zip(r).for_each(|(a, &x)| *a += sc * x);
                }
            }
        });
        Ok(())
    }

    fn embedding_backward_update(&self, shard: &mut Shard<Cpu>, bags: &Bags<Cpu>, grad: &Vec<f32>, layout: Layout, upd: &EmbUpdate) -> Result<()> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        check_bags(rows, cols, bags, grad.len(), layout, "embedding_backward_update")?;
        check(shard.state.len() == rows * upd.state_per_row(cols), || {
            format!("embedding_backward_update: state of {} floats for {rows} rows and {:?}", shard.state.len(), upd.kind)
        })?;
        check(upd.kind != EmbKind::RowWiseAdagrad || cols == shard.spec.dim, || {
            "embedding_backward_update: a column shard needs the two-phase update (row_grads, then apply with whole-row Σg²)".into()
        })?;
        let d = dedup(&bags.offsets, &bags.ids, rows);
        let scale = bags.scale.as_deref();
        self.update_rows(shard, &d.rows, upd, |u, g, w| {
            row_grad(g, &d.bags[d.starts[u]..d.starts[u + 1]], grad, layout, scale, upd.l2, w);
            g.iter().map(|x| x * x).sum()
        })
    }

    fn embedding_row_grads(&self, shard: &Shard<Cpu>, bags: &Bags<Cpu>, grad: &Vec<f32>, layout: Layout, upd: &EmbUpdate) -> Result<RowGrads<Cpu>> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        super::check_shard_bufs("embedding_row_grads", &shard.spec, shard.weights.len(), None)?;
        check_bags(rows, cols, bags, grad.len(), layout, "embedding_row_grads")?;
        let d = dedup(&bags.offsets, &bags.ids, rows);
        let nu = d.rows.len();
        let mut grads = vec![0.0f32; nu * cols];
        let mut sq = vec![0.0f32; nu];
        let scale = bags.scale.as_deref();
        grads.par_chunks_mut(cols.max(1)).zip(sq.par_iter_mut()).enumerate().for_each(|(u, (g, s))| {
            let row = d.rows[u] as usize;
            row_grad(g, &d.bags[d.starts[u]..d.starts[u + 1]], grad, layout, scale, upd.l2, &shard.weights[row * cols..(row + 1) * cols]);
            *s = g.iter().map(|x| x * x).sum();
        });
        Ok(RowGrads { rows: d.rows, num_rows: nu, grads, sq })
    }

    fn embedding_apply(&self, shard: &mut Shard<Cpu>, rg: &RowGrads<Cpu>, row_sq: Option<&Vec<f32>>, upd: &EmbUpdate) -> Result<()> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        check(rg.rows.len() == rg.num_rows && rg.grads.len() == rg.num_rows * cols && rg.sq.len() == rg.num_rows, || {
            format!("embedding_apply: row grads of inconsistent sizes ({} rows)", rg.num_rows)
        })?;
        check(rg.rows.windows(2).all(|w| w[0] < w[1]) && rg.rows.last().map_or(true, |&r| (r as usize) < rows), || {
            "embedding_apply: rows must be unique, ascending and inside the shard".into()
        })?;
        check(shard.state.len() == rows * upd.state_per_row(cols), || "embedding_apply: state size does not match the optimizer".into())?;
        let sq = row_sq.unwrap_or(&rg.sq);
        check(sq.len() == rg.num_rows, || format!("embedding_apply: {} row sums for {} rows", sq.len(), rg.num_rows))?;
        self.update_rows(shard, &rg.rows, upd, |u, g, _w| {
            g.copy_from_slice(&rg.grads[u * cols..(u + 1) * cols]);
            sq[u]
        })
    }
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
