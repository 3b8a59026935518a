//! Space of the disk store's slot files: overwrites reuse freed slots (the file does not
//! grow with every rewrite) and keep only a bounded pool of them allocated; trims hand the
//! space back to the filesystem.

use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{DiskStore, ReplicaStore, VolumeRecord, BLOCK_SIZE};

const BLOCKS: u64 = 1024;

#[test]
fn overwrites_reuse_slots_and_trims_return_space() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    s.create(VolumeRecord::new("v", 4 * BLOCKS * BLOCK_SIZE)).unwrap();
    s.open("v", Epoch(1)).unwrap();
    let (path, _) = {
        s.write("v", Epoch(1), Seq(1), Offset(0), &vec![1u8; BLOCK_SIZE as usize], false).unwrap();
        s.block_location("v", 0).unwrap().unwrap()
    };
    let file_len = || std::fs::metadata(&path).unwrap().len();
    let live = BLOCKS * BLOCK_SIZE;
    let mut seq = 1;
    for round in 0..8u8 {
        for chunk in 0..BLOCKS / 64 {
            seq += 1;
            let data = vec![round.wrapping_add(chunk as u8) | 1; (64 * BLOCK_SIZE) as usize];
            s.write("v", Epoch(1), Seq(seq), Offset(chunk * 64 * BLOCK_SIZE), &data, false).unwrap();
        }
        s.flush("v", Epoch(1)).unwrap();
        let used = s.disk_usage("v").unwrap();
        assert!(used <= live + live / 8 + 64 * 1024, "round {round}: {used} bytes on disk for {live} live bytes");
    }
    // Eight rewrites of the whole live data, a flush after each: the file holds the live
    // data plus one round of freed slots, not eight.
    assert!(file_len() <= 2 * live + 64 * 1024, "the slot file grew to {} bytes for {live} live bytes", file_len());
    for chunk in 0..BLOCKS / 64 {
        let got = s.read("v", Epoch(1), Offset(chunk * 64 * BLOCK_SIZE), 64 * BLOCK_SIZE).unwrap();
        assert!(got.iter().all(|&b| b == 7u8.wrapping_add(chunk as u8) | 1), "chunk {chunk} after the rewrites");
    }
    // Trimming everything but 64 blocks hands the space back.
    seq += 1;
    s.trim("v", Epoch(1), Seq(seq), Offset(64 * BLOCK_SIZE), (BLOCKS - 64) * BLOCK_SIZE).unwrap();
    s.flush("v", Epoch(1)).unwrap();
    let used = s.disk_usage("v").unwrap();
    assert!(used <= 64 * BLOCK_SIZE + 64 * BLOCK_SIZE / 8 + 64 * 1024, "{used} bytes on disk after the trim");
}

/// An idle agent writes the metadata memtables out (their memory is freed only then):
/// what the store holds is unchanged, before and after a reopen, and the activity count
/// moves with changes only.
#[test]
fn an_idle_store_writes_its_memtables_out_and_keeps_every_block() {
    let dir = tempfile::tempdir().unwrap();
    let block = |i: u64| vec![(i % 251) as u8 | 1; BLOCK_SIZE as usize];
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.create(VolumeRecord::new("v", BLOCKS * BLOCK_SIZE)).unwrap();
        s.open("v", Epoch(1)).unwrap();
        for i in 0..BLOCKS {
            let before = s.activity();
            s.write("v", Epoch(1), Seq(i + 1), Offset(i * BLOCK_SIZE), &block(i), false).unwrap();
            assert!(s.activity() > before, "a write is activity");
            if i == BLOCKS / 2 {
                s.flush("v", Epoch(1)).unwrap();
            }
        }
        let idle = s.activity();
        assert_eq!(s.read("v", Epoch(1), Offset(0), BLOCK_SIZE).unwrap(), block(0));
        assert_eq!(s.activity(), idle, "a read is not activity");
        // Below the threshold nothing is written out.
        let held = s.release_idle_memory(u64::MAX).unwrap();
        assert!(held > 0, "{BLOCKS} writes left nothing in the memtables");
        assert_eq!(s.release_idle_memory(u64::MAX).unwrap(), held);
        assert_eq!(s.release_idle_memory(0).unwrap(), held);
        let after = s.release_idle_memory(u64::MAX).unwrap();
        assert!(after < held / 4, "the memtables held {held} bytes before and {after} after being written out");
        for i in 0..BLOCKS {
            assert_eq!(s.read("v", Epoch(1), Offset(i * BLOCK_SIZE), BLOCK_SIZE).unwrap(), block(i), "block {i}");
        }
        s.flush("v", Epoch(1)).unwrap();
    }
    let s = DiskStore::open(dir.path()).unwrap();
    s.open("v", Epoch(1)).unwrap();
    for i in 0..BLOCKS {
        assert_eq!(
            s.read("v", Epoch(1), Offset(i * BLOCK_SIZE), BLOCK_SIZE).unwrap(),
            block(i),
            "block {i} after a reopen"
        );
    }
}
