//! The per-volume slot file: 4 KiB slots addressed by slot number, sparse on disk.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

use super::super::record::BLOCK_SIZE;

pub struct SlotFile {
    file: File,
    /// Power-loss simulation (tests): the slots written since the last fdatasync.
    unsynced: Option<Mutex<BTreeSet<u64>>>,
}

impl SlotFile {
    /// Opens the file; with `track_unsynced`, it remembers which slots no fdatasync covered
    /// yet, so [`lose_unsynced`](Self::lose_unsynced) can simulate a power cut.
    pub fn open(path: &Path, track_unsynced: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Ok(Self { file, unsynced: track_unsynced.then(Default::default) })
    }

    /// Writes consecutive slots starting at `slot`.
    pub fn write(&self, slot: u64, data: &[u8]) -> io::Result<()> {
        if let Some(u) = &self.unsynced {
            let n = data.len() as u64 / BLOCK_SIZE;
            u.lock().unwrap_or_else(|p| p.into_inner()).extend(slot..slot + n);
        }
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

    /// Reads consecutive slots starting at `slot` only if the page cache holds them
    /// (`preadv2` with `RWF_NOWAIT`): `Ok(false)` where the read would wait for the disk
    /// (the caller then reads on a thread that may block). Bytes past the end of the file
    /// read as zeroes, as in [`read`](Self::read).
    pub fn read_cached(&self, slot: u64, buf: &mut [u8]) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let iov = libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() };
            let at = (slot * BLOCK_SIZE + done as u64) as libc::off_t;
            // SAFETY: the iovec points into `buf`, valid and exclusively borrowed for the
            // call; the fd is owned by `self.file`.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, at, libc::RWF_NOWAIT) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // Not cached, or a kernel/filesystem without RWF_NOWAIT: read blocking.
                    Some(libc::EAGAIN) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => return Ok(false),
                    _ => return Err(e),
                }
            }
            if n == 0 {
                rest.fill(0);
                return Ok(true);
            }
            done += n as usize;
        }
        Ok(true)
    }

    /// Starts writing the file's dirty pages out, waiting neither for them nor for the
    /// disk's cache: a later fdatasync has less left to wait for. Durability is unchanged
    /// (nothing is promised until that fdatasync).
    pub fn start_writeback(&self) -> io::Result<()> {
        // SAFETY: a plain syscall on a file descriptor this struct owns.
        let r = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    pub fn sync(&self) -> io::Result<()> {
        // Slots written while the sync runs may or may not be covered: keep them unsynced.
        let covered = self.unsynced.as_ref().map(|u| std::mem::take(&mut *u.lock().unwrap_or_else(|p| p.into_inner())));
        let res = self.file.sync_data();
        if let (Err(_), Some(covered), Some(u)) = (&res, covered, &self.unsynced) {
            u.lock().unwrap_or_else(|p| p.into_inner()).extend(covered);
        }
        res
    }

    /// Power-loss simulation: every slot written since the last fdatasync loses its data
    /// (it is punched, so it reads as zeroes). Returns how many slots were lost; 0 if the
    /// file was not opened with tracking.
    pub fn lose_unsynced(&self) -> io::Result<u64> {
        let Some(u) = &self.unsynced else { return Ok(0) };
        let slots: Vec<u64> = std::mem::take(&mut *u.lock().unwrap_or_else(|p| p.into_inner())).into_iter().collect();
        runs(&slots, |_, slot, count| self.punch(slot, count))?;
        Ok(slots.len() as u64)
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
