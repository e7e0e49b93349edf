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
use crate::config::{ModelConfig, Pooling, SyntheticConfig, TrainConfig};
use crate::data::{Batch, DataSource};
use crate::metrics::{evaluate, EvalResult};
use crate::rng::{hash3, mix64, unit_f64};
use crate::{Error, Result};
use rayon::prelude::*;

/// First sample index of the eval set (the training stream is 0, 1, 2, ...).
pub const EVAL_START: u64 = 1 << 40;
/// First index of the calibration range (used once at construction).
const CALIB_START: u64 = 1 << 41;
const CALIB_SAMPLES: usize = 8192;
/// Ranks sampled with their exact Zipf probability; rarer ranks are drawn by 1/16-octave buckets.
const HEAD_MAX: usize = 1 << 12;
/// Latent dimension of the planted interaction and the number of tables taking part.
pub const LATENT_DIM: usize = 2;
const MAX_INTERACT: usize = 4;
/// Learnability weight w = (n/KAPPA)² / (1 + (n/KAPPA)²), n = expected occurrences of the rank in
/// REF_SAMPLES samples: rows seen less than ~KAPPA times in a few hundred steps carry little.
const REF_SAMPLES: f64 = 65536.0;
const KAPPA: f64 = 200.0;
/// Target standard deviations of the dense, row and interaction parts (before `signal`).
const STD_DENSE: f64 = 0.6;
const STD_ROWS: f64 = 1.4;
const STD_INTER: f64 = 0.4;
/// Target positive rate.
pub const TARGET_POSITIVE_RATE: f64 = 0.27;
/// Probability of an empty bag, in 1/2^32.
const EMPTY_BAG_P32: u64 = (0.05 * 4294967296.0) as u64;
const DENSE_MISSING_P16: u64 = (0.10 * 65536.0) as u64;
/// A dense feature is drawn as one of this many equally likely values (10 random bits).
const DENSE_QUANTILES: usize = 1024;

const TAG_IDS: u64 = 0x1D5;
const TAG_DENSE: u64 = 0xDE45E;
const TAG_LABEL: u64 = 0x1ABE1;
const TAG_TABLE: u64 = 0x7AB1E;
const TAG_COEF: u64 = 0xC0EF;
const K_ID: u64 = 0x9E37_79B9_7F4A_7C15;
const K_TAIL: u64 = 0xD1B5_4A32_D192_ED03;

#[inline]
fn mulhi(h: u64, n: u64) -> u64 {
    ((h as u128 * n as u128) >> 64) as u64
}

/// Approximately standard normal from 64 bits (Irwin–Hall of four 16-bit uniforms).
#[inline]
fn normal4(h: u64) -> f64 {
    let s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48);
    (s as f64 / 65536.0 - 2.0) * 3f64.sqrt()
}

/// Approximately standard normal from the low 48 bits (three 16-bit uniforms).
#[inline]
fn normal3(h: u64) -> f64 {
    let s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF);
    (s as f64 / 65536.0 - 1.5) * 2.0
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn mod_inverse(a: u64, m: u64) -> u64 {
    if m <= 1 {
        return 0;
    }
    let (mut t, mut nt, mut r, mut nr) = (0i128, 1i128, m as i128, a as i128);
    while nr != 0 {
        let q = r / nr;
        (t, nt) = (nt, t - q * nt);
        (r, nr) = (nr, r - q * nr);
    }
    t.rem_euclid(m as i128) as u64
}

/// Vose alias table: entry i = (threshold in 1/2^32, alias). Draw i uniformly, keep it when the
/// coin is below the threshold, else take the alias (an entry that is always kept aliases itself).
fn build_alias(p: &[f64]) -> Vec<(u32, u32)> {
    let n = p.len();
    let mut scaled: Vec<f64> = p.iter().map(|&x| x * n as f64).collect();
    let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < 1.0);
    let mut out: Vec<(u32, u32)> = (0..n).map(|i| (u32::MAX, i as u32)).collect();
    while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
        small.pop();
        large.pop();
        out[s] = ((scaled[s] * 4294967296.0).min(4294967295.0) as u32, l as u32);
        scaled[l] += scaled[s] - 1.0;
        if scaled[l] < 1.0 {
            small.push(l);
        } else {
            large.push(l);
        }
    }
    out
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

