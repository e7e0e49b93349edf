//! The CPU embedding kernels' building blocks: row prefetch, the bag checks, deduplication of
//! (row, bag) pairs by radix sort (a deterministic summation order), one row's gradient, and
//! the fused per-row optimizer update run in parallel over unique rows.
use super::{check, Cpu};
use crate::backend::*;
use crate::{Error, Result};
use rayon::prelude::*;

/// Hint the cache to fetch the line at `p` into L2 and the caches above it (any address:
/// nothing is dereferenced). Into L2 rather than L1: measured faster for the random rows of the
/// gather and the update, whose lines are used once, a few rows later.
#[inline(always)]
fn prefetch(p: *const f32) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: a prefetch is a hint that never faults, whatever the address, and SSE (which
        // the intrinsic needs) is part of every x86_64 target.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Rows the forward's gather prefetches ahead of the one it sums: enough lines in flight to
/// cover the memory latency of random rows.
pub(super) const GATHER_AHEAD: usize = 8;

/// Unique rows the fused update prefetches ahead (weights and state).
pub(super) const UPDATE_AHEAD: usize = 8;

/// Prefetch every cache line of the `len` floats from `p` (a row need not start on a line:
/// a 64-float row at a 16-byte offset spans five lines). Nothing is dereferenced.
#[inline(always)]
pub(crate) fn prefetch_span(p: *const f32, len: usize) {
    if len == 0 {
        return;
    }
    let first = p as usize & !63;
    let last = (p as usize).wrapping_add(len * 4 - 1);
    let mut a = first;
    while a <= last {
        prefetch(a as *const f32);
        a += 64;
    }
}

/// One task's share of the forward: bags `b0..b1`, whose ids are `run` (the ids from offset
/// `base` on), summed into their output rows `orows` (row `b - b0` at `col` of stride `stride`).
/// The caller has checked every id against the shard (`w` holds rows · cols floats) and the
/// offsets (monotone, covering the ids).
pub(super) struct GatherTask<'a> {
    pub w: &'a [f32],
    pub cols: usize,
    pub off: &'a [u64],
    pub run: &'a [u64],
    pub base: usize,
    pub b0: usize,
    pub b1: usize,
    pub scale: Option<&'a [f32]>,
    pub stride: usize,
    pub col: usize,
    pub accumulate: bool,
    pub ahead: usize,
}

