//! The per-volume slot file: 4 KiB slots addressed by slot number, sparse on disk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::super::record::BLOCK_SIZE;

pub struct SlotFile {
    file: File,
}

impl SlotFile {
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(Self { file })
    }

    /// Writes consecutive slots starting at `slot`.
    pub fn write(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, slot * BLOCK_SIZE)
    }

    /// Reads consecutive slots starting at `slot`. Bytes past the end of the file read as
    /// zeroes (a truncated file then fails its checksums instead of panicking).
    pub fn read(&self, slot: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], slot * BLOCK_SIZE + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Deallocates `count` slots starting at `slot` (the file keeps its size).
    pub fn punch(&self, slot: u64, count: u64) -> io::Result<()> {
        let (off, len) = ((slot * BLOCK_SIZE) as libc::off_t, (count * BLOCK_SIZE) as libc::off_t);
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `self.file`
        // and open for writing for the duration of the call.
        let rc = unsafe {
            libc::fallocate(self.file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, len)
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Bytes the file occupies on disk.
    pub fn disk_usage(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

/// Calls `f(first, count)` for each run of consecutive numbers in `slots` (in order given).
pub fn runs(slots: &[u64], mut f: impl FnMut(usize, u64, u64) -> io::Result<()>) -> io::Result<()> {
    let mut i = 0;
    while i < slots.len() {
        let mut j = i + 1;
        while j < slots.len() && slots[j] == slots[j - 1] + 1 {
            j += 1;
        }
        f(i, slots[i], (j - i) as u64)?;
        i = j;
    }
    Ok(())
}
