//! Streaming reader of the Criteo formats: this module owns parsing, preprocessing and the
//! train/eval split of Criteo files (`ember train --data`).
//!
//! Formats (detected from the first line):
//! - raw Criteo: tab-separated, no header: `label, I1..I13, C1..C26`;
//! - comma-separated, with a header line `label,I1,...,C26` (or without one: a header is
//!   recognised by its first field not being a number), as in `tests/data/criteo-sample-200.csv`.
//!
//! Any field but the label may be empty. Preprocessing (BRIEF.md §6): integer x →
//! `ln(1 + max(x, 0))`, parsed as a number so "260.0" and "-1" are read (missing → 0); categorical
//! hex string (1–16 hex digits) → its value modulo the table's rows (missing → an empty bag).
//! The layout must match the model: 1 label + `num_dense` integers + one categorical per table.
//!
//! A bad line (wrong field count, non-numeric integer, bad hex, bad label) is an
//! [`Error::Data`] naming the file and its 1-based line number (the header is line 1), or, with
//! [`BadLinePolicy::Skip`], is skipped and counted ([`CriteoReader::skipped`]). Blank lines are
//! ignored.
//!
//! Split: the file's data lines are counted once at open (a fast newline scan, which also
//! records a seek point every 65536 lines); the last `floor(lines / 10)` are the eval set, the
//! rest the training stream (one epoch). Positions count data lines of the training part
//! (a skipped bad line consumes a position but yields no sample), so `skip` needs no parsing.
//! The eval set is read in chunks ([`CriteoReader::eval_stream`], an [`EvalSet`]), never whole.
//!
//! Limits: a line longer than [`MAX_LINE_BYTES`] is a bad line (read past, never held in
//! memory whole); a file without data lines, and a file too short to have an eval set (fewer
//! than 10 data lines), are errors rather than a run over nothing or a metric of nothing.
use crate::config::ModelConfig;
use crate::data::{Batch, DataSource, EvalSet};
use crate::{Error, Result};
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

mod line;
use line::parse_number;
pub use line::{log_transform, LineParser};

/// Longest line accepted, in bytes without the line end (a Criteo line has a few hundred).
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// What to do with a malformed line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BadLinePolicy {
    /// Stop with an error naming the file and line.
    #[default]
    Fail,
    /// Skip the line and count it.
    Skip,
}

/// The detected file layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CriteoFormat {
    /// b'\t' for raw Criteo, b',' for the CSV form.
    pub delimiter: u8,
    /// Whether line 1 is a header.
    pub header: bool,
}

/// A seek point every this many data lines.
const CHECKPOINT: u64 = 1 << 16;
const IO_BUF: usize = 1 << 20;

/// Strips the trailing "\n" / "\r\n".
#[inline]
fn trim_eol(mut l: &[u8]) -> &[u8] {
    if l.last() == Some(&b'\n') {
        l = &l[..l.len() - 1];
    }
    if l.last() == Some(&b'\r') {
        l = &l[..l.len() - 1];
    }
    l
}

/// What [`read_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Eof,
    /// A line of this many bytes (its end included) is in the buffer.
    Ok(u64),
    /// A line of this many bytes, over the limit, was read past (the buffer holds a prefix).
    TooLong(u64),
}

/// Reads one line (its "\n" included) into `buf`, keeping at most [`MAX_LINE_BYTES`] + 2
/// bytes: a longer line is consumed to its end without being held, and reported.
fn read_line<R: BufRead>(r: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Line> {
    const KEEP: usize = MAX_LINE_BYTES + 2;
    buf.clear();
    let mut total = 0u64;
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            break;
        }
        let (used, done) = match avail.iter().position(|&c| c == b'\n') {
            Some(i) => (i + 1, true),
            None => (avail.len(), false),
        };
        if buf.len() < KEEP {
            buf.extend_from_slice(&avail[..used.min(KEEP - buf.len())]);
        }
        total += used as u64;
        r.consume(used);
        if done {
            break;
        }
    }
    Ok(if total == 0 {
        Line::Eof
    } else if total > KEEP as u64 || trim_eol(buf).len() > MAX_LINE_BYTES {
        Line::TooLong(total)
    } else {
        Line::Ok(total)
    })
}

/// Skips `k` lines of `r`; returns how many were skipped (fewer at end of input).
fn skip_lines<R: BufRead>(r: &mut R, mut k: u64) -> std::io::Result<u64> {
    let want = k;
    while k > 0 {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            break;
        }
        let mut used = buf.len();
        for (i, &c) in buf.iter().enumerate() {
            if c == b'\n' {
                k -= 1;
                if k == 0 {
                    used = i + 1;
                    break;
                }
            }
        }
        let ended_partial = used == buf.len() && buf.last() != Some(&b'\n');
        r.consume(used);
        if ended_partial && r.fill_buf()?.is_empty() {
            // A last line without a newline.
            k -= 1;
            break;
        }
    }
    Ok(want - k)
}

