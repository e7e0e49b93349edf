//! The reference pipelines' preprocessed Criteo layouts, read directly from memory-mapped
//! `.npy` files: this module owns the `.npy` header parser, `.npz` members, and one "day" of
//! TorchRec's Criteo 1TB layout, one-hot or with the MLPerf DLRMv2 multi-hot arrays.
//!
//! Where the layouts come from (docs/data.md):
//! - TorchRec `torchrec/datasets/criteo.py`, `BinaryCriteoUtils.tsv_to_npys`: per day
//!   `day_N_dense.npy` float32 [N, 13] holding ln(x + 3) of the integers (missing as 0),
//!   `day_N_sparse.npy` int32 [N, 26] (the hex values, or contiguous ids after
//!   `sparse_to_contiguous`), `day_N_labels.npy` int32 [N, 1]. Its reader
//!   (`InMemoryBinaryCriteoIterDataPipe`) takes every id modulo the table's rows ("hashes").
//! - MLPerf DLRMv2 (`materialize_synthetic_multihot_dataset.py`): `day_N_sparse_multi_hot.npz`
//!   written by `np.savez` (a zip of stored, uncompressed members) holding members `"0"` to
//!   `"25"`, member f an int32 array [N, multi_hot_size_f]; ids again modulo the rows.
//!
//! The `.npy` format (NumPy's `numpy.lib.format`): magic `\x93NUMPY`, version byte pair (1.0:
//! u16 header length; 2.0 and 3.0: u32), then an ASCII Python dict literal with `'descr'`,
//! `'fortran_order'` and `'shape'`, padded; the array's bytes follow. Accepted here: C order,
//! little-endian `<f4`, `<i4`, `<i8` (and `<u4`, `<u8`), at most 4 dimensions. Each id is
//! taken modulo its table's rows (negative values as Python's `%` does: `rem_euclid`).
use crate::config::ModelConfig;
use crate::data::mapped::FileBytes;
use crate::data::Batch;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest `.npy` header accepted (NumPy writes under 1 KiB for these arrays).
pub const MAX_HEADER_BYTES: usize = 1 << 16;
pub const MAX_DIMS: usize = 4;

/// Element types the layouts use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    I32,
    I64,
    U32,
    U64,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::I64 | Dtype::U64 => 8,
        }
    }
}

/// A parsed `.npy` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NpyHeader {
    pub dtype: Dtype,
    pub fortran_order: bool,
    pub shape: Vec<u64>,
    /// Byte offset of the array data from the start of the `.npy` bytes.
    pub data_offset: usize,
    /// Bytes of array data (checked product of the shape and the element size).
    pub data_bytes: u64,
}

/// Parses the header of `.npy` bytes (`bytes` may extend past the header). The error says
/// what is wrong; the caller adds the file name.
pub fn parse_header(bytes: &[u8]) -> std::result::Result<NpyHeader, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (bad magic)".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated .npy header".into());
            }
            (u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize, 12)
        }
        v => return Err(format!(".npy format version {v}.{} (1, 2 and 3 are read)", bytes[7])),
    };
    if len > MAX_HEADER_BYTES {
        return Err(format!(".npy header of {len} bytes (at most {MAX_HEADER_BYTES})"));
    }
    let end = start + len;
    let text = bytes.get(start..end).ok_or_else(|| format!("truncated .npy header ({} of {end} bytes)", bytes.len()))?;
    let text = std::str::from_utf8(text).map_err(|_| "the .npy header is not text".to_string())?;
    let dict = Dict::parse(text)?;
    let descr = dict.descr.ok_or("the .npy header has no 'descr'")?;
    let dtype = match descr.as_str() {
        "<f4" => Dtype::F32,
        "<i4" => Dtype::I32,
        "<i8" => Dtype::I64,
        "<u4" => Dtype::U32,
        "<u8" => Dtype::U64,
        d => return Err(format!("element type '{d}' (read: little-endian <f4, <i4, <i8, <u4, <u8)")),
    };
    let fortran_order = dict.fortran_order.ok_or("the .npy header has no 'fortran_order'")?;
    let shape = dict.shape.ok_or("the .npy header has no 'shape'")?;
    let mut elems = 1u64;
    for &d in &shape {
        elems = elems.checked_mul(d).ok_or("the .npy shape's size overflows")?;
    }
    let data_bytes = elems.checked_mul(dtype.size() as u64).ok_or("the .npy array's size overflows")?;
    Ok(NpyHeader { dtype, fortran_order, shape, data_offset: end, data_bytes })
}

