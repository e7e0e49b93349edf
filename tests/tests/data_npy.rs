//! The TorchRec/MLPerf layouts read directly: `.npy` and `.npz` files written by NumPy
//! (committed in tests/data/npy by its make.py; every value recomputed here from the script's
//! formulas), `.npy` headers of each version written here, and the errors for foreign or
//! damaged files.
use ember_engine::config::{preset, ModelConfig};
use ember_engine::data::dataset::{detect, Format, MappedData};
use ember_engine::data::npy::{parse_header, Dtype, NpyDay, Sparse};
use ember_engine::data::{Batch, DataSource};
use ember_tests::test_data;
use std::path::{Path, PathBuf};

const MULTI_HOT: [u64; 26] = [3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1];
const DAYS: [(i64, i64); 2] = [(0, 5), (1, 3)];

fn npy_dir() -> PathBuf {
    test_data("npy")
}

/// Python's `v % m` for m > 0.
fn py_mod(v: i64, m: u64) -> u64 {
    (((v % m as i64) + m as i64) % m as i64) as u64
}

/// What make.py wrote for day `day` (n rows), ids taken modulo `model`'s rows.
fn expected(day: i64, n: i64, model: &ModelConfig, multi_hot: bool) -> Batch {
    let mut b = Batch::new(13, 26);
    for i in 0..n {
        b.labels.push(((day + i) % 2) as f32);
        for j in 0..13 {
            b.dense.push(((day * 100 + i * 13 + j + 3) as f64).ln() as f32);
        }
        for (f, t) in model.tables.iter().enumerate() {
            let f = f as i64;
            if multi_hot {
                let ids: Vec<u64> = (0..MULTI_HOT[f as usize] as i64).map(|j| py_mod((day * 7 + i) * 31 + f * 1009 + j * 65537, t.rows)).collect();
                b.sparse[f as usize].push_bag(&ids);
            } else {
                let sign = if (i + f) % 3 == 0 { -1 } else { 1 };
                b.sparse[f as usize].push_bag(&[py_mod(((day * 7 + i) * 1_000_003 + f * 7919) * sign, t.rows)]);
            }
        }
    }
    b
}

/// Equal, dense within 1 ulp (NumPy's float32 log against Rust's f64 log rounded).
fn assert_close(got: &Batch, want: &Batch, what: &str) {
    assert_eq!(got.labels, want.labels, "{what}: labels");
    assert_eq!(got.sparse, want.sparse, "{what}: sparse");
    assert_eq!(got.dense.len(), want.dense.len(), "{what}: dense");
    for (k, (a, b)) in got.dense.iter().zip(&want.dense).enumerate() {
        assert!((a.to_bits() as i64 - b.to_bits() as i64).abs() <= 1, "{what}: dense {k}: {a} vs {b}");
    }
}

fn read(day: &NpyDay, start: u64, n: usize) -> Batch {
    let mut b = Batch::new(13, 26);
    day.read_into(start, n, &mut b).unwrap();
    b
}

#[test]
fn numpy_written_torchrec_days_read_with_ids_modulo_the_tables() {
    for model in [preset("kaggle", None).unwrap().model, preset("kaggle", Some(1000)).unwrap().model] {
        for (day, n) in DAYS {
            let d = NpyDay::open(&npy_dir().join(format!("day_{day}")), false, &model).unwrap();
            assert!(matches!(d.sparse, Sparse::OneHot(_)));
            assert_eq!(d.samples(), n as u64);
            let want = expected(day, n, &model, false);
            assert_close(&read(&d, 0, n as usize), &want, "whole day");
            assert_close(&read(&d, 1, 2), &want.slice(1..3), "rows 1..3");
        }
    }
}

