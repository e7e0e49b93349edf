//! `ember bench data`: the samples/s and GB/s each data path delivers on one core — text parse,
//! text → binary conversion, binary memory map, TorchRec `.npy`, MLPerf multi-hot `.npz` — on
//! one rank and per rank of a grid, with a warm and a cold page cache (POSIX_FADV_DONTNEED),
//! the peak memory of `ember convert` for two input sizes, and beside them the samples/s a
//! training step consumes (`bench dlrm` on this CPU, and the GPU figure of docs/gpu-results.md).
use crate::common::{count, count64, parse_grid, CliResult};
use ember_engine::config::limits::MAX_BATCH;
use ember_engine::config::{preset, ModelConfig};
use ember_engine::data::binary::{BinaryFile, BinaryWriter, DenseTransform, Feature, Hashing};
use ember_engine::data::convert::{convert_file, parse_file, ConvertOptions};
use ember_engine::data::criteo::BadLinePolicy;
use ember_engine::data::npy::NpyDay;
use ember_engine::data::Batch;
use ember_engine::grid::{Grid, Placement};
use ember_engine::rng::Rng;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Most samples `--samples` generates: the benchmark holds them in memory once (about 400 bytes
/// each) and writes them as text, binary and `.npy` (about 700 bytes each on disk).
pub const MAX_BENCH_SAMPLES: u64 = 10_000_000;

#[derive(clap::Args, Clone, Debug)]
pub struct DataArgs {
    /// Synthetic Criteo samples written as text (the multi-hot files hold a quarter as many).
    #[arg(long, default_value_t = 1_000_000, value_parser = count64::<1000, MAX_BENCH_SAMPLES>)]
    pub samples: u64,
    /// Samples per read (the global batch; under --grid each rank reads B/T of it).
    #[arg(long, default_value_t = 4096, value_parser = count::<1, MAX_BATCH>)]
    pub batch_size: usize,
    /// Also read as each rank of an MxN grid reads (its B/T samples of every batch).
    #[arg(long)]
    pub grid: Option<String>,
    /// Timed repetitions of each measurement (the median is printed).
    #[arg(short = 'n', long, default_value_t = 3, value_parser = count::<1, 1000>)]
    pub iters: usize,
    /// Scratch folder for the generated files (removed at the end) [default: the system's temporary folder].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Print one JSON object per row.
    #[arg(long)]
    pub json: bool,
}

/// One measured path.
#[derive(serde::Serialize)]
struct Row {
    path: String,
    cache: &'static str,
    samples_per_s: f64,
    /// Samples per second of this thread's CPU time (user + system): the rate per core.
    samples_per_cpu_s: f64,
    gb_per_s: f64,
    note: String,
}

/// CPU time (user + system) of the calling thread, seconds (nanosecond clock: rusage counts
/// in scheduler ticks, too coarse for a read of a few milliseconds).
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid pointer to a timespec the call fills.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Drops `path` from the page cache (POSIX_FADV_DONTNEED after a sync); false if the kernel
/// kept pages (nothing of it may be mapped).
fn evict(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path)?;
    f.sync_all()?;
    // SAFETY: an advice call on a descriptor this function owns.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Synthetic Criteo text: label, 13 integers (some missing), 26 8-hex-digit categoricals (some
/// missing), tab-separated.
fn write_text(path: &Path, n: u64, seed: u64) -> std::io::Result<u64> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut rng = Rng::new(seed);
    let mut line = String::with_capacity(512);
    let mut bytes = 0;
    for _ in 0..n {
        line.clear();
        let r = rng.next_u64();
        line.push_str(if r % 4 == 0 { "1" } else { "0" });
        for j in 0..13 {
            line.push('\t');
            let r = rng.next_u64();
            if r % 10 != 0 {
                use std::fmt::Write;
                let _ = write!(line, "{}", (r >> 8) % (10 << (j % 4 * 4)));
            }
        }
        for _ in 0..26 {
            line.push('\t');
            let r = rng.next_u64();
            if r % 20 != 0 {
                use std::fmt::Write;
                let _ = write!(line, "{:08x}", (r >> 16) as u32);
            }
        }
        line.push('\n');
        bytes += line.len() as u64;
        w.write_all(line.as_bytes())?;
    }
    w.flush()?;
    Ok(bytes)
}

/// Writes `.npy` bytes: header (version 1) and data.
fn npy_bytes(descr: &str, shape: &[u64], data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let dims = if dims.len() == 1 { format!("{},", dims[0]) } else { dims.join(", ") };
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({dims}), }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend_from_slice(data);
    b
}

