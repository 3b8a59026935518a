//! Packs: many encrypted chunks in one object, self-describing.
//!
//! Layout (see FORMAT.md): `"HLPK" u32 version | blob* | sealed trailer | u32 trailer_len
//! "HLPKIDX1"`. Each blob is `seal(zstd?(chunk), aad = chunk id)`; the trailer is the pack's
//! own index (sealed), so a lost index file can be rebuilt from the packs alone. A pack's
//! name is the BLAKE3 of its bytes, so a pack is immutable and a damaged one is recognisable.

mod entry;
mod writer;

pub use entry::{decode_entries, decode_entries_prefix, encode_entries, PackEntry, ENTRY_LEN, FLAG_COMPRESSED};
pub use writer::{FinishedPack, PackWriter};

use crate::chunk::ChunkId;
use crate::crypto::MasterKey;
use crate::error::{Error, Result};

/// Pack header magic and version.
pub const MAGIC: &[u8; 4] = b"HLPK";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 8;
/// Footer: trailer length + magic.
pub const FOOTER_MAGIC: &[u8; 8] = b"HLPKIDX1";
pub const FOOTER_LEN: usize = 12;
pub(crate) const TRAILER_AAD: &[u8] = b"hlstore-pack-trailer-v1";

/// Object key of a pack.
pub fn pack_key(pack_id: &str) -> String {
    format!("data/{}/{}", &pack_id[..2.min(pack_id.len())], pack_id)
}

/// Pack id from a `data/xx/<id>` key.
pub fn pack_id_from_key(key: &str) -> Option<&str> {
    let id = key.rsplit('/').next()?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// Compresses (when it helps) and seals one chunk. Returns the blob and its flags.
pub fn encode_blob(key: &MasterKey, id: &ChunkId, plain: &[u8], level: i32) -> (Vec<u8>, u8) {
    match zstd::bulk::Compressor::new(level) {
        Ok(mut c) => encode_blob_with(&mut c, key, id, plain),
        Err(_) => (key.seal(plain, &id.0), 0),
    }
}

/// [`encode_blob`] with a compressor the caller keeps (one per thread: a zstd context is
/// costly to set up for every chunk).
pub fn encode_blob_with(
    compressor: &mut zstd::bulk::Compressor<'_>,
    key: &MasterKey,
    id: &ChunkId,
    plain: &[u8],
) -> (Vec<u8>, u8) {
    let compressed = compressor.compress(plain).ok();
    match compressed {
        Some(c) if c.len() + 16 < plain.len() => (key.seal(&c, &id.0), FLAG_COMPRESSED),
        _ => (key.seal(plain, &id.0), 0),
    }
}

/// Opens one blob and checks it hashes to its id.
pub fn decode_blob(key: &MasterKey, e: &PackEntry, blob: &[u8], pack: &str) -> Result<Vec<u8>> {
    let mut buf = blob.to_vec();
    let stored = match decode_blob_in_place(key, e, &mut buf, pack)? {
        std::borrow::Cow::Owned(plain) => return Ok(plain),
        std::borrow::Cow::Borrowed(plain) => plain.len(),
    };
    // Stored uncompressed: the plaintext follows the nonce in `buf`.
    buf.truncate(crate::crypto::NONCE_LEN + stored);
    buf.drain(..crate::crypto::NONCE_LEN);
    Ok(buf)
}

/// [`decode_blob`] decrypting in place in `blob` (the fetched pack bytes): an uncompressed
/// chunk is returned as a slice of `blob`, without a copy.
pub fn decode_blob_in_place<'a>(
    key: &MasterKey,
    e: &PackEntry,
    blob: &'a mut [u8],
    pack: &str,
) -> Result<std::borrow::Cow<'a, [u8]>> {
    let obj = || format!("pack {pack} chunk {}", e.id);
    let payload = key.open_in_place(blob, &e.id.0, &obj())?;
    let plain = if e.flags & FLAG_COMPRESSED != 0 {
        std::borrow::Cow::Owned(
            crate::compress::decompress_chunk(payload, e.raw_len as usize)
                .map_err(|err| Error::corrupt(obj(), format!("zstd: {err}")))?,
        )
    } else {
        std::borrow::Cow::Borrowed(payload)
    };
    if plain.len() != e.raw_len as usize || key.chunk_id(&plain) != e.id {
        return Err(Error::corrupt(obj(), "content does not match its id"));
    }
    Ok(plain)
}

/// Length of the trailer given the last [`FOOTER_LEN`] bytes of a pack.
pub fn parse_footer(footer: &[u8], pack: &str) -> Result<usize> {
    if footer.len() != FOOTER_LEN || &footer[4..] != FOOTER_MAGIC {
        return Err(Error::corrupt(format!("pack {pack}"), "missing footer (truncated?)"));
    }
    Ok(u32::from_le_bytes([footer[0], footer[1], footer[2], footer[3]]) as usize)
}

/// Decodes a sealed trailer into entries, validating offsets against `pack_len`.
pub fn parse_trailer(key: &MasterKey, sealed: &[u8], pack: &str, pack_len: u64) -> Result<Vec<PackEntry>> {
    let obj = format!("pack {pack} trailer");
    let plain = key.open(sealed, TRAILER_AAD, &obj)?;
    let entries = decode_entries(&plain).ok_or_else(|| Error::corrupt(&obj, "bad entries"))?;
    let data_end = pack_len.saturating_sub((sealed.len() + FOOTER_LEN) as u64);
    for e in &entries {
        if (e.offset as u64) < HEADER_LEN as u64 || e.end() > data_end {
            return Err(Error::corrupt(&obj, "entry outside the pack"));
        }
    }
    Ok(entries)
}

/// Parses a whole pack held in memory: header, footer, trailer.
pub fn parse_pack(key: &MasterKey, bytes: &[u8], pack: &str) -> Result<Vec<PackEntry>> {
    let obj = format!("pack {pack}");
    if bytes.len() < HEADER_LEN + FOOTER_LEN || &bytes[..4] != MAGIC {
        return Err(Error::corrupt(&obj, "bad header (truncated or not a pack)"));
    }
    let v = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if v != VERSION {
        return Err(Error::UnsupportedVersion(v, VERSION));
    }
    let tlen = parse_footer(&bytes[bytes.len() - FOOTER_LEN..], pack)?;
    let tstart = bytes
        .len()
        .checked_sub(FOOTER_LEN + tlen)
        .filter(|&s| s >= HEADER_LEN)
        .ok_or_else(|| Error::corrupt(&obj, "trailer length out of range"))?;
    parse_trailer(key, &bytes[tstart..bytes.len() - FOOTER_LEN], pack, bytes.len() as u64)
}

pub(crate) fn seal_trailer(key: &MasterKey, entries: &[PackEntry]) -> Vec<u8> {
    key.seal(&encode_entries(entries), TRAILER_AAD)
}
