//! Embedding shards on the device: the optimizer as the kernels take it (`Opt`), the bag
//! checks, and the bodies of the `Backend` embedding operations (forward, fused backward +
//! update, row gradients, apply).
use super::*;

/// The optimizer as the kernels take it (layout of `struct Opt` in embedding.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(super) struct Opt {
    kind: i32,
    lr: f32,
    eps: f32,
    c: f32,
    eps_inside: i32,
    l2: f32,
    dim: f32,
}
// SAFETY: `#[repr(C)]` with only `i32` and `f32` fields, in the order and types of `struct Opt`
// in embedding.cu (same size and alignment, no padding, no pointers): its bytes are a valid
// value of the kernels' parameter.
unsafe impl cudarc::driver::DeviceRepr for Opt {}

impl Opt {
    fn new(u: &EmbUpdate, dim: usize) -> Opt {
        Opt {
            kind: match u.kind {
                EmbKind::Sgd => 0,
                EmbKind::RowWiseAdagrad => 1,
                EmbKind::Adagrad => 2,
            },
            lr: u.lr,
            eps: u.eps,
            c: u.c,
            eps_inside: u.eps_inside as i32,
            l2: u.l2,
            dim: dim as f32,
        }
    }
}

impl Cuda {
    /// Host checks of a bag set against a shard and the buffer it pools into or from.
    ///
    /// What the kernels also rely on and cannot re-check cheaply, the *bag invariant*: the
    /// offsets rise from 0 to `ids.len()` and every id is a local row of the shard (< `rows`).
    /// [`upload_bags`](crate::embedding::upload_bags) builds bags from a batch that passed
    /// `Batch::validate` (lengths sum to the ids, ids inside their table) after the step mapped
    /// the ids into the shard.
    fn check_bags(&self, rows: usize, cols: usize, bags: &Bags<Cuda>, buf_len: usize, layout: Layout, what: &str) -> Result<()> {
        let n = bags.num_bags;
        check(bags.offsets.len() == n + 1, || format!("{what}: {} offsets for {n} bags", bags.offsets.len()))?;
        if let Some(s) = &bags.scale {
            check(s.len() == n, || format!("{what}: {} scales for {n} bags", s.len()))?;
        }
        crate::backend::check_layout(what, n, cols, layout, buf_len)?;
        check(rows <= u32::MAX as usize && bags.ids.len() < u32::MAX as usize && n < u32::MAX as usize, || {
            format!("{what}: shard rows, ids and bags must each be < 2^32 on the GPU")
        })?;
        Ok(())
    }

    /// Body of `Backend::embedding_forward`.
    pub(super) fn embedding_forward_impl(&self, shard: &Shard<Cuda>, bags: &Bags<Cuda>, out: &mut DevBuf<f32>, layout: Layout, accumulate: bool) -> Result<()> {
        let cols = shard.spec.num_cols();
        crate::backend::check_shard_bufs("embedding_forward", &shard.spec, shard.weights.len(), None)?;
        self.check_bags(shard.spec.num_rows(), cols, bags, out.len(), layout, "embedding_forward")?;
        let n = bags.num_bags;
        if n == 0 || cols == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        let (w, ci, offs, ids) = (shard.weights.ptr(), cols as i64, bags.offsets.ptr(), bags.ids.ptr());
        let sc = bags.scale.as_ref().map_or(NULL, |s| s.ptr());
        let (op, stride, col, acc, nb) = (out.ptr(), layout.stride as i64, layout.col as i64, accumulate as i32, n as i64);
        if cols % 4 == 0 && layout.stride % 4 == 0 && layout.col % 4 == 0 {
            let tpb = (cols / 4).next_power_of_two().min(32) as i32;
            let g = Self::blocks(Self::size("embedding_forward", &[n, tpb as usize])?, 256)?;
            // SAFETY: launch contract (`Launch::go`): `emb_fwd_v4(const float*, i64, const u64*,
            // const u64*, const float*, float*, i64, i64, int, i64, int)` gets (u64, i64, u64, u64,
            // u64, u64, i64, i64, i32, i64, i32); W holds rows·cols floats (`check_shard_bufs`),
            // out num_bags rows of the layout (`check_bags`), scale num_bags floats or is null;
            // offsets and ids meet the bag invariant (`check_bags`); cols, stride and col are
            // multiples of 4 and pool blocks are 256-byte aligned, so the float4 accesses are
            // aligned; the grid covers num_bags·tpb threads.
            unsafe {
                self.gpu
                    .launch("emb_fwd_v4", g, 256)
                    .map_err(dev)?
                    .arg(&w)
                    .arg(&ci)
                    .arg(&offs)
                    .arg(&ids)
                    .arg(&sc)
                    .arg(&op)
                    .arg(&stride)
                    .arg(&col)
                    .arg(&acc)
                    .arg(&nb)
                    .arg(&tpb)
                    .go()
            }
            .map_err(dev)
        } else {
            let g = Self::blocks(Self::size("embedding_forward", &[n, cols])?, 256)?;
            // SAFETY: launch contract: `emb_fwd_scalar` takes the arguments of `emb_fwd_v4` but
            // `tpb`; the buffers are checked as there, with no alignment needed; the grid covers
            // num_bags·cols threads.
            unsafe {
                self.gpu
                    .launch("emb_fwd_scalar", g, 256)
                    .map_err(dev)?
                    .arg(&w)
                    .arg(&ci)
                    .arg(&offs)
                    .arg(&ids)
                    .arg(&sc)
                    .arg(&op)
                    .arg(&stride)
                    .arg(&col)
                    .arg(&acc)
                    .arg(&nb)
                    .go()
            }
            .map_err(dev)
        }
    }

