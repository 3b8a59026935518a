//! The data directory's format version: recorded on first open, older (unrecorded)
//! directories are taken as version 1, and a directory of a newer format is refused with
//! an error that names both versions instead of being read by guesswork.

use hlstore_store::STORE_FORMAT_VERSION as FORMAT_VERSION;
use hlstore_store::{DiskStore, ReplicaStore, VolumeRecord};

#[test]
fn format_is_recorded_kept_and_a_newer_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = DiskStore::open(dir.path()).unwrap();
        s.create(VolumeRecord::new("v", 1 << 20)).unwrap();
    }
    let recorded = std::fs::read_to_string(dir.path().join("FORMAT")).unwrap();
    assert_eq!(recorded, format!("hlstore-store {FORMAT_VERSION}\n"));

    // A directory from before the file existed (version 1) opens and gets it.
    std::fs::remove_file(dir.path().join("FORMAT")).unwrap();
    let s = DiskStore::open(dir.path()).unwrap();
    assert_eq!(s.list().unwrap().len(), 1, "the replica is still there");
    drop(s);
    assert!(dir.path().join("FORMAT").exists());

    // A newer format: refused, nothing touched.
    std::fs::write(dir.path().join("FORMAT"), format!("hlstore-store {}\n", FORMAT_VERSION + 1)).unwrap();
    let err = DiskStore::open(dir.path()).err().expect("a newer format is refused").to_string();
    assert!(err.contains("newer hlstore") && err.contains(&format!("format {}", FORMAT_VERSION + 1)), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
        format!("hlstore-store {}\n", FORMAT_VERSION + 1)
    );
    std::fs::write(dir.path().join("FORMAT"), "garbage").unwrap();
    assert!(DiskStore::open(dir.path()).is_err());
}

/// Everything a replica answers, as text: state, each block's crc32 (live and in each
/// snapshot), the change index since a few points and the changed blocks between
/// snapshots.
fn dump(s: &DiskStore) -> String {
    use hlstore_core::{Epoch, Offset, Seq};
    use std::fmt::Write;
    let mut out = String::new();
    for info in s.list().unwrap() {
        let name = &info.record.volume_id;
        let st = &info.state;
        let e = Epoch(info.record.epoch);
        writeln!(
            out,
            "volume {name} size {} last {} durable {} allocated {} resync {:?}",
            info.record.size, st.last_seq, st.durable_seq, st.allocated_bytes, st.resync_from
        )
        .unwrap();
        let data = s.read(name, e, Offset(0), info.record.size).unwrap();
        for (b, block) in data.chunks(4096).enumerate() {
            if block.iter().any(|&x| x != 0) {
                writeln!(out, "  block {b} {:08x}", crc32fast::hash(block)).unwrap();
            }
        }
        for since in [0, 3, 4, 6] {
            let mut changes = s.changes_since(name, e, Seq(since)).unwrap();
            changes.sort_by_key(|c| format!("{c:?}"));
            writeln!(out, "  changes since {since}: {changes:?}").unwrap();
        }
        for snap in s.list_snapshots(name).unwrap() {
            writeln!(out, "  snapshot {} seq {}", snap.name, snap.seq).unwrap();
            let data = s.read_snapshot(name, &snap.name, Offset(0), snap.size).unwrap();
            for (b, block) in data.chunks(4096).enumerate() {
                if block.iter().any(|&x| x != 0) {
                    writeln!(out, "    block {b} {:08x}", crc32fast::hash(block)).unwrap();
                }
            }
            writeln!(out, "    changed since: {:?}", s.changed_blocks(name, Some(&snap.name), None).unwrap()).unwrap();
            writeln!(out, "    changed until: {:?}", s.changed_blocks(name, None, Some(&snap.name)).unwrap()).unwrap();
        }
    }
    out
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A data directory written by format 1 (per-block metadata records: two volumes with
/// overwrites, trims, a snapshot with kept versions, a resync copy below the durable mark
/// and writes after the last flush) opens under the current format and answers exactly
/// what format 1 answered (`expected.txt`, recorded by the format 1 code); it then
/// carries the current format and opens again the same.
#[test]
fn a_format_1_directory_is_upgraded_in_place_and_reads_the_same() {
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store-v1");
    let expected = std::fs::read_to_string(fixture.join("expected.txt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture.join("data"), dir.path());
    let s = DiskStore::open(dir.path()).unwrap();
    let got = dump(&s);
    if std::env::var_os("HLSTORE_RECORD_FIXTURE").is_some() {
        std::fs::write(fixture.join("expected.txt"), &got).unwrap();
    }
    assert_eq!(got, expected);
    drop(s);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
        format!("hlstore-store {FORMAT_VERSION}\n")
    );
    let s = DiskStore::open(dir.path()).unwrap();
    assert_eq!(dump(&s), expected, "the same after a second open");
}
