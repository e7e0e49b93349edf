//! Memory-mapped datasets (`ember train --data DIR|FILE` on preprocessed data): which files a
//! path names and in which format, the train/eval split, epochs with a per-epoch shuffle of the
//! file order, and random access by global sample index so every rank of a grid reads only its
//! own samples (BRIEF.md §2).
//!
//! A path is one of:
//! - an Ember binary file (detected from its magic), or a folder of them (`*.ember`);
//! - a TorchRec/MLPerf day (`day_N_dense.npy`, named directly or as one of its three files), or
//!   a folder of days (`day_N_*`), read by [`super::npy`];
//! - anything else is Criteo text (the caller's [`super::criteo`] reader).
//!
//! Files are ordered by name, numbers compared as numbers (`day_2` before `day_10`). Every
//! file is opened and checked against the model (layout, table rows, sizes) before training.
//!
//! Split: with a separate eval path, all the samples of the data are the training set and all of
//! the eval path's the eval set; without one, the last `floor(samples / 10)` samples (in file
//! order, as the text reader does) are the eval set. Epoch e visits the training part's files
//! (whole files, and the part of a file the eval range leaves) in an order drawn from
//! (seed, e); global sample g is sample g mod len of epoch g / len. The eval set is read chunk
//! by chunk from the mapped files ([`MappedEval`], an [`EvalSet`]), never whole.
use crate::config::ModelConfig;
use crate::data::binary::{BinaryFile, MAGIC};
use crate::data::npy::NpyDay;
use crate::data::{Batch, DataSource, EvalSet};
use crate::{Error, Result};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What a `--data` path holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    /// Ember binary files.
    Binary(Vec<PathBuf>),
    /// TorchRec/MLPerf days, as `DIR/day_N` prefixes, and whether the multi-hot `.npz` is read.
    Npy(Vec<PathBuf>, bool),
    /// Criteo text.
    Text(PathBuf),
}

/// Natural order: runs of digits compare as numbers.
fn natural_key(s: &str) -> Vec<(String, u128)> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            let mut n = c.to_digit(10).unwrap_or(0) as u128;
            while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                n = n.saturating_mul(10).saturating_add(d as u128);
                chars.next();
            }
            out.push((std::mem::take(&mut text), n));
        } else {
            text.push(c);
        }
    }
    out.push((text, u128::MAX));
    out
}

fn sort_natural(v: &mut [PathBuf]) {
    v.sort_by_cached_key(|p| natural_key(&p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()));
}

/// `DIR/day_N` of a file `DIR/day_N_<part>.np[yz]`.
fn day_prefix(p: &Path) -> Option<PathBuf> {
    let name = p.file_name()?.to_str()?;
    for part in ["_dense.npy", "_labels.npy", "_sparse.npy", "_sparse_multi_hot.npz"] {
        if let Some(stem) = name.strip_suffix(part) {
            return Some(p.with_file_name(stem));
        }
    }
    None
}

/// Whether the multi-hot `.npz` of a day is read: when it exists and the model has multi-hot
/// tables (or the one-hot `.npy` is missing).
fn use_multi_hot(prefix: &Path, model: &ModelConfig) -> bool {
    let (_, _, mh) = crate::data::npy::day_files(prefix, true);
    let (_, _, oh) = crate::data::npy::day_files(prefix, false);
    mh.exists() && (model.tables.iter().any(|t| t.bag_size > 1) || !oh.exists())
}

/// Detects what `path` holds (see the module doc).
pub fn detect(path: &Path, model: &ModelConfig) -> Result<Format> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let mut ember = Vec::new();
        let mut days = Vec::new();
        for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let p = e.map_err(|e| Error::io(path, e))?.path();
            if p.extension().is_some_and(|x| x == "ember") {
                ember.push(p);
            } else if p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with("_dense.npy")) {
                days.extend(day_prefix(&p));
            }
        }
        return match (ember.is_empty(), days.is_empty()) {
            (false, true) => {
                sort_natural(&mut ember);
                Ok(Format::Binary(ember))
            }
            (true, false) => {
                sort_natural(&mut days);
                let mh = use_multi_hot(&days[0], model);
                Ok(Format::Npy(days, mh))
            }
            (false, false) => Err(Error::Input(format!("{}: holds both .ember files and day_N_*.npy files; name one kind", path.display()))),
            (true, true) => Err(Error::Input(format!("{}: a folder with neither .ember files nor day_N_dense.npy files", path.display()))),
        };
    }
    let mut magic = [0u8; 8];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut magic)).map_err(|e| Error::io(path, e))?;
    if n == 8 && magic == MAGIC {
        return Ok(Format::Binary(vec![path.to_path_buf()]));
    }
    if magic.starts_with(b"\x93NUMPY") || path.extension().is_some_and(|x| x == "npz") {
        let prefix = day_prefix(path).ok_or_else(|| {
            Error::Input(format!("{}: a .npy file not named day_N_dense.npy, day_N_labels.npy, day_N_sparse.npy or day_N_sparse_multi_hot.npz", path.display()))
        })?;
        let mh = path.extension().is_some_and(|x| x == "npz") || use_multi_hot(&prefix, model);
        return Ok(Format::Npy(vec![prefix], mh));
    }
    Ok(Format::Text(path.to_path_buf()))
}

