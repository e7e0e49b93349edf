//! Crafting Ember binary data files for hostile-input tests and the `binary_file` fuzz target:
//! damage a file, then make its checksums match again, so that the checks behind the checksums
//! are reached, as a deliberately crafted file would reach them.
use ember_engine::data::binary::{header_crc, parse_index, Header, HEADER_BYTES, MAX_FEATURES};

/// Writes `v` little-endian at byte `at`.
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Rewrites the header checksum over whatever the header and feature table now hold (nothing
/// when the bytes are too short for the feature count they state).
pub fn seal_header(b: &mut [u8]) {
    if b.len() < HEADER_BYTES {
        return;
    }
    let f = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    if f > MAX_FEATURES || b.len() < HEADER_BYTES + 16 * f as usize {
        return;
    }
    let end = HEADER_BYTES + 16 * f as usize;
    put_u32(b, 60, header_crc(&b[..end]));
}

/// Makes every checksum of `b` match its bytes, as far as the header lets them be found:
/// header, block index, and each block's entry in the index.
pub fn reseal(b: &mut [u8]) {
    seal_header(b);
    let Ok(h) = Header::parse(b) else { return };
    if h.file_bytes != b.len() as u64 {
        return;
    }
    let idx = h.index_offset as usize;
    let seal_index = |b: &mut [u8]| {
        put_u32(b, 56, crc32fast::hash(&b[idx..]));
        seal_header(b);
    };
    seal_index(b);
    let Ok(h) = Header::parse(b) else { return };
    let Ok(blocks) = parse_index(&h, &b[idx..]) else { return };
    let entry = h.index_entry_bytes() as usize;
    for (i, blk) in blocks.iter().enumerate() {
        let (at, len) = (blk.offset as usize, blk.layout.bytes as usize);
        let crc = crc32fast::hash(&b[at..at + len]);
        put_u32(b, idx + i * entry, crc);
    }
    seal_index(b);
}
