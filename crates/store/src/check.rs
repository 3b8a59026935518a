//! Request validation shared by every store implementation.

use hlstore_core::error::{Error, Result};

use super::record::{ChunkData, Claim, ClaimMode, ResyncChunk, VolumeRecord, BLOCK_SIZE};

/// Longest accepted volume id.
const MAX_VOLUME_ID: usize = 128;
/// Highest epoch a replica accepts. Seqs carry the epoch in their high bits (`epoch << 40`
/// must fit, see `replication::types::SEQ_EPOCH_SHIFT`) and the next engine needs
/// `epoch + 1`; 8 million attaches is far beyond any volume's life.
pub const MAX_EPOCH: u64 = (1 << 23) - 1;
/// Highest seq a replica accepts: above every seq of `MAX_EPOCH`, with room for `seq + 1`.
pub const MAX_SEQ: u64 = 1 << 63;
/// Largest volume: 1 EiB (sizes and offsets then never overflow in block arithmetic).
pub const MAX_VOLUME_SIZE: u64 = 1 << 60;
/// Largest single read (the reply is built in memory).
pub const MAX_READ: u64 = 64 << 20;

/// Most labels one `set_labels` call may set.
pub const MAX_LABELS: usize = 64;
/// Longest label key or value, in bytes.
pub const MAX_LABEL_LEN: usize = 256;

/// Checks labels a caller wants to set on a volume record.
pub(crate) fn labels(volume: &str, labels: &std::collections::BTreeMap<String, String>) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::InvalidArgument(format!(
            "volume {volume}: {} labels at once, more than the maximum {MAX_LABELS}",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_LABEL_LEN || v.len() > MAX_LABEL_LEN {
            return Err(Error::InvalidArgument(format!(
                "volume {volume}: label {k:?} must have a key of 1-{MAX_LABEL_LEN} bytes and a value of at most {MAX_LABEL_LEN}"
            )));
        }
    }
    Ok(())
}

/// Applies a `set_labels` change: each entry set, or removed when its value is empty.
pub(crate) fn apply_labels(
    to: &mut std::collections::BTreeMap<String, String>,
    change: std::collections::BTreeMap<String, String>,
) {
    for (k, v) in change {
        if v.is_empty() {
            to.remove(&k);
        } else {
            to.insert(k, v);
        }
    }
}

/// Checks an epoch a caller wants to raise a replica to.
pub(crate) fn new_epoch(volume: &str, epoch: u64) -> Result<()> {
    if epoch > MAX_EPOCH {
        return Err(Error::InvalidArgument(format!("volume {volume}: epoch {epoch} is above the maximum {MAX_EPOCH}")));
    }
    Ok(())
}

/// Checks a seq carried by a write, trim, resync chunk or snapshot.
pub(crate) fn seq(volume: &str, seq: u64) -> Result<()> {
    if seq > MAX_SEQ {
        return Err(Error::InvalidArgument(format!("volume {volume}: seq {seq} is above the maximum {MAX_SEQ}")));
    }
    Ok(())
}

/// Checks the length of a read.
pub(crate) fn read_len(volume: &str, len: u64) -> Result<()> {
    if len > MAX_READ {
        return Err(Error::InvalidArgument(format!(
            "volume {volume}: read of {len} bytes is above the maximum {MAX_READ}; split it"
        )));
    }
    Ok(())
}

