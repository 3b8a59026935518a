//! Byte-granular operations on a block device: unaligned requests become aligned ones.
//!
//! Invariants:
//! - The device only sees offsets and lengths aligned to its block size (its contract).
//! - Every mutating operation holds the export's [`RangeLock`](super::range_lock::RangeLock)
//!   on the block-aligned range it touches for its whole duration, so a read-modify-write
//!   never races another write to the same blocks, from any connection.
//! - Only the partial head and tail blocks are read for a read-modify-write.
//! - FUA on TRIM/WRITE_ZEROES is a device flush after the operation (the device API has FUA
//!   only on writes).

use super::registry::Export;
use hlstore_core::device::BlockDevice;
use hlstore_core::error::{Error, Result};

/// Block-aligned cover of `[offset, offset + len)`.
fn cover(offset: u64, len: u64, bs: u64) -> (u64, u64) {
    let start = offset - offset % bs;
    let end = (offset + len).div_ceil(bs) * bs;
    (start, end)
}

fn check_cover<D: BlockDevice>(device: &D, end: u64) -> Result<()> {
    if end > device.size() {
        return Err(Error::Internal(format!(
            "volume {}: size {} is not a multiple of block size {}",
            device.name(),
            device.size(),
            device.block_size()
        )));
    }
    Ok(())
}

/// Reads `len` bytes at `offset` (need not be aligned; must be inside the device).
pub async fn read<D: BlockDevice>(export: &Export<D>, offset: u64, len: u32) -> Result<Vec<u8>> {
    let device = export.device.as_ref();
    if len == 0 {
        return Ok(Vec::new());
    }
    let bs = u64::from(device.block_size());
    let (start, end) = cover(offset, u64::from(len), bs);
    check_cover(device, end)?;
    let mut data = device.read(start, end - start).await?;
    if start == offset && end - start == u64::from(len) {
        return Ok(data);
    }
    let skip = (offset - start) as usize;
    data.drain(..skip);
    data.truncate(len as usize);
    Ok(data)
}

/// Outcome of a write: whether it needed a read-modify-write (for the counters).
pub type Rmw = bool;

/// Writes `data` at `offset` (need not be aligned; must be inside the device).
pub async fn write<D: BlockDevice>(export: &Export<D>, offset: u64, data: Vec<u8>, fua: bool) -> Result<Rmw> {
    let device = export.device.as_ref();
    if data.is_empty() {
        if fua {
            device.flush().await?;
        }
        return Ok(false);
    }
    let bs = u64::from(device.block_size());
    let len = data.len() as u64;
    let (start, end) = cover(offset, len, bs);
    check_cover(device, end)?;
    let _guard = export.locks.lock(start, end).await;
    if start == offset && end == offset + len {
        device.write(offset, data, fua).await?;
        return Ok(false);
    }
    let mut buf = vec![0u8; (end - start) as usize];
    let head_partial = offset != start;
    let tail_partial = offset + len != end;
    if head_partial {
        let head = device.read(start, bs).await?;
        buf[..bs as usize].copy_from_slice(&head);
    }
    if tail_partial && !(head_partial && end - start == bs) {
        let tail = device.read(end - bs, bs).await?;
        let at = (end - bs - start) as usize;
        buf[at..].copy_from_slice(&tail);
    }
    let at = (offset - start) as usize;
    buf[at..at + data.len()].copy_from_slice(&data);
    device.write(start, buf, fua).await?;
    Ok(true)
}

/// Discards the blocks fully inside `[offset, offset + len)`; partial blocks at the edges
/// are left as they are (TRIM is advisory).
pub async fn trim<D: BlockDevice>(export: &Export<D>, offset: u64, len: u32, fua: bool) -> Result<()> {
    let device = export.device.as_ref();
    let bs = u64::from(device.block_size());
    let start = offset.div_ceil(bs) * bs;
    let end = (offset + u64::from(len)) / bs * bs;
    if start < end {
        let _guard = export.locks.lock(start, end).await;
        device.trim(start, end - start).await?;
    }
    if fua {
        device.flush().await?;
    }
    Ok(())
}

