//! `Pages`: the content of one file as sparse 4 KiB pages, copy-on-write.
//!
//! Cloning a `Pages` copies only the map of `Arc`s, so taking the durable snapshot at an
//! fsync is cheap; a later write copies just the pages it touches (`Arc::make_mut`).
//! Invariant: no page lies wholly at or beyond `size` (truncation drops them and zeroes the
//! tail of the last partial page), so growing the file again reads zeroes.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Page size of the model (also the `st_blksize` reported).
pub const PAGE: u64 = 4096;

type Page = Arc<[u8; PAGE as usize]>;

/// Sparse file content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pages {
    size: u64,
    pages: BTreeMap<u64, Page>,
}

impl Pages {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of allocated pages (what `st_blocks` reports).
    pub fn allocated(&self) -> u64 {
        self.pages.len() as u64 * PAGE
    }

    /// Reads up to `len` bytes at `off` (short at the end of the file; holes read as zeroes).
    pub fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let end = off.saturating_add(len).min(self.size);
        if off >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - off) as usize];
        for (&idx, page) in self.pages.range(off / PAGE..end.div_ceil(PAGE)) {
            let pstart = idx * PAGE;
            let from = off.max(pstart);
            let to = end.min(pstart + PAGE);
            out[(from - off) as usize..(to - off) as usize]
                .copy_from_slice(&page[(from - pstart) as usize..(to - pstart) as usize]);
        }
        out
    }

    /// Writes `data` at `off`, growing the file if it ends past the size.
    pub fn write(&mut self, off: u64, data: &[u8]) {
        let end = off + data.len() as u64;
        let mut pos = off;
        while pos < end {
            let idx = pos / PAGE;
            let pstart = idx * PAGE;
            let to = end.min(pstart + PAGE);
            let page = self.pages.entry(idx).or_insert_with(|| Arc::new([0u8; PAGE as usize]));
            Arc::make_mut(page)[(pos - pstart) as usize..(to - pstart) as usize]
                .copy_from_slice(&data[(pos - off) as usize..(to - off) as usize]);
            pos = to;
        }
        self.size = self.size.max(end);
    }

    /// Sets the size: shrinking drops the content past it, growing adds a hole.
    pub fn set_size(&mut self, size: u64) {
        if size < self.size {
            self.zero(size, self.size - size);
        }
        self.size = size;
    }

    /// Zeroes `[off, off+len)` inside the file, deallocating whole pages (punch hole).
    pub fn zero(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len).min(self.size.max(off));
        let mut pos = off;
        while pos < end {
            let idx = pos / PAGE;
            let pstart = idx * PAGE;
            let to = end.min(pstart + PAGE);
            if pos == pstart && to == pstart + PAGE {
                self.pages.remove(&idx);
            } else if let Some(page) = self.pages.get_mut(&idx) {
                Arc::make_mut(page)[(pos - pstart) as usize..(to - pstart) as usize].fill(0);
            }
            pos = to;
        }
        // A page left all zero after a partial zeroing stays allocated, like a real file system.
    }

    /// The first offset at or after `off` that is data (`want_data`) or a hole, as
    /// `lseek(SEEK_DATA / SEEK_HOLE)` answers it; `None` = ENXIO.
    pub fn seek(&self, off: u64, want_data: bool) -> Option<u64> {
        if off >= self.size {
            return None;
        }
        let mut idx = off / PAGE;
        loop {
            let pstart = idx * PAGE;
            if pstart >= self.size {
                // The implicit hole at the end of the file.
                return if want_data { None } else { Some(self.size.max(off)) };
            }
            if self.pages.contains_key(&idx) == want_data {
                return Some(pstart.max(off));
            }
            idx += 1;
            if want_data {
                // Jump over the hole to the next allocated page.
                match self.pages.range(idx..).next() {
                    Some((&next, _)) => idx = next,
                    None => return None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_read_truncate_punch() {
        let mut p = Pages::default();
        p.write(4090, b"0123456789");
        assert_eq!(p.size(), 4100);
        assert_eq!(p.read(4088, 100), b"\x00\x000123456789");
        assert_eq!(p.allocated(), 2 * PAGE);
        let snap = p.clone();
        p.set_size(4092);
        assert_eq!(p.read(4090, 10), b"01");
        p.set_size(4100);
        assert_eq!(p.read(4090, 10), b"01\0\0\0\0\0\0\0\0", "regrown tail reads zeroes");
        assert_eq!(snap.read(4090, 10), b"0123456789", "a clone is not changed by later writes");
        p.write(0, &[7u8; 8192]);
        p.zero(0, 4096);
        assert_eq!(p.allocated(), PAGE, "a whole punched page is deallocated");
        assert_eq!(p.read(0, 4), [0, 0, 0, 0]);
        assert_eq!(p.read(4096, 2), [7, 7]);
        assert_eq!(p.seek(0, true), Some(4096));
        assert_eq!(p.seek(0, false), Some(0));
        assert_eq!(p.seek(4096, false), Some(8192));
    }
}
