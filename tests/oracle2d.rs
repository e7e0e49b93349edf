//! An f64 reference of 2D training, written from BRIEF.md §2–§3 and sharing none of the engine's
//! kernels, dense network or data path — only its initial weights:
//!
//! - M embedding replicas; replica g is updated with its sharding group's samples only (the
//!   global batch's block [g·B/M, (g+1)·B/M)), each row by M/B × the sum of its per-sample
//!   gradients (the brief's gradient convention), with SGD, row-wise or element-wise AdaGrad;
//! - every K steps, and once more at the end when the run stops between syncs, the replicas'
//!   weights and optimizer state are averaged in f64 — whole tables: rows nobody touched are
//!   equal on every replica, so averaging them changes nothing and the reference needs no
//!   touched-row bookkeeping; with delayed state sync the state average started at one sync is
//!   applied at the next as v ← mean(v then) + (v now − v then), and the last one at the end;
//! - one dense network, updated every step by SGD with the mean gradient over the global batch,
//!   differentiated by hand (`RefNet::backward`, itself checked against finite differences).
//!
//! Inputs are plain [`Sample`]s; [`batch_of`] turns a slice of them into the engine's input.
use crate::oracle::{bce_ref, dot_interaction_ref, sigmoid, RefNet, RefOpt, RefTable, TestRng};
use ember_engine::config::{ModelConfig, Pooling};
use ember_engine::data::{Batch, Jagged};
use std::collections::{BTreeMap, BTreeSet};

/// One training sample.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Dense features (f32 values, as the engine receives them).
    pub dense: Vec<f32>,
    pub label: f32,
    /// One bag of global row ids per table.
    pub bags: Vec<Vec<u64>>,
}

/// `n` random samples: bags of 0..=3 ids, a fraction `hot` of them row 0 or 1 of their table (so
/// that several sharding groups touch the same rows), the rest uniform.
pub fn random_samples(model: &ModelConfig, n: usize, rng: &mut TestRng, hot: f64) -> Vec<Sample> {
    (0..n)
        .map(|_| Sample {
            dense: rng.vec_f32(model.num_dense, -1.0, 1.0),
            label: rng.below(2) as f32,
            bags: model
                .tables
                .iter()
                .map(|t| (0..rng.usize_in(0, 3)).map(|_| if rng.unit() < hot { rng.below(2.min(t.rows)) } else { rng.below(t.rows) }).collect())
                .collect(),
        })
        .collect()
}

/// The engine's input for `samples`.
pub fn batch_of(model: &ModelConfig, samples: &[Sample]) -> Batch {
    let mut b = Batch::new(model.num_dense, model.tables.len());
    for s in samples {
        b.dense.extend_from_slice(&s.dense);
        b.labels.push(s.label);
    }
    for (t, j) in b.sparse.iter_mut().enumerate() {
        *j = Jagged::default();
        for s in samples {
            j.push_bag(&s.bags[t]);
        }
    }
    b
}

/// World rank `w`'s (sharding group, rank in the group) on an M×N grid (BRIEF.md §2): replicas
/// inside a node put group g at {g, M+g, 2M+g, ...}; replicas across nodes at {gN, ..., gN+N−1}.
pub fn coords(m: usize, n: usize, across_nodes: bool, w: usize) -> (usize, usize) {
    if across_nodes {
        (w / n, w % n)
    } else {
        (w % m, w / m)
    }
}

/// The samples of a global batch of `b` that world rank `w` owns: [g·B/M + r·B/T, +B/T).
pub fn sample_range(m: usize, n: usize, across_nodes: bool, w: usize, b: usize) -> std::ops::Range<usize> {
    let (g, r) = coords(m, n, across_nodes, w);
    let start = g * (b / m) + r * (b / (m * n));
    start..start + b / (m * n)
}

