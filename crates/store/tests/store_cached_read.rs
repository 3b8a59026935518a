//! `try_read_cached`: the disk store answers a read from memory exactly as `read` does
//! (data, zeroes of unwritten blocks, checksum errors, epoch checks) and answers None,
//! instead of waiting, when the blocks are not in the page cache.

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use hlstore_core::error::Error;
use hlstore_core::{Epoch, Offset, Seq};
use hlstore_store::{DiskStore, MemStore, ReplicaStore, VolumeRecord, BLOCK_SIZE};

const BS: u64 = BLOCK_SIZE;

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1).collect()
}

#[test]
fn cached_reads_answer_as_reads_do_and_none_when_not_cached() {
    let dir = tempfile::tempdir().unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    s.create(VolumeRecord::new("v", 256 * BS)).unwrap();
    s.open("v", Epoch(1)).unwrap();
    s.write("v", Epoch(1), Seq(1), Offset(0), &pattern(1, 16 * BS), false).unwrap();
    s.write("v", Epoch(1), Seq(2), Offset(3 * BS), &pattern(2, 2 * BS), false).unwrap();
    // Inside one metadata page: written, rewritten and (block 20 on) unwritten blocks.
    for (offset, len) in [(0, BS), (2 * BS, 4 * BS), (0, 16 * BS), (20 * BS, 4 * BS), (14 * BS, 2 * BS)] {
        let cached = s.try_read_cached("v", Epoch(1), Offset(offset), len).unwrap();
        let read = s.read("v", Epoch(1), Offset(offset), len).unwrap();
        assert_eq!(cached.as_deref(), Some(&read[..]), "read of {len} bytes at {offset}");
    }
    // Across metadata pages: not tried inline.
    assert_eq!(s.try_read_cached("v", Epoch(1), Offset(8 * BS), 16 * BS).unwrap(), None);
    // The same checks as a read.
    let stale = s.try_read_cached("v", Epoch(0), Offset(0), BS).unwrap_err();
    assert!(matches!(stale, Error::StaleEpoch { .. }), "{stale}");
    assert!(s.try_read_cached("v", Epoch(1), Offset(255 * BS), 2 * BS).is_err(), "past the end");

    // Damage block 4's data in the file (through the page cache): both report it.
    let (path, at) = s.block_location("v", 4 * BS).unwrap().unwrap();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    file.write_all_at(&[0xAB; 16], at + 100).unwrap();
    for err in [
        s.try_read_cached("v", Epoch(1), Offset(4 * BS), BS).unwrap_err(),
        s.read("v", Epoch(1), Offset(4 * BS), BS).unwrap_err(),
    ] {
        assert!(matches!(err, Error::Corruption { offset, .. } if offset == 4 * BS), "{err}");
    }

    // Out of the page cache (synced, then dropped): None, and the blocking read still answers.
    s.flush("v", Epoch(1)).unwrap();
    file.sync_all().unwrap();
    // SAFETY: fadvise only reads its integer arguments; the fd is open for the call.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0);
    if on_tmpfs(&path) {
        eprintln!("{}: tmpfs keeps its pages; the not-cached case is not checked here", path.display());
        return;
    }
    assert_eq!(s.try_read_cached("v", Epoch(1), Offset(8 * BS), 4 * BS).unwrap(), None);
    assert_eq!(
        s.read("v", Epoch(1), Offset(8 * BS), 4 * BS).unwrap(),
        pattern(1, 16 * BS)[8 * BS as usize..12 * BS as usize]
    );
    // Read once, the blocks are cached again.
    assert!(s.try_read_cached("v", Epoch(1), Offset(8 * BS), 4 * BS).unwrap().is_some());
}

fn on_tmpfs(path: &std::path::Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type == libc::TMPFS_MAGIC
}

#[test]
fn the_memory_store_never_answers_inline() {
    let s = MemStore::new();
    s.create(VolumeRecord::new("v", 16 * BS)).unwrap();
    s.open("v", Epoch(1)).unwrap();
    assert_eq!(s.try_read_cached("v", Epoch(1), Offset(0), BS).unwrap(), None);
}
