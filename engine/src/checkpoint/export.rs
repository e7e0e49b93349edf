//! `ember checkpoint inspect` and `export`: a human-readable verification report, and each
//! table as a `.npy` file (NumPy format 1.0, little-endian f32, C order) that NumPy and others
//! can memory-map (`np.load(path, mmap_mode="r")`).
use super::{bad, io, Checkpoint, FileKind};
use crate::Result;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Rows assembled per piece while exporting (bounds the memory an export needs).
const EXPORT_ROWS: u64 = 1 << 16;

/// The header of a `.npy` (version 1.0) file of little-endian f32 with `shape`, padded so that
/// the data starts at a multiple of 64 bytes.
pub fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}");
    let total = 10 + dict.len() + 1;
    let pad = (64 - total % 64) % 64;
    dict.push_str(&" ".repeat(pad));
    dict.push('\n');
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h
}

fn write_npy(path: &Path, shape: &[usize], mut pieces: impl FnMut(&mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()>) -> Result<()> {
    let f = File::create(path).map_err(io(path))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    w.write_all(&npy_header(shape)).map_err(io(path))?;
    pieces(&mut |x: &[f32]| w.write_all(bytemuck::cast_slice(x)).map_err(io(path)))?;
    w.flush().map_err(io(path))?;
    Ok(())
}

/// Write `table_T.npy` (rows × dim weights) and, when the optimizer has state,
/// `table_T_state.npy` ((rows,) row-wise AdaGrad or (rows, dim) AdaGrad) for every table, and
/// `dense_I_w.npy` for every dense parameter, into `out`. Every file read is verified first.
/// Returns the files written.
pub fn export(ck: &Checkpoint, out: &Path) -> Result<Vec<PathBuf>> {
    ck.verify_all()?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let run = &ck.manifest.run;
    let mut written = Vec::new();
    for (t, tc) in run.model.tables.iter().enumerate() {
        let spr = run.embedding_optimizer.state_per_row(tc.dim);
        let p = out.join(format!("table_{t}.npy"));
        write_npy(&p, &[tc.rows as usize, tc.dim], |put| {
            let mut r = 0;
            while r < tc.rows {
                let e = (r + EXPORT_ROWS).min(tc.rows);
                put(&ck.read_block(t, r..e, 0..tc.dim, None)?.0)?;
                r = e;
            }
            Ok(())
        })?;
        written.push(p);
        if spr > 0 {
            let p = out.join(format!("table_{t}_state.npy"));
            let shape: Vec<usize> = if spr == 1 { vec![tc.rows as usize] } else { vec![tc.rows as usize, spr] };
            write_npy(&p, &shape, |put| {
                let mut r = 0;
                while r < tc.rows {
                    let e = (r + EXPORT_ROWS).min(tc.rows);
                    put(&ck.read_block(t, r..e, 0..tc.dim, None)?.1)?;
                    r = e;
                }
                Ok(())
            })?;
            written.push(p);
        }
    }
    for (i, (w, _)) in ck.read_dense()?.into_iter().enumerate() {
        let p = out.join(format!("dense_{i}_w.npy"));
        write_npy(&p, &[w.len()], |put| put(&w))?;
        written.push(p);
    }
    Ok(written)
}

/// A verification report of one checkpoint (or of every step folder under a root), and whether
/// everything that claims to be complete verified.
pub fn inspect(path: &Path) -> Result<(String, bool)> {
    use std::fmt::Write as _;
    let mut s = String::new();
    let mut ok = true;
    let is_step = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-"));
    let dirs: Vec<PathBuf> = if path.join(super::MANIFEST).exists() || is_step {
        vec![path.to_path_buf()]
    } else {
        let l = super::list(path)?;
        if l.is_empty() {
            return Err(bad(path, "no checkpoint here (neither a manifest nor step-S folders)"));
        }
        for x in l.iter().filter(|x| !x.complete) {
            let _ = writeln!(s, "{}: incomplete (no manifest; never loads)", x.dir.display());
        }
        l.into_iter().filter(|x| x.complete).map(|x| x.dir).collect()
    };
    for d in dirs {
        let ck = match Checkpoint::open(&d) {
            Ok(c) => c,
            Err(e) => {
                ok = false;
                let _ = writeln!(s, "{}: INVALID: {e}", d.display());
                continue;
            }
        };
        let m = &ck.manifest;
        let r = &m.run;
        let _ = writeln!(s, "{}: step {}, format {} ({}), grid {}x{} ({}), M = {}, c = {}", d.display(), m.step, m.format_version, m.magic, r.grid.m, r.grid.n, r.grid.placement, m.m, r.c);
        let _ = writeln!(s, "  model: {} tables, dim {}, bottom MLP {:?}, top MLP {:?}, {}", r.model.tables.len(), r.model.dim(), r.model.bottom_mlp, r.model.top_mlp, r.model.interaction);
        let _ = writeln!(s, "  optimizers: embedding {}, dense {}; seed {}, batch {}", r.embedding_optimizer, r.dense_optimizer, r.seed, r.batch_size);
        for p in &m.positions {
            let _ = writeln!(s, "  rank {} (g {}, r {}): next sample {}, reader offsets {:?}", p.world_rank, p.coords.0, p.coords.1, p.data.next_sample, p.data.reader_offsets);
        }
        let checks = ck.verify_each();
        for (f, (_, err)) in m.files.iter().zip(checks) {
            let what = match &f.kind {
                FileKind::Shard { spec, state_per_row } => format!(
                    "table {} rows {}..{} cols {}..{} ({}×{} weights, {} state/row)",
                    spec.table,
                    spec.rows.start,
                    spec.rows.end,
                    spec.cols.start,
                    spec.cols.end,
                    spec.num_rows(),
                    spec.num_cols(),
                    state_per_row
                ),
                FileKind::Dense { lens } => format!("{} dense parameters, {} floats", lens.len(), lens.iter().map(|(w, s)| w + s).sum::<usize>()),
                FileKind::Replica { spec, replica, weights, pending_rows, .. } => format!(
                    "replica {replica}'s own copy of table {} rows {}..{} cols {}..{}: {}optimizer state{}",
                    spec.table,
                    spec.rows.start,
                    spec.rows.end,
                    spec.cols.start,
                    spec.cols.end,
                    if *weights { "weights, " } else { "" },
                    pending_rows.map_or(String::new(), |p| format!(", pending state average of {p} rows"))
                ),
            };
            match err {
                None => {
                    let _ = writeln!(s, "  ok   {:<48} {:>12} B  crc32 {:08x}  {what}", f.name, f.bytes, f.crc32);
                }
                Some(e) => {
                    ok = false;
                    let _ = writeln!(s, "  BAD  {:<48} {e}", f.name);
                }
            }
        }
    }
    Ok((s, ok))
}
