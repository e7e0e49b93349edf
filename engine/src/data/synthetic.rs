//! Synthetic data with a planted ground-truth model (the "oracle"): this module owns the
//! synthetic sample stream that `ember train` and the benchmarks use without `--data`.
//!
//! Every sample is a pure function of (seed, global sample index), so any rank of any grid can
//! generate any index range on its own ([`SyntheticData::samples`]). The training stream is the
//! indices 0, 1, 2, ...; the eval set is the disjoint range starting at [`EVAL_START`].
//!
//! Per sample:
//! - **ids**: for table `t`, a bag of `L` ids, `L` uniform in `[ceil(b/2), b + b/2]` for the
//!   table's `bag_size` b (mean b), empty with probability 5 %. Each id is a popularity *rank*
//!   drawn from Zipf(`zipf`) over the table's rows (one alias table: the first 4096 ranks with
//!   their exact probabilities, the rare tail as 1/16-octave buckets whose mass is the integral
//!   of the power law, uniform inside a bucket), mapped to a row by a fixed
//!   per-table affine permutation `row = (a·rank + b) mod rows`, so popular rows are spread over
//!   the table. `zipf = 0` gives uniform ids (and the identity map).
//! - **dense**: `num_dense` features `ln(1 + count)`, count = floor(exp(μ_j + 1.2·z)), μ_j from
//!   0.5 up by 0.35 per feature, 10 % missing (0.0) — the shape of preprocessed Criteo integers
//!   (drawn as one of 1024 precomputed quantiles of that law, so a draw is a table lookup).
//! - **label** ~ Bernoulli(sigmoid(logit)) of the planted model
//!   `logit = bias + signal · (D + R + I)`:
//!   - D: a linear function of the dense features;
//!   - R: per-(table, row) scalar effects, pooled over each bag with the table's pooling;
//!   - I: Σ over pairs of the first (up to) 4 tables of ⟨U_a, U_b⟩, U_t the pooled 2-dim latent
//!     vectors of the bag's rows (a low-rank pairwise interaction).
//!
//!   An effect (and latent vector) of rank r is a fixed random draw times the learnability weight
//!   `w = x²/(1 + x²)`, x = n/200, n the expected occurrences of the rank in 65536 samples: frequent
//!   rows carry the signal, rare rows (which no model can learn from a few hundred steps) carry
//!   little. Sums of per-row effects and dot products of pooled vectors are exactly what a DLRM
//!   represents. D, R and I are scaled to standard deviations 0.6, 1.4 and 0.4 (measured on a
//!   fixed calibration range of 8192 samples at construction) and the bias is set there so that
//!   the positive rate is about 27 %. With `signal = 1` the oracle's AUC is about 0.8.
//!
//! [`SyntheticData::oracle_logits`] evaluates the planted model on any batch.
use crate::config::{ModelConfig, SyntheticConfig, TrainConfig};
use crate::data::{Batch, DataSource};
use crate::metrics::{evaluate, EvalResult};
use crate::rng::{hash3, mix64, unit_f64};
use crate::{Error, Result};
use rayon::prelude::*;

mod table;
use table::{normal4, TableGen};
pub use table::LATENT_DIM;

/// First sample index of the eval set (the training stream is 0, 1, 2, ...).
pub const EVAL_START: u64 = 1 << 40;
/// First index of the calibration range (used once at construction).
const CALIB_START: u64 = 1 << 41;
const CALIB_SAMPLES: usize = 8192;
/// The number of tables taking part in the planted interaction.
const MAX_INTERACT: usize = 4;
/// Target standard deviations of the dense, row and interaction parts (before `signal`).
const STD_DENSE: f64 = 0.6;
const STD_ROWS: f64 = 1.4;
const STD_INTER: f64 = 0.4;
/// Target positive rate.
pub const TARGET_POSITIVE_RATE: f64 = 0.27;
const DENSE_MISSING_P16: u64 = (0.10 * 65536.0) as u64;
/// A dense feature is drawn as one of this many equally likely values (10 random bits).
const DENSE_QUANTILES: usize = 1024;

