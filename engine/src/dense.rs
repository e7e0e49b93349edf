//! The dense part of the DLRM: bottom MLP, feature interaction (DLRM dot or DCNv2 cross
//! layers), top MLP and the BCE loss — forward and backward, with every activation buffer
//! allocated once per batch size (nothing is allocated inside a steady-state step).
//!
//! The pooled embeddings meet the dense network in one "wide" matrix of shape
//! (batch × (F+1)·D): column block 0 holds the bottom-MLP output, block t+1 the pooled vectors
//! of table t. The embedding collection writes its blocks there (a `Layout`), and reads its
//! gradients back from the same place in `dwide()` after `backward`.
use crate::backend::{Act, Backend, DenseUpdate, Gemm, Layout};
use crate::config::{Interaction, ModelConfig};
use crate::rng::{hash3, unit_f32};
use crate::Result;

/// A dense tensor with its gradient and optimizer state.
pub struct Param<B: Backend> {
    pub w: B::Buf,
    pub g: B::Buf,
    pub s: B::Buf,
}

impl<B: Backend> Param<B> {
    fn new(b: &B, init: &[f32]) -> Result<Self> {
        Ok(Param { w: b.upload(init)?, g: b.zeros(init.len())?, s: b.zeros(init.len())? })
    }
}

/// Uniform(±bound) values seeded by (seed, tensor id, element).
fn init_uniform(seed: u64, id: u64, n: usize, bound: f32) -> Vec<f32> {
    (0..n).map(|i| (2.0 * unit_f32(hash3(seed, 0xD15E_u64 + id, i as u64, 7)) - 1.0) * bound).collect()
}

/// y = act(x · Wᵀ + b), W (out × in).
pub struct Linear<B: Backend> {
    pub w: Param<B>,
    pub b: Param<B>,
    pub fan_in: usize,
    pub fan_out: usize,
    pub act: Act,
}

impl<B: Backend> Linear<B> {
    fn new(b: &B, seed: u64, id: u64, fan_in: usize, fan_out: usize, act: Act) -> Result<Self> {
        let wb = (6.0 / (fan_in + fan_out) as f32).sqrt();
        let bb = 1.0 / (fan_out as f32).sqrt();
        Ok(Linear {
            w: Param::new(b, &init_uniform(seed, 2 * id, fan_in * fan_out, wb))?,
            b: Param::new(b, &init_uniform(seed, 2 * id + 1, fan_out, bb))?,
            fan_in,
            fan_out,
            act,
        })
    }

    fn forward(&self, be: &B, x: &B::Buf, batch: usize, y: &mut B::Buf) -> Result<()> {
        let g = Gemm { m: batch, n: self.fan_out, k: self.fan_in, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 };
        be.gemm(g, x, &self.w.w, y)?;
        be.bias_act(y, &self.b.w, batch, self.fan_out, self.act)
    }

    /// `dy` holds dL/dy on entry (it is overwritten by dL/d(pre-activation)); writes dL/dx
    /// into `dx` when given. Parameter gradients are overwritten (not accumulated).
    fn backward(&mut self, be: &B, x: &B::Buf, y: &B::Buf, dy: &mut B::Buf, dx: Option<&mut B::Buf>, batch: usize) -> Result<()> {
        be.act_backward(y, dy, self.act)?;
        let gw = Gemm { m: self.fan_out, n: self.fan_in, k: batch, trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 };
        be.gemm(gw, dy, x, &mut self.w.g)?;
        be.col_sum(dy, batch, self.fan_out, 0.0, &mut self.b.g)?;
        if let Some(dx) = dx {
            let gx = Gemm { m: batch, n: self.fan_in, k: self.fan_out, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 };
            be.gemm(gx, dy, &self.w.w, dx)?;
        }
        Ok(())
    }
}

/// One DCNv2 low-rank cross layer: x_{l+1} = x0 ⊙ (U (V x_l) + bias) + x_l.
pub struct Cross<B: Backend> {
    /// (rank × width)
    pub v: Param<B>,
    /// (width × rank)
    pub u: Param<B>,
    /// (width)
    pub bias: Param<B>,
}

