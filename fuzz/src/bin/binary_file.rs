//! Ember binary data files (`.ember`): bytes as on disk (first byte 0), or with every checksum
//! made to match (otherwise: header, block index and each block's entry, as far as the header
//! lets them be found, so that the fuzzer reaches the checks behind the checksums), through
//! `BinaryFile::from_bytes`, `verify_blocks` and `read_into` over every sample in chunks sized
//! by the first byte. Either an error naming the file, or a header that describes exactly these
//! bytes and samples that are valid for its features.
#![no_main]
use ember_engine::data::binary::{parse_index, BinaryFile, Header, HEADER_BYTES, MAX_FEATURES};
use ember_engine::data::Batch;

const NAME: &str = "fuzz/day_0.ember";

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// The header checksum over whatever the header and feature table now hold.
fn seal_header(b: &mut [u8]) {
    if b.len() < HEADER_BYTES {
        return;
    }
    let f = u32::from_le_bytes(b[16..20].try_into().expect("4 bytes"));
    let end = HEADER_BYTES + 16 * f as usize;
    if f > MAX_FEATURES || b.len() < end {
        return;
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&b[..60]);
    h.update(&[0; 4]);
    h.update(&b[64..end]);
    put_u32(b, 60, h.finalize());
}

/// Every checksum of `b` made to match its bytes.
fn reseal(b: &mut [u8]) {
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

fn named(e: &ember_engine::Error) {
    let m = e.to_string();
    assert!(m.contains(NAME), "the error does not name the file: {m}");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let mut bytes = body.to_vec();
    if mode != 0 {
        reseal(&mut bytes);
    }
    let len = bytes.len() as u64;
    let f = match BinaryFile::from_bytes(NAME, bytes) {
        Err(e) => return named(&e),
        Ok(f) => f,
    };
    let h = f.header().clone();
    assert_eq!(h.file_bytes, len, "an accepted header describes exactly these bytes");
    assert!(h.index_offset >= h.data_offset() && h.index_offset <= len);
    if let Err(e) = f.verify_blocks() {
        named(&e);
    }
    let rows: Vec<u64> = h.features.iter().map(|f| f.rows).collect();
    let nd = h.num_dense as usize;
    let chunk = 1 + (mode as u64 & 63);
    let mut at = 0;
    while at < h.samples {
        let n = (h.samples - at).min(chunk) as usize;
        let mut b = Batch::new(nd, rows.len());
        match f.read_into(at, n, &mut b) {
            Ok(()) => {
                assert_eq!(b.labels.len(), n);
                assert!(b.labels.iter().all(|&y| y == 0.0 || y == 1.0), "a label not 0 or 1");
                assert_eq!(b.dense.len(), n * nd);
                assert!(b.dense.iter().all(|x| x.is_finite()), "a dense value not finite");
                for (j, &r) in b.sparse.iter().zip(&rows) {
                    assert_eq!(j.lengths.len(), n);
                    assert_eq!(j.lengths.iter().map(|&l| l as u64).sum::<u64>(), j.values.len() as u64);
                    assert!(j.values.iter().all(|&v| v < r), "an id not below {r} rows");
                }
            }
            Err(e) => named(&e),
        }
        at += n as u64;
    }
    let mut b = Batch::new(nd, rows.len());
    named(&f.read_into(h.samples, 1, &mut b).expect_err("a read past the end"));
});
