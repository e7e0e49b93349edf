//! Ember's binary format: conversion from Criteo text gives bit for bit the text reader's
//! samples, multi-hot bags round-trip at every offset and block size, every flipped byte and
//! every truncation is caught (or provably harmless), a mismatched model is refused, a failed
//! write leaves nothing, and under a grid a rank's reads bring into memory only the pages of its
//! own samples (mincore after evicting the file). Also the dataset split, epochs and file order.
use ember_engine::config::{preset, ModelConfig, Pooling, TableConfig};
use ember_engine::data::binary::{BinaryFile, BinaryWriter, DenseTransform, Feature, Hashing, Header};
use ember_engine::data::convert::{convert_file, ConvertOptions};
use ember_engine::data::criteo::{BadLinePolicy, CriteoReader};
use ember_engine::data::dataset::{Format, MappedData};
use ember_engine::data::{Batch, DataSource};
use ember_engine::grid::{Grid, Placement};
use ember_engine::rng::Rng;
use ember_tests::{test_data, TmpDir};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn tmp_dir(name: &str) -> TmpDir {
    TmpDir::new(Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("data-binary-{name}-{}", std::process::id())))
}

fn kaggle() -> ModelConfig {
    preset("kaggle", None).unwrap().model
}

/// Every sample of a text file through the text reader: training part then eval part.
fn text_samples(path: &Path, model: &ModelConfig) -> Batch {
    let mut r = CriteoReader::open(path, model, BadLinePolicy::Fail).unwrap();
    let mut all = Batch::new(model.num_dense, model.tables.len());
    while let Some(b) = r.next_batch(13).unwrap() {
        all.extend(&b);
    }
    all.extend(&r.eval_set().unwrap());
    all
}

/// Batches equal bit for bit (f32 compared by bits).
fn assert_same(a: &Batch, b: &Batch, what: &str) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.dense), bits(&b.dense), "{what}: dense");
    assert_eq!(bits(&a.labels), bits(&b.labels), "{what}: labels");
    assert_eq!(a.sparse, b.sparse, "{what}: sparse");
}

fn read(f: &BinaryFile, start: u64, n: usize) -> Batch {
    let h = f.header();
    let mut b = Batch::new(h.num_dense as usize, h.features.len());
    f.read_into(start, n, &mut b).unwrap();
    b
}

#[test]
fn conversion_gives_the_text_readers_samples_bit_for_bit() {
    let model = kaggle();
    let dir = tmp_dir("convert");
    let csv = test_data("criteo-sample-200.csv");
    // The same data as raw tab-separated text, without the header.
    let text = std::fs::read_to_string(&csv).unwrap();
    let tsv = dir.join("sample.tsv");
    std::fs::write(&tsv, text.lines().skip(1).map(|l| l.replace(',', "\t") + "\n").collect::<String>()).unwrap();
    let want = text_samples(&csv, &model);
    assert_eq!(want.size(), 200);
    for (input, block) in [(&csv, 7u32), (&tsv, 64), (&csv, 1 << 16)] {
        let out = dir.join(format!("s{block}.ember"));
        let (c, h) = convert_file(input, &out, &model, ConvertOptions { block_samples: block, policy: BadLinePolicy::Fail }).unwrap();
        assert_eq!((c.samples, c.skipped, h.samples), (200, 0, 200));
        assert_eq!(h.dense, DenseTransform::Log1pClamp);
        if block == 1 << 16 {
            // One block of one-hot sections (bags of 0 or 1 id; no offsets): header and feature
            // table (512 B), labels and dense (200 x 56 B), 26 x 200 4-byte id slots, the index.
            assert_eq!(h.file_bytes, 512 + 200 * 56 + 26 * 200 * 4 + 8 + 8 * 26);
        }
        assert!(h.features.iter().zip(&model.tables).all(|(f, t)| f.rows == t.rows && f.hashing == Hashing::HexModRows));
        let f = BinaryFile::open(&out).unwrap();
        f.verify_blocks().unwrap();
        assert_same(&read(&f, 0, 200), &want, "whole file");
        // Ranges starting and ending anywhere, across block boundaries.
        for (s, n) in [(0, 1), (6, 2), (7, 7), (13, 50), (199, 1), (100, 100), (3, 0)] {
            assert_same(&read(&f, s, n as usize), &want.slice(s as usize..s as usize + n), &format!("block {block}, samples {s}+{n}"));
        }
        let mut b = Batch::new(13, 26);
        let err = f.read_into(190, 11, &mut b).unwrap_err().to_string();
        assert!(err.contains("past the end") && err.contains(out.to_str().unwrap()), "{err}");
    }
}

