//! Reading a `.ember` file: memory-mapped, header and block index checked at open, samples read
//! by index, with offsets and ids checked as they are read.
use super::format::{bad, empty_id, parse_index, u64_at, BlockLayoutAt, Header, MAX_BAG};
use crate::config::ModelConfig;
use crate::data::mapped::FileBytes;
use crate::data::Batch;
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// A memory-mapped `.ember` file: header and index checked at open; samples read by index.
#[derive(Debug)]
pub struct BinaryFile {
    path: PathBuf,
    map: FileBytes,
    header: Header,
    blocks: Vec<BlockLayoutAt>,
}


impl BinaryFile {
    /// Maps `path` and checks its header, feature table and block index (see the `binary` module doc).
    /// The mapping is advised random access: a rank's reads bring in only the pages it touches.
    pub fn open(path: impl AsRef<Path>) -> Result<BinaryFile> {
        let path = path.as_ref();
        BinaryFile::checked(path.to_path_buf(), FileBytes::map(path)?)
    }

    /// The file whose bytes are `bytes`, checked as [`open`](Self::open) checks a file; `name`
    /// names it in errors. The entry point for tests and fuzzing of hostile files.
    pub fn from_bytes(name: impl Into<PathBuf>, bytes: Vec<u8>) -> Result<BinaryFile> {
        BinaryFile::checked(name.into(), FileBytes::Owned(bytes))
    }

