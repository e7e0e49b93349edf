//! Throughput of the data sources (ignored by default: a measurement, not a check).
//! Run: `cargo test -p ember-tests --test data_speed -- --ignored --nocapture`.
use ember_engine::config::preset;
use ember_engine::data::criteo::{BadLinePolicy, CriteoReader};
use ember_engine::data::synthetic::SyntheticData;
use ember_engine::data::DataSource;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn synthetic_batch_4096_x_8_tables_x_20_ids() {
    for zipf in [0.0, 1.05] {
        let mut cfg = preset("bench", None).unwrap();
        cfg.synthetic.zipf = zipf;
        let g = SyntheticData::new(&cfg).unwrap();
        let ms: Vec<f64> = (0..21)
            .map(|i| {
                let t = Instant::now();
                let b = g.samples(i * 4096, 4096);
                std::hint::black_box(&b);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        println!("synthetic bench preset, zipf {zipf}: median {:.2} ms per batch of 4096 (8 tables x ~19 ids)", median(ms));
    }
}

#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture"]
fn criteo_reader_lines_per_second() {
    // 1M lines in the raw format, built by repeating the shared sample.
    let text = std::fs::read_to_string(ember_tests::test_data("criteo-sample-200.csv")).unwrap();
    let raw: String = text.lines().skip(1).map(|l| l.replace(',', "\t") + "\n").collect();
    let dir = std::env::temp_dir().join(format!("ember-data-speed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("big.tsv");
    std::fs::write(&p, raw.repeat(5000)).unwrap();
    let model = preset("kaggle", None).unwrap().model;
    let mut secs = vec![];
    for _ in 0..5 {
        let t = Instant::now();
        let mut r = CriteoReader::open(&p, &model, BadLinePolicy::Fail).unwrap();
        let mut n = 0;
        while let Some(b) = r.next_batch(4096).unwrap() {
            n += b.size();
        }
        n += r.eval_set().unwrap().size();
        assert_eq!(n, 1_000_000);
        secs.push(t.elapsed().as_secs_f64());
    }
    let s = median(secs);
    println!("criteo reader: 1,000,000 lines ({} MB) in {:.3} s median (open + count + parse): {:.2} M lines/s", std::fs::metadata(&p).unwrap().len() >> 20, s, 1.0 / s);
    std::fs::remove_file(&p).ok();
}
