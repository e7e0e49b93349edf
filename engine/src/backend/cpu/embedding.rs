//! The CPU embedding kernels' building blocks: row prefetch, the bag checks, deduplication of
//! (row, bag) pairs by radix sort (a deterministic summation order), one row's gradient, and
//! the fused per-row optimizer update run in parallel over unique rows.
use super::{check, Cpu};
use crate::backend::*;
use crate::{Error, Result};
use rayon::prelude::*;

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
pub(super) fn prefetch_row(w: &[f32], row: usize, cols: usize) {
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

/// Sum of one unique row's incoming gradients (scaled per bag), plus the L2 term, into `g`.
#[inline]
pub(super) fn row_grad(g: &mut [f32], occ: &[u32], grad: &[f32], layout: Layout, scale: Option<&[f32]>, l2: f32, w: &[f32]) {
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
    pub(super) fn update_rows<F>(&self, shard: &mut Shard<Cpu>, rows: &[u64], upd: &EmbUpdate, grad_of: F) -> Result<()>
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
