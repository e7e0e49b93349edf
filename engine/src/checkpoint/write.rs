//! Writing a checkpoint: `prepare` the step folder (one process), every writer's
//! `write_shard` / `write_dense` (any process, each file on its own), then `commit` (one process,
//! after every file is durable): the manifest, written last, and pruning to the last K.
//!
//! Every file goes through the same path: `.NAME.tmp` created, streamed (CRC computed on the
//! way, nothing copied whole), flushed and fsynced, renamed to NAME; a writer fsyncs the folder
//! after its renames, so a manifest can only ever name durable files.
use super::{bad, failpoint, io, FileEntry, FileKind, Manifest, RankPosition, RunInfo, DENSE_FILE, DENSE_MAGIC, FORMAT_VERSION, MAGIC, MANIFEST, RUN_ID_FILE, SHARD_HEADER, SHARD_MAGIC};
use crate::backend::ShardSpec;
use crate::Result;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// A file being written under its temporary name, with a running CRC.
pub(crate) struct Out {
    tmp: PathBuf,
    dst: PathBuf,
    name: String,
    w: BufWriter<File>,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl Out {
    pub(crate) fn create(dir: &Path, name: &str) -> Result<Out> {
        let tmp = dir.join(format!(".{name}.tmp"));
        let f = File::create(&tmp).map_err(io(&tmp))?;
        Ok(Out { dst: dir.join(name), name: name.to_string(), w: BufWriter::with_capacity(1 << 20, f), crc: crc32fast::Hasher::new(), bytes: 0, tmp })
    }
    pub(crate) fn put(&mut self, b: &[u8]) -> Result<()> {
        self.crc.update(b);
        self.bytes += b.len() as u64;
        self.w.write_all(b).map_err(io(&self.tmp))
    }
    pub(crate) fn put_f32(&mut self, x: &[f32]) -> Result<()> {
        // Streamed in 4 MiB pieces: the hash and the write see the caller's memory directly.
        for c in x.chunks(1 << 20) {
            self.put(bytemuck::cast_slice(c))?;
        }
        Ok(())
    }
    /// Flush, fsync, rename into place. Returns (bytes, crc).
    pub(crate) fn finish(self) -> Result<(u64, u32)> {
        let Out { tmp, dst, name, w, crc, bytes } = self;
        let f = w.into_inner().map_err(|e| crate::Error::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        failpoint::hit(&format!("before-rename:{name}"))?;
        fs::rename(&tmp, &dst).map_err(io(&dst))?;
        failpoint::hit(&format!("after-file:{name}"))?;
        Ok((bytes, crc.finalize()))
    }
}

/// fsync a folder (makes renames and new entries in it durable).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Make `ROOT/step-S/` empty and ready (one process, before any file is written). A folder left
/// from an earlier attempt at the same step is removed, its manifest first, so that it can never
/// be mistaken for complete while half deleted.
pub fn prepare(root: &Path, step: u64) -> Result<PathBuf> {
    fs::create_dir_all(root).map_err(io(root))?;
    let dir = root.join(super::step_dir_name(step));
    if dir.exists() {
        remove_checkpoint(&dir)?;
    }
    fs::create_dir(&dir).map_err(io(&dir))?;
    sync_dir(root)?;
    Ok(dir)
}

/// Delete a checkpoint folder: the manifest first (made durable), then the rest.
pub(crate) fn remove_checkpoint(dir: &Path) -> Result<()> {
    let m = dir.join(MANIFEST);
    if m.exists() {
        fs::remove_file(&m).map_err(io(&m))?;
        sync_dir(dir)?;
    }
    fs::remove_dir_all(dir).map_err(io(dir))
}

/// The 64-byte header of a shard file.
pub(crate) fn shard_header(spec: &ShardSpec, state_per_row: usize) -> [u8; SHARD_HEADER] {
    let mut h = [0u8; SHARD_HEADER];
    h[0..8].copy_from_slice(SHARD_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(spec.table as u32).to_le_bytes());
    h[16..24].copy_from_slice(&spec.table_rows.to_le_bytes());
    h[24..28].copy_from_slice(&(spec.dim as u32).to_le_bytes());
    h[28..32].copy_from_slice(&(state_per_row as u32).to_le_bytes());
    h[32..40].copy_from_slice(&spec.rows.start.to_le_bytes());
    h[40..48].copy_from_slice(&spec.rows.end.to_le_bytes());
    h[48..52].copy_from_slice(&(spec.cols.start as u32).to_le_bytes());
    h[52..56].copy_from_slice(&(spec.cols.end as u32).to_le_bytes());
    h
}

/// Write one shard (weights: num_rows × num_cols, row-major; state: num_rows × state_per_row)
/// into the step folder. Durable when it returns (the caller fsyncs the folder after its last
/// file with [`sync_dir`]; [`commit`] does it too).
pub fn write_shard(dir: &Path, spec: &ShardSpec, weights: &[f32], state: &[f32]) -> Result<FileEntry> {
    let name = super::shard_file_name(spec);
    let (rows, cols) = (spec.num_rows(), spec.num_cols());
    if weights.len() != rows * cols {
        return Err(bad(&dir.join(&name), format!("{} weights for a {rows}×{cols} shard", weights.len())));
    }
    if rows == 0 || state.len() % rows != 0 {
        return Err(bad(&dir.join(&name), format!("{} state floats for {rows} rows", state.len())));
    }
    let spr = state.len() / rows;
    let mut o = Out::create(dir, &name)?;
    o.put(&shard_header(spec, spr))?;
    failpoint::hit(&format!("during:{name}"))?;
    o.put_f32(weights)?;
    o.put_f32(state)?;
    let (bytes, crc32) = o.finish()?;
    Ok(FileEntry { name, kind: FileKind::Shard { spec: spec.clone(), state_per_row: spr }, bytes, crc32 })
}

/// Write the dense part: (weights, optimizer state) of every parameter in `params_mut` order.
pub fn write_dense(dir: &Path, params: &[(&[f32], &[f32])]) -> Result<FileEntry> {
    let mut o = Out::create(dir, DENSE_FILE)?;
    let mut h = Vec::with_capacity(16 + 16 * params.len());
    h.extend_from_slice(DENSE_MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&(params.len() as u32).to_le_bytes());
    for (w, s) in params {
        h.extend_from_slice(&(w.len() as u64).to_le_bytes());
        h.extend_from_slice(&(s.len() as u64).to_le_bytes());
    }
    o.put(&h)?;
    failpoint::hit(&format!("during:{DENSE_FILE}"))?;
    for (w, s) in params {
        o.put_f32(w)?;
        o.put_f32(s)?;
    }
    let (bytes, crc32) = o.finish()?;
    let lens = params.iter().map(|(w, s)| (w.len(), s.len())).collect();
    Ok(FileEntry { name: DENSE_FILE.into(), kind: FileKind::Dense { lens }, bytes, crc32 })
}

/// Serialize a manifest in its CRC envelope.
pub(crate) fn manifest_text(m: &Manifest) -> Result<String> {
    let body = serde_json::to_string(m).map_err(|e| crate::Error::Input(format!("checkpoint manifest: {e}")))?;
    let crc = crc32fast::hash(body.as_bytes());
    Ok(format!("{{\"crc32\":\"{crc:08x}\",\"manifest\":{body}}}\n"))
}

/// The id of the run owning checkpoint root `root` (None when the root has no `run-id` file).
pub fn read_run_id(root: &Path) -> Result<Option<String>> {
    let p = root.join(RUN_ID_FILE);
    let f = match File::open(&p) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(crate::Error::io(&p, e)),
    };
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(f, 65), &mut text).map_err(io(&p))?;
    let id = text.trim();
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(bad(&p, "not a run id (damaged: remove it, or the whole folder)"));
    }
    Ok(Some(id.to_string()))
}

