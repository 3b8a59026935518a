//! Index file codec: `"HLIX" u32 version | sealed(zstd(u32 npacks | pack*))`, each pack
//! `id[32] | u64 len | u32 count | entry*`.

use crate::crypto::MasterKey;
use crate::error::{Error, Result};
use crate::pack::{decode_entries_prefix, encode_entries, PackEntry};

pub(crate) const MAGIC: &[u8; 4] = b"HLIX";
pub(crate) const VERSION: u32 = 1;
pub(crate) const AAD: &[u8] = b"hlstore-index-v1";

/// One pack described by an index file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedPack {
    /// Hex pack id.
    pub id: String,
    /// Pack object length in bytes.
    pub len: u64,
    pub entries: Vec<PackEntry>,
}

/// Encodes and seals an index file.
pub fn encode_index(key: &MasterKey, packs: &[IndexedPack]) -> Result<Vec<u8>> {
    let mut plain = Vec::new();
    plain.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        let id = hex::decode(&p.id)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| Error::Invalid(format!("bad pack id {}", p.id)))?;
        plain.extend_from_slice(&id);
        plain.extend_from_slice(&p.len.to_le_bytes());
        plain.extend_from_slice(&encode_entries(&p.entries));
    }
    let z = zstd::bulk::compress(&plain, 3).map_err(|e| Error::io("compress index", e))?;
    let mut out = Vec::with_capacity(8 + z.len() + 40);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(plain.len() as u64).to_le_bytes());
    out.extend_from_slice(&key.seal(&z, AAD));
    Ok(out)
}

/// Opens and decodes an index file; `object` names it in errors.
pub fn decode_index(key: &MasterKey, bytes: &[u8], object: &str) -> Result<Vec<IndexedPack>> {
    if bytes.len() < 16 || &bytes[..4] != MAGIC {
        return Err(Error::corrupt(object, "not an index file"));
    }
    let v = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if v != VERSION {
        return Err(Error::UnsupportedVersion(v, VERSION));
    }
    let raw_len = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or([0; 8]));
    if raw_len > 1 << 34 {
        return Err(Error::corrupt(object, "implausible size"));
    }
    let z = key.open(&bytes[16..], AAD, object)?;
    let plain = crate::compress::decompress_at_most(&z, raw_len as usize)
        .map_err(|e| Error::corrupt(object, format!("zstd: {e}")))?;
    decode_plain(&plain).ok_or_else(|| Error::corrupt(object, "malformed entries"))
}

fn decode_plain(b: &[u8]) -> Option<Vec<IndexedPack>> {
    let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
    let mut rest = &b[4..];
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let id = hex::encode(rest.get(..32)?);
        let len = u64::from_le_bytes(rest.get(32..40)?.try_into().ok()?);
        let (entries, r) = decode_entries_prefix(&rest[40..])?;
        rest = r;
        out.push(IndexedPack { id, len, entries });
    }
    rest.is_empty().then_some(out)
}