/// Checks that `[offset, offset + len)` is block-aligned and inside a volume of `size`.
pub(crate) fn range(volume: &str, size: u64, offset: u64, len: u64) -> Result<()> {
    if !offset.is_multiple_of(BLOCK_SIZE) || !len.is_multiple_of(BLOCK_SIZE) {
        return Err(Error::InvalidArgument(format!(
            "volume {volume}: offset {offset} and length {len} must be multiples of {BLOCK_SIZE}"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { volume: volume.to_string(), offset, length: len, size }),
    }
}

/// Checks the caller's epoch against the stored one (see `ReplicaStore` for the rules).
/// A resync chunk: in range, a valid seq, one whole block of data (or a zero block, or a
/// trimmed range). Returns the bytes it covers.
pub(crate) fn resync_chunk(volume: &str, size: u64, c: &ResyncChunk) -> Result<u64> {
    let len = match &c.data {
        ChunkData::Data(d) => d.len() as u64,
        ChunkData::Zero => BLOCK_SIZE,
        ChunkData::Trim(len) => *len,
    };
    range(volume, size, c.offset, len)?;
    seq(volume, c.seq)?;
    if matches!(&c.data, ChunkData::Data(d) if d.len() as u64 != BLOCK_SIZE) {
        return Err(Error::InvalidArgument(format!("resync chunk at {} is not one block", c.offset)));
    }
    Ok(len)
}

pub(crate) fn epoch(volume: &str, stored: u64, got: u64) -> Result<()> {
    if got < stored {
        return Err(Error::StaleEpoch { volume: volume.to_string(), got, current: stored });
    }
    if got > stored {
        return Err(Error::InvalidArgument(format!(
            "volume {volume}: epoch {got} is newer than the replica's epoch {stored}; open the replica with it first"
        )));
    }
    Ok(())
}

/// Applies the [`Claim`] rules to a replica holding `(stored_epoch, stored_owner)`.
/// Returns the new `(epoch, owner)`, or `None` when nothing changes.
pub(crate) fn claim(volume: &str, stored_epoch: u64, stored_owner: u64, c: &Claim) -> Result<Option<(u64, u64)>> {
    let same = c.epoch == stored_epoch && c.owner == stored_owner;
    match c.mode {
        ClaimMode::Release => Ok((same && c.owner != 0).then_some((stored_epoch, 0))),
        _ if c.epoch < stored_epoch => {
            Err(Error::StaleEpoch { volume: volume.to_string(), got: c.epoch, current: stored_epoch })
        }
        _ if same => Ok(None),
        ClaimMode::Join => Ok(Some((c.epoch, c.owner))),
        ClaimMode::Cas { expect } if stored_epoch == expect && c.epoch > expect => Ok(Some((c.epoch, c.owner))),
        ClaimMode::Cas { expect } => Err(Error::Conflict(format!(
            "volume {volume}: the replica is at epoch {stored_epoch} held by engine {stored_owner:#x}, not at epoch {expect} as the attach of engine {:#x} at epoch {} expected; another engine attached it meanwhile",
            c.owner, c.epoch
        ))),
    }
}

/// Checks a snapshot name: the same rules as a volume id.
pub(crate) fn snapshot_name(volume: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VOLUME_ID
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "volume {volume}: snapshot name {name:?} must be 1-{MAX_VOLUME_ID} characters of [A-Za-z0-9._-], not starting with '.'"
        )));
    }
    Ok(())
}

/// Checks a new volume record.
pub(crate) fn record(rec: &VolumeRecord) -> Result<()> {
    let id = &rec.volume_id;
    let id_ok = !id.is_empty()
        && id.len() <= MAX_VOLUME_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.starts_with('.');
    if !id_ok {
        return Err(Error::InvalidArgument(format!(
            "volume id {id:?} must be 1-{MAX_VOLUME_ID} characters of [A-Za-z0-9._-], not starting with '.'"
        )));
    }
    if u64::from(rec.block_size) != BLOCK_SIZE {
        return Err(Error::InvalidArgument(format!(
            "volume {id}: block size {} is not supported (only {BLOCK_SIZE})",
            rec.block_size
        )));
    }
    if rec.size == 0 || !rec.size.is_multiple_of(BLOCK_SIZE) || rec.size > MAX_VOLUME_SIZE {
        return Err(Error::InvalidArgument(format!(
            "volume {id}: size {} must be a positive multiple of {BLOCK_SIZE}, at most {MAX_VOLUME_SIZE}",
            rec.size
        )));
    }
    new_epoch(id, rec.epoch)
}

/// Checks a new size for `expand`.
pub(crate) fn new_size(volume: &str, old: u64, new: u64) -> Result<()> {
    if !new.is_multiple_of(BLOCK_SIZE) || new < old || new > MAX_VOLUME_SIZE {
        return Err(Error::InvalidArgument(format!(
            "volume {volume}: new size {new} must be a multiple of {BLOCK_SIZE}, at least the current size {old} (shrinking is not supported) and at most {MAX_VOLUME_SIZE}"
        )));
    }
    Ok(())
}

/// crc32 of one block.
pub(crate) fn crc(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}
