//! `PackEntry`: where one chunk lives inside a pack, and its fixed-width binary codec
//! (shared by pack trailers and index files).

use crate::chunk::ChunkId;

/// Blob payload is zstd-compressed.
pub const FLAG_COMPRESSED: u8 = 1;
/// Encoded size of one entry: id 32, offset 4, length 4, raw length 4, flags 1.
pub const ENTRY_LEN: usize = 45;

/// One chunk in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackEntry {
    pub id: ChunkId,
    /// Byte offset of the blob in the pack.
    pub offset: u32,
    /// Stored (sealed) length of the blob.
    pub length: u32,
    /// Plaintext length of the chunk.
    pub raw_len: u32,
    pub flags: u8,
}

impl PackEntry {
    /// One past the blob's last byte.
    pub fn end(&self) -> u64 {
        self.offset as u64 + self.length as u64
    }
}

/// `u32 count | entry*`.
pub fn encode_entries(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.length.to_le_bytes());
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.push(e.flags);
    }
    out
}

/// Inverse of [`encode_entries`]; `None` on any length mismatch or unknown flag.
pub fn decode_entries(b: &[u8]) -> Option<Vec<PackEntry>> {
    let (n, rest) = decode_entries_prefix(b)?;
    rest.is_empty().then_some(n)
}

/// Decodes a counted entry list at the start of `b`, returning the rest.
pub fn decode_entries_prefix(b: &[u8]) -> Option<(Vec<PackEntry>, &[u8])> {
    let count = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let body = b.get(4..4 + count.checked_mul(ENTRY_LEN)?)?;
    let mut out = Vec::with_capacity(count);
    for r in body.chunks_exact(ENTRY_LEN) {
        let u = |i: usize| u32::from_le_bytes([r[i], r[i + 1], r[i + 2], r[i + 3]]);
        let flags = r[44];
        if flags & !FLAG_COMPRESSED != 0 {
            return None;
        }
        out.push(PackEntry { id: ChunkId::from_slice(&r[..32])?, offset: u(32), length: u(36), raw_len: u(40), flags });
    }
    Some((out, &b[4 + count * ENTRY_LEN..]))
}