/// A fresh reader of `path` positioned at data line `k` (via the nearest seek point).
fn reader_at(path: &Path, checkpoints: &[u64], k: u64) -> Result<BufReader<File>> {
    let io = |e| Error::io(path, e);
    let ci = ((k / CHECKPOINT) as usize).min(checkpoints.len() - 1);
    let mut r = BufReader::with_capacity(IO_BUF, File::open(path).map_err(io)?);
    r.seek(SeekFrom::Start(checkpoints[ci])).map_err(io)?;
    skip_lines(&mut r, k - ci as u64 * CHECKPOINT).map_err(io)?;
    Ok(r)
}

/// A file's layout and eval split, as an eval stream reads it.
#[derive(Debug)]
struct Shape {
    path: PathBuf,
    first_line: u64,
    policy: BadLinePolicy,
    parser: LineParser,
    num_dense: usize,
    num_tables: usize,
    /// Data lines [start, end) are the eval split.
    start: u64,
    end: u64,
    checkpoints: Vec<u64>,
}

/// Where an eval stream stands.
#[derive(Debug)]
struct EvalCursor {
    reader: BufReader<File>,
    /// Data line the reader is at.
    pos: u64,
    buf: Vec<u8>,
    /// The chunk the next read yields, and the chunk size of this pass.
    next: usize,
    n: usize,
    /// The chunk read last (ranks reading one stream ask for the same chunk in turn).
    last: Option<(usize, Batch)>,
    /// Bad lines skipped in this pass, and in the last complete pass.
    skipped: u64,
    pass_skipped: u64,
}

/// The eval split of a Criteo file as an [`EvalSet`]: chunks of consecutive samples read from
/// the file on demand, one chunk in memory. Chunks are read in order; asking for an earlier
/// chunk (a new evaluation) starts again from the split's first line.
#[derive(Debug)]
pub struct CriteoEval {
    reader: Shape,
    cursor: Mutex<EvalCursor>,
}

impl CriteoEval {
    fn read_chunk(&self, c: &mut EvalCursor) -> Result<Batch> {
        let sh = &self.reader;
        let mut b = Batch::new(sh.num_dense, sh.num_tables);
        let mut parser = sh.parser.clone();
        let ctx = (sh.path.as_path(), sh.first_line, sh.policy);
        CriteoReader::read_into(&mut c.reader, &mut parser, &mut c.buf, ctx, &mut c.pos, sh.end, c.n, &mut b, &mut c.skipped)?;
        if c.pos >= sh.end {
            c.pass_skipped = c.skipped;
        }
        Ok(b)
    }
}

impl EvalSet for CriteoEval {
    fn chunk(&self, k: usize, n: usize) -> Result<Batch> {
        if n == 0 {
            return Err(Error::Input("eval chunk of 0 samples".into()));
        }
        let mut c = self.cursor.lock().map_err(|_| Error::Input(format!("{}: eval reader lock poisoned", self.reader.path.display())))?;
        if let Some((lk, b)) = &c.last {
            if *lk == k && c.n == n {
                return Ok(b.clone());
            }
        }
        if n != c.n || k < c.next {
            let sh = &self.reader;
            c.reader = reader_at(&sh.path, &sh.checkpoints, sh.start)?;
            c.pos = sh.start;
            c.next = 0;
            c.n = n;
            c.last = None;
            c.skipped = 0;
        }
        while c.next <= k {
            let b = self.read_chunk(&mut c)?;
            let i = c.next;
            c.last = Some((i, b));
            c.next += 1;
        }
        Ok(c.last.as_ref().map(|(_, b)| b.clone()).unwrap_or_default())
    }

    fn skipped(&self) -> u64 {
        self.cursor.lock().map(|c| c.pass_skipped.max(c.skipped)).unwrap_or(0)
    }
}

/// A Criteo file as a [`DataSource`]: the first 90 % of its lines are the training stream
/// (one epoch), the last 10 % the eval set. See the module doc.
#[derive(Debug)]
pub struct CriteoReader {
    path: PathBuf,
    format: CriteoFormat,
    policy: BadLinePolicy,
    parser: LineParser,
    num_dense: usize,
    num_tables: usize,
    reader: BufReader<File>,
    /// 1-based file line number of data line 0.
    first_line: u64,
    data_lines: u64,
    train_lines: u64,
    /// Byte offset of data line `k · CHECKPOINT`.
    checkpoints: Vec<u64>,
    /// Training data lines consumed.
    pos: u64,
    skipped_train: u64,
    skipped_eval: u64,
    buf: Vec<u8>,
}