/// The three entries of a `.npy` header dict.
#[derive(Default)]
struct Dict {
    descr: Option<String>,
    fortran_order: Option<bool>,
    shape: Option<Vec<u64>>,
}

impl Dict {
    /// `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 13), }` and blank padding.
    fn parse(text: &str) -> std::result::Result<Dict, String> {
        let mut p = Cursor { s: text.as_bytes(), at: 0 };
        let mut d = Dict::default();
        p.expect(b'{')?;
        loop {
            p.blank();
            if p.eat(b'}') {
                break;
            }
            let key = p.string()?;
            p.blank();
            p.expect(b':')?;
            p.blank();
            match key.as_str() {
                "descr" => d.descr = Some(p.string()?),
                "fortran_order" => d.fortran_order = Some(p.boolean()?),
                "shape" => d.shape = Some(p.tuple()?),
                k => return Err(format!("unexpected key '{k}' in the .npy header")),
            }
            p.blank();
            if !p.eat(b',') {
                p.blank();
                p.expect(b'}')?;
                break;
            }
        }
        p.blank();
        if p.at != p.s.len() {
            return Err("text after the .npy header dict".into());
        }
        Ok(d)
    }
}

struct Cursor<'a> {
    s: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn blank(&mut self) {
        while self.at < self.s.len() && matches!(self.s[self.at], b' ' | b'\n' | b'\t' | b'\r') {
            self.at += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.s.get(self.at) == Some(&c) {
            self.at += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("bad .npy header: expected '{}' at byte {}", c as char, self.at))
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let q = match self.s.get(self.at) {
            Some(&q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("bad .npy header: expected a string at byte {}", self.at)),
        };
        let from = self.at + 1;
        let len = self.s[from..].iter().position(|&c| c == q).ok_or("bad .npy header: unterminated string")?;
        if len > 64 {
            return Err("bad .npy header: a string longer than 64 bytes".into());
        }
        self.at = from + len + 1;
        Ok(String::from_utf8_lossy(&self.s[from..from + len]).into_owned())
    }
    fn boolean(&mut self) -> std::result::Result<bool, String> {
        for (w, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.at..].starts_with(w) {
                self.at += w.len();
                return Ok(v);
            }
        }
        Err(format!("bad .npy header: expected True or False at byte {}", self.at))
    }
    fn tuple(&mut self) -> std::result::Result<Vec<u64>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.blank();
            if self.eat(b')') {
                return Ok(dims);
            }
            let from = self.at;
            while self.at < self.s.len() && self.s[self.at].is_ascii_digit() {
                self.at += 1;
            }
            let digits = std::str::from_utf8(&self.s[from..self.at]).expect("ascii digits");
            let d: u64 = digits.parse().map_err(|_| format!("bad .npy header: expected a dimension at byte {from}"))?;
            self.eat(b'L'); // Python 2 long suffix
            if dims.len() == MAX_DIMS {
                return Err(format!("a .npy array of more than {MAX_DIMS} dimensions"));
            }
            dims.push(d);
            self.blank();
            if !self.eat(b',') {
                self.blank();
                self.expect(b')')?;
                return Ok(dims);
            }
        }
    }
}

/// A 2-D array inside a memory map: rows of `cols` elements, C order.
#[derive(Clone, Debug)]
pub struct NpyArray {
    path: PathBuf,
    map: Arc<FileBytes>,
    /// Byte offset of element [0, 0] in the map.
    at: usize,
    pub dtype: Dtype,
    pub rows: u64,
    pub cols: usize,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {msg}", path.display()))
}