    fn checked(path: PathBuf, map: FileBytes) -> Result<BinaryFile> {
        if cfg!(target_endian = "big") {
            return Err(bad(&path, "Ember binary files are little-endian; this host is big-endian"));
        }
        let header = Header::parse(&map).map_err(|m| bad(&path, m))?;
        if map.len() as u64 != header.file_bytes {
            return Err(bad(&path, format!("{} bytes, the header says {} (truncated or overwritten)", map.len(), header.file_bytes)));
        }
        let index = &map[header.index_offset as usize..header.file_bytes as usize];
        let blocks = parse_index(&header, index).map_err(|m| bad(&path, m))?;
        Ok(BinaryFile { path, map, header, blocks })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn samples(&self) -> u64 {
        self.header.samples
    }
    /// The whole mapping (tests compare its resident pages with the samples read).
    pub fn map(&self) -> &[u8] {
        &self.map
    }

    /// Byte ranges (offset, len) of sample `i` in each section: what reading it touches (none
    /// past the end).
    pub fn sample_ranges(&self, i: u64) -> Vec<(u64, u64)> {
        if i >= self.header.samples {
            return Vec::new();
        }
        let s = self.header.block_samples as u64;
        let b = &self.blocks[(i / s) as usize];
        let lo = i % s;
        let nd = self.header.num_dense as u64;
        let mut r = vec![(b.offset + 4 * lo, 4), (b.offset + b.layout.dense + 4 * nd * lo, 4 * nd)];
        let ib = self.header.id_bytes as u64;
        for s in &b.layout.features {
            let Some(offs) = s.offsets else {
                r.push((b.offset + s.ids_at + ib * lo, ib));
                continue;
            };
            let at = b.offset + offs + 8 * lo;
            r.push((at, 16));
            let o = &self.map[at as usize..at as usize + 16];
            let (x, y) = (u64_at(o, 0), u64_at(o, 8));
            if y > x {
                r.push((b.offset + s.ids_at + ib * x, ib * (y - x)));
            }
        }
        r
    }

    /// Checks the model against the file: dense and sparse feature counts, and every table's
    /// rows against the modulo the ids were hashed with.
    pub fn check_model(&self, model: &ModelConfig) -> Result<()> {
        let h = &self.header;
        if h.num_dense as usize != model.num_dense || h.features.len() != model.tables.len() {
            return Err(Error::Config(format!(
                "{}: holds {} dense and {} sparse features; the model has num_dense = {} and {} tables",
                self.path.display(),
                h.num_dense,
                h.features.len(),
                model.num_dense,
                model.tables.len()
            )));
        }
        for (f, (ft, t)) in h.features.iter().zip(&model.tables).enumerate() {
            if ft.rows != t.rows {
                return Err(Error::Config(format!(
                    "{}: feature {f} was converted for a table of {} rows (ids are value mod {}), but the model's table {f} has {} rows: \
                     convert again with the model's config (same --preset/--config/--max-rows) or train with the one it was converted for",
                    self.path.display(),
                    ft.rows,
                    ft.rows,
                    t.rows
                )));
            }
        }
        Ok(())
    }

    /// Checks every block's checksum (reads the whole file).
    pub fn verify_blocks(&self) -> Result<()> {
        for (b, blk) in self.blocks.iter().enumerate() {
            let bytes = &self.map[blk.offset as usize..(blk.offset + blk.layout.bytes) as usize];
            let crc = crc32fast::hash(bytes);
            if crc != blk.crc {
                return Err(bad(&self.path, format!("block {b} (samples from {}): checksum mismatch, stored {:08x}, computed {crc:08x} (corrupted)", b as u64 * self.header.block_samples as u64, blk.crc)));
            }
        }
        Ok(())
    }

    /// `len` bytes at `at`, asking the kernel to read them in ahead of the copy.
    #[inline]
    fn bytes(&self, at: u64, len: u64) -> &[u8] {
        self.map.range(at as usize, len as usize)
    }

    /// Appends samples `[start, start + n)` to `out` (whose layout must match the file's).
    pub fn read_into(&self, start: u64, n: usize, out: &mut Batch) -> Result<()> {
        let end = start.checked_add(n as u64).filter(|&e| e <= self.header.samples).ok_or_else(|| {
            bad(&self.path, format!("samples {start}..{start}+{n} past the end ({} samples)", self.header.samples))
        })?;
        if out.num_dense != self.header.num_dense as usize || out.sparse.len() != self.header.features.len() {
            return Err(bad(&self.path, "batch layout differs from the file's"));
        }
        let s = self.header.block_samples as u64;
        let mut i = start;
        while i < end {
            let b = i / s;
            let lo = i - b * s;
            let k = (end - i).min(s - lo);
            self.read_block(b as usize, lo, k as usize, out)?;
            i += k;
        }
        Ok(())
    }

    fn read_block(&self, b: usize, lo: u64, n: usize, out: &mut Batch) -> Result<()> {
        let blk = &self.blocks[b];
        let base = blk.offset;
        let nd = self.header.num_dense as u64;
        let nn = n as u64;
        fn cast<'a, T: bytemuck::AnyBitPattern>(f: &BinaryFile, b: usize, x: &'a [u8]) -> Result<&'a [T]> {
            bytemuck::try_cast_slice(x).map_err(|e| bad(&f.path, format!("block {b}: {e}")))
        }
        let sample0 = b as u64 * self.header.block_samples as u64 + lo;
        let labels: &[f32] = cast(self, b, self.bytes(base + 4 * lo, 4 * nn))?;
        if let Some(i) = labels.iter().position(|&y| y != 0.0 && y != 1.0) {
            return Err(bad(&self.path, format!("block {b}: label of sample {} is {}, not 0 or 1 (corrupted)", sample0 + i as u64, labels[i])));
        }
        out.labels.extend_from_slice(labels);
        let dense: &[f32] = cast(self, b, self.bytes(base + blk.layout.dense + 4 * nd * lo, 4 * nd * nn))?;
        if let Some(i) = dense.iter().position(|x| !x.is_finite()) {
            return Err(bad(&self.path, format!("block {b}: dense value {} of sample {} is not finite (corrupted)", i as u64 % nd, sample0 + i as u64 / nd)));
        }
        out.dense.extend_from_slice(dense);
        let ib = self.header.id_bytes as u64;
        for (f, (sec, ft)) in blk.layout.features.iter().zip(&self.header.features).enumerate() {
            let corrupt = |what: String| bad(&self.path, format!("block {b}, feature {f}, near sample {sample0}: {what} (corrupted)"));
            let j = &mut out.sparse[f];
            let Some(off_at) = sec.offsets else {
                // One-hot: n id slots, all ones for an empty bag.
                let raw = self.bytes(base + sec.ids_at + ib * lo, ib * nn);
                let over = if ib == 4 { one_hot(cast::<u32>(self, b, raw)?, ft.rows, j) } else { one_hot(cast::<u64>(self, b, raw)?, ft.rows, j) };
                if let Some(v) = over {
                    return Err(corrupt(format!("id {v} is not below the table's {} rows", ft.rows)));
                }
                continue;
            };
            let k = sec.ids;
            let offs: &[u64] = cast(self, b, self.bytes(base + off_at + 8 * lo, 8 * (nn + 1)))?;
            let (first, last) = (offs[0], offs[n]);
            if first > last || last > k {
                return Err(corrupt(format!("offsets {first}..{last} outside the block's {k} ids")));
            }
            j.lengths.reserve(n);
            let mut prev = first;
            for &o in &offs[1..] {
                let l = o.wrapping_sub(prev);
                if o < prev || l > MAX_BAG {
                    return Err(corrupt(format!("offsets decrease or a bag exceeds {MAX_BAG} ids")));
                }
                j.lengths.push(l as u32);
                prev = o;
            }
            let count = (last - first) as usize;
            let raw = self.bytes(base + sec.ids_at + ib * first, ib * count as u64);
            let before = j.values.len();
            let max = if ib == 4 {
                let ids: &[u32] = cast(self, b, raw)?;
                j.values.extend(ids.iter().map(|&v| v as u64));
                ids.iter().copied().max().map(u64::from)
            } else {
                let ids: &[u64] = cast(self, b, raw)?;
                j.values.extend_from_slice(ids);
                ids.iter().copied().max()
            };
            if let Some(m) = max.filter(|&m| m >= ft.rows) {
                let at = j.values[before..].iter().position(|&v| v == m).unwrap_or(0);
                return Err(corrupt(format!("id {m} (the {at}-th read) is not below the table's {} rows", ft.rows)));
            }
        }
        Ok(())
    }
}

/// Appends a one-hot section's slots to `j` (an all-ones slot is an empty bag); returns an id
/// not below `rows`, if one is read.
#[inline]
fn one_hot<T: Copy + Into<u64>>(slots: &[T], rows: u64, j: &mut crate::data::Jagged) -> Option<u64> {
    let empty = empty_id(std::mem::size_of::<T>() as u64);
    j.lengths.reserve(slots.len());
    j.values.reserve(slots.len());
    let mut over = None;
    for &v in slots {
        let v: u64 = v.into();
        let present = v != empty;
        j.lengths.push(present as u32);
        if present {
            if v >= rows {
                over = Some(v);
            }
            j.values.push(v);
        }
    }
    over
}
