//! `ember convert`: Criteo text files (raw tab-separated, or the comma-separated form with a
//! header line) to Ember's binary format ([`super::binary`]), one output file per input.
//!
//! One pass per file, streaming: lines are read a fixed-size chunk at a time, parsed with the
//! text reader's [`LineParser`] (so the binary copy holds bit for bit the values the text reader
//! yields) and written a block at a time, so memory does not grow with the input. Files are
//! converted in parallel (rayon), each by one thread. Every id is stored modulo its table's rows,
//! recorded in the header: training with other table sizes is refused.
use crate::config::ModelConfig;
use crate::data::binary::{BinaryWriter, DenseTransform, Feature, Hashing, Header};
use crate::data::criteo::{BadLinePolicy, LineParser, MAX_LINE_BYTES};
use crate::data::Batch;
use crate::{Error, Result};
use rayon::prelude::*;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Bytes read at a time.
const CHUNK: usize = 4 << 20;

/// How to convert.
#[derive(Clone, Copy, Debug)]
pub struct ConvertOptions {
    /// Samples per block of the output.
    pub block_samples: u32,
    pub policy: BadLinePolicy,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions { block_samples: super::binary::DEFAULT_BLOCK_SAMPLES, policy: BadLinePolicy::Fail }
    }
}

/// What one file's conversion did.
#[derive(Clone, Debug)]
pub struct Converted {
    pub input: PathBuf,
    pub output: PathBuf,
    pub samples: u64,
    /// Bad lines skipped (with [`BadLinePolicy::Skip`]).
    pub skipped: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub seconds: f64,
}

/// Calls `f(line_number, line)` for every line of `path` (1-based, its end stripped), reading a
/// chunk at a time; a line longer than [`MAX_LINE_BYTES`] is an error naming it. Returns the
/// bytes read.
pub fn scan_lines(path: &Path, mut f: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
    let io = |e| Error::io(path, e);
    let mut file = File::open(path).map_err(io)?;
    let mut buf = vec![0u8; CHUNK + MAX_LINE_BYTES + 2];
    let (mut have, mut line_no, mut total) = (0usize, 0u64, 0u64);
    let too_long = |line: u64| Error::Data { path: path.to_path_buf(), line, msg: format!("the line is longer than the limit of {MAX_LINE_BYTES} bytes") };
    loop {
        let n = file.read(&mut buf[have..]).map_err(io)?;
        total += n as u64;
        have += n;
        let mut start = 0;
        while let Some(i) = memchr::memchr(b'\n', &buf[start..have]) {
            line_no += 1;
            if i > MAX_LINE_BYTES + 1 {
                return Err(too_long(line_no));
            }
            f(line_no, trim_cr(&buf[start..start + i]))?;
            start += i + 1;
        }
        if n == 0 {
            if start < have {
                line_no += 1;
                f(line_no, trim_cr(&buf[start..have]))?;
            }
            return Ok(total);
        }
        if have - start > MAX_LINE_BYTES + 1 {
            return Err(too_long(line_no + 1));
        }
        buf.copy_within(start..have, 0);
        have -= start;
    }
}

#[inline]
fn trim_cr(l: &[u8]) -> &[u8] {
    match l.last() {
        Some(b'\r') => &l[..l.len() - 1],
        _ => l,
    }
}

/// An Ember binary or NumPy file given as text: said so, instead of a parse error at line 1.
fn refuse_preprocessed(path: &Path) -> Result<()> {
    let mut magic = [0u8; 8];
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let n = f.read(&mut magic).map_err(|e| Error::io(path, e))?;
    let what = if n == 8 && magic == super::binary::MAGIC {
        "an Ember binary file already (train reads it as it is)"
    } else if magic.starts_with(b"\x93NUMPY") || magic.starts_with(b"PK\x03\x04") {
        "a NumPy .npy/.npz file (train reads the TorchRec and MLPerf layouts as they are)"
    } else {
        return Ok(());
    };
    Err(Error::Input(format!("{}: {what}; ember convert reads Criteo text", path.display())))
}