/// Zeroes `[offset, offset + len)`: whole blocks through the device's `write_zeroes`
/// (deallocating them if `may_trim`), partial edge blocks by read-modify-write.
pub async fn write_zeroes<D: BlockDevice>(
    export: &Export<D>,
    offset: u64,
    len: u32,
    may_trim: bool,
    fua: bool,
) -> Result<Rmw> {
    let device = export.device.as_ref();
    let mut rmw = false;
    if len > 0 {
        let bs = u64::from(device.block_size());
        let req_end = offset + u64::from(len);
        let (start, end) = cover(offset, u64::from(len), bs);
        check_cover(device, end)?;
        let _guard = export.locks.lock(start, end).await;
        let inner_start = offset.div_ceil(bs) * bs;
        let inner_end = req_end / bs * bs;
        if inner_start < inner_end {
            device.write_zeroes(inner_start, inner_end - inner_start, may_trim).await?;
        }
        // Partially covered blocks: at most the first and the last block of the cover.
        let mut edges = Vec::with_capacity(2);
        for block in [start, end - bs] {
            let inside = offset <= block && block + bs <= req_end;
            if !inside && !edges.contains(&block) {
                edges.push(block);
            }
        }
        for block in edges {
            let mut data = device.read(block, bs).await?;
            let from = offset.max(block) - block;
            let to = req_end.min(block + bs) - block;
            data[from as usize..to as usize].fill(0);
            device.write(block, data, false).await?;
            rmw = true;
        }
    }
    if fua {
        device.flush().await?;
    }
    Ok(rmw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ExportRegistry, MemDevice};
    use std::sync::Arc;

    fn export(size: u64) -> (Arc<MemDevice>, Arc<Export<MemDevice>>) {
        let dev = Arc::new(MemDevice::new("t", size).unwrap());
        let reg = ExportRegistry::new();
        reg.insert("t", dev.clone());
        (dev, reg.get("t").unwrap())
    }

    #[tokio::test]
    async fn unaligned_write_and_read_match_a_byte_model() {
        let size = 8 * 4096u64;
        let (dev, ex) = export(size);
        let mut model = vec![0u8; size as usize];
        let cases: &[(u64, usize, u8)] =
            &[(1000, 3000, 1), (4000, 200, 2), (0, 4096, 3), (4095, 4098, 4), (8192, 1, 5), (size - 1, 1, 6)];
        for &(off, len, val) in cases {
            write(&ex, off, vec![val; len], false).await.unwrap();
            model[off as usize..off as usize + len].fill(val);
            assert_eq!(dev.read_bytes(0, size as usize), model, "after write at {off}+{len}");
        }
        for &(off, len) in &[(0u64, 1u32), (1000, 3000), (4095, 2), (size - 3, 3)] {
            let got = read(&ex, off, len).await.unwrap();
            assert_eq!(got, model[off as usize..off as usize + len as usize]);
        }
    }

    #[tokio::test]
    async fn zeroes_and_trim_edges() {
        let size = 8 * 4096u64;
        let (dev, ex) = export(size);
        write(&ex, 0, vec![9u8; size as usize], false).await.unwrap();
        let mut model = vec![9u8; size as usize];
        let cases: &[(u64, u32)] = &[(100, 50), (4000, 200), (4096, 4096), (10000, 10000), (size - 10, 10)];
        for &(off, len) in cases {
            write_zeroes(&ex, off, len, true, false).await.unwrap();
            model[off as usize..(off + u64::from(len)) as usize].fill(0);
            assert_eq!(dev.read_bytes(0, size as usize), model, "after zero at {off}+{len}");
        }
        // Blocks 1 (4096..8192) was zeroed whole with may_trim: deallocated.
        assert!(dev.allocated_blocks() < 8);
        let before = dev.allocated_blocks();
        write_zeroes(&ex, 0, size as u32, false, false).await.unwrap();
        assert_eq!(dev.allocated_blocks(), 8, "NO_HOLE allocates");
        assert!(before < 8);
        trim(&ex, 100, 3 * 4096, false).await.unwrap();
        assert_eq!(dev.allocated_blocks(), 6, "only the two fully covered blocks are trimmed");
    }
}
