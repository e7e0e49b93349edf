//! `ember convert`: Criteo text files to Ember's binary format (docs/data.md), or `--verify`
//! of converted files' block checksums.
use crate::common::{count64, CliResult, ModelArgs};
use ember_engine::config::limits::MAX_ROWS;
use ember_engine::data::binary::BinaryFile;
use ember_engine::data::convert::{convert_files, ConvertOptions};
use ember_engine::data::criteo::BadLinePolicy;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// Criteo text files (raw tab-separated, or comma-separated with a header line); with
    /// --verify, Ember binary files.
    #[arg(required = true, value_name = "FILE")]
    pub inputs: Vec<PathBuf>,
    /// Output folder: FILE's name up to its first dot, plus .ember (day_0 -> DIR/day_0.ember).
    #[arg(long, value_name = "DIR", required_unless_present = "verify")]
    pub out: Option<PathBuf>,
    /// Built-in configuration whose tables' rows the ids are taken modulo: tiny, kaggle,
    /// terabyte, dlrmv2, bench [default: kaggle].
    #[arg(long)]
    pub preset: Option<String>,
    /// A TOML config file (replaces --preset).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Cap every table's rows (as `train --max-rows`; training must use the same tables).
    #[arg(long, value_parser = count64::<1, MAX_ROWS>)]
    pub max_rows: Option<u64>,
    /// Skip malformed lines (their count is printed) instead of failing at the first.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Check every block checksum of existing binary files instead of converting.
    #[arg(long, conflicts_with_all = ["out", "skip_bad_lines", "preset", "config", "max_rows"])]
    pub verify: bool,
}

pub fn run(a: ConvertArgs) -> CliResult {
    if a.verify {
        for p in &a.inputs {
            let f = BinaryFile::open(p)?;
            f.verify_blocks()?;
            println!("{}: ok ({} samples, {} bytes)", p.display(), f.samples(), f.header().file_bytes);
        }
        return Ok(());
    }
    let out = a.out.as_ref().expect("clap requires --out without --verify");
    let model_args = ModelArgs { preset: a.preset.clone(), config: a.config.clone(), batch_size: None, seed: None, max_rows: a.max_rows };
    let cfg = model_args.train_config("kaggle", None)?;
    std::fs::create_dir_all(out).map_err(|e| format!("--out {}: {e}", out.display()))?;
    let opts = ConvertOptions { policy: if a.skip_bad_lines { BadLinePolicy::Skip } else { BadLinePolicy::Fail }, ..Default::default() };
    let t = std::time::Instant::now();
    let done = convert_files(&a.inputs, out, &cfg.model, opts)?;
    let secs = t.elapsed().as_secs_f64();
    let (mut samples, mut bytes_in) = (0u64, 0u64);
    for c in &done {
        println!(
            "{} -> {}: {} samples ({} bad lines skipped), {:.1} MB -> {:.1} MB in {:.2} s",
            c.input.display(),
            c.output.display(),
            c.samples,
            c.skipped,
            c.bytes_in as f64 / 1e6,
            c.bytes_out as f64 / 1e6,
            c.seconds
        );
        samples += c.samples;
        bytes_in += c.bytes_in;
    }
    println!("ember convert: {} files, {samples} samples in {secs:.2} s ({:.2} M samples/s, {:.0} MB/s of text)", done.len(), samples as f64 / secs / 1e6, bytes_in as f64 / secs / 1e6);
    Ok(())
}
