//! Property tests over hostile data files, read from bytes in memory (`BinaryFile::from_bytes`,
//! `NpyDay::from_bytes`, the entry points a fuzz target calls): random bytes, headers with
//! absurd counts, offsets past the end, wrong element types, truncations, bit flips, and damage
//! *resealed* with correct checksums (so that the checks behind the checksums are reached, as a
//! crafted file would). Every outcome is either an error naming the file, or samples that are
//! valid for the model: labels 0 or 1, finite dense values, one bag per sample whose lengths sum
//! to the ids read, every id below its table's rows. Never a panic, an overflow or a read out of
//! bounds (the tests build with overflow checks off, so out-of-bounds slicing is what panics).
//!
//! Each property takes `arbitrary`'s `Unstructured`, as a libFuzzer target body does; arbtest
//! runs it over random inputs for a time budget and prints the seed of a failure to replay it.
use arbtest::arbitrary::{self, Unstructured};
use arbtest::arbtest;
use ember_engine::config::{preset, ModelConfig};
use ember_engine::data::binary::{BinaryFile, BinaryWriter, DenseTransform, Feature, Hashing, Header, HEADER_BYTES, MAX_FEATURES};
use ember_engine::data::npy::{parse_header, NpyDay};
use ember_engine::data::Batch;
use ember_engine::rng::Rng;
use ember_tests::binary::{put_u32, reseal, seal_header};
use ember_tests::test_data;
use std::path::Path;
use std::sync::OnceLock;

/// Time each property runs for.
const BUDGET_MS: u64 = 1500;

/// Samples `b` of `n` samples are valid for tables of `rows` rows and `nd` dense features.
fn assert_valid(b: &Batch, n: usize, nd: usize, rows: &[u64], what: &str) {
    assert_eq!(b.labels.len(), n, "{what}: labels");
    assert!(b.labels.iter().all(|&y| y == 0.0 || y == 1.0), "{what}: a label not 0 or 1");
    assert_eq!(b.dense.len(), n * nd, "{what}: dense values");
    assert!(b.dense.iter().all(|x| x.is_finite()), "{what}: a dense value not finite");
    assert_eq!(b.sparse.len(), rows.len(), "{what}: features");
    for (f, (j, &r)) in b.sparse.iter().zip(rows).enumerate() {
        assert_eq!(j.lengths.len(), n, "{what}: feature {f}: bags");
        assert_eq!(j.lengths.iter().map(|&l| l as u64).sum::<u64>(), j.values.len() as u64, "{what}: feature {f}: lengths vs ids");
        assert!(j.values.iter().all(|&v| v < r), "{what}: feature {f}: an id not below {r} rows");
    }
}

/// An error that names `name`.
fn assert_names(e: &ember_engine::Error, name: &str) {
    let m = e.to_string();
    assert!(m.contains(name), "the error does not name {name}: {m}");
}

// ---------------------------------------------------------------------------------------------
// Ember binary files.

const BIN: &str = "hostile/day_9.ember";

