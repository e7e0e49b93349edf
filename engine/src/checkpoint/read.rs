//! Reading a checkpoint: [`Checkpoint::open`] checks the manifest (envelope CRC, magic,
//! version, plan against model, every planned shard listed, every file present with its size);
//! a file's CRC and header are checked the first time it is memory-mapped, before any of its
//! values are used. [`Checkpoint::read_block`] assembles any (rows, cols) block of a table from
//! whichever saved shards cover it: that is resharding.
use super::{bad, io, FileEntry, FileKind, Manifest, DENSE_MAGIC, FORMAT_VERSION, MAGIC, MANIFEST, SHARD_HEADER};
use crate::backend::ShardSpec;
use crate::config::{EmbOptimizer, TrainConfig};
use crate::{Error, Result};
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::{self, File};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// One step folder under a root.
#[derive(Clone, Debug)]
pub struct Listed {
    pub step: u64,
    pub dir: PathBuf,
    /// The manifest is there (it is renamed into place last).
    pub complete: bool,
}

/// Every `step-S` folder under `root`, by step.
pub fn list(root: &Path) -> Result<Vec<Listed>> {
    let mut v = Vec::new();
    let rd = match fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(v),
        Err(e) => return Err(Error::io(root, e)),
    };
    for e in rd {
        let e = e.map_err(io(root))?;
        let name = e.file_name();
        let Some(step) = name.to_str().and_then(|n| n.strip_prefix("step-")).and_then(|s| s.parse::<u64>().ok()) else { continue };
        let dir = e.path();
        if dir.is_dir() {
            v.push(Listed { step, complete: dir.join(MANIFEST).is_file(), dir });
        }
    }
    v.sort_by_key(|l| l.step);
    Ok(v)
}

/// The newest complete checkpoint under `root` (None when there is none).
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.into_iter().filter(|l| l.complete).map(|l| l.dir).next_back())
}

/// An opened, manifest-verified checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Files mapped and verified so far.
    maps: Mutex<HashMap<String, Arc<Mmap>>>,
}

/// Largest manifest file read (a manifest lists a few entries per shard: kilobytes to megabytes).
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;
/// Most parameters a dense file may list.
pub const MAX_DENSE_PARAMS: usize = 1 << 16;

fn read_manifest(path: &Path) -> Result<Manifest> {
    let f = File::open(path).map_err(io(path))?;
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_MANIFEST_BYTES + 1), &mut text).map_err(io(path))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(bad(path, format!("larger than {MAX_MANIFEST_BYTES} bytes: not a manifest")));
    }
    parse_manifest(&text, path)
}

/// The manifest in `text` (a manifest file's bytes): envelope, CRC, JSON, magic and version
/// checked; `path` names it in errors. Its contents are checked by [`validate_manifest`].
pub fn parse_manifest(text: &[u8], path: &Path) -> Result<Manifest> {
    const PRE: &str = "{\"crc32\":\"";
    const MID: &str = "\",\"manifest\":";
    let head = PRE.len() + 8 + MID.len();
    if text.len() < head + 3 || !text.starts_with(PRE.as_bytes()) || &text[PRE.len() + 8..head] != MID.as_bytes() || !text.ends_with(b"}\n") {
        return Err(bad(path, "not an ember checkpoint manifest (envelope damaged or truncated)"));
    }
    let want = std::str::from_utf8(&text[PRE.len()..PRE.len() + 8]).ok().and_then(|s| u32::from_str_radix(s, 16).ok());
    let body = &text[head..text.len() - 2];
    let got = crc32fast::hash(body);
    if want != Some(got) {
        return Err(bad(path, format!("checksum mismatch: manifest says {:08x?}, contents hash to {got:08x}", want)));
    }
    let m: Manifest = serde_json::from_slice(body).map_err(|e| bad(path, format!("manifest does not parse: {e}")))?;
    if m.magic != MAGIC {
        return Err(bad(path, format!("magic '{}', expected '{MAGIC}'", m.magic)));
    }
    if m.format_version != FORMAT_VERSION {
        return Err(bad(path, format!("format version {}, this build reads {FORMAT_VERSION}", m.format_version)));
    }
    Ok(m)
}