impl NpyArray {
    /// The `.npy` array at bytes `[at, at + len)` of `map` (a whole file, or an `.npz` member);
    /// checks its header, that it is 1-D or 2-D in C order, and that its data fits.
    fn parse(path: &Path, what: &str, map: Arc<FileBytes>, at: usize, len: usize) -> Result<NpyArray> {
        let bytes = &map[at..at + len];
        let h = parse_header(bytes).map_err(|m| bad(path, format!("{what}: {m}")))?;
        if h.fortran_order {
            return Err(bad(path, format!("{what}: Fortran-ordered array (C order expected)")));
        }
        let (rows, cols) = match h.shape[..] {
            [r] => (r, 1),
            [r, c] => (r, c),
            _ => return Err(bad(path, format!("{what}: shape {:?}, expected [rows] or [rows, columns]", h.shape))),
        };
        let have = (len - h.data_offset) as u64;
        if have < h.data_bytes {
            return Err(bad(path, format!("{what}: {have} bytes of data, the shape {:?} needs {} (truncated)", h.shape, h.data_bytes)));
        }
        let cols = usize::try_from(cols).map_err(|_| bad(path, format!("{what}: {cols} columns")))?;
        // np.savez does not align its members: elements are decoded from bytes, not cast.
        let start = at + h.data_offset;
        Ok(NpyArray { path: path.to_path_buf(), map, at: start, dtype: h.dtype, rows, cols })
    }

    /// A whole `.npy` file's bytes.
    fn whole(path: &Path, bytes: FileBytes) -> Result<NpyArray> {
        let len = bytes.len();
        NpyArray::parse(path, "array", Arc::new(bytes), 0, len)
    }

    /// The bytes of rows `[r, r + n)` (the caller checked the range).
    fn rows_bytes(&self, r: u64, n: usize) -> &[u8] {
        let row = self.cols * self.dtype.size();
        self.map.range(self.at + r as usize * row, n * row)
    }

    /// Rows `[r, r + n)` of a float32 array appended to `out`.
    fn f32s_into(&self, r: u64, n: usize, out: &mut Vec<f32>) {
        let b = self.rows_bytes(r, n);
        match bytemuck::try_cast_slice::<u8, f32>(b) {
            Ok(v) => out.extend_from_slice(v),
            Err(_) => out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))),
        }
    }

    /// Rows `[r, r + n)` as integers, element c of a row taken modulo `modulo[c]` (as
    /// Python's `%`: non-negative); `push(c, id)`.
    fn ids_mod(&self, r: u64, n: usize, modulo: &[u64], mut push: impl FnMut(usize, u64)) -> Result<()> {
        let b = self.rows_bytes(r, n);
        #[inline]
        fn slow(x: i128, m: u64) -> u64 {
            x.rem_euclid(m as i128) as u64
        }
        macro_rules! each {
            ($t:ty) => {{
                const W: usize = std::mem::size_of::<$t>();
                for row in b.chunks_exact(W * self.cols) {
                    for (c, (x, &m)) in row.chunks_exact(W).zip(modulo).enumerate() {
                        let x = <$t>::from_le_bytes(x.try_into().expect("element bytes"));
                        // Ids already below the rows (contiguous ids) need no division.
                        let u = x as u64;
                        push(c, if x >= (0 as $t) && u < m { u } else { slow(x as i128, m) });
                    }
                }
            }};
        }
        match self.dtype {
            Dtype::I32 => each!(i32),
            Dtype::I64 => each!(i64),
            Dtype::U32 => each!(u32),
            Dtype::U64 => each!(u64),
            Dtype::F32 => return Err(bad(&self.path, "ids stored as float32 (integers expected)")),
        }
        Ok(())
    }

    /// Rows `[r, r + n)` of a one-column array as f32 labels.
    fn labels(&self, r: u64, n: usize, out: &mut Vec<f32>) {
        let b = self.rows_bytes(r, n);
        macro_rules! conv {
            ($t:ty) => {
                out.extend(b.chunks_exact(std::mem::size_of::<$t>()).map(|c| <$t>::from_le_bytes(c.try_into().expect("element bytes")) as f32))
            };
        }
        match self.dtype {
            Dtype::F32 => self.f32s_into(r, n, out),
            Dtype::I32 => conv!(i32),
            Dtype::I64 => conv!(i64),
            Dtype::U32 => conv!(u32),
            Dtype::U64 => conv!(u64),
        }
    }
}