#[test]
fn numpy_written_mlperf_multi_hot_npz_reads_every_member() {
    let model = preset("dlrmv2", None).unwrap().model;
    for (day, n) in DAYS {
        let d = NpyDay::open(&npy_dir().join(format!("day_{day}")), true, &model).unwrap();
        match &d.sparse {
            Sparse::MultiHot(m) => assert_eq!(m.iter().map(|a| a.cols as u64).collect::<Vec<_>>(), MULTI_HOT),
            other => panic!("one-hot: {other:?}"),
        }
        let want = expected(day, n, &model, true);
        assert_close(&read(&d, 0, n as usize), &want, "whole day");
        assert_close(&read(&d, n as u64 - 1, 1), &want.slice(n as usize - 1..n as usize), "last row");
        assert_eq!(want.sparse.iter().map(|j| j.values.len()).sum::<usize>(), 214 * n as usize);
    }
}

#[test]
fn a_folder_of_days_is_detected_and_read_in_day_order() {
    let kaggle = preset("kaggle", None).unwrap().model;
    let dlrmv2 = preset("dlrmv2", None).unwrap().model;
    let days = vec![npy_dir().join("day_0"), npy_dir().join("day_1")];
    // One-hot tables read day_N_sparse.npy, multi-hot tables the .npz.
    assert_eq!(detect(&npy_dir(), &kaggle).unwrap(), Format::Npy(days.clone(), false));
    assert_eq!(detect(&npy_dir(), &dlrmv2).unwrap(), Format::Npy(days.clone(), true));
    assert_eq!(detect(&npy_dir().join("day_1_labels.npy"), &kaggle).unwrap(), Format::Npy(vec![days[1].clone()], false));
    assert_eq!(detect(&npy_dir().join("day_1_sparse_multi_hot.npz"), &kaggle).unwrap(), Format::Npy(vec![days[1].clone()], true));
    // Day 0 trains, day 1 evaluates.
    let train = Format::Npy(vec![days[0].clone()], true);
    let eval = Format::Npy(vec![days[1].clone()], true);
    let mut d = MappedData::open(&train, Some(&eval), &dlrmv2, 1, 1).unwrap();
    let mut got = Batch::new(13, 26);
    while let Some(b) = d.next_batch(2).unwrap() {
        got.extend(&b);
    }
    assert_close(&got, &expected(0, 5, &dlrmv2, true), "training stream");
    assert_close(&d.eval_set().unwrap(), &expected(1, 3, &dlrmv2, true), "eval set");
}

/// A `.npy` file of `version` with `dict` as its header and `data` after it.
fn npy(version: u8, dict: &str, data: &[u8]) -> Vec<u8> {
    let mut h = dict.to_string();
    let pre = if version == 1 { 10 } else { 12 };
    while (pre + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY".to_vec();
    b.extend([version, 0]);
    if version == 1 {
        b.extend((h.len() as u16).to_le_bytes());
    } else {
        b.extend((h.len() as u32).to_le_bytes());
    }
    b.extend(h.as_bytes());
    b.extend(data);
    b
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
fn headers_of_each_version_and_element_type() {
    // The data starts where the header's padding ends (no data follows in these buffers).
    let b = npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 13), }", &[]);
    let h = parse_header(&b).unwrap();
    assert_eq!((h.dtype, h.fortran_order, h.shape.clone(), h.data_offset, h.data_bytes), (Dtype::F32, false, vec![3, 13], b.len(), 156));
    let b = npy(2, "{\"descr\":\"<i8\",\"shape\":(7,),\"fortran_order\":True}", &[]);
    let h = parse_header(&b).unwrap();
    assert_eq!((h.dtype, h.fortran_order, h.shape.clone(), h.data_offset), (Dtype::I64, true, vec![7], b.len()));
    let h = parse_header(&npy(3, "{'descr': '<u4', 'fortran_order': False, 'shape': (), }", &[])).unwrap();
    assert_eq!((h.shape.clone(), h.data_bytes), (vec![], 4));
    for (dict, why) in [
        ("{'descr': '>f4', 'fortran_order': False, 'shape': (3,), }", "element type"),
        ("{'descr': '<f4', 'fortran_order': False, }", "no 'shape'"),
        ("{'descr': '<f4', 'fortran_order': 0, 'shape': (3,), }", "True or False"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }", "overflows"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 1, 1, 1, 1), }", "dimensions"),
        ("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), 'x': 1}", "unexpected key"),
        ("['descr']", "expected '{'"),
    ] {
        let err = parse_header(&npy(1, dict, &[])).unwrap_err();
        assert!(err.contains(why), "{dict}: {err}");
    }
    assert!(parse_header(b"\x93NUMPY\x04\x00\x00\x00").unwrap_err().contains("version 4"));
    assert!(parse_header(b"PK\x03\x04 not npy").unwrap_err().contains("magic"));
    let mut long = npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }", &[]);
    long.truncate(30);
    assert!(parse_header(&long).unwrap_err().contains("truncated"));
}