const TAG_IDS: u64 = 0x1D5;
const TAG_DENSE: u64 = 0xDE45E;
const TAG_LABEL: u64 = 0x1ABE1;
const TAG_COEF: u64 = 0xC0EF;
const K_ID: u64 = 0x9E37_79B9_7F4A_7C15;

/// Approximately standard normal from the low 48 bits (three 16-bit uniforms).
#[inline]
fn normal3(h: u64) -> f64 {
    let s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF);
    (s as f64 / 65536.0 - 1.5) * 2.0
}

/// The DENSE_QUANTILES values of dense feature `j`: the quantiles of 16 draws per value of
/// `ln(1 + floor(exp(μ_j + 1.2 z)))` (10 % missing → 0), μ_j = 0.5 + 0.35 j.
fn dense_quantiles(seed: u64, j: usize) -> Vec<f32> {
    const OVER: usize = 16;
    let mu = 0.5 + 0.35 * j as f64;
    let mut v: Vec<f32> = (0..DENSE_QUANTILES * OVER)
        .map(|i| {
            let h = hash3(seed, TAG_DENSE, j as u64, i as u64);
            if (h >> 48) < DENSE_MISSING_P16 {
                0.0
            } else {
                (mu + 1.2 * normal3(h)).exp().floor().ln_1p() as f32
            }
        })
        .collect();
    v.sort_by(f32::total_cmp);
    (0..DENSE_QUANTILES).map(|q| v[q * OVER + OVER / 2]).collect()
}

/// The raw parts of one sample's planted logit.
#[derive(Clone, Copy, Default, Debug)]
struct Parts {
    dense: f64,
    rows: f64,
    inter: f64,
}

/// The synthetic data source. See the module doc.
#[derive(Clone, Debug)]
pub struct SyntheticData {
    seed: u64,
    num_dense: usize,
    tables: Vec<TableGen>,
    dense_coef: Vec<f64>,
    /// Per dense feature, DENSE_QUANTILES equally likely values (sorted).
    dense_table: Vec<f32>,
    signal: f64,
    scale: [f64; 3],
    /// logit = bias + signal · (scale · parts − center)
    center: f64,
    bias: f64,
    eval_samples: usize,
    pos: u64,
}

impl SyntheticData {
    /// The generator for a training config (model shapes, `seed`, `synthetic`).
    pub fn new(cfg: &TrainConfig) -> Result<Self> {
        Self::from_parts(&cfg.model, cfg.seed, &cfg.synthetic)
    }

    pub fn from_parts(model: &ModelConfig, seed: u64, syn: &SyntheticConfig) -> Result<Self> {
        if !(syn.zipf.is_finite() && syn.zipf >= 0.0) {
            return Err(Error::Config(format!("synthetic.zipf = {} must be finite and >= 0", syn.zipf)));
        }
        if !(syn.signal.is_finite() && syn.signal >= 0.0) {
            return Err(Error::Config(format!("synthetic.signal = {} must be finite and >= 0", syn.signal)));
        }
        if model.num_dense == 0 || model.tables.is_empty() || model.tables.iter().any(|t| t.rows == 0) {
            return Err(Error::Config("synthetic data needs num_dense > 0 and at least one table, each with rows > 0".into()));
        }
        let ni = model.tables.len().min(MAX_INTERACT);
        let tables: Vec<TableGen> = model
            .tables
            .iter()
            .enumerate()
            .map(|(t, c)| TableGen::new(seed, t, c.rows, c.bag_size, c.pooling, syn.zipf, t < ni && ni >= 2))
            .collect();
        let nd = model.num_dense;
        let dense_coef = (0..nd).map(|j| normal4(hash3(seed, TAG_COEF, j as u64, 0)) / (nd as f64).sqrt()).collect();
        let dense_table = (0..nd).flat_map(|j| dense_quantiles(seed, j)).collect();
        let mut g = SyntheticData {
            seed,
            num_dense: nd,
            tables,
            dense_coef,
            dense_table,
            signal: syn.signal as f64,
            scale: [1.0; 3],
            center: 0.0,
            bias: 0.0,
            eval_samples: syn.eval_samples,
            pos: 0,
        };
        g.calibrate();
        Ok(g)
    }

