//! Backend self-test: every operation of a backend against the CPU reference on random shapes,
//! the fused embedding update with each optimizer (short, long and very long runs of one row),
//! the two-phase column-shard update, and several steps of a small DLRM trained on both.
//!
//! Comparisons use ‖out − ref‖ / ‖ref‖ with f32 tolerances; outputs are poisoned with random
//! values first, so an element the backend failed to write shows up.
use crate::backend::{Act, Backend, Bags, Cpu, DenseUpdate, EmbKind, EmbUpdate, Gemm, Layout, Numerics, ShardSpec};
use crate::config::DenseOptimizer;
use crate::rng::Rng;
use crate::Result;

/// One comparison.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: String,
    pub rel_err: f64,
    pub tol: f64,
    pub ok: bool,
}

/// All comparisons of one run.
#[derive(Clone, Debug, Default)]
pub struct SelftestReport {
    pub backend: String,
    pub checks: Vec<Check>,
}

impl SelftestReport {
    pub fn failures(&self) -> usize {
        self.checks.iter().filter(|c| !c.ok).count()
    }
    pub fn passed(&self) -> bool {
        self.failures() == 0
    }
    pub(crate) fn push(&mut self, name: impl Into<String>, got: &[f32], want: &[f32], tol: f64) {
        let e = rel_err(got, want);
        self.checks.push(Check { name: name.into(), rel_err: e, tol, ok: e <= tol });
    }
    fn push_scalar(&mut self, name: impl Into<String>, got: f64, want: f64, tol: f64) {
        let e = if got.is_finite() && want.is_finite() { (got - want).abs() / want.abs().max(1e-30) } else { f64::INFINITY };
        self.checks.push(Check { name: name.into(), rel_err: e, tol, ok: e <= tol });
    }
}

impl std::fmt::Display for SelftestReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "| check ({} vs cpu) | rel. error | tolerance | result |", self.backend)?;
        writeln!(f, "|---|---|---|---|")?;
        for c in &self.checks {
            writeln!(f, "| {} | {:.2e} | {:.0e} | {} |", c.name, c.rel_err, c.tol, if c.ok { "ok" } else { "FAIL" })?;
        }
        write!(f, "{} passed, {} failed", self.checks.len() - self.failures(), self.failures())
    }
}

/// ‖a − b‖ / ‖b‖ (absolute when ‖b‖ = 0); infinite on NaN or a length mismatch.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() {
            return f64::INFINITY;
        }
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn randv(r: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.f32() * 2.0 - 1.0).collect()
}

/// Random bags: lengths in 0..=max_len; ids skewed: a fraction `hot` of all ids is row 0 or 1
/// (long runs), the rest uniform.
fn rand_bags(r: &mut Rng, num_bags: usize, max_len: usize, rows: usize, hot: f32) -> (Vec<u64>, Vec<u64>) {
    let mut offsets = vec![0u64];
    let mut ids = Vec::new();
    for _ in 0..num_bags {
        let l = r.below(max_len as u64 + 1) as usize;
        for _ in 0..l {
            let id = if r.f32() < hot { r.below(2.min(rows as u64)) } else { r.below(rows as u64) };
            ids.push(id);
        }
        offsets.push(ids.len() as u64);
    }
    (offsets, ids)
}

/// Run the self-test of `b` against the CPU backend (seed 1).
pub fn selftest<B: Backend>(b: &B) -> Result<SelftestReport> {
    selftest_seeded(b, 1)
}

pub fn selftest_seeded<B: Backend>(b: &B, seed: u64) -> Result<SelftestReport> {
    let c = Cpu::new();
    let mut rep = SelftestReport { backend: b.name().to_string(), checks: Vec::new() };
    let mut r = Rng::new(seed);
    dense_ops(b, &c, &mut r, &mut rep)?;
    embedding_ops(b, &c, &mut r, &mut rep)?;
    training(b, &c, &mut r, &mut rep)?;
    Ok(rep)
}