/// The reference state of an M-replica run.
#[derive(Clone, Debug)]
pub struct Oracle2D {
    pub m: usize,
    /// Sync interval K.
    pub k: usize,
    pub opt: RefOpt,
    pub dense_lr: f64,
    pub delayed: bool,
    pub mean_pooling: Vec<bool>,
    /// `tables[g][t]`: replica g's copy of table t (whole rows, f64, with its optimizer state).
    pub tables: Vec<Vec<RefTable>>,
    /// Delayed state sync: the average started at the last sync (`[t]`) and every replica's
    /// state then (`[g][t]`).
    pending: Option<(Vec<Vec<f64>>, Vec<Vec<Vec<f64>>>)>,
    pub net: RefNet,
    pub steps: usize,
    /// Rows some replica has updated, per table.
    pub touched: Vec<BTreeSet<u64>>,
    /// Mean training loss of each step.
    pub losses: Vec<f64>,
}

impl Oracle2D {
    /// M identical replicas of `tables` (whole tables, f32, as the engine initialises them) and
    /// the dense parameters `dense` (in `DenseNet::params_mut` order; dot interaction).
    pub fn new(model: &ModelConfig, m: usize, k: usize, opt: RefOpt, dense_lr: f64, delayed: bool, tables: &[Vec<f32>], dense: &[Vec<f32>]) -> Self {
        let reps = (0..m)
            .map(|_| model.tables.iter().zip(tables).map(|(t, w)| RefTable::new(w, t.rows as usize, t.dim, t.dim, &opt)).collect())
            .collect();
        let net = RefNet {
            num_dense: model.num_dense,
            bottom: model.bottom_mlp.clone(),
            top: model.top_mlp.clone(),
            f: model.tables.len(),
            d: model.dim(),
            dcn: None,
            params: dense.iter().map(|p| p.iter().map(|&x| x as f64).collect()).collect(),
        };
        Oracle2D {
            m,
            k,
            opt,
            dense_lr,
            delayed,
            mean_pooling: model.tables.iter().map(|t| t.pooling == Pooling::Mean).collect(),
            tables: reps,
            pending: None,
            net,
            steps: 0,
            touched: vec![BTreeSet::new(); model.tables.len()],
            losses: Vec::new(),
        }
    }

    /// Continue on another grid of `m` replicas from the synced model (replica 0), with the
    /// optimizer state rescaled to keep v / c: v · c_new / c_old.
    pub fn regrid(&mut self, m: usize, opt: RefOpt, state_factor: f64) {
        let mut base = self.tables[0].clone();
        for t in base.iter_mut() {
            t.v.iter_mut().for_each(|v| *v *= state_factor);
        }
        self.tables = vec![base; m];
        self.m = m;
        self.opt = opt;
        self.pending = None;
    }

    /// One step on the global batch `samples` (B of them, B divisible by M). Returns the mean loss.
    pub fn step(&mut self, samples: &[Sample]) -> f64 {
        let (b, m) = (samples.len(), self.m);
        let per = b / m;
        let (f, d) = (self.net.f, self.net.d);
        let width = self.net.width();
        // Forward: each sample pools from its sharding group's replica.
        let mut wide = vec![0.0f64; b * width];
        for (i, s) in samples.iter().enumerate() {
            let g = i / per;
            for t in 0..f {
                let bag = &s.bags[t];
                let scale = if self.mean_pooling[t] && !bag.is_empty() { 1.0 / bag.len() as f64 } else { 1.0 };
                let tab = &self.tables[g][t];
                for c in 0..d {
                    wide[i * width + (t + 1) * d + c] = scale * bag.iter().map(|&id| tab.w[id as usize * d + c]).sum::<f64>();
                }
            }
        }
        let dense_x: Vec<f64> = samples.iter().flat_map(|s| s.dense.iter().map(|&x| x as f64)).collect();
        let labels: Vec<f64> = samples.iter().map(|s| s.label as f64).collect();
        let (loss, dparams, dwide) = self.net.backward(&dense_x, &wide, &labels, b, 1.0 / b as f64);
        // Embedding updates: replica g applies M × the gradients of its group's samples.
        for g in 0..m {
            for t in 0..f {
                let mut rows: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
                for i in g * per..(g + 1) * per {
                    let bag = &samples[i].bags[t];
                    let scale = m as f64 * if self.mean_pooling[t] && !bag.is_empty() { 1.0 / bag.len() as f64 } else { 1.0 };
                    for &id in bag {
                        let e = rows.entry(id).or_insert_with(|| vec![0.0; d]);
                        for c in 0..d {
                            e[c] += scale * dwide[i * width + (t + 1) * d + c];
                        }
                    }
                }
                for (r, grad) in rows {
                    let sq = grad.iter().map(|x| x * x).sum();
                    self.tables[g][t].apply_row(r as usize, &grad, sq, &self.opt);
                    self.touched[t].insert(r);
                }
            }
        }
        // Dense: data parallel, the mean gradient over the global batch.
        for (p, gp) in self.net.params.iter_mut().zip(&dparams) {
            p.iter_mut().zip(gp).for_each(|(w, g)| *w -= self.dense_lr * g);
        }
        self.steps += 1;
        if self.steps % self.k == 0 {
            self.sync();
        }
        let mean = loss;
        self.losses.push(mean);
        mean
    }

