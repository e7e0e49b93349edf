//! Ember binary data files (`.ember`): bytes as on disk (first byte 0), or with every checksum
//! made to match (otherwise: header, block index and each block's entry, as far as the header
//! lets them be found, so that the fuzzer reaches the checks behind the checksums), through
//! `BinaryFile::from_bytes`, `verify_blocks` and `read_into` over every sample in chunks sized
//! by the first byte. Either an error naming the file, or a header that describes exactly these
//! bytes and samples that are valid for its features.
#![no_main]
use ember_engine::data::binary::BinaryFile;
use ember_engine::data::Batch;
use ember_tests::binary::reseal;

const NAME: &str = "fuzz/day_0.ember";

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
