//! Ember's binary sample format (`.ember` files): Criteo-style samples preprocessed once by
//! `ember convert` and memory-mapped by every rank, which then touches only the pages of its
//! own samples. This module owns the layout, its writer and its reader; docs/data.md is the
//! user's copy of the spec.
//!
//! Layout, little-endian, every section 8-byte aligned and every block 64-byte aligned:
//!
//! ```text
//! [header, 64 B][feature table, F x 16 B, padded to 64][block 0][block 1]...[block index]
//! ```
//!
//! - header: magic `EMBERDAT`, version, `num_dense`, F (sparse features), samples per block S,
//!   id width (4 or 8 bytes), dense transform, samples, index offset, file length, CRC-32 of
//!   the index, CRC-32 of header and feature table (computed with its own field as zero).
//! - feature table: per feature the table rows R (every id is `value mod R`, so a model with
//!   other rows is refused) and the hashing (1: Criteo hex value mod R; 2: integer id mod R).
//! - block b holds samples [b·S, min((b+1)·S, samples)) as n labels (f32), n × num_dense dense
//!   values (f32), then per feature one section: where some bag of the block holds more than one
//!   id, a *bags* section of n + 1 offsets (u64, from 0 to the block's id count k_f) and k_f ids
//!   (a sample's bag is ids[offsets[i]..offsets[i+1]]; multi-hot bags need no padding);
//!   otherwise a *one-hot* section of n ids, the all-ones id standing for an empty bag (a
//!   missing Criteo categorical) — no offsets, so one-hot data costs what TorchRec's arrays do.
//! - block index: per block its CRC-32 and, per feature, the section's kind (top byte) and k_f
//!   (8 + 8·F bytes).
//!
//! Every block's place follows from the index, so the reader checks at open (before any
//! training) the magic, version, both checksums, every count against a limit and the file
//! length, with checked arithmetic; the blocks' own checksums cost a full read and are checked by
//! [`BinaryFile::verify_blocks`] (`ember convert --verify`). Offsets and ids are checked as they
//! are read, so a corrupted block is an error naming the file and sample, never a wild read.
//!
//! A file is written under a temporary name beside its destination and renamed once complete.
use crate::config::ModelConfig;
use crate::data::mapped::FileBytes;
use crate::data::Batch;
use crate::{Error, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: [u8; 8] = *b"EMBERDAT";
pub const VERSION: u32 = 1;
pub const HEADER_BYTES: usize = 64;
pub const FEATURE_BYTES: usize = 16;
/// Limits a header may state (a larger value is a corrupt or foreign file).
pub const MAX_FEATURES: u32 = 4096;
pub const MAX_DENSE: u32 = 4096;
pub const MAX_BLOCK_SAMPLES: u32 = 1 << 24;
/// Most ids one bag may hold.
pub const MAX_BAG: u64 = 1 << 20;
/// Samples per block `ember convert` writes.
pub const DEFAULT_BLOCK_SAMPLES: u32 = 1 << 13;
/// Index entry of a feature's section: kind in the top byte, ids in the rest.
const KIND_SHIFT: u32 = 56;
const KIND_BAGS: u64 = 0;
const KIND_ONE_HOT: u64 = 1;

/// The id that marks an empty bag in a one-hot section (all ones of the id width; every id is
/// below its table's rows, which are at most this for the width).
#[inline]
fn empty_id(id_bytes: u64) -> u64 {
    if id_bytes == 4 {
        u32::MAX as u64
    } else {
        u64::MAX
    }
}

/// How the dense values were preprocessed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseTransform {
    /// Stored as given.
    AsGiven = 0,
    /// `ln(1 + max(x, 0))` of the Criteo integers (what the text reader does).
    Log1pClamp = 1,
}

/// How a feature's ids were mapped into its table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hashing {
    /// Criteo hex string value modulo the table's rows.
    HexModRows = 1,
    /// Integer id modulo the table's rows.
    IntModRows = 2,
}

/// One sparse feature: its table's rows (the modulo) and the hashing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    pub rows: u64,
    pub hashing: Hashing,
}

