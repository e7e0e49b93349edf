//! Writing a `.ember` file: samples appended in batches, encoded a block at a time under a
//! temporary name, renamed to the destination once the index and header are written.
use super::format::{bad, empty_id, BlockLayout, DenseTransform, Feature, Header, MAX_BAG, MAX_BLOCK_SAMPLES, MAX_DENSE, MAX_FEATURES};
use crate::data::Batch;
use crate::{Error, Result};
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Writes one `.ember` file: samples are appended in batches and written a block at a time
/// (memory: one block), under a temporary name renamed to the destination by [`finish`].
///
/// [`finish`]: BinaryWriter::finish
pub struct BinaryWriter {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<std::io::BufWriter<File>>,
    header: Header,
    pending: Batch,
    /// Encoded block, and offsets or ids being encoded (all reused).
    buf: Vec<u8>,
    scratch: Vec<u64>,
    scratch32: Vec<u32>,
    index: Vec<u8>,
    at: u64,
}

impl BinaryWriter {
    /// Starts `dest` for samples of `num_dense` dense values and `features`.
    pub fn create(dest: impl AsRef<Path>, num_dense: usize, features: Vec<Feature>, dense: DenseTransform, block_samples: u32) -> Result<BinaryWriter> {
        let dest = dest.as_ref().to_path_buf();
        if cfg!(target_endian = "big") {
            return Err(bad(&dest, "Ember binary files are little-endian; this host is big-endian"));
        }
        if features.is_empty() || features.len() > MAX_FEATURES as usize || num_dense > MAX_DENSE as usize {
            return Err(bad(&dest, format!("{} sparse and {num_dense} dense features: outside the format's limits", features.len())));
        }
        if block_samples == 0 || block_samples > MAX_BLOCK_SAMPLES {
            return Err(bad(&dest, format!("{block_samples} samples per block (1 to {MAX_BLOCK_SAMPLES})")));
        }
        // All ones marks an empty bag: 4-byte ids while every id is below it.
        let id_bytes = if features.iter().all(|f| f.rows <= u32::MAX as u64) { 4 } else { 8 };
        let name = dest.file_name().ok_or_else(|| bad(&dest, "not a file name"))?.to_string_lossy().into_owned();
        let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let header = Header { num_dense: num_dense as u32, block_samples, id_bytes, dense, samples: 0, index_offset: 0, file_bytes: 0, index_crc: 0, features };
        let mut w = BinaryWriter {
            at: header.data_offset(),
            dest,
            tmp,
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            pending: Batch::new(num_dense, header.features.len()),
            buf: Vec::new(),
            scratch: Vec::new(),
            scratch32: Vec::new(),
            index: Vec::new(),
            header,
        };
        // Placeholder header; the real one is written by `finish`.
        let zeros = vec![0u8; w.at as usize];
        w.write(&zeros)?;
        Ok(w)
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        let f = self.file.as_mut().expect("open until finish");
        f.write_all(b).map_err(|e| Error::io(&self.tmp, e))
    }

    /// Samples written or pending so far.
    pub fn samples(&self) -> u64 {
        self.header.samples + self.pending.size() as u64
    }

    /// Appends `batch`'s samples (their ids must already be below the tables' rows).
    pub fn push(&mut self, batch: &Batch) -> Result<()> {
        if batch.num_dense != self.header.num_dense as usize || batch.sparse.len() != self.header.features.len() || batch.dense.len() != batch.size() * batch.num_dense {
            return Err(bad(&self.dest, "batch layout differs from the file's"));
        }
        if let Some(i) = batch.labels.iter().position(|&y| y != 0.0 && y != 1.0) {
            return Err(bad(&self.dest, format!("label {} of a pushed sample, not 0 or 1", batch.labels[i])));
        }
        if batch.dense.iter().any(|x| !x.is_finite()) {
            return Err(bad(&self.dest, "a pushed dense value is not finite"));
        }
        for (f, (j, ft)) in batch.sparse.iter().zip(&self.header.features).enumerate() {
            if j.lengths.len() != batch.size() {
                return Err(bad(&self.dest, format!("feature {f}: {} bags for {} samples", j.lengths.len(), batch.size())));
            }
            if let Some(&v) = j.values.iter().find(|&&v| v >= ft.rows) {
                return Err(bad(&self.dest, format!("feature {f}: id {v} not below the table's {} rows", ft.rows)));
            }
        }
        let s = self.header.block_samples as usize;
        if self.pending.size() == 0 && batch.size() == s {
            // A whole block: encoded straight from the caller's batch.
            return self.write_block(batch);
        }
        let mut at = 0;
        while at < batch.size() {
            let take = (s - self.pending.size()).min(batch.size() - at);
            if at == 0 && take == batch.size() {
                self.pending.extend(batch);
            } else {
                self.pending.extend(&batch.slice(at..at + take));
            }
            at += take;
            if self.pending.size() == s {
                self.flush_block()?;
            }
        }
        Ok(())
    }

