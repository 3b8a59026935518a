//! Decoders allocate for what repository data holds, never for the lengths it claims.
//!
//! An index file's and a snapshot's plaintext length sit outside the sealed part, so one
//! damaged length field (no key needed) claimed up to 16 GiB (index) or 64 GiB (snapshot),
//! and a blob's entry up to 4 GiB; the decoders reserved that much before decompressing
//! anything (found by the `backup_index` and `backup_pack` fuzz targets). A counting
//! allocator checks the largest single allocation of each decode.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use hlstore_backup::chunk::ChunkId;
use hlstore_backup::crypto::MasterKey;
use hlstore_backup::index::{decode_index, encode_index, IndexedPack};
use hlstore_backup::pack::{decode_blob, encode_blob, PackEntry, FLAG_COMPRESSED};
use hlstore_backup::snapshot::{ChunkRef, Snapshot, SnapshotMeta};
use hlstore_backup::ChunkerConfig;

/// The system allocator, remembering the largest request of the current thread.
struct Counting;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// The largest single allocation `f` made on this thread.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    let out = f();
    (out, LARGEST.with(Cell::get))
}

/// Far below every claimed length here, far above what the data holds.
const BOUND: usize = 64 << 20;

#[test]
fn index_with_a_damaged_length_field() {
    let key = MasterKey::generate();
    let packs = vec![IndexedPack {
        id: "ab".repeat(32),
        len: 4096,
        entries: vec![PackEntry { id: ChunkId([3; 32]), offset: 8, length: 100, raw_len: 90, flags: 0 }],
    }];
    let mut bytes = encode_index(&key, &packs).unwrap();
    // The plaintext length (bytes 8..16) is not authenticated: claim 16 GiB.
    bytes[8..16].copy_from_slice(&(1u64 << 34).to_le_bytes());
    let (decoded, largest) = largest_allocation(|| decode_index(&key, &bytes, "index/x"));
    assert_eq!(decoded.unwrap(), packs);
    assert!(largest < BOUND, "decode_index allocated {largest} bytes at once");
}

#[test]
fn index_claiming_gigabytes_of_an_empty_frame() {
    // The `backup_index` fuzz input `0e b8 b8 b8 b8`: an empty sealed body claiming
    // 0xb8b8b8b8 bytes.
    let key = MasterKey::generate();
    let mut bytes = Vec::new();
    bytes.extend_from_slice(hlstore_backup::fuzzing::INDEX_MAGIC);
    bytes.extend_from_slice(&hlstore_backup::fuzzing::INDEX_VERSION.to_le_bytes());
    bytes.extend_from_slice(&0xb8b8_b8b8u64.to_le_bytes());
    bytes.extend_from_slice(&key.seal(b"", hlstore_backup::fuzzing::INDEX_AAD));
    let (decoded, largest) = largest_allocation(|| decode_index(&key, &bytes, "index/x"));
    assert!(decoded.is_err());
    assert!(largest < BOUND, "decode_index allocated {largest} bytes at once");
}

#[test]
fn snapshot_with_a_damaged_length_field() {
    let key = MasterKey::generate();
    let meta = SnapshotMeta {
        id: Snapshot::new_id(),
        time: 1_700_000_000,
        nanos: 0,
        source: "/dev/vdb".into(),
        size: 1 << 20,
        host: "node1".into(),
        labels: Default::default(),
        parent: None,
        chunker: ChunkerConfig::default(),
        stats: Default::default(),
    };
    let snap = Snapshot { meta, chunks: vec![ChunkRef::whole(0, 65536, ChunkId([1; 32]))] };
    let mut bytes = snap.encode(&key).unwrap();
    bytes[8..16].copy_from_slice(&(1u64 << 36).to_le_bytes());
    let (decoded, largest) = largest_allocation(|| Snapshot::decode(&key, &snap.meta.id, &bytes));
    assert_eq!(decoded.unwrap(), snap);
    assert!(largest < BOUND, "Snapshot::decode allocated {largest} bytes at once");
}

#[test]
fn blob_whose_entry_claims_gigabytes() {
    // The `backup_pack` fuzz input `6d f0 f0 f0 f0 f0 75`: an empty sealed payload whose
    // entry says compressed, 0xf0f0f0f0 bytes.
    let key = MasterKey::generate();
    let id = ChunkId([0; 32]);
    let e = PackEntry { id, offset: 8, length: 0, raw_len: 0xf0f0_f0f0, flags: 0x75 };
    let blob = key.seal(b"", &id.0);
    let (decoded, largest) = largest_allocation(|| decode_blob(&key, &e, &blob, "p"));
    assert!(decoded.is_err());
    assert!(largest < BOUND, "decode_blob allocated {largest} bytes at once");

    // A real compressed chunk with a raw length claiming 4 GiB: rejected, cheaply.
    let plain = vec![5u8; 65536];
    let id = key.chunk_id(&plain);
    let (blob, flags) = encode_blob(&key, &id, &plain, 3);
    assert_eq!(flags, FLAG_COMPRESSED);
    let e = PackEntry { id, offset: 8, length: blob.len() as u32, raw_len: u32::MAX, flags };
    let (decoded, largest) = largest_allocation(|| decode_blob(&key, &e, &blob, "p"));
    assert!(decoded.is_err());
    assert!(largest < BOUND, "decode_blob allocated {largest} bytes at once");
    let e = PackEntry { raw_len: plain.len() as u32, ..e };
    assert_eq!(decode_blob(&key, &e, &blob, "p").unwrap(), plain);
}
