//! TorchRec / MLPerf days from `.npy` and `.npz` bytes: `npy::parse_header` on each file, then
//! `NpyDay::from_bytes` and `read_into` over every sample. The input is a flags byte (bit 0:
//! the multi-hot `.npz` under the DLRMv2 model, else the one-hot `.npy` under the Kaggle
//! model; bits 1-7: the chunk size), the dense and labels files' lengths (u16 each), then the
//! dense, labels and sparse bytes. Either an error naming the day's file, or a consistent
//! header and samples valid for the model.
#![no_main]
use ember_engine::config::{preset, ModelConfig};
use ember_engine::data::npy::{parse_header, NpyDay};
use ember_engine::data::Batch;
use std::path::Path;
use std::sync::OnceLock;

const DAY: &str = "fuzz/day_3";

fn model(multi_hot: bool) -> &'static ModelConfig {
    static M: OnceLock<[ModelConfig; 2]> = OnceLock::new();
    &M.get_or_init(|| [preset("kaggle", None).expect("kaggle").model, preset("dlrmv2", None).expect("dlrmv2").model])[multi_hot as usize]
}

fn named(e: &ember_engine::Error) {
    let m = e.to_string();
    assert!(m.contains(DAY), "the error does not name the day's file: {m}");
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let flags = data[0];
    let dl = u16::from_le_bytes([data[1], data[2]]) as usize;
    let ll = u16::from_le_bytes([data[3], data[4]]) as usize;
    let rest = &data[5..];
    let dense = &rest[..dl.min(rest.len())];
    let rest = &rest[dense.len()..];
    let labels = &rest[..ll.min(rest.len())];
    let sparse = &rest[labels.len()..];
    for bytes in [dense, labels, sparse] {
        if let Ok(h) = parse_header(bytes) {
            assert!(h.shape.len() <= 4 && h.data_offset <= bytes.len());
            let elems = h.shape.iter().fold(1u128, |a, &d| a * d as u128);
            assert_eq!(elems * h.dtype.size() as u128, h.data_bytes as u128);
        }
    }
    let multi_hot = flags & 1 != 0;
    let m = model(multi_hot);
    let day = match NpyDay::from_bytes(Path::new(DAY), dense.to_vec(), labels.to_vec(), sparse.to_vec(), multi_hot, m) {
        Err(e) => return named(&e),
        Ok(d) => d,
    };
    let chunk = 1 + (flags >> 1) as u64;
    let mut at = 0;
    while at < day.samples() {
        let n = (day.samples() - at).min(chunk) as usize;
        let mut b = Batch::new(m.num_dense, m.tables.len());
        match day.read_into(at, n, &mut b) {
            Ok(()) => {
                assert_eq!(b.labels.len(), n);
                assert!(b.labels.iter().all(|&y| y == 0.0 || y == 1.0), "a label not 0 or 1");
                assert_eq!(b.dense.len(), n * m.num_dense);
                assert!(b.dense.iter().all(|x| x.is_finite()), "a dense value not finite");
                for (j, t) in b.sparse.iter().zip(&m.tables) {
                    assert_eq!(j.lengths.len(), n);
                    assert_eq!(j.lengths.iter().map(|&l| l as u64).sum::<u64>(), j.values.len() as u64);
                    assert!(j.values.iter().all(|&v| v < t.rows), "an id not below {} rows", t.rows);
                }
            }
            Err(e) => named(&e),
        }
        at += n as u64;
    }
    let mut b = Batch::new(m.num_dense, m.tables.len());
    named(&day.read_into(day.samples(), 1, &mut b).expect_err("a read past the end"));
});