/// Parses every sample of a Criteo text file in one pass, handing them to `sink` in batches of
/// `batch` samples (the last one shorter); returns (samples, bad lines skipped, bytes read). Detects the layout from line 1 as the text
/// reader does (tabs or commas; a header when its first field is not a number).
pub fn parse_file(path: &Path, model: &ModelConfig, policy: BadLinePolicy, batch_size: usize, mut sink: impl FnMut(&Batch) -> Result<()>) -> Result<(u64, u64, u64)> {
    refuse_preprocessed(path)?;
    let mut parser: Option<LineParser> = None;
    // Room for a whole batch of one-hot samples up front: no reallocation while it fills.
    let mut batch = Batch::new(model.num_dense, model.tables.len());
    batch.labels.reserve(batch_size);
    batch.dense.reserve(batch_size * model.num_dense);
    for j in &mut batch.sparse {
        j.lengths.reserve(batch_size);
        j.values.reserve(batch_size);
    }
    let clear = |b: &mut Batch| {
        b.dense.clear();
        b.labels.clear();
        for j in &mut b.sparse {
            j.lengths.clear();
            j.values.clear();
        }
    };
    let (mut samples, mut skipped) = (0u64, 0u64);
    let bytes = scan_lines(path, |no, line| {
        if line.is_empty() {
            return Ok(());
        }
        let p = match &mut parser {
            Some(p) => p,
            None => {
                let delim = if line.contains(&b'\t') {
                    b'\t'
                } else if line.contains(&b',') {
                    b','
                } else {
                    return Err(Error::Config(format!("{}: line {no} has neither tabs nor commas: not a Criteo file", path.display())));
                };
                let p = parser.insert(LineParser::new(model, delim));
                let first = line.split(|&c| c == delim).next().unwrap_or_default();
                if std::str::from_utf8(first).ok().and_then(|s| s.trim().parse::<f64>().ok()).is_none() {
                    return Ok(()); // a header line
                }
                p
            }
        };
        match p.parse_into(line, &mut batch) {
            Ok(()) => samples += 1,
            Err(msg) if policy == BadLinePolicy::Fail => return Err(Error::Data { path: path.to_path_buf(), line: no, msg }),
            Err(_) => skipped += 1,
        }
        if batch.size() == batch_size {
            sink(&batch)?;
            clear(&mut batch);
        }
        Ok(())
    })?;
    if batch.size() > 0 {
        sink(&batch)?;
    }
    if samples == 0 {
        return Err(Error::Config(format!("{}: no data lines ({skipped} bad lines skipped): nothing to convert", path.display())));
    }
    Ok((samples, skipped, bytes))
}

/// The header features of `model`: table rows as the modulo of hex values.
pub fn features(model: &ModelConfig) -> Vec<Feature> {
    model.tables.iter().map(|t| Feature { rows: t.rows, hashing: Hashing::HexModRows }).collect()
}

/// Converts one text file to `output` (written atomically).
pub fn convert_file(input: &Path, output: &Path, model: &ModelConfig, opts: ConvertOptions) -> Result<(Converted, Header)> {
    let t = std::time::Instant::now();
    let mut w = BinaryWriter::create(output, model.num_dense, features(model), DenseTransform::Log1pClamp, opts.block_samples)?;
    // Whole blocks: the writer encodes each straight from the parsed batch.
    let (samples, skipped, bytes_in) = parse_file(input, model, opts.policy, opts.block_samples as usize, |b| w.push(b))?;
    let header = w.finish()?;
    let c = Converted {
        input: input.to_path_buf(),
        output: output.to_path_buf(),
        samples,
        skipped,
        bytes_in,
        bytes_out: header.file_bytes,
        seconds: t.elapsed().as_secs_f64(),
    };
    Ok((c, header))
}

/// The output name of `input` in `out_dir`: its file name up to the first dot, plus `.ember`
/// (`day_0` → `day_0.ember`, `train.txt` → `train.ember`).
pub fn output_path(input: &Path, out_dir: &Path) -> Result<PathBuf> {
    let name = input.file_name().and_then(|n| n.to_str()).ok_or_else(|| Error::Input(format!("{}: not a file name", input.display())))?;
    let stem = name.split('.').next().filter(|s| !s.is_empty()).unwrap_or(name);
    Ok(out_dir.join(format!("{stem}.ember")))
}

/// Converts every input into `out_dir` in parallel (one thread per file, up to rayon's pool).
/// Two inputs that would write the same output name are refused before anything is written.
pub fn convert_files(inputs: &[PathBuf], out_dir: &Path, model: &ModelConfig, opts: ConvertOptions) -> Result<Vec<Converted>> {
    let outs = inputs.iter().map(|i| output_path(i, out_dir)).collect::<Result<Vec<_>>>()?;
    for (a, oa) in outs.iter().enumerate() {
        if let Some(b) = outs[..a].iter().position(|ob| ob == oa) {
            return Err(Error::Input(format!("{} and {} would both be written to {}", inputs[b].display(), inputs[a].display(), oa.display())));
        }
    }
    inputs.par_iter().zip(&outs).map(|(i, o)| convert_file(i, o, model, opts).map(|(c, _)| c)).collect()
}
