//! Training data: the `Batch` type (what the input all-to-all carries), data sources, the
//! synthetic and Criteo text readers, and the memory-mapped formats (Ember binary, TorchRec and
//! MLPerf `.npy`) with the conversion from text.
//!
//! A batch holds dense features, labels and one jagged id list per sparse feature (lengths +
//! values, ids 64-bit). Feature `f` looks up table `f`.
use crate::config::ModelConfig;
use crate::{Error, Result};

pub mod binary;
pub mod convert;
pub mod criteo;
pub mod dataset;
pub mod mapped;
pub mod npy;
pub mod synthetic;

/// Variable-length id lists, one per sample ("bags"): `lengths[i]` ids of sample `i`,
/// stored back to back in `values`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Jagged {
    pub lengths: Vec<u32>,
    pub values: Vec<u64>,
}

impl Jagged {
    pub fn with_capacity(bags: usize, ids: usize) -> Self {
        Jagged { lengths: Vec::with_capacity(bags), values: Vec::with_capacity(ids) }
    }
    pub fn num_bags(&self) -> usize {
        self.lengths.len()
    }
    /// 64-bit exclusive-prefix offsets, `num_bags + 1` long.
    pub fn offsets(&self) -> Vec<u64> {
        let mut off = Vec::with_capacity(self.lengths.len() + 1);
        let mut acc = 0u64;
        off.push(0);
        for &l in &self.lengths {
            acc += l as u64;
            off.push(acc);
        }
        off
    }
    pub fn push_bag(&mut self, ids: &[u64]) {
        self.lengths.push(ids.len() as u32);
        self.values.extend_from_slice(ids);
    }
    /// Bags `range` as a new jagged list.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Jagged {
        let start: usize = self.lengths[..range.start].iter().map(|&l| l as usize).sum();
        let len: usize = self.lengths[range.clone()].iter().map(|&l| l as usize).sum();
        Jagged { lengths: self.lengths[range].to_vec(), values: self.values[start..start + len].to_vec() }
    }
    /// Append another jagged list's bags.
    pub fn extend(&mut self, other: &Jagged) {
        self.lengths.extend_from_slice(&other.lengths);
        self.values.extend_from_slice(&other.values);
    }
}

/// One batch of samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub num_dense: usize,
    /// (size, num_dense), row-major.
    pub dense: Vec<f32>,
    /// (size), each 0.0 or 1.0.
    pub labels: Vec<f32>,
    /// One per sparse feature.
    pub sparse: Vec<Jagged>,
}

impl Batch {
    pub fn new(num_dense: usize, num_sparse: usize) -> Self {
        Batch { num_dense, dense: Vec::new(), labels: Vec::new(), sparse: vec![Jagged::default(); num_sparse] }
    }
    pub fn size(&self) -> usize {
        self.labels.len()
    }
    /// Samples `range` as a new batch.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Batch {
        Batch {
            num_dense: self.num_dense,
            dense: self.dense[range.start * self.num_dense..range.end * self.num_dense].to_vec(),
            labels: self.labels[range.clone()].to_vec(),
            sparse: self.sparse.iter().map(|j| j.slice(range.clone())).collect(),
        }
    }
    /// Append another batch's samples.
    pub fn extend(&mut self, other: &Batch) {
        self.dense.extend_from_slice(&other.dense);
        self.labels.extend_from_slice(&other.labels);
        for (a, b) in self.sparse.iter_mut().zip(&other.sparse) {
            a.extend(b);
        }
    }

    /// Checks shapes, id ranges and finiteness against the model; the error names the sample.
    pub fn validate(&self, model: &ModelConfig) -> Result<()> {
        let n = self.size();
        if self.num_dense != model.num_dense || self.dense.len() != n * model.num_dense {
            return Err(Error::Input(format!(
                "batch has {} dense values for {n} samples of {} features; model wants {} features",
                self.dense.len(),
                self.num_dense,
                model.num_dense
            )));
        }
        if self.sparse.len() != model.tables.len() {
            return Err(Error::Input(format!(
                "batch has {} sparse features, model has {} tables",
                self.sparse.len(),
                model.tables.len()
            )));
        }
        if let Some(i) = self.dense.iter().position(|x| !x.is_finite()) {
            return Err(Error::Input(format!("dense feature {} of sample {} is not finite", i % self.num_dense, i / self.num_dense)));
        }
        if let Some(i) = self.labels.iter().position(|&y| y != 0.0 && y != 1.0) {
            return Err(Error::Input(format!("label of sample {i} is {}, not 0 or 1", self.labels[i])));
        }
        for (f, (j, t)) in self.sparse.iter().zip(&model.tables).enumerate() {
            if j.lengths.len() != n {
                return Err(Error::Input(format!("feature {f} has {} bags for {n} samples", j.lengths.len())));
            }
            let total: u64 = j.lengths.iter().map(|&l| l as u64).sum();
            if total != j.values.len() as u64 {
                return Err(Error::Input(format!("feature {f}: lengths sum to {total} but {} ids given", j.values.len())));
            }
            if let Some(k) = j.values.iter().position(|&id| id >= t.rows) {
                return Err(Error::Input(format!(
                    "feature {f}: id {} at position {k} out of range for table of {} rows",
                    j.values[k], t.rows
                )));
            }
        }
        Ok(())
    }
}

/// A stream of samples. Sources are deterministic and seekable by sample index so that
/// every rank of a grid can read exactly its own samples and a resume can restart anywhere.
pub trait DataSource: Send {
    /// The next `n` samples, or fewer at the end of the stream (None when exhausted).
    fn next_batch(&mut self, n: usize) -> Result<Option<Batch>>;
    /// Samples consumed so far.
    fn position(&self) -> u64;
    /// Skip `n` samples without returning them.
    fn skip(&mut self, n: u64) -> Result<()>;
    /// The held-out evaluation set.
    fn eval_set(&mut self) -> Result<Batch>;
    /// Total training samples, when known (one epoch).
    fn len(&self) -> Option<u64>;
    /// Malformed training lines skipped so far (sources that may skip any).
    fn skipped(&self) -> u64 {
        0
    }
}

/// A held-out evaluation set read in chunks of consecutive samples, so that it never has to
/// fit in memory whole. Ranks evaluating together share one set and ask for the same chunks in
/// the same order; chunk `k` of size `n` is the same batch for every caller.
pub trait EvalSet: Sync {
    /// Samples [k·n, (k+1)·n): fewer in the last chunk, none past the end.
    fn chunk(&self, k: usize, n: usize) -> Result<Batch>;
    /// Malformed lines skipped by the last complete pass over the set.
    fn skipped(&self) -> u64 {
        0
    }
}

/// An in-memory eval set.
impl EvalSet for Batch {
    fn chunk(&self, k: usize, n: usize) -> Result<Batch> {
        let s = k.saturating_mul(n).min(self.size());
        Ok(self.slice(s..s.saturating_add(n).min(self.size())))
    }
}
