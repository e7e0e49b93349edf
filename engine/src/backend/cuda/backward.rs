//! The fused embedding backward + optimizer on the device: the fast path (keys/bags, radix
//! sort, one fused kernel over sorted positions) and the general path's update kernels over a
//! sorted, run-length encoded `Prep` (also the row-gradient mode of `embedding_row_grads`).
use super::embedding::Opt;
use super::sort::Prep;
use super::*;

impl Cuda {
    /// Whether the fast fused backward applies (float4 rows and gradient columns).
    pub(super) fn fast_bwd_ok(&self, cols: usize, layout: Layout) -> bool {
        cols % 4 == 0 && cols <= MAX_BWD_COLS && layout.stride % 4 == 0 && layout.col % 4 == 0 && !self.legacy_bwd.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The fast fused backward + optimizer (see embedding.cu): keys/bags, radix sort, one
    /// fused kernel over sorted positions, two kernels for runs > SHORT_RUN. No host sync.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_fast(&self, bags: &Bags<Cuda>, rows: usize, w: u64, state: u64, cols: usize, grad: u64, layout: Layout, scale: u64, o: Opt) -> Result<()> {
        let n = bags.ids.len();
        let ni = n as i64;
        let nb = bags.num_bags as i64;
        let (k0, v0) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
        let (k1, v1) = (self.scratch(n * 4)?, self.scratch(n * 4)?);
        let long_counters = self.scratch(16)?;
        let max_long = n / (SHORT_RUN + 1) + 1;
        let max_items = n / CHUNK + max_long + 1;
        let long_info = self.scratch(max_long * 12)?;
        let items = self.scratch(max_items * 8)?;
        let acc = self.scratch(max_long * cols * 4)?;
        let (offs, ids) = (bags.offsets.ptr(), bags.ids.ptr());
        // SAFETY: launch contract (`Launch::go`): `emb_keys_bags(const u64*, const u64*, i64, u32*,
        // u32*, u32*)` gets (u64, u64, i64, u64 x3); offsets and ids meet the bag invariant
        // (`check_bags`), so keys and vals (n u32 of arena each) take every position, and
        // long_counters has the 4 u32 the kernel zeroes; the grid covers a warp per bag.
        unsafe {
            self.gpu
                .launch("emb_keys_bags", Self::blocks(bags.num_bags.max(1) * 32, 256)?, 256)
                .map_err(dev)?
                .arg(&offs)
                .arg(&ids)
                .arg(&nb)
                .arg(&k0)
                .arg(&v0)
                .arg(&long_counters)
                .go()
        }
        .map_err(dev)?;
        let (keys, vals, _, _) = self.sort_pairs(k0, v0, k1, v1, n, rows)?;
        let nv = cols / 4;
        let (kernel, t) = if nv <= 32 { ("emb_bwd_fused1", nv.next_power_of_two().max(1)) } else { ("emb_bwd_fused4", 32) };
        let tlog = t.trailing_zeros() as i32;
        let (ci, stride, col) = (cols as i64, layout.stride as i64, layout.col as i64);
        let threads = n * t;
        let grid = Self::blocks(threads, 256)?.min(self.gpu.sm_count * 64).max(1);
        // SAFETY: launch contract: `emb_bwd_fused{1,4}(float*, float*, i64, const u32*, const u32*,
        // i64, const float*, i64, i64, const float*, Opt, int, u32*, u32*, u64*, float*)` gets
        // (u64, u64, i64, u64, u64, i64, u64, i64, i64, u64, Opt, i32, u64 x4). W and state fit the
        // shard, grad the bags' layout (checked by the caller); keys (< rows) and vals (bags) are n
        // sorted pairs; a long run has more than SHORT_RUN positions, so at most max_long of them
        // fit long_info (3 u32 each) and acc (cols floats each), and their chunks fit the max_items
        // items; 2^tlog lanes per group cover cols/4 float4 with KV = 1 (cols <= 128) or 4 (cols <=
        // MAX_BWD_COLS); cols, stride and col are multiples of 4 (`fast_bwd_ok`) on 256-byte
        // aligned blocks; 256 threads (`__launch_bounds__`), grid-stride.
        unsafe {
            self.gpu
                .launch(kernel, grid, 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&state)
                .arg(&ci)
                .arg(&keys)
                .arg(&vals)
                .arg(&ni)
                .arg(&grad)
                .arg(&stride)
                .arg(&col)
                .arg(&scale)
                .arg(&o)
                .arg(&tlog)
                .arg(&long_counters)
                .arg(&long_info)
                .arg(&items)
                .arg(&acc)
                .go()
        }
        .map_err(dev)?;
        let g = (max_items as u32).min(self.gpu.sm_count * 8).max(1);
        let accum = if nv <= 32 { "emb_bwd_long_accum_v4_1" } else { "emb_bwd_long_accum_v4_4" };
        // SAFETY: launch contract: `emb_bwd_long_accum_v4_{1,4}(i64, const u32*, const float*, i64,
        // i64, const float*, const u32* x2, const u64*, float*, int)` gets (i64, u64, u64, i64,
        // i64, u64 x5, i32); it visits the items and long runs the fused kernel registered (within
        // max_items and max_long, as there) and sums grad rows of their bags into acc; 256 threads
        // as its shared array assumes; grid-stride over the items.
        unsafe {
            self.gpu
                .launch(accum, g, 256)
                .map_err(dev)?
                .arg(&ci)
                .arg(&vals)
                .arg(&grad)
                .arg(&stride)
                .arg(&col)
                .arg(&scale)
                .arg(&long_counters)
                .arg(&long_info)
                .arg(&items)
                .arg(&acc)
                .arg(&tlog)
                .go()
        }
        .map_err(dev)?;
        let g = Self::blocks(max_long * 32, 256)?.min(self.gpu.sm_count * 8).max(1);
        // SAFETY: launch contract: `emb_bwd_long_apply2(float*, float*, i64, const u32*, const
        // u32*, const float*, Opt)` gets (u64, u64, i64, u64, u64, u64, Opt); one warp per
        // registered long run (at most max_long), whose row (< rows) and acc row it reads; cols <=
        // MAX_BWD_COLS; grid-stride.
        unsafe {
            self.gpu
                .launch("emb_bwd_long_apply2", g, 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&state)
                .arg(&ci)
                .arg(&long_counters)
                .arg(&long_info)
                .arg(&acc)
                .arg(&o)
                .go()
        }
        .map_err(dev)
    }