fn dense_ops<B: Backend>(b: &B, c: &Cpu, r: &mut Rng, rep: &mut SelftestReport) -> Result<()> {
    // GEMM, every transpose combination, with beta != 0.
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let (m, n, k) = (17 + r.below(60) as usize, 9 + r.below(70) as usize, 5 + r.below(90) as usize);
        let g = Gemm { m, n, k, trans_a: ta, trans_b: tb, alpha: 0.75, beta: 0.5 };
        let (a, bb, cc) = (randv(r, m * k), randv(r, k * n), randv(r, m * n));
        let mut gc = b.upload(&cc)?;
        b.gemm(g, &b.upload(&a)?, &b.upload(&bb)?, &mut gc)?;
        let mut rc = cc.clone();
        c.gemm(g, &a, &bb, &mut rc)?;
        rep.push(format!("gemm {m}x{n}x{k} ta={ta} tb={tb}"), &b.download(&gc)?, &rc, 1e-5);
    }
    let (rows, cols) = (300 + r.below(200) as usize, 1 + r.below(130) as usize);
    let x = randv(r, rows * cols);
    let bias = randv(r, cols);
    for act in [Act::None, Act::Relu] {
        let mut gx = b.upload(&x)?;
        b.bias_act(&mut gx, &b.upload(&bias)?, rows, cols, act)?;
        let mut cx = x.clone();
        c.bias_act(&mut cx, &bias, rows, cols, act)?;
        rep.push(format!("bias_act {act:?} {rows}x{cols}"), &b.download(&gx)?, &cx, 1e-6);
        let dy = randv(r, rows * cols);
        let mut gd = b.upload(&dy)?;
        b.act_backward(&gx, &mut gd, act)?;
        let mut cd = dy.clone();
        c.act_backward(&cx, &mut cd, act)?;
        rep.push(format!("act_backward {act:?}"), &b.download(&gd)?, &cd, 1e-6);
    }
    for beta in [0.0f32, 0.5] {
        let o = randv(r, cols);
        let mut go = b.upload(&o)?;
        b.col_sum(&b.upload(&x)?, rows, cols, beta, &mut go)?;
        let mut co = o.clone();
        c.col_sum(&x, rows, cols, beta, &mut co)?;
        rep.push(format!("col_sum beta={beta}"), &b.download(&go)?, &co, 1e-5);
    }
    {
        let stride = cols + 3 + r.below(20) as usize;
        let lay = Layout { stride, col: 2 };
        let (nar, wide) = (randv(r, rows * cols), randv(r, rows * stride));
        for to_wide in [true, false] {
            let (mut gn, mut gw) = (b.upload(&nar)?, b.upload(&wide)?);
            b.copy_block(&mut gn, &mut gw, rows, cols, lay, to_wide)?;
            let (mut cn, mut cw) = (nar.clone(), wide.clone());
            c.copy_block(&mut cn, &mut cw, rows, cols, lay, to_wide)?;
            rep.push(format!("copy_block to_wide={to_wide} (narrow)"), &b.download(&gn)?, &cn, 0.0);
            rep.push(format!("copy_block to_wide={to_wide} (wide)"), &b.download(&gw)?, &cw, 0.0);
        }
        let (xv, yv) = (randv(r, 1000), randv(r, 1000));
        let mut gy = b.upload(&yv)?;
        b.axpy(-0.3, &b.upload(&xv)?, &mut gy)?;
        b.scale(&mut gy, 1.0 / 3.0)?;
        let mut cy = yv.clone();
        c.axpy(-0.3, &xv, &mut cy)?;
        c.scale(&mut cy, 1.0 / 3.0)?;
        rep.push("axpy + scale (replica average)", &b.download(&gy)?, &cy, 1e-6);
    }
    {
        let (batch, f, d) = (33 + r.below(40) as usize, 1 + r.below(8) as usize, 4 + 4 * r.below(8) as usize);
        let w = d + (f + 1) * f / 2;
        let x = randv(r, batch * (f + 1) * d);
        let poison = randv(r, batch * w);
        let mut go = b.upload(&poison)?;
        b.dot_interaction(&b.upload(&x)?, batch, f, d, &mut go)?;
        let mut co = poison.clone();
        c.dot_interaction(&x, batch, f, d, &mut co)?;
        rep.push(format!("dot_interaction b={batch} f={f} d={d}"), &b.download(&go)?, &co, 1e-5);
        let dout = randv(r, batch * w);
        let poison = randv(r, batch * (f + 1) * d);
        let mut gdx = b.upload(&poison)?;
        b.dot_interaction_backward(&b.upload(&x)?, &b.upload(&dout)?, batch, f, d, &mut gdx)?;
        let mut cdx = poison.clone();
        c.dot_interaction_backward(&x, &dout, batch, f, d, &mut cdx)?;
        rep.push("dot_interaction_backward", &b.download(&gdx)?, &cdx, 1e-5);
    }
    {
        let n = rows * cols;
        let (x0, uv, xl, dout, dx0) = (randv(r, n), randv(r, n), randv(r, n), randv(r, n), randv(r, n));
        let poison = randv(r, n);
        let mut go = b.upload(&poison)?;
        b.cross_combine(&b.upload(&x0)?, &b.upload(&uv)?, &b.upload(&bias)?, &b.upload(&xl)?, rows, cols, &mut go)?;
        let mut co = poison.clone();
        c.cross_combine(&x0, &uv, &bias, &xl, rows, cols, &mut co)?;
        rep.push("cross_combine", &b.download(&go)?, &co, 1e-6);
        let (mut gduv, mut gdx0) = (b.upload(&poison)?, b.upload(&dx0)?);
        b.cross_combine_backward(&b.upload(&x0)?, &b.upload(&uv)?, &b.upload(&bias)?, &b.upload(&dout)?, rows, cols, &mut gduv, &mut gdx0)?;
        let (mut cduv, mut cdx0) = (poison.clone(), dx0.clone());
        c.cross_combine_backward(&x0, &uv, &bias, &dout, rows, cols, &mut cduv, &mut cdx0)?;
        rep.push("cross_combine_backward (duv)", &b.download(&gduv)?, &cduv, 1e-6);
        rep.push("cross_combine_backward (dx0)", &b.download(&gdx0)?, &cdx0, 1e-6);
    }
    {
        let n = 5000 + r.below(5000) as usize;
        let logits: Vec<f32> = randv(r, n).iter().map(|v| v * 8.0).collect();
        let labels: Vec<f32> = (0..n).map(|_| (r.f32() < 0.3) as u32 as f32).collect();
        let poison = randv(r, n);
        let mut gd = b.upload(&poison)?;
        let gl = b.bce_with_logits(&b.upload(&logits)?, &b.upload(&labels)?, 1.0 / n as f32, &mut gd)?;
        let mut cd = poison.clone();
        let cl = c.bce_with_logits(&logits, &labels, 1.0 / n as f32, &mut cd)?;
        rep.push_scalar(format!("bce_with_logits loss n={n}"), gl, cl, 1e-5);
        rep.push("bce_with_logits grad", &b.download(&gd)?, &cd, 1e-5);
    }
    for (name, opt, l2) in [
        ("sgd", DenseOptimizer::Sgd { lr: 0.1 }, 0.0),
        ("sgd l2", DenseOptimizer::Sgd { lr: 0.1 }, 0.01),
        ("adagrad l2", DenseOptimizer::Adagrad { lr: 0.05, eps: 1e-8 }, 0.01),
    ] {
        let n = 777;
        let upd = DenseUpdate { opt, l2 };
        let (p, s) = (randv(r, n), randv(r, n).iter().map(|v| v.abs()).collect::<Vec<_>>());
        let (mut gp, mut gs) = (b.upload(&p)?, b.upload(&s)?);
        let (mut cp, mut cs) = (p.clone(), s.clone());
        for _ in 0..3 {
            let g = randv(r, n);
            b.dense_update(&mut gp, &b.upload(&g)?, &mut gs, &upd)?;
            c.dense_update(&mut cp, &g, &mut cs, &upd)?;
        }
        rep.push(format!("dense_update {name} (param)"), &b.download(&gp)?, &cp, 1e-5);
        rep.push(format!("dense_update {name} (state)"), &b.download(&gs)?, &cs, 1e-5);
    }
    Ok(())
}

