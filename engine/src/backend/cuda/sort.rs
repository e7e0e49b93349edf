//! Device sorting of one backward call's occurrences: the in-place exclusive scan, the stable
//! LSD radix sort of (row, position) pairs, and the sort + run-length encoding (`Prep`) that the
//! general (sort-based) backward and `embedding_row_grads` start from. All scratch is arena memory.
use super::*;

/// Sorted and run-length encoded occurrences of one backward call (arena scratch).
pub(super) struct Prep {
    pub(super) n: usize,
    pub(super) vals: u64,
    pub(super) bag_of: u64,
    pub(super) uniq: u64,
    pub(super) seg: u64,
    pub(super) counters: u64,
}

impl Cuda {
    /// In-place exclusive scan of `n` u32 at `ptr`.
    fn scan(&self, ptr: u64, n: usize) -> Result<()> {
        let nb = n.div_ceil(SCAN_BLOCK).max(1);
        let ni = n as i64;
        if nb == 1 {
            // SAFETY: launch contract (`Launch::go`): `scan_blocks(const u32*, u32*, i64, u32*)`
            // gets (u64, u64, i64, u64); n <= SCAN_BLOCK u32 at ptr, one block of 256 threads x 4
            // elements covers them; null block sums are skipped. In place (in = out): each thread
            // reads its four elements before the block's barrier and writes the same four after it,
            // no other thread touches them.
            unsafe { self.gpu.launch("scan_blocks", 1, 256).map_err(dev)?.arg(&ptr).arg(&ptr).arg(&ni).arg(&NULL).go() }.map_err(dev)?;
            return Ok(());
        }
        let sums = self.scratch(nb * 4)?;
        let g = Self::blocks(n, SCAN_BLOCK)?;
        // SAFETY: launch contract: as above, with a block per SCAN_BLOCK elements and sums holding
        // one u32 per block (arena).
        unsafe { self.gpu.launch("scan_blocks", g, 256).map_err(dev)?.arg(&ptr).arg(&ptr).arg(&ni).arg(&sums).go() }.map_err(dev)?;
        self.scan(sums, nb)?;
        let g = Self::blocks(n, 256)?;
        // SAFETY: launch contract: `scan_add(u32*, i64, const u32*)` gets (u64, i64, u64); ptr
        // holds n u32, sums one per SCAN_BLOCK of them; the grid covers n.
        unsafe { self.gpu.launch("scan_add", g, 256).map_err(dev)?.arg(&ptr).arg(&ni).arg(&sums).go() }.map_err(dev)
    }