    fn mean_of(&self, f: impl Fn(&RefTable) -> &Vec<f64>, t: usize) -> Vec<f64> {
        let mut acc = vec![0.0; f(&self.tables[0][t]).len()];
        for rep in &self.tables {
            acc.iter_mut().zip(f(&rep[t])).for_each(|(a, x)| *a += x);
        }
        acc.iter_mut().for_each(|a| *a /= self.m as f64);
        acc
    }

    /// The replica sync: weights averaged; optimizer state averaged, or (delayed) the previous
    /// average applied and a new one started.
    pub fn sync(&mut self) {
        let f = self.net.f;
        for t in 0..f {
            let w = self.mean_of(|r| &r.w, t);
            self.tables.iter_mut().for_each(|rep| rep[t].w.clone_from(&w));
        }
        if !self.delayed {
            for t in 0..f {
                let v = self.mean_of(|r| &r.v, t);
                self.tables.iter_mut().for_each(|rep| rep[t].v.clone_from(&v));
            }
            return;
        }
        self.apply_pending();
        let snap: Vec<Vec<Vec<f64>>> = self.tables.iter().map(|rep| rep.iter().map(|t| t.v.clone()).collect()).collect();
        let mean = (0..f).map(|t| self.mean_of(|r| &r.v, t)).collect();
        self.pending = Some((mean, snap));
    }

    fn apply_pending(&mut self) {
        if let Some((mean, snap)) = self.pending.take() {
            for (rep, snap) in self.tables.iter_mut().zip(&snap) {
                for ((tab, mean), snap) in rep.iter_mut().zip(&mean).zip(snap) {
                    for ((v, &mu), &s) in tab.v.iter_mut().zip(mean).zip(snap) {
                        *v = mu + (*v - s);
                    }
                }
            }
        }
    }

    /// The end of a run: a last sync when it stopped between syncs, the pending state average
    /// applied.
    pub fn finish(&mut self) {
        if self.steps % self.k != 0 {
            self.sync();
        }
        self.apply_pending();
    }
}