/// Valid files to damage: (bytes, rows), of several shapes (blocks of 1 to 64 samples, 1 to 5
/// features, 4- and 8-byte ids, bags of 0 to 6 ids or one-hot, 0 to 3 dense values).
fn valid_binary_files() -> &'static [(Vec<u8>, Vec<u64>)] {
    static FILES: OnceLock<Vec<(Vec<u8>, Vec<u64>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("data-hostile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut rng = Rng::new(17);
        let mut out = vec![];
        for (i, (rows, nd, n, block)) in [
            (vec![11u64, 300, 2], 2usize, 23usize, 5u32),
            (vec![7], 0, 9, 1),
            (vec![1 << 40, 3], 3, 40, 64),
            (vec![5, 5, 5, 5, 1000], 1, 130, 32),
            // One-hot bags (0 or 1 id): one-hot sections, and 8-byte ids.
            (vec![4, 9, u32::MAX as u64 + 1], 2, 50, 16),
            (vec![u32::MAX as u64, 3], 1, 20, 8),
        ]
        .into_iter()
        .enumerate()
        {
            let mut b = Batch::new(nd, rows.len());
            for _ in 0..n {
                b.labels.push((rng.next_u64() % 2) as f32);
                b.dense.extend((0..nd).map(|_| (rng.next_u64() % 1000) as f32 * 0.25));
                for (j, &r) in b.sparse.iter_mut().zip(&rows) {
                    let most = if i >= 4 { 2 } else { 7 };
                    let ids: Vec<u64> = (0..rng.next_u64() % most).map(|_| rng.next_u64() % r).collect();
                    j.push_bag(&ids);
                }
            }
            let p = dir.join(format!("v{i}.ember"));
            let feats = rows.iter().map(|&r| Feature { rows: r, hashing: Hashing::IntModRows }).collect();
            let mut w = BinaryWriter::create(&p, nd, feats, DenseTransform::AsGiven, block).unwrap();
            w.push(&b).unwrap();
            w.finish().unwrap();
            out.push((std::fs::read(&p).unwrap(), rows));
        }
        std::fs::remove_dir_all(&dir).unwrap();
        out
    })
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Opens `bytes`, checks every block and reads every sample in chunks of `chunk`: errors name
/// the file, samples read are valid.
fn read_hostile_binary(bytes: Vec<u8>, chunk: usize) {
    let len = bytes.len() as u64;
    let f = match BinaryFile::from_bytes(BIN, bytes) {
        Err(e) => return assert_names(&e, BIN),
        Ok(f) => f,
    };
    let h = f.header().clone();
    // An accepted header describes exactly these bytes.
    assert_eq!(h.file_bytes, len);
    assert!(h.index_offset >= h.data_offset() && h.index_offset <= len);
    if let Err(e) = f.verify_blocks() {
        assert_names(&e, BIN);
    }
    let rows: Vec<u64> = h.features.iter().map(|f| f.rows).collect();
    let nd = h.num_dense as usize;
    let mut at = 0;
    while at < h.samples {
        let n = (h.samples - at).min(chunk as u64) as usize;
        let mut b = Batch::new(nd, rows.len());
        match f.read_into(at, n, &mut b) {
            Ok(()) => assert_valid(&b, n, nd, &rows, &format!("samples {at}+{n}")),
            Err(e) => assert_names(&e, BIN),
        }
        at += n as u64;
    }
    let mut b = Batch::new(nd, rows.len());
    assert_names(&f.read_into(h.samples, 1, &mut b).unwrap_err(), BIN);
}

/// Header fields (offset, width) and values a hostile header sets them to.
const FIELDS: [(usize, usize); 10] = [(8, 4), (12, 4), (16, 4), (20, 4), (24, 4), (28, 4), (32, 8), (40, 8), (48, 8), (64, 8)];
const HOSTILE: [u64; 14] = [0, 1, 2, 3, 7, 8, 64, 4096, 4097, 1 << 24, (1 << 24) + 1, u32::MAX as u64, 1 << 32, u64::MAX];

/// One damage to a valid file: a byte flipped (anywhere, or in the header, feature table or
/// index), a header field set to a hostile value (or to the file's length, or past it), a
/// truncation or bytes appended.
fn damage(u: &mut Unstructured, b: &mut Vec<u8>) -> arbitrary::Result<()> {
    let len = b.len() as u64;
    match u.int_in_range(0..=5)? {
        0 | 1 => {
            if b.is_empty() {
                return Ok(());
            }
            let idx = u64::from_le_bytes(b.get(40..48).map_or([0; 8], |s| s.try_into().unwrap())).min(len.saturating_sub(1));
            let at = match u.int_in_range(0..=2)? {
                0 => u.int_in_range(0..=len - 1)?,
                1 => u.int_in_range(0..=(HEADER_BYTES as u64 + 48).min(len - 1))?,
                _ => u.int_in_range(idx..=len - 1)?,
            } as usize;
            b[at] ^= u.int_in_range(1..=255)?;
        }
        2 | 3 => {
            let (at, w) = *u.choose(&FIELDS)?;
            let v = match u.int_in_range(0..=3)? {
                0 => *u.choose(&HOSTILE)?,
                1 => len.wrapping_add(u.int_in_range(0..=64)?),
                2 => len.wrapping_sub(u.int_in_range(0..=64)?),
                _ => u.arbitrary()?,
            };
            if b.len() >= at + w {
                if w == 4 {
                    put_u32(b, at, v as u32);
                } else {
                    put_u64(b, at, v);
                }
            }
        }
        4 => b.truncate(u.int_in_range(0..=len)? as usize),
        _ => {
            let n = u.int_in_range(1..=200)?;
            b.extend(std::iter::repeat(u.arbitrary::<u8>()?).take(n));
        }
    }
    Ok(())
}

