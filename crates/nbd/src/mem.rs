//! `MemDevice`: an in-memory [`BlockDevice`] for frontend tests and demos.
//!
//! Blocks live in a map from block index to data; a block absent from the map reads as
//! zeroes and is "unallocated", so trims and hole-punching zero writes are observable through
//! [`MemDevice::allocated_blocks`]. It checks the `BlockDevice` contract (alignment, range)
//! and returns `InvalidArgument`/`OutOfRange` when a frontend breaks it. It has no cache, so
//! it is safe for multi-connection use; flushes and FUA writes are only counted. Every
//! operation yields to the scheduler once before it runs, like a real device awaiting IO, so
//! concurrent requests interleave in tests the way they would on a volume.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hlstore_core::device::BlockDevice;
use hlstore_core::error::{Error, ErrorKind, Result};

/// An in-memory, thin-provisioned block device.
#[derive(Debug)]
pub struct MemDevice {
    name: String,
    size: u64,
    block_size: u32,
    multi_conn: bool,
    /// Time every operation takes (zero: it only yields once).
    delay: std::time::Duration,
    blocks: Mutex<HashMap<u64, Box<[u8]>>>,
    flushes: AtomicU64,
    fua_writes: AtomicU64,
    /// Injected failure: any data operation touching this byte offset fails with this kind.
    fail_at: Mutex<Option<(u64, ErrorKind)>>,
}

impl MemDevice {
    /// A device of `size` bytes (a multiple of 4096) with 4096-byte blocks.
    pub fn new(name: impl Into<String>, size: u64) -> Result<Self> {
        Self::with_block_size(name, size, 4096)
    }

    /// A device with another block size (a power of two).
    pub fn with_block_size(name: impl Into<String>, size: u64, block_size: u32) -> Result<Self> {
        let name = name.into();
        if !block_size.is_power_of_two() || !size.is_multiple_of(u64::from(block_size)) {
            return Err(Error::InvalidArgument(format!(
                "memory device {name}: size {size} is not a multiple of block size {block_size} (a power of two)"
            )));
        }
        Ok(MemDevice {
            name,
            size,
            block_size,
            multi_conn: true,
            delay: std::time::Duration::ZERO,
            blocks: Mutex::new(HashMap::new()),
            flushes: AtomicU64::new(0),
            fua_writes: AtomicU64::new(0),
            fail_at: Mutex::new(None),
        })
    }

    /// Sets what [`BlockDevice::multi_conn`] reports.
    pub fn with_multi_conn(mut self, multi_conn: bool) -> Self {
        self.multi_conn = multi_conn;
        self
    }

    /// Makes every operation take `delay` (to hold requests in flight in tests).
    pub fn with_delay(mut self, delay: std::time::Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.lock_blocks().len()
    }

    /// Number of `flush` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Number of `write`/`trim`/`write_zeroes` calls with FUA so far.
    pub fn fua_count(&self) -> u64 {
        self.fua_writes.load(Ordering::Relaxed)
    }

    /// Makes every data operation whose range contains `offset` fail with `kind`
    /// (`None` clears it).
    pub fn fail_at(&self, failure: Option<(u64, ErrorKind)>) {
        *self.fail_at.lock().unwrap_or_else(|e| e.into_inner()) = failure;
    }