impl RefNet {
    /// Loss (scale · Σ BCE) and its gradients with respect to every parameter (in `params`
    /// order) and to `wide` (n × (f+1)·d; block 0 is replaced by the bottom MLP's output, whose
    /// gradient it then holds), for the dot interaction; every bottom layer and every top layer
    /// but the last is ReLU.
    pub fn backward(&self, dense_x: &[f64], wide: &[f64], labels: &[f64], n: usize, scale: f64) -> (f64, Vec<Vec<f64>>, Vec<f64>) {
        assert!(self.dcn.is_none(), "the reference backward covers the dot interaction");
        let (f, d, width) = (self.f, self.d, self.width());
        let nb = self.bottom.len();
        // Forward, keeping each layer's input and output.
        let mut bottom_io = vec![dense_x.to_vec()];
        let mut fin = self.num_dense;
        for (l, &fout) in self.bottom.iter().enumerate() {
            let y = linear_relu(&bottom_io[l], n, fin, &self.params[2 * l], &self.params[2 * l + 1], true);
            bottom_io.push(y);
            fin = fout;
        }
        let mut x = wide.to_vec();
        for i in 0..n {
            x[i * width..i * width + d].copy_from_slice(&bottom_io[nb][i * d..(i + 1) * d]);
        }
        let zw = d + (f + 1) * f / 2;
        let mut top_io = vec![Vec::with_capacity(n * zw)];
        for i in 0..n {
            top_io[0].extend(dot_interaction_ref(&x[i * width..(i + 1) * width], f, d));
        }
        let mut fin = zw;
        for (l, &fout) in self.top.iter().enumerate() {
            let last = l + 1 == self.top.len();
            let y = linear_relu(&top_io[l], n, fin, &self.params[2 * nb + 2 * l], &self.params[2 * nb + 2 * l + 1], !last);
            top_io.push(y);
            fin = fout;
        }
        let logits = top_io.last().expect("a top layer");
        let loss = scale * logits.iter().zip(labels).map(|(&z, &y)| bce_ref(z, y)).sum::<f64>();
        // Backward.
        let mut grads = vec![Vec::new(); self.params.len()];
        let mut dy: Vec<f64> = logits.iter().zip(labels).map(|(&z, &y)| scale * (sigmoid(z) - y)).collect();
        for l in (0..self.top.len()).rev() {
            let fin = if l == 0 { zw } else { self.top[l - 1] };
            let relu = l + 1 != self.top.len();
            let p = 2 * nb + 2 * l;
            let (gw, gb, dx) = linear_backward(&top_io[l], &top_io[l + 1], &mut dy, n, fin, &self.params[p], relu);
            grads[p] = gw;
            grads[p + 1] = gb;
            dy = dx;
        }
        let mut dwide = vec![0.0f64; n * width];
        for i in 0..n {
            let xi = &x[i * width..(i + 1) * width];
            let dz = &dy[i * zw..(i + 1) * zw];
            let dx = &mut dwide[i * width..(i + 1) * width];
            dx[..d].copy_from_slice(&dz[..d]);
            let mut k = d;
            for a in 1..=f {
                for b in 0..a {
                    for c in 0..d {
                        dx[a * d + c] += dz[k] * xi[b * d + c];
                        dx[b * d + c] += dz[k] * xi[a * d + c];
                    }
                    k += 1;
                }
            }
        }
        let mut dy: Vec<f64> = (0..n).flat_map(|i| dwide[i * width..i * width + d].to_vec()).collect();
        for l in (0..nb).rev() {
            let fin = if l == 0 { self.num_dense } else { self.bottom[l - 1] };
            let (gw, gb, dx) = linear_backward(&bottom_io[l], &bottom_io[l + 1], &mut dy, n, fin, &self.params[2 * l], true);
            grads[2 * l] = gw;
            grads[2 * l + 1] = gb;
            dy = dx;
        }
        (loss, grads, dwide)
    }
}

/// y = x·Wᵀ + b (W is out × in), ReLU'd when `relu`.
fn linear_relu(x: &[f64], n: usize, fin: usize, w: &[f64], b: &[f64], relu: bool) -> Vec<f64> {
    let fout = b.len();
    let mut y = vec![0.0; n * fout];
    for i in 0..n {
        for o in 0..fout {
            let s = b[o] + (0..fin).map(|k| x[i * fin + k] * w[o * fin + k]).sum::<f64>();
            y[i * fout + o] = if relu && s < 0.0 { 0.0 } else { s };
        }
    }
    y
}