fn hostile_binary(u: &mut Unstructured) -> arbitrary::Result<()> {
    let files = valid_binary_files();
    let (good, _) = &files[u.choose_index(files.len())?];
    let mut b = good.clone();
    for _ in 0..u.int_in_range(1..=4)? {
        damage(u, &mut b)?;
    }
    if u.ratio(3, 4)? {
        reseal(&mut b);
    }
    read_hostile_binary(b, u.int_in_range(1..=70)?);
    Ok(())
}

#[test]
fn damaged_binary_files_are_refused_or_read_as_valid_samples() {
    // The unharmed files read back as they were written.
    for (good, rows) in valid_binary_files() {
        let f = BinaryFile::from_bytes(BIN, good.clone()).unwrap();
        f.verify_blocks().unwrap();
        let mut b = Batch::new(f.header().num_dense as usize, rows.len());
        f.read_into(0, f.samples() as usize, &mut b).unwrap();
        assert_valid(&b, f.samples() as usize, f.header().num_dense as usize, rows, "intact");
    }
    arbtest(hostile_binary).budget_ms(BUDGET_MS).run();
}

#[test]
fn resealed_damage_reaches_the_checks_behind_the_checksums() {
    // The properties above only mean something if resealed damage gets past the checksums: a
    // resealed id past its table is an error from the read, not from a checksum.
    let (good, _) = &valid_binary_files()[0];
    let f = BinaryFile::from_bytes(BIN, good.clone()).unwrap();
    let mut b = good.clone();
    let (at, _) = f.sample_ranges(3).into_iter().last().unwrap();
    b[at as usize + 1] = 0xff;
    reseal(&mut b);
    let f = BinaryFile::from_bytes(BIN, b).unwrap();
    f.verify_blocks().unwrap();
    let mut batch = Batch::new(2, 3);
    let err = f.read_into(0, 23, &mut batch).unwrap_err().to_string();
    assert!(err.contains(BIN) && err.contains("not below the table's 2 rows"), "{err}");
    // Resealed counts and offsets the file cannot hold are refused at open, by the layout
    // checks: a sample count needing a sixth block, and an index past the end.
    for (field, v, why) in [(32, 30, "block index ends at byte"), (40, good.len() as u64 + 64, "block index ends at byte"), (48, 1 << 40, "block index ends at byte")] {
        let mut b = good.clone();
        put_u64(&mut b, field, v);
        reseal(&mut b);
        let err = BinaryFile::from_bytes(BIN, b).unwrap_err().to_string();
        assert!(err.contains(BIN) && err.contains(why) && !err.contains("checksum"), "{err}");
    }
}

#[test]
fn any_bytes_are_refused_or_a_consistent_header() {
    arbtest(|u| {
        let mut b: Vec<u8> = u.arbitrary()?;
        if u.ratio(1, 2)? {
            // Past the magic and version, with a correct header checksum.
            let mut h = b"EMBERDAT\x01\x00\x00\x00".to_vec();
            h.append(&mut b);
            b = h;
            seal_header(&mut b);
        }
        if let Ok(h) = Header::parse(&b) {
            let blocks = h.samples.div_ceil(h.block_samples as u64) as u128;
            assert_eq!(h.index_offset as u128 + blocks * h.index_entry_bytes() as u128, h.file_bytes as u128);
            assert!(!h.features.is_empty() && h.features.len() <= MAX_FEATURES as usize);
        }
        read_hostile_binary(b, 1000);
        Ok(())
    })
    .budget_ms(BUDGET_MS)
    .run();
}

// ---------------------------------------------------------------------------------------------
// TorchRec / MLPerf .npy and .npz.

fn kaggle() -> &'static ModelConfig {
    static M: OnceLock<ModelConfig> = OnceLock::new();
    M.get_or_init(|| preset("kaggle", None).unwrap().model)
}
fn dlrmv2() -> &'static ModelConfig {
    static M: OnceLock<ModelConfig> = OnceLock::new();
    M.get_or_init(|| preset("dlrmv2", None).unwrap().model)
}

/// `.npy` bytes: `version`, the header length field as stated (`len_field`, or the true
/// length), the header text, then `data`.
fn npy_bytes(version: u8, len_field: Option<u32>, text: &str, data: &[u8]) -> Vec<u8> {
    let mut b = b"\x93NUMPY".to_vec();
    b.extend([version, 0]);
    let len = len_field.unwrap_or(text.len() as u32);
    if version == 1 {
        b.extend((len as u16).to_le_bytes());
    } else {
        b.extend(len.to_le_bytes());
    }
    b.extend(text.as_bytes());
    b.extend(data);
    b
}