/// Writes TorchRec's one-hot day `DIR/day_0_*.npy` from `b` (ids as int32).
fn write_torchrec_day(dir: &Path, b: &Batch) -> std::io::Result<()> {
    let n = b.size() as u64;
    std::fs::write(dir.join("day_0_dense.npy"), npy_bytes("<f4", &[n, b.num_dense as u64], bytemuck::cast_slice(&b.dense)))?;
    let labels: Vec<i32> = b.labels.iter().map(|&y| y as i32).collect();
    std::fs::write(dir.join("day_0_labels.npy"), npy_bytes("<i4", &[n, 1], bytemuck::cast_slice(&labels)))?;
    let f = b.sparse.len();
    let mut sparse = vec![0i32; b.size() * f];
    for (j, jag) in b.sparse.iter().enumerate() {
        let mut at = 0;
        for (i, &l) in jag.lengths.iter().enumerate() {
            sparse[i * f + j] = if l > 0 { jag.values[at] as i32 } else { 0 };
            at += l as usize;
        }
    }
    std::fs::write(dir.join("day_0_sparse.npy"), npy_bytes("<i4", &[n, f as u64], bytemuck::cast_slice(&sparse)))
}

/// Writes an MLPerf DLRMv2 day `DIR/day_1_*` of `n` samples: dense, labels and the multi-hot
/// `.npz` (stored members "0".."25", int32 [n, size_f]); returns the samples as a batch.
fn write_mlperf_day(dir: &Path, model: &ModelConfig, n: usize, seed: u64) -> Result<Batch, Box<dyn std::error::Error>> {
    let mut rng = Rng::new(seed);
    let mut b = Batch::new(model.num_dense, model.tables.len());
    b.dense = (0..n * model.num_dense).map(|_| (rng.next_u64() % 1000) as f32 * 0.01).collect();
    b.labels = (0..n).map(|_| (rng.next_u64() % 2) as f32).collect();
    let file = std::fs::File::create(dir.join("day_1_sparse_multi_hot.npz"))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(true);
    for (f, t) in model.tables.iter().enumerate() {
        let h = t.bag_size.max(1);
        let ids: Vec<i32> = (0..n * h).map(|_| (rng.next_u64() % t.rows) as i32).collect();
        for i in 0..n {
            b.sparse[f].push_bag(&ids[i * h..(i + 1) * h].iter().map(|&v| v as u64).collect::<Vec<_>>());
        }
        zip.start_file(format!("{f}.npy"), opts)?;
        zip.write_all(&npy_bytes("<i4", &[n as u64, h as u64], bytemuck::cast_slice(&ids)))?;
    }
    zip.finish()?;
    std::fs::write(dir.join("day_1_dense.npy"), npy_bytes("<f4", &[n as u64, model.num_dense as u64], bytemuck::cast_slice(&b.dense)))?;
    let labels: Vec<i32> = b.labels.iter().map(|&y| y as i32).collect();
    std::fs::write(dir.join("day_1_labels.npy"), npy_bytes("<i4", &[n as u64, 1], bytemuck::cast_slice(&labels)))?;
    Ok(b)
}

/// Peak resident memory of a child `ember convert` (KiB), via wait4.
fn convert_peak_rss_kib(input: &Path, out: &Path) -> Result<u64, Box<dyn std::error::Error>> {
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["convert", "--preset", "kaggle", "--out"])
        .arg(out)
        .arg(input)
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let mut status = 0;
    // SAFETY: rusage is plain data filled by the kernel; the pid is our own child.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child with valid pointers to status and rusage.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
    if pid < 0 || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("ember convert {} failed (status {status})", input.display()).into());
    }
    Ok(ru.ru_maxrss as u64)
}

/// What runs (untimed) before each timed run.
enum Before<'a> {
    /// A warm cache: one untimed run first.
    Warm,
    /// A cold cache: these files dropped from the page cache before each run.
    Cold(&'a [PathBuf]),
    /// A warm cache, and this output of the previous run deleted before each run (so that the
    /// run does not pay for freeing it).
    Remove(&'a Path),
}

impl Before<'_> {
    fn of(cold: bool, files: &[PathBuf]) -> Before<'_> {
        if cold {
            Before::Cold(files)
        } else {
            Before::Warm
        }
    }
}