/// A random batch of `n` samples: `nd` dense, bags of 0 to 6 ids below each table's rows.
fn random_batch(rng: &mut Rng, n: usize, nd: usize, rows: &[u64]) -> Batch {
    let mut b = Batch::new(nd, rows.len());
    for _ in 0..n {
        b.labels.push((rng.next_u64() % 2) as f32);
        for _ in 0..nd {
            b.dense.push(f32::from_bits((rng.next_u64() >> 40) as u32 | 0x3f00_0000));
        }
        for (j, &r) in b.sparse.iter_mut().zip(rows) {
            let l = (rng.next_u64() % 7) as usize;
            let ids: Vec<u64> = (0..l).map(|_| rng.next_u64() % r).collect();
            j.push_bag(&ids);
        }
    }
    b
}

fn write(path: &Path, rows: &[u64], nd: usize, block: u32, data: &Batch, pushes: &[usize]) -> Header {
    let feats = rows.iter().map(|&r| Feature { rows: r, hashing: Hashing::IntModRows }).collect();
    let mut w = BinaryWriter::create(path, nd, feats, DenseTransform::AsGiven, block).unwrap();
    let mut at = 0;
    for &k in pushes.iter().cycle() {
        if at == data.size() {
            break;
        }
        let k = k.min(data.size() - at);
        w.push(&data.slice(at..at + k)).unwrap();
        at += k;
    }
    w.finish().unwrap()
}

#[test]
fn multi_hot_bags_round_trip_at_every_offset_and_block_size() {
    let dir = tmp_dir("multihot");
    let mut rng = Rng::new(5);
    // 4-byte ids, and 8-byte ids once a table has more than 2^32 rows.
    for rows in [vec![10u64, 1 << 20, 3], vec![7, 1 << 40]] {
        let data = random_batch(&mut rng, 97, 3, &rows);
        for block in [1u32, 5, 64, 1000] {
            let p = dir.join(format!("mh-{}-{block}.ember", rows.len()));
            let h = write(&p, &rows, 3, block, &data, &[1, 17, 3, 40]);
            assert_eq!(h.id_bytes, if rows.iter().any(|&r| r > 1 << 32) { 8 } else { 4 });
            let f = BinaryFile::open(&p).unwrap();
            f.verify_blocks().unwrap();
            for s in 0..97 {
                for n in [0, 1, 4, 97 - s] {
                    let n = n.min(97 - s);
                    assert_same(&read(&f, s as u64, n), &data.slice(s..s + n), &format!("block {block}, {s}+{n}"));
                }
            }
        }
    }
}

/// A small file for the corruption tests: 23 samples, blocks of 5, 2 dense, 3 features.
fn small_file(dir: &Path) -> (PathBuf, Batch) {
    let rows = [11u64, 300, 2];
    let data = random_batch(&mut Rng::new(9), 23, 2, &rows);
    let p = dir.join("small.ember");
    write(&p, &rows, 2, 5, &data, &[4]);
    (p, data)
}

