//! Independent oracles for the backend and model tests: a seeded generator, f64 reference
//! implementations written from BRIEF.md §3 and the backend contract (never by calling the code
//! under test), and comparison helpers that name the first mismatch.

/// SplitMix64: a small seeded generator of test inputs (independent of `ember_engine::rng`).
#[derive(Clone, Debug)]
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ 0x1234_5678)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
    /// Uniform usize in lo..=hi.
    pub fn usize_in(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo + 1) as u64) as usize
    }
    /// `n` f32 values uniform in [lo, hi).
    pub fn vec_f32(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        (0..n).map(|_| self.range(lo, hi) as f32).collect()
    }
}

/// Assert `got` ≈ `want` elementwise: |got − want| ≤ atol + rtol·|want|.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs reference {}", got.len(), want.len());
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= atol + rtol * w.abs() && g.is_finite() == w.is_finite(),
            "{what}: element {i}: got {g:e}, want {w:e} (|err| {err:e} > {atol:e} + {rtol:e}·|want|)"
        );
    }
}

/// Assert two f32 slices are bitwise identical.
#[track_caller]
pub fn assert_bitwise(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length {} vs {}", got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.to_bits() == w.to_bits(), "{what}: element {i}: {g:e} vs {w:e} differ bitwise");
    }
}

/// max |a − b| / max |b| over a tensor (b the reference).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max);
    let den = b.iter().map(|&y| (y as f64).abs()).fold(0.0, f64::max);
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

pub fn to_f64(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

// ---------------------------------------------------------------- dense references

/// C = alpha·op(A)·op(B) + beta·C in f64, row-major, A (m×k) or (k×m) if ta, B (k×n) or (n×k) if tb.
#[allow(clippy::too_many_arguments)]
pub fn gemm_ref(m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f64, a: &[f64], b: &[f64], beta: f64, c: &mut [f64]) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                s += av * bv;
            }
            c[i * n + j] = alpha * s + if beta == 0.0 { 0.0 } else { beta * c[i * n + j] };
        }
    }
}