/// Times `f` (which reads `samples` samples of `bytes` bytes) `iters` times. Returns
/// (samples/s, samples per CPU second, GB/s), medians.
fn time(iters: usize, before: Before, samples: u64, bytes: u64, mut f: impl FnMut() -> ember_engine::Result<u64>) -> Result<(f64, f64, f64), Box<dyn std::error::Error>> {
    if !matches!(before, Before::Cold(_)) {
        f()?; // warm-up
    }
    let (mut secs, mut cpu) = (vec![], vec![]);
    for _ in 0..iters {
        match before {
            Before::Warm => {}
            Before::Cold(files) => {
                for p in files {
                    evict(p)?;
                }
            }
            Before::Remove(p) => std::fs::remove_file(p)?,
        }
        let (t, c) = (Instant::now(), thread_cpu());
        let n = f()?;
        secs.push(t.elapsed().as_secs_f64());
        cpu.push((thread_cpu() - c).max(1e-9));
        if n != samples {
            return Err(format!("read {n} samples, expected {samples}").into());
        }
    }
    let s = median(secs);
    Ok((samples as f64 / s, samples as f64 / median(cpu), bytes as f64 / s / 1e9))
}

/// The samples/s of `bench dlrm --device cuda --batch-size 65536` in docs/gpu-results.md.
fn gpu_figure() -> Option<(String, f64)> {
    let doc = include_str!("../../docs/gpu-results.md");
    let line = doc.lines().find(|l| l.contains("bench dlrm --device cuda --batch-size 65536"))?;
    let num = line.split(',').nth(1)?.trim().strip_suffix("M samples/s |").or_else(|| line.split(',').nth(1)?.trim().strip_suffix("M samples/s"))?;
    let card = doc.lines().find_map(|l| l.split("Card: **").nth(1)?.split("**").next().map(str::to_string)).unwrap_or_else(|| "GPU".into());
    Some((card, num.trim().parse::<f64>().ok()? * 1e6))
}