/// One memory-mapped file of samples.
#[derive(Debug)]
pub enum MappedFile {
    Binary(BinaryFile),
    Npy(NpyDay),
}

impl MappedFile {
    pub fn samples(&self) -> u64 {
        match self {
            MappedFile::Binary(f) => f.samples(),
            MappedFile::Npy(d) => d.samples(),
        }
    }
    pub fn path(&self) -> &Path {
        match self {
            MappedFile::Binary(f) => f.path(),
            MappedFile::Npy(d) => &d.dense_path,
        }
    }
    /// Appends samples `[start, start + n)` of this file to `out`.
    pub fn read_into(&self, start: u64, n: usize, out: &mut Batch) -> Result<()> {
        match self {
            MappedFile::Binary(f) => f.read_into(start, n, out),
            MappedFile::Npy(d) => d.read_into(start, n, out),
        }
    }
}

/// Opens every file of a binary or npy [`Format`] and checks it against `model`.
pub fn open_files(format: &Format, model: &ModelConfig) -> Result<Vec<MappedFile>> {
    let files = match format {
        Format::Binary(paths) => paths
            .iter()
            .map(|p| {
                let f = BinaryFile::open(p)?;
                f.check_model(model)?;
                Ok(MappedFile::Binary(f))
            })
            .collect::<Result<Vec<_>>>()?,
        Format::Npy(days, mh) => days.iter().map(|d| NpyDay::open(d, *mh, model).map(MappedFile::Npy)).collect::<Result<Vec<_>>>()?,
        Format::Text(p) => return Err(Error::Input(format!("{}: Criteo text, not a memory-mapped format (ember convert writes one)", p.display()))),
    };
    if let Some(f) = files.iter().find(|f| f.samples() == 0) {
        return Err(Error::Input(format!("{}: holds no samples", f.path().display())));
    }
    Ok(files)
}

/// A run of consecutive samples of one file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub file: usize,
    pub start: u64,
    pub len: u64,
}

/// Where consecutive samples of a list of segments lie: `(file, start, n)` pieces of samples
/// `[at, at + n)` of the concatenation.
fn pieces(segs: &[Segment], mut at: u64, mut n: u64, mut f: impl FnMut(Segment) -> Result<()>) -> Result<()> {
    for s in segs {
        if n == 0 {
            break;
        }
        if at >= s.len {
            at -= s.len;
            continue;
        }
        let k = (s.len - at).min(n);
        f(Segment { file: s.file, start: s.start + at, len: k })?;
        n -= k;
        at = 0;
    }
    Ok(())
}

/// Empty batch of the data's layout with room for `n` samples' labels and dense values.
fn empty(num_dense: usize, num_tables: usize, n: usize) -> Batch {
    let mut b = Batch::new(num_dense, num_tables);
    b.dense.reserve(n * num_dense);
    b.labels.reserve(n);
    b
}

/// The eval part of a [`MappedData`] as an [`EvalSet`]: each chunk is read from the mapped files
/// when asked for, so memory holds one chunk (and the page cache the pages it touched).
#[derive(Clone, Debug)]
pub struct MappedEval {
    files: Arc<Vec<MappedFile>>,
    segs: Vec<Segment>,
    len: u64,
    num_dense: usize,
    num_tables: usize,
}

impl MappedEval {
    /// Eval samples.
    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Eval samples `[at, at + n)` (clipped to the eval part).
    pub fn read(&self, at: u64, n: usize) -> Result<Batch> {
        let n = (n as u64).min(self.len.saturating_sub(at));
        let mut b = empty(self.num_dense, self.num_tables, n as usize);
        pieces(&self.segs, at, n, |s| self.files[s.file].read_into(s.start, s.len as usize, &mut b))?;
        Ok(b)
    }
}

impl EvalSet for MappedEval {
    fn chunk(&self, k: usize, n: usize) -> Result<Batch> {
        if n == 0 {
            return Err(Error::Input("eval chunk of 0 samples".into()));
        }
        // A start past u64 is past the end: an empty chunk.
        let at = (k as u64).checked_mul(n as u64).unwrap_or(u64::MAX);
        self.read(at, n)
    }
}

/// Memory-mapped training data: the training and eval parts, epochs, and reads by global index.
#[derive(Clone, Debug)]
pub struct MappedData {
    files: Arc<Vec<MappedFile>>,
    train: Vec<Segment>,
    eval: MappedEval,
    train_len: u64,
    epochs: u64,
    seed: u64,
    num_dense: usize,
    num_tables: usize,
    pos: u64,
}

