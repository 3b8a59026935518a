//! Backup index files: `hlstore_backup::index::decode_index`, with a fixed master key.
//!
//! Raw bytes never get past the AEAD check, so most modes build the file around sealed
//! fuzz bytes: `"HLIX" | version | raw_len | seal(zstd(plain))` with the fuzz bytes as the
//! plaintext entries (reaching the entry decoder), or as the zstd frame itself (reaching
//! the decompressor with a raw length of the fuzzer's choosing). Decoding must never panic
//! and whatever decodes must encode back to the same packs.

#![no_main]

use hlstore_backup::fuzzing::{master_key, INDEX_AAD, INDEX_MAGIC, INDEX_VERSION};
use hlstore_backup::index::{decode_index, encode_index};
use hlstore_fuzz::{Input, KEY_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = master_key(&KEY_BYTES);
    let mut input = Input::new(data);
    let mode = input.u8();
    let bytes = match mode % 3 {
        0 => input.rest().to_vec(),
        1 => {
            let raw_len = input.u64();
            let plain = input.rest();
            let z = zstd::bulk::compress(plain, 1).expect("compress");
            let raw_len = if mode & 4 != 0 { raw_len } else { plain.len() as u64 };
            frame(&key, raw_len, &z)
        }
        _ => {
            let raw_len = input.u64();
            frame(&key, raw_len, input.rest())
        }
    };
    if let Ok(packs) = decode_index(&key, &bytes, "fuzz") {
        let again = encode_index(&key, &packs).expect("decoded packs encode");
        assert_eq!(decode_index(&key, &again, "fuzz").expect("re-encoded index decodes"), packs);
    }
});

fn frame(key: &hlstore_backup::crypto::MasterKey, raw_len: u64, z: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&raw_len.to_le_bytes());
    out.extend_from_slice(&key.seal(z, INDEX_AAD));
    out
}