/// Activation and gradient buffers for one batch size.
struct Acts<B: Backend> {
    batch: usize,
    bottom: Vec<B::Buf>,
    dbottom: Vec<B::Buf>,
    wide: B::Buf,
    dwide: B::Buf,
    /// Dot interaction output, or unused for DCN.
    z: B::Buf,
    /// Gradient w.r.t. the top-MLP input (for DCN: the running gradient of x_l).
    dz: B::Buf,
    cross_x: Vec<B::Buf>,
    cross_t: Vec<B::Buf>,
    cross_uv: Vec<B::Buf>,
    dt: B::Buf,
    duv: B::Buf,
    dx0: B::Buf,
    top: Vec<B::Buf>,
    dtop: Vec<B::Buf>,
    labels: B::Buf,
}

/// Bottom MLP → interaction → top MLP → logit.
pub struct DenseNet<B: Backend> {
    pub bottom: Vec<Linear<B>>,
    pub cross: Vec<Cross<B>>,
    pub top: Vec<Linear<B>>,
    pub num_dense: usize,
    pub f: usize,
    pub d: usize,
    pub interaction: Interaction,
    acts: Option<Acts<B>>,
}

impl<B: Backend> DenseNet<B> {
    /// A freshly initialised network; parameters depend only on (seed, config).
    pub fn new(be: &B, cfg: &ModelConfig, seed: u64) -> Result<Self> {
        let seed = seed ^ 0xDE45_E000;
        let mut id = 0u64;
        let mut mlp = |input: usize, widths: &[usize], last_act: Act| -> Result<Vec<Linear<B>>> {
            let mut layers = Vec::new();
            let mut fin = input;
            for (i, &w) in widths.iter().enumerate() {
                let act = if i + 1 == widths.len() { last_act } else { Act::Relu };
                layers.push(Linear::new(be, seed, id, fin, w, act)?);
                id += 1;
                fin = w;
            }
            Ok(layers)
        };
        let bottom = mlp(cfg.num_dense, &cfg.bottom_mlp, Act::Relu)?;
        let top = mlp(cfg.interaction_width(), &cfg.top_mlp, Act::None)?;
        let (f, d) = (cfg.num_tables(), cfg.dim());
        let width = (f + 1) * d;
        let mut cross = Vec::new();
        if let Interaction::Dcn { layers, rank } = cfg.interaction {
            let bound = (6.0 / (width + rank) as f32).sqrt();
            for l in 0..layers as u64 {
                cross.push(Cross {
                    v: Param::new(be, &init_uniform(seed, 1000 + 3 * l, rank * width, bound))?,
                    u: Param::new(be, &init_uniform(seed, 1001 + 3 * l, width * rank, bound))?,
                    bias: Param::new(be, &vec![0.0; width])?,
                });
            }
        }
        Ok(DenseNet { bottom, cross, top, num_dense: cfg.num_dense, f, d, interaction: cfg.interaction, acts: None })
    }

    /// Width of the wide matrix: (F+1)·D.
    pub fn wide_cols(&self) -> usize {
        (self.f + 1) * self.d
    }

    /// Where table `t`'s pooled vectors go in the wide matrix.
    pub fn table_layout(&self, t: usize) -> Layout {
        Layout { stride: self.wide_cols(), col: (t + 1) * self.d }
    }

    fn rank(&self) -> usize {
        match self.interaction {
            Interaction::Dcn { rank, .. } => rank,
            Interaction::Dot => 0,
        }
    }

    /// Allocate activation buffers for `batch` samples (once per batch size).
    pub fn ensure_batch(&mut self, be: &B, batch: usize) -> Result<()> {
        if self.acts.as_ref().map(|a| a.batch) == Some(batch) {
            return Ok(());
        }
        self.acts = None; // free the old buffers first
        let width = self.wide_cols();
        let zw = match self.interaction {
            Interaction::Dot => self.d + (self.f + 1) * self.f / 2,
            Interaction::Dcn { .. } => width,
        };
        let bufs = |widths: &mut dyn Iterator<Item = usize>| -> Result<Vec<B::Buf>> { widths.map(|w| be.zeros(batch * w)).collect() };
        let nc = self.cross.len();
        let r = self.rank();
        self.acts = Some(Acts {
            batch,
            bottom: bufs(&mut self.bottom.iter().map(|l| l.fan_out))?,
            dbottom: bufs(&mut self.bottom.iter().map(|l| l.fan_out))?,
            wide: be.zeros(batch * width)?,
            dwide: be.zeros(batch * width)?,
            z: be.zeros(if nc == 0 { batch * zw } else { 0 })?,
            dz: be.zeros(batch * zw)?,
            cross_x: bufs(&mut (0..nc).map(|_| width))?,
            cross_t: bufs(&mut (0..nc).map(|_| r))?,
            cross_uv: bufs(&mut (0..nc).map(|_| width))?,
            dt: be.zeros(if nc > 0 { batch * r } else { 0 })?,
            duv: be.zeros(if nc > 0 { batch * width } else { 0 })?,
            dx0: be.zeros(if nc > 0 { batch * width } else { 0 })?,
            top: bufs(&mut self.top.iter().map(|l| l.fan_out))?,
            dtop: bufs(&mut self.top.iter().map(|l| l.fan_out))?,
            labels: be.zeros(batch)?,
        });
        Ok(())
    }

