//! One table of the synthetic data: its id law (Zipf popularity ranks drawn through one alias
//! table, the rare tail in 1/16-octave buckets, mapped to rows by a fixed affine permutation), its
//! bag lengths, and the planted effect and latent vector of every rank, weighted by how learnable
//! the rank is (the parent module's doc gives the model).
use crate::config::Pooling;
use crate::rng::{hash3, mix64};

/// Ranks sampled with their exact Zipf probability; rarer ranks are drawn by 1/16-octave buckets.
const HEAD_MAX: usize = 1 << 12;
/// Latent dimension of the planted interaction.
pub const LATENT_DIM: usize = 2;
/// Learnability weight w = (n/KAPPA)² / (1 + (n/KAPPA)²), n = expected occurrences of the rank in
/// REF_SAMPLES samples: rows seen less than ~KAPPA times in a few hundred steps carry little.
const REF_SAMPLES: f64 = 65536.0;
const KAPPA: f64 = 200.0;
/// Probability of an empty bag, in 1/2^32.
const EMPTY_BAG_P32: u64 = (0.05 * 4294967296.0) as u64;
const TAG_TABLE: u64 = 0x7AB1E;
const K_TAIL: u64 = 0xD1B5_4A32_D192_ED03;

#[inline]
fn mulhi(h: u64, n: u64) -> u64 {
    ((h as u128 * n as u128) >> 64) as u64
}

/// Approximately standard normal from 64 bits (Irwin–Hall of four 16-bit uniforms).
#[inline]
pub(super) fn normal4(h: u64) -> f64 {
    let s = (h & 0xFFFF) + ((h >> 16) & 0xFFFF) + ((h >> 32) & 0xFFFF) + (h >> 48);
    (s as f64 / 65536.0 - 2.0) * 3f64.sqrt()
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
/// One table's id distribution and planted effects.
///
/// Non-uniform tables draw from one alias table over `head` single ranks (0 .. head, exact
/// Zipf probabilities) followed by buckets of 1/16 octave that cover the rare tail
/// (piecewise uniform inside a bucket, bucket mass = the integral of the power law).
#[derive(Clone, Debug)]
pub(super) struct TableGen {
    rows: u64,
    bag: usize,
    pub(super) mean_pool: bool,
    pub(super) uniform: bool,
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
    pub(super) latent: bool,
}

impl TableGen {
    pub(super) fn new(seed: u64, t: usize, rows: u64, bag: usize, pooling: Pooling, s: f64, latent: bool) -> Self {
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
    pub(super) fn rank_p(&self, rank: u64) -> f64 {
        if self.uniform {
            1.0 / self.rows as f64
        } else {
            self.ent_p[self.entry_of(rank)]
        }
    }

    #[inline]
    pub(super) fn weight(&self, rank: u64) -> f64 {
        if self.uniform {
            self.uniform_w
        } else {
            self.ent_w[self.entry_of(rank)] as f64
        }
    }

    #[inline]
    pub(super) fn perm(&self, rank: u64) -> u64 {
        if self.rows <= 1 << 32 {
            return (self.a * rank + self.b) % self.rows;
        }
        ((self.a as u128 * rank as u128 + self.b as u128) % self.rows as u128) as u64
    }

    #[inline]
    pub(super) fn rank_of(&self, row: u64) -> u64 {
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
    pub(super) fn draw(&self, h: u64) -> (u64, u64, f64) {
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
    pub(super) fn bag_len(&self, h: u64) -> usize {
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
    pub(super) fn effect(&self, rank: u64, w: f64) -> f64 {
        normal4(mix64(self.eff_seed ^ rank)) * w
    }

    /// Planted latent vector of a rank, added into `acc`.
    #[inline]
    pub(super) fn add_latent(&self, rank: u64, w: f64, acc: &mut [f64; LATENT_DIM]) {
        let h = mix64(self.lat_seed ^ rank);
        for (j, a) in acc.iter_mut().enumerate() {
            let lane = (h >> (16 * j)) & 0xFFFF;
            *a += (lane as f64 / 65536.0 - 0.5) * 12f64.sqrt() * w;
        }
    }
}
