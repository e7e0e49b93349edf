//! Ember's binary sample format (`.ember` files): Criteo-style samples preprocessed once by
//! `ember convert` and memory-mapped by every rank, which then touches only the pages of its
//! own samples. This module owns the layout (`format`), its reader (`reader`) and its writer (`writer`); docs/data.md is the
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

mod format;
mod reader;
mod writer;

pub use format::{
    header_crc, parse_index, BlockLayout, BlockLayoutAt, DenseTransform, Feature, Hashing, Header, Section, DEFAULT_BLOCK_SAMPLES, FEATURE_BYTES,
    HEADER_BYTES, MAGIC, MAX_BAG, MAX_BLOCK_SAMPLES, MAX_DENSE, MAX_FEATURES, VERSION,
};
pub use reader::BinaryFile;
pub use writer::BinaryWriter;