/// A fresh run id: 64 random bits (std's per-process random hasher keys, the clock and the
/// process id), as 16 hex digits.
fn new_run_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    format!("{:016x}", h.finish())
}

/// Make checkpoint root `root` this run's and return the run id its checkpoints are written
/// under (one process, before training starts).
/// - `resume` and the root holds complete checkpoints: the run continues the root's run (a root
///   written before run ids is adopted under a new id).
/// - Otherwise a new run: a root holding complete checkpoints (another run's) is refused unless
///   `overwrite`, which removes every step folder in it first.
pub fn claim(root: &Path, resume: bool, overwrite: bool) -> Result<String> {
    let listed = super::list(root)?;
    let complete: Vec<u64> = listed.iter().filter(|l| l.complete).map(|l| l.step).collect();
    let owner = read_run_id(root)?;
    if resume && !complete.is_empty() {
        if let Some(id) = owner {
            return Ok(id);
        }
        let id = new_run_id();
        write_run_id(root, &id)?;
        return Ok(id);
    }
    if !complete.is_empty() && !overwrite {
        let steps: Vec<String> = complete.iter().map(|s| s.to_string()).collect();
        return Err(crate::Error::Config(format!(
            "checkpoint folder {} holds the checkpoints of another run (run id {}, steps {}): continue that run with --resume, \
             replace its checkpoints with --overwrite-checkpoints, or choose another --checkpoint-dir",
            root.display(),
            owner.as_deref().unwrap_or("unknown: written before run ids"),
            steps.join(", ")
        )));
    }
    for l in &listed {
        remove_checkpoint(&l.dir)?;
    }
    let id = new_run_id();
    fs::create_dir_all(root).map_err(io(root))?;
    write_run_id(root, &id)?;
    Ok(id)
}