/// The parsed header and feature table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub num_dense: u32,
    pub block_samples: u32,
    /// 4 (u32 ids) or 8 (u64 ids).
    pub id_bytes: u32,
    pub dense: DenseTransform,
    pub samples: u64,
    pub index_offset: u64,
    pub file_bytes: u64,
    pub index_crc: u32,
    pub features: Vec<Feature>,
}

#[inline]
fn align(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? / a * a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// One feature's section of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Section {
    /// Offset of the bags section's n + 1 offsets; None for a one-hot section.
    pub offsets: Option<u64>,
    /// Offset of the ids (k of them in a bags section, n slots in a one-hot one).
    pub ids_at: u64,
    /// Ids the block holds for the feature (a one-hot section's non-empty slots).
    pub ids: u64,
}

impl Section {
    /// The index entry: kind and ids.
    pub fn entry(&self) -> u64 {
        let kind = if self.offsets.is_some() { KIND_BAGS } else { KIND_ONE_HOT };
        kind << KIND_SHIFT | self.ids
    }
}

/// Byte offsets of a block's sections, relative to the block's start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub samples: u64,
    pub dense: u64,
    pub features: Vec<Section>,
    /// Block length (to the next 64-byte boundary).
    pub bytes: u64,
}

impl BlockLayout {
    /// The layout of a block of `n` samples whose features' sections are `(one_hot, ids)`;
    /// None on overflow.
    pub fn new(n: u64, num_dense: u64, id_bytes: u64, sections: impl IntoIterator<Item = (bool, u64)>) -> Option<BlockLayout> {
        let dense = align(n.checked_mul(4)?, 8)?;
        let mut at = align(dense.checked_add(n.checked_mul(num_dense)?.checked_mul(4)?)?, 8)?;
        let mut features = Vec::new();
        for (one_hot, k) in sections {
            let (offsets, ids_at, slots) = if one_hot { (None, at, n) } else { (Some(at), at.checked_add(n.checked_add(1)?.checked_mul(8)?)?, k) };
            at = align(ids_at.checked_add(slots.checked_mul(id_bytes)?)?, 8)?;
            features.push(Section { offsets, ids_at, ids: k });
        }
        Some(BlockLayout { samples: n, dense, features, bytes: align(at, 64)? })
    }
}

impl Header {
    /// Offset of block 0: header and feature table, padded to 64 bytes.
    pub fn data_offset(&self) -> u64 {
        (HEADER_BYTES + FEATURE_BYTES * self.features.len()).div_ceil(64) as u64 * 64
    }
    pub fn blocks(&self) -> u64 {
        self.samples.div_ceil(self.block_samples as u64)
    }
    /// Bytes of one block-index entry.
    pub fn index_entry_bytes(&self) -> u64 {
        8 + 8 * self.features.len() as u64
    }
    /// Samples of block `b`.
    pub fn block_len(&self, b: u64) -> u64 {
        let s = self.block_samples as u64;
        (self.samples - b * s).min(s)
    }