pub fn run(a: DataArgs) -> CliResult {
    let grid = match &a.grid {
        Some(g) => {
            let (m, n) = parse_grid(g)?;
            crate::common::check_batch(a.batch_size, m, n)?;
            Some(Grid::new(m, n, Placement::ReplicasInNode)?)
        }
        None => None,
    };
    let model = preset("kaggle", None)?.model;
    let dir = a.dir.clone().unwrap_or_else(std::env::temp_dir).join(format!("ember-bench-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("--dir {}: {e}", dir.display()))?;
    let result = measure(&a, grid, &model, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn measure(a: &DataArgs, grid: Option<Grid>, model: &ModelConfig, dir: &Path) -> CliResult {
    let (n, it, bsz) = (a.samples, a.iters, a.batch_size);
    let mut rows: Vec<Row> = vec![];
    let mut push = |path: &str, cache: &'static str, (sps, cps, gbs): (f64, f64, f64), note: String| {
        rows.push(Row { path: path.into(), cache, samples_per_s: sps, samples_per_cpu_s: cps, gb_per_s: gbs, note })
    };

    // Text: parse in one pass (what a run on text does every epoch), and convert.
    let text = dir.join("day_0.tsv");
    let text_bytes = write_text(&text, n, 1)?;
    // Peak memory of `ember convert` for two input sizes, while this process is still small (a
    // spawned child's peak counts its parent's memory until it execs).
    let small = dir.join("quarter.tsv");
    write_text(&small, n / 4, 3)?;
    let out = dir.join("rss");
    let rss_small = convert_peak_rss_kib(&small, &out)?;
    let rss_big = convert_peak_rss_kib(&text, &out)?;
    std::fs::remove_dir_all(&out)?;
    let parse = || parse_file(&text, model, BadLinePolicy::Fail, bsz, |_| Ok(())).map(|r| r.0);
    let warm = time(it, Before::Warm, n, text_bytes, parse)?;
    push("text parse", "warm", warm, "bytes of text".into());
    push("text parse", "cold", time(it, Before::Cold(&[text.clone()]), n, text_bytes, parse)?, "bytes of text".into());
    // The reader `ember train` uses on text: a line-counting pass at open, then the lines.
    let reader = || -> ember_engine::Result<u64> {
        let mut r = ember_engine::data::criteo::CriteoReader::open(&text, model, BadLinePolicy::Fail)?;
        let mut k = 0;
        while let Some(b) = ember_engine::data::DataSource::next_batch(&mut r, bsz)? {
            k += b.size() as u64;
        }
        Ok(k + ember_engine::data::DataSource::eval_set(&mut r)?.size() as u64)
    };
    push("text reader of train (count + parse)", "warm", time(it, Before::Warm, n, text_bytes, reader)?, "bytes of text".into());
    let bin = dir.join("day_0.ember");
    let conv = time(it, Before::Remove(&bin), n, text_bytes, || convert_file(&text, &bin, model, ConvertOptions::default()).map(|r| r.0.samples))?;
    push("convert text -> binary", "warm", conv, format!("{:.0} % of text parse ({:.0} % per CPU second; the rest waits for the disk: fsync); bytes of text", 100.0 * conv.0 / warm.0, 100.0 * conv.1 / warm.1));

    // Binary, one rank: every sample in batches of B.
    let bin_bytes = std::fs::metadata(&bin)?.len();
    let read_all = |path: &Path| -> ember_engine::Result<u64> {
        let f = BinaryFile::open(path)?;
        read_in_batches(f.samples(), bsz, model, |k, m, b| f.read_into(k, m, b))
    };
    for cold in [false, true] {
        push("binary mmap, 1 rank", if cold { "cold" } else { "warm" }, time(it, Before::of(cold, &[bin.clone()]), n, bin_bytes, || read_all(&bin))?, "bytes of the file".into());
    }
    // Binary, per rank of the grid: each rank alone on one core, its B/T of every batch.
    if let Some(g) = grid {
        let steps = n / bsz as u64;
        for cold in [false, true] {
            let mut per = vec![];
            for w in 0..g.world() {
                let r = g.sample_range(w, bsz);
                let mine = steps * r.len() as u64;
                let rank_bytes = bin_bytes * mine / n;
                let (sps, cps, gbs) = time(it, Before::of(cold, &[bin.clone()]), mine, rank_bytes, || {
                    let f = BinaryFile::open(&bin)?;
                    for s in 0..steps {
                        let mut b = Batch::new(model.num_dense, model.tables.len());
                        f.read_into(s * bsz as u64 + r.start as u64, r.len(), &mut b)?;
                    }
                    Ok(mine)
                })?;
                per.push((sps, cps, gbs));
            }
            let med = (median(per.iter().map(|p| p.0).collect()), median(per.iter().map(|p| p.1).collect()), median(per.iter().map(|p| p.2).collect()));
            let min = per.iter().map(|p| p.0).fold(f64::INFINITY, f64::min);
            push(&format!("binary mmap, rank of {}x{}", g.m, g.n), if cold { "cold" } else { "warm" }, med, format!("median of {} ranks (slowest {:.2} M/s); its share of the file's bytes", g.world(), min / 1e6));
        }
    }
    // TorchRec .npy (one-hot), from the same samples.
    let all = {
        let f = BinaryFile::open(&bin)?;
        let mut b = Batch::new(model.num_dense, model.tables.len());
        f.read_into(0, n as usize, &mut b)?;
        b
    };
    write_torchrec_day(dir, &all)?;
    drop(all);
    let npy_files: Vec<PathBuf> = ["dense", "labels", "sparse"].iter().map(|p| dir.join(format!("day_0_{p}.npy"))).collect();
    let npy_bytes_total: u64 = npy_files.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    let read_day = |prefix: &Path, mh: bool, m: &ModelConfig, total: u64| -> ember_engine::Result<u64> {
        let d = NpyDay::open(prefix, mh, m)?;
        read_in_batches(total, bsz, m, |k, c, b| d.read_into(k, c, b))
    };
    for cold in [false, true] {
        let r = time(it, Before::of(cold, &npy_files), n, npy_bytes_total, || read_day(&dir.join("day_0"), false, model, n))?;
        push("TorchRec .npy one-hot, 1 rank", if cold { "cold" } else { "warm" }, r, "bytes of the 3 files".into());
    }
    // MLPerf DLRMv2 multi-hot (.npz), and the same samples as an Ember binary file.
    let v2 = preset("dlrmv2", None)?.model;
    let mh_n = (n / 4).max(1000);
    let mh = write_mlperf_day(dir, &v2, mh_n as usize, 2)?;
    let ids_per_sample: usize = v2.tables.iter().map(|t| t.bag_size).sum();
    let mh_files: Vec<PathBuf> = ["dense.npy", "labels.npy", "sparse_multi_hot.npz"].iter().map(|p| dir.join(format!("day_1_{p}"))).collect();
    let mh_bytes: u64 = mh_files.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    let mh_bin = dir.join("day_1.ember");
    let feats = v2.tables.iter().map(|t| Feature { rows: t.rows, hashing: Hashing::IntModRows }).collect();
    let mut w = BinaryWriter::create(&mh_bin, v2.num_dense, feats, DenseTransform::AsGiven, ember_engine::data::binary::DEFAULT_BLOCK_SAMPLES)?;
    w.push(&mh)?;
    w.finish()?;
    drop(mh);
    let mh_bin_bytes = std::fs::metadata(&mh_bin)?.len();
    for cold in [false, true] {
        let c = if cold { "cold" } else { "warm" };
        let r = time(it, Before::of(cold, &mh_files), mh_n, mh_bytes, || read_day(&dir.join("day_1"), true, &v2, mh_n))?;
        push("MLPerf .npz multi-hot, 1 rank", c, r, format!("{ids_per_sample} ids/sample; bytes of the 3 files"));
        let r = time(it, Before::of(cold, &[mh_bin.clone()]), mh_n, mh_bin_bytes, || {
            let f = BinaryFile::open(&mh_bin)?;
            read_in_batches(mh_n, bsz, &v2, |k, c, b| f.read_into(k, c, b))
        })?;
        push("binary mmap multi-hot, 1 rank", c, r, format!("{ids_per_sample} ids/sample; bytes of the file"));
    }


    // What a training step consumes.
    let dlrm = ember_engine::bench::dlrm(&ember_engine::backend::Cpu::new(), 4096, 3, 1, None, 1, &mut || Ok(()))?;
    let gpu = gpu_figure();

    println!("# ember bench data: {n} synthetic Criteo samples (13 dense, 26 one-hot; multi-hot: {mh_n} DLRMv2 samples), batch {bsz}, one thread per path, median of {it}");
    println!("# cold: the files dropped from the page cache (POSIX_FADV_DONTNEED) before each run; warm: after a first run");
    println!("# M samples/s: wall clock; per CPU s: samples per second of the reading thread's CPU time (per core)");
    println!("{:<38} {:>5} {:>12} {:>10} {:>8}  {}", "path", "cache", "M samples/s", "per CPU s", "GB/s", "");
    for r in &rows {
        println!("{:<38} {:>5} {:>12.3} {:>10.3} {:>8.3}  {}", r.path, r.cache, r.samples_per_s / 1e6, r.samples_per_cpu_s / 1e6, r.gb_per_s, r.note);
    }
    println!(
        "ember convert peak RSS: {:.1} MiB for {} samples ({:.0} MB of text), {:.1} MiB for {n} ({:.0} MB)",
        rss_small as f64 / 1024.0,
        n / 4,
        std::fs::metadata(&small)?.len() as f64 / 1e6,
        rss_big as f64 / 1024.0,
        text_bytes as f64 / 1e6
    );
    println!("a training step consumes: bench dlrm --device cpu (this machine, batch 4096): {:.3} M samples/s", dlrm.samples_per_s / 1e6);
    match &gpu {
        Some((card, sps)) => println!("                          bench dlrm --device cuda --batch-size 65536 ({card}, docs/gpu-results.md): {:.3} M samples/s", sps / 1e6),
        None => println!("                          (no GPU figure in docs/gpu-results.md)"),
    }
    let best = rows.iter().filter(|r| r.cache == "warm" && r.path.starts_with("binary mmap, ")).map(|r| r.samples_per_s).fold(0.0, f64::max);
    if let Some((_, g)) = &gpu {
        println!("binary mmap delivers {:.1}x what one GPU rank consumes{}", best / g, if best < *g { ": the data path is the bottleneck" } else { "" });
    }
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        let v = serde_json::json!({"convert_peak_rss_kib": [rss_small, rss_big], "convert_inputs": [n / 4, n], "dlrm_cpu_samples_per_s": dlrm.samples_per_s, "gpu_samples_per_s": gpu.map(|g| g.1)});
        println!("{v}");
    }
    Ok(())
}

/// Reads samples `0..total` in batches of `bsz` (the last one shorter) through
/// `read(first, count, batch)`, each into a fresh batch as a reader's caller would; returns the
/// samples read.
fn read_in_batches(total: u64, bsz: usize, m: &ModelConfig, mut read: impl FnMut(u64, usize, &mut Batch) -> ember_engine::Result<()>) -> ember_engine::Result<u64> {
    let mut k = 0;
    while k < total {
        let c = (total - k).min(bsz as u64) as usize;
        let mut b = Batch::new(m.num_dense, m.tables.len());
        read(k, c, &mut b)?;
        k += c as u64;
    }
    Ok(k)
}