/// Whether `name` is a plain file name (no folder part, not "." or ".."): a manifest only names
/// files inside its own step folder.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
}

/// Bytes of a shard file: the header, then rows × (cols + state per row) floats (None on overflow).
pub fn shard_file_bytes(spec: &ShardSpec, state_per_row: usize) -> Option<u64> {
    let rows = spec.rows.end.checked_sub(spec.rows.start)?;
    let cols = spec.cols.end.checked_sub(spec.cols.start)? as u64;
    rows.checked_mul(cols.checked_add(state_per_row as u64)?)?.checked_mul(4)?.checked_add(SHARD_HEADER as u64)
}

/// Bytes of the dense file: magic, version, count, two u64 lengths per parameter, the floats.
pub fn dense_file_bytes(lens: &[(usize, usize)]) -> Option<u64> {
    let floats = lens.iter().try_fold(0u64, |a, &(w, s)| a.checked_add(w as u64)?.checked_add(s as u64))?;
    (lens.len() as u64).checked_mul(16)?.checked_add(16)?.checked_add(floats.checked_mul(4)?)
}

/// Everything a manifest says about itself, checked without touching the files: model, grid,
/// plan, every planned shard listed once with its size, the dense file's size, and every file
/// name plain. `dir` (the step folder) names the files in errors.
pub fn validate_manifest(m: &Manifest, dir: &Path) -> Result<()> {
    let mpath = dir.join(MANIFEST);
    let r = &m.run;
    r.model.validate().map_err(|e| bad(&mpath, e))?;
    crate::grid::Grid::new(r.grid.m, r.grid.n, r.grid.placement).map_err(|e| bad(&mpath, e))?;
    r.plan.validate(&r.model).map_err(|e| bad(&mpath, e))?;
    if r.grid.n != r.plan.n || m.m != r.grid.m {
        return Err(bad(&mpath, "grid, plan and M disagree"));
    }
    if let Some(f) = m.files.iter().find(|f| !plain_name(&f.name)) {
        return Err(bad(&mpath, format!("lists the file {:?}: a manifest names plain files of its own folder only", f.name)));
    }
    // Every planned shard must be listed, with the right shape.
    for tp in &r.plan.tables {
        let t = &r.model.tables[tp.table];
        for ps in &tp.shards {
            let spec = ShardSpec { table: tp.table, table_rows: t.rows, dim: t.dim, rows: ps.rows.clone(), cols: ps.cols.clone() };
            let found = m.shards().find(|(_, s, _)| **s == spec);
            match found {
                None => return Err(bad(&dir.join(super::shard_file_name(&spec)), "missing shard: the plan has it, the manifest does not list it")),
                Some((f, _, spr)) => {
                    let want = r.embedding_optimizer.state_per_row(spec.num_cols());
                    if spr != want || shard_file_bytes(&spec, spr) != Some(f.bytes) {
                        return Err(bad(&dir.join(&f.name), "listed with a size that does not match its shape"));
                    }
                }
            }
        }
    }
    if m.shards().count() != r.plan.tables.iter().map(|t| t.shards.len()).sum::<usize>() {
        return Err(bad(&mpath, "lists shards the plan does not have"));
    }
    let Some((df, lens)) = m.dense() else { return Err(bad(&dir.join(super::DENSE_FILE), "missing: the manifest lists no dense file")) };
    if lens.len() > MAX_DENSE_PARAMS || dense_file_bytes(lens) != Some(df.bytes) {
        return Err(bad(&dir.join(&df.name), "listed with a size that does not match its shapes"));
    }
    Ok(())
}

/// The fields of a shard file's 64-byte header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardHeader {
    pub spec: ShardSpec,
    pub state_per_row: usize,
}