    /// Header and feature table as written to disk (header CRC included).
    pub fn encode(&self) -> Vec<u8> {
        let f = self.features.len();
        let mut b = vec![0u8; HEADER_BYTES + FEATURE_BYTES * f];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.num_dense.to_le_bytes());
        b[16..20].copy_from_slice(&(f as u32).to_le_bytes());
        b[20..24].copy_from_slice(&self.block_samples.to_le_bytes());
        b[24..28].copy_from_slice(&self.id_bytes.to_le_bytes());
        b[28..32].copy_from_slice(&(self.dense as u32).to_le_bytes());
        b[32..40].copy_from_slice(&self.samples.to_le_bytes());
        b[40..48].copy_from_slice(&self.index_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.file_bytes.to_le_bytes());
        b[56..60].copy_from_slice(&self.index_crc.to_le_bytes());
        for (i, ft) in self.features.iter().enumerate() {
            let at = HEADER_BYTES + FEATURE_BYTES * i;
            b[at..at + 8].copy_from_slice(&ft.rows.to_le_bytes());
            b[at + 8..at + 12].copy_from_slice(&(ft.hashing as u32).to_le_bytes());
        }
        let crc = header_crc(&b);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and checks a header and feature table from the start of a file (`bytes` may be
    /// the whole file or just its first bytes). Checks the magic, version, header checksum and
    /// every field against its limit, and that the blocks and the index fit the stated length;
    /// the error says what is wrong (the caller adds the file name).
    pub fn parse(bytes: &[u8]) -> std::result::Result<Header, String> {
        if bytes.len() < HEADER_BYTES {
            return Err(format!("{} bytes, shorter than the {HEADER_BYTES}-byte header (truncated)", bytes.len()));
        }
        if bytes[0..8] != MAGIC {
            return Err("not an Ember binary data file (bad magic)".into());
        }
        let version = u32_at(bytes, 8);
        if version != VERSION {
            return Err(format!("format version {version}; this build reads version {VERSION}"));
        }
        let f = u32_at(bytes, 16);
        if f == 0 || f > MAX_FEATURES {
            return Err(format!("{f} sparse features (1 to {MAX_FEATURES} allowed)"));
        }
        let table_end = HEADER_BYTES + FEATURE_BYTES * f as usize;
        if bytes.len() < table_end {
            return Err(format!("{} bytes, shorter than the header and feature table ({table_end} bytes; truncated)", bytes.len()));
        }
        let stored = u32_at(bytes, 60);
        let crc = header_crc(&bytes[..table_end]);
        if stored != crc {
            return Err(format!("header checksum mismatch: stored {stored:08x}, computed {crc:08x} (corrupted)"));
        }
        let num_dense = u32_at(bytes, 12);
        if num_dense > MAX_DENSE {
            return Err(format!("{num_dense} dense features (at most {MAX_DENSE})"));
        }
        let block_samples = u32_at(bytes, 20);
        if block_samples == 0 || block_samples > MAX_BLOCK_SAMPLES {
            return Err(format!("{block_samples} samples per block (1 to {MAX_BLOCK_SAMPLES} allowed)"));
        }
        let id_bytes = u32_at(bytes, 24);
        if id_bytes != 4 && id_bytes != 8 {
            return Err(format!("ids of {id_bytes} bytes (4 or 8 allowed)"));
        }
        let dense = match u32_at(bytes, 28) {
            0 => DenseTransform::AsGiven,
            1 => DenseTransform::Log1pClamp,
            d => return Err(format!("unknown dense transform {d}")),
        };
        let mut features = Vec::with_capacity(f as usize);
        for i in 0..f as usize {
            let at = HEADER_BYTES + FEATURE_BYTES * i;
            let rows = u64_at(bytes, at);
            if rows == 0 {
                return Err(format!("feature {i}: table of 0 rows"));
            }
            if id_bytes == 4 && rows > u32::MAX as u64 {
                return Err(format!("feature {i}: {rows} rows do not fit 4-byte ids"));
            }
            let hashing = match u32_at(bytes, at + 8) {
                1 => Hashing::HexModRows,
                2 => Hashing::IntModRows,
                h => return Err(format!("feature {i}: unknown hashing {h}")),
            };
            features.push(Feature { rows, hashing });
        }
        let h = Header {
            num_dense,
            block_samples,
            id_bytes,
            dense,
            samples: u64_at(bytes, 32),
            index_offset: u64_at(bytes, 40),
            file_bytes: u64_at(bytes, 48),
            index_crc: u32_at(bytes, 56),
            features,
        };
        let index_bytes = h
            .blocks()
            .checked_mul(h.index_entry_bytes())
            .and_then(|b| b.checked_add(h.index_offset))
            .ok_or_else(|| format!("{} samples in blocks of {block_samples}: the block index overflows", h.samples))?;
        if index_bytes != h.file_bytes {
            return Err(format!(
                "the header says {} bytes, but its block index ends at byte {index_bytes} (corrupted)",
                h.file_bytes
            ));
        }
        if h.index_offset < h.data_offset() || h.index_offset % 64 != 0 {
            return Err(format!("block index at byte {}, inside the header or misaligned (corrupted)", h.index_offset));
        }
        Ok(h)
    }
}

/// CRC-32 of a header and feature table (`b`: exactly those bytes), the stored CRC field taken
/// as zero.
pub fn header_crc(b: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..60]);
    h.update(&[0; 4]);
    h.update(&b[64..]);
    h.finalize()
}

