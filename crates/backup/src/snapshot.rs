//! Snapshot manifests (`snapshots/<id>`): what was backed up (source, size, labels, time,
//! parent, chunker, statistics) and the chunk list that rebuilds it.
//!
//! Encoding: `"HLSN" u32 version u64 plain_len | sealed(zstd(u32 json_len | json |
//! record*))`. Version 1 records are `u64 offset | u32 len | id[32]` (44 bytes, whole
//! chunks); version 2 records are `u64 offset | u32 len | u32 skip | id[32]` (48 bytes):
//! bytes `skip..skip + len` of the chunk, so an incremental volume backup can keep the
//! unchanged part of a chunk without reading it. All-zero chunks have no record: a restore
//! leaves holes there.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkId, ChunkerConfig};
use crate::crypto::MasterKey;
use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"HLSN";
/// Newest snapshot version (records with `skip`); version 1 is still read and written
/// (into version 1 repositories).
pub const VERSION: u32 = 2;
const AAD: &[u8] = b"hlstore-snapshot-v1";
const RECORD_LEN_V1: usize = 44;
const RECORD_LEN_V2: usize = 48;

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// (seconds, nanoseconds) since the Unix epoch.
pub fn now_precise() -> (u64, u32) {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_secs(), d.subsec_nanos()))
        .unwrap_or((0, 0))
}

/// This machine's host name (for snapshot and lease metadata).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Counters of one backup run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct BackupStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Chunks in the snapshot (excluding zero chunks).
    pub chunks: u64,
    /// All-zero chunks (stored as holes).
    pub zero_chunks: u64,
    /// Chunks not in the repository before this backup.
    pub new_chunks: u64,
    /// Plaintext bytes of new chunks.
    pub new_bytes: u64,
    /// Bytes written to packs for new chunks (compressed + encrypted).
    pub stored_bytes: u64,
    /// Packs written.
    pub packs: u64,
    /// Bytes taken over from the parent without reading (changed-range hint).
    pub bytes_skipped: u64,
}

/// Snapshot metadata (the JSON part).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub id: String,
    /// Creation time, seconds since the epoch.
    pub time: u64,
    /// Sub-second part of the creation time (orders backups taken within one second).
    #[serde(default)]
    pub nanos: u32,
    pub source: String,
    pub size: u64,
    pub host: String,
    pub labels: BTreeMap<String, String>,
    pub parent: Option<String>,
    pub chunker: ChunkerConfig,
    pub stats: BackupStats,
}

/// One piece of the source: bytes `skip..skip + len` of chunk `id`, at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub offset: u64,
    pub len: u32,
    pub id: ChunkId,
    /// Start of the piece inside the chunk (0 for whole chunks).
    pub skip: u32,
}

impl ChunkRef {
    /// A whole chunk.
    pub fn whole(offset: u64, len: u32, id: ChunkId) -> Self {
        ChunkRef { offset, len, id, skip: 0 }
    }

    /// One past the last source byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len as u64
    }
}

/// A full snapshot: metadata plus chunk list sorted by offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub chunks: Vec<ChunkRef>,
}

impl Snapshot {
    /// A fresh random snapshot id.
    pub fn new_id() -> String {
        hex::encode(rand::random::<[u8; 16]>())
    }

    /// Encodes and seals in the newest version.
    pub fn encode(&self, key: &MasterKey) -> Result<Vec<u8>> {
        self.encode_as(key, VERSION)
    }

    /// Encodes and seals in `version` (1 only holds whole chunks).
    pub fn encode_as(&self, key: &MasterKey, version: u32) -> Result<Vec<u8>> {
        let json = serde_json::to_vec(&self.meta).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut plain = Vec::with_capacity(4 + json.len() + self.chunks.len() * RECORD_LEN_V2);
        plain.extend_from_slice(&(json.len() as u32).to_le_bytes());
        plain.extend_from_slice(&json);
        match version {
            1 if self.chunks.iter().all(|c| c.skip == 0) => {}
            1 => return Err(Error::Invalid("partial chunk references need snapshot version 2".into())),
            VERSION => {}
            v => return Err(Error::UnsupportedVersion(v, VERSION)),
        }
        for c in &self.chunks {
            plain.extend_from_slice(&c.offset.to_le_bytes());
            plain.extend_from_slice(&c.len.to_le_bytes());
            if version >= 2 {
                plain.extend_from_slice(&c.skip.to_le_bytes());
            }
            plain.extend_from_slice(&c.id.0);
        }
        let z = zstd::bulk::compress(&plain, 3).map_err(|e| Error::io("compress snapshot", e))?;
        let mut out = Vec::with_capacity(z.len() + 56);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&(plain.len() as u64).to_le_bytes());
        out.extend_from_slice(&key.seal(&z, AAD));
        Ok(out)
    }

    /// Opens and decodes; checks the stored id matches the object name.
    pub fn decode(key: &MasterKey, id: &str, bytes: &[u8]) -> Result<Snapshot> {
        let obj = format!("snapshots/{id}");
        if bytes.len() < 16 || &bytes[..4] != MAGIC {
            return Err(Error::corrupt(&obj, "not a snapshot"));
        }
        let v = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if !(1..=VERSION).contains(&v) {
            return Err(Error::UnsupportedVersion(v, VERSION));
        }
        let plen = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or([0; 8]));
        if plen > 1 << 36 {
            return Err(Error::corrupt(&obj, "implausible size"));
        }
        let z = key.open(&bytes[16..], AAD, &obj)?;
        let plain = crate::compress::decompress_at_most(&z, plen as usize)
            .map_err(|e| Error::corrupt(&obj, format!("zstd: {e}")))?;
        let bad = || Error::corrupt(&obj, "malformed manifest");
        let jlen = u32::from_le_bytes(plain.get(..4).ok_or_else(bad)?.try_into().map_err(|_| bad())?) as usize;
        let json = plain.get(4..4 + jlen).ok_or_else(bad)?;
        let meta: SnapshotMeta = serde_json::from_slice(json).map_err(|e| Error::corrupt(&obj, e.to_string()))?;
        if meta.id != id {
            return Err(Error::corrupt(&obj, "id does not match object name"));
        }
        let recs = &plain[4 + jlen..];
        let rlen = if v == 1 { RECORD_LEN_V1 } else { RECORD_LEN_V2 };
        if recs.len() % rlen != 0 {
            return Err(bad());
        }
        let u32_at = |r: &[u8], i: usize| u32::from_le_bytes(r[i..i + 4].try_into().unwrap_or([0; 4]));
        let chunks = recs
            .chunks_exact(rlen)
            .map(|r| ChunkRef {
                offset: u64::from_le_bytes(r[..8].try_into().unwrap_or([0; 8])),
                len: u32_at(r, 8),
                skip: if v == 1 { 0 } else { u32_at(r, 12) },
                id: ChunkId::from_slice(&r[rlen - 32..]).unwrap_or(ChunkId([0; 32])),
            })
            .collect();
        Ok(Snapshot { meta, chunks })
    }
}