    /// The three update kernels (short runs, long-run chunks, long-run finish).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_update(&self, p: &Prep, w: u64, state: u64, cols: usize, grad: u64, layout: Layout, scale: u64, o: Opt, mode: i32, rg_grads: u64, rg_sq: u64) -> Result<()> {
        let n = p.n;
        let max_long = n / (SHORT_RUN + 1) + 1;
        let max_items = n / CHUNK + max_long + 1;
        let long_counters = self.scratch(8)?;
        self.gpu.memset0(long_counters, 8).map_err(dev)?;
        let long_rows = self.scratch(max_long * 4)?;
        let items = self.scratch(max_items * 8)?;
        let acc = self.scratch(max_long * cols * 4)?;
        self.gpu.memset0(acc, max_long * cols * 4).map_err(dev)?;
        let (ci, stride, col) = (cols as i64, layout.stride as i64, layout.col as i64);
        // SAFETY: launch contract: `emb_bwd_short(float*, float*, i64, const u32* x5, const float*,
        // i64, i64, const float*, Opt, int, float*, float*, u32*, u32*, u64*)` gets (u64, u64, i64,
        // u64 x5, u64, i64, i64, u64, Opt, i32, u64 x5); `Prep` holds the n sorted positions, their
        // nu unique rows (< rows) and nu + 1 run bounds; W, state and grad as checked by the
        // caller; rg_grads (nu·cols) and rg_sq (nu) are written only in mode 1, where the caller
        // allocates them, null otherwise; long_counters is zeroed and long_rows, items and acc hold
        // max_long runs and max_items chunks, as in `backward_fast`; warp per unique row,
        // grid-stride.
        unsafe {
            self.gpu
                .launch("emb_bwd_short", self.grid(n * 32), 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&state)
                .arg(&ci)
                .arg(&p.uniq)
                .arg(&p.seg)
                .arg(&p.counters)
                .arg(&p.vals)
                .arg(&p.bag_of)
                .arg(&grad)
                .arg(&stride)
                .arg(&col)
                .arg(&scale)
                .arg(&o)
                .arg(&mode)
                .arg(&rg_grads)
                .arg(&rg_sq)
                .arg(&long_counters)
                .arg(&long_rows)
                .arg(&items)
                .go()
        }
        .map_err(dev)?;
        let g = (max_items as u32).min(self.gpu.sm_count * 8);
        // SAFETY: launch contract: `emb_bwd_long_accum(i64, const u32* x3, const float*, i64, i64,
        // const float*, const u32* x2, const u64*, float*)` gets (i64, u64 x3, u64, i64, i64, u64
        // x5); it visits the items and long runs `emb_bwd_short` registered (bounded as there); 256
        // threads as its shared array assumes (8 warps); grid-stride over the items.
        unsafe {
            self.gpu
                .launch("emb_bwd_long_accum", g, 256)
                .map_err(dev)?
                .arg(&ci)
                .arg(&p.seg)
                .arg(&p.vals)
                .arg(&p.bag_of)
                .arg(&grad)
                .arg(&stride)
                .arg(&col)
                .arg(&scale)
                .arg(&long_counters)
                .arg(&long_rows)
                .arg(&items)
                .arg(&acc)
                .go()
        }
        .map_err(dev)?;
        // SAFETY: launch contract: `emb_bwd_long_apply(float*, float*, i64, const u32* x3, const
        // float*, Opt, int, float*, float*)` gets (u64, u64, i64, u64 x3, u64, Opt, i32, u64, u64);
        // one warp per registered long run (at most max_long), its unique row from `Prep`; rg_* as
        // for `emb_bwd_short`; grid-stride.
        unsafe {
            self.gpu
                .launch("emb_bwd_long_apply", self.grid(max_long * 32), 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&state)
                .arg(&ci)
                .arg(&p.uniq)
                .arg(&long_counters)
                .arg(&long_rows)
                .arg(&acc)
                .arg(&o)
                .arg(&mode)
                .arg(&rg_grads)
                .arg(&rg_sq)
                .go()
        }
        .map_err(dev)
    }
}