    /// Scales the three parts to their target deviations, centres them and sets the bias for the
    /// target positive rate, on a fixed calibration range.
    fn calibrate(&mut self) {
        let (_, parts) = self.generate(CALIB_START, CALIB_SAMPLES, false);
        let n = parts.len() as f64;
        let stats = |f: &dyn Fn(&Parts) -> f64| {
            let m = parts.iter().map(f).sum::<f64>() / n;
            let v = parts.iter().map(|p| (f(p) - m).powi(2)).sum::<f64>() / n;
            v.sqrt()
        };
        let sd = [stats(&|p| p.dense), stats(&|p| p.rows), stats(&|p| p.inter)];
        let target = [STD_DENSE, STD_ROWS, STD_INTER];
        for k in 0..3 {
            self.scale[k] = if sd[k] > 1e-12 { target[k] / sd[k] } else { 0.0 };
        }
        let f: Vec<f64> = parts.iter().map(|p| self.raw(p)).collect();
        self.center = f.iter().sum::<f64>() / n;
        let sig = self.signal;
        let c = self.center;
        let rate = |bias: f64| f.iter().map(|&x| 1.0 / (1.0 + (-(bias + sig * (x - c))).exp())).sum::<f64>() / n;
        let (mut lo, mut hi) = (-30.0f64, 30.0f64);
        for _ in 0..60 {
            let mid = 0.5 * (lo + hi);
            if rate(mid) < TARGET_POSITIVE_RATE {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        self.bias = 0.5 * (lo + hi);
    }

    #[inline]
    fn raw(&self, p: &Parts) -> f64 {
        self.scale[0] * p.dense + self.scale[1] * p.rows + self.scale[2] * p.inter
    }

    #[inline]
    fn logit(&self, p: &Parts) -> f64 {
        self.bias + self.signal * (self.raw(p) - self.center)
    }

    /// Samples `start .. start + n` of the index space (training: from 0; eval: from EVAL_START).
    pub fn samples(&self, start: u64, n: usize) -> Batch {
        self.generate(start, n, true).0
    }

    /// Generates samples; labels only when `labels` (else all 0). Two passes, both parallel over
    /// chunks of samples: bag lengths, then everything else written in place.
    fn generate(&self, start: u64, n: usize, labels: bool) -> (Batch, Vec<Parts>) {
        const CHUNK: usize = 256;
        let nd = self.num_dense;
        let nt = self.tables.len();
        let mut batch = Batch::new(nd, nt);
        // Pass 1: lengths.
        for (t, (jag, tg)) in batch.sparse.iter_mut().zip(&self.tables).enumerate() {
            jag.lengths = vec![0; n];
            jag.lengths.par_chunks_mut(CHUNK).enumerate().for_each(|(c, ls)| {
                for (i, l) in ls.iter_mut().enumerate() {
                    let idx = start + (c * CHUNK + i) as u64;
                    *l = tg.bag_len(hash3(self.seed, idx, t as u64, TAG_IDS)) as u32;
                }
            });
        }
        // Per-chunk id counts → each chunk's slice of every table's values.
        let nchunks = n.div_ceil(CHUNK);
        let counts: Vec<Vec<usize>> = batch
            .sparse
            .iter()
            .map(|j| j.lengths.chunks(CHUNK).map(|c| c.iter().map(|&l| l as usize).sum()).collect())
            .collect();
        batch.dense = vec![0.0; n * nd];
        batch.labels = vec![0.0; n];
        let mut parts = vec![Parts::default(); n];
        let mut per_chunk: Vec<Vec<&mut [u64]>> = (0..nchunks).map(|_| Vec::with_capacity(nt)).collect();
        let mut lens: Vec<&[u32]> = Vec::with_capacity(nt);
        for (t, jag) in batch.sparse.iter_mut().enumerate() {
            jag.values = vec![0; counts[t].iter().sum()];
            let mut rest: &mut [u64] = &mut jag.values;
            for (c, &k) in counts[t].iter().enumerate() {
                let (a, b) = rest.split_at_mut(k);
                per_chunk[c].push(a);
                rest = b;
            }
            lens.push(&jag.lengths);
        }
        batch
            .dense
            .par_chunks_mut(CHUNK * nd.max(1))
            .zip(batch.labels.par_chunks_mut(CHUNK))
            .zip(parts.par_chunks_mut(CHUNK))
            .zip(per_chunk.into_par_iter())
            .enumerate()
            .for_each(|(c, (((dense, lab), parts), mut vals))| {
                let s = c * CHUNK;
                let ls: Vec<&[u32]> = lens.iter().map(|l| &l[s..s + lab.len()]).collect();
                self.gen_chunk(start + s as u64, dense, lab, parts, &ls, &mut vals, labels);
            });
        (batch, parts)
    }

    #[allow(clippy::too_many_arguments)]
    fn gen_chunk(
        &self,
        start: u64,
        dense: &mut [f32],
        labels_out: &mut [f32],
        parts: &mut [Parts],
        lens: &[&[u32]],
        vals: &mut [&mut [u64]],
        labels: bool,
    ) {
        let nd = self.num_dense;
        let mut cursor = vec![0usize; self.tables.len()];
        for (i, p) in parts.iter_mut().enumerate() {
            let idx = start + i as u64;
            // Dense features.
            let hd = hash3(self.seed, idx, TAG_DENSE, 0);
            let mut h = 0;
            for j in 0..nd {
                if j % 6 == 0 {
                    h = mix64(hd ^ (j as u64 + 1).wrapping_mul(K_ID));
                }
                let q = ((h >> (10 * (j % 6))) & (DENSE_QUANTILES as u64 - 1)) as usize;
                let x = self.dense_table[j * DENSE_QUANTILES + q];
                dense[i * nd + j] = x;
                p.dense += self.dense_coef[j] * x as f64;
            }
            // Bags.
            let mut lat = [[0.0f64; LATENT_DIM]; MAX_INTERACT];
            for (t, tg) in self.tables.iter().enumerate() {
                let base = hash3(self.seed, idx, t as u64, TAG_IDS);
                let len = lens[t][i] as usize;
                let out = &mut vals[t][cursor[t]..cursor[t] + len];
                cursor[t] += len;
                let mut eff = 0.0;
                let mut u = [0.0f64; LATENT_DIM];
                for (k, o) in out.iter_mut().enumerate() {
                    let (rank, row, w) = tg.draw(mix64(base ^ (k as u64 + 1).wrapping_mul(K_ID)));
                    *o = row;
                    eff += tg.effect(rank, w);
                    if tg.latent {
                        tg.add_latent(rank, w, &mut u);
                    }
                }
                let div = if tg.mean_pool && len > 0 { len as f64 } else { 1.0 };
                p.rows += eff / div;
                if tg.latent {
                    for (a, x) in lat[t].iter_mut().zip(u) {
                        *a = x / div;
                    }
                }
            }
            p.inter = self.interaction(&lat);
            if labels {
                let pr = 1.0 / (1.0 + (-self.logit(p)).exp());
                let u = unit_f64(hash3(self.seed, idx, TAG_LABEL, 0));
                labels_out[i] = if u < pr { 1.0 } else { 0.0 };
            }
        }
    }

    fn interaction(&self, lat: &[[f64; LATENT_DIM]; MAX_INTERACT]) -> f64 {
        let ni = self.tables.iter().take_while(|t| t.latent).count();
        let mut s = 0.0;
        for a in 0..ni {
            for c in a + 1..ni {
                s += lat[a].iter().zip(&lat[c]).map(|(x, y)| x * y).sum::<f64>();
            }
        }
        s
    }

    /// The planted model's logits on any batch of this model's shape (ids must be < rows).
    pub fn oracle_logits(&self, batch: &Batch) -> Vec<f32> {
        let n = batch.size();
        let nd = self.num_dense;
        assert_eq!(batch.num_dense, nd, "oracle_logits: batch has {} dense features, model {}", batch.num_dense, nd);
        assert_eq!(batch.sparse.len(), self.tables.len(), "oracle_logits: wrong number of sparse features");
        let offsets: Vec<Vec<u64>> = batch.sparse.iter().map(|j| j.offsets()).collect();
        (0..n)
            .into_par_iter()
            .map(|i| {
                let mut p = Parts::default();
                for j in 0..nd {
                    p.dense += self.dense_coef[j] * batch.dense[i * nd + j] as f64;
                }
                let mut lat = [[0.0f64; LATENT_DIM]; MAX_INTERACT];
                for (t, tg) in self.tables.iter().enumerate() {
                    let ids = &batch.sparse[t].values[offsets[t][i] as usize..offsets[t][i + 1] as usize];
                    let mut eff = 0.0;
                    let mut u = [0.0f64; LATENT_DIM];
                    for &row in ids {
                        let rank = tg.rank_of(row);
                        let w = tg.weight(rank);
                        eff += tg.effect(rank, w);
                        if tg.latent {
                            tg.add_latent(rank, w, &mut u);
                        }
                    }
                    let div = if tg.mean_pool && !ids.is_empty() { ids.len() as f64 } else { 1.0 };
                    p.rows += eff / div;
                    if tg.latent {
                        for (a, x) in lat[t].iter_mut().zip(u) {
                            *a = x / div;
                        }
                    }
                }
                p.inter = self.interaction(&lat);
                self.logit(&p) as f32
            })
            .collect()
    }

    /// The eval set (indices `EVAL_START ..`, `eval_samples` of them).
    pub fn eval_batch(&self) -> Batch {
        self.samples(EVAL_START, self.eval_samples)
    }

    /// The oracle's metrics on the eval set: the best a model can expect to reach.
    pub fn oracle_eval(&self) -> EvalResult {
        let b = self.eval_batch();
        evaluate(&self.oracle_logits(&b), &b.labels)
    }

    /// Popularity rank (0 = most frequent) of `row` in `table`.
    pub fn rank_of(&self, table: usize, row: u64) -> u64 {
        self.tables[table].rank_of(row)
    }

    /// The row holding popularity rank `rank` of `table`.
    pub fn row_of_rank(&self, table: usize, rank: u64) -> u64 {
        let t = &self.tables[table];
        if t.uniform {
            rank
        } else {
            t.perm(rank)
        }
    }

    /// Probability that one id drawn for `table` is its rank `rank` (exact for ranks < 16384).
    pub fn rank_probability(&self, table: usize, rank: u64) -> f64 {
        self.tables[table].rank_p(rank)
    }
}

impl DataSource for SyntheticData {
    fn next_batch(&mut self, n: usize) -> Result<Option<Batch>> {
        let b = self.samples(self.pos, n);
        self.pos += n as u64;
        Ok(Some(b))
    }
    fn position(&self) -> u64 {
        self.pos
    }
    fn skip(&mut self, n: u64) -> Result<()> {
        self.pos += n;
        Ok(())
    }
    fn eval_set(&mut self) -> Result<Batch> {
        Ok(self.eval_batch())
    }
    fn len(&self) -> Option<u64> {
        None
    }
}