fn dict(descr: &str, shape: &[u64]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let dims = if dims.len() == 1 { format!("{},", dims[0]) } else { dims.join(", ") };
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}\n")
}

/// A day prefix for errors; the three files' names start with it.
const DAY: &str = "hostile/day_7";

/// The valid one-hot day of `n` samples: dense, labels and sparse `.npy` bytes.
fn valid_day(n: u64) -> [Vec<u8>; 3] {
    let dense: Vec<u8> = (0..n * 13).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let labels: Vec<u8> = (0..n).flat_map(|i| ((i % 2) as i32).to_le_bytes()).collect();
    let sparse: Vec<u8> = (0..n * 26).flat_map(|i| (i as i64 * 7919 - 50_000).to_le_bytes()).collect();
    [npy_bytes(1, None, &dict("<f4", &[n, 13]), &dense), npy_bytes(2, None, &dict("<i4", &[n]), &labels), npy_bytes(1, None, &dict("<i8", &[n, 26]), &sparse)]
}

/// A `.npy` file with a hostile header: any element type (big-endian, float64, bytes, objects,
/// none), any order, 0 to 6 dimensions of any size (huge products included), keys missing,
/// repeated, unknown or misquoted, any version, a header length field that lies; and data of
/// the length the shape needs, or shorter, or longer, filled with zeros, small integers or
/// random bytes.
fn hostile_npy(u: &mut Unstructured) -> arbitrary::Result<Vec<u8>> {
    let descr = *u.choose(&["<f4", "<i4", "<i8", "<u4", "<u8", ">f4", ">i8", "<f8", "|u1", "<f2", "O", "", "<i4\"", "<c8"])?;
    let fortran = *u.choose(&["False", "True", "0", "None", "False,"])?;
    let ndim = u.int_in_range(0..=6)?;
    let mut shape = vec![];
    for _ in 0..ndim {
        shape.push(match u.int_in_range(0..=2)? {
            0 => u.int_in_range(0..=30)?.to_string(),
            1 => u.choose(&["13", "26", "2147483648", "4294967295", "4294967296", "1099511627776", "18446744073709551615", "18446744073709551616", "-1", "3L", "", "x"])?.to_string(),
            _ => u.arbitrary::<u64>()?.to_string(),
        });
    }
    let shape = if shape.len() == 1 && u.ratio(3, 4)? { format!("({},)", shape[0]) } else { format!("({})", shape.join(", ")) };
    let q = if u.ratio(1, 5)? { "\"" } else { "'" };
    let mut entries = vec![format!("{q}descr{q}: {q}{descr}{q}"), format!("{q}fortran_order{q}: {fortran}"), format!("{q}shape{q}: {shape}")];
    match u.int_in_range(0..=7)? {
        0 => {
            entries.remove(u.choose_index(3)?);
        }
        1 => entries.push("'extra': 1".into()),
        2 => entries.push(entries[0].clone()),
        _ => {}
    }
    if u.ratio(1, 4)? {
        let (i, j) = (u.choose_index(entries.len())?, u.choose_index(entries.len())?);
        entries.swap(i, j);
    }
    let mut text = format!("{{{}{}}}", entries.join(", "), if u.ratio(1, 2)? { ", " } else { "" });
    while (10 + text.len() + 1) % 64 != 0 {
        text.push(' ');
    }
    text.push('\n');
    let version = *u.choose(&[1u8, 1, 2, 3, 0, 4])?;
    let len_field = if u.ratio(1, 6)? { Some(u.arbitrary()?) } else { None };
    // Data for the shape, when the shape is small enough to write.
    let want = shape
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse::<u64>().ok())
        .try_fold(if descr.contains('8') { 8u64 } else { 4 }, |a, d| a.checked_mul(d?))
        .filter(|&b| b <= 1 << 16)
        .unwrap_or(64) as usize;
    let len = match u.int_in_range(0..=3)? {
        0 => want.saturating_sub(u.int_in_range(1..=16)?),
        1 => want + u.int_in_range(0..=16)?,
        _ => want,
    };
    let data: Vec<u8> = match u.int_in_range(0..=2)? {
        0 => vec![0; len],
        1 => (0..len).map(|i| if i % 4 == 0 { (i / 4 % 2) as u8 } else { 0 }).collect(),
        _ => (0..len).map(|_| u.arbitrary::<u8>()).collect::<arbitrary::Result<_>>()?,
    };
    Ok(npy_bytes(version, len_field, &text, &data))
}