fn emb_update(kind: EmbKind, c: f32, eps_inside: bool, l2: f32) -> EmbUpdate {
    EmbUpdate { kind, lr: 0.05, eps: 1e-3, c, eps_inside, l2 }
}

fn embedding_ops<B: Backend>(b: &B, c: &Cpu, r: &mut Rng, rep: &mut SelftestReport) -> Result<()> {
    // Forward: vector and scalar paths, scale, accumulate, layout.
    for (rows, cols, nb, ml, hot, mean) in [(1000usize, 64usize, 257usize, 40usize, 0.0f32, false), (5000, 128, 1024, 20, 0.1, true), (300, 6, 100, 7, 0.0, false), (77, 4, 3000, 3, 0.5, true)] {
        let spec = ShardSpec::whole(0, rows as u64, cols);
        let w = randv(r, rows * cols);
        let upd = emb_update(EmbKind::Sgd, 1.0, false, 0.0);
        let gs = b.shard(spec.clone(), &w, &upd)?;
        let cs = c.shard(spec.clone(), &w, &upd)?;
        let (off, ids) = rand_bags(r, nb, ml, rows, hot);
        let scale: Option<Vec<f32>> = mean.then(|| (0..nb).map(|i| 1.0 / ((off[i + 1] - off[i]).max(1) as f32)).collect());
        let gb = Bags { num_bags: nb, offsets: b.upload_ids(&off)?, ids: b.upload_ids(&ids)?, scale: scale.as_ref().map(|s| b.upload(s)).transpose()? };
        let cb = Bags { num_bags: nb, offsets: off.clone(), ids: ids.clone(), scale: scale.clone() };
        let lay = Layout { stride: cols * 3 + 4, col: cols + 4 };
        let poison = randv(r, nb * lay.stride);
        for acc in [false, true] {
            let mut go = b.upload(&poison)?;
            b.embedding_forward(&gs, &gb, &mut go, lay, acc)?;
            let mut co = poison.clone();
            c.embedding_forward(&cs, &cb, &mut co, lay, acc)?;
            rep.push(format!("embedding_forward rows={rows} D={cols} bags={nb} mean={mean} acc={acc}"), &b.download(&go)?, &co, 1e-5);
        }
    }
    // Fused backward + optimizer: every optimizer; skewed ids give runs > 32 and > 1024.
    let cases = [
        ("sgd", emb_update(EmbKind::Sgd, 1.0, false, 0.0)),
        ("row-wise adagrad c=1", emb_update(EmbKind::RowWiseAdagrad, 1.0, false, 0.0)),
        ("row-wise adagrad c=4 eps-inside", emb_update(EmbKind::RowWiseAdagrad, 4.0, true, 0.0)),
        ("row-wise adagrad c=2 l2", emb_update(EmbKind::RowWiseAdagrad, 2.0, false, 0.01)),
        ("adagrad c=2", emb_update(EmbKind::Adagrad, 2.0, false, 0.0)),
        ("adagrad eps-inside l2", emb_update(EmbKind::Adagrad, 1.0, true, 0.01)),
    ];
    for (name, upd) in cases {
        for (rows, cols, nb, ml, hot) in [(2000usize, 64usize, 4096usize, 20usize, 0.1f32), (50_000, 16, 300, 5, 0.0), (100, 12, 500, 8, 0.3), (3000, 128, 1024, 20, 0.05), (500, 256, 512, 10, 0.2), (700, 10, 600, 6, 0.2)] {
            let spec = ShardSpec::whole(0, rows as u64, cols);
            let w = randv(r, rows * cols);
            let mut gs = b.shard(spec.clone(), &w, &upd)?;
            let mut cs = c.shard(spec.clone(), &w, &upd)?;
            let lay = Layout { stride: cols + 8, col: 4 };
            for _step in 0..2 {
                let (off, ids) = rand_bags(r, nb, ml, rows, hot);
                let grad = randv(r, nb * lay.stride);
                let scale: Vec<f32> = (0..nb).map(|_| 0.5 + r.f32()).collect();
                let gb = Bags { num_bags: nb, offsets: b.upload_ids(&off)?, ids: b.upload_ids(&ids)?, scale: Some(b.upload(&scale)?) };
                let cb = Bags { num_bags: nb, offsets: off, ids, scale: Some(scale) };
                b.embedding_backward_update(&mut gs, &gb, &b.upload(&grad)?, lay, &upd)?;
                c.embedding_backward_update(&mut cs, &cb, &grad, lay, &upd)?;
            }
            rep.push(format!("fused backward {name} rows={rows} D={cols} (weights)"), &b.download(&gs.weights)?, &cs.weights, 1e-5);
            if upd.kind != EmbKind::Sgd {
                rep.push(format!("fused backward {name} rows={rows} D={cols} (state)"), &b.download(&gs.state)?, &cs.state, 1e-5);
            }
        }
    }
    // Column shards: row grads on two halves, whole-row Σg² combined, then apply.
    for (name, upd) in [("row-wise adagrad", emb_update(EmbKind::RowWiseAdagrad, 1.0, false, 0.01)), ("adagrad", emb_update(EmbKind::Adagrad, 2.0, false, 0.0))] {
        let (rows, dim, nb) = (3000usize, 32usize, 2048usize);
        let halves = [0..12usize, 12..32];
        let (off, ids) = rand_bags(r, nb, 20, rows, 0.05);
        let lay = Layout { stride: dim, col: 0 };
        let grad = randv(r, nb * dim);
        let mut gsh = Vec::new();
        let mut csh = Vec::new();
        for h in &halves {
            let spec = ShardSpec { table: 0, table_rows: rows as u64, dim, rows: 0..rows as u64, cols: h.clone() };
            let w = randv(r, rows * h.len());
            gsh.push(b.shard(spec.clone(), &w, &upd)?);
            csh.push(c.shard(spec, &w, &upd)?);
        }
        let gb = Bags { num_bags: nb, offsets: b.upload_ids(&off)?, ids: b.upload_ids(&ids)?, scale: None };
        let cb = Bags { num_bags: nb, offsets: off, ids, scale: None };
        let mut grg = Vec::new();
        let mut crg = Vec::new();
        for (i, h) in halves.iter().enumerate() {
            let l = Layout { stride: lay.stride, col: h.start };
            grg.push(b.embedding_row_grads(&gsh[i], &gb, &b.upload(&grad)?, l, &upd)?);
            crg.push(c.embedding_row_grads(&csh[i], &cb, &grad, l, &upd)?);
        }
        rep.push(format!("row_grads {name} (rows)"), &b.download_ids(&grg[0].rows)?.iter().map(|&x| x as f32).collect::<Vec<_>>(), &crg[0].rows.iter().map(|&x| x as f32).collect::<Vec<_>>(), 0.0);
        rep.push(format!("row_grads {name} (grads)"), &b.download(&grg[1].grads)?, &crg[1].grads, 1e-5);
        rep.push(format!("row_grads {name} (sq)"), &b.download(&grg[0].sq)?, &crg[0].sq, 1e-5);
        let mut gsq = b.upload(&b.download(&grg[0].sq)?)?;
        b.axpy(1.0, &grg[1].sq, &mut gsq)?;
        let mut csq = crg[0].sq.clone();
        c.axpy(1.0, &crg[1].sq, &mut csq)?;
        for i in 0..2 {
            b.embedding_apply(&mut gsh[i], &grg[i], Some(&gsq), &upd)?;
            c.embedding_apply(&mut csh[i], &crg[i], Some(&csq), &upd)?;
            rep.push(format!("embedding_apply {name} column shard {i} (weights)"), &b.download(&gsh[i].weights)?, &csh[i].weights, 1e-5);
            rep.push(format!("embedding_apply {name} column shard {i} (state)"), &b.download(&gsh[i].state)?, &csh[i].state, 1e-5);
        }
    }
    Ok(())
}

