//! The layout of a `.ember` file (the parent module's doc is its spec): the header and feature
//! table, each block's section layout and the block index, encoded and parsed with every count
//! checked against a limit and the file length.
use crate::Error;
use std::path::Path;

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
pub(super) const KIND_SHIFT: u32 = 56;
pub(super) const KIND_BAGS: u64 = 0;
pub(super) const KIND_ONE_HOT: u64 = 1;

/// The id that marks an empty bag in a one-hot section (all ones of the id width; every id is
/// below its table's rows, which are at most this for the width).
#[inline]
pub(super) fn empty_id(id_bytes: u64) -> u64 {
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
pub(super) fn align(x: u64, a: u64) -> Option<u64> {
    Some(x.checked_add(a - 1)? / a * a)
}

pub(super) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
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

/// An error about file `path`.
pub(super) fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Input(format!("{}: {msg}", path.display()))
}