    /// Reads any byte range (no alignment needed), for checking contents in tests.
    pub fn read_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let bs = u64::from(self.block_size);
        let blocks = self.lock_blocks();
        let mut out = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let in_block = (pos % bs) as usize;
            let n = (self.block_size as usize - in_block).min(len - done);
            if let Some(block) = blocks.get(&(pos / bs)) {
                out[done..done + n].copy_from_slice(&block[in_block..in_block + n]);
            }
            done += n;
        }
        out
    }

    fn lock_blocks(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Box<[u8]>>> {
        // A panic while holding the lock cannot leave a half-written map entry behind
        // (entries are replaced whole), so a poisoned lock is still consistent.
        self.blocks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks alignment, range and injected failures; returns the first block index and count.
    fn check(&self, offset: u64, len: u64) -> Result<(u64, u64)> {
        let bs = u64::from(self.block_size);
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(Error::InvalidArgument(format!(
                "volume {}: request offset={offset} length={len} is not aligned to {bs}",
                self.name
            )));
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(Error::OutOfRange { volume: self.name.clone(), offset, length: len, size: self.size });
        }
        if let Some((at, kind)) = *self.fail_at.lock().unwrap_or_else(|e| e.into_inner()) {
            if at >= offset && at < offset + len {
                return Err(injected(&self.name, kind, at));
            }
        }
        Ok((offset / bs, len / bs))
    }

    async fn pause(&self) {
        if self.delay.is_zero() {
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(self.delay).await;
        }
    }

    fn note_fua(&self, fua: bool) {
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn injected(volume: &str, kind: ErrorKind, offset: u64) -> Error {
    let what = format!("volume {volume}: injected failure at offset {offset}");
    match kind {
        ErrorKind::InvalidArgument => Error::InvalidArgument(what),
        ErrorKind::OutOfRange => Error::OutOfRange { volume: volume.into(), offset, length: 0, size: 0 },
        ErrorKind::NotFound => Error::NotFound(what),
        ErrorKind::AlreadyExists => Error::AlreadyExists(what),
        ErrorKind::StaleEpoch => Error::StaleEpoch { volume: volume.into(), got: 0, current: 1 },
        ErrorKind::Corruption => Error::Corruption { volume: volume.into(), offset, expected: 0, actual: 1 },
        ErrorKind::Unavailable => Error::Unavailable(what),
        ErrorKind::Io => Error::io(what, std::io::Error::other("injected")),
        ErrorKind::Internal => Error::Internal(what),
        ErrorKind::Unsupported => Error::Unsupported(what),
        ErrorKind::Conflict => Error::Conflict(what),
        ErrorKind::NoSpace => Error::NoSpace(what),
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn multi_conn(&self) -> bool {
        self.multi_conn
    }

    fn name(&self) -> &str {
        &self.name
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>> {
        self.pause().await;
        self.check(offset, len)?;
        let len = usize::try_from(len).map_err(|_| Error::InvalidArgument("read too large".into()))?;
        Ok(self.read_bytes(offset, len))
    }

    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<()> {
        self.pause().await;
        let (first, count) = self.check(offset, data.len() as u64)?;
        let bs = self.block_size as usize;
        let mut blocks = self.lock_blocks();
        for (i, chunk) in (first..first + count).zip(data.chunks_exact(bs)) {
            blocks.insert(i, chunk.into());
        }
        drop(blocks);
        self.note_fua(fua);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.pause().await;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.pause().await;
        let (first, count) = self.check(offset, len)?;
        let mut blocks = self.lock_blocks();
        for i in first..first + count {
            blocks.remove(&i);
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<()> {
        self.pause().await;
        let (first, count) = self.check(offset, len)?;
        let mut blocks = self.lock_blocks();
        for i in first..first + count {
            if may_trim {
                blocks.remove(&i);
            } else {
                blocks.insert(i, vec![0u8; self.block_size as usize].into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tracks_allocation_and_contents() {
        let dev = MemDevice::new("m", 16 * 4096).unwrap();
        dev.write(4096, vec![7u8; 8192], true).await.unwrap();
        assert_eq!(dev.allocated_blocks(), 2);
        assert_eq!(dev.fua_count(), 1);
        assert_eq!(dev.read(0, 4096 * 3).await.unwrap()[4095..4097], [0, 7]);
        dev.write_zeroes(4096, 4096, false).await.unwrap();
        assert_eq!(dev.allocated_blocks(), 2);
        assert_eq!(dev.read_bytes(4096, 2), vec![0, 0]);
        dev.trim(0, 16 * 4096).await.unwrap();
        assert_eq!(dev.allocated_blocks(), 0);
    }

    #[tokio::test]
    async fn enforces_the_contract() {
        let dev = MemDevice::new("m", 4096).unwrap();
        assert_eq!(dev.read(1, 4095).await.unwrap_err().kind(), ErrorKind::InvalidArgument);
        assert_eq!(dev.read(4096, 4096).await.unwrap_err().kind(), ErrorKind::OutOfRange);
        dev.fail_at(Some((10, ErrorKind::Corruption)));
        assert_eq!(dev.read(0, 4096).await.unwrap_err().kind(), ErrorKind::Corruption);
        assert!(MemDevice::new("m", 100).is_err());
    }
}
