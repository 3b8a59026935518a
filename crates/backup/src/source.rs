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
    /// Ranges that may hold data, sorted and disjoint (a sparse file's allocated extents),
    /// or `None` if unknown. A full backup reads only these; the rest is zeros.
    fn data_ranges(&self) -> Option<Vec<Range<u64>>> {
        None
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
    regular: bool,
}

/// Holes shorter than this are read like data (a few zero bytes cost less than cutting a
/// chunk short at each edge).
pub const HOLE_SKIP_MIN: u64 = 1 << 20;

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
        Ok(FileSource { path: path.to_path_buf(), file, size, regular: meta.is_file() })
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

    fn data_ranges(&self) -> Option<Vec<Range<u64>>> {
        if !self.regular {
            return None;
        }
        allocated_extents(&self.file, self.size).map(|e| merge_close(e, HOLE_SKIP_MIN))
    }
}

/// The data extents of a regular file (`SEEK_DATA` / `SEEK_HOLE`), or `None` where the
/// filesystem cannot tell.
fn allocated_extents(file: &std::fs::File, size: u64) -> Option<Vec<Range<u64>>> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a descriptor this function borrows; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            return match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ENXIO) => Some(out), // only a hole after `pos`
                _ => None,
            };
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return None;
        }
        let (start, end) = (data as u64, (hole as u64).min(size));
        if start >= end {
            break;
        }
        out.push(start..end);
        pos = end;
    }
    Some(out)
}

/// Joins ranges separated by less than `gap`.
fn merge_close(ranges: Vec<Range<u64>>, gap: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match out.last_mut() {
            Some(l) if r.start.saturating_sub(l.end) < gap => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_sparse_file_reports_its_data_and_small_holes_are_joined() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = std::fs::File::create(&path).unwrap();
        let mib = 1u64 << 20;
        f.set_len(64 * mib).unwrap();
        for at in [0, 4 * mib, 4 * mib + 512 * 1024 + 4096, 40 * mib] {
            f.write_all_at(&[7u8; 4096], at).unwrap();
        }
        (&f).flush().unwrap();
        let src = FileSource::open(&path).unwrap();
        let Some(data) = src.data_ranges() else { return }; // a filesystem without SEEK_DATA
                                                            // Allocation is in filesystem blocks: compare whole MiB.
        let mibs: Vec<(u64, u64)> = data.iter().map(|r| (r.start / mib, r.end.div_ceil(mib))).collect();
        assert_eq!(mibs, [(0, 1), (4, 5), (40, 41)], "{data:?}");
        assert_eq!(merge_close(vec![0..10, 15..20, 200..300], 10), [0..20, 200..300]);
    }
}
