//! Backup packs: `decode_entries`, `parse_footer`, `parse_trailer`, `parse_pack` and
//! `decode_blob` from `hlstore_backup::pack`, with a fixed master key.
//!
//! Raw bytes never get past the AEAD check, so most modes seal fuzz bytes with the key
//! first: the decoders then see authenticated garbage, as from a damaged or hostile
//! repository writer that holds the key. Decoding must never panic, and whatever is
//! accepted must be consistent (entries inside the pack, blobs matching their ids).

#![no_main]

use hlstore_backup::chunk::ChunkId;
use hlstore_backup::fuzzing::{master_key, TRAILER_AAD};
use hlstore_backup::pack::{
    decode_blob, decode_entries, decode_entries_prefix, encode_entries, parse_footer, parse_pack, parse_trailer,
    PackEntry, FLAG_COMPRESSED, FOOTER_LEN, FOOTER_MAGIC, HEADER_LEN, MAGIC, VERSION,
};
use hlstore_fuzz::{Input, KEY_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = master_key(&KEY_BYTES);
    let mut input = Input::new(data);
    match input.u8() % 5 {
        // The entry codec alone.
        0 => {
            let b = input.rest();
            if let Some(entries) = decode_entries(b) {
                assert_eq!(encode_entries(&entries), b, "decode_entries accepts only its own encoding");
            }
            if let Some((entries, rest)) = decode_entries_prefix(b) {
                assert_eq!(encode_entries(&entries).len() + rest.len(), b.len());
            }
        }
        // A footer, then a whole pack as raw bytes.
        1 => {
            let footer = input.bytes(FOOTER_LEN);
            let _ = parse_footer(footer, "fuzz");
            let _ = parse_pack(&key, input.rest(), "fuzz");
        }
        // A pack whose trailer is sealed fuzz bytes: header | blobs | trailer | footer.
        2 => {
            let header_ok = input.u8() & 1 == 0;
            let trailer_len_delta = input.u8();
            let blobs = input.chunk();
            let trailer = key.seal(input.rest(), TRAILER_AAD);
            let mut pack = Vec::new();
            if header_ok {
                pack.extend_from_slice(MAGIC);
                pack.extend_from_slice(&VERSION.to_le_bytes());
            }
            pack.extend_from_slice(blobs);
            pack.extend_from_slice(&trailer);
            // Mostly the true trailer length; sometimes a wrong one.
            let tlen = (trailer.len() as u32).wrapping_add(u32::from(trailer_len_delta >> 4).wrapping_sub(8));
            pack.extend_from_slice(&tlen.to_le_bytes());
            pack.extend_from_slice(FOOTER_MAGIC);
            check_pack(&key, &pack);
        }
        // A trailer with a pack length of the fuzzer's choosing.
        3 => {
            let pack_len = input.u64();
            let sealed = key.seal(input.rest(), TRAILER_AAD);
            if let Ok(entries) = parse_trailer(&key, &sealed, "fuzz", pack_len) {
                let data_end = pack_len.saturating_sub((sealed.len() + FOOTER_LEN) as u64);
                for e in &entries {
                    assert!(u64::from(e.offset) >= HEADER_LEN as u64 && e.end() <= data_end);
                }
            }
        }
        // One blob: sealed fuzz bytes (zstd-compressed by the harness or not), an entry
        // whose id, raw length and flags are right or the fuzzer's.
        _ => {
            let mode = input.u8();
            let raw_len = input.u32();
            let flags = input.u8();
            let id = ChunkId(input.array::<32>());
            let plain = input.rest();
            let (payload, true_flags) = if mode & 1 != 0 {
                (zstd::bulk::compress(plain, 1).expect("compress"), FLAG_COMPRESSED)
            } else {
                (plain.to_vec(), 0)
            };
            let entry = PackEntry {
                id: if mode & 2 != 0 { key.chunk_id(plain) } else { id },
                offset: HEADER_LEN as u32,
                length: 0,
                raw_len: if mode & 4 != 0 { plain.len() as u32 } else { raw_len },
                flags: if mode & 8 != 0 { true_flags } else { flags },
            };
            let aad = if mode & 16 != 0 { id } else { entry.id };
            let blob = key.seal(&payload, &aad.0);
            if let Ok(out) = decode_blob(&key, &entry, &blob, "fuzz") {
                assert_eq!(out.len(), entry.raw_len as usize);
                assert_eq!(key.chunk_id(&out), entry.id);
            }
        }
    }
});

/// `parse_pack`, then every blob the trailer names, as a restore reads them.
fn check_pack(key: &hlstore_backup::crypto::MasterKey, pack: &[u8]) {
    let Ok(entries) = parse_pack(key, pack, "fuzz") else { return };
    for e in &entries {
        assert!(u64::from(e.offset) >= HEADER_LEN as u64 && e.end() <= pack.len() as u64, "entry outside the pack");
        let blob = &pack[e.offset as usize..e.end() as usize];
        let _ = decode_blob(key, e, blob, "fuzz");
    }
}