/// Decode and check a shard file's header (`bytes`: at least its first 64 bytes): magic,
/// version, and a shard that lies inside its table.
pub fn parse_shard_header(bytes: &[u8]) -> std::result::Result<ShardHeader, String> {
    let h = bytes.get(..SHARD_HEADER).ok_or_else(|| format!("{} bytes, shorter than the {SHARD_HEADER}-byte header", bytes.len()))?;
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    if &h[0..8] != super::SHARD_MAGIC {
        return Err("not a shard file (magic)".into());
    }
    if u32_at(8) != FORMAT_VERSION {
        return Err(format!("format version {}, this build reads {FORMAT_VERSION}", u32_at(8)));
    }
    let (table, table_rows, dim, spr) = (u32_at(12) as usize, u64_at(16), u32_at(24) as usize, u32_at(28) as usize);
    let (r0, r1, c0, c1) = (u64_at(32), u64_at(40), u32_at(48) as usize, u32_at(52) as usize);
    if r0 >= r1 || r1 > table_rows || c0 >= c1 || c1 > dim || h[56..].iter().any(|&b| b != 0) {
        return Err(format!("rows {r0}..{r1} cols {c0}..{c1} do not lie inside a {table_rows} x {dim} table (or padding is not zero)"));
    }
    Ok(ShardHeader { spec: ShardSpec { table, table_rows, dim, rows: r0..r1, cols: c0..c1 }, state_per_row: spr })
}

/// Decode and check a dense file's header against the file's length: the (weights, state)
/// lengths of every parameter, whose floats exactly fill the rest of the file.
pub fn parse_dense_header(bytes: &[u8]) -> std::result::Result<Vec<(usize, usize)>, String> {
    if bytes.len() < 16 || &bytes[..8] != DENSE_MAGIC {
        return Err("not a dense file (magic)".into());
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(format!("format version {version}, this build reads {FORMAT_VERSION}"));
    }
    let count = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as usize;
    if count > MAX_DENSE_PARAMS {
        return Err(format!("{count} parameters, more than {MAX_DENSE_PARAMS}"));
    }
    let table = bytes.get(16..16 + 16 * count).ok_or_else(|| format!("{} bytes cannot hold the lengths of {count} parameters", bytes.len()))?;
    let mut lens = Vec::with_capacity(count);
    for e in table.chunks_exact(16) {
        let w = u64::from_le_bytes(e[..8].try_into().expect("8 bytes"));
        let s = u64::from_le_bytes(e[8..].try_into().expect("8 bytes"));
        let (Ok(w), Ok(s)) = (usize::try_from(w), usize::try_from(s)) else { return Err("a parameter length does not fit in memory".into()) };
        lens.push((w, s));
    }
    if dense_file_bytes(&lens) != Some(bytes.len() as u64) {
        return Err(format!("{} bytes, but the header's lengths need {:?}", bytes.len(), dense_file_bytes(&lens)));
    }
    Ok(lens)
}

fn same_kind(a: &EmbOptimizer, b: &EmbOptimizer) -> bool {
    std::mem::discriminant(a) == std::mem::discriminant(b)
}