/// Opens a day from `files` and reads every sample in chunks of `chunk`: errors name the day,
/// samples read are valid for `model`.
fn read_hostile_day(files: [Vec<u8>; 3], multi_hot: bool, model: &ModelConfig, chunk: usize) {
    let [d, l, s] = files;
    let day = match NpyDay::from_bytes(Path::new(DAY), d, l, s, multi_hot, model) {
        Err(e) => return assert_names(&e, DAY),
        Ok(day) => day,
    };
    let rows: Vec<u64> = model.tables.iter().map(|t| t.rows).collect();
    let mut at = 0;
    while at < day.samples() {
        let n = (day.samples() - at).min(chunk as u64) as usize;
        let mut b = Batch::new(model.num_dense, rows.len());
        match day.read_into(at, n, &mut b) {
            Ok(()) => assert_valid(&b, n, model.num_dense, &rows, &format!("samples {at}+{n}")),
            Err(e) => assert_names(&e, DAY),
        }
        at += n as u64;
    }
    let mut b = Batch::new(model.num_dense, rows.len());
    assert_names(&day.read_into(day.samples(), 1, &mut b).unwrap_err(), DAY);
}

#[test]
fn hostile_npy_headers_are_refused_or_consistent() {
    arbtest(|u| {
        let bytes = if u.ratio(1, 8)? { u.arbitrary::<Vec<u8>>()? } else { hostile_npy(u)? };
        if let Ok(h) = parse_header(&bytes) {
            assert!(h.shape.len() <= 4 && h.data_offset <= bytes.len());
            let elems = h.shape.iter().fold(1u128, |a, &d| a * d as u128);
            assert_eq!(elems * h.dtype.size() as u128, h.data_bytes as u128);
        }
        // As each file of a valid day of 1 to 9 samples.
        let n = u.int_in_range(1..=9)?;
        let mut files = valid_day(n);
        let which = u.choose_index(3)?;
        files[which] = bytes;
        read_hostile_day(files, false, kaggle(), u.int_in_range(1..=10)?);
        Ok(())
    })
    .budget_ms(BUDGET_MS)
    .run();
}

#[test]
fn damaged_npz_archives_are_refused_or_read_as_valid_samples() {
    let npy = test_data("npy");
    let read = |name: &str| std::fs::read(npy.join(name)).unwrap();
    let day: [Vec<u8>; 3] = [read("day_1_dense.npy"), read("day_1_labels.npy"), read("day_1_sparse_multi_hot.npz")];
    read_hostile_day(day.clone(), true, dlrmv2(), 3);
    arbtest(|u| {
        let mut files = day.clone();
        let which = if u.ratio(3, 4)? { 2 } else { u.choose_index(3)? };
        let b = &mut files[which];
        for _ in 0..u.int_in_range(1..=4)? {
            match u.int_in_range(0..=3)? {
                0 => b.truncate(u.int_in_range(0..=b.len())?),
                // The zip's directory and local headers (counts, sizes, offsets) sit at its
                // end and before each member: flip there more often.
                1 if b.len() > 200 => {
                    let at = u.int_in_range(b.len() - 200..=b.len() - 1)?;
                    b[at] ^= u.int_in_range(1..=255)?;
                }
                _ if !b.is_empty() => {
                    let at = u.choose_index(b.len())?;
                    b[at] = u.arbitrary()?;
                }
                _ => {}
            }
        }
        read_hostile_day(files, true, dlrmv2(), u.int_in_range(1..=4)?);
        Ok(())
    })
    .budget_ms(BUDGET_MS)
    .run();
}

/// Errors name the day's file that is wrong (the name the properties look for is its prefix).
#[test]
fn errors_name_the_day_file() {
    let [d, l, s] = valid_day(2);
    let day = NpyDay::from_bytes(Path::new(DAY), d.clone(), l.clone(), s, false, kaggle()).unwrap();
    let mut b = Batch::new(13, 26);
    day.read_into(0, 2, &mut b).unwrap();
    assert_valid(&b, 2, 13, &kaggle().tables.iter().map(|t| t.rows).collect::<Vec<_>>(), "valid day");
    let err = NpyDay::from_bytes(Path::new(DAY), d, l, b"junk".to_vec(), false, kaggle()).unwrap_err().to_string();
    assert!(err.contains(&format!("{DAY}_sparse.npy")) && err.contains("magic"), "{err}");
}