/// Gradients of a linear layer from dL/dy (`dy`, zeroed where a ReLU output is ≤ 0):
/// (dW, db, dx).
fn linear_backward(x: &[f64], y: &[f64], dy: &mut [f64], n: usize, fin: usize, w: &[f64], relu: bool) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let fout = y.len() / n;
    if relu {
        dy.iter_mut().zip(y).for_each(|(g, &v)| {
            if v <= 0.0 {
                *g = 0.0
            }
        });
    }
    let mut gw = vec![0.0; fout * fin];
    let mut gb = vec![0.0; fout];
    let mut dx = vec![0.0; n * fin];
    for i in 0..n {
        for o in 0..fout {
            let g = dy[i * fout + o];
            gb[o] += g;
            for k in 0..fin {
                gw[o * fin + k] += g * x[i * fin + k];
                dx[i * fin + k] += g * w[o * fin + k];
            }
        }
    }
    (gw, gb, dx)
}

/// ‖a − b‖ / ‖b‖ over one row (b the reference; an all-zero reference row compares absolutely).
pub fn row_rel_err(a: &[f32], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// One rank's shards: (spec, weights, optimizer state), as `RankState::shards` holds them.
pub type Shards = [(ember_engine::backend::ShardSpec, Vec<f32>, Vec<f32>)];

/// Check the shards of a rank of sharding group `g` against the oracle's replica g, row by row:
/// every row the oracle has updated agrees within `tol` (relative, over the row's columns; its
/// optimizer state likewise), every other row is bitwise `init` with zero state.
#[track_caller]
pub fn check_shards(what: &str, g: usize, shards: &Shards, o: &Oracle2D, init: &[Vec<f32>], tol: f64) {
    for (spec, w, s) in shards {
        let (t, cols, dim) = (spec.table, spec.num_cols(), spec.dim);
        let tab = &o.tables[g][t];
        let spr = if spec.num_rows() == 0 { 0 } else { s.len() / spec.num_rows() };
        for (i, row) in (spec.rows.start..spec.rows.end).enumerate() {
            let r = row as usize;
            let got = &w[i * cols..(i + 1) * cols];
            let c0 = r * dim + spec.cols.start;
            if !o.touched[t].contains(&row) {
                let want = &init[t][c0..c0 + cols];
                assert!(got.iter().zip(want).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: table {t} row {row} was never updated but changed");
                assert!(s[i * spr..(i + 1) * spr].iter().all(|&v| v == 0.0), "{what}: table {t} row {row}: state of an untouched row");
                continue;
            }
            let e = row_rel_err(got, &tab.w[c0..c0 + cols]);
            assert!(e <= tol, "{what}: replica {g} table {t} row {row} cols {:?}: weights {got:?} vs reference {:?} (rel. error {e:e})", spec.cols, &tab.w[c0..c0 + cols]);
            let want_state: &[f64] = match spr {
                0 => &[],
                1 if tab.v.len() == tab.rows => &tab.v[r..r + 1],
                _ => &tab.v[c0..c0 + cols],
            };
            let e = row_rel_err(&s[i * spr..(i + 1) * spr], want_state);
            assert!(e <= tol, "{what}: replica {g} table {t} row {row}: optimizer state {:?} vs reference {want_state:?} (rel. error {e:e})", &s[i * spr..(i + 1) * spr]);
        }
    }
}

/// Check dense parameters against the oracle's: max |a − b| / max |b| per tensor.
#[track_caller]
pub fn check_dense(what: &str, dense: &[Vec<f32>], o: &Oracle2D, tol: f64) {
    assert_eq!(dense.len(), o.net.params.len(), "{what}: dense parameter count");
    for (k, (a, b)) in dense.iter().zip(&o.net.params).enumerate() {
        let num = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs()).fold(0.0, f64::max);
        let den = b.iter().map(|y| y.abs()).fold(0.0, f64::max).max(1e-30);
        assert!(num / den <= tol, "{what}: dense parameter {k}: rel. error {:e}", num / den);
    }
}