/// The members of an uncompressed `.npz` (as `np.savez` writes), by name without `.npy`: the
/// zip directory gives each member's byte range, checked to lie inside the file.
fn npz_members(path: &Path, bytes: FileBytes, names: &[String]) -> Result<Vec<NpyArray>> {
    let map = Arc::new(bytes);
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&map[..])).map_err(|e| bad(path, format!("not a readable .npz (zip) archive: {e}")))?;
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let member = format!("{name}.npy");
        let i = zip.index_for_name(&member).ok_or_else(|| bad(path, format!("no member '{member}' (the DLRMv2 layout has members 0.npy to 25.npy)")))?;
        let f = zip.by_index_raw(i).map_err(|e| bad(path, format!("{member}: {e}")))?;
        if f.compression() != zip::CompressionMethod::Stored || f.compressed_size() != f.size() {
            return Err(bad(path, format!("{member} is compressed (np.savez_compressed); memory-mapping needs np.savez's stored members")));
        }
        let (at, len) = (f.data_start(), f.size());
        let end = at.checked_add(len).filter(|&e| e <= map.len() as u64).ok_or_else(|| bad(path, format!("{member} runs past the end of the file (truncated)")))?;
        drop(f);
        out.push(NpyArray::parse(path, &member, map.clone(), at as usize, (end - at) as usize)?);
    }
    Ok(out)
}

/// The sparse part of a day.
#[derive(Clone, Debug)]
pub enum Sparse {
    /// `day_N_sparse.npy`: [N, F], one id per feature.
    OneHot(NpyArray),
    /// `day_N_sparse_multi_hot.npz`: per feature [N, bag size].
    MultiHot(Vec<NpyArray>),
}

/// One day of the TorchRec/MLPerf layout: dense, labels and sparse arrays of the same N rows.
#[derive(Clone, Debug)]
pub struct NpyDay {
    /// The day's dense file (names the day in messages).
    pub dense_path: PathBuf,
    dense: NpyArray,
    labels: NpyArray,
    pub sparse: Sparse,
    samples: u64,
    /// Rows of each table (the modulo).
    modulo: Vec<u64>,
}

/// The files of day `prefix` (`.../day_N`): dense, labels, and the one-hot or multi-hot sparse.
pub fn day_files(prefix: &Path, multi_hot: bool) -> (PathBuf, PathBuf, PathBuf) {
    let p = |s: &str| PathBuf::from(format!("{}_{s}", prefix.display()));
    (p("dense.npy"), p("labels.npy"), if multi_hot { p("sparse_multi_hot.npz") } else { p("sparse.npy") })
}

impl NpyDay {
    /// Opens day `prefix` (`DIR/day_N`) for `model`: maps its three files and checks them as
    /// [`from_bytes`](Self::from_bytes) does.
    pub fn open(prefix: &Path, multi_hot: bool, model: &ModelConfig) -> Result<NpyDay> {
        let (dp, lp, sp) = day_files(prefix, multi_hot);
        NpyDay::checked(prefix, FileBytes::map(&dp)?, FileBytes::map(&lp)?, FileBytes::map(&sp)?, multi_hot, model)
    }

    /// Day `prefix` from its dense, labels and sparse (`.npy`, or `.npz` when `multi_hot`)
    /// files' bytes; checks every array's type and shape (dense [N, num_dense] float32; labels
    /// [N] or [N, 1]; sparse [N, F] or F multi-hot members [N, k]) and that they agree on N.
    /// Errors name the files as [`day_files`] names them. The entry point for tests and fuzzing
    /// of hostile files.
    pub fn from_bytes(prefix: &Path, dense: Vec<u8>, labels: Vec<u8>, sparse: Vec<u8>, multi_hot: bool, model: &ModelConfig) -> Result<NpyDay> {
        NpyDay::checked(prefix, FileBytes::Owned(dense), FileBytes::Owned(labels), FileBytes::Owned(sparse), multi_hot, model)
    }