    /// Body of `Backend::embedding_backward_update`.
    pub(super) fn embedding_backward_update_impl(&self, shard: &mut Shard<Cuda>, bags: &Bags<Cuda>, grad: &DevBuf<f32>, layout: Layout, upd: &EmbUpdate) -> Result<()> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        self.check_bags(rows, cols, bags, grad.len(), layout, "embedding_backward_update")?;
        crate::backend::check_shard_bufs("embedding_backward_update", &shard.spec, shard.weights.len(), Some((shard.state.len(), upd.state_per_row(cols))))?;
        check(upd.kind != EmbKind::RowWiseAdagrad || cols == shard.spec.dim, || {
            "embedding_backward_update: a column shard needs the two-phase update (row_grads, then apply with whole-row Σg²)".into()
        })?;
        check(cols <= MAX_BWD_COLS, || format!("embedding_backward_update: {cols} columns per shard; the GPU kernels take at most {MAX_BWD_COLS}"))?;
        if bags.ids.is_empty() || cols == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        let sc = bags.scale.as_ref().map_or(NULL, |s| s.ptr());
        let o = Opt::new(upd, shard.spec.dim);
        let r = if self.fast_bwd_ok(cols, layout) {
            self.backward_fast(bags, rows, shard.weights.ptr(), shard.state.ptr(), cols, grad.ptr(), layout, sc, o)
        } else {
            self.prepare(bags, rows).and_then(|p| self.run_update(&p, shard.weights.ptr(), shard.state.ptr(), cols, grad.ptr(), layout, sc, o, 0, NULL, NULL))
        };
        let d = self.done();
        r.and(d)
    }

    /// Body of `Backend::embedding_row_grads`.
    pub(super) fn embedding_row_grads_impl(&self, shard: &Shard<Cuda>, bags: &Bags<Cuda>, grad: &DevBuf<f32>, layout: Layout, upd: &EmbUpdate) -> Result<RowGrads<Cuda>> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        self.check_bags(rows, cols, bags, grad.len(), layout, "embedding_row_grads")?;
        crate::backend::check_shard_bufs("embedding_row_grads", &shard.spec, shard.weights.len(), None)?;
        check(cols <= MAX_BWD_COLS, || format!("embedding_row_grads: {cols} columns per shard; the GPU kernels take at most {MAX_BWD_COLS}"))?;
        let _g = self.lock()?;
        if bags.ids.is_empty() {
            let (r, g, s) = (self.gpu.alloc(0).map_err(dev)?, self.gpu.alloc(0).map_err(dev)?, self.gpu.alloc(0).map_err(dev)?);
            return Ok(RowGrads { rows: r, num_rows: 0, grads: g, sq: s });
        }
        let result: Result<RowGrads<Cuda>> = (|| {
            let p = self.prepare(bags, rows)?;
            let mut cnt = [0u32; 1];
            self.gpu.dtoh(&mut cnt, p.counters).map_err(dev)?;
            let nu = cnt[0] as usize;
            let out_rows: DevBuf<u64> = self.gpu.alloc(nu).map_err(dev)?;
            let grads: DevBuf<f32> = self.gpu.alloc(Self::size("embedding_row_grads", &[nu, cols])?).map_err(dev)?;
            let sq: DevBuf<f32> = self.gpu.alloc(nu).map_err(dev)?;
            let (u, c, o) = (p.uniq, p.counters, out_rows.ptr());
            // SAFETY: launch contract: `widen_u32(const u32*, const u32*, u64*)` gets (u64, u64,
            // u64); uniq holds n >= nu u32 (arena, `prepare`), counters[0] = nu and out_rows nu
            // u64; the grid covers nu.
            unsafe { self.gpu.launch("widen_u32", Self::blocks(nu, 256)?, 256).map_err(dev)?.arg(&u).arg(&c).arg(&o).go() }.map_err(dev)?;
            let sc = bags.scale.as_ref().map_or(NULL, |s| s.ptr());
            if cols > 0 {
                self.run_update(&p, shard.weights.ptr(), shard.state.ptr(), cols, grad.ptr(), layout, sc, Opt::new(upd, shard.spec.dim), 1, grads.ptr(), sq.ptr())?;
            } else {
                self.gpu.memset0(sq.ptr(), nu * 4).map_err(dev)?;
            }
            Ok(RowGrads { rows: out_rows, num_rows: nu, grads, sq })
        })();
        let d = self.done();
        let r = result?;
        d?;
        Ok(r)
    }

    /// Whether `rows[..n]` (device) are strictly ascending and below `limit`: a kernel flags
    /// the first violation, the flag comes back to the host. Uses the scratch arena.
    pub(super) fn check_rows(&self, what: &str, rows: &DevBuf<u64>, n: usize, limit: usize) -> Result<()> {
        let flag = self.scratch(8)?;
        self.gpu.memset0(flag, 8).map_err(dev)?;
        let (rp, ni, lim) = (rows.ptr(), n as i64, limit as u64);
        // SAFETY: launch contract: `check_rows_ascending(const u64*, i64, u64, u64*)` gets (u64,
        // i64, u64, u64); rows holds n = num_rows indices (checked by the caller), flag is 8 zeroed
        // bytes of arena; grid-stride.
        unsafe { self.gpu.launch("check_rows_ascending", Self::blocks(n, 256)?, 256).map_err(dev)?.arg(&rp).arg(&ni).arg(&lim).arg(&flag).go() }.map_err(dev)?;
        let mut bad = [0u64; 1];
        self.gpu.dtoh(&mut bad, flag).map_err(dev)?;
        if bad[0] != 0 {
            return Err(Error::Input(format!("{what}: row {} of {n} is not unique, ascending and inside the shard's {limit} rows", bad[0] - 1)));
        }
        Ok(())
    }

    /// Body of `Backend::embedding_apply`.
    pub(super) fn embedding_apply_impl(&self, shard: &mut Shard<Cuda>, rg: &RowGrads<Cuda>, row_sq: Option<&DevBuf<f32>>, upd: &EmbUpdate) -> Result<()> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        check(rg.rows.len() == rg.num_rows && Some(rg.grads.len()) == crate::backend::product(&[rg.num_rows, cols]) && rg.sq.len() == rg.num_rows, || {
            format!("embedding_apply: row grads of inconsistent sizes ({} rows)", rg.num_rows)
        })?;
        crate::backend::check_shard_bufs("embedding_apply", &shard.spec, shard.weights.len(), Some((shard.state.len(), upd.state_per_row(cols))))?;
        check(rg.num_rows <= rows, || format!("embedding_apply: {} row gradients for a shard of {rows} rows", rg.num_rows))?;
        if let Some(s) = row_sq {
            check(s.len() == rg.num_rows, || format!("embedding_apply: {} row sums for {} rows", s.len(), rg.num_rows))?;
        }
        check(cols <= MAX_BWD_COLS, || format!("embedding_apply: {cols} columns per shard; the GPU kernels take at most {MAX_BWD_COLS}"))?;
        if rg.num_rows == 0 || cols == 0 {
            return Ok(());
        }
        let _g = self.lock()?;
        // The rows are on the device: one pass checks them there (unique, ascending, inside the
        // shard) before any is written, as the CPU backend checks them on the host.
        let checked = self.check_rows("embedding_apply", &rg.rows, rg.num_rows, rows);
        let d = self.done();
        checked?;
        d?;
        let o = Opt::new(upd, shard.spec.dim);
        let (w, s, ci, r, nr, g, sq) = (shard.weights.ptr(), shard.state.ptr(), cols as i64, rg.rows.ptr(), rg.num_rows as i64, rg.grads.ptr(), rg.sq.ptr());
        let rsq = row_sq.map_or(NULL, |b| b.ptr());
        // SAFETY: launch contract: `emb_apply_rowgrads(float*, float*, i64, const u64*, i64, const
        // float* x3, Opt)` gets (u64, u64, i64, u64, i64, u64 x3, Opt, a `#[repr(C)]` copy of
        // `struct Opt`); the rows were just checked on the device to be unique, ascending and below
        // the shard's rows, W and state fit the shard (`check_shard_bufs`), grads hold
        // num_rows·cols floats, sq and row_sq (or null) num_rows; cols <= MAX_BWD_COLS, the
        // kernel's 16 columns per lane; warp per row, grid-stride.
        unsafe {
            self.gpu
                .launch("emb_apply_rowgrads", self.grid(Self::size("embedding_apply", &[rg.num_rows, 32])?), 256)
                .map_err(dev)?
                .arg(&w)
                .arg(&s)
                .arg(&ci)
                .arg(&r)
                .arg(&nr)
                .arg(&g)
                .arg(&sq)
                .arg(&rsq)
                .arg(&o)
                .go()
        }
        .map_err(dev)
    }
}