    fn flush_block(&mut self) -> Result<()> {
        if self.pending.size() == 0 {
            return Ok(());
        }
        let p = std::mem::take(&mut self.pending);
        let done = self.write_block(&p);
        self.pending = p;
        let p = &mut self.pending;
        p.dense.clear();
        p.labels.clear();
        for j in &mut p.sparse {
            j.lengths.clear();
            j.values.clear();
        }
        done
    }

    /// Encodes `p` as the next block and writes it.
    fn write_block(&mut self, p: &Batch) -> Result<()> {
        let n = p.size();
        // A one-hot section wherever no bag of the block holds more than one id.
        let sections = p.sparse.iter().map(|j| (j.lengths.iter().all(|&l| l <= 1), j.values.len() as u64));
        let layout = BlockLayout::new(n as u64, self.header.num_dense as u64, self.header.id_bytes as u64, sections)
            .ok_or_else(|| bad(&self.dest, "block size overflows"))?;
        // Sections appended in order, zero padding only where the layout has it.
        let buf = &mut self.buf;
        buf.clear();
        buf.reserve(layout.bytes as usize);
        let pad = |buf: &mut Vec<u8>, to: u64| buf.resize(to as usize, 0);
        buf.extend_from_slice(bytemuck::cast_slice(&p.labels));
        pad(buf, layout.dense);
        buf.extend_from_slice(bytemuck::cast_slice(&p.dense));
        let scratch = &mut self.scratch;
        let id_bytes = self.header.id_bytes as u64;
        for (f, (j, sec)) in p.sparse.iter().zip(&layout.features).enumerate() {
            let Some(off_at) = sec.offsets else {
                pad(buf, sec.ids_at);
                let empty = empty_id(id_bytes);
                let mut v = j.values.iter();
                let mut slot = |l: u32| if l == 1 { v.next().copied().unwrap_or(empty) } else { empty };
                if id_bytes == 4 {
                    let s32 = &mut self.scratch32;
                    s32.clear();
                    s32.extend(j.lengths.iter().map(|&l| slot(l) as u32));
                    buf.extend_from_slice(bytemuck::cast_slice(s32));
                } else {
                    scratch.clear();
                    scratch.extend(j.lengths.iter().map(|&l| slot(l)));
                    buf.extend_from_slice(bytemuck::cast_slice(scratch));
                }
                continue;
            };
            pad(buf, off_at);
            if let Some(&l) = j.lengths.iter().find(|&&l| l as u64 > MAX_BAG) {
                return Err(bad(&self.dest, format!("feature {f}: a bag of {l} ids (at most {MAX_BAG})")));
            }
            scratch.clear();
            scratch.push(0);
            let mut acc = 0u64;
            scratch.extend(j.lengths.iter().map(|&l| {
                acc += l as u64;
                acc
            }));
            buf.extend_from_slice(bytemuck::cast_slice(scratch));
            debug_assert_eq!(buf.len() as u64, sec.ids_at);
            if self.header.id_bytes == 4 {
                scratch.clear();
                // Two u32 ids per u64 word (little-endian), then the odd one.
                scratch.extend(j.values.chunks_exact(2).map(|c| c[0] | c[1] << 32));
                buf.extend_from_slice(bytemuck::cast_slice(scratch));
                if let Some(&v) = j.values.chunks_exact(2).remainder().first() {
                    buf.extend_from_slice(&(v as u32).to_le_bytes());
                }
            } else {
                buf.extend_from_slice(bytemuck::cast_slice(&j.values));
            }
        }
        pad(buf, layout.bytes);
        let crc = crc32fast::hash(buf);
        self.index.extend_from_slice(&crc.to_le_bytes());
        self.index.extend_from_slice(&[0; 4]);
        for sec in &layout.features {
            self.index.extend_from_slice(&sec.entry().to_le_bytes());
        }
        let bytes = std::mem::take(&mut self.buf);
        self.write(&bytes)?;
        self.buf = bytes;
        self.at += layout.bytes;
        self.header.samples += n as u64;
        Ok(())
    }

    /// Writes the last block, the index and the header, syncs, and renames the file into
    /// place. Returns the header written.
    pub fn finish(mut self) -> Result<Header> {
        let done = self.complete();
        if done.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        done
    }

    fn complete(&mut self) -> Result<Header> {
        self.flush_block()?;
        self.header.index_offset = self.at;
        self.header.index_crc = crc32fast::hash(&self.index);
        self.header.file_bytes = self.at + self.index.len() as u64;
        let index = std::mem::take(&mut self.index);
        self.write(&index)?;
        let io = |e| Error::io(&self.tmp, e);
        let mut file = self.file.take().expect("open until finish").into_inner().map_err(|e| io(e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(&self.header.encode()).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &self.dest).map_err(io)?;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            // The rename is durable once the folder is synced.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(self.header.clone())
    }
}

impl Drop for BinaryWriter {
    fn drop(&mut self) {
        // Not finished (an error or a panic): leave nothing half-written behind.
        if self.file.is_some() {
            self.file = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}
