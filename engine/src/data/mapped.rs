//! The bytes of a preprocessed data file: a read-only memory map advised random access (so a
//! rank's reads bring in only the pages it touches), or the same bytes held in memory, which is
//! how tests and fuzz targets hand a reader a hostile file without writing it.
use crate::{Error, Result};
use memmap2::{Advice, Mmap};
use std::fs::File;
use std::path::Path;

/// A data file's bytes.
#[derive(Debug)]
pub enum FileBytes {
    Map(Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps `path` read-only and advises random access before the first read (no read-around
    /// beyond the pages touched).
    pub fn map(path: &Path) -> Result<FileBytes> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: data files are written under another name and renamed when complete, and
        // nothing rewrites them while a run reads them; a concurrent truncation by another
        // program is outside the contract.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        map.advise(Advice::Random).map_err(|e| Error::io(path, e))?;
        Ok(FileBytes::Map(map))
    }

    /// Bytes `[at, at + len)`, first asking the kernel to read a large range in ahead of the
    /// copy (a best-effort hint: a failed one only costs speed). The caller checked the range.
    #[inline]
    pub fn range(&self, at: usize, len: usize) -> &[u8] {
        if let FileBytes::Map(m) = self {
            if len >= 1 << 14 {
                let page = at & !4095;
                let _ = m.advise_range(Advice::WillNeed, page, at + len - page);
            }
        }
        &self[at..at + len]
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Map(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}
