//! The Criteo reader on the shared 200-line sample (values checked by hand), the same data as raw
//! tab-separated text, each malformation kind with its line number, both bad-line policies,
//! layout mismatches, and resuming by position/skip.
use ember_engine::config::{preset, ModelConfig, Pooling, TableConfig};
use ember_engine::data::criteo::{BadLinePolicy, CriteoReader};
use ember_engine::data::{Batch, DataSource};
use ember_engine::Error;
use ember_tests::test_data;
use std::path::PathBuf;

fn kaggle() -> ModelConfig {
    preset("kaggle", None).unwrap().model
}

fn tmp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ember-data-criteo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn read_all(r: &mut CriteoReader, step: usize) -> Batch {
    let mut all = Batch::new(13, 26);
    while let Some(b) = r.next_batch(step).unwrap() {
        all.extend(&b);
    }
    all
}

fn sample_text() -> String {
    std::fs::read_to_string(test_data("criteo-sample-200.csv")).unwrap()
}

#[test]
fn shared_sample_parses_with_hand_checked_values() {
    let model = kaggle();
    let path = test_data("criteo-sample-200.csv");
    let mut r = CriteoReader::open(&path, &model, BadLinePolicy::Fail).unwrap();
    assert_eq!(r.format().delimiter, b',');
    assert!(r.format().header);
    // 201 lines: 1 header + 200 samples; the last 10 % (20) are the eval set.
    assert_eq!(r.data_lines(), 200);
    assert_eq!(r.len(), Some(180));
    assert_eq!(r.eval_lines(), 20);
    let train = read_all(&mut r, 64);
    assert_eq!(train.size(), 180);
    assert_eq!(r.position(), 180);
    assert!(r.next_batch(10).unwrap().is_none());
    let ev = r.eval_set().unwrap();
    assert_eq!(ev.size(), 20);
    assert_eq!(r.skipped(), 0);
    train.validate(&model).unwrap();
    ev.validate(&model).unwrap();

    // Line 2 of the file (sample 0):
    // 0,,3,260.0,,17668.0,,,33.0,,,,0.0,,05db9164,08d6d899,9143c832,f56b7dd5,25c83c98,7e0ccccf,
    // df5c2d18,0b153874,a73ee510,8f48ce11,a7b606c4,ae1bb660,eae197fd,b28479f6,bfef54b3,bad5ee18,
    // e5ba7672,87c6f83c,,,0429f84b,,3a171ecb,c0d61a5c,,
    assert_eq!(train.labels[0], 0.0);
    let ln = |x: f64| x.ln() as f32;
    let want_dense = [0.0, ln(4.0), ln(261.0), 0.0, ln(17669.0), 0.0, 0.0, ln(34.0), 0.0, 0.0, 0.0, 0.0, 0.0];
    assert_eq!(&train.dense[..13], &want_dense);
    let rows = |t: usize| model.tables[t].rows;
    assert_eq!(rows(2), 1_000_000); // 10131227 capped
    let first = |t: usize| -> Option<u64> {
        let j = &train.sparse[t];
        (j.lengths[0] == 1).then(|| j.values[j.offsets()[0] as usize])
    };
    assert_eq!(first(0), Some(0x05db9164 % 1460));
    assert_eq!(first(1), Some(0x08d6d899 % 583));
    assert_eq!(first(2), Some(0x9143c832 % 1_000_000));
    assert_eq!(first(8), Some(0xa73ee510 % 3));
    assert_eq!(first(17), Some(0x87c6f83c % 5652));
    assert_eq!(first(18), None, "C19 is empty");
    assert_eq!(first(19), None, "C20 is empty");
    assert_eq!(first(20), Some(0x0429f84b % 1_000_000));
    assert_eq!(first(21), None);
    assert_eq!(first(23), Some(0xc0d61a5c % 286181));
    assert_eq!(first(25), None);
    // Line 3 (sample 1): 0,,-1,19.0,35.0,... : "-1" → ln(1 + max(-1, 0)) = 0.
    assert_eq!(train.dense[13], 0.0);
    assert_eq!(train.dense[13 + 1], 0.0);
    assert_eq!(train.dense[13 + 2], ln(20.0));
    assert_eq!(train.dense[13 + 3], ln(36.0));
    // Labels: the sample has both classes.
    let pos = train.labels.iter().chain(&ev.labels).filter(|&&y| y == 1.0).count();
    assert!(pos > 0 && pos < 200);
}