/// A small DLRM on the backend: bottom layer, pooled bags written into the interaction input,
/// dot interaction, top layer, BCE; backward through all of it; fused embedding updates; dense
/// AdaGrad. Several steps, compared with the CPU step for step.
fn training<B: Backend>(b: &B, c: &Cpu, r: &mut Rng, rep: &mut SelftestReport) -> Result<()> {
    let (batch, dense_in, d, f, rows) = (512usize, 13usize, 16usize, 4usize, 4000usize);
    let w_in = d + (f + 1) * f / 2;
    let upd = emb_update(EmbKind::RowWiseAdagrad, 2.0, false, 0.0);
    let dupd = DenseUpdate { opt: DenseOptimizer::Adagrad { lr: 0.05, eps: 1e-8 }, l2: 0.0 };
    let w1 = randv(r, dense_in * d).iter().map(|v| v * 0.3).collect::<Vec<_>>();
    let b1 = randv(r, d);
    let w2 = randv(r, w_in).iter().map(|v| v * 0.3).collect::<Vec<_>>();
    let b2 = randv(r, 1);
    struct Side<X> {
        w1: X,
        b1: X,
        w2: X,
        b2: X,
        s: [X; 4],
    }
    fn side<K: Backend>(k: &K, w1: &[f32], b1: &[f32], w2: &[f32], b2: &[f32]) -> Result<Side<K::Buf>> {
        Ok(Side {
            w1: k.upload(w1)?,
            b1: k.upload(b1)?,
            w2: k.upload(w2)?,
            b2: k.upload(b2)?,
            s: [k.zeros(w1.len())?, k.zeros(b1.len())?, k.zeros(w2.len())?, k.zeros(b2.len())?],
        })
    }
    let mut gside = side(b, &w1, &b1, &w2, &b2)?;
    let mut cside = side(c, &w1, &b1, &w2, &b2)?;
    let mut gsh = Vec::new();
    let mut csh = Vec::new();
    for t in 0..f {
        let spec = ShardSpec::whole(t, rows as u64, d);
        let w = randv(r, rows * d).iter().map(|v| v * 0.1).collect::<Vec<_>>();
        gsh.push(b.shard(spec.clone(), &w, &upd)?);
        csh.push(c.shard(spec, &w, &upd)?);
    }
    #[allow(clippy::too_many_arguments)]
    fn step<K: Backend>(
        k: &K,
        s: &mut Side<K::Buf>,
        shards: &mut [crate::backend::Shard<K>],
        xd: &[f32],
        labels: &[f32],
        bags: &[(Vec<u64>, Vec<u64>)],
        dims: (usize, usize, usize, usize),
        upd: &EmbUpdate,
        dupd: &DenseUpdate,
    ) -> Result<f64> {
        let (batch, dense_in, d, f) = dims;
        let w_in = d + (f + 1) * f / 2;
        let xs = (f + 1) * d;
        let x = k.upload(xd)?;
        let mut h = k.zeros(batch * d)?;
        k.gemm(Gemm { m: batch, n: d, k: dense_in, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }, &x, &s.w1, &mut h)?;
        k.bias_act(&mut h, &s.b1, batch, d, Act::Relu)?;
        let mut inter = k.zeros(batch * xs)?;
        k.copy_block(&mut h, &mut inter, batch, d, Layout { stride: xs, col: 0 }, true)?;
        let kb: Vec<Bags<K>> = bags
            .iter()
            .map(|(o, i)| Ok(Bags { num_bags: batch, offsets: k.upload_ids(o)?, ids: k.upload_ids(i)?, scale: None }))
            .collect::<Result<_>>()?;
        for t in 0..f {
            k.embedding_forward(&shards[t], &kb[t], &mut inter, Layout { stride: xs, col: (t + 1) * d }, false)?;
        }
        let mut z = k.zeros(batch * w_in)?;
        k.dot_interaction(&inter, batch, f, d, &mut z)?;
        let mut logit = k.zeros(batch)?;
        k.gemm(Gemm { m: batch, n: 1, k: w_in, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }, &z, &s.w2, &mut logit)?;
        k.bias_act(&mut logit, &s.b2, batch, 1, Act::None)?;
        let y = k.upload(labels)?;
        let mut dl = k.zeros(batch)?;
        let loss = k.bce_with_logits(&logit, &y, 1.0 / batch as f32, &mut dl)?;
        // backward
        let mut gw2 = k.zeros(w_in)?;
        k.gemm(Gemm { m: w_in, n: 1, k: batch, trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 }, &z, &dl, &mut gw2)?;
        let mut gb2 = k.zeros(1)?;
        k.col_sum(&dl, batch, 1, 0.0, &mut gb2)?;
        let mut dz = k.zeros(batch * w_in)?;
        k.gemm(Gemm { m: batch, n: w_in, k: 1, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 }, &dl, &s.w2, &mut dz)?;
        let mut dinter = k.zeros(batch * xs)?;
        k.dot_interaction_backward(&inter, &dz, batch, f, d, &mut dinter)?;
        for t in 0..f {
            k.embedding_backward_update(&mut shards[t], &kb[t], &dinter, Layout { stride: xs, col: (t + 1) * d }, upd)?;
        }
        let mut dh = k.zeros(batch * d)?;
        k.copy_block(&mut dh, &mut dinter, batch, d, Layout { stride: xs, col: 0 }, false)?;
        k.act_backward(&h, &mut dh, Act::Relu)?;
        let mut gw1 = k.zeros(dense_in * d)?;
        k.gemm(Gemm { m: dense_in, n: d, k: batch, trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 }, &x, &dh, &mut gw1)?;
        let mut gb1 = k.zeros(d)?;
        k.col_sum(&dh, batch, d, 0.0, &mut gb1)?;
        let [s0, s1, s2, s3] = &mut s.s;
        k.dense_update(&mut s.w1, &gw1, s0, dupd)?;
        k.dense_update(&mut s.b1, &gb1, s1, dupd)?;
        k.dense_update(&mut s.w2, &gw2, s2, dupd)?;
        k.dense_update(&mut s.b2, &gb2, s3, dupd)?;
        k.synchronize()?;
        Ok(loss)
    }
    let dims = (batch, dense_in, d, f);
    for st in 0..5 {
        let xd = randv(r, batch * dense_in);
        let labels: Vec<f32> = (0..batch).map(|_| (r.f32() < 0.25) as u32 as f32).collect();
        let bags: Vec<_> = (0..f).map(|_| rand_bags(r, batch, 10, rows, 0.05)).collect();
        let gl = step(b, &mut gside, &mut gsh, &xd, &labels, &bags, dims, &upd, &dupd)?;
        let cl = step(c, &mut cside, &mut csh, &xd, &labels, &bags, dims, &upd, &dupd)?;
        rep.push_scalar(format!("training step {st}: loss"), gl, cl, 1e-4);
    }
    rep.push("training: top weights after 5 steps", &b.download(&gside.w2)?, &cside.w2, 1e-4);
    rep.push("training: bottom weights after 5 steps", &b.download(&gside.w1)?, &cside.w1, 1e-4);
    for t in 0..f {
        rep.push(format!("training: table {t} after 5 steps"), &b.download(&gsh[t].weights)?, &csh[t].weights, 1e-4);
        rep.push(format!("training: table {t} state"), &b.download(&gsh[t].state)?, &csh[t].state, 1e-4);
    }
    Ok(())
}

#[cfg(test)]
mod tests;