impl Checkpoint {
    /// Open the step folder `dir` (or, given a root, its newest complete checkpoint) and verify
    /// the manifest and the presence and size of every file it lists.
    pub fn open(dir: &Path) -> Result<Checkpoint> {
        let dir = if !dir.join(MANIFEST).exists() && !dir.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-")) {
            latest(dir)?.ok_or_else(|| bad(dir, "no complete checkpoint here (no step-S folder with a manifest)"))?
        } else {
            dir.to_path_buf()
        };
        let mpath = dir.join(MANIFEST);
        if !mpath.exists() {
            return Err(bad(&mpath, "missing: the checkpoint is incomplete (its writer did not finish)"));
        }
        let m = read_manifest(&mpath)?;
        validate_manifest(&m, &dir)?;
        for f in &m.files {
            super::replica::check_entry(&dir, f, &m)?;
            let p = dir.join(&f.name);
            let len = fs::metadata(&p).map_err(|e| bad(&p, format!("missing or unreadable: {e}")))?.len();
            if len != f.bytes {
                return Err(bad(&p, format!("{len} bytes, the manifest says {} (truncated or overwritten)", f.bytes)));
            }
        }
        Ok(Checkpoint { dir, manifest: m, maps: Mutex::new(HashMap::new()) })
    }

    pub fn step(&self) -> u64 {
        self.manifest.step
    }

    /// Refuse a checkpoint of another model, or whose optimizer state has another layout.
    pub fn check_compatible(&self, cfg: &TrainConfig) -> Result<()> {
        let r = &self.manifest.run;
        let mp = self.dir.join(MANIFEST);
        if r.model != cfg.model {
            return Err(bad(&mp, "written for a different model (model config differs)"));
        }
        if !same_kind(&r.embedding_optimizer, &cfg.optim.embedding) {
            return Err(bad(&mp, format!("embedding optimizer {:?}, this run uses {:?}", r.embedding_optimizer, cfg.optim.embedding)));
        }
        if std::mem::discriminant(&r.dense_optimizer) != std::mem::discriminant(&cfg.optim.dense) {
            return Err(bad(&mp, format!("dense optimizer {:?}, this run uses {:?}", r.dense_optimizer, cfg.optim.dense)));
        }
        Ok(())
    }

    /// Map `f`, checking its size, CRC and header the first time.
    pub(crate) fn map(&self, f: &FileEntry) -> Result<Arc<Mmap>> {
        if let Some(m) = self.maps.lock().expect("checkpoint map lock").get(&f.name) {
            return Ok(m.clone());
        }
        let p = self.dir.join(&f.name);
        let file = File::open(&p).map_err(|e| bad(&p, format!("missing or unreadable: {e}")))?;
        // SAFETY: checkpoint files are never modified in place (written under another name and
        // renamed); a concurrent truncation by another program is outside the contract.
        let map = unsafe { Mmap::map(&file) }.map_err(io(&p))?;
        if map.len() as u64 != f.bytes {
            return Err(bad(&p, format!("{} bytes, the manifest says {} (truncated or overwritten)", map.len(), f.bytes)));
        }
        let crc = crc32fast::hash(&map);
        if crc != f.crc32 {
            return Err(bad(&p, format!("checksum mismatch: manifest says {:08x}, file hashes to {crc:08x} (corrupted)", f.crc32)));
        }
        match &f.kind {
            FileKind::Shard { spec, state_per_row } => {
                let h = parse_shard_header(&map).map_err(|e| bad(&p, e))?;
                if h.spec != *spec || h.state_per_row != *state_per_row {
                    return Err(bad(&p, "shard header does not match the manifest"));
                }
            }
            FileKind::Replica { spec, replica, state_per_row, weights, pending_rows } => {
                if map[..SHARD_HEADER] != super::replica::header(spec, *replica, *state_per_row, *weights, pending_rows.is_some()) {
                    return Err(bad(&p, "replica header does not match the manifest"));
                }
            }
            FileKind::Dense { lens } => {
                if parse_dense_header(&map).map_err(|e| bad(&p, e))? != *lens {
                    return Err(bad(&p, "dense header does not match the manifest"));
                }
            }
        }
        let map = Arc::new(map);
        self.maps.lock().expect("checkpoint map lock").insert(f.name.clone(), map.clone());
        Ok(map)
    }

    /// Check every file's size, header and CRC.
    pub fn verify_all(&self) -> Result<()> {
        for f in &self.manifest.files {
            self.map(f)?;
        }
        Ok(())
    }

    /// Verify every file, collecting (name, problem) instead of stopping at the first.
    pub fn verify_each(&self) -> Vec<(String, Option<String>)> {
        self.manifest.files.iter().map(|f| (f.name.clone(), self.map(f).err().map(|e| e.to_string()))).collect()
    }

    /// The accumulator factor for optimizer state loaded under momentum-scaling constant
    /// `c_new`: the update reads v / c, so v is rescaled by c_new / c_old to keep v / c.
    pub fn state_factor(&self, c_new: f32) -> f32 {
        let c_old = self.manifest.run.c;
        if c_new == c_old {
            1.0
        } else {
            c_new / c_old
        }
    }

    /// Weights (rows × cols, row-major) and optimizer state (rows × state_per_row(cols)) of the
    /// block `rows`, `cols` of `table`, assembled from the saved shards; the state is rescaled
    /// for momentum-scaling constant `c_new` (None: as saved). Errors if any element is not
    /// covered.
    pub fn read_block(&self, table: usize, rows: Range<u64>, cols: Range<usize>, c_new: Option<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        let r = &self.manifest.run;
        let t = r.model.tables.get(table).ok_or_else(|| bad(&self.dir, format!("no table {table}")))?;
        if rows.start > rows.end || rows.end > t.rows || cols.start > cols.end || cols.end > t.dim {
            return Err(bad(&self.dir, format!("block rows {rows:?} cols {cols:?} outside table {table} ({} × {})", t.rows, t.dim)));
        }
        let (nr, nc) = ((rows.end - rows.start) as usize, cols.len());
        let opt = &r.embedding_optimizer;
        let spr = opt.state_per_row(nc);
        let row_wise = matches!(opt, EmbOptimizer::RowWiseAdagrad { .. });
        let mut w = vec![0.0f32; nr * nc];
        let mut s = vec![0.0f32; nr * spr];
        let mut covered = 0usize;
        for (f, spec, sspr) in self.manifest.shards().filter(|(_, s, _)| s.table == table) {
            let r0 = rows.start.max(spec.rows.start);
            let r1 = rows.end.min(spec.rows.end);
            let c0 = cols.start.max(spec.cols.start);
            let c1 = cols.end.min(spec.cols.end);
            if r0 >= r1 || c0 >= c1 {
                continue;
            }
            let map = self.map(f)?;
            let data: &[f32] = bytemuck::cast_slice(&map[SHARD_HEADER..]);
            let (src_cols, src_rows) = (spec.num_cols(), spec.num_rows());
            let (sw, ss) = data.split_at(src_rows * src_cols);
            let k = c1 - c0;
            for row in r0..r1 {
                let i = (row - spec.rows.start) as usize;
                let o = (row - rows.start) as usize;
                let src = i * src_cols + (c0 - spec.cols.start);
                let dst = o * nc + (c0 - cols.start);
                w[dst..dst + k].copy_from_slice(&sw[src..src + k]);
                if row_wise {
                    // One accumulator per row; column shards of a table hold the same value.
                    s[o] = ss[i];
                } else if sspr > 0 {
                    s[dst..dst + k].copy_from_slice(&ss[src..src + k]);
                }
            }
            covered += (r1 - r0) as usize * k;
        }
        if covered != nr * nc {
            return Err(bad(&self.dir, format!("table {table} rows {rows:?} cols {cols:?}: saved shards cover {covered} of {} values (missing shard)", nr * nc)));
        }
        if let Some(c) = c_new {
            let k = self.state_factor(c);
            if k != 1.0 {
                s.iter_mut().for_each(|v| *v *= k);
            }
        }
        Ok((w, s))
    }

    /// Weights and optimizer state of `spec` (any shard of any plan on any grid).
    pub fn read_shard(&self, spec: &ShardSpec, c_new: Option<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        self.read_block(spec.table, spec.rows.clone(), spec.cols.clone(), c_new)
    }

    /// Every dense parameter's (weights, optimizer state), in `params_mut` order.
    pub fn read_dense(&self) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let (f, lens) = self.manifest.dense().ok_or_else(|| bad(&self.dir.join(super::DENSE_FILE), "missing"))?;
        let map = self.map(f)?;
        let head = 16 + 16 * lens.len();
        let data: &[f32] = bytemuck::cast_slice(&map[head..]);
        let mut pos = 0;
        let mut out = Vec::with_capacity(lens.len());
        for &(wl, sl) in lens {
            out.push((data[pos..pos + wl].to_vec(), data[pos + wl..pos + wl + sl].to_vec()));
            pos += wl + sl;
        }
        Ok(out)
    }

    /// Where world rank `w` of the writing grid stood.
    pub fn position(&self, w: usize) -> Option<&super::RankPosition> {
        self.manifest.positions.iter().find(|p| p.world_rank == w)
    }
}
