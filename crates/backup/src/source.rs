//! Backup sources: something that can be read by range, with an optional hint of which
//! ranges changed since the parent backup (a volume's changed-block record plugs in here).

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A readable source of bytes.
pub trait Source: Send + Sync {
    /// Name recorded in the snapshot (path, volume name).
    fn name(&self) -> String;
    /// Total size in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset` (never past `size`).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Ranges that may differ from the parent backup, or `None` if unknown (read all).
    fn changed_ranges(&self) -> Option<Vec<Range<u64>>> {
        None
    }
    /// True for sources that can report changed blocks (volumes): they are cut into fixed
    /// chunks whose boundaries never move, so an incremental backup reads only what
    /// changed. Other sources are cut by content (`RepoConfig::chunker_for`).
    fn changed_block_tracking(&self) -> bool {
        false
    }
    /// Reads worth running at once (a network source hides its latency with several;
    /// fixed-size chunking only, a CDC reader is sequential).
    fn parallel_reads(&self) -> usize {
        1
    }
}

/// A regular file or block device.
pub struct FileSource {
    path: PathBuf,
    file: std::fs::File,
    size: u64,
}

impl FileSource {
    pub fn open(path: &Path) -> Result<Self> {
        let ctx = || format!("open source {}", path.display());
        let file = std::fs::File::open(path).map_err(|e| Error::io(ctx(), e))?;
        let meta = file.metadata().map_err(|e| Error::io(ctx(), e))?;
        let size = if meta.is_file() {
            meta.len()
        } else {
            // Block devices report length 0 in metadata; seek to the end instead.
            use std::io::{Seek, SeekFrom};
            let mut f = &file;
            f.seek(SeekFrom::End(0)).map_err(|e| Error::io(ctx(), e))?
        };
        if meta.is_dir() {
            return Err(Error::Invalid(format!("{} is a directory; back up a file or block device", path.display())));
        }
        Ok(FileSource { path: path.to_path_buf(), file, size })
    }
}

impl Source for FileSource {
    fn name(&self) -> String {
        std::fs::canonicalize(&self.path).unwrap_or_else(|_| self.path.clone()).display().to_string()
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("read {} at {offset}", self.path.display()), e))
    }
}