/// The sample rewritten as raw Criteo: tab-separated, no header; CRLF line ends and no final
/// newline to exercise the line splitting.
fn as_raw(text: &str, crlf: bool) -> String {
    let lines: Vec<String> = text.lines().skip(1).map(|l| l.replace(',', "\t")).collect();
    lines.join(if crlf { "\r\n" } else { "\n" })
}

#[test]
fn raw_tab_separated_gives_the_same_batches() {
    let model = kaggle();
    let mut csv = CriteoReader::open(test_data("criteo-sample-200.csv"), &model, BadLinePolicy::Fail).unwrap();
    let text = sample_text();
    for (name, crlf) in [("raw.tsv", false), ("raw-crlf.tsv", true)] {
        let p = tmp(name, &as_raw(&text, crlf));
        let mut tsv = CriteoReader::open(&p, &model, BadLinePolicy::Fail).unwrap();
        assert_eq!(tsv.format().delimiter, b'\t');
        assert!(!tsv.format().header);
        assert_eq!(tsv.data_lines(), 200);
        let mut csv2 = CriteoReader::open(test_data("criteo-sample-200.csv"), &model, BadLinePolicy::Fail).unwrap();
        // Different batch sizes on the two sides: the concatenation must agree.
        assert_eq!(read_all(&mut tsv, 7), read_all(&mut csv2, 50), "{name}");
        assert_eq!(tsv.eval_set().unwrap(), csv.eval_set().unwrap(), "{name}");
    }
}

#[test]
fn resume_by_position_and_skip() {
    let model = kaggle();
    let path = test_data("criteo-sample-200.csv");
    let mut a = CriteoReader::open(&path, &model, BadLinePolicy::Fail).unwrap();
    let all = read_all(&mut a, 1000);
    let mut b = CriteoReader::open(&path, &model, BadLinePolicy::Fail).unwrap();
    b.next_batch(33).unwrap();
    b.skip(40).unwrap();
    assert_eq!(b.position(), 73);
    assert_eq!(b.next_batch(20).unwrap().unwrap(), all.slice(73..93));
    b.skip(1000).unwrap();
    assert_eq!(b.position(), 180);
    assert!(b.next_batch(1).unwrap().is_none());
}

/// A small layout (2 integers, 3 tables) to build large files quickly.
fn small_model() -> ModelConfig {
    ModelConfig {
        num_dense: 2,
        tables: [100u64, 1 << 20, 7]
            .iter()
            .map(|&rows| TableConfig { rows, dim: 8, pooling: Pooling::Sum, bag_size: 1 })
            .collect(),
        bottom_mlp: vec![8],
        top_mlp: vec![1],
        interaction: ember_engine::config::Interaction::Dot,
    }
}

#[test]
fn skip_across_seek_points_on_a_large_file() {
    // 200k lines: more than 3 seek points (every 65536 lines).
    let n = 200_000u64;
    let mut text = String::new();
    for i in 0..n {
        text.push_str(&format!("{}\t{}\t\t{:x}\t{:x}\t{:08x}\n", i % 2, i, i, i * 7919, i));
    }
    let p = tmp("large.tsv", &text);
    let model = small_model();
    let mut r = CriteoReader::open(&p, &model, BadLinePolicy::Fail).unwrap();
    assert_eq!(r.data_lines(), n);
    assert_eq!(r.len(), Some(180_000));
    r.skip(70_000).unwrap();
    r.skip(65_536 + 17).unwrap();
    let at = 70_000 + 65_536 + 17;
    let b = r.next_batch(3).unwrap().unwrap();
    assert_eq!(b.dense[0], ((at + 1) as f64).ln() as f32, "I1 = line index");
    assert_eq!(b.sparse[0].values[0], at % 100);
    assert_eq!(b.sparse[2].values[0], at % 7);
    assert_eq!(b.sparse[1].values[0], (at * 7919) % (1 << 20));
    let ev = r.eval_set().unwrap();
    assert_eq!(ev.size(), 20_000);
    assert_eq!(ev.dense[0], (180_001f64).ln() as f32);
    assert_eq!(ev.sparse[0].lengths[0], 1);
}

/// Header + good lines, with `bad` replacing data line `k` (0-based); returns the path.
fn with_bad_line(name: &str, k: usize, bad: &str) -> PathBuf {
    let text = sample_text();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    lines[k + 1] = bad.to_string();
    tmp(name, &(lines.join("\n") + "\n"))
}