    fn acts(&mut self) -> &mut Acts<B> {
        self.acts.as_mut().expect("ensure_batch before use")
    }

    /// The wide matrix the embeddings are written into before `forward`.
    pub fn wide_mut(&mut self) -> &mut B::Buf {
        &mut self.acts().wide
    }

    /// Gradient of the wide matrix, valid after `backward`.
    pub fn dwide(&self) -> &B::Buf {
        let a = self.acts.as_ref().expect("ensure_batch before use");
        if self.cross.is_empty() {
            &a.dwide
        } else {
            &a.dz
        }
    }

    /// The logits (batch), valid after `forward`.
    pub fn logits(&self) -> &B::Buf {
        self.acts.as_ref().expect("ensure_batch before use").top.last().expect("top MLP has layers")
    }

    /// Bottom MLP on the dense features (batch × num_dense), its output into wide block 0.
    pub fn forward_bottom(&mut self, be: &B, dense_x: &B::Buf) -> Result<()> {
        let (d, stride) = (self.d, self.wide_cols());
        let a = self.acts.as_mut().expect("ensure_batch before use");
        let n = a.batch;
        for (i, l) in self.bottom.iter().enumerate() {
            let (prev, rest) = a.bottom.split_at_mut(i);
            l.forward(be, if i == 0 { dense_x } else { &prev[i - 1] }, n, &mut rest[0])?;
        }
        let last = a.bottom.last_mut().expect("bottom MLP has layers");
        be.copy_block(last, &mut a.wide, n, d, Layout { stride, col: 0 }, true)
    }

    /// Interaction and top MLP on a filled wide matrix; the logits are then in `logits()`.
    pub fn forward_top(&mut self, be: &B) -> Result<()> {
        let (f, d, width) = (self.f, self.d, self.wide_cols());
        let r = self.rank();
        let a = self.acts.as_mut().expect("ensure_batch before use");
        let n = a.batch;
        if self.cross.is_empty() {
            be.dot_interaction(&a.wide, n, f, d, &mut a.z)?;
        } else {
            for (l, c) in self.cross.iter().enumerate() {
                let xl = if l == 0 { &a.wide } else { &a.cross_x[l - 1] };
                be.gemm(Gemm { m: n, n: r, k: width, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 }, xl, &c.v.w, &mut a.cross_t[l])?;
                be.gemm(Gemm { m: n, n: width, k: r, trans_a: false, trans_b: true, alpha: 1.0, beta: 0.0 }, &a.cross_t[l], &c.u.w, &mut a.cross_uv[l])?;
                let (prev, rest) = a.cross_x.split_at_mut(l);
                let xl = if l == 0 { &a.wide } else { &prev[l - 1] };
                be.cross_combine(&a.wide, &a.cross_uv[l], &c.bias.w, xl, n, width, &mut rest[0])?;
            }
        }
        let z = if self.cross.is_empty() { &a.z } else { a.cross_x.last().expect("cross layers") };
        for (i, l) in self.top.iter().enumerate() {
            let (prev, rest) = a.top.split_at_mut(i);
            l.forward(be, if i == 0 { z } else { &prev[i - 1] }, n, &mut rest[0])?;
        }
        Ok(())
    }

