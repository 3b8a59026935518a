//! `PackWriter`: accumulates sealed blobs in memory until the pack is big enough.

use super::{seal_trailer, PackEntry, FOOTER_MAGIC, HEADER_LEN, MAGIC, VERSION};
use crate::chunk::ChunkId;
use crate::crypto::MasterKey;

/// A pack being built. Memory use is about the target pack size.
pub struct PackWriter {
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

/// A finished pack: its id (BLAKE3 of the bytes), bytes and entries.
pub struct FinishedPack {
    pub id: String,
    pub bytes: Vec<u8>,
    pub entries: Vec<PackEntry>,
}

impl Default for PackWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl PackWriter {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(1 << 20);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&VERSION.to_le_bytes());
        debug_assert_eq!(buf.len(), HEADER_LEN);
        PackWriter { buf, entries: Vec::new() }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// No blobs yet.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Appends a sealed blob.
    pub fn add(&mut self, id: ChunkId, blob: &[u8], raw_len: u32, flags: u8) {
        self.entries.push(PackEntry { id, offset: self.buf.len() as u32, length: blob.len() as u32, raw_len, flags });
        self.buf.extend_from_slice(blob);
    }

    /// Seals the trailer and names the pack.
    pub fn finish(mut self, key: &MasterKey) -> FinishedPack {
        let trailer = seal_trailer(key, &self.entries);
        self.buf.extend_from_slice(&trailer);
        self.buf.extend_from_slice(&(trailer.len() as u32).to_le_bytes());
        self.buf.extend_from_slice(FOOTER_MAGIC);
        FinishedPack { id: blake3::hash(&self.buf).to_hex().to_string(), bytes: self.buf, entries: self.entries }
    }
}