/// One table's id distribution and planted effects.
///
/// Non-uniform tables draw from one alias table over `head` single ranks (0 .. head, exact
/// Zipf probabilities) followed by buckets of 1/16 octave that cover the rare tail
/// (piecewise uniform inside a bucket, bucket mass = the integral of the power law).
#[derive(Clone, Debug)]
struct TableGen {
    rows: u64,
    bag: usize,
    mean_pool: bool,
    uniform: bool,
    /// row = (a·rank + b) mod rows; rank = a_inv·(row − b) mod rows.
    a: u64,
    b: u64,
    a_inv: u64,
    head: usize,
    alias: Vec<(u32, u32)>,
    /// Per entry: first rank, number of ranks (1 for the head), learnability weight,
    /// row (head entries only), probability of one rank of the entry.
    ent_lo: Vec<u64>,
    ent_size: Vec<u64>,
    ent_w: Vec<f32>,
    ent_row: Vec<u64>,
    ent_p: Vec<f64>,
    /// Uniform tables: the weight of every row.
    uniform_w: f64,
    eff_seed: u64,
    lat_seed: u64,
    latent: bool,
}

impl TableGen {
    fn new(seed: u64, t: usize, rows: u64, bag: usize, pooling: Pooling, s: f64, latent: bool) -> Self {
        let uniform = s == 0.0;
        let hs = hash3(seed, TAG_TABLE, t as u64, 0);
        let (a, b) = if uniform || rows <= 2 {
            (1, 0)
        } else {
            let mut a = 1 + mulhi(mix64(hs ^ 1), rows - 1);
            while gcd(a, rows) != 1 {
                a = if a + 1 >= rows { 1 } else { a + 1 };
            }
            (a, mulhi(mix64(hs ^ 2), rows))
        };
        // Expected occurrences of a rank of probability p in REF_SAMPLES samples: occ · p.
        let occ = REF_SAMPLES * bag as f64 * 0.95;
        let weight = |p: f64| {
            let n = (occ * p / KAPPA).powi(2);
            n / (n + 1.0)
        };
        let mut g = TableGen {
            rows,
            bag,
            mean_pool: pooling == Pooling::Mean,
            uniform,
            a,
            b,
            a_inv: mod_inverse(a, rows),
            head: 0,
            alias: Vec::new(),
            ent_lo: Vec::new(),
            ent_size: Vec::new(),
            ent_w: Vec::new(),
            ent_row: Vec::new(),
            ent_p: Vec::new(),
            uniform_w: weight(1.0 / rows as f64),
            eff_seed: mix64(hs ^ 3),
            lat_seed: mix64(hs ^ 4),
            latent,
        };
        if uniform {
            return g;
        }
        let head = (rows as usize).min(HEAD_MAX);
        let mut mass: Vec<f64> = (1..=head).map(|r| (r as f64).powf(-s)).collect();
        let mut lo: Vec<u64> = (0..head as u64).collect();
        let mut size: Vec<u64> = vec![1; head];
        // Tail buckets over 0-based ranks [l, h) = continuous 1-based [l + 0.5, h + 0.5).
        let integral = |l: f64, h: f64| {
            if (s - 1.0).abs() < 1e-12 {
                (h / l).ln()
            } else {
                (h.powf(1.0 - s) - l.powf(1.0 - s)) / (1.0 - s)
            }
        };
        let mut l = head as u64;
        let mut k = 1;
        while l < rows {
            let h = ((head as f64 * 2f64.powf(k as f64 / 16.0)).ceil() as u64).max(l + 1).min(rows);
            mass.push(integral(l as f64 + 0.5, h as f64 + 0.5));
            lo.push(l);
            size.push(h - l);
            l = h;
            k += 1;
        }
        let z: f64 = mass.iter().sum();
        g.alias = build_alias(&mass.iter().map(|m| m / z).collect::<Vec<_>>());
        g.ent_p = mass.iter().zip(&size).map(|(m, &n)| m / z / n as f64).collect();
        g.ent_w = g.ent_p.iter().map(|&p| weight(p) as f32).collect();
        g.ent_row = (0..head as u64).map(|r| g.perm(r)).collect();
        g.ent_lo = lo;
        g.ent_size = size;
        g.head = head;
        g
    }

