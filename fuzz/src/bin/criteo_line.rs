//! The Criteo line parser on arbitrary bytes, under a model shaped by the first byte: each line
//! is either one sample appended (labels 0/1, finite dense values, every id below its table's
//! rows) or an error that leaves the batch unchanged.
#![no_main]
use ember_engine::config::{preset, ModelConfig};
use ember_engine::data::criteo::LineParser;
use ember_engine::data::Batch;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// The model and parser of each shape byte, made once (a parser carries a 4096-entry table).
    static CACHE: RefCell<HashMap<u8, (ModelConfig, LineParser)>> = RefCell::new(HashMap::new());
}

fn shaped(shape: u8) -> (ModelConfig, LineParser) {
    let mut model = preset("tiny", None).expect("tiny preset").model;
    model.num_dense = 1 + (shape & 3) as usize;
    model.tables.truncate(1 + ((shape >> 2) & 7) as usize);
    // Rows from 1 to beyond 2^32 (the parser's fast and slow modulo paths).
    for (i, t) in model.tables.iter_mut().enumerate() {
        t.rows = [1, 7, 1000, 1 << 32, (1 << 40) - 3][(i + (shape >> 5) as usize) % 5];
    }
    let p = LineParser::new(&model, if shape & 0x80 != 0 { b'\t' } else { b',' });
    (model, p)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&shape, line)) = data.split_first() else { return };
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let (model, p) = c.entry(shape).or_insert_with(|| shaped(shape));
        let mut b = Batch::new(model.num_dense, model.tables.len());
        // Every buffer's length: a refused line must leave them all as they were.
        let lens = |b: &Batch| (b.labels.len(), b.dense.len(), b.sparse.iter().map(|j| (j.lengths.len(), j.values.len())).collect::<Vec<_>>());
        for sample in line.split(|&c| c == b'\n') {
            let before = lens(&b);
            match p.parse_into(sample, &mut b) {
                Ok(()) => assert_eq!(b.size(), before.0 + 1),
                Err(msg) => {
                    assert!(!msg.is_empty());
                    assert_eq!(lens(&b), before, "a refused line changed the batch");
                }
            }
        }
        b.validate(model).expect("the parsed samples fit the model");
    });
});
