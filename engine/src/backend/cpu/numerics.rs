//! `Numerics` for the CPU backend: the dense network's math (GEMM through the `gemm` crate,
//! activations, interactions, the loss, the dense optimizer) and the embedding operations over
//! the building blocks in `embedding`.
use super::embedding::*;
use super::{check, Cpu};
use crate::backend::*;
use crate::Result;
use rayon::prelude::*;

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
            // A select, stored unconditionally: it vectorizes (a conditional store does not).
            dy.par_chunks_mut(4096).zip(y.par_chunks(4096)).for_each(|(d, y)| {
                d.iter_mut().zip(y).for_each(|(d, &y)| *d = if y <= 0.0 { 0.0 } else { *d })
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
        self.forward_on(&shard.spec, &shard.weights, BagsRef::from(bags), out, layout, accumulate)
    }

    fn embedding_backward_update(&self, shard: &mut Shard<Cpu>, bags: &Bags<Cpu>, grad: &Vec<f32>, layout: Layout, upd: &EmbUpdate) -> Result<()> {
        self.backward_update_on(shard, BagsRef::from(bags), grad, layout, upd)
    }

    fn embedding_row_grads(&self, shard: &Shard<Cpu>, bags: &Bags<Cpu>, grad: &Vec<f32>, layout: Layout, upd: &EmbUpdate) -> Result<RowGrads<Cpu>> {
        self.row_grads_on(&shard.spec, &shard.weights, BagsRef::from(bags), grad, layout, upd)
    }

    fn embedding_apply(&self, shard: &mut Shard<Cpu>, rg: &RowGrads<Cpu>, row_sq: Option<&Vec<f32>>, upd: &EmbUpdate) -> Result<()> {
        self.apply_on(shard, &rg.rows, rg.num_rows, &rg.grads, &rg.sq, row_sq.map(|v| &v[..]), upd)
    }
}

/// The embedding operations on host slices: the `Numerics` methods above call them on the CPU's
/// own buffers, and the emulated device backend on the host memory under its opaque buffers.
impl Cpu {
    pub(crate) fn forward_on(&self, spec: &ShardSpec, w: &[f32], bags: BagsRef<'_>, out: &mut [f32], layout: Layout, accumulate: bool) -> Result<()> {
        let cols = spec.num_cols();
        let rows = spec.num_rows();
        super::check_shard_bufs("embedding_forward", spec, w.len(), None)?;
        check_bags(rows, cols, bags, out.len(), layout, "embedding_forward")?;
        let n = bags.num_bags;
        if n == 0 {
            return Ok(());
        }
        let (off, ids) = (bags.offsets, bags.ids);
        let scale = bags.scale;
        // One output row per bag; the last row of `out` may be shorter than the stride.
        let body = &mut out[..(n - 1) * layout.stride + layout.col + cols];
        // Contiguous runs of bags per task (a few per thread, for balance): each task streams
        // through its own ids, prefetching rows a fixed number of ids ahead across its bags.
        let per = n.div_ceil(4 * rayon::current_num_threads()).max(16);
        body.par_chunks_mut(per * layout.stride).enumerate().for_each(|(c, orows)| {
            let b0 = c * per;
            let b1 = (b0 + per).min(n);
            let base = off[b0] as usize;
            let run = &ids[base..off[b1] as usize];
            GatherTask { w, cols, off, run, base, b0, b1, scale, stride: layout.stride, col: layout.col, accumulate, ahead: GATHER_AHEAD }.run(orows);
        });
        Ok(())
    }

    pub(crate) fn backward_update_on(&self, shard: &mut Shard<Cpu>, bags: BagsRef<'_>, grad: &[f32], layout: Layout, upd: &EmbUpdate) -> Result<()> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        check_bags(rows, cols, bags, grad.len(), layout, "embedding_backward_update")?;
        check(shard.state.len() == rows * upd.state_per_row(cols), || {
            format!("embedding_backward_update: state of {} floats for {rows} rows and {:?}", shard.state.len(), upd.kind)
        })?;
        check(upd.kind != EmbKind::RowWiseAdagrad || cols == shard.spec.dim, || {
            "embedding_backward_update: a column shard needs the two-phase update (row_grads, then apply with whole-row Σg²)".into()
        })?;
        let d = dedup(bags.offsets, bags.ids, rows);
        let scale = bags.scale;
        let prefetch_grads = |u: usize| {
            let gp = grad.as_ptr().wrapping_add(layout.col);
            for &bag in &d.bags[d.starts[u]..d.starts[u + 1]] {
                prefetch_span(gp.wrapping_add(bag as usize * layout.stride), cols);
            }
        };
        self.update_rows(shard, &d.rows, upd, RowSq::FromGrad, prefetch_grads, |u, g, w| {
            row_grad(g, &d.bags[d.starts[u]..d.starts[u + 1]], grad, layout, scale, upd.l2, w);
        })
    }

    pub(crate) fn row_grads_on(&self, spec: &ShardSpec, weights: &[f32], bags: BagsRef<'_>, grad: &[f32], layout: Layout, upd: &EmbUpdate) -> Result<RowGrads<Cpu>> {
        let cols = spec.num_cols();
        let rows = spec.num_rows();
        super::check_shard_bufs("embedding_row_grads", spec, weights.len(), None)?;
        check_bags(rows, cols, bags, grad.len(), layout, "embedding_row_grads")?;
        let d = dedup(bags.offsets, bags.ids, rows);
        let nu = d.rows.len();
        let mut grads = vec![0.0f32; nu * cols];
        let mut sq = vec![0.0f32; nu];
        let scale = bags.scale;
        grads.par_chunks_mut(cols.max(1)).zip(sq.par_iter_mut()).enumerate().for_each(|(u, (g, s))| {
            let row = d.rows[u] as usize;
            row_grad(g, &d.bags[d.starts[u]..d.starts[u + 1]], grad, layout, scale, upd.l2, &weights[row * cols..(row + 1) * cols]);
            *s = g.iter().map(|x| x * x).sum();
        });
        Ok(RowGrads { rows: d.rows, num_rows: nu, grads, sq })
    }

    /// `embedding_apply` on row gradients given as host slices (`RowGrads`' fields).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn apply_on(&self, shard: &mut Shard<Cpu>, rg_rows: &[u64], num_rows: usize, grads: &[f32], own_sq: &[f32], row_sq: Option<&[f32]>, upd: &EmbUpdate) -> Result<()> {
        let cols = shard.spec.num_cols();
        let rows = shard.spec.num_rows();
        check(rg_rows.len() == num_rows && grads.len() == num_rows * cols && own_sq.len() == num_rows, || {
            format!("embedding_apply: row grads of inconsistent sizes ({num_rows} rows)")
        })?;
        check(rg_rows.windows(2).all(|w| w[0] < w[1]) && rg_rows.last().map_or(true, |&r| (r as usize) < rows), || {
            "embedding_apply: rows must be unique, ascending and inside the shard".into()
        })?;
        check(shard.state.len() == rows * upd.state_per_row(cols), || "embedding_apply: state size does not match the optimizer".into())?;
        let sq = row_sq.unwrap_or(own_sq);
        check(sq.len() == num_rows, || format!("embedding_apply: {} row sums for {num_rows} rows", sq.len()))?;
        self.update_rows(shard, rg_rows, upd, RowSq::Given(sq), |_| {}, |u, g, _w| {
            g.copy_from_slice(&grads[u * cols..(u + 1) * cols]);
        })
    }
}