impl GatherTask<'_> {
    /// Sum every bag of the task into its output row, in the bag's id order per element (the
    /// same order whatever the variant: bitwise the same sums). Rows of 16, 32, 64 or 128
    /// floats are summed in registers, with the widest vectors the CPU has.
    pub(super) fn run(&self, orows: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 = std::arch::is_x86_feature_detected!("avx512f");
            let avx2 = std::arch::is_x86_feature_detected!("avx2");
            macro_rules! go {
                ($n:literal) => {{
                    if avx512 {
                        // SAFETY: the CPU has AVX-512F (checked just above).
                        return unsafe { self.fixed_avx512::<$n>(orows) };
                    }
                    if avx2 {
                        // SAFETY: the CPU has AVX2 (checked just above).
                        return unsafe { self.fixed_avx2::<$n>(orows) };
                    }
                    return self.fixed::<$n>(orows);
                }};
            }
            match self.cols {
                16 => go!(16),
                32 => go!(32),
                64 => go!(64),
                128 => go!(128),
                _ => {}
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        match self.cols {
            16 => return self.fixed::<16>(orows),
            32 => return self.fixed::<32>(orows),
            64 => return self.fixed::<64>(orows),
            128 => return self.fixed::<128>(orows),
            _ => {}
        }
        self.any_width(orows)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn fixed_avx512<const N: usize>(&self, orows: &mut [f32]) {
        self.fixed::<N>(orows)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn fixed_avx2<const N: usize>(&self, orows: &mut [f32]) {
        self.fixed::<N>(orows)
    }

    /// Prefetch the first rows of the run.
    #[inline(always)]
    fn start(&self) {
        let wp = self.w.as_ptr();
        for &id in &self.run[..self.run.len().min(self.ahead)] {
            prefetch_span(wp.wrapping_add(id as usize * self.cols), self.cols);
        }
    }

    /// Row `j` of the run, after prefetching the row `ahead` ids further on.
    #[inline(always)]
    fn row(&self, j: usize) -> *const f32 {
        let wp = self.w.as_ptr();
        if let Some(&next) = self.run.get(j + self.ahead) {
            prefetch_span(wp.wrapping_add(next as usize * self.cols), self.cols);
        }
        // SAFETY: `j` < run.len() (every caller iterates a bag's ids inside the run), and the
        // id is < rows with `w` holding rows · cols floats (the caller's checks), so the row
        // starts inside `w` with `cols` floats after it.
        unsafe { wp.add(*self.run.get_unchecked(j) as usize * self.cols) }
    }

    #[inline(always)]
    fn fixed<const N: usize>(&self, orows: &mut [f32]) {
        self.start();
        for (b, orow) in (self.b0..self.b1).zip(orows.chunks_mut(self.stride)) {
            let o: &mut [f32; N] = (&mut orow[self.col..self.col + N]).try_into().expect("a row of N floats");
            let mut acc = if self.accumulate { *o } else { [0.0f32; N] };
            let (s, e) = (self.off[b] as usize - self.base, self.off[b + 1] as usize - self.base);
            let sc = self.scale.map_or(1.0, |s| s[b]);
            for j in s..e {
                // SAFETY: `row` returns the start of a row of `cols` = N floats inside `w`.
                let r = unsafe { &*(self.row(j) as *const [f32; N]) };
                if sc == 1.0 {
                    for k in 0..N {
                        acc[k] += r[k];
                    }
                } else {
                    for k in 0..N {
                        acc[k] += sc * r[k];
                    }
                }
            }
            *o = acc;
        }
    }

    fn any_width(&self, orows: &mut [f32]) {
        self.start();
        let cols = self.cols;
        for (b, orow) in (self.b0..self.b1).zip(orows.chunks_mut(self.stride)) {
            let o = &mut orow[self.col..self.col + cols];
            if !self.accumulate {
                o.fill(0.0);
            }
            let (s, e) = (self.off[b] as usize - self.base, self.off[b + 1] as usize - self.base);
            let sc = self.scale.map_or(1.0, |s| s[b]);
            for j in s..e {
                // SAFETY: `row` returns the start of a row of `cols` floats inside `w`.
                let r = unsafe { std::slice::from_raw_parts(self.row(j), cols) };
                if sc == 1.0 {
                    o.iter_mut().zip(r).for_each(|(a, &x)| *a += x);
                } else {
                    o.iter_mut().zip(r).for_each(|(a, &x)| *a += sc * x);
                }
            }
        }
    }
}

/// Bags as the CPU's embedding code reads them: host slices, whichever backend owns the
/// buffers (the CPU's own, or the host memory under the emulated device's opaque buffers).
#[derive(Clone, Copy)]
pub(crate) struct BagsRef<'a> {
    pub num_bags: usize,
    pub offsets: &'a [u64],
    pub ids: &'a [u64],
    pub scale: Option<&'a [f32]>,
}

impl<'a> From<&'a Bags<Cpu>> for BagsRef<'a> {
    fn from(b: &'a Bags<Cpu>) -> Self {
        BagsRef { num_bags: b.num_bags, offsets: &b.offsets, ids: &b.ids, scale: b.scale.as_deref() }
    }
}