impl CriteoReader {
    /// Opens `path`, detects the format, checks the layout against `model` and counts the lines.
    pub fn open(path: impl AsRef<Path>, model: &ModelConfig, policy: BadLinePolicy) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io = |e| Error::io(&path, e);
        let mut file = BufReader::with_capacity(IO_BUF, File::open(&path).map_err(io)?);
        let mut first = Vec::new();
        let cfg_err = |m: String| Error::Config(format!("{}: {m}", path.display()));
        let first_len = match read_line(&mut file, &mut first).map_err(io)? {
            Line::Eof => 0,
            Line::Ok(n) => n,
            Line::TooLong(n) => return Err(cfg_err(format!("line 1 has {n} bytes, more than the limit of {MAX_LINE_BYTES}: not a Criteo file"))),
        };
        let line1 = trim_eol(&first);
        if line1.is_empty() {
            return Err(cfg_err("empty first line: not a Criteo file".into()));
        }
        let delimiter = if line1.contains(&b'\t') {
            b'\t'
        } else if line1.contains(&b',') {
            b','
        } else {
            return Err(cfg_err("the first line has neither tabs nor commas: not a Criteo file".into()));
        };
        let names: Vec<&[u8]> = line1.split(|&c| c == delimiter).collect();
        let header = parse_number(names[0]).is_none();
        let (nd, nt) = (model.num_dense, model.tables.len());
        if header {
            let ints = names.iter().filter(|n| n.first() == Some(&b'I')).count();
            let cats = names.iter().filter(|n| n.first() == Some(&b'C')).count();
            if ints + cats + 1 == names.len() && (ints != nd || cats != nt) {
                return Err(cfg_err(format!(
                    "the header names {ints} integer and {cats} categorical features, but the model has num_dense = {nd} and {nt} tables"
                )));
            }
        }
        if names.len() != 1 + nd + nt {
            return Err(cfg_err(format!(
                "line 1 has {} fields, but the model expects 1 label + {nd} integer (num_dense) + {nt} categorical (tables) = {} \
                 (Criteo: 13 integer and 26 categorical)",
                names.len(),
                1 + nd + nt
            )));
        }
        let header_bytes = if header { first_len } else { 0 };
        // Count data lines and record seek points.
        let mut f = File::open(&path).map_err(io)?;
        f.seek(SeekFrom::Start(header_bytes)).map_err(io)?;
        let mut checkpoints = vec![header_bytes];
        let mut lines = 0u64;
        let mut offset = header_bytes;
        let mut last = b'\n';
        let file_len = f.metadata().map_err(io)?.len();
        let mut chunk = vec![0u8; (4usize << 20).min(file_len as usize + 1)];
        loop {
            let n = f.read(&mut chunk).map_err(io)?;
            if n == 0 {
                break;
            }
            let c = &chunk[..n];
            let nl = c.iter().filter(|&&b| b == b'\n').count() as u64;
            let next_ck = checkpoints.len() as u64 * CHECKPOINT;
            if lines + nl >= next_ck {
                let mut l = lines;
                for (i, &b) in c.iter().enumerate() {
                    if b == b'\n' {
                        l += 1;
                        if l % CHECKPOINT == 0 {
                            checkpoints.push(offset + i as u64 + 1);
                        }
                    }
                }
            }
            lines += nl;
            offset += n as u64;
            last = c[n - 1];
        }
        if last != b'\n' {
            lines += 1;
        }
        if lines == 0 {
            return Err(cfg_err("no data lines (the file has only a header): nothing to train on".into()));
        }
        let eval = lines / 10;
        let mut reader = BufReader::with_capacity(IO_BUF, File::open(&path).map_err(io)?);
        reader.seek(SeekFrom::Start(header_bytes)).map_err(io)?;
        Ok(CriteoReader {
            parser: LineParser::new(model, delimiter),
            format: CriteoFormat { delimiter, header },
            policy,
            num_dense: nd,
            num_tables: nt,
            reader,
            first_line: if header { 2 } else { 1 },
            data_lines: lines,
            train_lines: lines - eval,
            checkpoints,
            pos: 0,
            skipped_train: 0,
            skipped_eval: 0,
            buf: Vec::with_capacity(1024),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn format(&self) -> CriteoFormat {
        self.format
    }
    /// Data lines in the file (header excluded).
    pub fn data_lines(&self) -> u64 {
        self.data_lines
    }
    /// Lines of the training part (the epoch length; bad lines included).
    pub fn train_lines(&self) -> u64 {
        self.train_lines
    }
    /// Lines of the eval part.
    pub fn eval_lines(&self) -> u64 {
        self.data_lines - self.train_lines
    }
    /// Bad lines skipped so far (training lines read plus the last eval-set read).
    pub fn skipped(&self) -> u64 {
        self.skipped_train + self.skipped_eval
    }

    /// The eval split, read chunk by chunk (an [`EvalSet`]; memory: one chunk). An error when
    /// the file is too short to have one: its metrics would be those of no sample.
    pub fn eval_stream(&self) -> Result<CriteoEval> {
        if self.eval_lines() == 0 {
            return Err(Error::Config(format!(
                "{}: {} data lines leave no eval set (the last 10 %): at least 10 are needed",
                self.path.display(),
                self.data_lines
            )));
        }
        let reader = self.reader_at(self.train_lines)?;
        Ok(CriteoEval {
            reader: self.clone_shape(),
            cursor: Mutex::new(EvalCursor { reader, pos: self.train_lines, buf: Vec::with_capacity(1024), next: 0, n: 0, last: None, skipped: 0, pass_skipped: 0 }),
        })
    }

    /// What an eval stream needs of this reader (its file, layout and split; no open handle).
    fn clone_shape(&self) -> Shape {
        Shape {
            path: self.path.clone(),
            first_line: self.first_line,
            policy: self.policy,
            parser: self.parser.clone(),
            num_dense: self.num_dense,
            num_tables: self.num_tables,
            start: self.train_lines,
            end: self.data_lines,
            checkpoints: self.checkpoints.clone(),
        }
    }

    /// A fresh reader positioned at data line `k` (via the nearest seek point).
    fn reader_at(&self, k: u64) -> Result<BufReader<File>> {
        reader_at(&self.path, &self.checkpoints, k)
    }

    /// Reads data lines until `n` samples or data line `end`; `pos` counts lines consumed.
    fn read_into(
        r: &mut BufReader<File>,
        parser: &mut LineParser,
        buf: &mut Vec<u8>,
        ctx: (&Path, u64, BadLinePolicy),
        pos: &mut u64,
        end: u64,
        n: usize,
        out: &mut Batch,
        skipped: &mut u64,
    ) -> Result<()> {
        let (path, first_line, policy) = ctx;
        while out.size() < n && *pos < end {
            let got = read_line(r, buf).map_err(|e| Error::io(path, e))?;
            let line_no = first_line + *pos;
            if got == Line::Eof {
                return Err(Error::Data {
                    path: path.to_path_buf(),
                    line: line_no,
                    msg: "unexpected end of file (did the file change after it was opened?)".into(),
                });
            }
            *pos += 1;
            let line = trim_eol(buf);
            if line.is_empty() {
                continue;
            }
            let parsed = match got {
                Line::TooLong(n) => Err(format!("the line has {n} bytes, more than the limit of {MAX_LINE_BYTES}")),
                _ => parser.parse_into(line, out),
            };
            if let Err(msg) = parsed {
                match policy {
                    BadLinePolicy::Fail => return Err(Error::Data { path: path.to_path_buf(), line: line_no, msg }),
                    BadLinePolicy::Skip => *skipped += 1,
                }
            }
        }
        Ok(())
    }
}

impl DataSource for CriteoReader {
    fn next_batch(&mut self, n: usize) -> Result<Option<Batch>> {
        if self.pos >= self.train_lines && n > 0 {
            return Ok(None);
        }
        let mut b = Batch::new(self.num_dense, self.num_tables);
        b.dense.reserve(n * self.num_dense);
        b.labels.reserve(n);
        for j in &mut b.sparse {
            j.lengths.reserve(n);
            j.values.reserve(n);
        }
        let ctx = (self.path.as_path(), self.first_line, self.policy);
        Self::read_into(
            &mut self.reader,
            &mut self.parser,
            &mut self.buf,
            ctx,
            &mut self.pos,
            self.train_lines,
            n,
            &mut b,
            &mut self.skipped_train,
        )?;
        if b.size() == 0 && n > 0 {
            return Ok(None);
        }
        Ok(Some(b))
    }

    fn position(&self) -> u64 {
        self.pos
    }

    fn skip(&mut self, n: u64) -> Result<()> {
        let target = (self.pos + n).min(self.train_lines);
        if target / CHECKPOINT > self.pos / CHECKPOINT {
            self.reader = self.reader_at(target)?;
        } else {
            skip_lines(&mut self.reader, target - self.pos).map_err(|e| Error::io(&self.path, e))?;
        }
        self.pos = target;
        Ok(())
    }

    /// The whole eval split in memory (small files, tests); runs use [`CriteoReader::eval_stream`].
    fn eval_set(&mut self) -> Result<Batch> {
        let ev = self.eval_stream()?;
        let mut all = Batch::new(self.num_dense, self.num_tables);
        for k in 0.. {
            let b = ev.chunk(k, 1 << 16)?;
            if b.size() == 0 {
                break;
            }
            all.extend(&b);
        }
        self.skipped_eval = ev.skipped();
        Ok(all)
    }

    fn skipped(&self) -> u64 {
        self.skipped_train
    }

    fn len(&self) -> Option<u64> {
        Some(self.train_lines)
    }
}