/// Reads the block index (already bounds-checked by [`Header::parse`] against the file
/// length) and computes every block's place; checks the index checksum, the id counts against
/// the bag limit and that the blocks end exactly at the index.
pub fn parse_index(h: &Header, index: &[u8]) -> std::result::Result<Vec<BlockLayoutAt>, String> {
    let want = h.blocks().checked_mul(h.index_entry_bytes()).ok_or("block index size overflows")?;
    if index.len() as u64 != want {
        return Err(format!("block index of {} bytes, expected {want}", index.len()));
    }
    let crc = crc32fast::hash(index);
    if crc != h.index_crc {
        return Err(format!("block index checksum mismatch: stored {:08x}, computed {crc:08x} (corrupted)", h.index_crc));
    }
    let f = h.features.len();
    let entry = h.index_entry_bytes() as usize;
    let mut at = h.data_offset();
    let mut out = Vec::with_capacity(h.blocks() as usize);
    let mut sections = vec![(false, 0u64); f];
    for b in 0..h.blocks() {
        let e = &index[b as usize * entry..(b as usize + 1) * entry];
        let n = h.block_len(b);
        for (j, s) in sections.iter_mut().enumerate() {
            let v = u64_at(e, 8 + 8 * j);
            let (kind, k) = (v >> KIND_SHIFT, v & ((1 << KIND_SHIFT) - 1));
            let most = match kind {
                KIND_BAGS => n.saturating_mul(MAX_BAG),
                KIND_ONE_HOT => n,
                _ => return Err(format!("block {b}, feature {j}: unknown section kind {kind}")),
            };
            if k > most {
                return Err(format!("block {b}, feature {j}: {k} ids for {n} samples (at most {most})"));
            }
            *s = (kind == KIND_ONE_HOT, k);
        }
        let layout = BlockLayout::new(n, h.num_dense as u64, h.id_bytes as u64, sections.iter().copied()).ok_or_else(|| format!("block {b}: size overflows"))?;
        let end = at.checked_add(layout.bytes).ok_or_else(|| format!("block {b}: offset overflows"))?;
        out.push(BlockLayoutAt { offset: at, crc: u32_at(e, 0), layout });
        at = end;
    }
    if at != h.index_offset {
        return Err(format!("the blocks end at byte {at}, but the index starts at byte {} (corrupted)", h.index_offset));
    }
    Ok(out)
}

/// A block's offset in the file, its checksum and its layout.
#[derive(Clone, Debug)]
pub struct BlockLayoutAt {
    pub offset: u64,
    pub crc: u32,
    pub layout: BlockLayout,
}

/// A memory-mapped `.ember` file: header and index checked at open; samples read by index.
#[derive(Debug)]
pub struct BinaryFile {
    path: PathBuf,
    map: FileBytes,
    header: Header,
    blocks: Vec<BlockLayoutAt>,
}

fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {msg}", path.display()))
}