/// Bounds checks shared by the embedding ops: offsets monotone and covering `ids`, every id a
/// local row of the shard, the output/gradient matrix large enough.
pub(super) fn check_bags(shard_rows: usize, cols: usize, bags: BagsRef<'_>, buf_len: usize, layout: Layout, what: &str) -> Result<()> {
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
    if let Some(s) = bags.scale {
        check(s.len() == n, || format!("{what}: {} scales for {n} bags", s.len()))?;
    }
    super::check_layout(what, n, cols, layout, buf_len)
}

/// Occurrences of each unique row: `rows[u]` with its (bag) occurrences `bags[starts[u]..starts[u+1]]`.
pub(super) struct Dedup {
    pub(super) rows: Vec<u64>,
    pub(super) starts: Vec<usize>,
    pub(super) bags: Vec<u32>,
}

/// Sort (row, bag) pairs by row then bag (a deterministic summation order) and run-length
/// encode them. LSD radix sort on packed keys when they fit in 64 bits.
pub(super) fn dedup(offsets: &[u64], ids: &[u64], shard_rows: usize) -> Dedup {
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

/// Sum of one unique row's incoming gradients (scaled per bag), plus the L2 term, into `g`:
/// per element, the bags in the order given, then the L2 term. Rows of 16, 32, 64 or 128
/// floats are summed in registers, with the widest vectors the CPU has (the same sums).
#[inline]
pub(super) fn row_grad(g: &mut [f32], occ: &[u32], grad: &[f32], layout: Layout, scale: Option<&[f32]>, l2: f32, w: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        macro_rules! go {
            ($n:literal) => {{
                if avx512 {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { row_grad_avx512::<$n>(g, occ, grad, layout, scale, l2, w) };
                }
                if avx2 {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe { row_grad_avx2::<$n>(g, occ, grad, layout, scale, l2, w) };
                }
            }};
        }
        match g.len() {
            16 => go!(16),
            32 => go!(32),
            64 => go!(64),
            128 => go!(128),
            _ => {}
        }
    }
    row_grad_any(g, occ, grad, layout, scale, l2, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn row_grad_avx512<const N: usize>(g: &mut [f32], occ: &[u32], grad: &[f32], layout: Layout, scale: Option<&[f32]>, l2: f32, w: &[f32]) {
    row_grad_fixed::<N>(g, occ, grad, layout, scale, l2, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_grad_avx2<const N: usize>(g: &mut [f32], occ: &[u32], grad: &[f32], layout: Layout, scale: Option<&[f32]>, l2: f32, w: &[f32]) {
    row_grad_fixed::<N>(g, occ, grad, layout, scale, l2, w)
}

#[inline(always)]
fn row_grad_fixed<const N: usize>(g: &mut [f32], occ: &[u32], grad: &[f32], layout: Layout, scale: Option<&[f32]>, l2: f32, w: &[f32]) {
    let mut acc = [0.0f32; N];
    for &bag in occ {
        let bag = bag as usize;
        let src: &[f32; N] = grad[bag * layout.stride + layout.col..][..N].try_into().expect("a row of N floats");
        match scale {
            None => (0..N).for_each(|k| acc[k] += src[k]),
            Some(s) => {
                let s = s[bag];
                (0..N).for_each(|k| acc[k] += s * src[k])
            }
        }
    }
    if l2 != 0.0 {
        let w: &[f32; N] = w[..N].try_into().expect("a row of N floats");
        (0..N).for_each(|k| acc[k] += l2 * w[k]);
    }
    g.copy_from_slice(&acc);
}

fn row_grad_any(g: &mut [f32], occ: &[u32], grad: &[f32], layout: Layout, scale: Option<&[f32]>, l2: f32, w: &[f32]) {
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
    /// Shared body of the fused update and `embedding_apply`: for each unique row `u`,
    /// `grad_of(u, g, w)` fills the row gradient `g` (`w`: the row's weights), and the update
    /// is applied with the whole-row Σg² that `sq` names. `prefetch_of(u)` hints the cache with
    /// what `grad_of(u, ..)` will read, a few rows ahead. Rows go in groups of four, their Σg²
    /// sums interleaved (each still summed over its columns in order).
    /// The rows must be unique; each is checked against the shard's weight and state buffers.
    pub(super) fn update_rows<F, P>(&self, shard: &mut Shard<Cpu>, rows: &[u64], upd: &EmbUpdate, sq: RowSq<'_>, prefetch_of: P, grad_of: F) -> Result<()>
    where
        F: Fn(usize, &mut [f32], &[f32]) + Sync,
        P: Fn(usize) + Sync,
    {
        let cols = shard.spec.num_cols();
        let dim = shard.spec.dim;
        let spr = upd.state_per_row(cols);
        let n = shard.spec.num_rows();
        super::check_shard_bufs("embedding update", &shard.spec, shard.weights.len(), Some((shard.state.len(), spr)))?;
        if let Some(&bad) = rows.iter().find(|&&r| r >= n as u64) {
            return Err(Error::Input(format!("embedding update: row {bad} outside the shard's {n} rows")));
        }
        if let RowSq::Given(v) = sq {
            if v.len() != rows.len() {
                return Err(Error::Input(format!("embedding update: {} row sums for {} rows", v.len(), rows.len())));
            }
        }
        let w = SendPtr(shard.weights.as_mut_ptr());
        let s = SendPtr(shard.state.as_mut_ptr());
        const CHUNK: usize = 512;
        const R: usize = 4;
        // Rows are scattered over the table: their weights and state are fetched UPDATE_AHEAD
        // rows ahead, the gradient rows they read half as far (those mostly hit a cache).
        let ahead_n = UPDATE_AHEAD;
        rows.par_chunks(CHUNK).enumerate().for_each_init(
            || vec![0.0f32; R * cols],
            |g, (ci, chunk)| {
                let first = ci * CHUNK;
                let fetch = |u: usize| {
                    if let Some(&r) = rows.get(u) {
                        prefetch_span(w.get().wrapping_add(r as usize * cols), cols);
                        if spr > 0 {
                            prefetch_span(s.get().wrapping_add(r as usize * spr), spr);
                        }
                    }
                };
                for u in first..first + ahead_n.min(chunk.len()) {
                    fetch(u);
                    if u < first + ahead_n / 2 {
                        prefetch_of(u);
                    }
                }
                let ahead = |u: usize| {
                    fetch(u + ahead_n);
                    if u + ahead_n / 2 < rows.len() {
                        prefetch_of(u + ahead_n / 2);
                    }
                };
                for (gi, group) in chunk.chunks(R).enumerate() {
                    let u0 = first + gi * R;
                    // SAFETY: rows are unique (deduplicated by every caller) and < num_rows, and
                    // the buffers hold num_rows rows (both checked above), so every row of the
                    // group is a disjoint block inside weights and state that no other thread
                    // touches.
                    let row = |i: usize| unsafe {
                        let r = group[i] as usize;
                        (std::slice::from_raw_parts_mut(w.get().add(r * cols), cols), std::slice::from_raw_parts_mut(s.get().add(r * spr), spr))
                    };
                    for i in 0..group.len() {
                        ahead(u0 + i);
                        grad_of(u0 + i, &mut g[i * cols..(i + 1) * cols], row(i).0);
                    }
                    let mut sums = [0.0f32; R];
                    match sq {
                        RowSq::FromGrad => {
                            // Four independent sums (rows past the group's end sum stale data,
                            // unused), each over the columns in order.
                            let (g0, rest) = g.split_at(cols);
                            let (g1, rest) = rest.split_at(cols);
                            let (g2, g3) = rest.split_at(cols);
                            for k in 0..cols {
                                sums[0] += g0[k] * g0[k];
                                sums[1] += g1[k] * g1[k];
                                sums[2] += g2[k] * g2[k];
                                sums[3] += g3[k] * g3[k];
                            }
                        }
                        RowSq::Given(v) => {
                            for i in 0..group.len() {
                                sums[i] = v[u0 + i];
                            }
                        }
                    }
                    for i in 0..group.len() {
                        let (wr, sr) = row(i);
                        apply_row(wr, sr, &g[i * cols..(i + 1) * cols], sums[i], dim, upd);
                    }
                }
            },
        );
        Ok(())
    }
}

/// Where [`Cpu::update_rows`] takes each row's Σg² from.
#[derive(Clone, Copy)]
pub(super) enum RowSq<'a> {
    /// The sum of the squares of the row gradient it was handed, over its columns in order.
    FromGrad,
    /// One value per row, given (the whole row's, for a column shard).
    Given(&'a [f32]),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The register-summed gather and row gradient (rows of 16, 32, 64, 128 floats, with the
    /// widest vectors the CPU has) give bitwise the sums of the any-width loops, which add in
    /// the same order: with and without per-bag scales, accumulating or not, empty bags
    /// included; and those sums match an f64 oracle to f32 rounding.
    #[test]
    fn register_sums_equal_the_plain_loops_bitwise() {
        let mut rng = Rng::new(7);
        for cols in [16usize, 32, 64, 128] {
            let rows = 50;
            let w: Vec<f32> = (0..rows * cols).map(|_| rng.f32() * 2.0 - 1.0).collect();
            let n = 37;
            let mut off = vec![0u64];
            for b in 0..n {
                let len = if b % 9 == 4 { 0 } else { (rng.below(6) + 1) as u64 };
                off.push(off[b] + len);
            }
            let ids: Vec<u64> = (0..off[n]).map(|_| rng.below(rows as u64)).collect();
            let scales: Vec<f32> = (0..n).map(|_| rng.f32() + 0.5).collect();
            let (stride, col) = (cols + 24, 8);
            let init: Vec<f32> = (0..n * stride).map(|_| rng.f32()).collect();
            for scale in [None, Some(&scales[..])] {
                for accumulate in [false, true] {
                    let task = GatherTask { w: &w, cols, off: &off, run: &ids, base: 0, b0: 0, b1: n, scale, stride, col, accumulate, ahead: 3 };
                    let (mut fast, mut plain) = (init.clone(), init.clone());
                    task.run(&mut fast);
                    task.any_width(&mut plain);
                    assert_eq!(fast.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), plain.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "cols {cols} scale {} acc {accumulate}", scale.is_some());
                    for b in 0..n {
                        for c in 0..cols {
                            let mut want = if accumulate { init[b * stride + col + c] as f64 } else { 0.0 };
                            for &id in &ids[off[b] as usize..off[b + 1] as usize] {
                                want += scale.map_or(1.0, |s| s[b] as f64) * w[id as usize * cols + c] as f64;
                            }
                            let got = fast[b * stride + col + c] as f64;
                            assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "cols {cols} bag {b} col {c}: {got} vs {want}");
                        }
                    }
                    // Columns outside the block are untouched.
                    assert!((0..n).all(|b| fast[b * stride..b * stride + col] == init[b * stride..b * stride + col]));
                }
            }
            // Row gradients: sum of the occurrence bags' gradient rows (scaled), plus L2.
            let grad: Vec<f32> = (0..n * stride).map(|_| rng.f32() - 0.5).collect();
            let layout = Layout { stride, col };
            let occ: Vec<u32> = vec![3, 3, 17, 36, 0];
            for scale in [None, Some(&scales[..])] {
                for l2 in [0.0, 0.25] {
                    let (mut fast, mut plain) = (vec![0.0f32; cols], vec![0.0f32; cols]);
                    row_grad(&mut fast, &occ, &grad, layout, scale, l2, &w[..cols]);
                    row_grad_any(&mut plain, &occ, &grad, layout, scale, l2, &w[..cols]);
                    assert_eq!(fast.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), plain.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "row_grad cols {cols}");
                }
            }
        }
    }
}