    fn checked(prefix: &Path, dense: FileBytes, labels: FileBytes, sparse: FileBytes, multi_hot: bool, model: &ModelConfig) -> Result<NpyDay> {
        let (dp, lp, sp) = day_files(prefix, multi_hot);
        let dense = NpyArray::whole(&dp, dense)?;
        let labels = NpyArray::whole(&lp, labels)?;
        let f = model.tables.len();
        if dense.dtype != Dtype::F32 || dense.cols != model.num_dense {
            return Err(Error::Config(format!("{}: {:?} with {} columns; the model wants float32 with num_dense = {} columns", dp.display(), dense.dtype, dense.cols, model.num_dense)));
        }
        if labels.cols != 1 {
            return Err(bad(&lp, format!("{} columns of labels (1 expected)", labels.cols)));
        }
        let n = dense.rows;
        let sparse = if multi_hot {
            let names: Vec<String> = (0..f).map(|i| i.to_string()).collect();
            let m = npz_members(&sp, sparse, &names)?;
            for (i, a) in m.iter().enumerate() {
                if a.rows != n {
                    return Err(bad(&sp, format!("member {i}.npy has {} rows, {} has {n}", a.rows, dp.display())));
                }
                if a.dtype == Dtype::F32 || a.cols == 0 || a.cols as u64 > super::binary::MAX_BAG {
                    return Err(bad(&sp, format!("member {i}.npy: {:?} [{}, {}] (integer ids, 1 to {} per row, expected)", a.dtype, a.rows, a.cols, super::binary::MAX_BAG)));
                }
            }
            Sparse::MultiHot(m)
        } else {
            let s = NpyArray::whole(&sp, sparse)?;
            if s.cols != f {
                return Err(Error::Config(format!("{}: {} sparse columns; the model has {f} tables", sp.display(), s.cols)));
            }
            if s.dtype == Dtype::F32 {
                return Err(bad(&sp, "ids stored as float32 (integers expected)"));
            }
            if s.rows != n {
                return Err(bad(&sp, format!("{} rows, {} has {n}", s.rows, dp.display())));
            }
            Sparse::OneHot(s)
        };
        if labels.rows != n {
            return Err(bad(&lp, format!("{} rows, {} has {n}", labels.rows, dp.display())));
        }
        Ok(NpyDay { dense_path: dp, dense, labels, sparse, samples: n, modulo: model.tables.iter().map(|t| t.rows.max(1)).collect() })
    }

    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Appends samples `[start, start + n)` to `out`.
    pub fn read_into(&self, start: u64, n: usize, out: &mut Batch) -> Result<()> {
        if start.checked_add(n as u64).filter(|&e| e <= self.samples).is_none() {
            return Err(bad(&self.dense_path, format!("samples {start}..{start}+{n} past the end ({} samples)", self.samples)));
        }
        let before = out.dense.len();
        self.dense.f32s_into(start, n, &mut out.dense);
        if let Some(i) = out.dense[before..].iter().position(|x| !x.is_finite()) {
            let nd = self.dense.cols;
            return Err(bad(&self.dense.path, format!("dense value {} of sample {} is not finite", i % nd, start + (i / nd) as u64)));
        }
        let before = out.labels.len();
        self.labels.labels(start, n, &mut out.labels);
        if let Some(i) = out.labels[before..].iter().position(|&y| y != 0.0 && y != 1.0) {
            return Err(bad(&self.labels.path, format!("label of sample {} is not 0 or 1", start + i as u64)));
        }
        match &self.sparse {
            Sparse::OneHot(a) => {
                for j in out.sparse.iter_mut() {
                    j.lengths.extend(std::iter::repeat(1).take(n));
                    j.values.reserve(n);
                }
                let sp = &mut out.sparse;
                a.ids_mod(start, n, &self.modulo, |c, v| sp[c].values.push(v))?;
            }
            Sparse::MultiHot(m) => {
                for ((a, j), &rows) in m.iter().zip(out.sparse.iter_mut()).zip(&self.modulo) {
                    j.lengths.extend(std::iter::repeat(a.cols as u32).take(n));
                    j.values.reserve(n * a.cols);
                    a.ids_mod(start, n, &vec![rows; a.cols], |_, v| j.values.push(v))?;
                }
            }
        }
        Ok(())
    }
}
