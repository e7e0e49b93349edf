//! Checkpoint manifests: the envelope and JSON as read from disk (first byte 0), or a JSON body
//! wrapped in a correct CRC envelope (otherwise, so that the fuzzer gets past the checksum) and
//! then checked in full. Either an error, or a manifest whose every file name is plain and
//! whose every listed size matches its shape.
#![no_main]
use ember_engine::checkpoint::read::{dense_file_bytes, parse_manifest, plain_name, shard_file_bytes, validate_manifest};
use std::path::Path;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else { return };
    let dir = Path::new("/nonexistent/step-1");
    let text = if mode == 0 {
        body.to_vec()
    } else {
        let mut t = format!("{{\"crc32\":\"{:08x}\",\"manifest\":", crc32fast::hash(body)).into_bytes();
        t.extend_from_slice(body);
        t.extend_from_slice(b"}\n");
        t
    };
    let Ok(m) = parse_manifest(&text, &dir.join("manifest.json")) else { return };
    if validate_manifest(&m, dir).is_ok() {
        for f in &m.files {
            assert!(plain_name(&f.name), "{:?}", f.name);
        }
        let (df, lens) = m.dense().expect("a valid manifest lists the dense file");
        assert_eq!(dense_file_bytes(lens), Some(df.bytes));
        for (f, spec, spr) in m.shards() {
            assert_eq!(shard_file_bytes(spec, spr), Some(f.bytes));
        }
    }
});