#[test]
fn damaged_or_foreign_days_are_errors_naming_the_file() {
    let model = preset("kaggle", None).unwrap().model;
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("data-npy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f32s = |n: usize| vec![0u8; 4 * n];
    // A good one-hot day of 2 rows written here: i64 sparse, 1-D labels, version-2 headers.
    let dense = npy(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 13), }", &f32s(26));
    let sparse: Vec<u8> = (0..52i64).flat_map(|v| (v - 10).to_le_bytes()).collect();
    write(&dir, "day_3_dense.npy", &dense);
    write(&dir, "day_3_sparse.npy", &npy(2, "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 26), }", &sparse));
    write(&dir, "day_3_labels.npy", &npy(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", &[1, 0, 0, 0, 0, 0, 0, 0]));
    let d = NpyDay::open(&dir.join("day_3"), false, &model).unwrap();
    let b = read(&d, 0, 2);
    assert_eq!(b.labels, vec![1.0, 0.0]);
    assert_eq!(b.sparse[0].values, vec![py_mod(-10, model.tables[0].rows), py_mod(16, model.tables[0].rows)]);
    // Each damage, and the message it gives.
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("day_3_dense.npy", dense[..dense.len() - 4].to_vec(), "truncated"),
        ("day_3_dense.npy", npy(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 13), }", &f32s(26)), "Fortran"),
        ("day_3_dense.npy", npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 12), }", &f32s(24)), "num_dense = 13"),
        ("day_3_sparse.npy", npy(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (3, 26), }", &f32s(78)), "3 rows"),
        ("day_3_sparse.npy", npy(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 26), }", &f32s(52)), "float32"),
        ("day_3_labels.npy", npy(1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }", &[2, 0, 0, 0, 0, 0, 0, 0]), "not 0 or 1"),
        ("day_3_labels.npy", b"not numpy".to_vec(), "magic"),
    ];
    for (name, bytes, why) in cases {
        let good = std::fs::read(dir.join(name)).unwrap();
        write(&dir, name, &bytes);
        let err = NpyDay::open(&dir.join("day_3"), false, &model).and_then(|d| {
            let mut b = Batch::new(13, 26);
            d.read_into(0, 2, &mut b)
        });
        let err = err.unwrap_err().to_string();
        assert!(err.contains(why) && err.contains(name), "{name} ({why}): {err}");
        write(&dir, name, &good);
    }
    // A compressed .npz (np.savez_compressed) cannot be mapped: said so.
    let mut z = std::fs::read(npy_dir().join("day_1_sparse_multi_hot.npz")).unwrap();
    // Local header and central-directory compression method of member 0 set to deflate (8).
    z[8] = 8;
    let cd = z.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    z[cd + 10] = 8;
    std::fs::copy(npy_dir().join("day_1_dense.npy"), dir.join("day_1_dense.npy")).unwrap();
    std::fs::copy(npy_dir().join("day_1_labels.npy"), dir.join("day_1_labels.npy")).unwrap();
    write(&dir, "day_1_sparse_multi_hot.npz", &z);
    let err = NpyDay::open(&dir.join("day_1"), true, &preset("dlrmv2", None).unwrap().model).unwrap_err().to_string();
    assert!(err.contains("compressed") && err.contains("day_1_sparse_multi_hot.npz"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