impl BinaryFile {
    /// Maps `path` and checks its header, feature table and block index (see the module doc).
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

/// Writes one `.ember` file: samples are appended in batches and written a block at a time
/// (memory: one block), under a temporary name renamed to the destination by [`finish`].
///
/// [`finish`]: BinaryWriter::finish
pub struct BinaryWriter {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<File>>,
    header: Header,
    pending: Batch,
    /// Encoded block, and offsets or ids being encoded (all reused).
    buf: Vec<u8>,
    scratch: Vec<u64>,
    scratch32: Vec<u32>,
    index: Vec<u8>,
    at: u64,
}

impl BinaryWriter {
    /// Starts `dest` for samples of `num_dense` dense values and `features`.
    pub fn create(dest: impl AsRef<Path>, num_dense: usize, features: Vec<Feature>, dense: DenseTransform, block_samples: u32) -> Result<BinaryWriter> {
        let dest = dest.as_ref().to_path_buf();
        if cfg!(target_endian = "big") {
            return Err(bad(&dest, "Ember binary files are little-endian; this host is big-endian"));
        }
        if features.is_empty() || features.len() > MAX_FEATURES as usize || num_dense > MAX_DENSE as usize {
            return Err(bad(&dest, format!("{} sparse and {num_dense} dense features: outside the format's limits", features.len())));
        }
        if block_samples == 0 || block_samples > MAX_BLOCK_SAMPLES {
            return Err(bad(&dest, format!("{block_samples} samples per block (1 to {MAX_BLOCK_SAMPLES})")));
        }
        // All ones marks an empty bag: 4-byte ids while every id is below it.
        let id_bytes = if features.iter().all(|f| f.rows <= u32::MAX as u64) { 4 } else { 8 };
        let name = dest.file_name().ok_or_else(|| bad(&dest, "not a file name"))?.to_string_lossy().into_owned();
        let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let header = Header { num_dense: num_dense as u32, block_samples, id_bytes, dense, samples: 0, index_offset: 0, file_bytes: 0, index_crc: 0, features };
        let mut w = BinaryWriter {
            at: header.data_offset(),
            dest,
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            pending: Batch::new(num_dense, header.features.len()),
            buf: Vec::new(),
            scratch: Vec::new(),
            scratch32: Vec::new(),
            index: Vec::new(),
            header,
        };
        // Placeholder header; the real one is written by `finish`.
        let zeros = vec![0u8; w.at as usize];
        w.write(&zeros)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        let f = self.file.as_mut().expect("open until finish");
        f.write_all(b).map_err(|e| Error::io(&self.tmp, e))
    }

    /// Samples written or pending so far.
    pub fn samples(&self) -> u64 {
        self.header.samples + self.pending.size() as u64
    }

    /// Appends `batch`'s samples (their ids must already be below the tables' rows).
    pub fn push(&mut self, batch: &Batch) -> Result<()> {
        if batch.num_dense != self.header.num_dense as usize || batch.sparse.len() != self.header.features.len() || batch.dense.len() != batch.size() * batch.num_dense {
            return Err(bad(&self.dest, "batch layout differs from the file's"));
        }
        if let Some(i) = batch.labels.iter().position(|&y| y != 0.0 && y != 1.0) {
            return Err(bad(&self.dest, format!("label {} of a pushed sample, not 0 or 1", batch.labels[i])));
        }
        if batch.dense.iter().any(|x| !x.is_finite()) {
            return Err(bad(&self.dest, "a pushed dense value is not finite"));
        }
        for (f, (j, ft)) in batch.sparse.iter().zip(&self.header.features).enumerate() {
            if j.lengths.len() != batch.size() {
                return Err(bad(&self.dest, format!("feature {f}: {} bags for {} samples", j.lengths.len(), batch.size())));
            }
            if let Some(&v) = j.values.iter().find(|&&v| v >= ft.rows) {
                return Err(bad(&self.dest, format!("feature {f}: id {v} not below the table's {} rows", ft.rows)));
            }
        }
        let s = self.header.block_samples as usize;
        if self.pending.size() == 0 && batch.size() == s {
            // A whole block: encoded straight from the caller's batch.
            return self.write_block(batch);
        }
        let mut at = 0;
        while at < batch.size() {
            let take = (s - self.pending.size()).min(batch.size() - at);
            if at == 0 && take == batch.size() {
                self.pending.extend(batch);
            } else {
                self.pending.extend(&batch.slice(at..at + take));
            }
            at += take;
            if self.pending.size() == s {
                self.flush_block()?;
            }
        }
        Ok(())
    }

    fn flush_block(&mut self) -> Result<()> {
        if self.pending.size() == 0 {
            return Ok(());
        }
        let p = std::mem::take(&mut self.pending);
        let done = self.write_block(&p);
        self.pending = p;
        let p = &mut self.pending;
        p.dense.clear();
        p.labels.clear();
        for j in &mut p.sparse {
            j.lengths.clear();
            j.values.clear();
        }
        done
    }