#[test]
fn every_flipped_byte_is_caught_or_harmless() {
    let dir = tmp_dir("flip");
    let (p, data) = small_file(&dir);
    let good = std::fs::read(&p).unwrap();
    let h = Header::parse(&good).unwrap();
    // The padding between the feature table and block 0 is the only byte range no checksum
    // covers; flipping it changes nothing a reader returns.
    let padding = (64 + 16 * h.features.len() as u64)..h.data_offset();
    let q = dir.join("flipped.ember");
    let mut harmless = 0;
    for i in 0..good.len() {
        let mut bad = good.clone();
        bad[i] ^= 0x10;
        std::fs::write(&q, &bad).unwrap();
        let outcome = BinaryFile::open(&q).and_then(|f| {
            f.verify_blocks()?;
            let mut b = Batch::new(2, 3);
            f.read_into(0, 23, &mut b)?;
            Ok(b)
        });
        match outcome {
            Err(e) => assert!(e.to_string().contains(q.to_str().unwrap()), "byte {i}: the error names the file: {e}"),
            Ok(b) => {
                assert!(padding.contains(&(i as u64)), "byte {i} flipped went unnoticed");
                assert_same(&b, &data, "padding flip");
                harmless += 1;
            }
        }
    }
    assert_eq!(harmless as u64, padding.end - padding.start);
    // A flipped id or offset inside a block: opening (header and index) succeeds, the block
    // checksum catches it, and reading never goes out of bounds.
    let f = BinaryFile::open(&p).unwrap();
    let (at, _) = f.sample_ranges(3)[2];
    let mut bad = good.clone();
    bad[at as usize + 8] = 0xff;
    std::fs::write(&q, &bad).unwrap();
    let f = BinaryFile::open(&q).unwrap();
    let err = f.verify_blocks().unwrap_err().to_string();
    assert!(err.contains("block 0") && err.contains("checksum mismatch"), "{err}");
    let mut b = Batch::new(2, 3);
    let err = f.read_into(0, 23, &mut b).unwrap_err().to_string();
    assert!(err.contains("corrupted") && err.contains("feature 0"), "{err}");
}

#[test]
fn every_truncation_is_an_error_naming_the_file() {
    let dir = tmp_dir("trunc");
    let (p, _) = small_file(&dir);
    let good = std::fs::read(&p).unwrap();
    let q = dir.join("truncated.ember");
    for len in 0..good.len() {
        std::fs::write(&q, &good[..len]).unwrap();
        let err = BinaryFile::open(&q).unwrap_err().to_string();
        assert!(err.contains(q.to_str().unwrap()), "length {len}: {err}");
        assert!(err.contains("truncated") || err.contains("magic") || err.contains("checksum") || err.contains("bytes"), "length {len}: {err}");
    }
    // Absurd counts behind a valid checksum are refused by checked arithmetic, not a panic.
    let mut h = Header::parse(&good).unwrap();
    for (samples, block) in [(u64::MAX, 1), (u64::MAX / 2, 3), (1 << 62, 1 << 24)] {
        h.samples = samples;
        h.block_samples = block;
        let err = Header::parse(&h.encode()).unwrap_err();
        assert!(err.contains("overflows") || err.contains("bytes"), "{samples}: {err}");
    }
}

#[test]
fn a_model_with_other_tables_is_refused() {
    let model = kaggle();
    let dir = tmp_dir("mismatch");
    let out = dir.join("s.ember");
    convert_file(&test_data("criteo-sample-200.csv"), &out, &model, ConvertOptions::default()).unwrap();
    let f = BinaryFile::open(&out).unwrap();
    f.check_model(&model).unwrap();
    let capped = preset("kaggle", Some(1000)).unwrap().model;
    let err = f.check_model(&capped).unwrap_err().to_string();
    assert!(err.contains("feature 0 was converted for a table of 1460 rows") && err.contains("has 1000 rows"), "{err}");
    let mut fewer = model.clone();
    fewer.num_dense = 12;
    assert!(f.check_model(&fewer).unwrap_err().to_string().contains("13 dense and 26 sparse"));
    let fmt = Format::Binary(vec![out.clone()]);
    assert!(MappedData::open(&fmt, None, &capped, 1, 1).is_err());
}