    /// Loss and full backward pass. `loss_scale` multiplies dL/dlogit (1/global batch for a
    /// mean over the global batch). Returns the summed (unscaled) loss over the batch.
    pub fn backward(&mut self, be: &B, dense_x: &B::Buf, labels: &[f32], loss_scale: f32) -> Result<f64> {
        let (f, d, width) = (self.f, self.d, self.wide_cols());
        let r = self.rank();
        let a = self.acts.as_mut().expect("ensure_batch before use");
        let n = a.batch;
        a.labels = be.upload(labels)?;
        let nt = self.top.len();
        let loss = be.bce_with_logits(&a.top[nt - 1], &a.labels, loss_scale, &mut a.dtop[nt - 1])?;
        // Top MLP.
        for i in (0..nt).rev() {
            let (dprev, drest) = a.dtop.split_at_mut(i);
            let x = if i == 0 {
                if self.cross.is_empty() { &a.z } else { a.cross_x.last().expect("cross layers") }
            } else {
                &a.top[i - 1]
            };
            let dx = if i == 0 { &mut a.dz } else { &mut dprev[i - 1] };
            self.top[i].backward(be, x, &a.top[i], &mut drest[0], Some(dx), n)?;
        }
        // Interaction.
        if self.cross.is_empty() {
            be.dot_interaction_backward(&a.wide, &a.dz, n, f, d, &mut a.dwide)?;
        } else {
            be.scale(&mut a.dx0, 0.0)?;
            for l in (0..self.cross.len()).rev() {
                let c = &mut self.cross[l];
                let xl = if l == 0 { &a.wide } else { &a.cross_x[l - 1] };
                // a.dz holds dL/dx_{l+1}.
                be.cross_combine_backward(&a.wide, &a.cross_uv[l], &c.bias.w, &a.dz, n, width, &mut a.duv, &mut a.dx0)?;
                be.col_sum(&a.duv, n, width, 0.0, &mut c.bias.g)?;
                be.gemm(Gemm { m: width, n: r, k: n, trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 }, &a.duv, &a.cross_t[l], &mut c.u.g)?;
                be.gemm(Gemm { m: n, n: r, k: width, trans_a: false, trans_b: false, alpha: 1.0, beta: 0.0 }, &a.duv, &c.u.w, &mut a.dt)?;
                be.gemm(Gemm { m: r, n: width, k: n, trans_a: true, trans_b: false, alpha: 1.0, beta: 0.0 }, &a.dt, xl, &mut c.v.g)?;
                // dL/dx_l = dL/dx_{l+1} + dt · V, in place.
                be.gemm(Gemm { m: n, n: width, k: r, trans_a: false, trans_b: false, alpha: 1.0, beta: 1.0 }, &a.dt, &c.v.w, &mut a.dz)?;
            }
            be.axpy(1.0, &a.dx0, &mut a.dz)?;
        }
        // Bottom MLP: its output's gradient is wide block 0.
        let dwide = if self.cross.is_empty() { &mut a.dwide } else { &mut a.dz };
        let nb = self.bottom.len();
        be.copy_block(&mut a.dbottom[nb - 1], dwide, n, d, Layout { stride: width, col: 0 }, false)?;
        for i in (0..nb).rev() {
            let (dprev, drest) = a.dbottom.split_at_mut(i);
            let x = if i == 0 { dense_x } else { &a.bottom[i - 1] };
            let dx = if i == 0 { None } else { Some(&mut dprev[i - 1]) };
            self.bottom[i].backward(be, x, &a.bottom[i], &mut drest[0], dx, n)?;
        }
        Ok(loss)
    }

    /// Every dense parameter, in a fixed order (for all-reduce, update and checkpoints).
    pub fn params_mut(&mut self) -> Vec<&mut Param<B>> {
        let mut v: Vec<&mut Param<B>> = Vec::new();
        for l in self.bottom.iter_mut() {
            v.push(&mut l.w);
            v.push(&mut l.b);
        }
        for c in self.cross.iter_mut() {
            v.push(&mut c.v);
            v.push(&mut c.u);
            v.push(&mut c.bias);
        }
        for l in self.top.iter_mut() {
            v.push(&mut l.w);
            v.push(&mut l.b);
        }
        v
    }

    /// One optimizer step on every dense parameter from its gradient.
    pub fn update(&mut self, be: &B, upd: &DenseUpdate) -> Result<()> {
        for p in self.params_mut() {
            be.dense_update(&mut p.w, &p.g, &mut p.s, upd)?;
        }
        Ok(())
    }
}