impl MappedData {
    /// The data of `format` (and the eval data of `eval`, when given), checked against `model`,
    /// for `epochs` epochs with file orders drawn from `seed`.
    pub fn open(format: &Format, eval: Option<&Format>, model: &ModelConfig, epochs: u64, seed: u64) -> Result<MappedData> {
        if epochs == 0 {
            return Err(Error::Config("epochs must be at least 1".into()));
        }
        let files = Arc::new(open_files(format, model)?);
        let all: Vec<Segment> = files.iter().enumerate().map(|(i, f)| Segment { file: i, start: 0, len: f.samples() }).collect();
        let total: u64 = all.iter().map(|s| s.len).sum();
        let (train, eval_segs, eval_files) = match eval {
            Some(e) => {
                let ef = Arc::new(open_files(e, model)?);
                let segs = ef.iter().enumerate().map(|(i, f)| Segment { file: i, start: 0, len: f.samples() }).collect();
                (all, segs, ef)
            }
            None => {
                // The last floor(total / 10) samples, as the text reader holds out.
                let cut = total - total / 10;
                let (mut train, mut ev) = (Vec::new(), Vec::new());
                let mut at = 0;
                for s in all {
                    let a = cut.saturating_sub(at).min(s.len);
                    if a > 0 {
                        train.push(Segment { len: a, ..s });
                    }
                    if a < s.len {
                        ev.push(Segment { start: a, len: s.len - a, ..s });
                    }
                    at += s.len;
                }
                (train, ev, files.clone())
            }
        };
        let train_len: u64 = train.iter().map(|s| s.len).sum();
        let eval_len: u64 = eval_segs.iter().map(|s: &Segment| s.len).sum();
        if train_len == 0 {
            return Err(Error::Input("the data holds no training samples".into()));
        }
        if eval_len == 0 {
            return Err(Error::Config(format!(
                "{total} samples leave no eval set (the last 10 %): at least 10 are needed, or a separate --eval-data"
            )));
        }
        train_len.checked_mul(epochs).ok_or_else(|| Error::Config(format!("{epochs} epochs of {train_len} samples overflow")))?;
        Ok(MappedData {
            files,
            train,
            eval: MappedEval { files: eval_files, segs: eval_segs, len: eval_len, num_dense: model.num_dense, num_tables: model.tables.len() },
            train_len,
            epochs,
            seed,
            num_dense: model.num_dense,
            num_tables: model.tables.len(),
            pos: 0,
        })
    }

    pub fn files(&self) -> &[MappedFile] {
        &self.files
    }
    /// Training samples of one epoch.
    pub fn train_len(&self) -> u64 {
        self.train_len
    }
    pub fn eval_len(&self) -> u64 {
        self.eval.len
    }
    /// The eval set, read chunk by chunk (memory: one chunk).
    pub fn eval_stream(&self) -> MappedEval {
        self.eval.clone()
    }
    pub fn epochs(&self) -> u64 {
        self.epochs
    }
    /// The training segments of epoch `e`, in its file order (a seeded shuffle of the segments).
    pub fn epoch_order(&self, e: u64) -> Vec<Segment> {
        let mut v = self.train.clone();
        let mut rng = crate::rng::Rng::new(crate::rng::hash3(self.seed, 0xDA7A, e, 0));
        for i in (1..v.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
        v
    }

    /// Training samples `[g, g + n)` of the stream of all epochs (global sample indices, as the
    /// grid assigns them): only those samples' bytes are read.
    pub fn read_global(&self, g: u64, n: usize) -> Result<Batch> {
        let end = g.checked_add(n as u64).filter(|&e| e <= self.train_len * self.epochs).ok_or_else(|| {
            Error::Input(format!("samples {g}..{g}+{n} past the end of {} epochs of {} samples", self.epochs, self.train_len))
        })?;
        let mut b = empty(self.num_dense, self.num_tables, n);
        let mut at = g;
        while at < end {
            let e = at / self.train_len;
            let lo = at % self.train_len;
            let k = (end - at).min(self.train_len - lo);
            pieces(&self.epoch_order(e), lo, k, |s| self.files[s.file].read_into(s.start, s.len as usize, &mut b))?;
            at += k;
        }
        Ok(b)
    }

}

impl DataSource for MappedData {
    fn next_batch(&mut self, n: usize) -> Result<Option<Batch>> {
        let total = self.train_len * self.epochs;
        if self.pos >= total {
            return Ok(None);
        }
        let k = (n as u64).min(total - self.pos) as usize;
        let b = self.read_global(self.pos, k)?;
        self.pos += k as u64;
        Ok(Some(b))
    }
    fn position(&self) -> u64 {
        self.pos
    }
    fn skip(&mut self, n: u64) -> Result<()> {
        self.pos = self.pos.saturating_add(n).min(self.train_len * self.epochs);
        Ok(())
    }
    fn eval_set(&mut self) -> Result<Batch> {
        self.eval.read(0, usize::try_from(self.eval.len).map_err(|_| Error::Input("eval set too large".into()))?)
    }
    fn len(&self) -> Option<u64> {
        Some(self.train_len * self.epochs)
    }
}
