//! Shard and dense file headers: decoded with every field checked, or refused; a decoded shard
//! lies inside its table, and a decoded dense header's lengths exactly fill the file.
#![no_main]
use ember_engine::checkpoint::read::{dense_file_bytes, parse_dense_header, parse_shard_header};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(h) = parse_shard_header(data) {
        let s = &h.spec;
        assert!(s.rows.start < s.rows.end && s.rows.end <= s.table_rows);
        assert!(s.cols.start < s.cols.end && s.cols.end <= s.dim);
    }
    // The same bytes as a dense file (with its magic, so that the fuzzer reaches the lengths).
    let mut dense = b"EMBDENSE".to_vec();
    dense.extend_from_slice(data);
    for bytes in [data, &dense[..]] {
        if let Ok(lens) = parse_dense_header(bytes) {
            assert_eq!(dense_file_bytes(&lens), Some(bytes.len() as u64));
        }
    }
});