/// Write `root/run-id` atomically (temporary file, fsync, rename, fsync the folder).
fn write_run_id(root: &Path, id: &str) -> Result<()> {
    let mut o = Out::create(root, RUN_ID_FILE)?;
    o.put(format!("{id}\n").as_bytes())?;
    o.finish()?;
    sync_dir(root)
}

/// Finish step `step` (one process, after every writer's files are durable): fsync the folder,
/// write the manifest under a temporary name, fsync, rename, fsync the folder — the checkpoint
/// is complete from that rename on — then keep only the newest `keep` complete checkpoints
/// (at least this one) of run `run_id` (see [`prune`]). Returns the step folder.
#[allow(clippy::too_many_arguments)]
pub fn commit(dir: &Path, step: u64, run: RunInfo, mut positions: Vec<RankPosition>, mut files: Vec<FileEntry>, keep: usize, run_id: Option<&str>) -> Result<PathBuf> {
    // Every listed file must be there under its final name with the size written.
    for f in &files {
        let p = dir.join(&f.name);
        let len = fs::metadata(&p).map_err(io(&p))?.len();
        if len != f.bytes {
            return Err(bad(&p, format!("{len} bytes on disk, the writer wrote {}", f.bytes)));
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    positions.sort_by_key(|p| p.world_rank);
    sync_dir(dir)?;
    failpoint::hit("before-manifest")?;
    let m = Manifest { magic: MAGIC.into(), format_version: FORMAT_VERSION, step, m: run.grid.m, run, positions, files };
    let mut o = Out::create(dir, MANIFEST)?;
    o.put(manifest_text(&m)?.as_bytes())?;
    o.finish()?;
    sync_dir(dir)?;
    failpoint::hit("before-prune")?;
    prune(&super::root_of(dir), keep.max(1), run_id)?;
    Ok(dir.to_path_buf())
}

/// Keep the newest `keep` complete checkpoints under `root`; remove older complete ones and
/// incomplete folders older than the newest complete one — only when `root` belongs to run
/// `run_id` (its `run-id` file says so; None: a root no run has claimed). A root that another
/// run has claimed since is left alone.
pub fn prune(root: &Path, keep: usize, run_id: Option<&str>) -> Result<()> {
    let owner = read_run_id(root)?;
    if owner.as_deref() != run_id {
        tracing::warn!("checkpoint folder {}: owned by run {owner:?}, not this run ({run_id:?}); nothing pruned", root.display());
        return Ok(());
    }
    let all = super::list(root)?;
    let newest = all.iter().filter(|l| l.complete).map(|l| l.step).max();
    let mut complete: Vec<_> = all.iter().filter(|l| l.complete).collect();
    complete.sort_by_key(|l| std::cmp::Reverse(l.step));
    for l in complete.iter().skip(keep.max(1)) {
        remove_checkpoint(&l.dir)?;
    }
    if let Some(n) = newest {
        for l in all.iter().filter(|l| !l.complete && l.step < n) {
            remove_checkpoint(&l.dir)?;
        }
    }
    sync_dir(root)
}