#[test]
fn a_failed_write_leaves_no_file() {
    let dir = tmp_dir("failed");
    let p = dir.join("x.ember");
    let feats = vec![Feature { rows: 4, hashing: Hashing::IntModRows }];
    let mut w = BinaryWriter::create(&p, 1, feats, DenseTransform::AsGiven, 2).unwrap();
    let mut b = Batch::new(1, 1);
    for id in [1u64, 2, 9] {
        b.labels.push(0.0);
        b.dense.push(1.0);
        b.sparse[0].push_bag(&[id]);
    }
    assert!(w.push(&b).unwrap_err().to_string().contains("id 9 not below the table's 4 rows"));
    drop(w);
    let left: Vec<_> = std::fs::read_dir(&*dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// Resident pages of `path` in the page cache.
fn resident_pages(path: &Path) -> BTreeSet<u64> {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: a read-only map of a file this test owns, only passed to mincore.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let pages = map.len().div_ceil(4096);
    let mut v = vec![0u8; pages];
    // SAFETY: `map` is a live mapping of `map.len()` bytes and `v` holds one byte per page.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, map.len(), v.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    (0..pages as u64).filter(|&p| v[p as usize] & 1 == 1).collect()
}

/// Drops `path` from the page cache (its pages are clean once synced).
fn evict(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: a plain advice call on an open descriptor.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
}

fn pages_of(ranges: impl IntoIterator<Item = (u64, u64)>) -> BTreeSet<u64> {
    ranges.into_iter().filter(|r| r.1 > 0).flat_map(|(at, len)| at / 4096..(at + len - 1) / 4096 + 1).collect()
}

#[test]
fn under_a_grid_each_rank_brings_in_only_the_pages_of_its_own_samples() {
    // 60 000 one-hot Criteo-shaped samples (13 dense, 26 features), blocks of 16384.
    let model = kaggle();
    let rows: Vec<u64> = model.tables.iter().map(|t| t.rows).collect();
    let mut rng = Rng::new(3);
    let mut data = Batch::new(13, 26);
    for _ in 0..60_000 {
        data.labels.push((rng.next_u64() % 2) as f32);
        data.dense.extend((0..13).map(|_| (rng.next_u64() % 1000) as f32));
        for (j, &r) in data.sparse.iter_mut().zip(&rows) {
            j.push_bag(&[rng.next_u64() % r]);
        }
    }
    let dir = tmp_dir("pages");
    let p = dir.join("big.ember");
    let h = write(&p, &rows, 13, 16384, &data, &[4096]);
    let meta = pages_of([(0, h.data_offset()), (h.index_offset, h.file_bytes - h.index_offset)]);
    let (batch, grid) = (4096usize, Grid::new(2, 2, Placement::ReplicasInNode).unwrap());
    let total_pages = h.file_bytes.div_ceil(4096);
    for w in [1usize, 2, 0] {
        // Nothing of the file mapped or cached: a fresh reader of rank w's samples only.
        evict(&p);
        let before = resident_pages(&p);
        assert!(before.is_empty(), "the page cache kept {} pages of the file after POSIX_FADV_DONTNEED: this test needs a disk-backed CARGO_TARGET_TMPDIR", before.len());
        let d = MappedData::open(&Format::Binary(vec![p.clone()]), None, &model, 1, 7).unwrap();
        let steps = d.train_len() as usize / batch;
        assert_eq!(steps, 13);
        let r = grid.sample_range(w, batch);
        let starts: Vec<u64> = (0..steps).map(|step| (step * batch + r.start) as u64).collect();
        for &start in &starts {
            let b = d.read_global(start, r.len()).unwrap();
            assert_same(&b, &data.slice(start as usize..start as usize + r.len()), "rank's samples");
        }
        let resident = resident_pages(&p);
        drop(d);
        // The pages holding rank w's samples, from the layout (read after measuring).
        let file = BinaryFile::open(&p).unwrap();
        let own = pages_of(starts.iter().flat_map(|&s| s..s + r.len() as u64).flat_map(|i| file.sample_ranges(i)));
        drop(file);
        let stray: Vec<_> = resident.iter().filter(|pg| !own.contains(pg) && !meta.contains(pg)).collect();
        assert!(stray.is_empty(), "rank {w}: {} resident pages hold none of its samples (first {:?}); {} own", stray.len(), &stray[..stray.len().min(8)], own.len());
        let missing = own.difference(&resident).count();
        assert_eq!(missing, 0, "rank {w}: {missing} pages of its samples not resident after reading them");
        // A quarter of the samples of 90 % of the file; ranges of 4 to 8 KiB per feature and
        // step put every range's edge pages in two ranks' sets, so well under half the file.
        assert!((resident.len() as u64) < total_pages * 4 / 10, "rank {w}: {} of {total_pages} pages resident", resident.len());
    }
}

/// `k` small files of `n_i` samples each, the samples numbered through the label-free dense.
fn numbered_files(dir: &Path, sizes: &[usize]) -> (Vec<PathBuf>, ModelConfig, Batch) {
    let model = ModelConfig {
        num_dense: 1,
        tables: vec![TableConfig { rows: 1 << 20, dim: 4, pooling: Pooling::Sum, bag_size: 1 }],
        bottom_mlp: vec![4],
        top_mlp: vec![1],
        interaction: ember_engine::config::Interaction::Dot,
    };
    let mut all = Batch::new(1, 1);
    let mut paths = vec![];
    let mut k = 0u64;
    for (i, &n) in sizes.iter().enumerate() {
        let mut b = Batch::new(1, 1);
        for _ in 0..n {
            b.labels.push((k % 2) as f32);
            b.dense.push(k as f32);
            b.sparse[0].push_bag(&[k]);
            k += 1;
        }
        let p = dir.join(format!("day_{i}.ember"));
        write(&p, &[1 << 20], 1, 4, &b, &[3]);
        all.extend(&b);
        paths.push(p);
    }
    (paths, model, all)
}

#[test]
fn split_epochs_and_the_seeded_file_order() {
    let dir = tmp_dir("epochs");
    let sizes = [10, 7, 12, 5, 9, 3];
    let (paths, model, all) = numbered_files(&dir, &sizes);
    // A folder is read in natural name order: day_2 before day_10.
    let fmt = ember_engine::data::dataset::detect(&dir, &model).unwrap();
    assert_eq!(fmt, Format::Binary(paths.clone()));
    // Default split: the last floor(46 / 10) = 4 samples (cutting into the last file) are the
    // eval set, everything before them trains.
    let mut d = MappedData::open(&fmt, None, &model, 3, 11).unwrap();
    assert_eq!((d.train_len(), d.eval_len()), (42, 4));
    assert_same(&d.eval_set().unwrap(), &all.slice(42..46), "default eval split");
    // Each epoch visits every training sample once, whole files in a seeded order.
    let mut seen = vec![];
    let mut orders = vec![];
    for e in 0..3u64 {
        let order = d.epoch_order(e);
        let mut files: Vec<_> = order.iter().map(|s| s.file).collect();
        orders.push(files.clone());
        files.sort();
        assert_eq!(files, (0..5).collect::<Vec<_>>(), "file 5 is all eval");
        let b = d.read_global(e * 42, 42).unwrap();
        let mut ks: Vec<u64> = b.sparse[0].values.clone();
        // The samples of the epoch, in the segments' order.
        let want: Vec<u64> = order.iter().flat_map(|s| (s.start..s.start + s.len).map(move |i| i + sizes[..s.file].iter().sum::<usize>() as u64)).collect();
        assert_eq!(ks, want, "epoch {e}");
        ks.sort();
        assert_eq!(ks, (0..42).collect::<Vec<_>>());
        seen.push(b);
    }
    assert!(orders[0] != orders[1] || orders[1] != orders[2], "three epochs in the same order: {orders:?}");
    // The stream is the same whether read in one go, across epoch boundaries, or by next_batch.
    let mut streamed = Batch::new(1, 1);
    while let Some(b) = d.next_batch(17).unwrap() {
        streamed.extend(&b);
    }
    let mut whole = seen[0].clone();
    whole.extend(&seen[1]);
    whole.extend(&seen[2]);
    assert_same(&streamed, &whole, "next_batch over 3 epochs");
    assert_same(&d.read_global(40, 5).unwrap(), &whole.slice(40..45), "across an epoch boundary");
    // Same seed, same orders; another seed, other orders.
    let again = MappedData::open(&fmt, None, &model, 3, 11).unwrap();
    assert_eq!((0..3).map(|e| again.epoch_order(e)).collect::<Vec<_>>(), (0..3).map(|e| d.epoch_order(e)).collect::<Vec<_>>());
    let other = MappedData::open(&fmt, None, &model, 3, 12).unwrap();
    assert!((0..3).any(|e| other.epoch_order(e) != d.epoch_order(e)));
    // A separate eval file: all of --data trains, all of the eval file evaluates.
    let eval = Format::Binary(vec![paths[5].clone()]);
    let mut s = MappedData::open(&Format::Binary(paths[..5].to_vec()), Some(&eval), &model, 1, 1).unwrap();
    assert_eq!((s.train_len(), s.eval_len()), (43, 3));
    assert_same(&s.eval_set().unwrap(), &all.slice(43..46), "separate eval file");
    assert!(s.read_global(40, 4).is_err(), "past the end of one epoch");
}

#[test]
fn the_eval_set_streams_chunk_by_chunk_across_files() {
    use ember_engine::data::EvalSet;
    let dir = tmp_dir("eval-stream");
    let sizes = [10, 7, 12, 5, 9, 3];
    let (paths, model, all) = numbered_files(&dir, &sizes);
    // Eval over three files (5 + 9 + 3 samples), and the default split cutting into the last two.
    let eval = Format::Binary(paths[3..].to_vec());
    let sep = MappedData::open(&Format::Binary(paths[..3].to_vec()), Some(&eval), &model, 1, 1).unwrap();
    let def = MappedData::open(&Format::Binary(paths.clone()), None, &model, 1, 1).unwrap();
    for (d, want, what) in [(&sep, all.slice(29..46), "separate eval files"), (&def, all.slice(42..46), "default split")] {
        let ev = d.eval_stream();
        assert_eq!(ev.len(), want.size() as u64, "{what}");
        for n in [1, 2, 4, 5, 7, 16, 17, 100] {
            let mut got = Batch::new(model.num_dense, model.tables.len());
            for k in 0.. {
                let c = ev.chunk(k, n).unwrap();
                assert!(c.size() <= n, "{what}: chunk {k} of {n} holds {}", c.size());
                if c.size() == 0 {
                    break;
                }
                assert_same(&c, &want.slice(k * n..(k * n + n).min(want.size())), &format!("{what}: chunk {k} of {n}"));
                got.extend(&c);
            }
            assert_same(&got, &want, &format!("{what}: chunks of {n}"));
        }
        // Chunks are random access (ranks ask for the same chunk in turn), past the end empty.
        assert_same(&ev.chunk(1, 2).unwrap(), &want.slice(2..4), &format!("{what}: chunk 1 again"));
        assert_eq!(ev.chunk(usize::MAX, usize::MAX).unwrap().size(), 0, "{what}: a start past u64");
        assert!(ev.chunk(0, 0).is_err(), "{what}: a chunk of 0 samples");
    }
}