    /// Sort the occurrences by (row, position) and run-length encode the rows.
    pub(super) fn prepare(&self, bags: &Bags<Cuda>, rows: usize) -> Result<Prep> {
        let n = bags.ids.len();
        let nb = bags.num_bags as i64;
        let ni = n as i64;
        let bag_of = self.scratch(n * 4)?;
        let (mut k0, mut v0) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
        let (mut k1, mut v1) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
        let offs = bags.offsets.ptr();
        let ids = bags.ids.ptr();
        // SAFETY: launch contract: `emb_bag_of(const u64*, i64, u32*)` gets (u64, i64, u64);
        // offsets meet the bag invariant (`check_bags`), so every position it writes is below n,
        // bag_of's length; the grid covers num_bags.
        unsafe { self.gpu.launch("emb_bag_of", Self::blocks(bags.num_bags, 256)?, 256).map_err(dev)?.arg(&offs).arg(&nb).arg(&bag_of).go() }.map_err(dev)?;
        // SAFETY: launch contract: `emb_keys(const u64*, i64, u32*, u32*)` gets (u64, i64, u64,
        // u64); ids, k0 and v0 hold n elements; the grid covers n.
        unsafe { self.gpu.launch("emb_keys", Self::blocks(n, 256)?, 256).map_err(dev)?.arg(&ids).arg(&ni).arg(&k0).arg(&v0).go() }.map_err(dev)?;
        let (k, v, k_alt, v_alt) = self.sort_pairs(k0, v0, k1, v1, n, rows)?;
        (k0, v0, k1, v1) = (k, v, k_alt, v_alt);
        // Run-length encode (reuse k1/v1 as flags and their scan).
        let (flags, idx) = (k1, v1);
        let uniq = self.scratch(n * 4)?;
        let seg = self.scratch((n + 1) * 4)?;
        let counters = self.scratch(16)?;
        let g = Self::blocks(n, 256)?;
        // SAFETY: launch contract: `rle_flags(const u32*, i64, u32*)` gets (u64, i64, u64); keys
        // and flags hold n u32; the grid covers n.
        unsafe { self.gpu.launch("rle_flags", g, 256).map_err(dev)?.arg(&k0).arg(&ni).arg(&flags).go() }.map_err(dev)?;
        self.gpu.dtod(idx, flags, n * 4).map_err(dev)?;
        self.scan(idx, n)?;
        // SAFETY: launch contract: `rle_compact(const u32* x3, i64, u32* x3)` gets (u64 x3, i64,
        // u64 x3); keys, flags and their exclusive scan idx hold n u32, so every unique index is
        // below n = uniq's length and the count nu <= n indexes seg (n + 1 u32); counters has room
        // for it; the grid covers n.
        unsafe {
            self.gpu.launch("rle_compact", g, 256).map_err(dev)?.arg(&k0).arg(&flags).arg(&idx).arg(&ni).arg(&uniq).arg(&seg).arg(&counters).go()
        }
        .map_err(dev)?;
        Ok(Prep { n, vals: v0, bag_of, uniq, seg, counters })
    }

    /// Stable LSD radix sort of `n` (u32 key, u32 value) pairs in (k0, v0), keys < `rows`:
    /// ceil(log2(rows)/8) passes of 8 bits. Returns (keys, values, spare keys, spare values).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sort_pairs(&self, mut k0: u64, mut v0: u64, mut k1: u64, mut v1: u64, n: usize, rows: usize) -> Result<(u64, u64, u64, u64)> {
        let ni = n as i64;
        let bits = if rows <= 1 { 0 } else { 64 - ((rows - 1) as u64).leading_zeros() };
        let tiles = n.div_ceil(RADIX_TILE).max(1);
        let ti = tiles as i32;
        let hist = self.scratch(256 * tiles * 4)?;
        let mut shift = 0i32;
        while (shift as u32) < bits {
            // SAFETY: launch contract: `radix_hist(const u32*, i64, int, u32*, int)` gets (u64,
            // i64, i32, u64, i32); one block of 256 threads (its `__launch_bounds__` and shared
            // counts) per tile of RADIX_TILE keys, hist holds 256 u32 per tile.
            unsafe { self.gpu.launch("radix_hist", tiles as u32, 256).map_err(dev)?.arg(&k0).arg(&ni).arg(&shift).arg(&hist).arg(&ti).go() }.map_err(dev)?;
            self.scan(hist, 256 * tiles)?;
            // SAFETY: launch contract: `radix_scatter(const u32*, const u32*, i64, int, const u32*,
            // int, u32*, u32*)` gets (u64, u64, i64, i32, u64, i32, u64, u64); the scanned
            // histogram gives every key a distinct output position below n, and k1/v1 (n u32 each)
            // are other arena blocks than k0/v0; one block of 256 threads per tile, as in
            // `radix_hist`.
            unsafe {
                self.gpu
                    .launch("radix_scatter", tiles as u32, 256)
                    .map_err(dev)?
                    .arg(&k0)
                    .arg(&v0)
                    .arg(&ni)
                    .arg(&shift)
                    .arg(&hist)
                    .arg(&ti)
                    .arg(&k1)
                    .arg(&v1)
                    .go()
            }
            .map_err(dev)?;
            std::mem::swap(&mut k0, &mut k1);
            std::mem::swap(&mut v0, &mut v1);
            shift += 8;
        }
        Ok((k0, v0, k1, v1))
    }
}