#[test]
fn each_malformation_is_reported_with_its_line_and_skipped_on_request() {
    let model = kaggle();
    let good = sample_text().lines().nth(1).unwrap().to_string();
    let fields: Vec<&str> = good.split(',').collect();
    let with = |i: usize, v: &str| {
        let mut f = fields.clone();
        f[i] = v;
        f.join(",")
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("too-few-fields", fields[..39].join(","), "39 fields, expected 40"),
        ("too-many-fields", good.clone() + ",abc", "41 fields"),
        ("integer-not-numeric", with(5, "12x"), "I5"),
        ("integer-nan", with(1, "nan"), "I1"),
        ("bad-hex", with(16, "zz9143c8"), "C3"),
        ("hex-too-long", with(39, "0123456789abcdef0"), "C26"),
        ("bad-label-2", with(0, "2"), "label"),
        ("bad-label-text", with(0, "yes"), "label"),
        ("empty-label", with(0, ""), "label"),
    ];
    for (k, (name, bad, needle)) in cases.iter().enumerate() {
        // Train part (data line 10 + k → file line 12 + k) and eval part (data line 190 → line 192).
        for (data_line, in_eval) in [(10 + k, false), (190, true)] {
            let p = with_bad_line(&format!("{name}-{data_line}.csv"), data_line, bad);
            let mut r = CriteoReader::open(&p, &model, BadLinePolicy::Fail).unwrap();
            let err = if in_eval {
                read_all(&mut r, 64);
                r.eval_set().unwrap_err()
            } else {
                let mut e = None;
                while e.is_none() {
                    match r.next_batch(4) {
                        Err(x) => e = Some(x),
                        Ok(Some(_)) => {}
                        Ok(None) => panic!("{name}: no error"),
                    }
                }
                e.unwrap()
            };
            match &err {
                Error::Data { path, line, msg } => {
                    assert_eq!(path, &p, "{name}");
                    assert_eq!(*line, data_line as u64 + 2, "{name}: {msg}");
                    assert!(msg.contains(needle), "{name}: message {msg:?} lacks {needle:?}");
                }
                other => panic!("{name}: wrong error {other}"),
            }
            let shown = err.to_string();
            assert!(shown.contains(&format!(":{}:", data_line + 2)), "{shown}");
            // Skip: every other line is read, the bad one counted.
            let mut r = CriteoReader::open(&p, &model, BadLinePolicy::Skip).unwrap();
            let train = read_all(&mut r, 64);
            let ev = r.eval_set().unwrap();
            assert_eq!(train.size() + ev.size(), 199, "{name}");
            assert_eq!(train.size(), if in_eval { 180 } else { 179 }, "{name}");
            assert_eq!(r.skipped(), 1, "{name}");
        }
    }
}

#[test]
fn skip_counts_several_bad_lines() {
    let model = kaggle();
    let text = sample_text();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    for k in [3usize, 50, 51, 120] {
        lines[k] = "garbage".into();
    }
    let p = tmp("several.csv", &(lines.join("\n") + "\n"));
    let mut r = CriteoReader::open(&p, &model, BadLinePolicy::Skip).unwrap();
    // next_batch fills the batch with good samples; positions count lines.
    let b = r.next_batch(100).unwrap().unwrap();
    assert_eq!(b.size(), 100);
    assert_eq!(r.position(), 103);
    assert_eq!(r.skipped(), 3);
    let rest = read_all(&mut r, 100);
    assert_eq!(rest.size(), 76);
    assert_eq!(r.skipped(), 4);
}

#[test]
fn layout_mismatch_is_a_clear_error() {
    let mut model = kaggle();
    model.tables.pop();
    let err = CriteoReader::open(test_data("criteo-sample-200.csv"), &model, BadLinePolicy::Fail).unwrap_err().to_string();
    assert!(err.contains("26 categorical") && err.contains("25 tables"), "{err}");
    let mut model = kaggle();
    model.num_dense = 12;
    let err = CriteoReader::open(test_data("criteo-sample-200.csv"), &model, BadLinePolicy::Fail).unwrap_err().to_string();
    assert!(err.contains("13 integer") && err.contains("num_dense = 12"), "{err}");
    // Raw format (no header): named by field count.
    let p = tmp("raw-mismatch.tsv", &as_raw(&sample_text(), false));
    let err = CriteoReader::open(&p, &small_model(), BadLinePolicy::Fail).unwrap_err().to_string();
    assert!(err.contains("40 fields") && err.contains("raw-mismatch.tsv"), "{err}");
    // Not a Criteo file at all.
    let p = tmp("words.txt", "hello world\n");
    assert!(CriteoReader::open(&p, &kaggle(), BadLinePolicy::Fail).is_err());
    let missing = CriteoReader::open("/nonexistent/criteo.tsv", &kaggle(), BadLinePolicy::Fail);
    assert!(matches!(missing, Err(Error::Io { .. })));
}