    /// Alias-table entry holding `rank`.
    #[inline]
    fn entry_of(&self, rank: u64) -> usize {
        if (rank as usize) < self.head {
            rank as usize
        } else {
            self.ent_lo.partition_point(|&l| l <= rank) - 1
        }
    }

    /// Probability that one draw is `rank`.
    fn rank_p(&self, rank: u64) -> f64 {
        if self.uniform {
            1.0 / self.rows as f64
        } else {
            self.ent_p[self.entry_of(rank)]
        }
    }

    #[inline]
    fn weight(&self, rank: u64) -> f64 {
        if self.uniform {
            self.uniform_w
        } else {
            self.ent_w[self.entry_of(rank)] as f64
        }
    }

    #[inline]
    fn perm(&self, rank: u64) -> u64 {
        if self.rows <= 1 << 32 {
            return (self.a * rank + self.b) % self.rows;
        }
        ((self.a as u128 * rank as u128 + self.b as u128) % self.rows as u128) as u64
    }

    #[inline]
    fn rank_of(&self, row: u64) -> u64 {
        if self.uniform {
            return row;
        }
        let d = (row % self.rows + self.rows - self.b) % self.rows;
        if self.rows <= 1 << 32 {
            return (self.a_inv * d) % self.rows;
        }
        ((self.a_inv as u128 * d as u128) % self.rows as u128) as u64
    }

    /// One draw from 64 random bits: (rank, row, learnability weight).
    #[inline]
    fn draw(&self, h: u64) -> (u64, u64, f64) {
        if self.uniform {
            let r = mulhi(h, self.rows);
            return (r, r, self.uniform_w);
        }
        let i = (((h & 0xFFFF_FFFF) * self.alias.len() as u64) >> 32) as usize;
        let (th, al) = self.alias[i];
        let e = if ((h >> 32) as u32) < th { i } else { al as usize };
        let w = self.ent_w[e] as f64;
        if e < self.head {
            (e as u64, self.ent_row[e], w)
        } else {
            let r = self.ent_lo[e] + mulhi(mix64(h ^ K_TAIL), self.ent_size[e]);
            (r, self.perm(r), w)
        }
    }

    /// Bag length from the (sample, table) hash.
    #[inline]
    fn bag_len(&self, h: u64) -> usize {
        let v = mix64(h);
        if (v >> 32) < EMPTY_BAG_P32 {
            return 0;
        }
        let lo = (self.bag + 1) / 2;
        let hi = self.bag + self.bag / 2;
        lo + mulhi((v & 0xFFFF_FFFF) << 32, (hi - lo + 1) as u64) as usize
    }

    /// Planted scalar effect of a rank.
    #[inline]
    fn effect(&self, rank: u64, w: f64) -> f64 {
        normal4(mix64(self.eff_seed ^ rank)) * w
    }

    /// Planted latent vector of a rank, added into `acc`.
    #[inline]
    fn add_latent(&self, rank: u64, w: f64, acc: &mut [f64; LATENT_DIM]) {
        let h = mix64(self.lat_seed ^ rank);
        for (j, a) in acc.iter_mut().enumerate() {
            let lane = (h >> (16 * j)) & 0xFFFF;
            *a += (lane as f64 / 65536.0 - 0.5) * 12f64.sqrt() * w;
        }
    }
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