    /// Encodes `p` as the next block and writes it.
    fn write_block(&mut self, p: &Batch) -> Result<()> {
        let n = p.size();
        // A one-hot section wherever no bag of the block holds more than one id.
        let sections = p.sparse.iter().map(|j| (j.lengths.iter().all(|&l| l <= 1), j.values.len() as u64));
        let layout = BlockLayout::new(n as u64, self.header.num_dense as u64, self.header.id_bytes as u64, sections)
            .ok_or_else(|| bad(&self.dest, "block size overflows"))?;
        // Sections appended in order, zero padding only where the layout has it.
        let buf = &mut self.buf;
        buf.clear();
        buf.reserve(layout.bytes as usize);
        let pad = |buf: &mut Vec<u8>, to: u64| buf.resize(to as usize, 0);
        buf.extend_from_slice(bytemuck::cast_slice(&p.labels));
        pad(buf, layout.dense);
        buf.extend_from_slice(bytemuck::cast_slice(&p.dense));
        let scratch = &mut self.scratch;
        let id_bytes = self.header.id_bytes as u64;
        for (f, (j, sec)) in p.sparse.iter().zip(&layout.features).enumerate() {
            let Some(off_at) = sec.offsets else {
                pad(buf, sec.ids_at);
                let empty = empty_id(id_bytes);
                let mut v = j.values.iter();
                let mut slot = |l: u32| if l == 1 { v.next().copied().unwrap_or(empty) } else { empty };
                if id_bytes == 4 {
                    let s32 = &mut self.scratch32;
                    s32.clear();
                    s32.extend(j.lengths.iter().map(|&l| slot(l) as u32));
                    buf.extend_from_slice(bytemuck::cast_slice(s32));
                } else {
                    scratch.clear();
                    scratch.extend(j.lengths.iter().map(|&l| slot(l)));
                    buf.extend_from_slice(bytemuck::cast_slice(scratch));
                }
                continue;
            };
            pad(buf, off_at);
            if let Some(&l) = j.lengths.iter().find(|&&l| l as u64 > MAX_BAG) {
                return Err(bad(&self.dest, format!("feature {f}: a bag of {l} ids (at most {MAX_BAG})")));
            }
            scratch.clear();
            scratch.push(0);
            let mut acc = 0u64;
            scratch.extend(j.lengths.iter().map(|&l| {
                acc += l as u64;
                acc
            }));
            buf.extend_from_slice(bytemuck::cast_slice(scratch));
            debug_assert_eq!(buf.len() as u64, sec.ids_at);
            if self.header.id_bytes == 4 {
                scratch.clear();
                // Two u32 ids per u64 word (little-endian), then the odd one.
                scratch.extend(j.values.chunks_exact(2).map(|c| c[0] | c[1] << 32));
                buf.extend_from_slice(bytemuck::cast_slice(scratch));
                if let Some(&v) = j.values.chunks_exact(2).remainder().first() {
                    buf.extend_from_slice(&(v as u32).to_le_bytes());
                }
            } else {
                buf.extend_from_slice(bytemuck::cast_slice(&j.values));
            }
        }
        pad(buf, layout.bytes);
        let crc = crc32fast::hash(buf);
        self.index.extend_from_slice(&crc.to_le_bytes());
        self.index.extend_from_slice(&[0; 4]);
        for sec in &layout.features {
            self.index.extend_from_slice(&sec.entry().to_le_bytes());
        }
        let bytes = std::mem::take(&mut self.buf);
        self.write(&bytes)?;
        self.buf = bytes;
        self.at += layout.bytes;
        self.header.samples += n as u64;
        Ok(())
    }

    /// Writes the last block, the index and the header, syncs, and renames the file into
    /// place. Returns the header written.
    pub fn finish(mut self) -> Result<Header> {
        let done = self.complete();
        if done.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        done
    }

    fn complete(&mut self) -> Result<Header> {
        self.flush_block()?;
        self.header.index_offset = self.at;
        self.header.index_crc = crc32fast::hash(&self.index);
        self.header.file_bytes = self.at + self.index.len() as u64;
        let index = std::mem::take(&mut self.index);
        self.write(&index)?;
        let io = |e| Error::io(&self.tmp, e);
        let mut file = self.file.take().expect("open until finish").into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&self.header.encode()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &self.dest).map_err(io)?;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename is durable once the folder is synced.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(self.header.clone())
    }
}

impl Drop for BinaryWriter {
    fn drop(&mut self) {
        // Not finished (an error or a panic): leave nothing half-written behind.
        if self.file.is_some() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