/// log(1 + e^z) without overflow or cancellation.
pub fn softplus(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

/// Numerically stable f64 BCE-with-logits of one sample: −y·log σ(x) − (1−y)·log(1−σ(x))
/// = y·softplus(−x) + (1−y)·softplus(x) (no cancellation for y ∈ {0, 1}).
pub fn bce_ref(x: f64, y: f64) -> f64 {
    y * softplus(-x) + (1.0 - y) * softplus(x)
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// DLRM dot interaction of one sample: x is (f+1)·d; out = [x_0, x_i·x_j for i>j (i-major)].
pub fn dot_interaction_ref(x: &[f64], f: usize, d: usize) -> Vec<f64> {
    let mut out = x[..d].to_vec();
    for i in 1..=f {
        for j in 0..i {
            out.push((0..d).map(|t| x[i * d + t] * x[j * d + t]).sum());
        }
    }
    out
}

// ---------------------------------------------------------------- embedding references

/// Which optimizer the f64 reference applies (BRIEF.md §3).
#[derive(Clone, Copy, Debug)]
pub enum RefOpt {
    Sgd { lr: f64 },
    /// v ← v + Σg²/D; w ← w − lr/(sqrt(v/c)+eps)·g (or lr/sqrt(v/c+eps) if eps_inside).
    RowWise { lr: f64, eps: f64, c: f64, eps_inside: bool },
    /// v_d ← v_d + g_d²; w_d ← w_d − lr/(sqrt(v_d/c)+eps)·g_d.
    Adagrad { lr: f64, eps: f64, c: f64, eps_inside: bool },
}

fn rate(lr: f64, eps: f64, c: f64, inside: bool, v: f64) -> f64 {
    if inside {
        lr / (v / c + eps).sqrt()
    } else {
        lr / ((v / c).sqrt() + eps)
    }
}

/// An f64 embedding shard (rows × cols) of a table of width `dim`, with its optimizer state.
#[derive(Clone, Debug)]
pub struct RefTable {
    pub rows: usize,
    pub cols: usize,
    pub dim: usize,
    pub w: Vec<f64>,
    /// Row-wise: one per row; element-wise: rows × cols.
    pub v: Vec<f64>,
}

/// Bags on the host: offsets (n+1), ids, optional per-bag scale.
#[derive(Clone, Debug)]
pub struct HostBags {
    pub offsets: Vec<u64>,
    pub ids: Vec<u64>,
    pub scale: Option<Vec<f32>>,
}

impl HostBags {
    pub fn num_bags(&self) -> usize {
        self.offsets.len() - 1
    }
    pub fn from_lists(lists: &[Vec<u64>], mean: bool) -> Self {
        let mut offsets = vec![0u64];
        let mut ids = Vec::new();
        for l in lists {
            ids.extend_from_slice(l);
            offsets.push(ids.len() as u64);
        }
        let scale = mean.then(|| lists.iter().map(|l| if l.is_empty() { 0.0 } else { 1.0 / l.len() as f32 }).collect());
        HostBags { offsets, ids, scale }
    }
    /// Random bags: lengths 0..=max_len (some empty), ids < rows, duplicates likely when rows is small.
    pub fn random(rng: &mut TestRng, n: usize, max_len: usize, rows: u64, scaled: bool) -> Self {
        let lists: Vec<Vec<u64>> = (0..n).map(|_| (0..rng.usize_in(0, max_len)).map(|_| rng.below(rows)).collect()).collect();
        let mut b = HostBags::from_lists(&lists, false);
        if scaled {
            b.scale = Some((0..n).map(|_| rng.range(-1.5, 1.5) as f32).collect());
        }
        b
    }
    pub fn bag(&self, i: usize) -> &[u64] {
        &self.ids[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
    pub fn scale_of(&self, i: usize) -> f64 {
        self.scale.as_ref().map_or(1.0, |s| s[i] as f64)
    }
}

impl RefTable {
    pub fn new(w: &[f32], rows: usize, cols: usize, dim: usize, opt: &RefOpt) -> Self {
        let nv = match opt {
            RefOpt::Sgd { .. } => 0,
            RefOpt::RowWise { .. } => rows,
            RefOpt::Adagrad { .. } => rows * cols,
        };
        RefTable { rows, cols, dim, w: to_f64(w), v: vec![0.0; nv] }
    }

    /// out[i, col..col+cols] (= or +=) scale_i · Σ_j W[ids_j]; other entries untouched.
    pub fn forward(&self, bags: &HostBags, out: &mut [f64], stride: usize, col: usize, accumulate: bool) {
        for i in 0..bags.num_bags() {
            let s = bags.scale_of(i);
            for c in 0..self.cols {
                let sum: f64 = bags.bag(i).iter().map(|&id| self.w[id as usize * self.cols + c]).sum();
                let o = &mut out[i * stride + col + c];
                *o = if accumulate { *o + s * sum } else { s * sum };
            }
        }
    }

    /// Per unique touched row: Σ over occurrences of scale_bag · grad[bag] (+ l2·w). Sorted by row.
    pub fn row_grads(&self, bags: &HostBags, grad: &[f32], stride: usize, col: usize, l2: f64) -> Vec<(usize, Vec<f64>)> {
        let mut g: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
        for i in 0..bags.num_bags() {
            let s = bags.scale_of(i);
            for &id in bags.bag(i) {
                let e = g.entry(id as usize).or_insert_with(|| vec![0.0; self.cols]);
                for c in 0..self.cols {
                    e[c] += s * grad[i * stride + col + c] as f64;
                }
            }
        }
        for (&r, e) in g.iter_mut() {
            for c in 0..self.cols {
                e[c] += l2 * self.w[r * self.cols + c];
            }
        }
        g.into_iter().collect()
    }

    /// Apply one row's update; `sq` is the whole-row Σg² (for row-wise AdaGrad).
    pub fn apply_row(&mut self, r: usize, g: &[f64], sq: f64, opt: &RefOpt) {
        let cols = self.cols;
        match *opt {
            RefOpt::Sgd { lr } => {
                for c in 0..cols {
                    self.w[r * cols + c] -= lr * g[c];
                }
            }
            RefOpt::RowWise { lr, eps, c: cc, eps_inside } => {
                self.v[r] += sq / self.dim as f64;
                let k = rate(lr, eps, cc, eps_inside, self.v[r]);
                for c in 0..cols {
                    self.w[r * cols + c] -= k * g[c];
                }
            }
            RefOpt::Adagrad { lr, eps, c: cc, eps_inside } => {
                for c in 0..cols {
                    let v = &mut self.v[r * cols + c];
                    *v += g[c] * g[c];
                    let k = rate(lr, eps, cc, eps_inside, *v);
                    self.w[r * cols + c] -= k * g[c];
                }
            }
        }
    }

    /// Fused backward + update of a whole-row shard.
    pub fn step(&mut self, bags: &HostBags, grad: &[f32], stride: usize, col: usize, l2: f64, opt: &RefOpt) {
        for (r, g) in self.row_grads(bags, grad, stride, col, l2) {
            let sq = g.iter().map(|x| x * x).sum();
            self.apply_row(r, &g, sq, opt);
        }
    }
}

// ---------------------------------------------------------------- dense network reference

/// An f64 DLRM dense net: parameters in the order of `DenseNet::params_mut`
/// (bottom w,b…; cross v,u,bias…; top w,b…). Linear w is (out × in); cross v (rank × width),
/// u (width × rank).
#[derive(Clone, Debug)]
pub struct RefNet {
    pub num_dense: usize,
    pub bottom: Vec<usize>,
    pub top: Vec<usize>,
    pub f: usize,
    pub d: usize,
    /// (layers, rank) for DCNv2, None for the dot interaction.
    pub dcn: Option<(usize, usize)>,
    pub params: Vec<Vec<f64>>,
}

fn linear(x: &[f64], n: usize, fin: usize, w: &[f64], b: &[f64], relu: bool) -> Vec<f64> {
    let fout = b.len();
    let mut y = vec![0.0; n * fout];
    for i in 0..n {
        for o in 0..fout {
            let mut s = b[o];
            for k in 0..fin {
                s += x[i * fin + k] * w[o * fin + k];
            }
            y[i * fout + o] = if relu && s < 0.0 { 0.0 } else { s };
        }
    }
    y
}

impl RefNet {
    pub fn width(&self) -> usize {
        (self.f + 1) * self.d
    }

    /// Bottom MLP output (n × d), every layer ReLU.
    pub fn bottom_forward(&self, dense_x: &[f64], n: usize) -> Vec<f64> {
        let mut x = dense_x.to_vec();
        let mut fin = self.num_dense;
        for (l, &fout) in self.bottom.iter().enumerate() {
            x = linear(&x, n, fin, &self.params[2 * l], &self.params[2 * l + 1], true);
            fin = fout;
        }
        x
    }

    /// Logits from a full wide matrix (n × (f+1)d), block 0 the bottom output.
    pub fn top_forward(&self, wide: &[f64], n: usize) -> Vec<f64> {
        let width = self.width();
        let mut p = 2 * self.bottom.len();
        let (mut z, mut fin) = match self.dcn {
            None => {
                let zw = self.d + (self.f + 1) * self.f / 2;
                let mut z = Vec::with_capacity(n * zw);
                for i in 0..n {
                    z.extend(dot_interaction_ref(&wide[i * width..(i + 1) * width], self.f, self.d));
                }
                (z, zw)
            }
            Some((layers, rank)) => {
                let mut xl = wide.to_vec();
                for _ in 0..layers {
                    let (v, u, bias) = (&self.params[p], &self.params[p + 1], &self.params[p + 2]);
                    p += 3;
                    let mut next = vec![0.0; n * width];
                    for i in 0..n {
                        let x0 = &wide[i * width..(i + 1) * width];
                        let x = &xl[i * width..(i + 1) * width];
                        let t: Vec<f64> = (0..rank).map(|r| (0..width).map(|c| v[r * width + c] * x[c]).sum()).collect();
                        for c in 0..width {
                            let uv: f64 = (0..rank).map(|r| u[c * rank + r] * t[r]).sum();
                            next[i * width + c] = x0[c] * (uv + bias[c]) + x[c];
                        }
                    }
                    xl = next;
                }
                (xl, width)
            }
        };
        for (l, &fout) in self.top.iter().enumerate() {
            let last = l + 1 == self.top.len();
            z = linear(&z, n, fin, &self.params[p], &self.params[p + 1], !last);
            p += 2;
            fin = fout;
        }
        z
    }

    /// Logits from the dense features and the embedding blocks 1.. of `wide` (block 0 ignored).
    pub fn forward(&self, dense_x: &[f64], wide: &[f64], n: usize) -> Vec<f64> {
        let bot = self.bottom_forward(dense_x, n);
        let width = self.width();
        let mut w = wide.to_vec();
        for i in 0..n {
            w[i * width..i * width + self.d].copy_from_slice(&bot[i * self.d..(i + 1) * self.d]);
        }
        self.top_forward(&w, n)
    }

    pub fn loss(logits: &[f64], labels: &[f32], scale: f64) -> f64 {
        scale * logits.iter().zip(labels).map(|(&x, &y)| bce_ref(x, y as f64)).sum::<f64>()
    }
}

// ---------------------------------------------------------------- model inputs

/// Random batches for a model (empty bags, duplicates, repeated ids).
pub fn random_batches(model: &ember_engine::config::ModelConfig, n: usize, count: usize, seed: u64) -> Vec<ember_engine::data::Batch> {
    let mut rng = TestRng::new(seed);
    (0..count)
        .map(|_| {
            let mut b = ember_engine::data::Batch::new(model.num_dense, model.tables.len());
            b.dense = rng.vec_f32(n * model.num_dense, -1.0, 1.0);
            b.labels = (0..n).map(|_| rng.below(2) as f32).collect();
            for (j, t) in b.sparse.iter_mut().zip(&model.tables) {
                *j = ember_engine::data::Jagged::default();
                for _ in 0..n {
                    let ids: Vec<u64> = (0..rng.usize_in(0, 3)).map(|_| rng.below(t.rows)).collect();
                    j.push_bag(&ids);
                }
            }
            b
        })
        .collect()
}

